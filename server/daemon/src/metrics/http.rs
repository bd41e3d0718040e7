//! The `--metrics-listen` endpoint: plain HTTP/1.1 on its own TCP listener,
//! `GET /metrics` (or HEAD) and nothing else. No token is checked: metrics
//! hold no secrets, and the listener is meant for a loopback or pod-internal
//! address.

use std::convert::Infallible;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use http::{header, Method, Response, StatusCode};
use hyper::server::conn::http1;
use hyper::service::service_fn;
use hyper_util::rt::{TokioIo, TokioTimer};
use prometheus_client::registry::Registry;
use tokio::net::{TcpListener, TcpStream};
use tokio::task::{JoinHandle, JoinSet};

use super::exposition::Format;

/// The one path served.
pub const METRICS_PATH: &str = "/metrics";
/// A client must send its request headers within this time.
const HEADER_TIMEOUT: Duration = Duration::from_secs(10);
/// Pause after a failed `accept` (e.g. out of file descriptors).
const ACCEPT_BACKOFF: Duration = Duration::from_millis(100);

/// The answer to one request.
pub fn respond(
    method: &Method,
    path: &str,
    accept: Option<&str>,
    registry: &Registry,
) -> Response<String> {
    let plain = |status: StatusCode, text: &str| {
        let mut resp = Response::new(format!("{text}\n"));
        *resp.status_mut() = status;
        resp.headers_mut().insert(
            header::CONTENT_TYPE,
            header::HeaderValue::from_static("text/plain; charset=utf-8"),
        );
        resp
    };
    if path != METRICS_PATH {
        return plain(StatusCode::NOT_FOUND, "not found: metrics are at /metrics");
    }
    if method != Method::GET && method != Method::HEAD {
        let mut resp = plain(StatusCode::METHOD_NOT_ALLOWED, "use GET");
        resp.headers_mut()
            .insert(header::ALLOW, header::HeaderValue::from_static("GET, HEAD"));
        return resp;
    }
    let format = Format::negotiate(accept);
    match format.encode(registry) {
        Ok(body) => {
            let mut resp = Response::new(body);
            resp.headers_mut().insert(
                header::CONTENT_TYPE,
                header::HeaderValue::from_static(format.content_type()),
            );
            resp
        }
        Err(e) => {
            tracing::warn!(error = %e, "could not encode metrics");
            plain(
                StatusCode::INTERNAL_SERVER_ERROR,
                "could not encode metrics",
            )
        }
    }
}

/// The running endpoint.
#[derive(Debug)]
pub struct MetricsServer {
    addr: SocketAddr,
    task: JoinHandle<()>,
}

impl MetricsServer {
    /// Binds `addr` and serves `registry` there until [`MetricsServer::stop`].
    #[cfg(test)]
    pub async fn start(addr: SocketAddr, registry: Registry) -> std::io::Result<MetricsServer> {
        Self::serve(TcpListener::bind(addr).await?, registry)
    }

    /// Serves `registry` on `listener` (bound early: the daemon binds every
    /// port before it touches its data directory) until
    /// [`MetricsServer::stop`].
    pub fn serve(listener: TcpListener, registry: Registry) -> std::io::Result<MetricsServer> {
        let addr = listener.local_addr()?;
        let task = tokio::spawn(accept_loop(listener, Arc::new(registry)));
        Ok(MetricsServer { addr, task })
    }

    /// The address it listens on.
    pub fn local_addr(&self) -> SocketAddr {
        self.addr
    }

    /// Closes the listener and every open connection.
    pub async fn stop(self) {
        self.task.abort();
        let _ = self.task.await;
    }
}

/// Most connections the metrics listener holds open at once.
const MAX_CONNECTIONS: usize = 64;

