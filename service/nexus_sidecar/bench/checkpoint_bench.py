"""Checkpoint cost in-process: engine-thread time and bytes per step, before and after.

Before (the code up to this change): every ``checkpoint_every`` steps each session was snapshotted
on the engine thread (gathers and edge mapping over its rows) and serialised on the event loop,
a full state every time. After: the engine thread only copies the rows (``Engine.capture``: for a
delta, positions, liveness, birth and memory of every slot and the edges of the appended slots);
encoding runs on the checkpoint thread; every ``full_every``-th checkpoint is full, the others
deltas against it. Both are measured on the same sessions, at the same steps, in one run.
"""

from __future__ import annotations

import statistics
import time
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch

from nexus_sidecar.engine import Engine, PolicyConfig, StepInput
from nexus_sidecar.engine.state import GroupState, SessionState
from nexus_sidecar.server.checkpoint import Checkpoint
from nexus_sidecar.server.checkpoint_writer import Captured, DeltaBase, capture, encode


@dataclass
class CheckpointBenchSettings:
    """The shape (the service benchmark's B = 64 row) and the cadence."""

    batch_sizes: tuple[int, ...] = (8, 64)
    slots: int = 4096
    fanout: int = 8
    iterations: int = 2
    cadence: int = 16  # steps between checkpoints (the Redis default)
    full_every: int = 16  # the default checkpoint_full_every
    rounds: int = 16  # checkpoints timed (one full + full_every - 1 deltas with the defaults)

    @classmethod
    def quick(cls) -> CheckpointBenchSettings:
        """B = 8 only, four checkpoints."""
        return cls(batch_sizes=(8,), rounds=4, full_every=4)


def legacy_snapshot(eng: Engine, handle: int) -> SessionState:
    """``Engine.snapshot`` as it was before this change (torch gathers over the whole row on the
    engine thread), kept here only to measure the old engine-thread cost against."""
    s = eng._session(handle)
    r = torch.tensor(s.rows, device=eng.device)
    pool = s.pool
    alive = pool.slot["alive"][r].cpu()
    pos, birth = pool.slot["pos"][r].cpu(), pool.slot["birth"][r].cpu()
    mem = pool.slot["memory"][r].cpu()
    eidx, ew = pool.edge["edge_idx"][r].cpu(), pool.edge["edge_w"][r].cpu()
    groups = []
    for g in range(len(s.rows)):
        a = alive[g]
        tgt_alive = alive[g].gather(0, eidx[g].reshape(-1)).reshape(eidx[g].shape)
        live_edge = tgt_alive & (ew[g] > 0)
        epos = torch.where(live_edge, pos[g].gather(0, eidx[g].reshape(-1)).reshape(eidx[g].shape), -1)
        groups.append(GroupState(pos=pos[g][a].clone(), age=(s.calls - birth[g][a]).to(torch.int32),
                                 memory=mem[g][a].clone(), edge_pos=epos[a].to(torch.int64),
                                 edge_w=torch.where(live_edge, ew[g], 0.0)[a].clone()))
    return SessionState(s.cfg, s.calls, s.tokens_seen, s.tokens_evicted, groups)


def _sessions(B: int, N: int, F: int, R: int, g: torch.Generator) -> tuple[Engine, list[int]]:
    eng = Engine("cpu")
    cfg = PolicyConfig(policy="nexus", budget=N, sinks=4, recent=32, fanout=F, iterations=R)
    handles = [eng.open(cfg.with_(seed=i)) for i in range(B)]
    pos = torch.arange(N)
    tgt = (torch.rand(N, F, generator=g) * (pos.unsqueeze(1) + 1)).long()
    prefill = StepInput(pos, torch.rand(1, N, generator=g), torch.rand(1, N, generator=g), tgt[None],
                        torch.rand(1, N, F, generator=g))
    eng.step({h: prefill for h in handles})
    return eng, handles


def _step(eng: Engine, handles: list[int], N: int, F: int, g: torch.Generator) -> None:
    p = N + eng.calls(handles[0]) - 1
    e = torch.arange(p, p - F, -1).clamp(min=0)[None, None]
    inp = StepInput(torch.tensor([p]), torch.rand(1, N + 1, generator=g), torch.rand(1, N + 1, generator=g), e,
                    torch.rand(1, 1, F, generator=g))
    eng.step({h: inp for h in handles})


