//! fork-spawn: children forked from one warm snapshot.
//!
//! CreateSnapshot boots a guest of `fork_memory_mib`, runs `fill
//! fork_fill_mib 1` in it and snapshots it. Then SpawnSandboxes(n, tag) for
//! every n of `fork_ns`, several repetitions each, deleting the children
//! between repetitions. The RPC returns once every child answered the
//! daemon's ping, so its wall time is the time until all n children are
//! usable; afterwards (untimed) every child must answer an `echo` and one
//! child per n must report the parent's `checksum`.
//!
//! Memory: for every spawn of at least `fork_mem_min_n` children, after
//! `idle_wait`, the PSS of each child's `forkd-vmm` and the drop of the
//! host's MemAvailable since just before the spawn.

use std::time::{Duration, Instant};

use anyhow::{ensure, Context, Result};

use super::{latency_row, Iters, LATENCY_HEADERS};
use crate::client::Ctx;
use crate::procfs;
use crate::startup::{self, Phases};
use crate::stats::{fmt_int, fmt_num, Samples};
use crate::table::Table;

/// Benchmark name (also the sandbox label value and the snapshot tag
/// prefix).
pub const NAME: &str = "fork-spawn";

/// Concurrent Execs when checking that every child answers.
const CHECK_CONCURRENCY: usize = 32;

/// `/proc/meminfo` fields whose growth per child is reported: where the
/// host memory of an idle child goes (user pages, page tables, kernel
/// allocations such as KVM's per-VM structures).
pub(super) const MEMINFO_FIELDS: &[&str] = &[
    "AnonPages",
    "Shmem",
    "PageTables",
    "SecPageTables",
    "KernelStack",
    "SUnreclaim",
    "VmallocUsed",
];

