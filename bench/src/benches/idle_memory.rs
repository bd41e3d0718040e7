//! idle-memory: what idle cold-booted sandboxes cost in host memory, read
//! from `/proc/<vmm_pid>/smaps_rollup`, plus the daemon's own footprint.

use anyhow::{Context, Result};

use super::Iters;
use crate::client::Ctx;
use crate::procfs::{self, MemUsage};
use crate::stats::{fmt_int, fmt_num, Samples};
use crate::table::Table;

/// Benchmark name (also the sandbox label value).
pub const NAME: &str = "idle-memory";

/// Runs the benchmark.
pub async fn run(ctx: &Ctx, it: &Iters) -> Result<Vec<Table>> {
    let daemon_before = procfs::mem_usage(ctx.daemon_pid).context("daemon memory")?;
    let (resp, _) = ctx.spawn(NAME, it.idle_n).await?;
    tokio::time::sleep(it.idle_wait).await;

    let mut vmms = Vec::new();
    for sb in &resp.sandboxes {
        if !procfs::process_alive(sb.vmm_pid, "forkd-vmm") {
            ctx.observe(format!(
                "{NAME}: vmm_pid {} of {} is not a running forkd-vmm process",
                sb.vmm_pid, sb.id
            ));
            continue;
        }
        vmms.push(
            procfs::mem_usage(sb.vmm_pid)
                .with_context(|| format!("memory of {} (pid {})", sb.id, sb.vmm_pid))?,
        );
    }
    let daemon_after = procfs::mem_usage(ctx.daemon_pid).context("daemon memory")?;
    let ids: Vec<String> = resp.sandboxes.iter().map(|s| s.id.clone()).collect();
    ctx.delete_many(&ids).await?;
    anyhow::ensure!(!vmms.is_empty(), "no VMM process to measure");

    let mut table = Table::new(
        NAME,
        &[
            "process",
            "count",
            "RSS mean KiB",
            "RSS max KiB",
            "PSS mean KiB",
            "PSS max KiB",
            "PSS shmem mean KiB",
        ],
    );
    let col = |f: fn(&MemUsage) -> u64| Samples::new(vmms.iter().map(|m| f(m) as f64).collect());
    let (rss, pss, shm) = (
        col(|m| m.rss_kib),
        col(|m| m.pss_kib),
        col(|m| m.pss_shmem_kib),
    );
    table.row([
        "forkd-vmm, idle".to_string(),
        vmms.len().to_string(),
        fmt_int(rss.mean()),
        fmt_int(rss.max()),
        fmt_int(pss.mean()),
        fmt_int(pss.max()),
        fmt_int(shm.mean()),
    ]);
    for (what, m) in [
        ("forkd daemon, before spawning".to_string(), daemon_before),
        (
            format!("forkd daemon, with {} sandboxes", vmms.len()),
            daemon_after,
        ),
    ] {
        table.row([
            what,
            "1".to_string(),
            m.rss_kib.to_string(),
            m.rss_kib.to_string(),
            m.pss_kib.to_string(),
            m.pss_kib.to_string(),
            m.pss_shmem_kib.to_string(),
        ]);
    }
    table.note(format!(
        "{} sandboxes from one SpawnSandboxes call, read {:.1} s after it returned; \
         guest memory_mib={} (0 = daemon default 256)",
        it.idle_n,
        it.idle_wait.as_secs_f64(),
        ctx.shape.memory_mib
    ));
    table.note(format!(
        "all VMMs together: RSS {} MiB, PSS {} MiB",
        fmt_num(rss.sum() / 1024.0),
        fmt_num(pss.sum() / 1024.0)
    ));
    table.note(
        "RSS counts every resident page mapped; PSS splits shared pages among the processes \
         sharing them (shmem = memfd/tmpfs pages, e.g. guest RAM)",
    );
    Ok(vec![table])
}
