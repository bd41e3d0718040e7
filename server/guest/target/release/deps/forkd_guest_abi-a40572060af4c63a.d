/work/main/server/guest/target/release/deps/forkd_guest_abi-a40572060af4c63a.d: /work/main/server/guest-abi/src/lib.rs

/work/main/server/guest/target/release/deps/libforkd_guest_abi-a40572060af4c63a.rlib: /work/main/server/guest-abi/src/lib.rs

/work/main/server/guest/target/release/deps/libforkd_guest_abi-a40572060af4c63a.rmeta: /work/main/server/guest-abi/src/lib.rs

/work/main/server/guest-abi/src/lib.rs:
