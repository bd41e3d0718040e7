//! [`CallLayer`]: counts each call as in flight on its connection until its
//! response body is dropped, so idle timeouts and evictions spare
//! connections that are working (a long Exec stream included).

use std::sync::Arc;
use std::task::{Context, Poll};

use tower::{Layer, Service};

use super::io::ConnInfo;
use super::ConnState;
use crate::serve::auth::BoxFuture;
use crate::serve::guarded_body::GuardedBody;

/// The layer; connections without a [`ConnInfo`] are not counted.
#[derive(Clone, Copy, Debug, Default)]
pub struct CallLayer;

impl<S> Layer<S> for CallLayer {
    type Service = CallService<S>;

    fn layer(&self, inner: S) -> CallService<S> {
        CallService { inner }
    }
}

/// The service built by [`CallLayer`].
#[derive(Clone, Debug)]
pub struct CallService<S> {
    inner: S,
}

impl<S, B> Service<http::Request<B>> for CallService<S>
where
    S: Service<http::Request<B>, Response = http::Response<tonic::body::Body>>,
    S::Future: Send + 'static,
    S::Error: Send + 'static,
{
    type Response = S::Response;
    type Error = S::Error;
    type Future = BoxFuture<S::Response, S::Error>;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), Self::Error>> {
        self.inner.poll_ready(cx)
    }

    fn call(&mut self, req: http::Request<B>) -> Self::Future {
        let guard = req
            .extensions()
            .get::<ConnInfo>()
            .map(|info| CallGuard::new(info.0.clone()));
        let fut = self.inner.call(req);
        Box::pin(async move {
            let resp = fut.await?;
            Ok(match guard {
                Some(guard) => {
                    resp.map(|inner| tonic::body::Body::new(GuardedBody::new(inner, guard)))
                }
                None => resp,
            })
        })
    }
}

/// One call in flight on a connection, until dropped.
#[derive(Debug)]
struct CallGuard(Arc<ConnState>);

impl CallGuard {
    fn new(state: Arc<ConnState>) -> CallGuard {
        state.call_started();
        CallGuard(state)
    }
}

impl Drop for CallGuard {
    fn drop(&mut self) {
        self.0.call_ended();
    }
}
