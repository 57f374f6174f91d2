"""The durable state store contract shared by the memory and Redis stores.

A store keeps one opaque binary blob (a serialized session state) per ``(tenant, session)``
together with the step number it was taken at. ``put`` is a compare-and-set on that step
number, so a stale replica (one that still holds an older step) can never overwrite newer
state written by the replica that took the session over.

Between two full blobs a writer may store a *delta* (``put(..., base=<step of the full blob>)``):
kept next to the full blob, under the same key (one Redis Cluster slot), replacing the previous
delta; a full put drops it. A delta is refused unless the stored full blob is the one it names.
"""

from __future__ import annotations

import asyncio
import re
import time
from collections.abc import AsyncIterator, Callable, Iterator
from contextlib import asynccontextmanager, contextmanager, suppress
from contextvars import ContextVar
from dataclasses import dataclass
from typing import Protocol, runtime_checkable

__all__ = [
    "ANSWERED",
    "MAX_ID_LENGTH",
    "MAX_STEP",
    "OUTCOMES",
    "Fenced",
    "InvalidId",
    "OnOp",
    "StateStore",
    "StoreError",
    "StoreUnavailable",
    "StoredState",
    "bounded",
    "observe",
    "validate_id",
    "validate_ids",
    "validate_step",
]

MAX_ID_LENGTH = 128
# Steps travel as uint64 on the wire but are stored and compared as signed 64-bit values.
MAX_STEP = (1 << 63) - 1

# Observer of store operations: ``on_op(op, seconds, outcome)``. The server maps it to Prometheus
# (server/metrics.py); the store never imports it. ``OUTCOMES`` lists every outcome each op reports:
#   ok             done
#   miss           get/claim found no stored state
#   conflict       put refused by the CAS: the store holds a newer (or the same) step written by
#                  another writer (another epoch, or no epoch check)
#   conflict_self  put met its own earlier write of this step under this epoch (a command retried
#                  after a timeout that Redis had executed): reported, and the put counts as written
#   base           a delta refused because the stored full checkpoint is not its base
#   fenced         put refused because another replica holds a newer owner epoch (Fenced raised)
#   unavailable    the store could not be reached, or did not answer within a ``bounded`` deadline
#   cancelled      the caller gave up for another reason (e.g. its RPC was cancelled): nothing known
#   error          anything else (a request the store rejected, a bug)
OnOp = Callable[[str, float, str], None]
_COMMON = ("ok", "unavailable", "cancelled", "error")
OUTCOMES: dict[str, tuple[str, ...]] = {
    "get": ("ok", "miss", *_COMMON[1:]),
    "put": ("ok", "conflict", "conflict_self", "base", "fenced", *_COMMON[1:]),
    "delete": _COMMON,
    "claim": ("ok", "miss", *_COMMON[1:]),
    "epochs": _COMMON,
    "list": _COMMON,
    "ping": _COMMON,
}
# Outcomes that prove the store answered (what clears ``nexus_degraded``).
ANSWERED = frozenset({"ok", "miss", "conflict", "conflict_self", "base", "fenced"})
_DEADLINE: ContextVar[asyncio.Timeout | None] = ContextVar("nexus_store_deadline", default=None)


class StoreError(Exception):
    """A store operation failed (bad request to the store, protocol or script error)."""


class StoreUnavailable(StoreError):
    """The backing store cannot be reached (connection refused, timeout, cluster down)."""


class Fenced(StoreError):
    """A write by a replica whose owner epoch is no longer the session's: another replica took
    the session over (or it was closed). The write did not happen."""


class InvalidId(StoreError, ValueError):
    """A tenant or session id cannot be used as (part of) a store key."""

    def __init__(self, field: str, reason: str) -> None:
        super().__init__(f"{field}: {reason}")
        self.field = field
        self.reason = reason


@dataclass(frozen=True, slots=True)
class StoredState:
    """One stored session state: the newest step, the full blob, and the delta taken since it.

    ``step`` is the newest checkpoint's: the delta's when there is one, else the full blob's.
    """

    step: int
    blob: bytes
    delta: bytes | None = None


