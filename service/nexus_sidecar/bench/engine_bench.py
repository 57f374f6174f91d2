"""Engine cost per batched call: B sessions x N retained slots, one new token each (k = 1).

Each session is prefilled to N slots with budget N, so every timed call appends one token and
evicts one (steady state). With ``priors`` (the default) every call also carries the three
query-agnostic priors, as a worker running ``cache_priors`` sends them: every policy pays for their
transfer and validation, Nexus mixes ``key_diversity`` into its walk, keydiff/knorm score by them.
Timing covers ``Engine.step`` end to end (input padding, validation, scoring, selection, compaction,
write-back), median of the timed calls: wall time (``ms_per_call``), and the calling thread's CPU
time (``cpu_ms_per_call``), which a machine shared with other jobs inflates far less (a call that
waits for a core is not charged for the wait); with ``--threads 1`` on CPU all the work is on
that thread. ``x_tova`` is the wall-time ratio to TOVA, ``cpu_x_tova`` the CPU-time one.
"""

from __future__ import annotations

import hashlib
import itertools
import statistics
import sys
import threading
import time
from dataclasses import dataclass
from typing import Any

import torch

from nexus_sidecar.bench.report import machine, markdown_table
from nexus_sidecar.engine import POLICIES, BatchInput, Engine, PolicyConfig, StepInput

ORDER = ("streaming", "tova", "h2o", "snapkv", "random", "keydiff", "knorm", "nexus_topk", "nexus")


@dataclass
class EngineBenchSettings:
    """Grid and repetition counts."""

    batch_sizes: tuple[int, ...] = (1, 8, 64)
    slots: tuple[int, ...] = (1024, 4096)
    fanouts: tuple[int, ...] = (8, 16)
    iterations: tuple[int, ...] = (1, 2, 3)
    policies: tuple[str, ...] = ORDER
    calls: int = 15
    warmup: int = 3
    devices: tuple[str, ...] = ("cpu",)
    priors: bool = True  # every call carries key_diversity, key_norm and value_norm


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize()


def _priors(width: int, g: torch.Generator) -> dict[str, torch.Tensor]:
    return {"key_diversity": torch.rand(1, width, generator=g) * 2 - 1,
            "key_norm": torch.rand(1, width, generator=g) * 20, "value_norm": torch.rand(1, width, generator=g)}


def _steady(policy: str, device: str, B: int, N: int, F: int, R: int, calls: int, priors: bool = True,
            kernels: str | None = None) -> tuple[Engine, list[int], list[dict[int, StepInput]]]:
    """An engine with B sessions prefilled to N slots (budget N) and ``calls`` inputs of one new token each."""
    if POLICIES[policy].requires and not priors:
        raise ValueError(f"policy {policy!r} needs the priors")
    dev = torch.device(device)
    g = torch.Generator().manual_seed(0)
    eng = Engine(dev, kernels=kernels)
    cfg = PolicyConfig(policy=policy, budget=N, sinks=4, recent=32, fanout=F, iterations=R)
    handles = [eng.open(cfg.with_(seed=i)) for i in range(B)]
    # Prefill N tokens per session: random attention, edges to random earlier positions.
    pos = torch.arange(N)
    tgt = (torch.rand(N, F, generator=g) * (pos.unsqueeze(1) + 1)).long()
    prefill = StepInput(pos, torch.rand(1, N, generator=g), torch.rand(1, N, generator=g), tgt[None],
                        torch.rand(1, N, F, generator=g), **(_priors(N, g) if priors else {}))
    eng.step({h: prefill.to(dev) for h in handles})
    inputs = []
    for c in range(calls):
        p = N + c
        # Edges of the new token: itself and recent (protected) tokens, which are always cached.
        e = torch.arange(p, p - F, -1).clamp(min=0)[None, None]
        inputs.append({h: StepInput(torch.tensor([p]), torch.rand(1, N + 1, generator=g),
                                    torch.rand(1, N + 1, generator=g), e, torch.rand(1, 1, F, generator=g),
                                    **(_priors(N + 1, g) if priors else {})).to(dev)
                       for h in handles})
    return eng, handles, inputs


def _batch_input(items: dict[int, StepInput]) -> BatchInput:
    """The columnar form of one call's per-session inputs (every session one group, as ``_steady``'s)."""
    inps = list(items.values())
    return BatchInput(torch.stack([i.new_positions for i in inps]), torch.cat([i.attn for i in inps]),
                      torch.cat([i.last for i in inps]), torch.cat([i.edge_pos for i in inps]),
                      torch.cat([i.edge_w for i in inps]), [i.attn.shape[0] for i in inps],
                      {name: torch.cat([getattr(i, name) for i in inps]) for name in inps[0].priors()}, inps[0].call)


