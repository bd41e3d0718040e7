//! The daemon's resolved configuration: the command line plus the
//! environment, checked before anything starts.

use std::ffi::OsStr;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::time::Duration;

use crate::api::error::StartupError;
use crate::cli::ServeArgs;
use crate::serve::auth::BearerToken;

/// Name of the VMM binary looked up next to `forkd` and on `$PATH`.
pub const VMM_BINARY: &str = "forkd-vmm";
/// The images directory's name inside the data directory (the default).
pub const IMAGES_DIR: &str = "images";
/// Environment variable holding the bearer token.
pub const TOKEN_ENV: &str = "FORKD_TOKEN";

/// Everything `forkd serve` runs with.
#[derive(Debug)]
pub struct Config {
    /// TCP listen address.
    pub listen: SocketAddr,
    /// Optional Unix socket path.
    pub listen_unix: Option<PathBuf>,
    /// The data directory.
    pub data_dir: PathBuf,
    /// The forkd-vmm binary.
    pub vmm_path: PathBuf,
    /// Token required on every non-health call, if any.
    pub token: Option<BearerToken>,
    /// Most sandboxes at once.
    pub max_sandboxes: usize,
    /// Bound on waiting for in-flight calls at shutdown.
    pub shutdown_timeout: Duration,
    /// Pause between NOT_SERVING and stopping the listeners.
    pub drain_grace: Duration,
    /// Bandwidth limit of LIVE copies in MiB/s (0: none), for every VMM.
    pub live_copy_rate_mibps: u64,
    /// Standby VMMs kept per VM shape (0: no pool).
    pub vmm_pool: usize,
    /// Where to serve Prometheus metrics over HTTP, if anywhere.
    pub metrics_listen: Option<SocketAddr>,
    /// Most guest memory running and starting sandboxes may commit, MiB.
    pub max_guest_memory_mib: u64,
    /// How long a VMM may go without answering a heartbeat; `None`: no
    /// watchdog.
    pub vmm_watchdog: Option<Duration>,
    /// Connection limits and timeouts of the gRPC listeners.
    pub connections: crate::serve::connections::Limits,
    /// Local users accepted besides the daemon's own and root, when no
    /// token is set.
    pub allow_uids: Vec<u32>,
    /// The Linux images directory.
    pub images_dir: PathBuf,
    /// Time a Linux guest gets to answer its first ping.
    pub linux_boot_timeout: Duration,
    /// Whether this host's KVM can run Linux guests.
    pub linux_host: crate::sandbox::linux_host::LinuxHost,
    /// `--default-ttl` and `--max-ttl`.
    pub ttl: crate::sandbox::expiry::TtlPolicy,
}

