//! `forkd image build`: the steps from packages to a published image, and
//! the atomic publish.
//!
//! Everything is made in a scratch directory `ROOT/.building-NAME-<random>`
//! (removed on failure; a killed build's is removed by the next build),
//! files are fsynced, the manifest is written last, and the directory is
//! renamed to `ROOT/NAME` (an old image is first renamed aside to
//! `.old-NAME-<random>`, then deleted). `ROOT/NAME` is therefore either
//! absent, the old image or the complete new one.

use std::fs::{File, Permissions};
use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::time::Instant;

use crate::apt::Apt;
use crate::digest::sha256_file;
use crate::error::ImageError;
use crate::kernel::{self, KernelPackage};
use crate::lock::{remove_stale, BuildLock, BUILDING_PREFIX};
use crate::manifest::{
    input_digest, now_rfc3339, BuildInputs, ImageFile, KernelFile, Manifest, DEFAULT_MEMORY_MIB,
    FORMAT, MANIFEST_FILE,
};
use crate::modules::{self, GUEST_MODULES};
use crate::name::{validate_name, DEFAULT_IMAGE};
use crate::store::{Image, ImageStore};
use crate::{initramfs, rootfs};

/// File name of the kernel in an image directory.
const KERNEL_FILE: &str = "vmlinuz";
/// File name of the initramfs in an image directory.
const INITRD_FILE: &str = "initrd";
/// Where the agent sees its module list.
const MODULES_LIST: &str = "etc/forkd/modules";
/// The guest's host name.
const HOSTNAME: &str = "forkd\n";

/// What to build.
#[derive(Clone, Debug)]
pub struct BuildOptions {
    /// Image name.
    pub name: String,
    /// Debian packages beyond the essential set.
    pub packages: Vec<String>,
    /// The agent binary, installed as `/init`.
    pub agent: PathBuf,
    /// Rebuild even when the image is up to date.
    pub force: bool,
    /// Extra kernel command-line words recorded in the manifest.
    pub kernel_args: String,
    /// Default guest RAM recorded in the manifest, MiB.
    pub memory_mib: u64,
}

impl BuildOptions {
    /// Options for image `name` with its default packages and settings.
    pub fn new(name: impl Into<String>, agent: impl Into<PathBuf>) -> Self {
        let name = name.into();
        Self {
            packages: default_packages(&name),
            name,
            agent: agent.into(),
            force: false,
            kernel_args: String::new(),
            memory_mib: DEFAULT_MEMORY_MIB,
        }
    }
}

/// The packages an image gets when none are named: `python3,procps` for
/// [`DEFAULT_IMAGE`], `procps` (for `ps`) for any other.
pub fn default_packages(name: &str) -> Vec<String> {
    let p: &[&str] = if name == DEFAULT_IMAGE {
        &["python3", "procps"]
    } else {
        &["procps"]
    };
    p.iter().map(|s| s.to_string()).collect()
}

/// What a build did.
#[derive(Debug)]
pub enum BuildOutcome {
    /// A new image was built and published.
    Built(Image),
    /// The published image already had these inputs; nothing was done.
    UpToDate(Image),
}

