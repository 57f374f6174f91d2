"""``nexus-sidecar bench soak``: several tenants' workers against one real ``serve`` process for a
fixed duration, with session churn (streams end, are closed, new ones open). Reports errors by
code, p50/p99 latency and the sidecar's RSS per time window, and the RSS growth after warm-up.

Each worker is an asyncio task with its own channel and API key: it opens ``sessions`` sessions,
prefills them, decodes ``stream`` calls of one token each (one Step RPC carrying every session),
closes them and starts over with new ids until the time is up.
"""

from __future__ import annotations

import asyncio
import secrets
import statistics
import tempfile
import time
import zlib
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch
from nexus_client.client import AsyncNexusClient, ClientOptions
from nexus_client.errors import SidecarError
from nexus_client.packing import WorkerSession, pack_step, unpack_result

from nexus_sidecar.bench.procs import redis_process, sidecar_process
from nexus_sidecar.bench.report import machine, markdown_table


@dataclass
class SoakSettings:
    """What the soak runs."""

    duration_s: float = 60.0
    tenants: int = 3
    workers_per_tenant: int = 2
    sessions: int = 4  # per worker, all stepped in one RPC
    prefill: int = 64
    stream: int = 150  # decode calls before a worker's sessions are closed and replaced
    window_s: float = 5.0
    warmup_frac: float = 0.25  # RSS growth is measured from the end of this share of the run
    redis: bool = False  # a real redis-server as the store (else the memory store)
    config: dict[str, Any] = field(default_factory=lambda: {"policy": "nexus", "budget": 64, "fanout": 8})


@dataclass
class _Call:
    t: float  # seconds since the start
    seconds: float
    code: str


def _rss_mb(pid: int) -> float:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    return float("nan")


async def _worker(name: str, target: str, key: str, s: SoakSettings, t0: float, end: float,
                  calls: list[_Call]) -> int:
    client = AsyncNexusClient(ClientOptions(target, api_key=key, timeout_s=30.0))
    g = torch.Generator().manual_seed(zlib.crc32(name.encode()))
    fan = int(s.config.get("fanout", 8))
    generation = streams = 0
    try:
        while time.monotonic() < end:
            ids = [f"{name}-g{generation}-s{i}" for i in range(s.sessions)]
            generation += 1
            for sid in ids:
                await client.open_session(sid, s.config)
            wss = [WorkerSession(sid, groups=1) for sid in ids]
            retained = [torch.zeros(0, dtype=torch.int64) for _ in ids]
            nxt = 0
            for call in range(s.stream + 1):
                if time.monotonic() >= end:
                    break
                k = s.prefill if call == 0 else 1
                new = torch.arange(nxt, nxt + k)
                nxt += k
                msgs = []
                for ws, r in zip(wss, retained, strict=True):
                    slots = torch.cat([r, new])
                    attn = torch.rand(1, slots.numel(), generator=g) ** 3
                    edges = (new.view(k, 1) - torch.arange(fan).view(1, fan)).clamp(min=0)[None]
                    msgs.append(pack_step(ws, new, attn * k, attn, edges, torch.rand(1, k, fan, generator=g)))
                start = time.monotonic()
                try:
                    results = await client.step(msgs)
                    code = "OK"
                except SidecarError as exc:
                    results, code = [], exc.code.name
                calls.append(_Call(start - t0, time.monotonic() - start, code))
                if code != "OK":
                    break  # the stream is broken: counted, start a new one
                for i, (ws, res) in enumerate(zip(wss, results, strict=True)):
                    ws.apply(res)
                    keep, _ = unpack_result(res)
                    slots = torch.cat([retained[i], new])
                    retained[i] = slots[keep[0, : slots.numel()]]
            for sid in ids:
                await client.close_session(sid)
            streams += 1
    finally:
        await client.close()
    return streams


def run(s: SoakSettings, progress: bool = True) -> dict[str, Any]:
    """Run the soak against a fresh sidecar process; returns the payload (see module docstring)."""
    with tempfile.TemporaryDirectory() as d:
        keys = {f"tenant{i}": secrets.token_urlsafe(24) for i in range(s.tenants)}
        keys_file = Path(d) / "keys"
        keys_file.write_text("".join(f"{t} {k} rw\n" for t, k in keys.items()))
        store_cm = redis_process() if s.redis else None
        url = store_cm.__enter__() if store_cm is not None else "memory"
        try:
            args = ("--device", "cpu", "--torch-threads", "1", "--keys-file", str(keys_file), "--store", url,
                    "--max-delay-us", "300")
            with sidecar_process(*args, log_path=Path(d) / "sidecar.log") as sc:
                payload = asyncio.run(_drive(sc.target, sc.proc.pid, keys, s, progress))
                log_text = (Path(d) / "sidecar.log").read_text(errors="replace")
        finally:
            if store_cm is not None:
                store_cm.__exit__(None, None, None)
    payload["tracebacks_in_log"] = log_text.count("Traceback")
    return payload


