//! gRPC call instruments and the tower layer that feeds them: one count and
//! one duration per call, by method and final status code.
//!
//! The code comes from wherever tonic put it: the response headers of a
//! trailers-only response (errors, and the refusals of `DrainLayer` and
//! `AuthLayer`), else the trailers at the end of the body. A call is
//! recorded once: when its status is known, so a stream (Exec, Watch)
//! lasts until its body ends; a call whose client went away first is
//! recorded as CANCELLED when its future or body is dropped.

use std::collections::HashMap;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::{Duration, Instant};

use http_body::{Body, Frame, SizeHint};
use prometheus_client::encoding::EncodeLabelSet;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::histogram::Histogram;
use prometheus_client::registry::{Registry, Unit};
use prost::Message;
use tonic::{Code, Status};
use tower::{Layer, Service};

use crate::api::error::code_name;
use crate::serve::auth::BoxFuture;

/// `method` label of paths that are no method of this server, so clients
/// cannot grow the label set.
pub const OTHER_METHOD: &str = "other";

/// Upper bounds (seconds) of `forkd_grpc_request_duration_seconds`: from
/// sub-millisecond reads to LIVE branches and Exec streams of minutes.
pub const DURATION_BUCKETS: [f64; 17] = [
    0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0,
    60.0, 300.0,
];

const GRPC_STATUS: &str = "grpc-status";

/// The methods this server implements: `/package.Service/Method` paths,
/// each with its label `package.Service/Method`.
#[derive(Debug)]
pub struct KnownMethods {
    by_path: HashMap<String, Arc<str>>,
    other: Arc<str>,
}

impl KnownMethods {
    /// Every method of every service in the encoded `FileDescriptorSet`s
    /// (the same sets server reflection serves).
    pub fn from_descriptor_sets(sets: &[&[u8]]) -> Result<KnownMethods, prost::DecodeError> {
        let mut by_path = HashMap::new();
        for set in sets {
            let set = prost_types::FileDescriptorSet::decode(*set)?;
            for file in &set.file {
                let package = file.package();
                for service in &file.service {
                    let service_name = match package {
                        "" => service.name().to_string(),
                        p => format!("{p}.{}", service.name()),
                    };
                    for method in &service.method {
                        let label = format!("{service_name}/{}", method.name());
                        by_path.insert(format!("/{label}"), Arc::from(label));
                    }
                }
            }
        }
        Ok(KnownMethods {
            by_path,
            other: Arc::from(OTHER_METHOD),
        })
    }

    /// The `method` label of a request path.
    pub fn label(&self, path: &str) -> Arc<str> {
        self.by_path.get(path).unwrap_or(&self.other).clone()
    }

    /// Number of known methods.
    #[cfg(test)]
    pub fn len(&self) -> usize {
        self.by_path.len()
    }
}

/// The status code a response carries in its headers: `grpc-status` of a
/// trailers-only response, or, for a response that is not gRPC (no
/// `grpc-status`, HTTP status not 200), the code gRPC clients derive from
/// the HTTP status. `None`: the code comes in the trailers.
pub fn header_code(status: http::StatusCode, headers: &http::HeaderMap) -> Option<Code> {
    if let Some(value) = headers.get(GRPC_STATUS) {
        return Some(Code::from_bytes(value.as_bytes()));
    }
    (status != http::StatusCode::OK).then(|| http_status_code(status))
}

/// The code in a trailers frame (UNKNOWN when it has none, as a client
/// would see it).
pub fn trailer_code(trailers: &http::HeaderMap) -> Code {
    trailers
        .get(GRPC_STATUS)
        .map_or(Code::Unknown, |v| Code::from_bytes(v.as_bytes()))
}

