//! End-to-end tests of the real agent binary over a socket pair.

mod common;

use std::time::{Duration, Instant};

use common::{exec, group_members, wait_group_gone, zombie_children, Agent, Event};
use std::io::Write;

use forkd_agent_proto::{
    encode_data, encode_json, GuestMsg, HostMsg, MAX_DATA, STREAM_STDIN, STREAM_STDOUT,
};

#[test]
fn ready_and_ping() {
    let mut a = Agent::start();
    a.send(&HostMsg::Ping { id: 77 });
    assert_eq!(a.recv(), Event::Msg(GuestMsg::Pong { id: 77 }));
}

#[test]
fn echo_hi() {
    let mut a = Agent::start();
    let o = a.run(exec(1, &["echo", "hi"]));
    assert!(o.pid().is_some());
    assert_eq!(o.stdout(), "hi\n");
    assert_eq!(o.stderr(), "");
    assert_eq!(o.exit(), Some((Some(0), None)));
    // Started first, Exited last.
    assert!(matches!(
        o.events.first(),
        Some(Event::Msg(GuestMsg::Started { .. }))
    ));
    assert!(matches!(
        o.events.last(),
        Some(Event::Msg(GuestMsg::Exited { .. }))
    ));
}

#[test]
fn stdout_and_stderr_apart() {
    let mut a = Agent::start();
    let o = a.run(exec(1, &["sh", "-c", "echo out; echo err >&2"]));
    assert_eq!(o.stdout(), "out\n");
    assert_eq!(o.stderr(), "err\n");
}

#[test]
fn exit_code_and_signal() {
    let mut a = Agent::start();
    assert_eq!(
        a.run(exec(1, &["sh", "-c", "exit 3"])).exit(),
        Some((Some(3), None))
    );
    assert_eq!(
        a.run(exec(2, &["sh", "-c", "kill -9 $$"])).exit(),
        Some((None, Some(9)))
    );
}

#[test]
fn stdin_piped_to_cat() {
    let mut a = Agent::start();
    a.send(&HostMsg::Exec {
        id: 5,
        argv: vec!["cat".into()],
        env: vec![],
        cwd: None,
        stdin: true,
    });
    a.send_stdin(5, b"hel");
    a.send_stdin(5, b"lo");
    a.send_stdin(5, b"");
    let o = a.collect(&[5]).remove(&5).unwrap();
    assert_eq!(o.stdout(), "hello");
    assert_eq!(o.exit(), Some((Some(0), None)));
}

#[test]
fn stdin_to_a_child_that_does_not_read() {
    let mut a = Agent::start();
    a.send(&HostMsg::Exec {
        id: 6,
        argv: vec!["true".into()],
        env: vec![],
        cwd: None,
        stdin: true,
    });
    let chunk = vec![b'x'; MAX_DATA];
    for _ in 0..32 {
        a.send_stdin(6, &chunk);
    }
    a.send_stdin(6, b"");
    let o = a.collect(&[6]).remove(&6).unwrap();
    assert_eq!(o.exit(), Some((Some(0), None)));
    // The agent is still responsive.
    a.send(&HostMsg::Ping { id: 1 });
    assert_eq!(a.recv(), Event::Msg(GuestMsg::Pong { id: 1 }));
}

