//! forkd-bench: starts a private forkd daemon, drives it through its gRPC
//! API and prints one table per benchmark (optionally also as Markdown).

mod benches;
mod client;
mod daemon;
mod host;
mod procfs;
mod startup;
mod stats;
mod table;

use std::fmt::Write as _;
use std::path::PathBuf;
use std::process::ExitCode;
use std::time::{Duration, Instant};

use anyhow::{Context, Result};
use clap::{Parser, ValueEnum};

use benches::Iters;
use client::{Ctx, DaemonCmd, GuestShape};
use daemon::Daemon;
use table::Table;

/// The benchmarks, in the order they run.
#[derive(Clone, Copy, Debug, PartialEq, Eq, ValueEnum)]
enum Bench {
    /// SpawnSandboxes cold boots: n=1 repeated, and a batch of 100.
    ColdSpawn,
    /// Exec `echo hi` round-trip latency.
    ExecEcho,
    /// Exec `emit` bulk output throughput (8 MiB and 1 MiB).
    AgentThroughput,
    /// RSS/PSS of idle sandboxes and of the daemon.
    IdleMemory,
    /// GetSandbox and grpc.health.v1 Check latency and req/s.
    Unary,
    /// SpawnSandboxes of 1, 10, 100, 1000 children of a warm snapshot, and
    /// their memory.
    ForkSpawn,
    /// The same children started fresh against on standby VMMs
    /// (--vmm-pool), on a second daemon, interleaved.
    ForkPool,
    /// FULL against DIFF branch pause at several dirty sizes.
    BranchPause,
    /// LIVE (wait=true/false) against DIFF and FULL on a writing 1.5 GiB
    /// guest, the writer's slowdown, and the LIVE pause against RAM size.
    BranchLive,
    /// 4 KiB against 2 MiB guest pages: the first LIVE branch's pause and
    /// round trip per RAM size, and the memory of idle children.
    LiveHuge,
}

impl Bench {
    const ALL: [Bench; 10] = [
        Bench::ColdSpawn,
        Bench::ExecEcho,
        Bench::AgentThroughput,
        Bench::IdleMemory,
        Bench::Unary,
        Bench::ForkSpawn,
        Bench::ForkPool,
        Bench::BranchPause,
        Bench::BranchLive,
        Bench::LiveHuge,
    ];

    fn name(self) -> &'static str {
        match self {
            Bench::ColdSpawn => benches::cold_spawn::NAME,
            Bench::ExecEcho => benches::exec_echo::NAME,
            Bench::AgentThroughput => benches::agent_throughput::NAME,
            Bench::IdleMemory => benches::idle_memory::NAME,
            Bench::Unary => benches::unary::NAME,
            Bench::ForkSpawn => benches::fork_spawn::NAME,
            Bench::ForkPool => benches::fork_pool::NAME,
            Bench::BranchPause => benches::branch_pause::NAME,
            Bench::BranchLive => benches::branch_live::NAME,
            Bench::LiveHuge => benches::live_huge::NAME,
        }
    }

    async fn run(self, ctx: &Ctx, it: &Iters) -> Result<Vec<Table>> {
        match self {
            Bench::ColdSpawn => benches::cold_spawn::run(ctx, it).await,
            Bench::ExecEcho => benches::exec_echo::run(ctx, it).await,
            Bench::AgentThroughput => benches::agent_throughput::run(ctx, it).await,
            Bench::IdleMemory => benches::idle_memory::run(ctx, it).await,
            Bench::Unary => benches::unary::run(ctx, it).await,
            Bench::ForkSpawn => benches::fork_spawn::run(ctx, it).await,
            Bench::ForkPool => benches::fork_pool::run(ctx, it).await,
            Bench::BranchPause => benches::branch_pause::run(ctx, it).await,
            Bench::BranchLive => benches::branch_live::run(ctx, it).await,
            Bench::LiveHuge => benches::live_huge::run(ctx, it).await,
        }
    }
}

