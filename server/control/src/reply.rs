//! How the VMM answers each request: the events that carry its id, and
//! which of them is the last. The daemon routes events by it, so a
//! request's route lives exactly as long as the protocol says.

use crate::{Event, Request, SnapshotMode};

/// The shape of the VMM's answer to one request.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Reply {
    /// No event answers it: [`Request::Cancel`], [`Request::FileAck`] and
    /// [`Request::FileAbort`] name another request's id, and
    /// [`Request::Shutdown`] is answered by [`Event::Exited`], which
    /// carries no id.
    Nothing,
    /// One event, which is also the last: the answer, or [`Event::Error`].
    One,
    /// An Exec: output frames, then [`Event::ExecDone`]; or
    /// [`Event::Error`] (it cannot start, or its input was lost).
    Exec,
    /// A LIVE snapshot: [`Event::Snapshotted`], [`Event::CopyProgress`]
    /// events, then [`Event::CopyDone`]; or [`Event::Error`] at any point.
    LiveCopy,
    /// A file upload ([`Event::FileCredit`]s, then [`Event::FileWritten`])
    /// or download ([`Event::FileOpened`], output frames of stream
    /// [`crate::STREAM_FILE`], then [`Event::FileRead`]); or
    /// [`Event::FileFailed`] or [`Event::Error`] at any point.
    Transfer,
}

impl Reply {
    /// Whether `event`, carrying the request's id, is the last event of
    /// the request (nothing more carries its id afterwards). For
    /// [`Reply::Nothing`] any event is unexpected, and ends it too.
    pub fn ends_with(self, event: &Event) -> bool {
        match self {
            Reply::Nothing | Reply::One => true,
            Reply::Exec => matches!(event, Event::ExecDone { .. } | Event::Error { .. }),
            Reply::LiveCopy => matches!(event, Event::CopyDone { .. } | Event::Error { .. }),
            Reply::Transfer => matches!(
                event,
                Event::FileWritten { .. }
                    | Event::FileRead { .. }
                    | Event::FileFailed { .. }
                    | Event::Error { .. }
            ),
        }
    }
}

