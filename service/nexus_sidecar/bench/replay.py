"""A load generator that replays pre-built ``StepBatch`` request bytes, so that the service benchmark
measures the server rather than the workers that feed it.

Each replay worker opens B sessions and prefills them with the ordinary client (not timed). Then it
builds ONE decode request with :class:`nexus_client.columnar.BatchBuilder` (B sessions at N retained
slots, one new token each), serializes it, and finds where its per-step fields live in the bytes:
every one of them is a fixed-width little-endian array (proto/nexus/v1/sidecar.proto), so a step
is a few numpy writes into a bytearray, never a rebuild or a re-serialization:

- ``steps`` (uint64 [B]): the next step of every session;
- ``retained_checksums`` (uint64 [B]): the checksum the previous answer carried;
- ``new_positions`` data (int32/int64 [B]): the new token's position;
- ``edge_index`` data ([B x F]): its edges, to the newest tokens (the recent window keeps them).

The requests are valid: steps, counts and checksums follow the server's answers (read from the
answer's fixed-width columns). The attention rows are fixed random rows (as in the workers'
``realistic=False`` mode). In the steady state the retained count stays N (budget N, one token in,
one out); an answer with another count ends the run with an error rather than send a request the
server would refuse. The first ``WARMUP`` decode calls are not timed (see there). The worker's own
CPU per request is small and is reported by the benchmark.
"""

from __future__ import annotations

import asyncio
import secrets
import time
from dataclasses import dataclass, field
from typing import Any

import grpc
import numpy as np
import torch
from nexus_client.client import AsyncNexusClient, ClientOptions
from nexus_client.columnar import BatchBuilder, read_answer
from nexus_client.packing import WorkerSession
from nexus_client.v1 import sidecar_pb2 as pb

METHOD = "/nexus.v1.EvictionService/StepBatch"
PREFILL_CHUNK = 1024
# Decode calls before the timed window, as the engine-alone reference warms up (engine_bench.measure's
# warmup = 2): the first decode call of a session prefilled to N = 2^m moves its arena to the next
# width class (a one-off copy of its rows per session life), which is not the steady state either
# side of the ratio measures.
WARMUP = 2
_WIRE_INT = {pb.D_TYPE_INT32: "<i4", pb.D_TYPE_INT64: "<i8"}


@dataclass
class ReplayStats:
    """What one replay worker measured over its decode calls."""

    rpc_seconds: list[float] = field(default_factory=list)
    session_steps: int = 0
    bytes_sent: int = 0
    seconds: float = 0.0


def _locate(blob: bytes, marker: bytes, what: str) -> int:
    at = blob.find(marker)
    if at < 0 or blob.find(marker, at + 1) >= 0:
        raise RuntimeError(f"replay: could not place {what} in the request bytes")
    return at


class Template:
    """One decode request's bytes and where its per-step fields live in them."""

    def __init__(self, request: pb.StepBatchRequest, fanout: int) -> None:
        B = len(request.session_ids)
        self.B, self.F = B, fanout
        self.pos_dtype = _WIRE_INT[request.new_positions.dtype]
        self.edge_dtype = _WIRE_INT[request.edge_index.dtype]
        # Random markers in each field: their unique positions in the serialized bytes are the fields'.
        marks = {name: secrets.token_bytes(size) for name, size in (
            ("steps", 8 * B), ("retained_checksums", 8 * B),
            ("new_positions", B * np.dtype(self.pos_dtype).itemsize),
            ("edge_index", B * fanout * np.dtype(self.edge_dtype).itemsize))}
        request.steps = marks["steps"]
        request.retained_checksums = marks["retained_checksums"]
        request.new_positions.data = marks["new_positions"]
        request.edge_index.data = marks["edge_index"]
        blob = request.SerializeToString()
        self.bytes = bytearray(blob)
        at = {name: _locate(blob, m, name) for name, m in marks.items()}
        buf = self.bytes
        # numpy views into the request bytes: writing them patches the request in place.
        self.steps = np.frombuffer(buf, dtype="<u8", count=B, offset=at["steps"])
        self.checksums = np.frombuffer(buf, dtype="<u8", count=B, offset=at["retained_checksums"])
        self.new_pos = np.frombuffer(buf, dtype=self.pos_dtype, count=B, offset=at["new_positions"])
        self.edges = np.frombuffer(buf, dtype=self.edge_dtype, count=B * fanout,
                                   offset=at["edge_index"]).reshape(B, fanout)
        self._fan = np.arange(fanout)

    def patch(self, steps: np.ndarray, checksums: np.ndarray, position: int) -> bytes:
        """The request of the next step: every session at ``steps``, its new token at ``position``."""
        self.steps[:] = steps
        self.checksums[:] = checksums
        self.new_pos[:] = position
        self.edges[:] = np.maximum(position - self._fan, 0)
        return bytes(self.bytes)


