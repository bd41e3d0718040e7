"""Exceptions raised by the forkd client.

Every failed call raises a :class:`ForkdError` (or one of its subclasses,
picked by the gRPC status code), which keeps the code and the server's
message. Catch the subclass you can handle::

    try:
        ctl.get_snapshot("nope")
    except forkd.NotFoundError as e:
        print(e.code_name, e.message)   # NOT_FOUND snapshot "nope" not found
"""

from __future__ import annotations

import grpc


class ForkdError(Exception):
    """A forkd call failed; ``code`` is the gRPC status code."""

    def __init__(self, code: grpc.StatusCode, message: str, *, method: str = "") -> None:
        self.code = code
        self.message = message
        self.method = method
        where = f"{method}: " if method else ""
        super().__init__(f"{where}{code.name}: {message}")

    @property
    def code_name(self) -> str:
        """The status code's canonical name, for example ``"NOT_FOUND"``."""
        return str(self.code.name)


class InvalidArgumentError(ForkdError):
    """INVALID_ARGUMENT: the request itself is wrong; the message says what to fix."""


class NotFoundError(ForkdError):
    """NOT_FOUND: no sandbox with that id, no snapshot with that tag, or no such
    file or directory in the sandbox."""


class AlreadyExistsError(ForkdError):
    """ALREADY_EXISTS: a snapshot with that tag exists, or the path a
    ``write_file(..., no_overwrite=True)`` names does."""


class FailedPreconditionError(ForkdError):
    """FAILED_PRECONDITION: the resource is not in a state that allows the call."""


class ResourceExhaustedError(ForkdError):
    """RESOURCE_EXHAUSTED: a daemon limit (sandboxes, memory, disk) was reached,
    or the guest's filesystem is full."""


class UnavailableError(ForkdError):
    """UNAVAILABLE: the daemon cannot be reached or is shutting down; retry later."""


class DeadlineExceededError(ForkdError):
    """DEADLINE_EXCEEDED: the call, or an exec's ``timeout``, ran out of time."""


class UnauthenticatedError(ForkdError):
    """UNAUTHENTICATED: the daemon wants a bearer token and none, or a wrong one, was sent."""


class DataLossError(ForkdError):
    """DATA_LOSS: data is corrupt or incomplete: a snapshot file failing its
    digest (from the daemon), or a download (``read_file``, ``iter_file``)
    whose bytes do not match the size and SHA-256 the guest sent, or that
    ended without them (raised by the client itself)."""


_BY_CODE: dict[grpc.StatusCode, type[ForkdError]] = {
    grpc.StatusCode.INVALID_ARGUMENT: InvalidArgumentError,
    grpc.StatusCode.NOT_FOUND: NotFoundError,
    grpc.StatusCode.ALREADY_EXISTS: AlreadyExistsError,
    grpc.StatusCode.FAILED_PRECONDITION: FailedPreconditionError,
    grpc.StatusCode.RESOURCE_EXHAUSTED: ResourceExhaustedError,
    grpc.StatusCode.UNAVAILABLE: UnavailableError,
    grpc.StatusCode.DEADLINE_EXCEEDED: DeadlineExceededError,
    grpc.StatusCode.UNAUTHENTICATED: UnauthenticatedError,
    grpc.StatusCode.DATA_LOSS: DataLossError,
}


def error_for(code: grpc.StatusCode, message: str, *, method: str = "") -> ForkdError:
    """The exception for a status: the matching subclass, else ForkdError."""
    return _BY_CODE.get(code, ForkdError)(code, message, method=method)


def from_rpc_error(err: grpc.RpcError, method: str) -> ForkdError:
    """Converts a grpc (sync or asyncio) error into a ForkdError."""
    # Both grpc.Call (sync) and grpc.aio.AioRpcError carry code()/details().
    code_fn = getattr(err, "code", None)
    details_fn = getattr(err, "details", None)
    code = code_fn() if callable(code_fn) else grpc.StatusCode.UNKNOWN
    details = details_fn() if callable(details_fn) else str(err)
    if not isinstance(code, grpc.StatusCode):
        code = grpc.StatusCode.UNKNOWN
    return error_for(code, str(details or ""), method=method)
