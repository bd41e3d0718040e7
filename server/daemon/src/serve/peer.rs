//! Who is on the other end of a local connection, and whether that local
//! user may use the daemon.
//!
//! Without a token, forkd serves only loopback and its Unix socket, and
//! accepts only the local user it runs as, root, and users named with
//! `--allow-uid`. On the Unix socket the kernel tells (`SO_PEERCRED`). On
//! loopback TCP the peer's socket is in this network namespace, and the
//! kernel's socket-diagnostics netlink interface (`NETLINK_SOCK_DIAG`, what
//! `ss` uses) looks it up by its address and port and reports the user that
//! created it, in one exact lookup per connection.

use std::io;
use std::mem::size_of;
use std::net::{IpAddr, SocketAddr};
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd};

/// `SOCK_DIAG_BY_FAMILY` (linux/sock_diag.h).
const SOCK_DIAG_BY_FAMILY: u16 = 20;
/// `INET_DIAG_NOCOOKIE`: match by address, not by socket cookie.
const NO_COOKIE: u32 = !0;

/// This process's effective user id.
pub fn euid() -> u32 {
    // SAFETY: geteuid(2) takes no arguments, cannot fail and touches no
    // memory of ours.
    unsafe { libc::geteuid() }
}

/// The user ids accepted without a token.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct LocalUsers {
    allowed: Vec<u32>,
}

impl LocalUsers {
    /// The daemon's effective user, root, and `extra`.
    pub fn new(extra: &[u32]) -> LocalUsers {
        let mut allowed = vec![euid(), 0];
        allowed.extend_from_slice(extra);
        allowed.sort_unstable();
        allowed.dedup();
        LocalUsers { allowed }
    }

    /// Whether `uid` may connect.
    pub fn allows(&self, uid: u32) -> bool {
        self.allowed.contains(&uid)
    }

    /// The accepted ids, sorted.
    pub fn ids(&self) -> &[u32] {
        &self.allowed
    }
}

#[repr(C)]
#[derive(Clone, Copy, Default)]
struct NlMsgHdr {
    len: u32,
    kind: u16,
    flags: u16,
    seq: u32,
    pid: u32,
}

#[repr(C)]
#[derive(Clone, Copy, Default)]
struct InetDiagSockId {
    sport: [u8; 2],
    dport: [u8; 2],
    src: [u8; 16],
    dst: [u8; 16],
    interface: u32,
    cookie: [u32; 2],
}

#[repr(C)]
#[derive(Clone, Copy, Default)]
struct InetDiagReqV2 {
    family: u8,
    protocol: u8,
    ext: u8,
    pad: u8,
    states: u32,
    id: InetDiagSockId,
}

#[repr(C)]
#[derive(Clone, Copy, Default)]
struct InetDiagMsg {
    family: u8,
    state: u8,
    timer: u8,
    retrans: u8,
    id: InetDiagSockId,
    expires: u32,
    rqueue: u32,
    wqueue: u32,
    uid: u32,
    inode: u32,
}

#[repr(C)]
#[derive(Clone, Copy, Default)]
struct Request {
    hdr: NlMsgHdr,
    req: InetDiagReqV2,
}

/// Address bytes as inet_diag wants them: IPv4 in the first 4 bytes.
fn addr_bytes(ip: IpAddr) -> [u8; 16] {
    let mut out = [0u8; 16];
    match ip {
        IpAddr::V4(v4) => out[..4].copy_from_slice(&v4.octets()),
        IpAddr::V6(v6) => out = v6.octets(),
    }
    out
}

/// The user that owns the TCP socket at `peer` connected to `local` (a
/// connection this process accepted on `local`, seen from the peer's side).
/// `Ok(None)` when no such socket exists in this network namespace (the
/// peer is elsewhere, or closed already).
pub fn tcp_peer_uid(local: SocketAddr, peer: SocketAddr) -> io::Result<Option<u32>> {
    let mut tries = vec![(peer.ip(), local.ip())];
    // A dual-stack IPv6 client socket talking to an IPv4 listener is
    // indexed under IPv4-mapped addresses.
    if let (IpAddr::V4(p), IpAddr::V4(l)) = (peer.ip(), local.ip()) {
        tries.push((
            IpAddr::V6(p.to_ipv6_mapped()),
            IpAddr::V6(l.to_ipv6_mapped()),
        ));
    }
    for (src, dst) in tries {
        if let Some(uid) = diag_lookup(src, peer.port(), dst, local.port())? {
            return Ok(Some(uid));
        }
    }
    Ok(None)
}

