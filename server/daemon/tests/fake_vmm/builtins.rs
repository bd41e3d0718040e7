//! The reference guest's programs (an Exec's argv[0]): `poke PAGE BYTE`
//! and `peek PAGE` on the fake memory, `echo`, `warn`, `fail`, `exit N`,
//! `emit BYTES`, `sleep MS`, `hold MS` (`sleep` saying `held` first),
//! `stubborn` (ignores Cancel) and `crash` (a guest crash).

use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

use forkd_control::{encode_json, encode_output, Event, ExitReason};

use super::memory::Mem;
use super::{send, Out};

pub fn run_builtin(out: &Out, id: u64, argv: &[String], cancel: &AtomicBool, mem: &Mem) {
    let start = Instant::now();
    let mut cancelled = false;
    let exit_code = match argv[0].as_str() {
        "poke" => {
            let page: u64 = argv[1].parse().unwrap();
            let byte: u8 = argv[2].parse().unwrap();
            let mut m = mem.lock().unwrap();
            if byte == 0 {
                m.pages.remove(&page);
            } else {
                m.pages.insert(page, byte);
            }
            m.dirty.insert(page);
            if m.copying {
                m.faults += 1;
            }
            0
        }
        "peek" => {
            let page: u64 = argv[1].parse().unwrap();
            let b = mem.lock().unwrap().pages.get(&page).copied().unwrap_or(0);
            send(out, &encode_output(id, 1, format!("{b}\n").as_bytes()));
            0
        }
        "fail" => {
            send(out, &encode_output(id, 2, b"warm-up broke\n"));
            3
        }
        "echo" => {
            send(
                out,
                &encode_output(id, 1, format!("{}\n", argv[1..].join(" ")).as_bytes()),
            );
            0
        }
        "warn" => {
            send(out, &encode_output(id, 2, b"careful\n"));
            0
        }
        "exit" => argv[1].parse().unwrap(),
        "emit" => {
            let mut left: usize = argv[1].parse().unwrap();
            while left > 0 {
                let n = left.min(64 * 1024);
                send(out, &encode_output(id, 1, &vec![b'x'; n]));
                left -= n;
            }
            0
        }
        // `hold` is `sleep` that says when it has started.
        "sleep" | "hold" => {
            if argv[0] == "hold" {
                send(out, &encode_output(id, 1, b"held\n"));
            }
            let ms: u64 = argv[1].parse().unwrap();
            while start.elapsed() < Duration::from_millis(ms) {
                if cancel.load(Ordering::SeqCst) {
                    cancelled = true;
                    break;
                }
                std::thread::sleep(Duration::from_millis(2));
            }
            if cancelled {
                -125
            } else {
                0
            }
        }
        "stubborn" => loop {
            std::thread::sleep(Duration::from_secs(1));
        },
        "crash" => {
            send(
                out,
                &encode_json(&Event::Exited {
                    reason: ExitReason::GuestCrash {
                        detail: "#PF page fault at rip=0x201234 cr2=0x0".into(),
                    },
                }),
            );
            std::process::exit(0);
        }
        _ => {
            send(out, &encode_output(id, 2, b"unknown builtin\n"));
            127
        }
    };
    send(
        out,
        &encode_json(&Event::ExecDone {
            id,
            exit_code,
            duration_us: start.elapsed().as_micros() as u64,
            cancelled,
            signal: None,
        }),
    );
}