impl Config {
    /// Resolves the command line; `env_token` is the value of
    /// [`TOKEN_ENV`], if set.
    pub fn resolve(args: &ServeArgs, env_token: Option<String>) -> Result<Config, StartupError> {
        let token = match (&args.token_file, env_token) {
            (Some(path), _) => {
                let text = std::fs::read_to_string(path).map_err(|e| {
                    StartupError::Config(format!(
                        "cannot read --token-file {}: {e}",
                        path.display()
                    ))
                })?;
                Some(BearerToken::new(&text).ok_or_else(|| {
                    StartupError::Config(format!(
                        "--token-file {} is empty or holds whitespace only",
                        path.display()
                    ))
                })?)
            }
            (None, Some(value)) => Some(BearerToken::new(&value).ok_or_else(|| {
                StartupError::Config(format!(
                    "{TOKEN_ENV} is set but empty; unset it or give it a token"
                ))
            })?),
            (None, None) => None,
        };
        check_exposure(args.listen, token.is_some())?;
        if args.max_sandboxes == 0 {
            return Err(StartupError::Config(
                "--max-sandboxes must be at least 1".into(),
            ));
        }
        if args.max_connections == 0 {
            return Err(StartupError::Config(
                "--max-connections must be at least 1".into(),
            ));
        }
        if args.idle_timeout == 0 || args.first_call_timeout == 0 {
            return Err(StartupError::Config(
                "--idle-timeout and --first-call-timeout must be at least 1 second".into(),
            ));
        }
        let max_guest_memory_mib = match args.max_guest_memory_mib {
            Some(0) => {
                return Err(StartupError::Config(
                    "--max-guest-memory-mib must be at least 1".into(),
                ))
            }
            Some(mib) => mib,
            None => mem_total_mib().map_err(|e| {
                StartupError::Config(format!(
                    "cannot read MemTotal from /proc/meminfo ({e}); pass --max-guest-memory-mib"
                ))
            })?,
        };
        if args.linux_boot_timeout == 0 {
            return Err(StartupError::Config(
                "--linux-boot-timeout must be at least 1 second".into(),
            ));
        }
        let ttl = crate::sandbox::expiry::TtlPolicy::new(args.default_ttl, args.max_ttl)
            .map_err(StartupError::Config)?;
        let linux_host = crate::sandbox::linux_host::LinuxHost::detect()
            .map_err(|e| StartupError::Config(e.to_string()))?;
        let vmm_path = resolve_vmm(
            args.vmm_path.as_deref(),
            std::env::current_exe().ok().as_deref(),
            std::env::var_os("PATH").as_deref(),
        )?;
        Ok(Config {
            listen: args.listen,
            listen_unix: args.listen_unix.clone(),
            data_dir: args.data_dir.clone(),
            vmm_path,
            token,
            max_sandboxes: args.max_sandboxes,
            shutdown_timeout: Duration::from_secs(args.shutdown_timeout),
            drain_grace: Duration::from_secs(args.drain_grace),
            live_copy_rate_mibps: args.live_copy_rate_mibps,
            vmm_pool: args.vmm_pool,
            metrics_listen: args.metrics_listen,
            max_guest_memory_mib,
            vmm_watchdog: (args.vmm_watchdog > 0).then(|| Duration::from_secs(args.vmm_watchdog)),
            connections: crate::serve::connections::Limits {
                max_connections: args.max_connections,
                idle_timeout: Duration::from_secs(args.idle_timeout),
                first_call_timeout: Duration::from_secs(args.first_call_timeout),
            },
            allow_uids: args.allow_uid.clone(),
            images_dir: args
                .images_dir
                .clone()
                .unwrap_or_else(|| args.data_dir.join(IMAGES_DIR)),
            linux_boot_timeout: Duration::from_secs(args.linux_boot_timeout),
            linux_host,
            ttl,
        })
    }
}

/// The host's MemTotal from `/proc/meminfo`, in MiB.
pub fn mem_total_mib() -> std::io::Result<u64> {
    parse_mem_total_mib(&std::fs::read_to_string("/proc/meminfo")?)
        .ok_or_else(|| std::io::Error::new(std::io::ErrorKind::InvalidData, "no MemTotal line"))
}

/// MemTotal (`MemTotal:  24522436 kB`) in MiB.
fn parse_mem_total_mib(meminfo: &str) -> Option<u64> {
    let line = meminfo.lines().find(|l| l.starts_with("MemTotal:"))?;
    let kib: u64 = line.split_whitespace().nth(1)?.parse().ok()?;
    Some(kib / 1024)
}

/// Refuses to expose an unauthenticated daemon beyond loopback.
pub fn check_exposure(listen: SocketAddr, has_token: bool) -> Result<(), StartupError> {
    if listen.ip().is_loopback() || has_token {
        Ok(())
    } else {
        Err(StartupError::Config(format!(
            "refusing to listen on non-loopback address {listen} without authentication: \
             pass --token-file PATH or set {TOKEN_ENV}, or listen on 127.0.0.1"
        )))
    }
}

