//! Recovery at open: rebuild the index from the directory, and make sure
//! nothing that is not complete and intact is ever listed READY.
//!
//! Recovery never deletes a committed snapshot's data: what it cannot
//! validate is marked FAILED (with the reason) and kept for inspection.
//! Only half-written (`.<tag>.writing`) and half-deleted (`.<tag>.deleting`)
//! directories lose their data.

use std::collections::BTreeMap;
use std::path::Path;

use crate::digest::sha256_hex;
use crate::error::{Result, StoreError};
use crate::fsio::sync_dir;
use crate::manifest::{GuestConfig, Manifest, Mode, Status, FORMAT_VERSION};
use crate::store::{
    mark_failed, mark_failed_keeping_data, write_failed_keeping_data, write_tombstone, Entry,
};
use crate::tag::validate_tag;
use forkd_snapshot_format::{MANIFEST, MEMORY, PAGES, VMSTATE};

/// The reason given to snapshots found half-written.
pub const STOPPED_WHILE_WRITING: &str = "daemon stopped while writing";

/// What [`crate::Store::open`] found and did.
#[derive(Debug, Default, Clone, PartialEq, Eq)]
pub struct RecoveryReport {
    /// READY snapshots, listed as they were.
    pub ready: Vec<String>,
    /// FAILED snapshots found as such.
    pub failed: Vec<String>,
    /// Snapshots made FAILED now, with the reason. A committed snapshot
    /// keeps its data files (and its original manifest as
    /// `manifest.orig.json`); a half-written one keeps only its manifest.
    pub marked_failed: Vec<(String, String)>,
    /// READY diffs whose chain is broken (an ancestor missing, not READY,
    /// or not the one they were taken against), with why. They stay READY
    /// in their own files; spawning from them is refused until the chain
    /// is whole.
    pub broken_chains: Vec<(String, String)>,
    /// Leftovers removed (interrupted deletes, a writing directory whose
    /// tag exists).
    pub removed: Vec<String>,
    /// Entries that are not snapshots of this format; left untouched and
    /// not listed.
    pub ignored: Vec<String>,
}

/// Reads every snapshot under `root`, fails what is incomplete, and
/// returns the index.
pub(crate) fn recover(root: &Path) -> Result<(BTreeMap<String, Entry>, RecoveryReport)> {
    let mut report = RecoveryReport::default();
    let mut index = BTreeMap::new();
    let mut writing = Vec::new();
    let mut names: Vec<String> = Vec::new();
    for entry in std::fs::read_dir(root).map_err(StoreError::io("reading", root))? {
        let entry = entry.map_err(StoreError::io("reading", root))?;
        let name = entry.file_name().to_string_lossy().into_owned();
        let is_dir = entry.file_type().map(|t| t.is_dir()).unwrap_or(false);
        if !is_dir {
            report.ignored.push(name);
            continue;
        }
        names.push(name);
    }
    names.sort();
    for name in names {
        let dir = root.join(&name);
        if let Some(tag) = hidden_tag(&name, ".deleting") {
            let _ = tag;
            std::fs::remove_dir_all(&dir).map_err(StoreError::io("removing", &dir))?;
            report.removed.push(name);
        } else if let Some(tag) = hidden_tag(&name, ".writing") {
            writing.push((tag.to_string(), name));
        } else if validate_tag(&name).is_ok() {
            if let Some(e) = recover_one(&dir, &name, &mut report)? {
                index.insert(name, e);
            }
        } else {
            report.ignored.push(name);
        }
    }
    for (tag, name) in writing {
        let dir = root.join(&name);
        if index.contains_key(&tag) {
            std::fs::remove_dir_all(&dir).map_err(StoreError::io("removing", &dir))?;
            report.removed.push(name);
            continue;
        }
        // Whatever its manifest says, a hidden directory was never
        // published: FAILED.
        let mut m = read_manifest(&dir)
            .ok()
            .filter(|(m, _)| m.tag == tag && m.format_version == FORMAT_VERSION)
            .map(|(m, _)| m)
            .unwrap_or_else(|| placeholder(&tag));
        mark_failed(&mut m, STOPPED_WHILE_WRITING);
        let bytes = m.to_bytes();
        write_tombstone(&dir, &bytes)?;
        let final_dir = root.join(&tag);
        std::fs::rename(&dir, &final_dir).map_err(StoreError::io("renaming", &dir))?;
        report
            .marked_failed
            .push((tag.clone(), STOPPED_WHILE_WRITING.to_string()));
        index.insert(
            tag,
            Entry {
                manifest: m,
                digest: Some(sha256_hex(&bytes)),
            },
        );
    }
    report.broken_chains = broken_chains(&index);
    sync_dir(root).map_err(StoreError::io("fsyncing", root))?;
    report.ready = index
        .values()
        .filter(|e| e.manifest.status == Status::Ready)
        .map(|e| e.manifest.tag.clone())
        .collect();
    Ok((index, report))
}

/// `tag` of a name `.<tag><suffix>` whose tag is valid.
fn hidden_tag<'a>(name: &'a str, suffix: &str) -> Option<&'a str> {
    let tag = name.strip_prefix('.')?.strip_suffix(suffix)?;
    validate_tag(tag).ok().map(|_| tag)
}

