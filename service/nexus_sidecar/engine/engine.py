"""The in-process engine: open sessions, advance many of them per batched call, snapshot and
restore them. The gRPC server and the in-process (``local``) worker backend both use it."""

from __future__ import annotations

import itertools
from collections.abc import Mapping
from dataclasses import dataclass

import torch

from nexus_sidecar.engine.config import CALL_KINDS, PolicyConfig
from nexus_sidecar.engine.errors import EngineError, InputError
from nexus_sidecar.engine.hashing import uniforms
from nexus_sidecar.engine.kernels import for_device as kernels_for
from nexus_sidecar.engine.kernels import resolve as resolve_kernels
from nexus_sidecar.engine.policies import Policy, make_policy
from nexus_sidecar.engine.pool import PoolShape, Rows, SessionPool, slot_bytes
from nexus_sidecar.engine.selection import gumbel
from nexus_sidecar.engine.state import RowCapture, SessionState, capture_rows
from nexus_sidecar.engine.step import ROW_ERRORS, RowInput, RowResult, hole_allowance, run_step, validate_rows
from nexus_sidecar.engine.step_fused import nexus_call, one_entry
from nexus_sidecar.engine.step_io import BatchInput, BatchOutput, StepInput, StepOutput

_FLOATS = (torch.float16, torch.bfloat16, torch.float32, torch.float64)


def _pow2(n: int) -> int:
    """The smallest power of two >= n (n >= 1)."""
    return 1 << max(0, n - 1).bit_length()


MIN_WIDTH = 64


def width_class(need: int) -> int:
    """The arena width of the class that holds ``need`` columns: a power of two, at least 64."""
    return max(MIN_WIDTH, _pow2(need))


