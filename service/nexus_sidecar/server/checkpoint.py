"""The checkpoint envelope stored per session: engine state + what makes retries idempotent.

Layout v2 (little-endian)::

    magic b"NXCP", version u16 = 2, reserved u16
    step u64, checksum u64, digest_len u16, digest bytes (blake2b of the last step's request)
    result_len u32, last SessionResult (protobuf bytes)
    engine blob (nexus_sidecar.engine.state layout, carries its own CRC) up to the end

Storing the last answer lets a replica that resumed the session answer a retried step
exactly as the replica that computed it did. v1 (checksum u32, the old 32-bit sum) is still
read: its checksum is recomputed from the state's positions with today's 64-bit digest.
"""

from __future__ import annotations

import struct
from dataclasses import dataclass

from nexus_client.wire import positions_checksum

from nexus_sidecar.engine import SessionState, StateError

MAGIC = b"NXCP"
VERSION = 2
_HEADS = {1: struct.Struct("<4sHHQIH"), 2: struct.Struct("<4sHHQQH")}
_HEAD = _HEADS[VERSION]
_PREFIX = struct.Struct("<4sH")


@dataclass
class Checkpoint:
    """A session's durable record."""

    step: int
    checksum: int
    digest: bytes
    last_result: bytes
    state: SessionState

    def to_bytes(self) -> bytes:
        """Serialize (see module docstring)."""
        return b"".join([
            _HEAD.pack(MAGIC, VERSION, 0, self.step, self.checksum, len(self.digest)), self.digest,
            struct.pack("<I", len(self.last_result)), self.last_result, self.state.to_bytes(),
        ])

    @classmethod
    def from_bytes(cls, blob: bytes) -> Checkpoint:
        """Parse; raises StateError on a bad header (the engine blob checks its own CRC)."""
        if len(blob) < _HEADS[1].size:
            raise StateError("checkpoint", f"blob of {len(blob)} bytes is too short")
        magic, version = _PREFIX.unpack_from(blob, 0)
        if magic != MAGIC:
            raise StateError("checkpoint", f"bad magic {magic!r}, expected {MAGIC!r}")
        head = _HEADS.get(version)
        if head is None or len(blob) < head.size:
            raise StateError("checkpoint", f"unsupported checkpoint version {version} (this build reads 1..{VERSION})"
                             if head is None else f"blob of {len(blob)} bytes is too short")
        _, _, _, step, checksum, dlen = head.unpack_from(blob, 0)
        off = head.size
        digest = blob[off : off + dlen]
        off += dlen
        try:
            (rlen,) = struct.unpack_from("<I", blob, off)
        except struct.error as exc:
            raise StateError("checkpoint", "blob ends inside the header") from exc
        off += 4
        last_result = blob[off : off + rlen]
        off += rlen
        state = SessionState.from_bytes(blob[off:])
        if version == 1:  # the 32-bit checksum of v1 means nothing today: recompute it from the state
            checksum = sum(positions_checksum(g.pos) for g in state.groups) & ((1 << 64) - 1)
        return cls(step, checksum, digest, last_result, state)
