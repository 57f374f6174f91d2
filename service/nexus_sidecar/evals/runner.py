"""The evaluation loop: samples x policies x eviction rates x modes, resumable, one JSONL line per run.

Resumability: every finished (sample, policy, eviction, mode) run is appended as one JSON line to
the results file (flushed and fsynced), keyed by :func:`run_key`, which also hashes everything that
changes the outcome (model, chunk size, knobs). On restart, lines already present are skipped, so a
killed run loses at most the sample in flight; a torn last line (killed mid-write) is ignored.

Compression (``eviction`` in records, kvpress's ``compression_ratio``) is the fraction of the KV
pairs of what the setting compresses that is removed: the context in ``streaming`` and ``agnostic``,
context + question in ``aware`` and ``decode`` (see :mod:`.driver`). Policy ``dense`` runs once (mode ``dense``).
Policies named ``kvpress:<press>`` are kvpress's own presses (:mod:`.kvpress_baselines`); they have
no ``streaming`` or ``decode`` setting (they compress a prefill), so those runs are not planned;
``kvpress:kvzip`` has only ``agnostic`` (:mod:`.kvzip_driver`), and a plan that leaves it no run fails.

The backend is pluggable: :data:`BackendFactory` builds one from the CLI arguments, so a remote
sidecar backend (``--sidecar ADDR``) slots in without touching this loop.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import zlib
from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from nexus_sidecar.evals.driver import SETTINGS, Prefix, drive, kv_bytes_per_token, prefill
from nexus_sidecar.evals.kvpress_baselines import PREFIX as KVPRESS_PREFIX
from nexus_sidecar.evals.kvpress_baselines import REPLAY_MODES, check_press_knobs, is_kvpress, is_replay, make_press
from nexus_sidecar.evals.kvzip_driver import drive_kvzip
from nexus_sidecar.evals.longbench import score as score_answer
from nexus_sidecar.evals.tasks import Question, Sample

MODES = (*SETTINGS, "multiturn")
STREAMED = ("streaming", "multiturn")  # settings that prefill nothing: the stream is fed piece by piece
DENSE = "dense"
BackendFactory = Callable[[], Any]  # () -> nexus_client.hf.PolicyBackend


@dataclass(frozen=True)
class PolicySpec:
    """A policy name plus knob overrides, written ``nexus:pool=5:tau=8`` on the command line."""

    name: str
    knobs: tuple[tuple[str, Any], ...] = ()

    @property
    def label(self) -> str:
        """The spelling used in records and tables (canonical knob order)."""
        return ":".join([self.name, *(f"{k}={v}" for k, v in self.knobs)])

    @classmethod
    def parse(cls, text: str) -> PolicySpec:
        """Parse ``name[:key=value]*``; values are int, float (``inf`` for tau) or a word (``attn=mean``).

        Knobs are checked against the engine's ``PolicyConfig`` here, so a typo fails before the
        model loads, naming the field, instead of after hours of other runs.
        """
        name, *parts = text.strip().split(":")
        if name + ":" == KVPRESS_PREFIX and parts:  # kvpress:<press>[:knob=value]*
            name = KVPRESS_PREFIX + parts.pop(0)
        if not name:
            raise ValueError(f"empty policy name in {text!r}")
        knobs: dict[str, Any] = {}
        for part in parts:
            key, sep, raw = part.partition("=")
            if not sep or not key or not raw:
                raise ValueError(f"policy {text!r}: knob {part!r} is not key=value")
            knobs[key] = knob_value(raw)
        if is_kvpress(name):
            knobs = check_press_knobs(name, knobs, f"policy {text!r}")
        elif name != DENSE:
            check_knobs(name, knobs, f"policy {text!r}")
        return cls(name, tuple(sorted(knobs.items())))


def with_seeds(specs: Sequence[PolicySpec], seeds: int) -> list[PolicySpec]:
    """Each sampled engine policy (reservoir or random selection) that sets no seed, followed by
    copies with ``seed`` = 1 .. ``seeds`` - 1 (seed 0 is the engine default, the label unchanged)."""
    from nexus_sidecar.engine import POLICIES

    out: list[PolicySpec] = []
    for spec in specs:
        out.append(spec)
        cls = POLICIES.get(spec.name)
        if cls is None or not cls.sampled or "seed" in dict(spec.knobs):
            continue
        out += [PolicySpec(spec.name, tuple(sorted((*spec.knobs, ("seed", i))))) for i in range(1, seeds)]
    return list(dict.fromkeys(out))


def knob_value(raw: str) -> int | float | str:
    """``"5"`` -> 5, ``"0.7"``/``"inf"`` -> float, anything else stays a string (enum knobs)."""
    try:
        return int(raw)
    except ValueError:
        pass
    try:
        return float(raw)
    except ValueError:
        return raw


def check_knobs(policy: str, knobs: dict[str, Any], what: str) -> None:
    """Raise ``ValueError`` naming the field when ``knobs`` are not valid ``PolicyConfig`` values."""
    from nexus_sidecar.engine.config import MAX_SLOTS, PolicyConfig
    from nexus_sidecar.engine.errors import ConfigError

    fixed = {"policy": policy, "budget": MAX_SLOTS // 2}  # the budget is set per run from the eviction rate
    try:
        PolicyConfig.from_dict({**knobs, **fixed})
    except ConfigError as exc:
        raise ValueError(f"{what}: {exc}") from None


@dataclass
class EvalSettings:
    """Everything besides the samples and policies that changes a run's outcome."""

    model: str
    chunk_size: int = 64
    chat: bool = False
    window: int = 32
    base_knobs: dict[str, Any] = field(default_factory=lambda: {"sinks": 4, "recent": 16})
    pipeline: bool = False  # streaming/decode: apply each answer right before the next call
    engine: str = "transformers"  # or "llamacpp" (model: a nexus_client.llamacpp.LlamaModel)
    weights: str | None = None  # llamacpp: the GGUF encoding run (f16, q8_0, shipped, ...)

    def fingerprint(self) -> str:
        """Short hash of the settings and the task generator's version (part of every run key)."""
        from nexus_sidecar.evals.tasks import GENERATOR_VERSION

        fields = asdict(self)
        if not fields["pipeline"]:  # blocking keeps the keys it had before the knob existed
            del fields["pipeline"]
        if fields["engine"] == "transformers":  # absent before engines existed: keep those run keys
            del fields["engine"]
        if fields["weights"] is None:  # transformers: no GGUF encoding; keeps its run keys
            del fields["weights"]
        blob = json.dumps({**fields, "generator": GENERATOR_VERSION}, sort_keys=True, default=str)
        return hashlib.sha256(blob.encode()).hexdigest()[:12]