def measure(B: int, s: CheckpointBenchSettings) -> dict[str, Any]:
    """One shape: per checkpoint round, the old and the new path on every session. Bytes are per
    session-step; engine-thread (and loop / checkpoint-thread) times per batched step of B sessions."""
    g = torch.Generator().manual_seed(0)
    N, F = s.slots, s.fanout
    eng, handles = _sessions(B, N, F, s.iterations, g)
    bases: dict[int, DeltaBase | None] = dict.fromkeys(handles)
    rounds = []
    changed = []
    for rnd in range(s.rounds):
        for _ in range(s.cadence):
            p0, m0 = eng.positions(handles[0])[0].numpy(), eng.memory(handles[0])[0].numpy()
            _step(eng, handles, N, F, g)
            p1, m1 = eng.positions(handles[0])[0].numpy(), eng.memory(handles[0])[0].numpy()
            # Of the slots retained across the step, the share whose EMA memory changed.
            _, i0, i1 = np.intersect1d(p0, p1, assume_unique=True, return_indices=True)
            changed.append(float(np.mean(m0[i0] != m1[i1])))
        old_engine = old_loop = new_capture = new_encode = 0.0
        old_bytes = new_bytes = 0
        for h in handles:
            t0 = time.perf_counter()
            state = legacy_snapshot(eng, h)
            t1 = time.perf_counter()
            blob = Checkpoint(rnd, 0, b"d" * 32, b"", state).to_bytes()
            t2 = time.perf_counter()
            old_engine, old_loop, old_bytes = old_engine + t1 - t0, old_loop + t2 - t1, old_bytes + len(blob)
            base = bases[h] if rnd % s.full_every else None
            rows, secs = capture(eng, h, base)
            enc = encode(Captured(rnd, 0, b"d" * 32, b"", rows, base, secs))
            assert enc is not None
            if base is None:
                bases[h] = enc.base
                assert blob == enc.blob, "the new full checkpoint must equal the old one"
            new_capture, new_encode, new_bytes = new_capture + secs, new_encode + enc.seconds, new_bytes + len(enc.blob)
        rounds.append({"kind": "full" if rnd % s.full_every == 0 else "delta", "old_engine_ms": old_engine * 1e3,
                       "old_loop_ms": old_loop * 1e3, "old_bytes": old_bytes, "new_engine_ms": new_capture * 1e3,
                       "new_encode_ms": new_encode * 1e3, "new_bytes": new_bytes})
    steps = s.rounds * s.cadence

    def per_step(key: str) -> float:
        return sum(r[key] for r in rounds) / steps

    deltas = [r for r in rounds if r["kind"] == "delta"]
    return {
        "B": B, "N": N, "F": F, "cadence": s.cadence, "full_every": s.full_every, "rounds": rounds,
        "old_bytes_per_session_step": per_step("old_bytes") / B,
        "new_bytes_per_session_step": per_step("new_bytes") / B,
        "old_engine_ms_per_step": per_step("old_engine_ms"), "new_engine_ms_per_step": per_step("new_engine_ms"),
        "old_loop_ms_per_step": per_step("old_loop_ms"), "new_encode_ms_per_step": per_step("new_encode_ms"),
        "full_bytes_per_session": rounds[0]["new_bytes"] / B,
        "delta_bytes_per_session": statistics.median(r["new_bytes"] for r in deltas) / B if deltas else None,
        "memory_changed_fraction": float(np.median(changed)),
    }


def run(settings: CheckpointBenchSettings, progress: bool = True) -> dict[str, Any]:
    """Every shape of the settings; returns the JSON payload."""
    from nexus_sidecar.bench.report import machine

    records = []
    for B in settings.batch_sizes:
        rec = measure(B, settings)
        rec["bytes_ratio"] = rec["old_bytes_per_session_step"] / rec["new_bytes_per_session_step"]
        rec["engine_time_ratio"] = rec["old_engine_ms_per_step"] / rec["new_engine_ms_per_step"]
        records.append(rec)
        if progress:
            print(f"B={B}: {rec['bytes_ratio']:.1f}x fewer bytes, {rec['engine_time_ratio']:.1f}x less engine time")
    return {"benchmark": "checkpoint", "machine": machine(), "torch_threads": torch.get_num_threads(),
            "records": records}


def table(payload: dict[str, Any]) -> str:
    """Markdown table."""
    from nexus_sidecar.bench.report import markdown_table

    return markdown_table(payload["records"], [
        "B", "N", "F", "cadence", "full_every", "old_bytes_per_session_step", "new_bytes_per_session_step",
        "bytes_ratio",
        "old_engine_ms_per_step", "new_engine_ms_per_step", "engine_time_ratio", "old_loop_ms_per_step",
        "new_encode_ms_per_step", "full_bytes_per_session", "delta_bytes_per_session", "memory_changed_fraction"])


# -- the service benchmark's checkpoint columns (Redis rows), from the sidecar's /metrics ---------
SERVICE_COLUMNS = ("ckpt_bytes_per_session_step", "ckpt_engine_ms_per_call", "ckpt_engine_share", "ckpt_full",
                   "ckpt_delta")


def scrape(http_port: int) -> str:
    """The sidecar's /metrics text."""
    import urllib.request

    with urllib.request.urlopen(f"http://127.0.0.1:{http_port}/metrics", timeout=10) as resp:
        return resp.read().decode()


def _total(text: str, name: str, **labels: str) -> float:
    from prometheus_client.parser import text_string_to_metric_families

    return sum(s.value for fam in text_string_to_metric_families(text) for s in fam.samples
               if s.name == name and all(s.labels.get(k) == v for k, v in labels.items()))


def service_columns(before: str, after: str) -> dict[str, float]:
    """Checkpoint cost of one service-benchmark row from /metrics before and after it: bytes written
    per session-step, engine-thread ms spent on checkpoint copies per batched engine call and as a
    share of engine compute, and how many full and delta checkpoints were written."""

    def delta(name: str, **labels: str) -> float:
        return _total(after, name, **labels) - _total(before, name, **labels)

    session_steps = max(1.0, delta("nexus_batch_sessions_sum"))
    calls = max(1.0, delta("nexus_engine_compute_seconds_count"))
    capture_s = delta("nexus_checkpoint_duration_seconds_sum", phase="capture")
    compute_s = max(1e-12, delta("nexus_engine_compute_seconds_sum"))
    return {
        "ckpt_bytes_per_session_step": delta("nexus_checkpoint_bytes_total") / session_steps,
        "ckpt_engine_ms_per_call": capture_s * 1e3 / calls,
        "ckpt_engine_share": capture_s / (capture_s + compute_s),
        "ckpt_full": delta("nexus_checkpoint_duration_seconds_count", kind="full", phase="write"),
        "ckpt_delta": delta("nexus_checkpoint_duration_seconds_count", kind="delta", phase="write"),
    }
