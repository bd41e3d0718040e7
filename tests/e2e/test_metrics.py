"""The Prometheus endpoint (`forkd serve --metrics-listen ADDR`), scraped
over plain HTTP while real calls drive real microVMs.

Each scrape is parsed with the `prometheus_client` parsers (the Prometheus
text format that curl gets, and OpenMetrics when asked for), and the tests
check the exact counts they caused: calls by method and code, histogram
counts, sandboxes by state, snapshots by status, branch pauses by mode,
and the LIVE copy's bytes and faults, against the figures the API itself
reported.
"""

from __future__ import annotations

import math
import signal
import socket
import urllib.error
import urllib.request
from typing import Iterable

import grpc
from prometheus_client.openmetrics.parser import (
    text_string_to_metric_families as openmetrics_families,
)
from prometheus_client.parser import text_string_to_metric_families

from forkd_daemon import BRANCH, GET_SNAP, MIB, SPAWN, WATCH_SNAP, Daemon, free_port, wait_until

FULL = "BRANCH_MODE_FULL"
LIVE = "BRANCH_MODE_LIVE"
WRITING = "SNAPSHOT_STATUS_WRITING"
READY = "SNAPSHOT_STATUS_READY"
EXEC = "forkd.v1.SandboxService/Exec"
GET_SB = "forkd.v1.SandboxService/GetSandbox"
LIST_SB = "forkd.v1.SandboxService/ListSandboxes"
DELETE_SB = "forkd.v1.SandboxService/DeleteSandbox"
PROM_TEXT = "text/plain; version=0.0.4; charset=utf-8"
OPENMETRICS = "application/openmetrics-text; version=1.0.0; charset=utf-8"
# A LIVE copy limited to 16 MiB/s: a 512 MiB source with 128 MiB filled
# copies for about 8 s, long enough to scrape and write during it even on a
# loaded host (at 64 MiB/s a delayed fill found the copy nearly done).
RATE_LIMITED = ["--live-copy-rate-mibps", "16"]

Key = tuple[str, frozenset]


# ---- scraping -------------------------------------------------------------------


def get(port: int, path: str = "/metrics", accept: str | None = None) -> tuple[int, str, str]:
    """GET http://127.0.0.1:PORT/PATH: (status, content type, body)."""
    req = urllib.request.Request(f"http://127.0.0.1:{port}{path}")
    if accept:
        req.add_header("Accept", accept)
    try:
        with urllib.request.urlopen(req, timeout=10) as resp:
            return resp.status, resp.headers["Content-Type"], resp.read().decode()
    except urllib.error.HTTPError as e:
        return e.code, e.headers["Content-Type"], e.read().decode()


class Scrape:
    """One scrape, parsed: every sample by (name, labels), and every
    family's type."""

    def __init__(self, text: str, families: Iterable):
        self.text = text
        self.samples: dict[Key, float] = {}
        self.types: dict[str, str] = {}
        for fam in families:
            self.types[fam.name] = fam.type
            for s in fam.samples:
                labels = dict(s.labels)
                if "le" in labels:  # "1" in one format, "1.0" in the other
                    labels["le"] = repr(float(labels["le"]))
                key = (s.name, frozenset(labels.items()))
                assert key not in self.samples, f"duplicate series {key}"
                self.samples[key] = s.value

    def value(self, name: str, **labels: str) -> float:
        key = (name, frozenset(labels.items()))
        assert key in self.samples, f"no series {name}{labels} in:\n{self.text}"
        return self.samples[key]

    def series(self, name: str) -> dict[frozenset, float]:
        return {labels: v for (n, labels), v in self.samples.items() if n == name}

    def calls(self, method: str, code: str = "OK") -> float:
        """forkd_grpc_requests_total of one method and code (0 if absent)."""
        key = ("forkd_grpc_requests_total", frozenset({"method": method, "code": code}.items()))
        return self.samples.get(key, 0)


def scrape(port: int) -> Scrape:
    """A scrape in the Prometheus text format (what curl gets)."""
    status, ctype, text = get(port)
    assert status == 200, (status, text)
    assert ctype == PROM_TEXT, ctype
    return Scrape(text, text_string_to_metric_families(text))


