//! `forkd image build|ls|rm`: the command-line face of `forkd-images`.

use std::path::PathBuf;
use std::process::ExitCode;
use std::time::Instant;

use forkd_images::{
    build, default_packages, BuildOptions, BuildOutcome, Image, ImageError, ImageStore,
};

use crate::cli::{ImageArgs, ImageBuildArgs, ImageCommand, ImageLsArgs, ImageRmArgs};

/// Runs `forkd image ...`; exit code 0 on success, 1 on any error.
pub fn run(args: ImageArgs) -> ExitCode {
    let (what, result) = match args.command {
        ImageCommand::Build(a) => ("build", run_build(a)),
        ImageCommand::Ls(a) => ("ls", run_ls(a)),
        ImageCommand::Rm(a) => return run_rm(a),
    };
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("forkd image {what}: error: {e}");
            ExitCode::FAILURE
        }
    }
}

/// `forkd-agent` next to this executable.
fn default_agent() -> Result<PathBuf, ImageError> {
    let exe = std::env::current_exe().map_err(|source| ImageError::Io {
        action: "locate",
        path: PathBuf::from("/proc/self/exe"),
        source,
    })?;
    Ok(exe.with_file_name("forkd-agent"))
}

fn run_build(a: ImageBuildArgs) -> Result<(), ImageError> {
    let store = ImageStore::new(a.store.images_dir());
    let agent = match a.agent {
        Some(p) => p,
        None => default_agent()?,
    };
    let mut opts = BuildOptions::new(a.name.clone(), agent);
    opts.packages = a.packages.unwrap_or_else(|| default_packages(&a.name));
    opts.packages = opts
        .packages
        .iter()
        .map(|p| p.trim().to_string())
        .filter(|p| !p.is_empty())
        .collect();
    opts.force = a.force;
    opts.memory_mib = a.memory_mib;
    opts.kernel_args = a.kernel_args;
    let t0 = Instant::now();
    let log = |line: &str| eprintln!("==> {line}");
    match build(&store, &opts, &log)? {
        BuildOutcome::UpToDate(image) => {
            println!("image {} is up to date", image.name);
        }
        BuildOutcome::Built(image) => {
            println!(
                "built image {} in {:.1}s: {} (kernel {}, initrd {})",
                image.name,
                t0.elapsed().as_secs_f64(),
                image.dir.display(),
                image.manifest.kernel.release,
                mib(image.manifest.initrd.bytes),
            );
        }
    }
    Ok(())
}

fn run_ls(a: ImageLsArgs) -> Result<(), ImageError> {
    let images = ImageStore::new(a.store.images_dir()).list()?;
    if a.json {
        let manifests: Vec<_> = images.iter().map(|i| &i.manifest).collect();
        println!(
            "{}",
            serde_json::to_string_pretty(&manifests).expect("manifests serialize")
        );
        return Ok(());
    }
    println!("{}", row("NAME", "KERNEL", "INITRD", "CREATED", "PACKAGES"));
    for i in &images {
        println!("{}", ls_row(i));
    }
    Ok(())
}

fn ls_row(i: &Image) -> String {
    let m = &i.manifest;
    row(
        &i.name,
        &m.kernel.release,
        &mib(m.initrd.bytes),
        &m.created,
        &m.packages.join(","),
    )
}

fn row(name: &str, kernel: &str, initrd: &str, created: &str, packages: &str) -> String {
    format!("{name:<20} {kernel:<16} {initrd:>9}  {created:<20}  {packages}")
}

fn mib(bytes: u64) -> String {
    format!("{:.1} MiB", bytes as f64 / (1024.0 * 1024.0))
}

/// Removes each named image; every failure is reported, and any makes the
/// exit code 1.
fn run_rm(a: ImageRmArgs) -> ExitCode {
    let store = ImageStore::new(a.store.images_dir());
    let mut code = ExitCode::SUCCESS;
    for name in &a.names {
        match store.remove(name) {
            Ok(()) => println!("removed image {name}"),
            Err(e) => {
                eprintln!("forkd image rm: error: {e}");
                code = ExitCode::FAILURE;
            }
        }
    }
    code
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn mib_formats() {
        assert_eq!(mib(3 * 1024 * 1024 / 2), "1.5 MiB");
    }
}