async def _drive(target: str, pid: int, keys: dict[str, str], s: SoakSettings, progress: bool) -> dict[str, Any]:
    calls: list[_Call] = []
    rss: list[tuple[float, float]] = []
    t0 = time.monotonic()
    end = t0 + s.duration_s

    async def sample() -> None:
        while time.monotonic() < end:
            rss.append((time.monotonic() - t0, _rss_mb(pid)))
            if progress and len(rss) % 10 == 0:
                print(f"  soak {rss[-1][0]:5.0f}s  rss {rss[-1][1]:6.0f} MiB  rpcs {len(calls)}", flush=True)
            await asyncio.sleep(1.0)

    workers = [_worker(f"{t}-w{w}", target, key, s, t0, end, calls)
               for t, key in keys.items() for w in range(s.workers_per_tenant)]
    results = await asyncio.gather(sample(), *workers)
    rss.append((time.monotonic() - t0, _rss_mb(pid)))
    windows = []
    n_windows = max(1, round(s.duration_s / s.window_s))
    for i in range(n_windows):
        lo, hi = i * s.window_s, (i + 1) * s.window_s
        lat = sorted(c.seconds for c in calls if lo <= c.t < hi and c.code == "OK")
        in_rss = [m for t, m in rss if lo <= t < hi] or [rss[-1][1]]
        windows.append({
            "t_s": hi, "rpcs": sum(1 for c in calls if lo <= c.t < hi),
            "errors": sum(1 for c in calls if lo <= c.t < hi and c.code != "OK"),
            "p50_ms": statistics.median(lat) * 1e3 if lat else float("nan"),
            "p99_ms": lat[min(len(lat) - 1, int(0.99 * len(lat)))] * 1e3 if lat else float("nan"),
            "rss_mb": max(in_rss),
        })
    warm = [m for t, m in rss if t >= s.warmup_frac * s.duration_s]
    growth = (rss[-1][1] - warm[0]) / warm[0] if warm else float("nan")
    codes: dict[str, int] = {}
    for c in calls:
        codes[c.code] = codes.get(c.code, 0) + 1
    return {"settings": asdict(s), "machine": machine(), "windows": windows, "codes": codes, "rpcs": len(calls),
            "errors": sum(v for k, v in codes.items() if k != "OK"), "streams": sum(results[1:]),
            "rss_after_warmup_mb": warm[0] if warm else float("nan"), "rss_end_mb": rss[-1][1],
            "rss_growth": growth, "rss": rss}


def table(payload: dict[str, Any]) -> str:
    """Per-window table plus a summary line."""
    rows = markdown_table(payload["windows"], ["t_s", "rpcs", "errors", "p50_ms", "p99_ms", "rss_mb"])
    s = payload["settings"]
    return (f"{rows}\n\n{s['tenants']} tenants x {s['workers_per_tenant']} workers x {s['sessions']} sessions, "
            f"{s['duration_s']:.0f} s, store {'redis' if s['redis'] else 'memory'}: {payload['rpcs']} Step RPCs, "
            f"{payload['streams']} streams completed, codes {payload['codes']}, errors {payload['errors']}, "
            f"RSS {payload['rss_after_warmup_mb']:.0f} MiB after warm-up -> {payload['rss_end_mb']:.0f} MiB at the "
            f"end ({payload['rss_growth'] * 100:+.1f} %), tracebacks in the log {payload.get('tracebacks_in_log', 0)}")


def plot(payload: dict[str, Any], path: str) -> None:
    """Latency p50/p99 and RSS over time."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    w = payload["windows"]
    fig, (a, b) = plt.subplots(1, 2, figsize=(10, 3.5))
    t = [x["t_s"] for x in w]
    a.plot(t, [x["p50_ms"] for x in w], marker="o", label="p50")
    a.plot(t, [x["p99_ms"] for x in w], marker="o", label="p99")
    a.set_xlabel("time (s)")
    a.set_ylabel("Step RPC latency (ms)")
    a.legend()
    a.set_title("latency per window")
    b.plot([x[0] for x in payload["rss"]], [x[1] for x in payload["rss"]])
    b.axvline(payload["settings"]["warmup_frac"] * payload["settings"]["duration_s"], color="grey", ls="--",
              label="end of warm-up")
    b.set_xlabel("time (s)")
    b.set_ylabel("sidecar RSS (MiB)")
    b.legend()
    b.set_title(f"RSS growth after warm-up {payload['rss_growth'] * 100:+.1f} %")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
