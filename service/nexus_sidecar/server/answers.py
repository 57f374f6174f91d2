"""The answers of a batch of steps, computed and encoded for the whole batch at once.

:func:`answer_batch` turns the engine's outputs for B sessions into B :class:`Answer` records
with a handful of array calls (evicted positions, per-row offsets, retained counts and the
running positions checksums, all vectorised). An answer is what a session keeps for idempotent
retries; :func:`encode_batch` packs many into a ``StepBatchResponse`` and
:meth:`Answer.session_result` into the per-session ``SessionResult``.
"""

from __future__ import annotations

import functools
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
from nexus_client.v1 import sidecar_pb2 as pb
from nexus_client.wire import mix64, tensor_from_proto

from nexus_sidecar.engine import BatchOutput, StepOutput


@dataclass
class HostOutput:
    """An engine output as numpy views (made on the engine thread: the event loop then needs no torch call)."""

    keep: np.ndarray  # bool [G, n + k]
    slot_positions: np.ndarray  # int64 [G, n + k], -1 on padding
    retained: list[int]
    retained_mass: np.ndarray  # float32 [G]
    evicted_age: np.ndarray  # int32 [G, n + k]

    @classmethod
    def of(cls, out: StepOutput) -> HostOutput:
        """Views of a host ``StepOutput``'s tensors (no copy)."""
        out = out.cpu()
        return cls(out.keep.numpy(), out.slot_positions.numpy(), out.retained, out.retained_mass.numpy(),
                   out.evicted_age.numpy())


@dataclass
class HostBatch:
    """The engine outputs of B sessions in columnar form, as numpy (host) arrays: rows are the
    sessions' groups in order, slots padded to the widest session (-1 positions, not kept)."""

    keep: np.ndarray  # bool [R, W]
    slot_positions: np.ndarray  # int64 [R, W]
    retained_mass: np.ndarray  # float32 [R]
    evicted_age: np.ndarray  # int32 [R, W]
    count: np.ndarray  # int64 [R]: slots kept per row after the call
    groups: np.ndarray  # int64 [B]
    widths: np.ndarray  # int64 [B]: each session's n + k

    @classmethod
    def of(cls, out: BatchOutput) -> HostBatch:
        """Host views of an engine ``BatchOutput`` (its errors are the caller's)."""
        return cls(out.keep.cpu().numpy(), out.slot_positions.cpu().numpy(), out.retained_mass.cpu().numpy(),
                   out.evicted_age.cpu().numpy(), out.count.cpu().numpy(), np.array(out.groups, dtype=np.int64),
                   np.array(out.widths, dtype=np.int64))

    @classmethod
    def gather(cls, parts: Sequence[HostOutput | tuple[HostBatch, int]]) -> HostBatch:
        """B sessions' outputs as one batch: the sessions ``b0..b1`` of one batch in order (the steady
        state: views, no copy), else one copy per session into padded arrays."""
        first = parts[0]
        if isinstance(first, tuple):
            src, b0 = first
            if all(isinstance(p, tuple) and p[0] is src and p[1] == b0 + j for j, p in enumerate(parts)):
                return src.sessions(b0, b0 + len(parts))
        outs = [p[0].output(p[1]) if isinstance(p, tuple) else p for p in parts]
        groups = np.array([o.keep.shape[0] for o in outs], dtype=np.int64)
        widths = np.array([o.keep.shape[1] for o in outs], dtype=np.int64)
        R, W = int(groups.sum()), int(widths.max())
        keep, pos = np.zeros((R, W), dtype=bool), np.full((R, W), -1, dtype=np.int64)
        age = np.zeros((R, W), dtype=np.int32)
        r0 = 0
        for o, g, w in zip(outs, groups.tolist(), widths.tolist(), strict=True):
            keep[r0: r0 + g, :w], pos[r0: r0 + g, :w], age[r0: r0 + g, :w] = o.keep, o.slot_positions, o.evicted_age
            r0 += g
        return cls(keep, pos, np.concatenate([o.retained_mass for o in outs]).astype(np.float32), age,
                   np.array([c for o in outs for c in o.retained], dtype=np.int64), groups, widths)

    @functools.cached_property
    def row_offsets(self) -> np.ndarray:
        """int64 [B + 1]: session b's rows are ``row_offsets[b]:row_offsets[b + 1]``."""
        return np.concatenate([[0], np.cumsum(self.groups)])

    def sessions(self, b0: int, b1: int) -> HostBatch:
        """Sessions ``b0..b1 - 1`` (views)."""
        if b0 == 0 and b1 == len(self.groups):
            return self
        off = self.row_offsets
        r = slice(int(off[b0]), int(off[b1]))
        return HostBatch(self.keep[r], self.slot_positions[r], self.retained_mass[r], self.evicted_age[r],
                         self.count[r], self.groups[b0:b1], self.widths[b0:b1])

    def output(self, b: int) -> HostOutput:
        """Session ``b``'s output (views)."""
        off = self.row_offsets
        r, w = slice(int(off[b]), int(off[b + 1])), int(self.widths[b])
        return HostOutput(self.keep[r, :w], self.slot_positions[r, :w], self.count[r].tolist(),
                          self.retained_mass[r], self.evicted_age[r, :w])

    def flat(self, a: np.ndarray) -> np.ndarray:
        """The sessions' slots of ``a`` ([R, W]) back to back in C order (each session's [G, n + k])."""
        W = a.shape[1]
        if (self.widths == W).all():
            return a.reshape(-1)
        off = self.row_offsets.tolist()
        return np.concatenate([a[off[b]: off[b + 1], :w].reshape(-1) for b, w in enumerate(self.widths.tolist())])


