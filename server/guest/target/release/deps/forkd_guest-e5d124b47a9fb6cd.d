/work/main/server/guest/target/release/deps/forkd_guest-e5d124b47a9fb6cd.d: src/main.rs src/agent.rs src/args.rs src/builtins/mod.rs src/builtins/memory.rs src/builtins/misc.rs src/builtins/writer.rs src/clock.rs src/hw.rs src/mem.rs src/output.rs src/pattern.rs Cargo.toml

/work/main/server/guest/target/release/deps/libforkd_guest-e5d124b47a9fb6cd.rmeta: src/main.rs src/agent.rs src/args.rs src/builtins/mod.rs src/builtins/memory.rs src/builtins/misc.rs src/builtins/writer.rs src/clock.rs src/hw.rs src/mem.rs src/output.rs src/pattern.rs Cargo.toml

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
Cargo.toml:

# env-dep:CLIPPY_ARGS=-D__CLIPPY_HACKERY__warnings__CLIPPY_HACKERY__
# env-dep:CLIPPY_CONF_DIR
