"""A batch of session steps in columnar form: what both Step forms become before validation.

``from_batch`` reads a ``StepBatchRequest`` (the columnar wire form) with a handful of numpy calls
per buffer and no copy of the payload; ``from_steps`` turns the per-session ``StepRequest`` form
into the same structure (one zero-copy view per message tensor). Only the wire-level structure
is checked here (byte lengths, dtypes, offsets); everything that depends on the sessions (order,
shapes against their configs, limits, position ranges) is checked once, for both forms, by
:meth:`StepColumns.check_layout` and :meth:`StepColumns.check_positions`, and the engine checks
the values (NaN, negative mass, edges outside the cache) per session on the device.

Errors that concern one session name it ``steps[<id>].<SessionStep field>``; errors about a whole
buffer of the batch form name the buffer.
"""

from __future__ import annotations

import hashlib
import struct
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import torch
from nexus_client.columnar import REQUEST_COLUMNS, TENSOR_FIELDS
from nexus_client.v1 import sidecar_pb2 as pb
from nexus_client.wire import CALL_KIND, POSITION_LIMIT, PRIORS, WireError, wire_array

from nexus_sidecar.engine import POLICIES, BatchInput, StepInput
from nexus_sidecar.server.errors import InvalidArgument
from nexus_sidecar.server.stores import validate_id, validate_ids

_FLOAT_WIRE = (pb.D_TYPE_FLOAT16, pb.D_TYPE_FLOAT32)
_INT_WIRE = (pb.D_TYPE_INT32, pb.D_TYPE_INT64)
_INTS = ("new_positions", "edge_index")
_SLOT_FIELDS = ("attn", "last", *PRIORS)
_EDGE_FIELDS = ("edge_index", "edge_weight")
REQUIRED = ("new_positions", "attn", "last", "edge_index", "edge_weight")
# Digest layout: (step, retained_count, retained_checksum, n), then per sent field (code, dtype, count).
_HEADER = struct.Struct("<QQQqB")
_FIELD = struct.Struct("<BBq")
_FIELD_CODES = {name: i for i, name in enumerate(TENSOR_FIELDS)}
_CALL_NAMES = {v: k for k, v in CALL_KIND.items()}
_KNOWN_CALLS = np.array(sorted(_CALL_NAMES), dtype=np.int64)


def _dtype_name(code: int) -> str:
    return pb.DType.Name(code) if code in pb.DType.values() else str(code)


def _allowed(name: str, code: int, where: str) -> None:
    allowed, what = (_INT_WIRE, "expected int32 or int64") if name in _INTS else (_FLOAT_WIRE,
                                                                                   "expected float16 or float32")
    if code not in allowed:
        raise InvalidArgument(where, f"dtype {_dtype_name(code)} not allowed; {what}")


@dataclass
class Column:
    """One tensor field of every session of a batch, as it came off the wire.

    Batch form: ``wire`` holds every session's values back to back (a view of the request's
    bytes) and ``parts`` is None. Per-session form: ``parts[b]`` is session b's values (None when
    the optional field was not sent) and ``shapes[b]`` its message's shape.
    """

    name: str
    offsets: np.ndarray  # int64 [B + 1]
    wire: np.ndarray | None = None
    wire_dtype: int = 0
    parts: list[np.ndarray | None] | None = None
    part_dtypes: list[int] | None = None
    shapes: list[tuple[int, ...] | None] | None = None

    @property
    def counts(self) -> np.ndarray:
        """Elements per session (int64 [B])."""
        return np.diff(self.offsets)

    def present(self, b: int) -> bool:
        """Whether session ``b`` sent this field."""
        return self.parts is None or self.parts[b] is not None

    def canonical(self, dtype: np.dtype, rows: Sequence[int]) -> np.ndarray | list[np.ndarray | None]:
        """The values of sessions ``rows`` as ``dtype`` (numpy, native order): the batch form converts
        the whole buffer once when every session is in ``rows``; otherwise one array per session."""
        if self.parts is None:
            assert self.wire is not None
            off = self.offsets
            if len(rows) == off.shape[0] - 1:  # every session (the steady state): one conversion
                return self.wire.astype(dtype)
            return [self.wire[off[b]: off[b + 1]].astype(dtype) for b in rows]
        return [None if (p := self.parts[b]) is None else p.astype(dtype) for b in rows]


