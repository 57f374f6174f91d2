"""The checkpoint envelope stored per session: engine state + what makes retries idempotent.

Layout v2 (little-endian)::

    magic b"NXCP", version u16 = 2, reserved u16
    step u64, checksum u64, digest_len u16, digest bytes (blake2b of the last step's request)
    result_len u32, last SessionResult (protobuf bytes)
    engine blob (nexus_sidecar.engine.state layout, carries its own CRC) up to the end

Storing the last answer lets a replica that resumed the session answer a retried step
exactly as the replica that computed it did. v1 (checksum u32, the old 32-bit sum) is still
read: its checksum is recomputed from the state's positions with today's 64-bit digest.

Between two full checkpoints a session writes deltas (:class:`DeltaCheckpoint`, ``NXCD``) against
the last full one; :func:`load` puts a stored record back together.
"""

from __future__ import annotations

import struct
import zlib
from dataclasses import dataclass

from nexus_client.wire import positions_checksum

from nexus_sidecar.engine import SessionState, StateError
from nexus_sidecar.engine.state import StateDelta

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
        digest, last_result, off = _read_reply(blob, head.size, dlen, "checkpoint")
        state = SessionState.from_bytes(blob[off:])
        if version == 1:  # the 32-bit checksum of v1 means nothing today: recompute it from the state
            checksum = sum(positions_checksum(g.pos) for g in state.groups) & ((1 << 64) - 1)
        return cls(step, checksum, digest, last_result, state)


def _read_reply(blob: bytes, off: int, digest_len: int, field: str) -> tuple[bytes, bytes, int]:
    """The request digest and the last answer that follow either envelope's header, and the offset
    of the engine blob after them."""
    digest = blob[off : off + digest_len]
    off += digest_len
    try:
        (rlen,) = struct.unpack_from("<I", blob, off)
    except struct.error as exc:
        raise StateError(field, "blob ends inside the header") from exc
    off += 4
    return digest, blob[off : off + rlen], off + rlen


DELTA_MAGIC = b"NXCD"
DELTA_VERSION = 1
_DHEAD = struct.Struct("<4sHHQQIQH")  # magic, version, reserved, step, base step, base crc, checksum, digest_len


@dataclass
class DeltaCheckpoint:
    """A checkpoint as changes against the full checkpoint stored before it (layout ``NXCD`` v1)::

        magic b"NXCD", version u16 = 1, reserved u16
        step u64, base_step u64 (the full checkpoint it applies to), base_crc u32 (crc32 of that
        full checkpoint's bytes), checksum u64, digest_len u16, digest bytes
        result_len u32, last SessionResult (protobuf bytes)
        engine delta (nexus_sidecar.engine.state NXSD layout)
        crc32 u32 of everything before it

    A delta is cumulative: it holds every change since its full checkpoint, so a restore reads the
    full one and at most one delta, and a lost delta costs the steps since the full one, never more.
    """

    step: int
    base_step: int
    base_crc: int
    checksum: int
    digest: bytes
    last_result: bytes
    delta: StateDelta

    def to_bytes(self) -> bytes:
        """Serialize (see the class docstring)."""
        body = b"".join([
            _DHEAD.pack(DELTA_MAGIC, DELTA_VERSION, 0, self.step, self.base_step, self.base_crc, self.checksum,
                        len(self.digest)), self.digest,
            struct.pack("<I", len(self.last_result)), self.last_result, self.delta.to_bytes(),
        ])
        return body + struct.pack("<I", zlib.crc32(body))

    @classmethod
    def from_bytes(cls, blob: bytes) -> DeltaCheckpoint:
        """Parse; raises StateError on a bad envelope (any flipped byte fails the CRC)."""
        if len(blob) < _DHEAD.size + 8:
            raise StateError("checkpoint.delta", f"blob of {len(blob)} bytes is too short")
        body, (crc,) = blob[:-4], struct.unpack("<I", blob[-4:])
        if zlib.crc32(body) != crc:
            raise StateError("checkpoint.delta", "checksum mismatch (corrupt or truncated blob)")
        magic, version, _, step, base_step, base_crc, checksum, dlen = _DHEAD.unpack_from(body, 0)
        if magic != DELTA_MAGIC:
            raise StateError("checkpoint.delta", f"bad magic {magic!r}, expected {DELTA_MAGIC!r}")
        if version != DELTA_VERSION:
            raise StateError("checkpoint.delta", f"unsupported version {version} (this build reads {DELTA_VERSION})")
        digest, last_result, off = _read_reply(body, _DHEAD.size, dlen, "checkpoint.delta")
        return cls(step, base_step, base_crc, checksum, digest, last_result, StateDelta.from_bytes(body[off:]))

    def apply(self, full: Checkpoint, full_blob: bytes) -> Checkpoint:
        """The checkpoint at this delta's step; raises StateError unless ``full`` (whose bytes are
        ``full_blob``) is the one this delta was taken against."""
        if full.step != self.base_step or zlib.crc32(full_blob) != self.base_crc:
            raise StateError("checkpoint.delta", f"taken against the full checkpoint of step {self.base_step} "
                             f"(crc {self.base_crc:#010x}), the store holds step {full.step} "
                             f"(crc {zlib.crc32(full_blob):#010x})")
        return Checkpoint(self.step, self.checksum, self.digest, self.last_result, self.delta.apply(full.state))


@dataclass
class Loaded:
    """A stored record read back: the checkpoint, and why the delta after it was not used (if so)."""

    checkpoint: Checkpoint
    fallback: str | None = None  # None: the newest stored step was restored


def load(blob: bytes, delta: bytes | None, step: int | None = None) -> Loaded:
    """The newest checkpoint a stored record gives: its full checkpoint with its delta applied.

    ``step``: the record's newest step, when known (the store's). A delta that is missing (the
    record is newer than its full checkpoint), corrupt, truncated, of another step or not taken
    against this full checkpoint is not used: the full one is returned with ``fallback`` saying why
    (the session is then behind the worker, whose next step is refused with the expected step and
    resyncs it: older state, never wrong state). A bad full checkpoint raises StateError.
    """
    full = Checkpoint.from_bytes(blob)
    if not delta:
        if step is not None and step != full.step:
            return Loaded(full, fallback=f"the store is at step {step} but holds no delta after the full "
                                         f"checkpoint of step {full.step}")
        return Loaded(full)
    try:
        cp = DeltaCheckpoint.from_bytes(delta).apply(full, blob)
    except StateError as exc:
        return Loaded(full, fallback=str(exc))
    if step is not None and cp.step != step:
        return Loaded(full, fallback=f"the delta is of step {cp.step}, the store says step {step}")
    return Loaded(cp)
