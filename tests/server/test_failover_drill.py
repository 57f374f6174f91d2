"""Drill: a sidecar SIGKILLed mid-stream and replaced by a new process on the same address
(real processes, a real redis-server). The workers (the HF integration's RemoteBackend, default
retry budget) ride out the restart, resync the sessions the replacement finds behind them
(it resumes from checkpoints up to ``checkpoint_every - 1`` steps old) and finish every stream:
0 sessions lost."""

from __future__ import annotations

import signal
import threading
import time
from pathlib import Path

import pytest
import torch
from nexus_client.client import ClientOptions, NexusClient
from nexus_client.hf.accumulate import StepTensors
from nexus_client.hf.remote import RemoteBackend
from nexus_sidecar.bench.procs import free_port, sidecar_process

from tests.server.conftest import SMALL, SimSession, arun, http, metric_samples

pytestmark = pytest.mark.timeout(240)
SESSIONS, STEPS, KILL_AT = 4, 40, 14  # 14: the last checkpoint (every 4) is 2 steps behind


def _args(url: str) -> tuple[str, ...]:
    return ("--device", "cpu", "--store", url, "--checkpoint-every", "4", "--max-delay-us", "200",
            "--torch-threads", "1")


class Worker(threading.Thread):
    """SESSIONS streams of STEPS calls through one RemoteBackend; records what happened."""

    def __init__(self, target: str) -> None:
        super().__init__(daemon=True)
        self.backend = RemoteBackend(ClientOptions(target, timeout_s=5.0))  # default retry budget
        self.rounds = 0
        self.error: BaseException | None = None
        self.sims: list[SimSession] = []
        self.stall = 0.0  # longest wall time of one round (the outage, as the worker saw it)

    def run(self) -> None:
        try:
            for i in range(SESSIONS):
                ws = self.backend.open(SMALL)
                sim = SimSession(ws.session_id, seed=i)
                sim.ws = ws
                self.sims.append(sim)
            for _ in range(STEPS):
                t0 = time.monotonic()
                for sim in self.sims:
                    p = sim.make()
                    d = self.backend.step(sim.ws, StepTensors(p.inp.new_positions, p.inp.attn, p.inp.last,
                                                              p.inp.edge_pos, p.inp.edge_w))
                    for g in range(sim.cfg.groups):
                        slots = torch.cat([sim.retained[g], p.new])
                        sim.retained[g] = slots[d.keep[g, : slots.numel()]]
                    sim.next_pos = int(p.new[-1]) + 1
                self.stall = max(self.stall, time.monotonic() - t0)
                self.rounds += 1
                time.sleep(0.02)
        except BaseException as exc:
            self.error = exc


def test_sigkill_mid_stream_and_replace(redis_server, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    ports = (free_port(), free_port())
    tgt = f"127.0.0.1:{ports[0]}"
    with sidecar_process(*_args(redis_server.url), ports=ports, log_path=tmp_path / "a.log") as a:
        worker = Worker(tgt)
        worker.start()
        deadline = time.monotonic() + 120
        while worker.rounds < KILL_AT and worker.error is None and time.monotonic() < deadline:
            time.sleep(0.01)
        assert worker.error is None and worker.rounds >= KILL_AT, worker.error
        a.proc.send_signal(signal.SIGKILL)  # mid-stream: the worker keeps sending
        a.proc.wait(timeout=10)
        killed_at = time.monotonic()
    with sidecar_process(*_args(redis_server.url), ports=ports, log_path=tmp_path / "b.log") as b:
        replaced_after = time.monotonic() - killed_at
        worker.join(timeout=180)
        assert not worker.is_alive(), "the worker stalled"
        assert worker.error is None, repr(worker.error)
        assert worker.rounds == STEPS
        with NexusClient(ClientOptions(b.target, retries=0)) as c:
            for sim in worker.sims:  # 0 sessions lost: every stream reached its last step, in agreement
                snap = c.get_session(sim.session_id)
                assert snap.step == STEPS and snap.retained_checksum == sim.ws.retained_checksum
                assert snap.retained_count == sum(r.numel() for r in sim.retained)

        async def metrics() -> str:
            async with http(b.http_port) as h:
                return (await h.get("/metrics")).text

        samples = metric_samples(arun(metrics()))
    resynced = sum(v for n, _, v in samples if n == "nexus_sessions_resynced_total")
    codes = {lab["code"]: v for n, lab, v in samples
             if n == "nexus_request_duration_seconds_count" and lab.get("rpc") == "Step"}
    with capsys.disabled():
        print(f"\nSIGKILL drill: {SESSIONS} sessions x {STEPS} steps, killed after round {KILL_AT}; replacement "
              f"serving {replaced_after:.1f}s after the kill; longest worker round {worker.stall:.1f}s; "
              f"resyncs {worker.backend.resyncs} (server counted {resynced:.0f}); replacement's Step codes {codes}; "
              f"sessions lost 0")
    assert worker.backend.resyncs == resynced >= SESSIONS - 1  # the replacement was behind: resynced
    assert "Traceback" not in (tmp_path / "b.log").read_text()
