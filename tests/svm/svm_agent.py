"""The test agent inside the SVM test host (stdlib only).

busybox init starts it in the host's root (shared read-only over 9p) once
the emulated machine is up. The host side (`svm_host.SvmMachine`) reaches
it through QEMU's user-network port forward and asks it to start and
signal processes (forkd daemons), list /proc, and read or write files, so
the end-to-end tests can check inside the emulated machine what they check
on this one.

Protocol: one JSON object per line each way over TCP. The first request of
a connection must be {"token": ...} (the token file's content); then
{"op": NAME, ...} requests, each answered by {"ok": RESULT} or {"error":
{"type", "errno", "message"}}. Bytes travel as base64.
"""

from __future__ import annotations

import argparse
import base64
import ctypes
import hmac
import json
import os
import socketserver
import subprocess
import sys
import threading
import time

PR_SET_CHILD_SUBREAPER = 36
RB_POWER_OFF = 0x4321FEDC


class Agent:
    def __init__(self) -> None:
        self.children: dict[int, subprocess.Popen] = {}
        self.lock = threading.Lock()

    # ---- processes ----------------------------------------------------------

    def op_ping(self) -> dict:
        with open("/proc/uptime") as f:
            uptime = float(f.read().split()[0])
        return {"pid": os.getpid(), "uname": " ".join(os.uname()), "uptime": uptime}

    def op_spawn(self, argv: list[str], log: str, env: dict | None = None, cwd: str | None = None) -> int:
        full_env = dict(os.environ)
        full_env.update(env or {})
        with open(log, "ab") as out:
            p = subprocess.Popen(
                argv, stdin=subprocess.DEVNULL, stdout=out, stderr=subprocess.STDOUT, env=full_env, cwd=cwd
            )
        with self.lock:
            self.children[p.pid] = p
        return p.pid

    def op_wait(self, pid: int, timeout: float = 0.0) -> int | None:
        """Exit code of a process `spawn` started (negative: signal), or
        None when it still runs after `timeout` seconds."""
        with self.lock:
            p = self.children[pid]
        try:
            return p.wait(timeout=timeout) if timeout > 0 else p.poll()
        except subprocess.TimeoutExpired:
            return None

    def op_run(
        self,
        argv: list[str],
        timeout: float = 60.0,
        input: str | None = None,
        env: dict | None = None,
    ) -> dict:
        full_env = dict(os.environ)
        full_env.update(env or {})
        try:
            r = subprocess.run(
                argv,
                input=base64.b64decode(input) if input is not None else None,
                stdin=None if input is not None else subprocess.DEVNULL,
                capture_output=True,
                timeout=timeout,
                env=full_env,
            )
        except subprocess.TimeoutExpired as e:
            raise TimeoutError(f"{argv} did not finish in {timeout}s") from e
        return {"rc": r.returncode, "stdout": b64(r.stdout), "stderr": b64(r.stderr)}

    def op_kill(self, pid: int, sig: int) -> None:
        os.kill(pid, sig)

    def op_reap(self, pid: int) -> bool:
        """waitpid(pid, WNOHANG) for an orphan re-parented to the agent;
        whether it was collected."""
        with self.lock:
            if pid in self.children:
                return self.children[pid].poll() is not None
        try:
            got, _ = os.waitpid(pid, os.WNOHANG)
        except ChildProcessError:
            return False
        return got == pid

    def op_procs(self) -> list:
        """[pid, comm, state, ppid, starttime, exe basename] of every process."""
        out = []
        for name in os.listdir("/proc"):
            if not name.isdigit():
                continue
            try:
                with open(f"/proc/{name}/stat") as f:
                    raw = f.read()
            except OSError:
                continue
            lpar, rpar = raw.index("("), raw.rindex(")")
            rest = raw[rpar + 2 :].split()
            try:
                exe = os.path.basename(os.readlink(f"/proc/{name}/exe"))
            except OSError:
                exe = ""
            out.append([int(name), raw[lpar + 1 : rpar], rest[0], int(rest[1]), int(rest[19]), exe])
        return out

    # ---- files ----------------------------------------------------------------

    def op_stat(self, path: str) -> dict | None:
        try:
            st = os.stat(path)
        except FileNotFoundError:
            return None
        import stat as s

        return {
            "is_dir": s.S_ISDIR(st.st_mode),
            "is_file": s.S_ISREG(st.st_mode),
            "size": st.st_size,
            "blocks": st.st_blocks,
            "mode": st.st_mode,
        }

    def op_listdir(self, path: str) -> list[str]:
        return sorted(os.listdir(path))

    def op_read(self, path: str, offset: int = 0, length: int = -1) -> str:
        with open(path, "rb") as f:
            f.seek(offset)
            return b64(f.read(length) if length >= 0 else f.read())

    def op_write(self, path: str, data: str, offset: int | None = None, mode: int = 0o644) -> None:
        """Writes bytes at `offset` of an existing file, or (offset None)
        creates or replaces the whole file."""
        raw = base64.b64decode(data)
        if offset is None:
            with open(path, "wb") as f:
                f.write(raw)
            os.chmod(path, mode)
            return
        with open(path, "r+b") as f:
            f.seek(offset)
            f.write(raw)

    def op_mkdir(self, path: str) -> None:
        os.makedirs(path, exist_ok=True)

    def op_poweroff(self) -> None:
        """Stops every process the agent started, then powers the machine off
        (QEMU runs with -no-reboot and exits)."""
        with self.lock:
            children = list(self.children.values())
        for p in children:
            if p.poll() is None:
                p.kill()
        libc = ctypes.CDLL(None, use_errno=True)
        libc.sync()
        threading.Timer(0.2, lambda: libc.reboot(RB_POWER_OFF)).start()


def b64(raw: bytes) -> str:
    return base64.b64encode(raw).decode()


def make_handler(agent: Agent, token: str):
    class Handler(socketserver.StreamRequestHandler):
        def handle(self) -> None:
            first = self.rfile.readline()
            try:
                hello = json.loads(first)
            except ValueError:
                return
            if not hmac.compare_digest(str(hello.get("token", "")), token):
                self.send({"error": {"type": "PermissionError", "errno": 13, "message": "bad token"}})
                return
            self.send({"ok": None})
            for line in self.rfile:
                req = json.loads(line)
                op = req.pop("op")
                try:
                    self.send({"ok": getattr(agent, f"op_{op}")(**req)})
                except Exception as e:  # every failure goes back to the caller
                    self.send(
                        {
                            "error": {
                                "type": type(e).__name__,
                                "errno": getattr(e, "errno", None),
                                "message": str(e),
                            }
                        }
                    )

        def send(self, obj: dict) -> None:
            self.wfile.write(json.dumps(obj).encode() + b"\n")
            self.wfile.flush()

    return Handler


class Server(socketserver.ThreadingTCPServer):
    allow_reuse_address = True
    daemon_threads = True


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--port", type=int, default=7000)
    ap.add_argument("--token-file", required=True)
    args = ap.parse_args()
    with open(args.token_file) as f:
        token = f.read().strip()
    # VMMs whose daemon died are re-parented to the agent (as they are to
    # pytest on the host), so the tests can find and reap them.
    libc = ctypes.CDLL(None, use_errno=True)
    libc.prctl(PR_SET_CHILD_SUBREAPER, 1, 0, 0, 0)
    agent = Agent()
    with Server(("0.0.0.0", args.port), make_handler(agent, token)) as srv:
        print(f"svm-agent: listening on port {args.port} (pid {os.getpid()}, t={time.monotonic():.1f})", flush=True)
        srv.serve_forever()


if __name__ == "__main__":
    sys.exit(main())
