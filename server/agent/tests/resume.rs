//! Quiesce and Resume (snapshots and forked children) of the real agent
//! binary over a socket pair. Outside init mode a forked resume validates
//! but does not touch the entropy pool, clock or hostname.

mod common;

use std::time::{Duration, Instant};

use common::{exec, group_members, wait_group_gone, Agent, Event};
use forkd_agent_proto::{GuestMsg, HostMsg};

/// Long enough for a parked agent to have leaked frames if it did.
const SILENCE: Duration = Duration::from_millis(300);

fn resume(id: u64, forked: bool, entropy: Vec<u8>, sandbox_id: Option<&str>) -> HostMsg {
    HostMsg::Resume {
        id,
        forked,
        entropy,
        unix_ns: 0,
        sandbox_id: sandbox_id.map(String::from),
    }
}

fn resumed(id: u64, killed: u32) -> Event {
    Event::Msg(GuestMsg::Resumed {
        id,
        killed,
        errors: vec![],
    })
}

/// The pid from exec `id`'s Started.
fn started(a: &mut Agent, id: u64) -> u32 {
    match a.next_of(id) {
        Event::Msg(GuestMsg::Started { pid, .. }) => pid,
        other => panic!("expected Started, got {other:?}"),
    }
}

/// Sends Quiesce and skips what came before Quiesced (output of `id`, logs).
fn quiesce(a: &mut Agent, qid: u64, exec_id: Option<u64>) {
    a.send(&HostMsg::Quiesce { id: qid });
    loop {
        match a.recv() {
            Event::Msg(GuestMsg::Quiesced { id }) if id == qid => return,
            Event::Msg(GuestMsg::Log { .. }) => {}
            Event::Data { id, .. } if Some(id) == exec_id => {}
            other => panic!("unexpected before Quiesced: {other:?}"),
        }
    }
}

/// Pings and returns everything (but logs) that came before the Pong.
fn ping_barrier(a: &mut Agent, pid: u64) -> Vec<Event> {
    a.send(&HostMsg::Ping { id: pid });
    let mut before = Vec::new();
    loop {
        match a.recv() {
            Event::Msg(GuestMsg::Pong { id }) if id == pid => return before,
            Event::Msg(GuestMsg::Log { .. }) => {}
            other => before.push(other),
        }
    }
}

#[test]
fn quiesce_parks_the_channel() {
    let mut a = Agent::start();
    a.send(&exec(
        1,
        &["sh", "-c", "while :; do echo x; sleep 0.01; done"],
    ));
    let pid = started(&mut a, 1);
    // It produces output before the Quiesce.
    assert!(matches!(a.next_of(1), Event::Data { id: 1, .. }));
    quiesce(&mut a, 2, Some(1));
    assert_eq!(a.recv_within(SILENCE), None, "a frame after Quiesced");
    // A second Quiesce is answered; a Ping waits for the Resume.
    a.send(&HostMsg::Quiesce { id: 3 });
    assert_eq!(a.recv(), Event::Msg(GuestMsg::Quiesced { id: 3 }));
    a.send(&HostMsg::Ping { id: 4 });
    assert_eq!(a.recv_within(SILENCE), None, "a frame after Quiesced");

    a.send(&resume(5, false, vec![], None));
    // Resumed is the first frame after Quiesced, then the queued Pong.
    assert_eq!(a.recv(), resumed(5, 0));
    let mut pong = false;
    let mut data = false;
    while !(pong && data) {
        match a.recv() {
            Event::Msg(GuestMsg::Pong { id: 4 }) => pong = true,
            Event::Data { id: 1, .. } => data = true,
            Event::Msg(GuestMsg::Log { .. }) => {}
            other => panic!("unexpected after Resumed: {other:?}"),
        }
    }
    // Output flows again and the exec was never interrupted.
    assert!(matches!(a.next_of(1), Event::Data { id: 1, .. }));
    assert!(group_members(pid).contains(&pid));
}

#[test]
fn forked_resume_kills_snapshot_execs() {
    let mut a = Agent::start();
    a.send(&exec(1, &["sleep", "100"]));
    let pid = started(&mut a, 1);
    quiesce(&mut a, 2, None);
    a.send(&resume(3, true, vec![7; 32], Some("child-1")));
    assert_eq!(a.recv(), resumed(3, 1));
    assert_eq!(wait_group_gone(pid), Vec::<u32>::new(), "exec not killed");
    // Nothing about the killed exec, ever: not before a Ping...
    let before = ping_barrier(&mut a, 4);
    assert_eq!(before, vec![], "frames of a killed exec");
    // ...and not mixed into a new exec with the same id.
    let o = a.run(exec(1, &["echo", "hi"]));
    assert_eq!(o.stdout(), "hi\n");
    assert_eq!(o.exit(), Some((Some(0), None)));
    assert_eq!(o.events.len(), 3, "{:?}", o.events);
    assert_ne!(o.pid(), Some(pid));
    assert_eq!(ping_barrier(&mut a, 5), vec![]);
}

#[test]
fn forked_resume_without_entropy_fails() {
    let mut a = Agent::start();
    // No Quiesce first: Resume still answers.
    a.send(&resume(1, false, vec![], None));
    assert_eq!(a.recv(), resumed(1, 0));
    a.send(&resume(2, true, vec![], None));
    match a.recv() {
        Event::Msg(GuestMsg::Resumed { id: 2, errors, .. }) => {
            assert!(!errors.is_empty());
            assert!(errors[0].contains("entropy"), "{errors:?}");
        }
        other => panic!("expected Resumed, got {other:?}"),
    }
    assert_eq!(a.run(exec(1, &["true"])).exit(), Some((Some(0), None)));
}

/// Kills a background process group when the test ends, however it ends.
struct KillGroup(u32);

impl Drop for KillGroup {
    fn drop(&mut self) {
        // SAFETY: kill has no memory effects.
        unsafe { libc::kill(-(self.0 as i32), libc::SIGKILL) };
    }
}

#[test]
fn setsid_background_outlives_exec_and_fork() {
    let mut a = Agent::start();
    let file = std::env::temp_dir().join(format!("forkd-agent-bg-{}", std::process::id()));
    let _ = std::fs::remove_file(&file);
    let script = format!(
        "setsid -f sh -c 'echo $$ > {0}.tmp; mv {0}.tmp {0}; exec sleep 100' \
         >/dev/null 2>&1 </dev/null; echo started",
        file.display()
    );
    let t = Instant::now();
    let o = a.run(exec(1, &["sh", "-c", &script]));
    assert!(
        t.elapsed() < Duration::from_secs(10),
        "took {:?}",
        t.elapsed()
    );
    assert_eq!(o.stdout(), "started\n");
    assert_eq!(o.exit(), Some((Some(0), None)));

    let deadline = Instant::now() + Duration::from_secs(10);
    let bg: u32 = loop {
        if let Ok(text) = std::fs::read_to_string(&file) {
            break text.trim().parse().unwrap();
        }
        assert!(Instant::now() < deadline, "background pid never written");
        std::thread::sleep(Duration::from_millis(20));
    };
    let _guard = KillGroup(bg);
    let _ = std::fs::remove_file(&file);
    assert!(group_members(bg).contains(&bg), "background process gone");

    quiesce(&mut a, 2, None);
    a.send(&resume(3, true, vec![1; 16], None));
    assert_eq!(a.recv(), resumed(3, 0));
    assert!(
        group_members(bg).contains(&bg),
        "killed by the forked resume"
    );
}