/// gRPC's mapping of an HTTP status without `grpc-status` to a code.
fn http_status_code(status: http::StatusCode) -> Code {
    match status.as_u16() {
        400 => Code::Internal,
        401 => Code::Unauthenticated,
        403 => Code::PermissionDenied,
        404 => Code::Unimplemented,
        429 | 502 | 503 | 504 => Code::Unavailable,
        _ => Code::Unknown,
    }
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct CallLabels {
    method: Arc<str>,
    code: &'static str,
}

fn duration_histogram() -> Histogram {
    Histogram::new(DURATION_BUCKETS)
}

/// The call instruments. Clones share the same series.
#[derive(Clone, Debug)]
pub struct RpcMetrics {
    requests: Family<CallLabels, Counter>,
    duration: Family<CallLabels, Histogram, fn() -> Histogram>,
    methods: Arc<KnownMethods>,
}

impl RpcMetrics {
    /// Instruments labelling calls with `methods` (anything else is
    /// [`OTHER_METHOD`]), registered in `registry`.
    pub fn register(registry: &mut Registry, methods: KnownMethods) -> RpcMetrics {
        let m = RpcMetrics {
            requests: Family::default(),
            duration: Family::new_with_constructor(duration_histogram),
            methods: Arc::new(methods),
        };
        registry.register(
            "grpc_requests",
            "gRPC calls that ended, by method and status code",
            m.requests.clone(),
        );
        registry.register_with_unit(
            "grpc_request_duration",
            "Time from a gRPC call's arrival to its status (the end of a stream), \
             by method and status code",
            Unit::Seconds,
            m.duration.clone(),
        );
        m
    }

    /// Records one ended call.
    pub fn record(&self, method: Arc<str>, code: Code, elapsed: Duration) {
        let labels = CallLabels {
            method,
            code: code_name(code),
        };
        self.requests.get_or_create(&labels).inc();
        self.duration
            .get_or_create(&labels)
            .observe(elapsed.as_secs_f64());
    }
}

/// One call until its status is known; a call dropped before then (its
/// client went away) is recorded as CANCELLED.
struct Call {
    metrics: RpcMetrics,
    method: Arc<str>,
    start: Instant,
    done: bool,
}

impl Call {
    fn finish(&mut self, code: Code) {
        if !self.done {
            self.done = true;
            self.metrics
                .record(self.method.clone(), code, self.start.elapsed());
        }
    }
}

impl Drop for Call {
    fn drop(&mut self) {
        self.finish(Code::Cancelled);
    }
}

/// Layer recording every call in [`RpcMetrics`]. Put it outermost, so calls
/// refused while draining or for lack of a token are counted too.
#[derive(Clone, Debug)]
pub struct MetricsLayer {
    metrics: RpcMetrics,
}

impl MetricsLayer {
    /// A layer recording into `metrics`.
    pub fn new(metrics: RpcMetrics) -> MetricsLayer {
        MetricsLayer { metrics }
    }
}

impl<S> Layer<S> for MetricsLayer {
    type Service = MetricsService<S>;

    fn layer(&self, inner: S) -> MetricsService<S> {
        MetricsService {
            inner,
            metrics: self.metrics.clone(),
        }
    }
}

/// The service built by [`MetricsLayer`].
#[derive(Clone, Debug)]
pub struct MetricsService<S> {
    inner: S,
    metrics: RpcMetrics,
}

impl<S, B> Service<http::Request<B>> for MetricsService<S>
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
        let mut call = Call {
            method: self.metrics.methods.label(req.uri().path()),
            metrics: self.metrics.clone(),
            start: Instant::now(),
            done: false,
        };
        let fut = self.inner.call(req);
        Box::pin(async move {
            let resp = match fut.await {
                Ok(resp) => resp,
                Err(e) => {
                    call.finish(Code::Unknown);
                    return Err(e);
                }
            };
            if let Some(code) = header_code(resp.status(), resp.headers()) {
                call.finish(code);
                return Ok(resp);
            }
            Ok(resp.map(|inner| tonic::body::Body::new(MeteredBody { inner, call })))
        })
    }
}

