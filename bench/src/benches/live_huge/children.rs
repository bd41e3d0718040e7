//! Idle children of one snapshot per page size: what each costs the host.
//!
//! hugetlb pages are outside a process's `Rss`/`Pss`: `/proc/<pid>/smaps`
//! reports them per mapping as `Private_Hugetlb` (pages only this process
//! maps: its copy-on-write copies, and snapshot pages no other process
//! maps) and `Shared_Hugetlb` (pages other processes map too). A child's
//! share of the snapshot's huge pages is estimated like PSS: its shared
//! huge pages of a file divided by the processes (children and daemon)
//! that map shared huge pages of that file.

use std::collections::HashMap;

use anyhow::{Context, Result};
use forkd_api::v1::BranchMode;

use super::{page_label, page_tag, NAME, PAGE_SIZES};
use crate::benches::fork_spawn::{settle, MEMINFO_FIELDS};
use crate::benches::Iters;
use crate::client::{Ctx, GuestShape};
use crate::procfs::{self, HugetlbVma};
use crate::stats::Samples;

/// What the children of one page size cost, per child.
pub struct Kids {
    /// 2 MiB pages.
    pub huge: bool,
    /// Children measured.
    pub n: usize,
    /// `memory_bytes` of their snapshot.
    pub snapshot_bytes: u64,
    /// `Rss` (no hugetlb), KiB.
    pub rss: Samples,
    /// `Pss` (no hugetlb), KiB.
    pub pss: Samples,
    /// `Pss_Shmem`, KiB.
    pub pss_shmem: Samples,
    /// `Private_Hugetlb` over all mappings, KiB.
    pub huge_private: Samples,
    /// `Shared_Hugetlb` over all mappings, KiB.
    pub huge_shared: Samples,
    /// Private plus the shared split among its sharers, KiB.
    pub huge_share: Samples,
    /// `Pss` plus the hugetlb share, KiB.
    pub total: Samples,
    /// Most processes sharing one file's huge pages.
    pub sharers: usize,
    /// Growth of `MemAvailable`, KiB per child (negative: it dropped).
    pub avail: f64,
    /// Growth of huge pages in use (`HugePages_Total - HugePages_Free`),
    /// KiB per child.
    pub huge_used: f64,
    /// Growth of `HugePages_Rsvd`, KiB per child.
    pub huge_reserved: f64,
    /// Growth of each of `MEMINFO_FIELDS`, KiB per child.
    pub fields: Vec<(&'static str, f64)>,
}

/// Builds both snapshots, measures the children of each, deletes them.
pub async fn run(ctx: &Ctx, it: &Iters) -> Result<Vec<Kids>> {
    let mut tags = Vec::new();
    let mut gone = Vec::new();
    for huge in PAGE_SIZES {
        let (tag, pids) = snapshot(ctx, it, huge).await?;
        tags.push((huge, tag));
        gone.extend(pids);
    }
    let mut out = Vec::new();
    for (huge, tag) in &tags {
        let (kids, pids) = measure(ctx, it, tag, *huge, &gone).await?;
        out.push(kids);
        gone = pids;
    }
    for (_, tag) in &tags {
        ctx.delete_snapshot(tag, false, false).await?;
    }
    Ok(out)
}

/// A FULL snapshot of a filled guest, and one untimed child of it (the
/// first fork of a tag loads its memory); returns the tag and the VMM
/// pids that were deleted.
async fn snapshot(ctx: &Ctx, it: &Iters, huge: bool) -> Result<(String, Vec<u32>)> {
    let tag = format!("{NAME}-children-{}", page_tag(huge));
    let shape = GuestShape {
        memory_mib: it.huge_child_memory_mib,
        vcpus: 0,
        huge_pages: huge,
    };
    let (resp, _) = ctx.spawn_with(NAME, 1, "", shape).await?;
    let (id, mut pids) = (
        resp.sandboxes[0].id.clone(),
        vec![resp.sandboxes[0].vmm_pid],
    );
    let mut client = ctx.client();
    let fill = it.huge_child_fill_mib.to_string();
    ctx.exec(&mut client, &id, &["fill", &fill, "1"], false)
        .await?;
    ctx.branch(&id, &tag, BranchMode::Full).await?;
    ctx.delete(&id).await?;
    let (resp, _) = ctx.spawn_from(NAME, &tag, 1).await?;
    let ids: Vec<String> = resp.sandboxes.iter().map(|s| s.id.clone()).collect();
    pids.extend(resp.sandboxes.iter().map(|s| s.vmm_pid));
    ctx.delete_many(&ids).await?;
    Ok((tag, pids))
}

/// Forks the children once the VMMs in `gone` are, reads their memory
/// after `idle_wait`, deletes them; returns the figures and their pids.
async fn measure(
    ctx: &Ctx,
    it: &Iters,
    tag: &str,
    huge: bool,
    gone: &[u32],
) -> Result<(Kids, Vec<u32>)> {
    settle(gone).await;
    let (mem_before, pool_before) = (procfs::meminfo()?, procfs::huge_pool()?);
    let (resp, _) = ctx.spawn_from(NAME, tag, it.huge_children).await?;
    tokio::time::sleep(it.idle_wait).await;
    let (mem_after, pool_after) = (procfs::meminfo()?, procfs::huge_pool()?);
    let ids: Vec<String> = resp.sandboxes.iter().map(|s| s.id.clone()).collect();
    let pids: Vec<u32> = resp.sandboxes.iter().map(|s| s.vmm_pid).collect();
    let mut usage = Vec::new();
    let mut vmas = Vec::new();
    let wrong = resp.sandboxes.iter().filter(|s| s.huge_pages != huge);
    if let Some(first) = wrong.clone().next() {
        ctx.observe(format!(
            "{NAME}: {} of {} children of {tag} report huge_pages={}, e.g. {}",
            wrong.count(),
            resp.sandboxes.len(),
            !huge,
            first.id
        ));
    }
    for sb in &resp.sandboxes {
        let what = || format!("memory of child {} (pid {})", sb.id, sb.vmm_pid);
        usage.push(procfs::mem_usage(sb.vmm_pid).with_context(what)?);
        vmas.push(procfs::hugetlb_vmas(sb.vmm_pid).with_context(what)?);
    }
    let daemon = procfs::hugetlb_vmas(ctx.daemon_pid).context("the daemon's huge pages")?;
    let snapshot_bytes = ctx.get_snapshot(tag).await?.memory_bytes;
    ctx.delete_many(&ids).await?;

    let n = usage.len();
    let per_child = |v: f64| v / n.max(1) as f64;
    let delta =
        |k: &str| -> Option<f64> { Some(*mem_after.get(k)? as f64 - *mem_before.get(k)? as f64) };
    let page_kib = pool_after.page_kib as f64;
    let split = split_hugetlb(&vmas, &[daemon]);
    let col = |f: &dyn Fn(usize) -> f64| Samples::new((0..n).map(f).collect());
    let kids = Kids {
        huge,
        n,
        snapshot_bytes,
        rss: col(&|i| usage[i].rss_kib as f64),
        pss: col(&|i| usage[i].pss_kib as f64),
        pss_shmem: col(&|i| usage[i].pss_shmem_kib as f64),
        huge_private: col(&|i| split.children[i].private_kib as f64),
        huge_shared: col(&|i| split.children[i].shared_kib as f64),
        huge_share: col(&|i| split.children[i].share_kib),
        total: col(&|i| usage[i].pss_kib as f64 + split.children[i].share_kib),
        sharers: split.max_sharers,
        avail: per_child(delta("MemAvailable").context("no MemAvailable")?),
        huge_used: per_child((pool_after.used() as f64 - pool_before.used() as f64) * page_kib),
        huge_reserved: per_child(
            (pool_after.reserved as f64 - pool_before.reserved as f64) * page_kib,
        ),
        fields: MEMINFO_FIELDS
            .iter()
            .filter_map(|&k| Some((k, per_child(delta(k)?))))
            .collect(),
    };
    if kids.huge && kids.huge_private.max() + kids.huge_shared.max() == 0.0 {
        ctx.observe(format!(
            "{NAME}: the {} page children of {tag} map no huge pages",
            page_label(huge)
        ));
    }
    Ok((kids, pids))
}

/// One child's huge pages.
#[derive(Clone, Debug, Default, PartialEq)]
pub struct ChildHugetlb {
    /// `Private_Hugetlb` summed over its mappings, KiB.
    pub private_kib: u64,
    /// `Shared_Hugetlb` summed over its mappings, KiB.
    pub shared_kib: u64,
    /// Private, plus each file's shared pages divided by its sharers, KiB.
    pub share_kib: f64,
}

/// The children's huge pages, split.
#[derive(Debug, PartialEq)]
pub struct HugetlbSplit {
    /// Per child, in order.
    pub children: Vec<ChildHugetlb>,
    /// Most sharers of any one file.
    pub max_sharers: usize,
}

/// Splits shared huge pages among the processes mapping them: a file's
/// sharers are the processes (children, and `others` such as the daemon)
/// with shared huge pages of it. Exact when every sharer maps the same
/// shared pages (idle children of one snapshot), an estimate otherwise.
pub fn split_hugetlb(children: &[Vec<HugetlbVma>], others: &[Vec<HugetlbVma>]) -> HugetlbSplit {
    let mut sharers: HashMap<&str, usize> = HashMap::new();
    for process in children.iter().chain(others) {
        let mut files: Vec<&str> = process
            .iter()
            .filter(|v| v.shared_kib > 0)
            .map(|v| v.file.as_str())
            .collect();
        files.sort_unstable();
        files.dedup();
        for f in files {
            *sharers.entry(f).or_default() += 1;
        }
    }
    let children = children
        .iter()
        .map(|process| {
            let mut c = ChildHugetlb::default();
            for v in process {
                c.private_kib += v.private_kib;
                c.shared_kib += v.shared_kib;
                c.share_kib += v.private_kib as f64;
                if v.shared_kib > 0 {
                    c.share_kib += v.shared_kib as f64 / sharers[v.file.as_str()] as f64;
                }
            }
            c
        })
        .collect();
    HugetlbSplit {
        children,
        max_sharers: sharers.values().copied().max().unwrap_or(0),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn vma(file: &str, private_kib: u64, shared_kib: u64) -> HugetlbVma {
        HugetlbVma {
            file: file.into(),
            private_kib,
            shared_kib,
        }
    }

    #[test]
    fn shared_pages_are_split_among_their_sharers() {
        // Two children share 8 MiB of the snapshot "s" (one maps it in two
        // VMAs), the daemon maps it too; one child has a 2 MiB private copy.
        let children = vec![
            vec![vma("s", 2048, 4096), vma("s", 0, 4096)],
            vec![vma("s", 0, 8192)],
        ];
        let daemon = vec![vec![vma("s", 0, 8192), vma("other", 0, 2048)]];
        let split = split_hugetlb(&children, &daemon);
        assert_eq!(split.max_sharers, 3);
        let got: Vec<(u64, u64)> = split
            .children
            .iter()
            .map(|c| (c.private_kib, c.shared_kib))
            .collect();
        assert_eq!(got, [(2048, 8192), (0, 8192)]);
        let share = 8192.0 / 3.0;
        assert!((split.children[0].share_kib - (2048.0 + share)).abs() < 1e-9);
        assert!((split.children[1].share_kib - share).abs() < 1e-9);
    }

    #[test]
    fn no_huge_pages() {
        let split = split_hugetlb(&[vec![], vec![]], &[]);
        assert_eq!(split.max_sharers, 0);
        assert!(split.children.iter().all(|c| c.share_kib == 0.0));
    }
}
