"""Drills: Redis killed and restarted mid-stream (AOF), and Redis hung (SIGSTOP) mid-stream, under
a real ``nexus-sidecar serve`` process and real workers (RemoteBackend). The sidecar serves from
hot state meanwhile, so every answer equals an uninterrupted in-process engine's (no failover:
the protocol promises identical answers), no step fails, and checkpoints catch up afterwards."""

from __future__ import annotations

import os
import signal
import subprocess
import threading
import time
from collections.abc import Callable
from pathlib import Path

import pytest
import redis
import torch
from nexus_client.client import ClientOptions
from nexus_client.hf.accumulate import StepTensors
from nexus_client.hf.remote import RemoteBackend
from nexus_sidecar.bench.procs import sidecar_process
from nexus_sidecar.server.checkpoint import load

from tests.server.conftest import SMALL, Reference, SimSession

pytestmark = pytest.mark.timeout(180)
SESSIONS, STEPS, FAULT_AT = 4, 30, 10


def _stream(target: str, fault: Callable[[], None], heal: Callable[[], None]) -> tuple[list[SimSession], float, int]:
    """Run the streams; inject ``fault`` before round FAULT_AT and ``heal`` 1.5 s later. Returns the
    sessions, the longest round (s) and the number of steps compared with the reference."""
    backend = RemoteBackend(ClientOptions(target, timeout_s=5.0))
    ref = Reference()
    sims = []
    for i in range(SESSIONS):
        ws = backend.open(SMALL)
        sim = SimSession(ws.session_id, seed=40 + i)
        sim.ws = ws
        ref.open(sim)
        sims.append(sim)
    healer: threading.Timer | None = None
    longest, compared = 0.0, 0
    try:
        for rnd in range(STEPS):
            if rnd == FAULT_AT:
                fault()
                healer = threading.Timer(1.5, heal)
                healer.start()
            t0 = time.monotonic()
            for sim in sims:
                p = sim.make()
                d = backend.step(sim.ws, StepTensors(p.inp.new_positions, p.inp.attn, p.inp.last, p.inp.edge_pos,
                                                     p.inp.edge_w))
                out = ref.step(sim, p)
                assert torch.equal(d.keep, out.keep), f"{sim.session_id} step {p.msg.step} differs from the engine"
                compared += 1
                for g in range(sim.cfg.groups):
                    slots = torch.cat([sim.retained[g], p.new])
                    sim.retained[g] = slots[d.keep[g, : slots.numel()]]
                sim.next_pos = int(p.new[-1]) + 1
            longest = max(longest, time.monotonic() - t0)
            time.sleep(0.05)
    finally:
        if healer is not None:
            healer.join()
        backend.shutdown()
    assert backend.resyncs == 0, "no failover happened: nothing to resync"
    return sims, longest, compared


def _stored_steps(port: int, sims: list[SimSession]) -> list[int]:
    with redis.Redis(port=port, socket_timeout=2) as r:
        recs = [r.hmget(f"nexus:{{default:{s.session_id}}}:state", "blob", "delta") for s in sims]
    return [load(b, d).checkpoint.step if b else -1 for b, d in recs]


def _args(url: str) -> tuple[str, ...]:
    return ("--device", "cpu", "--store", url, "--checkpoint-every", "2", "--store-timeout-s", "0.5",
            "--max-delay-us", "200", "--torch-threads", "1")


def test_redis_killed_and_restarted_mid_stream(redis_factory, tmp_path: Path,
                                               capsys: pytest.CaptureFixture[str]) -> None:
    rp = redis_factory("--appendonly", "yes", "--appendfsync", "always")
    procs: list[subprocess.Popen[bytes]] = []

    def kill() -> None:
        rp.proc.send_signal(signal.SIGKILL)
        rp.proc.wait(timeout=5)

    def restart() -> None:
        procs.append(subprocess.Popen(
            ["redis-server", "--port", str(rp.port), "--bind", "127.0.0.1", "--save", "", "--appendonly", "yes",
             "--appendfsync", "always", "--dir", str(rp.dir)], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL))

    try:
        with sidecar_process(*_args(rp.url), log_path=tmp_path / "sc.log") as sc:
            sims, longest, compared = _stream(sc.target, kill, restart)
            deadline = time.monotonic() + 20
            while time.monotonic() < deadline and min(_stored_steps(rp.port, sims)) < STEPS - 1:
                time.sleep(0.2)
            stored = _stored_steps(rp.port, sims)
    finally:
        for p in procs:
            p.terminate()
            p.wait(timeout=10)
    with capsys.disabled():
        print(f"\nRedis SIGKILL + AOF restart: {compared} steps, all equal to the engine, longest round "
              f"{longest:.2f}s, stored steps after {stored}, sessions lost 0")
    assert min(stored) >= STEPS - 1, stored  # checkpoints caught up (every 2 steps)


def test_redis_hung_mid_stream(redis_factory, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    rp = redis_factory()

    def stop() -> None:
        os.kill(rp.proc.pid, signal.SIGSTOP)

    def cont() -> None:
        os.kill(rp.proc.pid, signal.SIGCONT)

    with sidecar_process(*_args(rp.url), log_path=tmp_path / "sc.log") as sc:
        try:
            sims, longest, compared = _stream(sc.target, stop, cont)
        finally:
            cont()
        deadline = time.monotonic() + 20
        while time.monotonic() < deadline and min(_stored_steps(rp.port, sims)) < STEPS - 1:
            time.sleep(0.2)
        stored = _stored_steps(rp.port, sims)
    with capsys.disabled():
        print(f"\nRedis SIGSTOP 1.5 s: {compared} steps, all equal to the engine, longest round {longest:.2f}s, "
              f"stored steps after {stored}, sessions lost 0")
    assert longest < 2.0, longest  # a hung Redis costs a bounded fence timeout, not a store timeout per step
    assert min(stored) >= STEPS - 1, stored
