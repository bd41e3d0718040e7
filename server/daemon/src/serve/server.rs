//! Wires the services together, serves them on TCP and (optionally) a Unix
//! socket, and runs the shutdown sequence on SIGTERM/SIGINT.

use std::path::Path;
use std::sync::Arc;

use forkd_api::v1::sandbox_service_server::SandboxServiceServer;
use forkd_api::v1::snapshot_service_server::SnapshotServiceServer;
use tokio::net::{TcpListener, UnixListener};
use tokio::signal::unix::{signal, Signal, SignalKind};
use tokio::task::JoinSet;
use tonic::transport::Server;

use crate::api::error::{CancelReason, StartupError};
use crate::api::sandbox_service::{LinuxGuests, Sandboxes};
use crate::api::snapshot_service::SnapshotApi;
use crate::api::validate::{DEFAULT_MEMORY_MIB, DEFAULT_VCPUS};
use crate::config::Config;
use crate::data_dir::DataDir;
use crate::metrics::{Metrics, MetricsLayer, MetricsServer};
use crate::sandbox::expiry::{Expiry, Reaper};
use crate::sandbox::files::reset::ResetLayer;
use crate::sandbox::image_lookup::Images;
use crate::sandbox::lifecycle::Lifecycle;
use crate::sandbox::registry::Registry;
use crate::serve::auth::AuthLayer;
use crate::serve::connections::{self, AcceptGate, CallLayer, ConnTable};
use crate::serve::drain::{Drain, DrainLayer};
use crate::serve::peer::LocalUsers;
use crate::snapshot::store::Snapshots;
use crate::vmm::{Shape, VmmPool};

/// Bound on waiting at shutdown for cancelled LIVE copies to end (each
/// ends within `live_copy::CANCEL_WAIT`, or its VMM is killed).
const COPY_CANCEL_WAIT: std::time::Duration = std::time::Duration::from_secs(20);

/// Encoded descriptor sets of every service served: reflection describes
/// them, and the metrics take their method names from them.
const DESCRIPTOR_SETS: [&[u8]; 4] = [
    forkd_api::FILE_DESCRIPTOR_SET,
    tonic_health::pb::FILE_DESCRIPTOR_SET,
    tonic_reflection::pb::v1::FILE_DESCRIPTOR_SET,
    tonic_reflection::pb::v1alpha::FILE_DESCRIPTOR_SET,
];

/// HTTP/2 keepalive: how often an idle connection is pinged, and how long
/// the answer may take before the connection is closed.
const HTTP2_KEEPALIVE_INTERVAL: std::time::Duration = std::time::Duration::from_secs(30);
const HTTP2_KEEPALIVE_TIMEOUT: std::time::Duration = std::time::Duration::from_secs(20);
/// Most calls in flight on one connection.
const MAX_STREAMS_PER_CONNECTION: u32 = 256;

/// The configured connection limits, with `--max-connections` lowered if
/// the listeners together could take more than half the fd limit.
fn connection_limits(config: &Config) -> connections::Limits {
    let mut limits = config.connections;
    let listeners = 1 + usize::from(config.listen_unix.is_some());
    match crate::rlimit::nofile() {
        Ok(nofile) => {
            let budget = crate::rlimit::connection_budget(nofile, listeners);
            if limits.max_connections > budget {
                tracing::warn!(
                    asked = limits.max_connections,
                    using = budget,
                    nofile,
                    "--max-connections lowered so that connections take at most half of RLIMIT_NOFILE"
                );
                limits.max_connections = budget;
            }
        }
        Err(e) => tracing::warn!(error = %e, "cannot read RLIMIT_NOFILE"),
    }
    limits
}

/// SIGTERM and SIGINT.
struct Signals {
    term: Signal,
    int: Signal,
}

impl Signals {
    fn install() -> Result<Signals, StartupError> {
        Ok(Signals {
            term: signal(SignalKind::terminate()).map_err(StartupError::Signals)?,
            int: signal(SignalKind::interrupt()).map_err(StartupError::Signals)?,
        })
    }

