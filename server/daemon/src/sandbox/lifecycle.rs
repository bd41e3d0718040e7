//! Starting and stopping sandboxes: cold boots and forks from a snapshot
//! (bounded in parallel), deletion, and stopping everything at daemon
//! shutdown.

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant, SystemTime};

use tokio::sync::Semaphore;
use tokio::task::JoinSet;

use crate::api::error::{ApiError, BootError};
use crate::data_dir::{DataDir, VMM_LOG};
use crate::sandbox::console::CONSOLE_LOG;
use crate::sandbox::expiry::{Deadline, Expiry};
use crate::sandbox::ids::new_sandbox_id;
use crate::sandbox::image_lookup::Image;
use crate::sandbox::registry::{Registry, Reservation, Sandbox, SandboxSpec};
use crate::vmm::{ClaimSpec, LinuxBoot, RequestError, RestoreSpec, Shape, Vmm, VmmPool, VmmSpec};

/// Most VMMs starting at the same time, across all calls (a claimed
/// standby holds its permit only until the claim is sent).
pub const BOOT_PARALLELISM: usize = 16;
/// Time a reference-guest sandbox gets from VMM start to answering its
/// first ping (a Linux guest gets `--linux-boot-timeout`).
pub const BOOT_TIMEOUT: Duration = Duration::from_secs(30);
/// The kernel command line argument naming the guest's hostname.
pub const HOSTNAME_ARG: &str = "forkd.hostname";
/// Time a VMM gets to exit after `Shutdown` before it is killed.
pub const SHUTDOWN_GRACE: Duration = Duration::from_secs(2);
/// Most bytes of a VMM's log quoted in a boot failure.
const LOG_TAIL_BYTES: usize = 600;

/// A validated spawn request: cold boots, or forks of a snapshot.
#[derive(Debug, Clone)]
pub struct BootPlan {
    /// How many sandboxes.
    pub n: usize,
    /// Guest RAM in MiB.
    pub memory_mib: u32,
    /// vCPUs.
    pub vcpus: u32,
    /// Labels for each sandbox.
    pub labels: HashMap<String, String>,
    /// Recorded as `live_fork`.
    pub live_fork: bool,
    /// Fork from this snapshot instead of booting.
    pub restore: Option<Restore>,
    /// Boot this Linux image instead of the reference guest.
    pub image: Option<Image>,
    /// Lifetime of each sandbox from when it runs; `None`: no expiry.
    pub ttl: Option<Duration>,
    /// RAM is 2 MiB huge pages (asked for a cold boot, or the snapshot's).
    pub huge_pages: bool,
}

/// The snapshot children are forked from.
#[derive(Debug, Clone)]
pub struct Restore {
    /// Its tag (recorded on each child, and its base snapshot).
    pub tag: String,
    /// Its directory in the store.
    pub dir: PathBuf,
    /// Its sealed memory, shared by every child.
    pub memory: Arc<forkd_store::SealedMemory>,
    /// The Linux image its guest booted; `None` for the reference guest.
    pub image: Option<String>,
}

impl BootPlan {
    /// The Linux image the sandboxes run (booted, or their snapshot's).
    pub fn image_name(&self) -> Option<&str> {
        match (&self.image, &self.restore) {
            (Some(image), _) => Some(&image.name),
            (None, Some(restore)) => restore.image.as_deref(),
            (None, None) => None,
        }
    }
}

/// What a spawn call produced.
#[derive(Debug)]
pub struct SpawnOutcome {
    /// Started sandboxes, in request order.
    pub started: Vec<Arc<Sandbox>>,
    /// Failures as (request index, error), in request order.
    pub failures: Vec<(usize, BootError)>,
    /// Wall time of the whole call.
    pub elapsed: Duration,
}

/// How a sandbox's VMM came to be.
enum Started {
    /// A new `forkd-vmm` process.
    Fresh(Arc<Vmm>),
    /// A standby VMM from the pool, claimed for this sandbox.
    Claimed(Arc<Vmm>),
}