def initial_rows(width: int) -> int:
    """Rows a new pool of this width starts with: 16 at 64 columns, fewer for wider classes
    (about 1,024 columns in all), so a first wide session does not reserve 16 wide rows."""
    return max(1, (16 * MIN_WIDTH) // width)


def default_device() -> torch.device:
    """CUDA when present, CPU otherwise."""
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")


@dataclass
class _Session:
    cfg: PolicyConfig
    policy: Policy
    pool: SessionPool
    rows: list[int]
    counts: list[int]  # host mirror: live tokens per group
    used: list[int]  # host mirror: arena columns in use per group
    calls: int = 0
    tokens_seen: int = 0
    tokens_evicted: int = 0


class Engine:
    """Batched Nexus Sampling engine over a device-resident session pool.

    Threads: the engine is not thread-safe. Every method runs on one thread at a time (the server's
    engine thread), except these, which any thread may call while that thread works:

    - :meth:`pool_bytes`, :meth:`bytes_after_open`, :meth:`bytes_after_step` read only ``_layout``,
      an immutable tuple of :class:`PoolShape` that the engine thread replaces (one reference store)
      at the end of every call that can change a pool (open, restore, close, trim, step). They see
      the pools as of the last such call, never a dict or a pool mid-change.
    - the per-session reads :meth:`config`, :meth:`counts`, :meth:`calls`, :meth:`stats` and the
      sessions' part of :meth:`bytes_after_step`, for sessions no call can change meanwhile (the
      server holds their locks): a dict lookup and attributes the engine thread replaces whole.

    Anything else (``_pools``, ``_sessions`` iteration, pool tensors) is the engine thread's alone.
    """

    def __init__(self, device: str | torch.device | None = None, kernels: str | None = None) -> None:
        """``kernels``: ``"torch"``, ``"fused"`` or ``"auto"`` (default: ``$NEXUS_ENGINE_KERNELS``, else
        auto), see :mod:`nexus_sidecar.engine.kernels`; CUDA engines always run the torch path."""
        self.device = torch.device(device) if device is not None else default_device()
        self.kernels_mode = resolve_kernels(kernels)
        self._ops = kernels_for(self.device, self.kernels_mode)
        # Pools by (fan-out, width class): a session lives in the narrowest class that holds its
        # arena, so one wide session widens the rows of its class, not every row (see _migrate).
        self._pools: dict[tuple[int, int], SessionPool] = {}
        self._sessions: dict[int, _Session] = {}
        self._handles = itertools.count(1)
        self._layout: tuple[PoolShape, ...] = ()  # see the class docstring: read by any thread

    def _publish(self) -> None:
        """Replace the published pool sizes (engine thread, after a call that can change a pool)."""
        self._layout = tuple(p.shape() for p in self._pools.values())

    @property
    def kernels(self) -> str:
        """What this engine's steps run: ``"fused"`` (the C++ kernels) or ``"torch"`` (the reference)."""
        return "torch" if self._ops is None else "fused"

    # -- lifecycle ----------------------------------------------------------------------------
    def open(self, cfg: PolicyConfig) -> int:
        """Open an empty session; returns its handle."""
        cfg.validate()
        try:
            return self._add(cfg, calls=0)
        finally:
            self._publish()

    def restore(self, state: SessionState) -> int:
        """Open a session from a snapshot (e.g. a checkpoint another process wrote)."""
        cfg = state.config.validate()
        if len(state.groups) != cfg.groups:
            raise InputError("state.groups", f"{len(state.groups)} groups, config says {cfg.groups}")
        try:
            h = self._add(cfg, calls=state.calls, need=max((g.pos.numel() for g in state.groups), default=0) + 1)
        finally:
            self._publish()
        s = self._sessions[h]
        pool, dev = s.pool, self.device
        for r, grp in zip(s.rows, state.groups, strict=True):
            n = grp.pos.numel()
            pos = grp.pos.to(dev, torch.int64)
            pool.slot["pos"][r, :n] = pos
            pool.slot["alive"][r, :n] = True
            pool.slot["birth"][r, :n] = state.calls - grp.age.to(dev, torch.int64)
            pool.slot["memory"][r, :n] = grp.memory.to(dev, torch.float32)
            u = uniforms(torch.tensor([cfg.seed], device=dev), pool.params["group"][r : r + 1], pos.unsqueeze(0),
                         torch.zeros(1, dtype=torch.int64, device=dev))
            pool.slot["gumbel"][r, :n] = gumbel(u[0])
            epos, ew = grp.edge_pos.to(dev, torch.int64), grp.edge_w.to(dev, torch.float32)
            col = torch.searchsorted(pos, epos.reshape(-1).contiguous()).reshape(epos.shape).clamp(max=max(n - 1, 0))
            has = (epos >= 0) & (ew > 0)
            own = torch.arange(n, device=dev).unsqueeze(1).expand_as(col)
            pool.edge["edge_idx"][r, :n] = torch.where(has, col, own)
            pool.edge["edge_w"][r, :n] = torch.where(has, ew, 0.0)
            pool.used[r] = pool.count[r] = n
        s.counts = [int(g.pos.numel()) for g in state.groups]
        s.used = list(s.counts)
        s.tokens_seen, s.tokens_evicted = state.tokens_seen, state.tokens_evicted
        return h

    def _pool(self, fanout: int, need: int) -> SessionPool:
        """The pool of this fan-out whose width class holds ``need`` arena columns (created on demand)."""
        width = width_class(need)
        pool = self._pools.get((fanout, width))
        if pool is None:
            pool = self._pools[(fanout, width)] = SessionPool(fanout, self.device, rows=initial_rows(width),
                                                              width=width)
        return pool

    def _migrate(self, s: _Session, need: int) -> None:
        """Move a session whose arena outgrew its width class into the class that holds ``need``.

        Arena columns are copied as they are (holes included), so edges stay valid; the old rows are
        freed for the next session of the old class (``trim`` gives their memory back).
        """
        old_pool, old_rows = s.pool, s.rows
        pool = self._pool(old_pool.fanout, need)
        rows = pool.alloc(len(old_rows))
        pool.copy_rows(old_pool, old_rows, rows, max(s.used))
        old_pool.free(old_rows)
        s.pool, s.rows = pool, rows

    def _add(self, cfg: PolicyConfig, calls: int, need: int = 1) -> int:
        pool = self._pool(cfg.fanout, need)
        rows = pool.alloc(cfg.groups)
        rows_t = torch.tensor(rows, device=self.device)
        pool.set_params(rows_t, budget=cfg.budget, slack=cfg.slack, sinks=cfg.sinks, recent=cfg.recent,
                        seed=cfg.seed, call=calls)
        pool.params["group"][rows_t] = torch.arange(cfg.groups, device=self.device)
        h = next(self._handles)
        self._sessions[h] = _Session(cfg, make_policy(cfg), pool, rows, [0] * cfg.groups, [0] * cfg.groups,
                                     calls=calls)
        return h

    # -- memory -------------------------------------------------------------------------------
    def pool_bytes(self) -> int:
        """Bytes the session pools occupy (every per-slot tensor), as of the engine's last call
        that changed them; safe from any thread (see the class docstring)."""
        return sum(p.nbytes() for p in self._layout)

    def bytes_after_open(self, cfg: PolicyConfig) -> int:
        """Pool bytes once a session of ``cfg`` is opened (nothing is allocated to find out); safe
        from any thread."""
        layout = self._layout
        return sum(p.nbytes() for p in layout) + self._extra(layout, {(cfg.fanout, width_class(1)): cfg.groups})

    def bytes_after_step(self, ks: Mapping[int, int]) -> int:
        """Pool bytes once the sessions ``ks`` (handle -> new tokens) took one step each (the
        sessions that outgrow their width class move to a wider one). Safe from any thread while
        no call can change the sessions of ``ks`` (see the class docstring)."""
        layout = self._layout
        moving: dict[tuple[int, int], int] = {}
        for h, k in ks.items():
            s = self._session(h)
            need = max(s.used) + k
            if need > s.pool.width:
                key = (s.pool.fanout, width_class(need))
                moving[key] = moving.get(key, 0) + len(s.rows)
        return sum(p.nbytes() for p in layout) + self._extra(layout, moving)

    @staticmethod
    def _extra(layout: tuple[PoolShape, ...], rows_by_pool: Mapping[tuple[int, int], int]) -> int:
        """Bytes added when ``rows`` more rows are reserved in each (fan-out, width class) pool."""
        extra = 0
        shapes = {(p.fanout, p.width): p for p in layout}
        for (fanout, width), n in rows_by_pool.items():
            pool = shapes.get((fanout, width))
            if pool is not None:
                extra += pool.nbytes(rows=pool.rows_after_alloc(n)) - pool.nbytes()
            else:
                rows = initial_rows(width)
                while rows < n:
                    rows *= 2
                extra += rows * width * slot_bytes(fanout)
        return extra

    def trim(self) -> int:
        """Repack each pool into the rows and width its live sessions need; returns bytes freed.

        Closing (and migrating) sessions only frees rows: without this, pool memory would stay at
        the high-water mark of rows forever. Empty pools are dropped; a pool is repacked (its
        width class kept) only when that at least halves it, since repacking copies the live rows.
        """
        before = sum(p.nbytes() for p in self._pools.values())
        try:
            self._trim()
        finally:
            self._publish()
        return before - self.pool_bytes()

    def _trim(self) -> None:
        for key, pool in list(self._pools.items()):
            sessions = [s for s in self._sessions.values() if s.pool is pool]
            if not sessions:
                del self._pools[key]
                continue
            live = sorted(r for s in sessions for r in s.rows)
            rows = max(initial_rows(pool.width), _pow2(len(live)))
            if pool.nbytes(rows) * 2 > pool.nbytes():
                continue
            remap = {old: new for new, old in enumerate(live)}
            pool.repack(live, rows, pool.width)
            for s in sessions:
                s.rows = [remap[r] for r in s.rows]

    def close(self, handle: int) -> None:
        """Forget a session and free its rows."""
        s = self._session(handle)
        s.pool.free(s.rows)
        del self._sessions[handle]
        self._publish()

    def __contains__(self, handle: int) -> bool:
        return handle in self._sessions

    def __len__(self) -> int:
        return len(self._sessions)

    def config(self, handle: int) -> PolicyConfig:
        """The session's policy configuration."""
        return self._session(handle).cfg

    def counts(self, handle: int) -> list[int]:
        """Retained slots per group."""
        return list(self._session(handle).counts)

    def calls(self, handle: int) -> int:
        """Number of calls the session has completed."""
        return self._session(handle).calls

    def stats(self, handle: int) -> tuple[int, int]:
        """(tokens seen, slot evictions summed over groups) since the session opened."""
        s = self._session(handle)
        return s.tokens_seen, s.tokens_evicted

    def _live(self, handle: int, field: str) -> list[torch.Tensor]:
        s = self._session(handle)
        r = torch.tensor(s.rows, device=self.device)
        x, alive = s.pool.slot[field][r].cpu(), s.pool.slot["alive"][r].cpu()
        return [x[g][alive[g]].clone() for g in range(len(s.rows))]

    def positions(self, handle: int) -> list[torch.Tensor]:
        """Retained positions per group (ascending), on the host."""
        return self._live(handle, "pos")

    def memory(self, handle: int) -> list[torch.Tensor]:
        """The policy memory per retained slot and group (e.g. EMA of walk scores), on the host."""
        return self._live(handle, "memory")

    def memories(self, handles: list[int]) -> dict[int, list[torch.Tensor]]:
        """:meth:`memory` of many sessions with one gather per pool (unknown handles are left out)."""
        by_pool: dict[int, tuple[SessionPool, list[tuple[int, _Session]]]] = {}
        for h in handles:
            s = self._sessions.get(h)
            if s is not None:
                by_pool.setdefault(id(s.pool), (s.pool, []))[1].append((h, s))
        out: dict[int, list[torch.Tensor]] = {}
        for pool, members in by_pool.values():
            r = torch.tensor([row for _, s in members for row in s.rows], device=self.device)
            w = max(u for _, s in members for u in s.used)  # columns past every row's use hold nothing
            x, alive = pool.slot["memory"][r, :w].cpu().numpy(), pool.slot["alive"][r, :w].cpu().numpy()
            i = 0
            for h, s in members:
                out[h] = [torch.from_numpy(x[i + g, :u][alive[i + g, :u]]) for g, u in enumerate(s.used)]
                i += len(s.rows)
        return out

    def snapshot(self, handle: int) -> SessionState:
        """A host copy of the session's full state (serialize with ``to_bytes``).

        Edges are stored as target *positions* (-1 = none), so the snapshot does not depend on
        the pool's arena layout: equal logical states give equal bytes.
        """
        return self.capture(handle).state()

    def capture(self, handle: int, since: int | None = None) -> RowCapture:
        """A plain host copy of the session's rows (see ``engine/state.py``): the only part of a
        checkpoint that must run on the engine thread. ``since``: copy only the edges of slots that
        entered at or after that call (for a delta against a base taken then)."""
        s = self._session(handle)
        return capture_rows(s.pool, s.rows, s.used, s.cfg, s.calls, s.tokens_seen, s.tokens_evicted, since)

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
        try:
            out = self._step(items)
        finally:
            self._publish()  # a step can add rows, widen a pool or move sessions to a new one
        if raise_errors:
            for res in out.values():
                if isinstance(res, EngineError):
                    raise res
        return {h: out[h] for h in items}

    def _step(self, items: Mapping[int, StepInput]) -> dict[int, StepOutput | EngineError]:
        out: dict[int, StepOutput | EngineError] = {}
        batches: dict[tuple[object, ...], list[tuple[int, StepInput]]] = {}
        for h, inp in items.items():
            try:
                s = self._session(h)
                self._check_shapes(s, inp)
            except EngineError as exc:
                out[h] = exc
                continue
            need = max(s.used) + int(inp.new_positions.shape[0])
            if need > s.pool.width:  # the arena outgrows its width class: move up one (or more)
                self._migrate(s, need)
            # Sessions carrying different priors (or call kinds) go in different batches: every row
            # of a batch then has the same prior tensors and kind, and no row needs a per-row flag.
            key = (s.cfg.batch_key(), id(s.pool), tuple(inp.priors()), inp.call)
            batches.setdefault(key, []).append((h, inp))
        for group in batches.values():
            out.update(self._run_batch(group))
        return out

    def step_batch(self, handles: list[int], inp: BatchInput) -> BatchOutput:
        """Advance the sessions ``handles`` (distinct) by one call each, their inputs in columnar form.

        Same results and errors as :meth:`step` on ``inp.sessions()`` (``raise_errors=False``; a
        session's error is in ``errors`` by its index). When the sessions share one batch of the
        one-entry Nexus path (:func:`~nexus_sidecar.engine.step_fused.one_entry`, fused kernels),
        the call runs without a per-session tensor in or out; otherwise it runs as :meth:`step`.
        """
        if len(handles) != len(inp):
            raise InputError("handles", f"{len(handles)} handles for a batch of {len(inp)} sessions")
        try:
            out = self._step_columnar(handles, inp)
        finally:
            self._publish()
        if out is None:  # not one batch of the one-entry path: the per-session form, same answers
            res = self._step(dict(zip(handles, inp.sessions(), strict=True)))
            out = _gather_outputs([res[h] for h in handles], inp.groups)
        return out

    def _step_columnar(self, handles: list[int], inp: BatchInput) -> BatchOutput | None:
        """:meth:`step_batch` as one native call, or None when the batch does not qualify (nothing changed
        then, except sessions moved to a wider width class, as :meth:`_step` would have)."""
        if self._ops is None or not handles:
            return None
        sessions = [self._sessions.get(h) for h in handles]
        if None in sessions:
            return None
        ss: list[_Session] = sessions  # type: ignore[assignment]
        s0 = ss[0]
        R, W = inp.attn.shape[0], inp.attn.shape[-1]
        k = int(inp.new_positions.shape[-1])
        F = s0.pool.fanout
        # The shape checks of _check_shapes for the whole batch at once (any doubt: the per-session path).
        if (not one_entry(s0.policy) or inp.call not in CALL_KINDS or k < 1 or s0.policy.requires
                or inp.new_positions.dim() != 2 or inp.new_positions.dtype.is_floating_point
                or inp.new_positions.dtype == torch.bool or inp.new_positions.shape[0] != len(ss)
                or sum(inp.groups) != R or inp.attn.dim() != 2 or inp.attn.dtype not in _FLOATS
                or any(t.dim() != 2 or t.dtype not in _FLOATS or tuple(t.shape) != (R, W)
                       for t in (inp.last, *inp.priors.values()))
                or tuple(inp.edge_pos.shape) != (R, k, F) or inp.edge_pos.dtype.is_floating_point
                or tuple(inp.edge_w.shape) != (R, k, F) or inp.edge_w.dtype not in _FLOATS):
            return None
        key = s0.cfg.batch_key()
        if any(s.cfg.batch_key() != key or s.pool.fanout != F or s.cfg.groups != g or max(s.counts) + k != W
               for s, g in zip(ss, inp.groups, strict=True)):
            return None
        for s in ss:
            need = max(s.used) + k
            if need > s.pool.width:  # as _step: the arena outgrows its width class
                self._migrate(s, need)
        pool = s0.pool
        if any(s.pool is not pool for s in ss):
            return None
        rows, used_max, width = self._rows(ss, [k] * len(ss))
        res = nexus_call(self._ops, s0.policy, pool, rows, inp, inp.groups, [W] * len(ss), [k] * len(ss), used_max,
                         width, max(s.calls for s in ss))
        if isinstance(res, list):  # some rows failed validation: nothing changed; the per-session path names them
            return None
        result = RowResult(keep=res[0], slot_pos=res[1], evicted_age=res[2], retained_mass=res[3], count=res[4])
        counts = result.count.tolist()
        r0 = 0
        for s, g in zip(ss, inp.groups, strict=True):
            self._advance(s, counts[r0: r0 + g], k)
            r0 += g
        self._compact(ss)
        return BatchOutput(result.keep, result.slot_pos, result.retained_mass, result.evicted_age, result.count,
                           list(inp.groups), [W] * len(ss))

    def check(self, handle: int, inp: StepInput) -> None:
        """Check an input's shapes and dtypes against the session (host only); raises InputError."""
        self._check_shapes(self._session(handle), inp)

    def _check_shapes(self, s: _Session, inp: StepInput) -> None:
        G, F = s.cfg.groups, s.cfg.fanout
        if inp.call not in CALL_KINDS:
            raise InputError("call", f"must be one of {list(CALL_KINDS)}, got {str(inp.call)[:64]!r}")
        pos = inp.new_positions
        if not isinstance(pos, torch.Tensor) or pos.dim() != 1 or pos.dtype.is_floating_point \
                or pos.dtype == torch.bool:
            raise InputError("new_positions", "must be a 1-D integer tensor")
        k = pos.shape[0]
        if k < 1:
            raise InputError("new_positions", "a call must carry at least one new token")
        width = max(s.counts) + k
        for name in s.policy.requires:
            if getattr(inp, name) is None:
                raise InputError(name, f"policy {s.cfg.policy!r} scores by this prior and the step does not carry it "
                                       f"(float [G, n + k], see nexus_client.hf.priors.cache_priors)")
        for name in ("attn", "last", *inp.priors()):
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

    def _rows(self, sessions: list[_Session], ks: list[int]) -> tuple[Rows, int, int]:
        """The batch's pool rows (made contiguous when they can be), the widest arena in use and the
        call's arena width."""
        pool = sessions[0].pool
        row_ids = [r for s in sessions for r in s.rows]
        moved = pool.make_contiguous(row_ids)
        if moved:  # rows by batch affinity: the batch becomes a view, not a gather (see pool.py)
            for other in self._sessions.values():
                if other.pool is pool:
                    other.rows = [moved.get(r, r) for r in other.rows]
            row_ids = [r for s in sessions for r in s.rows]
        used_max = max(max(s.used) for s in sessions)
        width = max(max(u) + k for u, k in zip((s.used for s in sessions), ks, strict=True))
        return pool.rows_of(row_ids), used_max, width

    @staticmethod
    def _advance(s: _Session, new_counts: list[int], k: int) -> None:
        """The host mirrors of a session after a call of ``k`` new tokens."""
        s.tokens_evicted += sum(c + k for c in s.counts) - sum(new_counts)
        s.used = [u + k for u in s.used]
        s.counts = new_counts
        s.calls += 1
        s.tokens_seen += k

    def _compact(self, sessions: list[_Session]) -> None:
        """Compact rows whose holes exceed the allowance (host mirrors are exact after the sync)."""
        todo = [r for s in sessions for r, u, c in zip(s.rows, s.used, s.counts, strict=True)
                if u - c > hole_allowance(s.cfg.budget)]
        if todo:
            sessions[0].pool.compact(torch.tensor(todo, device=self.device))
            done = set(todo)
            for s in sessions:
                s.used = [c if r in done else u for r, u, c in zip(s.rows, s.used, s.counts, strict=True)]

    def _run_batch(self, items: list[tuple[int, StepInput]]) -> dict[int, StepOutput | EngineError]:
        sessions = [self._sessions[h] for h, _ in items]
        pool, policy = sessions[0].pool, sessions[0].policy
        G = [s.cfg.groups for s in sessions]
        ks = [inp.new_positions.shape[0] for _, inp in items]
        widths = [max(s.counts) + k for s, k in zip(sessions, ks, strict=True)]
        rows, used_max, width = self._rows(sessions, ks)
        if self._ops is not None and one_entry(policy):
            # The whole call in one native entry, the GIL released throughout (see step_fused.py).
            res = nexus_call(self._ops, policy, pool, rows, [inp for _, inp in items], G, widths, ks, used_max, width,
                             max(s.calls for s in sessions))
            if isinstance(res, list):
                return self._split_bad(items, res, G)
            result = RowResult(keep=res[0], slot_pos=res[1], evicted_age=res[2], retained_mass=res[3], count=res[4])
        else:
            inp_rows = self._row_input(items, G, widths, ks, pool.fanout)
            codes, target_col = validate_rows(pool, rows, inp_rows, used_max, self._ops)
            if bool(codes.any()):
                return self._split_bad(items, codes.cpu().tolist(), G)
            result = run_step(policy, pool, rows, inp_rows, target_col, width, self._ops)
        out = self._outputs(items, sessions, G, widths, ks, result)
        self._compact(sessions)
        return out

    def _row_input(self, items: list[tuple[int, StepInput]], G: list[int], widths: list[int], ks: list[int],
                   F: int) -> RowInput:
        """The batch's inputs as [R, ...] tensors (the Python-driven path)."""
        dev = self.device
        Wx, K = max(widths), max(ks)
        if min(widths) == Wx and min(ks) == K:
            # Uniform batch (the steady state of a decode loop): one concatenation per field.
            inps = [inp for _, inp in items]
            new_pos = torch.cat([i.new_positions.to(dev, torch.int64).expand(g, K)
                                 for g, i in zip(G, inps, strict=True)])
            attn = torch.cat([i.attn for i in inps]).to(dev, torch.float32)
            last = torch.cat([i.last for i in inps]).to(dev, torch.float32)
            edge_pos = torch.cat([i.edge_pos for i in inps]).to(dev, torch.int64)
            edge_w = torch.cat([i.edge_w for i in inps]).to(dev, torch.float32)
            priors = {name: torch.cat([getattr(i, name) for i in inps]).to(dev, torch.float32)
                      for name in inps[0].priors()}
        else:
            attn, last, new_pos, edge_pos, edge_w, priors = self._pad_inputs(items, G, widths, ks, Wx, K, F)
        n_new = torch.tensor([k for g, k in zip(G, ks, strict=True) for _ in range(g)], device=dev)
        return RowInput(new_pos, n_new, attn, last, edge_pos, edge_w, priors, call=items[0][1].call)

    def _pad_inputs(self, items: list[tuple[int, StepInput]], G: list[int], widths: list[int], ks: list[int],
                    Wx: int, K: int, F: int
                    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor,
                               dict[str, torch.Tensor]]:
        """Right-pad a ragged batch into [R, Wx] / [R, K, F] tensors (one copy per field and session).

        Every session of a batch carries the same priors (see :meth:`step`); they pad with 0 like
        ``attn`` (a valid value of every prior)."""
        dev, R = self.device, sum(G)
        attn = torch.zeros(R, Wx, dtype=torch.float32, device=dev)
        last = torch.zeros(R, Wx, dtype=torch.float32, device=dev)
        priors = {name: torch.zeros(R, Wx, dtype=torch.float32, device=dev) for name in items[0][1].priors()}
        new_pos = torch.full((R, K), -1, dtype=torch.int64, device=dev)
        edge_pos = torch.full((R, K, F), -1, dtype=torch.int64, device=dev)
        edge_w = torch.zeros(R, K, F, dtype=torch.float32, device=dev)
        r0 = 0
        for g, w, k, (_, inp) in zip(G, widths, ks, items, strict=True):
            attn[r0 : r0 + g, :w] = inp.attn
            last[r0 : r0 + g, :w] = inp.last
            new_pos[r0 : r0 + g, :k] = inp.new_positions
            edge_pos[r0 : r0 + g, :k] = inp.edge_pos
            edge_w[r0 : r0 + g, :k] = inp.edge_w
            for name, t in priors.items():
                t[r0 : r0 + g, :w] = getattr(inp, name)
            r0 += g
        return attn, last, new_pos, edge_pos, edge_w, priors

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
                 widths: list[int], ks: list[int], res: RowResult) -> dict[int, StepOutput | EngineError]:
        counts = res.count.cpu().tolist()
        out: dict[int, StepOutput | EngineError] = {}
        r0 = 0
        for s, g, w, k, (h, _) in zip(sessions, G, widths, ks, items, strict=True):
            new_counts = counts[r0 : r0 + g]
            self._advance(s, new_counts, k)
            out[h] = StepOutput(
                keep=res.keep[r0 : r0 + g, :w], slot_positions=res.slot_pos[r0 : r0 + g, :w],
                retained=new_counts, retained_mass=res.retained_mass[r0 : r0 + g],
                evicted_age=res.evicted_age[r0 : r0 + g, :w],
            )
            r0 += g
        return out


