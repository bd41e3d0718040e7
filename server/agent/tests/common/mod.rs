//! Test harness: runs the real `forkd-agent` with `--no-init --channel-fd 3`
//! over a Unix socket pair and speaks the protocol to it.

#![allow(dead_code)]

use std::collections::HashMap;
use std::io::Write;
use std::os::fd::AsRawFd;
use std::os::unix::net::UnixStream;
use std::os::unix::process::CommandExt;
use std::process::{Child, Command, Stdio};
use std::sync::mpsc::{self, Receiver, RecvTimeoutError};
use std::thread;
use std::time::{Duration, Instant};

use forkd_agent_proto::{
    encode_data, encode_json, Frame, FrameReader, GuestMsg, HostMsg, STREAM_STDERR, STREAM_STDIN,
    STREAM_STDOUT,
};

/// Bound on waiting for anything; generous for a slow, shared host.
pub const TIMEOUT: Duration = Duration::from_secs(30);

/// One thing the agent sent.
#[derive(Debug, Clone, PartialEq)]
pub enum Event {
    Msg(GuestMsg),
    Data { id: u64, stream: u8, data: Vec<u8> },
}

impl Event {
    /// The exec id this event belongs to, if any.
    pub fn exec_id(&self) -> Option<u64> {
        match self {
            Event::Data { id, .. } => Some(*id),
            Event::Msg(
                GuestMsg::Started { id, .. }
                | GuestMsg::Exited { id, .. }
                | GuestMsg::Failed { id, .. },
            ) => Some(*id),
            Event::Msg(_) => None,
        }
    }
}

/// Everything one exec produced, in arrival order.
#[derive(Debug, Default, Clone)]
pub struct Outcome {
    pub events: Vec<Event>,
}

impl Outcome {
    fn stream(&self, want: u8) -> Vec<u8> {
        let mut out = Vec::new();
        for e in &self.events {
            if let Event::Data { stream, data, .. } = e {
                if *stream == want {
                    out.extend_from_slice(data);
                }
            }
        }
        out
    }
    pub fn stdout(&self) -> String {
        String::from_utf8(self.stream(STREAM_STDOUT)).unwrap()
    }
    pub fn stderr(&self) -> String {
        String::from_utf8(self.stream(STREAM_STDERR)).unwrap()
    }
    pub fn pid(&self) -> Option<u32> {
        self.events.iter().find_map(|e| match e {
            Event::Msg(GuestMsg::Started { pid, .. }) => Some(*pid),
            _ => None,
        })
    }
    /// (code, signal) of the Exited message.
    pub fn exit(&self) -> Option<(Option<i32>, Option<i32>)> {
        self.events.iter().find_map(|e| match e {
            Event::Msg(GuestMsg::Exited { code, signal, .. }) => Some((*code, *signal)),
            _ => None,
        })
    }
    pub fn failed(&self) -> Option<String> {
        self.events.iter().find_map(|e| match e {
            Event::Msg(GuestMsg::Failed { message, .. }) => Some(message.clone()),
            _ => None,
        })
    }
    fn done(&self) -> bool {
        self.exit().is_some() || self.failed().is_some()
    }
}

/// A running agent.
pub struct Agent {
    child: Child,
    sock: UnixStream,
    rx: Receiver<Event>,
    /// Events received but not yet claimed by a collect.
    backlog: Vec<Event>,
    /// Exec pids seen, whose process groups are killed on drop.
    pgids: Vec<u32>,
    /// The agent runs in its own pid namespace: exec pids are not ours to kill.
    in_pidns: bool,
    /// `Log` messages that came before Ready.
    pub early_logs: Vec<String>,
}

pub fn exec(id: u64, argv: &[&str]) -> HostMsg {
    HostMsg::Exec {
        id,
        argv: argv.iter().map(|s| s.to_string()).collect(),
        env: vec![],
        cwd: None,
        stdin: false,
    }
}

impl Agent {
    /// Starts the agent and waits for Ready.
    pub fn start() -> Agent {
        Self::start_under(&[], &["--no-init"])
    }

