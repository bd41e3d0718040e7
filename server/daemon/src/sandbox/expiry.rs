//! Sandbox lifetimes (TTL): the daemon-wide policy (`--default-ttl`,
//! `--max-ttl`), each sandbox's deadline, and the reaper, one task that
//! sleeps until the earliest deadline (woken early when deadlines change)
//! and deletes the sandboxes whose deadline has passed, through the same
//! path as DeleteSandbox. Snapshots are never touched.

use std::collections::BTreeSet;
use std::sync::{Arc, Mutex};
use std::time::{Duration, SystemTime};

use tokio::sync::{watch, Notify};
use tokio::task::{JoinHandle, JoinSet};
use tokio::time::Instant;

use crate::api::error::ApiError;
use crate::metrics::ExpiryMetrics;
use crate::sandbox::lifecycle::Lifecycle;
use crate::sandbox::registry::Sandbox;
use crate::sync::lock;

/// Longest lifetime anyone may ask for, whatever `--max-ttl` says: ten
/// years (keeps every deadline representable).
pub const TTL_LIMIT_SECONDS: u64 = 10 * 365 * 24 * 3600;

/// Why a ttl is refused (INVALID_ARGUMENT).
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum TtlError {
    /// Above the daemon's `--max-ttl`.
    #[error(
        "ttl_seconds={ttl} is above this daemon's maximum lifetime of {max} seconds (--max-ttl {max})"
    )]
    AboveMax {
        /// The ttl asked for, seconds.
        ttl: u64,
        /// `--max-ttl`, seconds.
        max: u64,
    },
    /// Above [`TTL_LIMIT_SECONDS`].
    #[error("ttl_seconds={ttl} is too large: at most {TTL_LIMIT_SECONDS} (ten years)")]
    TooLarge {
        /// The ttl asked for, seconds.
        ttl: u64,
    },
}

impl From<TtlError> for ApiError {
    fn from(e: TtlError) -> ApiError {
        ApiError::InvalidArgument(e.to_string())
    }
}

/// The daemon-wide lifetime rules.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct TtlPolicy {
    /// Lifetime of a sandbox spawned with `ttl_seconds` 0, seconds (0:
    /// none).
    default_secs: u64,
    /// Longest lifetime a request may ask for, seconds (0: no maximum).
    max_secs: u64,
}

impl TtlPolicy {
    /// The rules of `--default-ttl` and `--max-ttl` (0: none); the default
    /// must itself be allowed.
    pub fn new(default_secs: u64, max_secs: u64) -> Result<TtlPolicy, String> {
        let policy = TtlPolicy {
            default_secs: 0,
            max_secs,
        };
        if default_secs > 0 {
            policy.check(default_secs).map_err(|e| match e {
                TtlError::AboveMax { .. } => format!(
                    "--default-ttl {default_secs} is above --max-ttl {max_secs}; lower it or raise --max-ttl"
                ),
                TtlError::TooLarge { .. } => {
                    format!("--default-ttl {default_secs} is above {TTL_LIMIT_SECONDS} (ten years)")
                }
            })?;
        } else if max_secs > TTL_LIMIT_SECONDS {
            return Err(format!(
                "--max-ttl {max_secs} is above {TTL_LIMIT_SECONDS} (ten years)"
            ));
        }
        Ok(TtlPolicy {
            default_secs,
            max_secs,
        })
    }

    /// `--default-ttl`, seconds (0: none).
    pub fn default_secs(&self) -> u64 {
        self.default_secs
    }

    /// `--max-ttl`, seconds (0: no maximum).
    pub fn max_secs(&self) -> u64 {
        self.max_secs
    }

    /// The lifetime SetSandboxTtl asks for: 0 clears it.
    pub fn check(&self, ttl_seconds: u64) -> Result<Option<Duration>, TtlError> {
        if ttl_seconds == 0 {
            return Ok(None);
        }
        if self.max_secs > 0 && ttl_seconds > self.max_secs {
            return Err(TtlError::AboveMax {
                ttl: ttl_seconds,
                max: self.max_secs,
            });
        }
        if ttl_seconds > TTL_LIMIT_SECONDS {
            return Err(TtlError::TooLarge { ttl: ttl_seconds });
        }
        Ok(Some(Duration::from_secs(ttl_seconds)))
    }