fn is_executable(path: &Path) -> bool {
    use std::os::unix::fs::PermissionsExt;
    path.metadata()
        .map(|m| m.is_file() && m.permissions().mode() & 0o111 != 0)
        .unwrap_or(false)
}

/// Finds the VMM binary: `explicit` if given, else next to `current_exe`,
/// else on `path_env`.
pub fn resolve_vmm(
    explicit: Option<&Path>,
    current_exe: Option<&Path>,
    path_env: Option<&OsStr>,
) -> Result<PathBuf, StartupError> {
    if let Some(path) = explicit {
        return if is_executable(path) {
            Ok(path.to_path_buf())
        } else {
            Err(StartupError::Config(format!(
                "--vmm-path {} is not an executable file",
                path.display()
            )))
        };
    }
    let beside = current_exe
        .and_then(Path::parent)
        .map(|dir| dir.join(VMM_BINARY));
    if let Some(path) = beside.iter().find(|p| is_executable(p)) {
        return Ok(path.clone());
    }
    if let Some(path) = path_env
        .into_iter()
        .flat_map(std::env::split_paths)
        .map(|dir| dir.join(VMM_BINARY))
        .find(|p| is_executable(p))
    {
        return Ok(path);
    }
    Err(StartupError::Config(format!(
        "cannot find {VMM_BINARY} next to {} or on $PATH; pass --vmm-path",
        current_exe
            .map(|p| p.display().to_string())
            .unwrap_or_else(|| "the forkd executable".into())
    )))
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::unix::fs::PermissionsExt;

    #[test]
    fn loopback_needs_no_token() {
        assert!(check_exposure("127.0.0.1:1".parse().unwrap(), false).is_ok());
        assert!(check_exposure("[::1]:1".parse().unwrap(), false).is_ok());
        let err = check_exposure("0.0.0.0:1".parse().unwrap(), false).unwrap_err();
        assert!(err.to_string().contains("--token-file"));
        assert!(check_exposure("0.0.0.0:1".parse().unwrap(), true).is_ok());
    }

    #[test]
    fn mem_total() {
        let text = "MemFree:  1 kB\nMemTotal:       24522436 kB\n";
        assert_eq!(parse_mem_total_mib(text), Some(23947));
        assert_eq!(parse_mem_total_mib("MemFree: 1 kB\n"), None);
        assert!(mem_total_mib().unwrap() > 0);
    }

    #[test]
    fn vmm_lookup_order() {
        let dir = tempfile::tempdir().unwrap();
        let bin = dir.path().join("bin");
        let other = dir.path().join("other");
        std::fs::create_dir_all(&bin).unwrap();
        std::fs::create_dir_all(&other).unwrap();
        let exe = bin.join("forkd");
        let on_path = other.join(VMM_BINARY);
        std::fs::write(&on_path, "").unwrap();
        std::fs::set_permissions(&on_path, std::fs::Permissions::from_mode(0o755)).unwrap();
        let path_env = std::env::join_paths([&other]).unwrap();

        // Nothing beside forkd: $PATH wins.
        let got = resolve_vmm(None, Some(&exe), Some(&path_env)).unwrap();
        assert_eq!(got, on_path);

        // Beside forkd beats $PATH.
        let beside = bin.join(VMM_BINARY);
        std::fs::write(&beside, "").unwrap();
        std::fs::set_permissions(&beside, std::fs::Permissions::from_mode(0o755)).unwrap();
        assert_eq!(
            resolve_vmm(None, Some(&exe), Some(&path_env)).unwrap(),
            beside
        );

        // Explicit must exist and be executable.
        assert!(resolve_vmm(Some(&dir.path().join("nope")), None, None).is_err());
        assert_eq!(resolve_vmm(Some(&on_path), None, None).unwrap(), on_path);
        assert!(resolve_vmm(None, None, None)
            .unwrap_err()
            .to_string()
            .contains("--vmm-path"));
    }
}
