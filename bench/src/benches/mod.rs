//! The benchmarks. Each takes the shared [`Ctx`](crate::client::Ctx) and
//! its iteration counts and returns tables.

pub mod agent_throughput;
pub mod cold_spawn;
pub mod exec_echo;
pub mod idle_memory;
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
        }
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
