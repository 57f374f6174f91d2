"""Admission control: every resource a client can make the server allocate has a limit.

The session layer asks here *before* it allocates anything: before a session's rows are
reserved (OpenSession, resume), and before a step's tensors are decoded and its arena is
widened (Step). A request over a limit is refused with RESOURCE_EXHAUSTED naming the limit
and its value. The hot pool's byte budget is special: when a request would exceed it, the
caller first unloads idle sessions (checkpointed, least recently used first) and trims the
pool, and only then refuses.
"""

from __future__ import annotations

import numpy as np

from nexus_sidecar.engine import Engine, PolicyConfig
from nexus_sidecar.server.errors import LimitExceeded
from nexus_sidecar.server.settings import ServerSettings

MIB = 1024 * 1024


class Admission:
    """The limits of one server, checked against its engine's pool."""

    def __init__(self, settings: ServerSettings, engine: Engine) -> None:
        self.settings = settings
        self.engine = engine

    @property
    def pool_budget(self) -> int:
        """The hot pool's byte budget."""
        return self.settings.pool_budget_mb * MIB

    def check_config(self, cfg: PolicyConfig) -> None:
        """Per-session shape limits of a config (groups, fan-out, slots, budget)."""
        s = self.settings
        if cfg.groups > s.max_groups:
            raise LimitExceeded("max_groups", s.max_groups, f"groups = {cfg.groups}")
        if cfg.fanout > s.max_fanout:
            raise LimitExceeded("max_fanout", s.max_fanout, f"fanout = {cfg.fanout}")
        if s.max_budget and cfg.budget > s.max_budget:
            raise LimitExceeded("max_budget", s.max_budget, f"budget = {cfg.budget}")
        slots = cfg.groups * (cfg.budget + cfg.slack)
        if slots > s.max_session_slots:
            raise LimitExceeded("max_session_slots", s.max_session_slots,
                                f"groups x (budget + slack) = {cfg.groups} x ({cfg.budget} + {cfg.slack}) = {slots}")

    def check_tenant_sessions(self, tenant: str, open_now: int) -> None:
        """One more hot session for ``tenant``."""
        quota = self.settings.max_sessions_per_tenant
        if quota and open_now >= quota:
            raise LimitExceeded("max_sessions_per_tenant", quota, f"tenant {tenant!r} already has {open_now} open")

    def check_rpc(self, steps: int) -> None:
        """Session steps in one Step RPC."""
        if steps > self.settings.max_sessions_per_rpc:
            raise LimitExceeded("max_sessions_per_rpc", self.settings.max_sessions_per_rpc, f"{steps} steps")

    def check_new_tokens(self, ids: list[str], k: np.ndarray, rows: np.ndarray) -> None:
        """k of the steps ``rows`` (read from the offsets, before any payload is decoded) against the limit."""
        limit = self.settings.max_new_tokens_per_step
        over = np.flatnonzero(k[rows] > limit)
        if over.size:
            b = int(rows[over[0]])
            raise LimitExceeded("max_new_tokens_per_step", limit, f"steps[{ids[b]}] carries {int(k[b])} new tokens")

    def open_fits(self, cfg: PolicyConfig) -> int:
        """Bytes over the pool budget if a session of ``cfg`` were opened now (0 = it fits)."""
        return max(0, self.engine.bytes_after_open(cfg) - self.pool_budget)

    def step_fits(self, ks: dict[int, int]) -> int:
        """Bytes over the pool budget if these sessions (handle -> k) stepped now (0 = it fits)."""
        return max(0, self.engine.bytes_after_step(ks) - self.pool_budget)

    def pool_full(self, need_over: int, what: str) -> LimitExceeded:
        """The refusal once unloading idle sessions did not make room."""
        over_mb = need_over / MIB
        return LimitExceeded("pool_budget_mb", self.settings.pool_budget_mb,
                             f"{what} would take the hot pool {over_mb:.1f} MiB over it, after unloading every "
                             "idle session")
