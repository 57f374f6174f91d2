"""``SessionConfig``: a session's policy knobs as a typed value a worker passes to ``open_session``.

Every field mirrors ``nexus.v1.PolicyConfig``; ``None`` leaves the knob to the server's default
(the engine's defaults, docs/reference/policy-config.md). It is a read-only mapping of the fields that
are set, so it goes wherever the clients take a plain ``{"policy": ..., "budget": ...}`` dict.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Iterator, Mapping
from dataclasses import dataclass
from typing import Any, Literal


@dataclass(frozen=True)
class SessionConfig(Mapping[str, Any]):
    """Policy config of one session (unset = the server's default)."""

    policy: str | None = None  # "nexus", "nexus_topk", "tova", "h2o", "snapkv", "streaming", "random", "keydiff", ...
    budget: int | None = None  # slots kept per group after an eviction
    slack: int | None = None  # evict only above budget + slack
    sinks: int | None = None  # first tokens, never evicted
    recent: int | None = None  # last tokens, never evicted
    groups: int | None = None  # 1 = one eviction set for all layers, L = one per layer
    beta: float | None = None  # walk damping
    iterations: int | None = None  # walk iterations R
    fanout: int | None = None  # edges kept per token F
    gamma: float | None = None  # EMA decay of the memory signal
    tau: float | None = None  # reservoir sharpness: 0 = uniform, inf = top-K
    randomness: Literal["fixed", "per_call"] | None = None
    seed: int | None = None
    pool: int | None = None  # span pooling width (odd, 1 = off)
    granularity: Literal["token", "block"] | None = None
    block_size: int | None = None
    attn_reduce: Literal["sum", "mean"] | None = None
    pool_reduce: Literal["max", "mean"] | None = None
    prior: Literal["key_diversity", "key_norm", "value_norm"] | None = None  # Nexus: the prior in its walk
    prior_mix: float | None = None  # Nexus: the prior's share of the walk's direct mass, in [0, 1]
    prior_sharpness: float | None = None  # Nexus: contrast of the prior's mass, exp(sharpness * z-score)
    react_calls: Literal["all", "question"] | None = None  # Nexus: calls the newest query's row scores
    question_prior_mix: float | None = None  # Nexus: the prior's share on question/decode calls
    budget_alloc: Literal["fixed", "shared"] | None = None  # budget per group, or one shared by the groups
    budget_floor: float | None = None  # shared budget: each group's minimum, a share of budget

    def _set(self) -> dict[str, Any]:
        return {f.name: v for f in dataclasses.fields(self) if (v := getattr(self, f.name)) is not None}

    def __getitem__(self, name: str) -> Any:
        """The value of a set field (``KeyError`` for an unset one)."""
        return self._set()[name]

    def __iter__(self) -> Iterator[str]:
        """Names of the set fields, in declaration order."""
        return iter(self._set())

    def __len__(self) -> int:
        """How many fields are set."""
        return len(self._set())