fn read_manifest(dir: &Path) -> std::result::Result<(Manifest, Vec<u8>), String> {
    let bytes = std::fs::read(dir.join(MANIFEST)).map_err(|e| format!("{MANIFEST}: {e}"))?;
    let m: Manifest =
        serde_json::from_slice(&bytes).map_err(|e| format!("{MANIFEST} is unreadable: {e}"))?;
    Ok((m, bytes))
}

/// A manifest for a snapshot whose own is missing or unreadable.
fn placeholder(tag: &str) -> Manifest {
    let unknown = GuestConfig {
        memory_mib: 0,
        vcpus: 0,
        huge_pages: false,
    };
    Manifest::begun(
        tag,
        None,
        Mode::Full,
        Status::Failed,
        String::new(),
        unknown,
    )
}

/// Recovers `<root>/<tag>`: `None` if it must be ignored (a newer format).
fn recover_one(dir: &Path, tag: &str, report: &mut RecoveryReport) -> Result<Option<Entry>> {
    let (mut m, bytes, problem) = match read_manifest(dir) {
        Ok((m, _)) if m.format_version != FORMAT_VERSION => {
            report.ignored.push(tag.to_string());
            return Ok(None);
        }
        Ok((m, _)) if m.tag != tag => {
            let why = format!("{MANIFEST} names tag {:?}", m.tag);
            (placeholder(tag), Vec::new(), Some(why))
        }
        Ok((m, bytes)) => {
            let problem = match m.status {
                Status::Failed => None,
                Status::Writing => Some(STOPPED_WHILE_WRITING.to_string()),
                Status::Ready => check_files(dir, &m).err(),
            };
            (m, bytes, problem)
        }
        Err(why) => (placeholder(tag), Vec::new(), Some(why)),
    };
    let Some(why) = problem else {
        if m.status == Status::Failed {
            report.failed.push(tag.to_string());
        }
        return Ok(Some(Entry {
            manifest: m,
            digest: Some(sha256_hex(&bytes)),
        }));
    };
    // A committed directory: mark it FAILED, keep its data for inspection.
    mark_failed_keeping_data(&mut m, &why);
    let bytes = m.to_bytes();
    write_failed_keeping_data(dir, &bytes)?;
    report.marked_failed.push((tag.to_string(), why));
    Ok(Some(Entry {
        manifest: m,
        digest: Some(sha256_hex(&bytes)),
    }))
}

/// Cheap checks that a READY snapshot's files are all there with the
/// right sizes (digests are checked when memory is loaded).
fn check_files(dir: &Path, m: &Manifest) -> std::result::Result<(), String> {
    let size = |name: &str| -> std::result::Result<u64, String> {
        std::fs::metadata(dir.join(name))
            .map(|md| md.len())
            .map_err(|e| format!("{name} is missing ({e})"))
    };
    let memory = size(MEMORY)?;
    if memory != m.memory_bytes {
        return Err(format!(
            "{MEMORY} is {memory} bytes, the manifest says {}",
            m.memory_bytes
        ));
    }
    if size(VMSTATE)? == 0 {
        return Err(format!("{VMSTATE} is empty"));
    }
    if m.vmstate_sha256.is_none() || m.chunk_size == 0 || m.memory_chunks.len() != m.chunk_count() {
        return Err(format!("{MANIFEST} lacks digests"));
    }
    if m.mode == Mode::Diff {
        if m.parent.is_none() || m.parent_digest.is_none() || m.pages_sha256.is_none() {
            return Err(format!("{MANIFEST} of a diff lacks its parent or digests"));
        }
        let pages = size(PAGES)?;
        if pages != m.bitmap_bytes() {
            return Err(format!(
                "{PAGES} is {pages} bytes, expected {}",
                m.bitmap_bytes()
            ));
        }
    }
    Ok(())
}

/// READY diffs whose chain is broken, with why: the first ancestor that is
/// missing, not READY, or not the manifest its child was taken against.
/// Nothing is changed: each diff is judged on its own files, and loading
/// its memory refuses the broken chain (FAILED_PRECONDITION).
fn broken_chains(index: &BTreeMap<String, Entry>) -> Vec<(String, String)> {
    index
        .values()
        .filter(|e| e.manifest.status == Status::Ready && e.manifest.parent.is_some())
        .filter_map(|e| {
            chain_problem(index, e)
                .map(|(ancestor, why)| (e.manifest.tag.clone(), format!("{ancestor} {why}")))
        })
        .collect()
}

/// The first broken link above `leaf`: (ancestor, what is wrong with it).
pub(crate) fn chain_problem(
    index: &BTreeMap<String, Entry>,
    leaf: &Entry,
) -> Option<(String, String)> {
    let mut child = leaf;
    let mut seen = vec![leaf.manifest.tag.as_str()];
    while let Some(parent) = child.manifest.parent.as_deref() {
        let why = match index.get(parent) {
            None => "is missing (was it deleted?)".to_string(),
            Some(p) if p.manifest.status != Status::Ready => match &p.manifest.failure_reason {
                Some(r) if !r.is_empty() => format!("is {} ({r})", p.manifest.status),
                _ => format!("is {}", p.manifest.status),
            },
            Some(p) if p.digest != child.manifest.parent_digest => {
                "is not the snapshot its diff was taken against (its manifest changed)".to_string()
            }
            Some(p) if seen.contains(&p.manifest.tag.as_str()) => "is part of a cycle".to_string(),
            Some(p) => {
                seen.push(p.manifest.tag.as_str());
                child = p;
                continue;
            }
        };
        return Some((parent.to_string(), why));
    }
    None
}
