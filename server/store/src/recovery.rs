//! Recovery at open: rebuild the index from the directory, and make sure
//! nothing that is not complete and intact is ever listed READY.

use std::collections::BTreeMap;
use std::path::Path;

use crate::digest::sha256_hex;
use crate::error::{Result, StoreError};
use crate::fsio::sync_dir;
use crate::manifest::{GuestConfig, Manifest, Mode, Status, FORMAT_VERSION};
use crate::store::{mark_failed, write_tombstone, Entry, MANIFEST, MEMORY, PAGES, VMSTATE};
use crate::tag::validate_tag;

/// The reason given to snapshots found half-written.
pub const STOPPED_WHILE_WRITING: &str = "daemon stopped while writing";

/// What [`crate::Store::open`] found and did.
#[derive(Debug, Default, Clone, PartialEq, Eq)]
pub struct RecoveryReport {
    /// READY snapshots, listed as they were.
    pub ready: Vec<String>,
    /// FAILED snapshots found as such.
    pub failed: Vec<String>,
    /// Snapshots made FAILED now, with the reason.
    pub marked_failed: Vec<(String, String)>,
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
    fail_broken_chains(root, &mut index, &mut report)?;
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
    mark_failed(&mut m, &why);
    let bytes = m.to_bytes();
    write_tombstone(dir, &bytes)?;
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

/// Fails READY diffs whose parent is missing, not READY, or not the
/// manifest they were taken against; repeats until nothing changes, so a
/// broken link fails everything below it.
fn fail_broken_chains(
    root: &Path,
    index: &mut BTreeMap<String, Entry>,
    report: &mut RecoveryReport,
) -> Result<()> {
    loop {
        let broken: Vec<(String, String)> = index
            .values()
            .filter(|e| e.manifest.status == Status::Ready)
            .filter_map(|e| {
                let parent = e.manifest.parent.as_ref()?;
                let why = match index.get(parent) {
                    None => format!("parent {parent} is missing"),
                    Some(p) if p.manifest.status != Status::Ready => {
                        format!("parent {parent} is {}", p.manifest.status)
                    }
                    Some(p) if p.digest != e.manifest.parent_digest => {
                        format!("parent {parent}'s manifest changed since this diff was taken")
                    }
                    Some(_) => return None,
                };
                Some((e.manifest.tag.clone(), why))
            })
            .collect();
        if broken.is_empty() {
            return Ok(());
        }
        for (tag, why) in broken {
            let e = index.get_mut(&tag).expect("present");
            mark_failed(&mut e.manifest, &why);
            let bytes = e.manifest.to_bytes();
            e.digest = Some(sha256_hex(&bytes));
            write_tombstone(&root.join(&tag), &bytes)?;
            report.marked_failed.push((tag, why));
        }
    }
}
