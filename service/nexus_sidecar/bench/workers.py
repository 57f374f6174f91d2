"""Simulated inference workers: each drives a batch of sessions over real gRPC, one RPC per
decode call carrying every session's step, exactly as a worker decoding a batch would.

Attention comes from the planted-kind streams of :mod:`nexus_sidecar.bench.streams`
(``realistic=True``, used by the demo) or from fixed random rows (``realistic=False``, used by
the service benchmark so that payload construction does not dominate what is measured).
"""

from __future__ import annotations

import asyncio
import statistics
import time
from dataclasses import dataclass, field
from typing import Any

import torch
from nexus_client.client import AsyncNexusClient, ClientOptions
from nexus_client.columnar import BatchBuilder, read_answer
from nexus_client.packing import WorkerSession, pack_step, top_edges, unpack_result
from nexus_client.v1 import sidecar_pb2 as pb

from nexus_sidecar.bench.streams import BRIDGE, STRONG, SUBTLE, StreamSpec, attention_rows, plant_kinds


@dataclass
class Workload:
    """What one worker does."""

    sessions: int = 8  # sessions per RPC
    prefill: int = 256  # tokens in the first call
    steps: int = 100  # decode calls after the prefill
    k: int = 1  # tokens per decode call
    config: dict[str, Any] = field(default_factory=lambda: {"policy": "nexus", "budget": 128})
    realistic: bool = True
    float_dtype: torch.dtype = torch.float16
    columnar: bool = True  # the StepBatch form (False: the per-session Step form)


@dataclass
class WorkerStats:
    """What one worker measured."""

    name: str
    tenant: str
    rpc_seconds: list[float] = field(default_factory=list)
    session_steps: int = 0
    bytes_sent: int = 0
    evicted: int = 0
    retained: int = 0
    seconds: float = 0.0
    survival: dict[str, list[float]] = field(default_factory=dict)  # kind -> per-session fraction kept

    def summary(self) -> dict[str, float]:
        """p50/p99 RPC latency (decode calls only) and throughput."""
        lat = sorted(self.rpc_seconds)
        return {
            "p50_ms": statistics.median(lat) * 1e3 if lat else float("nan"),
            "p99_ms": lat[min(len(lat) - 1, int(0.99 * len(lat)))] * 1e3 if lat else float("nan"),
            "session_steps_per_s": self.session_steps / self.seconds if self.seconds else float("nan"),
        }


