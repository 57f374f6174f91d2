"""``NexusPress``: any registered engine policy as a kvpress press (PyPI ``kvpress``, extra ``[kvpress]``).

Use it where kvpress takes a press::

    from kvpress import KVPressTextGenerationPipeline  # registers "kv-press-text-generation"
    from transformers import pipeline
    from nexus_client.kvpress import NexusPress

    pipe = pipeline("kv-press-text-generation", model=model, tokenizer=tokenizer)
    answer = pipe(context, question=question, press=NexusPress(compression_ratio=0.8))["answer"]

``compression_ratio`` has kvpress's meaning: the fraction of the context's KV pairs removed
(``budget = round((1 - compression_ratio) * context_tokens)``). The press compresses during the
context prefill only, as kvpress's presses do.

How: inside ``with press(model):`` the model runs its fused ``sdpa`` attention through the
query-recording kernel of :mod:`nexus_client.hf.capture`; when the *last* attention layer of the
prefill has run, the recorded queries and the cache's keys become one summary
(:func:`nexus_client.summary.summarize`: one shared eviction set, attention over the observation
``window`` of the last prompt queries, top-F edges of every token, the cache's query-agnostic
priors when the policy reads one), sent through the same
:class:`~nexus_client.hf.policy_run.PolicyRun` the evaluation and ``generate`` use, and the evicted
slots are cut from every layer. One call per prefill, whose result the press must return, so there
is nothing to pipeline.
So the press makes exactly the evictions of the evaluation's ``agnostic`` setting for the same
inputs (tested). The backend is
the in-process engine by default, or a running sidecar (``backend=RemoteBackend(addr)``).
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Any

import torch

try:
    from kvpress import BasePress
except ImportError as exc:  # pragma: no cover - the extra is missing
    raise ImportError("nexus_client.kvpress needs kvpress: pip install 'nexus-sidecar[kvpress]'") from exc

from nexus_client.hf.backends import LocalBackend, PolicyBackend
from nexus_client.hf.capture import ForwardQueries, QueryRecorder, attention_modules, capture_queries
from nexus_client.hf.policy_run import PolicyRun


@dataclass
class NexusPress(BasePress):
    """A kvpress press backed by the Nexus engine (or any registered engine policy).

    ``policy``: engine policy name (``nexus``, ``tova``, ``snapkv``, ...); ``knobs``: further
    ``PolicyConfig`` fields (``{"pool": 5}``); ``sinks``/``recent``: protected first/last tokens;
    ``window``: observation window (last prompt queries whose attention is read); ``fanout``: edges
    per token; ``seed``: the reservoir's seed; ``call``: what the prefill's queries are for the
    policy, "context" (kvpress's protocol: the question comes after the compression) or
    "question" (the prompt ends with the question, as in a question-aware run). After a prefill,
    ``kept_positions`` holds the retained context positions.
    """

    compression_ratio: float = 0.0
    policy: str = "nexus"
    knobs: dict[str, Any] = field(default_factory=dict)
    sinks: int = 4
    recent: int = 16
    window: int = 32
    fanout: int = 8
    seed: int = 0
    call: str = "context"
    backend: PolicyBackend | None = None
    kept_positions: list[int] | None = field(default=None, init=False)

    def __post_init__(self) -> None:
        if not 0.0 <= self.compression_ratio < 1.0:
            raise ValueError(f"compression_ratio must be in [0, 1), got {self.compression_ratio}")
        if self.window < 1:
            raise ValueError(f"window must be >= 1, got {self.window}")
        if self.call not in ("context", "question"):
            raise ValueError(f"call must be 'context' or 'question', got {self.call!r}")

    def budget(self, context_tokens: int) -> int:
        """Slots kept of a ``context_tokens``-token prefill."""
        return round((1.0 - self.compression_ratio) * context_tokens)

    def policy_config(self, context_tokens: int) -> dict[str, Any]:
        """The engine ``PolicyConfig`` fields of one prefill's session."""
        return {"policy": self.policy, "budget": self.budget(context_tokens), "slack": 0, "groups": 1,
                "sinks": self.sinks, "recent": self.recent, "fanout": self.fanout, "seed": self.seed,
                **self.knobs}  # fmt: skip

    def compress(self, module: Any, hidden_states: Any, keys: Any, values: Any, attentions: Any, kwargs: dict) -> Any:
        """Not used: the press compresses all layers at once, after the last one (see the module doc)."""
        raise NotImplementedError("NexusPress compresses every layer together in its forward hook")

    @contextlib.contextmanager
    def __call__(self, model: Any) -> Iterator[None]:
        """Apply the press to ``model`` for the prefills run inside the ``with`` block."""
        mods = attention_modules(model)
        recorder = QueryRecorder(len(mods))
        backend = self.backend if self.backend is not None else LocalBackend()

        def pre_hook(module: Any, args: Any, kwargs: dict[str, Any]) -> None:
            recorder.clear()  # the first layer of a forward pass starts a capture

        def hook(module: Any, args: Any, kwargs: dict[str, Any], output: Any) -> Any:
            cache = kwargs["past_key_values"]
            q = int(kwargs["hidden_states"].shape[1])
            start = int(kwargs["cache_position"][0])
            cap = recorder.take()
            if start != 0 or self.compression_ratio == 0.0:
                return output  # decoding, or nothing to remove: only the prefill is compressed
            self._compress_all(cache, cap, q, backend)
            return output

        handles = [mods[0].register_forward_pre_hook(pre_hook, with_kwargs=True),
                   mods[-1].register_forward_hook(hook, with_kwargs=True)]  # fmt: skip
        try:
            with capture_queries(model, recorder):
                yield
        finally:
            for h in handles:
                h.remove()

    def _compress_all(self, cache: Any, capture: ForwardQueries, q: int, backend: PolicyBackend) -> None:
        positions = torch.arange(q, dtype=torch.int64)
        slots = [positions.clone()]
        # The evaluation's own policy step: window, priors from this cache when the policy reads one.
        with PolicyRun(backend, self.policy_config(q), window=self.window) as run:
            run.add(capture, positions, slots)
            run.call(cache, slots, self.call)
        self.kept_positions = slots[0].tolist()
