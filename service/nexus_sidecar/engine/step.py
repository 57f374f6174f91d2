"""One batched engine call over R rows (a row = one layer group of one session).

Pure function: takes the rows' state and this call's inputs as padded tensors, returns the new
state, the keep mask and statistics. No Python loop over rows or slots; one set of kernel
launches per call, on whatever device the tensors live.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from nexus_sidecar.engine.policies import Policy, ScoreContext
from nexus_sidecar.engine.selection import INT64_MAX, select
from nexus_sidecar.engine.walk import resolve_edges, walk


@dataclass
class RowState:
    """State of R rows, padded to width W (pos padding = int64 max, edges -1/0)."""

    pos: torch.Tensor  # int64 [R, W] ascending
    age: torch.Tensor  # int32 [R, W] calls since the token entered
    memory: torch.Tensor  # float32 [R, W] policy memory (EMA numerator, accumulated mass)
    edge_pos: torch.Tensor  # int64 [R, W, F] target positions, -1 = none
    edge_w: torch.Tensor  # float32 [R, W, F]
    count: torch.Tensor  # int64 [R]


@dataclass
class RowParams:
    """Per-row numbers that may differ between sessions of one batch."""

    budget: torch.Tensor
    slack: torch.Tensor
    sinks: torch.Tensor
    recent: torch.Tensor
    seed: torch.Tensor
    group: torch.Tensor
    call: torch.Tensor  # index of this call in the session (0-based)


@dataclass
class RowInput:
    """This call's inputs for R rows. ``attn``/``last`` are aligned with the slots of the call:
    the retained slots then the ``n_new`` new ones; width W >= max(count + n_new)."""

    new_pos: torch.Tensor  # int64 [R, K], -1 padded
    n_new: torch.Tensor  # int64 [R]
    attn: torch.Tensor  # float32 [R, W]
    last: torch.Tensor  # float32 [R, W]
    edge_pos: torch.Tensor  # int64 [R, K, F]
    edge_w: torch.Tensor  # float32 [R, K, F]


@dataclass
class RowResult:
    """What one call produced for R rows."""

    state: RowState  # compacted, width W
    slot_pos: torch.Tensor  # int64 [R, W] positions of the call's slots (before eviction)
    keep: torch.Tensor  # bool [R, W] aligned with the call's slots (False on padding)
    evict: torch.Tensor  # bool [R, W]
    n_slots: torch.Tensor  # int64 [R] slots in the call (count + n_new)
    evicted_age: torch.Tensor  # int32 [R, W] age at eviction where evicted, else 0
    retained_mass: torch.Tensor  # float32 [R] share of this call's attention on kept slots


# Row error codes of validate_rows (0 = fine).
ROW_OK, ROW_NONFINITE_ATTN, ROW_NEG_ATTN, ROW_NONFINITE_LAST, ROW_NEG_LAST = 0, 1, 2, 3, 4
ROW_BAD_EDGE_W, ROW_BAD_EDGE_TARGET, ROW_BAD_NEW_POS = 5, 6, 7
ROW_ERRORS = {
    ROW_NONFINITE_ATTN: ("attn", "contains NaN or Inf"),
    ROW_NEG_ATTN: ("attn", "contains negative values (attention mass must be >= 0)"),
    ROW_NONFINITE_LAST: ("last", "contains NaN or Inf"),
    ROW_NEG_LAST: ("last", "contains negative values (attention must be >= 0)"),
    ROW_BAD_EDGE_W: ("edge_w", "contains NaN, Inf or negative weights"),
    ROW_BAD_EDGE_TARGET: (
        "edge_pos",
        "an edge points outside the cache (target neither retained nor new, after its source, or < -1)",
    ),
    ROW_BAD_NEW_POS: ("new_positions", "must be strictly ascending and after every retained position"),
}


def _append(state: RowState, inp: RowInput, width: int) -> tuple[torch.Tensor, ...]:
    """Retained slots followed by the new ones, as [R, W] tensors."""
    rows, k = inp.new_pos.shape
    dev = state.pos.device
    cur = state.pos.shape[1]

    def fit(x: torch.Tensor, fill: float | int) -> torch.Tensor:
        # Width W + 1: the last column receives the scatters of padded new tokens.
        if cur >= width + 1:
            return x[:, : width + 1].clone()
        pad_shape = (rows, width + 1 - cur, *x.shape[2:])
        return torch.cat([x, torch.full(pad_shape, fill, dtype=x.dtype, device=dev)], dim=1)

    pos, age, mem = fit(state.pos, INT64_MAX), fit(state.age, 0), fit(state.memory, 0.0)
    epos, ew = fit(state.edge_pos, -1), fit(state.edge_w, 0.0)
    if k:
        j = torch.arange(k, device=dev)
        col = torch.where(j < inp.n_new.unsqueeze(1), state.count.unsqueeze(1) + j, width)
        pos.scatter_(1, col, inp.new_pos)
        fan = epos.shape[2]
        col3 = col.unsqueeze(-1).expand(rows, k, fan)
        epos.scatter_(1, col3, inp.edge_pos)
        ew.scatter_(1, col3, inp.edge_w)
    # The dump column may hold scattered padding: reset it, then drop it.
    return pos[:, :width], age[:, :width], mem[:, :width], epos[:, :width], ew[:, :width]


def validate_rows(state: RowState, inp: RowInput) -> torch.Tensor:
    """Per-row error code (int64 [R], 0 = valid) for value checks that need the state.

    Shapes are the caller's job (they are known on the host); this checks values on the
    device in one pass, before anything is changed.
    """
    width = inp.attn.shape[1]
    rows, k = inp.new_pos.shape
    dev = inp.attn.device
    code = torch.zeros(rows, dtype=torch.int64, device=dev)

    def flag(cond: torch.Tensor, value: int) -> None:
        code.copy_(torch.where((code == 0) & cond, torch.full_like(code, value), code))

    flag(~torch.isfinite(inp.attn).all(1), ROW_NONFINITE_ATTN)
    flag((inp.attn < 0).any(1), ROW_NEG_ATTN)
    flag(~torch.isfinite(inp.last).all(1), ROW_NONFINITE_LAST)
    flag((inp.last < 0).any(1), ROW_NEG_LAST)
    if k:
        ew = inp.edge_w.reshape(rows, -1)
        flag((~torch.isfinite(ew) | (ew < 0)).any(1), ROW_BAD_EDGE_W)
        j = torch.arange(k, device=dev)
        live = j < inp.n_new.unsqueeze(1)
        prev_max = torch.where(
            state.count > 0,
            state.pos.gather(1, (state.count - 1).clamp(min=0).unsqueeze(1)).squeeze(1),
            torch.full_like(state.count, -1),
        )
        first_ok = ~live[:, 0] | (inp.new_pos[:, 0] > prev_max)
        steps_ok = (~live[:, 1:] | (inp.new_pos[:, 1:] > inp.new_pos[:, :-1])).all(1)
        flag(~(first_ok & steps_ok), ROW_BAD_NEW_POS)
        pos = _append(state, inp, width)[0].contiguous()
        tgt = inp.edge_pos
        idx = torch.searchsorted(pos, tgt.reshape(rows, -1)).reshape(tgt.shape)
        hit = pos.gather(1, idx.clamp(max=width - 1).reshape(rows, -1)).reshape(tgt.shape)
        known = (idx < width) & (hit == tgt)
        src = inp.new_pos.unsqueeze(-1)
        ok = (tgt == -1) | (known & (tgt <= src))
        ok = ok | ~live.unsqueeze(-1)
        flag(~ok.reshape(rows, -1).all(1), ROW_BAD_EDGE_TARGET)
    return code


def run_step(policy: Policy, state: RowState, params: RowParams, inp: RowInput) -> RowResult:
    """Advance R rows by one call: append, score, select, compact."""
    cfg = policy.cfg
    width = inp.attn.shape[1]
    dev = inp.attn.device
    pos, age, memory, edge_pos, edge_w = _append(state, inp, width)
    n = state.count + inp.n_new
    idx = torch.arange(width, device=dev).unsqueeze(0)
    valid = idx < n.unsqueeze(1)
    protected = valid & ((idx < params.sinks.unsqueeze(1)) | (idx >= (n - params.recent).unsqueeze(1)))
    cand = valid & ~protected
    attn = torch.where(valid, inp.attn, 0.0)
    last = torch.where(valid, inp.last, 0.0)

    if policy.uses_edges and cfg.iterations > 0 and cfg.beta > 0:
        targets = resolve_edges(pos, edge_pos)

        def run_walk(d: torch.Tensor) -> torch.Tensor:
            return walk(d, targets, edge_w, cfg.beta, cfg.iterations)
    else:

        def run_walk(d: torch.Tensor) -> torch.Tensor:
            return d

    ctx = ScoreContext(attn=attn, last=last, memory=memory, age=age, valid=valid, cand=cand, walk=run_walk)
    scores = policy.score(ctx)
    sel = select(
        scores.weight, valid, protected, pos, n, params.budget, params.slack, params.seed, params.group,
        params.call,
        tau=policy.tau() if policy.sampled else None,
        pool=cfg.pool,
        block_size=cfg.block_size if cfg.granularity == "block" else None,
    )
    keep = valid & ~sel.evict
    new_age = torch.where(valid, age + 1, torch.zeros_like(age))
    new_state = _compact(keep, pos, new_age, scores.memory, edge_pos, edge_w)
    total = attn.to(torch.float64).sum(1)
    kept = torch.where(keep, attn, 0.0).to(torch.float64).sum(1)
    retained = torch.where(total > 0, kept / total.clamp(min=1e-300), torch.ones_like(total)).to(torch.float32)
    return RowResult(
        state=new_state, slot_pos=torch.where(valid, pos, -1), keep=keep, evict=sel.evict, n_slots=n,
        evicted_age=torch.where(sel.evict, new_age, torch.zeros_like(new_age)), retained_mass=retained,
    )


def _compact(keep: torch.Tensor, pos: torch.Tensor, age: torch.Tensor, memory: torch.Tensor,
             edge_pos: torch.Tensor, edge_w: torch.Tensor) -> RowState:
    """Move kept slots to the front, in order; evicted and padding slots become padding."""
    rows, width = keep.shape
    dest = torch.where(keep, torch.cumsum(keep, dim=1) - 1, width)

    def move(x: torch.Tensor, fill: float | int) -> torch.Tensor:
        out = torch.full((rows, width + 1, *x.shape[2:]), fill, dtype=x.dtype, device=x.device)
        index = dest if x.dim() == 2 else dest.unsqueeze(-1).expand_as(x)
        out.scatter_(1, index, x)
        out[:, width] = fill
        return out[:, :width]

    return RowState(
        pos=move(pos, INT64_MAX), age=move(age, 0), memory=move(memory.to(torch.float32), 0.0),
        edge_pos=move(edge_pos, -1), edge_w=move(edge_w, 0.0), count=keep.sum(1),
    )