@runtime_checkable
class StateStore(Protocol):
    """Async durable store of per-session state blobs, keyed by tenant and session id."""

    async def get(self, tenant: str, session_id: str) -> StoredState | None:
        """Return the stored state (refreshing its TTL), or None when nothing is stored."""
        ...

    async def put(self, tenant: str, session_id: str, step: int, blob: bytes, epoch: int | None = None,
                  base: int | None = None) -> bool:
        """Store ``blob`` at ``step`` iff nothing is stored or the stored step is < ``step``.

        Returns False on a CAS conflict (stored step >= ``step``): the stored state is untouched;
        True (outcome ``conflict_self``) when the stored step is ``step`` under this ``epoch``: this
        writer's own earlier write of it (a command retried after a timeout that had executed).
        With ``epoch``, raises :class:`Fenced` (and writes nothing) unless it is the session's
        current owner epoch. With ``base``, ``blob`` is a delta against the full blob stored at step
        ``base``: False (nothing written) unless that full blob is the stored one.
        """
        ...

    async def delete(self, tenant: str, session_id: str) -> None:
        """Remove the session's state, leaving a tombstone epoch that fences earlier writers;
        deleting a missing session is not an error."""
        ...

    async def claim(self, tenant: str, session_id: str) -> tuple[int, StoredState | None]:
        """Take ownership of a session: a new owner epoch, and its stored state (or None)."""
        ...

    async def epochs(self, tenant: str, session_ids: list[str]) -> list[int | None]:
        """The current owner epoch of each session (None: never claimed)."""
        ...

    async def list(self, tenant: str) -> list[str]:
        """Session ids with stored state for ``tenant`` (sorted)."""
        ...

    async def ping(self) -> None:
        """Raise StoreUnavailable unless the store answers."""
        ...

    async def close(self) -> None:
        """Release connections; the store is not used afterwards."""
        ...


# Whitespace (any Unicode space, including newlines) and the Redis Cluster hash-tag braces.
_FORBIDDEN = re.compile(r"[\s{}]")


def validate_id(field: str, value: str, *, allow_colon: bool = True) -> str:
    """Check that ``value`` can be embedded in a store key; return it unchanged.

    Rules: a non-empty ``str`` of at most 128 characters without whitespace or ``{``/``}``
    (braces would break the Redis Cluster hash tag that keeps a session in one slot). With
    ``allow_colon=False`` (tenants) ``:`` is refused too, so ``tenant:session`` is unambiguous.
    Raises ``InvalidId(field, reason)`` naming the first offending character and its index.
    """
    if not isinstance(value, str):
        raise InvalidId(field, f"must be a string, got {type(value).__name__}")
    if not value:
        raise InvalidId(field, "must not be empty")
    if len(value) > MAX_ID_LENGTH:
        raise InvalidId(field, f"is {len(value)} characters long, the maximum is {MAX_ID_LENGTH}")
    m = _FORBIDDEN.search(value)
    if m is None and not allow_colon:
        m = re.search(":", value)
    if m is not None:
        raise InvalidId(field, f"character {m.group()!r} at index {m.start()} is not allowed")
    return value


def validate_ids(field: str, values: list[str]) -> list[str]:
    """:func:`validate_id` of many values (colons allowed): one pass over all of them when every one is
    fine (the steady state of a batch), the first bad one named as :func:`validate_id` names it."""
    if values and min(map(len, values)) > 0 and max(map(len, values)) <= MAX_ID_LENGTH \
            and _FORBIDDEN.search("".join(values)) is None:
        return values
    return [validate_id(field, v) for v in values]


def validate_step(step: int) -> int:
    """Check that ``step`` is an int in [0, 2^63 - 1]; return it."""
    if isinstance(step, bool) or not isinstance(step, int):
        raise StoreError(f"step: must be an int, got {type(step).__name__}")
    if not 0 <= step <= MAX_STEP:
        raise StoreError(f"step: {step} is outside [0, {MAX_STEP}]")
    return step


@asynccontextmanager
async def bounded(seconds: float) -> AsyncIterator[None]:
    """Bound the store operations awaited in the body by ``seconds`` (raises ``TimeoutError``).

    The operation cut short is reported with outcome ``unavailable``: a store that does not answer
    within the caller's deadline is unreachable for that caller. (``asyncio.wait_for`` would cancel
    it like any other cancellation, and the operation could not tell a timeout from a caller that
    went away.)
    """
    async with asyncio.timeout(seconds) as deadline:
        token = _DEADLINE.set(deadline)
        try:
            yield
        finally:
            _DEADLINE.reset(token)


@contextmanager
def observe(on_op: OnOp | None, op: str) -> Iterator[list[str]]:
    """Time one operation and report it to ``on_op``.

    Yields a one-element list holding the outcome ("ok" by default) that the body may change (see
    ``OnOp``). Exceptions propagate: :class:`Fenced` reports "fenced", :class:`StoreUnavailable`
    "unavailable", a cancellation "unavailable" when a :func:`bounded` deadline expired (else
    "cancelled"), anything else "error".
    """
    outcome = ["ok"]
    start = time.perf_counter()
    try:
        yield outcome
    except Fenced:
        outcome[0] = "fenced"
        raise
    except StoreUnavailable:
        outcome[0] = "unavailable"
        raise
    except asyncio.CancelledError:
        deadline = _DEADLINE.get()
        outcome[0] = "unavailable" if deadline is not None and deadline.expired() else "cancelled"
        raise
    except BaseException:
        outcome[0] = "error"
        raise
    finally:
        if on_op is not None:
            # Metrics are best effort: a failing observer must not fail the operation.
            with suppress(Exception):
                on_op(op, time.perf_counter() - start, outcome[0])