/// Owns the sandboxes' processes and directories.
#[derive(Debug)]
pub struct Lifecycle {
    registry: Arc<Registry>,
    data_dir: Arc<DataDir>,
    vmm_path: PathBuf,
    copy_rate_mibps: u64,
    watchdog: Option<Duration>,
    linux_boot_timeout: Duration,
    boot_permits: Semaphore,
    expiry: Arc<Expiry>,
    /// Standby VMMs for children of reference-guest snapshots, if on.
    pool: Option<Arc<VmmPool>>,
}

impl Lifecycle {
    /// A lifecycle starting `vmm_path` for each sandbox, each with LIVE
    /// copies limited to `copy_rate_mibps` (0: unlimited) and watched by a
    /// `watchdog` of that bound (if any); Linux guests get
    /// `linux_boot_timeout` to answer their first ping; lifetimes are kept
    /// by `expiry`; children of reference-guest snapshots start on the
    /// standby VMMs of `pool`, if given.
    #[allow(clippy::too_many_arguments)]
    pub fn new(
        registry: Arc<Registry>,
        data_dir: Arc<DataDir>,
        vmm_path: PathBuf,
        copy_rate_mibps: u64,
        watchdog: Option<Duration>,
        linux_boot_timeout: Duration,
        expiry: Arc<Expiry>,
        pool: Option<Arc<VmmPool>>,
    ) -> Arc<Lifecycle> {
        Arc::new(Lifecycle {
            registry,
            data_dir,
            vmm_path,
            copy_rate_mibps,
            watchdog,
            linux_boot_timeout,
            boot_permits: Semaphore::new(BOOT_PARALLELISM),
            expiry,
            pool,
        })
    }

    /// The registry.
    pub fn registry(&self) -> &Arc<Registry> {
        &self.registry
    }

    /// The sandboxes' lifetimes.
    pub fn expiry(&self) -> &Arc<Expiry> {
        &self.expiry
    }

    /// The directory of sandbox `id` (its VMM's log, a Linux guest's
    /// console).
    pub fn sandbox_dir(&self, id: &str) -> PathBuf {
        self.data_dir.sandbox_dir(id)
    }

    /// Starts `plan.n` sandboxes concurrently (cold boots or forks). Fails
    /// only before any boot starts (over the cap, shutting down);
    /// per-sandbox failures are in the outcome. `start` is when the call
    /// arrived: `elapsed` and each `boot_ms` count from it.
    pub async fn spawn(
        self: &Arc<Self>,
        plan: BootPlan,
        start: Instant,
    ) -> Result<SpawnOutcome, ApiError> {
        let create_time = SystemTime::now();
        if plan.huge_pages && plan.restore.is_none() {
            super::huge_pages::check(plan.n, plan.memory_mib)?;
        }
        let reservation = Arc::new(Mutex::new(self.registry.reserve(plan.n, plan.memory_mib)?));
        let mut tasks = JoinSet::new();
        for index in 0..plan.n {
            let this = self.clone();
            let plan = plan.clone();
            let reservation = reservation.clone();
            tasks.spawn(async move {
                let result = this
                    .boot_one(index, &plan, create_time, start, &reservation)
                    .await;
                (index, result)
            });
        }
        let mut results = Vec::with_capacity(plan.n);
        while let Some(joined) = tasks.join_next().await {
            match joined {
                Ok(r) => results.push(r),
                Err(e) => tracing::error!(error = %e, "boot task failed"),
            }
        }
        results.sort_by_key(|(index, _)| *index);
        let mut outcome = SpawnOutcome {
            started: Vec::new(),
            failures: Vec::new(),
            elapsed: start.elapsed(),
        };
        for (index, result) in results {
            match result {
                Ok(sandbox) => outcome.started.push(sandbox),
                Err(e) => outcome.failures.push((index, e)),
            }
        }
        Ok(outcome)
    }

