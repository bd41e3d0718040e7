//! Runs the selected scenarios one after the other on one Tokio runtime,
//! printing `ok`/`FAILED` and the time of each.

use std::future::Future;
use std::pin::Pin;
use std::time::Instant;

/// One scenario: its name and its body.
pub struct Scenario {
    pub name: &'static str,
    pub run: fn() -> Pin<Box<dyn Future<Output = ()>>>,
}

/// Runs `scenarios` as `args` (the command line after the program) say.
pub fn main(args: &[String], scenarios: &[Scenario]) -> ! {
    let filter = args.first().filter(|a| !a.starts_with('-')).cloned();
    let rt = tokio::runtime::Runtime::new().unwrap();
    let mut failed = 0;
    for scenario in scenarios {
        let name = scenario.name;
        if filter.as_deref().is_some_and(|f| !name.contains(f)) {
            continue;
        }
        let t = Instant::now();
        let result = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| {
            rt.block_on((scenario.run)())
        }));
        match result {
            Ok(()) => println!("test {name} ... ok ({:.1} s)", t.elapsed().as_secs_f64()),
            Err(_) => {
                println!("test {name} ... FAILED");
                failed += 1;
            }
        }
    }
    if failed > 0 {
        println!("{failed} test(s) failed");
        std::process::exit(1);
    }
    std::process::exit(0)
}
