//! The table of file operations: routes upload data, download acks and
//! aborts by transfer id, bounds how many operations run at once, and
//! retires the transfers of a host session that a forked resume ended.
//!
//! The dispatcher never blocks here: upload chunks go to an unbounded
//! queue whose size the upload window bounds (a host that overruns it
//! fails the upload instead).

use std::collections::HashMap;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::mpsc::{channel, Receiver, Sender};
use std::sync::{Arc, Condvar, Mutex, MutexGuard};

use forkd_agent_proto::FILE_WRITE_WINDOW;

/// File operations (transfers and stat/list/remove) running at once;
/// beyond it requests fail with `busy`.
pub const MAX_FILE_OPS: usize = 16;

/// What the dispatcher tells an upload's writer thread.
#[derive(Debug, PartialEq, Eq)]
pub enum WriteMsg {
    /// The next bytes of the file (never empty).
    Chunk(Vec<u8>),
    /// The empty data frame: the file is complete.
    End,
    /// The host aborted the upload.
    Abort,
    /// The host sent more than the window beyond the credits.
    Overrun,
    /// A forked resume ended the upload's session: clean up silently.
    Retire,
}

/// Why a download must stop.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Stop {
    /// The host aborted it.
    Abort,
    /// A forked resume ended its session: stop silently.
    Retire,
}

/// The dispatcher's side of a download: the host's acks and aborts.
#[derive(Default)]
pub struct DownloadCtl {
    state: Mutex<DownloadState>,
    changed: Condvar,
}

#[derive(Default)]
struct DownloadState {
    /// The highest cumulative ack.
    acked: u64,
    stop: Option<Stop>,
}

impl DownloadCtl {
    fn lock(&self) -> MutexGuard<'_, DownloadState> {
        self.state.lock().unwrap_or_else(|e| e.into_inner())
    }

    fn ack(&self, bytes: u64) {
        let mut st = self.lock();
        st.acked = st.acked.max(bytes);
        drop(st);
        self.changed.notify_all();
    }

    fn stop(&self, why: Stop) {
        self.lock().stop.get_or_insert(why);
        self.changed.notify_all();
    }

    /// Waits until fewer than `window` of the `sent` bytes are un-acked;
    /// returns how many more may be sent, or why to stop.
    pub fn wait_room(&self, sent: u64, window: u64) -> Result<u64, Stop> {
        let mut st = self.lock();
        loop {
            if let Some(stop) = st.stop {
                return Err(stop);
            }
            let outstanding = sent - st.acked.min(sent);
            if outstanding < window {
                return Ok(window - outstanding);
            }
            st = self.changed.wait(st).unwrap_or_else(|e| e.into_inner());
        }
    }
}

struct Upload {
    /// `None` once ended, aborted or overrun: later frames are dropped.
    tx: Option<Sender<WriteMsg>>,
    /// Bytes of data frames received.
    received: u64,
    /// Bytes the writer has written (it updates this).
    written: Arc<AtomicU64>,
}

enum Transfer {
    Up(Upload),
    Down(Arc<DownloadCtl>),
}

#[derive(Default)]
struct State {
    /// Current transfers by host id, with the ticket of their guard.
    by_id: HashMap<u64, (u64, Transfer)>,
    next_ticket: u64,
    /// Operations running (guards alive), current or retired.
    active: usize,
}

/// Why an operation cannot start.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum StartError {
    /// [`MAX_FILE_OPS`] are running.
    #[error("{MAX_FILE_OPS} file operations are already running")]
    Busy,
    /// A transfer with this id is running.
    #[error("transfer id {0} is already in use")]
    Duplicate(u64),
}

/// All running file operations.
#[derive(Default)]
pub struct Transfers {
    state: Mutex<State>,
}

/// Held by a running operation; dropping it frees its slot and its id.
pub struct Guard {
    table: Arc<Transfers>,
    /// Host id and ticket of a transfer.
    entry: Option<(u64, u64)>,
}

impl Drop for Guard {
    fn drop(&mut self) {
        let mut st = self.table.lock();
        st.active -= 1;
        if let Some((id, ticket)) = self.entry {
            if st.by_id.get(&id).is_some_and(|(t, _)| *t == ticket) {
                st.by_id.remove(&id);
            }
        }
    }
}

/// What an upload's writer thread gets.
pub struct UploadHandle {
    /// Frees the slot and id when dropped.
    pub guard: Guard,
    /// The dispatcher's messages.
    pub rx: Receiver<WriteMsg>,
    /// Where the writer counts the bytes it has written.
    pub written: Arc<AtomicU64>,
}

impl Transfers {
    fn lock(&self) -> MutexGuard<'_, State> {
        self.state.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Takes a slot, and registers `transfer` under `id` if given.
    fn start(self: &Arc<Self>, transfer: Option<(u64, Transfer)>) -> Result<Guard, StartError> {
        let mut st = self.lock();
        if st.active >= MAX_FILE_OPS {
            return Err(StartError::Busy);
        }
        let entry = match transfer {
            None => None,
            Some((id, _)) if st.by_id.contains_key(&id) => {
                return Err(StartError::Duplicate(id));
            }
            Some((id, t)) => {
                let ticket = st.next_ticket;
                st.next_ticket += 1;
                st.by_id.insert(id, (ticket, t));
                Some((id, ticket))
            }
        };
        st.active += 1;
        Ok(Guard {
            table: self.clone(),
            entry,
        })
    }

