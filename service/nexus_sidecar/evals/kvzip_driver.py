"""KVzip (kvpress's ``KVzipPress``) on its own prefill: the ``kvpress:kvzip`` baseline.

KVzip scores each context KV pair by how much the model attends to it while *repeating* the
context ("Repeat the previous context exactly."), so kvpress runs it as a context manager around
the prefill: after the prefill it feeds the repeat prompt (one pass per ``chunk_size`` context
tokens) on the same cache, then marks the lowest-scored pairs across all layers and heads
(``layerwise=False``: layers get different ratios, the overall ratio is ``compression_ratio``).
kvpress's implementation does not remove those pairs: it records them per attention module
(``masked_key_indices``) and its patched ``sdpa`` attention replaces their keys by a key whose
weight underflows to zero, which eager attention does not honour. Hence here:

- the run has its own prefill and cache (the shared prefill of the other policies is untouched),
  and its ``seconds`` include that prefill, the reconstruction passes and the answers;
- the model runs in ``sdpa`` for the run and gets its previous attention implementation back
  afterwards, and the masks are removed from the modules, also when the run fails (a mask left
  behind would silently apply to the next policy's forward passes);
- KVzip finds its tokenizer at ``model.config.name_or_path`` (``AutoTokenizer.from_pretrained``)
  and derives the repeat prompt's pieces from its chat template. The evaluation's tokenizer is
  saved to a temporary directory (no network), with the chat template kept for ``--prompt chat``
  and removed for ``--prompt plain`` (KVzip then uses no prefix and a newline suffix, as our plain
  prompt does), and ``name_or_path`` points there for the run only.

Memory: the record's ``kept_context`` counts what KVzip keeps (the most-kept layer's mean over KV
heads); ``peak_cache`` counts what the run really held, the reconstruction's transient (context +
repeat prompt + chunk) included, since kvpress's masking keeps every pair in memory.
"""

from __future__ import annotations

import contextlib
import copy
import math
import tempfile
import time
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
from nexus_client.hf.capture import attention_modules
from nexus_client.hf.decode import greedy_decode

from nexus_sidecar.evals.driver import Answer, DriveResult
from nexus_sidecar.evals.kvpress_baselines import REPLAY_MODES

KVZIP_ATTENTION = "sdpa"  # kvpress's masking patch wraps the registered kernels; eager is not one


@dataclass
class KVzipResult(DriveResult):
    """A :class:`DriveResult` plus what KVzip evicted: per layer, the (kv head, position) pairs."""

    masked: list[tuple[torch.Tensor, torch.Tensor]] = field(default_factory=list)

    def kept_per_layer(self, context: int, kv_heads: int) -> list[float]:
        """Context tokens kept per layer, as the mean over its KV heads."""
        return [context - heads.numel() / kv_heads for heads, _ in self.masked]


@contextlib.contextmanager
def attention_implementation(model: Any, name: str) -> Iterator[None]:
    """Run ``model`` with attention implementation ``name``; restore the previous one and drop any
    ``masked_key_indices`` kvpress left on the attention modules, even when the body raises."""
    previous = model.config._attn_implementation
    model.set_attn_implementation(name)
    try:
        yield
    finally:
        for m in attention_modules(model):
            if hasattr(m, "masked_key_indices"):
                del m.masked_key_indices
        model.set_attn_implementation(previous)


@contextlib.contextmanager
def tokenizer_for_kvzip(model: Any, tokenizer: Any, chat: bool) -> Iterator[str]:
    """Point ``model.config.name_or_path`` at a temporary copy of ``tokenizer`` for KVzip to load.

    The copy has the chat template only when the prompts use it (``chat``), so KVzip's repeat prompt
    is framed like the evaluation's questions; the name is restored on exit.
    """
    saved = copy.deepcopy(tokenizer)
    if not chat:
        saved.chat_template = None
    previous = model.config.name_or_path
    with tempfile.TemporaryDirectory(prefix="nexus-kvzip-tok-") as folder:
        saved.save_pretrained(folder)
        model.config.name_or_path = folder
        try:
            yield folder
        finally:
            model.config.name_or_path = previous


