"""Service errors and the one place that maps every error to a gRPC status code."""

from __future__ import annotations

import grpc
from nexus_client.wire import WireError

from nexus_sidecar.engine.errors import ConfigError, FieldError, InputError, StateError
from nexus_sidecar.server.stores import InvalidId, StoreError, StoreUnavailable

# Status details travel in HTTP/2 trailers (8 KiB of metadata by default): a message longer
# than this is cut, and no message quotes client input longer than BRIEF characters.
MAX_MESSAGE = 1024
BRIEF = 64
# Engine field names -> the proto fields a client sent (shape and value errors name what it sent).
PROTO_FIELDS = {"edge_pos": "edge_index", "edge_w": "edge_weight"}


def brief(value: object, limit: int = BRIEF) -> str:
    """``repr(value)``, cut to ``limit`` characters with its full length said: safe to echo."""
    text = repr(value)
    if len(text) <= limit:
        return text
    size = f"{len(value)} characters" if isinstance(value, (str, bytes)) else f"{len(text)} characters as text"
    return f"{text[:limit]}... ({size})"


def step_field(session_id: str, engine_field: str) -> str:
    """``steps[<id>].<proto field>`` for an engine field name."""
    return f"steps[{session_id}].{PROTO_FIELDS.get(engine_field, engine_field)}"


class ServiceError(Exception):
    """Base of errors raised on purpose by the service layer."""

    code = grpc.StatusCode.INTERNAL


class InvalidArgument(ServiceError):
    """A request field is invalid: ``field`` says which, the message says why."""

    code = grpc.StatusCode.INVALID_ARGUMENT

    def __init__(self, field: str, reason: str) -> None:
        super().__init__(f"{field}: {reason}")
        self.field = field


class SessionNotFound(ServiceError):
    """No hot or stored session with this id for the caller's tenant."""

    code = grpc.StatusCode.NOT_FOUND

    def __init__(self, session_id: str) -> None:
        super().__init__(f"session {brief(session_id, 160)} not found (never opened, closed, or expired)")


class SessionConflict(ServiceError):
    """OpenSession for an existing id with a different config."""

    code = grpc.StatusCode.ALREADY_EXISTS


class StepOutOfOrder(ServiceError):
    """A step number that is neither the next one nor a retry of the last one."""

    code = grpc.StatusCode.FAILED_PRECONDITION

    def __init__(self, session_id: str, got: int, expected: int, note: str = "") -> None:
        why = f" ({note})" if note else ""
        super().__init__(f"session {session_id!r}: step {got} is out of order{why}; expected step {expected}")
        self.expected = expected


class StateMismatch(ServiceError):
    """The worker's retained tokens differ from the sidecar's (e.g. after failover to an older checkpoint)."""

    code = grpc.StatusCode.FAILED_PRECONDITION


class QueueFull(ServiceError):
    """The micro-batcher's queue (or a quota) is full."""

    code = grpc.StatusCode.RESOURCE_EXHAUSTED


class QuotaExceeded(ServiceError):
    """A per-tenant quota would be exceeded."""

    code = grpc.StatusCode.RESOURCE_EXHAUSTED


class LimitExceeded(ServiceError):
    """An admission limit (server/admission.py) would be exceeded; nothing was allocated."""

    code = grpc.StatusCode.RESOURCE_EXHAUSTED

    def __init__(self, limit: str, value: int, what: str) -> None:
        super().__init__(f"limit {limit} = {value} exceeded: {what}")
        self.limit = limit
        self.value = value


class SessionFenced(ServiceError):
    """Another replica took the session over (a newer owner epoch): this replica dropped its copy."""

    code = grpc.StatusCode.ABORTED

    def __init__(self, session_id: str) -> None:
        super().__init__(f"session {brief(session_id, 160)} was taken over by another replica (newer owner epoch); "
                         "this replica dropped its copy and never wrote after that: retry (it resumes from the store)")


class Draining(ServiceError):
    """The server is shutting down and takes no new work."""

    code = grpc.StatusCode.UNAVAILABLE

    def __init__(self) -> None:
        super().__init__("server is draining (shutting down); retry on another replica")


class Unauthenticated(ServiceError):
    """No or malformed credential."""

    code = grpc.StatusCode.UNAUTHENTICATED


class PermissionDenied(ServiceError):
    """A valid credential that may not do this."""

    code = grpc.StatusCode.PERMISSION_DENIED


class DeadlineExpired(ServiceError):
    """The caller's deadline passed before the work was computed."""

    code = grpc.StatusCode.DEADLINE_EXCEEDED


def to_status(exc: BaseException) -> tuple[grpc.StatusCode, str]:
    """Map any exception to (status code, message). Unknown exceptions are INTERNAL.

    The message is cut to :data:`MAX_MESSAGE` characters whatever produced it.
    """
    code, message = _classify(exc)
    if len(message) > MAX_MESSAGE:
        message = message[: MAX_MESSAGE - 24] + f"... ({len(message)} chars)"
    return code, message


def _classify(exc: BaseException) -> tuple[grpc.StatusCode, str]:
    if isinstance(exc, ServiceError):
        return exc.code, str(exc)
    if isinstance(exc, StateError):
        return grpc.StatusCode.DATA_LOSS, f"stored state is unreadable: {exc}"
    if isinstance(exc, (InputError, ConfigError, FieldError, WireError, InvalidId)):
        return grpc.StatusCode.INVALID_ARGUMENT, str(exc)
    if isinstance(exc, StoreUnavailable):
        return grpc.StatusCode.UNAVAILABLE, f"state store unavailable: {exc}"
    if isinstance(exc, StoreError):
        return grpc.StatusCode.INTERNAL, f"state store error: {exc}"
    return grpc.StatusCode.INTERNAL, f"internal error: {type(exc).__name__}: {exc}"


def forget_frames(exc: BaseException) -> None:
    """Drop the tracebacks of ``exc`` and the exceptions chained to it.

    A refused request's exception is referenced from its own traceback's frames (the task that
    ran it keeps it as its result), a reference cycle that holds the request's decoded tensors
    until the cyclic GC gets to it: with 60 MB requests, gigabytes. Once the status is sent, the
    frames are of no use.
    """
    seen: set[int] = set()
    todo: list[BaseException | None] = [exc]
    while todo:
        e = todo.pop()
        if e is None or id(e) in seen:
            continue
        seen.add(id(e))
        e.__traceback__ = None
        todo += [e.__context__, e.__cause__]


def http_status(code: grpc.StatusCode) -> int:
    """The HTTP status matching a gRPC code (for the admin API)."""
    return {
        grpc.StatusCode.INVALID_ARGUMENT: 400, grpc.StatusCode.NOT_FOUND: 404, grpc.StatusCode.ALREADY_EXISTS: 409,
        grpc.StatusCode.FAILED_PRECONDITION: 412, grpc.StatusCode.RESOURCE_EXHAUSTED: 429,
        grpc.StatusCode.UNAUTHENTICATED: 401, grpc.StatusCode.PERMISSION_DENIED: 403,
        grpc.StatusCode.UNAVAILABLE: 503, grpc.StatusCode.DEADLINE_EXCEEDED: 504,
    }.get(code, 500)
