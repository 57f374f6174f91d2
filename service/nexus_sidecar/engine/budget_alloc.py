"""Budgets that move between layer groups: one session budget, allocated each call across its groups.

With ``budget_alloc = "shared"`` a session of G groups keeps ``G * budget`` slots in all, not
``budget`` in each: every call where the session holds more than ``G * (budget + slack)`` slots,
its groups' evictable weights are compared with one another and the slots go where the weight is
(AdaKV's idea, Feng et al. 2024, across heads; here across layers). Each group first keeps its
protected slots and its ``floor`` (``ceil(budget_floor * budget)`` slots, protected ones counted)
best candidates; the rest of the session budget goes to the highest candidates of every group
taken together. The result is a per-group budget; the policy's own selection (top-K or reservoir)
then chooses *which* slots of each group go, exactly as with fixed budgets, so every policy has
the knob.

Weights are compared after normalising each group's candidate weights to sum to 1 (a group with
no weight on any candidate spreads it uniformly): policies score in different units and layers
attend with different sharpness, and a normalised weight says how much of the group's evictable
mass a slot holds, which is comparable across groups (the same reason AdaKV compares softmax
attention, which sums to 1 per head).

Rows of one session are consecutive with group indices 0..G-1 (the engine lays batches out so),
which is how the rows are tied to their session here; the allocation of a session depends only on
its own rows, so a batch's other sessions and its padding change nothing (batch invariance).
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import torch

from nexus_sidecar.engine.selection import span_pool

if TYPE_CHECKING:
    from nexus_sidecar.engine.config import PolicyConfig
    from nexus_sidecar.engine.policies import SlotOrder


def row_budgets(cfg: PolicyConfig, weight: torch.Tensor, cand: torch.Tensor, n: torch.Tensor,
                params: dict[str, torch.Tensor], slot_order: SlotOrder | None = None
                ) -> tuple[torch.Tensor, torch.Tensor]:  # fmt: skip
    """The (budget, slack) per row that selection evicts down to: the session's own per group with
    ``budget_alloc = "fixed"``, the allocation of :func:`allocate` (slack already applied) with
    ``"shared"``. ``weight`` is the policy's raw weight; it is span-pooled here as selection pools it."""
    if cfg.budget_alloc != "shared":
        return params["budget"], params["slack"]
    w = span_pool(weight, cand, cfg.pool, slot_order, cfg.pool_reduce)
    alloc = allocate(w, cand, n, params["budget"], params["slack"], params["group"], cfg.budget_floor)
    return alloc, torch.zeros_like(alloc)


def session_of_rows(group: torch.Tensor) -> torch.Tensor:
    """Session index of every row (rows of a session are consecutive, groups ascending from 0)."""
    return torch.cumsum((group == 0).to(torch.int64), 0) - 1


def allocate(weight: torch.Tensor, cand: torch.Tensor, n: torch.Tensor, budget: torch.Tensor,
             slack: torch.Tensor, group: torch.Tensor, floor: float) -> torch.Tensor:  # fmt: skip
    """Per-row budgets for sessions that share one budget across their groups.

    ``weight`` float [R, W] (the scores selection ranks), ``cand`` bool [R, W] (live, evictable),
    ``n`` int64 [R] live slots per row, ``budget`` / ``slack`` int64 [R] (per group, equal within a
    session), ``group`` int64 [R]. Returns int64 [R]: the slots each row keeps after this call;
    ``n`` where the session is not over ``G * (budget + slack)`` (nothing is evicted). For a session
    that is over, the row budgets sum to ``G * budget`` whenever the protected slots fit in it, and
    no row gets less than its protected slots or ``min(n, ceil(floor * budget))``.
    """
    R, W = weight.shape
    if R == 0:
        return n.clone()
    dev = weight.device
    sess = session_of_rows(group)
    S = int(sess[-1]) + 1
    zeros_s = torch.zeros(S, dtype=torch.int64, device=dev)
    total_n = zeros_s.index_add(0, sess, n)
    total_b = zeros_s.index_add(0, sess, budget)
    total_slack = zeros_s.index_add(0, sess, slack)
    over = total_n > total_b + total_slack  # [S]
    n_cand = cand.sum(1)
    prot = n - n_cand  # live protected slots per row
    # Normalised candidate weights (uniform where a row has no positive weight on its candidates).
    w = torch.where(cand, weight.to(torch.float64).clamp(min=0), torch.zeros((), dtype=torch.float64, device=dev))
    mass = w.sum(1, keepdim=True)
    uniform = cand.to(torch.float64) / n_cand.clamp(min=1).unsqueeze(1)
    wn = torch.where(mass > 0, w / mass.clamp(min=1e-300), uniform)
    # Rank of each candidate within its row (0 = heaviest; ties: the lower slot first).
    key = torch.where(cand, wn, torch.full_like(wn, -1.0))
    order = torch.sort(key, dim=1, descending=True, stable=True).indices
    rank = torch.empty_like(order).scatter_(1, order, torch.arange(W, device=dev).expand(R, W).contiguous())
    floor_slots = torch.ceil(torch.as_tensor(floor, dtype=torch.float64) * budget.to(torch.float64)).to(torch.int64)
    reserve_n = (torch.minimum(floor_slots, n) - prot).clamp(min=0).minimum(n_cand)  # [R]
    reserved = cand & (rank < reserve_n.unsqueeze(1))
    quota = (total_b - zeros_s.index_add(0, sess, prot + reserve_n)).clamp(min=0)  # [S]
    # The session's remaining quota goes to its heaviest unreserved candidates, all groups together:
    # sort every entry by weight, then (stably) by session, and count ranks within each session.
    rest = cand & ~reserved
    flat_w = torch.where(rest, wn, torch.full_like(wn, -1.0)).reshape(-1)
    flat_s = sess.unsqueeze(1).expand(R, W).reshape(-1)
    by_w = torch.sort(flat_w, descending=True, stable=True).indices
    by_s = by_w[torch.sort(flat_s[by_w], stable=True).indices]
    sorted_sess = flat_s[by_s]
    starts = torch.zeros(S, dtype=torch.int64, device=dev)
    starts[1:] = torch.cumsum(torch.bincount(sorted_sess, minlength=S), 0)[:-1]
    within = torch.arange(R * W, device=dev) - starts[sorted_sess]
    chosen_sorted = (within < quota[sorted_sess]) & (flat_w[by_s] >= 0)
    chosen = torch.zeros(R * W, dtype=torch.bool, device=dev).scatter_(0, by_s, chosen_sorted).reshape(R, W)
    alloc = prot + reserve_n + chosen.sum(1)
    return torch.where(over[sess], alloc, n)
