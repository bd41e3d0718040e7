//! Loading a snapshot's memory: verify every file of its chain against the
//! manifests' digests, assemble root + diffs into a memfd (kept sparse),
//! and seal it so children can map it `MAP_PRIVATE` but nobody can change
//! it.

use std::fs::File;
use std::os::unix::fs::FileExt;
use std::path::Path;

use memfd::{FileSeal, MemfdOptions};
use nix::fcntl::{fallocate, FallocateFlags};

use crate::digest::{chunk_digest, par_chunks, sha256_hex, Chunk, ZeroDigests};
use crate::error::{Result, StoreError};
use crate::huge::HugeMap;
use crate::manifest::{Manifest, Mode, Status};
use crate::recovery::chain_problem;
use crate::store::{mark_failed_keeping_data, write_failed_keeping_data, Store};
use forkd_snapshot_format::{bitmap_has, MANIFEST, MEMORY, PAGES, PAGE_SIZE, VMSTATE};

/// A snapshot's memory in a sealed memfd: size, contents and seals can no
/// longer change. Map it `MAP_PRIVATE` for copy-on-write.
#[derive(Debug)]
pub struct SealedMemory {
    /// The memfd (close-on-exec; sealed shrink, grow, write and seal).
    pub file: File,
    /// Its size: the guest's RAM in bytes.
    pub size: u64,
}

/// Largest run of pages written or punched by one system call.
const MAX_RUN_PAGES: u64 = 256;

impl Store {
    /// Verifies and assembles the memory of the READY snapshot `tag`:
    /// every chunk of every memory file in its chain, every diff's page
    /// bitmap and `tag`'s vmstate must match their digests (else DATA_LOSS
    /// naming the snapshot, file and chunk); then the root's data, and each
    /// diff's pages from root to leaf, go into a fresh memfd, which is
    /// sealed.
    ///
    /// A snapshot found corrupt is marked FAILED on the spot (persisted,
    /// the mismatch as its reason, its files kept for inspection), so it
    /// is listed FAILED from then on.
    pub fn load_memory(&self, tag: &str) -> Result<SealedMemory> {
        let loaded = self.assemble(tag);
        self.fail_on_data_loss(tag, loaded)
    }

    fn assemble(&self, tag: &str) -> Result<SealedMemory> {
        let chain = self.verified_chain(tag)?;
        self.verify_vmstate(tag)?;
        let leaf = &chain[0];
        let huge = leaf.guest.huge_pages;
        let options = MemfdOptions::default()
            .close_on_exec(true)
            .allow_sealing(true);
        // A huge-page guest's children map 2 MiB pages: its memory goes in
        // a hugetlbfs memfd, which is written through a mapping.
        let options = match huge {
            true => options.hugetlb(Some(memfd::HugetlbSize::Huge2MB)),
            false => options,
        };
        let memfd = options
            .create(format!("forkd-snapshot-{tag}"))
            .map_err(|e| io_error("creating a memfd for", tag, memfd_io(e)))?;
        let file = memfd.as_file();
        file.set_len(leaf.memory_bytes)
            .map_err(|e| io_error("sizing the memfd of", tag, e))?;
        {
            let map = match huge {
                true => Some(
                    HugeMap::new(file, leaf.memory_bytes)
                        .map_err(|e| io_error("mapping the huge-page memfd of", tag, e))?,
                ),
                false => None,
            };
            let target = match &map {
                Some(map) => Target::Huge(map),
                None => Target::File(file),
            };
            for (i, m) in chain.iter().rev().enumerate() {
                apply(&self.snapshot_dir(&m.tag), m, i == 0, target)?;
            }
        }
        memfd
            .add_seals(&[
                FileSeal::SealShrink,
                FileSeal::SealGrow,
                FileSeal::SealWrite,
                FileSeal::SealSeal,
            ])
            .map_err(|e| io_error("sealing the memfd of", tag, memfd_io(e)))?;
        Ok(SealedMemory {
            file: memfd.into_file(),
            size: leaf.memory_bytes,
        })
    }

    /// Checks `tag`'s `vmstate` against its digest (cheap: the file is
    /// small). The VMM reads this file when it restores. A mismatch marks
    /// the snapshot FAILED, as in [`Store::load_memory`].
    pub fn verify_vmstate(&self, tag: &str) -> Result<()> {
        let checked = self.check_vmstate(tag);
        self.fail_on_data_loss(tag, checked)
    }

