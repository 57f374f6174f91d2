"""The columnar batch form of a step (the ``StepBatch`` RPC): B sessions' steps as a few packed
buffers, and the columnar answer read back.

Layout (see ``StepBatchRequest`` in proto/nexus/v1/sidecar.proto): per-session columns of fixed
width (raw little-endian bytes), and each tensor field of ``SessionStep`` concatenated over the
sessions (flattened in C order) with offsets. :class:`BatchBuilder` packs it with one
concatenation per field; :func:`read_answer` reads the answer with a handful of array calls.
Shared by the worker side and the server, so both spell the layout once.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np
import torch

from nexus_client.packing import WorkerSession
from nexus_client.v1 import sidecar_pb2 as pb
from nexus_client.wire import CALL_KIND, PRIORS, WireError, int_wire_dtype, tensor_to_proto

__all__ = [
    "ANSWER_COLUMNS",
    "REQUEST_COLUMNS",
    "TENSOR_FIELDS",
    "BatchAnswer",
    "BatchBuilder",
    "read_answer",
]

# Fixed-width columns of a StepBatchRequest: name -> little-endian numpy dtype.
REQUEST_COLUMNS: dict[str, np.dtype] = {
    "steps": np.dtype("<u8"), "retained_counts": np.dtype("<u4"), "retained_checksums": np.dtype("<u8"),
    "retained_slots": np.dtype("<u4"), "token_offsets": np.dtype("<i8"), "slot_offsets": np.dtype("<i8"),
    "edge_offsets": np.dtype("<i8"), "calls": np.dtype("u1"),
}
# ... and of a StepBatchResponse (``keep`` is a bit mask, read separately).
ANSWER_COLUMNS: dict[str, np.dtype] = {
    "steps": np.dtype("<u8"), "retained_counts": np.dtype("<u4"), "retained_checksums": np.dtype("<u8"),
    "evicted": np.dtype("<i8"), "evicted_offsets": np.dtype("<i8"),
}
# The concatenated tensor fields, named as in SessionStep, and the offsets column each one uses.
TENSOR_FIELDS: dict[str, str] = {
    "new_positions": "token_offsets", "attn": "slot_offsets", "last": "slot_offsets",
    "edge_index": "edge_offsets", "edge_weight": "edge_offsets", **dict.fromkeys(PRIORS, "slot_offsets"),
}


def _offsets(counts: list[int]) -> bytes:
    return np.concatenate([[0], np.cumsum(counts, dtype=np.int64)]).astype("<i8").tobytes()


@dataclass
class _Pending:
    ws: WorkerSession
    step: int
    tensors: dict[str, torch.Tensor]
    call: int


@dataclass
class BatchBuilder:
    """Collects one step per session, then packs them into one ``StepBatchRequest``.

    ``add`` takes the same tensors as :func:`nexus_client.packing.pack_step` (``attn``/``last``/priors
    float ``[G, n + k]``, ``edge_pos``/``edge_w`` ``[G, k, F]``); ``request`` concatenates each field
    once. Floats travel as ``float_dtype``; positions as int32 while every one fits, else int64.
    The priors are all-or-none over a batch (the wire carries one buffer per prior).
    """

    float_dtype: torch.dtype = torch.float32
    _items: list[_Pending] = field(default_factory=list)

    def __len__(self) -> int:
        return len(self._items)

    @property
    def session_ids(self) -> list[str]:
        """The ids added so far, in order."""
        return [p.ws.session_id for p in self._items]

    def add(self, ws: WorkerSession, new_positions: torch.Tensor, attn: torch.Tensor, last: torch.Tensor,
            edge_pos: torch.Tensor, edge_w: torch.Tensor, *, step: int | None = None, call: str = "unspecified",
            key_diversity: torch.Tensor | None = None, key_norm: torch.Tensor | None = None,
            value_norm: torch.Tensor | None = None) -> None:
        """Add the worker's next step of ``ws`` (or ``step``, for a retry); ``call`` is what its queries
        are (``wire.CALL_KIND``: "context", "question", "decode")."""
        if call not in CALL_KIND:
            raise ValueError(f"call: must be one of {list(CALL_KIND)}, got {call!r}")
        if attn.dim() != 2:
            raise WireError("attn", f"must be [G, n + k], got shape {tuple(attn.shape)}")
        tensors = {"new_positions": new_positions, "attn": attn, "last": last, "edge_index": edge_pos,
                   "edge_weight": edge_w}
        priors = {"key_diversity": key_diversity, "key_norm": key_norm, "value_norm": value_norm}
        tensors.update({name: t for name, t in priors.items() if t is not None})
        if self._items and set(tensors) != set(self._items[0].tensors):
            raise WireError("priors", "every session of a batch must carry the same priors (a batch has one buffer "
                                      "per prior): send the others in another batch")
        self._items.append(_Pending(ws, ws.step + 1 if step is None else step,
                                    {name: t.detach() for name, t in tensors.items()}, CALL_KIND[call]))

    def request(self) -> pb.StepBatchRequest:
        """The packed request (the builder can be reused after ``clear``)."""
        items = self._items
        ks = [int(p.tensors["new_positions"].numel()) for p in items]
        req = pb.StepBatchRequest(
            session_ids=[p.ws.session_id for p in items],
            steps=np.array([p.step for p in items], dtype="<u8").tobytes(),
            retained_counts=np.array([p.ws.retained_count for p in items], dtype="<u4").tobytes(),
            retained_checksums=np.array([p.ws.retained_checksum for p in items], dtype="<u8").tobytes(),
            retained_slots=np.array([int(p.tensors["attn"].shape[-1]) - k for p, k in zip(items, ks, strict=True)],
                                    dtype="<u4").tobytes(),
            token_offsets=_offsets(ks),
            slot_offsets=_offsets([int(p.tensors["attn"].numel()) for p in items]),
            edge_offsets=_offsets([int(p.tensors["edge_index"].numel()) for p in items]),
        )
        if any(p.call for p in items):  # empty = every call unspecified (what old servers expect too)
            req.calls = np.array([p.call for p in items], dtype="u1").tobytes()
        names = list(items[0].tensors) if items else list(TENSOR_FIELDS)[:5]
        for name in names:
            flat = torch.cat([p.tensors[name].reshape(-1).cpu() for p in items]) if items else torch.zeros(0)
            wire = int_wire_dtype(flat) if name in ("new_positions", "edge_index") else self.float_dtype
            getattr(req, name).CopyFrom(tensor_to_proto(flat, wire, field=name))
        return req

    def clear(self) -> None:
        """Forget the added steps."""
        self._items.clear()


def _column(resp: pb.StepBatchResponse, name: str, count: int) -> np.ndarray:
    data = getattr(resp, name)
    dtype = ANSWER_COLUMNS[name]
    if len(data) != count * dtype.itemsize:
        raise WireError(name, f"has {len(data)} bytes, expected {count} x {dtype.itemsize}")
    return np.frombuffer(data, dtype=dtype).astype(dtype.newbyteorder("="))


@dataclass
class BatchAnswer:
    """A ``StepBatchResponse`` read against its request: per-session accessors over flat arrays."""

    steps: np.ndarray  # uint64 [B]
    retained_counts: np.ndarray  # int64 [B]
    retained_checksums: np.ndarray  # uint64 [B]
    keep: np.ndarray  # bool [sum G x (n + k)], the request's slot layout
    evicted: np.ndarray  # int64 [E]
    evicted_offsets: np.ndarray  # int64 [rows + 1]
    slot_offsets: np.ndarray  # int64 [B + 1] (the request's)
    row_offsets: np.ndarray  # int64 [B + 1]: session b's rows (groups) are rows [row_offsets[b], row_offsets[b + 1])

    def __len__(self) -> int:
        return int(self.steps.shape[0])

    def keep_of(self, b: int) -> torch.Tensor:
        """Session ``b``'s keep mask, bool ``[G, n + k]``."""
        groups = int(self.row_offsets[b + 1] - self.row_offsets[b])
        seg = self.keep[self.slot_offsets[b]: self.slot_offsets[b + 1]]
        return torch.from_numpy(seg.reshape(groups, -1).copy())

    def evicted_of(self, b: int) -> list[torch.Tensor]:
        """Session ``b``'s evicted positions per group (int64, ascending)."""
        r0, r1 = int(self.row_offsets[b]), int(self.row_offsets[b + 1])
        off = self.evicted_offsets
        return [torch.from_numpy(self.evicted[off[r]: off[r + 1]].copy()) for r in range(r0, r1)]

    def session_result(self, b: int, session_id: str) -> pb.SessionResult:
        """Session ``b``'s answer as the per-session ``SessionResult`` (the same message Step returns)."""
        keep = self.keep_of(b)
        return pb.SessionResult(
            session_id=session_id, step=int(self.steps[b]),
            keep=pb.Tensor(dtype=pb.D_TYPE_BOOL, shape=list(keep.shape), data=keep.numpy().tobytes()),
            evicted=[pb.GroupEvictions(group=g, positions=pb.Tensor(dtype=pb.D_TYPE_INT64, shape=[e.numel()],
                                                                     data=e.numpy().astype("<i8").tobytes()))
                     for g, e in enumerate(self.evicted_of(b))],
            retained_count=int(self.retained_counts[b]), retained_checksum=int(self.retained_checksums[b]))

    def settle(self, ws: WorkerSession, b: int, new_positions: torch.Tensor | None = None) -> None:
        """Advance ``ws`` with session ``b``'s answer; with ``new_positions`` also track its retained
        positions (what a resync sends), like :meth:`WorkerSession.advance`."""
        if new_positions is not None:
            ws.track(self.keep_of(b), new_positions)
        ws.step = int(self.steps[b])
        ws.retained_count = int(self.retained_counts[b])
        ws.retained_checksum = int(self.retained_checksums[b])


