"""Survival benchmark: which planted tokens does each policy still hold at the end of a stream?

Every policy runs on the same seeded streams (see :mod:`nexus_sidecar.bench.streams`), calling
the engine every ``k`` tokens with the budget enforced all along; survival of a kind is the
fraction of its tokens retained at the end. Seeds are separate sessions of one batched engine.
With a topic shift, ``strong`` counts the strong tokens after the shift and ``stale`` those before
it; ``needle`` is measured when the question starts (what the question can still see).
"""

from __future__ import annotations

import itertools
from collections.abc import Iterable
from dataclasses import dataclass, field
from typing import Any

import torch
from nexus_client.packing import top_edges

from nexus_sidecar.bench.report import ci95, machine
from nexus_sidecar.bench.streams import (
    BRIDGE,
    NEEDLE,
    STRONG,
    SUBTLE,
    StreamSpec,
    attention_rows,
    plant_kinds,
    scenario,
    stream_priors,
)
from nexus_sidecar.engine import Engine, PolicyConfig, StepInput

DEFAULT_POLICIES = ("streaming", "tova", "h2o", "snapkv", "random", "nexus_topk", "nexus")
# Policies that need the priors run only in scenarios that send them.
PRIOR_POLICIES = ("keydiff", "knorm")
MEASURED = ("subtle", "bridge", "strong", "stale", "needle")


@dataclass
class SurvivalSettings:
    """One benchmark run's shape."""

    length: int = 1024
    seeds: int = 8
    every: int = 4  # tokens per engine call
    evictions: tuple[float, ...] = (0.8, 0.9)
    policies: tuple[str, ...] = DEFAULT_POLICIES
    base: dict[str, Any] = field(default_factory=dict)  # knob overrides for every policy
    scenario: str = "stationary"  # streams.SCENARIOS

    def spec(self) -> StreamSpec:
        """The generator settings of this run."""
        return scenario(self.scenario, self.length)

    def all_policies(self) -> tuple[str, ...]:
        """The policies to run: the prior-based ones join where the scenario sends priors."""
        extra = tuple(p for p in PRIOR_POLICIES if p not in self.policies) if self.spec().priors else ()
        return (*self.policies, *extra)


def run_stream(cfg: PolicyConfig, spec: StreamSpec, seeds: Iterable[int], every: int
               ) -> list[dict[str, float | None]]:
    """Run one policy over one stream per seed (batched); survival fractions per seed (None where a
    seed planted no token of the kind)."""
    seeds = list(seeds)
    eng = Engine("cpu")
    planted = [plant_kinds(spec, s) for s in seeds]
    priors = [stream_priors(kind, s) if spec.priors else {} for s, (kind, _) in zip(seeds, planted, strict=True)]
    gens = [torch.Generator().manual_seed(10_000 + s) for s in seeds]
    handles = [eng.open(cfg.with_(seed=s)) for s in seeds]
    F = cfg.fanout
    at_question: list[torch.Tensor] = []
    for t0 in range(0, spec.length, every):
        new = torch.arange(t0, min(t0 + every, spec.length))
        if t0 <= spec.question_start < t0 + every:  # what the question will see
            at_question = [eng.positions(h)[0] for h in handles]
        items = {}
        for h, (kind, hub_of), p, g in zip(handles, planted, priors, gens, strict=True):
            slots = torch.cat([eng.positions(h)[0], new])
            rows = attention_rows(slots, new, kind, hub_of, g, spec)  # [k, W]
            edge_pos, edge_w = top_edges(rows, slots, F, exclude_self=False)
            # Calls before the question are context; from the question on, its queries ask.
            call = "question" if t0 + every > spec.question_start else "context"
            items[h] = StepInput(new, rows.sum(0, keepdim=True), rows[-1:], edge_pos[None], edge_w[None],
                                 **{name: v[slots][None] for name, v in p.items()}, call=call)
        eng.step(items)
    out = []
    pos = torch.arange(spec.length)
    after = pos >= (spec.shift_at if spec.shift_at is not None else 0)
    for i, (h, (kind, _)) in enumerate(zip(handles, planted, strict=True)):
        kept = torch.zeros(spec.length, dtype=torch.bool)
        kept[eng.positions(h)[0]] = True
        asked = torch.zeros(spec.length, dtype=torch.bool)
        if at_question:
            asked[at_question[i]] = True
        groups = {"subtle": (kept, kind == SUBTLE), "bridge": (kept, kind == BRIDGE),
                  "strong": (kept, (kind == STRONG) & after), "stale": (kept, (kind == STRONG) & ~after),
                  "needle": (asked, kind == NEEDLE)}
        out.append({name: float(held[members].float().mean()) if bool(members.any()) else None
                    for name, (held, members) in groups.items()})
    return out


