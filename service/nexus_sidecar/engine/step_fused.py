"""One batched engine call on the fused CPU kernels (``kernels/fused_cpu.cpp``).

Same contract and results as :func:`nexus_sidecar.engine.step.run_step` (the pure-torch reference:
bit-identical selections, scores within float64 rounding of row sums, see the kernel source),
with the [R, W] passes fused per row: the arena layout of the call (one kernel), Nexus scoring
with its walk (one kernel, no [R, W, F] temporaries), token-granularity selection with the keys
and per-call uniforms computed only for candidates (one kernel), and the outputs in call-slot
order (one kernel, writing the keep mask into the pool). What the kernels do not cover runs the
reference's torch code on the kernels' intermediate tensors: the scores of the direct-attention
policies (a few elementwise ops, SnapKV's window), span pooling, and block-granularity selection.
"""

from __future__ import annotations

from types import ModuleType
from typing import TYPE_CHECKING

import torch

from nexus_sidecar.engine.budget_alloc import row_budgets
from nexus_sidecar.engine.policies import Policy, ScoreContext, SlotOrder
from nexus_sidecar.engine.policies.ema import _FULL_TABLE, _saturation, denominators
from nexus_sidecar.engine.policies.nexus import NexusSampling, NexusTopK, prior_share, reacts
from nexus_sidecar.engine.pool import Rows, SessionPool
from nexus_sidecar.engine.selection import select, span_pool
from nexus_sidecar.engine.step_io import PRIOR_RANGES, BatchInput, StepInput

if TYPE_CHECKING:
    from nexus_sidecar.engine.step import RowInput

_PRIOR_KIND = {name: i for i, name in enumerate(PRIOR_RANGES)}  # the kernel's prior_kind codes
_NEXUS = (NexusSampling, NexusTopK)


def _nexus_weight(ops: ModuleType, policy: Policy, ctx: ScoreContext, memory: torch.Tensor,
                  edges: tuple[torch.Tensor, torch.Tensor] | None, call: torch.Tensor) -> torch.Tensor:
    """policies/nexus.py's nexus_scores on the kernel; writes the new memory into ``memory``."""
    cfg = policy.cfg
    mix = prior_share(policy, ctx.call)
    prior = ctx.priors.get(cfg.prior) if mix > 0 else None
    max_age = int(call.max()) + 1 if _saturation(cfg.gamma) > _FULL_TABLE and call.numel() else None
    # Every row of a batch shares the call kind today; the kernel takes the reaction flag per row.
    react = torch.full((ctx.attn.shape[0],), reacts(policy, ctx.call), dtype=torch.bool)
    return ops.nexus_score(
        ctx.attn, ctx.last, memory, ctx.age, ctx.valid, ctx.cand, ctx.slot_order.ext, ctx.count, ctx.n_new,
        prior, react, edges[0] if edges else None, edges[1] if edges else None,
        denominators(cfg.gamma, max_age, ctx.attn.device), _PRIOR_KIND[cfg.prior], mix,
        cfg.prior_sharpness, cfg.gamma, cfg.beta, cfg.iterations, cfg.attn_reduce == "mean")


def run_step_fused(ops: ModuleType, policy: Policy, pool: SessionPool, rows: Rows, inp: RowInput,
                   width: int) -> tuple[torch.Tensor, ...]:
    """Advance R rows by one call (after ``step._insert``): the fields of a :class:`step.RowResult`."""
    cfg = policy.cfg
    Wx = inp.attn.shape[1]
    p = {name: pool.params[name][rows.index] for name in pool.params}
    pos = rows.get(pool.slot["pos"], width)
    # A view when the rows are contiguous: finish() writes the keep mask into it in place.
    alive = rows.get(pool.slot["alive"], width)
    n = pool.count[rows.index]
    reads = [name for name in policy.reads() if name in inp.priors]
    ext, protected, cand, age, attn, last, *laid = ops.layout(
        alive, rows.get(pool.slot["birth"], width), p["call"], p["sinks"], p["recent"], n,
        [inp.attn, inp.last, *(inp.priors[name] for name in reads)], width)
    priors = dict(zip(reads, laid, strict=True))
    memory = rows.get(pool.slot["memory"], width)
    uses_walk = policy.uses_edges and cfg.iterations > 0 and cfg.beta > 0
    edges = (rows.get(pool.edge["edge_idx"], width), rows.get(pool.edge["edge_w"], width)) if uses_walk else None

    def run_walk(d: torch.Tensor) -> torch.Tensor:
        return ops.walk(d, alive, edges[0], edges[1], cfg.beta, cfg.iterations) if edges else d

    slot_order = SlotOrder(ext, alive, Wx)
    ctx = ScoreContext(attn=attn, last=last, memory=memory, age=age, valid=alive, cand=cand, walk=run_walk,
                       slot_order=slot_order, count=n, n_new=inp.n_new, priors=priors, call=inp.call)
    if isinstance(policy, _NEXUS):
        weight = _nexus_weight(ops, policy, ctx, memory, edges, p["call"])
        rows.put(pool.slot["memory"], memory)  # a no-op on a view (written in place)
    else:
        scores = policy.score(ctx)
        weight = scores.weight
        if scores.memory is not memory:
            rows.put(pool.slot["memory"], torch.where(alive, scores.memory, 0.0).to(torch.float32))
    budget, slack = row_budgets(cfg, weight, cand, n, p, slot_order)  # per group, or allocated across
    need = torch.where(n > budget + slack, n - budget, torch.zeros_like(n))
    token_fixed = cfg.randomness == "fixed" and cfg.granularity == "token" and policy.sampled
    call = p["call"] if cfg.randomness == "per_call" else torch.zeros_like(p["call"])
    if cfg.granularity == "token":
        w = weight if cfg.pool <= 1 else span_pool(weight, cand, cfg.pool, slot_order, cfg.pool_reduce)
        tau = policy.tau() if policy.sampled else None
        reservoir = tau is not None and tau != float("inf")
        evict = ops.select_token(w, cand, need, 1 if reservoir else 0, tau if reservoir else 0.0,
                                 rows.get(pool.slot["gumbel"], width) if token_fixed and reservoir else None,
                                 pos, p["seed"], p["group"], call)
    else:
        evict = select(weight, alive, protected, pos, n, budget, slack, p["seed"], p["group"], call,
                       tau=policy.tau() if policy.sampled else None, pool=cfg.pool, pool_reduce=cfg.pool_reduce,
                       block_size=cfg.block_size, slot_order=slot_order).evict
    out_keep, out_pos, out_age, retained, new_count = ops.finish(alive, evict, ext, pos, age, attn, Wx)
    rows.put(pool.slot["alive"], alive)  # a no-op on a view
    pool.count[rows.index] = new_count
    pool.params["call"][rows.index] += 1
    return out_keep, out_pos, out_age, retained, new_count


