"""kvpress's own presses as evaluation baselines, named ``kvpress:<press>[:knob=value]*``.

The presses are kvpress's code (PyPI ``kvpress``, the ``[kvpress]`` extra), constructed with
kvpress's defaults except ``compression_ratio``, which the evaluation sets per run. They run on
the evaluation's shared prefill (:func:`nexus_sidecar.evals.driver.apply_press`), so one context
prefill serves every policy; ``tests/evals/test_kvpress_baselines.py`` checks that this equals
kvpress's own forward hook inside a prefill.

``kvpress:kvzip`` (KVzip, kvpress's ``KVzipPress``) cannot share that prefill: it scores the
context by making the model *repeat* it (kvpress runs the context prefill, then ~1 more prefill of
the repeated context per chunk, on the same cache), so it runs on its own prefill and cache
(:mod:`.kvzip_driver`), and its ``seconds`` include that prefill and the reconstruction. It is
query-agnostic by design: only the ``agnostic`` setting is planned (``aware`` would make KVzip
"repeat" the question as if it were context, which is not its protocol, so it is refused), and
kvpress's implementation masks evicted keys in ``sdpa`` attention instead of removing them, so the
driver switches the model to ``sdpa`` for the run and restores the previous implementation after.

``select=shared`` (a harness knob, not a press field) keeps a scorer press's scores but changes the
granularity: kvpress keeps its top positions *per layer and KV head*; the sidecar, and our
re-implementations, keep *one* position set for every layer and head. With ``select=shared`` the
scores are averaged over KV heads, then layers (as ``nexus_client.hf.priors`` averages the priors),
and the same top positions are kept everywhere: the control that says whether a difference between
kvpress's press and ours is the method or the granularity (docs/evaluation.md, agreement table).
"""

from __future__ import annotations

import dataclasses
import typing
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
# Presses that re-run the model themselves (their own prefill, cache and attention implementation),
# so they cannot use the shared prefill: run by :func:`nexus_sidecar.evals.kvzip_driver.drive_kvzip`.
REPLAY_PRESSES = {"kvzip": "KVzipPress"}
REPLAY_MODES = ("agnostic",)  # the settings a replay press has

# Our engine policy that re-implements the same method (for the agreement table), where one exists.
SAME_METHOD = {"keydiff": "keydiff", "snapkv": "snapkv", "tova": "tova", "knorm": "knorm",
               "streaming_llm": "streaming", "random": "random"}  # fmt: skip


def is_kvpress(name: str) -> bool:
    """Whether a policy name denotes a kvpress press."""
    return name.startswith(PREFIX)


def _short(name: str) -> str:
    return name[len(PREFIX) :] if is_kvpress(name) else name


def is_replay(name: str) -> bool:
    """Whether ``name`` is a press that cannot share the prefill (``kvpress:kvzip``)."""
    return is_kvpress(name) and _short(name) in REPLAY_PRESSES


def press_class(name: str) -> type:
    """The kvpress class for ``kvpress:<press>``; ``ValueError`` naming the known presses otherwise."""
    short = _short(name)
    known = {**PRESSES, **REPLAY_PRESSES}
    if short not in known:
        raise ValueError(f"unknown kvpress press {short!r}; known: {', '.join(sorted(known))}")
    try:
        import kvpress
    except ImportError as exc:
        raise ValueError(f"{name} needs kvpress: pip install -e '.[kvpress]'") from exc
    return getattr(kvpress, known[short])


@dataclass(frozen=True)
class SharedSelection:
    """A kvpress scorer press applied at the sidecar's granularity: one kept position set for every
    layer and kv head, chosen by the press's scores averaged over heads, then layers."""

    press: Any


_TRUE, _FALSE = ("true", "yes", "on"), ("false", "no", "off")


def _coerce(cls: type, key: str, kind: Any, value: Any, what: str) -> Any:
    """``value`` (as the knob parser read it: int, float or word) as the field's declared type."""
    if kind is bool:
        if isinstance(value, str) and value.lower() in (*_TRUE, *_FALSE):
            return value.lower() in _TRUE
        if isinstance(value, int) and value in (0, 1):
            return bool(value)
        raise ValueError(f"{what}: {cls.__name__}.{key} is a bool (true/false), got {value!r}")
    if kind is int and not isinstance(value, int):
        raise ValueError(f"{what}: {cls.__name__}.{key} is an int, got {value!r}")
    if kind is float:
        if not isinstance(value, int | float):
            raise ValueError(f"{what}: {cls.__name__}.{key} is a number, got {value!r}")
        return float(value)
    return value


def check_press_knobs(name: str, knobs: dict[str, Any], what: str) -> dict[str, Any]:
    """``knobs`` as the press's field types (``layerwise=true`` -> ``True``); ``ValueError`` naming the
    field when a knob is not a field of the press (``compression_ratio`` is set per run), has the
    wrong type, or is a value the press itself rejects (e.g. ``KVzipPress.chunk_size=0``), or when
    ``select`` is not one of :data:`SELECTIONS` or asks a non-scorer press for ``shared``."""
    cls = press_class(name)
    fields = {f.name for f in dataclasses.fields(cls)} - {"compression_ratio"}
    hints = typing.get_type_hints(cls)
    out: dict[str, Any] = {}
    for key, value in knobs.items():
        if key == SELECT:
            if value not in SELECTIONS:
                raise ValueError(f"{what}: {SELECT} must be one of {', '.join(SELECTIONS)}, got {value!r}")
            if value == "shared" and not _is_scorer(cls):
                raise ValueError(f"{what}: {SELECT}=shared needs a scorer press (one score per position); "
                                 f"{cls.__name__} is not one")  # fmt: skip
            out[key] = value
            continue
        if key not in fields:
            raise ValueError(f"{what}: {cls.__name__} has no field {key!r}; fields: {', '.join(sorted(fields))}, "
                             f"and the harness's {SELECT}")  # fmt: skip
        out[key] = _coerce(cls, key, hints.get(key), value, what)
        try:  # the press's own checks (asserts in __post_init__), one field at a time so the error names it
            cls(compression_ratio=0.5, **{key: out[key]})
        except (AssertionError, ValueError, TypeError) as exc:
            why = str(exc) or "assertion failed"
            raise ValueError(f"{what}: {cls.__name__} rejects {key}={out[key]!r}: {why}") from None
    return out


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
