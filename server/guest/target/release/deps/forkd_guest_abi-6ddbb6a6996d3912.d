/work/main/server/guest/target/release/deps/forkd_guest_abi-6ddbb6a6996d3912.d: /work/main/server/guest-abi/src/lib.rs

/work/main/server/guest/target/release/deps/libforkd_guest_abi-6ddbb6a6996d3912.rmeta: /work/main/server/guest-abi/src/lib.rs

/work/main/server/guest-abi/src/lib.rs:
