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
            config = PolicyConfig.from_dict(json.loads(body[off : off + cfg_len]))
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


def _np(t: torch.Tensor, dtype: type) -> bytes:
    little = np.dtype(dtype).newbyteorder("<")
    return t.detach().to("cpu").contiguous().numpy().astype(little, copy=False).tobytes()
