//! The tables of live-huge: the first LIVE branch per RAM and page size,
//! and what an idle child costs with either page size.

use super::children::Kids;
use super::first_live::Case;
use super::{page_label, NAME};
use crate::benches::Iters;
use crate::stats::{fmt_int, fmt_num, Samples};
use crate::table::Table;

const MIB: f64 = (1u64 << 20) as f64;

/// Every table of the run.
pub fn tables(it: &Iters, cases: &[Case], kids: &[Kids]) -> Vec<Table> {
    vec![first_live(it, cases), per_child(it, kids), host(kids)]
}

fn first_live(it: &Iters, cases: &[Case]) -> Table {
    let mut t = Table::new(
        format!("{NAME}: first LIVE branch (wait=false), 4 KiB against 2 MiB pages"),
        &[
            "RAM MiB",
            "pages",
            "filled MiB",
            "n",
            "spawn p50 ms",
            "pause p50 ms",
            "pause max ms",
            "RPC p50 ms",
            "RPC max ms",
            "to READY p50 ms",
            "copied MiB p50",
        ],
    );
    for c in cases {
        let pause = Samples::new(c.pause_ms.clone());
        let rpc = Samples::from_millis(&c.rpc);
        t.row([
            c.memory_mib.to_string(),
            page_label(c.huge).to_string(),
            c.fill_mib.to_string(),
            pause.len().to_string(),
            fmt_num(Samples::from_millis(&c.spawn).p50()),
            fmt_num(pause.p50()),
            fmt_num(pause.max()),
            fmt_num(rpc.p50()),
            fmt_num(rpc.max()),
            fmt_num(Samples::from_millis(&c.ready).p50()),
            fmt_num(Samples::new(c.bytes_total.clone()).p50() / MIB),
        ]);
    }
    t.note(format!(
        "per RAM size, {} sandbox(es) of each page size, the two alternating (and which goes \
         first alternating too): cold boot (spawn = client time of SpawnSandboxes), `fill` of \
         half the RAM, then the sandbox's first branch, LIVE with wait=false, followed on \
         WatchSnapshot to READY; snapshot and sandbox deleted and the VMM gone (+1 s) before the \
         next",
        it.huge_reps
    ));
    t.note(
        "pause = VMM-reported pause_ms of the BranchSandbox reply (vCPUs stopped until they run \
         again, write-protecting guest RAM included); RPC = client round trip of \
         BranchSandbox; to READY = from the request until the READY message; copied MiB = \
         WatchSnapshot bytes_total; no page-cache ballast (the pause writes no memory)",
    );
    for pair in cases.chunks(2) {
        if let [small, huge] = pair {
            let p50 = |c: &Case| Samples::new(c.pause_ms.clone()).p50();
            let rpc = |c: &Case| Samples::from_millis(&c.rpc).p50();
            t.note(format!(
                "{} MiB: 4 KiB / 2 MiB of the p50s: pause {}x, RPC {}x",
                small.memory_mib,
                fmt_num(p50(small) / p50(huge)),
                fmt_num(rpc(small) / rpc(huge))
            ));
        }
    }
    t
}

fn per_child(it: &Iters, kids: &[Kids]) -> Table {
    let mut t = Table::new(
        format!("{NAME}: memory of idle children, KiB per child (mean)"),
        &[
            "pages",
            "children",
            "RSS",
            "PSS",
            "PSS shmem",
            "hugetlb private",
            "hugetlb shared",
            "sharers",
            "hugetlb share",
            "PSS + hugetlb share",
            "max PSS + share",
        ],
    );
    for k in kids {
        t.row([
            page_label(k.huge).to_string(),
            k.n.to_string(),
            fmt_int(k.rss.mean()),
            fmt_int(k.pss.mean()),
            fmt_int(k.pss_shmem.mean()),
            fmt_int(k.huge_private.mean()),
            fmt_int(k.huge_shared.mean()),
            k.sharers.to_string(),
            fmt_int(k.huge_share.mean()),
            fmt_int(k.total.mean()),
            fmt_int(k.total.max()),
        ]);
    }
    let snap = kids
        .iter()
        .map(|k| {
            format!(
                "{} {} MiB",
                page_label(k.huge),
                fmt_num(k.snapshot_bytes as f64 / MIB)
            )
        })
        .collect::<Vec<_>>()
        .join(", ");
    t.note(format!(
        "per page size: one FULL snapshot of a {} MiB guest with `fill {} 1` (memory_bytes: \
         {snap}), one untimed child (loads the snapshot's memory), then {} children in one \
         SpawnSandboxes, read {:.1} s after it returned",
        it.huge_child_memory_mib,
        it.huge_child_fill_mib,
        it.huge_children,
        it.idle_wait.as_secs_f64()
    ));
    t.note(
        "RSS, PSS, PSS shmem: /proc/<vmm_pid>/smaps_rollup, which leave hugetlb pages out; \
         hugetlb private/shared: Private_Hugetlb/Shared_Hugetlb summed over the mappings in \
         /proc/<vmm_pid>/smaps (private = mapped by this process only: its 2 MiB copy-on-write \
         copies, plus snapshot pages no other process maps; shared = mapped by others too); \
         sharers = processes (children and daemon) mapping shared huge pages of the snapshot; \
         hugetlb share = private + shared / sharers (a PSS for huge pages, exact when every \
         sharer maps the same pages); PSS + hugetlb share = the child's part of host memory",
    );
    t
}

fn host(kids: &[Kids]) -> Table {
    let mut headers = vec!["pages", "MemAvailable", "HugePages used", "HugePages_Rsvd"];
    if let Some(k) = kids.first() {
        headers.extend(k.fields.iter().map(|(name, _)| *name));
    }
    let mut t = Table::new(
        format!("{NAME}: host memory per idle child, KiB (/proc/meminfo deltas / children)"),
        &headers,
    );
    for k in kids {
        let mut row = vec![
            page_label(k.huge).to_string(),
            format!("{:+.0}", k.avail),
            format!("{:+.0}", k.huge_used),
            format!("{:+.0}", k.huge_reserved),
        ];
        row.extend(k.fields.iter().map(|(_, v)| format!("{v:+.0}")));
        t.row(row);
    }
    t.note(
        "growth from just before the spawn (the previous VMMs gone + 1 s) to the reading of the \
         table above, divided by the children; host-wide, so anything else running moves it. \
         HugePages used = HugePages_Total - HugePages_Free (the children's copy-on-write huge \
         pages; the pool is set aside in advance, so MemAvailable does not show them); \
         HugePages_Rsvd = pages promised to mappings but not yet used; AnonPages/Shmem = user \
         memory, PageTables = the VMMs' page tables, SecPageTables = KVM's guest page tables, \
         KernelStack/SUnreclaim/VmallocUsed = kernel allocations (as fork-spawn)",
    );
    t
}
