"""Checkpoints off the engine thread: what is captured under the session's lock, and the encoding
that runs on the checkpoint thread.

A checkpoint has three phases. *Capture* runs on the engine thread, ordered with the engine's
calls and with the session's lock held (no step of it in flight): a plain host copy of its pool
rows (``Engine.capture``) plus its step, checksum, digest and last answer -- a consistent cut that
no later step can tear. *Encode* runs on the checkpoint thread: masking, edge mapping, the delta
against the last full checkpoint, serialisation. *Write* is the store's compare-and-set with the
owner epoch, on the event loop. Only the first phase takes engine time.
"""

from __future__ import annotations

import time
import zlib
from dataclasses import dataclass

from nexus_sidecar.engine import Engine
from nexus_sidecar.engine.state import Anchor, RowCapture, StateDelta
from nexus_sidecar.server.checkpoint import Checkpoint, DeltaCheckpoint


@dataclass
class DeltaBase:
    """The full checkpoint in the store that this replica's deltas of a session are taken against."""

    step: int
    crc: int  # crc32 of its bytes (a delta names it, so it can never be applied to another)
    nbytes: int
    anchor: Anchor  # its positions and memory: what a delta is the difference from
    deltas: int = 0  # deltas written against it so far


@dataclass
class Captured:
    """A session's consistent cut, taken under its lock; encoded later on another thread."""

    step: int
    checksum: int
    digest: bytes
    last_result: bytes
    rows: RowCapture
    base: DeltaBase | None  # None: a full checkpoint
    seconds: float  # engine-thread time of the copy

    @property
    def kind(self) -> str:
        """"full" or "delta"."""
        return "full" if self.base is None else "delta"


@dataclass
class Encoded:
    """A checkpoint's bytes, with the full checkpoint it applies to (delta) or that it becomes (full)."""

    blob: bytes
    base: DeltaBase
    seconds: float


def capture(engine: Engine, handle: int, base: DeltaBase | None) -> tuple[RowCapture, float]:
    """The engine-thread phase: copy the session's rows (for a delta: every slot's position, liveness,
    birth and memory, and the edges of the slots appended since the base)."""
    t0 = time.perf_counter()
    rows = engine.capture(handle, since=None if base is None else base.anchor.calls)
    return rows, time.perf_counter() - t0


def encode(cap: Captured) -> Encoded | None:
    """The checkpoint-thread phase. None when a delta cannot describe the change (the base is not
    this session's history): the caller takes a full checkpoint instead."""
    t0 = time.perf_counter()
    if cap.base is not None:
        delta = StateDelta.diff(cap.base.anchor, cap.rows)
        if delta is None:
            return None
        blob = DeltaCheckpoint(cap.step, cap.base.step, cap.base.crc, cap.checksum, cap.digest, cap.last_result,
                               delta).to_bytes()
        return Encoded(blob, cap.base, time.perf_counter() - t0)
    state = cap.rows.state()
    blob = Checkpoint(cap.step, cap.checksum, cap.digest, cap.last_result, state).to_bytes()
    return Encoded(blob, DeltaBase(cap.step, zlib.crc32(blob), len(blob), Anchor.of(state)),
                   time.perf_counter() - t0)