@dataclass(frozen=True)
class RunSpec:
    """One (policy, eviction, mode) combination."""

    policy: PolicySpec
    eviction: float
    mode: str


def expand_runs(policies: Sequence[PolicySpec], evictions: Sequence[float], modes: Sequence[str]) -> list[RunSpec]:
    """The combinations to run per sample; ``dense`` once (eviction 0, mode ``dense``)."""
    for m in modes:
        if m not in MODES:
            raise ValueError(f"unknown mode {m!r}; known: {', '.join(MODES)}")
    for e in evictions:
        if not 0.0 < e < 1.0:
            raise ValueError(f"eviction rates must be in (0, 1) (dense is the 'dense' policy), got {e}")
    runs: list[RunSpec] = []
    for p in policies:
        if p.name == DENSE:  # one-shot dense is one run for every one-shot setting; multiturn has its own stream
            if set(modes) - {"multiturn"}:
                runs.append(RunSpec(p, 0.0, DENSE))
            if "multiturn" in modes:
                runs.append(RunSpec(p, 0.0, "multiturn"))
            continue
        if is_replay(p.name) and not set(modes) & set(REPLAY_MODES):
            raise ValueError(f"policy {p.label!r} runs only in mode {', '.join(REPLAY_MODES)} (KVzip scores the "
                             f"context by reconstructing it, before any question), got --modes {','.join(modes)}")
        runs.extend(RunSpec(p, e, m) for e in evictions for m in modes
                    if not (is_kvpress(p.name) and m in ("streaming", "decode", "multiturn"))
                    and not (is_replay(p.name) and m not in REPLAY_MODES))  # fmt: skip
    return runs


