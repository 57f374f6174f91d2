"""A session's state outside the pool, and its versioned byte layout.

Layout v2 (all little-endian)::

    magic  b"NXSS"      4 bytes
    version u16 = 2, flags u16 = 0
    config_len u32, config JSON (utf-8, sorted keys)
    calls u64, tokens_seen u64, tokens_evicted u64
    groups u32, fanout u32
    per group: count u32, pos i64[count], age i32[count], memory f32[count],
               edge_pos i64[count*F], edge_w f32[count*F]
    crc32 u32 of everything before it

v1 is the same with edge_pos i32 (positions above 2^31 - 1 did not fit); it is still read.

Redis stores this blob as is; the CRC turns a truncated or bit-flipped value into a precise
:class:`StateError` instead of a wrong eviction.

Two more things live here, for checkpoints off the engine thread:

- :class:`RowCapture`: a plain host copy of a session's pool rows (the engine thread only copies;
  :meth:`RowCapture.state` does the masking and edge mapping on whichever thread calls it).
- :class:`StateDelta` (layout ``NXSD``): what changed since a base state -- the slots evicted since
  (their positions), the slots appended since (position, age, memory, edges) and, when the policy
  changed it, the memory of every retained slot. :meth:`StateDelta.apply` turns the base into the
  current state bit-exactly. Nothing else changes in between: a retained slot's position never
  changes, its age grows by the calls in between, and its edges only lose the targets that were
  evicted (new positions always come after every retained one, so no edge of an old slot can point
  to a new slot). The EMA memory of Nexus (and H2O's accumulator) changes on every live slot at
  every call, so a delta carries 4 bytes per retained slot for them; the other policies never
  change a slot's memory after it entered (0), and their deltas carry only the appended slots'.
"""

from __future__ import annotations

import struct
import zlib
from dataclasses import dataclass, field

import numpy as np
import torch

from nexus_sidecar.engine.config import PolicyConfig
from nexus_sidecar.engine.errors import EngineError, StateError

MAGIC = b"NXSS"
VERSION = 2
_EDGE_DTYPE = {1: np.int32, 2: np.int64}  # edge target positions per layout version
_HEAD = struct.Struct("<4sHHI")
_COUNTERS = struct.Struct("<QQQII")
DELTA_MAGIC = b"NXSD"
DELTA_VERSION = 1
_DELTA_HEAD = struct.Struct("<4sHHQQQQII")  # magic, version, flags, base calls, calls, seen, evicted, groups, fanout
_DELTA_GROUP = struct.Struct("<IIII")  # evicted, appended, memory mode, memory values
_MEMORY_NEW, _MEMORY_ALL = 0, 1  # memory of the appended slots only / of every retained slot


@dataclass
class GroupState:
    """Retained slots of one layer group, ascending by position."""

    pos: torch.Tensor  # int64 [n]
    age: torch.Tensor  # int32 [n]
    memory: torch.Tensor  # float32 [n]
    edge_pos: torch.Tensor  # int64 [n, F] target positions, -1 = none
    edge_w: torch.Tensor  # float32 [n, F]


