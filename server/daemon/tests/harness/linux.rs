//! Linux guests on the fake VMM: a fake image in a daemon's images
//! directory, and a daemon that takes the host to be a given hypervisor
//! (`FORKD_TEST_ASSUME_HYPERVISOR`), so it passes (or, with `pvm`, fails)
//! the host check whatever this machine's KVM is.

use forkd_api::v1 as pb;
use pb::sandbox_service_client::SandboxServiceClient;
use tonic::transport::Channel;

use super::daemon::Daemon;

/// The daemon's test knob naming the host's KVM backend.
pub const ASSUME_HV: &str = "FORKD_TEST_ASSUME_HYPERVISOR";

/// A fake image `name` (manifest plus dummy kernel and initrd) in
/// `images`.
pub fn make_image(images: &std::path::Path, name: &str, memory_mib: u32) {
    let dir = images.join(name);
    std::fs::create_dir_all(&dir).unwrap();
    std::fs::write(dir.join("vmlinuz"), b"not really a kernel").unwrap();
    std::fs::write(dir.join("initrd"), b"not really an initramfs").unwrap();
    let manifest = serde_json::json!({
        "format": 1, "name": name,
        "kernel": {"path": "vmlinuz", "sha256": "00", "bytes": 19,
                   "release": "6.1.0-fake", "package": "linux-image-fake", "version": "1"},
        "initrd": {"path": "initrd", "sha256": "00", "bytes": 23},
        "kernel_args": "quiet", "memory_mib": memory_mib,
        "packages": ["python3"], "modules": [], "agent_sha256": "00",
        "input_digest": "00", "created": "2026-12-03T18:00:00Z"
    });
    std::fs::write(dir.join("manifest.json"), manifest.to_string()).unwrap();
}

/// A daemon whose default images dir (`<data-dir>/images`) holds image
/// `debian` (384 MiB), on a host taken to be `hypervisor`.
pub async fn linux_daemon(hypervisor: &str) -> Daemon {
    let tmp = tempfile::tempdir().unwrap();
    make_image(&tmp.path().join("data/images"), "debian", 384);
    Daemon::start_in(tmp, &[], &[(ASSUME_HV, hypervisor)]).await
}

/// One sandbox booting image `image`.
pub async fn spawn_image(c: &mut SandboxServiceClient<Channel>, image: &str) -> pb::Sandbox {
    c.spawn_sandboxes(pb::SpawnSandboxesRequest {
        n: 1,
        image: image.into(),
        ..Default::default()
    })
    .await
    .unwrap()
    .into_inner()
    .sandboxes
    .remove(0)
}