/// Benchmarks for forkd: starts its own daemon on a free loopback port with
/// a temporary data directory, runs the benchmarks, and stops the daemon.
#[derive(Debug, Parser)]
#[command(name = "forkd-bench", version)]
struct Args {
    /// The forkd daemon binary (forkd-vmm is expected where it looks).
    #[arg(long, default_value = "target/release/forkd")]
    forkd: PathBuf,
    /// Extra argument for `forkd serve` (repeat for several).
    #[arg(long = "daemon-arg", allow_hyphen_values = true)]
    daemon_args: Vec<String>,
    /// Run only these benchmarks (repeat or separate with commas).
    #[arg(long, value_enum, value_delimiter = ',')]
    only: Vec<Bench>,
    /// Also write the results as Markdown to this file.
    #[arg(long)]
    markdown: Option<PathBuf>,
    /// Tiny iteration counts: checks that everything works, figures are
    /// not meaningful.
    #[arg(long)]
    quick: bool,
    /// Guest RAM of every sandbox, MiB (0 = the daemon's default).
    #[arg(long, default_value_t = 0)]
    memory_mib: u32,
    /// vCPUs of every sandbox (0 = the daemon's default).
    #[arg(long, default_value_t = 0)]
    vcpus: u32,
    /// cold-spawn: repetitions of SpawnSandboxes(n=1).
    #[arg(long)]
    spawn1_reps: Option<usize>,
    /// cold-spawn: size of the batch spawn.
    #[arg(long)]
    batch_n: Option<u32>,
    /// cold-spawn: repetitions of the batch spawn.
    #[arg(long)]
    batch_reps: Option<usize>,
    /// exec-echo: timed calls.
    #[arg(long)]
    echo_iters: Option<usize>,
    /// agent-throughput: timed runs per payload size.
    #[arg(long)]
    emit_runs: Option<usize>,
    /// idle-memory: number of sandboxes.
    #[arg(long)]
    idle_n: Option<u32>,
    /// unary: sequential timed calls per RPC.
    #[arg(long)]
    unary_iters: Option<usize>,
    /// unary: concurrent callers.
    #[arg(long)]
    concurrency: Option<usize>,
    /// unary: seconds of the concurrent phase.
    #[arg(long)]
    unary_secs: Option<f64>,
    /// fork-spawn: children per SpawnSandboxes call (comma-separated).
    #[arg(long, value_delimiter = ',')]
    fork_ns: Vec<u32>,
    /// fork-spawn: repetitions for every n (default 20, 5, 3, 1 for n up to
    /// 1, 10, 100 and above).
    #[arg(long)]
    fork_reps: Option<usize>,
    /// fork-spawn: guest RAM of the snapshot, MiB.
    #[arg(long)]
    fork_memory_mib: Option<u32>,
    /// fork-spawn: MiB the warm-up fills.
    #[arg(long)]
    fork_fill_mib: Option<u32>,
    /// branch-pause: MiB rewritten before each branch (comma-separated).
    #[arg(long, value_delimiter = ',')]
    branch_sizes: Vec<u32>,
    /// branch-pause: iterations per size.
    #[arg(long)]
    branch_iters: Option<usize>,
    /// branch-pause: no scratch-file ballast before each branch.
    #[arg(long)]
    branch_no_ballast: bool,
    /// branch-pause: guest RAM, MiB.
    #[arg(long)]
    branch_memory_mib: Option<u32>,
    /// branch-pause: MiB filled before the first branch.
    #[arg(long)]
    branch_fill_mib: Option<u32>,
    /// branch-live: guest RAM of the compared source, MiB.
    #[arg(long)]
    live_memory_mib: Option<u32>,
    /// branch-live: MiB filled (default: as much as `fill` allows).
    #[arg(long)]
    live_fill_mib: Option<u32>,
    /// branch-live: iterations of the comparison.
    #[arg(long)]
    live_iters: Option<usize>,
    /// branch-live: guest RAM sizes of the pause sweep, MiB (comma-separated).
    #[arg(long, value_delimiter = ',')]
    live_sizes: Vec<u32>,
    /// branch-live: LIVE branches per size of the sweep.
    #[arg(long)]
    live_size_iters: Option<usize>,
    /// branch-live: pages of the writer's ring (1-4096).
    #[arg(long)]
    live_writer_pages: Option<u32>,
    /// branch-live: the writer's pages/s (0 = as fast as it can).
    #[arg(long)]
    live_writer_rate: Option<u64>,
    /// branch-live: no scratch-file ballast before each branch.
    #[arg(long)]
    live_no_ballast: bool,
    /// live-huge: guest RAM sizes, MiB, even (comma-separated).
    #[arg(long, value_delimiter = ',')]
    huge_sizes: Vec<u32>,
    /// live-huge: sandboxes per size and page size (default 3, --quick 1).
    #[arg(long)]
    huge_reps: Option<usize>,
    /// live-huge: idle children forked per page size.
    #[arg(long)]
    huge_children: Option<u32>,
    /// Deadline of one SpawnSandboxes call, seconds.
    #[arg(long, default_value_t = 300)]
    spawn_timeout_secs: u64,
    /// How long to wait for the daemon to report SERVING, seconds.
    #[arg(long, default_value_t = 30)]
    startup_timeout_secs: u64,
    /// Keep the daemon's temporary data directory and log.
    #[arg(long)]
    keep_data: bool,
}