def one_entry(policy: Policy) -> bool:
    """Whether a batch of ``policy`` runs as one native call (:func:`nexus_call`): Nexus scores with
    token-granularity selection, no span pooling and a fixed budget per group, the service's default.
    The other policies and forms (budgets shared across groups included: their allocation is torch
    code, :func:`~nexus_sidecar.engine.budget_alloc.row_budgets`) run :func:`run_step_fused`, driven
    from Python."""
    cfg = policy.cfg
    return (isinstance(policy, _NEXUS) and cfg.granularity == "token" and cfg.pool <= 1
            and cfg.budget_alloc == "fixed")


_POOL_FIELDS = ("pos", "alive", "birth", "memory", "gumbel")


def nexus_call(ops: ModuleType, policy: Policy, pool: SessionPool, rows: Rows, inputs: list[StepInput] | BatchInput,
               groups: list[int], widths: list[int], ks: list[int], used_max: int, width: int, max_call: int
               ) -> list[int] | tuple[torch.Tensor, ...]:
    """One engine call of a Nexus batch in one native entry that releases the GIL for its whole
    duration (``kernels/fused_cpu.cpp: nexus_call``): the inputs' concatenation, ``validate_rows``,
    ``_insert`` and :func:`run_step_fused`, with the same ops in the same order.

    ``widths``/``ks``: each session's call slots and new tokens; ``used_max``, ``width``: as
    ``Engine._run_batch`` computes them; ``max_call``: the largest call index of the rows (host
    mirror). ``inputs`` is one :class:`StepInput` per session, or the batch in columnar form (every
    session the same width and k): then it enters the kernel as one "session" of all the rows, with
    no per-session tensor. Returns the per-row error codes (a list; nothing changed) when some row
    fails validation, else the fields of a :class:`step.RowResult`.
    """
    from nexus_sidecar.engine.step import PRIOR_CODE

    cfg = policy.cfg
    if isinstance(inputs, BatchInput):
        # The kernel's uniform path concatenates per-session [G, ...] blocks and expands each
        # session's [k] positions over its groups: [R, ...] blocks and [R, k] positions are one such
        # block, so the batch passes whole (the kernel's checks still see R rows and R k's).
        b_in = inputs
        names = list(b_in.priors)
        new_pos = b_in.new_positions.repeat_interleave(torch.tensor(b_in.groups), dim=0)
        R, K = new_pos.shape
        fields = ([new_pos], [b_in.attn], [b_in.last], [b_in.edge_pos], [b_in.edge_w],
                  [[b_in.priors[n]] for n in names])
        call_kind, groups, widths, ks = b_in.call, [R], [max(widths)], [K]
    else:
        names = list(inputs[0].priors())
        call_kind = inputs[0].call
        fields = ([i.new_positions for i in inputs], [i.attn for i in inputs], [i.last for i in inputs],
                  [i.edge_pos for i in inputs], [i.edge_w for i in inputs],
                  [[getattr(i, n) for i in inputs] for n in names])
    reads = [name for name in policy.reads() if name in names]
    mix = prior_share(policy, call_kind)
    max_age = max_call + 1 if _saturation(cfg.gamma) > _FULL_TABLE else None
    tau = policy.tau() if policy.sampled else None
    reservoir = tau is not None and tau != float("inf")
    pool.ensure_width(width)
    out = ops.nexus_call(
        [*(pool.slot[n] for n in _POOL_FIELDS), pool.edge["edge_idx"], pool.edge["edge_w"], pool.used, pool.count,
         *(pool.params[n] for n in ("budget", "slack", "sinks", "recent", "seed", "group", "call"))],
        rows.index, -1 if rows.first is None else rows.first,
        *fields,
        [PRIOR_CODE[n] for n in names], [PRIOR_RANGES[n][0] for n in names], [PRIOR_RANGES[n][1] for n in names],
        groups, widths, ks, used_max, width, names.index(reads[0]) if reads else -1,
        denominators(cfg.gamma, max_age, pool.device), _PRIOR_KIND[cfg.prior], mix, cfg.prior_sharpness, cfg.gamma,
        cfg.beta, cfg.iterations, cfg.attn_reduce == "mean", reacts(policy, call_kind),
        policy.uses_edges and cfg.iterations > 0 and cfg.beta > 0,
        cfg.randomness == "fixed" and policy.sampled, 1 if reservoir else 0, tau if reservoir else 0.0,
        cfg.randomness == "per_call")
    if len(out) == 1:
        return out[0].tolist()
    return tuple(out[1:])