def measure(policy: str, device: str, B: int, N: int, F: int, R: int, calls: int, warmup: int,
            priors: bool = True, columnar: bool = False) -> dict[str, Any]:
    """Median time of one batched call at the given shape (``priors``: the calls carry them).

    ``columnar``: every other timed call goes through :meth:`Engine.step_batch` (the columnar entry
    the server uses) instead of :meth:`Engine.step`; ``ms_per_call`` is then the faster entry's
    median, and both are reported (``*_step`` and ``*_step_batch``)."""
    dev = torch.device(device)
    eng, handles, inputs = _steady(policy, device, B, N, F, R, calls + warmup, priors)
    times: dict[str, list[float]] = {"step": [], "step_batch": []}
    cpu: dict[str, list[float]] = {"step": [], "step_batch": []}
    for c, items in enumerate(inputs):
        how = "step_batch" if columnar and c % 2 else "step"
        batch = _batch_input(items) if how == "step_batch" else None  # built before the clock starts
        _sync(dev)
        t0, c0 = time.perf_counter(), time.thread_time()
        if batch is not None:
            out = eng.step_batch(list(items), batch)
            assert not out.errors, out.errors
        else:
            eng.step(items)
        _sync(dev)
        if c >= warmup:
            times[how].append(time.perf_counter() - t0)
            cpu[how].append(time.thread_time() - c0)
    assert all(n == [N] for n in (eng.counts(h) for h in handles)), "steady state broken"
    med = {how: statistics.median(t) * 1e3 for how, t in times.items() if t}
    best = min(med, key=med.__getitem__)
    ms = med[best]
    out = {"policy": policy, "device": device, "priors": priors, "B": B, "N": N, "F": F, "R": R, "ms_per_call": ms,
           "session_steps_per_s": B / (ms / 1e3), "cpu_ms_per_call": statistics.median(cpu[best]) * 1e3,
           "calls_timed": sum(len(t) for t in times.values()), "kernels": eng.kernels}
    if columnar:
        out["entry"] = best
        for how, m in med.items():
            out[f"ms_per_call_{how}"] = m
            out[f"cpu_ms_per_call_{how}"] = statistics.median(cpu[how]) * 1e3
    return out


@dataclass
class ContendedSettings:
    """The convoy benchmark: one batched call alone and beside a thread running plain Python."""

    policy: str = "nexus"
    B: int = 64
    N: int = 4096
    F: int = 8
    R: int = 2
    rounds: int = 9
    warmup: int = 2
    kernels: tuple[str, ...] = ("fused", "torch")


def _busy_python(stop: threading.Event) -> None:
    # Pure bytecode, as the event loop runs when it decodes and answers requests under load: holds
    # the GIL except when the interpreter hands it over.
    while not stop.is_set():
        x = 0
        for i in range(1000):
            x += i


def _busy_native(stop: threading.Event) -> None:
    # The control: as much CPU, with the GIL released (hashlib drops it for inputs over 2 KiB), so
    # the difference to the Python spinner is what the GIL costs, not the shared cores.
    data = bytes(1 << 16)
    while not stop.is_set():
        hashlib.sha256(data).digest()


def contended(settings: ContendedSettings, progress: bool = True) -> dict[str, Any]:
    """Time of one engine call alone, beside a thread of the same process running Python, and beside
    one burning as much CPU without the GIL (the control), interleaved per round; medians and ratios.

    Every time the call gives the GIL up (a torch op, a kernel entry) it may have to wait out the
    busy thread's switch interval (``sys.getswitchinterval()``, 5 ms by default) to get it back;
    the control separates that from the cores the spinner takes (on a machine with fewer idle
    cores than runnable threads, any spinner slows the call). Also the calling thread's CPU time."""
    from tqdm import tqdm

    s = settings
    records = []
    conditions = (("alone", None), ("python", _busy_python), ("native", _busy_native))
    # The fused kernels through both engine entries: Engine.step (one StepInput per session) and
    # Engine.step_batch (the columnar entry the server uses).
    runs = [(mode, entry) for mode in s.kernels for entry in (("step", "step_batch") if mode == "fused" else ("step",))]
    for mode, entry in tqdm(runs, desc="contended", disable=not progress):
        rounds = s.rounds + s.warmup
        eng, _, inputs = _steady(s.policy, "cpu", s.B, s.N, s.F, s.R, len(conditions) * rounds, kernels=mode)
        wall: dict[str, list[float]] = {c: [] for c, _ in conditions}
        cpu: dict[str, list[float]] = {c: [] for c, _ in conditions}
        feed = iter(inputs)
        for r in range(rounds):
            for label, target in conditions:
                stop = threading.Event()
                spinner = threading.Thread(target=target, args=(stop,), daemon=True) if target else None
                if spinner is not None:
                    spinner.start()
                    time.sleep(0.01)  # the spinner runs (and holds the GIL, if it takes it) when the call starts
                items = next(feed)
                batch = _batch_input(items) if entry == "step_batch" else None  # built before the clock starts
                t0, c0 = time.perf_counter(), time.thread_time()
                if batch is not None:
                    eng.step_batch(list(items), batch)
                else:
                    eng.step(items)
                dt, dc = time.perf_counter() - t0, time.thread_time() - c0
                stop.set()
                if spinner is not None:
                    spinner.join()
                if r >= s.warmup:
                    wall[label].append(dt * 1e3)
                    cpu[label].append(dc * 1e3)
        med = {c: statistics.median(v) for c, v in wall.items()}
        records.append({"policy": s.policy, "kernels": eng.kernels, "entry": entry, "B": s.B, "N": s.N, "F": s.F,
                        "R": s.R,
                        "ms_alone": med["alone"], "ms_beside_python": med["python"],
                        "ms_beside_native": med["native"], "ratio": med["python"] / med["alone"],
                        "ratio_control": med["native"] / med["alone"],
                        "gil_ms": med["python"] - med["native"],
                        "cpu_ms_alone": statistics.median(cpu["alone"]),
                        "cpu_ms_beside_python": statistics.median(cpu["python"]), "rounds": s.rounds,
                        "switch_interval_ms": sys.getswitchinterval() * 1e3})
    return {"benchmark": "engine_contended", "machine": machine(), "records": records}


