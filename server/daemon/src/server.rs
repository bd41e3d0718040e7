//! Wires the services together, serves them on TCP and (optionally) a Unix
//! socket, and runs the shutdown sequence on SIGTERM/SIGINT.

use std::path::Path;
use std::sync::Arc;

use forkd_api::v1::sandbox_service_server::SandboxServiceServer;
use forkd_api::v1::snapshot_service_server::SnapshotServiceServer;
use tokio::net::{TcpListener, UnixListener};
use tokio::signal::unix::{signal, Signal, SignalKind};
use tokio::task::JoinSet;
use tokio_stream::wrappers::UnixListenerStream;
use tonic::transport::server::TcpIncoming;
use tonic::transport::Server;

use crate::auth::AuthLayer;
use crate::config::Config;
use crate::data_dir::DataDir;
use crate::drain::{Drain, DrainLayer};
use crate::error::{CancelReason, StartupError};
use crate::lifecycle::Manager;
use crate::metrics::{Metrics, MetricsLayer, MetricsServer};
use crate::registry::Registry;
use crate::sandbox_service::Sandboxes;
use crate::snapshot_service::SnapshotApi;
use crate::snapshots::Snapshots;

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
    crate::public::set_data_dir(&config.data_dir, data_dir.root());
    let mut metrics = Metrics::new(&DESCRIPTOR_SETS)
        .map_err(|e| StartupError::Config(format!("metrics: {e}")))?;
    let (snapshots, report) = Snapshots::open(&data_dir.snapshots(), metrics.branch.clone())?;
    log_recovery(&report);
    let registry = Registry::new(config.max_sandboxes);
    let manager = Manager::new(
        registry,
        data_dir.clone(),
        config.vmm_path.clone(),
        config.live_copy_rate_mibps,
    );
    metrics.observe_state(manager.registry().clone(), snapshots.clone());
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
        .layer(MetricsLayer::new(metrics.rpc.clone()))
        .layer(DrainLayer::new(drain.clone()))
        .layer(AuthLayer::new(config.token.clone()))
        .add_service(health_service)
        .add_service(reflection_v1)
        .add_service(reflection_v1alpha)
        .add_service(SandboxServiceServer::new(Sandboxes::new(
            manager.clone(),
            snapshots.clone(),
        )))
        .add_service(SnapshotServiceServer::new(SnapshotApi::new(
            manager.clone(),
            snapshots.clone(),
        )));

    let mut servers: JoinSet<(String, Result<(), tonic::transport::Error>)> = JoinSet::new();

    let tcp_addr = tcp
        .local_addr()
        .map(|a| a.to_string())
        .unwrap_or_else(|_| config.listen.to_string());
    let incoming = TcpIncoming::from(tcp).with_nodelay(Some(true));
    let serve = router
        .clone()
        .serve_with_incoming_shutdown(incoming, drain.stopped());
    let name = tcp_addr.clone();
    servers.spawn(async move { (name, serve.await) });

    let unix_path = match &config.listen_unix {
        Some(path) => {
            let listener = bind_unix(path)?;
            let incoming = UnixListenerStream::new(listener);
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
        auth = config.token.is_some(),
        max_sandboxes = config.max_sandboxes,
        live_copy_rate_mibps = config.live_copy_rate_mibps,
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
    // 4. Cancel the LIVE copies still running (they end FAILED), then stop
    //    every VMM and remove their directories.
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
    manager.shutdown_all().await;
    if let Some(path) = unix_path {
        let _ = std::fs::remove_file(path);
    }
    if let Some(server) = metrics_server {
        server.stop().await;
    }
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
/// server's socket or a non-socket file.
fn bind_unix(path: &Path) -> Result<UnixListener, StartupError> {
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
    UnixListener::bind(path).map_err(listen_err)
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
        let _live = bind_unix(&stale).expect("a stale socket is replaced");
        let err = bind_unix(&stale).unwrap_err();
        assert!(err.to_string().contains("another server"), "{err}");
        let file = dir.path().join("file");
        std::fs::write(&file, "").unwrap();
        let err = bind_unix(&file).unwrap_err();
        assert!(err.to_string().contains("not a socket"), "{err}");
    }
}
