"""The in-process engine: open sessions, advance many of them per batched call, snapshot and
restore them. The gRPC server and the in-process (``local``) worker backend both use it."""

from __future__ import annotations

import itertools
from collections.abc import Mapping
from dataclasses import dataclass, field

import torch

from nexus_sidecar.engine.config import PolicyConfig
from nexus_sidecar.engine.errors import EngineError, InputError
from nexus_sidecar.engine.policies import Policy, make_policy
from nexus_sidecar.engine.pool import SessionPool
from nexus_sidecar.engine.state import GroupState, SessionState
from nexus_sidecar.engine.step import ROW_ERRORS, RowInput, RowResult, run_step, validate_rows
from nexus_sidecar.engine.step_io import StepInput, StepOutput

_FLOATS = (torch.float16, torch.bfloat16, torch.float32, torch.float64)


def default_device() -> torch.device:
    """CUDA when present, CPU otherwise."""
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")


@dataclass
class _Session:
    cfg: PolicyConfig
    policy: Policy
    pool: SessionPool
    rows: list[int]
    counts: list[int]  # host mirror of retained slots per group
    calls: int = 0
    tokens_seen: int = 0
    tokens_evicted: int = 0
    max_pos: int = -1
    extra: dict[str, object] = field(default_factory=dict)


