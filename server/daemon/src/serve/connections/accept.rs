//! The accept loops of the gRPC listeners: who may connect (local users,
//! without a token), admission into the listener's [`ConnTable`], and
//! accept errors (out of file descriptors) that back off instead of
//! spinning.

use std::io;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use tokio::net::{TcpListener, TcpStream, UnixListener, UnixStream};
use tokio::sync::mpsc;
use tokio_stream::wrappers::ReceiverStream;

use super::{CloseReason, ConnTable, Guarded};
use crate::serve::peer::{tcp_peer_uid, LocalUsers};

/// How long to stop accepting after an accept error such as EMFILE, so a
/// full fd table does not turn the loop into a spin.
const ACCEPT_BACKOFF: Duration = Duration::from_millis(100);
/// Connections handed to the server but not yet picked up.
const HANDOFF: usize = 64;

/// Who may connect.
#[derive(Clone, Debug)]
pub enum AcceptGate {
    /// Anyone who reaches the listener (a token is checked on each call).
    Anyone,
    /// Only these local users (no token configured).
    LocalUsers(LocalUsers),
}

impl AcceptGate {
    /// `Err` with the refusal reason and a detail for the log.
    fn check(&self, uid: io::Result<Option<u32>>) -> Result<(), (CloseReason, String)> {
        let AcceptGate::LocalUsers(users) = self else {
            return Ok(());
        };
        match uid {
            Ok(Some(uid)) if users.allows(uid) => Ok(()),
            Ok(Some(uid)) => Err((
                CloseReason::PeerUid,
                format!(
                    "local user {uid} is not allowed (accepted: {:?}; use a token, or --allow-uid)",
                    users.ids()
                ),
            )),
            Ok(None) => Err((
                CloseReason::PeerUnknown,
                "the peer's socket is not in this network namespace".into(),
            )),
            Err(e) => Err((
                CloseReason::PeerUnknown,
                format!("cannot look up the peer's user: {e}"),
            )),
        }
    }
}

/// Whether an accept error is about this one connection (go on at once)
/// rather than the process or system (back off).
fn is_per_connection(e: &io::Error) -> bool {
    matches!(
        e.kind(),
        io::ErrorKind::ConnectionAborted
            | io::ErrorKind::ConnectionReset
            | io::ErrorKind::ConnectionRefused
            | io::ErrorKind::Interrupted
    )
}

async fn backoff(table: &ConnTable, e: &io::Error) {
    table.accept_error(e);
    tokio::time::sleep(ACCEPT_BACKOFF).await;
}

/// Accepts on `listener` until the returned stream is dropped.
pub fn tcp_incoming(
    listener: TcpListener,
    table: Arc<ConnTable>,
    gate: AcceptGate,
) -> ReceiverStream<io::Result<Guarded<TcpStream>>> {
    let (tx, rx) = mpsc::channel(HANDOFF);
    tokio::spawn(async move {
        loop {
            let accepted = tokio::select! {
                a = listener.accept() => a,
                _ = tx.closed() => return,
            };
            let (stream, peer) = match accepted {
                Ok(a) => a,
                Err(e) if is_per_connection(&e) => continue,
                Err(e) => {
                    backoff(&table, &e).await;
                    continue;
                }
            };
            let uid = match stream.local_addr() {
                Ok(local) => peer_uid(local, peer),
                Err(e) => Err(e),
            };
            if let Err((reason, detail)) = gate.check(uid) {
                table.refused(reason, Some(&format!("{peer}: {detail}")));
                continue;
            }
            let _ = stream.set_nodelay(true);
            let Ok(state) = table.admit() else { continue };
            if tx
                .send(Ok(Guarded::new(stream, state, table.clone())))
                .await
                .is_err()
            {
                return;
            }
        }
    });
    ReceiverStream::new(rx)
}

fn peer_uid(local: SocketAddr, peer: SocketAddr) -> io::Result<Option<u32>> {
    if !peer.ip().is_loopback() && !peer.ip().to_canonical().is_loopback() {
        return Ok(None);
    }
    tcp_peer_uid(local, peer)
}

/// Accepts on the Unix socket `listener` until the returned stream is
/// dropped.
pub fn unix_incoming(
    listener: UnixListener,
    table: Arc<ConnTable>,
    gate: AcceptGate,
) -> ReceiverStream<io::Result<Guarded<UnixStream>>> {
    let (tx, rx) = mpsc::channel(HANDOFF);
    tokio::spawn(async move {
        loop {
            let accepted = tokio::select! {
                a = listener.accept() => a,
                _ = tx.closed() => return,
            };
            let stream = match accepted {
                Ok((stream, _)) => stream,
                Err(e) if is_per_connection(&e) => continue,
                Err(e) => {
                    backoff(&table, &e).await;
                    continue;
                }
            };
            let uid = stream.peer_cred().map(|c| Some(c.uid()));
            if let Err((reason, detail)) = gate.check(uid) {
                table.refused(reason, Some(&detail));
                continue;
            }
            let Ok(state) = table.admit() else { continue };
            if tx
                .send(Ok(Guarded::new(stream, state, table.clone())))
                .await
                .is_err()
            {
                return;
            }
        }
    });
    ReceiverStream::new(rx)
}