def scrape_openmetrics(port: int) -> Scrape:
    """A scrape in OpenMetrics, as Prometheus asks for it."""
    accept = (
        "application/openmetrics-text;version=1.0.0;q=0.6,"
        "text/plain;version=0.0.4;q=0.3,*/*;q=0.2"
    )
    status, ctype, text = get(port, accept=accept)
    assert status == 200, (status, text)
    assert ctype == OPENMETRICS, ctype
    assert text.endswith("# EOF\n"), text[-200:]
    return Scrape(text, openmetrics_families(text))


def u64(msg: dict, key: str) -> int:
    return int(msg.get(key, 0))


def metrics_daemon(daemon_factory, *extra: str, **kwargs) -> tuple[Daemon, int]:
    port = free_port()
    d = daemon_factory(extra_args=["--metrics-listen", f"127.0.0.1:{port}", *extra], **kwargs)
    return d, port


def check_histograms_match_counters(s: Scrape) -> None:
    """Every call series has its duration histogram with the same count,
    cumulative buckets ending in +Inf == count."""
    calls = s.series("forkd_grpc_requests_total")
    counts = s.series("forkd_grpc_request_duration_seconds_count")
    assert calls and calls == counts, (calls, counts)
    for labels, n in calls.items():
        lab = dict(labels)
        buckets = sorted(
            (float(dict(k)["le"]), v)
            for k, v in s.series("forkd_grpc_request_duration_seconds_bucket").items()
            if {x: y for x, y in dict(k).items() if x != "le"} == lab
        )
        assert buckets[-1] == (math.inf, n), (lab, buckets)
        values = [v for _, v in buckets]
        assert values == sorted(values), (lab, buckets)


# ---- the tests ------------------------------------------------------------------


