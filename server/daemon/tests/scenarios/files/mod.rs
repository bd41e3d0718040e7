//! The file RPCs (WriteFile, ReadFile, StatFile, ListDir, RemoveFile)
//! against the fake Linux VMM's in-memory filesystem
//! (`fake_vmm/linux/files.rs`): transfers within the agent's windows and
//! what a client that goes away leaves behind ([`transfers`]), and the
//! status codes ([`errors`]). This module holds their client helpers.

mod errors;
mod transfers;

pub use errors::linux_files_errors;
pub use transfers::{
    linux_files_cut_off, linux_files_download_memory, linux_files_upload_and_meta,
};

use std::time::{Duration, Instant};

use forkd_api::v1 as pb;
use forkd_control::FILE_CHUNK;
use pb::read_file_response::Event as ReadEv;
use pb::sandbox_service_client::SandboxServiceClient;
use pb::write_file_request::Content;
use sha2::{Digest, Sha256};
use tonic::transport::Channel;
use tonic::Status;

type Client = SandboxServiceClient<Channel>;

const MIB: u64 = 1 << 20;

fn sha_hex(data: &[u8]) -> String {
    hex(&Sha256::digest(data))
}

fn hex(bytes: &[u8]) -> String {
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

fn header(sandbox: &str, path: &str) -> pb::WriteFileHeader {
    pb::WriteFileHeader {
        sandbox_id: sandbox.into(),
        path: path.into(),
        ..Default::default()
    }
}

fn head(h: pb::WriteFileHeader) -> pb::WriteFileRequest {
    pb::WriteFileRequest {
        content: Some(Content::Header(h)),
    }
}

fn data(bytes: Vec<u8>) -> pb::WriteFileRequest {
    pb::WriteFileRequest {
        content: Some(Content::Data(bytes)),
    }
}

/// Uploads `messages` as one WriteFile call.
async fn upload(
    c: &mut Client,
    messages: Vec<pb::WriteFileRequest>,
) -> Result<pb::WriteFileResponse, Status> {
    c.write_file(tokio_stream::iter(messages))
        .await
        .map(|r| r.into_inner())
}

/// Uploads `content` to `path` in one data message.
async fn put(c: &mut Client, sandbox: &str, path: &str, content: &[u8]) {
    let r = upload(c, vec![head(header(sandbox, path)), data(content.to_vec())]).await;
    let r = r.unwrap_or_else(|e| panic!("uploading {path}: {e:?}"));
    assert_eq!(r.size, content.len() as u64);
}

/// Downloads `path` (`offset`, `length`) whole: the bytes and the end.
async fn read_all(
    c: &mut Client,
    sandbox: &str,
    path: &str,
    offset: u64,
    length: u64,
) -> Result<(Vec<u8>, pb::ReadFileEnd), Status> {
    let mut stream = c
        .read_file(pb::ReadFileRequest {
            sandbox_id: sandbox.into(),
            path: path.into(),
            offset,
            length,
        })
        .await?
        .into_inner();
    let mut bytes = Vec::new();
    while let Some(m) = stream.message().await? {
        match m.event.expect("an event") {
            ReadEv::Data(d) => {
                assert!(d.len() <= FILE_CHUNK, "a data message of {} bytes", d.len());
                bytes.extend(d);
            }
            ReadEv::End(end) => {
                assert!(stream.message().await?.is_none(), "a message after the end");
                return Ok((bytes, end));
            }
        }
    }
    panic!("ReadFile of {path} ended without an end message");
}

async fn read_text(c: &mut Client, sandbox: &str, path: &str) -> String {
    let (bytes, _) = read_all(c, sandbox, path, 0, 0).await.unwrap();
    String::from_utf8(bytes).unwrap()
}

async fn stat(c: &mut Client, sandbox: &str, path: &str) -> Result<pb::FileInfo, Status> {
    c.stat_file(pb::StatFileRequest {
        sandbox_id: sandbox.into(),
        path: path.into(),
    })
    .await
    .map(|r| r.into_inner().info.unwrap())
}

async fn list(c: &mut Client, sandbox: &str, path: &str) -> Result<Vec<String>, Status> {
    c.list_dir(pb::ListDirRequest {
        sandbox_id: sandbox.into(),
        path: path.into(),
    })
    .await
    .map(|r| r.into_inner().entries.into_iter().map(|e| e.name).collect())
}

async fn remove(c: &mut Client, sandbox: &str, path: &str, recursive: bool) -> Result<(), Status> {
    c.remove_file(pb::RemoveFileRequest {
        sandbox_id: sandbox.into(),
        path: path.into(),
        recursive,
    })
    .await
    .map(|_| ())
}

/// A counter of the fake's `/fake/stats`.
async fn fake_stat(c: &mut Client, sandbox: &str, name: &str) -> u64 {
    let text = read_text(c, sandbox, "/fake/stats").await;
    let line = text
        .lines()
        .find_map(|l| l.strip_prefix(&format!("{name}=")))
        .unwrap_or_else(|| panic!("no {name} in {text:?}"));
    line.parse().unwrap()
}

/// Waits until the fake's `/fake/aborts` lists `entry`.
async fn wait_for_abort(c: &mut Client, sandbox: &str, entry: &str) {
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        let text = read_text(c, sandbox, "/fake/aborts").await;
        if text.lines().any(|l| l == entry) {
            return;
        }
        assert!(Instant::now() < deadline, "no {entry:?} in {text:?}");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}