impl Args {
    fn iters(&self) -> Iters {
        let mut it = if self.quick {
            Iters::quick()
        } else {
            Iters::default()
        };
        let set = |dst: &mut usize, v: Option<usize>| {
            if let Some(v) = v {
                *dst = v.max(1);
            }
        };
        set(&mut it.spawn1_reps, self.spawn1_reps);
        set(&mut it.batch_reps, self.batch_reps);
        set(&mut it.echo_iters, self.echo_iters);
        set(&mut it.emit_runs, self.emit_runs);
        set(&mut it.unary_iters, self.unary_iters);
        set(&mut it.unary_concurrency, self.concurrency);
        if let Some(n) = self.batch_n {
            it.batch_n = n.clamp(1, 1000);
        }
        if let Some(n) = self.idle_n {
            it.idle_n = n.clamp(1, 1000);
        }
        if !self.fork_ns.is_empty() {
            it.fork_ns = self.fork_ns.iter().map(|&n| n.clamp(1, 1000)).collect();
        }
        if let Some(r) = self.fork_reps {
            it.fork_reps = Some(r.max(1));
        }
        if let Some(m) = self.fork_memory_mib {
            it.fork_memory_mib = m;
        }
        if let Some(m) = self.fork_fill_mib {
            it.fork_fill_mib = m;
        }
        if !self.branch_sizes.is_empty() {
            it.branch_sizes = self.branch_sizes.clone();
        }
        if let Some(n) = self.branch_iters {
            it.branch_iters = n.max(1);
        }
        if self.branch_no_ballast {
            it.branch_ballast = false;
        }
        if let Some(m) = self.branch_memory_mib {
            it.branch_memory_mib = m;
        }
        if let Some(m) = self.branch_fill_mib {
            it.branch_fill_mib = m;
        }
        if let Some(m) = self.live_memory_mib {
            it.live_memory_mib = m;
        }
        if self.live_fill_mib.is_some() {
            it.live_fill_mib = self.live_fill_mib;
        }
        if let Some(n) = self.live_iters {
            it.live_iters = n.max(1);
        }
        if !self.live_sizes.is_empty() {
            it.live_sizes = self.live_sizes.clone();
        }
        if let Some(n) = self.live_size_iters {
            it.live_size_iters = n.max(1);
        }
        if let Some(p) = self.live_writer_pages {
            it.live_writer_pages = p.clamp(1, 4096);
        }
        if let Some(r) = self.live_writer_rate {
            it.live_writer_rate = r;
        }
        if self.live_no_ballast {
            it.live_ballast = false;
        }
        if !self.huge_sizes.is_empty() {
            it.huge_sizes = self.huge_sizes.clone();
        }
        if let Some(n) = self.huge_reps {
            it.huge_reps = n.max(1);
        }
        if let Some(n) = self.huge_children {
            it.huge_children = n.clamp(1, 1000);
        }
        if let Some(s) = self.unary_secs {
            it.unary_duration = Duration::from_secs_f64(s.max(0.1));
        }
        it
    }

    fn selected(&self) -> Vec<Bench> {
        if self.only.is_empty() {
            Bench::ALL.to_vec()
        } else {
            Bench::ALL
                .into_iter()
                .filter(|b| self.only.contains(b))
                .collect()
        }
    }
}

/// Everything the run produced, for the final summary and the Markdown.
struct Report {
    header: Vec<(String, String)>,
    tables: Vec<Table>,
    failures: Vec<(String, String)>,
    observations: Vec<String>,
}

impl Report {
    fn to_markdown(&self) -> String {
        let mut md = String::from("## forkd-bench results\n\n");
        for (k, v) in &self.header {
            let _ = writeln!(md, "- {k}: {v}");
        }
        md.push('\n');
        for t in &self.tables {
            md.push_str(&t.to_markdown());
            md.push('\n');
        }
        if !self.failures.is_empty() {
            md.push_str("### Failed benchmarks\n\n");
            for (name, err) in &self.failures {
                let _ = writeln!(md, "- **{name}**:\n\n```text\n{err}\n```\n");
            }
        }
        md.push_str("### Observations\n\n");
        if self.observations.is_empty() {
            md.push_str("- nothing unexpected\n");
        }
        for o in &self.observations {
            let _ = writeln!(md, "- {o}");
        }
        md
    }
}

#[tokio::main]
async fn main() -> ExitCode {
    let args = Args::parse();
    match run(args).await {
        Ok(true) => ExitCode::SUCCESS,
        Ok(false) => ExitCode::from(1),
        Err(e) => {
            eprintln!("forkd-bench: {e:#}");
            ExitCode::from(2)
        }
    }
}