/// Builds image `opts.name` into `store`, reporting progress lines through
/// `log`.
pub fn build(
    store: &ImageStore,
    opts: &BuildOptions,
    log: &dyn Fn(&str),
) -> Result<BuildOutcome, ImageError> {
    validate_name(&opts.name)?;
    for p in &opts.packages {
        if p.is_empty() || p.starts_with('-') || p.contains(char::is_whitespace) {
            return Err(ImageError::InvalidPackage { name: p.clone() });
        }
    }
    if !nix::unistd::geteuid().is_root() {
        return Err(ImageError::NotRoot);
    }
    if !opts.agent.is_file() {
        return Err(ImageError::AgentMissing {
            path: opts.agent.clone(),
        });
    }
    let root = store.root();
    create_store_root(root)?;
    let _lock = BuildLock::take(root, &|| {
        log("waiting for another build of this store to finish")
    })?;
    let stale = remove_stale(root)?;
    if stale > 0 {
        log(&format!(
            "removed {stale} stale scratch dir(s) of interrupted builds"
        ));
    }

    let mut apt = Apt::new()?;
    let kpkg = step(log, "resolve the kernel package", || apt.resolve())?;
    log(&format!("kernel: {} {}", kpkg.name, kpkg.version));
    let unknown = step(log, "check package names", || {
        apt.unknown_packages(&opts.packages)
    })?;
    if !unknown.is_empty() {
        return Err(ImageError::UnknownPackages {
            names: unknown.join(", "),
        });
    }
    let (agent_sha256, _) = sha256_file(&opts.agent)?;
    let digest = input_digest(&BuildInputs {
        packages: &opts.packages,
        kernel_package: &kpkg.name,
        kernel_version: &kpkg.version,
        agent_sha256: &agent_sha256,
        kernel_args: &opts.kernel_args,
        memory_mib: opts.memory_mib,
    });
    if !opts.force {
        if let Some(image) = up_to_date(store, &opts.name, &digest) {
            return Ok(BuildOutcome::UpToDate(image));
        }
    }

    let scratch = tempfile::Builder::new()
        .prefix(&format!("{BUILDING_PREFIX}{}-", opts.name))
        .tempdir_in(root)
        .map_err(ImageError::io("create a directory in", root))?;
    let dir = scratch.path();
    set_mode(dir, 0o755)?;
    let work = dir.join("work");
    create_dir_0755(&work)?;

    let deb_cache = root.join(".cache").join("debs");
    let deb = step(log, "download the kernel package", || {
        apt.download(&kpkg, &deb_cache)
    })?;
    let kroot = work.join("kernel");
    step(log, "unpack the kernel package", || {
        kernel::unpack(&deb, &kroot)
    })?;
    let modules = step(log, "resolve kernel modules", || {
        modules::resolve(&kroot, kpkg.release(), GUEST_MODULES)
    })?;

    let tar = work.join("rootfs.tar");
    step(
        log,
        &format!("mmdebstrap (essential + {})", opts.packages.join(",")),
        || rootfs::mmdebstrap(&opts.packages, &tar),
    )?;
    let tree = work.join("tree");
    create_dir_0755(&tree)?;
    step(log, "unpack the userland", || rootfs::unpack(&tar, &tree))?;
    std::fs::remove_file(&tar).map_err(ImageError::io("remove", &tar))?;
    let freed = step(log, "trim docs, locales, apt lists, logs", || {
        rootfs::trim(&tree)
    })?;
    log(&format!("trimmed {} MiB", freed >> 20));

    let module_paths = step(log, "add /init, modules, /etc files", || {
        populate(&tree, &opts.agent, &kroot, &modules)
    })?;

    let kernel_dst = dir.join(KERNEL_FILE);
    let kernel_src = kroot
        .join("boot")
        .join(format!("vmlinuz-{}", kpkg.release()));
    copy_synced(&kernel_src, &kernel_dst, 0o644)?;
    let initrd = dir.join(INITRD_FILE);
    let stats = step(log, "write the initramfs (uncompressed newc cpio)", || {
        initramfs::write_tree(&tree, &initrd)
    })?;
    set_mode(&initrd, 0o644)?;
    log(&format!(
        "initrd: {} entries, {} MiB",
        stats.entries,
        stats.bytes >> 20
    ));
    step(log, "remove the scratch tree", || {
        std::fs::remove_dir_all(&work).map_err(ImageError::io("remove", &work))
    })?;

    let manifest = step(log, "digest the kernel and initrd", || {
        make_manifest(dir, opts, &kpkg, module_paths, agent_sha256, digest)
    })?;
    write_manifest(dir, &manifest)?;
    let image_dir = publish(store, &opts.name, scratch.keep())?;
    Ok(BuildOutcome::Built(Image {
        name: opts.name.clone(),
        dir: image_dir,
        manifest,
    }))
}

/// Runs one step, logging its duration.
fn step<T>(
    log: &dyn Fn(&str),
    what: &str,
    f: impl FnOnce() -> Result<T, ImageError>,
) -> Result<T, ImageError> {
    log(&format!("{what} ..."));
    let t = Instant::now();
    let r = f()?;
    log(&format!("{what}: {:.1}s", t.elapsed().as_secs_f64()));
    Ok(r)
}

/// The published image `name` if its manifest has `digest` and its files
/// still have the digests it records.
fn up_to_date(store: &ImageStore, name: &str, digest: &str) -> Option<Image> {
    let image = store.get(name).ok()?;
    if image.manifest.input_digest != digest {
        return None;
    }
    let ok = |path: PathBuf, want: &str| sha256_file(&path).is_ok_and(|(d, _)| d == want);
    (ok(image.kernel_path(), &image.manifest.kernel.sha256)
        && ok(image.initrd_path(), &image.manifest.initrd.sha256))
    .then_some(image)
}