/// One exact `SOCK_DIAG_BY_FAMILY` lookup of the TCP socket bound to
/// `src:sport` and connected to `dst:dport`.
fn diag_lookup(src: IpAddr, sport: u16, dst: IpAddr, dport: u16) -> io::Result<Option<u32>> {
    // SAFETY: socket(2) with constant arguments; the result is checked and
    // owned right away.
    let raw = unsafe {
        libc::socket(
            libc::AF_NETLINK,
            libc::SOCK_DGRAM | libc::SOCK_CLOEXEC,
            libc::NETLINK_SOCK_DIAG,
        )
    };
    if raw < 0 {
        return Err(io::Error::last_os_error());
    }
    // SAFETY: `raw` is a fresh fd nobody else owns.
    let fd = unsafe { OwnedFd::from_raw_fd(raw) };
    // The kernel answers an exact lookup at once; bound the wait anyway,
    // since this runs on the accept loop.
    let timeout = libc::timeval {
        tv_sec: 0,
        tv_usec: 200_000,
    };
    // SAFETY: `timeout` is a valid timeval of the stated length for
    // SO_RCVTIMEO on an fd we own.
    let set = unsafe {
        libc::setsockopt(
            fd.as_raw_fd(),
            libc::SOL_SOCKET,
            libc::SO_RCVTIMEO,
            (&timeout as *const libc::timeval).cast(),
            size_of::<libc::timeval>() as u32,
        )
    };
    if set < 0 {
        return Err(io::Error::last_os_error());
    }
    let family = if src.is_ipv4() {
        libc::AF_INET
    } else {
        libc::AF_INET6
    };
    let req = Request {
        hdr: NlMsgHdr {
            len: size_of::<Request>() as u32,
            kind: SOCK_DIAG_BY_FAMILY,
            flags: libc::NLM_F_REQUEST as u16,
            seq: 1,
            pid: 0,
        },
        req: InetDiagReqV2 {
            family: family as u8,
            protocol: libc::IPPROTO_TCP as u8,
            ext: 0,
            pad: 0,
            states: !0,
            id: InetDiagSockId {
                sport: sport.to_be_bytes(),
                dport: dport.to_be_bytes(),
                src: addr_bytes(src),
                dst: addr_bytes(dst),
                interface: 0,
                cookie: [NO_COOKIE, NO_COOKIE],
            },
        },
    };
    // SAFETY: `sockaddr_nl` is plain data; all-zero is valid (pid 0: the
    // kernel).
    let mut kernel: libc::sockaddr_nl = unsafe { std::mem::zeroed() };
    kernel.nl_family = libc::AF_NETLINK as u16;
    // SAFETY: `req` is a repr(C) value of the stated length, and `kernel` a
    // valid sockaddr_nl of the stated length; both outlive the call.
    let sent = unsafe {
        libc::sendto(
            fd.as_raw_fd(),
            (&req as *const Request).cast(),
            size_of::<Request>(),
            0,
            (&kernel as *const libc::sockaddr_nl).cast(),
            size_of::<libc::sockaddr_nl>() as u32,
        )
    };
    if sent < 0 {
        return Err(io::Error::last_os_error());
    }
    let mut buf = [0u8; 1024];
    // SAFETY: `buf` is writable for its full length. The kernel answers an
    // exact lookup at once; SO_RCVTIMEO bounds the wait regardless.
    let got = unsafe { libc::recv(fd.as_raw_fd(), buf.as_mut_ptr().cast(), buf.len(), 0) };
    if got < 0 {
        return Err(io::Error::last_os_error());
    }
    parse_reply(&buf[..got as usize])
}

/// The uid in a reply: an `inet_diag_msg`, or an error message (ENOENT:
/// no such socket).
fn parse_reply(buf: &[u8]) -> io::Result<Option<u32>> {
    let hdr_len = size_of::<NlMsgHdr>();
    if buf.len() < hdr_len {
        return Err(io::Error::new(
            io::ErrorKind::InvalidData,
            "short netlink reply",
        ));
    }
    // SAFETY: `buf` holds at least `hdr_len` bytes; read_unaligned copies
    // them into a plain-data struct (any bit pattern is valid).
    let hdr: NlMsgHdr = unsafe { std::ptr::read_unaligned(buf.as_ptr().cast()) };
    let body = &buf[hdr_len..];
    match hdr.kind as i32 {
        libc::NLMSG_ERROR => {
            let errno = body
                .get(..4)
                .map(|b| i32::from_ne_bytes([b[0], b[1], b[2], b[3]]))
                .unwrap_or(0);
            match -errno {
                0 | libc::ENOENT => Ok(None),
                e => Err(io::Error::from_raw_os_error(e)),
            }
        }
        kind if kind == i32::from(SOCK_DIAG_BY_FAMILY) => {
            if body.len() < size_of::<InetDiagMsg>() {
                return Err(io::Error::new(
                    io::ErrorKind::InvalidData,
                    "short inet_diag_msg",
                ));
            }
            // SAFETY: `body` holds a whole inet_diag_msg (checked above);
            // plain data, copied unaligned.
            let msg: InetDiagMsg = unsafe { std::ptr::read_unaligned(body.as_ptr().cast()) };
            Ok(Some(msg.uid))
        }
        other => Err(io::Error::new(
            io::ErrorKind::InvalidData,
            format!("unexpected netlink message type {other}"),
        )),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::net::{TcpListener, TcpStream};

    #[test]
    fn struct_sizes_match_the_kernel() {
        assert_eq!(size_of::<NlMsgHdr>(), 16);
        assert_eq!(size_of::<InetDiagSockId>(), 48);
        assert_eq!(size_of::<InetDiagReqV2>(), 56);
        assert_eq!(size_of::<InetDiagMsg>(), 72);
    }

    #[test]
    fn finds_the_owner_of_a_loopback_peer() {
        let me = euid();
        for bind in ["127.0.0.1:0", "[::1]:0"] {
            let Ok(listener) = TcpListener::bind(bind) else {
                continue; // no IPv6 loopback here
            };
            let client = TcpStream::connect(listener.local_addr().unwrap()).unwrap();
            let (server, peer) = listener.accept().unwrap();
            let local = server.local_addr().unwrap();
            assert_eq!(tcp_peer_uid(local, peer).unwrap(), Some(me), "{bind}");
            drop(client);
        }
        // Nobody on that port.
        let local: SocketAddr = "127.0.0.1:1".parse().unwrap();
        let peer: SocketAddr = "127.0.0.1:2".parse().unwrap();
        assert_eq!(tcp_peer_uid(local, peer).unwrap(), None);
    }

    #[test]
    fn local_users() {
        let users = LocalUsers::new(&[1234]);
        assert!(users.allows(0));
        assert!(users.allows(euid()));
        assert!(users.allows(1234));
        assert!(!users.allows(65534) || euid() == 65534);
    }
}
