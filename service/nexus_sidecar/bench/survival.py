"""Survival benchmark: which planted tokens does each policy still hold at the end of a stream?

Every policy runs on the same seeded streams (see :mod:`nexus_sidecar.bench.streams`), calling
the engine every ``k`` tokens with the budget enforced all along; survival of a kind is the
fraction of its tokens retained at the end. Seeds are separate sessions of one batched engine.
"""

from __future__ import annotations

import itertools
from collections.abc import Iterable
from dataclasses import dataclass, field
from typing import Any

import torch
from nexus_client.packing import top_edges

from nexus_sidecar.bench.report import ci95, machine
from nexus_sidecar.bench.streams import BRIDGE, KINDS, STRONG, SUBTLE, StreamSpec, attention_rows, plant_kinds
from nexus_sidecar.engine import Engine, PolicyConfig, StepInput

DEFAULT_POLICIES = ("streaming", "tova", "h2o", "snapkv", "random", "nexus_topk", "nexus")


@dataclass
class SurvivalSettings:
    """One benchmark run's shape."""

    length: int = 1024
    seeds: int = 8
    every: int = 4  # tokens per engine call
    evictions: tuple[float, ...] = (0.8, 0.9)
    policies: tuple[str, ...] = DEFAULT_POLICIES
    base: dict[str, Any] = field(default_factory=dict)  # knob overrides for every policy


def run_stream(cfg: PolicyConfig, spec: StreamSpec, seeds: Iterable[int], every: int) -> list[dict[str, float]]:
    """Run one policy over one stream per seed (batched); survival fractions per seed."""
    seeds = list(seeds)
    eng = Engine("cpu")
    planted = [plant_kinds(spec, s) for s in seeds]
    gens = [torch.Generator().manual_seed(10_000 + s) for s in seeds]
    handles = [eng.open(cfg.with_(seed=s)) for s in seeds]
    F = cfg.fanout
    for t0 in range(0, spec.length, every):
        new = torch.arange(t0, min(t0 + every, spec.length))
        items = {}
        for h, (kind, hub_of), g in zip(handles, planted, gens, strict=True):
            slots = torch.cat([eng.positions(h)[0], new])
            rows = attention_rows(slots, new, kind, hub_of, g)  # [k, W]
            edge_pos, edge_w = top_edges(rows, slots, F, exclude_self=False)
            items[h] = StepInput(new, rows.sum(0, keepdim=True), rows[-1:], edge_pos[None], edge_w[None])
        eng.step(items)
    out = []
    for h, (kind, _) in zip(handles, planted, strict=True):
        kept = torch.zeros(spec.length, dtype=torch.bool)
        kept[eng.positions(h)[0]] = True
        out.append({KINDS[k]: float(kept[kind == k].float().mean()) for k in (SUBTLE, BRIDGE, STRONG)})
    return out


def run(settings: SurvivalSettings, progress: bool = True) -> dict[str, Any]:
    """All policies x eviction rates; returns the JSON payload (records with means and CIs)."""
    from tqdm import tqdm

    spec = StreamSpec(length=settings.length)
    records = []
    grid = list(itertools.product(settings.evictions, settings.policies))
    for eviction, policy in tqdm(grid, desc="survival", disable=not progress):
        budget = max(1, round((1 - eviction) * settings.length))
        cfg = PolicyConfig(**{**settings.base, "policy": policy, "budget": budget}).validate()
        per_seed = run_stream(cfg, spec, range(settings.seeds), settings.every)
        rec: dict[str, Any] = {"policy": policy, "eviction": eviction, "budget": budget, "n_seeds": settings.seeds}
        for kind in ("subtle", "bridge", "strong"):
            mean, half = ci95([r[kind] for r in per_seed])
            rec[kind], rec[f"{kind}_ci95"] = mean, half
        records.append(rec)
    return {
        "benchmark": "survival",
        "settings": {"length": settings.length, "seeds": settings.seeds, "every": settings.every,
                     "knobs": PolicyConfig(**settings.base).to_dict()},
        "machine": machine(),
        "records": records,
    }


