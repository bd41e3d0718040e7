//! The daemon check: `grpc.health.v1.Health/Check` against a running
//! daemon (over TCP or its Unix socket).
//!
//! The overall status (service `""`) decides: SERVING is ok, NOT_SERVING a
//! warning (the daemon is draining). A SERVING server must also know
//! `forkd.v1.SandboxService`, else something other than forkd answers. No
//! token is needed: forkd exempts health from auth.
//!
//! Nothing listening is a failure when `--target` was given, and only a
//! warning for the default target: someone running `forkd doctor` before
//! the first `forkd serve` wants the host checks to pass, with a reminder.
//! Something that accepts the connection but is not a healthy forkd fails
//! either way (on the default address it would also stop `forkd serve`
//! from listening there).

use std::error::Error as StdError;
use std::fmt;
use std::path::PathBuf;
use std::time::{Duration, Instant};

use tonic::transport::{Channel, Endpoint, Uri};
use tonic_health::pb::health_check_response::ServingStatus;
use tonic_health::pb::health_client::HealthClient;
use tonic_health::pb::HealthCheckRequest;

use super::report::Check;

/// Name of this check.
pub const NAME: &str = "daemon";

/// The target when `--target` is not given (`forkd serve`'s `--listen`
/// default).
pub const DEFAULT_TARGET: &str = "127.0.0.1:50051";

/// Bound on connecting.
const CONNECT_TIMEOUT: Duration = Duration::from_secs(2);
/// Bound on each health call.
const CALL_TIMEOUT: Duration = Duration::from_secs(3);
/// A service only forkd serves health for.
const FORKD_SERVICE: &str = "forkd.v1.SandboxService";

/// Where the daemon is.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Target {
    /// `HOST:PORT` (h2c).
    Tcp(String),
    /// A Unix socket path (`forkd serve --listen-unix`).
    Unix(PathBuf),
}

impl fmt::Display for Target {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Target::Tcp(authority) => f.write_str(authority),
            Target::Unix(path) => write!(f, "unix:{}", path.display()),
        }
    }
}

/// A `--target` that cannot be used.
#[derive(Debug, PartialEq, Eq, thiserror::Error)]
pub enum TargetError {
    /// A scheme other than `http` or `unix`.
    #[error(
        "unsupported scheme {0:?}: forkd serves plaintext gRPC; use HOST:PORT, http://HOST:PORT \
         or unix:PATH"
    )]
    Scheme(String),
    /// Not `HOST:PORT`.
    #[error("expected HOST:PORT, http://HOST:PORT or unix:PATH, got {0:?}")]
    Malformed(String),
    /// `unix:` without a path.
    #[error("unix: needs a socket path, e.g. unix:/run/forkd.sock")]
    EmptyPath,
}

/// Parses `--target`: `HOST:PORT`, `http://HOST:PORT[/]`, `unix:PATH` or
/// `unix://PATH`.
pub fn parse_target(s: &str) -> Result<Target, TargetError> {
    if let Some(rest) = s.strip_prefix("unix:") {
        let path = rest.strip_prefix("//").unwrap_or(rest);
        return if path.is_empty() {
            Err(TargetError::EmptyPath)
        } else {
            Ok(Target::Unix(PathBuf::from(path)))
        };
    }
    let authority = match s.split_once("://") {
        Some(("http", rest)) => rest.strip_suffix('/').unwrap_or(rest),
        Some((scheme, _)) => return Err(TargetError::Scheme(scheme.to_owned())),
        None => s,
    };
    let malformed = || TargetError::Malformed(s.to_owned());
    let (host, port) = authority.rsplit_once(':').ok_or_else(malformed)?;
    let bracketed = host.starts_with('[') && host.ends_with(']');
    if host.is_empty() || host.contains('/') || (host.contains(':') && !bracketed) {
        return Err(malformed());
    }
    port.parse::<u16>().map_err(|_| malformed())?;
    Ok(Target::Tcp(authority.to_owned()))
}

/// What the daemon said.
#[derive(Debug, PartialEq)]
pub enum Outcome {
    /// SERVING, and it is forkd; the round trip of the first call.
    Serving(Duration),
    /// NOT_SERVING: draining.
    NotServing,
    /// Nothing accepts connections there.
    Unreachable(String),
    /// Something answers, but not as a healthy forkd.
    Broken(String),
}

/// An error with its sources, `a: b: c`.
fn chain(e: &dyn StdError) -> String {
    let mut s = e.to_string();
    let mut source = e.source();
    while let Some(inner) = source {
        let text = inner.to_string();
        if !s.contains(&text) {
            s += &format!(": {text}");
        }
        source = inner.source();
    }
    s
}