    async fn boot_one(
        &self,
        index: usize,
        plan: &BootPlan,
        create_time: SystemTime,
        start: Instant,
        reservation: &Mutex<Reservation>,
    ) -> Result<Arc<Sandbox>, BootError> {
        let reserve = || reservation.lock().unwrap_or_else(|e| e.into_inner());
        let permit = self.boot_permits.acquire().await;
        let id = loop {
            let id = new_sandbox_id();
            if !self.registry.contains(&id) {
                break id;
            }
        };
        let dir = self.data_dir.sandbox_dir(&id);
        if let Err(source) = std::fs::create_dir(&dir) {
            reserve().release_one();
            return Err(BootError::SandboxDir { path: dir, source });
        }
        let console_log = dir.join(CONSOLE_LOG);
        let kernel_args = plan
            .image
            .as_ref()
            .map(|image| linux_cmdline(&id, &image.kernel_args));
        let linux = plan
            .image
            .as_ref()
            .zip(kernel_args.as_deref())
            .map(|(image, kernel_args)| LinuxBoot {
                kernel: &image.kernel,
                initrd: &image.initrd,
                kernel_args,
                console_log: &console_log,
            });
        let spec = VmmSpec {
            vmm_path: &self.vmm_path,
            id: &id,
            memory_mib: plan.memory_mib,
            vcpus: plan.vcpus,
            dir: &dir,
            restore: plan.restore.as_ref().map(|r| RestoreSpec {
                dir: &r.dir,
                memory: &r.memory.file,
                console_log: r.image.as_ref().map(|_| console_log.as_path()),
            }),
            copy_rate_mibps: self.copy_rate_mibps,
            watchdog: self.watchdog,
            linux,
            huge_pages: plan.huge_pages,
        };
        let vmm = match self.start_vmm(&spec) {
            Ok(Started::Claimed(vmm)) => {
                // A claimed standby only loads state (about 2 ms): it gives
                // its boot permit back at once, so the next child's claim
                // does not wait for this one's Ready.
                drop(permit);
                vmm
            }
            Ok(Started::Fresh(vmm)) => vmm,
            Err(e) => {
                reserve().release_one();
                remove_dir(&dir);
                return Err(e);
            }
        };
        tracing::debug!(sandbox = %id, pid = vmm.pid(), "VMM started");
        let spec = SandboxSpec {
            id: id.clone(),
            memory_mib: plan.memory_mib,
            vcpus: plan.vcpus,
            labels: plan.labels.clone(),
            create_time,
            live_fork: plan.live_fork,
            snapshot_tag: plan.restore.as_ref().map(|r| r.tag.clone()),
            image: plan.image_name().map(str::to_string),
            huge_pages: plan.huge_pages,
        };
        let inserted = reserve().insert(index, spec, vmm.clone());
        let sandbox = match inserted {
            Ok(sandbox) => sandbox,
            Err(e) => {
                stop_and_remove(&vmm, &dir, Duration::ZERO).await;
                return Err(match e {
                    ApiError::ShuttingDown => BootError::ShuttingDown,
                    other => BootError::Exited {
                        reason: other.to_string(),
                        log: String::new(),
                    },
                });
            }
        };

        let boot_timeout = match plan.image_name() {
            Some(_) => self.linux_boot_timeout,
            None => BOOT_TIMEOUT,
        };
        let booted = tokio::time::timeout(boot_timeout, async {
            vmm.wait_ready().await.map_err(|stop| stop.reason)?;
            vmm.ping().await.map_err(|e| match e {
                RequestError::Stopped(stop) => stop.reason,
                RequestError::Refused(msg) => format!("VMM refused the first ping: {msg}"),
            })
        })
        .await;
        let failure = match booted {
            Ok(Ok(())) => {
                let boot_ms = start.elapsed().as_secs_f64() * 1000.0;
                sandbox.mark_running(boot_ms);
                self.expiry.arm(&sandbox, plan.ttl);
                tracing::info!(sandbox = %id, pid = vmm.pid(), boot_ms, "sandbox running");
                return Ok(sandbox);
            }
            Ok(Err(reason)) => Some(reason),
            Err(_) => None,
        };
        // Did not boot: stop it, quote its log, remove every trace.
        self.registry.remove(&id);
        vmm.kill();
        let _ = tokio::time::timeout(SHUTDOWN_GRACE, vmm.wait_reaped()).await;
        let mut log = log_tail(&dir.join(VMM_LOG));
        // A Linux guest's console says why it hung; a failed stop's reason
        // quotes it already (see `Vmm`).
        if plan.image_name().is_some() && failure.is_none() {
            log.push_str(&crate::sandbox::console::exit_suffix(&dir));
        }
        remove_dir(&dir);
        let err = match failure {
            _ if self.registry.is_closed() => BootError::ShuttingDown,
            Some(reason) => BootError::Exited { reason, log },
            None => BootError::Timeout {
                secs: boot_timeout.as_secs(),
                log,
            },
        };
        tracing::warn!(sandbox = %id, error = %err, "sandbox failed to start");
        Err(err)
    }

