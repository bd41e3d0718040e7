//! Bearer-token authentication: a tower layer in front of every service.
//!
//! When a token is configured, every call except health checks and server
//! reflection must carry `authorization: Bearer <token>`; the comparison
//! takes the same time wherever the first differing byte is. Health stays
//! open for mesh and Kubernetes probes; reflection only describes the public
//! API (the same .proto files as this repository), and leaving it open lets
//! grpcurl resolve `grpc.health.v1.Health/Check` without a token.

use std::future::Future;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};

use http::HeaderValue;
use subtle::ConstantTimeEq;
use tonic::Status;
use tower::{Layer, Service};

/// Path prefix of the health service, which needs no token.
pub const HEALTH_PREFIX: &str = "/grpc.health.v1.Health/";
/// Path prefixes of server reflection (v1 and v1alpha), which need no token.
pub const REFLECTION_PREFIXES: [&str; 2] = [
    "/grpc.reflection.v1.ServerReflection/",
    "/grpc.reflection.v1alpha.ServerReflection/",
];

/// The configured secret. Its `Debug` output never shows the token.
#[derive(Clone)]
pub struct BearerToken(Vec<u8>);

impl std::fmt::Debug for BearerToken {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("BearerToken(<redacted>)")
    }
}

impl BearerToken {
    /// A token from configuration text (trimmed); `None` when blank.
    pub fn new(text: &str) -> Option<BearerToken> {
        let t = text.trim();
        (!t.is_empty()).then(|| BearerToken(t.as_bytes().to_vec()))
    }

    /// Whether `candidate` is this token, in constant time for equal
    /// lengths.
    pub fn matches(&self, candidate: &[u8]) -> bool {
        self.0.ct_eq(candidate).into()
    }
}

/// Whether a gRPC method path is exempt from authentication.
pub fn is_exempt(path: &str) -> bool {
    path.starts_with(HEALTH_PREFIX) || REFLECTION_PREFIXES.iter().any(|p| path.starts_with(p))
}

/// Checks an `authorization` header value against `token`.
pub fn check(token: &BearerToken, header: Option<&HeaderValue>) -> Result<(), Status> {
    let Some(value) = header else {
        return Err(Status::unauthenticated(
            "missing credentials: send metadata `authorization: Bearer <token>`",
        ));
    };
    let presented = value
        .as_bytes()
        .split_first_chunk::<7>()
        .filter(|(scheme, _)| scheme.eq_ignore_ascii_case(b"bearer "))
        .map(|(_, rest)| rest.trim_ascii());
    match presented {
        None => Err(Status::unauthenticated(
            "malformed authorization metadata: send `authorization: Bearer <token>`",
        )),
        Some(candidate) if token.matches(candidate) => Ok(()),
        Some(_) => Err(Status::unauthenticated(
            "invalid bearer token: send metadata `authorization: Bearer <token>` with the \
             token configured on the daemon (--token-file or FORKD_TOKEN)",
        )),
    }
}

/// Layer that enforces the token (a no-op without one).
#[derive(Clone, Debug)]
pub struct AuthLayer {
    token: Option<Arc<BearerToken>>,
}

impl AuthLayer {
    /// A layer requiring `token`, or letting everything through if `None`.
    pub fn new(token: Option<BearerToken>) -> AuthLayer {
        AuthLayer {
            token: token.map(Arc::new),
        }
    }
}

impl<S> Layer<S> for AuthLayer {
    type Service = AuthService<S>;

    fn layer(&self, inner: S) -> AuthService<S> {
        AuthService {
            inner,
            token: self.token.clone(),
        }
    }
}

/// The service built by [`AuthLayer`].
#[derive(Clone, Debug)]
pub struct AuthService<S> {
    inner: S,
    token: Option<Arc<BearerToken>>,
}

/// Boxed response future of the layers in this crate.
pub type BoxFuture<T, E> = Pin<Box<dyn Future<Output = Result<T, E>> + Send + 'static>>;

impl<S, B> Service<http::Request<B>> for AuthService<S>
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
        if let Some(token) = &self.token {
            if !is_exempt(req.uri().path()) {
                if let Err(status) = check(token, req.headers().get(http::header::AUTHORIZATION)) {
                    tracing::debug!(path = req.uri().path(), "rejected unauthenticated call");
                    return Box::pin(std::future::ready(Ok(status.into_http())));
                }
            }
        }
        Box::pin(self.inner.call(req))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use tonic::Code;

    fn token() -> BearerToken {
        BearerToken::new("  s3cret\n").unwrap()
    }

    #[test]
    fn blank_tokens_are_rejected() {
        assert!(BearerToken::new("").is_none());
        assert!(BearerToken::new(" \n\t").is_none());
        assert_eq!(format!("{:?}", token()), "BearerToken(<redacted>)");
    }

    #[test]
    fn compare() {
        let t = token();
        assert!(t.matches(b"s3cret"));
        assert!(!t.matches(b"s3cre"));
        assert!(!t.matches(b"s3cret!"));
        assert!(!t.matches(b"S3cret"));
        assert!(!t.matches(b""));
    }

    #[test]
    fn header_check() {
        let t = token();
        let ok = |v: &str| check(&t, Some(&HeaderValue::from_str(v).unwrap()));
        assert!(ok("Bearer s3cret").is_ok());
        assert!(ok("bearer s3cret").is_ok());
        assert!(ok("BEARER  s3cret ").is_ok());
        let err = ok("Bearer nope").unwrap_err();
        assert_eq!(err.code(), Code::Unauthenticated);
        assert!(err.message().contains("authorization: Bearer <token>"));
        assert!(ok("Basic s3cret").is_err());
        assert!(ok("s3cret").is_err());
        let missing = check(&t, None).unwrap_err();
        assert_eq!(missing.code(), Code::Unauthenticated);
        assert!(missing.message().contains("authorization: Bearer <token>"));
    }

    #[test]
    fn only_health_and_reflection_are_exempt() {
        assert!(is_exempt("/grpc.health.v1.Health/Check"));
        assert!(is_exempt("/grpc.health.v1.Health/Watch"));
        assert!(is_exempt(
            "/grpc.reflection.v1.ServerReflection/ServerReflectionInfo"
        ));
        assert!(is_exempt(
            "/grpc.reflection.v1alpha.ServerReflection/ServerReflectionInfo"
        ));
        assert!(!is_exempt("/forkd.v1.SandboxService/ListSandboxes"));
        assert!(!is_exempt("/forkd.v1.SnapshotService/GetSnapshot"));
        assert!(!is_exempt("/grpc.health.v1.HealthX/Check"));
    }
}
