"""Aggregate per-run records into the published records, a markdown table and a PNG plot.

Published record (one per policy, eviction, mode, task, plus ``task == "average"``)::

    {"policy", "eviction", "mode", "task", "score", "n", "ci95": [lo, hi], "peak_kv_bytes",
     "dense_kv_bytes", "kv_ratio", "seconds_per_sample"}

CIs: Wilson score interval when every score is 0 or 1 (binary), else the normal approximation
``mean +- 1.96 * sd / sqrt(n)`` clipped to [0, 1]. ``average`` is the mean over the per-sample
scores of all tasks (equal to the macro average when every task has the same n).
``peak_kv_bytes``: the largest KV cache actually held by any sample of the group (including the
transient peak of a prefill chunk before its eviction), ``dense_kv_bytes`` the same for dense
attention over the whole sequence.
"""

from __future__ import annotations

import math
from collections import defaultdict
from collections.abc import Collection, Iterable, Sequence
from pathlib import Path
from typing import Any

from nexus_sidecar.evals.kvpress_baselines import SAME_METHOD, is_kvpress

Z95 = 1.959963984540054
TOPK_BASELINES = ("streaming", "tova", "h2o", "snapkv")
RETRIEVAL_TASKS = ("passkey", "multikey", "multivalue", "multiquery", "vartrack", "turnkeys")


def wilson(successes: float, n: int, z: float = Z95) -> tuple[float, float]:
    """Wilson score interval for ``successes`` out of ``n`` binary trials."""
    if n <= 0:
        raise ValueError(f"n must be >= 1, got {n}")
    p = successes / n
    denom = 1 + z * z / n
    centre = (p + z * z / (2 * n)) / denom
    half = z * math.sqrt(p * (1 - p) / n + z * z / (4 * n * n)) / denom
    return max(0.0, centre - half), min(1.0, centre + half)


def ci95(scores: Sequence[float]) -> tuple[float, float]:
    """95 % CI of the mean of ``scores`` (Wilson if binary, else normal approximation)."""
    n = len(scores)
    if n == 0:
        raise ValueError("no scores")
    if all(s in (0.0, 1.0) for s in scores):
        return wilson(sum(scores), n)
    mean = sum(scores) / n
    sd = math.sqrt(sum((s - mean) ** 2 for s in scores) / (n - 1)) if n > 1 else 0.0
    half = Z95 * sd / math.sqrt(n)
    return max(0.0, mean - half), min(1.0, mean + half)


def _record(policy: str, eviction: float, mode: str, task: str, rows: list[dict[str, Any]]) -> dict[str, Any]:
    scores = [float(r["score"]) for r in rows]
    lo, hi = ci95(scores)
    peak = max(int(r["peak_kv_bytes"]) for r in rows)
    kept = [float(r["answer_kept"]) for r in rows if r.get("answer_kept") is not None]
    dense = max(int(r["dense_kv_bytes"]) for r in rows)
    return {
        "policy": policy,
        "eviction": eviction,
        "mode": mode,
        "task": task,
        "score": round(sum(scores) / len(scores), 4),
        "n": len(scores),
        "ci95": [round(lo, 4), round(hi, 4)],
        "peak_kv_bytes": peak,
        "dense_kv_bytes": dense,
        "kv_ratio": round(peak / dense, 4) if dense else None,
        "seconds_per_sample": round(sum(float(r["seconds"]) for r in rows) / len(rows), 3),
        # Mean fraction of the answer's context tokens still cached when the question arrived
        # (over the samples that recorded it; None for logs written before it was recorded).
        "answer_kept": round(sum(kept) / len(kept), 4) if kept else None,
    }


def aggregate(runs: Iterable[dict[str, Any]]) -> list[dict[str, Any]]:
    """Published records from per-run records: per task, then one ``average`` per (policy, eviction, mode)."""
    groups: dict[tuple[str, float, str], dict[str, list[dict[str, Any]]]] = defaultdict(lambda: defaultdict(list))
    for r in runs:
        groups[(r["policy"], float(r["eviction"]), r["mode"])][r["task"]].append(r)
    out: list[dict[str, Any]] = []
    for (policy, ev, mode), by_task in sorted(groups.items(), key=lambda kv: (kv[0][1], kv[0][2], kv[0][0])):
        for task in sorted(by_task):
            out.append(_record(policy, ev, mode, task, by_task[task]))
        out.append(_record(policy, ev, mode, "average", [r for rows in by_task.values() for r in rows]))
    return out


