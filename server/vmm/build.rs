//! Builds the reference guest (`server/guest`, a separate no_std package
//! with its own profile) and places the ELF in OUT_DIR for `include_bytes!`.

use std::env;
use std::path::PathBuf;
use std::process::Command;

fn main() {
    let manifest_dir = PathBuf::from(env::var("CARGO_MANIFEST_DIR").expect("set by cargo"));
    let guest_dir = manifest_dir.join("../guest");
    let abi_dir = manifest_dir.join("../guest-abi");
    let out_dir = PathBuf::from(env::var("OUT_DIR").expect("set by cargo"));
    let target_dir = out_dir.join("guest-target");

    let mut cmd = Command::new(env::var("CARGO").unwrap_or_else(|_| "cargo".into()));
    // Run inside the guest's folder so its .cargo/config.toml applies, and
    // drop what the outer build sets for its own crates.
    cmd.current_dir(&guest_dir)
        .args(["build", "--release", "--quiet", "--target-dir"])
        .arg(&target_dir);
    for (key, _) in env::vars() {
        let outer = (key.starts_with("CARGO_") && key != "CARGO_HOME")
            || key.starts_with("RUSTC_")
            || key == "RUSTFLAGS"
            || key == "RUSTDOCFLAGS";
        if outer {
            cmd.env_remove(&key);
        }
    }
    let status = cmd
        .status()
        .expect("running cargo to build the reference guest");
    assert!(status.success(), "building the reference guest failed");
    std::fs::copy(
        target_dir.join("release/forkd-guest"),
        out_dir.join("forkd-guest"),
    )
    .expect("copying the guest image");

    for path in [
        guest_dir.join("src"),
        guest_dir.join("Cargo.toml"),
        guest_dir.join("build.rs"),
        guest_dir.join("link.ld"),
        guest_dir.join(".cargo/config.toml"),
        abi_dir.join("src"),
    ] {
        println!("cargo:rerun-if-changed={}", path.display());
    }
}
