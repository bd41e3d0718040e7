//! Standby VMMs: a `forkd-vmm --standby` process builds its VM (KVM VM,
//! vCPUs, a memory slot over reserved address space) before any sandbox
//! needs it, sends [`Event::Standby`](crate::Event::Standby) after its
//! hello, and waits for one [`Claim`]. The claim is a JSON frame like any
//! other, sent with the snapshot's memfd attached as `SCM_RIGHTS`; after it
//! the connection is the ordinary protocol of a restored VMM (its next
//! frame is `Ready`, or `Exited` when the restore fails).
//!
//! A standby process serves at most one claim: after it, it is that
//! sandbox's VMM and nothing else.

use std::io::{IoSlice, IoSliceMut, Read};
use std::os::fd::{AsRawFd, BorrowedFd, FromRawFd, OwnedFd};
use std::os::unix::net::UnixStream;
use std::path::PathBuf;

use nix::sys::socket::{recvmsg, sendmsg, ControlMessage, ControlMessageOwned, MsgFlags};
use serde::{Deserialize, Serialize};

use crate::{encode_json, parse_header, ProtocolError, HEADER_LEN, KIND_JSON};

/// What turns a standby VMM into one sandbox's VMM: the snapshot to
/// restore (its memfd travels with this frame).
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Claim {
    /// The sandbox id (the VMM's log prefix; a Linux child's hostname).
    pub id: String,
    /// The snapshot directory whose `vmstate` the VMM restores.
    pub restore_dir: PathBuf,
    /// Where a Linux child writes its serial console.
    #[serde(default)]
    pub console_log: Option<PathBuf>,
    /// The daemon's `CLOCK_MONOTONIC` instant (ns) of the claim, the
    /// origin of the child's start-up line.
    #[serde(default)]
    pub claimed_at_ns: Option<u64>,
}

/// Sends `claim` with `memory` attached (blocking; the standby is waiting
/// for it, and the frame is small).
pub fn send_claim(
    stream: &UnixStream,
    claim: &Claim,
    memory: BorrowedFd<'_>,
) -> Result<(), ProtocolError> {
    let frame = encode_json(claim);
    let fds = [memory.as_raw_fd()];
    let rights = [ControlMessage::ScmRights(&fds)];
    // The descriptor rides on the first byte sent; the rest of the frame
    // (if the first sendmsg was short) follows as plain bytes.
    let sent = sendmsg::<()>(
        stream.as_raw_fd(),
        &[IoSlice::new(&frame)],
        &rights,
        MsgFlags::MSG_NOSIGNAL,
        None,
    )
    .map_err(|e| ProtocolError::Io(e.into()))?;
    if sent < frame.len() {
        use std::io::Write;
        (&*stream).write_all(&frame[sent..])?;
    }
    Ok(())
}

/// Receives the [`Claim`] and the memfd that came with it (blocking).
pub fn recv_claim(stream: &UnixStream) -> Result<(Claim, OwnedFd), ProtocolError> {
    let mut header = [0u8; HEADER_LEN];
    let mut cmsg = nix::cmsg_space!([std::os::fd::RawFd; 1]);
    let (got, fd) = {
        let mut iov = [IoSliceMut::new(&mut header)];
        let msg = recvmsg::<()>(
            stream.as_raw_fd(),
            &mut iov,
            Some(&mut cmsg),
            MsgFlags::MSG_CMSG_CLOEXEC,
        )
        .map_err(|e| ProtocolError::Io(e.into()))?;
        let mut fd = None;
        for message in msg.cmsgs().map_err(|e| ProtocolError::Io(e.into()))? {
            if let ControlMessageOwned::ScmRights(fds) = message {
                for raw in fds {
                    // SAFETY: the kernel just installed `raw` in this
                    // process for us (SCM_RIGHTS); nothing else owns it.
                    let owned = unsafe { OwnedFd::from_raw_fd(raw) };
                    fd.get_or_insert(owned);
                }
            }
        }
        (msg.bytes, fd)
    };
    if got == 0 {
        return Err(ProtocolError::Io(std::io::ErrorKind::UnexpectedEof.into()));
    }
    (&*stream).read_exact(&mut header[got..])?;
    let (len, kind) = parse_header(header)?;
    if kind != KIND_JSON {
        return Err(ProtocolError::BadKind(kind));
    }
    let mut body = vec![0u8; len];
    (&*stream).read_exact(&mut body)?;
    let claim = serde_json::from_slice(&body)?;
    let fd = fd.ok_or(ProtocolError::MissingFd)?;
    Ok((claim, fd))
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::io::{Seek, Write};

    #[test]
    fn a_claim_carries_its_memfd() {
        let (daemon, vmm) = UnixStream::pair().unwrap();
        let mut file = tempfile_in_memory();
        file.write_all(b"snapshot memory").unwrap();
        let claim = Claim {
            id: "sb-1".into(),
            restore_dir: "/snap/x".into(),
            console_log: None,
            claimed_at_ns: Some(5),
        };
        send_claim(&daemon, &claim, std::os::fd::AsFd::as_fd(&file)).unwrap();
        let (got, fd) = recv_claim(&vmm).unwrap();
        assert_eq!(got, claim);
        let mut received = std::fs::File::from(fd);
        received.rewind().unwrap();
        let mut text = String::new();
        received.read_to_string(&mut text).unwrap();
        assert_eq!(text, "snapshot memory");
    }

    #[test]
    fn a_claim_without_a_memfd_is_refused() {
        let (daemon, vmm) = UnixStream::pair().unwrap();
        let claim = Claim {
            id: "sb-1".into(),
            restore_dir: "/snap/x".into(),
            console_log: None,
            claimed_at_ns: None,
        };
        (&daemon).write_all(&encode_json(&claim)).unwrap();
        assert!(matches!(recv_claim(&vmm), Err(ProtocolError::MissingFd)));
    }

    fn tempfile_in_memory() -> std::fs::File {
        let fd =
            nix::sys::memfd::memfd_create(c"claim-test", nix::sys::memfd::MFdFlags::MFD_CLOEXEC)
                .expect("memfd_create");
        std::fs::File::from(fd)
    }
}