# Knobs whose engine default moved after runs were logged under it: knob -> (the policies that read
# it, the default those runs' keys assume). A run key spells such a knob whenever its effective value
# differs from that, so a changed default never reuses runs made under the old one, and runs made
# with the new value spelled out (``nexus:gamma=0.5``) are the new default's runs.
KEYED_DEFAULTS: dict[str, tuple[frozenset[str], float]] = {
    "gamma": (frozenset({"nexus", "nexus_topk"}), 0.95),  # 0.95 -> 0.5 (dev, multi-turn stream)
}


def key_label(spec: PolicySpec) -> str:
    """The policy's spelling inside run keys: :attr:`PolicySpec.label` with every knob of
    :data:`KEYED_DEFAULTS` made explicit when its effective value is not the logged default, and
    dropped when it is (``nexus`` and ``nexus:gamma=0.5`` share runs; ``nexus:gamma=0.95`` reuses the
    runs logged as ``nexus`` before the default moved)."""
    from nexus_sidecar.engine.config import PolicyConfig

    knobs = dict(spec.knobs)
    for knob, (names, logged) in KEYED_DEFAULTS.items():
        if spec.name not in names:
            continue
        value = knobs.get(knob, getattr(PolicyConfig, knob))  # a dataclass field's default is its class attribute
        if value == logged:
            knobs.pop(knob, None)
        else:
            knobs[knob] = knob_value(f"{value:g}")  # 0.0 and 0 spell alike: gamma=0
    return PolicySpec(spec.name, tuple(sorted(knobs.items()))).label


def run_key(settings: EvalSettings, sample: Sample, run: RunSpec) -> str:
    """Identity of one finished run in the results file (the policy spelled by :func:`key_label`)."""
    return f"{settings.fingerprint()}|{sample.sample_id}|{key_label(run.policy)}|{run.eviction:g}|{run.mode}"


def _prompt_text(tokenizer: Any, sample: Sample, chat: bool, question: Question | None = None) -> tuple[str, int]:
    """The whole prompt text for ``question`` (default: the first) and the index where the context ends.

    Plain format (the default, chosen on dev by dense accuracy): ``context`` + blank line +
    ``question`` + newline + answer prefix. ``chat``: the tokenizer's chat template around
    ``context + question`` as one user turn, the answer prefix opening the assistant turn.
    """
    q = question or sample.questions[0]
    user = sample.context + "\n\n" + q.question
    if chat and getattr(tokenizer, "chat_template", None):
        full = tokenizer.apply_chat_template([{"role": "user", "content": user}], tokenize=False,
                                             add_generation_prompt=True)  # fmt: skip
    else:
        full = user + "\n"
    full += q.answer_prefix
    return full, full.index(sample.context) + len(sample.context)


def answer_positions(
    tokenizer: Any, sample: Sample, ctx: Sequence[int], chat: bool = False, question: Question | None = None
) -> list[int] | None:
    """Positions (indices into the context segment ``ctx``) of the tokens that overlap an occurrence
    of an answer string in the context: the evidence the question will need.

    ``None`` when the tokenizer gives no character offsets (slow tokenizers), so no number is made up.
    Occurrences are whole words/numbers (``12345`` does not match inside ``123456``).
    """
    q = question or sample.questions[0]
    full, cut = _prompt_text(tokenizer, sample, chat, q)
    try:
        enc = tokenizer(full[:cut], add_special_tokens=False, return_offsets_mapping=True)
        offsets = list(enc["offset_mapping"])
    except (TypeError, KeyError, NotImplementedError):
        return None
    shift = len(ctx) - len(offsets)  # a BOS the caller prepended
    start = full.index(sample.context)
    spans = [(m.start(), m.end()) for a in q.answers if a
             for m in re.finditer(rf"(?<!\w){re.escape(a)}(?!\w)", full[start:cut])]  # fmt: skip
    spans = [(start + s, start + e) for s, e in spans]
    return [shift + i for i, (s, e) in enumerate(offsets) if any(s < se and e > ss for ss, se in spans)]