def _tensors(values: np.ndarray | list[np.ndarray | None], counts: list[int], shapes: Sequence[tuple[int, ...]]
             ) -> list[torch.Tensor | None]:
    """Torch views of :meth:`Column.canonical`'s output, one per session, shaped ``shapes[j]``."""
    if isinstance(values, np.ndarray):
        pieces: Sequence[torch.Tensor | None] = torch.split(torch.from_numpy(values), counts)
    else:
        pieces = [None if v is None else torch.from_numpy(v) for v in values]
    return [None if t is None else t.view(shape) for t, shape in zip(pieces, shapes, strict=True)]


class LazyInputs:
    """The engine inputs of sessions ``rows`` of a batch: decoded to numpy on the event loop, turned
    into torch tensors on the engine thread on first use (:meth:`get`).

    Why not on the event loop: every torch call there releases and re-takes the GIL, and while the
    engine thread runs a batch each re-take waits behind one of its ops (measured: ~28 us per
    ``Tensor.view`` on the event loop during an engine call, vs ~1 us on the engine thread).
    """

    def __init__(self, cols: StepColumns, rows: Sequence[int], groups: Sequence[int], ints: dict[str, np.ndarray]
                 ) -> None:
        # Only what both forms need is read here (the event loop); the per-session structures of
        # get() are built on the engine thread when a batch does not go columnar.
        self._all, self._rows, self._ints = cols, list(rows), ints
        self._idx = np.asarray(rows, dtype=np.int64)
        self._groups, self._k = list(groups), cols.k[self._idx].tolist()
        self._calls = [_CALL_NAMES[c] for c in cols.calls[self._idx].tolist()]
        self._built: list[StepInput] | None = None
        self.size = len(rows)
        # What batch() needs: the columnar form applies to the batch wire form only.
        self._cols = cols if all(col.parts is None for col in cols.columns.values()) else None

    def _per_session(self) -> list[StepInput]:
        """Every session's StepInput (torch views of the columns, floats converted to float32)."""
        cols, rows, idx, groups, k, ints = self._all, self._rows, self._idx, self._groups, self._k, self._ints
        every = len(rows) == len(cols)
        edges = cols.columns["edge_index"].counts[idx].tolist()
        shapes = {"slots": [(g, -1) for g in groups],
                  "edges": [(g, kk, e // max(1, g * kk)) for g, kk, e in zip(groups, k, edges, strict=True)],
                  "tokens": [(kk,) for kk in k]}
        f32 = np.dtype(np.float32)
        t = {}
        for name, col in cols.columns.items():
            kind = "tokens" if name == "new_positions" else "edges" if name in _EDGE_FIELDS else "slots"
            if name in _INTS:
                off = col.offsets
                vals = ints[name] if every else [ints[name][off[b]: off[b + 1]] for b in rows]
            else:
                vals = col.canonical(f32, rows)
            t[name] = _tensors(vals, col.counts[idx].tolist(), shapes[kind])
        priors = [name for name in PRIORS if name in t]
        return [StepInput(t["new_positions"][i], t["attn"][i], t["last"][i],  # type: ignore[arg-type]
                          t["edge_index"][i], t["edge_weight"][i],  # type: ignore[arg-type]
                          **{name: t[name][i] for name in priors if t[name][i] is not None}, call=self._calls[i])
                for i in range(self.size)]

    def batch(self, js: Sequence[int]) -> BatchInput | None:
        """Sessions ``rows[js]`` as one columnar engine input (engine thread), or None unless they
        came in the batch wire form with one call kind, the same k and the same slot count (the
        steady state of a decode loop; the rest go one StepInput per session)."""
        cols = self._cols
        if cols is None or not js:
            return None
        k, calls, groups = self._k, self._calls, self._groups
        K, call = k[js[0]], calls[js[0]]
        if any(k[j] != K or calls[j] != call for j in js):
            return None
        g = np.array([groups[j] for j in js], dtype=np.int64)
        b = self._idx[np.asarray(js, dtype=np.int64)]
        slots = cols.columns["attn"].counts[b]
        W = int(slots[0] // max(1, g[0]))
        edges = cols.columns["edge_index"].counts[b]
        F = int(edges[0] // max(1, g[0] * K))
        if (slots != g * W).any() or (edges != g * K * F).any():
            return None
        whole = len(js) == len(cols) and bool((b == np.arange(len(cols))).all())
        rows = b.tolist()

        def floats(col: Column) -> torch.Tensor:
            # torch converts float16 with the CPU's vector instructions (~4x numpy's astype here).
            assert col.wire is not None
            off = col.offsets
            # A copy either way: the request's bytes are immutable, and torch has no read-only tensors.
            v = col.wire.copy() if whole else np.concatenate([col.wire[off[i]: off[i + 1]] for i in rows])
            return torch.from_numpy(v).float()

        def ints(name: str) -> np.ndarray:
            off = cols.columns[name].offsets
            flat = self._ints[name]
            return flat if whole else np.concatenate([flat[off[i]: off[i + 1]] for i in rows])

        R = int(g.sum())
        return BatchInput(torch.from_numpy(ints("new_positions")).view(len(js), K),
                          floats(cols.columns["attn"]).view(R, W), floats(cols.columns["last"]).view(R, W),
                          torch.from_numpy(ints("edge_index")).view(R, K, F),
                          floats(cols.columns["edge_weight"]).view(R, K, F), g.tolist(),
                          {name: floats(cols.columns[name]).view(R, W) for name in PRIORS if name in cols.columns},
                          call)

    def get(self, j: int) -> StepInput:
        """Session ``rows[j]``'s input (engine thread)."""
        if self._built is None:
            self._built = self._per_session()
        return self._built[j]


class StepDigest:
    """:meth:`StepColumns.digest` of one applied step, computed when first needed: when a retry of
    the step must be compared with it, or a checkpoint stores it. Most steps are neither retried nor
    checkpointed, so the step path does not hash every payload (it was ~30 % of the event loop's
    CPU at B = 64); until then the request's arrays stay referenced (about one step payload per
    hot session, well under its pool rows). Thread-safe: the arrays are never written."""

    __slots__ = ("_b", "_cols", "_ints", "_value")

    def __init__(self, value: bytes = b"", cols: StepColumns | None = None, ints: dict[str, np.ndarray] | None = None,
                 b: int = 0) -> None:
        self._value: bytes | None = value if cols is None else None
        self._cols, self._ints, self._b = cols, ints, b

    def __bytes__(self) -> bytes:
        if self._value is None:
            assert self._cols is not None and self._ints is not None
            self._value = self._cols.digest(self._b, self._ints)
            self._cols = self._ints = None
        return self._value


@dataclass(frozen=True)
class LazyInput:
    """One session's place in a :class:`LazyInputs` (what the micro-batcher queues)."""

    parent: LazyInputs
    j: int

    def build(self) -> StepInput:
        """The engine input (call on the engine thread)."""
        return self.parent.get(self.j)


@dataclass
class StepColumns:
    """B session steps: per-session scalars and one :class:`Column` per tensor field."""

    ids: list[str]
    steps: np.ndarray  # uint64 [B]
    retained_counts: np.ndarray  # int64 [B]
    retained_checksums: np.ndarray  # uint64 [B]
    n: np.ndarray  # int64 [B]: retained slots per group the worker laid attn out for
    columns: dict[str, Column]  # by SessionStep field name (priors only when some session sent them)
    calls: np.ndarray  # uint8 [B]: CallKind values

    def __len__(self) -> int:
        return len(self.ids)

    @property
    def k(self) -> np.ndarray:
        """New tokens per session (int64 [B])."""
        return self.columns["new_positions"].counts

    def int_fields(self) -> dict[str, np.ndarray]:
        """new_positions and edge_index of every session as int64 (one conversion per buffer)."""
        out = {}
        for name in _INTS:
            col = self.columns[name]
            out[name] = col.wire.astype(np.int64) if col.parts is None else \
                np.concatenate([p.astype(np.int64) for p in col.parts])  # type: ignore[union-attr]
        return out

    def digest(self, b: int, ints: dict[str, np.ndarray]) -> bytes:
        """Identity of session ``b``'s step payload (idempotent retries compare it).

        Positions are hashed as int64 (``ints``, from :meth:`int_fields`): their wire width is the
        worker's choice and depends on the whole batch, so a retry in another batch may differ in it.
        The floats are hashed as sent, with their dtype (fp16 and fp32 are different payloads).
        """
        h = hashlib.sha1(usedforsecurity=False)  # identity, not security; ~2.5x blake2b's speed here
        h.update(self.ids[b].encode())
        h.update(_HEADER.pack(int(self.steps[b]), int(self.retained_counts[b]), int(self.retained_checksums[b]),
                              int(self.n[b]), int(self.calls[b])))
        for name, col in self.columns.items():
            off = col.offsets
            if name in ints:
                seg = ints[name][off[b]: off[b + 1]]
                h.update(_FIELD.pack(_FIELD_CODES[name], 0, seg.shape[0]))
                h.update(seg.data)
            elif col.parts is None:
                seg = col.wire[off[b]: off[b + 1]]  # type: ignore[index]
                h.update(_FIELD.pack(_FIELD_CODES[name], col.wire_dtype, seg.shape[0]))
                h.update(seg.data)
            elif (part := col.parts[b]) is not None:
                h.update(_FIELD.pack(_FIELD_CODES[name], col.part_dtypes[b], part.shape[0]))  # type: ignore[index]
                h.update(part.data)
        return h.digest()

    def deferred_digest(self, b: int, ints: dict[str, np.ndarray]) -> StepDigest:
        """:meth:`digest` of session ``b``, computed when first asked for."""
        return StepDigest(cols=self, ints=ints, b=b)

    # -- the one validation path ------------------------------------------------------------------
    def check_layout(self, rows: Sequence[int], groups: np.ndarray, fanouts: np.ndarray, retained: np.ndarray,
                     policies: Sequence[str]) -> None:
        """Shapes of sessions ``rows`` against their sessions: ``groups``/``fanouts`` from their
        configs, ``retained`` the widest group's retained count, ``policies`` their policy names (a
        policy may score by a prior the step must then carry). Vectorised over the batch; raises
        InvalidArgument for the first bad session."""
        if not len(rows):
            return
        idx = np.asarray(rows, dtype=np.int64)
        k = self.k[idx]
        G, F, n = groups.astype(np.int64), fanouts.astype(np.int64), retained.astype(np.int64)
        width = n + k
        bad = np.flatnonzero(k < 1)
        if bad.size:
            self._fail(idx[bad[0]], "new_positions", "a call must carry at least one new token")
        unknown = np.flatnonzero(~np.isin(self.calls[idx], _KNOWN_CALLS))
        if unknown.size:
            b = int(idx[unknown[0]])
            self._fail(b, "call", f"unknown call kind {int(self.calls[b])}; known: {sorted(_CALL_NAMES)}")
        expect = {"new_positions": k, **{f: G * width for f in _SLOT_FIELDS}, **{f: G * k * F for f in _EDGE_FIELDS}}
        # The per-session form knows each message's shape: compare it whole (a transposed [n + k, G]
        # has the right element count). The batch form has the counts, and the worker's n.
        for name, col in self.columns.items():
            counts = col.counts[idx]
            if col.shapes is not None:  # the per-session form (its simple clients pay this loop)
                for j, b in enumerate(idx.tolist()):
                    got = col.shapes[b]
                    want = _shape(name, int(G[j]), int(n[j]), int(k[j]), int(F[j]))
                    if got is not None and got != want:
                        self._fail(b, name, _shape_reason(name, got, want, int(n[j]), int(k[j])))
            wrong = np.flatnonzero(counts != expect[name])
            if name in PRIORS and wrong.size:
                wrong = np.array([j for j in wrong.tolist() if col.present(int(idx[j]))], dtype=np.int64)
            if wrong.size:
                j = int(wrong[0])
                b = int(idx[j])
                want = _shape(name, int(G[j]), int(n[j]), int(k[j]), int(F[j]))
                self._fail(b, name, f"{int(counts[j])} values, expected shape {want} = {int(expect[name][j])} "
                                    f"values{_what(name, int(n[j]), int(k[j]))}")
        wrong_n = np.flatnonzero(self.n[idx] != n)
        if wrong_n.size:
            j = int(wrong_n[0])
            self._fail(int(idx[j]), "attn", f"laid out for {int(self.n[idx[j]])} retained slots per group, the "
                                            f"session retains {int(n[j])} (expected shape "
                                            f"{(int(G[j]), int(width[j]))})")
        if not any(POLICIES[p].requires for p in set(policies)):
            return
        for j, b in enumerate(idx.tolist()):
            for name in POLICIES[policies[j]].requires:  # empty for all but the prior-scored baselines
                col = self.columns.get(name)
                if col is None or not col.present(b):
                    self._fail(b, name, f"policy {policies[j]!r} scores by this prior and the step does not carry it "
                                        "(float [G, n + k], see nexus_client.hf.priors.cache_priors)")

    def check_positions(self, rows: Sequence[int], ints: dict[str, np.ndarray]) -> None:
        """Positions (``ints``, from :meth:`int_fields`) of sessions ``rows`` are exact int64 in
        [0, 2^62) (edges: or -1 = none)."""
        wanted = set(rows)
        for name, low in (("new_positions", 0), ("edge_index", -1)):
            flat = ints[name]
            if not flat.size:
                continue
            bad = np.flatnonzero((flat < low) | (flat >= POSITION_LIMIT))
            if not bad.size:
                continue
            sessions = np.searchsorted(self.columns[name].offsets, bad, side="right") - 1
            hits = [(int(s), int(i)) for s, i in zip(sessions, bad, strict=True) if int(s) in wanted]
            if hits:
                b, i = hits[0]
                value = int(flat[i])
                self._fail(b, name, f"position {value} outside [{low}, 2^62)" if low == 0 else
                           f"position {value} outside [0, 2^62) (or -1 for no edge)")

    def inputs(self, rows: Sequence[int], groups: Sequence[int], ints: dict[str, np.ndarray]) -> list[LazyInput]:
        """Engine inputs of sessions ``rows`` (float32 / int64; the priors each session sent), built
        on the engine thread when first used."""
        lazy = LazyInputs(self, rows, groups, ints)
        return [LazyInput(lazy, j) for j in range(len(rows))]

    def _fail(self, b: int, name: str, reason: str) -> None:
        raise InvalidArgument(f"steps[{self.ids[b]}].{name}", reason)


def _shape(name: str, G: int, n: int, k: int, F: int) -> tuple[int, ...]:
    if name == "new_positions":
        return (k,)
    if name in _EDGE_FIELDS:
        return (G, k, F)
    return (G, n + k)


def _what(name: str, n: int, k: int) -> str:
    if name == "new_positions":
        return ""
    if name in _EDGE_FIELDS:
        return " (groups, new tokens, fanout)"
    return f" (groups, retained {n} + new {k})"


def _shape_reason(name: str, got: tuple[int, ...], want: tuple[int, ...], n: int, k: int) -> str:
    if name == "new_positions":
        return f"must be a 1-D integer tensor of the k new positions, got shape {got}"
    return f"shape {got}, expected {want}{_what(name, n, k)}"


# -- the two wire forms --------------------------------------------------------------------------
def from_steps(steps: Sequence[pb.SessionStep]) -> StepColumns:
    """The per-session form as columns: one zero-copy view per message tensor, no payload copied."""
    if not steps:
        raise InvalidArgument("steps", "is empty")
    ids = [validate_id("session_id", s.session_id) for s in steps]
    names = REQUIRED + tuple(p for p in PRIORS if any(s.HasField(p) for s in steps))
    parts: dict[str, list[np.ndarray | None]] = {name: [] for name in names}
    dtypes: dict[str, list[int]] = {name: [] for name in names}
    shapes: dict[str, list[tuple[int, ...] | None]] = {name: [] for name in names}
    n = np.zeros(len(steps), dtype=np.int64)
    for b, (sid, st) in enumerate(zip(ids, steps, strict=True)):
        for name in names:
            where = f"steps[{sid}].{name}"
            if not st.HasField(name):
                if name in REQUIRED:
                    raise InvalidArgument(where, "is required")
                parts[name].append(None)
                dtypes[name].append(0)
                shapes[name].append(None)
                continue
            msg = getattr(st, name)
            _allowed(name, msg.dtype, where)
            try:
                arr = wire_array(msg, field=where)
            except WireError as exc:
                raise InvalidArgument(exc.field, exc.reason) from None
            parts[name].append(arr)
            dtypes[name].append(msg.dtype)
            shapes[name].append(tuple(msg.shape))
        attn_shape, k = shapes["attn"][b], parts["new_positions"][b].shape[0]  # type: ignore[union-attr]
        # n as the worker laid attn out (the shape check against the session names any mismatch).
        n[b] = attn_shape[1] - k if attn_shape is not None and len(attn_shape) == 2 else -1
    columns = {}
    for name in names:
        counts = [0 if p is None else p.shape[0] for p in parts[name]]
        columns[name] = Column(name, np.concatenate([[0], np.cumsum(counts, dtype=np.int64)]), parts=parts[name],
                               part_dtypes=dtypes[name], shapes=shapes[name])
    return StepColumns(
        ids, np.array([s.step for s in steps], dtype=np.uint64),
        np.array([s.retained_count for s in steps], dtype=np.int64),
        np.array([s.retained_checksum for s in steps], dtype=np.uint64), n, columns,
        # An unknown enum number survives parsing as its int; the layout check names it.
        np.array([min(s.call, 255) for s in steps], dtype=np.uint8))


def _raw(req: pb.StepBatchRequest, name: str, count: int) -> np.ndarray:
    dtype = REQUEST_COLUMNS[name]
    data = getattr(req, name)
    if len(data) != count * dtype.itemsize:
        raise InvalidArgument(name, f"has {len(data)} bytes, expected {count} x {dtype.itemsize} = "
                                    f"{count * dtype.itemsize} ({dtype.itemsize}-byte values, "
                                    f"{'B + 1' if name.endswith('offsets') else 'B'} with B = {len(req.session_ids)} "
                                    "sessions)")
    return np.frombuffer(data, dtype=dtype).astype(dtype.newbyteorder("="))


def from_batch(req: pb.StepBatchRequest) -> StepColumns:
    """The columnar form: each buffer checked and viewed with a few numpy calls (no payload copied)."""
    ids = list(req.session_ids)
    B = len(ids)
    if not B:
        raise InvalidArgument("session_ids", "is empty")
    ids = validate_ids("session_id", ids)
    offsets = {name: _raw(req, name, B + 1) for name in ("token_offsets", "slot_offsets", "edge_offsets")}
    columns: dict[str, Column] = {}
    for name, off_name in TENSOR_FIELDS.items():
        if not req.HasField(name):
            if name in REQUIRED:
                raise InvalidArgument(name, "is required")
            continue
        msg = getattr(req, name)
        _allowed(name, msg.dtype, name)
        if len(msg.shape) != 1:
            raise InvalidArgument(name, f"must be 1-D (every session's values concatenated), got shape "
                                        f"{list(msg.shape)[:8]}")
        try:
            arr = wire_array(msg, field=name)
        except WireError as exc:
            raise InvalidArgument(exc.field, exc.reason) from None
        off = offsets[off_name]
        if off[0] != 0:
            raise InvalidArgument(off_name, f"must start at 0, starts at {int(off[0])}")
        down = np.flatnonzero(np.diff(off) < 0)
        if down.size:
            b = int(down[0])
            raise InvalidArgument(off_name, f"must not decrease: offset {b + 1} ({int(off[b + 1])}) < offset {b} "
                                            f"({int(off[b])}), at steps[{ids[b]}]")
        if off[-1] != arr.shape[0]:
            raise InvalidArgument(off_name, f"ends at {int(off[-1])}, but {name} has {arr.shape[0]} values")
        columns[name] = Column(name, off, wire=arr, wire_dtype=msg.dtype)
    n = _raw(req, "retained_slots", B).astype(np.int64)
    calls = _raw(req, "calls", B) if req.calls else np.zeros(B, dtype=np.uint8)
    return StepColumns(ids, _raw(req, "steps", B), _raw(req, "retained_counts", B).astype(np.int64),
                       _raw(req, "retained_checksums", B), n, columns, calls)