@dataclass
class SessionState:
    """Everything needed to resume a session elsewhere (another process, after a restart)."""

    config: PolicyConfig
    calls: int = 0
    tokens_seen: int = 0
    tokens_evicted: int = 0
    groups: list[GroupState] = field(default_factory=list)

    def to_bytes(self) -> bytes:
        """Serialize to the versioned layout (deterministic: equal states give equal bytes)."""
        cfg = self.config.to_json().encode()
        parts = [_HEAD.pack(MAGIC, VERSION, 0, len(cfg)), cfg,
                 _COUNTERS.pack(self.calls, self.tokens_seen, self.tokens_evicted, len(self.groups),
                                self.config.fanout)]
        for g in self.groups:
            parts.append(struct.pack("<I", int(g.pos.numel())))
            parts.append(_np(g.pos, np.int64))
            parts.append(_np(g.age, np.int32))
            parts.append(_np(g.memory, np.float32))
            parts.append(_np(g.edge_pos, np.int64))
            parts.append(_np(g.edge_w, np.float32))
        body = b"".join(parts)
        return body + struct.pack("<I", zlib.crc32(body))

    @classmethod
    def from_bytes(cls, blob: bytes) -> SessionState:
        """Parse a blob; raises :class:`StateError` on bad magic, version, size or checksum."""
        try:
            return cls._parse(blob)
        except struct.error as exc:
            raise StateError("state", f"blob ends early or is malformed: {exc}") from exc

    @classmethod
    def _parse(cls, blob: bytes) -> SessionState:
        if len(blob) < _HEAD.size + 4:
            raise StateError("state", f"blob of {len(blob)} bytes is too short")
        body, (crc,) = blob[:-4], struct.unpack("<I", blob[-4:])
        if zlib.crc32(body) != crc:
            raise StateError("state", "checksum mismatch (corrupt or truncated blob)")
        magic, version, _flags, cfg_len = _HEAD.unpack_from(body, 0)
        if magic != MAGIC:
            raise StateError("state", f"bad magic {magic!r}, expected {MAGIC!r}")
        if version not in _EDGE_DTYPE:
            raise StateError("state", f"unsupported layout version {version} (this build reads 1..{VERSION})")
        edge_dtype = _EDGE_DTYPE[version]
        off = _HEAD.size
        import json

        try:
            config = PolicyConfig.from_stored(json.loads(body[off : off + cfg_len]))
        except (ValueError, EngineError) as exc:
            raise StateError("state.config", str(exc)) from exc
        off += cfg_len
        calls, seen, evicted, n_groups, fan = _COUNTERS.unpack_from(body, off)
        off += _COUNTERS.size
        groups = []
        for _ in range(n_groups):
            (n,) = struct.unpack_from("<I", body, off)
            off += 4
            arrays = []
            for dtype, size in ((np.int64, n), (np.int32, n), (np.float32, n), (edge_dtype, n * fan),
                                (np.float32, n * fan)):
                nbytes = size * np.dtype(dtype).itemsize
                if off + nbytes > len(body):
                    raise StateError("state", "blob ends inside a group's arrays")
                arrays.append(torch.from_numpy(np.frombuffer(body, dtype=dtype, count=size, offset=off).copy()))
                off += nbytes
            pos, age, mem, epos, ew = arrays
            epos = epos.to(torch.int64)
            groups.append(GroupState(pos, age, mem, epos.reshape(n, fan), ew.reshape(n, fan)))
        if off != len(body):
            raise StateError("state", f"{len(body) - off} trailing bytes after the last group")
        return cls(config=config, calls=calls, tokens_seen=seen, tokens_evicted=evicted, groups=groups)

    def equals(self, other: SessionState) -> bool:
        """Bit-exact equality (used by round-trip tests)."""
        return self.to_bytes() == other.to_bytes()


@dataclass
class GroupCapture:
    """One group's arena columns ``[0, used)`` as copied from the pool (dead columns included)."""

    pos: np.ndarray  # int64 [used]
    alive: np.ndarray  # bool [used]
    birth: np.ndarray  # int64 [used], the call at which the slot entered
    memory: np.ndarray  # float32 [used]
    edge_cols: np.ndarray | None  # int64 [m]: the columns whose edges were copied (None: every column)
    edge_idx: np.ndarray  # int64 [m or used, F] arena column of each edge's target
    edge_w: np.ndarray  # float32 [m or used, F]


@dataclass
class RowCapture:
    """A host copy of a session's rows, taken on the engine thread between two calls.

    With ``since`` set, only the edges of live slots that entered at or after call ``since`` were
    copied (enough for a :class:`StateDelta` against a base taken at that call, not for a full
    state): the copy the engine thread makes is then ~21 bytes per slot instead of ~117 at F = 8.
    """

    config: PolicyConfig
    calls: int
    tokens_seen: int
    tokens_evicted: int
    groups: list[GroupCapture]
    since: int | None = None

    def state(self) -> SessionState:
        """The full :class:`SessionState` (equal to ``Engine.snapshot`` at the moment of the copy)."""
        if self.since is not None:
            raise StateError("capture", "a delta capture holds the new slots' edges only: take a full one")
        groups = []
        for g in self.groups:
            a = g.alive
            epos, ew = _edge_positions(g, g.edge_idx, g.edge_w)
            groups.append(GroupState(
                pos=torch.from_numpy(g.pos[a]), age=torch.from_numpy((self.calls - g.birth[a]).astype(np.int32)),
                memory=torch.from_numpy(g.memory[a]), edge_pos=torch.from_numpy(epos[a]),
                edge_w=torch.from_numpy(ew[a])))
        return SessionState(self.config, self.calls, self.tokens_seen, self.tokens_evicted, groups)


