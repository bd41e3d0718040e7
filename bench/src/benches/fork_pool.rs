//! fork-pool: children of one warm snapshot, started fresh against started
//! on standby VMMs (`forkd serve --vmm-pool`), interleaved in one run.
//!
//! A second daemon runs beside the benchmark's own, with the same
//! arguments plus `--vmm-pool P` (P = the largest n) and a metrics
//! endpoint. Both create the same snapshot (`fork_memory_mib`, warm-up
//! `fill fork_fill_mib 1`) and forks one untimed child of it (loading its
//! memory, and teaching the pool its shape). Then for every n and
//! repetition, one
//! SpawnSandboxes(n) on each daemon, back to back, each only once
//! `forkd_vmm_pool_ready` says every shape's standbys are built (so no
//! refill runs during either). Checks (untimed): every child answers
//! `echo`, and the first child's `checksum` is the same on both daemons.

use std::collections::HashMap;
use std::io::{Read, Write};
use std::net::{SocketAddr, TcpListener, TcpStream};
use std::time::{Duration, Instant};

use anyhow::{bail, ensure, Context, Result};

use super::fork_spawn::phase_table;
use super::{latency_row, Iters, LATENCY_HEADERS};
use crate::client::Ctx;
use crate::daemon::Daemon;
use crate::procfs;
use crate::startup::{self, Phases};
use crate::stats::{fmt_num, Samples};
use crate::table::Table;

/// Benchmark name (also the sandbox label value and the snapshot tag
/// prefix).
pub const NAME: &str = "fork-pool";

/// Concurrent Execs when checking that every child answers.
const CHECK_CONCURRENCY: usize = 32;

/// The daemon's default sandbox shape (MiB, vCPUs), whose standbys it
/// keeps from the start.
const DEFAULT_SHAPE: (u32, u32) = (256, 2);

/// Bound on waiting for the pool to be full.
const POOL_FILL_TIMEOUT: Duration = Duration::from_secs(300);

/// One side of the comparison.
struct Arm<'a> {
    name: &'static str,
    ctx: &'a Ctx,
    data_dir: std::path::PathBuf,
    /// The pooled daemon's metrics address.
    metrics: Option<SocketAddr>,
}

/// Runs the benchmark.
pub async fn run(ctx: &Ctx, it: &Iters) -> Result<Vec<Table>> {
    let pool = *it.fork_ns.iter().max().context("no fork n")?;
    let metrics = TcpListener::bind("127.0.0.1:0")?.local_addr()?;
    let mut args = ctx.daemon_cmd.args.clone();
    args.extend([
        "--vmm-pool".to_string(),
        pool.to_string(),
        "--metrics-listen".to_string(),
        metrics.to_string(),
    ]);
    let before = procfs::meminfo()?;
    let mut daemon = Daemon::start(&ctx.daemon_cmd.forkd, &args, ctx.daemon_cmd.timeout).await?;
    let pooled = Ctx::new(
        daemon.connect().await?,
        daemon.pid(),
        ctx.shape,
        ctx.spawn_timeout,
        daemon.dir().to_path_buf(),
    );
    let tag = format!("{NAME}-base");
    let result = async {
        // The default shape's standbys, started with the daemon.
        wait_pool_ready(metrics, pool).await?;
        let default_full = procfs::meminfo()?;
        let fill_mib = it.fork_fill_mib.to_string();
        let warmup: [&[&str]; 1] = [&["fill", &fill_mib, "1"]];
        let mut shape = (0, 0);
        for c in [ctx, &pooled] {
            let (snap, _) = c.create_snapshot(&tag, it.fork_memory_mib, &warmup).await?;
            shape = (snap.memory_mib, snap.vcpus);
        }
        // The daemon keeps standbys of its default sandbox shape too.
        let shapes = if shape == DEFAULT_SHAPE { 1 } else { 2 };
        // One untimed child per side: loads the snapshot's memory (the
        // first fork of a tag does), and teaches the pool the shape.
        for c in [ctx, &pooled] {
            let (resp, _) = c.spawn_from(NAME, &tag, 1).await?;
            let ids: Vec<String> = resp.sandboxes.iter().map(|s| s.id.clone()).collect();
            c.delete_many(&ids).await?;
        }
        let mut memory = vec![standby_row(
            "default shape (256 MiB, 2 vCPUs)",
            pool,
            &before,
            &default_full,
            true,
        )];
        if shapes == 2 {
            wait_pool_ready(metrics, 2 * pool).await?;
            let both_full = procfs::meminfo()?;
            memory.push(standby_row(
                &format!("snapshot's shape ({} MiB, {} vCPUs)", shape.0, shape.1),
                pool,
                &default_full,
                &both_full,
                false,
            ));
        }
        let arms = [
            Arm {
                name: "fresh",
                ctx,
                data_dir: ctx.scratch.join("data"),
                metrics: None,
            },
            Arm {
                name: "pool",
                ctx: &pooled,
                data_dir: daemon.dir().join("data"),
                metrics: Some(metrics),
            },
        ];
        let mut tables = measure(&arms, it, &tag, pool, shapes).await?;
        tables.push(standby_table(memory));
        Ok(tables)
    }
    .await;
    for c in [ctx, &pooled] {
        let _ = c.cleanup_sandboxes(NAME).await;
        let _ = c.delete_snapshot(&tag, false, true).await;
    }
    for o in pooled.observations() {
        ctx.observe(format!("pooled daemon: {o}"));
    }
    daemon.stop(Duration::from_secs(30)).await?;
    result
}