    /// The lifetime of a spawned sandbox: 0 means `--default-ttl`.
    pub fn for_spawn(&self, ttl_seconds: u64) -> Result<Option<Duration>, TtlError> {
        match ttl_seconds {
            0 => Ok((self.default_secs > 0).then(|| Duration::from_secs(self.default_secs))),
            ttl => self.check(ttl),
        }
    }
}

/// When a sandbox expires: the instant the reaper waits for, and the wall
/// clock time clients see as `expire_time`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Deadline {
    /// Monotonic: what the reaper sleeps until.
    pub at: Instant,
    /// The same moment on the wall clock.
    pub wall: SystemTime,
}

impl Deadline {
    /// `ttl` from now.
    pub fn after(ttl: Duration) -> Deadline {
        Deadline {
            at: Instant::now() + ttl,
            wall: SystemTime::now() + ttl,
        }
    }

    /// The wall clock time as RFC 3339, for logs.
    pub fn rfc3339(&self) -> String {
        prost_types::Timestamp::from(self.wall).to_string()
    }
}

/// The deadlines the reaper waits for, and the policy they follow.
#[derive(Debug)]
pub struct Expiry {
    policy: TtlPolicy,
    /// (deadline, sandbox id), earliest first. An entry may be stale (the
    /// sandbox's deadline changed or it was deleted): the sandbox's own
    /// deadline decides.
    queue: Mutex<BTreeSet<(Instant, String)>>,
    /// Woken when an earlier deadline than the one slept for may exist.
    changed: Notify,
    metrics: ExpiryMetrics,
}

impl Expiry {
    /// No deadlines yet.
    pub fn new(policy: TtlPolicy, metrics: ExpiryMetrics) -> Arc<Expiry> {
        Arc::new(Expiry {
            policy,
            queue: Mutex::default(),
            changed: Notify::new(),
            metrics,
        })
    }

    /// The lifetime rules.
    pub fn policy(&self) -> TtlPolicy {
        self.policy
    }

    /// Gives a sandbox that just started its lifetime (if any), from now.
    pub fn arm(&self, sandbox: &Sandbox, ttl: Option<Duration>) {
        if let Some(ttl) = ttl {
            // Only fails once DeleteSandbox took it: nothing to expire then.
            if sandbox
                .replace_deadline(Some(Deadline::after(ttl)), false)
                .is_ok()
            {
                self.schedule(sandbox);
            }
        }
    }

    /// SetSandboxTtl: `ttl` from now, or no expiry (`None`).
    /// FAILED_PRECONDITION for a sandbox being deleted or stopped.
    pub fn set(&self, sandbox: &Sandbox, ttl: Option<Duration>) -> Result<(), ApiError> {
        let deadline = ttl.map(Deadline::after);
        sandbox.replace_deadline(deadline, true)?;
        match deadline {
            Some(d) => tracing::info!(
                sandbox = %sandbox.id(),
                expire_time = %d.rfc3339(),
                ttl_secs = ttl.map(|t| t.as_secs()),
                "sandbox lifetime set"
            ),
            None => tracing::info!(sandbox = %sandbox.id(), "sandbox lifetime cleared"),
        }
        self.schedule(sandbox);
        Ok(())
    }

    /// Queues the sandbox's current deadline and wakes the reaper.
    fn schedule(&self, sandbox: &Sandbox) {
        if let Some(d) = sandbox.deadline() {
            lock(&self.queue).insert((d.at, sandbox.id().to_string()));
            self.changed.notify_one();
        }
    }

    /// Takes the entries due at `now`; returns their ids and the next
    /// deadline still queued.
    fn due(&self, now: Instant) -> (Vec<String>, Option<Instant>) {
        let mut queue = lock(&self.queue);
        let mut due = Vec::new();
        while let Some(first) = queue.first() {
            if first.0 > now {
                return (due, Some(first.0));
            }
            let (_, id) = queue.pop_first().expect("not empty");
            due.push(id);
        }
        (due, None)
    }
}

/// The reaper task.
#[derive(Debug)]
pub struct Reaper {
    stop: watch::Sender<bool>,
    task: JoinHandle<()>,
}

