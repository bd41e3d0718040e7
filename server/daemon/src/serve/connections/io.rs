//! [`Guarded`]: an accepted connection's stream that enforces its table's
//! timeouts and evictions, and leaves the table when dropped.

use std::future::Future;
use std::io;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::Instant;

use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::time::Sleep;
use tonic::transport::server::Connected;

use super::{CloseReason, ConnState, ConnTable};

/// A connection admitted by a [`ConnTable`]. Reads fail (and hyper closes
/// the connection) once the table evicted it or a timeout passed; the
/// timer wakes the connection's task, since hyper always has a read
/// pending on an HTTP/2 connection.
#[derive(Debug)]
pub struct Guarded<IO> {
    io: IO,
    state: Arc<ConnState>,
    table: Arc<ConnTable>,
    timer: Pin<Box<Sleep>>,
    armed: Option<Instant>,
    closed: bool,
}

impl<IO> Guarded<IO> {
    /// Wraps `io`, admitted as `state` in `table`.
    pub fn new(io: IO, state: Arc<ConnState>, table: Arc<ConnTable>) -> Guarded<IO> {
        Guarded {
            io,
            state,
            table,
            timer: Box::pin(tokio::time::sleep_until(tokio::time::Instant::now())),
            armed: None,
            closed: false,
        }
    }

    /// `Err` once the connection must close; otherwise arms the timer for
    /// the next deadline (the task is woken then, or when a call ends).
    fn check(&mut self, cx: &mut Context<'_>) -> io::Result<()> {
        loop {
            match self.state.deadline(&self.table.limits, cx.waker()) {
                Err(reason) => {
                    if !self.closed {
                        self.closed = true;
                        if reason != CloseReason::Evicted {
                            // Evictions are counted by the table.
                            self.table.closed(reason);
                        }
                    }
                    return Err(io::Error::new(
                        io::ErrorKind::TimedOut,
                        format!("connection closed by forkd: {}", reason.as_str()),
                    ));
                }
                Ok(None) => return Ok(()),
                Ok(Some(deadline)) => {
                    if self.armed != Some(deadline) {
                        self.armed = Some(deadline);
                        self.timer
                            .as_mut()
                            .reset(tokio::time::Instant::from_std(deadline));
                    }
                    if self.timer.as_mut().poll(cx).is_pending() {
                        return Ok(());
                    }
                    // The deadline passed: `deadline` now says so.
                }
            }
        }
    }
}

impl<IO> Drop for Guarded<IO> {
    fn drop(&mut self) {
        self.table.remove(&self.state);
    }
}

impl<IO: AsyncRead + Unpin> AsyncRead for Guarded<IO> {
    fn poll_read(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        let this = self.get_mut();
        this.check(cx)?;
        Pin::new(&mut this.io).poll_read(cx, buf)
    }
}

impl<IO: AsyncWrite + Unpin> AsyncWrite for Guarded<IO> {
    fn poll_write(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.get_mut().io).poll_write(cx, buf)
    }

    fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.get_mut().io).poll_flush(cx)
    }

    fn poll_shutdown(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.get_mut().io).poll_shutdown(cx)
    }

    fn poll_write_vectored(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[io::IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.get_mut().io).poll_write_vectored(cx, bufs)
    }

    fn is_write_vectored(&self) -> bool {
        self.io.is_write_vectored()
    }
}

/// What the calls on a connection see of it (request extensions).
#[derive(Clone, Debug)]
pub struct ConnInfo(pub Arc<ConnState>);

impl<IO> Connected for Guarded<IO> {
    type ConnectInfo = ConnInfo;

    fn connect_info(&self) -> ConnInfo {
        ConnInfo(self.state.clone())
    }
}