#[test]
fn stdin_held_by_a_background_process() {
    // The background sleep keeps the stdin pipe open without reading. Once
    // the exec has ended, stdin beyond the pipe's capacity must be dropped,
    // not block the agent.
    let mut a = Agent::start();
    a.send(&HostMsg::Exec {
        id: 7,
        argv: vec![
            "sh".into(),
            "-c".into(),
            "exec 3<&0; sleep 30 <&3 3<&- & echo bg".into(),
        ],
        env: vec![],
        cwd: None,
        stdin: true,
    });
    let mut w = a.writer();
    let feeder = std::thread::spawn(move || {
        let chunk = encode_data(7, STREAM_STDIN, &vec![b'x'; MAX_DATA]).unwrap();
        for _ in 0..160 {
            w.write_all(&chunk).unwrap();
        }
        w.write_all(&encode_data(7, STREAM_STDIN, b"").unwrap())
            .unwrap();
        w.write_all(&encode_json(&HostMsg::Ping { id: 70 }).unwrap())
            .unwrap();
    });
    let o = a.collect(&[7]).remove(&7).unwrap();
    assert_eq!(o.stdout(), "bg\n");
    assert_eq!(o.exit(), Some((Some(0), None)));
    loop {
        match a.recv() {
            Event::Msg(GuestMsg::Pong { id: 70 }) => break,
            Event::Msg(GuestMsg::Log { .. }) => {}
            other => panic!("unexpected {other:?}"),
        }
    }
    feeder.join().unwrap();
}

#[test]
fn large_output() {
    let mut a = Agent::start();
    let o = a.run(exec(1, &["seq", "1", "100000"]));
    let want: String = (1..=100000).map(|i| format!("{i}\n")).collect();
    assert!(
        o.stdout() == want,
        "stdout differs ({} bytes)",
        o.stdout().len()
    );
    assert_eq!(o.exit(), Some((Some(0), None)));
}

#[test]
fn ping_while_running() {
    let mut a = Agent::start();
    a.send(&exec(1, &["sh", "-c", "read x"]));
    a.send(&HostMsg::Ping { id: 2 });
    loop {
        match a.recv() {
            Event::Msg(GuestMsg::Pong { id: 2 }) => break,
            Event::Msg(GuestMsg::Started { .. } | GuestMsg::Log { .. }) => {}
            other => panic!("unexpected {other:?}"),
        }
    }
    // stdin is /dev/null, so `read` ends at once.
    assert_eq!(a.collect(&[1])[&1].exit(), Some((Some(1), None)));
}

#[test]
fn no_stdin_is_dev_null() {
    let mut a = Agent::start();
    let o = a.run(exec(1, &["sh", "-c", "cat; echo done"]));
    assert_eq!(o.stdout(), "done\n");
}

#[test]
fn env_and_cwd() {
    let mut a = Agent::start();
    let o = a.run(HostMsg::Exec {
        id: 1,
        argv: vec![
            "sh".into(),
            "-c".into(),
            "echo $FOO; pwd; echo $HOME $LANG $TERM".into(),
        ],
        env: vec![
            ("FOO".into(), "bar baz".into()),
            ("HOME".into(), "/h".into()),
        ],
        cwd: Some("/tmp".into()),
        stdin: false,
    });
    assert_eq!(o.stdout(), "bar baz\n/tmp\n/h C.UTF-8 dumb\n");
    let o = a.run(exec(2, &["pwd"]));
    assert_eq!(o.stdout(), "/\n");
}

#[test]
fn unicode_argv() {
    let mut a = Agent::start();
    let o = a.run(exec(1, &["echo", "héllo", "wörld", "✓"]));
    assert_eq!(o.stdout(), "héllo wörld ✓\n");
}

#[test]
fn output_streams_before_exit() {
    let mut a = Agent::start();
    let o = a.run(exec(
        1,
        &["sh", "-c", "for i in 1 2 3; do echo $i; sleep 0.3; done"],
    ));
    assert_eq!(o.stdout(), "1\n2\n3\n");
    let first_data = o
        .events
        .iter()
        .position(|e| matches!(e, Event::Data { .. }));
    let exited = o
        .events
        .iter()
        .position(|e| matches!(e, Event::Msg(GuestMsg::Exited { .. })));
    assert!(first_data.unwrap() < exited.unwrap());

    // The command waits for stdin that the host sends only after it has seen
    // the first line: this completes only if output is forwarded at once.
    a.send(&HostMsg::Exec {
        id: 2,
        argv: vec![
            "sh".into(),
            "-c".into(),
            "echo first; read x; echo got $x".into(),
        ],
        env: vec![],
        cwd: None,
        stdin: true,
    });
    assert!(matches!(a.next_of(2), Event::Msg(GuestMsg::Started { .. })));
    assert_eq!(
        a.next_of(2),
        Event::Data {
            id: 2,
            stream: STREAM_STDOUT,
            data: b"first\n".to_vec()
        }
    );
    a.send_stdin(2, b"go\n");
    a.send_stdin(2, b"");
    let o = a.collect(&[2]).remove(&2).unwrap();
    assert_eq!(o.stdout(), "got go\n");
    assert_eq!(o.exit(), Some((Some(0), None)));
}