    /// Starts the agent with `args` (besides the channel) under `wrapper` (a
    /// command that runs its arguments, e.g. `unshare --pid --fork`) and
    /// waits for Ready; logs sent before Ready are kept in `early_logs`.
    pub fn start_under(wrapper: &[&str], args: &[&str]) -> Agent {
        let (ours, theirs) = UnixStream::pair().unwrap();
        let fd = theirs.as_raw_fd();
        let bin = env!("CARGO_BIN_EXE_forkd-agent");
        let mut cmd = match wrapper {
            [] => Command::new(bin),
            [first, rest @ ..] => {
                let mut c = Command::new(first);
                c.args(rest).arg(bin);
                c
            }
        };
        cmd.args(args)
            .args(["--channel-fd", "3"])
            .stdin(Stdio::null());
        // SAFETY: dup2 is async-signal-safe; it makes the socket fd 3 of the
        // child (without close-on-exec) and touches nothing else.
        unsafe {
            cmd.pre_exec(move || {
                if libc::dup2(fd, 3) < 0 {
                    return Err(std::io::Error::last_os_error());
                }
                Ok(())
            });
        }
        let child = cmd.spawn().expect("spawn forkd-agent");
        drop(theirs);
        let reader = ours.try_clone().unwrap();
        let (tx, rx) = mpsc::channel();
        thread::spawn(move || {
            for frame in FrameReader::new(reader) {
                let event = match frame.expect("agent sent a bad frame") {
                    Frame::Data { id, stream, data } => Event::Data { id, stream, data },
                    json => Event::Msg(json.parse_json::<GuestMsg>().unwrap().unwrap()),
                };
                if tx.send(event).is_err() {
                    return;
                }
            }
        });
        let mut agent = Agent {
            child,
            sock: ours,
            rx,
            backlog: Vec::new(),
            pgids: Vec::new(),
            in_pidns: !wrapper.is_empty(),
            early_logs: Vec::new(),
        };
        loop {
            match agent.recv() {
                Event::Msg(GuestMsg::Ready { version, .. }) => {
                    assert!(!version.is_empty());
                    break;
                }
                Event::Msg(GuestMsg::Log { message }) => agent.early_logs.push(message),
                other => panic!("expected Ready, got {other:?}"),
            }
        }
        agent
    }

    /// The next event (panics after [`TIMEOUT`]).
    pub fn recv(&mut self) -> Event {
        self.recv_within(TIMEOUT)
            .expect("timed out waiting for the agent")
    }

    pub fn recv_within(&mut self, d: Duration) -> Option<Event> {
        match self.rx.recv_timeout(d) {
            Ok(e) => {
                if let Event::Msg(GuestMsg::Started { pid, .. }) = e {
                    self.pgids.push(pid);
                }
                Some(e)
            }
            Err(RecvTimeoutError::Timeout) => None,
            Err(RecvTimeoutError::Disconnected) => panic!("agent closed the channel"),
        }
    }

    pub fn send(&mut self, msg: &HostMsg) {
        self.sock.write_all(&encode_json(msg).unwrap()).unwrap();
    }

    /// A second handle on our end of the channel, for writer threads.
    pub fn writer(&self) -> UnixStream {
        self.sock.try_clone().unwrap()
    }

    pub fn send_stdin(&mut self, id: u64, data: &[u8]) {
        self.sock
            .write_all(&encode_data(id, STREAM_STDIN, data).unwrap())
            .unwrap();
    }

    /// The next event of exec `id`; others are kept for later collects.
    pub fn next_of(&mut self, id: u64) -> Event {
        if let Some(i) = self.backlog.iter().position(|e| e.exec_id() == Some(id)) {
            return self.backlog.remove(i);
        }
        loop {
            let e = self.recv();
            if e.exec_id() == Some(id) {
                return e;
            }
            self.backlog.push(e);
        }
    }