    /// Checks that every ancestor of `tag` is still there, READY and the
    /// snapshot each diff was taken against (in memory only, no disk):
    /// else [`StoreError::ChainBroken`].
    pub fn check_chain(&self, tag: &str) -> Result<()> {
        let index = self.index();
        let entry = index.get(tag).ok_or_else(|| StoreError::NotFound {
            tag: tag.to_string(),
        })?;
        match chain_problem(&index, entry) {
            Some((ancestor, why)) => Err(StoreError::ChainBroken {
                tag: tag.to_string(),
                ancestor,
                why,
            }),
            None => Ok(()),
        }
    }

    /// Marks the READY snapshot `tag` FAILED with `reason`, durably, keeping
    /// its data files (and its manifest as `manifest.orig.json`). Nothing
    /// happens if it is gone or no longer READY. The index says FAILED even
    /// if the disk cannot be updated.
    pub fn mark_corrupt(&self, tag: &str, reason: &str) -> Result<()> {
        let mut index = self.index();
        let Some(entry) = index.get_mut(tag) else {
            return Ok(());
        };
        if entry.manifest.status != Status::Ready {
            return Ok(());
        }
        mark_failed_keeping_data(&mut entry.manifest, reason);
        let bytes = entry.manifest.to_bytes();
        entry.digest = Some(sha256_hex(&bytes));
        write_failed_keeping_data(&self.snapshot_dir(tag), &bytes)
    }

    /// Marks the snapshot a DATA_LOSS error names FAILED, then returns the
    /// result unchanged.
    ///
    /// If `tag` itself is gone by now (deleted while it was being read,
    /// which can make its files vanish mid-read), the answer is NOT_FOUND
    /// rather than an I/O error or a corruption.
    fn fail_on_data_loss<T>(&self, tag: &str, result: Result<T>) -> Result<T> {
        if result.is_err() && self.index().get(tag).is_none() {
            return Err(StoreError::NotFound {
                tag: tag.to_string(),
            });
        }
        if let Err(StoreError::DataLoss { tag, file, detail }) = &result {
            // Best effort: the index says FAILED whatever the disk allows,
            // and the caller gets the DATA_LOSS either way.
            let _ = self.mark_corrupt(tag, &format!("{file} {detail}"));
        }
        result
    }

    fn check_vmstate(&self, tag: &str) -> Result<()> {
        let m = self.get(tag)?;
        let path = self.snapshot_dir(tag).join(VMSTATE);
        let bytes = std::fs::read(&path).map_err(|e| read_error(&m, VMSTATE, &path, e))?;
        if Some(sha256_hex(&bytes)) != m.vmstate_sha256 {
            return Err(StoreError::DataLoss {
                tag: tag.to_string(),
                file: VMSTATE,
                detail: "does not match its SHA-256".into(),
            });
        }
        Ok(())
    }

    /// The chain of `tag`, leaf first, each READY, each manifest as on
    /// disk, each diff's parent the manifest it was taken against.
    fn verified_chain(&self, tag: &str) -> Result<Vec<Manifest>> {
        let mut chain: Vec<Manifest> = Vec::new();
        let mut next = Some((tag.to_string(), None::<String>));
        while let Some((t, expected_digest)) = next {
            let child = chain.last().map(|m| m.tag.clone());
            let entry = self.index().get(&t).cloned();
            let Some(entry) = entry else {
                return Err(match child {
                    None => StoreError::NotFound { tag: t },
                    Some(_) => StoreError::ChainBroken {
                        tag: tag.to_string(),
                        ancestor: t,
                        why: "is missing (was it deleted?)".into(),
                    },
                });
            };
            let m = entry.manifest;
            if m.status != Status::Ready {
                return Err(match child {
                    None => StoreError::NotReady {
                        tag: t,
                        status: m.status,
                        reason: m.failure_reason,
                    },
                    Some(_) => StoreError::ChainBroken {
                        tag: tag.to_string(),
                        ancestor: t,
                        why: match m.failure_reason.as_deref() {
                            Some(r) if !r.is_empty() => format!("is {} ({r})", m.status),
                            _ => format!("is {}", m.status),
                        },
                    },
                });
            }
            let path = self.snapshot_dir(&t).join(MANIFEST);
            let bytes = std::fs::read(&path).map_err(StoreError::io("reading", &path))?;
            let digest = Some(sha256_hex(&bytes));
            if digest != entry.digest {
                return Err(StoreError::DataLoss {
                    tag: t,
                    file: MANIFEST,
                    detail: "changed on disk since the daemon read it".into(),
                });
            }
            if let (Some(want), Some(c)) = (expected_digest, &child) {
                if digest.as_deref() != Some(want.as_str()) {
                    return Err(StoreError::ChainBroken {
                        tag: tag.to_string(),
                        ancestor: t,
                        why: format!(
                            "is not the snapshot its diff {c} was taken against (its manifest \
                             changed)"
                        ),
                    });
                }
            }
            if chain.len() > 4096 || chain.iter().any(|c| c.tag == t) {
                return Err(StoreError::DataLoss {
                    tag: t,
                    file: MANIFEST,
                    detail: "parents form a cycle".into(),
                });
            }
            if let Some(first) = chain.first() {
                if m.memory_bytes != first.memory_bytes {
                    return Err(StoreError::ParentUnusable {
                        tag: chain.last().expect("non-empty").tag.clone(),
                        parent: t,
                        why: "has a different guest RAM size".into(),
                    });
                }
            }
            next = match (m.mode, &m.parent) {
                (Mode::Diff, Some(p)) => Some((p.clone(), m.parent_digest.clone())),
                (Mode::Diff, None) => {
                    return Err(StoreError::DataLoss {
                        tag: t,
                        file: MANIFEST,
                        detail: "is a diff without a parent".into(),
                    })
                }
                _ => None,
            };
            chain.push(m);
        }
        Ok(chain)
    }
}

