"""Client-side exceptions, one per status code of the wire contract."""

from __future__ import annotations

import grpc


class SidecarError(Exception):
    """An RPC failed; ``code`` is the gRPC status code and ``details`` the server's message."""

    retryable = False

    def __init__(self, code: grpc.StatusCode, details: str) -> None:
        super().__init__(f"{code.name}: {details}")
        self.code = code
        self.details = details


class InvalidArgument(SidecarError):
    """Bad shapes, dtypes or values (the message names the field)."""


class SessionNotFound(SidecarError):
    """Unknown session (never opened, closed or expired)."""


class FailedPrecondition(SidecarError):
    """A step out of order or a worker/sidecar state mismatch (the message says which)."""


class AlreadyExists(SidecarError):
    """The session id exists with a different config."""


class ResourceExhausted(SidecarError):
    """Queue full or quota exceeded: retry later."""

    retryable = True


class Unauthenticated(SidecarError):
    """Missing or unknown API key."""


class PermissionDenied(SidecarError):
    """The key may not do this (e.g. read-only)."""


class Unavailable(SidecarError):
    """Server draining or unreachable: retry (the same step number is safe)."""

    retryable = True


class Aborted(SidecarError):
    """Another sidecar replica took the session over: retry (the replica resumes it from the store)."""

    retryable = True


class DeadlineExceeded(SidecarError):
    """The deadline passed: retry with the same step number."""

    retryable = True


_BY_CODE: dict[grpc.StatusCode, type[SidecarError]] = {
    grpc.StatusCode.INVALID_ARGUMENT: InvalidArgument,
    grpc.StatusCode.NOT_FOUND: SessionNotFound,
    grpc.StatusCode.FAILED_PRECONDITION: FailedPrecondition,
    grpc.StatusCode.ALREADY_EXISTS: AlreadyExists,
    grpc.StatusCode.RESOURCE_EXHAUSTED: ResourceExhausted,
    grpc.StatusCode.UNAUTHENTICATED: Unauthenticated,
    grpc.StatusCode.PERMISSION_DENIED: PermissionDenied,
    grpc.StatusCode.UNAVAILABLE: Unavailable,
    grpc.StatusCode.DEADLINE_EXCEEDED: DeadlineExceeded,
    grpc.StatusCode.ABORTED: Aborted,
}


def from_rpc_error(err: grpc.RpcError) -> SidecarError:
    """The specific exception for a failed call."""
    code = err.code() if callable(getattr(err, "code", None)) else grpc.StatusCode.UNKNOWN
    details = err.details() if callable(getattr(err, "details", None)) else str(err)
    return _BY_CODE.get(code, SidecarError)(code, details or "")