    /// Starts a stat, list or remove (a slot, no id).
    pub fn start_meta(self: &Arc<Self>) -> Result<Guard, StartError> {
        self.start(None)
    }

    /// Registers upload `id`: its data frames are queued from now on.
    pub fn start_upload(self: &Arc<Self>, id: u64) -> Result<UploadHandle, StartError> {
        let (tx, rx) = channel();
        let written = Arc::new(AtomicU64::new(0));
        let up = Upload {
            tx: Some(tx),
            received: 0,
            written: written.clone(),
        };
        let guard = self.start(Some((id, Transfer::Up(up))))?;
        Ok(UploadHandle { guard, rx, written })
    }

    /// Registers download `id`: its acks and aborts are routed from now on.
    pub fn start_download(
        self: &Arc<Self>,
        id: u64,
    ) -> Result<(Guard, Arc<DownloadCtl>), StartError> {
        let ctl = Arc::new(DownloadCtl::default());
        let guard = self.start(Some((id, Transfer::Down(ctl.clone()))))?;
        Ok((guard, ctl))
    }

    /// Routes an upload's data frame (empty: the end). Frames of unknown,
    /// ended or failed uploads are dropped. Returns false if this frame
    /// overran the window (the upload then fails).
    pub fn data(&self, id: u64, data: Vec<u8>) -> bool {
        let mut st = self.lock();
        let Some((_, Transfer::Up(up))) = st.by_id.get_mut(&id) else {
            return true;
        };
        let Some(tx) = &up.tx else { return true };
        let (msg, ok) = if data.is_empty() {
            (WriteMsg::End, true)
        } else {
            up.received += data.len() as u64;
            let written = up.written.load(Ordering::Acquire);
            if up.received.saturating_sub(written) > FILE_WRITE_WINDOW {
                (WriteMsg::Overrun, false)
            } else {
                (WriteMsg::Chunk(data), true)
            }
        };
        let last = !matches!(msg, WriteMsg::Chunk(_));
        let _ = tx.send(msg);
        if last {
            up.tx = None;
        }
        ok
    }

    /// Records a download's cumulative ack; unknown ids are ignored.
    pub fn ack(&self, id: u64, bytes: u64) {
        if let Some((_, Transfer::Down(ctl))) = self.lock().by_id.get(&id) {
            ctl.ack(bytes);
        }
    }

    /// Aborts transfer `id`; unknown or ended ones are ignored.
    pub fn abort(&self, id: u64) {
        match self.lock().by_id.get_mut(&id) {
            Some((_, Transfer::Up(up))) => {
                if let Some(tx) = up.tx.take() {
                    let _ = tx.send(WriteMsg::Abort);
                }
            }
            Some((_, Transfer::Down(ctl))) => ctl.stop(Stop::Abort),
            None => {}
        }
    }

    /// Retires every current transfer (a forked resume: they belong to the
    /// parent's host session): their threads stop and clean up without
    /// sending anything, and their ids are free at once. Returns how many.
    pub fn retire_all(&self) -> u32 {
        let mut st = self.lock();
        let all: Vec<_> = st.by_id.drain().collect();
        drop(st);
        for (_, (_, transfer)) in &all {
            match transfer {
                Transfer::Up(up) => {
                    if let Some(tx) = &up.tx {
                        let _ = tx.send(WriteMsg::Retire);
                    }
                }
                Transfer::Down(ctl) => ctl.stop(Stop::Retire),
            }
        }
        all.len() as u32
    }

    /// Operations running now.
    #[cfg(test)]
    pub fn active(&self) -> usize {
        self.lock().active
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use forkd_agent_proto::MAX_DATA;

    #[test]
    fn slots_ids_and_routing() {
        let t = Arc::new(Transfers::default());
        let up = t.start_upload(1).unwrap();
        assert_eq!(t.start_download(1).err(), Some(StartError::Duplicate(1)));
        let frames = (FILE_WRITE_WINDOW / MAX_DATA as u64) as usize;
        for i in 0..frames {
            assert!(t.data(1, vec![i as u8; MAX_DATA]));
        }
        // One more full chunk with nothing written overruns the window.
        assert!(!t.data(1, vec![3; MAX_DATA]));
        assert!(t.data(1, vec![4])); // dropped
        let got: Vec<_> = up.rx.try_iter().collect();
        assert_eq!(got.len(), frames + 1);
        assert_eq!(got[frames], WriteMsg::Overrun);
        drop(up);
        assert_eq!(t.active(), 0);

        let guards: Vec<_> = (0..MAX_FILE_OPS).map(|_| t.start_meta().unwrap()).collect();
        assert_eq!(t.start_meta().err(), Some(StartError::Busy));
        drop(guards);

        let (g, ctl) = t.start_download(2).unwrap();
        t.ack(2, 10);
        assert_eq!(ctl.wait_room(12, 4), Ok(2));
        assert_eq!(t.retire_all(), 1);
        assert_eq!(ctl.wait_room(0, 4), Err(Stop::Retire));
        // The id is free again at once; the old guard leaves the new entry alone.
        let (g2, _) = t.start_download(2).unwrap();
        drop(g);
        assert_eq!(t.start_download(2).err(), Some(StartError::Duplicate(2)));
        drop(g2);
        assert_eq!(t.active(), 0);
    }
}