    /// Starts the VMM of `spec`: a child of a reference-guest snapshot on
    /// a standby from the pool when one of its shape is ready, any other
    /// (or when the claim fails) as a fresh process.
    fn start_vmm(&self, spec: &VmmSpec<'_>) -> Result<Started, BootError> {
        let pooled = match (&self.pool, &spec.restore) {
            // Standbys reserve 4 KiB-page shapes; a huge-page snapshot's
            // children start fresh (not measured on standbys yet).
            (Some(pool), Some(restore)) if restore.console_log.is_none() && !spec.huge_pages => {
                pool.take(Shape {
                    memory_mib: spec.memory_mib,
                    vcpus: spec.vcpus,
                })
            }
            _ => None,
        };
        if let (Some(standby), Some(restore)) = (pooled, &spec.restore) {
            let pid = standby.pid();
            let claim = ClaimSpec {
                id: spec.id,
                dir: spec.dir,
                restore_dir: restore.dir,
                memory: restore.memory,
                watchdog: spec.watchdog,
            };
            match standby.claim(spec.vmm_path, &claim) {
                Ok(vmm) => return Ok(Started::Claimed(vmm)),
                Err(e) => tracing::warn!(
                    sandbox = %spec.id,
                    standby_pid = pid,
                    error = %e,
                    "claiming a standby VMM failed; starting a fresh one"
                ),
            }
        }
        Vmm::spawn(spec).map(Started::Fresh)
    }

    /// Deletes a sandbox: removes it from the registry, stops its VMM
    /// (Shutdown, then SIGKILL after [`SHUTDOWN_GRACE`]) and removes its
    /// directory. Returns the sandbox as it was before.
    pub async fn delete(&self, id: &str) -> Result<forkd_api::v1::Sandbox, ApiError> {
        let sandbox = self.registry.take_for_delete(id)?;
        Ok(self.stop_taken(&sandbox).await)
    }

    /// Deletes a sandbox whose deadline is at or before `now`, as
    /// [`Lifecycle::delete`] does; `None` if it is gone or its lifetime was
    /// extended or cleared since. Returns the deadline it passed and the
    /// sandbox as it was before.
    pub async fn expire(
        &self,
        id: &str,
        now: tokio::time::Instant,
    ) -> Option<(Deadline, forkd_api::v1::Sandbox)> {
        let (sandbox, deadline) = self.registry.take_expired(id, now)?;
        Some((deadline, self.stop_taken(&sandbox).await))
    }

