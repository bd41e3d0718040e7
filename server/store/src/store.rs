//! [`Store`]: the index of snapshots, and the operations that change them
//! on disk: begin, commit, fail, delete.

use std::collections::{BTreeMap, HashSet, VecDeque};
use std::os::unix::fs::MetadataExt;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex, MutexGuard};

use crate::digest::{memory_chunks, sha256_hex};
use crate::error::{Result, StoreError};
use crate::fsio::{remove_all_but, sync_dir, sync_file, write_atomic};
use crate::manifest::{GuestConfig, Manifest, Mode, Status};
use crate::recovery::{recover, RecoveryReport};
use crate::tag::validate_tag;
use forkd_snapshot_format::{MANIFEST, MEMORY, ORIGINAL_MANIFEST, PAGES, VMSTATE};

/// A snapshot in the index: its manifest and the digest of the manifest's
/// bytes on disk (what a diff's `parent_digest` must equal).
#[derive(Clone, Debug)]
pub(crate) struct Entry {
    pub manifest: Manifest,
    /// Hex SHA-256 of `manifest.json` as on disk; `None` while writing.
    pub digest: Option<String>,
}

/// What a new snapshot is, given when it is begun.
#[derive(Clone, Debug)]
pub struct SnapshotInfo {
    /// How memory is captured.
    pub mode: Mode,
    /// For [`Mode::Diff`]: the snapshot this one is a diff against (must be
    /// READY). Ignored for other modes.
    pub parent: Option<String>,
    /// The sandbox it is taken from.
    pub source_sandbox: String,
    /// The guest's shape; fixes `memory_bytes`.
    pub guest: GuestConfig,
    /// The Linux image the guest booted; `None` for the reference guest.
    pub image: Option<String>,
}

/// What the VMM reported once it wrote the files.
#[derive(Clone, Copy, Debug, Default)]
pub struct Written {
    /// Bytes of guest RAM (the size the `memory` file must have).
    pub memory_bytes: u64,
    /// Bytes of memory data written.
    pub data_bytes: u64,
    /// Pages in the diff, or dirtied in the epoch.
    pub dirty_pages: u64,
    /// How long the vCPUs were stopped.
    pub pause_us: u64,
}

/// A sandbox forked from a snapshot, as [`Store::delete`] needs to know it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct RunningChild {
    /// The sandbox id.
    pub sandbox_id: String,
    /// The snapshot it was forked from.
    pub tag: String,
}

pub(crate) struct Inner {
    pub root: PathBuf,
    pub index: Mutex<BTreeMap<String, Entry>>,
}

/// The snapshot store under one directory. Cheap to clone (all clones
/// share one index); every method does blocking I/O.
#[derive(Clone)]
pub struct Store {
    pub(crate) inner: Arc<Inner>,
}

impl std::fmt::Debug for Store {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Store")
            .field("root", &self.inner.root)
            .finish()
    }
}

/// A snapshot being written: the VMM writes its files into [`Pending::dir`].
/// Hand it to [`Store::commit`] or [`Store::fail`]; dropping it fails the
/// snapshot ("abandoned before commit").
#[derive(Debug)]
pub struct Pending {
    store: Store,
    tag: String,
    dir: PathBuf,
    done: bool,
}

impl Pending {
    /// The snapshot's tag.
    pub fn tag(&self) -> &str {
        &self.tag
    }

    /// The (hidden) directory the VMM writes `vmstate`, `memory` and
    /// `pages` into.
    pub fn dir(&self) -> &Path {
        &self.dir
    }
}

impl Drop for Pending {
    fn drop(&mut self) {
        if !self.done {
            let _ = self
                .store
                .fail_writing(&self.tag, &self.dir, "abandoned before commit");
        }
    }
}

impl Store {
    /// Opens (creating if needed) the store at `root` and recovers it:
    /// READY snapshots whose files are in place are listed; anything
    /// half-written or damaged becomes FAILED. See [`RecoveryReport`].
    pub fn open(root: &Path) -> Result<(Store, RecoveryReport)> {
        std::fs::create_dir_all(root).map_err(StoreError::io("creating", root))?;
        let (index, report) = recover(root)?;
        let store = Store {
            inner: Arc::new(Inner {
                root: root.to_path_buf(),
                index: Mutex::new(index),
            }),
        };
        Ok((store, report))
    }

    /// The store's directory.
    pub fn root(&self) -> &Path {
        &self.inner.root
    }