impl Reaper {
    /// Starts deleting `lifecycle`'s sandboxes as their deadlines pass.
    pub fn start(expiry: Arc<Expiry>, lifecycle: Arc<Lifecycle>) -> Reaper {
        let (stop, stopped) = watch::channel(false);
        let task = tokio::spawn(reap(expiry, lifecycle, stopped));
        Reaper { stop, task }
    }

    /// Stops the reaper, after the deletes it started have finished.
    pub async fn stop(self) {
        let _ = self.stop.send(true);
        if let Err(e) = self.task.await {
            tracing::error!(error = %e, "expiry task failed");
        }
    }
}

async fn reap(expiry: Arc<Expiry>, lifecycle: Arc<Lifecycle>, mut stopped: watch::Receiver<bool>) {
    let mut deletes = JoinSet::new();
    loop {
        let now = Instant::now();
        let (due, next) = expiry.due(now);
        for id in due {
            let lifecycle = lifecycle.clone();
            let expiry = expiry.clone();
            deletes.spawn(async move {
                let Some((deadline, before)) = lifecycle.expire(&id, now).await else {
                    return; // stale: extended, cleared or deleted since
                };
                expiry.metrics.expired();
                tracing::info!(
                    sandbox = %id,
                    expire_time = %deadline.rfc3339(),
                    late_ms = deadline.at.elapsed().as_millis() as u64,
                    state = before.state().as_str_name(),
                    "sandbox expired and was deleted"
                );
            });
        }
        let sleep = async {
            match next {
                Some(at) => tokio::time::sleep_until(at).await,
                None => std::future::pending().await,
            }
        };
        tokio::select! {
            _ = stopped.changed() => break,
            _ = expiry.changed.notified() => {}
            _ = sleep => {}
            Some(joined) = deletes.join_next(), if !deletes.is_empty() => {
                if let Err(e) = joined {
                    tracing::error!(error = %e, "expiry delete task failed");
                }
            }
        }
    }
    while deletes.join_next().await.is_some() {}
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn policy_defaults_and_bounds() {
        let none = TtlPolicy::new(0, 0).unwrap();
        assert_eq!(none.for_spawn(0), Ok(None));
        assert_eq!(none.for_spawn(5), Ok(Some(Duration::from_secs(5))));
        assert_eq!(none.check(0), Ok(None));
        assert_eq!(
            none.check(TTL_LIMIT_SECONDS + 1),
            Err(TtlError::TooLarge {
                ttl: TTL_LIMIT_SECONDS + 1
            })
        );

        let p = TtlPolicy::new(60, 3600).unwrap();
        assert_eq!(p.for_spawn(0), Ok(Some(Duration::from_secs(60))));
        assert_eq!(p.for_spawn(3600), Ok(Some(Duration::from_secs(3600))));
        let e = p.for_spawn(3601).unwrap_err();
        assert_eq!(
            e.to_string(),
            "ttl_seconds=3601 is above this daemon's maximum lifetime of 3600 seconds (--max-ttl 3600)"
        );
        assert_eq!(ApiError::from(e).code(), tonic::Code::InvalidArgument);
        // SetSandboxTtl 0 clears, whatever the default.
        assert_eq!(p.check(0), Ok(None));
    }

    #[test]
    fn policy_refuses_inconsistent_flags() {
        let e = TtlPolicy::new(120, 60).unwrap_err();
        assert!(
            e.contains("--default-ttl 120") && e.contains("--max-ttl 60"),
            "{e}"
        );
        assert!(TtlPolicy::new(0, TTL_LIMIT_SECONDS + 1).is_err());
        assert!(TtlPolicy::new(TTL_LIMIT_SECONDS + 1, 0).is_err());
    }

    #[tokio::test]
    async fn due_pops_in_deadline_order() {
        let expiry = Expiry::new(TtlPolicy::default(), ExpiryMetrics::default());
        let now = Instant::now();
        {
            let mut q = lock(&expiry.queue);
            q.insert((now + Duration::from_secs(5), "sb-b".into()));
            q.insert((now, "sb-a".into()));
            q.insert((now + Duration::from_secs(1), "sb-c".into()));
        }
        let (due, next) = expiry.due(now);
        assert_eq!(due, ["sb-a"]);
        assert_eq!(next, Some(now + Duration::from_secs(1)));
        let (due, next) = expiry.due(now + Duration::from_secs(10));
        assert_eq!(due, ["sb-c", "sb-b"]);
        assert_eq!(next, None);
    }
}
