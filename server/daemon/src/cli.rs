//! The command line.

use std::net::SocketAddr;
use std::path::PathBuf;

use clap::{Parser, Subcommand, ValueEnum};

/// forkd: a gRPC control plane for KVM microVM sandboxes.
#[derive(Debug, Parser)]
#[command(name = "forkd", version, about)]
pub struct Cli {
    /// What to do.
    #[command(subcommand)]
    pub command: Command,
}

/// The subcommands.
#[derive(Debug, Subcommand)]
pub enum Command {
    /// Run the daemon: serve forkd.v1 over gRPC until SIGTERM or SIGINT.
    Serve(ServeArgs),
    /// Check that this host can run forkd (KVM and its hypervisor, memfd,
    /// userfaultfd write-protect, dirty logging, forkd-vmm, the data
    /// directory) and that a daemon is healthy; exit 1 if a check failed.
    Doctor(crate::doctor::DoctorArgs),
}

/// Options of `forkd serve`.
#[derive(Debug, clap::Args)]
pub struct ServeArgs {
    /// TCP address to serve gRPC on (h2c). A non-loopback address needs a
    /// token (--token-file or FORKD_TOKEN).
    #[arg(long, default_value = "127.0.0.1:50051", value_name = "ADDR")]
    pub listen: SocketAddr,

    /// Also serve on this Unix socket path (replaced if a stale socket is
    /// there).
    #[arg(long, value_name = "PATH")]
    pub listen_unix: Option<PathBuf>,

    /// Directory for sandbox state; holds forkd.lock, sandboxes/ and
    /// snapshots/.
    #[arg(long, default_value = "/var/lib/forkd", value_name = "DIR")]
    pub data_dir: PathBuf,

    /// The forkd-vmm binary [default: forkd-vmm next to this executable,
    /// else the one on $PATH].
    #[arg(long, value_name = "PATH")]
    pub vmm_path: Option<PathBuf>,

    /// File holding the bearer token every call but grpc.health.v1 must
    /// carry (surrounding whitespace is ignored). Without it the FORKD_TOKEN
    /// environment variable is used, if set.
    #[arg(long, value_name = "PATH")]
    pub token_file: Option<PathBuf>,

    /// Log format on stderr (the level comes from RUST_LOG, default info).
    #[arg(long, value_enum, default_value_t = LogFormat::Text)]
    pub log_format: LogFormat,

    /// Most sandboxes that may exist at once.
    #[arg(long, default_value_t = 4096, value_name = "N")]
    pub max_sandboxes: usize,

    /// Seconds in-flight calls get to finish once the listeners stop.
    #[arg(long, default_value_t = 30, value_name = "SECS")]
    pub shutdown_timeout: u64,

    /// Seconds between health turning NOT_SERVING and the listeners
    /// stopping, so load balancers can move traffic away.
    #[arg(long, default_value_t = 0, value_name = "SECS")]
    pub drain_grace: u64,

    /// Bandwidth limit of each LIVE branch's background memory copy, in
    /// MiB/s (passed to every VMM as --copy-rate-mibps); 0 means unlimited.
    /// Limits the disk bandwidth background copies take, and lengthens the
    /// window in which a LIVE snapshot is WRITING.
    #[arg(long, default_value_t = 0, value_name = "N")]
    pub live_copy_rate_mibps: u64,

    /// Also serve Prometheus metrics over plain HTTP at http://ADDR/metrics
    /// (off by default). No token is checked there: bind it to a loopback or
    /// pod-internal address.
    #[arg(long, value_name = "ADDR")]
    pub metrics_listen: Option<SocketAddr>,
}

/// How log lines are written.
#[derive(Clone, Copy, Debug, PartialEq, Eq, ValueEnum)]
pub enum LogFormat {
    /// Human-readable lines.
    Text,
    /// One JSON object per line.
    Json,
}

#[cfg(test)]
mod tests {
    use super::*;
    use clap::CommandFactory;

    #[test]
    fn cli_is_consistent() {
        Cli::command().debug_assert();
    }

    #[test]
    fn defaults() {
        let cli = Cli::try_parse_from(["forkd", "serve"]).unwrap();
        let Command::Serve(a) = cli.command else {
            panic!("not parsed as serve");
        };
        assert_eq!(a.listen, "127.0.0.1:50051".parse().unwrap());
        assert_eq!(a.data_dir, PathBuf::from("/var/lib/forkd"));
        assert_eq!(a.max_sandboxes, 4096);
        assert_eq!(a.shutdown_timeout, 30);
        assert_eq!(a.drain_grace, 0);
        assert_eq!(a.live_copy_rate_mibps, 0);
        assert_eq!(a.log_format, LogFormat::Text);
        assert!(a.listen_unix.is_none() && a.vmm_path.is_none() && a.token_file.is_none());
    }

    #[test]
    fn metrics_listen_is_off_unless_given() {
        let serve = |args: &[&str]| {
            let cli = Cli::try_parse_from([&["forkd", "serve"], args].concat()).unwrap();
            let Command::Serve(a) = cli.command else {
                panic!("not parsed as serve");
            };
            a.metrics_listen
        };
        assert_eq!(serve(&[]), None);
        assert_eq!(
            serve(&["--metrics-listen", "127.0.0.1:9464"]),
            Some("127.0.0.1:9464".parse().unwrap())
        );
        assert!(Cli::try_parse_from(["forkd", "serve", "--metrics-listen", "nope"]).is_err());
    }
}