class SimulatedWorker:
    """One worker process's loop (as an asyncio task with its own channel)."""

    def __init__(self, name: str, target: str, tenant: str, api_key: str | None, work: Workload, seed: int) -> None:
        self.name, self.tenant, self.work, self.seed = name, tenant, work, seed
        self.client = AsyncNexusClient(ClientOptions(target, api_key=api_key, timeout_s=60.0))
        fan = int(work.config.get("fanout", 8))
        self.fanout = fan
        self.g = torch.Generator().manual_seed(seed)
        width = work.prefill + work.steps * work.k + 1
        self._rand_attn = torch.rand(1, width, generator=self.g)
        self._rand_w = torch.rand(1, max(work.prefill, work.k), fan, generator=self.g)
        spec = StreamSpec(length=width)
        self.kinds = [plant_kinds(spec, seed * 1000 + i) for i in range(work.sessions)]

    def _tensors(self, retained: torch.Tensor, new: torch.Tensor, idx: int) -> tuple[torch.Tensor, ...]:
        k, fan = new.numel(), self.fanout
        slots = torch.cat([retained, new])
        if self.work.realistic:
            kind, hub_of = self.kinds[idx]
            rows = attention_rows(slots, new, kind, hub_of, self.g)
            attn, last = rows.sum(0, keepdim=True), rows[-1:]
            edge_pos, edge_w = top_edges(rows, slots, fan, exclude_self=False)
        else:
            attn = self._rand_attn[:, : slots.numel()]
            last = attn
            # Edges to the newest tokens, which the recent window protects (always cached).
            base = new.view(k, 1) - torch.arange(fan).view(1, fan)
            edge_pos = base.clamp(min=0)
            edge_w = self._rand_w[0, :k]
        return new, attn, last, edge_pos[None], edge_w[None]

    def _payload(self, ws: WorkerSession, retained: torch.Tensor, new: torch.Tensor, idx: int) -> pb.SessionStep:
        return pack_step(ws, *self._tensors(retained, new, idx), float_dtype=self.work.float_dtype)

    async def _call(self, sessions: list[WorkerSession], retained: list[torch.Tensor], new: torch.Tensor
                    ) -> tuple[float, int, int]:
        """One RPC carrying a step of every session; advances them. (seconds, request bytes, evicted)."""
        evicted = 0
        if self.work.columnar:
            batch = BatchBuilder(self.work.float_dtype)
            for i, ws in enumerate(sessions):
                batch.add(ws, *self._tensors(retained[i], new, i))
            req = batch.request()
            t0 = time.perf_counter()
            resp = await self.client.step_batch(req)
            dt = time.perf_counter() - t0
            answer = read_answer(resp, req, [ws.groups for ws in sessions])
            for i, ws in enumerate(sessions):
                answer.settle(ws, i)
                slots = torch.cat([retained[i], new])
                retained[i] = slots[answer.keep_of(i)[0, : slots.numel()]]
            evicted = int(answer.evicted.shape[0])
            return dt, req.ByteSize(), evicted
        msgs = [self._payload(ws, retained[i], new, i) for i, ws in enumerate(sessions)]
        t0 = time.perf_counter()
        results = await self.client.step(msgs)
        dt = time.perf_counter() - t0
        for i, (ws, res) in enumerate(zip(sessions, results, strict=True)):
            ws.apply(res)
            keep, ev = unpack_result(res)
            slots = torch.cat([retained[i], new])
            retained[i] = slots[keep[0, : slots.numel()]]
            evicted += sum(e.numel() for e in ev)
        return dt, sum(m.ByteSize() for m in msgs), evicted

    async def run(self, barrier: asyncio.Barrier | None = None) -> WorkerStats:
        """Open the sessions, prefill, decode ``steps`` calls, close; returns the stats.

        With a ``barrier``, every worker finishes its prefill before any starts decoding, so decode
        latencies do not include another worker's (much larger) prefill batch.
        """
        w = self.work
        stats = WorkerStats(self.name, self.tenant)
        sessions = []
        for i in range(w.sessions):
            sid = f"{self.name}-s{i}"
            await self.client.open_session(sid, w.config)
            sessions.append(WorkerSession(sid, groups=1))
        retained = [torch.zeros(0, dtype=torch.int64) for _ in sessions]
        nxt = 0
        t_start = None
        for call in range(w.steps + 1):
            k = w.prefill if call == 0 else w.k
            new = torch.arange(nxt, nxt + k)
            nxt += k
            dt, size, evicted = await self._call(sessions, retained, new)
            if call == 0:
                if barrier is not None:
                    await barrier.wait()
                t_start = time.perf_counter()  # throughput counts decode calls only
            else:
                stats.rpc_seconds.append(dt)
                stats.session_steps += len(sessions) * k
                stats.bytes_sent += size
                stats.evicted += evicted
        stats.seconds = time.perf_counter() - (t_start or time.perf_counter())
        stats.retained = sum(r.numel() for r in retained)
        for (kind, _), kept_pos in zip(self.kinds, retained, strict=True):
            kept = torch.zeros(kind.numel(), dtype=torch.bool)
            kept[kept_pos] = True
            seen = torch.arange(kind.numel()) < nxt
            for name, code in (("subtle", SUBTLE), ("bridge", BRIDGE), ("strong", STRONG)):
                mask = (kind == code) & seen
                if mask.any():
                    stats.survival.setdefault(name, []).append(float(kept[mask].float().mean()))
        for ws in sessions:
            await self.client.close_session(ws.session_id)
        await self.client.close()
        return stats
