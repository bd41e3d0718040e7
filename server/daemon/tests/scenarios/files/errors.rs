//! The file RPCs' status codes: each of the agent's `FileFailed` kinds,
//! the daemon's own validation (paths, headers, unknown sandboxes), and
//! the reference guest's refusals.

use forkd_api::v1 as pb;
use tonic::Code;

use super::{data, head, header, list, put, read_all, read_text, remove, stat, upload};
use crate::harness::{assert_status, linux_daemon, spawn, spawn_image};

/// The status codes: the agent's `FileFailed` kinds, the daemon's own
/// validation, and the reference guest.
pub async fn linux_files_errors() {
    let d = linux_daemon("svm").await;
    let mut c = d.sandboxes().await;
    let sb = spawn_image(&mut c, "debian").await;
    let id = sb.id.as_str();
    put(&mut c, id, "/tmp/f", b"file").await;

    // The agent's failures.
    let wc = c.clone();
    let w = move |h: pb::WriteFileHeader| {
        let mut c = wc.clone();
        async move { upload(&mut c, vec![head(h), data(vec![7; 300_000])]).await }
    };
    assert_status(w(header(id, "/nope/x")).await, Code::NotFound, &["/nope"]);
    let r = w(pb::WriteFileHeader {
        no_overwrite: true,
        ..header(id, "/tmp/f")
    })
    .await;
    assert_status(r, Code::AlreadyExists, &[]);
    assert_eq!(read_text(&mut c, id, "/tmp/f").await, "file");
    let r = w(header(id, "/tmp")).await;
    assert_status(r, Code::FailedPrecondition, &["is a directory"]);
    let r = w(header(id, "/tmp/f/under")).await;
    assert_status(r, Code::FailedPrecondition, &["not a directory"]);
    let r = w(header(id, "/fake/zeros/5")).await;
    assert_status(r, Code::PermissionDenied, &[]);
    // A failure after data was taken (the disk filled up).
    let r = w(header(id, "/fake/fail/no_space")).await;
    assert_status(r, Code::ResourceExhausted, &["filesystem is full"]);
    for (kind, code) in [
        ("not_found", Code::NotFound),
        ("already_exists", Code::AlreadyExists),
        ("not_a_directory", Code::FailedPrecondition),
        ("is_a_directory", Code::FailedPrecondition),
        ("not_empty", Code::FailedPrecondition),
        ("not_a_file", Code::FailedPrecondition),
        ("no_space", Code::ResourceExhausted),
        ("permission_denied", Code::PermissionDenied),
        ("invalid_path", Code::InvalidArgument),
        ("busy", Code::Unavailable),
        ("aborted", Code::Cancelled),
        ("protocol", Code::Internal),
        ("io", Code::Internal),
    ] {
        let path = format!("/fake/fail/{kind}");
        let e = read_all(&mut c, id, &path, 0, 0).await.unwrap_err();
        assert_eq!(e.code(), code, "ReadFile {kind}: {e:?}");
        let e = stat(&mut c, id, &path).await.unwrap_err();
        assert_eq!(e.code(), code, "StatFile {kind}: {e:?}");
        let e = list(&mut c, id, &path).await.unwrap_err();
        assert_eq!(e.code(), code, "ListDir {kind}: {e:?}");
        let e = remove(&mut c, id, &path, true).await.unwrap_err();
        assert_eq!(e.code(), code, "RemoveFile {kind}: {e:?}");
        let e = w(header(id, &path)).await.unwrap_err();
        assert_eq!(e.code(), code, "WriteFile {kind}: {e:?}");
    }
    assert_status(
        read_all(&mut c, id, "/tmp/missing", 0, 0).await,
        Code::NotFound,
        &[],
    );
    assert_status(
        read_all(&mut c, id, "/tmp", 0, 0).await,
        Code::FailedPrecondition,
        &[],
    );
    assert_status(stat(&mut c, id, "/tmp/missing").await, Code::NotFound, &[]);
    assert_status(list(&mut c, id, "/tmp/missing").await, Code::NotFound, &[]);
    assert_status(
        list(&mut c, id, "/tmp/f").await,
        Code::FailedPrecondition,
        &[],
    );
    assert_status(
        remove(&mut c, id, "/tmp/missing", false).await,
        Code::NotFound,
        &[],
    );

    // The daemon's own checks: paths, the header, the mode.
    for bad in ["", "tmp/f", "/tmp/\0x"] {
        let e = w(header(id, bad)).await.unwrap_err();
        assert_eq!(e.code(), Code::InvalidArgument, "WriteFile {bad:?}: {e:?}");
        let e = read_all(&mut c, id, bad, 0, 0).await.unwrap_err();
        assert_eq!(e.code(), Code::InvalidArgument, "ReadFile {bad:?}: {e:?}");
        let e = stat(&mut c, id, bad).await.unwrap_err();
        assert_eq!(e.code(), Code::InvalidArgument, "StatFile {bad:?}: {e:?}");
        let e = list(&mut c, id, bad).await.unwrap_err();
        assert_eq!(e.code(), Code::InvalidArgument, "ListDir {bad:?}: {e:?}");
        let e = remove(&mut c, id, bad, false).await.unwrap_err();
        assert_eq!(e.code(), Code::InvalidArgument, "RemoveFile {bad:?}: {e:?}");
    }
    assert_status(w(header(id, "/tmp/dir/")).await, Code::InvalidArgument, &[]);
    let r = w(pb::WriteFileHeader {
        mode: 0o10000,
        ..header(id, "/tmp/m")
    })
    .await;
    assert_status(r, Code::InvalidArgument, &[]);
    assert_status(
        remove(&mut c, id, "/", true).await,
        Code::InvalidArgument,
        &[],
    );
    assert_status(
        upload(
            &mut c,
            vec![data(b"x".to_vec()), head(header(id, "/tmp/d"))],
        )
        .await,
        Code::InvalidArgument,
        &["data came first"],
    );
    assert_status(upload(&mut c, vec![]).await, Code::InvalidArgument, &[]);
    assert_status(
        upload(
            &mut c,
            vec![
                head(header(id, "/tmp/h")),
                data(b"x".to_vec()),
                head(header(id, "/tmp/h")),
            ],
        )
        .await,
        Code::InvalidArgument,
        &[],
    );
    // None of these left a file.
    assert_eq!(list(&mut c, id, "/tmp").await.unwrap(), ["f"]);

    // Unknown sandboxes, and the reference guest, which has no files.
    assert_status(w(header("sb-nope", "/tmp/x")).await, Code::NotFound, &[]);
    assert_status(stat(&mut c, "sb-nope", "/tmp").await, Code::NotFound, &[]);
    let reference = spawn(&mut c, 1).await.remove(0);
    let rid = reference.id.as_str();
    assert_status(
        w(header(rid, "/tmp/x")).await,
        Code::FailedPrecondition,
        &[],
    );
    assert_status(
        read_all(&mut c, rid, "/tmp/x", 0, 0).await,
        Code::FailedPrecondition,
        &[],
    );
    assert_status(
        stat(&mut c, rid, "/tmp").await,
        Code::FailedPrecondition,
        &[],
    );
    assert_status(
        list(&mut c, rid, "/tmp").await,
        Code::FailedPrecondition,
        &[],
    );
    assert_status(
        remove(&mut c, rid, "/tmp/x", false).await,
        Code::FailedPrecondition,
        &[],
    );

    // The Linux sandbox is still fine.
    put(&mut c, id, "/tmp/g", b"g").await;
    assert_eq!(list(&mut c, id, "/tmp").await.unwrap(), ["f", "g"]);
}
