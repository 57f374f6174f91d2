"""Where the server's CPU goes per session-step on the step path, in process, by thread clock.

A real ``SessionManager`` (memory store, fused kernels, its own engine thread) with B sessions
prefilled to N slots (budget N), then decode ``StepBatch`` requests replayed as ``bench service``
sends them (``bench/replay.py``'s template: one new token per session, steps and checksums from the
answers). No gRPC: each request is parsed from its bytes and its answer serialized on the event
loop, as the servicer does. Reported per session-step, from ``time.thread_time`` (CPU, not wall,
so a wait for a core or for the GIL does not count):

- ``loop_us``: the event loop's CPU for a whole RPC (parse, step path, encode, serialize);
- ``engine_thread_outside_us``: the engine thread's CPU outside ``Engine.step``/``step_batch``
  (building inputs, outputs, retention-page reads);
- ``engine_ms_per_call``: the engine thread's CPU inside the engine call;
- ``parts_us``: the loop's CPU inside named functions of the step path (nested ones overlap).

Usage (the tree on PYTHONPATH is the one measured)::

    python benchmarks/step_path_breakdown.py --sessions 64 --slots 4096 --steps 20 [--json out.json]
"""

from __future__ import annotations

import argparse
import asyncio
import collections
import gc
import importlib
import json
import statistics
import time
from collections.abc import Callable
from typing import Any

import numpy as np
import torch
from nexus_client.columnar import read_answer
from nexus_client.packing import WorkerSession
from nexus_client.v1 import sidecar_pb2 as pb
from nexus_sidecar.bench.replay import ReplayWorker, Template
from nexus_sidecar.engine import Engine, PolicyConfig
from nexus_sidecar.server.metrics import Metrics
from nexus_sidecar.server.sessions import SessionManager
from nexus_sidecar.server.settings import ServerSettings
from nexus_sidecar.server.stores import MemoryStore

WARMUP = 2
# (module, attribute path, label): the step path's parts, wrapped where they exist in the tree measured.
PARTS = [
    ("nexus_sidecar.server.step_columns", "from_batch", "decode the batch (from_batch)"),
    ("nexus_sidecar.server.step_columns", "StepColumns.check_layout", "layout check"),
    ("nexus_sidecar.server.step_columns", "StepColumns.check_positions", "position check"),
    ("nexus_sidecar.server.step_columns", "StepColumns.inputs", "engine inputs (LazyInputs)"),
    ("nexus_sidecar.server.step_columns", "StepColumns.deferred_digest", "step digests (deferred)"),
    ("nexus_sidecar.server.stepping", "StepPath._plan", "order/retry/state check (_plan)"),
    ("nexus_sidecar.server.stepping", "StepPath._unlock_all", "unlock"),
    ("nexus_sidecar.server.stepping", "StepPath._commit", "commit (all of it)"),
    ("nexus_sidecar.server.stepping", "answer_batch", "  commit: answers"),
    ("nexus_sidecar.server.retention_history", "RetentionHistory.record_many", "  commit: retention history"),
    ("nexus_sidecar.server.stepping", "observe_many", "  commit: histograms"),
    ("nexus_sidecar.server.stepping", "encode_batch", "encode the response"),
    ("nexus_sidecar.server.admission", "Admission.step_fits", "pool budget check"),
    ("nexus_sidecar.server.stepping", "_columnar", "engine thread: columnar inputs"),
    ("nexus_sidecar.server.answers", "HostBatch.of", "engine thread: outputs to numpy"),
    ("nexus_sidecar.server.retention_history", "RetentionHistory._read_weights", "engine thread: retention weights"),
]


def _wrap(acc: collections.Counter[str]) -> None:
    for module, path, label in PARTS:
        owner: Any = importlib.import_module(module)
        *outer, name = path.split(".")
        for part in outer:
            owner = getattr(owner, part)
        fn = getattr(owner, name, None)
        if fn is None:
            continue

        def timed(*args: Any, _fn: Callable[..., Any] = fn, _label: str = label, **kwargs: Any) -> Any:
            c0 = time.thread_time()
            try:
                return _fn(*args, **kwargs)
            finally:
                acc[_label] += time.thread_time() - c0

        setattr(owner, name, timed)


