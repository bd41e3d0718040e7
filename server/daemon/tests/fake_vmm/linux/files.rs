//! The fake Linux VMM's files: an in-memory filesystem behind the agent's
//! file protocol (see `server/agent/README.md`, "Files"), so the daemon's
//! file RPCs are tested end to end without a guest.
//!
//! As in the agent, the read loop never blocks here: an upload's chunks go
//! to a writer thread that consumes them slowly (1 ms per chunk, so the
//! daemon has to wait for credit), credits them cumulatively, and fails
//! the upload with `protocol` when the daemon has more than
//! [`FILE_WRITE_WINDOW`] bytes un-credited. A download runs on a thread of
//! its own and never has more than the request's `window` bytes beyond the
//! daemon's cumulative `FileAck`. An upload commits only on its end frame;
//! an aborted or failed one leaves nothing under its name.
//!
//! The filesystem starts with `/`, `/tmp`, `/root` and `/fake`; parents of
//! a write must exist (or `parents` creates them). Special paths:
//! - `/fake/zeros/N`: a read-only file of N zero bytes, generated as read;
//! - `/fake/pattern/N`: N bytes, byte `i` being `i % 251`, generated too;
//! - `/fake/fail/KIND` (and anything under it): every operation fails with
//!   `FileFailed` of that kind (`no_space`, `busy`, ...); a write takes its
//!   first chunk before failing, like a disk filling up;
//! - `/fake/aborts`: one line per transfer the daemon aborted, `write PATH`
//!   or `read PATH`;
//! - `/fake/stats`: `max_uncredited=N` (the most un-credited upload bytes
//!   seen), `max_unacked=N` (the most un-acknowledged download bytes) and
//!   `download_bytes=N` (bytes sent by all downloads so far).

use std::collections::{BTreeMap, HashMap};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::mpsc::{self, Receiver, Sender};
use std::sync::{Arc, Condvar, Mutex};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use forkd_control::{
    encode_json, encode_output, Event, FileErrorKind, FileInfo, FileKind, Request, FILE_CHUNK,
    FILE_WRITE_WINDOW, STREAM_FILE,
};
use sha2::{Digest, Sha256};

use super::{send, Out};

/// Transfers running at once; beyond it requests fail with `busy` (the
/// agent's limit).
const MAX_TRANSFERS: usize = 16;
/// How long the writer takes per chunk.
const WRITE_DELAY: Duration = Duration::from_millis(1);

/// One file or directory.
#[derive(Clone)]
enum Node {
    File {
        data: Arc<Vec<u8>>,
        mode: u32,
        mtime_ns: i64,
    },
    Dir {
        mode: u32,
        mtime_ns: i64,
    },
}

/// What a download reads.
enum Content {
    Stored(Arc<Vec<u8>>),
    Zeros(u64),
    Pattern(u64),
}

impl Content {
    fn len(&self) -> u64 {
        match self {
            Content::Stored(d) => d.len() as u64,
            Content::Zeros(n) | Content::Pattern(n) => *n,
        }
    }

    /// `len` bytes from `pos` (within the content).
    fn slice(&self, pos: u64, len: usize) -> Vec<u8> {
        match self {
            Content::Stored(d) => d[pos as usize..pos as usize + len].to_vec(),
            Content::Zeros(_) => vec![0; len],
            Content::Pattern(_) => {
                let start = (pos % 251) as usize;
                pattern(start + len)[start..].to_vec()
            }
        }
    }
}

/// The first `len` bytes of the pattern (byte `i` is `i % 251`).
fn pattern(len: usize) -> Vec<u8> {
    let period: Vec<u8> = (0..251u8).collect();
    let mut out = Vec::with_capacity(len + 251);
    while out.len() < len {
        out.extend_from_slice(&period);
    }
    out.truncate(len);
    out
}

/// A failure: the `FileFailed` to send.
struct Fail(FileErrorKind, String);

type Res<T> = Result<T, Fail>;

fn fail<T>(kind: FileErrorKind, message: impl Into<String>) -> Res<T> {
    Err(Fail(kind, message.into()))
}

fn now_ns() -> i64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .unwrap()
        .as_nanos() as i64
}