    /// The rest of a delete once the registry gave the sandbox up: stop
    /// its VMM (Shutdown, then SIGKILL after [`SHUTDOWN_GRACE`]), remove
    /// its directory. Returns the sandbox as it was before.
    async fn stop_taken(&self, sandbox: &Sandbox) -> forkd_api::v1::Sandbox {
        let before = sandbox.to_proto();
        let id = sandbox.id();
        stop_and_remove(&sandbox.vmm, &self.data_dir.sandbox_dir(id), SHUTDOWN_GRACE).await;
        tracing::info!(sandbox = %id, "sandbox deleted");
        before
    }

    /// Stops every sandbox (concurrently) and refuses new ones; then
    /// removes anything left in `<data-dir>/sandboxes`.
    pub async fn shutdown_all(&self) {
        if let Some(pool) = &self.pool {
            pool.close();
        }
        let all = self.registry.close();
        if !all.is_empty() {
            tracing::info!(count = all.len(), "stopping sandboxes");
        }
        let mut tasks = JoinSet::new();
        for sandbox in all {
            let dir = self.data_dir.sandbox_dir(sandbox.id());
            tasks.spawn(async move {
                stop_and_remove(&sandbox.vmm, &dir, SHUTDOWN_GRACE).await;
            });
        }
        while tasks.join_next().await.is_some() {}
        if let Err(e) = self.data_dir.remove_all_sandboxes() {
            tracing::warn!(error = %e, "could not empty the sandboxes directory");
        }
    }
}

/// Stops the VMM (gracefully within `grace`), waits until it is reaped,
/// and removes its directory.
async fn stop_and_remove(vmm: &Vmm, dir: &Path, grace: Duration) {
    vmm.shutdown(grace).await;
    remove_dir(dir);
}

fn remove_dir(dir: &Path) {
    match std::fs::remove_dir_all(dir) {
        Ok(()) => {}
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
        Err(e) => {
            tracing::warn!(dir = %dir.display(), error = %e, "could not remove sandbox directory")
        }
    }
}

/// A Linux guest's kernel command line: its hostname (the sandbox id),
/// then the image's own arguments.
fn linux_cmdline(id: &str, image_args: &str) -> String {
    let image_args = image_args.trim();
    if image_args.is_empty() {
        format!("{HOSTNAME_ARG}={id}")
    } else {
        format!("{HOSTNAME_ARG}={id} {image_args}")
    }
}

/// The end of a VMM log as `"; vmm.log: ..."`, or empty.
fn log_tail(path: &Path) -> String {
    let Ok(bytes) = std::fs::read(path) else {
        return String::new();
    };
    format_log_tail(&bytes)
}

fn format_log_tail(bytes: &[u8]) -> String {
    let text = String::from_utf8_lossy(bytes);
    let text = text.trim();
    if text.is_empty() {
        return String::new();
    }
    let mut start = text.len().saturating_sub(LOG_TAIL_BYTES);
    while !text.is_char_boundary(start) {
        start += 1;
    }
    let tail: Vec<&str> = text[start..]
        .lines()
        .map(str::trim)
        .filter(|l| !l.is_empty())
        .collect();
    format!("; vmm.log: {}", tail.join(" | "))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn linux_cmdline_names_the_sandbox_first() {
        assert_eq!(linux_cmdline("sb-1", ""), "forkd.hostname=sb-1");
        assert_eq!(
            linux_cmdline("sb-1", " quiet loglevel=3 "),
            "forkd.hostname=sb-1 quiet loglevel=3"
        );
    }

    #[test]
    fn log_tails_are_short_and_single_line() {
        assert_eq!(format_log_tail(b""), "");
        assert_eq!(format_log_tail(b"  \n"), "");
        assert_eq!(
            format_log_tail(b"starting\n\nKVM_CREATE_VM failed: ENOMEM\n"),
            "; vmm.log: starting | KVM_CREATE_VM failed: ENOMEM"
        );
        let long = "x".repeat(5000);
        assert!(format_log_tail(long.as_bytes()).len() <= LOG_TAIL_BYTES + 20);
    }
}