    /// Collects events of `ids` until each has Exited or Failed.
    pub fn collect(&mut self, ids: &[u64]) -> HashMap<u64, Outcome> {
        let mut out: HashMap<u64, Outcome> = ids.iter().map(|i| (*i, Outcome::default())).collect();
        let deadline = Instant::now() + TIMEOUT;
        let mut backlog = std::mem::take(&mut self.backlog).into_iter();
        while !out.values().all(Outcome::done) {
            let e = match backlog.next() {
                Some(e) => e,
                None => {
                    let left = deadline.saturating_duration_since(Instant::now());
                    self.recv_within(left).expect("timed out collecting execs")
                }
            };
            match e.exec_id().and_then(|id| out.get_mut(&id)) {
                Some(o) => o.events.push(e),
                None => self.backlog.push(e),
            }
        }
        self.backlog.extend(backlog);
        out
    }

    /// The agent's (or its wrapper's) pid.
    pub fn pid(&self) -> u32 {
        self.child.id()
    }

    /// Whether the agent (or its wrapper) has exited.
    pub fn exited(&mut self) -> bool {
        self.child.try_wait().unwrap().is_some()
    }

    /// Closes our end of the channel without waiting.
    pub fn close(&mut self) {
        self.sock.shutdown(std::net::Shutdown::Both).unwrap();
    }

    /// Closes our end of the channel and waits (bounded) for the agent to exit.
    pub fn close_and_wait(&mut self) -> std::process::ExitStatus {
        self.sock.shutdown(std::net::Shutdown::Both).unwrap();
        let deadline = Instant::now() + Duration::from_secs(10);
        loop {
            if let Some(status) = self.child.try_wait().unwrap() {
                return status;
            }
            assert!(Instant::now() < deadline, "agent did not exit on EOF");
            thread::sleep(Duration::from_millis(20));
        }
    }

    /// Runs one exec to its end.
    pub fn run(&mut self, msg: HostMsg) -> Outcome {
        let id = match &msg {
            HostMsg::Exec { id, .. } => *id,
            _ => panic!("not an exec"),
        };
        self.send(&msg);
        self.collect(&[id]).remove(&id).unwrap()
    }
}

impl Drop for Agent {
    fn drop(&mut self) {
        let pgids = if self.in_pidns {
            &[][..]
        } else {
            &self.pgids[..]
        };
        for pgid in pgids {
            // SAFETY: kill has no memory effects.
            unsafe { libc::kill(-(*pgid as i32), libc::SIGKILL) };
        }
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// Live (non-zombie) processes whose process group is `pgid`.
pub fn group_members(pgid: u32) -> Vec<u32> {
    let mut found = Vec::new();
    for entry in std::fs::read_dir("/proc").unwrap().flatten() {
        let Ok(pid) = entry.file_name().to_string_lossy().parse::<u32>() else {
            continue;
        };
        let Ok(stat) = std::fs::read_to_string(format!("/proc/{pid}/stat")) else {
            continue;
        };
        // Fields after "(comm)": state ppid pgrp ...
        let Some(rest) = stat.rfind(')').map(|i| &stat[i + 1..]) else {
            continue;
        };
        let f: Vec<&str> = rest.split_whitespace().collect();
        if f.len() > 2 && f[0] != "Z" && f[2].parse::<u32>() == Ok(pgid) {
            found.push(pid);
        }
    }
    found
}

/// Waits (bounded) until no live process is in group `pgid`.
pub fn wait_group_gone(pgid: u32) -> Vec<u32> {
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        let left = group_members(pgid);
        if left.is_empty() || Instant::now() > deadline {
            return left;
        }
        thread::sleep(Duration::from_millis(20));
    }
}

/// Zombie children of process `ppid` (unreaped).
pub fn zombie_children(ppid: u32) -> Vec<u32> {
    let mut found = Vec::new();
    for entry in std::fs::read_dir("/proc").unwrap().flatten() {
        let Ok(pid) = entry.file_name().to_string_lossy().parse::<u32>() else {
            continue;
        };
        let Ok(stat) = std::fs::read_to_string(format!("/proc/{pid}/stat")) else {
            continue;
        };
        let Some(rest) = stat.rfind(')').map(|i| &stat[i + 1..]) else {
            continue;
        };
        let f: Vec<&str> = rest.split_whitespace().collect();
        if f.len() > 1 && f[0] == "Z" && f[1].parse::<u32>() == Ok(ppid) {
            found.push(pid);
        }
    }
    found
}