def _summarise(rec: dict[str, Any], per_seed: list[dict[str, float | None]]) -> dict[str, Any]:
    """Mean and CI per measured kind, over the seeds that planted it (kinds no seed has are left out)."""
    for kind in MEASURED:
        values = [r[kind] for r in per_seed if r[kind] is not None]
        if values:
            rec[kind], rec[f"{kind}_ci95"] = ci95(values)
    return rec


def run(settings: SurvivalSettings, progress: bool = True) -> dict[str, Any]:
    """All policies x eviction rates; returns the JSON payload (records with means and CIs)."""
    from tqdm import tqdm

    spec = settings.spec()
    records = []
    grid = list(itertools.product(settings.evictions, settings.all_policies()))
    for eviction, policy in tqdm(grid, desc="survival", disable=not progress):
        budget = max(1, round((1 - eviction) * settings.length))
        cfg = PolicyConfig(**{**settings.base, "policy": policy, "budget": budget}).validate()
        per_seed = run_stream(cfg, spec, range(settings.seeds), settings.every)
        rec: dict[str, Any] = {"policy": policy, "eviction": eviction, "budget": budget, "n_seeds": settings.seeds}
        records.append(_summarise(rec, per_seed))
    return {
        "benchmark": "survival",
        "settings": {"length": settings.length, "seeds": settings.seeds, "every": settings.every,
                     "scenario": settings.scenario, "knobs": PolicyConfig(**settings.base).to_dict()},
        "machine": machine(),
        "records": records,
    }


def _kinds(records: list[dict[str, Any]]) -> list[str]:
    return [k for k in MEASURED if any(k in r for r in records)]


def table(payload: dict[str, Any]) -> str:
    """Markdown table: survival mean ± CI per kind."""
    kinds = _kinds(payload["records"])
    rows = []
    for r in payload["records"]:
        rows.append({
            "policy": r["policy"], "eviction": f"{r['eviction']:.0%}", "budget": r["budget"],
            **{k: f"{r[k]:.3f} ± {r[k + '_ci95']:.3f}" for k in kinds},
        })
    from nexus_sidecar.bench.report import markdown_table

    return markdown_table(rows, ["policy", "eviction", "budget", *kinds])


def plot(payload: dict[str, Any], path: str) -> None:
    """Grouped bars: survival per kind and policy, one panel per eviction rate."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    recs = payload["records"]
    evictions = sorted({r["eviction"] for r in recs})
    kinds = _kinds(recs)
    width = 0.8 / len(kinds)
    fig, axes = plt.subplots(1, len(evictions), figsize=(6 * len(evictions), 4), squeeze=False)
    for ax, ev in zip(axes[0], evictions, strict=True):
        sub = [r for r in recs if r["eviction"] == ev]
        x = torch.arange(len(sub)).float()
        for i, kind in enumerate(kinds):
            ax.bar(x + (i - (len(kinds) - 1) / 2) * width, [r[kind] for r in sub], width,
                   yerr=[r[kind + "_ci95"] for r in sub], label=kind, capsize=2)
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
# Swept only in scenarios that send the priors (elsewhere they change nothing).
PRIOR_SWEEP: dict[str, tuple[Any, ...]] = {
    "prior_mix": (0.0, 0.25, 0.5, 0.75, 1.0),
    "prior": ("key_diversity", "key_norm", "value_norm"),
    "prior_sharpness": (0.0, 0.5, 1.0, 2.0, 4.0),
}


def sweep(settings: SurvivalSettings, eviction: float = 0.8, progress: bool = True) -> dict[str, Any]:
    """One knob at a time around the defaults, for ``nexus``: how each knob moves survival."""
    from tqdm import tqdm

    spec = settings.spec()
    budget = max(1, round((1 - eviction) * settings.length))
    knobs = {**SWEEP, **PRIOR_SWEEP} if spec.priors else SWEEP
    grid = [(knob, v) for knob, values in knobs.items() for v in values]
    records = []
    for knob, value in tqdm(grid, desc="sweep", disable=not progress):
        cfg = PolicyConfig(**{**settings.base, "policy": "nexus", "budget": budget, knob: value}).validate()
        per_seed = run_stream(cfg, spec, range(settings.seeds), settings.every)
        records.append(_summarise({"knob": knob, "value": value, "eviction": eviction}, per_seed))
    return {"benchmark": "survival-sweep", "machine": machine(), "records": records}


def sweep_table(payload: dict[str, Any]) -> str:
    """Markdown table of a sweep."""
    from nexus_sidecar.bench.report import markdown_table

    kinds = _kinds(payload["records"])
    rows = [{"knob": r["knob"], "value": r["value"], **{k: f"{r[k]:.3f} ± {r[k + '_ci95']:.3f}" for k in kinds}}
            for r in payload["records"]]
    return markdown_table(rows, ["knob", "value", *kinds])
