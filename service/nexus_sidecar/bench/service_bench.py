"""Service benchmark: end-to-end session-steps/s and step latency over real gRPC, next to a bare
``grpc.aio`` echo of the same payload bytes and the engine alone at the same shapes, in one run.

The sidecar and the echo server run as separate processes (as in production). The load generator
(asyncio tasks of this process, one channel each) replays pre-built request bytes with a few
fixed-width fields patched per step (:mod:`nexus_sidecar.bench.replay`), so it takes little of the
machine it shares with the server; its CPU per session-step is reported (``loadgen_cpu_us``).

Server CPU is read from the server process's own clock (``/proc/<pid>/stat``) over the decode
window: ``server_cpu_us`` per session-step in all, and ``server_cpu_us_excl_engine`` without the
engine thread's CPU time inside ``Engine.step`` (``nexus_engine_compute_cpu_seconds``): decoding,
validation, batching, answers, metrics, gRPC, the event loop.
"""

from __future__ import annotations

import asyncio
import itertools
import os
import statistics
import tempfile
import time
from dataclasses import dataclass
from typing import Any

import grpc
import torch
from nexus_client.columnar import BatchBuilder
from nexus_client.packing import WorkerSession, pack_step
from nexus_client.v1 import sidecar_pb2 as pb

from nexus_sidecar.bench import checkpoint_bench, engine_bench, replay, server_profile
from nexus_sidecar.bench.echo_server import METHOD
from nexus_sidecar.bench.procs import echo_process, redis_process, sidecar_process
from nexus_sidecar.bench.report import machine, markdown_table
from nexus_sidecar.bench.workers import Workload


@dataclass
class ServiceBenchSettings:
    """The grid."""

    batch_sizes: tuple[int, ...] = (1, 8, 64, 256)
    slots: tuple[int, ...] = (4096,)
    stores: tuple[str, ...] = ("memory", "redis")
    workers: tuple[int, ...] = (2,)
    steps: int = 40
    echo_calls: int = 40
    device: str = "auto"  # the server's engine device, and the engine-alone reference's (auto: CUDA if present)
    profile_dir: str | None = None  # py-spy the server over the decode window at B = 64 (raw files go here)

    @classmethod
    def quick(cls) -> ServiceBenchSettings:
        """B = 8 and 64, N = 4096, both stores, 2 workers, fewer steps: a few minutes here."""
        return cls(batch_sizes=(8, 64), slots=(4096,), stores=("memory", "redis"), workers=(2,), steps=15,
                   echo_calls=15)


def overhead(rec: dict[str, Any]) -> dict[str, float]:
    """The server's cost beyond the engine, from one record's throughput and engine time.

    ``service_ms_per_rpc`` is the wall time one B-session RPC takes at the measured throughput
    (B / session-steps per second, over all workers); the engine alone takes
    ``engine_ms_per_call`` for the same B x N call. What is left, spread over the B
    session-steps, is the server's overhead per session-step: gRPC, decoding, validation,
    batching, encoding, metrics, checkpoints (and the load generator's own packing, which shares
    the machine). ``service_vs_engine_time`` is their ratio (1.0 = the engine is the only cost).
    """
    B = rec["B"]
    per_rpc_ms = 1e3 * B / rec["service_session_steps_per_s"]
    return {"service_ms_per_rpc": per_rpc_ms,
            "server_overhead_us_per_session_step": (per_rpc_ms - rec["engine_ms_per_call"]) * 1e3 / B,
            "service_vs_engine_time": per_rpc_ms / rec["engine_ms_per_call"]}


def _config(n: int) -> dict[str, Any]:
    return {"policy": "nexus", "budget": n, "recent": 32, "fanout": 8, "iterations": 2}


def process_cpu_seconds(pid: int) -> float:
    """CPU seconds of a process so far: the sum of :func:`thread_cpu_seconds` (nanosecond clocks)."""
    return sum(thread_cpu_seconds(pid).values())