/// Memory figures of one measured spawn.
struct MemRow {
    n: usize,
    pss: Samples,
    pss_shmem: Samples,
    rss: Samples,
    avail_drop_kib: f64,
    daemon_rss_kib: u64,
    /// Growth of each of `MEMINFO_FIELDS` (absent ones skipped), KiB.
    fields: Vec<(&'static str, f64)>,
}

/// Waits (up to 10 s) until none of `pids` is a live forkd-vmm, then 1 s
/// more, so the host's memory figures no longer move with their exits.
pub(super) async fn settle(pids: &[u32]) {
    let deadline = Instant::now() + Duration::from_secs(10);
    while pids.iter().any(|&p| procfs::process_alive(p, "forkd-vmm")) && Instant::now() < deadline {
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    tokio::time::sleep(Duration::from_secs(1)).await;
}

/// Runs the benchmark.
pub async fn run(ctx: &Ctx, it: &Iters) -> Result<Vec<Table>> {
    let tag = format!("{NAME}-base");
    let fill_mib = it.fork_fill_mib.to_string();
    let warmup: [&[&str]; 1] = [&["fill", &fill_mib, "1"]];
    let (snap, create_wall) = ctx
        .create_snapshot(&tag, it.fork_memory_mib, &warmup)
        .await?;
    let result = measure(ctx, it, &tag, create_wall).await;
    // Children first, then the snapshot (also when measuring failed; the
    // benchmark runner's cleanup retries with force).
    let cleanup = async {
        ctx.cleanup_sandboxes(NAME).await?;
        ctx.delete_snapshot(&tag, false, false).await
    }
    .await;
    let mut tables = result?;
    cleanup.context("deleting the children and the snapshot")?;
    tables[0].note(format!(
        "snapshot {tag}: memory_mib={} vcpus={} memory_bytes={} disk_bytes={} \
         (CreateSnapshot of a cold boot with warm-up `fill {} 1`)",
        snap.memory_mib, snap.vcpus, snap.memory_bytes, snap.disk_bytes, it.fork_fill_mib
    ));
    Ok(tables)
}

async fn measure(ctx: &Ctx, it: &Iters, tag: &str, create_wall: Duration) -> Result<Vec<Table>> {
    let mut table = Table::new(NAME, LATENCY_HEADERS);
    latency_row(
        &mut table,
        "CreateSnapshot incl. boot and warm-up (ms)",
        &Samples::from_millis(&[create_wall]),
    );
    let mut mem_rows = Vec::new();
    let mut reference: Option<Vec<u8>> = None;
    let mut rates = Vec::new();
    let mut all_pids = Vec::new();
    let mut prev_pids: Vec<u32> = Vec::new();
    let data_dir = ctx.scratch.join("data");
    // Per n: every child's start-up phases from its vmm.log.
    let mut phase_rows: Vec<(u32, Vec<Phases>)> = Vec::new();

    for &n in &it.fork_ns {
        let reps = it.fork_reps(n);
        let mut wall = Vec::new();
        let mut server = Vec::new();
        let mut boot = Vec::new();
        let mut delete = Vec::new();
        let mut started = Vec::new();
        let mut phases = Vec::new();
        for rep in 0..reps {
            let measure_mem = n >= it.fork_mem_min_n;
            let before = if measure_mem {
                settle(&prev_pids).await;
                Some(procfs::meminfo()?)
            } else {
                None
            };
            let (resp, w) = ctx.spawn_from(NAME, tag, n).await?;
            wall.push(w);
            server.push(resp.elapsed_ms);
            started.push(resp.sandboxes.len());
            boot.extend(resp.sandboxes.iter().map(|s| s.boot_ms));
            let pids: Vec<u32> = resp.sandboxes.iter().map(|s| s.vmm_pid).collect();
            all_pids.extend(&pids);
            let ids: Vec<String> = resp.sandboxes.iter().map(|s| s.id.clone()).collect();
            let read: Vec<Phases> = ids
                .iter()
                .filter_map(|id| startup::read(&data_dir, id))
                .collect();
            if read.len() < ids.len() {
                ctx.observe(format!(
                    "{NAME}: n={n}: {} of {} children had no start-up line in their vmm.log",
                    ids.len() - read.len(),
                    ids.len()
                ));
            }
            phases.extend(read);
            for sb in &resp.sandboxes {
                if sb.snapshot_tag != tag {
                    ctx.observe(format!(
                        "{NAME}: child {} reports snapshot_tag {:?}, expected {tag:?}",
                        sb.id, sb.snapshot_tag
                    ));
                }
            }

            if let Some(before) = before {
                tokio::time::sleep(it.idle_wait).await;
                let after = procfs::meminfo()?;
                let delta = |k: &str| -> Option<f64> {
                    Some(*after.get(k)? as f64 - *before.get(k)? as f64)
                };
                let mut usage = Vec::new();
                for (sb, &pid) in resp.sandboxes.iter().zip(&pids) {
                    match procfs::mem_usage(pid) {
                        Ok(u) => usage.push(u),
                        Err(e) => ctx.observe(format!(
                            "{NAME}: no memory figures for child {} (pid {pid}): {e:#}",
                            sb.id
                        )),
                    }
                }
                let daemon = procfs::mem_usage(ctx.daemon_pid).context("daemon memory")?;
                let col = |f: fn(&procfs::MemUsage) -> u64| {
                    Samples::new(usage.iter().map(|u| f(u) as f64).collect())
                };
                mem_rows.push(MemRow {
                    n: ids.len(),
                    pss: col(|u| u.pss_kib),
                    pss_shmem: col(|u| u.pss_shmem_kib),
                    rss: col(|u| u.rss_kib),
                    avail_drop_kib: -delta("MemAvailable").context("no MemAvailable")?,
                    daemon_rss_kib: daemon.rss_kib,
                    fields: MEMINFO_FIELDS
                        .iter()
                        .filter_map(|&k| Some((k, delta(k)?)))
                        .collect(),
                });
            }

            // Untimed checks: every child answers, and the first repetition
            // of each n has a child with the parent's memory.
            let outs = ctx
                .exec_all(&ids, &["echo", "up"], CHECK_CONCURRENCY)
                .await?;
            for (id, out) in ids.iter().zip(&outs) {
                ensure!(
                    out.stdout == b"up\n",
                    "child {id} answered echo with {:?}",
                    String::from_utf8_lossy(&out.stdout)
                );
            }
            if rep == 0 {
                let sum = ctx
                    .exec_all(&ids[..1], &["checksum"], 1)
                    .await?
                    .remove(0)
                    .stdout;
                match &reference {
                    None => reference = Some(sum),
                    Some(r) => ensure!(
                        *r == sum,
                        "child {} checksum {:?} differs from an earlier child's {:?}",
                        ids[0],
                        String::from_utf8_lossy(&sum),
                        String::from_utf8_lossy(r)
                    ),
                }
            }
            let t = Instant::now();
            ctx.delete_many(&ids).await?;
            delete.push(t.elapsed());
            prev_pids = pids;
        }
        phase_rows.push((n, phases));
        let wall_ms = Samples::from_millis(&wall);
        rates.push(format!(
            "n={n}: {reps} repetition(s), children started {started:?}, p50 {} children/s",
            fmt_num(n as f64 / (wall_ms.p50() / 1e3))
        ));
        latency_row(
            &mut table,
            &format!("n={n}: SpawnSandboxes wall (ms)"),
            &wall_ms,
        );
        latency_row(
            &mut table,
            &format!("n={n}: elapsed_ms, daemon-reported (ms)"),
            &Samples::new(server),
        );
        latency_row(
            &mut table,
            &format!("n={n}: boot_ms per child, daemon-reported (ms)"),
            &Samples::new(boot),
        );
        latency_row(
            &mut table,
            &format!("n={n}: delete all, concurrent DeleteSandbox (ms)"),
            &Samples::from_millis(&delete),
        );
    }
    ctx.check_vmms_gone(
        &format!("{NAME} after DeleteSandbox"),
        &all_pids,
        Duration::from_secs(5),
    )
    .await;

    table.note(format!(
        "children of a {} MiB guest with {} MiB filled; wall = client-side time of \
         SpawnSandboxes, which returns when every child answered a ping",
        it.fork_memory_mib, it.fork_fill_mib
    ));
    for r in rates {
        table.note(r);
    }
    table.note(
        "after each spawn (untimed): every child answered `echo`; one child per n \
         reported the snapshot's checksum",
    );

    let mut mem = Table::new(
        format!("{NAME}: memory of idle children"),
        &[
            "spawn",
            "children",
            "PSS mean KiB",
            "PSS max KiB",
            "PSS shmem mean KiB",
            "RSS mean KiB",
            "MemAvailable drop MiB",
            "drop per child KiB",
            "daemon RSS KiB",
        ],
    );
    for (i, r) in mem_rows.iter().enumerate() {
        mem.row([
            format!("#{} (n={})", i + 1, r.n),
            r.n.to_string(),
            fmt_int(r.pss.mean()),
            fmt_int(r.pss.max()),
            fmt_int(r.pss_shmem.mean()),
            fmt_int(r.rss.mean()),
            fmt_num(r.avail_drop_kib / 1024.0),
            fmt_int(r.avail_drop_kib / r.n as f64),
            r.daemon_rss_kib.to_string(),
        ]);
    }
    mem.note(format!(
        "read {:.1} s after SpawnSandboxes returned, before anything ran in the children; \
         PSS from /proc/<vmm_pid>/smaps_rollup (shared pages split among their users)",
        it.idle_wait.as_secs_f64()
    ));
    mem.note(
        "MemAvailable drop = /proc/meminfo MemAvailable just before the spawn (taken once the \
         previous children's VMMs were gone, plus 1 s) minus after; host-wide, so anything else \
         running on the host moves it",
    );

    let mut headers = vec!["spawn".to_string(), "MemAvailable".to_string()];
    if let Some(first) = mem_rows.first() {
        headers.extend(first.fields.iter().map(|(k, _)| k.to_string()));
    }
    let header_refs: Vec<&str> = headers.iter().map(String::as_str).collect();
    let mut per_child = Table::new(
        format!("{NAME}: host memory per idle child, KiB (/proc/meminfo deltas / children)"),
        &header_refs,
    );
    for (i, r) in mem_rows.iter().enumerate() {
        let mut row = vec![
            format!("#{} (n={})", i + 1, r.n),
            format!("{:+.0}", -r.avail_drop_kib / r.n as f64),
        ];
        row.extend(
            r.fields
                .iter()
                .map(|(_, v)| format!("{:+.0}", v / r.n as f64)),
        );
        per_child.row(row);
    }
    per_child.note(
        "same instants as the table above; AnonPages/Shmem = user memory, PageTables = host \
         page tables of the VMM processes, SecPageTables = KVM's secondary (guest) page tables, \
         KernelStack/SUnreclaim/VmallocUsed = kernel allocations (threads, KVM vCPU and \
         memslot structures)",
    );
    Ok(vec![table, mem, per_child, phase_table(NAME, &phase_rows)])
}

/// Where a child's start-up goes: per n, the p50 (and p90) over every
/// child of each phase of its `forkd-vmm` start-up line.
pub(super) fn phase_table(name: &str, rows: &[(u32, Vec<Phases>)]) -> Table {
    // Phase names in the order the first line lists them.
    let names: Vec<String> = rows
        .iter()
        .flat_map(|(_, p)| p.first())
        .next()
        .map(|p| p.iter().map(|(k, _)| k.clone()).collect())
        .unwrap_or_default();
    let mut headers = vec!["spawn".to_string(), "children".to_string()];
    headers.extend(names.iter().cloned());
    let header_refs: Vec<&str> = headers.iter().map(String::as_str).collect();
    let mut table = Table::new(
        format!("{name}: where a child's start-up goes, µs p50 (p90) per phase"),
        &header_refs,
    );
    for (n, children) in rows {
        let mut row = vec![format!("n={n}"), children.len().to_string()];
        for name in &names {
            let s = Samples::new(
                children
                    .iter()
                    .filter_map(|p| p.iter().find(|(k, _)| k == name))
                    .map(|(_, v)| *v as f64)
                    .collect(),
            );
            row.push(if s.len() == 0 {
                "-".into()
            } else {
                format!("{} ({})", fmt_int(s.p50()), fmt_int(s.percentile(90.0)))
            });
        }
        table.row(row);
    }
    table.note(
        "from each child's vmm.log start-up line (forkd-vmm, CLOCK_MONOTONIC): exec = the \
         daemon's spawn call until forkd-vmm's main; vmstate = reading and parsing the \
         snapshot's vmstate; vm = KVM_CREATE_VM, TSS, irqchip (and PIT); memory = mapping the \
         snapshot memfd copy-on-write; memslot = KVM_SET_USER_MEMORY_REGION; vm_state = clock, \
         irqchip and PIT state; vcpus = KVM_CREATE_VCPU and each vCPU's saved state; msrs = \
         the MSR list; devices = dirty-log bookkeeping (and a Linux guest's devices); threads = \
         starting the vCPU threads; ready = until the guest's Ready was sent; total = spawn \
         call to Ready. Time spent queueing before the spawn call (the daemon starts 16 \
         children at a time) is in boot_ms, not here",
    );
    table
}
