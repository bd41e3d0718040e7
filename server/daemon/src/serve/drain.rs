//! Draining: the flag that turns new calls away during shutdown, the
//! health status that tells load balancers, the count of calls still in
//! flight (a streaming call counts until its response body ends), and the
//! signal that stops the listeners (which also ends health `Watch`
//! streams, so they do not hold the shutdown up).

use std::future::Future;
use std::pin::Pin;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::Arc;
use std::task::{Context, Poll};

use forkd_api::v1::sandbox_service_server::SERVICE_NAME as SANDBOX_SERVICE;
use forkd_api::v1::snapshot_service_server::SERVICE_NAME as SNAPSHOT_SERVICE;
use http_body::{Body, Frame, SizeHint};
use tokio::sync::watch;
use tonic::Status;
use tonic_health::server::HealthReporter;
use tonic_health::ServingStatus;
use tower::{Layer, Service};

use crate::api::error::ApiError;
use crate::serve::auth::{is_exempt, BoxFuture};
use crate::serve::guarded_body::GuardedBody;

/// Health service names this daemon reports: the whole server and both
/// forkd services.
pub const HEALTH_NAMES: [&str; 3] = ["", SANDBOX_SERVICE, SNAPSHOT_SERVICE];
/// The health method whose streams never end by themselves.
const HEALTH_WATCH: &str = "/grpc.health.v1.Health/Watch";

/// Shared drain state.
#[derive(Debug)]
pub struct Drain {
    draining: AtomicBool,
    in_flight: AtomicUsize,
    health: HealthReporter,
    stop: watch::Sender<bool>,
}

impl Drain {
    /// Drain state reporting through `health`.
    pub fn new(health: HealthReporter) -> Arc<Drain> {
        Arc::new(Drain {
            draining: AtomicBool::new(false),
            in_flight: AtomicUsize::new(0),
            health,
            stop: watch::Sender::new(false),
        })
    }

    /// Tells the listeners to stop accepting (see [`Drain::stopped`]) and
    /// ends open health `Watch` streams with UNAVAILABLE.
    pub fn stop_listeners(&self) {
        self.stop.send_replace(true);
    }

    /// Resolves once [`Drain::stop_listeners`] was called.
    pub fn stopped(&self) -> impl Future<Output = ()> + Send + 'static {
        let mut rx = self.stop.subscribe();
        async move {
            let _ = rx.wait_for(|stop| *stop).await;
        }
    }

    /// Reports SERVING for every name in [`HEALTH_NAMES`].
    pub async fn set_serving(&self) {
        for name in HEALTH_NAMES {
            self.health
                .set_service_status(name, ServingStatus::Serving)
                .await;
        }
    }

    /// Starts draining: health goes NOT_SERVING and new calls (other than
    /// health checks) are refused with UNAVAILABLE.
    pub async fn start(&self) {
        self.draining.store(true, Ordering::SeqCst);
        for name in HEALTH_NAMES {
            self.health
                .set_service_status(name, ServingStatus::NotServing)
                .await;
        }
    }

    /// Whether draining has started.
    pub fn is_draining(&self) -> bool {
        self.draining.load(Ordering::SeqCst)
    }

    /// Calls (other than health checks) whose response has not ended yet.
    pub fn in_flight(&self) -> usize {
        self.in_flight.load(Ordering::SeqCst)
    }

    fn enter(self: &Arc<Self>) -> InFlight {
        self.in_flight.fetch_add(1, Ordering::SeqCst);
        InFlight(self.clone())
    }
}

/// Counts one call as in flight until dropped.
#[derive(Debug)]
struct InFlight(Arc<Drain>);

impl Drop for InFlight {
    fn drop(&mut self) {
        self.0.in_flight.fetch_sub(1, Ordering::SeqCst);
    }
}

/// Layer that refuses calls while draining and counts the others.
#[derive(Clone, Debug)]
pub struct DrainLayer {
    drain: Arc<Drain>,
}

impl DrainLayer {
    /// A layer over `drain`.
    pub fn new(drain: Arc<Drain>) -> DrainLayer {
        DrainLayer { drain }
    }
}

impl<S> Layer<S> for DrainLayer {
    type Service = DrainService<S>;

    fn layer(&self, inner: S) -> DrainService<S> {
        DrainService {
            inner,
            drain: self.drain.clone(),
        }
    }
}

/// The service built by [`DrainLayer`].
#[derive(Clone, Debug)]
pub struct DrainService<S> {
    inner: S,
    drain: Arc<Drain>,
}

impl<S, B> Service<http::Request<B>> for DrainService<S>
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
        if req.uri().path() == HEALTH_WATCH {
            let stop = Box::pin(self.drain.stopped());
            let fut = self.inner.call(req);
            return Box::pin(async move {
                let resp = fut.await?;
                Ok(resp.map(|inner| {
                    tonic::body::Body::new(EndOnStop {
                        inner,
                        stop,
                        ended: false,
                    })
                }))
            });
        }
        if is_exempt(req.uri().path()) {
            return Box::pin(self.inner.call(req));
        }
        if self.drain.is_draining() {
            let status = Status::from(ApiError::ShuttingDown);
            return Box::pin(std::future::ready(Ok(status.into_http())));
        }
        let guard = self.drain.enter();
        let fut = self.inner.call(req);
        Box::pin(async move {
            let resp = fut.await?;
            Ok(resp.map(|inner| tonic::body::Body::new(GuardedBody::new(inner, guard))))
        })
    }
}

/// A response body that ends with UNAVAILABLE trailers once the listeners
/// stop, for streams that would otherwise never end.
struct EndOnStop<B> {
    inner: B,
    stop: Pin<Box<dyn Future<Output = ()> + Send>>,
    ended: bool,
}

impl<B: Body + Unpin> Body for EndOnStop<B> {
    type Data = B::Data;
    type Error = B::Error;

    fn poll_frame(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Self::Data>, Self::Error>>> {
        let this = self.get_mut();
        if this.ended {
            return Poll::Ready(None);
        }
        if this.stop.as_mut().poll(cx).is_ready() {
            this.ended = true;
            let status = Status::from(ApiError::ShuttingDown);
            let mut trailers = http::HeaderMap::new();
            if status.add_header(&mut trailers).is_ok() {
                return Poll::Ready(Some(Ok(Frame::trailers(trailers))));
            }
            return Poll::Ready(None);
        }
        Pin::new(&mut this.inner).poll_frame(cx)
    }

    fn is_end_stream(&self) -> bool {
        self.ended || self.inner.is_end_stream()
    }

    fn size_hint(&self) -> SizeHint {
        self.inner.size_hint()
    }
}