def read_answer(resp: pb.StepBatchResponse, req: pb.StepBatchRequest, groups: list[int]) -> BatchAnswer:
    """Read ``resp`` against its request and the sessions' group counts (``groups[b]``).

    Raises :class:`WireError` naming the field when a buffer's length does not fit the request.
    """
    B = len(req.session_ids)
    if len(groups) != B:
        raise ValueError(f"{len(groups)} group counts for {B} sessions")
    slot_offsets = np.frombuffer(req.slot_offsets, dtype="<i8").astype(np.int64)
    rows = int(sum(groups))
    total = int(slot_offsets[-1]) if B else 0
    keep_bytes = resp.keep
    if len(keep_bytes) != (total + 7) // 8:
        raise WireError("keep", f"has {len(keep_bytes)} bytes, expected {(total + 7) // 8} for {total} slots")
    keep = np.unpackbits(np.frombuffer(keep_bytes, dtype=np.uint8), count=total, bitorder="little").view(bool)
    off = _column(resp, "evicted_offsets", rows + 1)
    evicted = np.frombuffer(resp.evicted, dtype="<i8").astype(np.int64)
    if off[0] != 0 or off[-1] != evicted.shape[0] or (np.diff(off) < 0).any():
        raise WireError("evicted_offsets", "not ascending from 0 to the length of evicted")
    return BatchAnswer(
        steps=_column(resp, "steps", B), retained_counts=_column(resp, "retained_counts", B).astype(np.int64),
        retained_checksums=_column(resp, "retained_checksums", B), keep=keep, evicted=evicted,
        evicted_offsets=off, slot_offsets=slot_offsets,
        row_offsets=np.concatenate([[0], np.cumsum(groups, dtype=np.int64)]))