def _masks(model: Any) -> list[tuple[torch.Tensor, torch.Tensor]]:
    out = []
    for m in attention_modules(model):
        idx = getattr(m, "masked_key_indices", None)
        if idx is None:  # compression_ratio 0 or a context too short to score: nothing masked
            out.append((torch.empty(0, dtype=torch.int64), torch.empty(0, dtype=torch.int64)))
        else:
            _, heads, positions = idx
            out.append((heads.detach().cpu().clone(), positions.detach().cpu().clone()))
    return out


@torch.inference_mode()
def drive_kvzip(
    model: Any,
    tokenizer: Any,
    context: Sequence[int],
    questions: Sequence[Sequence[int]],
    max_new_tokens: int,
    press: Any,
    *,
    setting: str = "agnostic",
    chat: bool = False,
    stop_ids: Sequence[int] = (),
) -> KVzipResult:
    """Prefill ``context`` under kvpress ``press`` (a ``KVzipPress``), then answer each of
    ``questions`` greedily from a copy of the compressed cache (kvpress's multi-question protocol).

    ``setting`` must be ``agnostic``: KVzip scores the context before any question exists.
    """
    if setting not in REPLAY_MODES:
        raise ValueError(f"kvpress:kvzip has no {setting!r} setting (only {', '.join(REPLAY_MODES)}): KVzip "
                         "scores the context by reconstructing it, before any question")  # fmt: skip
    if not context or not questions or any(not q for q in questions) or max_new_tokens < 1:
        raise ValueError("need a context, >= 1 non-empty question and max_new_tokens >= 1")
    from transformers import DynamicCache

    device = next(model.parameters()).device
    ctx = torch.as_tensor(list(context), dtype=torch.int64)
    n_ctx = int(ctx.numel())
    stops = {int(s) for s in stop_ids}
    peak = 0

    def watch(module: Any, args: Any, kwargs: dict[str, Any]) -> None:
        # Before each pass of the decoder: the cache plus the tokens this pass appends is what the
        # layers hold at their fullest (KVzip truncates the repeat chunk again inside the pass).
        nonlocal peak
        cache, ids = kwargs.get("past_key_values"), kwargs.get("input_ids")
        if cache is not None and ids is not None:
            peak = max(peak, cache.get_seq_length() + int(ids.shape[-1]))

    answers: list[Answer] = []
    t: dict[str, float] = {}
    with tokenizer_for_kvzip(model, tokenizer, chat):  # not timed: harness plumbing, not KVzip
        t0 = time.perf_counter()
        handle = model.model.register_forward_pre_hook(watch, with_kwargs=True)
        try:
            with attention_implementation(model, KVZIP_ATTENTION):
                cache = DynamicCache(config=model.config)
                with press(model):  # prefill; on exit kvpress reconstructs the context and masks
                    model.model(input_ids=ctx[None].to(device), past_key_values=cache)
                t["compress_s"] = time.perf_counter() - t0
                masked = _masks(model)
                for q in questions:
                    c = copy.deepcopy(cache)
                    qt = torch.as_tensor(list(q), dtype=torch.int64)

                    def forward(tokens: torch.Tensor, start: int, c: Any = c) -> torch.Tensor:
                        pos = torch.arange(start, start + tokens.numel())
                        out = model(input_ids=tokens[None].to(device), position_ids=pos[None].to(device),
                                    past_key_values=c, use_cache=True, logits_to_keep=1)  # fmt: skip
                        return out.logits[0, -1]

                    logits = forward(qt, n_ctx)
                    pos = n_ctx + int(qt.numel())
                    ids = greedy_decode(logits, lambda tok, step, f=forward, p=pos: f(torch.tensor([tok]), p + step),
                                        max_new_tokens, stops)  # fmt: skip
                    text = tokenizer.decode(ids, skip_special_tokens=True) if tokenizer is not None else ""
                    answers.append(Answer(ids, text, None))
        finally:
            handle.remove()
        seconds = time.perf_counter() - t0
    kv_heads = int(getattr(model.config, "num_key_value_heads", None) or model.config.num_attention_heads)
    res = KVzipResult(answers=answers, peak_cache=peak, kept_context=0, policy_calls=1, evicted=0,
                      seconds=seconds, timings=t, masked=masked)  # fmt: skip
    kept = res.kept_per_layer(n_ctx, kv_heads)
    res.kept_context = math.ceil(max(kept))
    res.evicted = n_ctx - math.ceil(sum(kept) / len(kept))  # mean over layers and heads
    return res
