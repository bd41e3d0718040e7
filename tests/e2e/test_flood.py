"""Connection floods (loopback only, bounded in count and time): idle and
half-open connections cannot exhaust the daemon. Each gRPC listener holds
at most --max-connections (default 1024) and makes room by closing its
oldest idle connection; half-open connections are closed after
--first-call-timeout, idle ones after --idle-timeout; refusals and closes
are logged (at most once a second) and counted in forkd_connections_*."""

from __future__ import annotations

import collections
import os
import resource
import socket
import threading
import time
import urllib.request

from forkd_daemon import Daemon, free_port, wait_until

PREFACE = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n" + bytes([0, 0, 0, 4, 0, 0, 0, 0, 0])  # + empty SETTINGS
FLOOD = 10_000
FLOOD_TIME_LIMIT = 120.0
# Client sockets this test keeps open at once (its own fd budget).
CLIENT_KEEP = 4_000


def rss_mib(pid: int) -> float:
    with open(f"/proc/{pid}/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) / 1024
    raise AssertionError("no VmRSS")


def fd_count(pid: int) -> int:
    return len(os.listdir(f"/proc/{pid}/fd"))


def scrape(port: int) -> dict[str, float]:
    with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=10) as resp:
        text = resp.read().decode()
    out = {}
    for line in text.splitlines():
        if line.startswith("forkd_connections"):
            name, value = line.rsplit(" ", 1)
            out[name] = float(value)
    return out


def raise_own_fd_limit() -> None:
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))


class Flooder(threading.Thread):
    """Opens `total` connections to 127.0.0.1:port (half send the HTTP/2
    preface, half nothing), keeping at most CLIENT_KEEP open; stops at
    `total`, at `limit` seconds, or when told."""

    def __init__(self, port: int, total: int, limit: float):
        super().__init__(daemon=True)
        self.port, self.total, self.limit = port, total, limit
        self.opened = 0
        self.failed = 0
        self.stop_flag = threading.Event()
        self.socks: collections.deque[socket.socket] = collections.deque()
        self.peak_fds = 0

    def run(self) -> None:
        t0 = time.monotonic()
        while self.opened < self.total and not self.stop_flag.is_set():
            if time.monotonic() - t0 > self.limit:
                break
            s = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
            s.settimeout(5)
            try:
                s.connect(("127.0.0.1", self.port))
                if self.opened % 2 == 0:
                    s.sendall(PREFACE)
            except OSError:
                self.failed += 1
                s.close()
                continue
            self.opened += 1
            self.socks.append(s)
            while len(self.socks) > CLIENT_KEEP:
                self.socks.popleft().close()

    def close_all(self) -> None:
        while self.socks:
            self.socks.popleft().close()