async fn measure(
    arms: &[Arm<'_>],
    it: &Iters,
    tag: &str,
    pool: u32,
    shapes: u32,
) -> Result<Vec<Table>> {
    let pool_metrics = arms
        .iter()
        .find_map(|a| a.metrics)
        .context("no pooled side")?;
    let mut table = Table::new(NAME, LATENCY_HEADERS);
    let mut phases: Vec<Vec<(u32, Vec<Phases>)>> = vec![Vec::new(); arms.len()];
    let mut ratios = Vec::new();
    let mut reference: Option<Vec<u8>> = None;
    for &n in &it.fork_ns {
        let reps = it.fork_reps(n);
        let mut wall = vec![Vec::new(); arms.len()];
        let mut boot = vec![Vec::new(); arms.len()];
        let mut arm_phases = vec![Vec::new(); arms.len()];
        for _ in 0..reps {
            for (a, arm) in arms.iter().enumerate() {
                // Every shape's standbys built: no refill runs during
                // either side's spawn.
                wait_pool_ready(pool_metrics, shapes * pool).await?;
                let (resp, w) = arm.ctx.spawn_from(NAME, tag, n).await?;
                ensure!(
                    resp.sandboxes.len() == n as usize,
                    "{}: {} of {n} children started",
                    arm.name,
                    resp.sandboxes.len()
                );
                wall[a].push(w);
                boot[a].extend(resp.sandboxes.iter().map(|s| s.boot_ms));
                let ids: Vec<String> = resp.sandboxes.iter().map(|s| s.id.clone()).collect();
                arm_phases[a].extend(ids.iter().filter_map(|id| startup::read(&arm.data_dir, id)));
                check(arm, &ids, &mut reference).await?;
                arm.ctx.delete_many(&ids).await?;
            }
        }
        let mut p50 = Vec::new();
        for (a, arm) in arms.iter().enumerate() {
            let w = Samples::from_millis(&wall[a]);
            p50.push(w.p50());
            latency_row(
                &mut table,
                &format!("n={n} {}: SpawnSandboxes wall (ms)", arm.name),
                &w,
            );
            latency_row(
                &mut table,
                &format!("n={n} {}: boot_ms per child (ms)", arm.name),
                &Samples::new(std::mem::take(&mut boot[a])),
            );
            phases[a].push((n, std::mem::take(&mut arm_phases[a])));
        }
        ratios.push(format!(
            "n={n}: {reps} repetition(s) per side; wall p50 fresh/pool = {}",
            fmt_num(p50[0] / p50[1])
        ));
    }
    table.note(format!(
        "children of a {} MiB guest with {} MiB filled, on two daemons with the same \
         arguments; `pool` runs --vmm-pool {pool}; every spawn (both sides) waits until the \
         pool is full, so no refill runs during one; the sides alternate, spawn by spawn",
        it.fork_memory_mib, it.fork_fill_mib
    ));
    for r in ratios {
        table.note(r);
    }
    table.note(
        "after each spawn (untimed): every child answered `echo`; the first child's checksum \
         is the same on both sides",
    );
    let mut tables = vec![table];
    for (a, arm) in arms.iter().enumerate() {
        let mut t = phase_table(&format!("{NAME} {}", arm.name), &phases[a]);
        if arm.metrics.is_some() {
            t.note(
                "pool: claim = the daemon's claim until the standby read it; the standby built \
                 its VM, vCPUs and memory slot before the spawn, so vm, memslot and exec are \
                 absent",
            );
        }
        tables.push(t);
    }
    Ok(tables)
}

/// `/proc/meminfo` fields reported per standby (KiB).
const STANDBY_FIELDS: &[&str] = &[
    "AnonPages",
    "PageTables",
    "SecPageTables",
    "KernelStack",
    "SUnreclaim",
    "VmallocUsed",
];

/// One row of host memory per standby: `/proc/meminfo` growth from
/// `from` to `to` over `n` standbys; MemAvailable only when nothing else
/// happened in between (`with_available`).
fn standby_row(
    what: &str,
    n: u32,
    from: &HashMap<String, u64>,
    to: &HashMap<String, u64>,
    with_available: bool,
) -> Vec<String> {
    // Growth of field `k` per standby, KiB.
    let growth = |k: &str| -> Option<f64> {
        Some((*to.get(k)? as f64 - *from.get(k)? as f64) / f64::from(n))
    };
    let shown = |v: Option<f64>, f: fn(f64) -> String| v.map_or_else(|| "-".into(), f);
    let mut row = vec![what.to_string(), n.to_string()];
    row.push(match with_available {
        true => shown(growth("MemAvailable").map(|g| -g), |v| format!("{v:.0}")),
        false => "-".into(),
    });
    row.extend(
        STANDBY_FIELDS
            .iter()
            .map(|k| shown(growth(k), |v| format!("{v:+.0}"))),
    );
    row
}

fn standby_table(rows: Vec<Vec<String>>) -> Table {
    let mut headers = vec!["standbys", "count", "MemAvailable drop"];
    headers.extend(STANDBY_FIELDS);
    let mut t = Table::new(
        format!("{NAME}: host memory per standby VMM, KiB (/proc/meminfo growth / standbys)"),
        &headers,
    );
    for r in rows {
        t.row(r);
    }
    t.note(
        "default shape: from before the pooled daemon started until its default-shape pool was \
         full (the daemon's own few MiB included); snapshot's shape: from then until that shape's \
         pool was full too, with snapshot creation and one fork per daemon in between, so \
         MemAvailable (which moved with the snapshot's memory and files) is left out there. \
         AnonPages = the processes' own memory, KernelStack/SUnreclaim/VmallocUsed = kernel \
         allocations (threads, KVM's VM, vCPU and memory-slot structures)",
    );
    t
}

/// Every child answers `echo`; the first one's checksum matches the
/// other side's.
async fn check(arm: &Arm<'_>, ids: &[String], reference: &mut Option<Vec<u8>>) -> Result<()> {
    let outs = arm
        .ctx
        .exec_all(ids, &["echo", "up"], CHECK_CONCURRENCY)
        .await?;
    for (id, out) in ids.iter().zip(&outs) {
        ensure!(
            out.stdout == b"up\n",
            "{}: child {id} did not answer echo",
            arm.name
        );
    }
    let sum = arm
        .ctx
        .exec_all(&ids[..1], &["checksum"], 1)
        .await?
        .remove(0)
        .stdout;
    match reference {
        None => *reference = Some(sum),
        Some(r) => ensure!(
            *r == sum,
            "{}: child {} checksum {:?} differs from {:?}",
            arm.name,
            ids[0],
            String::from_utf8_lossy(&sum),
            String::from_utf8_lossy(r)
        ),
    }
    Ok(())
}

/// Waits until the daemon at `addr` reports `want` standbys ready.
async fn wait_pool_ready(addr: SocketAddr, want: u32) -> Result<()> {
    let start = Instant::now();
    loop {
        let ready = tokio::task::spawn_blocking(move || pool_ready(addr)).await??;
        if ready >= f64::from(want) {
            return Ok(());
        }
        if start.elapsed() > POOL_FILL_TIMEOUT {
            bail!("the pool has {ready} of {want} standbys after {POOL_FILL_TIMEOUT:?}");
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

/// `forkd_vmm_pool_ready` from the metrics endpoint (plain HTTP/1.0).
fn pool_ready(addr: SocketAddr) -> Result<f64> {
    let mut s = TcpStream::connect_timeout(&addr, Duration::from_secs(5))?;
    s.set_read_timeout(Some(Duration::from_secs(5)))?;
    s.write_all(b"GET /metrics HTTP/1.0\r\nHost: localhost\r\n\r\n")?;
    let mut text = String::new();
    s.read_to_string(&mut text)?;
    text.lines()
        .find_map(|l| l.strip_prefix("forkd_vmm_pool_ready "))
        .context("no forkd_vmm_pool_ready in the metrics")?
        .trim()
        .parse()
        .context("forkd_vmm_pool_ready is not a number")
}
