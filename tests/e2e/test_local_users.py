"""Other local users, with the default access rule (no token): the daemon
accepts connections only from its own user and root (plus --allow-uid), on
loopback TCP (the peer socket's owner, looked up with NETLINK_SOCK_DIAG) and
on the Unix socket (SO_PEERCRED, and the socket file is 0600). Everything it
writes is for its own user only, whatever the umask: data dir 0700, files
0600. The other user here is `nobody`, through `setpriv`."""

from __future__ import annotations

import os
import pwd
import shutil
import stat
import subprocess
import sys
import sysconfig
import tempfile
from pathlib import Path

import pytest

from grpcurl_client import find_grpcurl

NOBODY = pwd.getpwnam("nobody").pw_uid
AS_NOBODY = ["setpriv", "--reuid=nobody", "--regid=nogroup", "--clear-groups"]

pytestmark = [
    pytest.mark.skipif(os.geteuid() != 0, reason="needs root to act as another user"),
    pytest.mark.skipif(shutil.which("setpriv") is None, reason="needs setpriv (util-linux)"),
]


@pytest.fixture
def public_dir():
    """A directory `nobody` can enter (pytest's own are 0700), holding a
    grpcurl it can run."""
    d = Path(tempfile.mkdtemp(prefix="forkd-users-", dir="/tmp"))
    d.chmod(0o755)
    shutil.copy2(find_grpcurl(), d / "grpcurl")
    (d / "grpcurl").chmod(0o755)
    yield d
    shutil.rmtree(d, ignore_errors=True)


def as_nobody(argv, **kw) -> subprocess.CompletedProcess:
    return subprocess.run(AS_NOBODY + list(argv), capture_output=True, text=True, timeout=60, **kw)


def grpcurl_as_nobody(public_dir: Path, target: list[str], method: str, body: str = "{}"):
    return as_nobody(
        [str(public_dir / "grpcurl"), "-plaintext", "-connect-timeout", "5", "-d", body, *target, method]
    )


# The forkd Python client, run by nobody with the system interpreter of the
# same version over the venv's packages (the venv's own interpreter lives
# under /root, which nobody cannot enter).
PY_CLIENT = """
import sys, forkd
target = sys.argv[1]
try:
    with forkd.Controller(target, timeout=10) as c:
        print("LISTED", [s.id for s in c.list_sandboxes()])
        c.delete_sandbox(sys.argv[2])
        print("DELETED")
except forkd.ForkdError as e:
    print("REFUSED", type(e).__name__, e)
"""


def system_python() -> str | None:
    exe = f"/usr/bin/python{sys.version_info.major}.{sys.version_info.minor}"
    return exe if os.access(exe, os.X_OK) else None


def python_client_as_nobody(public_dir: Path, target: str, sandbox_id: str):
    exe = system_python()
    if exe is None:
        pytest.skip("no system Python of the venv's version for nobody to run")
    script = public_dir / "client.py"
    script.write_text(PY_CLIENT)
    script.chmod(0o644)
    paths = [sysconfig.get_paths()["purelib"], sysconfig.get_paths()["platlib"]]
    repo = Path(__file__).resolve().parents[2]
    paths.append(str(repo / "clients" / "python" / "src"))
    env = {"PYTHONPATH": os.pathsep.join(paths), "PATH": "/usr/bin:/bin", "HOME": "/tmp"}
    return as_nobody([exe, str(script), target, sandbox_id], env=env, cwd=str(public_dir))


def test_other_user_refused_on_tcp_and_unix(daemon_factory, public_dir):
    sock = public_dir / "forkd.sock"
    d = daemon_factory(listen_unix=sock)
    (sb,) = d.spawn(1)
    # The Unix socket is the owner's only.
    assert stat.S_IMODE(os.stat(sock).st_mode) == 0o600

    # grpcurl as nobody: TCP and Unix, list and delete, health too.
    for target in (
        [f"127.0.0.1:{d.port}"],
        ["-unix", "-authority", "localhost", str(sock)],
    ):
        for method, body in (
            ("forkd.v1.SandboxService/ListSandboxes", "{}"),
            ("forkd.v1.SandboxService/DeleteSandbox", f'{{"id": "{sb["id"]}"}}'),
            ("grpc.health.v1.Health/Check", "{}"),
        ):
            # grpcurl needs the protos only with -proto; use reflection,
            # which is just as refused.
            r = grpcurl_as_nobody(public_dir, target, method, body)
            assert r.returncode != 0, f"{target} {method} as nobody succeeded: {r.stdout}"
            assert sb["id"] not in r.stdout

    # The Python client as nobody over TCP.
    r = python_client_as_nobody(public_dir, f"127.0.0.1:{d.port}", sb["id"])
    assert "LISTED" not in r.stdout and "DELETED" not in r.stdout, r.stdout + r.stderr
    assert "REFUSED UnavailableError" in r.stdout, r.stdout + r.stderr

    # Root still gets through, and the sandbox is untouched.
    assert d.get(sb["id"])["state"] == "SANDBOX_STATE_RUNNING"
    assert [s["id"] for s in d.list()] == [sb["id"]]
    log = d.log_tail(400)
    assert "peer_uid" in log and f"local user {NOBODY} is not allowed" in log, log


