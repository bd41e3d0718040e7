//! The reader's routing table: for each request in flight, where its
//! events go, kept exactly until the event the protocol says is its last
//! ([`forkd_control::Reply`]).

use std::collections::HashMap;

use forkd_control::{Event, Reply, Request};
use tokio::sync::{mpsc, oneshot};

use super::{ExecEvent, FileEvent};

/// Where one request's events go.
#[derive(Debug)]
pub(super) enum Sink {
    /// A caller waiting for the one event of a [`Reply::One`] request.
    One(oneshot::Sender<Event>),
    /// An exec's caller: its output and its end ([`Reply::Exec`]).
    Exec(mpsc::Sender<ExecEvent>),
    /// A LIVE snapshot's events ([`Reply::LiveCopy`]).
    Copy(mpsc::UnboundedSender<Event>),
    /// A file transfer's events and bytes ([`Reply::Transfer`]). Unbounded,
    /// yet bounded by the transfer's window: the VMM sends a download's
    /// bytes only as far as the daemon acknowledged them, and an upload's
    /// events are a few small credits.
    File(mpsc::UnboundedSender<FileEvent>),
}

impl Sink {
    /// Whether this sink can take the events of a `reply`.
    fn serves(&self, reply: Reply) -> bool {
        matches!(
            (self, reply),
            (Sink::One(_), Reply::One)
                | (Sink::Exec(_), Reply::Exec)
                | (Sink::Copy(_), Reply::LiveCopy)
                | (Sink::File(_), Reply::Transfer)
        )
    }

    /// Another handle on the same route; `None` for [`Sink::One`], whose
    /// one event always ends it.
    fn handle(&self) -> Option<Sink> {
        match self {
            Sink::One(_) => None,
            Sink::Exec(tx) => Some(Sink::Exec(tx.clone())),
            Sink::Copy(tx) => Some(Sink::Copy(tx.clone())),
            Sink::File(tx) => Some(Sink::File(tx.clone())),
        }
    }
}

#[derive(Debug)]
struct Route {
    reply: Reply,
    sink: Sink,
}

/// The VMM has stopped: no route opens any more.
#[derive(Debug, PartialEq, Eq)]
pub(super) struct Closed;

/// The routes of the requests in flight, by request id.
#[derive(Debug, Default)]
pub(super) struct Routes {
    closed: bool,
    routes: HashMap<u64, Route>,
}

impl Routes {
    /// Opens the route of `request`, before it is sent. Its
    /// [`Request::reply`] decides which event closes it again.
    pub(super) fn open(&mut self, request: &Request, sink: Sink) -> Result<(), Closed> {
        if self.closed {
            return Err(Closed);
        }
        let reply = request.reply();
        debug_assert!(sink.serves(reply), "{sink:?} cannot take a {reply:?}");
        self.routes.insert(request.id(), Route { reply, sink });
        Ok(())
    }

    /// Where `event` of request `id` goes; the route is removed when the
    /// event is the request's last.
    pub(super) fn for_event(&mut self, id: u64, event: &Event) -> Option<Sink> {
        let route = self.routes.get(&id)?;
        if route.reply.ends_with(event) {
            self.routes.remove(&id).map(|r| r.sink)
        } else {
            route.sink.handle()
        }
    }

    /// Where output frames of request `id` go (an exec's output, a
    /// download's bytes); they never end a request.
    pub(super) fn for_output(&self, id: u64) -> Option<Sink> {
        self.routes.get(&id).and_then(|r| r.sink.handle())
    }

    /// Drops the route of request `id` (its caller gave up on it).
    pub(super) fn remove(&mut self, id: u64) {
        self.routes.remove(&id);
    }

    /// Closes the table and returns the routes still open, so the caller
    /// can drop them (waking their waiters) after publishing the stop.
    pub(super) fn close(&mut self) -> Vec<Sink> {
        self.closed = true;
        self.routes.drain().map(|(_, r)| r.sink).collect()
    }
}

#[cfg(test)]
mod tests {
    use forkd_control::SnapshotMode;

    use super::*;

    fn done(id: u64) -> Event {
        Event::ExecDone {
            id,
            exit_code: 0,
            duration_us: 1,
            cancelled: false,
            signal: None,
        }
    }

    fn exec(id: u64) -> Request {
        Request::Exec {
            id,
            argv: vec!["true".into()],
            env: vec![],
            cwd: None,
            stdin: false,
        }
    }

    #[test]
    fn one_answer_closes_its_route() {
        let mut routes = Routes::default();
        let (tx, _rx) = oneshot::channel();
        routes
            .open(&Request::Ping { id: 1 }, Sink::One(tx))
            .unwrap();
        assert!(routes.for_output(1).is_none(), "a ping has no output");
        assert!(matches!(
            routes.for_event(1, &Event::Pong { id: 1 }),
            Some(Sink::One(_))
        ));
        assert!(routes.for_event(1, &Event::Pong { id: 1 }).is_none());
    }

    #[test]
    fn an_exec_route_lives_until_its_end() {
        let mut routes = Routes::default();
        let (tx, _rx) = mpsc::channel(1);
        routes.open(&exec(2), Sink::Exec(tx)).unwrap();
        assert!(matches!(routes.for_output(2), Some(Sink::Exec(_))));
        assert!(matches!(routes.for_event(2, &done(2)), Some(Sink::Exec(_))));
        assert!(routes.for_output(2).is_none(), "closed by ExecDone");
    }

    #[test]
    fn a_live_copy_route_lives_until_copy_done() {
        let mut routes = Routes::default();
        let (tx, _rx) = mpsc::unbounded_channel();
        let request = Request::Snapshot {
            id: 3,
            mode: SnapshotMode::Live,
            dir: "/d".into(),
            measure_diff: false,
        };
        routes.open(&request, Sink::Copy(tx)).unwrap();
        let snapshotted = Event::Snapshotted {
            id: 3,
            pause_us: 1,
            bytes_written: 0,
            dirty_pages: 0,
            memory_bytes: 1,
        };
        assert!(routes.for_event(3, &snapshotted).is_some());
        assert!(routes.for_event(3, &snapshotted).is_some(), "still open");
        let error = Event::Error {
            id: 3,
            message: "x".into(),
        };
        assert!(routes.for_event(3, &error).is_some());
        assert!(routes.for_event(3, &error).is_none(), "closed by Error");
    }

    #[test]
    fn a_closed_table_opens_nothing() {
        let mut routes = Routes::default();
        let (tx, _rx) = mpsc::channel(1);
        routes.open(&exec(4), Sink::Exec(tx.clone())).unwrap();
        assert_eq!(routes.close().len(), 1);
        assert_eq!(routes.open(&exec(5), Sink::Exec(tx)), Err(Closed));
        assert!(routes.for_output(4).is_none());
    }
}
