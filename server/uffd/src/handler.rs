//! The fault-handler thread: before the instant is fixed it lets writes
//! through (and remembers the pages); after, it copies each page before its
//! first write.

use std::os::fd::AsRawFd;
use std::sync::atomic::Ordering;

use userfaultfd::Event;

use crate::engine::{CopyError, Phase, Shared};

/// Serves write faults until the stop eventfd fires.
pub(crate) fn handle_faults(s: &Shared) {
    let mut fds = [
        libc::pollfd {
            fd: s.uffd.as_raw_fd(),
            events: libc::POLLIN,
            revents: 0,
        },
        libc::pollfd {
            fd: s.stop.as_raw_fd(),
            events: libc::POLLIN,
            revents: 0,
        },
    ];
    loop {
        // SAFETY: `fds` is a valid array of two pollfds.
        let n = unsafe { libc::poll(fds.as_mut_ptr(), 2, -1) };
        if n < 0 {
            if std::io::Error::last_os_error().kind() == std::io::ErrorKind::Interrupted {
                continue;
            }
            s.fail(CopyError::Fault(format!(
                "poll: {}",
                std::io::Error::last_os_error()
            )));
            return;
        }
        if fds[1].revents != 0 {
            return;
        }
        loop {
            match s.uffd.read_event() {
                Ok(Some(Event::Pagefault { addr, .. })) => serve(s, s.page_of(addr as usize)),
                Ok(Some(_)) => {}
                Ok(None) => break,
                Err(e) => {
                    s.fail(CopyError::Fault(format!("reading an event: {e}")));
                    return;
                }
            }
        }
    }
}

fn serve(s: &Shared, page: usize) {
    // Held for the whole fault: freeze (which takes the let-through list)
    // never misses a page let through, and a re-arm (which resets every
    // page to pending) cannot land between this fault's claim and its
    // wait, which would leave it waiting for a copy nobody makes. A fault
    // read after the copy ended is then served as a let-through.
    let mut phase = s.phase.lock().unwrap_or_else(|e| e.into_inner());
    if let Phase::Armed(let_through) = &mut *phase {
        let_through.push(page);
        s.early_faults.fetch_add(1, Ordering::Relaxed);
        if let Err(e) = s.unprotect(page, 1) {
            s.fail(e);
        }
        return;
    }
    if s.states.claim(page) {
        if let Err(e) = s.copy(page, 1) {
            // Unblock the writer anyway; the copy is failed.
            s.fail(e);
            s.states.finish(page);
        }
    } else {
        s.states.wait_done(page);
    }
    s.faults.fetch_add(1, Ordering::Relaxed);
    if let Err(e) = s.unprotect(page, 1) {
        s.fail(e);
    }
}
