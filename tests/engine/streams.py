"""Random but valid call streams for the engine, and the invariant checks every test shares.

A stream is driven by its own ``numpy`` generator, so the inputs of a session depend only on its
seed and on the engine's answers for that session (its retained positions): two sessions driven
by equal generators see equal inputs exactly as long as the engine treats them equally.

Every generated call is valid per docs/engine-api.md:
- new positions ascending, after every retained position (contiguous from ``start`` unless
  ``gap`` > 0 leaves holes between calls),
- ``attn``/``last`` float32 ``[G, max(counts) + k]``, non-negative, zero on the per-group padding,
- ``edge_pos``/``edge_w`` ``[G, k, F]``: each new token's top-F attended positions among the
  retained slots of its group and the new tokens up to itself, weights >= 0, ``-1`` padding,
- unless ``priors=False`` (an old client), the three priors ``[G, max(counts) + k]``: key
  diversity in [-1, 1] (both ends and ties included), key and value norms >= 0, zero on padding.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np
import torch
from nexus_sidecar.engine import Engine, PolicyConfig, StepInput, StepOutput


def random_input(
    rng: np.random.Generator,
    retained: list[torch.Tensor],
    new_positions: np.ndarray,
    fanout: int,
    priors: bool = True,
) -> StepInput:
    """One valid call for a session whose groups retain ``retained`` (ascending positions)."""
    groups = len(retained)
    k = len(new_positions)
    counts = [int(p.numel()) for p in retained]
    width = max(counts) + k
    attn = np.zeros((groups, width), dtype=np.float32)
    last = np.zeros((groups, width), dtype=np.float32)
    edge_pos = np.full((groups, k, fanout), -1, dtype=np.int64)
    edge_w = np.zeros((groups, k, fanout), dtype=np.float32)
    for g in range(groups):
        n = counts[g] + k
        # Heavy-tailed masses (a few slots dominate), some exact zeros, as real attention looks.
        a = rng.exponential(1.0, n) ** 3
        a[rng.random(n) < 0.1] = 0.0
        attn[g, :n] = a * k / max(a.sum(), 1e-12)
        b = rng.exponential(1.0, n) ** 3
        last[g, :n] = b / max(b.sum(), 1e-12)
        slots = np.concatenate([retained[g].numpy(), new_positions])
        for j in range(k):
            visible = slots[: counts[g] + j + 1]  # retained + new tokens up to and including j
            f = int(rng.integers(0, min(fanout, len(visible)) + 1))
            if f == 0:
                continue
            tgt = rng.choice(visible, size=f, replace=False)
            w = rng.random(f).astype(np.float32)
            order = np.argsort(-w, kind="stable")
            edge_pos[g, j, :f] = tgt[order]
            edge_w[g, j, :f] = w[order]
    inp = StepInput(
        new_positions=torch.from_numpy(np.asarray(new_positions, dtype=np.int64)),
        attn=torch.from_numpy(attn),
        last=torch.from_numpy(last),
        edge_pos=torch.from_numpy(edge_pos),
        edge_w=torch.from_numpy(edge_w),
    )
    if priors:
        for name, t in random_priors(rng, counts, k).items():
            setattr(inp, name, t)
    return inp


def random_priors(rng: np.random.Generator, counts: list[int], k: int) -> dict[str, torch.Tensor]:
    """Valid priors for groups holding ``counts`` slots before a call of ``k`` new tokens."""
    width = max(counts) + k
    out = {name: np.zeros((len(counts), width), dtype=np.float32) for name in ("key_diversity", "key_norm",
                                                                             "value_norm")}
    for g, c in enumerate(counts):
        n = c + k
        # Coarse values give ties; the range ends are valid values too.
        kd = np.round(rng.uniform(-1.0, 1.0, n), 1)
        kd[rng.random(n) < 0.05] = 1.0
        kd[rng.random(n) < 0.05] = -1.0
        out["key_diversity"][g, :n] = kd
        out["key_norm"][g, :n] = np.round(rng.gamma(4.0, 3.0, n), 2)
        out["value_norm"][g, :n] = rng.gamma(2.0, 0.5, n) * (rng.random(n) > 0.05)
    return {name: torch.from_numpy(v) for name, v in out.items()}


@dataclass
class Stream:
    """One session plus the generator of its inputs."""

    engine: Engine
    handle: int
    cfg: PolicyConfig
    rng: np.random.Generator
    k_range: tuple[int, int] = (1, 4)  # inclusive range of tokens per call
    prefill: int = 0  # tokens of the first call (0 = drawn from k_range like the rest)
    start: int = 0  # first position
    gap: int = 0  # max random hole between calls (0 = contiguous positions)
    priors: bool = True  # send the query-agnostic priors (False: an old client)
    call: str = "unspecified"  # the call kind every input carries
    next_pos: int = field(init=False)
    calls: int = field(default=0, init=False)
    first_positions: list[int] = field(default_factory=list, init=False)

    def __post_init__(self) -> None:
        self.next_pos = self.start

    @classmethod
    def open(cls, engine: Engine, cfg: PolicyConfig, data_seed: int, **kw: object) -> Stream:
        return cls(engine, engine.open(cfg), cfg, np.random.default_rng(data_seed), **kw)  # type: ignore[arg-type]

    def next_input(self) -> StepInput:
        if self.calls == 0 and self.prefill:
            k = self.prefill
        else:
            k = int(self.rng.integers(self.k_range[0], self.k_range[1] + 1))
        if self.calls and self.gap:
            self.next_pos += int(self.rng.integers(0, self.gap + 1))
        new = np.arange(self.next_pos, self.next_pos + k, dtype=np.int64)
        inp = random_input(self.rng, self.engine.positions(self.handle), new, self.cfg.fanout, self.priors)
        inp.call = self.call
        return inp

    def advance(self, inp: StepInput) -> None:
        """Book-keeping after the engine accepted ``inp``."""
        new = inp.new_positions.tolist()
        if len(self.first_positions) < self.cfg.sinks:
            self.first_positions.extend(new[: self.cfg.sinks - len(self.first_positions)])
        self.next_pos = new[-1] + 1
        self.calls += 1

    def step(self) -> tuple[StepInput, StepOutput]:
        inp = self.next_input()
        out = self.engine.step({self.handle: inp})[self.handle]
        assert isinstance(out, StepOutput)
        self.advance(inp)
        return inp, out


def step_together(streams: list[Stream]) -> list[tuple[StepInput, StepOutput]]:
    """One ``Engine.step`` call advancing every stream (they must share one engine)."""
    eng = streams[0].engine
    inputs = [s.next_input() for s in streams]
    outs = eng.step({s.handle: i for s, i in zip(streams, inputs, strict=True)})
    res = []
    for s, inp in zip(streams, inputs, strict=True):
        out = outs[s.handle]
        assert isinstance(out, StepOutput)
        s.advance(inp)
        res.append((inp, out))
    return res


def evicted_lists(out: StepOutput) -> list[list[int]]:
    return [e.tolist() for e in out.evicted]


def check_call(stream: Stream, before: list[torch.Tensor], inp: StepInput, out: StepOutput) -> None:
    """Every invariant of one call (DESIGN.md section 2), for any policy."""
    cfg = stream.cfg
    after = stream.engine.positions(stream.handle)
    new = inp.new_positions.tolist()
    k = len(new)
    for g in range(cfg.groups):
        slots = before[g].tolist() + new
        n = len(slots)
        width = out.keep.shape[1]
        assert out.slot_positions[g, :n].tolist() == slots, "slot order: retained ascending, then the new ones"
        assert (out.slot_positions[g, n:] == -1).all() and not out.keep[g, n:].any(), "padding must be -1 / not kept"
        assert width == max(p.numel() for p in before) + k
        keep = out.keep[g, :n].tolist()
        kept = [p for p, kp in zip(slots, keep, strict=True) if kp]
        gone = [p for p, kp in zip(slots, keep, strict=True) if not kp]
        assert after[g].tolist() == kept, "retained positions must be exactly the kept slots, in order"
        assert out.evicted[g].tolist() == gone
        assert out.retained[g] == len(kept)
        if cfg.budget_alloc == "shared" and cfg.groups > 1:
            continue  # one budget for the session: checked over all groups below
        # Budget: <= budget + slack always, <= budget after an eviction; nothing evicted under budget+slack.
        assert len(kept) <= cfg.budget + cfg.slack, (
            f"group {g}: {len(kept)} slots {kept} after the call, budget {cfg.budget} + slack {cfg.slack}")
        if n > cfg.budget + cfg.slack:
            assert len(kept) <= cfg.budget, f"group {g}: {len(kept)} slots after evicting, budget {cfg.budget}"
            if cfg.granularity == "token":
                assert len(kept) == cfg.budget, "token mode evicts exactly down to the budget"
            else:
                # Whole blocks go; never more than one block's worth beyond what was needed.
                assert len(kept) > cfg.budget - cfg.block_size
        else:
            assert not gone, f"group {g}: evicted {gone} while {n} <= budget + slack"
        # Protected: the sinks (first positions of the stream) and the last `recent` slots of the call.
        sinks = set(stream.first_positions[: cfg.sinks])
        assert not sinks & set(gone), f"sink evicted: {sorted(sinks & set(gone))}"
        if cfg.recent:
            recent = slots[-cfg.recent :]
            assert not set(recent) & set(gone), f"recent slot evicted: {sorted(set(recent) & set(gone))}"
        if cfg.granularity == "block":
            bs = cfg.block_size
            gone_blocks = {p // bs for p in gone}
            assert not any(p // bs in gone_blocks for p in kept), "block mode must evict whole blocks"


def check_shared_budget(stream: Stream, before: list[torch.Tensor], inp: StepInput, out: StepOutput) -> None:
    """A session budget shared by its groups (``budget_alloc = "shared"``): the whole session holds
    at most ``G * (budget + slack)``, exactly ``G * budget`` after an eviction (token mode), nothing
    is evicted under ``G * (budget + slack)``, every group keeps its floor (or all it had), and the
    protected slots of every group survive."""
    import math

    cfg = stream.cfg
    G, k = cfg.groups, inp.new_positions.numel()
    held = [p.numel() + k for p in before]
    kept = [int(r) for r in out.retained]
    assert sum(kept) <= G * (cfg.budget + cfg.slack), f"{kept}: over the session budget"
    if sum(held) > G * (cfg.budget + cfg.slack):
        if cfg.granularity == "token":
            assert sum(kept) == G * cfg.budget, f"{kept}: the session evicts exactly down to G x budget"
        floor = math.ceil(cfg.budget_floor * cfg.budget)
        for g in range(G):
            assert kept[g] >= min(held[g], floor), f"group {g}: {kept[g]} slots, below its floor {floor}"
    else:
        assert kept == held, f"evicted while the session ({sum(held)}) is within G x (budget + slack)"


def run_checked(stream: Stream, calls: int) -> list[list[list[int]]]:
    """Drive ``calls`` calls, checking every invariant; returns the evictions of each call."""
    history = []
    for _ in range(calls):
        before = stream.engine.positions(stream.handle)
        inp, out = stream.step()
        check_call(stream, before, inp, out)
        if stream.cfg.budget_alloc == "shared" and stream.cfg.groups > 1:
            check_shared_budget(stream, before, inp, out)
        history.append(evicted_lists(out))
    return history