    /// Waits for either signal; returns its name.
    async fn recv(&mut self) -> &'static str {
        tokio::select! {
            _ = self.term.recv() => "SIGTERM",
            _ = self.int.recv() => "SIGINT",
        }
    }
}

/// Runs the daemon until a signal (or a fatal server error) and a complete
/// shutdown.
pub async fn run(config: Config) -> Result<(), StartupError> {
    // Check and bind before creating anything: a daemon that cannot serve
    // leaves no data directory behind.
    DataDir::check(&config.data_dir)?;
    let tcp = TcpListener::bind(config.listen)
        .await
        .map_err(|source| StartupError::Listen {
            addr: config.listen.to_string(),
            source,
        })?;
    let metrics_listener = match config.metrics_listen {
        Some(addr) => {
            Some(
                TcpListener::bind(addr)
                    .await
                    .map_err(|source| StartupError::Listen {
                        addr: addr.to_string(),
                        source,
                    })?,
            )
        }
        None => None,
    };
    if let Some(path) = &config.listen_unix {
        check_unix_path(path)?;
    }
    let data_dir = Arc::new(DataDir::open(&config.data_dir)?);
    crate::api::public::set_data_dir(&config.data_dir, data_dir.root());
    let mut metrics = Metrics::new(&DESCRIPTOR_SETS)
        .map_err(|e| StartupError::Config(format!("metrics: {e}")))?;
    let (snapshots, report) = Snapshots::open(&data_dir.snapshots(), metrics.branch.clone())?;
    log_recovery(&report);
    let registry = Registry::new(config.max_sandboxes, config.max_guest_memory_mib);
    let expiry = Expiry::new(config.ttl, metrics.expiry.clone());
    let pool = (config.vmm_pool > 0).then(|| {
        let pool = VmmPool::new(
            config.vmm_path.clone(),
            data_dir.pool(),
            config.live_copy_rate_mibps,
            config.vmm_pool,
            Shape {
                memory_mib: DEFAULT_MEMORY_MIB,
                vcpus: DEFAULT_VCPUS,
            },
            metrics.pool.clone(),
        );
        pool.run();
        pool
    });
    let lifecycle = Lifecycle::new(
        registry,
        data_dir.clone(),
        config.vmm_path.clone(),
        config.live_copy_rate_mibps,
        config.vmm_watchdog,
        config.linux_boot_timeout,
        expiry.clone(),
        pool,
    );
    let reaper = Reaper::start(expiry, lifecycle.clone());
    let linux = Arc::new(LinuxGuests {
        images: Images::new(config.images_dir.clone()),
        host: config.linux_host,
    });
    if config.linux_host.assumed() {
        tracing::warn!(
            env = crate::sandbox::linux_host::ASSUME_ENV,
            backend = config.linux_host.backend().map(|b| b.id()),
            "hypervisor taken from the environment, not detected: for forkd's own tests only"
        );
    }
    match config.linux_host.check() {
        Ok(()) => tracing::info!(
            images_dir = %config.images_dir.display(),
            backend = config.linux_host.backend().map(|b| b.id()),
            "Linux guests enabled"
        ),
        Err(e) => tracing::info!(reason = %e, "Linux guests disabled"),
    }
    metrics.observe_state(lifecycle.registry().clone(), snapshots.clone());
    let mut signals = Signals::install()?;

    let (health_reporter, health_service) = tonic_health::server::health_reporter();
    let drain = Drain::new(health_reporter);
    drain.set_serving().await;

    // Both reflection versions describe every service, both reflection
    // services included, so `list` shows the same through either.
    let reflection = || {
        DESCRIPTOR_SETS.iter().fold(
            tonic_reflection::server::Builder::configure().include_reflection_service(false),
            |builder, set| builder.register_encoded_file_descriptor_set(set),
        )
    };
    let reflection_err =
        |e: tonic_reflection::server::Error| StartupError::Config(format!("reflection: {e}"));
    let reflection_v1 = reflection().build_v1().map_err(reflection_err)?;
    let reflection_v1alpha = reflection().build_v1alpha().map_err(reflection_err)?;

    let router = Server::builder()
        // Dead peers: a ping every 30 s, closed if unanswered in 20 s.
        .http2_keepalive_interval(Some(HTTP2_KEEPALIVE_INTERVAL))
        .http2_keepalive_timeout(Some(HTTP2_KEEPALIVE_TIMEOUT))
        // Bounds what one connection can make the daemon hold.
        .max_concurrent_streams(Some(MAX_STREAMS_PER_CONNECTION))
        .layer(MetricsLayer::new(metrics.rpc.clone()))
        .layer(CallLayer)
        .layer(DrainLayer::new(drain.clone()))
        .layer(AuthLayer::new(config.token.clone()))
        // Innermost: a request stream's reset is noted for WriteFile.
        .layer(ResetLayer)
        .add_service(health_service)
        .add_service(reflection_v1)
        .add_service(reflection_v1alpha)
        .add_service(SandboxServiceServer::new(Sandboxes::new(
            lifecycle.clone(),
            snapshots.clone(),
            linux.clone(),
        )))
        .add_service(SnapshotServiceServer::new(SnapshotApi::new(
            lifecycle.clone(),
            snapshots.clone(),
            linux,
        )));

    let mut servers: JoinSet<(String, Result<(), tonic::transport::Error>)> = JoinSet::new();

    let gate = match config.token {
        Some(_) => AcceptGate::Anyone,
        None => AcceptGate::LocalUsers(LocalUsers::new(&config.allow_uids)),
    };
    let limits = connection_limits(&config);
    let trimmer = tokio::spawn(connections::trim::run());

    let tcp_addr = tcp
        .local_addr()
        .map(|a| a.to_string())
        .unwrap_or_else(|_| config.listen.to_string());
    let tcp_table = ConnTable::new("tcp", limits, metrics.conn.clone());
    let incoming = connections::tcp_incoming(tcp, tcp_table, gate.clone());
    let serve = router
        .clone()
        .serve_with_incoming_shutdown(incoming, drain.stopped());
    let name = tcp_addr.clone();
    servers.spawn(async move { (name, serve.await) });

    let unix_path = match &config.listen_unix {
        Some(path) => {
            let listener = bind_unix(path, !config.allow_uids.is_empty())?;
            let table = ConnTable::new("unix", limits, metrics.conn.clone());
            let incoming = connections::unix_incoming(listener, table, gate.clone());
            let serve = router.serve_with_incoming_shutdown(incoming, drain.stopped());
            let name = format!("unix:{}", path.display());
            servers.spawn(async move { (name, serve.await) });
            Some(path.clone())
        }
        None => None,
    };

    // Plain HTTP on its own listener; up until the very end, so the drain
    // can be watched.
    let metrics_server = match (metrics_listener, config.metrics_listen) {
        (Some(listener), Some(addr)) => Some(
            MetricsServer::serve(listener, metrics.into_registry()).map_err(|source| {
                StartupError::Listen {
                    addr: addr.to_string(),
                    source,
                }
            })?,
        ),
        _ => None,
    };

    tracing::info!(
        listen = %tcp_addr,
        listen_unix = ?unix_path,
        metrics_listen = ?metrics_server.as_ref().map(MetricsServer::local_addr),
        data_dir = %data_dir.root().display(),
        vmm = %config.vmm_path.display(),
        auth = if config.token.is_some() { "token" } else { "local users" },
        allowed_uids = ?match &gate {
            AcceptGate::LocalUsers(users) => users.ids().to_vec(),
            AcceptGate::Anyone => Vec::new(),
        },
        max_connections = limits.max_connections,
        idle_timeout_secs = limits.idle_timeout.as_secs(),
        first_call_timeout_secs = limits.first_call_timeout.as_secs(),
        max_guest_memory_mib = config.max_guest_memory_mib,
        vmm_watchdog_secs = config.vmm_watchdog.map(|d| d.as_secs()).unwrap_or(0),
        max_sandboxes = config.max_sandboxes,
        live_copy_rate_mibps = config.live_copy_rate_mibps,
        default_ttl_secs = config.ttl.default_secs(),
        max_ttl_secs = config.ttl.max_secs(),
        "forkd serving"
    );

    let mut failure = None;
    tokio::select! {
        name = signals.recv() => tracing::info!(signal = name, "shutting down"),
        Some(joined) = servers.join_next() => {
            failure = Some(server_failure(joined));
            tracing::error!(error = %failure.as_ref().expect("set"), "a server stopped; shutting down");
        }
    }

    // 1. Health NOT_SERVING; new calls get UNAVAILABLE.
    drain.start().await;
    // 2. Let load balancers notice.
    if !config.drain_grace.is_zero() {
        tracing::info!(
            secs = config.drain_grace.as_secs(),
            "draining before closing listeners"
        );
        tokio::select! {
            _ = tokio::time::sleep(config.drain_grace) => {}
            name = signals.recv() => tracing::warn!(signal = name, "second signal; skipping the drain grace"),
        }
    }
    // 3. Stop accepting; let in-flight calls and LIVE copies finish,
    //    within the timeout.
    drain.stop_listeners();
    tracing::info!(
        in_flight = drain.in_flight(),
        "listeners closed; waiting for in-flight calls and snapshot copies"
    );
    let finish = async {
        while let Some(joined) = servers.join_next().await {
            if let Err(e) = server_failure(joined).into_result() {
                tracing::warn!(error = %e, "server ended with an error");
            }
        }
        snapshots.wait_idle().await;
    };
    tokio::select! {
        _ = tokio::time::timeout(config.shutdown_timeout, finish) => {}
        name = signals.recv() => tracing::warn!(signal = name, "second signal; not waiting for in-flight calls"),
    }
    if !servers.is_empty() {
        tracing::warn!(
            in_flight = drain.in_flight(),
            timeout_secs = config.shutdown_timeout.as_secs(),
            "in-flight calls did not finish in time; abandoning them"
        );
        servers.abort_all();
    }
    // 4. No more expiries (deletes it started finish first); cancel the
    //    LIVE copies still running (they end FAILED), then stop every VMM
    //    and remove their directories.
    reaper.stop().await;
    let copies = snapshots.cancel_all(CancelReason::ShuttingDown);
    if copies > 0 {
        tracing::warn!(copies, "cancelling live snapshot copies still running");
        if tokio::time::timeout(COPY_CANCEL_WAIT, snapshots.wait_idle())
            .await
            .is_err()
        {
            tracing::warn!("snapshots still being written; stopping the VMMs anyway");
        }
    }
    lifecycle.shutdown_all().await;
    if let Some(path) = unix_path {
        let _ = std::fs::remove_file(path);
    }
    if let Some(server) = metrics_server {
        server.stop().await;
    }
    trimmer.abort();
    tracing::info!("forkd stopped");
    match failure {
        Some(ServerEnd::Failed(e)) => Err(e),
        _ => Ok(()),
    }
}