async def measure(B: int, N: int, steps: int) -> dict[str, Any]:
    cfg = {"policy": "nexus", "budget": N, "recent": 32, "fanout": 8, "iterations": 2}
    engine = Engine("cpu", kernels="fused")
    mgr = SessionManager(engine, MemoryStore(), ServerSettings(max_batch=B, max_delay_us=500), Metrics())
    mgr.start()
    try:
        gen = ReplayWorker("r", "in-process", B, N, steps, cfg, seed=0)
        sessions = []
        for i in range(B):
            await mgr.open("bench", f"s{i}", PolicyConfig(**cfg).validate())
            sessions.append(WorkerSession(f"s{i}", groups=1))
        for start in range(0, N, 1024):  # the prefill, as the replay workers send it
            end = min(N, start + 1024)
            req = gen._batch(sessions, torch.arange(start, end), end)
            answer = read_answer(await mgr.step_batch("bench", req, None), req, [1] * B)
            for i, ws in enumerate(sessions):
                answer.settle(ws, i)
        template = Template(gen._batch(sessions, torch.tensor([N]), N + 1), gen.F)
        step_no = np.array([ws.step for ws in sessions], dtype=np.uint64)
        checksums = np.array([ws.retained_checksum for ws in sessions], dtype=np.uint64)
        inside = [0.0]
        for name in ("step", "step_batch"):
            fn = getattr(engine, name, None)
            if fn is None:
                continue

            def clocked(*args: Any, _fn: Callable[..., Any] = fn, **kwargs: Any) -> Any:
                c0 = time.thread_time()
                try:
                    return _fn(*args, **kwargs)
                finally:
                    inside[0] += time.thread_time() - c0

            setattr(engine, name, clocked)
        acc: collections.Counter[str] = collections.Counter()
        loop_us, outside_us, engine_ms = [], [], []
        gc.freeze()
        for c in range(WARMUP + steps):
            if c == WARMUP:
                _wrap(acc)
            step_no += np.uint64(1)
            raw = template.patch(step_no, checksums, N + c)
            e0, i0 = await mgr.on_engine(time.thread_time), inside[0]
            c0 = time.thread_time()
            resp = await mgr.step_batch("bench", pb.StepBatchRequest.FromString(raw), None)
            resp.SerializeToString()
            c1 = time.thread_time()
            e1 = await mgr.on_engine(time.thread_time)
            checksums = np.frombuffer(resp.retained_checksums, dtype="<u8").copy()
            if not (np.frombuffer(resp.retained_counts, dtype="<u4") == N).all():
                raise RuntimeError("the steady state broke (retained counts moved)")
            if c >= WARMUP:
                loop_us.append((c1 - c0) / B * 1e6)
                outside_us.append(((e1 - e0) - (inside[0] - i0)) / B * 1e6)
                engine_ms.append((inside[0] - i0) * 1e3)
        return {"B": B, "N": N, "steps": steps, "loop_us": statistics.median(loop_us),
                "engine_thread_outside_us": statistics.median(outside_us),
                "engine_ms_per_call": statistics.median(engine_ms),
                "parts_us": {k: v / (steps * B) * 1e6 for k, v in acc.most_common()}}
    finally:
        await mgr.shutdown()


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--sessions", type=int, default=64)
    ap.add_argument("--slots", type=int, default=4096)
    ap.add_argument("--steps", type=int, default=20)
    ap.add_argument("--json", default=None)
    args = ap.parse_args()
    torch.set_num_threads(1)
    out = asyncio.run(measure(args.sessions, args.slots, args.steps))
    print(f"B = {out['B']}, N = {out['N']}, {out['steps']} decode RPCs (medians, CPU us per session-step): "
          f"event loop {out['loop_us']:.1f}, engine thread outside the engine call "
          f"{out['engine_thread_outside_us']:.1f}; engine call {out['engine_ms_per_call']:.1f} CPU ms")
    for label, us in out["parts_us"].items():
        print(f"  {label}: {us:.1f}")
    if args.json:
        with open(args.json, "w") as fh:
            json.dump(out, fh, indent=1)


if __name__ == "__main__":
    main()