def _edge_positions(g: GroupCapture, eidx: np.ndarray, ew: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Edges as target positions (-1 and weight 0 where the target is dead or the weight is 0)."""
    n = g.pos.shape[0]
    if n == 0 or eidx.size == 0:
        return np.full(eidx.shape, -1, dtype=np.int64), np.zeros(eidx.shape, dtype=np.float32)
    cols = np.clip(eidx, 0, n - 1)
    live = g.alive[cols] & (ew > 0)
    return np.where(live, g.pos[cols], -1).astype(np.int64), np.where(live, ew, 0.0).astype(np.float32)


def capture_rows(pool: object, rows: list[int], used: list[int], config: PolicyConfig, calls: int,
                 tokens_seen: int, tokens_evicted: int, since: int | None = None) -> RowCapture:
    """Copy a session's rows out of ``pool`` (a ``SessionPool``) to the host: plain copies only.

    Runs on the engine thread (the next call rewrites the pool in place), so it does no more than
    slice and copy; everything else happens in :meth:`RowCapture.state` or :meth:`StateDelta.diff`.
    """
    slot, edge = pool.slot, pool.edge  # type: ignore[attr-defined]
    r = torch.tensor(rows, dtype=torch.int64, device=slot["pos"].device)
    w = max(used, default=0)

    def host(x: torch.Tensor) -> np.ndarray:
        # Indexing with a tensor copies; .cpu() is then a no-op on the CPU and the device copy on CUDA.
        return x[r, :w].cpu().numpy()

    pos, alive, birth, mem = host(slot["pos"]), host(slot["alive"]), host(slot["birth"]), host(slot["memory"])
    groups = []
    if since is None:
        eidx, ew = host(edge["edge_idx"]), host(edge["edge_w"])
    for i, u in enumerate(used):
        if since is None:
            groups.append(GroupCapture(pos[i, :u], alive[i, :u], birth[i, :u], mem[i, :u], None, eidx[i, :u],
                                       ew[i, :u]))
            continue
        cols = np.flatnonzero(alive[i, :u] & (birth[i, :u] >= since))
        c = torch.from_numpy(cols).to(slot["pos"].device)
        eidx_new, ew_new = edge["edge_idx"][rows[i], c].cpu().numpy(), edge["edge_w"][rows[i], c].cpu().numpy()
        groups.append(GroupCapture(pos[i, :u], alive[i, :u], birth[i, :u], mem[i, :u], cols, eidx_new, ew_new))
    return RowCapture(config, calls, tokens_seen, tokens_evicted, groups, since)


@dataclass
class Anchor:
    """What a writer keeps of the base state a delta is taken against: positions and memory."""

    calls: int
    pos: list[np.ndarray]  # int64 per group, ascending
    memory: list[np.ndarray]  # float32 per group

    @classmethod
    def of(cls, state: SessionState) -> Anchor:
        """The anchor of a full state."""
        return cls(state.calls, [g.pos.numpy().astype(np.int64, copy=False) for g in state.groups],
                   [g.memory.numpy().astype(np.float32, copy=False) for g in state.groups])


@dataclass
class GroupDelta:
    """One group's changes since the base."""

    evicted: np.ndarray  # int64 positions of base slots gone since
    new_pos: np.ndarray  # int64 [n]
    new_age: np.ndarray  # int32 [n]
    new_edge_pos: np.ndarray  # int64 [n, F]
    new_edge_w: np.ndarray  # float32 [n, F]
    memory: np.ndarray  # float32: [n] (mode new) or [survivors + n] (mode all)
    memory_mode: int


@dataclass
class StateDelta:
    """A session's state as changes against a base state (see the module docstring)."""

    base_calls: int
    calls: int
    tokens_seen: int
    tokens_evicted: int
    fanout: int
    groups: list[GroupDelta]

    @classmethod
    def diff(cls, anchor: Anchor, cap: RowCapture) -> StateDelta | None:
        """The delta from ``anchor`` to ``cap`` (a capture with ``since == anchor.calls``), or None
        when the two do not fit together (then a full state must be written)."""
        if cap.since != anchor.calls or len(cap.groups) != len(anchor.pos) or cap.calls < anchor.calls:
            return None
        F = cap.config.fanout
        out = []
        for g, base_pos, base_mem in zip(cap.groups, anchor.pos, anchor.memory, strict=True):
            a = g.alive
            pos, birth, mem = g.pos[a], g.birth[a], g.memory[a]
            old = birth < anchor.calls
            surv_pos = pos[old]
            new_pos = pos[~old]
            if surv_pos.size and new_pos.size and new_pos[0] <= surv_pos[-1]:
                return None  # an appended slot before a retained one: not a state a delta describes
            if new_pos.size != (g.edge_cols.size if g.edge_cols is not None else -1):
                return None
            at = np.searchsorted(base_pos, surv_pos)
            if surv_pos.size and (at[-1] >= base_pos.size or not np.array_equal(base_pos[at], surv_pos)):
                return None  # a slot that is old but not in the base: the base is not this session's
            keep = np.zeros(base_pos.size, dtype=bool)
            keep[at] = True
            evicted = base_pos[~keep]
            epos, ew = _edge_positions(g, g.edge_idx, g.edge_w)
            same = np.array_equal(mem[old].view(np.uint32), base_mem[at].view(np.uint32))
            out.append(GroupDelta(
                evicted=evicted.astype(np.int64), new_pos=new_pos.astype(np.int64),
                new_age=(cap.calls - birth[~old]).astype(np.int32), new_edge_pos=epos.reshape(-1, F),
                new_edge_w=ew.reshape(-1, F), memory=(mem[~old] if same else mem).astype(np.float32),
                memory_mode=_MEMORY_NEW if same else _MEMORY_ALL))
        return cls(anchor.calls, cap.calls, cap.tokens_seen, cap.tokens_evicted, F, out)

    def apply(self, base: SessionState) -> SessionState:
        """The current state: ``base`` with this delta applied. Raises :class:`StateError` when the
        delta was not taken against ``base`` (calls, groups, fan-out or an evicted slot disagree)."""
        if base.calls != self.base_calls:
            raise StateError("delta.base_calls", f"taken against call {self.base_calls}, the base is at {base.calls}")
        if len(base.groups) != len(self.groups) or base.config.fanout != self.fanout:
            raise StateError("delta.groups", f"{len(self.groups)} groups x fan-out {self.fanout}, the base has "
                             f"{len(base.groups)} x {base.config.fanout}")
        shift = self.calls - self.base_calls
        groups = []
        for i, (bg, d) in enumerate(zip(base.groups, self.groups, strict=True)):
            bpos = bg.pos.numpy()
            at = np.searchsorted(bpos, d.evicted)
            if d.evicted.size and (at[-1] >= bpos.size or not np.array_equal(bpos[at], d.evicted)):
                raise StateError(f"delta.groups[{i}].evicted", "names a position the base does not hold")
            keep = np.ones(bpos.size, dtype=bool)
            keep[at] = False
            surv = bpos[keep]
            if surv.size and d.new_pos.size and d.new_pos[0] <= surv[-1]:
                raise StateError(f"delta.groups[{i}].new_pos", "must come after every retained position")
            epos, ew = bg.edge_pos.numpy()[keep], bg.edge_w.numpy()[keep]
            gone = np.isin(epos, d.evicted)  # edges of a retained slot lose only their evicted targets
            epos, ew = np.where(gone, -1, epos), np.where(gone, np.float32(0.0), ew)
            n_all = surv.size + d.new_pos.size
            if d.memory_mode == _MEMORY_ALL:
                if d.memory.size != n_all:
                    raise StateError(f"delta.groups[{i}].memory", f"{d.memory.size} values for {n_all} slots")
                memory = d.memory
            else:
                memory = np.concatenate([bg.memory.numpy()[keep], d.memory])
            groups.append(GroupState(
                pos=torch.from_numpy(np.concatenate([surv, d.new_pos]).astype(np.int64)),
                age=torch.from_numpy(np.concatenate([bg.age.numpy()[keep] + np.int32(shift), d.new_age])
                                     .astype(np.int32)),
                memory=torch.from_numpy(memory.astype(np.float32)),
                edge_pos=torch.from_numpy(np.concatenate([epos, d.new_edge_pos]).astype(np.int64)
                                          .reshape(n_all, self.fanout)),
                edge_w=torch.from_numpy(np.concatenate([ew, d.new_edge_w]).astype(np.float32)
                                        .reshape(n_all, self.fanout))))
        return SessionState(base.config, self.calls, self.tokens_seen, self.tokens_evicted, groups)

    def to_bytes(self) -> bytes:
        """Serialize (layout ``NXSD`` v1, little-endian, CRC32 at the end)."""
        parts = [_DELTA_HEAD.pack(DELTA_MAGIC, DELTA_VERSION, 0, self.base_calls, self.calls, self.tokens_seen,
                                  self.tokens_evicted, len(self.groups), self.fanout)]
        for d in self.groups:
            parts.append(_DELTA_GROUP.pack(d.evicted.size, d.new_pos.size, d.memory_mode, d.memory.size))
            for arr, dtype in ((d.evicted, "<i8"), (d.new_pos, "<i8"), (d.new_age, "<i4"), (d.new_edge_pos, "<i8"),
                               (d.new_edge_w, "<f4"), (d.memory, "<f4")):
                parts.append(np.ascontiguousarray(arr, dtype=dtype).tobytes())
        body = b"".join(parts)
        return body + struct.pack("<I", zlib.crc32(body))

    @classmethod
    def from_bytes(cls, blob: bytes) -> StateDelta:
        """Parse; raises :class:`StateError` on bad magic, version, size or checksum."""
        if len(blob) < _DELTA_HEAD.size + 4:
            raise StateError("delta", f"blob of {len(blob)} bytes is too short")
        body, (crc,) = blob[:-4], struct.unpack("<I", blob[-4:])
        if zlib.crc32(body) != crc:
            raise StateError("delta", "checksum mismatch (corrupt or truncated blob)")
        magic, version, _flags, base_calls, calls, seen, evicted, n_groups, fan = _DELTA_HEAD.unpack_from(body, 0)
        if magic != DELTA_MAGIC:
            raise StateError("delta", f"bad magic {magic!r}, expected {DELTA_MAGIC!r}")
        if version != DELTA_VERSION:
            raise StateError("delta", f"unsupported delta version {version} (this build reads {DELTA_VERSION})")
        off = _DELTA_HEAD.size
        groups = []
        for _ in range(n_groups):
            if off + _DELTA_GROUP.size > len(body):
                raise StateError("delta", "blob ends inside a group header")
            n_ev, n_new, mode, n_mem = _DELTA_GROUP.unpack_from(body, off)
            off += _DELTA_GROUP.size
            if mode not in (_MEMORY_NEW, _MEMORY_ALL) or (mode == _MEMORY_NEW and n_mem != n_new):
                raise StateError("delta", f"memory mode {mode} with {n_mem} values for {n_new} new slots")
            arrays = []
            for dtype, size in ((np.int64, n_ev), (np.int64, n_new), (np.int32, n_new), (np.int64, n_new * fan),
                                (np.float32, n_new * fan), (np.float32, n_mem)):
                arrays.append(_take(body, off, dtype, size))
                off += size * np.dtype(dtype).itemsize
            ev, npos, nage, nepos, new, mem = arrays
            groups.append(GroupDelta(ev, npos, nage, nepos.reshape(n_new, fan), new.reshape(n_new, fan), mem, mode))
        if off != len(body):
            raise StateError("delta", f"{len(body) - off} trailing bytes after the last group")
        return cls(base_calls, calls, seen, evicted, fan, groups)


def _take(body: bytes, off: int, dtype: type, size: int) -> np.ndarray:
    nbytes = size * np.dtype(dtype).itemsize
    if off + nbytes > len(body):
        raise StateError("delta", "blob ends inside a group's arrays")
    return np.frombuffer(body, dtype=np.dtype(dtype).newbyteorder("<"), count=size, offset=off).astype(dtype)


def _np(t: torch.Tensor, dtype: type) -> bytes:
    little = np.dtype(dtype).newbyteorder("<")
    return t.detach().to("cpu").contiguous().numpy().astype(little, copy=False).tobytes()