fn io_error(what: &'static str, tag: &str, source: std::io::Error) -> StoreError {
    StoreError::Io {
        op: what,
        path: tag.into(),
        source,
    }
}

fn memfd_io(e: memfd::Error) -> std::io::Error {
    match e {
        memfd::Error::Create(e) | memfd::Error::AddSeals(e) | memfd::Error::GetSeals(e) => e,
    }
}

/// A file of a READY snapshot that cannot be read: missing is DATA_LOSS
/// (the snapshot lost it), anything else an I/O error.
fn read_error(m: &Manifest, file: &'static str, path: &Path, e: std::io::Error) -> StoreError {
    if e.kind() == std::io::ErrorKind::NotFound {
        corrupt(m, file, "is missing".into())
    } else {
        StoreError::io("reading", path)(e)
    }
}

fn corrupt(m: &Manifest, file: &'static str, detail: String) -> StoreError {
    StoreError::DataLoss {
        tag: m.tag.clone(),
        file,
        detail,
    }
}

/// Applies one snapshot of the chain to `target`: the root (`root` true)
/// contributes every non-zero page; a diff contributes the pages its
/// bitmap selects, zero ones as holes. Verifies every chunk on the way.
fn apply(dir: &Path, m: &Manifest, root: bool, target: Target<'_>) -> Result<()> {
    let bitmap = if root {
        None
    } else {
        let path = dir.join(PAGES);
        let bytes = std::fs::read(&path).map_err(|e| read_error(m, PAGES, &path, e))?;
        if Some(sha256_hex(&bytes)) != m.pages_sha256 || bytes.len() as u64 != m.bitmap_bytes() {
            return Err(corrupt(m, PAGES, "does not match its SHA-256".into()));
        }
        Some(bytes)
    };
    let path = dir.join(MEMORY);
    let file = File::open(&path).map_err(|e| read_error(m, MEMORY, &path, e))?;
    let len = file
        .metadata()
        .map_err(StoreError::io("reading", &path))?
        .len();
    if len != m.memory_bytes {
        return Err(corrupt(
            m,
            MEMORY,
            format!("is {len} bytes, the manifest says {}", m.memory_bytes),
        ));
    }
    let count = m.memory_bytes.div_ceil(m.chunk_size) as usize;
    if count != m.memory_chunks.len() {
        return Err(corrupt(
            m,
            MANIFEST,
            format!(
                "lists {} chunk digests for {count} chunks",
                m.memory_chunks.len()
            ),
        ));
    }
    let bitmap = bitmap.as_deref();
    par_chunks(
        &file,
        m.memory_bytes,
        m.chunk_size,
        || (ZeroDigests::default(), Runs::new(target, m.memory_bytes)),
        |(zeros, out), chunk| apply_chunk(m, chunk, zeros, out, bitmap),
        |e| StoreError::io("reading", &path)(e),
    )?;
    Ok(())
}

