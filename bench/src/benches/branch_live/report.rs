//! The tables of branch-live: the four ways side by side, the writer's
//! pages/s, the pause against RAM size, and the targets.

use super::compare::{Outcome, Way};
use super::sizes::SizeFigures;
use super::NAME;
use crate::benches::Iters;
use crate::stats::{fmt_num, Samples};
use crate::table::Table;

const MIB: f64 = (1u64 << 20) as f64;

/// Every table of the run.
pub fn tables(it: &Iters, cmp: &Outcome, sizes: &[SizeFigures]) -> Vec<Table> {
    vec![
        ways(it, cmp),
        writer(it, cmp),
        ram(it, sizes),
        targets(it, cmp),
    ]
}

fn writer_desc(it: &Iters) -> String {
    let rate = if it.live_writer_rate == 0 {
        "as fast as it can".to_string()
    } else {
        format!("{} pages/s", it.live_writer_rate)
    };
    format!(
        "`dirty {} {}` ({} pages, {rate})",
        it.live_writer_pages, it.live_writer_rate, it.live_writer_pages
    )
}

fn ways(it: &Iters, cmp: &Outcome) -> Table {
    let mut t = Table::new(
        NAME,
        &[
            "mode",
            "n",
            "pause p50 ms",
            "pause p90 ms",
            "RPC p50 ms",
            "RPC p90 ms",
            "to READY p50 ms",
            "to READY p90 ms",
            "snapshot MiB p50",
            "faults p50",
            "dirty pages p50",
        ],
    );
    for (way, f) in &cmp.figures {
        let pause = f.pause();
        let rpc = Samples::from_millis(&f.rpc);
        let ready = Samples::from_millis(&f.ready);
        t.row([
            way.label().to_string(),
            pause.len().to_string(),
            fmt_num(pause.p50()),
            fmt_num(pause.percentile(90.0)),
            fmt_num(rpc.p50()),
            fmt_num(rpc.percentile(90.0)),
            fmt_num(ready.p50()),
            fmt_num(ready.percentile(90.0)),
            fmt_num(Samples::new(f.memory_bytes.clone()).p50() / MIB),
            fmt_num(Samples::new(f.faults.clone()).p50()),
            fmt_num(Samples::new(f.dirty_pages.clone()).p50()),
        ]);
    }
    t.note(format!(
        "one cold-booted {} MiB guest (2 vCPUs), {} MiB filled, writer {} on vCPU 1 throughout",
        it.live_memory_mib,
        cmp.fill_mib,
        writer_desc(it)
    ));
    t.note(format!(
        "{} iterations after 1 untimed round; each iteration branches in the order {}; \
         DIFF is against the wait=false snapshot just before it",
        it.live_iters,
        Way::ORDER.map(Way::label).join(", ")
    ));
    t.note(
        "pause = VMM-reported pause_ms (vCPUs stopped until they run again); RPC = client \
         round trip of BranchSandbox; to READY = from the request until the snapshot was READY \
         (wait=false: the READY message on WatchSnapshot, opened right after the reply; the \
         others: the RPC); snapshot MiB = memory_bytes of the READY snapshot; faults = guest \
         writes served by copying the page first (wait=true: the reply, wait=false: the last \
         WatchSnapshot message)",
    );
    t.note(if it.live_ballast {
        "before every branch of every mode (untimed): a scratch file 1.5x the branch's expected \
         writes + 64 MiB written and deleted, so every mode writes into recycled page cache \
         (see branch-pause)"
    } else {
        "--live-no-ballast: branches write into whatever page cache the host hands out"
    });
    t
}

fn writer(it: &Iters, cmp: &Outcome) -> Table {
    let mut t = Table::new(
        format!("{NAME}: writer pages/s"),
        &["phase", "samples", "p50", "min", "max", "mean"],
    );
    let idle = Samples::new(cmp.idle_rates.clone());
    let copy = Samples::new(cmp.copy_rates.clone());
    for (what, s) in [
        ("idle (0.5 s, no branch running)", &idle),
        ("during a LIVE wait=false copy", &copy),
    ] {
        t.row([
            what.to_string(),
            s.len().to_string(),
            fmt_num(s.p50()),
            fmt_num(s.min()),
            fmt_num(s.max()),
            fmt_num(s.mean()),
        ]);
    }
    t.note(format!(
        "writer {}; pages/s = difference of two `stat` seq readings over the client time between \
         them; idle: one 0.5 s reading at the start of every iteration; during a copy: from the \
         first to the last reading (one every ~20 ms) taken between the wait=false reply and READY",
        writer_desc(it)
    ));
    if cmp.copies_unsampled > 0 {
        t.note(format!(
            "{} copies ended before two readings could be taken and have no sample",
            cmp.copies_unsampled
        ));
    }
    t.note(format!(
        "p50 during the copy / p50 idle = {} (slowdown {} %)",
        fmt_num(copy.p50() / idle.p50()),
        fmt_num(100.0 * (1.0 - copy.p50() / idle.p50()))
    ));
    t
}