/// A response body that records its call when the trailers (or an error,
/// or the end without trailers) come by, or as CANCELLED when dropped
/// before.
struct MeteredBody<B> {
    inner: B,
    call: Call,
}

impl<B: Body<Error = Status> + Unpin> Body for MeteredBody<B> {
    type Data = B::Data;
    type Error = B::Error;

    fn poll_frame(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Self::Data>, Self::Error>>> {
        let this = self.get_mut();
        let polled = Pin::new(&mut this.inner).poll_frame(cx);
        match &polled {
            Poll::Ready(Some(Ok(frame))) => {
                if let Some(trailers) = frame.trailers_ref() {
                    this.call.finish(trailer_code(trailers));
                }
            }
            Poll::Ready(Some(Err(status))) => this.call.finish(status.code()),
            Poll::Ready(None) => this.call.finish(Code::Unknown),
            Poll::Pending => {}
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

#[cfg(test)]
mod tests {
    use super::*;
    use http::{HeaderMap, HeaderValue, StatusCode};

    fn methods() -> KnownMethods {
        KnownMethods::from_descriptor_sets(&[
            forkd_api::FILE_DESCRIPTOR_SET,
            tonic_health::pb::FILE_DESCRIPTOR_SET,
        ])
        .unwrap()
    }

    #[test]
    fn method_labels_come_from_the_descriptor_sets() {
        let m = methods();
        assert_eq!(
            &*m.label("/forkd.v1.SandboxService/Exec"),
            "forkd.v1.SandboxService/Exec"
        );
        assert_eq!(
            &*m.label("/forkd.v1.SnapshotService/WatchSnapshot"),
            "forkd.v1.SnapshotService/WatchSnapshot"
        );
        assert_eq!(
            &*m.label("/grpc.health.v1.Health/Check"),
            "grpc.health.v1.Health/Check"
        );
        for unknown in [
            "/forkd.v1.SandboxService/Nope",
            "/forkd.v1.SandboxService/Exec/",
            "forkd.v1.SandboxService/Exec",
            "/",
            "/metrics",
            "/grpc.reflection.v1.ServerReflection/ServerReflectionInfo",
        ] {
            assert_eq!(&*m.label(unknown), OTHER_METHOD, "{unknown}");
        }
        assert!(m.len() >= 10, "{}", m.len());
    }

    #[test]
    fn garbage_descriptor_sets_are_an_error() {
        assert!(KnownMethods::from_descriptor_sets(&[b"\xff\xff\xff"]).is_err());
    }

    #[test]
    fn codes_from_headers_and_trailers() {
        let mut h = HeaderMap::new();
        assert_eq!(header_code(StatusCode::OK, &h), None, "in the trailers");
        h.insert(GRPC_STATUS, HeaderValue::from_static("5"));
        assert_eq!(header_code(StatusCode::OK, &h), Some(Code::NotFound));
        h.insert(GRPC_STATUS, HeaderValue::from_static("0"));
        assert_eq!(header_code(StatusCode::OK, &h), Some(Code::Ok));
        h.insert(GRPC_STATUS, HeaderValue::from_static("banana"));
        assert_eq!(header_code(StatusCode::OK, &h), Some(Code::Unknown));
        let none = HeaderMap::new();
        assert_eq!(
            header_code(StatusCode::NOT_FOUND, &none),
            Some(Code::Unimplemented)
        );
        assert_eq!(
            header_code(StatusCode::SERVICE_UNAVAILABLE, &none),
            Some(Code::Unavailable)
        );
        assert_eq!(
            header_code(StatusCode::IM_A_TEAPOT, &none),
            Some(Code::Unknown)
        );

        assert_eq!(trailer_code(&none), Code::Unknown);
        let mut t = HeaderMap::new();
        t.insert(GRPC_STATUS, HeaderValue::from_static("16"));
        assert_eq!(trailer_code(&t), Code::Unauthenticated);
    }

    /// The layer over a fake inner service: a trailers-only error, a
    /// unary OK whose code comes in the trailers, and a stream dropped
    /// before its end.
    #[tokio::test]
    async fn layer_records_each_call_once() {
        use http_body::Body as _;
        use std::future::poll_fn;

        let mut registry = Registry::default();
        let metrics = RpcMetrics::register(&mut registry, methods());
        let inner = tower::service_fn(|req: http::Request<()>| async move {
            let resp = match req.uri().path() {
                "/forkd.v1.SandboxService/GetSandbox" => Status::not_found("nope").into_http(),
                "/no.Such/Method" => Status::unimplemented("no such method").into_http(),
                _ => {
                    let body = tonic::body::Body::new(fake::Trailers::ok());
                    http::Response::new(body)
                }
            };
            Ok::<_, std::convert::Infallible>(resp)
        });
        let mut svc = MetricsLayer::new(metrics.clone()).layer(inner);
        let request = |path: &str| http::Request::builder().uri(path).body(()).unwrap();

        svc.call(request("/forkd.v1.SandboxService/GetSandbox"))
            .await
            .unwrap();
        let resp = svc
            .call(request("/forkd.v1.SandboxService/ListSandboxes"))
            .await
            .unwrap();
        let mut body = resp.into_body();
        while let Some(frame) = poll_fn(|cx| Pin::new(&mut body).poll_frame(cx)).await {
            frame.unwrap();
        }
        assert!(body.is_end_stream());
        let stream = svc
            .call(request("/forkd.v1.SandboxService/Exec"))
            .await
            .unwrap();
        drop(stream);
        svc.call(request("/no.Such/Method")).await.unwrap();

        let count = |method: &str, code: Code| {
            metrics
                .requests
                .get(&CallLabels {
                    method: Arc::from(method),
                    code: code_name(code),
                })
                .map(|c| c.get())
        };
        assert_eq!(
            count("forkd.v1.SandboxService/GetSandbox", Code::NotFound),
            Some(1)
        );
        assert_eq!(
            count("forkd.v1.SandboxService/ListSandboxes", Code::Ok),
            Some(1)
        );
        assert_eq!(
            count("forkd.v1.SandboxService/Exec", Code::Cancelled),
            Some(1)
        );
        assert_eq!(count(OTHER_METHOD, Code::Unimplemented), Some(1));
        let mut text = String::new();
        prometheus_client::encoding::prometheus_text::encode(&mut text, &registry).unwrap();
        let series = text
            .lines()
            .filter(|l| l.starts_with("grpc_requests_total{"))
            .count();
        assert_eq!(series, 4, "nothing recorded twice:\n{text}");
        assert!(
            text.lines().any(|l| l
                == "grpc_request_duration_seconds_count\
                    {method=\"forkd.v1.SandboxService/Exec\",code=\"CANCELLED\"} 1"),
            "{text}"
        );
    }

    /// A minimal body: no data, then OK trailers.
    mod fake {
        use super::*;

        pub struct Trailers(Option<http::HeaderMap>);

        impl Trailers {
            pub fn ok() -> Trailers {
                let mut t = http::HeaderMap::new();
                t.insert(GRPC_STATUS, http::HeaderValue::from_static("0"));
                Trailers(Some(t))
            }
        }

        impl Body for Trailers {
            type Data = bytes_like::Bytes;
            type Error = Status;

            fn poll_frame(
                self: Pin<&mut Self>,
                _cx: &mut Context<'_>,
            ) -> Poll<Option<Result<Frame<Self::Data>, Self::Error>>> {
                Poll::Ready(self.get_mut().0.take().map(|t| Ok(Frame::trailers(t))))
            }

            fn is_end_stream(&self) -> bool {
                self.0.is_none()
            }
        }

        /// The data type tonic's body uses.
        pub mod bytes_like {
            pub type Bytes = <tonic::body::Body as http_body::Body>::Data;
        }
    }
}