fn kill_test(argv: &[&str]) {
    let mut a = Agent::start();
    a.send(&exec(9, argv));
    let pid = match a.next_of(9) {
        Event::Msg(GuestMsg::Started { pid, .. }) => pid,
        other => panic!("expected Started, got {other:?}"),
    };
    // Unknown ids are ignored.
    a.send(&HostMsg::Kill {
        id: 12345,
        signal: 9,
    });
    a.send(&HostMsg::Kill { id: 9, signal: 9 });
    let o = a.collect(&[9]).remove(&9).unwrap();
    assert_eq!(o.exit(), Some((None, Some(9))));
    assert_eq!(
        wait_group_gone(pid),
        Vec::<u32>::new(),
        "group {pid} left behind"
    );
}

#[test]
fn kill_sleep() {
    kill_test(&["sleep", "1000"]);
}

#[test]
fn kill_process_group() {
    kill_test(&["sh", "-c", "sleep 1000 & sleep 1000"]);
}

#[test]
fn kill_sent_with_the_exec() {
    let mut a = Agent::start();
    a.send(&exec(3, &["sleep", "1000"]));
    a.send(&HostMsg::Kill { id: 3, signal: 9 });
    let o = a.collect(&[3]).remove(&3).unwrap();
    assert_eq!(o.exit(), Some((None, Some(9))));
}

#[test]
fn concurrent_execs() {
    let mut a = Agent::start();
    let ids: Vec<u64> = (1..=8).collect();
    for id in &ids {
        let script = format!("echo start {id}; sleep 0.2; echo end {id} >&2; exit {id}");
        a.send(&exec(*id, &["sh", "-c", &script]));
    }
    let outcomes = a.collect(&ids);
    for id in ids {
        let o = &outcomes[&id];
        assert_eq!(o.stdout(), format!("start {id}\n"));
        assert_eq!(o.stderr(), format!("end {id}\n"));
        assert_eq!(o.exit(), Some((Some(id as i32), None)));
    }
}

#[test]
fn failures() {
    let mut a = Agent::start();
    let o = a.run(exec(1, &["nosuch-forkd-cmd", "x"]));
    let msg = o.failed().expect("Failed");
    assert!(msg.contains("cannot run \"nosuch-forkd-cmd\""), "{msg}");
    assert!(msg.contains("No such file or directory"), "{msg}");
    assert_eq!(o.events.len(), 1, "nothing but Failed: {:?}", o.events);

    // A directory cannot be executed, not even by root.
    let o = a.run(exec(2, &["/tmp"]));
    let msg = o.failed().unwrap();
    assert!(
        msg.contains("cannot run \"/tmp\": Permission denied"),
        "{msg}"
    );

    let o = a.run(HostMsg::Exec {
        id: 3,
        argv: vec!["ls".into()],
        env: vec![],
        cwd: Some("/nonexistent-dir".into()),
        stdin: false,
    });
    let msg = o.failed().unwrap();
    assert!(msg.contains("/nonexistent-dir"), "{msg}");

    let o = a.run(exec(4, &[]));
    assert!(o.failed().unwrap().contains("empty argv"));

    // The agent still runs commands afterwards.
    assert_eq!(a.run(exec(5, &["true"])).exit(), Some((Some(0), None)));
}