/// Logs what opening the snapshot store found.
fn log_recovery(report: &forkd_store::RecoveryReport) {
    tracing::info!(
        ready = report.ready.len(),
        failed = report.failed.len(),
        "snapshot store opened"
    );
    for (tag, reason) in &report.marked_failed {
        tracing::warn!(%tag, %reason, "snapshot marked FAILED at recovery (its files are kept)");
    }
    for (tag, why) in &report.broken_chains {
        tracing::warn!(%tag, chain = %why, "snapshot READY but its chain is broken; it cannot be spawned from");
    }
    for name in &report.removed {
        tracing::info!(%name, "removed a leftover from an interrupted snapshot operation");
    }
    for name in &report.ignored {
        tracing::warn!(%name, "not a snapshot of this format; left alone");
    }
}

enum ServerEnd {
    Clean,
    Failed(StartupError),
}

impl ServerEnd {
    fn into_result(self) -> Result<(), StartupError> {
        match self {
            ServerEnd::Clean => Ok(()),
            ServerEnd::Failed(e) => Err(e),
        }
    }
}

impl std::fmt::Display for ServerEnd {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            ServerEnd::Clean => f.write_str("server stopped"),
            ServerEnd::Failed(e) => e.fmt(f),
        }
    }
}

fn server_failure(
    joined: Result<(String, Result<(), tonic::transport::Error>), tokio::task::JoinError>,
) -> ServerEnd {
    match joined {
        Ok((_, Ok(()))) => ServerEnd::Clean,
        Ok((addr, Err(e))) => ServerEnd::Failed(StartupError::Serve {
            addr,
            message: e.to_string(),
        }),
        Err(e) => ServerEnd::Failed(StartupError::Serve {
            addr: "?".into(),
            message: e.to_string(),
        }),
    }
}