fn status_text(s: &tonic::Status) -> String {
    format!("{:?}: {}", s.code(), s.message())
}

/// Whether anything accepts a connection at `target` (plain socket
/// connect, bounded), so "nothing there" is told apart from "something
/// there that is not forkd".
fn reachable(target: &Target) -> Result<(), String> {
    match target {
        Target::Tcp(authority) => {
            use std::net::{TcpStream, ToSocketAddrs};
            let addrs: Vec<_> = authority
                .to_socket_addrs()
                .map_err(|e| format!("cannot resolve {authority}: {e}"))?
                .collect();
            let mut last = format!("{authority} resolves to no address");
            for addr in addrs {
                match TcpStream::connect_timeout(&addr, CONNECT_TIMEOUT) {
                    Ok(_) => return Ok(()),
                    Err(e) => last = format!("connecting to {addr}: {e}"),
                }
            }
            Err(last)
        }
        Target::Unix(path) => std::os::unix::net::UnixStream::connect(path)
            .map(drop)
            .map_err(|e| format!("connecting to {}: {e}", path.display())),
    }
}

async fn channel(target: &Target) -> Result<Channel, tonic::transport::Error> {
    match target {
        Target::Tcp(authority) => {
            Endpoint::from_shared(format!("http://{authority}"))?
                .connect_timeout(CONNECT_TIMEOUT)
                .timeout(CALL_TIMEOUT)
                .connect()
                .await
        }
        Target::Unix(path) => {
            let path = path.clone();
            // h2 under tonic rejects a socket path as authority: send
            // `localhost` (see DESIGN.md, "Serving").
            Endpoint::from_static("http://localhost")
                .connect_timeout(CONNECT_TIMEOUT)
                .timeout(CALL_TIMEOUT)
                .connect_with_connector(tower::service_fn(move |_: Uri| {
                    let path = path.clone();
                    async move {
                        let stream = tokio::net::UnixStream::connect(path).await?;
                        Ok::<_, std::io::Error>(hyper_util::rt::TokioIo::new(stream))
                    }
                }))
                .await
        }
    }
}

async fn ask(target: &Target) -> Outcome {
    let channel = match channel(target).await {
        Ok(c) => c,
        Err(e) => return Outcome::Broken(format!("gRPC connection failed: {}", chain(&e))),
    };
    let mut client = HealthClient::new(channel);
    let started = Instant::now();
    let overall = match client
        .check(HealthCheckRequest {
            service: String::new(),
        })
        .await
    {
        Ok(r) => r.into_inner().status(),
        Err(s) => {
            return Outcome::Broken(format!(
                "grpc.health.v1.Health/Check failed: {}",
                status_text(&s)
            ))
        }
    };
    let rtt = started.elapsed();
    match overall {
        ServingStatus::Serving => {}
        ServingStatus::NotServing => return Outcome::NotServing,
        other => return Outcome::Broken(format!("grpc.health.v1 reports {}", other.as_str_name())),
    }
    match client
        .check(HealthCheckRequest {
            service: FORKD_SERVICE.into(),
        })
        .await
    {
        Ok(r) if r.get_ref().status() == ServingStatus::Serving => Outcome::Serving(rtt),
        Ok(r) => Outcome::Broken(format!(
            "SERVING overall, but {FORKD_SERVICE} is {}",
            r.into_inner().status().as_str_name()
        )),
        Err(s) if s.code() == tonic::Code::NotFound => Outcome::Broken(format!(
            "a gRPC server answers, but it has no {FORKD_SERVICE}: not a forkd daemon"
        )),
        Err(s) => Outcome::Broken(format!("health of {FORKD_SERVICE}: {}", status_text(&s))),
    }
}

/// Health-checks `target`.
pub fn probe(target: &Target) -> Outcome {
    if let Err(e) = reachable(target) {
        return Outcome::Unreachable(e);
    }
    let runtime = match tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
    {
        Ok(rt) => rt,
        Err(e) => return Outcome::Broken(format!("cannot start a tokio runtime: {e}")),
    };
    runtime.block_on(ask(target))
}