def thread_cpu_seconds(pid: int) -> dict[str, float]:
    """CPU seconds per thread name of a process (``/proc/<pid>/task``; threads of one name summed,
    trailing digits dropped: the gRPC core's and the executors' threads group together).

    Each thread's clock is its scheduler's nanosecond count (``schedstat``), not ``stat``'s
    10 ms ticks: a B = 64 echo window of 30 RPCs is ~50 ms of CPU, which ticks resolve to +-20 %.
    """
    out: dict[str, float] = {}
    for tid in os.listdir(f"/proc/{pid}/task"):
        try:
            with open(f"/proc/{pid}/task/{tid}/comm") as f:
                name = f.read().strip().rstrip("0123456789_-") or "?"
            with open(f"/proc/{pid}/task/{tid}/schedstat") as f:
                seconds = int(f.read().split()[0]) / 1e9
        except OSError:  # the thread ended meanwhile (the sidecar's and the echo's live as long as they do)
            continue
        out[name] = out.get(name, 0.0) + seconds
    return out


class _DecodeWindow:
    """The workers' prefill barrier, which also scrapes the sidecar's /metrics and reads the server's
    and this process's CPU clocks as the decode phase starts (and ``close`` as it ends): the
    server-side figures cover decode RPCs only."""

    def __init__(self, workers: int, http_port: int | None, pid: int | None = None, profile: str | None = None
                 ) -> None:
        self._barrier, self._end = asyncio.Barrier(workers), asyncio.Barrier(workers)
        self._port, self._pid = http_port, pid
        self.before = self.after = ""
        self.cpu = {"server": 0.0, "loadgen": 0.0}
        self.threads: dict[str, float] = {}  # server CPU seconds by thread name over the window
        self._profile, self._spy = profile, None  # py-spy of the server over the window (server_profile.py)

    async def wait(self) -> int:
        index = await self._barrier.wait()
        if index == 0:
            if self._port is not None:
                self.before = await asyncio.to_thread(checkpoint_bench.scrape, self._port)
            if self._profile is not None and self._pid is not None:
                self._spy = server_profile.start(self._pid, self._profile)
            self._clocks(-1.0)
        return index

    def _clocks(self, sign: float) -> None:
        if self._pid is not None:
            self.cpu["server"] += sign * process_cpu_seconds(self._pid)
            for name, seconds in thread_cpu_seconds(self._pid).items():
                self.threads[name] = self.threads.get(name, 0.0) + sign * seconds
        self.cpu["loadgen"] += sign * time.process_time()

    async def end(self) -> None:
        """Every worker's last decode call is answered (before any session closes)."""
        if await self._end.wait() == 0:
            await self.close()

    async def close(self) -> None:
        self._clocks(1.0)
        if self._spy is not None:
            await asyncio.to_thread(server_profile.stop, self._spy)
        if self._port is not None:
            self.after = await asyncio.to_thread(checkpoint_bench.scrape, self._port)


def server_side(before: str, after: str) -> dict[str, float]:
    """What the sidecar itself measured over the decode window (its /metrics before and after).

    ``server_overhead_us_server_side``: per session-step, the Step/StepBatch handler time that is
    neither waiting in the micro-batcher (for another RPC's engine call) nor the engine call itself:
    parsing, validation, decoding, thread hand-offs, answers, metrics (no client, no transport).
    Each RPC's engine time is its call's; RPCs merged into one call share it (counted per RPC).
    """
    def total(name: str, **labels: str) -> float:
        return checkpoint_bench._total(after, name, **labels) - checkpoint_bench._total(before, name, **labels)

    req_s = sum(total("nexus_request_duration_seconds_sum", rpc=r, code="OK") for r in ("Step", "StepBatch"))
    rpcs = sum(total("nexus_request_duration_seconds_count", rpc=r, code="OK") for r in ("Step", "StepBatch"))
    calls = total("nexus_engine_compute_seconds_count")
    compute_s = total("nexus_engine_compute_seconds_sum")
    # One queue-wait sample per queued part of an RPC (per session step where each step is a job):
    # the mean sample is what one RPC waited.
    queue_s = total("nexus_queue_wait_seconds_sum") / max(1.0, total("nexus_queue_wait_seconds_count")) * rpcs
    steps = total("nexus_batch_sessions_sum")
    if not rpcs or not calls or not steps:
        return {}
    # Merged RPCs (rpcs > calls) each wait for their whole call; a split RPC waits for all its calls.
    engine_attributed = compute_s * max(1.0, rpcs / calls)
    return {"server_ms_per_rpc": 1e3 * req_s / rpcs, "server_engine_ms_per_call": 1e3 * compute_s / calls,
            "server_queue_ms_per_rpc": 1e3 * queue_s / rpcs,
            "server_overhead_us_server_side": 1e6 * (req_s - queue_s - engine_attributed) / steps}