/// Accepts connections until aborted; aborting it drops (and so ends)
/// every connection, since they live in its `JoinSet`.
async fn accept_loop(listener: TcpListener, registry: Arc<Registry>) {
    let mut connections = JoinSet::new();
    loop {
        tokio::select! {
            accepted = listener.accept() => match accepted {
                // Scrapers are few; a flood of them must not take the
                // daemon's file descriptors.
                Ok((stream, peer)) if connections.len() >= MAX_CONNECTIONS => {
                    tracing::debug!(%peer, "metrics listener: {MAX_CONNECTIONS} connections open; closing a new one");
                    drop(stream);
                }
                Ok((stream, _)) => {
                    connections.spawn(serve_connection(stream, registry.clone()));
                }
                Err(e) => {
                    tracing::warn!(error = %e, "metrics listener: accept failed");
                    tokio::time::sleep(ACCEPT_BACKOFF).await;
                }
            },
            Some(_) = connections.join_next(), if !connections.is_empty() => {}
        }
    }
}

async fn serve_connection(stream: TcpStream, registry: Arc<Registry>) {
    let service = service_fn(move |req: http::Request<hyper::body::Incoming>| {
        let accept = req
            .headers()
            .get(header::ACCEPT)
            .and_then(|v| v.to_str().ok());
        let resp = respond(req.method(), req.uri().path(), accept, &registry);
        std::future::ready(Ok::<_, Infallible>(resp))
    });
    let served = http1::Builder::new()
        .timer(TokioTimer::new())
        .header_read_timeout(HEADER_TIMEOUT)
        .serve_connection(TokioIo::new(stream), service)
        .await;
    if let Err(e) = served {
        tracing::debug!(error = %e, "metrics connection ended with an error");
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use tokio::io::{AsyncReadExt, AsyncWriteExt};

    fn registry() -> Registry {
        let mut r = Registry::with_prefix("forkd");
        let c: prometheus_client::metrics::counter::Counter = Default::default();
        c.inc();
        r.register("things", "Things", c);
        r
    }

    #[test]
    fn routes() {
        let r = registry();
        let ok = respond(&Method::GET, "/metrics", None, &r);
        assert_eq!(ok.status(), StatusCode::OK);
        assert_eq!(
            ok.headers()[header::CONTENT_TYPE],
            "text/plain; version=0.0.4; charset=utf-8"
        );
        assert!(ok.body().contains("forkd_things_total 1\n"));
        let om = respond(
            &Method::GET,
            "/metrics",
            Some("application/openmetrics-text"),
            &r,
        );
        assert!(om.headers()[header::CONTENT_TYPE]
            .to_str()
            .unwrap()
            .starts_with("application/openmetrics-text"));
        assert!(om.body().ends_with("# EOF\n"));
        assert_eq!(
            respond(&Method::GET, "/", None, &r).status(),
            StatusCode::NOT_FOUND
        );
        assert_eq!(
            respond(&Method::GET, "/metrics/", None, &r).status(),
            StatusCode::NOT_FOUND
        );
        let post = respond(&Method::POST, "/metrics", None, &r);
        assert_eq!(post.status(), StatusCode::METHOD_NOT_ALLOWED);
        assert_eq!(post.headers()[header::ALLOW], "GET, HEAD");
    }

    async fn get(addr: SocketAddr, path: &str) -> String {
        let mut s = TcpStream::connect(addr).await.unwrap();
        let req = format!("GET {path} HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n");
        s.write_all(req.as_bytes()).await.unwrap();
        let mut out = String::new();
        s.read_to_string(&mut out).await.unwrap();
        out
    }

    #[tokio::test]
    async fn serves_over_tcp_until_stopped() {
        let server = MetricsServer::start("127.0.0.1:0".parse().unwrap(), registry())
            .await
            .unwrap();
        let addr = server.local_addr();
        let ok = get(addr, "/metrics").await;
        assert!(ok.starts_with("HTTP/1.1 200 OK\r\n"), "{ok}");
        assert!(
            ok.contains("\r\n\r\n# HELP forkd_things_total Things.\n"),
            "{ok}"
        );
        let missing = get(addr, "/nope").await;
        assert!(
            missing.starts_with("HTTP/1.1 404 Not Found\r\n"),
            "{missing}"
        );

        // An idle keep-alive connection does not hold the stop up.
        let _idle = TcpStream::connect(addr).await.unwrap();
        tokio::time::timeout(Duration::from_secs(5), server.stop())
            .await
            .unwrap();
        assert!(TcpStream::connect(addr).await.is_err(), "listener closed");
    }
}