def test_metrics_count_what_the_api_did(daemon_factory):
    """Spawns, execs (one of 400 ms), a NOT_FOUND, an unknown method, a
    FULL branch, a LIVE branch with wait=true and one with wait=false
    followed to READY with WatchSnapshot, a delete; each scrape shows
    exactly those calls, sandboxes and snapshots, the pauses the branches
    reported, and the LIVE copies' final bytes and faults."""
    d, port = metrics_daemon(daemon_factory, *RATE_LIMITED)

    # Before anything: every state and status at 0, every mode's pause
    # histogram empty, the version.
    s0 = scrape(port)
    assert s0.types["forkd_build_info"] == "gauge", s0.types
    assert s0.value("forkd_build_info", version="0.1.0") == 1
    for state in ("STARTING", "RUNNING", "PAUSED", "EXITED", "FAILED"):
        assert s0.value("forkd_sandboxes", state=state) == 0
    for status in ("WRITING", "READY", "FAILED"):
        assert s0.value("forkd_snapshots", status=status) == 0
    for mode in ("full", "diff", "live"):
        assert s0.value("forkd_branch_pause_seconds_count", mode=mode) == 0
    assert s0.value("forkd_live_copy_bytes_total") == 0
    assert s0.calls(SPAWN) == 0

    # Sandboxes, commands, a NOT_FOUND, an unknown method.
    execs = 0
    a, b = d.spawn(2, memoryMib=512)
    [c] = d.spawn(1)
    a, b, c = a["id"], b["id"], c["id"]
    for sid in (a, b):
        assert d.exec_ok(sid, ["fill", "128", "1"]) == b"filled 128 MiB with seed 1\n"
        execs += 1
    assert d.exec_ok(c, ["echo", "hi"]) == b"hi\n"
    d.exec_ok(c, ["sleep", "400"])
    execs += 2
    res = d.client.run([GET_SB], {"id": "sb-0000000000"})
    assert res.code == "NOT_FOUND", res.describe()
    with grpc.insecure_channel(f"127.0.0.1:{d.port}") as ch:
        try:
            ch.unary_unary("/forkd.v1.SandboxService/NoSuchMethod")(b"", timeout=10)
            raise AssertionError("an unknown method succeeded")
        except grpc.RpcError as e:
            assert e.code() == grpc.StatusCode.UNIMPLEMENTED, e

    s1 = scrape(port)
    assert s1.calls(SPAWN) == 2
    assert s1.calls(EXEC) == execs
    assert s1.calls(GET_SB, "NOT_FOUND") == 1
    assert s1.calls("other", "UNIMPLEMENTED") == 1
    assert s1.value("forkd_sandboxes", state="RUNNING") == 3
    # Exec's duration is its stream's: the 400 ms sleep is above 0.25 s
    # (a fill may be too).
    exec_ok = {"method": EXEC, "code": "OK"}
    assert s1.value("forkd_grpc_request_duration_seconds_sum", **exec_ok) >= 0.4
    assert s1.value("forkd_grpc_request_duration_seconds_bucket", le="0.25", **exec_ok) <= execs - 1
    check_histograms_match_counters(s1)

    # FULL, then LIVE with wait=true (followed by WatchSnapshot from
    # WRITING on) while the source rewrites its memory.
    full = d.branch(a, "m-full", FULL)
    call = d.client.start(BRANCH, {"sandboxId": a, "tag": "m-live", "mode": LIVE})
    try:
        snap = d.wait_snapshot_status("m-live", [WRITING, READY], 30, interval=0.02, missing_ok=True)
        assert snap["status"] == WRITING, snap
        watch_live = d.start_watch("m-live")
        assert d.exec_ok(a, ["fill", "128", "2"]) == b"filled 128 MiB with seed 2\n"
        execs += 1
        res = call.wait(timeout=120)
        watched_live = watch_live.wait(timeout=60)
    finally:
        call.kill()
    assert res.ok, res.describe()
    [live] = res.messages
    assert watched_live.ok, watched_live.describe()
    assert watched_live.messages[0]["status"] == WRITING, "the watch must follow the copy live"
    live_end = watched_live.messages[-1]
    assert live_end["status"] == READY, live_end
    assert u64(live, "faultsServed") == u64(live_end, "faultsServed") > 0, (live, live_end)

    # LIVE with wait=false, followed to READY; a scrape during the copy.
    nowait = d.branch(b, "m-nowait", LIVE, wait=False)
    assert nowait["snapshot"]["status"] == WRITING, nowait
    watch = d.start_watch("m-nowait")
    try:
        mid = scrape(port)
        still = d.get_snapshot("m-nowait")["status"]
        assert d.exec_ok(b, ["fill", "128", "3"]) == b"filled 128 MiB with seed 3\n"
        execs += 1
        watched = watch.wait(timeout=120)
    finally:
        watch.kill()
    assert still == WRITING, "the copy ended before the mid-copy scrape could be checked"
    assert mid.value("forkd_snapshots", status="WRITING") == 1
    assert mid.value("forkd_snapshots", status="READY") == 2
    assert mid.value("forkd_branches_total", mode="live", status="READY") == 1
    assert mid.value("forkd_branch_pause_seconds_count", mode="live") == 2
    assert watched.ok, watched.describe()
    nowait_end = watched.messages[-1]
    assert nowait_end["status"] == READY, watched.messages
    snaps = {t: d.get_snapshot(t) for t in ("m-full", "m-live", "m-nowait")}

    resp = d.client.call(DELETE_SB, {"id": c})
    assert resp["sandbox"]["id"] == c, resp

    s2 = scrape(port)
    # Calls, by method and code.
    assert s2.calls(SPAWN) == 2
    assert s2.calls(EXEC) == execs
    assert s2.calls(BRANCH) == 3
    assert s2.calls(WATCH_SNAP) == 2
    assert s2.calls(DELETE_SB) == 1
    assert s2.calls(GET_SB, "NOT_FOUND") == 1
    assert s2.calls(GET_SNAP) >= 2
    # Two watches that each followed a copy of about 8 s.
    assert s2.value("forkd_grpc_request_duration_seconds_sum", method=WATCH_SNAP, code="OK") > 1.0
    assert s2.value("forkd_grpc_requests_total", method="grpc.health.v1.Health/Check", code="OK") >= 1
    check_histograms_match_counters(s2)
    # State.
    assert s2.value("forkd_sandboxes", state="RUNNING") == 2
    assert s2.value("forkd_snapshots", status="READY") == 3
    assert s2.value("forkd_snapshots", status="WRITING") == 0
    assert s2.value("forkd_snapshots", status="FAILED") == 0
    # Branches: one pause per branch, as the API reported them.
    assert s2.value("forkd_branch_pause_seconds_count", mode="full") == 1
    assert s2.value("forkd_branch_pause_seconds_count", mode="live") == 2
    assert s2.value("forkd_branch_pause_seconds_count", mode="diff") == 0
    pause_ms = live["pauseMs"] + nowait["pauseMs"]
    assert math.isclose(
        s2.value("forkd_branch_pause_seconds_sum", mode="live"), pause_ms / 1000, rel_tol=1e-6
    ), (s2.value("forkd_branch_pause_seconds_sum", mode="live"), pause_ms)
    assert math.isclose(
        s2.value("forkd_branch_pause_seconds_sum", mode="full"), full["pauseMs"] / 1000, rel_tol=1e-6
    )
    assert s2.value("forkd_branches_total", mode="full", status="READY") == 1
    assert s2.value("forkd_branches_total", mode="live", status="READY") == 2
    assert sum(s2.series("forkd_branches_total").values()) == 3
    # Bytes written: what each snapshot's memory file holds.
    assert s2.value("forkd_branch_written_bytes_total", mode="full") == u64(full, "bytesWritten")
    assert u64(full, "bytesWritten") == u64(snaps["m-full"], "memoryBytes") >= 128 * MIB
    assert s2.value("forkd_branch_written_bytes_total", mode="live") == u64(
        snaps["m-live"], "memoryBytes"
    ) + u64(snaps["m-nowait"], "memoryBytes")
    # The LIVE copies: exactly their final figures.
    copied = u64(live_end, "bytesCopied") + u64(nowait_end, "bytesCopied")
    faults = u64(live_end, "faultsServed") + u64(nowait_end, "faultsServed")
    assert copied >= 2 * 128 * MIB, (live_end, nowait_end)
    assert s2.value("forkd_live_copy_bytes_total") == copied
    assert s2.value("forkd_live_copy_faults_served_total") == faults
    assert faults > 0, (live_end, nowait_end)

    # OpenMetrics, when asked for: the same series and values (nothing ran
    # between the two scrapes), with units and the info type.
    text_now, om = scrape(port), scrape_openmetrics(port)
    assert om.samples == text_now.samples
    assert om.types["forkd_build"] == "info", om.types
    assert om.types["forkd_grpc_request_duration_seconds"] == "histogram"
    assert "# UNIT forkd_live_copy_bytes bytes\n" in om.text
    print("scrape excerpt:\n" + "\n".join(
        line for line in s2.text.splitlines()
        if line.startswith(("forkd_sandboxes", "forkd_snapshots", "forkd_live_copy", "forkd_branches"))
        or line.startswith("forkd_grpc_requests_total")
    ))