class ReplayWorker:
    """B sessions: opened and prefilled with the client, then decoded by replaying patched bytes."""

    def __init__(self, name: str, target: str, sessions: int, prefill: int, steps: int, config: dict[str, Any],
                 seed: int) -> None:
        self.name, self.target = name, target
        self.B, self.N, self.steps, self.config = sessions, prefill, steps, config
        self.F = int(config.get("fanout", 8))
        g = torch.Generator().manual_seed(seed)
        self._attn = torch.rand(1, prefill + 1, generator=g)
        self._w = torch.rand(1, max(prefill, 1), self.F, generator=g)
        self.options = ClientOptions(target, timeout_s=120.0, retry_budget_s=600.0)

    def _batch(self, sessions: list[WorkerSession], new: torch.Tensor, width: int) -> pb.StepBatchRequest:
        k = new.numel()
        batch = BatchBuilder(torch.float16)
        edge_pos = (new.view(k, 1) - torch.arange(self.F).view(1, self.F)).clamp(min=0)[None]
        w = self._w[:, :k] if k <= self._w.shape[1] else torch.rand(1, k, self.F)
        for ws in sessions:
            batch.add(ws, new, self._attn[:, :width], self._attn[:, :width], edge_pos, w)
        return batch.request()

    async def run(self, window: Any = None) -> ReplayStats:
        """Open, prefill, decode ``steps`` calls by replay, close. ``window`` (the benchmark's decode
        window): ``await window.wait()`` after the prefill, ``await window.end()`` after the decode."""
        client = AsyncNexusClient(self.options)
        sessions = []
        for i in range(self.B):
            sid = f"{self.name}-s{i}"
            await client.open_session(sid, self.config)
            sessions.append(WorkerSession(sid, groups=1))
        # The prefill in chunks (B = 256 sessions x 4,096 tokens in one request is ~55 MB): every token
        # is retained (budget >= prefill), so the slots of a chunk are all the tokens so far.
        for start in range(0, self.N, PREFILL_CHUNK):
            end = min(self.N, start + PREFILL_CHUNK)
            req = self._batch(sessions, torch.arange(start, end), end)
            answer = read_answer(await client.step_batch(req), req, [1] * self.B)
            for i, ws in enumerate(sessions):
                answer.settle(ws, i)
        if any(ws.retained_count != self.N for ws in sessions):
            raise RuntimeError("replay: the prefill must retain every token (budget >= prefill)")
        template = Template(self._batch(sessions, torch.tensor([self.N]), self.N + 1), self.F)
        steps = np.array([ws.step for ws in sessions], dtype=np.uint64)
        checksums = np.array([ws.retained_checksum for ws in sessions], dtype=np.uint64)
        stats = ReplayStats()
        channel = grpc.aio.insecure_channel(self.target, options=self.options.channel_options())
        call = channel.unary_unary(METHOD)  # bytes in, bytes out: no message objects on this side
        metadata = self.options.metadata()
        t_start = time.perf_counter()
        try:
            for c in range(WARMUP + self.steps):
                if c == WARMUP:  # the decode window starts after the warm-up calls
                    if window is not None:
                        await window.wait()
                    t_start = time.perf_counter()
                steps += np.uint64(1)
                payload = template.patch(steps, checksums, self.N + c)
                t0 = time.perf_counter()
                raw = await call(payload, timeout=self.options.timeout_s, metadata=metadata)
                if c >= WARMUP:
                    stats.rpc_seconds.append(time.perf_counter() - t0)
                resp = pb.StepBatchResponse.FromString(raw)
                answered = np.frombuffer(resp.steps, dtype="<u8")
                counts = np.frombuffer(resp.retained_counts, dtype="<u4")
                if not np.array_equal(answered, steps) or not (counts == self.N).all():
                    raise RuntimeError(f"replay: unexpected answer at decode call {c} (steps or counts moved off "
                                       "the steady state)")
                checksums = np.frombuffer(resp.retained_checksums, dtype="<u8").copy()
                if c >= WARMUP:
                    stats.session_steps += self.B
                    stats.bytes_sent += len(payload)
            stats.seconds = time.perf_counter() - t_start
        finally:
            await channel.close()
        if window is not None:
            await window.end()
        for ws, step, check in zip(sessions, steps.tolist(), checksums.tolist(), strict=True):
            ws.step, ws.retained_checksum = step, check
            await client.close_session(ws.session_id)
        await client.close()
        return stats


async def run_workers(target: str, B: int, N: int, workers: int, steps: int, config: dict[str, Any],
                      window: Any = None) -> list[ReplayStats]:
    """``workers`` replay workers of B sessions each, concurrently (one asyncio task each)."""
    ws = [ReplayWorker(f"r{i}", target, B, N, steps, config, seed=i) for i in range(workers)]
    return list(await asyncio.gather(*(w.run(window) for w in ws)))
