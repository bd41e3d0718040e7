//! Snapshot requests: FULL and DIFF (answered once the files are written)
//! and LIVE (answered when the vCPUs run again, then the copy's events).

use std::path::Path;

use forkd_control::{Event, Request, SnapshotMode};
use tokio::sync::mpsc;

use super::routes::Sink;
use super::{RequestError, Vmm};
use crate::sync::lock;

/// What the VMM reported for a snapshot it wrote.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Snapshotted {
    /// How long the vCPUs were stopped.
    pub pause_us: u64,
    /// Bytes of memory data written.
    pub bytes_written: u64,
    /// Pages in the diff, or dirtied in the epoch.
    pub dirty_pages: u64,
    /// Bytes of guest RAM.
    pub memory_bytes: u64,
}

/// How far a LIVE snapshot's background copy has come.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct CopyProgress {
    /// Bytes of RAM handled so far (copied, or found zero).
    pub bytes_copied: u64,
    /// Bytes of RAM that hold data and must be handled.
    pub bytes_total: u64,
    /// Guest writes served by copying a page before it changed.
    pub faults_served: u64,
}

impl CopyProgress {
    /// Whole percent copied (0 while the total is unknown).
    pub fn percent(&self) -> u64 {
        match self.bytes_total {
            0 => 0,
            total => (self.bytes_copied.min(total) * 100) / total,
        }
    }
}

/// What a LIVE snapshot's copy reports after `Snapshotted`.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum CopyEvent {
    /// The copy is under way.
    Progress(CopyProgress),
    /// The copy ended; `dir/memory` is complete when `error` is `None`.
    Done {
        /// The final figures.
        progress: CopyProgress,
        /// Bytes of memory data written (holes not counted).
        bytes_written: u64,
        /// How long the copy ran.
        copy_us: u64,
        /// Why it failed (or `cancelled`).
        error: Option<String>,
    },
}

/// A LIVE snapshot whose vCPUs run again while memory is copied.
#[derive(Debug)]
pub struct LiveSnapshot {
    /// The Snapshot request's id (the id a Cancel of the copy names).
    pub request_id: u64,
    /// What the VMM reported when the vCPUs resumed.
    pub snapshotted: Snapshotted,
    /// The copy's progress and end.
    pub events: CopyEvents,
}

/// The events of one LIVE copy. Ends (`None`) without [`CopyEvent::Done`]
/// if the VMM stops.
#[derive(Debug)]
pub struct CopyEvents(mpsc::UnboundedReceiver<Event>);

impl CopyEvents {
    /// The next event; `None` once the VMM has stopped (see [`Vmm::stop`]).
    pub async fn next(&mut self) -> Option<CopyEvent> {
        loop {
            match self.0.recv().await? {
                Event::CopyProgress {
                    bytes_copied,
                    bytes_total,
                    faults_served,
                    ..
                } => {
                    return Some(CopyEvent::Progress(CopyProgress {
                        bytes_copied,
                        bytes_total,
                        faults_served,
                    }))
                }
                Event::CopyDone {
                    bytes_written,
                    bytes_copied,
                    bytes_total,
                    faults_served,
                    copy_us,
                    error,
                    ..
                } => {
                    return Some(CopyEvent::Done {
                        progress: CopyProgress {
                            bytes_copied,
                            bytes_total,
                            faults_served,
                        },
                        bytes_written,
                        copy_us,
                        error,
                    })
                }
                Event::Error { message, .. } => {
                    return Some(CopyEvent::Done {
                        progress: CopyProgress::default(),
                        bytes_written: 0,
                        copy_us: 0,
                        error: Some(message),
                    })
                }
                other => tracing::debug!(?other, "unexpected event during a live copy"),
            }
        }
    }
}

impl Vmm {
    /// Asks the VMM to write a snapshot into `dir` and waits until it has.
    pub async fn snapshot(
        &self,
        mode: SnapshotMode,
        dir: &Path,
        measure_diff: bool,
    ) -> Result<Snapshotted, RequestError> {
        let dir = dir.to_string_lossy().into_owned();
        let event = self
            .call(|id| Request::Snapshot {
                id,
                mode,
                dir,
                measure_diff,
            })
            .await?;
        match event {
            Event::Snapshotted {
                pause_us,
                bytes_written,
                dirty_pages,
                memory_bytes,
                ..
            } => Ok(Snapshotted {
                pause_us,
                bytes_written,
                dirty_pages,
                memory_bytes,
            }),
            other => Err(RequestError::Refused(format!(
                "unexpected answer to snapshot: {other:?}"
            ))),
        }
    }

    /// Asks the VMM for a LIVE snapshot into `dir` and waits until the
    /// vCPUs run again (`Snapshotted`); the copy's progress and end then
    /// arrive on the returned [`CopyEvents`]. Cancel the copy with
    /// [`Vmm::cancel`] and the returned `request_id`.
    pub async fn live_snapshot(
        &self,
        dir: &Path,
        measure_diff: bool,
    ) -> Result<LiveSnapshot, RequestError> {
        let id = self.next_id();
        let (tx, mut rx) = mpsc::unbounded_channel();
        let request = Request::Snapshot {
            id,
            mode: SnapshotMode::Live,
            dir: dir.to_string_lossy().into_owned(),
            measure_diff,
        };
        self.open_and_send(&request, Sink::Copy(tx))
            .map_err(RequestError::Stopped)?;
        match rx.recv().await {
            Some(Event::Snapshotted {
                pause_us,
                bytes_written,
                dirty_pages,
                memory_bytes,
                ..
            }) => Ok(LiveSnapshot {
                request_id: id,
                snapshotted: Snapshotted {
                    pause_us,
                    bytes_written,
                    dirty_pages,
                    memory_bytes,
                },
                events: CopyEvents(rx),
            }),
            Some(Event::Error { message, .. }) => Err(RequestError::Refused(message)),
            Some(other) => {
                lock(&self.routes).remove(id);
                Err(RequestError::Refused(format!(
                    "unexpected answer to a live snapshot: {other:?}"
                )))
            }
            None => Err(RequestError::Stopped(self.stop_or_unknown())),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn copy_percent() {
        let p = |bytes_copied, bytes_total| CopyProgress {
            bytes_copied,
            bytes_total,
            faults_served: 0,
        };
        assert_eq!(p(0, 0).percent(), 0);
        assert_eq!(p(1, 3).percent(), 33);
        assert_eq!(p(3, 3).percent(), 100);
        assert_eq!(p(9, 3).percent(), 100);
    }
}