def test_metrics_endpoint_routes_and_needs_no_token(daemon_factory):
    """Only GET /metrics; no token on the metrics listener, while gRPC calls
    without one are counted as UNAUTHENTICATED."""
    d, port = metrics_daemon(daemon_factory, token="s3cret-metrics")
    for path in ("/", "/metric", "/metrics/x", "/favicon.ico"):
        status, ctype, body = get(port, path)
        assert (status, ctype) == (404, "text/plain; charset=utf-8"), (path, status, ctype, body)
        assert "/metrics" in body
    req = urllib.request.Request(f"http://127.0.0.1:{port}/metrics", data=b"", method="POST")
    try:
        urllib.request.urlopen(req, timeout=10)
        raise AssertionError("POST /metrics succeeded")
    except urllib.error.HTTPError as e:
        assert (e.code, e.headers["Allow"]) == (405, "GET, HEAD")

    d.anon.expect_error("UNAUTHENTICATED", LIST_SB, {})
    d.anon.expect_error("UNAUTHENTICATED", LIST_SB, {})
    assert d.list() == []
    s = scrape(port)
    assert s.calls(LIST_SB, "UNAUTHENTICATED") == 2
    assert s.calls(LIST_SB, "OK") == 1
    check_histograms_match_counters(s)


def test_metrics_stay_up_through_the_drain_and_stop_with_the_daemon(daemon_factory):
    """During --drain-grace the endpoint still answers and counts the calls
    refused with UNAVAILABLE; once the daemon exited, the port is closed."""
    d, port = metrics_daemon(daemon_factory, "--drain-grace", "3")
    d.signal(signal.SIGTERM)

    def refused() -> bool:
        return d.client.run([LIST_SB], {}).code == "UNAVAILABLE"

    assert wait_until(refused, 5), "calls were not refused while draining"
    s = scrape(port)
    assert s.calls(LIST_SB, "UNAVAILABLE") >= 1
    assert d.wait(30) == 0, d.log_tail()
    with socket.socket() as sock:
        sock.settimeout(5)
        assert sock.connect_ex(("127.0.0.1", port)) != 0, "the metrics port is still open"