/// Turns an outcome into the check; `explicit` says whether `--target`
/// was given.
pub fn judge(target: &Target, explicit: bool, outcome: Outcome) -> Check {
    let c = match outcome {
        Outcome::Serving(rtt) => Check::ok(
            NAME,
            format!(
                "forkd at {target} is SERVING (health check answered in {:.1} ms)",
                rtt.as_secs_f64() * 1e3
            ),
        )
        .with("serving_status", "SERVING")
        .with("rtt_ms", (rtt.as_secs_f64() * 1e5).round() / 100.0),
        Outcome::NotServing => Check::warn(
            NAME,
            format!("forkd at {target} is NOT_SERVING: it is draining (shutting down)"),
            "it refuses new calls until it exits; start it again once it has stopped, or point \
             clients at another instance",
        )
        .with("serving_status", "NOT_SERVING"),
        Outcome::Unreachable(why) if explicit => Check::fail(
            NAME,
            format!("no daemon at {target} ({why})"),
            "start it (`forkd serve`, with --listen/--listen-unix matching --target) or fix \
             --target",
        ),
        Outcome::Unreachable(why) => Check::warn(
            NAME,
            format!("no daemon answers at the default {target} ({why})"),
            "start one with `forkd serve` and run doctor again; give --target ADDR for a daemon \
             elsewhere, or --no-daemon to skip this check",
        ),
        Outcome::Broken(why) => Check::fail(
            NAME,
            format!("{target}: {why}"),
            if explicit {
                "check that --target points at forkd (its --listen or --listen-unix address); \
                 a forkd without a token closes connections from local users other than its \
                 own and root: run doctor as the daemon's user, or start it with --allow-uid"
            } else {
                "something other than a healthy forkd holds the default address, so `forkd \
                 serve` could not listen there: stop it, or use another --listen (and --target); \
                 if it is forkd run by another user, it closes connections from users other than \
                 its own and root (no token): run doctor as that user, or start it with \
                 --allow-uid"
            },
        ),
    };
    c.with("target", target.to_string())
        .with("target_explicit", explicit)
}

/// The check.
pub fn check(target: &Target, explicit: bool) -> Check {
    judge(target, explicit, probe(target))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::doctor::report::Status;

    #[test]
    fn targets() {
        let tcp = |s: &str| Ok(Target::Tcp(s.into()));
        assert_eq!(parse_target("127.0.0.1:50051"), tcp("127.0.0.1:50051"));
        assert_eq!(parse_target("http://localhost:7/"), tcp("localhost:7"));
        assert_eq!(parse_target("[::1]:50051"), tcp("[::1]:50051"));
        assert_eq!(
            parse_target("unix:/run/forkd.sock"),
            Ok(Target::Unix("/run/forkd.sock".into()))
        );
        assert_eq!(
            parse_target("unix:///run/forkd.sock"),
            Ok(Target::Unix("/run/forkd.sock".into()))
        );
        assert_eq!(parse_target("unix:"), Err(TargetError::EmptyPath));
        assert!(matches!(
            parse_target("https://h:1"),
            Err(TargetError::Scheme(s)) if s == "https"
        ));
        for bad in ["localhost", ":50051", "h:port", "h:70000", "::1:5", "h/x:1"] {
            assert!(
                matches!(parse_target(bad), Err(TargetError::Malformed(_))),
                "{bad}"
            );
        }
        assert_eq!(
            Target::Unix("/s".into()).to_string(),
            "unix:/s",
            "shown as given"
        );
    }

    #[test]
    fn outcomes() {
        let t = Target::Tcp(DEFAULT_TARGET.into());
        let c = judge(&t, false, Outcome::Serving(Duration::from_micros(1500)));
        assert_eq!(c.status, Status::Ok);
        assert_eq!(c.details["serving_status"], "SERVING");
        assert_eq!(judge(&t, true, Outcome::NotServing).status, Status::Warn);
        let refused = || Outcome::Unreachable("connection refused".into());
        assert_eq!(judge(&t, false, refused()).status, Status::Warn);
        let c = judge(&t, true, refused());
        assert_eq!(c.status, Status::Fail);
        assert!(c.hint.unwrap().contains("forkd serve"));
        let c = judge(&t, false, Outcome::Broken("not forkd".into()));
        assert_eq!(c.status, Status::Fail);
        assert!(c.hint.unwrap().contains("default address"));
    }

    #[test]
    fn nothing_listening() {
        // A port nothing listens on: bind, note it, close.
        let port = std::net::TcpListener::bind("127.0.0.1:0")
            .unwrap()
            .local_addr()
            .unwrap()
            .port();
        let t = Target::Tcp(format!("127.0.0.1:{port}"));
        assert!(matches!(probe(&t), Outcome::Unreachable(_)));
        let t = Target::Unix("/nonexistent/forkd.sock".into());
        assert!(matches!(probe(&t), Outcome::Unreachable(_)));
    }

    #[test]
    fn not_grpc() {
        // Something that accepts and hangs up: not forkd.
        let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        let addr = listener.local_addr().unwrap();
        let server = std::thread::spawn(move || {
            for stream in listener.incoming().take(2) {
                drop(stream);
            }
        });
        let outcome = probe(&Target::Tcp(addr.to_string()));
        assert!(matches!(outcome, Outcome::Broken(_)), "{outcome:?}");
        drop(server);
    }
}
