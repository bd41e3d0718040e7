//! The builtin commands behind `Exec`; argv[0] selects one.

mod memory;
mod misc;
pub mod writer;

use core::fmt::Write;

use forkd_guest_abi as abi;

use crate::args::Args;
use crate::output::Output;

/// A builtin: its name, usage line and entry point.
struct Builtin {
    name: &'static [u8],
    usage: &'static str,
    run: fn(Args<'_>, &mut Output) -> i32,
}

const BUILTINS: &[Builtin] = &[
    Builtin { name: b"echo", usage: "echo [ARG..]        print the arguments", run: misc::echo },
    Builtin { name: b"fill", usage: "fill MIB SEED       fill MIB MiB of memory with a pattern from SEED", run: memory::fill },
    Builtin { name: b"checksum", usage: "checksum [MIB]      digest of the filled memory (16 hex digits)", run: memory::checksum },
    Builtin { name: b"dirty", usage: "dirty [PAGES [RATE]] | dirty stop   sequence writer on vCPU 1 (RATE pages/s, 0 = flat out)", run: writer::dirty },
    Builtin { name: b"verify", usage: "verify              check the writer's stamps form one consistent cut", run: writer::verify },
    Builtin { name: b"stat", usage: "stat                guest facts and counters", run: misc::stat },
    Builtin { name: b"sleep", usage: "sleep MS            wait MS milliseconds", run: misc::sleep },
    Builtin { name: b"emit", usage: "emit BYTES          write BYTES bytes to stdout", run: misc::emit },
    Builtin { name: b"exit", usage: "exit CODE           end with exit code CODE", run: misc::exit },
    Builtin { name: b"crash", usage: "crash [ud]          fault the guest (#PF, or #UD)", run: misc::crash },
    Builtin { name: b"poweroff", usage: "poweroff [STATUS]   stop the guest", run: misc::poweroff },
    Builtin { name: b"help", usage: "help                this list", run: help },
];

/// Runs the builtin named by argv[0]; returns its exit code.
pub fn run(args: Args<'_>, out: &mut Output) -> i32 {
    misc::count_request();
    let Some(name) = args.get(0) else {
        let _ = writeln!(out.stderr(), "empty command; try 'help'");
        return abi::EXIT_USAGE;
    };
    match BUILTINS.iter().find(|b| b.name == name) {
        Some(builtin) => (builtin.run)(args, out),
        None => {
            let _ = write!(out.stderr(), "unknown command '");
            out.write(abi::stream::STDERR, name);
            let _ = writeln!(out.stderr(), "'; try 'help'");
            abi::EXIT_UNKNOWN
        }
    }
}

fn help(_: Args<'_>, out: &mut Output) -> i32 {
    let _ = writeln!(out.stdout(), "forkd reference guest builtins:");
    for b in BUILTINS {
        let _ = writeln!(out.stdout(), "  {}", b.usage);
    }
    0
}

/// Prints a usage error for `builtin` and returns [`abi::EXIT_USAGE`].
fn usage(out: &mut Output, name: &str, message: &str) -> i32 {
    let line = BUILTINS
        .iter()
        .find(|b| b.name == name.as_bytes())
        .map(|b| b.usage)
        .unwrap_or("");
    let _ = writeln!(out.stderr(), "{name}: {message}\nusage: {line}");
    abi::EXIT_USAGE
}
