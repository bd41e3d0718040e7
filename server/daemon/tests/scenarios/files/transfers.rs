//! File transfers: an upload within the credit window and what it made
//! (stat, list, remove), a stalled download with the daemon's memory
//! flat, and clients that go away mid-transfer.

use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use forkd_api::v1 as pb;
use forkd_control::{FILE_CHUNK, FILE_WRITE_WINDOW};
use pb::read_file_response::Event as ReadEv;
use tonic::Code;

use super::{
    data, fake_stat, head, header, list, put, read_all, read_text, remove, sha_hex, stat, upload,
    wait_for_abort, MIB,
};
use crate::harness::{assert_status, linux_daemon, spawn_image};

/// The daemon's resident set in bytes.
fn rss(pid: u32) -> u64 {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap();
    let kib: u64 = status
        .lines()
        .find_map(|l| l.strip_prefix("VmRSS:"))
        .expect("VmRSS")
        .trim()
        .trim_end_matches("kB")
        .trim()
        .parse()
        .unwrap();
    kib << 10
}

/// An 8 MiB upload in 1 MiB messages, read back whole and in part; stat,
/// list and remove of what it made.
pub async fn linux_files_upload_and_meta() {
    let d = linux_daemon("svm").await;
    let mut c = d.sandboxes().await;
    let sb = spawn_image(&mut c, "debian").await;
    let id = sb.id.as_str();

    let content: Vec<u8> = (0..8 * MIB).map(|i| (i * 7 % 256) as u8).collect();
    let mut messages = vec![head(pb::WriteFileHeader {
        mode: 0o750,
        make_parents: true,
        ..header(id, "/root/deep/dir/blob.bin")
    })];
    messages.extend(content.chunks(MIB as usize).map(|m| data(m.to_vec())));
    // Empty data messages are skipped.
    messages.insert(3, data(Vec::new()));
    let t = Instant::now();
    let r = upload(&mut c, messages).await.unwrap();
    let took = t.elapsed();
    assert_eq!(r.path, "/root/deep/dir/blob.bin");
    assert_eq!(r.size, 8 * MIB);
    assert_eq!(r.sha256, sha_hex(&content));
    // The fake takes 1 ms per 64 KiB chunk, so the daemon waited for
    // credit and filled the window, and never overran it (the upload
    // would have failed with INTERNAL).
    let max = fake_stat(&mut c, id, "max_uncredited").await;
    assert!(
        max > FILE_CHUNK as u64 && max <= FILE_WRITE_WINDOW,
        "max un-credited {max}"
    );
    println!("  8 MiB upload: {took:.2?}, at most {max} bytes un-credited");

    let info = stat(&mut c, id, "/root/deep/dir/blob.bin").await.unwrap();
    assert_eq!(
        (info.name.as_str(), info.size, info.mode, info.r#type),
        ("blob.bin", 8 * MIB, 0o750, pb::FileType::File as i32)
    );
    assert!(info.modify_time.unwrap().seconds > 1_700_000_000);
    let dir = stat(&mut c, id, "/root/deep").await.unwrap();
    assert_eq!(
        (dir.r#type, dir.mode),
        (pb::FileType::Directory as i32, 0o755)
    );

    // Back whole, and a range.
    let (bytes, end) = read_all(&mut c, id, "/root/deep/dir/blob.bin", 0, 0)
        .await
        .unwrap();
    assert!(bytes == content, "the file read back differs");
    assert_eq!((end.size, end.file_size), (8 * MIB, 8 * MIB));
    assert_eq!(end.sha256, r.sha256);
    let (bytes, end) = read_all(&mut c, id, "/root/deep/dir/blob.bin", MIB + 5, 100_000)
        .await
        .unwrap();
    assert_eq!(
        bytes,
        &content[(MIB + 5) as usize..(MIB + 5) as usize + 100_000]
    );
    assert_eq!((end.size, end.file_size), (100_000, 8 * MIB));
    assert_eq!(end.sha256, sha_hex(&bytes));
    let (bytes, end) = read_all(&mut c, id, "/root/deep/dir/blob.bin", 9 * MIB, 0)
        .await
        .unwrap();
    assert!(bytes.is_empty());
    assert_eq!(end.sha256, sha_hex(b""));

    // Replacing keeps one file; an empty upload makes an empty file.
    put(&mut c, id, "/root/deep/dir/blob.bin", b"short").await;
    let (bytes, _) = read_all(&mut c, id, "/root/deep/dir/blob.bin", 0, 0)
        .await
        .unwrap();
    assert_eq!(bytes, b"short");
    let r = upload(&mut c, vec![head(header(id, "/root/deep/empty"))])
        .await
        .unwrap();
    assert_eq!((r.size, r.sha256.as_str()), (0, sha_hex(b"").as_str()));
    let info = stat(&mut c, id, "/root/deep/empty").await.unwrap();
    assert_eq!((info.size, info.mode), (0, 0o644));

    // Listing is sorted by name; removing needs `recursive` for a
    // non-empty directory.
    put(&mut c, id, "/root/deep/a.txt", b"a").await;
    assert_eq!(
        list(&mut c, id, "/root/deep").await.unwrap(),
        ["a.txt", "dir", "empty"]
    );
    assert_eq!(
        list(&mut c, id, "/").await.unwrap(),
        ["fake", "root", "tmp"]
    );
    assert_status(
        remove(&mut c, id, "/root/deep", false).await,
        Code::FailedPrecondition,
        &["set recursive"],
    );
    remove(&mut c, id, "/root/deep/a.txt", false).await.unwrap();
    remove(&mut c, id, "/root/deep", true).await.unwrap();
    assert_eq!(
        list(&mut c, id, "/root").await.unwrap(),
        Vec::<String>::new()
    );
    assert_status(
        stat(&mut c, id, "/root/deep/dir/blob.bin").await,
        Code::NotFound,
        &[],
    );
}

/// A 64 MiB download whose client reads nothing for 2 s, then all of it:
/// the bytes and their SHA-256 are right, and the daemon's memory stays
/// flat (the guest waits for the client).
pub async fn linux_files_download_memory() {
    const SIZE: u64 = 64 * MIB;
    // SHA-256 of the pattern's first 64 MiB (hashing them here would take
    // seconds in a debug build).
    const SHA: &str = "98dc891b284e4d84ac25b0c0a24fdbe39a7f0dbd643ad5e8aa06e02fc6258254";
    let d = linux_daemon("svm").await;
    let mut c = d.sandboxes().await;
    let sb = spawn_image(&mut c, "debian").await;
    let pid = d.pid();

    // Warm the daemon's download path up, so the baseline holds what one
    // download needs anyway.
    let (small, _) = read_all(&mut c, &sb.id, "/fake/pattern/1000000", 0, 0)
        .await
        .unwrap();
    assert_eq!(small.len(), 1_000_000);

    let sent_before = fake_stat(&mut c, &sb.id, "download_bytes").await;
    let before = rss(pid);
    let peak = Arc::new(AtomicU64::new(before));
    let done = Arc::new(AtomicBool::new(false));
    let sampler = {
        let (peak, done) = (peak.clone(), done.clone());
        std::thread::spawn(move || {
            while !done.load(Ordering::SeqCst) {
                peak.fetch_max(rss(pid), Ordering::SeqCst);
                std::thread::sleep(Duration::from_millis(5));
            }
        })
    };
    // The pattern from any offset, for a chunk: byte `i` is `i % 251`.
    let period: Vec<u8> = (0..FILE_CHUNK + 251).map(|i| (i % 251) as u8).collect();
    let t = Instant::now();
    let mut stream = c
        .read_file(pb::ReadFileRequest {
            sandbox_id: sb.id.clone(),
            path: format!("/fake/pattern/{SIZE}"),
            ..Default::default()
        })
        .await
        .unwrap()
        .into_inner();
    // A slow client: nothing read for 2 s. The guest then has sent only
    // what the daemon's read window and the buffers on the way hold.
    tokio::time::sleep(Duration::from_secs(2)).await;
    let stalled_rss = rss(pid);
    let mut other = d.sandboxes().await; // not behind the stalled stream
    let stalled_sent = fake_stat(&mut other, &sb.id, "download_bytes").await - sent_before;
    assert!(
        stalled_sent > 0 && stalled_sent < 16 * MIB,
        "{stalled_sent} bytes sent to a client that read nothing"
    );
    let mut total = 0u64;
    let mut end = None;
    while let Some(m) = stream.message().await.unwrap() {
        match m.event.unwrap() {
            ReadEv::Data(chunk) => {
                assert!(chunk.len() <= FILE_CHUNK);
                let start = (total % 251) as usize;
                assert!(
                    chunk[..] == period[start..start + chunk.len()],
                    "wrong bytes at {total}"
                );
                total += chunk.len() as u64;
            }
            ReadEv::End(e) => end = Some(e),
        }
    }
    let took = t.elapsed();
    done.store(true, Ordering::SeqCst);
    sampler.join().unwrap();
    let end = end.expect("an end message");
    assert_eq!(total, SIZE);
    assert_eq!((end.size, end.file_size), (SIZE, SIZE));
    assert_eq!(end.sha256, SHA);
    let peak = peak.load(Ordering::SeqCst);
    let growth = peak.saturating_sub(before);
    println!(
        "  64 MiB download: {took:.2?}; {} KiB sent during the 2 s stall; daemon RSS {} KiB \
         before, {} KiB after the stall, peak {} KiB (+{} KiB)",
        stalled_sent >> 10,
        before >> 10,
        stalled_rss >> 10,
        peak >> 10,
        growth >> 10
    );
    assert!(
        growth < 32 * MIB,
        "the daemon's RSS grew by {} KiB during a 64 MiB download",
        growth >> 10
    );
    let unacked = fake_stat(&mut c, &sb.id, "max_unacked").await;
    assert!(unacked > 0 && unacked <= 4 * MIB, "max un-acked {unacked}");
}

/// Clients that go away mid-transfer: the guest is told (an abort), and an
/// upload leaves nothing under its name.
pub async fn linux_files_cut_off() {
    let d = linux_daemon("svm").await;
    let mut c = d.sandboxes().await;
    let sb = spawn_image(&mut c, "debian").await;
    let id = sb.id.clone();

    // An upload whose call is dropped after 2 MiB, its stream still open.
    let (tx, rx) = tokio::sync::mpsc::channel(4);
    tx.send(head(header(&id, "/tmp/partial"))).await.unwrap();
    tx.send(data(vec![1; MIB as usize])).await.unwrap();
    tx.send(data(vec![2; MIB as usize])).await.unwrap();
    let call = {
        let mut c = c.clone();
        tokio::spawn(async move {
            c.write_file(tokio_stream::wrappers::ReceiverStream::new(rx))
                .await
        })
    };
    // Wait until the data reached the guest.
    let deadline = Instant::now() + Duration::from_secs(10);
    while fake_stat(&mut c, &id, "max_uncredited").await == 0 {
        assert!(Instant::now() < deadline, "no upload data reached the fake");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    tokio::time::sleep(Duration::from_millis(100)).await;
    assert!(!call.is_finished());
    call.abort();
    let _ = call.await;
    wait_for_abort(&mut c, &id, "write /tmp/partial").await;
    assert_status(stat(&mut c, &id, "/tmp/partial").await, Code::NotFound, &[]);
    assert_eq!(
        list(&mut c, &id, "/tmp").await.unwrap(),
        Vec::<String>::new()
    );
    drop(tx);

    // A download dropped after its first message.
    let mut stream = c
        .read_file(pb::ReadFileRequest {
            sandbox_id: id.clone(),
            path: "/fake/zeros/1000000000".into(),
            ..Default::default()
        })
        .await
        .unwrap()
        .into_inner();
    assert!(stream.message().await.unwrap().is_some());
    drop(stream);
    wait_for_abort(&mut c, &id, "read /fake/zeros/1000000000").await;

    // The sandbox still serves files.
    put(&mut c, &id, "/tmp/after", b"ok").await;
    assert_eq!(read_text(&mut c, &id, "/tmp/after").await, "ok");
}