def prompt_segments(tokenizer: Any, sample: Sample, chat: bool = False) -> tuple[list[int], list[list[int]]]:
    """Token ids of the context and of each question part of ``sample``.

    The ids are split where the question starts (the halves are tokenized separately, so nothing of
    a question leaks into the context stream); every question shares the same context ids.
    """
    ctx: list[int] | None = None
    qs: list[list[int]] = []
    for question in sample.questions:
        full, cut = _prompt_text(tokenizer, sample, chat, question)
        c = list(tokenizer(full[:cut], add_special_tokens=False).input_ids)
        if ctx is not None and c != ctx:
            raise ValueError(f"{sample.sample_id}: the context tokenizes differently for different questions")
        ctx = c
        qs.append(list(tokenizer(full[cut:], add_special_tokens=False).input_ids))
    assert ctx is not None
    bos = getattr(tokenizer, "bos_token_id", None)
    if not chat and bos is not None and getattr(tokenizer, "add_bos_token", False):
        ctx = [bos, *ctx]
    return ctx, qs


def load_done(path: Path) -> dict[str, dict[str, Any]]:
    """Finished runs in ``path`` by key (missing file: none; a torn trailing line is ignored)."""
    done: dict[str, dict[str, Any]] = {}
    if not path.exists():
        return done
    with path.open() as f:
        for line in f:
            line = line.strip()
            if not line:
                continue
            try:
                rec = json.loads(line)
            except json.JSONDecodeError:
                continue  # a run killed mid-write; it is simply redone
            if isinstance(rec, dict) and "key" in rec:
                done[rec["key"]] = rec
    return done


def merge_logs(parts: Sequence[Path], into: Path) -> int:
    """Append to ``into`` every finished run of ``parts`` whose key it lacks; returns how many.

    Used after parallel shards: each wrote its own log, so no two processes ever append to one file.
    """
    have = load_done(into)
    added = 0
    for part in parts:
        for key, rec in load_done(part).items():
            if key not in have:
                _append(into, rec)
                have[key] = rec
                added += 1
    return added


def _last_byte(path: Path) -> bytes:
    with path.open("rb") as f:
        f.seek(-1, os.SEEK_END)
        return f.read(1)