def _gather_outputs(outs: list[StepOutput | EngineError], groups: list[int]) -> BatchOutput:
    """Per-session outputs (and errors) as one :class:`BatchOutput` (rows padded to the widest)."""
    widths = [o.keep.shape[1] if isinstance(o, StepOutput) else 0 for o in outs]
    R, W = sum(groups), max(widths)
    good = [o for o in outs if isinstance(o, StepOutput)]
    dev = good[0].keep.device if good else torch.device("cpu")
    keep = torch.zeros(R, W, dtype=torch.bool, device=dev)
    pos = torch.full((R, W), -1, dtype=torch.int64, device=dev)
    age = torch.zeros(R, W, dtype=torch.int32, device=dev)
    mass = torch.zeros(R, dtype=torch.float32, device=dev)
    count = torch.zeros(R, dtype=torch.int64, device=dev)
    errors: dict[int, Exception] = {}
    r0 = 0
    for b, (o, g, w) in enumerate(zip(outs, groups, widths, strict=True)):
        if isinstance(o, StepOutput):
            keep[r0: r0 + g, :w] = o.keep
            pos[r0: r0 + g, :w] = o.slot_positions
            age[r0: r0 + g, :w] = o.evicted_age
            mass[r0: r0 + g] = o.retained_mass
            count[r0: r0 + g] = torch.tensor(o.retained, dtype=torch.int64)
        else:
            errors[b] = o
        r0 += g
    return BatchOutput(keep, pos, mass, age, count, list(groups), widths, errors)