/// Verifies one chunk against its digest and applies its pages (all of a
/// root's, the bitmap's selection of a diff's).
fn apply_chunk(
    m: &Manifest,
    chunk: &Chunk<'_>,
    zeros: &mut ZeroDigests,
    out: &mut Runs<'_>,
    bitmap: Option<&[u8]>,
) -> Result<()> {
    if chunk_digest(chunk, zeros) != m.memory_chunks[chunk.index] {
        return Err(corrupt(
            m,
            MEMORY,
            format!(
                "chunk {} (bytes {}..{}) does not match its SHA-256",
                chunk.index,
                chunk.offset,
                chunk.offset + chunk.len
            ),
        ));
    }
    let root = bitmap.is_none();
    let out_target = out.target;
    let first_page = chunk.offset / PAGE_SIZE;
    let apply = |out: &mut Runs<'_>| -> std::io::Result<()> {
        for i in 0..chunk.len.div_ceil(PAGE_SIZE) {
            let page = first_page + i;
            if bitmap.is_some_and(|bits| !bitmap_has(bits, page)) {
                continue;
            }
            let start = (i * PAGE_SIZE) as usize;
            let end = (chunk.len as usize).min(start + PAGE_SIZE as usize);
            let bytes = chunk.data.map(|d| &d[start..end]).filter(|b| !is_zero(b));
            match bytes {
                Some(b) => out.write(page, b)?,
                // The root starts from an empty memfd: zero is already there.
                None if root => out.flush()?,
                None => out.punch(page)?,
            }
        }
        out.flush()
    };
    apply(out).map_err(|e| match e.raw_os_error() {
        Some(libc::ENOSPC | libc::ENOMEM) if matches!(out_target, Target::Huge(_)) => {
            StoreError::NoHugePages {
                tag: m.tag.clone(),
                source: e,
            }
        }
        _ => io_error("assembling memory of", &m.tag, e),
    })
}

fn is_zero(bytes: &[u8]) -> bool {
    let words = bytes.chunks_exact(8);
    let tail = words.remainder();
    words.fold(0u64, |acc, w| {
        acc | u64::from_ne_bytes(w.try_into().expect("8 bytes"))
    }) == 0
        && tail.iter().all(|&b| b == 0)
}

/// Where assembled memory goes: a shmem memfd (`pwrite`, holes punched),
/// or a hugetlbfs one through its mapping.
#[derive(Clone, Copy)]
enum Target<'a> {
    File(&'a File),
    Huge(&'a HugeMap<'a>),
}

/// Coalesces consecutive page writes (and consecutive hole punches) into
/// one system call each.
struct Runs<'a> {
    target: Target<'a>,
    size: u64,
    /// First page of the pending write; its bytes are in `buf`.
    write_first: Option<u64>,
    buf: Vec<u8>,
    /// Pending punch: first page and page count.
    punch: Option<(u64, u64)>,
}

impl<'a> Runs<'a> {
    fn new(target: Target<'a>, size: u64) -> Self {
        Runs {
            target,
            size,
            write_first: None,
            buf: Vec::with_capacity((MAX_RUN_PAGES * PAGE_SIZE) as usize),
            punch: None,
        }
    }

    fn write(&mut self, page: u64, bytes: &[u8]) -> std::io::Result<()> {
        self.flush_punch()?;
        let pages = self.buf.len() as u64 / PAGE_SIZE;
        let extends = self.write_first.is_some_and(|first| first + pages == page);
        if !(extends && pages < MAX_RUN_PAGES) {
            self.flush_write()?;
            self.write_first = Some(page);
        }
        self.buf.extend_from_slice(bytes);
        Ok(())
    }

    fn punch(&mut self, page: u64) -> std::io::Result<()> {
        self.flush_write()?;
        match &mut self.punch {
            Some((first, n)) if *first + *n == page => *n += 1,
            _ => {
                self.flush_punch()?;
                self.punch = Some((page, 1));
            }
        }
        Ok(())
    }

    fn flush(&mut self) -> std::io::Result<()> {
        self.flush_write()?;
        self.flush_punch()
    }

    fn flush_write(&mut self) -> std::io::Result<()> {
        if let Some(first) = self.write_first.take() {
            match self.target {
                // pwrite, not a shared mapping: F_SEAL_WRITE needs no
                // writable shared mapping to exist.
                Target::File(file) => file.write_all_at(&self.buf, first * PAGE_SIZE)?,
                // Unmapped before the seal.
                Target::Huge(map) => map.write_at(&self.buf, first * PAGE_SIZE)?,
            }
            self.buf.clear();
        }
        Ok(())
    }

    fn flush_punch(&mut self) -> std::io::Result<()> {
        if let Some((first, n)) = self.punch.take() {
            let offset = first * PAGE_SIZE;
            let len = (n * PAGE_SIZE).min(self.size - offset);
            match self.target {
                Target::File(file) => fallocate(
                    file,
                    FallocateFlags::FALLOC_FL_PUNCH_HOLE | FallocateFlags::FALLOC_FL_KEEP_SIZE,
                    offset as i64,
                    len as i64,
                )?,
                // hugetlbfs punches whole 2 MiB pages only: zero in place.
                Target::Huge(map) => map.zero(offset, len)?,
            }
        }
        Ok(())
    }
}