def _append(path: Path, rec: dict[str, Any]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    # A run killed mid-write leaves a torn last line without its newline; start a fresh line so the
    # new record is not glued onto it (and lost with it).
    torn = path.exists() and path.stat().st_size > 0 and _last_byte(path) != b"\n"
    with path.open("a") as f:
        f.write(("\n" if torn else "") + json.dumps(rec, sort_keys=True) + "\n")
        f.flush()
        os.fsync(f.fileno())


def run_one(
    model: Any, tokenizer: Any, sample: Sample, run: RunSpec, settings: EvalSettings,
    backend_factory: BackendFactory, segments: tuple[list[int], list[list[int]]], prefix: Prefix | None = None,
    evidence: list[list[int] | None] | None = None,
) -> dict[str, Any]:  # fmt: skip
    """Run one sample under one (policy, compression, setting) and return its record (not yet written).

    Dense and one-shot runs may share the context ``prefix`` (:func:`~nexus_sidecar.evals.driver.prefill`);
    streaming runs feed the context chunk by chunk. ``evidence``: per question, the sample's
    :func:`answer_positions`, when the caller computed them once for all its runs.
    """
    if run.mode == "multiturn":
        if settings.engine != "transformers":
            raise ValueError(f"the multiturn setting runs on the transformers engine, not {settings.engine!r}")
        return run_multiturn(model, tokenizer, sample, run, settings, backend_factory)
    ctx, qs = segments
    questions = sample.questions
    stop_ids = [i for i in {getattr(tokenizer, "eos_token_id", None)} if i is not None]
    llamacpp = settings.engine == "llamacpp"
    if llamacpp:
        from nexus_sidecar.evals.llamacpp_driver import drive_llamacpp
        from nexus_sidecar.evals.llamacpp_driver import kv_bytes_per_token as llamacpp_kv_bytes

        if is_kvpress(run.policy.name):
            raise ValueError(f"policy {run.policy.label!r}: kvpress presses run on transformers only, not llamacpp")
    per_token = llamacpp_kv_bytes(model) if llamacpp else kv_bytes_per_token(model)
    seed = zlib.crc32(sample.sample_id.encode())
    compressed = len(ctx) + (max(len(q) for q in qs) if run.mode in ("aware", "decode") else 0)
    budget = compressed if run.policy.name == DENSE else round((1.0 - run.eviction) * compressed)
    backend = press = cfg = None
    if run.policy.name == DENSE:
        setting = DENSE
    elif is_kvpress(run.policy.name):
        setting = run.mode
        press = make_press(run.policy.name, run.eviction, dict(run.policy.knobs), seed)
    else:
        setting = run.mode
        cfg = _engine_config(sample, run, settings, budget)
        backend = backend_factory()
    shared = prefix if run.mode != "streaming" else None
    if llamacpp:
        res = drive_llamacpp(model, tokenizer, ctx, qs, sample.max_new_tokens, setting=setting, backend=backend,
                             policy_config=cfg, window=settings.window, chunk_size=settings.chunk_size,
                             stop_ids=stop_ids, pipeline=settings.pipeline)  # fmt: skip
    elif is_replay(run.policy.name):  # its own prefill and cache: the shared prefix is not used
        res = drive_kvzip(model, tokenizer, ctx, qs, sample.max_new_tokens, press, setting=setting,
                          chat=settings.chat, stop_ids=stop_ids)  # fmt: skip
    else:
        res = drive(model, tokenizer, ctx, qs, sample.max_new_tokens, setting=setting, backend=backend,
                    policy_config=cfg, press=press, window=settings.window, chunk_size=settings.chunk_size,
                    stop_ids=stop_ids, prefix=shared, pipeline=settings.pipeline)  # fmt: skip
    if evidence is None:
        evidence = [answer_positions(tokenizer, sample, ctx, settings.chat, q) for q in questions]
    scores = [score_answer(sample.metric, a.text, list(q.answers)) for a, q in zip(res.answers, questions, strict=True)]
    kept = [None if a.retained is None or not ev else sum(p in set(a.retained) for p in ev) / len(ev)
            for a, ev in zip(res.answers, evidence, strict=True)]  # fmt: skip
    total = len(ctx) + max(len(q) for q in qs) + sample.max_new_tokens
    rec = _record(settings, sample, run, res, scores, kept, length=len(ctx), question_tokens=max(len(q) for q in qs),
                  total=total, budget=budget, per_token=per_token, peak_kv_bytes=res.peak_cache * per_token,
                  answer_tokens=None if evidence[0] is None else sum(len(e or []) for e in evidence))  # fmt: skip
    rec["pipeline"] = settings.pipeline
    if settings.weights is not None:
        rec["weights"] = settings.weights
    return rec


def _record(settings: EvalSettings, sample: Sample, run: RunSpec, res: Any, scores: list[float],
            kept: list[float | None], *, length: int, question_tokens: int, total: int, budget: int, per_token: int,
            peak_kv_bytes: int, answer_tokens: int | None) -> dict[str, Any]:  # fmt: skip
    """The fields every run's record carries, whatever its setting (callers add their setting's own)."""
    known = [k for k in kept if k is not None]
    return {
        "key": run_key(settings, sample, run),
        "model": settings.model,
        "engine": settings.engine,
        "task": sample.task,
        "sample_id": sample.sample_id,
        "policy": run.policy.label,
        "base_policy": run.policy.name,
        "knobs": dict(run.policy.knobs),
        "eviction": run.eviction,
        "mode": run.mode,
        "length": length,
        "questions": len(sample.questions),
        "score": sum(scores) / len(scores),
        "scores": scores,
        "metric": sample.metric,
        "answers": [list(q.answers) for q in sample.questions],
        "output": res.answers[0].text,
        "outputs": [a.text for a in res.answers],
        "context_tokens": length,
        "question_tokens": question_tokens,
        "total_tokens": total,
        "budget": budget,
        "kept_context": res.kept_context,
        "peak_cache": res.peak_cache,
        "peak_kv_bytes": peak_kv_bytes,
        "dense_kv_bytes": total * per_token,
        "kv_bytes_per_token": per_token,
        "policy_calls": res.policy_calls,
        "evicted": res.evicted,
        # The answers' occurrences in the context, and the fraction of their tokens still cached when
        # the question arrives: a needle-survival signal even where every answer is wrong (None for
        # kvpress presses, whose per-head selection keeps no single position list).
        "answer_tokens": answer_tokens,
        "answer_kept": round(sum(known) / len(known), 4) if known else None,
        "seconds": round(res.seconds, 3),
    }


def _engine_config(sample: Sample, run: RunSpec, settings: EvalSettings, budget: int) -> dict[str, Any]:
    """The engine session config of an engine-policy run (the budget checked against the protected window)."""
    knobs = {**settings.base_knobs, **dict(run.policy.knobs)}
    seed = zlib.crc32(sample.sample_id.encode())
    cfg = {"policy": run.policy.name, "budget": budget, "slack": 0, "groups": 1, "seed": seed, **knobs}
    need = int(cfg.get("sinks", 4)) + int(cfg.get("recent", 16))
    if budget <= need:
        raise ValueError(f"{sample.sample_id}: budget {budget} at compression {run.eviction} is not above "
                         f"sinks + recent = {need}; lower the compression or the protected window")  # fmt: skip
    return cfg


def run_multiturn(model: Any, tokenizer: Any, sample: Sample, run: RunSpec, settings: EvalSettings,
                  backend_factory: BackendFactory) -> dict[str, Any]:  # fmt: skip
    """One sample's conversation in the ``multiturn`` setting (:mod:`.multiturn`); the record adds
    per-turn fields: ``scores`` in asking order, ``key_chunk`` / ``asked_after`` (the chunk holding
    each answer, the chunk each question follows, when the task says), ``calls_by_kind``."""
    from nexus_sidecar.evals.multiturn import conversation_pieces, drive_multiturn

    if is_kvpress(run.policy.name):
        raise ValueError(f"{run.policy.label}: kvpress presses compress a prefill; they have no multiturn setting")
    pieces = conversation_pieces(tokenizer, sample, settings.chat)
    context = sum(len(p.ids) for p in pieces if p.question is None)
    budget = context if run.policy.name == DENSE else round((1.0 - run.eviction) * context)
    cfg = backend = None
    if run.policy.name != DENSE:
        cfg = _engine_config(sample, run, settings, budget)
        backend = backend_factory()
    stop_ids = [i for i in {getattr(tokenizer, "eos_token_id", None)} if i is not None]
    res = drive_multiturn(model, tokenizer, pieces, sample.max_new_tokens, backend=backend, policy_config=cfg,
                          chunk_size=settings.chunk_size, stop_ids=stop_ids)  # fmt: skip
    questions = sample.questions
    assert res.starts is not None
    evidence: list[list[int]] = [[] for _ in questions]
    for piece, start in zip(pieces, res.starts, strict=True):
        for qi, idx in piece.evidence:
            evidence[qi] += [start + i for i in idx]
    scores = [score_answer(sample.metric, a.text, list(q.answers)) for a, q in zip(res.answers, questions, strict=True)]
    kept = [None if a.retained is None or not ev else sum(p in set(a.retained) for p in ev) / len(ev)
            for a, ev in zip(res.answers, evidence, strict=True)]  # fmt: skip
    per_token = kv_bytes_per_token(model)
    total = sum(len(p.ids) for p in pieces) + sum(len(a.token_ids) for a in res.answers)
    rec = _record(settings, sample, run, res, scores, kept, length=context,
                  question_tokens=max(len(p.ids) for p in pieces if p.question is not None), total=total,
                  budget=budget, per_token=per_token,
                  # Per-layer groups with a shared budget hold different lengths per layer: bytes from their sum.
                  peak_kv_bytes=res.peak_layer_tokens * per_token // max(len(res.layer_lengths or [1]), 1),
                  answer_tokens=sum(len(e) for e in evidence))  # fmt: skip
    rec.update(held_after_calls=res.held_after_calls, calls_by_kind=res.calls_by_kind,
               key_chunk=sample.meta.get("key_chunk"), asked_after=sample.meta.get("asked_after"), answers_kept=kept)
    return rec


def iter_eval(
    model: Any,
    tokenizer: Any,
    samples: Iterable[Sample],
    runs: Sequence[RunSpec],
    settings: EvalSettings,
    backend_factory: BackendFactory,
    results_path: Path,
    *,
    progress: bool = True,
    total: int | None = None,
    report_only: bool = False,
    known: Sequence[Path] = (),
) -> Iterator[dict[str, Any]]:
    """Yield one record per (sample, run), reusing finished ones from ``results_path`` and appending new ones.

    Sample-major order: each prompt is tokenized once and every run of it follows, so an interrupted
    evaluation still has complete per-sample comparisons across policies. ``report_only``: compute
    nothing; yield the records of the samples whose runs are *all* finished (a sample with some
    policies missing would bias the comparison) and skip the others. ``known``: other logs whose
    finished runs count as done too (read only: a parallel shard reads the main log, writes its own).
    """
    done = load_done(results_path)
    for path in known:
        for key, rec in load_done(path).items():
            done.setdefault(key, rec)
    if report_only:
        samples = [s for s in samples if all(run_key(settings, s, r) in done for r in runs)]
    bar = None
    if progress:
        from tqdm import tqdm

        bar = tqdm(total=total, desc="eval", unit="run", dynamic_ncols=True)
    try:
        for sample in samples:
            segments: tuple[list[int], list[list[int]]] | None = None
            evidence: list[list[int] | None] | None = None
            prefix: Prefix | None = None
            for run in runs:
                key = run_key(settings, sample, run)
                rec = done.get(key)
                if rec is None:
                    if segments is None:
                        segments = prompt_segments(tokenizer, sample, settings.chat)
                        evidence = [answer_positions(tokenizer, sample, segments[0], settings.chat, q)
                                    for q in sample.questions]  # fmt: skip
                    if prefix is None and run.mode not in STREAMED and not is_replay(run.policy.name) \
                            and settings.engine == "transformers":
                        prefix = prefill(model, segments[0])
                    rec = run_one(model, tokenizer, sample, run, settings, backend_factory, segments, prefix, evidence)
                    _append(results_path, rec)
                    done[key] = rec
                elif rec["policy"] != run.policy.label:  # logged under another spelling of the same run
                    rec = {**rec, "policy": run.policy.label, "knobs": dict(run.policy.knobs)}
                if bar is not None:
                    bar.set_postfix_str(f"{sample.task} {run.policy.label} {run.eviction:g} {run.mode}", refresh=False)
                    bar.update(1)
                yield rec
    finally:
        if bar is not None:
            bar.close()
