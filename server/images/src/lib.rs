//! Guest images of forkd: a Debian kernel plus an initramfs holding the
//! whole Debian userland with `forkd-agent` as `/init`. [`ImageStore`]
//! finds and removes images; [`build()`] makes them. See DESIGN.md.

mod apt;
mod build;
mod cmd;
mod digest;
mod error;
mod initramfs;
mod kernel;
mod lock;
mod manifest;
mod modules;
mod name;
mod rootfs;
mod store;

pub use build::{build, default_packages, BuildOptions, BuildOutcome};
pub use error::ImageError;
pub use kernel::KernelPackage;
pub use manifest::{
    input_digest, BuildInputs, ImageFile, KernelFile, Manifest, DEFAULT_MEMORY_MIB, FORMAT,
    MANIFEST_FILE,
};
pub use modules::GUEST_MODULES;
pub use name::{validate_name, DEFAULT_IMAGE};
pub use store::{Image, ImageStore};
