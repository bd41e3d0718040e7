//! `forkd`: the daemon that runs KVM microVM sandboxes behind a gRPC API.
//! See DESIGN.md next to Cargo.toml for the module map.

mod api;
mod cli;
mod config;
mod data_dir;
mod doctor;
mod image_cli;
mod logging;
mod metrics;
mod rlimit;
mod sandbox;
mod serve;
mod snapshot;
mod sync;
mod vmm;

use std::process::ExitCode;

use clap::Parser;

use crate::cli::{Cli, Command};
use crate::config::{Config, TOKEN_ENV};

fn main() -> ExitCode {
    let cli = Cli::parse();
    let args = match cli.command {
        Command::Serve(args) => args,
        Command::Doctor(args) => return doctor::run(&args),
        Command::Image(args) => return image_cli::run(args),
    };
    logging::init(args.log_format);
    // Everything the daemon (and each VMM it starts) creates is for its own
    // user only, whatever umask it was started with.
    nix::sys::stat::umask(nix::sys::stat::Mode::from_bits_truncate(0o077));
    match rlimit::raise_nofile() {
        Ok(limit) => tracing::debug!(limit, "RLIMIT_NOFILE raised"),
        Err(e) => tracing::warn!(error = %e, "could not raise RLIMIT_NOFILE"),
    }
    let config = match Config::resolve(&args, std::env::var(TOKEN_ENV).ok()) {
        Ok(config) => config,
        Err(e) => {
            tracing::error!("{e}");
            return ExitCode::FAILURE;
        }
    };
    if args.token_file.is_some() && std::env::var_os(TOKEN_ENV).is_some() {
        tracing::info!("--token-file given; ignoring {TOKEN_ENV}");
    }
    let runtime = match tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
    {
        Ok(rt) => rt,
        Err(e) => {
            tracing::error!("cannot start the tokio runtime: {e}");
            return ExitCode::FAILURE;
        }
    };
    match runtime.block_on(serve::server::run(config)) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            tracing::error!("{e}");
            ExitCode::FAILURE
        }
    }
}
