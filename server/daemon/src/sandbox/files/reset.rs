//! Tells a request stream its client reset (the client dropped the call)
//! from one it ended.
//!
//! tonic's `Streaming` reports a request body that fails with CANCEL, which
//! is what a client sends when it drops a call, as a clean end of stream,
//! the same as END_STREAM. An upload must not take that for "the file is
//! complete" (it would commit the bytes received so far), so
//! [`ResetLayer`] wraps every request body and notes, in the request's
//! [`BodyReset`] extension, a body that ended with an error; WriteFile
//! checks it when its stream ends.

use std::pin::Pin;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::task::{Context, Poll};

use http_body::{Body, Frame, SizeHint};
use tower::{Layer, Service};

/// Set once the request body ended with an error (a reset, a broken
/// connection) rather than its end.
#[derive(Clone, Debug, Default)]
pub struct BodyReset(Arc<AtomicBool>);

impl BodyReset {
    /// Whether the body ended with an error.
    pub fn happened(&self) -> bool {
        self.0.load(Ordering::Acquire)
    }
}

/// A request body that sets its [`BodyReset`] when it fails.
pub struct WatchedBody<B> {
    inner: B,
    reset: BodyReset,
}

impl<B: Body + Unpin> Body for WatchedBody<B> {
    type Data = B::Data;
    type Error = B::Error;

    fn poll_frame(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Self::Data>, Self::Error>>> {
        let this = self.get_mut();
        let polled = Pin::new(&mut this.inner).poll_frame(cx);
        if let Poll::Ready(Some(Err(_))) = &polled {
            this.reset.0.store(true, Ordering::Release);
        }
        polled
    }

    fn is_end_stream(&self) -> bool {
        self.inner.is_end_stream()
    }

    fn size_hint(&self) -> SizeHint {
        self.inner.size_hint()
    }
}

/// The layer: every request gets a [`BodyReset`] and a [`WatchedBody`].
#[derive(Clone, Copy, Debug, Default)]
pub struct ResetLayer;

impl<S> Layer<S> for ResetLayer {
    type Service = ResetService<S>;

    fn layer(&self, inner: S) -> ResetService<S> {
        ResetService { inner }
    }
}

/// The service built by [`ResetLayer`].
#[derive(Clone, Debug)]
pub struct ResetService<S> {
    inner: S,
}

impl<S, B> Service<http::Request<B>> for ResetService<S>
where
    S: Service<http::Request<WatchedBody<B>>>,
{
    type Response = S::Response;
    type Error = S::Error;
    type Future = S::Future;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), Self::Error>> {
        self.inner.poll_ready(cx)
    }

    fn call(&mut self, mut req: http::Request<B>) -> Self::Future {
        let reset = BodyReset::default();
        req.extensions_mut().insert(reset.clone());
        self.inner
            .call(req.map(|inner| WatchedBody { inner, reset }))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Frames to yield in order: data, an error, or the end (`None`).
    struct Script(Vec<Option<Result<&'static [u8], &'static str>>>);

    impl Body for Script {
        type Data = &'static [u8];
        type Error = &'static str;

        fn poll_frame(
            self: Pin<&mut Self>,
            _: &mut Context<'_>,
        ) -> Poll<Option<Result<Frame<Self::Data>, Self::Error>>> {
            Poll::Ready(self.get_mut().0.remove(0).map(|r| r.map(Frame::data)))
        }
    }

    /// Polls `script` to its end or error; returns whether a reset was noted.
    fn drain(script: Script) -> bool {
        let reset = BodyReset::default();
        let mut body = WatchedBody {
            inner: script,
            reset: reset.clone(),
        };
        let mut cx = Context::from_waker(std::task::Waker::noop());
        loop {
            match Pin::new(&mut body).poll_frame(&mut cx) {
                Poll::Ready(Some(Ok(_))) => assert!(!reset.happened()),
                _ => return reset.happened(),
            }
        }
    }

    #[test]
    fn an_error_is_noted_and_an_end_is_not() {
        assert!(!drain(Script(vec![Some(Ok(b"a")), None])));
        assert!(drain(Script(vec![Some(Ok(b"a")), Some(Err("reset"))])));
    }
}