class Answer:
    """One session's answer to one step.

    Computed in a batch (:func:`answer_batch`), it is a reference into that batch's arrays: the
    per-session views are made only when asked for (a retry, a checkpoint, the per-session form).
    """

    __slots__ = ("_evicted", "_evicted_offsets", "_keep", "checksum", "count", "source", "step")

    def __init__(self, step: int, count: int, checksum: int, keep: np.ndarray | None = None,
                 evicted: np.ndarray | None = None, evicted_offsets: np.ndarray | None = None,
                 source: tuple[AnswerBatch, int] | None = None) -> None:
        self.step = step
        self.count = count  # retained slots after the step, summed over groups
        self.checksum = checksum  # positions_checksum of the retained positions after the step
        self._keep, self._evicted, self._evicted_offsets = keep, evicted, evicted_offsets
        self.source = source  # the batch this answer was computed in, and its index there

    @property
    def keep(self) -> np.ndarray:
        """bool [G * (n + k)]: the call's slots in C order."""
        if self._keep is None:
            batch, b = self.source  # type: ignore[misc]
            self._keep = batch.keep[batch.slot_offsets[b]: batch.slot_offsets[b + 1]]
        return self._keep

    @property
    def evicted(self) -> np.ndarray:
        """int64 [e]: evicted positions, group after group."""
        if self._evicted is None:
            batch, b = self.source  # type: ignore[misc]
            e = batch.evicted_offsets[batch.row_offsets[b]: batch.row_offsets[b + 1] + 1]
            self._evicted = batch.evicted[e[0]: e[-1]]
        return self._evicted

    @property
    def evicted_offsets(self) -> np.ndarray:
        """int64 [G + 1] into :attr:`evicted`."""
        if self._evicted_offsets is None:
            batch, b = self.source  # type: ignore[misc]
            e = batch.evicted_offsets[batch.row_offsets[b]: batch.row_offsets[b + 1] + 1]
            self._evicted_offsets = e - e[0]
        return self._evicted_offsets

    @property
    def groups(self) -> int:
        """Layer groups of the session."""
        return int(self.evicted_offsets.shape[0] - 1)

    def session_result(self, session_id: str) -> pb.SessionResult:
        """The per-session form of this answer."""
        G = self.groups
        keep = np.ascontiguousarray(self.keep).reshape(G, -1)
        off = self.evicted_offsets
        evicted = [pb.GroupEvictions(group=g, positions=pb.Tensor(
            dtype=pb.D_TYPE_INT64, shape=[int(off[g + 1] - off[g])],
            data=self.evicted[off[g]: off[g + 1]].astype("<i8").tobytes())) for g in range(G)]
        return pb.SessionResult(session_id=session_id, step=self.step,
                                keep=pb.Tensor(dtype=pb.D_TYPE_BOOL, shape=list(keep.shape), data=keep.tobytes()),
                                evicted=evicted, retained_count=self.count, retained_checksum=self.checksum)

    @classmethod
    def from_session_result(cls, msg: pb.SessionResult) -> Answer:
        """Read back a stored ``SessionResult`` (checkpoints keep the last answer in that form)."""
        keep = tensor_from_proto(msg.keep, field="keep").numpy().astype(bool).reshape(-1)
        evicted = [tensor_from_proto(g.positions, field="evicted").numpy().astype(np.int64) for g in msg.evicted]
        counts = [e.shape[0] for e in evicted]
        return cls(msg.step, msg.retained_count, msg.retained_checksum, keep,
                   np.concatenate(evicted) if evicted else np.zeros(0, np.int64),
                   np.concatenate([[0], np.cumsum(counts, dtype=np.int64)]))


def _segment_sums(values: np.ndarray, starts: np.ndarray, ends: np.ndarray) -> np.ndarray:
    """Sums of ``values[starts[i]:ends[i]]`` mod 2^64 (uint64; empty segments give 0)."""
    cs = np.concatenate([np.zeros(1, values.dtype), np.cumsum(values, dtype=values.dtype)])
    return cs[ends] - cs[starts]