def dense_key(mode: str, have: Collection[tuple[str, float, str]]) -> tuple[str, float, str]:
    """The dense reference of ``mode``: dense's own stream in ``multiturn`` (its answers shape the
    conversation), the one dense run otherwise."""
    own = ("dense", 0.0, mode)
    return own if mode == "multiturn" and own in have else ("dense", 0.0, "dense")


def per_turn(runs: Iterable[dict[str, Any]]) -> list[dict[str, Any]]:
    """Multiturn accuracy per turn (question ``i`` in asking order), per (policy, eviction): mean score,
    n, 95% CI, and the mean number of chunks between the answer's chunk and the question (``lag``)."""
    groups: dict[tuple[str, float, int], list[tuple[float, int | None]]] = defaultdict(list)
    for r in runs:
        if r["mode"] != "multiturn":
            continue
        chunks, after = r.get("key_chunk"), r.get("asked_after")
        for i, sc in enumerate(r["scores"]):
            lag = None if not chunks or not after else int(after[i]) - int(chunks[i])
            groups[(r["policy"], float(r["eviction"]), i + 1)].append((float(sc), lag))
    out = []
    for (policy, ev, turn), rows in sorted(groups.items(), key=lambda kv: (kv[0][1], kv[0][0], kv[0][2])):
        scores = [x for x, _ in rows]
        lags = [g for _, g in rows if g is not None]
        lo, hi = ci95(scores)
        out.append({"policy": policy, "eviction": ev, "turn": turn, "n": len(scores),
                    "score": round(sum(scores) / len(scores), 4), "ci95": [round(lo, 4), round(hi, 4)],
                    "lag": round(sum(lags) / len(lags), 2) if lags else None})  # fmt: skip
    return out


def per_turn_markdown(rows: Sequence[dict[str, Any]]) -> str:
    """Policies x turns table of :func:`per_turn` (score, n in the header; mean lag in chunks under it)."""
    if not rows:
        return ""
    turns = sorted({r["turn"] for r in rows})
    idx = {(r["policy"], r["eviction"], r["turn"]): r for r in rows}
    head = ["policy", "compression", *[f"turn {t} (n={max(r['n'] for r in rows if r['turn'] == t)})" for t in turns]]
    lines = ["accuracy per turn (multiturn; question i in asking order)", "",
             "| " + " | ".join(head) + " |", "|" + "---|" * len(head)]  # fmt: skip
    for policy, ev in dict.fromkeys((r["policy"], r["eviction"]) for r in rows):
        cells = [policy, f"{ev:g}"] + [f"{idx[(policy, ev, t)]['score']:.3f}" if (policy, ev, t) in idx else "-"
                                       for t in turns]  # fmt: skip
        lines.append("| " + " | ".join(cells) + " |")
    lags = [next((r["lag"] for r in rows if r["turn"] == t and r["lag"] is not None), None) for t in turns]
    if any(g is not None for g in lags):
        lines.append("| chunks back (mean) | | " + " | ".join("-" if g is None else f"{g:.2f}" for g in lags) + " |")
    return "\n".join(lines) + "\n"


def _lookup(records: list[dict[str, Any]]) -> dict[tuple[str, float, str, str], dict[str, Any]]:
    return {(r["policy"], r["eviction"], r["mode"], r["task"]): r for r in records}


def paired(runs: Iterable[dict[str, Any]], a: tuple[str, float, str], b: tuple[str, float, str],
           tasks: Collection[str] | None = None, resamples: int = 10_000, seed: int = 0) -> dict[str, Any] | None:
    """Mean per-sample difference ``a - b`` (each a ``(policy, eviction, mode)``) over the samples both ran.

    Pairing removes the between-sample variance (a hard sample is hard for every policy), so this
    is the fair test of "A beats B" on the same samples; the 95% CI is a percentile bootstrap over
    samples with a fixed seed (reproducible). ``None`` when no sample has both runs.
    """
    import numpy as np

    score: dict[tuple[str, float, str], dict[str, float]] = {a: {}, b: {}}
    for r in runs:
        key = (r["policy"], float(r["eviction"]), r["mode"])
        if key in score and (tasks is None or r["task"] in tasks):
            score[key][r["sample_id"]] = float(r["score"])
    common = sorted(set(score[a]) & set(score[b]))
    if not common:
        return None
    d = np.array([score[a][s] - score[b][s] for s in common])
    means = d[np.random.default_rng(seed).integers(0, len(d), (resamples, len(d)))].mean(axis=1)
    lo, hi = np.percentile(means, [2.5, 97.5])
    return {"diff": round(float(d.mean()), 4), "ci95": [round(float(lo), 4), round(float(hi), 4)],
            "n": len(common), "wins": int((d > 0).sum()), "losses": int((d < 0).sum())}


