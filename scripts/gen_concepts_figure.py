"""Draw docs/img/nexus-sampling.png: the walk, the weight and the reservoir on a toy stream.

    python scripts/gen_concepts_figure.py        # rewrites docs/img/nexus-sampling.png

The walk panel runs the engine's own ``walk`` (nexus_sidecar.engine.walk) on twelve tokens; the
reservoir panel draws the engine's A-Res keys (``log(u) / w^tau``, with its Gumbel form) many times
and counts how often each token is kept. Seeds are fixed, so the figure only changes with the code.
"""

from __future__ import annotations

from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt
import numpy as np
import torch
from nexus_sidecar.engine.walk import walk

OUT = Path(__file__).resolve().parents[1] / "docs" / "img" / "nexus-sampling.png"
N, BRIDGE, HUBS, BETA, R = 12, 3, (7, 9), 0.7, 2


def walk_panel(ax: plt.Axes) -> None:
    d = torch.full((1, N), 0.05, dtype=torch.float64)
    d[0, 0] = 0.15  # a sink
    d[0, BRIDGE] = 0.01  # the bridge: almost no direct attention
    for h, m in zip(HUBS, (0.25, 0.2), strict=True):
        d[0, h] = m
    d = d / d.sum()
    fanout = 2
    idx = torch.arange(N).repeat(fanout, 1).T.clone().reshape(1, N, fanout)  # zero-weight self edges
    w = torch.zeros(1, N, fanout, dtype=torch.float64)
    for j in range(1, N):  # every token attended its predecessor when it was the query
        idx[0, j, 0], w[0, j, 0] = j - 1, 0.3
    for h in HUBS:  # the hubs attended the bridge strongly
        idx[0, h, 1], w[0, h, 1] = BRIDGE, 0.6
    alive = torch.ones(1, N, dtype=torch.bool)
    s = walk(d, alive, idx, w, BETA, R)
    s = s / s.sum()
    x = np.arange(N)
    ax.bar(x - 0.2, d[0].numpy(), 0.4, label="direct attention d", color="#9aa5b1")
    ax.bar(x + 0.2, s[0].numpy(), 0.4, label=f"walk score s_R (beta={BETA}, R={R})", color="#2f6fb0")
    top = float(max(d.max(), s.max()))
    for h in HUBS:
        ax.annotate("", xy=(BRIDGE, top * 1.05), xytext=(h, top * 1.05),
                    arrowprops={"arrowstyle": "->", "color": "#c0392b", "connectionstyle": "arc3,rad=0.25"})
    ax.text((BRIDGE + HUBS[0]) / 2, top * 1.2, "the hubs' recorded edges", color="#c0392b", ha="center", fontsize=8)
    ax.set_xticks(x, [("bridge" if i == BRIDGE else "hub" if i in HUBS else "sink" if i == 0 else str(i))
                      for i in x], fontsize=7, rotation=45)
    ax.set_ylim(0, top * 1.45)
    ax.set_title("1. The walk: mass flows along recorded edges", fontsize=9)
    ax.set_ylabel("share of the mass", fontsize=8)
    ax.legend(fontsize=7, loc="upper right")


def weight_panel(ax: plt.Axes) -> None:
    calls = np.arange(1, 41)
    rng = np.random.default_rng(3)
    score = np.where(calls < 20, 0.08, 0.01) + rng.normal(0, 0.01, calls.size).clip(-0.01, 0.02)
    now = np.where(calls == 33, 0.09, 0.005 + 0.003 * rng.random(calls.size))
    gamma, m, memory = 0.95, 0.0, []
    for a, sc in enumerate(score, start=1):
        m = gamma * m + (1 - gamma) * sc
        memory.append(m / (1 - gamma**a))  # bias-corrected EMA
    memory = np.array(memory)
    ax.plot(calls, score, ".", color="#9aa5b1", ms=4, label="walk score s_R at each call")
    ax.plot(calls, memory, color="#2f6fb0", label="memory (EMA, gamma=0.95, bias-corrected)")
    ax.plot(calls, now, color="#e67e22", lw=1, label="now (newest query's row)")
    ax.plot(calls, np.maximum(memory, now), "--", color="black", lw=1, label="weight w = max(memory, now)")
    ax.set_title("2. The weight: remember slowly, react at once", fontsize=9)
    ax.set_xlabel("call", fontsize=8)
    ax.legend(fontsize=6.5, loc="upper right")


def reservoir_panel(ax: plt.Axes) -> None:
    n, budget, trials = 40, 10, 4000
    rng = np.random.default_rng(0)
    w = np.linspace(0.05, 1.0, n)
    for tau, color in ((0.0, "#9aa5b1"), (1.0, "#e67e22"), (4.0, "#27ae60"), (16.0, "#2f6fb0"),
                       (np.inf, "black")):
        kept = np.zeros(n)
        for _ in range(trials):
            u = rng.random(n)
            # The engine's key: tau * log(w / max w) - log(-log u), the largest kept; tau = inf: top-K.
            prio = w + 1e-9 * u if np.isinf(tau) else tau * np.log(w / w.max()) - np.log(-np.log(u))
            kept[np.argsort(-prio)[:budget]] += 1
        label = "tau = inf (top-K)" if np.isinf(tau) else f"tau = {tau:g}" + (" (uniform)" if tau == 0 else "")
        ax.plot(w, kept / trials, color=color, label=label)
    ax.set_title(f"3. The reservoir: keep {budget} of {n} by A-Res keys", fontsize=9)
    ax.set_xlabel("token weight w / max w", fontsize=8)
    ax.set_ylabel("inclusion probability", fontsize=8)
    ax.legend(fontsize=7, loc="upper left")


def main() -> None:
    """Draw the three panels into one PNG."""
    fig, axes = plt.subplots(3, 1, figsize=(7.5, 10.5))
    walk_panel(axes[0])
    weight_panel(axes[1])
    reservoir_panel(axes[2])
    for ax in axes:
        ax.tick_params(labelsize=7)
    fig.tight_layout()
    OUT.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(OUT, dpi=110, metadata={"Software": None})
    print(f"wrote {OUT}")


if __name__ == "__main__":
    main()