    /// Directory of the snapshot `tag` once committed (or failed).
    pub fn snapshot_dir(&self, tag: &str) -> PathBuf {
        self.inner.root.join(tag)
    }

    pub(crate) fn writing_dir(&self, tag: &str) -> PathBuf {
        writing_dir(&self.inner.root, tag)
    }

    pub(crate) fn index(&self) -> MutexGuard<'_, BTreeMap<String, Entry>> {
        // Index updates are single inserts/removes: consistent across a
        // panic, so poisoning is ignored.
        self.inner.index.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Starts a snapshot: reserves `tag` (ALREADY_EXISTS if it exists or is
    /// being written) and creates the directory the VMM writes into. The
    /// snapshot is listed as WRITING until committed or failed.
    pub fn begin(&self, tag: &str, info: SnapshotInfo) -> Result<Pending> {
        validate_tag(tag)?;
        let parent = match info.mode {
            Mode::Diff => Some(info.parent.clone().ok_or_else(|| StoreError::BadFiles {
                tag: tag.into(),
                detail: "a diff snapshot needs a parent".into(),
            })?),
            Mode::Full | Mode::Live => None,
        };
        let mut manifest = Manifest::begun(
            tag,
            parent.clone(),
            info.mode,
            Status::Writing,
            info.source_sandbox,
            info.guest,
        );
        manifest.image = info.image;
        {
            let mut index = self.index();
            if let Some(e) = index.get(tag) {
                return Err(StoreError::AlreadyExists {
                    tag: tag.into(),
                    status: e.manifest.status,
                });
            }
            if let Some(parent) = &parent {
                check_parent(&index, tag, parent, manifest.memory_bytes)?;
            }
            index.insert(
                tag.to_string(),
                Entry {
                    manifest: manifest.clone(),
                    digest: None,
                },
            );
        }
        let dir = self.writing_dir(tag);
        let created = (|| {
            if dir.exists() {
                std::fs::remove_dir_all(&dir)?;
            }
            std::fs::create_dir(&dir)?;
            // Informational only: recovery fails any hidden writing
            // directory whatever this says.
            std::fs::write(dir.join(MANIFEST), manifest.to_bytes())
        })();
        if let Err(source) = created {
            self.index().remove(tag);
            let _ = std::fs::remove_dir_all(&dir);
            return Err(StoreError::Io {
                op: "creating",
                path: dir,
                source,
            });
        }
        Ok(Pending {
            store: self.clone(),
            tag: tag.to_string(),
            dir,
            done: false,
        })
    }

    /// Completes a snapshot: checks the files, computes the digests, makes
    /// every file durable, then publishes `<tag>/` with a READY manifest by
    /// one rename. On any error the snapshot becomes FAILED (with the error
    /// as its reason) and the error is returned.
    pub fn commit(&self, mut pending: Pending, written: Written) -> Result<Manifest> {
        pending.done = true;
        match self.try_commit(&pending, written) {
            Ok(m) => Ok(m),
            Err(e) => {
                let _ = self.fail_writing(&pending.tag, &pending.dir, &e.to_string());
                Err(e)
            }
        }
    }

    fn try_commit(&self, pending: &Pending, written: Written) -> Result<Manifest> {
        let tag = &pending.tag;
        let dir = &pending.dir;
        let mut m = self.get(tag)?;
        let bad = |detail: String| StoreError::BadFiles {
            tag: tag.clone(),
            detail,
        };
        if written.memory_bytes != m.memory_bytes {
            return Err(bad(format!(
                "the VMM reports {} bytes of guest RAM; the sandbox has {}",
                written.memory_bytes, m.memory_bytes
            )));
        }
        let memory_path = dir.join(MEMORY);
        let memory = std::fs::File::open(&memory_path)
            .map_err(|e| bad(format!("cannot open {MEMORY}: {e}")))?;
        let meta = memory
            .metadata()
            .map_err(StoreError::io("reading", &memory_path))?;
        if meta.len() != m.memory_bytes {
            return Err(bad(format!(
                "{MEMORY} is {} bytes, guest RAM is {}",
                meta.len(),
                m.memory_bytes
            )));
        }
        let vmstate_path = dir.join(VMSTATE);
        let vmstate =
            std::fs::read(&vmstate_path).map_err(|e| bad(format!("cannot read {VMSTATE}: {e}")))?;
        if vmstate.is_empty() {
            return Err(bad(format!("{VMSTATE} is empty")));
        }
        let pages_sha256 = if m.mode == Mode::Diff {
            let pages = std::fs::read(dir.join(PAGES))
                .map_err(|e| bad(format!("cannot read {PAGES}: {e}")))?;
            if pages.len() as u64 != m.bitmap_bytes() {
                return Err(bad(format!(
                    "{PAGES} is {} bytes, expected {} (one bit per 4 KiB page)",
                    pages.len(),
                    m.bitmap_bytes()
                )));
            }
            Some(sha256_hex(&pages))
        } else {
            None
        };
        m.memory_chunks = memory_chunks(&memory, m.memory_bytes, m.chunk_size)
            .map_err(StoreError::io("hashing", &memory_path))?;
        m.vmstate_sha256 = Some(sha256_hex(&vmstate));
        m.pages_sha256 = pages_sha256;
        m.disk_bytes = meta.blocks() * 512;
        m.data_bytes = written.data_bytes;
        m.dirty_pages = written.dirty_pages;
        m.pause_us = written.pause_us;
        m.status = Status::Ready;
        if let Some(parent) = &m.parent {
            let index = self.index();
            check_parent(&index, tag, parent, m.memory_bytes)?;
            m.parent_digest = index[parent].digest.clone();
        }
        // 1. Every data file durable.
        memory
            .sync_all()
            .map_err(StoreError::io("fsyncing", &memory_path))?;
        drop(memory);
        sync_file(&vmstate_path).map_err(StoreError::io("fsyncing", &vmstate_path))?;
        if m.mode == Mode::Diff {
            let p = dir.join(PAGES);
            sync_file(&p).map_err(StoreError::io("fsyncing", &p))?;
        }
        // 2. The READY manifest durable, and the directory's entries.
        let bytes = m.to_bytes();
        let manifest_path = dir.join(MANIFEST);
        write_atomic(&manifest_path, &bytes).map_err(StoreError::io("writing", &manifest_path))?;
        // 3. Publish: one rename, then make the rename durable.
        let final_dir = self.snapshot_dir(tag);
        std::fs::rename(dir, &final_dir).map_err(StoreError::io("renaming", dir))?;
        sync_dir(self.root()).map_err(StoreError::io("fsyncing", self.root()))?;
        self.index().insert(
            tag.clone(),
            Entry {
                manifest: m.clone(),
                digest: Some(sha256_hex(&bytes)),
            },
        );
        Ok(m)
    }

    /// Fails a snapshot: removes whatever was written and leaves a FAILED
    /// manifest at `<tag>/manifest.json` carrying `reason`.
    pub fn fail(&self, mut pending: Pending, reason: &str) -> Result<Manifest> {
        pending.done = true;
        self.fail_writing(&pending.tag, &pending.dir, reason)
    }

    fn fail_writing(&self, tag: &str, dir: &Path, reason: &str) -> Result<Manifest> {
        let mut m = match self.index().get(tag) {
            Some(e) => e.manifest.clone(),
            None => {
                return Err(StoreError::NotFound {
                    tag: tag.to_string(),
                })
            }
        };
        mark_failed(&mut m, reason);
        let bytes = m.to_bytes();
        // The index says FAILED even if the disk cannot be updated; recovery
        // then fails the leftover writing directory.
        self.index().insert(
            tag.to_string(),
            Entry {
                manifest: m.clone(),
                digest: Some(sha256_hex(&bytes)),
            },
        );
        let final_dir = self.snapshot_dir(tag);
        if !dir.exists() && final_dir.exists() {
            // The commit failed after publishing (fsync of the store
            // directory): fail the published directory instead.
            write_tombstone(&final_dir, &bytes)?;
        } else {
            write_tombstone(dir, &bytes)?;
            std::fs::rename(dir, &final_dir).map_err(StoreError::io("renaming", dir))?;
        }
        sync_dir(self.root()).map_err(StoreError::io("fsyncing", self.root()))?;
        Ok(m)
    }

    /// The snapshot's manifest (WRITING ones included).
    pub fn get(&self, tag: &str) -> Result<Manifest> {
        self.index()
            .get(tag)
            .map(|e| e.manifest.clone())
            .ok_or_else(|| StoreError::NotFound {
                tag: tag.to_string(),
            })
    }

    /// Every snapshot, oldest first.
    pub fn list(&self) -> Vec<Manifest> {
        let mut all: Vec<Manifest> = self.index().values().map(|e| e.manifest.clone()).collect();
        all.sort_by(|a, b| (&a.created_at, &a.tag).cmp(&(&b.created_at, &b.tag)));
        all
    }

    /// The snapshot and its ancestors: this one first, up to the full root
    /// (or to the first ancestor that no longer exists).
    pub fn chain(&self, tag: &str) -> Result<Vec<Manifest>> {
        let index = self.index();
        let mut out: Vec<Manifest> = Vec::new();
        let mut next = Some(tag.to_string());
        while let Some(t) = next {
            let Some(e) = index.get(&t) else {
                if out.is_empty() {
                    return Err(StoreError::NotFound { tag: t });
                }
                break;
            };
            if out.iter().any(|m| m.tag == t) {
                break; // a cycle cannot be committed; never loop on one
            }
            next = e.manifest.parent.clone();
            out.push(e.manifest.clone());
        }
        Ok(out)
    }

    /// Tags of the snapshots that are diffs against `tag` (WRITING ones
    /// included), oldest first.
    pub fn dependents(&self, tag: &str) -> Vec<String> {
        direct_dependents(&self.index(), tag)
    }

    /// Deletes `tag` (and with `cascade` every snapshot depending on it);
    /// returns the deleted tags, dependents first and `tag` last.
    ///
    /// - With dependents, and neither `cascade` nor `force`:
    ///   FAILED_PRECONDITION naming them.
    /// - With `running` children of a snapshot to be deleted, and no
    ///   `force`: FAILED_PRECONDITION naming them.
    /// - `force` without `cascade` deletes only `tag`; its dependents (and
    ///   theirs) become FAILED, their data removed.
    /// - A snapshot that is WRITING, or has a WRITING dependent, cannot be
    ///   deleted yet.
    pub fn delete(
        &self,
        tag: &str,
        cascade: bool,
        force: bool,
        running: &[RunningChild],
    ) -> Result<Vec<String>> {
        let mut index = self.index();
        let entry = index.get(tag).ok_or_else(|| StoreError::NotFound {
            tag: tag.to_string(),
        })?;
        if entry.manifest.status == Status::Writing {
            return Err(StoreError::StillWriting {
                tag: tag.to_string(),
            });
        }
        let descendants = descendants(&index, tag);
        if let Some(w) = descendants
            .iter()
            .find(|d| index[d.as_str()].manifest.status == Status::Writing)
        {
            return Err(StoreError::StillWriting { tag: w.clone() });
        }
        let direct = direct_dependents(&index, tag);
        if !direct.is_empty() && !cascade && !force {
            return Err(StoreError::HasDependents {
                tag: tag.to_string(),
                dependents: direct,
            });
        }
        // Leaves first: reverse breadth-first order puts every child before
        // its parent.
        let mut order: Vec<String> = if cascade {
            descendants.iter().rev().cloned().collect()
        } else {
            Vec::new()
        };
        order.push(tag.to_string());
        let doomed: HashSet<&str> = order.iter().map(String::as_str).collect();
        let mut children: Vec<String> = running
            .iter()
            .filter(|c| doomed.contains(c.tag.as_str()))
            .map(|c| c.sandbox_id.clone())
            .collect();
        children.sort();
        if !children.is_empty() && !force {
            return Err(StoreError::HasRunningChildren {
                tag: tag.to_string(),
                children,
            });
        }
        let root = self.root().to_path_buf();
        // Hide each directory by rename (atomic: recovery removes a
        // `.<tag>.deleting` leftover), then remove it.
        for t in &order {
            let from = root.join(t);
            let to = deleting_dir(&root, t);
            std::fs::rename(&from, &to).map_err(StoreError::io("renaming", &from))?;
            index.remove(t);
        }
        sync_dir(&root).map_err(StoreError::io("fsyncing", &root))?;
        for t in &order {
            let dir = deleting_dir(&root, t);
            std::fs::remove_dir_all(&dir).map_err(StoreError::io("removing", &dir))?;
        }
        if !cascade {
            for d in &descendants {
                let why = if direct.contains(d) {
                    format!("parent {tag} was deleted")
                } else {
                    format!("ancestor {tag} was deleted")
                };
                let e = index.get_mut(d.as_str()).expect("descendant indexed");
                if e.manifest.status == Status::Failed {
                    continue;
                }
                mark_failed(&mut e.manifest, &why);
                let bytes = e.manifest.to_bytes();
                e.digest = Some(sha256_hex(&bytes));
                write_tombstone(&root.join(d), &bytes)?;
            }
        }
        Ok(order)
    }
}

/// `<root>/.<tag>.writing`.
pub(crate) fn writing_dir(root: &Path, tag: &str) -> PathBuf {
    root.join(format!(".{tag}.writing"))
}

/// `<root>/.<tag>.deleting`.
pub(crate) fn deleting_dir(root: &Path, tag: &str) -> PathBuf {
    root.join(format!(".{tag}.deleting"))
}

/// Turns `m` into a FAILED tombstone: no data, the reason recorded.
pub(crate) fn mark_failed(m: &mut Manifest, reason: &str) {
    m.status = Status::Failed;
    m.failure_reason = Some(reason.to_string());
    m.disk_bytes = 0;
    m.data_bytes = 0;
    m.memory_chunks.clear();
    m.vmstate_sha256 = None;
    m.pages_sha256 = None;
}

/// Marks a committed snapshot FAILED in place, keeping its data for
/// inspection: `reason` is recorded, every other field stays as it was.
pub(crate) fn mark_failed_keeping_data(m: &mut Manifest, reason: &str) {
    m.status = Status::Failed;
    m.failure_reason = Some(reason.to_string());
}

/// Writes the FAILED manifest `bytes` over a committed snapshot's
/// `manifest.json` durably, touching none of its data files. The manifest
/// it replaces is first copied (and fsynced) to [`ORIGINAL_MANIFEST`],
/// unless an earlier failure already kept one.
pub(crate) fn write_failed_keeping_data(dir: &Path, bytes: &[u8]) -> Result<()> {
    let path = dir.join(MANIFEST);
    let original = dir.join(ORIGINAL_MANIFEST);
    if path.exists() && !original.exists() {
        std::fs::copy(&path, &original).map_err(StoreError::io("copying", &path))?;
        sync_file(&original).map_err(StoreError::io("fsyncing", &original))?;
    }
    write_atomic(&path, bytes).map_err(StoreError::io("writing", &path))
}

/// Removes the data files in `dir` and writes the (FAILED) manifest
/// `bytes` there durably.
pub(crate) fn write_tombstone(dir: &Path, bytes: &[u8]) -> Result<()> {
    remove_all_but(dir, MANIFEST).map_err(StoreError::io("clearing", dir))?;
    let path = dir.join(MANIFEST);
    write_atomic(&path, bytes).map_err(StoreError::io("writing", &path))
}

/// Checks that `parent` can be the parent of the diff `tag`.
fn check_parent(
    index: &BTreeMap<String, Entry>,
    tag: &str,
    parent: &str,
    memory_bytes: u64,
) -> Result<()> {
    let unusable = |why: String| StoreError::ParentUnusable {
        tag: tag.to_string(),
        parent: parent.to_string(),
        why,
    };
    let Some(p) = index.get(parent) else {
        return Err(unusable("does not exist (was it deleted?)".into()));
    };
    if p.manifest.status != Status::Ready {
        return Err(unusable(format!("is {}", p.manifest.status)));
    }
    if p.manifest.memory_bytes != memory_bytes {
        return Err(unusable(format!(
            "has {} bytes of guest RAM, not {memory_bytes}",
            p.manifest.memory_bytes
        )));
    }
    Ok(())
}

fn direct_dependents(index: &BTreeMap<String, Entry>, tag: &str) -> Vec<String> {
    let mut deps: Vec<&Manifest> = index
        .values()
        .map(|e| &e.manifest)
        .filter(|m| m.parent.as_deref() == Some(tag))
        .collect();
    deps.sort_by(|a, b| (&a.created_at, &a.tag).cmp(&(&b.created_at, &b.tag)));
    deps.into_iter().map(|m| m.tag.clone()).collect()
}

/// Every snapshot depending on `tag`, directly or not, breadth-first.
fn descendants(index: &BTreeMap<String, Entry>, tag: &str) -> Vec<String> {
    let mut out = Vec::new();
    let mut queue = VecDeque::from([tag.to_string()]);
    while let Some(t) = queue.pop_front() {
        for d in direct_dependents(index, &t) {
            if d != tag && !out.contains(&d) {
                queue.push_back(d.clone());
                out.push(d);
            }
        }
    }
    out
}