def verdict(records: list[dict[str, Any]], nexus: str = "nexus", eviction: float = 0.8,
            runs: Sequence[dict[str, Any]] | None = None) -> dict[str, Any]:
    """The two claims, checked per mode: |nexus - dense| <= 0.01 on average, and nexus > best top-K on retrieval.

    Retrieval score = mean of the per-task scores over :data:`RETRIEVAL_TASKS` present in the records.
    Top-K baselines are every label whose policy is in :data:`TOPK_BASELINES` (pooled variants
    included). With the per-run ``runs``, each comparison also gets a paired difference with a
    bootstrap CI (:func:`paired`): dense - nexus on all tasks, nexus - best top-K on retrieval, and
    nexus - its top-K ablation (``nexus_topk`` with the same knobs) on all tasks when that ran.
    """
    idx = _lookup(records)
    have = {k[:3] for k in idx}
    out: dict[str, Any] = {"nexus_policy": nexus, "eviction": eviction, "modes": {}}
    modes = sorted({r["mode"] for r in records if r["mode"] != "dense"})
    tasks = sorted({r["task"] for r in records if r["task"].split("-")[0] in RETRIEVAL_TASKS})
    labels = sorted({r["policy"] for r in records
                     if r["policy"].split(":")[0] in TOPK_BASELINES or is_kvpress(r["policy"])})  # fmt: skip
    ablation = ":".join(["nexus_topk", *nexus.split(":")[1:]])

    def retrieval(policy: str, mode: str) -> float | None:
        vals = [idx[(policy, eviction, mode, t)]["score"] for t in tasks if (policy, eviction, mode, t) in idx]
        return sum(vals) / len(vals) if vals and len(vals) == len(tasks) else None

    for mode in modes:
        nx = idx.get((nexus, eviction, mode, "average"))
        if nx is None:
            continue
        ref = dense_key(mode, have)
        dense = idx.get((*ref, "average"))
        base = {p: retrieval(p, mode) for p in labels}
        base = {p: v for p, v in base.items() if v is not None}
        best = max(base, key=lambda p: base[p]) if base else None
        nx_ret = retrieval(nexus, mode)
        out["modes"][mode] = {
            "nexus_average": nx["score"],
            "dense_average": dense["score"] if dense else None,
            "gap_to_dense": round(dense["score"] - nx["score"], 4) if dense else None,
            "within_0.01_of_dense": bool(dense and dense["score"] - nx["score"] <= 0.01),
            "nexus_retrieval": None if nx_ret is None else round(nx_ret, 4),
            "best_topk_baseline": best,
            "best_topk_retrieval": None if best is None else round(base[best], 4),
            "beats_best_topk_on_retrieval": bool(best is not None and nx_ret is not None and nx_ret > base[best]),
        }
        if runs is not None:
            me = (nexus, eviction, mode)
            out["modes"][mode]["paired"] = {
                "dense_minus_nexus": paired(runs, ref, me),
                "nexus_minus_best_topk_retrieval": None if best is None else paired(runs, me, (best, eviction, mode),
                                                                                    tasks),
                "nexus_minus_topk_ablation": paired(runs, me, (ablation, eviction, mode)),
            }
    return out


def agreement(runs: Sequence[dict[str, Any]], eviction: float) -> list[dict[str, Any]]:
    """Our re-implementation vs kvpress's press of the same method, per setting, on the same samples.

    ``same_answer``: the fraction of paired samples where both scored the same; ``diff``: ours -
    kvpress, paired, with a bootstrap CI (:func:`paired`).
    """
    have = {(r["policy"], r["mode"]) for r in runs if float(r["eviction"]) == eviction}
    out = []
    for press, ours in sorted(SAME_METHOD.items()):
        # kvpress's own per-head selection, and the same press at our granularity (select=shared)
        for theirs in (f"kvpress:{press}", f"kvpress:{press}:select=shared"):
            for mode in sorted({m for _, m in have}):
                if (ours, mode) in have and (theirs, mode) in have:
                    out.append(_agree(runs, press, ours, theirs, mode, eviction))
    return out


