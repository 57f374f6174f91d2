"""The checkpoint envelope stored per session: engine state + what makes retries idempotent.

Layout v1 (little-endian)::

    magic b"NXCP", version u16 = 1, reserved u16
    step u64, checksum u32, digest_len u16, digest bytes (sha256 of the last step's request)
    result_len u32, last SessionResult (protobuf bytes)
    engine blob (nexus_sidecar.engine.state layout, carries its own CRC) up to the end

Storing the last answer lets a replica that resumed the session answer a retried step
exactly as the replica that computed it did.
"""

from __future__ import annotations

import struct
from dataclasses import dataclass

from nexus_sidecar.engine import SessionState, StateError

MAGIC = b"NXCP"
VERSION = 1
_HEAD = struct.Struct("<4sHHQIH")


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
        if len(blob) < _HEAD.size:
            raise StateError("checkpoint", f"blob of {len(blob)} bytes is too short")
        magic, version, _, step, checksum, dlen = _HEAD.unpack_from(blob, 0)
        if magic != MAGIC:
            raise StateError("checkpoint", f"bad magic {magic!r}, expected {MAGIC!r}")
        if version != VERSION:
            raise StateError("checkpoint", f"unsupported checkpoint version {version} (this build reads {VERSION})")
        off = _HEAD.size
        digest = blob[off : off + dlen]
        off += dlen
        (rlen,) = struct.unpack_from("<I", blob, off)
        off += 4
        last_result = blob[off : off + rlen]
        off += rlen
        return cls(step, checksum, digest, last_result, SessionState.from_bytes(blob[off:]))