/// Installs the agent as `/init`, the modules under `/lib/modules`, their
/// list and `/etc/hostname` into `tree`; returns the module paths as
/// listed (relative to `/`).
fn populate(
    tree: &Path,
    agent: &Path,
    kroot: &Path,
    modules: &[PathBuf],
) -> Result<Vec<String>, ImageError> {
    copy_synced(agent, &tree.join("init"), 0o755)?;
    let mut listed = Vec::new();
    for rel in modules {
        let dst = tree.join(rel);
        if let Some(parent) = dst.parent() {
            std::fs::create_dir_all(parent).map_err(ImageError::io("create", parent))?;
        }
        copy_synced(&kroot.join(rel), &dst, 0o644)?;
        listed.push(rel.to_string_lossy().into_owned());
    }
    let list = tree.join(MODULES_LIST);
    let etc_forkd = list.parent().expect("has a parent");
    create_dir_0755(etc_forkd)?;
    write_file(&list, format!("{}\n", listed.join("\n")).as_bytes())?;
    write_file(&tree.join("etc/hostname"), HOSTNAME.as_bytes())?;
    Ok(listed)
}

fn make_manifest(
    dir: &Path,
    opts: &BuildOptions,
    kpkg: &KernelPackage,
    modules: Vec<String>,
    agent_sha256: String,
    input_digest: String,
) -> Result<Manifest, ImageError> {
    let (ksha, kbytes) = sha256_file(&dir.join(KERNEL_FILE))?;
    let (isha, ibytes) = sha256_file(&dir.join(INITRD_FILE))?;
    Ok(Manifest {
        format: FORMAT,
        name: opts.name.clone(),
        kernel: KernelFile {
            path: KERNEL_FILE.into(),
            sha256: ksha,
            bytes: kbytes,
            release: kpkg.release().to_string(),
            package: kpkg.name.clone(),
            version: kpkg.version.clone(),
        },
        initrd: ImageFile {
            path: INITRD_FILE.into(),
            sha256: isha,
            bytes: ibytes,
        },
        kernel_args: opts.kernel_args.clone(),
        memory_mib: opts.memory_mib,
        packages: opts.packages.clone(),
        modules,
        agent_sha256,
        input_digest,
        created: now_rfc3339(),
    })
}

/// Writes the manifest (through a temporary name, fsynced, renamed) and
/// fsyncs `dir`: the last step before publishing.
fn write_manifest(dir: &Path, manifest: &Manifest) -> Result<(), ImageError> {
    let tmp = dir.join(format!(".{MANIFEST_FILE}.tmp"));
    write_file(&tmp, manifest.to_json().as_bytes())?;
    let path = dir.join(MANIFEST_FILE);
    std::fs::rename(&tmp, &path).map_err(ImageError::io("rename", &tmp))?;
    sync_dir(dir)
}

/// Renames the finished `scratch` to `ROOT/name`, replacing an old image.
pub(crate) fn publish(
    store: &ImageStore,
    name: &str,
    scratch: PathBuf,
) -> Result<PathBuf, ImageError> {
    let dest = store.dir_of(name);
    let old = match std::fs::symlink_metadata(&dest) {
        Ok(_) => Some(store.set_aside(name, &dest)?),
        Err(_) => None,
    };
    if let Err(e) = std::fs::rename(&scratch, &dest) {
        // Put the old image back; the scratch dir is left for the next
        // build's clean-up.
        if let Some(old) = &old {
            let _ = std::fs::rename(old, &dest);
        }
        return Err(ImageError::io("rename", scratch)(e));
    }
    sync_dir(store.root())?;
    if let Some(old) = old {
        std::fs::remove_dir_all(&old).map_err(ImageError::io("remove", &old))?;
    }
    Ok(dest)
}

/// Creates the store's root (0755) if missing; missing ancestors (the
/// daemon's data dir, normally) are made 0700, as the daemon wants them.
fn create_store_root(root: &Path) -> Result<(), ImageError> {
    use std::os::unix::fs::DirBuilderExt;
    if root.is_dir() {
        return Ok(());
    }
    if let Some(parent) = root.parent().filter(|p| !p.as_os_str().is_empty()) {
        std::fs::DirBuilder::new()
            .recursive(true)
            .mode(0o700)
            .create(parent)
            .map_err(ImageError::io("create", parent))?;
    }
    create_dir_0755(root)
}

