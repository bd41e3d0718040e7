//! `forkd-store`: the snapshot store. One job: durable snapshots on disk.
//!
//! ```text
//! <root>/<tag>/manifest.json   what the snapshot is, its digests (see Manifest)
//! <root>/<tag>/vmstate         the VMM's saved vCPU/device state (opaque)
//! <root>/<tag>/memory          guest RAM, sparse: holes are zero pages
//! <root>/<tag>/pages           diffs: bitmap of the pages the diff holds
//! <root>/.<tag>.writing/       a snapshot being written (never listed READY)
//! <root>/.<tag>.deleting/      a snapshot being deleted
//! ```
//!
//! The files of a snapshot directory, the page size and the bitmap's
//! layout are `forkd-snapshot-format`'s: the VMM writes by the same rules.
//!
//! A snapshot is begun ([`Store::begin`]), written by the VMM into
//! [`Pending::dir`], then committed ([`Store::commit`]: digests, fsync,
//! one rename publishes it READY) or failed ([`Store::fail`]: a FAILED
//! manifest remains, the data is removed). [`Store::open`] recovers after a
//! crash. [`Store::load_memory`] verifies a snapshot's chain and assembles
//! its memory into a sealed memfd. See DESIGN.md for the reasons.
//!
//! Every call does blocking I/O; async callers should use a blocking pool.

mod assemble;
mod digest;
mod error;
mod fsio;
mod huge;
mod manifest;
mod recovery;
mod store;
mod tag;

pub use assemble::SealedMemory;
pub use error::{ErrorKind, Result, StoreError};
pub use manifest::{GuestConfig, Manifest, Mode, Status, CHUNK_SIZE, FORMAT_VERSION};
pub use recovery::{RecoveryReport, STOPPED_WHILE_WRITING};
pub use store::{Pending, RunningChild, SnapshotInfo, Store, Written};
pub use tag::{generate_tag, validate_tag, MAX_TAG_LEN};

#[cfg(test)]
mod tests;