/// Checks, before anything is created, that the Unix socket can be made at
/// `path`: its directory exists, and `path` is not a file of another kind.
fn check_unix_path(path: &Path) -> Result<(), StartupError> {
    use std::os::unix::fs::FileTypeExt;
    let parent = match path.parent() {
        Some(p) if !p.as_os_str().is_empty() => p,
        _ => Path::new("."),
    };
    if !parent.is_dir() {
        return Err(StartupError::Config(format!(
            "--listen-unix {}: {} is not a directory",
            path.display(),
            parent.display()
        )));
    }
    match std::fs::symlink_metadata(path) {
        Ok(meta) if !meta.file_type().is_socket() => Err(StartupError::Config(format!(
            "--listen-unix {} exists and is not a socket; remove it or pick another path",
            path.display()
        ))),
        _ => Ok(()),
    }
}

/// Binds the Unix socket, replacing a stale socket file but never a live
/// server's socket or a non-socket file. The socket is 0600 (only the
/// daemon's user and root can connect), or 0666 when other users are
/// allowed (`open`), the peer check then deciding.
fn bind_unix(path: &Path, open: bool) -> Result<UnixListener, StartupError> {
    use std::os::unix::fs::FileTypeExt;
    let listen_err = |source| StartupError::Listen {
        addr: format!("unix:{}", path.display()),
        source,
    };
    if let Ok(meta) = std::fs::symlink_metadata(path) {
        if !meta.file_type().is_socket() {
            return Err(StartupError::Config(format!(
                "--listen-unix {} exists and is not a socket; remove it or pick another path",
                path.display()
            )));
        }
        if std::os::unix::net::UnixStream::connect(path).is_ok() {
            return Err(StartupError::Config(format!(
                "--listen-unix {}: another server is listening there",
                path.display()
            )));
        }
        std::fs::remove_file(path).map_err(listen_err)?;
    }
    let listener = UnixListener::bind(path).map_err(listen_err)?;
    use std::os::unix::fs::PermissionsExt;
    let mode = if open { 0o666 } else { 0o600 };
    std::fs::set_permissions(path, std::fs::Permissions::from_mode(mode)).map_err(listen_err)?;
    Ok(listener)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn unix_socket_replacement_rules() {
        let dir = tempfile::tempdir().unwrap();
        let stale = dir.path().join("stale.sock");
        drop(std::os::unix::net::UnixListener::bind(&stale).unwrap());
        assert!(stale.exists());
        let _live = bind_unix(&stale, false).expect("a stale socket is replaced");
        use std::os::unix::fs::PermissionsExt;
        let mode = std::fs::metadata(&stale).unwrap().permissions().mode();
        assert_eq!(mode & 0o777, 0o600);
        let err = bind_unix(&stale, false).unwrap_err();
        assert!(err.to_string().contains("another server"), "{err}");
        let file = dir.path().join("file");
        std::fs::write(&file, "").unwrap();
        let err = bind_unix(&file, false).unwrap_err();
        assert!(err.to_string().contains("not a socket"), "{err}");
    }
}