fn ram(it: &Iters, sizes: &[SizeFigures]) -> Table {
    let mut t = Table::new(
        format!("{NAME}: LIVE pause against RAM"),
        &[
            "RAM MiB",
            "filled MiB",
            "n",
            "pause p50 ms",
            "pause p90 ms",
            "RPC p50 ms",
            "RPC p90 ms",
            "to READY p50 ms",
            "copied MiB p50",
        ],
    );
    for f in sizes {
        let pause = Samples::new(f.pause_ms.clone());
        let rpc = Samples::from_millis(&f.rpc);
        t.row([
            f.memory_mib.to_string(),
            f.fill_mib.to_string(),
            pause.len().to_string(),
            fmt_num(pause.p50()),
            fmt_num(pause.percentile(90.0)),
            fmt_num(rpc.p50()),
            fmt_num(rpc.percentile(90.0)),
            fmt_num(Samples::from_millis(&f.ready).p50()),
            fmt_num(Samples::new(f.bytes_total.clone()).p50() / MIB),
        ]);
    }
    t.note(format!(
        "per size: a cold-booted guest, filled, writer {}; LIVE wait=false, followed on \
         WatchSnapshot to READY, then deleted; {} iterations after 1 untimed; no ballast (the \
         pause writes no memory); copied MiB = WatchSnapshot bytes_total",
        writer_desc(it),
        it.live_size_iters
    ));
    t
}

fn targets(it: &Iters, cmp: &Outcome) -> Table {
    let mut t = Table::new(format!("{NAME}: targets"), &["target", "measured", "met"]);
    let p50 = |way: Way| cmp.figures.get(&way).map(|f| f.pause().p50());
    let (Some(live_w), Some(live_nw), Some(diff), Some(full)) = (
        p50(Way::LiveWait),
        p50(Way::LiveNoWait),
        p50(Way::Diff),
        p50(Way::Full),
    ) else {
        t.note("some mode has no figures");
        return t;
    };
    let live_all: Vec<f64> = [Way::LiveWait, Way::LiveNoWait]
        .iter()
        .filter_map(|w| cmp.figures.get(w))
        .flat_map(|f| f.pause_ms.iter().copied())
        .collect();
    let live = Samples::new(live_all).p50();
    let rt_nw = cmp
        .figures
        .get(&Way::LiveNoWait)
        .map(|f| Samples::from_millis(&f.rpc).p50())
        .unwrap_or(f64::NAN);
    let yes = |ok: bool| if ok { "yes" } else { "no" }.to_string();
    t.row([
        format!("LIVE pause p50 <= 10 ms at {} MiB", it.live_memory_mib),
        format!(
            "{} ms wait=true, {} ms wait=false",
            fmt_num(live_w),
            fmt_num(live_nw)
        ),
        yes(live_w <= 10.0 && live_nw <= 10.0),
    ]);
    t.row([
        "LIVE wait=false round trip p50 <= 15 ms".to_string(),
        format!("{} ms", fmt_num(rt_nw)),
        yes(rt_nw <= 15.0),
    ]);
    t.row([
        "FULL / LIVE pause p50 >= 100x".to_string(),
        format!(
            "{} / {} ms = {}x",
            fmt_num(full),
            fmt_num(live),
            fmt_num(full / live)
        ),
        yes(full / live >= 100.0),
    ]);
    t.row([
        "DIFF / LIVE pause p50 >= 5x".to_string(),
        format!(
            "{} / {} ms = {}x",
            fmt_num(diff),
            fmt_num(live),
            fmt_num(diff / live)
        ),
        yes(diff / live >= 5.0),
    ]);
    t.note("LIVE in the ratios = the p50 of the wait=true and wait=false pauses together");
    t
}
