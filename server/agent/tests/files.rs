//! File transfers (upload, download, stat, list, remove) of the real agent
//! binary over a socket pair, with the test as a flow-controlling host.

mod common;

use std::io::Write;
use std::os::unix::fs::{symlink, PermissionsExt};
use std::os::unix::net::UnixStream;
use std::path::{Path, PathBuf};
use std::time::Duration;

use common::{Agent, Event};
use forkd_agent_proto::{
    encode_data, FileErrorKind, FileKind, GuestMsg, HostMsg, FILE_WRITE_WINDOW, MAX_DATA,
    STREAM_FILE,
};
use sha2::{Digest, Sha256};

const MIB: usize = 1 << 20;

/// A fresh, empty directory for one test.
fn scratch(name: &str) -> PathBuf {
    let dir = std::env::temp_dir().join(format!("forkd-files-{}-{name}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir).unwrap();
    dir
}

fn p(path: &Path) -> String {
    path.to_str().unwrap().to_string()
}

/// Deterministic pseudo-random bytes (xorshift).
fn random(n: usize, seed: u64) -> Vec<u8> {
    let mut x = seed | 1;
    (0..n)
        .map(|_| {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            (x >> 24) as u8
        })
        .collect()
}

fn sha(data: &[u8]) -> String {
    Sha256::digest(data)
        .iter()
        .map(|b| format!("{b:02x}"))
        .collect()
}

fn names(dir: &Path) -> Vec<String> {
    let mut v: Vec<String> = std::fs::read_dir(dir)
        .unwrap()
        .map(|e| e.unwrap().file_name().into_string().unwrap())
        .collect();
    v.sort();
    v
}

/// The next event that is not a Log.
fn next(a: &mut Agent) -> Event {
    loop {
        match a.recv() {
            Event::Msg(GuestMsg::Log { .. }) => {}
            e => return e,
        }
    }
}

fn next_msg(a: &mut Agent) -> GuestMsg {
    match next(a) {
        Event::Msg(m) => m,
        other => panic!("expected a message, got {other:?}"),
    }
}

fn send_file_data(w: &mut UnixStream, id: u64, data: &[u8]) {
    w.write_all(&encode_data(id, STREAM_FILE, data).unwrap())
        .unwrap();
}

fn write_req(id: u64, path: &str, mode: u32, parents: bool, exclusive: bool) -> HostMsg {
    HostMsg::WriteFile {
        id,
        path: path.into(),
        mode,
        parents,
        exclusive,
    }
}

/// Uploads `data` honouring the credits; returns the final message.
fn upload(a: &mut Agent, id: u64, data: &[u8]) -> GuestMsg {
    let mut w = a.writer();
    let (mut sent, mut credited) = (0usize, 0u64);
    loop {
        // Send while the window allows.
        while sent < data.len() {
            let n = (data.len() - sent).min(MAX_DATA);
            if (sent + n) as u64 - credited > FILE_WRITE_WINDOW {
                break;
            }
            send_file_data(&mut w, id, &data[sent..sent + n]);
            sent += n;
        }
        if sent == data.len() {
            send_file_data(&mut w, id, b"");
            break;
        }
        match next_msg(a) {
            GuestMsg::FileCredit { id: cid, bytes } if cid == id => {
                assert!(bytes >= credited && bytes <= sent as u64, "{bytes}");
                credited = bytes;
            }
            other => return other,
        }
    }
    loop {
        match next_msg(a) {
            GuestMsg::FileCredit { id: cid, .. } if cid == id => {}
            other => return other,
        }
    }
}

fn failed_kind(m: &GuestMsg, want_id: u64) -> FileErrorKind {
    match m {
        GuestMsg::FileFailed { id, kind, .. } if *id == want_id => *kind,
        other => panic!("expected FileFailed for {want_id}, got {other:?}"),
    }
}

#[test]
fn upload_5mib_with_credits() {
    let dir = scratch("upload");
    let path = dir.join("big.bin");
    let data = random(5 * MIB + 123, 7);
    let mut a = Agent::start();
    a.send(&write_req(1, &p(&path), 0o666, false, false));
    let done = upload(&mut a, 1, &data);
    assert_eq!(
        done,
        GuestMsg::FileWritten {
            id: 1,
            size: data.len() as u64,
            sha256: sha(&data)
        }
    );
    assert_eq!(std::fs::read(&path).unwrap(), data);
    // The exact mode, whatever the umask.
    let mode = std::fs::metadata(&path).unwrap().permissions().mode() & 0o7777;
    assert_eq!(mode, 0o666);
    assert_eq!(names(&dir), ["big.bin"]);
    // Replacing it (not exclusive), default mode; an empty file.
    a.send(&write_req(2, &p(&path), 0, false, false));
    assert!(matches!(
        upload(&mut a, 2, b""),
        GuestMsg::FileWritten { size: 0, .. }
    ));
    assert_eq!(std::fs::read(&path).unwrap(), b"");
    let mode = std::fs::metadata(&path).unwrap().permissions().mode() & 0o7777;
    assert_eq!(mode, 0o644);
    assert_eq!(names(&dir), ["big.bin"]);
}

#[test]
fn upload_errors() {
    let dir = scratch("upload-errors");
    let existing = dir.join("keep");
    std::fs::write(&existing, b"original").unwrap();
    let mut a = Agent::start();
    let mut id = 10;
    let mut try_write = |a: &mut Agent, path: &str, parents: bool, exclusive: bool| {
        id += 1;
        a.send(&write_req(id, path, 0, parents, exclusive));
        match upload(a, id, b"new") {
            GuestMsg::FileWritten { .. } => None,
            m => Some(failed_kind(&m, id)),
        }
    };
    let e = p(&existing);
    assert_eq!(
        try_write(&mut a, &e, false, true),
        Some(FileErrorKind::AlreadyExists)
    );
    assert_eq!(std::fs::read(&existing).unwrap(), b"original");
    let missing = p(&dir.join("no/such/f"));
    assert_eq!(
        try_write(&mut a, &missing, false, false),
        Some(FileErrorKind::NotFound)
    );
    assert_eq!(try_write(&mut a, &missing, true, true), None);
    assert_eq!(std::fs::read(dir.join("no/such/f")).unwrap(), b"new");
    let under_file = format!("{e}/x");
    assert_eq!(
        try_write(&mut a, &under_file, false, false),
        Some(FileErrorKind::NotADirectory)
    );
    assert_eq!(
        try_write(&mut a, &under_file, true, false),
        Some(FileErrorKind::NotADirectory)
    );
    assert_eq!(
        try_write(&mut a, &p(&dir), false, false),
        Some(FileErrorKind::IsADirectory)
    );
    for bad in ["", "rel/a", "/a\0b", "/tmp/"] {
        assert_eq!(
            try_write(&mut a, bad, true, false),
            Some(FileErrorKind::InvalidPath),
            "{bad:?}"
        );
    }
    // Nothing left behind but what was meant.
    assert_eq!(names(&dir), ["keep", "no"]);
    assert_eq!(names(&dir.join("no/such")), ["f"]);
}

#[test]
fn upload_abort_and_overrun_leave_nothing() {
    let dir = scratch("abort");
    let path = p(&dir.join("f"));
    let mut a = Agent::start();
    let mut w = a.writer();
    a.send(&write_req(1, &path, 0, false, false));
    send_file_data(&mut w, 1, &[1; MAX_DATA]);
    assert_eq!(
        next_msg(&mut a),
        GuestMsg::FileCredit {
            id: 1,
            bytes: MAX_DATA as u64
        }
    );
    a.send(&HostMsg::FileAbort { id: 1 });
    assert_eq!(failed_kind(&next_msg(&mut a), 1), FileErrorKind::Aborted);
    // Later frames for it are dropped.
    send_file_data(&mut w, 1, &[2; 10]);
    send_file_data(&mut w, 1, b"");
    a.send(&HostMsg::Ping { id: 2 });
    assert_eq!(next_msg(&mut a), GuestMsg::Pong { id: 2 });
    assert_eq!(names(&dir), Vec::<String>::new());

    // A host that sends more than the window beyond the credits fails the
    // upload. The agent measures the window against what its writer has
    // written, so a burst only overruns if the writer falls behind: a writer
    // that keeps up (a slow or loaded host) credits every frame and rightly
    // completes the upload. So the channel is parked first (Quiesce): the
    // writer then stops at its first credit, having written at most one
    // frame, and the burst overruns the window whatever the timing.
    a.send(&write_req(3, &path, 0, false, false));
    a.send(&HostMsg::Quiesce { id: 5 });
    assert_eq!(next_msg(&mut a), GuestMsg::Quiesced { id: 5 });
    let frames = FILE_WRITE_WINDOW as usize / MAX_DATA + 2;
    for _ in 0..frames {
        send_file_data(&mut w, 3, &[3; MAX_DATA]);
    }
    send_file_data(&mut w, 3, b"");
    a.send(&HostMsg::Resume {
        id: 6,
        forked: false,
        entropy: vec![],
        unix_ns: 0,
        sandbox_id: None,
    });
    assert!(matches!(next_msg(&mut a), GuestMsg::Resumed { id: 6, .. }));
    // The writer goes on with what was queued before the overrun (credits
    // for at most a window and the frame it held), then fails.
    let kind = loop {
        match next_msg(&mut a) {
            GuestMsg::FileCredit { id: 3, bytes } => {
                assert!(bytes <= FILE_WRITE_WINDOW + MAX_DATA as u64, "{bytes}");
            }
            m => break failed_kind(&m, 3),
        }
    };
    assert_eq!(kind, FileErrorKind::Protocol);
    a.send(&HostMsg::Ping { id: 4 });
    loop {
        match next_msg(&mut a) {
            GuestMsg::Pong { id: 4 } => break,
            GuestMsg::FileCredit { id: 3, .. } => {}
            other => panic!("{other:?}"),
        }
    }
    assert_eq!(names(&dir), Vec::<String>::new());
}

/// Downloads with `window`, acking `ack_every` bytes at a time (checking
/// the agent never runs ahead); returns (size, bytes, sha256).
fn download(
    a: &mut Agent,
    id: u64,
    req: HostMsg,
    window: u64,
    slow: bool,
) -> (u64, Vec<u8>, String) {
    a.send(&req);
    let size = match next_msg(a) {
        GuestMsg::FileOpened { id: oid, size } if oid == id => size,
        other => panic!("expected FileOpened, got {other:?}"),
    };
    let mut got = Vec::new();
    let mut acked = 0u64;
    let mut stalls = 0;
    loop {
        match next(a) {
            Event::Data {
                id: did,
                stream,
                data,
            } if did == id => {
                assert_eq!(stream, STREAM_FILE);
                assert!(!data.is_empty());
                got.extend_from_slice(&data);
                let outstanding = got.len() as u64 - acked;
                assert!(outstanding <= window, "{outstanding} > {window}");
                if outstanding == window {
                    if slow && stalls < 3 {
                        // The agent must wait for us.
                        stalls += 1;
                        assert_eq!(a.recv_within(Duration::from_millis(150)), None);
                    }
                    acked = got.len() as u64;
                    a.send(&HostMsg::FileAck { id, bytes: acked });
                }
            }
            Event::Msg(GuestMsg::FileRead {
                id: rid,
                bytes,
                sha256,
            }) if rid == id => {
                assert_eq!(bytes, got.len() as u64);
                return (size, got, sha256);
            }
            other => panic!("unexpected {other:?}"),
        }
    }
}

fn read_req(id: u64, path: &str, offset: u64, length: u64, window: u32) -> HostMsg {
    HostMsg::ReadFile {
        id,
        path: path.into(),
        offset,
        length,
        window,
    }
}

#[test]
fn download_within_the_window() {
    let dir = scratch("download");
    let path = dir.join("big.bin");
    let data = random(5 * MIB + 77, 9);
    std::fs::write(&path, &data).unwrap();
    let mut a = Agent::start();
    // A window that is not a multiple of the frame size.
    let window = 100_000;
    let (size, got, digest) = download(
        &mut a,
        1,
        read_req(1, &p(&path), 0, 0, window),
        window.into(),
        true,
    );
    assert_eq!(size, data.len() as u64);
    assert!(got == data, "content differs");
    assert_eq!(digest, sha(&data));
}

#[test]
fn download_ranges() {
    let dir = scratch("ranges");
    let path = p(&dir.join("f"));
    let data = random(300_000, 3);
    std::fs::write(&path, &data).unwrap();
    let mut a = Agent::start();
    let n = data.len() as u64;
    let cases: [(u64, u64, std::ops::Range<usize>); 5] = [
        (0, 0, 0..data.len()),
        (10, 100, 10..110),
        (70_000, 0, 70_000..data.len()),
        (n - 5, 100, data.len() - 5..data.len()),
        (n + 10, 0, 0..0),
    ];
    for (i, (offset, length, want)) in cases.into_iter().enumerate() {
        let id = 100 + i as u64;
        let (_, got, digest) = download(
            &mut a,
            id,
            read_req(id, &path, offset, length, 1 << 20),
            1 << 20,
            false,
        );
        assert!(got == data[want.clone()], "case {i}");
        assert_eq!(digest, sha(&data[want]));
    }
}

#[test]
fn download_errors_and_abort() {
    let dir = scratch("download-errors");
    let path = p(&dir.join("f"));
    std::fs::write(&path, random(MIB, 1)).unwrap();
    let mut a = Agent::start();
    let cases = [
        (p(&dir.join("missing")), 1000, FileErrorKind::NotFound),
        (p(&dir), 1000, FileErrorKind::IsADirectory),
        ("/dev/null".to_string(), 1000, FileErrorKind::NotAFile),
        (format!("{path}/x"), 1000, FileErrorKind::NotADirectory),
        ("rel".to_string(), 1000, FileErrorKind::InvalidPath),
        (path.clone(), 0, FileErrorKind::Protocol),
    ];
    for (i, (path, window, kind)) in cases.into_iter().enumerate() {
        let id = i as u64;
        a.send(&read_req(id, &path, 0, 0, window));
        assert_eq!(failed_kind(&next_msg(&mut a), id), kind, "{path}");
    }
    // Abort mid-way: FileFailed{aborted}, and no more data after it.
    a.send(&read_req(50, &path, 0, 0, MAX_DATA as u32));
    assert!(matches!(
        next_msg(&mut a),
        GuestMsg::FileOpened { id: 50, .. }
    ));
    assert!(matches!(next(&mut a), Event::Data { id: 50, .. }));
    a.send(&HostMsg::FileAbort { id: 50 });
    assert_eq!(failed_kind(&next_msg(&mut a), 50), FileErrorKind::Aborted);
    a.send(&HostMsg::Ping { id: 51 });
    assert_eq!(next_msg(&mut a), GuestMsg::Pong { id: 51 });
}

#[test]
fn stat_list_remove() {
    let dir = scratch("meta");
    std::fs::write(dir.join("b"), b"12345").unwrap();
    std::fs::write(dir.join("a"), b"").unwrap();
    std::fs::set_permissions(dir.join("a"), std::fs::Permissions::from_mode(0o751)).unwrap();
    std::fs::create_dir(dir.join("c")).unwrap();
    std::fs::write(dir.join("c/inner"), b"x").unwrap();
    symlink("/nonexistent", dir.join("d")).unwrap();
    let mut a = Agent::start();

    a.send(&HostMsg::ListDir {
        id: 1,
        path: p(&dir),
    });
    match next_msg(&mut a) {
        GuestMsg::DirListing {
            id: 1,
            entries,
            truncated: false,
        } => {
            let got: Vec<_> = entries.iter().map(|e| (e.name.as_str(), e.kind)).collect();
            assert_eq!(
                got,
                [
                    ("a", FileKind::File),
                    ("b", FileKind::File),
                    ("c", FileKind::Dir),
                    ("d", FileKind::Symlink)
                ]
            );
            assert_eq!(entries[0].mode, 0o751);
            assert_eq!(entries[1].size, 5);
            assert!(entries[1].mtime_ns > 1_500_000_000 * 1_000_000_000);
        }
        other => panic!("{other:?}"),
    }
    a.send(&HostMsg::StatFile {
        id: 2,
        path: p(&dir.join("d")),
    });
    match next_msg(&mut a) {
        GuestMsg::FileStat { id: 2, info } => {
            assert_eq!((info.name.as_str(), info.kind), ("d", FileKind::Symlink));
            assert_eq!(info.size, "/nonexistent".len() as u64);
        }
        other => panic!("{other:?}"),
    }
    let fail = |a: &mut Agent, id: u64, msg: HostMsg| {
        a.send(&msg);
        failed_kind(&next_msg(a), id)
    };
    assert_eq!(
        fail(
            &mut a,
            3,
            HostMsg::StatFile {
                id: 3,
                path: p(&dir.join("zz"))
            }
        ),
        FileErrorKind::NotFound
    );
    assert_eq!(
        fail(
            &mut a,
            4,
            HostMsg::ListDir {
                id: 4,
                path: p(&dir.join("b"))
            }
        ),
        FileErrorKind::NotADirectory
    );
    assert_eq!(
        fail(
            &mut a,
            5,
            HostMsg::StatFile {
                id: 5,
                path: String::new()
            }
        ),
        FileErrorKind::InvalidPath
    );
    let rm = |id, path: &Path, recursive| HostMsg::RemoveFile {
        id,
        path: p(path),
        recursive,
    };
    assert_eq!(
        fail(&mut a, 6, rm(6, &dir.join("c"), false)),
        FileErrorKind::NotEmpty
    );
    assert_eq!(
        fail(
            &mut a,
            7,
            HostMsg::RemoveFile {
                id: 7,
                path: "/".into(),
                recursive: true
            }
        ),
        FileErrorKind::InvalidPath
    );
    assert_eq!(
        fail(&mut a, 8, rm(8, &dir.join("zz"), false)),
        FileErrorKind::NotFound
    );
    for (id, name, recursive) in [(9, "c", true), (10, "d", false), (11, "a", false)] {
        a.send(&rm(id, &dir.join(name), recursive));
        assert_eq!(next_msg(&mut a), GuestMsg::FileRemoved { id });
    }
    assert_eq!(names(&dir), ["b"]);
}

#[test]
fn list_is_capped() {
    let dir = scratch("many");
    for i in 0..4100 {
        std::fs::write(dir.join(format!("f{i:05}")), b"").unwrap();
    }
    let mut a = Agent::start();
    a.send(&HostMsg::ListDir {
        id: 1,
        path: p(&dir),
    });
    match next_msg(&mut a) {
        GuestMsg::DirListing {
            entries, truncated, ..
        } => {
            assert!(truncated);
            assert_eq!(entries.len(), 4096);
            assert_eq!(entries[0].name, "f00000");
            assert_eq!(entries[4095].name, "f04095");
        }
        other => panic!("{other:?}"),
    }
    std::fs::remove_dir_all(&dir).unwrap();
}

/// Whether `wrapper` works here (namespaces may be forbidden).
fn can_run(wrapper: &[&str]) -> bool {
    std::process::Command::new(wrapper[0])
        .args(&wrapper[1..])
        .arg("true")
        .status()
        .is_ok_and(|s| s.success())
}

#[test]
fn no_space_on_a_tiny_tmpfs() {
    let dir = scratch("nospace");
    let d = p(&dir);
    let probe = ["unshare", "--mount", "--propagation", "private", "sh", "-c"];
    let script = format!("mount -t tmpfs -o size=1m tmpfs {d} && exec \"$0\" \"$@\"");
    let mount_probe = format!("mount -t tmpfs -o size=1m tmpfs {d}");
    let mut check: Vec<&str> = probe.to_vec();
    check.push(&mount_probe);
    if !can_run(&check[..check.len() - 1])
        || !std::process::Command::new(check[0])
            .args(&check[1..])
            .status()
            .is_ok_and(|s| s.success())
    {
        eprintln!("skipped: cannot mount a tmpfs in a private mount namespace here");
        return;
    }
    let mut wrapper: Vec<&str> = probe.to_vec();
    wrapper.push(&script);
    let mut a = Agent::start_under(&wrapper, &["--no-init"]);
    let path = format!("{d}/big");
    a.send(&write_req(1, &path, 0, false, false));
    let m = upload(&mut a, 1, &random(2 * MIB, 5));
    assert_eq!(failed_kind(&m, 1), FileErrorKind::NoSpace, "{m:?}");
    // Nothing left in the (agent's) directory: no file, no temporary file.
    a.send(&HostMsg::ListDir {
        id: 2,
        path: d.clone(),
    });
    match next_msg(&mut a) {
        GuestMsg::DirListing { entries, .. } => assert!(entries.is_empty(), "{entries:?}"),
        other => panic!("{other:?}"),
    }
    // The space is free again: a small file fits.
    a.send(&write_req(3, &path, 0, false, false));
    assert!(matches!(
        upload(&mut a, 3, &random(1000, 2)),
        GuestMsg::FileWritten { .. }
    ));
}

#[test]
fn forked_resume_abandons_transfers() {
    let dir = scratch("forked");
    let src = p(&dir.join("src"));
    std::fs::write(&src, random(MIB, 4)).unwrap();
    let mut a = Agent::start();
    let mut w = a.writer();
    // An upload half-way and a download waiting for acks.
    a.send(&write_req(1, &p(&dir.join("up")), 0, false, false));
    send_file_data(&mut w, 1, &[1; 1000]);
    assert_eq!(
        next_msg(&mut a),
        GuestMsg::FileCredit { id: 1, bytes: 1000 }
    );
    a.send(&read_req(2, &src, 0, 0, MAX_DATA as u32));
    assert!(matches!(
        next_msg(&mut a),
        GuestMsg::FileOpened { id: 2, .. }
    ));
    assert!(matches!(next(&mut a), Event::Data { id: 2, .. }));
    a.send(&HostMsg::Quiesce { id: 3 });
    assert_eq!(next_msg(&mut a), GuestMsg::Quiesced { id: 3 });
    a.send(&HostMsg::Resume {
        id: 4,
        forked: true,
        entropy: vec![1; 32],
        unix_ns: 0,
        sandbox_id: None,
    });
    assert!(matches!(next_msg(&mut a), GuestMsg::Resumed { id: 4, .. }));
    // Acks, data and aborts for the old transfers do nothing; nothing more
    // is said about them.
    a.send(&HostMsg::FileAck {
        id: 2,
        bytes: 1 << 30,
    });
    send_file_data(&mut w, 1, b"");
    a.send(&HostMsg::Ping { id: 5 });
    assert_eq!(next_msg(&mut a), GuestMsg::Pong { id: 5 });
    assert_eq!(
        a.recv_within(Duration::from_millis(300))
            .filter(|e| !matches!(e, Event::Msg(GuestMsg::Log { .. }))),
        None
    );
    // The upload's temporary file is gone; the ids are free again.
    let deadline = std::time::Instant::now() + Duration::from_secs(10);
    while names(&dir) != ["src"] {
        assert!(std::time::Instant::now() < deadline, "{:?}", names(&dir));
        std::thread::sleep(Duration::from_millis(20));
    }
    a.send(&write_req(1, &p(&dir.join("up")), 0, false, false));
    assert!(matches!(
        upload(&mut a, 1, b"x"),
        GuestMsg::FileWritten { size: 1, .. }
    ));
}