@dataclass
class AnswerBatch:
    """The answers of one batch in the wire's columnar form (what :func:`encode_batch` sends when a
    response is exactly this batch, in order)."""

    steps: np.ndarray  # uint64 [B]
    counts: np.ndarray  # int64 [B]
    checksums: np.ndarray  # uint64 [B]
    keep: np.ndarray  # bool [sum of G x (n + k)]
    keep_packed: np.ndarray  # uint8: ``keep`` as the wire packs it (little-endian bits)
    evicted: np.ndarray  # int64 [e]
    evicted_offsets: np.ndarray  # int64 [rows + 1]
    slot_offsets: np.ndarray  # int64 [B + 1] into ``keep``
    row_offsets: np.ndarray  # int64 [B + 1]: session b's rows (groups)

    def __len__(self) -> int:
        return int(self.steps.shape[0])


def answer_batch(steps: np.ndarray, out: HostBatch, new_positions: np.ndarray, token_offsets: np.ndarray,
                 checksums_before: np.ndarray) -> list[Answer]:
    """The answers of B sessions from their engine outputs, in one vectorised pass.

    ``new_positions`` (int64) holds every session's new positions, session b's between
    ``token_offsets[b]`` and ``[b + 1]``; ``checksums_before`` (uint64) the sessions' running checksums.
    """
    B = int(out.groups.shape[0])
    groups, widths = out.groups, out.widths
    keep = out.flat(out.keep)
    # Evictions are few: find the slots not kept from the packed mask (the wire's form, needed anyway)
    # by its bytes that are not all ones, then only their positions.
    packed = np.packbits(keep, bitorder="little")
    partial = np.flatnonzero(packed != 0xFF)
    bits = np.unpackbits(packed[partial], bitorder="little").reshape(-1, 8)
    dropped = (partial[:, None] * 8 + np.arange(8))[bits == 0]
    dropped = dropped[dropped < keep.shape[0]]  # the last byte's padding bits
    pos = out.flat(out.slot_positions)[dropped]
    live = pos >= 0  # padding slots of narrower groups are not evictions
    evicted, where = pos[live], dropped[live]
    # Row r = (session, group) spans widths[b] slots; evictions are ascending within a row.
    row_end = np.cumsum(np.repeat(widths, groups))
    per_row = np.bincount(np.searchsorted(row_end, where, side="right"), minlength=row_end.shape[0])
    ev_off = np.concatenate([[0], np.cumsum(per_row)])  # [rows + 1]
    slot_off = np.concatenate([[0], np.cumsum(groups * widths)])
    row_off = out.row_offsets
    counts = np.add.reduceat(out.count, row_off[:-1]) if B else np.zeros(0, np.int64)
    sess_ev = ev_off[row_off]  # [B + 1] eviction offsets per session
    # Running checksums: + G x (new positions' terms) - (evicted positions' terms), mod 2^64.
    tok = np.asarray(token_offsets, dtype=np.int64)
    added = _segment_sums(mix64(new_positions), tok[:-1], tok[1:]) * groups.astype(np.uint64)
    removed = _segment_sums(mix64(evicted), sess_ev[:-1], sess_ev[1:])
    after = np.asarray(checksums_before, dtype=np.uint64) + added - removed
    batch = AnswerBatch(np.asarray(steps, dtype=np.uint64), counts, after, keep, packed, evicted, ev_off, slot_off,
                        row_off)
    return [Answer(s_, c, x, source=(batch, b))
            for b, (s_, c, x) in enumerate(zip(batch.steps.tolist(), counts.tolist(), after.tolist(), strict=True))]


def encode_batch(answers: Sequence[Answer]) -> pb.StepBatchResponse:
    """The columnar answer of a batch (request order)."""
    src = answers[0].source if answers else None
    if src is not None and len(src[0]) == len(answers) and all(
            a.source is not None and a.source[0] is src[0] and a.source[1] == b for b, a in enumerate(answers)):
        # The response is exactly one computed batch, in order (the steady state): its arrays as they are.
        batch = src[0]
        steps, counts, checksums = batch.steps, batch.counts, batch.checksums
        packed, evicted, offsets = batch.keep_packed, batch.evicted, batch.evicted_offsets
    else:
        steps = np.array([a.step for a in answers], dtype=np.uint64)
        counts = np.array([a.count for a in answers], dtype=np.int64)
        checksums = np.array([a.checksum for a in answers], dtype=np.uint64)
        packed = np.packbits(np.concatenate([a.keep for a in answers]), bitorder="little")
        evicted = np.concatenate([a.evicted for a in answers])
        per_row = np.concatenate([np.diff(a.evicted_offsets) for a in answers])
        offsets = np.concatenate([[0], np.cumsum(per_row, dtype=np.int64)])
    return pb.StepBatchResponse(
        steps=steps.astype("<u8").tobytes(), retained_counts=counts.astype("<u4").tobytes(),
        retained_checksums=checksums.astype("<u8").tobytes(),
        keep=packed.tobytes(),
        evicted=evicted.astype("<i8").tobytes(), evicted_offsets=offsets.astype("<i8").tobytes())