def test_flood_of_idle_and_half_open_connections(daemon_factory, short_tmp):
    raise_own_fd_limit()
    sock = short_tmp / "forkd.sock"
    mport = free_port()
    d = daemon_factory(listen_unix=sock, extra_args=["--metrics-listen", f"127.0.0.1:{mport}"])
    ux = d.client.with_options(target=str(sock), unix=True, authority="localhost")
    # Warm up (one sandbox, one branch) so the baseline includes the
    # daemon's ordinary working set.
    (sb,) = d.spawn(1)
    d.client.call(
        "forkd.v1.SandboxService/BranchSandbox", {"sandboxId": sb["id"], "tag": "warm", "mode": "BRANCH_MODE_FULL"}
    )
    d.delete(sb["id"])
    rss_before = rss_mib(d.pid)
    fds_before = fd_count(d.pid)

    flood = Flooder(d.port, FLOOD, FLOOD_TIME_LIMIT)
    flood.start()
    peak_rss = rss_before
    peak_fds = fds_before
    try:
        # Let the flood fill the TCP listener first.
        assert wait_until(lambda: flood.opened >= 2_000 or not flood.is_alive(), 60)
        # During the flood: health on TCP, spawn/branch/exec on the socket.
        checks = []
        while flood.is_alive() or not checks:
            assert d.anon.health(timeout=30) == "SERVING"
            assert ux.health(timeout=30) == "SERVING"
            checks.append(flood.opened)
            if len(checks) == 1:
                resp = ux.call("forkd.v1.SandboxService/SpawnSandboxes", {"n": 1}, timeout=120)
                [usb] = resp["sandboxes"]
                d.record_sandboxes([usb])
                r = ux.exec(usb["id"], ["echo", "during"])
                assert (r.stdout, r.exit_code) == (b"during\n", 0)
                snap = ux.call(
                    "forkd.v1.SandboxService/BranchSandbox",
                    {"sandboxId": usb["id"], "tag": "during", "mode": "BRANCH_MODE_FULL"},
                    timeout=120,
                )
                assert snap["snapshot"]["status"] == "SNAPSHOT_STATUS_READY", snap
            peak_rss = max(peak_rss, rss_mib(d.pid))
            peak_fds = max(peak_fds, fd_count(d.pid))
        flood.join(FLOOD_TIME_LIMIT)
    finally:
        flood.stop_flag.set()
        flood.join(30)
    print(f"flood: {flood.opened} opened, {flood.failed} failed to connect; "
          f"{len(checks)} rounds of health checks during it, the first at {checks[0]} connections")
    assert flood.opened >= FLOOD, f"only {flood.opened} connections opened in {FLOOD_TIME_LIMIT}s"
    # Checks ran while the flood was under way (not only after it).
    assert checks[0] < FLOOD, checks

    m = scrape(mport)
    print("metrics:", {k: v for k, v in m.items() if v})
    open_tcp = m['forkd_connections_open{listener="tcp"}']
    assert open_tcp <= 1024, m
    evicted = m.get('forkd_connections_closed_total{listener="tcp",reason="evicted"}', 0)
    assert evicted >= FLOOD - 1024 - CLIENT_KEEP, m
    assert "closed a connection" in d.log_tail(500)
    # The daemon's fds stayed bounded by the connection limit (plus the
    # sandbox spawned meanwhile, the health and metrics connections, and
    # evicted connections whose close is under way).
    assert peak_fds <= fds_before + 1024 + 128, (fds_before, peak_fds)

    flood.close_all()
    # Every flood connection is gone on the daemon's side too.
    assert wait_until(lambda: scrape(mport)['forkd_connections_open{listener="tcp"}'] <= 1, 30), scrape(mport)

    # After: TCP works again for the API.
    (after,) = d.spawn(1, snapshotTag="during")
    assert d.exec_ok(after["id"], ["echo", "after"]) == b"after\n"
    d.client.call(
        "forkd.v1.SandboxService/BranchSandbox",
        {"sandboxId": after["id"], "tag": "after", "mode": "BRANCH_MODE_FULL"},
    )
    # Memory: bounded during the flood and back near the baseline after.
    time.sleep(2)
    rss_after = rss_mib(d.pid)
    print(f"RSS MiB: before {rss_before:.1f}, peak {peak_rss:.1f}, after {rss_after:.1f}; "
          f"fds before {fds_before}, peak {peak_fds}")
    assert peak_rss < rss_before + 256, (rss_before, peak_rss)
    assert rss_after < rss_before + 32, (rss_before, peak_rss, rss_after)


def raw_connection(port: int, preface: bool) -> socket.socket:
    s = socket.create_connection(("127.0.0.1", port), timeout=30)
    if preface:
        s.sendall(PREFACE)
    return s


def closed_by_peer(s: socket.socket, timeout: float) -> bool:
    """True once the daemon closed the connection (EOF or reset)."""
    s.settimeout(timeout)
    deadline = time.monotonic() + timeout
    try:
        while time.monotonic() < deadline:
            data = s.recv(65536)  # the daemon's SETTINGS etc., then EOF
            if not data:
                return True
    except ConnectionResetError:
        return True
    except socket.timeout:
        return False
    return False


def test_half_open_and_idle_connections_are_closed(daemon_factory):
    mport = free_port()
    d = daemon_factory(
        extra_args=[
            "--first-call-timeout", "2", "--idle-timeout", "3",
            "--metrics-listen", f"127.0.0.1:{mport}",
        ]
    )
    t0 = time.monotonic()
    silent = [raw_connection(d.port, preface=False) for _ in range(20)]
    preface_only = [raw_connection(d.port, preface=True) for _ in range(20)]
    for s in silent + preface_only:
        assert closed_by_peer(s, 30), "a half-open connection was never closed"
        s.close()
    took = time.monotonic() - t0
    assert took >= 1.5, f"closed after {took:.1f}s, before --first-call-timeout"
    m = scrape(mport)
    assert m['forkd_connections_closed_total{listener="tcp",reason="first_call_timeout"}'] >= 40, m

    # A real client that made a call and then went quiet is closed after
    # --idle-timeout; a call in flight keeps its connection.
    import grpc

    ch = grpc.insecure_channel(f"127.0.0.1:{d.port}")
    # grpc.health.v1 Check with an empty request; b"\x08\x01" is SERVING.
    check = ch.unary_unary(
        "/grpc.health.v1.Health/Check", request_serializer=lambda b: b, response_deserializer=lambda b: b
    )
    assert check(b"", timeout=10) == b"\x08\x01"
    (sb,) = d.spawn(1)
    # Exec that runs longer than the idle timeout: not cut.
    r = d.exec(sb["id"], ["sleep", "5000"])
    assert r.exit_code == 0, r
    assert wait_until(
        lambda: scrape(mport).get('forkd_connections_closed_total{listener="tcp",reason="idle"}', 0) >= 1, 20
    ), scrape(mport)
    # The client reconnects by itself.
    assert check(b"", timeout=10) == b"\x08\x01"
    ch.close()