fn hex(bytes: &[u8]) -> String {
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

/// Collapses repeated slashes and drops a trailing one (`.` and `..` are
/// not resolved: the fake's paths never use them).
fn normalize(path: &str) -> String {
    let parts: Vec<&str> = path.split('/').filter(|p| !p.is_empty()).collect();
    format!("/{}", parts.join("/"))
}

/// The parent directory and the last component of a normalized path
/// (`None` for `/`).
fn split(path: &str) -> Option<(String, String)> {
    if path == "/" {
        return None;
    }
    let (dir, name) = path.rsplit_once('/').unwrap();
    let dir = if dir.is_empty() { "/" } else { dir };
    Some((dir.to_string(), name.to_string()))
}

/// The kind a `/fake/fail/KIND[/...]` path asks for.
fn fail_kind(path: &str) -> Option<FileErrorKind> {
    let kind = path.strip_prefix("/fake/fail/")?.split('/').next()?;
    serde_json::from_value(serde_json::Value::String(kind.into())).ok()
}

/// A generated file: `/fake/zeros/N` or `/fake/pattern/N`.
fn generated(path: &str) -> Option<Content> {
    if let Some(n) = path.strip_prefix("/fake/zeros/") {
        return n.parse().ok().map(Content::Zeros);
    }
    if let Some(n) = path.strip_prefix("/fake/pattern/") {
        return n.parse().ok().map(Content::Pattern);
    }
    None
}

fn check_path(path: &str) -> Res<String> {
    if path.is_empty() || !path.starts_with('/') || path.contains('\0') {
        return fail(FileErrorKind::InvalidPath, format!("bad path {path:?}"));
    }
    Ok(normalize(path))
}

/// The in-memory filesystem and what the tests read back.
struct Fs {
    nodes: BTreeMap<String, Node>,
    aborts: Vec<String>,
    max_uncredited: u64,
    max_unacked: u64,
    download_bytes: u64,
}

impl Fs {
    fn new() -> Fs {
        let mut nodes = BTreeMap::new();
        for dir in ["/", "/tmp", "/root", "/fake"] {
            let mode = if dir == "/tmp" { 0o1777 } else { 0o755 };
            nodes.insert(
                dir.to_string(),
                Node::Dir {
                    mode,
                    mtime_ns: now_ns(),
                },
            );
        }
        Fs {
            nodes,
            aborts: Vec::new(),
            max_uncredited: 0,
            max_unacked: 0,
            download_bytes: 0,
        }
    }

    /// What `path` (normalized) is, virtual files included.
    fn lookup(&self, path: &str) -> Option<Node> {
        let text = match path {
            "/fake/aborts" => Some(self.aborts_text()),
            "/fake/stats" => Some(self.stats_text()),
            _ => None,
        };
        if let Some(text) = text {
            return Some(Node::File {
                data: Arc::new(text.into_bytes()),
                mode: 0o444,
                mtime_ns: now_ns(),
            });
        }
        if generated(path).is_some() {
            return Some(Node::File {
                data: Arc::new(Vec::new()),
                mode: 0o444,
                mtime_ns: 0,
            });
        }
        if matches!(path, "/fake/zeros" | "/fake/pattern") {
            return Some(Node::Dir {
                mode: 0o555,
                mtime_ns: 0,
            });
        }
        self.nodes.get(path).cloned()
    }

    fn aborts_text(&self) -> String {
        self.aborts.iter().map(|a| format!("{a}\n")).collect()
    }

    fn stats_text(&self) -> String {
        format!(
            "max_uncredited={}\nmax_unacked={}\ndownload_bytes={}\n",
            self.max_uncredited, self.max_unacked, self.download_bytes
        )
    }

    fn info(&self, path: &str, node: &Node) -> FileInfo {
        let name = split(path).map(|(_, n)| n).unwrap_or_else(|| "/".into());
        match node {
            Node::File {
                data,
                mode,
                mtime_ns,
            } => FileInfo {
                name,
                size: generated(path).map_or(data.len() as u64, |c| c.len()),
                mode: *mode,
                kind: FileKind::File,
                mtime_ns: *mtime_ns,
            },
            Node::Dir { mode, mtime_ns } => FileInfo {
                name,
                size: 4096,
                mode: *mode,
                kind: FileKind::Dir,
                mtime_ns: *mtime_ns,
            },
        }
    }

    /// Checks that `dir` is a directory a write may go into, creating it
    /// (and its parents) with `parents`.
    fn dir_for_write(&mut self, dir: &str, parents: bool) -> Res<()> {
        match self.lookup(dir) {
            Some(Node::Dir { .. }) => Ok(()),
            Some(Node::File { .. }) => fail(
                FileErrorKind::NotADirectory,
                format!("opening directory {dir}: Not a directory (os error 20)"),
            ),
            None if parents => {
                if let Some((up, _)) = split(dir) {
                    self.dir_for_write(&up, true)?;
                }
                self.nodes.insert(
                    dir.to_string(),
                    Node::Dir {
                        mode: 0o755,
                        mtime_ns: now_ns(),
                    },
                );
                Ok(())
            }
            None => fail(
                FileErrorKind::NotFound,
                format!("opening directory {dir}: No such file or directory (os error 2)"),
            ),
        }
    }

    /// Whether `path` may be written (before any data is taken).
    fn check_target(&self, path: &str, exclusive: bool) -> Res<()> {
        if path.starts_with("/fake/") && fail_kind(path).is_none() {
            return fail(
                FileErrorKind::PermissionDenied,
                format!("creating {path}: Read-only file system (os error 30)"),
            );
        }
        match self.lookup(path) {
            None => Ok(()),
            Some(_) if exclusive => fail(
                FileErrorKind::AlreadyExists,
                format!("{path} already exists"),
            ),
            Some(Node::Dir { .. }) => fail(
                FileErrorKind::IsADirectory,
                format!("{path} is a directory"),
            ),
            Some(Node::File { .. }) => Ok(()),
        }
    }

    fn children(&self, dir: &str) -> Vec<String> {
        let prefix = if dir == "/" {
            "/".to_string()
        } else {
            format!("{dir}/")
        };
        self.nodes
            .range(prefix.clone()..)
            .take_while(|(p, _)| p.starts_with(&prefix))
            .filter(|(p, _)| p.len() > prefix.len() && !p[prefix.len()..].contains('/'))
            .map(|(p, _)| p.clone())
            .collect()
    }
}

/// The dispatcher's side of a download.
#[derive(Default)]
struct DownloadCtl {
    state: Mutex<(u64, bool)>, // highest cumulative ack, aborted
    changed: Condvar,
}

/// A running transfer, by id.
enum Transfer {
    Up {
        /// `None` once ended, aborted or overrun: later frames are dropped.
        tx: Option<Sender<WriteMsg>>,
        received: u64,
        written: Arc<AtomicU64>,
    },
    Down(Arc<DownloadCtl>),
}

enum WriteMsg {
    Chunk(Vec<u8>),
    End,
    Abort,
    Overrun,
}

/// The fake's file side: called from the control read loop.
pub struct Files {
    out: Out,
    fs: Arc<Mutex<Fs>>,
    transfers: Arc<Mutex<HashMap<u64, Transfer>>>,
}

impl Files {
    pub fn new(out: Out) -> Files {
        Files {
            out,
            fs: Arc::new(Mutex::new(Fs::new())),
            transfers: Arc::default(),
        }
    }

    fn failed(&self, id: u64, Fail(kind, message): Fail) {
        send(
            &self.out,
            &encode_json(&Event::FileFailed { id, kind, message }),
        );
    }

    /// Handles a file request; returns it back if it is not one.
    pub fn request(&self, req: Request) -> Option<Request> {
        match req {
            Request::WriteFile {
                id,
                path,
                mode,
                parents,
                exclusive,
            } => self.write(id, &path, mode, parents, exclusive),
            Request::ReadFile {
                id,
                path,
                offset,
                length,
                window,
            } => self.read(id, &path, offset, length, window),
            Request::FileAck { id, bytes } => {
                if let Some(Transfer::Down(ctl)) = self.transfers.lock().unwrap().get(&id) {
                    let mut st = ctl.state.lock().unwrap();
                    st.0 = st.0.max(bytes);
                    ctl.changed.notify_all();
                }
            }
            Request::FileAbort { id } => match self.transfers.lock().unwrap().get_mut(&id) {
                Some(Transfer::Up { tx, .. }) => {
                    if let Some(tx) = tx.take() {
                        let _ = tx.send(WriteMsg::Abort);
                    }
                }
                Some(Transfer::Down(ctl)) => {
                    ctl.state.lock().unwrap().1 = true;
                    ctl.changed.notify_all();
                }
                None => {}
            },
            Request::StatFile { id, path } => match self.stat(&path) {
                Ok(info) => send(&self.out, &encode_json(&Event::FileStat { id, info })),
                Err(f) => self.failed(id, f),
            },
            Request::ListDir { id, path } => match self.list(&path) {
                Ok(entries) => send(
                    &self.out,
                    &encode_json(&Event::DirListing {
                        id,
                        entries,
                        truncated: false,
                    }),
                ),
                Err(f) => self.failed(id, f),
            },
            Request::RemoveFile {
                id,
                path,
                recursive,
            } => match self.remove(&path, recursive) {
                Ok(()) => send(&self.out, &encode_json(&Event::FileRemoved { id })),
                Err(f) => self.failed(id, f),
            },
            other => return Some(other),
        }
        None
    }

    /// Routes an upload's data frame (empty: the end), checking the window
    /// as the agent does.
    pub fn data(&self, id: u64, data: Vec<u8>) {
        let mut transfers = self.transfers.lock().unwrap();
        let Some(Transfer::Up {
            tx: Some(tx),
            received,
            written,
        }) = transfers.get_mut(&id)
        else {
            return; // unknown, ended or failed: dropped
        };
        let msg = if data.is_empty() {
            WriteMsg::End
        } else {
            *received += data.len() as u64;
            let uncredited = received.saturating_sub(written.load(Ordering::Acquire));
            let mut fs = self.fs.lock().unwrap();
            fs.max_uncredited = fs.max_uncredited.max(uncredited);
            if uncredited > FILE_WRITE_WINDOW {
                WriteMsg::Overrun
            } else {
                WriteMsg::Chunk(data)
            }
        };
        let last = !matches!(msg, WriteMsg::Chunk(_));
        let _ = tx.send(msg);
        if last {
            if let Some(Transfer::Up { tx, .. }) = transfers.get_mut(&id) {
                *tx = None;
            }
        }
    }

    /// Registers transfer `id`, or says why it cannot start.
    fn register(&self, id: u64, transfer: Transfer) -> Res<()> {
        let mut transfers = self.transfers.lock().unwrap();
        if transfers.contains_key(&id) {
            return fail(
                FileErrorKind::Protocol,
                format!("transfer id {id} is already in use"),
            );
        }
        if transfers.len() >= MAX_TRANSFERS {
            return fail(
                FileErrorKind::Busy,
                format!("{MAX_TRANSFERS} file operations are already running"),
            );
        }
        transfers.insert(id, transfer);
        Ok(())
    }

    fn write(&self, id: u64, path: &str, mode: u32, parents: bool, exclusive: bool) {
        let (tx, rx) = mpsc::channel();
        let written = Arc::new(AtomicU64::new(0));
        let up = Transfer::Up {
            tx: Some(tx),
            received: 0,
            written: written.clone(),
        };
        if let Err(f) = self.register(id, up) {
            // A duplicate id must not disturb the running transfer.
            return self.failed(id, f);
        }
        let writer = Writer {
            out: self.out.clone(),
            fs: self.fs.clone(),
            transfers: self.transfers.clone(),
            id,
            path: path.to_string(),
            mode: if mode == 0 { 0o644 } else { mode & 0o7777 },
            parents,
            exclusive,
            written,
        };
        std::thread::spawn(move || writer.run(rx));
    }

    fn read(&self, id: u64, path: &str, offset: u64, length: u64, window: u32) {
        let ctl = Arc::new(DownloadCtl::default());
        if let Err(f) = self.register(id, Transfer::Down(ctl.clone())) {
            return self.failed(id, f);
        }
        let reader = Reader {
            out: self.out.clone(),
            fs: self.fs.clone(),
            id,
            path: path.to_string(),
            offset,
            length,
            window,
            ctl,
        };
        let transfers = self.transfers.clone();
        std::thread::spawn(move || {
            reader.run();
            transfers.lock().unwrap().remove(&id);
        });
    }

    fn stat(&self, path: &str) -> Res<FileInfo> {
        let path = check_path(path)?;
        if let Some(kind) = fail_kind(&path) {
            return fail(kind, format!("stat {path}: failing as asked"));
        }
        let fs = self.fs.lock().unwrap();
        match fs.lookup(&path) {
            Some(node) => Ok(fs.info(&path, &node)),
            None => fail(
                FileErrorKind::NotFound,
                format!("stat {path}: No such file or directory (os error 2)"),
            ),
        }
    }

    fn list(&self, path: &str) -> Res<Vec<FileInfo>> {
        let path = check_path(path)?;
        if let Some(kind) = fail_kind(&path) {
            return fail(kind, format!("listing {path}: failing as asked"));
        }
        let fs = self.fs.lock().unwrap();
        match fs.lookup(&path) {
            Some(Node::Dir { .. }) => {}
            Some(Node::File { .. }) => {
                return fail(
                    FileErrorKind::NotADirectory,
                    format!("opening {path}: Not a directory (os error 20)"),
                )
            }
            None => {
                return fail(
                    FileErrorKind::NotFound,
                    format!("opening {path}: No such file or directory (os error 2)"),
                )
            }
        }
        let mut names = fs.children(&path);
        if path == "/fake" {
            for virt in ["/fake/aborts", "/fake/stats"] {
                names.push(virt.to_string());
            }
        }
        let mut entries: Vec<FileInfo> = names
            .iter()
            .filter_map(|p| fs.lookup(p).map(|n| fs.info(p, &n)))
            .collect();
        entries.sort_by(|a, b| a.name.cmp(&b.name));
        Ok(entries)
    }

    fn remove(&self, path: &str, recursive: bool) -> Res<()> {
        let path = check_path(path)?;
        if let Some(kind) = fail_kind(&path) {
            return fail(kind, format!("removing {path}: failing as asked"));
        }
        if path == "/" {
            return fail(FileErrorKind::InvalidPath, "refusing to remove /");
        }
        let mut fs = self.fs.lock().unwrap();
        match fs.nodes.get(&path) {
            None if fs.lookup(&path).is_some() => fail(
                FileErrorKind::PermissionDenied,
                format!("removing {path}: Read-only file system (os error 30)"),
            ),
            None => fail(
                FileErrorKind::NotFound,
                format!("removing {path}: No such file or directory (os error 2)"),
            ),
            Some(Node::File { .. }) => {
                fs.nodes.remove(&path);
                Ok(())
            }
            Some(Node::Dir { .. }) => {
                let prefix = format!("{path}/");
                let below: Vec<String> = fs
                    .nodes
                    .range(prefix.clone()..)
                    .take_while(|(p, _)| p.starts_with(&prefix))
                    .map(|(p, _)| p.clone())
                    .collect();
                if !below.is_empty() && !recursive {
                    return fail(
                        FileErrorKind::NotEmpty,
                        format!("removing {path}: Directory not empty (os error 39)"),
                    );
                }
                for p in below {
                    fs.nodes.remove(&p);
                }
                fs.nodes.remove(&path);
                Ok(())
            }
        }
    }
}

/// An upload's writer thread.
struct Writer {
    out: Out,
    fs: Arc<Mutex<Fs>>,
    transfers: Arc<Mutex<HashMap<u64, Transfer>>>,
    id: u64,
    path: String,
    mode: u32,
    parents: bool,
    exclusive: bool,
    written: Arc<AtomicU64>,
}

impl Writer {
    fn run(self, rx: Receiver<WriteMsg>) {
        let id = self.id;
        let event = match self.write(&rx) {
            Ok((size, sha256)) => Event::FileWritten { id, size, sha256 },
            Err(Fail(kind, message)) => Event::FileFailed { id, kind, message },
        };
        send(&self.out, &encode_json(&event));
        self.transfers.lock().unwrap().remove(&id);
    }

    fn write(&self, rx: &Receiver<WriteMsg>) -> Res<(u64, String)> {
        let path = check_path(&self.path)?;
        let Some((dir, _)) = split(&path) else {
            return fail(FileErrorKind::InvalidPath, "no file name to write");
        };
        let failing = fail_kind(&path);
        if failing.is_none() {
            let mut fs = self.fs.lock().unwrap();
            fs.dir_for_write(&dir, self.parents)?;
            fs.check_target(&path, self.exclusive)?;
        }
        // The "temporary file".
        let mut data = Vec::new();
        let mut sha = Sha256::new();
        let mut credited = 0u64;
        let mut held = None;
        loop {
            let msg = match held.take() {
                Some(m) => m,
                // The read loop is gone: the VMM is exiting.
                None => rx.recv().unwrap_or(WriteMsg::Abort),
            };
            match msg {
                WriteMsg::Chunk(chunk) => {
                    std::thread::sleep(WRITE_DELAY);
                    if let Some(kind) = failing {
                        return fail(kind, format!("writing {path}: failing as asked"));
                    }
                    sha.update(&chunk);
                    data.extend_from_slice(&chunk);
                    let size = data.len() as u64;
                    self.written.store(size, Ordering::Release);
                    // Credit as the agent does: when a frame's worth is
                    // owed or nothing more is queued.
                    held = rx.try_recv().ok();
                    if held.is_none() || size - credited >= FILE_CHUNK as u64 {
                        credited = size;
                        send(
                            &self.out,
                            &encode_json(&Event::FileCredit {
                                id: self.id,
                                bytes: size,
                            }),
                        );
                    }
                }
                WriteMsg::End => break,
                WriteMsg::Abort => {
                    let mut fs = self.fs.lock().unwrap();
                    fs.aborts.push(format!("write {}", self.path));
                    return fail(
                        FileErrorKind::Aborted,
                        format!("upload to {path} aborted by the host"),
                    );
                }
                WriteMsg::Overrun => {
                    return fail(
                        FileErrorKind::Protocol,
                        format!("upload to {path} overran the window"),
                    )
                }
            }
        }
        if let Some(kind) = failing {
            return fail(kind, format!("writing {path}: failing as asked"));
        }
        // The rename: check again, as `renameat2(RENAME_NOREPLACE)` would.
        let mut fs = self.fs.lock().unwrap();
        fs.dir_for_write(&dir, false)?;
        fs.check_target(&path, self.exclusive)?;
        let size = data.len() as u64;
        fs.nodes.insert(
            path,
            Node::File {
                data: Arc::new(data),
                mode: self.mode,
                mtime_ns: now_ns(),
            },
        );
        Ok((size, hex(&sha.finalize())))
    }
}

/// A download's thread.
struct Reader {
    out: Out,
    fs: Arc<Mutex<Fs>>,
    id: u64,
    path: String,
    offset: u64,
    length: u64,
    window: u32,
    ctl: Arc<DownloadCtl>,
}

impl Reader {
    fn run(self) {
        let id = self.id;
        let event = match self.read() {
            Ok((bytes, sha256)) => Event::FileRead { id, bytes, sha256 },
            Err(Fail(kind, message)) => Event::FileFailed { id, kind, message },
        };
        send(&self.out, &encode_json(&event));
    }

    fn open(&self) -> Res<Content> {
        let path = check_path(&self.path)?;
        if let Some(kind) = fail_kind(&path) {
            return fail(kind, format!("opening {path}: failing as asked"));
        }
        if self.window == 0 {
            return fail(FileErrorKind::Protocol, "read window of 0 bytes");
        }
        if let Some(content) = generated(&path) {
            return Ok(content);
        }
        match self.fs.lock().unwrap().lookup(&path) {
            Some(Node::File { data, .. }) => Ok(Content::Stored(data)),
            Some(Node::Dir { .. }) => fail(
                FileErrorKind::IsADirectory,
                format!("reading {path}: Is a directory (os error 21)"),
            ),
            None => fail(
                FileErrorKind::NotFound,
                format!("opening {path}: No such file or directory (os error 2)"),
            ),
        }
    }

    /// Waits until fewer than `window` of the `sent` bytes are un-acked;
    /// returns how many more may be sent.
    fn wait_room(&self, sent: u64) -> Res<u64> {
        let window = u64::from(self.window);
        let mut st = self.ctl.state.lock().unwrap();
        loop {
            if st.1 {
                let mut fs = self.fs.lock().unwrap();
                fs.aborts.push(format!("read {}", self.path));
                return fail(
                    FileErrorKind::Aborted,
                    format!("download of {} aborted by the host", self.path),
                );
            }
            let outstanding = sent - st.0.min(sent);
            if outstanding < window {
                return Ok(window - outstanding);
            }
            st = self.ctl.changed.wait(st).unwrap();
        }
    }

    fn read(&self) -> Res<(u64, String)> {
        let content = self.open()?;
        let size = content.len();
        send(
            &self.out,
            &encode_json(&Event::FileOpened { id: self.id, size }),
        );
        let start = self.offset.min(size);
        let end = match self.length {
            0 => size,
            n => start.saturating_add(n).min(size),
        };
        let mut sha = Sha256::new();
        let mut sent = 0u64;
        while start + sent < end {
            let room = self.wait_room(sent)?;
            let n = room.min(FILE_CHUNK as u64).min(end - start - sent) as usize;
            let chunk = content.slice(start + sent, n);
            sha.update(&chunk);
            send(&self.out, &encode_output(self.id, STREAM_FILE, &chunk));
            sent += n as u64;
            let acked = self.ctl.state.lock().unwrap().0;
            let mut fs = self.fs.lock().unwrap();
            fs.max_unacked = fs.max_unacked.max(sent - acked.min(sent));
            fs.download_bytes += n as u64;
        }
        Ok((sent, hex(&sha.finalize())))
    }
}