def _agree(runs: Sequence[dict[str, Any]], press: str, ours: str, theirs: str, mode: str,
           eviction: float) -> dict[str, Any]:  # fmt: skip
    by: dict[str, dict[str, float]] = {ours: {}, theirs: {}}
    for r in runs:
        if r["mode"] == mode and float(r["eviction"]) == eviction and r["policy"] in by:
            by[r["policy"]][r["sample_id"]] = float(r["score"])
    common = sorted(set(by[ours]) & set(by[theirs]))
    return {"method": press, "ours": ours, "kvpress": theirs, "mode": mode, "eviction": eviction,
            "ours_score": round(sum(by[ours][s] for s in common) / len(common), 4),
            "kvpress_score": round(sum(by[theirs][s] for s in common) / len(common), 4),
            "same_answer": round(sum(by[ours][s] == by[theirs][s] for s in common) / len(common), 4),
            "paired": paired(runs, (ours, eviction, mode), (theirs, eviction, mode))}  # fmt: skip


def agreement_markdown(rows: Iterable[dict[str, Any]]) -> str:
    """:func:`agreement` as a table."""
    head = ["method", "setting", "compression", "ours", "kvpress", "ours - kvpress (paired)", "same score"]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for r in rows:
        lines.append(f"| {r['ours']} vs {r['kvpress']} | {r['mode']} | {r['eviction']:g} | {r['ours_score']:.3f} | "
                     f"{r['kvpress_score']:.3f} | {_diff(r['paired'])} | {r['same_answer']:.2f} |")
    return "\n".join(lines) + "\n"