class Engine:
    """Batched Nexus Sampling engine over a device-resident session pool."""

    def __init__(self, device: str | torch.device | None = None) -> None:
        self.device = torch.device(device) if device is not None else default_device()
        self._pools: dict[int, SessionPool] = {}
        self._sessions: dict[int, _Session] = {}
        self._handles = itertools.count(1)

    # -- lifecycle ----------------------------------------------------------------------------
    def open(self, cfg: PolicyConfig) -> int:
        """Open an empty session; returns its handle."""
        cfg.validate()
        return self._add(cfg, calls=0)

    def restore(self, state: SessionState) -> int:
        """Open a session from a snapshot (e.g. a checkpoint another process wrote)."""
        cfg = state.config.validate()
        if len(state.groups) != cfg.groups:
            raise InputError("state.groups", f"{len(state.groups)} groups, config says {cfg.groups}")
        h = self._add(cfg, calls=state.calls)
        s = self._sessions[h]
        g = state.groups
        s.pool.load_rows(s.rows, [x.pos for x in g], [x.age for x in g], [x.memory for x in g],
                         [x.edge_pos for x in g], [x.edge_w for x in g])
        s.counts = [int(x.pos.numel()) for x in g]
        s.tokens_seen, s.tokens_evicted = state.tokens_seen, state.tokens_evicted
        s.max_pos = max((int(x.pos[-1]) for x in g if x.pos.numel()), default=-1)
        return h

    def _add(self, cfg: PolicyConfig, calls: int) -> int:
        pool = self._pools.get(cfg.fanout)
        if pool is None:
            pool = self._pools[cfg.fanout] = SessionPool(cfg.fanout, self.device)
        rows = pool.alloc(cfg.groups)
        rows_t = torch.tensor(rows, device=self.device)
        pool.set_params(rows_t, budget=cfg.budget, slack=cfg.slack, sinks=cfg.sinks, recent=cfg.recent,
                        seed=cfg.seed, call=calls)
        pool.params["group"][rows_t] = torch.arange(cfg.groups, device=self.device)
        h = next(self._handles)
        self._sessions[h] = _Session(cfg, make_policy(cfg), pool, rows, [0] * cfg.groups, calls=calls)
        return h

    def close(self, handle: int) -> None:
        """Forget a session and free its rows."""
        s = self._session(handle)
        s.pool.free(s.rows)
        del self._sessions[handle]

    def __contains__(self, handle: int) -> bool:
        return handle in self._sessions

    def config(self, handle: int) -> PolicyConfig:
        """The session's policy configuration."""
        return self._session(handle).cfg

    def counts(self, handle: int) -> list[int]:
        """Retained slots per group."""
        return list(self._session(handle).counts)

    def calls(self, handle: int) -> int:
        """Number of calls the session has completed."""
        return self._session(handle).calls

    def positions(self, handle: int) -> list[torch.Tensor]:
        """Retained positions per group (ascending), on the host."""
        s = self._session(handle)
        pos = s.pool.pos[torch.tensor(s.rows, device=self.device)].cpu()
        return [pos[g, : s.counts[g]].clone() for g in range(len(s.rows))]

    def memory(self, handle: int) -> list[torch.Tensor]:
        """The policy memory per retained slot and group (e.g. EMA of walk scores), on the host."""
        s = self._session(handle)
        mem = s.pool.memory[torch.tensor(s.rows, device=self.device)].cpu()
        return [mem[g, : s.counts[g]].clone() for g in range(len(s.rows))]

    def snapshot(self, handle: int) -> SessionState:
        """A host copy of the session's full state (serialize with ``to_bytes``)."""
        s = self._session(handle)
        r = torch.tensor(s.rows, device=self.device)
        pos, age, mem = s.pool.pos[r].cpu(), s.pool.age[r].cpu(), s.pool.memory[r].cpu()
        epos, ew = s.pool.edge_pos[r].cpu(), s.pool.edge_w[r].cpu()
        groups = [GroupState(pos[g, :n].clone(), age[g, :n].clone(), mem[g, :n].clone(), epos[g, :n].clone(),
                             ew[g, :n].clone()) for g, n in enumerate(s.counts)]
        return SessionState(s.cfg, s.calls, s.tokens_seen, s.tokens_evicted, groups)

    def _session(self, handle: int) -> _Session:
        try:
            return self._sessions[handle]
        except KeyError:
            raise InputError("session", f"unknown session handle {handle}") from None

    # -- stepping -----------------------------------------------------------------------------
    def step(self, items: Mapping[int, StepInput], *, raise_errors: bool = True
             ) -> dict[int, StepOutput | EngineError]:
        """Advance every session in ``items`` by one call, batching those that share a kernel key.

        Invalid inputs raise :class:`InputError` (``raise_errors``) or are returned in place of
        that session's output; either way the session is left unchanged and the others proceed.
        """
        out: dict[int, StepOutput | EngineError] = {}
        batches: dict[tuple[object, ...], list[tuple[int, StepInput]]] = {}
        for h, inp in items.items():
            try:
                s = self._session(h)
                self._check_shapes(s, inp)
            except EngineError as exc:
                out[h] = exc
                continue
            batches.setdefault((s.cfg.batch_key(), id(s.pool)), []).append((h, inp))
        for group in batches.values():
            out.update(self._run_batch(group))
        if raise_errors:
            for res in out.values():
                if isinstance(res, EngineError):
                    raise res
        return {h: out[h] for h in items}

    def _check_shapes(self, s: _Session, inp: StepInput) -> None:
        G, F = s.cfg.groups, s.cfg.fanout
        pos = inp.new_positions
        if not isinstance(pos, torch.Tensor) or pos.dim() != 1 or pos.dtype.is_floating_point \
                or pos.dtype == torch.bool:
            raise InputError("new_positions", "must be a 1-D integer tensor")
        k = pos.shape[0]
        if k < 1:
            raise InputError("new_positions", "a call must carry at least one new token")
        width = max(s.counts) + k
        for name in ("attn", "last"):
            t = getattr(inp, name)
            if not isinstance(t, torch.Tensor) or t.dtype not in _FLOATS:
                raise InputError(name, f"must be a float tensor, got {getattr(t, 'dtype', type(t))}")
            if tuple(t.shape) != (G, width):
                raise InputError(name, f"shape {tuple(t.shape)}, expected {(G, width)} "
                                       f"(groups, retained {max(s.counts)} + new {k})")
        if tuple(inp.edge_pos.shape) != (G, k, F) or inp.edge_pos.dtype.is_floating_point:
            raise InputError("edge_pos", f"integer tensor of shape {(G, k, F)} expected, got "
                                         f"{inp.edge_pos.dtype} {tuple(inp.edge_pos.shape)}")
        if tuple(inp.edge_w.shape) != (G, k, F) or inp.edge_w.dtype not in _FLOATS:
            raise InputError("edge_w", f"float tensor of shape {(G, k, F)} expected, got "
                                       f"{inp.edge_w.dtype} {tuple(inp.edge_w.shape)}")

    def _run_batch(self, items: list[tuple[int, StepInput]]) -> dict[int, StepOutput | EngineError]:
        sessions = [self._sessions[h] for h, _ in items]
        pool, policy = sessions[0].pool, sessions[0].policy
        dev = self.device
        G = [s.cfg.groups for s in sessions]
        widths = [max(s.counts) + inp.new_positions.shape[0] for s, (_, inp) in zip(sessions, items, strict=True)]
        R, W = sum(G), max(widths)
        K = max(inp.new_positions.shape[0] for _, inp in items)
        F = pool.fanout
        attn = torch.zeros(R, W, dtype=torch.float32, device=dev)
        last = torch.zeros(R, W, dtype=torch.float32, device=dev)
        new_pos = torch.full((R, K), -1, dtype=torch.int64, device=dev)
        n_new = torch.zeros(R, dtype=torch.int64)
        edge_pos = torch.full((R, K, F), -1, dtype=torch.int64, device=dev)
        edge_w = torch.zeros(R, K, F, dtype=torch.float32, device=dev)
        r0 = 0
        for g, w, (_, inp) in zip(G, widths, items, strict=True):
            k = inp.new_positions.shape[0]
            attn[r0 : r0 + g, :w] = inp.attn
            last[r0 : r0 + g, :w] = inp.last
            new_pos[r0 : r0 + g, :k] = inp.new_positions
            n_new[r0 : r0 + g] = k
            edge_pos[r0 : r0 + g, :k] = inp.edge_pos
            edge_w[r0 : r0 + g, :k] = inp.edge_w
            r0 += g
        rows = torch.tensor([r for s in sessions for r in s.rows], device=dev)
        inp_rows = RowInput(new_pos, n_new.to(dev), attn, last, edge_pos, edge_w)
        state = pool.gather(rows, W)
        codes = validate_rows(state, inp_rows)
        if bool(codes.any()):
            return self._split_bad(items, codes.cpu().tolist(), G)
        res = run_step(policy, state, pool.row_params(rows), inp_rows)
        pool.write(rows, res.state)
        return self._outputs(items, sessions, G, widths, res)

    def _split_bad(self, items: list[tuple[int, StepInput]], codes: list[int], G: list[int]
                   ) -> dict[int, StepOutput | EngineError]:
        out: dict[int, StepOutput | EngineError] = {}
        good, r0 = [], 0
        for g, item in zip(G, items, strict=True):
            bad = [c for c in codes[r0 : r0 + g] if c]
            if bad:
                field_name, reason = ROW_ERRORS[bad[0]]
                out[item[0]] = InputError(field_name, reason)
            else:
                good.append(item)
            r0 += g
        if good:
            out.update(self._run_batch(good))
        return out

    def _outputs(self, items: list[tuple[int, StepInput]], sessions: list[_Session], G: list[int],
                 widths: list[int], res: RowResult) -> dict[int, StepOutput | EngineError]:
        counts = res.state.count.cpu().tolist()
        n_slots = res.n_slots.cpu().tolist()
        out: dict[int, StepOutput | EngineError] = {}
        r0 = 0
        for s, g, w, (h, inp) in zip(sessions, G, widths, items, strict=True):
            k = inp.new_positions.shape[0]
            new_counts = counts[r0 : r0 + g]
            s.tokens_evicted += sum(n_slots[r0 : r0 + g]) - sum(new_counts)
            s.counts = new_counts
            s.calls += 1
            s.tokens_seen += k
            s.max_pos = int(inp.new_positions[-1])
            out[h] = StepOutput(
                keep=res.keep[r0 : r0 + g, :w], slot_positions=res.slot_pos[r0 : r0 + g, :w],
                retained=new_counts, retained_mass=res.retained_mass[r0 : r0 + g],
                evicted_age=res.evicted_age[r0 : r0 + g, :w],
            )
            r0 += g
        return out