def test_unix_socket_peer_check_with_allow_uid(daemon_factory, public_dir):
    """--allow-uid opens the socket file (0666); SO_PEERCRED then decides:
    the allowed user gets in, nobody does not."""
    sock = public_dir / "forkd.sock"
    allowed = 4242
    d = daemon_factory(listen_unix=sock, extra_args=["--allow-uid", str(allowed)])
    (sb,) = d.spawn(1)
    assert stat.S_IMODE(os.stat(sock).st_mode) == 0o666
    target = ["-unix", "-authority", "localhost", str(sock)]
    r = grpcurl_as_nobody(public_dir, target, "forkd.v1.SandboxService/ListSandboxes")
    assert r.returncode != 0 and sb["id"] not in r.stdout, r.stdout
    ok = subprocess.run(
        ["setpriv", f"--reuid={allowed}", f"--regid={allowed}", "--clear-groups",
         str(public_dir / "grpcurl"), "-plaintext", "-d", "{}", *target,
         "forkd.v1.SandboxService/ListSandboxes"],
        capture_output=True, text=True, timeout=60,
    )
    assert ok.returncode == 0 and sb["id"] in ok.stdout, ok.stdout + ok.stderr
    # Over TCP too.
    ok = subprocess.run(
        ["setpriv", f"--reuid={allowed}", f"--regid={allowed}", "--clear-groups",
         str(public_dir / "grpcurl"), "-plaintext", "-d", "{}", f"127.0.0.1:{d.port}",
         "forkd.v1.SandboxService/ListSandboxes"],
        capture_output=True, text=True, timeout=60,
    )
    assert ok.returncode == 0 and sb["id"] in ok.stdout, ok.stdout + ok.stderr


def test_token_decides_when_set(daemon_factory, public_dir):
    """With a token the token is the rule: nobody without it gets
    UNAUTHENTICATED (the connection is accepted), with it gets through."""
    d = daemon_factory(token="s3cret")
    (sb,) = d.spawn(1)
    target = [f"127.0.0.1:{d.port}"]
    r = grpcurl_as_nobody(public_dir, target, "forkd.v1.SandboxService/ListSandboxes")
    assert r.returncode != 0 and "Unauthenticated" in (r.stdout + r.stderr), r.stdout + r.stderr
    r = as_nobody(
        [str(public_dir / "grpcurl"), "-plaintext", "-H", "authorization: Bearer s3cret", "-d", "{}",
         *target, "forkd.v1.SandboxService/ListSandboxes"]
    )
    assert r.returncode == 0 and sb["id"] in r.stdout, r.stdout + r.stderr


def modes_under(root: Path) -> dict[str, int]:
    out = {}
    for dirpath, dirnames, filenames in os.walk(root):
        for name in dirnames + filenames:
            p = Path(dirpath) / name
            out[str(p.relative_to(root))] = stat.S_IMODE(os.lstat(p).st_mode)
    return out


def test_file_modes_under_umask_000(daemon_factory, public_dir):
    """Started with umask 000: the data dir and its directories are 0700,
    every file (snapshot memory, vmstate, manifest, vmm.log, lock) 0600,
    the Unix socket 0600; nobody can read snapshot memory."""
    sock = public_dir / "forkd.sock"
    old = os.umask(0)
    try:
        d = daemon_factory(listen_unix=sock)
    finally:
        os.umask(old)
    (sb,) = d.spawn(1, memoryMib=256)
    d.exec_ok(sb["id"], ["fill", "64", "3"])
    d.client.call(
        "forkd.v1.SandboxService/BranchSandbox",
        {"sandboxId": sb["id"], "tag": "full", "mode": "BRANCH_MODE_FULL"},
        timeout=300,
    )
    d.client.call(
        "forkd.v1.SandboxService/BranchSandbox",
        {"sandboxId": sb["id"], "tag": "diff", "mode": "BRANCH_MODE_DIFF"},
        timeout=300,
    )
    d.spawn(1, snapshotTag="full")
    assert stat.S_IMODE(os.stat(d.data_dir).st_mode) == 0o700
    assert stat.S_IMODE(os.stat(sock).st_mode) == 0o600
    modes = modes_under(d.data_dir)
    assert any(k.endswith("full/memory") for k in modes), modes
    assert any(k.endswith("vmm.log") for k in modes), modes
    loose = {k: oct(m) for k, m in modes.items() if m & 0o077}
    assert not loose, f"readable or writable by others: {loose}"
    for k, m in modes.items():
        p = d.data_dir / k
        if p.is_dir():
            assert m == 0o700, (k, oct(m))
        elif p.is_file():
            assert m == 0o600, (k, oct(m))
    # nobody cannot read guest memory, nor list the directory.
    mem = d.data_dir / "snapshots" / "full" / "memory"
    r = as_nobody(["head", "-c", "16", str(mem)])
    assert r.returncode != 0 and "Permission denied" in r.stderr, r
    r = as_nobody(["ls", str(d.data_dir)])
    assert r.returncode != 0 and "Permission denied" in r.stderr, r


def test_existing_open_data_dir_is_made_private(daemon_factory, tmp_path):
    """A data dir left 0755 (an older daemon, another umask) is 0700 after
    start."""
    data = tmp_path / "old-data"
    data.mkdir()
    data.chmod(0o755)
    d = daemon_factory(data_dir=data)
    assert stat.S_IMODE(os.stat(data).st_mode) == 0o700
    assert stat.S_IMODE(os.stat(data / "snapshots").st_mode) == 0o700
    d.spawn(1)


def test_doctor_as_another_user_says_why(daemon_factory, public_dir, forkd_bin):
    """forkd doctor run by nobody against a root daemon: the daemon check
    fails and its hint names the local-user rule and --allow-uid."""
    import json

    d = daemon_factory()
    shutil.copy2(forkd_bin, public_dir / "forkd")
    r = as_nobody(
        [str(public_dir / "forkd"), "doctor", "--json", "--target", f"127.0.0.1:{d.port}",
         "--data-dir", str(public_dir / "dd")]
    )
    report = json.loads(r.stdout)
    [check] = [c for c in report["checks"] if c["name"] == "daemon"]
    assert check["status"] == "fail", check
    assert "--allow-uid" in check["hint"] and "other than its own and root" in check["hint"], check