def seed_spread(records: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Mean +- std (sample std) of the average score over the seeds of each sampled policy.

    Labels that differ only in their ``seed`` knob are one policy (``nexus:tau=4`` is seed 0, the
    default; ``nexus:seed=2:tau=4`` seed 2); rows only where at least two seeds ran.
    """
    import statistics

    groups: dict[tuple[str, float, str], dict[int, float]] = defaultdict(dict)
    for r in records:
        if r["task"] != "average" or r["policy"] == "dense":
            continue
        name, *knobs = r["policy"].split(":")
        seed = next((int(k.split("=", 1)[1]) for k in knobs if k.startswith("seed=")), 0)
        base = ":".join([name, *(k for k in knobs if not k.startswith("seed="))])
        groups[(base, float(r["eviction"]), r["mode"])][seed] = float(r["score"])
    out = []
    for (base, ev, mode), by_seed in sorted(groups.items(), key=lambda kv: (kv[0][1], kv[0][2], kv[0][0])):
        if len(by_seed) < 2:
            continue
        vals = [by_seed[s] for s in sorted(by_seed)]
        out.append({"policy": base, "eviction": ev, "mode": mode, "seeds": sorted(by_seed),
                    "mean": round(statistics.fmean(vals), 4), "std": round(statistics.stdev(vals), 4),
                    "scores": vals})  # fmt: skip
    return out


def seed_spread_markdown(rows: Iterable[dict[str, Any]]) -> str:
    """:func:`seed_spread` as a table."""
    lines = ["| policy | setting | compression | seeds | mean +- std | per seed |", "|---|---|---|---|---|---|"]
    for r in rows:
        lines.append(f"| {r['policy']} | {r['mode']} | {r['eviction']:g} | {len(r['seeds'])} | "
                     f"{r['mean']:.3f} +- {r['std']:.3f} | {', '.join(f'{v:.3f}' for v in r['scores'])} |")
    return "\n".join(lines) + "\n"


def _diff(p: dict[str, Any] | None) -> str:
    if p is None:
        return "-"
    return f"{p['diff']:+.3f} [{p['ci95'][0]:+.2f}, {p['ci95'][1]:+.2f}] ({p['wins']}/{p['losses']}, n={p['n']})"


def verdict_markdown(verdicts: Iterable[dict[str, Any]]) -> str:
    """The verdicts of :func:`verdict` as one table; paired columns read ``diff [95% CI] (wins/losses, n)``."""
    head = ["nexus policy", "eviction", "mode", "nexus avg", "dense avg", "dense - nexus (paired)",
            "within 0.01", "nexus retrieval", "best top-K (retrieval)", "nexus - best top-K, retrieval (paired)",
            "beats it", "nexus - its top-K ablation (paired)"]  # fmt: skip
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for v in verdicts:
        for mode, m in sorted(v["modes"].items()):
            p = m.get("paired", {})
            best = m["best_topk_baseline"]
            best = "-" if best is None else f"{best} ({m['best_topk_retrieval']:.3f})"
            cells = [v["nexus_policy"], f"{v['eviction']:g}", mode, f"{m['nexus_average']:.3f}",
                     "-" if m["dense_average"] is None else f"{m['dense_average']:.3f}",
                     _diff(p.get("dense_minus_nexus")), "yes" if m["within_0.01_of_dense"] else "no",
                     "-" if m["nexus_retrieval"] is None else f"{m['nexus_retrieval']:.3f}", best,
                     _diff(p.get("nexus_minus_best_topk_retrieval")),
                     "yes" if m["beats_best_topk_on_retrieval"] else "no", _diff(p.get("nexus_minus_topk_ablation"))]
            lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def _mib(b: int) -> str:
    return f"{b / 2**20:.2f}"


def markdown(records: list[dict[str, Any]], title: str = "") -> str:
    """One table per (mode, eviction): policies x tasks (score, n in the header), average with CI, KV MiB,
    and (when the runs recorded it) the mean fraction of answer tokens kept until the question."""
    idx = _lookup(records)
    tasks = sorted({r["task"] for r in records if r["task"] != "average"})
    dense_rows = [r for r in records if r["policy"] == "dense"]
    with_kept = any(r.get("answer_kept") is not None for r in records)
    lines = [f"# {title}" if title else ""]
    settings = sorted({(r["mode"], r["eviction"]) for r in records if r["policy"] != "dense"})
    if not settings and dense_rows:
        settings = [("dense", 0.0)]
    for mode, ev in settings:
        policies = [p for p in dict.fromkeys(r["policy"] for r in records if (r["mode"], r["eviction"]) == (mode, ev))]
        ns = {t: max((r["n"] for r in records if r["task"] == t and r["mode"] == mode), default=0) for t in tasks}
        lines += ["", f"## mode {mode}, eviction {ev:g}", ""]
        head = ["policy", *[f"{t} (n={ns[t]})" for t in tasks], "average [95% CI]", "peak KV MiB", "dense KV MiB"]
        if with_kept:
            head.append("answer tokens kept")
        lines.append("| " + " | ".join(head) + " |")
        lines.append("|" + "---|" * len(head))
        ref = [dense_key(mode, {k[:3] for k in idx})] if dense_rows and mode != "dense" else []
        keys = ref + [(p, ev, mode) for p in policies]
        for p, e, m in keys:
            avg = idx.get((p, e, m, "average"))
            if avg is None:
                continue
            cells = [p] + [f"{idx[(p, e, m, t)]['score']:.3f}" if (p, e, m, t) in idx else "-" for t in tasks]
            cells += [f"{avg['score']:.3f} [{avg['ci95'][0]:.2f}, {avg['ci95'][1]:.2f}]",
                      _mib(avg["peak_kv_bytes"]), _mib(avg["dense_kv_bytes"])]  # fmt: skip
            if with_kept:
                cells.append("-" if avg.get("answer_kept") is None else f"{avg['answer_kept']:.3f}")
            lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines).strip() + "\n"


def plot(records: list[dict[str, Any]], path: Path, title: str = "") -> None:
    """Average accuracy vs eviction rate, one line per policy, one panel per mode (dense at eviction 0)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    avgs = [r for r in records if r["task"] == "average"]
    dense = next((r for r in avgs if r["policy"] == "dense"), None)
    modes = sorted({r["mode"] for r in avgs if r["mode"] != "dense"}) or ["dense"]
    fig, axes = plt.subplots(1, len(modes), figsize=(5.5 * len(modes), 4), squeeze=False, sharey=True)
    for ax, mode in zip(axes[0], modes, strict=True):
        for policy in dict.fromkeys(r["policy"] for r in avgs if r["mode"] == mode):
            pts = sorted((r["eviction"], r["score"]) for r in avgs if r["mode"] == mode and r["policy"] == policy)
            if dense is not None:
                pts = [(0.0, dense["score"]), *pts]
            ax.plot([p[0] for p in pts], [p[1] for p in pts], marker="o", label=policy)
        if dense is not None:
            ax.axhline(dense["score"], color="black", lw=0.8, ls="--")
        ax.set_title(f"{mode}")
        ax.set_xlabel("eviction rate (fraction of the whole sequence)")
        ax.set_ylim(-0.02, 1.02)
        ax.grid(alpha=0.3)
    axes[0][0].set_ylabel("average score")
    axes[0][-1].legend(fontsize=8, loc="lower left")
    if title:
        fig.suptitle(title)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    plt.close(fig)
