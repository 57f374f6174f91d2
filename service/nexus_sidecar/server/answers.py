"""The answers of a batch of steps, computed and encoded for the whole batch at once.

:func:`answer_batch` turns the engine's outputs for B sessions into B :class:`Answer` records
with a handful of array calls (evicted positions, per-row offsets, retained counts and the
running positions checksums, all vectorised). An answer is what a session keeps for idempotent
retries; :func:`encode_batch` packs many into a ``StepBatchResponse`` and
:meth:`Answer.session_result` into the per-session ``SessionResult``.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
from nexus_client.v1 import sidecar_pb2 as pb
from nexus_client.wire import mix64, tensor_from_proto

from nexus_sidecar.engine import StepOutput


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
class Answer:
    """One session's answer to one step."""

    step: int
    count: int  # retained slots after the step, summed over groups
    checksum: int  # positions_checksum of the retained positions after the step
    keep: np.ndarray  # bool [G * (n + k)]: the call's slots in C order
    evicted: np.ndarray  # int64 [e]: evicted positions, group after group
    evicted_offsets: np.ndarray  # int64 [G + 1] into ``evicted``

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


def answer_batch(steps: Sequence[int], outs: Sequence[HostOutput], new_positions: np.ndarray,
                 token_offsets: np.ndarray, checksums_before: Sequence[int]) -> list[Answer]:
    """The answers of B sessions from their engine outputs, in one vectorised pass.

    ``new_positions`` (int64) holds every session's new positions, session b's between
    ``token_offsets[b]`` and ``[b + 1]``; ``checksums_before`` the sessions' running checksums.
    """
    B = len(outs)
    groups = np.array([o.keep.shape[0] for o in outs], dtype=np.int64)
    widths = np.array([o.keep.shape[1] for o in outs], dtype=np.int64)
    keep = np.concatenate([o.keep.reshape(-1) for o in outs])
    # Evictions are few: find the slots not kept (one pass over the mask), then only their positions.
    dropped = np.flatnonzero(~keep)
    pos = np.concatenate([o.slot_positions.reshape(-1) for o in outs])[dropped]
    live = pos >= 0  # padding slots of narrower groups are not evictions
    evicted, where = pos[live], dropped[live]
    # Row r = (session, group) spans widths[b] slots; evictions are ascending within a row.
    row_end = np.cumsum(np.repeat(widths, groups))
    per_row = np.bincount(np.searchsorted(row_end, where, side="right"), minlength=row_end.shape[0])
    ev_off = np.concatenate([[0], np.cumsum(per_row)])  # [rows + 1]
    slot_off = np.concatenate([[0], np.cumsum(groups * widths)])
    counts = [sum(o.retained) for o in outs]
    row_off = np.concatenate([[0], np.cumsum(groups)])
    sess_ev = ev_off[row_off]  # [B + 1] eviction offsets per session
    # Running checksums: + G x (new positions' terms) - (evicted positions' terms), mod 2^64.
    tok = np.asarray(token_offsets, dtype=np.int64)
    added = _segment_sums(mix64(new_positions), tok[:-1], tok[1:]) * groups.astype(np.uint64)
    removed = _segment_sums(mix64(evicted), sess_ev[:-1], sess_ev[1:])
    after = np.array(checksums_before, dtype=np.uint64) + added - removed
    counts_l, after_l = counts, after.tolist()
    answers = []
    for b in range(B):
        e0, e1 = int(sess_ev[b]), int(sess_ev[b + 1])
        answers.append(Answer(int(steps[b]), counts_l[b], after_l[b], keep[slot_off[b]: slot_off[b + 1]],
                              evicted[e0:e1], ev_off[row_off[b]: row_off[b + 1] + 1] - e0))
    return answers


def encode_batch(answers: Sequence[Answer]) -> pb.StepBatchResponse:
    """The columnar answer of a batch (request order)."""
    keep = np.concatenate([a.keep for a in answers])
    evicted = np.concatenate([a.evicted for a in answers])
    per_row = np.concatenate([np.diff(a.evicted_offsets) for a in answers])
    offsets = np.concatenate([[0], np.cumsum(per_row, dtype=np.int64)])
    return pb.StepBatchResponse(
        steps=np.array([a.step for a in answers], dtype="<u8").tobytes(),
        retained_counts=np.array([a.count for a in answers], dtype="<u4").tobytes(),
        retained_checksums=np.array([a.checksum for a in answers], dtype="<u8").tobytes(),
        keep=np.packbits(keep, bitorder="little").tobytes(),
        evicted=evicted.astype("<i8").tobytes(), evicted_offsets=offsets.astype("<i8").tobytes())