impl Request {
    /// How the VMM answers this request.
    pub fn reply(&self) -> Reply {
        match self {
            Request::Cancel { .. }
            | Request::FileAck { .. }
            | Request::FileAbort { .. }
            | Request::Shutdown { .. } => Reply::Nothing,
            Request::Ping { .. }
            | Request::Heartbeat { .. }
            | Request::StatFile { .. }
            | Request::ListDir { .. }
            | Request::RemoveFile { .. } => Reply::One,
            Request::Snapshot {
                mode: SnapshotMode::Live,
                ..
            } => Reply::LiveCopy,
            Request::Snapshot { .. } => Reply::One,
            Request::Exec { .. } => Reply::Exec,
            Request::WriteFile { .. } | Request::ReadFile { .. } => Reply::Transfer,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::{ExitReason, FileErrorKind};

    fn snapshot(mode: SnapshotMode) -> Request {
        Request::Snapshot {
            id: 1,
            mode,
            dir: "/d".into(),
            measure_diff: false,
        }
    }

    #[test]
    fn each_request_has_its_reply() {
        let path = || "/p".to_string();
        let cases = [
            (Request::Ping { id: 1 }, Reply::One),
            (Request::Heartbeat { id: 1 }, Reply::One),
            (
                Request::Exec {
                    id: 1,
                    argv: vec!["true".into()],
                    env: vec![],
                    cwd: None,
                    stdin: false,
                },
                Reply::Exec,
            ),
            (Request::Cancel { id: 1 }, Reply::Nothing),
            (Request::Shutdown { id: 1 }, Reply::Nothing),
            (snapshot(SnapshotMode::Full), Reply::One),
            (snapshot(SnapshotMode::Diff), Reply::One),
            (snapshot(SnapshotMode::Live), Reply::LiveCopy),
            (
                Request::WriteFile {
                    id: 1,
                    path: path(),
                    mode: 0,
                    parents: false,
                    exclusive: false,
                },
                Reply::Transfer,
            ),
            (
                Request::ReadFile {
                    id: 1,
                    path: path(),
                    offset: 0,
                    length: 0,
                    window: 1,
                },
                Reply::Transfer,
            ),
            (Request::FileAck { id: 1, bytes: 1 }, Reply::Nothing),
            (Request::FileAbort { id: 1 }, Reply::Nothing),
            (
                Request::StatFile {
                    id: 1,
                    path: path(),
                },
                Reply::One,
            ),
            (
                Request::ListDir {
                    id: 1,
                    path: path(),
                },
                Reply::One,
            ),
            (
                Request::RemoveFile {
                    id: 1,
                    path: path(),
                    recursive: false,
                },
                Reply::One,
            ),
        ];
        for (request, reply) in cases {
            assert_eq!(request.reply(), reply, "{request:?}");
        }
    }

    /// How many of `events` a request with `reply` takes: up to and
    /// including the first that ends it.
    fn taken(reply: Reply, events: &[Event]) -> usize {
        events
            .iter()
            .position(|e| reply.ends_with(e))
            .map_or(events.len(), |i| i + 1)
    }

    fn error() -> Event {
        Event::Error {
            id: 1,
            message: "no".into(),
        }
    }

    #[test]
    fn a_live_copy_ends_with_copy_done_or_error() {
        let progress = Event::CopyProgress {
            id: 1,
            bytes_copied: 1,
            bytes_total: 2,
            faults_served: 0,
        };
        let done = Event::CopyDone {
            id: 1,
            bytes_written: 2,
            bytes_copied: 2,
            bytes_total: 2,
            faults_served: 0,
            copy_us: 5,
            error: None,
        };
        let snapshotted = Event::Snapshotted {
            id: 1,
            pause_us: 1,
            bytes_written: 0,
            dirty_pages: 0,
            memory_bytes: 2,
        };
        let stream = [snapshotted.clone(), progress.clone(), progress, done];
        assert_eq!(taken(Reply::LiveCopy, &stream), 4);
        assert_eq!(taken(Reply::LiveCopy, &[error()]), 1);
        assert_eq!(taken(Reply::LiveCopy, &[snapshotted.clone(), error()]), 2);
        // The same Snapshotted ends a FULL or DIFF snapshot.
        assert!(Reply::One.ends_with(&snapshotted));
    }

    #[test]
    fn an_exec_ends_with_exec_done_or_error() {
        let done = Event::ExecDone {
            id: 1,
            exit_code: 0,
            duration_us: 1,
            cancelled: false,
            signal: None,
        };
        assert!(Reply::Exec.ends_with(&done) && Reply::Exec.ends_with(&error()));
        assert!(!Reply::Exec.ends_with(&Event::Pong { id: 1 }));
    }

    #[test]
    fn a_transfer_ends_with_its_outcome() {
        let credit = Event::FileCredit { id: 1, bytes: 10 };
        let opened = Event::FileOpened { id: 1, size: 10 };
        let written = Event::FileWritten {
            id: 1,
            size: 10,
            sha256: "ab".into(),
        };
        let read = Event::FileRead {
            id: 1,
            bytes: 10,
            sha256: "ab".into(),
        };
        let failed = Event::FileFailed {
            id: 1,
            kind: FileErrorKind::Aborted,
            message: "gone".into(),
        };
        assert_eq!(
            taken(Reply::Transfer, &[credit.clone(), credit, written]),
            3
        );
        assert_eq!(taken(Reply::Transfer, &[opened.clone(), read]), 2);
        assert_eq!(taken(Reply::Transfer, &[opened, failed]), 2);
        assert_eq!(taken(Reply::Transfer, &[error()]), 1);
    }

    #[test]
    fn one_event_ends_the_rest() {
        for event in [
            Event::Pong { id: 1 },
            Event::Alive { id: 1 },
            Event::FileRemoved { id: 1 },
            error(),
        ] {
            assert!(Reply::One.ends_with(&event), "{event:?}");
        }
        assert!(Reply::Nothing.ends_with(&Event::Exited {
            reason: ExitReason::Shutdown
        }));
    }
}