def test_full_listener_refuses_when_every_connection_is_busy(daemon_factory):
    """--max-connections 2, both connections carrying a call (health Watch
    streams): a third is refused and counted; when one ends, it is
    served."""
    mport = free_port()
    d = daemon_factory(extra_args=["--max-connections", "2", "--metrics-listen", f"127.0.0.1:{mport}"])
    watches = [
        d.anon.start("grpc.health.v1.Health/Watch", {"service": ""}, max_time=120) for _ in range(2)
    ]
    try:
        # Each stream has sent its first status: both calls are in flight.
        for w in watches:
            assert w.proc.stdout.readline().strip() == "{", "health Watch sent nothing"
        assert scrape(mport).get('forkd_connections_open{listener="tcp"}', 0) == 2, scrape(mport)
        res = d.anon.run(["grpc.health.v1.Health/Check"], {"service": ""}, timeout=60)
        assert not res.ok, res.describe()
        m = scrape(mport)
        assert m.get('forkd_connections_refused_total{listener="tcp",reason="full"}', 0) >= 1, m
        assert "refused a connection" in d.log_tail(200)
    finally:
        for w in watches:
            w.kill()
    assert wait_until(lambda: d.anon.run(["grpc.health.v1.Health/Check"], {"service": ""}).ok, 30)


def test_fd_reserve_under_a_low_open_file_limit(forkd_bin, tmp_path):
    """Started with an open-file limit of 512 (soft and hard), the daemon
    lowers --max-connections to 256 (half the fds for connections, half
    kept for its own work) and says so; under a flood of 3,000 connections
    it still spawns, forks and branches over TCP, and leaves no sandbox
    directory behind."""
    wrapper = tmp_path / "forkd-512"
    wrapper.write_text(f'#!/bin/sh\nulimit -n 512 || exit 99\nexec "{forkd_bin}" "$@"\n')
    wrapper.chmod(0o755)
    mport = free_port()
    d = Daemon(
        wrapper,
        tmp_path / "daemon",
        extra_args=["--metrics-listen", f"127.0.0.1:{mport}", "--vmm-path", str(forkd_bin.parent / "forkd-vmm")],
    )
    d.start()
    sandboxes: list[dict] = []
    children: list[dict] = []
    try:
        d.wait_ready()
        with open(f"/proc/{d.pid}/limits") as f:
            assert any(line.startswith("Max open files") and " 512 " in line for line in f), "limit not applied"
        assert "--max-connections lowered" in d.log_tail(100), d.log_tail(100)
        raise_own_fd_limit()
        flood = Flooder(d.port, 3_000, 60)
        flood.start()
        try:
            assert wait_until(lambda: flood.opened >= 600 or not flood.is_alive(), 60)
            sandboxes = d.spawn(8)
            d.client.call(
                "forkd.v1.SandboxService/BranchSandbox",
                {"sandboxId": sandboxes[0]["id"], "tag": "low", "mode": "BRANCH_MODE_FULL"},
            )
            children = d.spawn(8, snapshotTag="low")
            for sb in children[:2]:
                assert d.exec_ok(sb["id"], ["echo", "ok"]) == b"ok\n"
            assert scrape(mport)['forkd_connections_open{listener="tcp"}'] <= 256
            flood.join(60)
        finally:
            flood.stop_flag.set()
            flood.join(30)
            flood.close_all()
        assert flood.opened >= 3_000, flood.opened
        for sb in sandboxes + children:
            d.delete(sb["id"])
        assert list((d.data_dir / "sandboxes").iterdir()) == []
    finally:
        rc, leftovers = d.stop()
    assert rc == 0 and not leftovers, (rc, leftovers, d.log_tail())
