"""Local fallback: while the sidecar is unreachable, RemoteBackend(fallback="streaming") keeps every
cache within budget by itself (StreamingLLM) without stalling, and once a sidecar answers again it
resyncs each session from the worker's truth and goes on: 0 sessions lost."""

from __future__ import annotations

import signal
import threading
import time
from pathlib import Path

import pytest
import torch
from nexus_client.client import ClientOptions, NexusClient
from nexus_client.fallback import Budget, advance_locally, streaming_keep
from nexus_client.hf.accumulate import StepTensors
from nexus_client.hf.remote import RemoteBackend
from nexus_client.packing import WorkerSession, checksum_of
from nexus_sidecar.bench.procs import free_port, sidecar_process

from tests.server.conftest import SMALL, SimSession

pytestmark = pytest.mark.timeout(240)


def test_streaming_keep_is_sinks_plus_recent() -> None:
    ws = WorkerSession("s", groups=2, positions=[torch.arange(10), torch.arange(4)])
    keep = streaming_keep(ws, torch.arange(10, 13), 13, Budget(budget=8, slack=2, sinks=2))
    assert keep[0].tolist() == [True, True] + [False] * 5 + [True] * 6  # 13 > 10: 2 sinks + 6 recent
    assert keep[1, :7].all() and not keep[1, 7:].any()  # 7 <= 10: all kept, padding False
    evicted = advance_locally(ws, torch.arange(10, 13), keep)
    assert ws.positions[0].tolist() == [0, 1, 7, 8, 9, 10, 11, 12] and evicted[0].tolist() == [2, 3, 4, 5, 6]
    assert ws.step == 1 and ws.retained_count == 8 + 7 and ws.retained_checksum == checksum_of(ws.positions)


def test_the_worker_evicts_locally_through_an_outage_and_resyncs_after(tmp_path: Path,
                                                                         capsys: pytest.CaptureFixture[str]) -> None:
    ports = (free_port(), free_port())
    args = ("--device", "cpu", "--max-delay-us", "200", "--torch-threads", "1")
    backend = RemoteBackend(ClientOptions(f"127.0.0.1:{ports[0]}", timeout_s=5.0), fallback="streaming",
                            fallback_after_s=0.5, probe_every_s=0.5)
    sims: list[SimSession] = []
    longest = 0.0
    b_ready = threading.Event()
    holder: dict[str, object] = {}

    def step_all() -> None:
        nonlocal longest
        t0 = time.monotonic()
        for sim in sims:
            p = sim.make()
            d = backend.step(sim.ws, StepTensors(p.inp.new_positions, p.inp.attn, p.inp.last, p.inp.edge_pos,
                                                 p.inp.edge_w))
            for g in range(sim.cfg.groups):
                slots = torch.cat([sim.retained[g], p.new])
                sim.retained[g] = slots[d.keep[g, : slots.numel()]]
                assert sim.retained[g].numel() <= sim.cfg.budget + sim.cfg.slack  # within budget, always
            sim.next_pos = int(p.new[-1]) + 1
        longest = max(longest, time.monotonic() - t0)

    with sidecar_process(*args, ports=ports, log_path=tmp_path / "a.log") as a:
        for i in range(3):
            ws = backend.open(SMALL)
            sim = SimSession(ws.session_id, seed=60 + i)
            sim.ws = ws
            sims.append(sim)
        for _ in range(8):
            step_all()
        a.proc.send_signal(signal.SIGKILL)
        a.proc.wait(timeout=10)

    def start_b() -> None:  # the replacement (memory store: it knows nothing of the sessions)
        cm = sidecar_process(*args, ports=ports, log_path=tmp_path / "b.log")
        holder["b"] = cm.__enter__()
        holder["cm"] = cm
        b_ready.set()

    starter = threading.Thread(target=start_b, daemon=True)
    starter.start()
    local_before = backend.local_calls
    rounds_after_b = 0
    deadline = time.monotonic() + 150
    while rounds_after_b < 6 and time.monotonic() < deadline:
        step_all()
        time.sleep(0.1)
        if b_ready.is_set() and backend.resyncs >= len(sims):
            rounds_after_b += 1
    starter.join(timeout=60)
    try:
        assert backend.local_calls > local_before, "the outage was served locally"
        assert backend.resyncs == len(sims) and rounds_after_b == 6, (backend.resyncs, rounds_after_b)
        with NexusClient(ClientOptions(f"127.0.0.1:{ports[0]}", retries=0)) as c:
            for sim in sims:  # 0 lost: the sidecar agrees with every worker
                snap = c.get_session(sim.session_id)
                assert snap.step == sim.ws.step and snap.retained_checksum == checksum_of(sim.retained)
        with capsys.disabled():
            print(f"\nfallback drill: {backend.local_calls} calls decided locally during the outage, "
                  f"{backend.resyncs} resyncs, longest round {longest:.2f}s, sessions lost 0")
        assert longest < 3.0, longest  # never the 20 s retry budget: the worker does not stall
    finally:
        holder["cm"].__exit__(None, None, None)  # type: ignore[attr-defined]