async def _run_workers(target: str, B: int, N: int, workers: int, steps: int, http_port: int | None = None,
                       pid: int | None = None, profile: str | None = None) -> dict[str, Any]:
    t0 = time.perf_counter()
    window = _DecodeWindow(workers, http_port, pid, profile)
    stats = await replay.run_workers(target, B, N, workers, steps, _config(N), window)
    wall = time.perf_counter() - t0
    lat = sorted(itertools.chain.from_iterable(s.rpc_seconds for s in stats))
    # Throughput over the decode phase: the slowest worker's decode window bounds it.
    decode_s = max(s.seconds for s in stats)
    session_steps = sum(s.session_steps for s in stats)
    out = {
        "service_session_steps_per_s": session_steps / decode_s,
        "p50_ms": statistics.median(lat) * 1e3,
        "p99_ms": lat[min(len(lat) - 1, int(0.99 * len(lat)))] * 1e3,
        "bytes_per_rpc": sum(s.bytes_sent for s in stats) / max(1, len(lat)),
        "wall_s": wall,
        "loadgen_cpu_us": 1e6 * window.cpu["loadgen"] / session_steps,
        **(server_side(window.before, window.after) if http_port is not None else {}),
    }
    if profile is not None:
        out["profile"] = server_profile.summarize(profile)
    if pid is not None:
        out["server_cpu_us"] = 1e6 * window.cpu["server"] / session_steps
        # By thread (threads that started or ended inside the window count what they ran in it, or less).
        out["server_cpu_us_by_thread"] = {name: 1e6 * max(0.0, sec) / session_steps
                                          for name, sec in sorted(window.threads.items()) if sec > 0}
        if http_port is not None:
            engine_cpu = (checkpoint_bench._total(window.after, "nexus_engine_compute_cpu_seconds_total")
                          - checkpoint_bench._total(window.before, "nexus_engine_compute_cpu_seconds_total"))
            out["server_cpu_us_excl_engine"] = 1e6 * (window.cpu["server"] - engine_cpu) / session_steps
            calls = (checkpoint_bench._total(window.after, "nexus_engine_compute_seconds_count")
                     - checkpoint_bench._total(window.before, "nexus_engine_compute_seconds_count"))
            out["server_engine_cpu_ms_per_call"] = 1e3 * engine_cpu / max(1.0, calls)
    return out