def contended_table(payload: dict[str, Any]) -> str:
    """Markdown table of the convoy benchmark."""
    return markdown_table(payload["records"], ["policy", "kernels", "entry", "B", "N", "F", "R", "ms_alone",
                                               "ms_beside_python",
                                               "ratio", "ms_beside_native", "ratio_control", "gil_ms",
                                               "cpu_ms_alone", "cpu_ms_beside_python", "rounds",
                                               "switch_interval_ms"])


def run(settings: EngineBenchSettings, progress: bool = True) -> dict[str, Any]:
    """Measure the grid; walk-free policies are measured once per (B, N, F) with R recorded as 0."""
    from tqdm import tqdm

    grid = []
    for dev, pol, B, N, F in itertools.product(settings.devices, settings.policies, settings.batch_sizes,
                                               settings.slots, settings.fanouts):
        rs = settings.iterations if POLICIES[pol].uses_edges else (0,)
        grid += [(dev, pol, B, N, F, R) for R in rs]
    records = []
    for dev, pol, B, N, F, R in tqdm(grid, desc="engine", disable=not progress):
        records.append(measure(pol, dev, B, N, F, max(R, 1) if R else 2, settings.calls, settings.warmup,
                               settings.priors))
        records[-1]["R"] = R
    # Ratio to TOVA at the same device/B/N/F, measured in this run (wall and CPU time).
    for key, out in (("ms_per_call", "x_tova"), ("cpu_ms_per_call", "cpu_x_tova")):
        tova = {(r["device"], r["B"], r["N"], r["F"]): r[key] for r in records if r["policy"] == "tova"}
        for r in records:
            base = tova.get((r["device"], r["B"], r["N"], r["F"]))
            r[out] = r[key] / base if base else float("nan")
    return {"benchmark": "engine", "machine": machine(), "records": records}


def table(payload: dict[str, Any]) -> str:
    """Markdown table of the records."""
    return markdown_table(payload["records"], ["policy", "device", "kernels", "priors", "B", "N", "F", "R",
                                               "ms_per_call", "session_steps_per_s", "x_tova", "cpu_ms_per_call",
                                               "cpu_x_tova"])


def plot(payload: dict[str, Any], path: str) -> None:
    """Session-steps/s vs batch size at the largest N (F=8, R=2 for walk policies), per device."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    recs = payload["records"]
    n_max = max(r["N"] for r in recs)
    devices = sorted({r["device"] for r in recs})
    fig, axes = plt.subplots(1, len(devices), figsize=(6 * len(devices), 4), squeeze=False)
    for ax, dev in zip(axes[0], devices, strict=True):
        for pol in ORDER:
            pts = sorted((r["B"], r["session_steps_per_s"]) for r in recs
                         if r["device"] == dev and r["policy"] == pol and r["N"] == n_max and r["F"] == 8
                         and r["R"] in (0, 2))
            if pts:
                ax.plot([p[0] for p in pts], [p[1] for p in pts], marker="o", label=pol)
        ax.set_xscale("log", base=2)
        ax.set_yscale("log")
        ax.set_xlabel("sessions per call (B)")
        ax.set_ylabel("session-steps / s")
        ax.set_title(f"engine, N={n_max}, F=8, R=2 ({dev})")
        ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
