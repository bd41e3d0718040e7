//! Runs the selected scenarios one after the other on one Tokio runtime,
//! the way libtest would: `test NAME ... ok` (or `FAILED`) with the time
//! of each, then the failures and a `test result:` summary; the exit code
//! is 101 when any failed. [`args`] reads the command line.

mod args;

use std::future::Future;
use std::io::Write;
use std::pin::Pin;
use std::time::Instant;

use args::{Args, USAGE};

/// One scenario: its name and its body.
pub struct Scenario {
    pub name: &'static str,
    pub run: fn() -> Pin<Box<dyn Future<Output = ()>>>,
}

/// Runs `scenarios` as `args` (the command line after the program) say.
pub fn main(args: &[String], scenarios: &[Scenario]) -> ! {
    let args = match Args::parse(args) {
        Ok(a) => a,
        Err(e) => {
            eprintln!("error: {e}\n\n{USAGE}");
            std::process::exit(101);
        }
    };
    if args.help {
        print!("{USAGE}");
        std::process::exit(0);
    }
    for flag in &args.unknown {
        eprintln!("warning: ignoring unknown flag {flag}");
    }
    let selected: Vec<&Scenario> = scenarios.iter().filter(|s| args.selects(s.name)).collect();
    let filtered_out = scenarios.len() - selected.len();
    if args.list {
        for s in &selected {
            println!("{}: test", s.name);
        }
        if !args.quiet {
            println!("\n{} tests, 0 benchmarks", selected.len());
        }
        std::process::exit(0);
    }

    println!("\nrunning {} tests", selected.len());
    let rt = tokio::runtime::Runtime::new().unwrap();
    let start = Instant::now();
    let mut failed = Vec::new();
    for s in &selected {
        let t = Instant::now();
        let result =
            std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| rt.block_on((s.run)())));
        let secs = t.elapsed().as_secs_f64();
        let ok = result.is_ok();
        if !ok {
            failed.push(s.name);
        }
        match (args.quiet, ok) {
            (true, true) => print!("."),
            (true, false) => print!("F"),
            (false, true) => println!("test {} ... ok ({secs:.1} s)", s.name),
            (false, false) => println!("test {} ... FAILED ({secs:.1} s)", s.name),
        }
        let _ = std::io::stdout().flush();
    }
    if args.quiet {
        println!();
    }
    if !failed.is_empty() {
        println!("\nfailures:");
        for name in &failed {
            println!("    {name}");
        }
    }
    println!(
        "\ntest result: {}. {} passed; {} failed; {filtered_out} filtered out; finished in {:.1} s\n",
        if failed.is_empty() { "ok" } else { "FAILED" },
        selected.len() - failed.len(),
        failed.len(),
        start.elapsed().as_secs_f64(),
    );
    std::process::exit(if failed.is_empty() { 0 } else { 101 })
}