async def _echo(target: str, B: int, N: int, workers: int, calls: int, pid: int | None = None) -> dict[str, float]:
    """The same request bytes (B sessions at N slots, the form the workers send) through a bare echo,
    same concurrency. ``echo_cpu_us``: the echo process's CPU per session carried (``pid``), the
    transport's floor for ``server_cpu_us_excl_engine``."""
    ws = WorkerSession("echo", groups=1, step=1, retained_count=N)
    new = torch.tensor([N])
    attn = torch.rand(1, N + 1)
    edge_pos = (new.view(1, 1) - torch.arange(8).view(1, 8))[None]
    edge_w = torch.rand(1, 1, 8)
    if Workload().columnar:
        batch = BatchBuilder(torch.float16)
        for i in range(B):
            batch.add(WorkerSession(f"echo{i}", groups=1, step=1, retained_count=N), new, attn, attn, edge_pos, edge_w)
        payload = batch.request().SerializeToString()
    else:
        one = pack_step(ws, new, attn, attn, edge_pos, edge_w, float_dtype=torch.float16)
        payload = pb.StepRequest(steps=[one] * B).SerializeToString()
    size = 64 * 1024 * 1024
    lat: list[float] = []

    async def worker() -> None:
        async with grpc.aio.insecure_channel(target, options=[("grpc.max_send_message_length", size),
                                                              ("grpc.max_receive_message_length", size)]) as ch:
            call = ch.unary_unary(METHOD)
            await call(payload)
            for _ in range(calls):
                t0 = time.perf_counter()
                await call(payload, timeout=60)
                lat.append(time.perf_counter() - t0)

    cpu0 = process_cpu_seconds(pid) if pid is not None else 0.0
    await asyncio.gather(*(worker() for _ in range(workers)))
    cpu = process_cpu_seconds(pid) - cpu0 if pid is not None else float("nan")
    lat.sort()
    return {"echo_cpu_us": 1e6 * cpu / (B * workers * (calls + 1)), "echo_p50_ms": statistics.median(lat) * 1e3,
            "echo_p99_ms": lat[min(len(lat) - 1, int(0.99 * len(lat)))] * 1e3, "echo_bytes_per_rpc": len(payload)}


def run(settings: ServiceBenchSettings, progress: bool = True) -> dict[str, Any]:
    """Measure the grid; returns the JSON payload."""
    import gc

    from tqdm import tqdm

    gc.freeze()  # the load generator, like the sidecar, keeps its start-up heap out of the cyclic GC
    grid = list(itertools.product(settings.stores, settings.batch_sizes, settings.slots, settings.workers))
    device = settings.device if settings.device != "auto" else ("cuda" if torch.cuda.is_available() else "cpu")
    records = []
    engine_ref: dict[tuple[int, int], dict[str, Any]] = {}
    bar = tqdm(total=len(grid), desc="service", disable=not progress)
    with echo_process() as echo:
        for store in settings.stores:
            with (redis_process() if store == "redis" else _null()) as redis_url:
                args = ["--store", redis_url, "--checkpoint-every", "16"] if store == "redis" else []
                threads = str(torch.get_num_threads())
                # max_batch = the largest B: every RPC is one engine call, like the engine-only column.
                max_batch = str(max(settings.batch_sizes))
                # Its log goes to a file: an undrained pipe fills up (e.g. a burst of checkpoint
                # warnings) and blocks the sidecar mid-run.
                log_path = os.path.join(tempfile.gettempdir(), f"nexus-bench-service-{os.getpid()}-{store}.log")
                with sidecar_process(*args, "--max-batch", max_batch, "--max-delay-us", "500", "--torch-threads",
                                     threads, "--device", device, log_path=log_path) as sc:
                    for _, B, N, W in (g for g in grid if g[0] == store):
                        rec: dict[str, Any] = {"B": B, "N": N, "store": store, "workers": W, "device": device}
                        before = checkpoint_bench.scrape(sc.http_port) if store == "redis" else None
                        spy = None if settings.profile_dir is None or B != 64 else \
                            os.path.join(settings.profile_dir, f"profile-{store}-B{B}.txt")
                        rec.update(asyncio.run(_run_workers(sc.target, B, N, W, settings.steps, sc.http_port,
                                                            sc.proc.pid, spy)))
                        if before is not None:
                            rec.update(checkpoint_bench.service_columns(before, checkpoint_bench.scrape(sc.http_port)))
                        rec.update(asyncio.run(_echo(echo.target, B, N, W, settings.echo_calls, echo.pid)))
                        if (B, N) not in engine_ref:
                            # The engine's faster entry is the reference (the columnar one the server uses).
                            engine_ref[(B, N)] = engine_bench.measure("nexus", device, B, N, 8, 2, 10, 2, priors=False,
                                                                      columnar=True)
                        eng = engine_ref[(B, N)]
                        rec["engine_ms_per_call"] = eng["ms_per_call"]
                        rec["engine_cpu_ms_per_call"] = eng["cpu_ms_per_call"]
                        rec["engine_session_steps_per_s"] = eng["session_steps_per_s"]
                        rec["engine_ms_per_call_step"] = eng.get("ms_per_call_step")
                        rec["engine_ms_per_call_step_batch"] = eng.get("ms_per_call_step_batch")
                        rec["throughput_vs_engine"] = rec["service_session_steps_per_s"] / eng["session_steps_per_s"]
                        rec["p99_target_ms"] = 2 * (rec["echo_p99_ms"] + eng["ms_per_call"])
                        rec.update(overhead(rec))
                        records.append(rec)
                        bar.update()
    bar.close()
    return {"benchmark": "service", "machine": machine(), "torch_threads": torch.get_num_threads(),
            "records": records}


