"""Typed, validated policy configuration (one per session)."""

from __future__ import annotations

import json
import math
from dataclasses import asdict, dataclass, fields, replace
from typing import Any, Literal

from nexus_sidecar.engine.errors import ConfigError

Randomness = Literal["fixed", "per_call"]
Granularity = Literal["token", "block"]
AttnReduce = Literal["sum", "mean"]
PoolReduce = Literal["max", "mean"]
Prior = Literal["key_diversity", "key_norm", "value_norm"]
ReactCalls = Literal["all", "question"]
BudgetAlloc = Literal["fixed", "shared"]
# What a call's queries are, as the worker tells the engine (StepInput.call): a chunk of context
# ("context": nothing has asked anything yet), a question's queries ("question", e.g. the
# observation window over the question), a generated token ("decode"), or not said.
CallKind = Literal["unspecified", "context", "question", "decode"]
CALL_KINDS: tuple[str, ...] = ("unspecified", "context", "question", "decode")

# The query-agnostic per-slot priors a worker may send with a step (see step_io.StepInput).
PRIORS: tuple[str, ...] = ("key_diversity", "key_norm", "value_norm")

# Slot indices are packed into the low bits of int64 selection keys (see selection.py).
MAX_SLOTS = 1 << 21


@dataclass(frozen=True)
class PolicyConfig:
    """Every knob of a session's eviction policy.

    The walk, EMA and reservoir defaults were chosen on the survival benchmark (docs/benchmarks.md,
    "Survival"); the prior and call-kind defaults on the real-model evaluation's dev split.
    Fields split in two: *per-session* values (budget, slack, sinks, recent, seed, groups) may
    differ between sessions of one batched call; the rest are *structural* and define
    which sessions can share a batched engine call (see :meth:`batch_key`).
    """

    policy: str = "nexus"  # a name of the policy registry (ListPolicies); docs/contributing.md adds one
    budget: int = 256  # slots kept per group after an eviction
    slack: int = 0  # evict only once the slot count exceeds budget + slack
    sinks: int = 4  # first tokens, never evicted (attention sinks)
    recent: int = 16  # last tokens, never evicted
    groups: int = 1  # layer groups: 1 = one shared eviction set, L = one per layer
    beta: float = 0.7  # walk damping: weight of second-hand (bridge) mass
    iterations: int = 2  # walk iterations R
    fanout: int = 8  # edges kept per token F
    gamma: float = 0.5  # EMA factor of the memory signal (~2-call horizon; dev + survival, docs/evaluation.md)
    tau: float = 16.0  # reservoir sharpness: 0 = uniform, -> inf = top-K
    randomness: Randomness = "per_call"  # u redrawn per call, or fixed per token by hash(seed, position)
    seed: int = 0  # seed of the counter-based uniforms of the reservoir keys (no RNG state)
    pool: int = 1  # span pooling window (odd), 1 = off
    pool_reduce: PoolReduce = "max"  # a slot weighs the max of its window, or its mean (SnapKV-like)
    granularity: Granularity = "token"  # "block": whole blocks of block_size positions go together (paged caches)
    block_size: int = 16  # positions per block in block mode; a block weighs the max of its slots
    # How Nexus reads a multi-token call's attention: "sum" over the call's queries, or "mean" per
    # slot over the queries that could see it (causal masking lets more queries see older slots,
    # so a sum favours old tokens the way H2O's accumulation does). Equal for one-token calls.
    attn_reduce: AttnReduce = "sum"
    # Nexus personalisation: d = (1 - prior_mix) * norm(attn) + prior_mix * norm(w(prior)), both
    # normalised over the evictable slots, so a token nothing has attended to yet (a needle before
    # its question) still gets direct mass, which the walk passes on to what it attended. Used only
    # when the step carries that prior (old clients: the attention-only walk, bit for bit).
    # Defaults chosen on the evaluation's dev split (docs/evaluation.md, "Choosing Nexus's knobs"):
    # all direct mass from the prior, contrast 0.5, no reaction term on context calls.
    prior: Prior = "key_diversity"
    prior_mix: float = 1.0  # share of the direct mass d taken from the prior (formula above)
    # Contrast of the prior's weights: w = exp(prior_sharpness * z) with z the prior's keep weight
    # standardised over the evictable slots (0 = uniform: the prior carries no information).
    prior_sharpness: float = 0.5
    # Nexus: which calls the reaction term (the newest query's own row) scores. "question": every
    # call except those the worker marks "context": before a question exists, the newest query of
    # a context chunk mostly looks at its neighbours, and its row outweighed the prior on ~a third
    # of the slots (docs/evaluation.md). "all": every call (the survival benchmark's behaviour).
    react_calls: ReactCalls = "question"
    # Nexus: the prior's share of the direct mass on question and decode calls, whose attention
    # does carry what is asked (None: prior_mix on every call).
    question_prior_mix: float | None = None
    # How the budget is held across layer groups (every policy; engine/budget_alloc.py): "fixed",
    # ``budget`` slots in each group; "shared", one session budget of ``groups * budget`` slots,
    # allocated each call by comparing the groups' normalised weights (AdaKV across layers), each
    # group keeping at least ``ceil(budget_floor * budget)`` slots (its protected ones counted).
    budget_alloc: BudgetAlloc = "fixed"
    budget_floor: float = 0.25

    def validate(self) -> PolicyConfig:
        """Raise :class:`ConfigError` naming the first bad field; return self when valid."""
        from nexus_sidecar.engine.policies import POLICIES  # late: policies import config

        if self.policy not in POLICIES:
            from nexus_sidecar.engine.errors import UnknownPolicyError

            raise UnknownPolicyError("policy", f"unknown policy {self.policy!r}; known: {sorted(POLICIES)}")
        _int_range("budget", self.budget, 1, MAX_SLOTS // 2)
        _int_range("slack", self.slack, 0, MAX_SLOTS // 2)
        _int_range("sinks", self.sinks, 0, MAX_SLOTS)
        _int_range("recent", self.recent, 0, MAX_SLOTS)
        _int_range("groups", self.groups, 1, 1024)
        _int_range("iterations", self.iterations, 0, 16)
        _int_range("fanout", self.fanout, 1, 64)
        _int_range("seed", self.seed, -(2**63), 2**63 - 1)
        _int_range("pool", self.pool, 1, 63)
        if self.pool % 2 == 0:
            raise ConfigError("pool", f"must be odd (a centred window), got {self.pool}")
        _int_range("block_size", self.block_size, 1, 4096)
        _float_range("beta", self.beta, 0.0, 1.0, hi_open=True)
        _float_range("gamma", self.gamma, 0.0, 1.0, hi_open=True)
        if not isinstance(self.tau, (int, float)) or math.isnan(self.tau) or self.tau < 0:
            raise ConfigError("tau", f"must be a number >= 0 (inf = top-K), got {self.tau!r}")
        if self.randomness not in ("fixed", "per_call"):
            raise ConfigError("randomness", f"must be 'fixed' or 'per_call', got {self.randomness!r}")
        if self.pool_reduce not in ("max", "mean"):
            raise ConfigError("pool_reduce", f"must be 'max' or 'mean', got {self.pool_reduce!r}")
        if self.attn_reduce not in ("sum", "mean"):
            raise ConfigError("attn_reduce", f"must be 'sum' or 'mean', got {self.attn_reduce!r}")
        if self.prior not in PRIORS:
            raise ConfigError("prior", f"must be one of {list(PRIORS)}, got {self.prior!r}")
        _float_range("prior_mix", self.prior_mix, 0.0, 1.0)
        _float_range("prior_sharpness", self.prior_sharpness, 0.0, 16.0)
        if self.react_calls not in ("all", "question"):
            raise ConfigError("react_calls", f"must be 'all' or 'question', got {self.react_calls!r}")
        if self.question_prior_mix is not None:
            _float_range("question_prior_mix", self.question_prior_mix, 0.0, 1.0)
        if self.budget_alloc not in ("fixed", "shared"):
            raise ConfigError("budget_alloc", f"must be 'fixed' or 'shared', got {self.budget_alloc!r}")
        _float_range("budget_floor", self.budget_floor, 0.0, 1.0)
        if self.granularity not in ("token", "block"):
            raise ConfigError("granularity", f"must be 'token' or 'block', got {self.granularity!r}")
        need = self.protected_capacity()
        if self.budget < need:
            raise ConfigError(
                "budget",
                f"{self.budget} is below the protected size {need} "
                f"(sinks={self.sinks}, recent={self.recent}"
                + (f", rounded up to whole blocks of {self.block_size}" if self.granularity == "block" else "")
                + ")",
            )
        return self

    def protected_capacity(self) -> int:
        """Upper bound on slots that can never be evicted (sinks + recent, whole blocks in block mode)."""
        if self.granularity == "token":
            return self.sinks + self.recent
        bs = self.block_size
        # +1: the stream need not start on a block boundary, so the sinks may straddle one.
        sink_blocks = (-(-self.sinks // bs) + 1) if self.sinks else 0
        recent_blocks = (-(-self.recent // bs) + 1) if self.recent else 0  # may straddle a boundary
        return (sink_blocks + recent_blocks) * bs

    def batch_key(self) -> tuple[Any, ...]:
        """Sessions whose keys are equal can be advanced by one batched engine call."""
        return (
            self.policy, self.beta, self.iterations, self.fanout, self.gamma, self.tau,
            self.randomness, self.pool, self.granularity, self.block_size, self.attn_reduce,
            self.pool_reduce, self.prior, self.prior_mix, self.prior_sharpness, self.react_calls,
            self.question_prior_mix, self.budget_alloc, self.budget_floor,
        )

    def with_(self, **changes: Any) -> PolicyConfig:
        """A validated copy with some fields changed."""
        return replace(self, **changes).validate()

    def to_dict(self) -> dict[str, Any]:
        """Plain dict (JSON-safe; inf tau is kept as float inf)."""
        return asdict(self)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> PolicyConfig:
        """Build and validate from a dict; unknown keys are an error, not ignored."""
        names = {f.name for f in fields(cls)}
        extra = sorted(set(data) - names)
        if extra:
            raise ConfigError(extra[0], f"unknown config field; known: {sorted(names)}")
        return cls(**data).validate()

    @classmethod
    def from_stored(cls, data: dict[str, Any]) -> PolicyConfig:
        """Like :meth:`from_dict`, for a config read back from a state blob: a knob the blob predates
        takes the value it had when the blob was written (:data:`LEGACY_DEFAULTS`), not today's
        default, so a restored session keeps the behaviour it was checkpointed under."""
        return cls.from_dict({**{k: v for k, v in LEGACY_DEFAULTS.items() if k not in data}, **data})

    def to_json(self) -> str:
        """Canonical JSON (sorted keys), used inside the state blob."""
        return json.dumps(self.to_dict(), sort_keys=True, allow_nan=True)


# What a config written before each knob existed behaved as (the knob's default at that time).
LEGACY_DEFAULTS: dict[str, Any] = {
    "attn_reduce": "sum", "pool_reduce": "max",
    "prior": "key_diversity", "prior_mix": 0.5, "prior_sharpness": 1.0,
    "react_calls": "all", "question_prior_mix": None,
    "budget_alloc": "fixed", "budget_floor": 0.25,
}


def _int_range(name: str, value: Any, lo: int, hi: int) -> None:
    if isinstance(value, bool) or not isinstance(value, int):
        raise ConfigError(name, f"must be an integer, got {type(value).__name__} {value!r}")
    if not lo <= value <= hi:
        raise ConfigError(name, f"must be in [{lo}, {hi}], got {value}")


def _float_range(name: str, value: Any, lo: float, hi: float, *, hi_open: bool = False) -> None:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or math.isnan(value):
        raise ConfigError(name, f"must be a number, got {value!r}")
    if value < lo or value > hi or (hi_open and value == hi):
        raise ConfigError(name, f"must be in [{lo}, {hi}{')' if hi_open else ']'}, got {value}")