def table(payload: dict[str, Any]) -> str:
    """Markdown table: survival mean ± CI per kind."""
    rows = []
    for r in payload["records"]:
        rows.append({
            "policy": r["policy"], "eviction": f"{r['eviction']:.0%}", "budget": r["budget"],
            **{k: f"{r[k]:.3f} ± {r[k + '_ci95']:.3f}" for k in ("subtle", "bridge", "strong")},
        })
    from nexus_sidecar.bench.report import markdown_table

    return markdown_table(rows, ["policy", "eviction", "budget", "subtle", "bridge", "strong"])


def plot(payload: dict[str, Any], path: str) -> None:
    """Grouped bars: survival per kind and policy, one panel per eviction rate."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    recs = payload["records"]
    evictions = sorted({r["eviction"] for r in recs})
    kinds = ("subtle", "bridge", "strong")
    fig, axes = plt.subplots(1, len(evictions), figsize=(6 * len(evictions), 4), squeeze=False)
    for ax, ev in zip(axes[0], evictions, strict=True):
        sub = [r for r in recs if r["eviction"] == ev]
        x = torch.arange(len(sub)).float()
        for i, kind in enumerate(kinds):
            ax.bar(x + (i - 1) * 0.27, [r[kind] for r in sub], 0.27, yerr=[r[kind + "_ci95"] for r in sub],
                   label=kind, capsize=2)
        ax.set_xticks(x.tolist(), [r["policy"] for r in sub], rotation=30)
        ax.set_ylim(0, 1.05)
        ax.set_title(f"survival at {ev:.0%} eviction")
    axes[0][0].set_ylabel("fraction retained at end of stream")
    axes[0][-1].legend()
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


SWEEP: dict[str, tuple[Any, ...]] = {
    "tau": (0.5, 1.0, 2.0, 4.0, 8.0, 16.0, float("inf")),
    "gamma": (0.5, 0.8, 0.9, 0.95, 0.98),
    "beta": (0.0, 0.3, 0.5, 0.7, 0.9),
    "iterations": (1, 2, 3),
    "fanout": (4, 8, 16),
    "randomness": ("fixed", "per_call"),
}


def sweep(settings: SurvivalSettings, eviction: float = 0.8, progress: bool = True) -> dict[str, Any]:
    """One knob at a time around the defaults, for ``nexus``: how each knob moves survival."""
    from tqdm import tqdm

    spec = StreamSpec(length=settings.length)
    budget = max(1, round((1 - eviction) * settings.length))
    grid = [(knob, v) for knob, values in SWEEP.items() for v in values]
    records = []
    for knob, value in tqdm(grid, desc="sweep", disable=not progress):
        cfg = PolicyConfig(**{**settings.base, "policy": "nexus", "budget": budget, knob: value}).validate()
        per_seed = run_stream(cfg, spec, range(settings.seeds), settings.every)
        rec: dict[str, Any] = {"knob": knob, "value": value, "eviction": eviction}
        for kind in ("subtle", "bridge", "strong"):
            rec[kind], rec[f"{kind}_ci95"] = ci95([r[kind] for r in per_seed])
        records.append(rec)
    return {"benchmark": "survival-sweep", "machine": machine(), "records": records}


def sweep_table(payload: dict[str, Any]) -> str:
    """Markdown table of a sweep."""
    from nexus_sidecar.bench.report import markdown_table

    rows = [{"knob": r["knob"], "value": r["value"],
             **{k: f"{r[k]:.3f} ± {r[k + '_ci95']:.3f}" for k in ("subtle", "bridge", "strong")}}
            for r in payload["records"]]
    return markdown_table(rows, ["knob", "value", "subtle", "bridge", "strong"])