class _null:
    def __enter__(self) -> str:
        return "memory"

    def __exit__(self, *exc: object) -> None:
        return None


def table(payload: dict[str, Any]) -> str:
    """Markdown table (and the server profiles, when taken)."""
    profiles = "".join(f"\n\nServer profile, {r['store']} store, B = {r['B']} (py-spy over the decode window):\n\n"
                       + server_profile.table(r["profile"]) for r in payload["records"] if "profile" in r)
    return markdown_table(payload["records"], [
        "store", "device", "B", "N", "workers", "service_session_steps_per_s", "engine_session_steps_per_s",
        "throughput_vs_engine", "server_cpu_us", "server_cpu_us_excl_engine", "echo_cpu_us", "loadgen_cpu_us",
        "server_overhead_us_per_session_step", "server_overhead_us_server_side",
        "service_vs_engine_time", "p50_ms", "p99_ms", "echo_p50_ms", "echo_p99_ms", "engine_ms_per_call",
        "server_engine_ms_per_call", "engine_cpu_ms_per_call", "server_engine_cpu_ms_per_call", "p99_target_ms",
        *checkpoint_bench.SERVICE_COLUMNS]) + profiles


def plot(payload: dict[str, Any], path: str) -> None:
    """Throughput (service vs engine), p99 latency and server overhead per session-step vs B, per store."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    recs = payload["records"]
    fig, (a, b, c) = plt.subplots(1, 3, figsize=(15, 4))
    for store in sorted({r["store"] for r in recs}):
        pts = sorted(((r["B"], r) for r in recs if r["store"] == store), key=lambda p: p[0])
        xs = [p[0] for p in pts]
        a.plot(xs, [p[1]["service_session_steps_per_s"] for p in pts], marker="o", label=f"service ({store})")
        b.plot(xs, [p[1]["p99_ms"] for p in pts], marker="o", label=f"p99 ({store})")
        c.plot(xs, [p[1]["server_overhead_us_per_session_step"] for p in pts], marker="o", label=store)
    pts = sorted({r["B"]: r for r in recs}.items())
    a.plot([p[0] for p in pts], [p[1]["engine_session_steps_per_s"] for p in pts], "k--", label="engine alone")
    b.plot([p[0] for p in pts], [p[1]["echo_p99_ms"] for p in pts], "k:", label="echo p99")
    b.plot([p[0] for p in pts], [p[1]["p99_target_ms"] for p in pts], "r--", label="p99 goal")
    c.axhline(50, color="r", linestyle="--", label="goal (50 us)")
    for ax, title in ((a, "session-steps/s"), (b, "step RPC latency (ms)"), (c, "server overhead (us / session-step)")):
        ax.set_xscale("log", base=2)
        ax.set_xlabel("sessions per RPC (B)")
        ax.set_title(title)
        ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
