//! The benchmarks. Each takes the shared [`Ctx`](crate::client::Ctx) and
//! its iteration counts and returns tables.

pub mod agent_throughput;
pub mod branch_live;
pub mod branch_pause;
pub mod cold_spawn;
pub mod exec_echo;
pub mod fork_pool;
pub mod fork_spawn;
pub mod idle_memory;
pub mod live_huge;
pub mod unary;

use std::time::Duration;

use crate::stats::{fmt_num, Samples};
use crate::table::Table;

/// Iteration counts of every benchmark.
#[derive(Clone, Debug)]
pub struct Iters {
    /// cold-spawn: SpawnSandboxes(n=1) repetitions.
    pub spawn1_reps: usize,
    /// cold-spawn: size of the large batch.
    pub batch_n: u32,
    /// cold-spawn: repetitions of the large batch.
    pub batch_reps: usize,
    /// exec-echo: untimed warm-up calls.
    pub echo_warmup: usize,
    /// exec-echo: timed calls.
    pub echo_iters: usize,
    /// agent-throughput: timed runs per payload size.
    pub emit_runs: usize,
    /// idle-memory: sandboxes.
    pub idle_n: u32,
    /// idle-memory: wait before reading memory figures.
    pub idle_wait: Duration,
    /// unary: untimed warm-up calls.
    pub unary_warmup: usize,
    /// unary: sequential timed calls.
    pub unary_iters: usize,
    /// unary: concurrent callers.
    pub unary_concurrency: usize,
    /// unary: duration of the concurrent phase.
    pub unary_duration: Duration,
    /// fork-spawn: guest RAM of the snapshot, MiB.
    pub fork_memory_mib: u32,
    /// fork-spawn: MiB filled by the warm-up.
    pub fork_fill_mib: u32,
    /// fork-spawn: the numbers of children per SpawnSandboxes call.
    pub fork_ns: Vec<u32>,
    /// fork-spawn: repetitions for every n (None: 20, 5, 3, 1 for n up to
    /// 1, 10, 100 and above).
    pub fork_reps: Option<usize>,
    /// fork-spawn: spawns of at least this many children get memory
    /// figures.
    pub fork_mem_min_n: u32,
    /// branch-pause: guest RAM, MiB.
    pub branch_memory_mib: u32,
    /// branch-pause: MiB filled before the first branch.
    pub branch_fill_mib: u32,
    /// branch-pause: MiB rewritten before each branch.
    pub branch_sizes: Vec<u32>,
    /// branch-pause: iterations per size (each one FULL and one DIFF).
    pub branch_iters: usize,
    /// branch-pause: write and delete a scratch file before every branch
    /// (see the module comment of `branch_pause`).
    pub branch_ballast: bool,
    /// branch-live: guest RAM of the compared source, MiB.
    pub live_memory_mib: u32,
    /// branch-live: MiB to fill (None: as much as `fill` allows).
    pub live_fill_mib: Option<u32>,
    /// branch-live: iterations of the comparison (one branch per mode each).
    pub live_iters: usize,
    /// branch-live: guest RAM sizes of the pause-against-RAM sweep, MiB.
    pub live_sizes: Vec<u32>,
    /// branch-live: LIVE branches per size of the sweep.
    pub live_size_iters: usize,
    /// branch-live: pages of the writer's ring.
    pub live_writer_pages: u32,
    /// branch-live: the writer's pages/s (0: as fast as it can).
    pub live_writer_rate: u64,
    /// branch-live: scratch-file ballast before every branch.
    pub live_ballast: bool,
    /// live-huge: guest RAM sizes of the first-LIVE-branch comparison, MiB.
    pub huge_sizes: Vec<u32>,
    /// live-huge: sandboxes per size and page size.
    pub huge_reps: usize,
    /// live-huge: idle children forked per page size.
    pub huge_children: u32,
    /// live-huge: guest RAM of the children's snapshot, MiB.
    pub huge_child_memory_mib: u32,
    /// live-huge: MiB the children's source fills before its snapshot.
    pub huge_child_fill_mib: u32,
}

impl Default for Iters {
    fn default() -> Self {
        Iters {
            spawn1_reps: 20,
            batch_n: 100,
            batch_reps: 3,
            echo_warmup: 200,
            echo_iters: 2000,
            emit_runs: 10,
            idle_n: 10,
            idle_wait: Duration::from_secs(1),
            unary_warmup: 200,
            unary_iters: 2000,
            unary_concurrency: 64,
            unary_duration: Duration::from_secs(3),
            fork_memory_mib: 1024,
            fork_fill_mib: 512,
            fork_ns: vec![1, 10, 100, 1000],
            fork_reps: None,
            fork_mem_min_n: 100,
            branch_memory_mib: 1024,
            branch_fill_mib: 512,
            branch_sizes: vec![16, 128, 512],
            branch_iters: 10,
            branch_ballast: true,
            live_memory_mib: 1536,
            live_fill_mib: None,
            live_iters: 10,
            live_sizes: vec![256, 1024, 4096],
            live_size_iters: 10,
            live_writer_pages: 4096,
            live_writer_rate: 0,
            live_ballast: true,
            huge_sizes: vec![256, 1536, 4096],
            huge_reps: 3,
            huge_children: 10,
            huge_child_memory_mib: 1536,
            huge_child_fill_mib: 512,
        }
    }
}

impl Iters {
    /// Small counts for a smoke run (checks the plumbing, not the figures).
    pub fn quick() -> Self {
        Iters {
            spawn1_reps: 3,
            batch_n: 10,
            batch_reps: 1,
            echo_warmup: 10,
            echo_iters: 100,
            emit_runs: 2,
            idle_n: 3,
            idle_wait: Duration::from_secs(1),
            unary_warmup: 10,
            unary_iters: 100,
            unary_concurrency: 8,
            unary_duration: Duration::from_millis(500),
            fork_memory_mib: 256,
            fork_fill_mib: 64,
            fork_ns: vec![1, 10],
            fork_reps: Some(2),
            fork_mem_min_n: 10,
            branch_memory_mib: 256,
            branch_fill_mib: 64,
            branch_sizes: vec![16],
            branch_iters: 2,
            branch_ballast: true,
            live_memory_mib: 256,
            live_fill_mib: None,
            live_iters: 2,
            live_sizes: vec![128, 256],
            live_size_iters: 2,
            live_writer_pages: 4096,
            live_writer_rate: 0,
            live_ballast: true,
            huge_reps: 1,
            ..Iters::default()
        }
    }

    /// fork-spawn: repetitions of a spawn of `n` children.
    pub fn fork_reps(&self, n: u32) -> usize {
        self.fork_reps.unwrap_or(match n {
            0..=1 => 20,
            2..=10 => 5,
            11..=100 => 3,
            _ => 1,
        })
    }
}

/// Headers of a latency table.
pub const LATENCY_HEADERS: &[&str] = &[
    "measurement",
    "samples",
    "p50",
    "p90",
    "p99",
    "min",
    "max",
    "mean",
];

/// Adds one latency row (`samples` already in the unit named in `what`).
pub fn latency_row(table: &mut Table, what: &str, samples: &Samples) {
    table.row([
        what.to_string(),
        samples.len().to_string(),
        fmt_num(samples.p50()),
        fmt_num(samples.percentile(90.0)),
        fmt_num(samples.percentile(99.0)),
        fmt_num(samples.min()),
        fmt_num(samples.max()),
        fmt_num(samples.mean()),
    ]);
}
