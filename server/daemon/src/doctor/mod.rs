//! `forkd doctor`: checks that this host can run forkd, and optionally
//! that a daemon is healthy, then prints one line per check (or one JSON
//! document) and exits 0 when nothing failed, 1 when a check failed (clap
//! exits 2 on usage errors).
//!
//! Every check is a function in its own module that returns a
//! [`report::Check`]; none of them needs the daemon or its lock, and each
//! undoes what it sets up (VMs, memfds, mappings, a created data dir).
//! See DESIGN.md ("forkd doctor") for the checks and the JSON fields.

mod dirty_log;
pub(crate) mod disk;
mod health;
mod hugepages;
pub(crate) mod hypervisor;
mod kvm;
mod mapping;
mod memfd;
mod report;
mod uffd;
mod vmm;

use std::io::Write;
use std::path::PathBuf;
use std::process::ExitCode;
use std::time::Instant;

pub use health::{parse_target, Target};
use report::{Check, Report};

/// Options of `forkd doctor`.
#[derive(Debug, clap::Args)]
pub struct DoctorArgs {
    /// Data directory to check (the one `forkd serve --data-dir` uses). A
    /// missing one is created for the test and removed again.
    #[arg(long, default_value = "/var/lib/forkd", value_name = "DIR")]
    pub data_dir: PathBuf,

    /// Daemon to health-check: HOST:PORT, http://HOST:PORT or unix:PATH
    /// [default: 127.0.0.1:50051, where nothing listening is only a
    /// warning; with --target it is a failure].
    #[arg(long, value_name = "ADDR", value_parser = parse_target_arg)]
    pub target: Option<Target>,

    /// Skip the daemon health check (host checks only, e.g. before the
    /// daemon is installed, or in CI).
    #[arg(long, conflicts_with = "target")]
    pub no_daemon: bool,

    /// The forkd-vmm binary to check [default: as `forkd serve`: next to
    /// this executable, else on $PATH].
    #[arg(long, value_name = "PATH")]
    pub vmm_path: Option<PathBuf>,

    /// Print one JSON document instead of lines.
    #[arg(long)]
    pub json: bool,
}

fn parse_target_arg(s: &str) -> Result<Target, String> {
    parse_target(s).map_err(|e| e.to_string())
}

/// Runs `f` and records how long it took in its result.
fn timed(f: impl FnOnce() -> Check) -> Check {
    let start = Instant::now();
    let c = f();
    c.timed(start.elapsed())
}

/// Runs every check, in order.
pub fn run_checks(args: &DoctorArgs) -> Vec<Check> {
    let mut checks = Vec::new();
    let hv_start = Instant::now();
    let hv = hypervisor::detect_host();
    let hv_elapsed = hv_start.elapsed();
    checks.push(timed(|| kvm::check(&hv)));
    checks.push(hypervisor::check(&hv).timed(hv_elapsed));
    checks.push(timed(dirty_log::check));
    checks.push(timed(memfd::check));
    checks.push(timed(uffd::check));
    checks.push(timed(hugepages::check));
    checks.push(timed(|| vmm::check(args.vmm_path.as_deref())));
    checks.push(timed(|| disk::check(&args.data_dir)));
    checks.push(if args.no_daemon {
        Check::skip(
            health::NAME,
            "--no-daemon given",
            "drop --no-daemon (or give --target ADDR) to health-check a running daemon",
        )
    } else {
        let (target, explicit) = match &args.target {
            Some(t) => (t.clone(), true),
            None => (Target::Tcp(health::DEFAULT_TARGET.into()), false),
        };
        timed(|| health::check(&target, explicit))
    });
    checks
}

/// The report of [`run_checks`].
pub fn report(args: &DoctorArgs) -> Report {
    Report::new(run_checks(args))
}

/// `forkd doctor`: runs the checks, prints the report, returns the exit
/// code.
pub fn run(args: &DoctorArgs) -> ExitCode {
    let report = report(args);
    let text = if args.json {
        report.to_json()
    } else {
        report.to_human()
    };
    let mut out = std::io::stdout().lock();
    // A closed stdout loses the report, but the exit code still tells.
    let _ = out.write_all(text.as_bytes()).and_then(|()| out.flush());
    ExitCode::from(report.exit_code)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::cli::{Cli, Command};
    use clap::Parser;

    fn parse(args: &[&str]) -> Result<DoctorArgs, clap::Error> {
        let cli = Cli::try_parse_from(args)?;
        match cli.command {
            Command::Doctor(a) => Ok(a),
            other => panic!("parsed as {other:?}"),
        }
    }

    #[test]
    fn defaults() {
        let a = parse(&["forkd", "doctor"]).unwrap();
        assert_eq!(a.data_dir, PathBuf::from("/var/lib/forkd"));
        assert!(a.target.is_none() && !a.no_daemon && !a.json && a.vmm_path.is_none());
    }

    #[test]
    fn options() {
        let a = parse(&[
            "forkd",
            "doctor",
            "--json",
            "--data-dir",
            "/tmp/x",
            "--target",
            "unix:/run/forkd.sock",
        ])
        .unwrap();
        assert!(a.json);
        assert_eq!(a.data_dir, PathBuf::from("/tmp/x"));
        assert_eq!(a.target, Some(Target::Unix("/run/forkd.sock".into())));
    }

    #[test]
    fn usage_errors_exit_2() {
        let e = parse(&["forkd", "doctor", "--target", "a:1", "--no-daemon"]).unwrap_err();
        assert_eq!(e.exit_code(), 2);
        let e = parse(&["forkd", "doctor", "--target", "https://a:1"]).unwrap_err();
        assert_eq!(e.exit_code(), 2);
        assert!(e.to_string().contains("plaintext gRPC"), "{e}");
        let e = parse(&["forkd", "doctor", "--bogus"]).unwrap_err();
        assert_eq!(e.exit_code(), 2);
    }
}
