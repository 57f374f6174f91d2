"""kvpress's own presses as evaluation baselines, named ``kvpress:<press>[:knob=value]*``.

The presses are kvpress's code (PyPI ``kvpress``, the ``[kvpress]`` extra), constructed with
kvpress's defaults except ``compression_ratio``, which the evaluation sets per run. They run on
the evaluation's shared prefill (:func:`nexus_sidecar.evals.driver.apply_press`), so one context
prefill serves every policy; ``tests/evals/test_kvpress_baselines.py`` checks that this equals
kvpress's own forward hook inside a prefill.

KVzip is not listed: it is not a function of one prefill's layer inputs (it re-runs the model on a
repeated context), so it cannot share the prefill, and at 2k tokens it costs ~2 extra prefills per
run on this CPU.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Any

PREFIX = "kvpress:"
SELECT = "select"  # harness knob: per_head (kvpress's own) or shared (one position set, ours)
SELECTIONS = ("per_head", "shared")

# Our name -> kvpress class name. Our names follow kvpress's file names (keydiff_press.py, ...).
PRESSES = {
    "keydiff": "KeyDiffPress",
    "snapkv": "SnapKVPress",
    "tova": "TOVAPress",
    "expected_attention": "ExpectedAttentionPress",
    "knorm": "KnormPress",
    "streaming_llm": "StreamingLLMPress",
    "random": "RandomPress",
}

# Our engine policy that re-implements the same method (for the agreement table), where one exists.
SAME_METHOD = {"keydiff": "keydiff", "snapkv": "snapkv", "tova": "tova", "knorm": "knorm",
               "streaming_llm": "streaming", "random": "random"}  # fmt: skip


def is_kvpress(name: str) -> bool:
    """Whether a policy name denotes a kvpress press."""
    return name.startswith(PREFIX)


def press_class(name: str) -> type:
    """The kvpress class for ``kvpress:<press>``; ``ValueError`` naming the known presses otherwise."""
    short = name[len(PREFIX) :] if is_kvpress(name) else name
    if short not in PRESSES:
        raise ValueError(f"unknown kvpress press {short!r}; known: {', '.join(sorted(PRESSES))}")
    try:
        import kvpress
    except ImportError as exc:
        raise ValueError(f"{name} needs kvpress: pip install -e '.[kvpress]'") from exc
    return getattr(kvpress, PRESSES[short])


@dataclass(frozen=True)
class SharedSelection:
    """A kvpress scorer press applied at the sidecar's granularity: one kept position set for every
    layer and kv head, chosen by the press's scores averaged over heads, then layers."""

    press: Any


def check_press_knobs(name: str, knobs: dict[str, Any], what: str) -> None:
    """Raise ``ValueError`` when a knob is not a field of the press (``compression_ratio`` is set per
    run) or ``select`` is not one of :data:`SELECTIONS` or asks a non-scorer press for ``shared``."""
    cls = press_class(name)
    fields = {f.name for f in dataclasses.fields(cls)} - {"compression_ratio"}
    for key, value in knobs.items():
        if key == SELECT:
            if value not in SELECTIONS:
                raise ValueError(f"{what}: {SELECT} must be one of {', '.join(SELECTIONS)}, got {value!r}")
            if value == "shared" and not _is_scorer(cls):
                raise ValueError(f"{what}: {SELECT}=shared needs a scorer press (one score per position); "
                                 f"{cls.__name__} is not one")  # fmt: skip
        elif key not in fields:
            raise ValueError(f"{what}: {cls.__name__} has no field {key!r}; fields: {', '.join(sorted(fields))}, "
                             f"and the harness's {SELECT}")  # fmt: skip


def _is_scorer(cls: type) -> bool:
    from kvpress import ScorerPress

    return issubclass(cls, ScorerPress)


def make_press(name: str, compression: float, knobs: dict[str, Any], seed: int) -> Any:
    """A fresh press for one run (``random`` gets the run's seed unless a knob sets it); wrapped in
    :class:`SharedSelection` when ``knobs`` has ``select=shared``."""
    knobs = dict(knobs)
    shared = knobs.pop(SELECT, "per_head") == "shared"
    cls = press_class(name)
    fields = {f.name for f in dataclasses.fields(cls)}
    extra = {"seed": seed} if "seed" in fields and "seed" not in knobs else {}
    press = cls(compression_ratio=compression, **extra, **knobs)
    return SharedSelection(press) if shared else press
