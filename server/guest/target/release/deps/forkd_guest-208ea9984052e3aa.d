/work/main/server/guest/target/release/deps/forkd_guest-208ea9984052e3aa.d: src/main.rs src/agent.rs src/args.rs src/builtins/mod.rs src/builtins/memory.rs src/builtins/misc.rs src/builtins/writer.rs src/clock.rs src/hw.rs src/mem.rs src/output.rs src/pattern.rs

/work/main/server/guest/target/release/deps/forkd_guest-208ea9984052e3aa: src/main.rs src/agent.rs src/args.rs src/builtins/mod.rs src/builtins/memory.rs src/builtins/misc.rs src/builtins/writer.rs src/clock.rs src/hw.rs src/mem.rs src/output.rs src/pattern.rs

src/main.rs:
src/agent.rs:
src/args.rs:
src/builtins/mod.rs:
src/builtins/memory.rs:
src/builtins/misc.rs:
src/builtins/writer.rs:
src/clock.rs:
src/hw.rs:
src/mem.rs:
src/output.rs:
src/pattern.rs:
