"""One batched engine call over R rows (a row = one layer group of one session).

Works directly on the session pool's arena rows (see pool.py): appends the new tokens, scores
every live slot, selects evictions, marks them dead, and compacts rows whose holes exceed the
allowance. No Python loop over rows or slots; one set of kernel launches per call.

Two index spaces meet here: *arena columns* (where a token lives in the pool, with holes) and
*call slots* (the caller's view: live retained tokens in order, then the new ones). ``ext``
maps the first to the second.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from types import ModuleType

import torch

from nexus_sidecar.engine.budget_alloc import row_budgets
from nexus_sidecar.engine.hashing import uniforms
from nexus_sidecar.engine.policies import Policy, ScoreContext, SlotOrder
from nexus_sidecar.engine.pool import Rows, SessionPool
from nexus_sidecar.engine.selection import INT64_MAX, gumbel, select
from nexus_sidecar.engine.step_fused import run_step_fused
from nexus_sidecar.engine.step_io import PRIOR_RANGES
from nexus_sidecar.engine.walk import walk


@dataclass
class RowInput:
    """This call's inputs for R rows, in call-slot order, right-padded."""

    new_pos: torch.Tensor  # int64 [R, K], -1 padded
    n_new: torch.Tensor  # int64 [R]
    attn: torch.Tensor  # float32 [R, Wx] aligned with the call's slots
    last: torch.Tensor  # float32 [R, Wx]
    edge_pos: torch.Tensor  # int64 [R, K, F], -1 = none
    edge_w: torch.Tensor  # float32 [R, K, F]
    priors: dict[str, torch.Tensor] = field(default_factory=dict)  # float32 [R, Wx] by prior name
    call: str = "unspecified"  # what every row's queries are (config.CALL_KINDS)


@dataclass
class RowResult:
    """What one call produced for R rows, in call-slot order [R, Wx]."""

    keep: torch.Tensor  # bool, False on padding
    slot_pos: torch.Tensor  # int64 positions of the call's slots (-1 on padding)
    evicted_age: torch.Tensor  # int32 age (calls) at eviction where evicted, else 0
    retained_mass: torch.Tensor  # float32 [R] share of the call's attention on kept slots
    count: torch.Tensor  # int64 [R] live tokens after the call


# Row error codes of validate_rows (0 = fine).
ROW_ERRORS = {
    1: ("attn", "contains NaN or Inf"),
    2: ("attn", "contains negative values (attention mass must be >= 0)"),
    3: ("last", "contains NaN or Inf"),
    4: ("last", "contains negative values (attention must be >= 0)"),
    5: ("edge_w", "contains NaN, Inf or negative weights"),
    6: ("edge_pos", "an edge points outside the cache (target neither retained nor new, after its source, or < -1)"),
    7: ("new_positions", "must be strictly ascending and after every retained position"),
}
# One code per prior: one fused range test rejects NaN (every comparison is False), +-Inf and
# out-of-range values together, 3x cheaper than separate finiteness and range passes.
PRIOR_CODE = {name: 8 + i for i, name in enumerate(PRIOR_RANGES)}
_FLOAT32_MAX = float(torch.finfo(torch.float32).max)


def _prior_errors() -> dict[int, tuple[str, str]]:
    return {PRIOR_CODE[name]: (name, f"contains NaN, Inf or values outside [{lo}, {hi}]" if hi < math.inf
                                else "contains NaN, Inf or negative values (a norm is finite and >= 0)")
            for name, (lo, hi) in PRIOR_RANGES.items()}


ROW_ERRORS.update(_prior_errors())

def validate_rows(pool: SessionPool, rows: Rows, inp: RowInput, used_max: int, ops: ModuleType | None = None
                  ) -> tuple[torch.Tensor, torch.Tensor]:
    """Value checks on the device; changes nothing. Shapes are checked by the caller on the host.
    ``ops``: the fused CPU kernels, which check attn, last and the priors in one pass per row.

    Returns the per-row error code (int64 [R], 0 = valid) and, as a by-product of checking that
    every edge target is in the cache, each edge target's arena column (int64 [R, K, F]; only
    meaningful where the target is a valid position), which :func:`run_step` reuses.
    """
    R, K = inp.new_pos.shape
    dev = inp.attn.device
    code = torch.zeros(R, dtype=torch.int64, device=dev)

    def flag(cond: torch.Tensor, value: int) -> None:
        code.copy_(torch.where((code == 0) & cond, torch.full_like(code, value), code))

    if ops is not None:
        names = list(inp.priors)
        code.copy_(ops.value_codes(inp.attn, inp.last, [inp.priors[n] for n in names],
                                   [PRIOR_CODE[n] for n in names], [PRIOR_RANGES[n][0] for n in names],
                                   [PRIOR_RANGES[n][1] for n in names]))
    else:
        flag(~torch.isfinite(inp.attn).all(1), 1)
        flag((inp.attn < 0).any(1), 2)
        flag(~torch.isfinite(inp.last).all(1), 3)
        flag((inp.last < 0).any(1), 4)
        for name, x in inp.priors.items():
            lo, hi = PRIOR_RANGES[name]
            flag(~((x >= lo) & (x <= min(hi, _FLOAT32_MAX))).all(1), PRIOR_CODE[name])
    ew = inp.edge_w.reshape(R, -1)
    flag((~torch.isfinite(ew) | (ew < 0)).any(1), 5)
    live = torch.arange(K, device=dev) < inp.n_new.unsqueeze(1)
    used = pool.used[rows.index]
    width = max(used_max, 1)
    pos = rows.get(pool.slot["pos"], width).contiguous()
    alive = rows.get(pool.slot["alive"], width)
    prev_max = torch.where(used > 0, pos.gather(1, (used - 1).clamp(min=0).unsqueeze(1)).squeeze(1), -1)
    first_ok = ~live[:, 0] | (inp.new_pos[:, 0] > prev_max)
    steps_ok = (~live[:, 1:] | (inp.new_pos[:, 1:] > inp.new_pos[:, :-1])).all(1)
    flag(~(first_ok & steps_ok), 7)
    tgt = inp.edge_pos.reshape(R, -1).contiguous()
    idx = torch.searchsorted(pos, tgt).clamp(max=width - 1)
    old_ok = (pos.gather(1, idx) == tgt) & alive.gather(1, idx)
    # Rows are -1 padded on the right: make them sorted before searching.
    new_sorted = torch.where(live, inp.new_pos, INT64_MAX).contiguous()
    new_idx = torch.searchsorted(new_sorted, tgt).clamp(max=K - 1)
    new_ok = inp.new_pos.gather(1, new_idx) == tgt
    src = inp.new_pos.unsqueeze(-1).expand_as(inp.edge_pos).reshape(R, -1)
    ok = (tgt == -1) | ((old_ok | new_ok) & (tgt >= 0) & (tgt <= src))
    ok = ok | ~live.unsqueeze(-1).expand_as(inp.edge_pos).reshape(R, -1)
    flag(~ok.all(1), 6)
    # Retained targets keep their arena column; the j-th new token will sit at column used + j.
    target_col = torch.where(old_ok, idx, used.unsqueeze(1) + new_idx).reshape(inp.edge_pos.shape)
    return code, target_col


def _insert(pool: SessionPool, rows: Rows, inp: RowInput, target_col: torch.Tensor, fixed_u: bool) -> None:
    """Append the new tokens at the right of each row's arena (edges to the columns ``validate_rows`` found)."""
    R, K = inp.new_pos.shape
    dev = inp.attn.device
    used = pool.used[rows.index]
    j = torch.arange(K, device=dev)
    live = j < inp.n_new.unsqueeze(1)
    col = used.unsqueeze(1) + j  # [R, K]
    r_idx = rows.index.unsqueeze(1).expand(R, K)[live]
    c_idx = col[live]
    pool.slot["pos"][r_idx, c_idx] = inp.new_pos[live]
    pool.slot["alive"][r_idx, c_idx] = True
    pool.slot["birth"][r_idx, c_idx] = pool.params["call"][r_idx]
    pool.slot["memory"][r_idx, c_idx] = 0.0
    if fixed_u:
        p = pool.params
        u = uniforms(p["seed"][rows.index], p["group"][rows.index], inp.new_pos.clamp(min=0),
                     torch.zeros(R, dtype=torch.int64, device=dev))
        pool.slot["gumbel"][r_idx, c_idx] = gumbel(u[live])
    has = (inp.edge_pos >= 0) & (inp.edge_w > 0)
    own = col.unsqueeze(-1).expand_as(target_col)
    pool.edge["edge_idx"][r_idx, c_idx] = torch.where(has, target_col, own)[live]
    pool.edge["edge_w"][r_idx, c_idx] = torch.where(has, inp.edge_w, 0.0)[live]
    pool.used[rows.index] = used + inp.n_new
    pool.count[rows.index] += inp.n_new


def run_step(policy: Policy, pool: SessionPool, rows: Rows, inp: RowInput, target_col: torch.Tensor,
             width: int, ops: ModuleType | None = None) -> RowResult:
    """Advance R rows by one call. ``width`` >= max(used + n_new) over the rows (host-known);
    ``target_col`` is what :func:`validate_rows` returned for this input. ``ops``: the fused CPU
    kernels (see :mod:`nexus_sidecar.engine.kernels`), or None for this pure-torch reference."""
    cfg = policy.cfg
    dev = inp.attn.device
    R, Wx = inp.attn.shape
    pool.ensure_width(width)
    token_fixed = cfg.randomness == "fixed" and cfg.granularity == "token" and policy.sampled
    _insert(pool, rows, inp, target_col, token_fixed)
    if ops is not None:
        keep, slot_pos, evicted_age, retained_mass, count = run_step_fused(ops, policy, pool, rows, inp, width)
        return RowResult(keep=keep, slot_pos=slot_pos, evicted_age=evicted_age, retained_mass=retained_mass,
                         count=count)
    p = {name: pool.params[name][rows.index] for name in pool.params}
    pos = rows.get(pool.slot["pos"], width)
    alive = rows.get(pool.slot["alive"], width).clone()  # the pool's copy is overwritten below
    n = pool.count[rows.index]
    ext = torch.cumsum(alive, dim=1) - 1  # call-slot index of each live arena column
    gather_at = ext.clamp(0, Wx - 1)
    attn = torch.where(alive, inp.attn.gather(1, gather_at), 0.0)
    last = torch.where(alive, inp.last.gather(1, gather_at), 0.0)
    # Only the priors the policy reads are laid out (the others were validated, nothing more).
    priors = {name: torch.where(alive, inp.priors[name].gather(1, gather_at), 0.0)
              for name in policy.reads() if name in inp.priors}
    protected = alive & ((ext < p["sinks"].unsqueeze(1)) | (ext >= (n - p["recent"]).unsqueeze(1)))
    cand = alive & ~protected
    age = (p["call"].unsqueeze(1) - rows.get(pool.slot["birth"], width)).to(torch.int32)
    memory = rows.get(pool.slot["memory"], width)

    if policy.uses_edges and cfg.iterations > 0 and cfg.beta > 0:
        eidx = rows.get(pool.edge["edge_idx"], width)
        ew = rows.get(pool.edge["edge_w"], width)

        def run_walk(d: torch.Tensor) -> torch.Tensor:
            return walk(d, alive, eidx, ew, cfg.beta, cfg.iterations)
    else:

        def run_walk(d: torch.Tensor) -> torch.Tensor:
            return d

    slot_order = SlotOrder(ext, alive, Wx)
    ctx = ScoreContext(attn=attn, last=last, memory=memory, age=age, valid=alive, cand=cand, walk=run_walk,
                       slot_order=slot_order, count=n, n_new=inp.n_new, priors=priors,
                       call=inp.call)
    scores = policy.score(ctx)
    # Fixed randomness: a token keeps its lottery ticket for life; per_call: a fresh draw each call.
    call = p["call"] if cfg.randomness == "per_call" else torch.zeros_like(p["call"])
    budget, slack = row_budgets(cfg, scores.weight, cand, n, p, slot_order)  # per group, or allocated across
    sel = select(
        # Arena columns past ``used`` always hold the int64-max padding position (pool invariant).
        scores.weight, alive, protected, pos, n, budget, slack,
        p["seed"], p["group"], call,
        tau=policy.tau() if policy.sampled else None,
        pool=cfg.pool,
        pool_reduce=cfg.pool_reduce,
        block_size=cfg.block_size if cfg.granularity == "block" else None,
        noise=rows.get(pool.slot["gumbel"], width) if token_fixed else None,
        slot_order=slot_order,
    )
    keep = alive & ~sel.evict
    if scores.memory is not memory:
        rows.put(pool.slot["memory"], torch.where(alive, scores.memory, 0.0).to(torch.float32))
    rows.put(pool.slot["alive"], keep)
    new_count = keep.sum(1)
    pool.count[rows.index] = new_count
    pool.params["call"][rows.index] += 1

    # Back to call-slot order.
    dump = torch.where(alive, ext, Wx)
    out_keep = torch.zeros(R, Wx + 1, dtype=torch.bool, device=dev).scatter_(1, dump, keep)[:, :Wx]
    out_pos = torch.full((R, Wx + 1), -1, dtype=torch.int64, device=dev).scatter_(1, dump, pos)[:, :Wx]
    ev_age = torch.where(sel.evict, age + 1, 0).to(torch.int32)
    out_age = torch.zeros(R, Wx + 1, dtype=torch.int32, device=dev).scatter_(1, dump, ev_age)[:, :Wx]
    total = attn.sum(1, dtype=torch.float64)
    kept = torch.where(keep, attn, 0.0).sum(1, dtype=torch.float64)
    retained = torch.where(total > 0, kept / total.clamp(min=1e-300), 1.0).to(torch.float32)
    return RowResult(keep=out_keep, slot_pos=out_pos, evicted_age=out_age, retained_mass=retained, count=new_count)


def hole_allowance(budget: int) -> int:
    """Holes a row may carry before it is compacted (amortises compaction over many calls)."""
    return max(16, budget // 8)