#[test]
fn background_child_does_not_hold_exec() {
    let mut a = Agent::start();
    let t = Instant::now();
    let o = a.run(exec(1, &["sh", "-c", "sleep 30 & echo started"]));
    assert!(
        t.elapsed() < Duration::from_secs(10),
        "took {:?}",
        t.elapsed()
    );
    assert_eq!(o.stdout(), "started\n");
    assert_eq!(o.exit(), Some((Some(0), None)));
    // The background sleep is still in the group; the harness kills it.
    assert!(!group_members(o.pid().unwrap()).is_empty());
}

#[test]
fn orphans_are_reaped() {
    let mut a = Agent::start();
    // The background sleep outlives its shell and is reparented to the
    // agent (a child subreaper off PID 1), which must reap it.
    let o = a.run(exec(1, &["sh", "-c", "sleep 0.2 & echo $!"]));
    let orphan: u32 = o.stdout().trim().parse().unwrap();
    let deadline = Instant::now() + Duration::from_secs(10);
    while std::path::Path::new(&format!("/proc/{orphan}")).exists() {
        assert!(Instant::now() < deadline, "orphan {orphan} not reaped");
        std::thread::sleep(Duration::from_millis(20));
    }
    assert_eq!(zombie_children(a.pid()), Vec::<u32>::new());
}

/// As PID 1 (of a fresh pid namespace) the agent must outlive the channel.
#[test]
fn pid1_keeps_running_after_eof() {
    let wrapper = ["unshare", "--pid", "--fork", "--kill-child"];
    if !can_run(&wrapper) {
        eprintln!("skipped: cannot create a pid namespace here");
        return;
    }
    let mut a = Agent::start_under(&wrapper, &["--no-init"]);
    let o = a.run(exec(1, &["sh", "-c", "echo $PPID"]));
    assert_eq!(o.stdout(), "1\n");
    a.close();
    // Nothing to wait for but time: it must still be there a while later.
    std::thread::sleep(Duration::from_millis(500));
    assert!(!a.exited(), "PID 1 exited after EOF");
}

#[test]
fn exits_on_channel_eof() {
    let mut a = Agent::start();
    let status = a.close_and_wait();
    assert!(status.success(), "{status:?}");
}

/// Whether `wrapper` works here (namespaces may be forbidden).
fn can_run(wrapper: &[&str]) -> bool {
    std::process::Command::new(wrapper[0])
        .args(&wrapper[1..])
        .arg("true")
        .status()
        .is_ok_and(|s| s.success())
}

/// The init duties, run in private mount, pid, UTS and network namespaces
/// (so the host's mounts, hostname and lo are untouched).
#[test]
fn init_duties_in_namespaces() {
    let wrapper = [
        "unshare",
        "--mount",
        "--propagation",
        "private",
        "--pid",
        "--uts",
        "--net",
        "--fork",
        "--kill-child",
    ];
    if !can_run(&wrapper) {
        eprintln!("skipped: cannot create namespaces here");
        return;
    }
    let mut a = Agent::start_under(&wrapper, &["--init"]);
    assert_eq!(a.early_logs, Vec::<String>::new());
    let o = a.run(exec(
        1,
        &[
            "sh",
            "-c",
            "hostname; cat /sys/class/net/lo/flags; \
             for m in /proc /sys /dev /dev/pts /dev/shm /tmp /run; do \
               grep -c \" $m \" /proc/self/mounts; done; \
             stat -c %a /tmp /dev/shm; test -c /dev/null && echo null; \
             cat /run/forkd/sandbox-id",
        ],
    ));
    let out = o.stdout();
    let lines: Vec<&str> = out.lines().collect();
    assert_eq!(lines.len(), 13, "{out}\n{}", o.stderr());
    assert_eq!(lines[0], "forkd");
    let flags = u32::from_str_radix(lines[1].trim_start_matches("0x"), 16).unwrap();
    assert_eq!(flags & 1, 1, "lo is not up: {}", lines[1]);
    assert!(lines[2..9].iter().all(|n| *n != "0"), "{out}");
    assert_eq!(&lines[9..], ["1777", "1777", "null", "forkd"]);
}