/// Runs the selected benchmarks; `Ok(false)` when some failed.
async fn run(args: Args) -> Result<bool> {
    let it = args.iters();
    let selected = args.selected();
    let mut header = host::header(&args.forkd, args.quick);
    let load_start = host::loadavg();
    for (k, v) in &header {
        println!("{k}: {v}");
    }
    println!("load average at start (1/5/15 min): {load_start}");
    println!();

    let started = Instant::now();
    let mut daemon = Daemon::start(
        &args.forkd,
        &args.daemon_args,
        Duration::from_secs(args.startup_timeout_secs),
    )
    .await?;
    if args.keep_data {
        daemon.keep_files();
    }
    println!(
        "forkd pid {} serving on {} after {:.0} ms (data and log under {})\n",
        daemon.pid(),
        daemon.url(),
        started.elapsed().as_secs_f64() * 1e3,
        daemon.dir().display()
    );

    let channel = daemon.connect().await?;
    let ctx = Ctx::new(
        channel,
        daemon.pid(),
        GuestShape {
            memory_mib: args.memory_mib,
            vcpus: args.vcpus,
            huge_pages: false,
        },
        Duration::from_secs(args.spawn_timeout_secs),
        daemon.dir().to_path_buf(),
    )
    .with_daemon_cmd(DaemonCmd {
        forkd: args.forkd.clone(),
        args: args.daemon_args.clone(),
        timeout: Duration::from_secs(args.startup_timeout_secs),
    });

    let mut tables = Vec::new();
    let mut failures = Vec::new();
    for bench in selected {
        let name = bench.name();
        eprintln!("running {name} ...");
        let t = Instant::now();
        let result = bench.run(&ctx, &it).await;
        let cleanup = ctx.cleanup(name).await;
        match result {
            Ok(ts) => {
                for t in &ts {
                    println!("{}", t.to_text());
                }
                tables.extend(ts);
            }
            Err(e) => {
                let msg = format!("{e:#}");
                println!("== {name} == FAILED: {msg}\n");
                println!("{}", daemon.log_tail(20));
                failures.push((name.to_string(), msg));
            }
        }
        if let Err(e) = cleanup {
            ctx.observe(format!("{name}: cleaning up its sandboxes failed: {e:#}"));
        }
        eprintln!("{name} took {:.1} s", t.elapsed().as_secs_f64());
        if let Err(e) = daemon.check_alive() {
            failures.push(("daemon".to_string(), format!("{e:#}")));
            println!("forkd died; stopping here: {e:#}");
            break;
        }
    }

    // Whatever remains now was leaked by the daemon (every benchmark deleted
    // what it spawned).
    match ctx.list_labelled_any().await {
        Ok(left) if !left.is_empty() => ctx.observe(format!(
            "{} sandbox(es) still listed after every benchmark deleted its own, e.g. {}",
            left.len(),
            left[0]
        )),
        Ok(_) => {}
        Err(e) => ctx.observe(format!("final ListSandboxes failed: {e:#}")),
    }

    let shutdown = daemon.stop(Duration::from_secs(15)).await;
    match &shutdown {
        Ok(s) if s.was_dead => ctx.observe(format!("forkd had already exited ({})", s.status)),
        Ok(s) if s.killed => ctx.observe(format!(
            "forkd ignored SIGTERM for {:.1} s and was killed",
            s.elapsed.as_secs_f64()
        )),
        Ok(s) if !s.status.success() => ctx.observe(format!(
            "forkd exited with {} after SIGTERM ({:.0} ms)",
            s.status,
            s.elapsed.as_secs_f64() * 1e3
        )),
        Ok(s) => println!(
            "forkd exited cleanly {:.0} ms after SIGTERM",
            s.elapsed.as_secs_f64() * 1e3
        ),
        Err(e) => ctx.observe(format!("stopping forkd: {e:#}")),
    }
    ctx.check_vmms_gone(
        "after the daemon exited",
        &ctx.vmm_pids(),
        Duration::from_secs(3),
    )
    .await;

    header.push((
        "load average (1/5/15 min)".to_string(),
        format!(
            "{load_start} at start, {} at end (other work on the host skews the figures)",
            host::loadavg()
        ),
    ));
    let report = Report {
        header,
        tables,
        failures,
        observations: ctx.observations(),
    };
    println!("\n== observations ==");
    if report.observations.is_empty() {
        println!("  nothing unexpected");
    }
    for o in &report.observations {
        println!("  * {o}");
    }
    if let Some(path) = &args.markdown {
        std::fs::write(path, report.to_markdown())
            .with_context(|| format!("writing {}", path.display()))?;
        println!("\nMarkdown written to {}", path.display());
    }
    Ok(report.failures.is_empty())
}