fn create_dir_0755(dir: &Path) -> Result<(), ImageError> {
    std::fs::create_dir_all(dir).map_err(ImageError::io("create", dir))?;
    set_mode(dir, 0o755)
}

fn set_mode(path: &Path, mode: u32) -> Result<(), ImageError> {
    std::fs::set_permissions(path, Permissions::from_mode(mode))
        .map_err(ImageError::io("chmod", path))
}

/// Copies `src` to a new `dst` with `mode`, fsynced.
fn copy_synced(src: &Path, dst: &Path, mode: u32) -> Result<(), ImageError> {
    let mut from = File::open(src).map_err(ImageError::io("open", src))?;
    let _ = std::fs::remove_file(dst);
    let mut to = File::create(dst).map_err(ImageError::io("create", dst))?;
    std::io::copy(&mut from, &mut to).map_err(ImageError::io("write", dst))?;
    to.set_permissions(Permissions::from_mode(mode))
        .map_err(ImageError::io("chmod", dst))?;
    to.sync_all().map_err(ImageError::io("fsync", dst))
}

/// Writes `data` to a new `path` (mode 0644), fsynced.
fn write_file(path: &Path, data: &[u8]) -> Result<(), ImageError> {
    use std::io::Write;
    let _ = std::fs::remove_file(path);
    let mut f = File::create(path).map_err(ImageError::io("create", path))?;
    f.write_all(data).map_err(ImageError::io("write", path))?;
    f.set_permissions(Permissions::from_mode(0o644))
        .map_err(ImageError::io("chmod", path))?;
    f.sync_all().map_err(ImageError::io("fsync", path))
}

fn sync_dir(dir: &Path) -> Result<(), ImageError> {
    File::open(dir)
        .and_then(|d| d.sync_all())
        .map_err(ImageError::io("fsync", dir))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::store::tests::fake_image;

    #[test]
    fn default_packages_by_name() {
        assert_eq!(default_packages("debian-python"), ["python3", "procps"]);
        assert_eq!(default_packages("other"), ["procps"]);
    }

    #[test]
    fn publish_replaces_old_image() {
        let root = tempfile::tempdir().unwrap();
        let store = ImageStore::new(root.path());
        fake_image(&store, "a");
        std::fs::write(store.dir_of("a").join("marker"), b"old").unwrap();
        let scratch = root.path().join(".building-a-1");
        std::fs::create_dir(&scratch).unwrap();
        std::fs::write(scratch.join("marker"), b"new").unwrap();
        publish(&store, "a", scratch.clone()).unwrap();
        assert_eq!(
            std::fs::read(store.dir_of("a").join("marker")).unwrap(),
            b"new"
        );
        assert!(!scratch.exists());
        let left: Vec<String> = std::fs::read_dir(root.path())
            .unwrap()
            .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
            .collect();
        assert_eq!(left, ["a"]);
    }

    #[test]
    fn populate_installs_init_modules_hostname() {
        let t = tempfile::tempdir().unwrap();
        let (tree, kroot) = (t.path().join("tree"), t.path().join("k"));
        std::fs::create_dir_all(tree.join("etc")).unwrap();
        std::fs::create_dir_all(tree.join("usr/lib")).unwrap();
        std::os::unix::fs::symlink("usr/lib", tree.join("lib")).unwrap();
        let m = PathBuf::from("lib/modules/r/kernel/virtio.ko");
        std::fs::create_dir_all(kroot.join("lib/modules/r/kernel")).unwrap();
        std::fs::write(kroot.join(&m), b"ko").unwrap();
        let agent = t.path().join("agent");
        std::fs::write(&agent, b"agent").unwrap();
        let listed = populate(&tree, &agent, &kroot, std::slice::from_ref(&m)).unwrap();
        assert_eq!(listed, ["lib/modules/r/kernel/virtio.ko"]);
        assert_eq!(std::fs::read(tree.join("init")).unwrap(), b"agent");
        let mode = std::fs::metadata(tree.join("init"))
            .unwrap()
            .permissions()
            .mode();
        assert_eq!(mode & 0o777, 0o755);
        assert_eq!(
            std::fs::read_to_string(tree.join(MODULES_LIST)).unwrap(),
            "lib/modules/r/kernel/virtio.ko\n"
        );
        assert!(tree.join("usr/lib/modules/r/kernel/virtio.ko").is_file());
        assert_eq!(
            std::fs::read_to_string(tree.join("etc/hostname")).unwrap(),
            "forkd\n"
        );
    }
}
