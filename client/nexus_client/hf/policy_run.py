"""One policy session applied to one KV cache: the step that :func:`~nexus_client.hf.generate`, the
evaluation's settings and ``NexusPress`` share, blocking or pipelined.

Between calls the post-RoPE queries of every forward pass are kept (:meth:`PolicyRun.add`); a call
summarises them against the cache's keys (:func:`nexus_client.summary.summarize`), sends the
summary to the backend, checks the answer against the cache (the keep mask must cover exactly the
call's slots and agree with the evicted positions) and cuts the evicted slots out of every layer
(:func:`~nexus_client.hf.cache_surgery.apply_keep_mask`) and out of the caller's slot lists.

**Pipelined** (``pipeline=True``): call t is summarised and sent on a background thread and the
worker goes on decoding; answer t is applied right before call t + 1 is built (waiting for it only
if it has not arrived). The k tokens decoded meanwhile attended to the slots answer t evicts: their
summary is computed over the keys *before* the cut (the cache's tensors are replaced, never written
in place, so the references stay valid) with the evicted columns dropped (``retain``), so they keep
the mass they paid to the survivors. The summary's cost leaves the decode thread too.
The wire does not change: call t + 1 is built after
answer t, so it carries the retained count and checksum after answer t. Depth is therefore 1 (a
second call in flight would need answer t's count before it exists). The backend runs on the
thread unchanged, so a remote backend's deadlines, retries, resync and local fallback behave as in
blocking mode; an error surfaces when the answer is collected (the next call, :meth:`drain` or
:meth:`close`).

Several runs (sequences decoded together) make one call with :func:`call_many`: one backend call
(``step_many``: one ``StepBatch`` RPC) for all of them, blocking or pipelined (the runs then share
one call thread, the ``pool`` each was given), each run's steps exactly those of
:meth:`PolicyRun.call`.

Bounds: the sidecar keeps at most ``budget + slack`` slots of a call, so right after an answer is
applied (every call) the cache holds at most ``budget + slack + k`` slots (k: the tokens added
since the answered call was sent). In blocking mode that is also the peak; pipelined, the k tokens
of the next call are decoded before the answer lands, so between calls the cache peaks at
``budget + slack + 2k``. ``held_at_call`` records the cache size at every call (after the answer
was applied) for callers and tests to check.
"""

from __future__ import annotations

import concurrent.futures
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import torch

from nexus_client.hf.backends import PolicyBackend, StepDecision
from nexus_client.hf.cache_surgery import apply_keep_mask, cache_lengths
from nexus_client.hf.capture import ForwardQueries, cache_kv
from nexus_client.summary import HeadReduce, StepTensors, slot_norms, summarize

PRIOR_POLICIES = ("keydiff", "knorm")  # score by a prior alone; Nexus reads one when prior_mix > 0


def reads_priors(config: Mapping[str, Any]) -> bool:
    """Whether the policy of ``config`` reads a query-agnostic prior (so a step should carry them)."""
    policy = str(config.get("policy", "nexus"))
    if policy in PRIOR_POLICIES:
        return True
    if policy in ("nexus", "nexus_topk"):
        # Absent means the engine's default, which mixes the prior in (PolicyConfig.prior_mix > 0).
        mixes = "prior_mix" not in config or float(config["prior_mix"]) > 0.0
        return mixes or float(config.get("question_prior_mix") or 0.0) > 0.0
    return False


@dataclass
class _InFlight:
    """A call sent and not yet applied: its answer (entry ``index`` of what the future returns: one
    backend call may carry several runs' summaries), and the slots it covered (per group)."""

    future: concurrent.futures.Future[list[StepDecision]]
    index: int
    slots: list[torch.Tensor]
    sent: float


@dataclass
class _Outgoing:
    """A pipelined call built on the decode thread; its summary is computed on the call thread."""

    run: PolicyRun
    queries: ForwardQueries
    keys: list[torch.Tensor]
    values: list[torch.Tensor]
    slots: list[torch.Tensor]
    kind: str
    retain: list[torch.Tensor] | None
    norms: list[tuple[torch.Tensor, torch.Tensor]] | None
    call_slots: list[torch.Tensor]  # the slots the call covers (after the applied answer's cut)


class PolicyRun:
    """A backend session for one sequence whose cache holds ``groups`` eviction groups (1 = shared).

    ``window``: the observation window (``attn`` sums only the last ``window`` pending queries;
    ``None``: all). ``priors``: send the cache's query-agnostic priors with every call; by default
    they are sent when the policy reads one (``keydiff``, ``knorm``, Nexus with ``prior_mix > 0``).
    ``head_reduce``: how a layer's heads are reduced (``mean`` or ``max``). ``pipeline``: send each
    call in the background and apply its answer right before the next call (module doc).
    Use as a context manager, or call :meth:`close`.
    """

    def __init__(self, backend: PolicyBackend, config: Mapping[str, Any], window: int | None = None,
                 priors: bool | None = None, *, pipeline: bool = False, head_reduce: HeadReduce = "mean",
                 pool: concurrent.futures.ThreadPoolExecutor | None = None) -> None:  # fmt: skip
        self.backend = backend
        self.config = dict(config)
        self.groups = int(self.config.get("groups", 1))
        self.fanout = int(self.config.get("fanout", 8))
        if window is not None and window < 1:
            raise ValueError(f"window must be >= 1 or None, got {window}")
        self.window = window
        self.head_reduce: HeadReduce = head_reduce
        self.priors = reads_priors(self.config) if priors is None else priors
        self.pipeline = pipeline
        self.session = backend.open(self.config)
        self._queries: ForwardQueries | None = None
        self._inflight: _InFlight | None = None
        # Per layer (|k|, |v|) of the slots the cache held at the end of the last call: constants of
        # a slot, so a call computes them only for its new slots (the priors' main cost otherwise).
        self._norms: list[tuple[torch.Tensor, torch.Tensor]] | None = None
        if pool is not None and not pipeline:
            raise ValueError("pool: only a pipelined run sends its calls on a thread")
        # Runs sent together (call_many) share the caller's one-thread pool: their calls go out in order.
        self._own_pool = pipeline and pool is None
        self._pool = pool if pool is not None else (
            concurrent.futures.ThreadPoolExecutor(1, thread_name_prefix="nexus-policy") if pipeline else None)
        self.calls = 0
        self.evicted = 0
        self.seconds = 0.0  # in the backend (blocking) or waiting for it (pipelined)
        self.summary_seconds = 0.0
        self.surgery_seconds = 0.0
        self.wait_seconds = 0.0  # pipelined: time the worker stalled for an answer not yet there
        self.held_at_call: list[int] = []  # cache size (max over layers) at every call, answers applied
        self.summaries: list[StepTensors] | None = None  # set to [] to keep every summary sent, in order

    def __enter__(self) -> PolicyRun:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    @property
    def pending(self) -> int:
        """New tokens added since the last call."""
        return 0 if self._queries is None else self._queries.tokens

    @property
    def in_flight(self) -> bool:
        """Whether a pipelined call has been sent and its answer not applied yet."""
        return self._inflight is not None

    def add(self, queries: ForwardQueries, positions: torch.Tensor, slots: list[torch.Tensor] | None = None) -> None:
        """Add one forward pass's queries (``positions``: its new tokens, already the last slots of
        ``slots`` when given)."""
        q = queries.tokens
        if positions.numel() != q:
            raise ValueError(f"positions: {positions.numel()} for {q} recorded queries")
        if slots is not None:
            if len(slots) != self.groups:
                raise ValueError(f"slots: expected {self.groups} groups, got {len(slots)}")
            for g, s in enumerate(slots):
                if s.numel() < q or not torch.equal(s[-q:].cpu(), positions.cpu().to(s.dtype)):
                    raise ValueError(f"slots[{g}]: the last {q} slots are not the new positions")
        self._queries = queries if self._queries is None else self._queries.cat(queries)

    def _take_queries(self) -> ForwardQueries:
        if self._queries is None:
            raise RuntimeError("no new tokens added since the last policy call")
        queries, self._queries = self._queries, None
        return queries

    def _slot_norms(self, keys: list[torch.Tensor], values: list[torch.Tensor],
                    new: int) -> list[tuple[torch.Tensor, torch.Tensor]] | None:
        """Every slot's (|k|, |v|): the kept ones of the last call, then the ``new`` slots' own."""
        if not self.priors:
            return None
        t0 = time.perf_counter()
        old = self._norms
        out = []
        for i, (k, v) in enumerate(zip(keys, values, strict=True)):
            length = int(k.shape[1])
            if old is None or old[i][0].shape[1] != length - new:  # first call, or the cache changed under us
                out.append(slot_norms(k, v))
                continue
            kn, vn = slot_norms(k[:, length - new :], v[:, length - new :])
            out.append((torch.cat([old[i][0], kn], dim=1), torch.cat([old[i][1], vn], dim=1)))
        self._norms = out
        self.summary_seconds += time.perf_counter() - t0
        return out

    def _summary(self, queries: ForwardQueries, keys: list[torch.Tensor], values: list[torch.Tensor],
                 slots: list[torch.Tensor], kind: str, retain: list[torch.Tensor] | None,
                 norms: list[tuple[torch.Tensor, torch.Tensor]] | None) -> StepTensors:
        t0 = time.perf_counter()
        step = summarize(queries.queries, keys, values, slots, scaling=queries.scaling, groups=self.groups,
                         fanout=self.fanout, window=self.window, head_reduce=self.head_reduce, priors=self.priors,
                         retain=retain, call=kind, norms=norms)  # fmt: skip
        self.summary_seconds += time.perf_counter() - t0
        if self.summaries is not None:
            self.summaries.append(step)
        return step

    def _checked(self, decision: StepDecision, call_slots: list[torch.Tensor]) -> tuple[list[torch.Tensor], list]:
        """Each group's keep row over the call's slots, and the evicted positions; refuses an answer
        that does not fit (a keep mask over the wrong slots, or one that disagrees with its evicted
        positions): applying it would silently corrupt the cache."""
        keep = decision.keep
        if keep.dim() != 2 or keep.shape[0] != self.groups:
            raise RuntimeError(f"backend returned keep of shape {tuple(keep.shape)}, expected [{self.groups}, N]")
        rows, evicted = [], []
        for g in range(self.groups):
            n = call_slots[g].numel()
            row = keep[g]
            if row.numel() < n or bool(row[n:].any()):
                raise RuntimeError(f"group {g}: keep covers {row.numel()} slots, cache group holds {n}")
            gone = call_slots[g][~row[:n]]
            if not torch.equal(torch.sort(gone).values, torch.sort(decision.evicted[g].to(torch.int64)).values):
                raise RuntimeError(f"group {g}: keep mask and evicted positions disagree")
            rows.append(row[:n])
            evicted.append(gone.tolist())
        return rows, evicted

    def _apply(self, cache: Any, slots: list[torch.Tensor], rows: list[torch.Tensor],
               evicted: list[list[int]]) -> None:
        """Cut the slots ``rows`` drops (the first ``len(row)`` slots of each group) from cache and slots."""
        t0 = time.perf_counter()
        full = []
        for g in range(self.groups):
            tail = slots[g].numel() - rows[g].numel()
            row = torch.cat([rows[g], torch.ones(tail, dtype=torch.bool)])
            slots[g] = slots[g][row]
            full.append(row)
        if any(evicted):
            apply_keep_mask(cache, full if self.groups > 1 else full[0])
            if self._norms is not None:
                cut = []
                for i, (kn, vn) in enumerate(self._norms):
                    row = full[0 if self.groups == 1 else i]
                    idx = row[: kn.shape[1]].nonzero().squeeze(1).to(kn.device)
                    cut.append((kn.index_select(1, idx), vn.index_select(1, idx)))
                self._norms = cut
        self.evicted += sum(len(e) for e in evicted)
        self.surgery_seconds += time.perf_counter() - t0

    def _collect(self) -> tuple[_InFlight, StepDecision]:
        assert self._inflight is not None
        flight, self._inflight = self._inflight, None
        t0 = time.perf_counter()
        done = flight.future.done()
        decision = flight.future.result()[flight.index]  # re-raises the backend's error here
        waited = time.perf_counter() - t0
        if not done:
            self.wait_seconds += waited
        self.seconds += waited
        return flight, decision

    def call(self, cache: Any, slots: list[torch.Tensor], kind: str = "unspecified") -> list[list[int]]:
        """One policy call over everything added; evicts from ``cache`` and ``slots`` (in place).

        ``kind`` tells the policy what the added queries are: "context" (a chunk of context, no
        question yet), "question" (a question's queries), "decode" (generated tokens).

        Blocking: returns the positions this call evicted, per group. Pipelined: applies the
        previous call's answer (waiting if needed), sends this one, and returns the positions the
        applied answer evicted (none on the first call). Raises ``RuntimeError`` when an answer does
        not fit the cache.
        """
        if len(slots) != self.groups:
            raise ValueError(f"slots: expected {self.groups} groups, got {len(slots)}")
        if self._pool is None:
            tensors = self.prepare(cache, slots, kind)
            t0 = time.perf_counter()
            decision = self.backend.step(self.session, tensors)
            self.seconds += time.perf_counter() - t0
            return self.settle(decision, cache, slots)
        evicted, out = self._begin(cache, slots, kind)
        self._send([out], batched=False)
        return evicted

    def _begin(self, cache: Any, slots: list[torch.Tensor], kind: str) -> tuple[list[list[int]], _Outgoing]:
        """The decode thread's half of a pipelined call: apply the answer in flight (waiting if
        needed), then gather what this call's summary needs."""
        queries = self._take_queries()
        # The cache's tensors are never written in place (transformers appends and cuts by making new
        # tensors; the llama.cpp worker's mirror too), so these references keep the keys the pending
        # queries saw, whatever happens next.
        keys, values = cache_kv(cache)
        norms = self._slot_norms(keys, values, queries.tokens)
        evicted: list[list[int]] = [[] for _ in range(self.groups)]
        retain = None
        summary_slots = [s.clone() for s in slots]
        if self._inflight is not None:
            flight, decision = self._collect()
            retain, evicted = self._checked(decision, flight.slots)
            self._apply(cache, slots, retain, evicted)
        self.calls += 1
        self.held_at_call.append(max(cache_lengths(cache)))
        return evicted, _Outgoing(self, queries, keys, values, summary_slots, kind, retain, norms,
                                  [s.clone() for s in slots])

    def _send(self, outgoing: list[_Outgoing], batched: bool) -> None:
        """Summarise and send ``outgoing`` (this run's first) in one backend call on the background
        thread (``batched``: ``step_many``, one call for several runs); the decode goes on at once."""
        assert self._pool is not None
        future = self._pool.submit(_step_on_thread, self.backend, outgoing, batched,
                                   torch.is_inference_mode_enabled())  # fmt: skip
        sent = time.perf_counter()
        for i, out in enumerate(outgoing):
            out.run._inflight = _InFlight(future, i, out.call_slots, sent)

    def prepare(self, cache: Any, slots: list[torch.Tensor], kind: str = "unspecified") -> StepTensors:
        """The first half of a blocking call, for a worker that sends several sequences' summaries in
        one backend call (``backend.step_many``): this call's summary over everything added; then
        :meth:`settle` with its answer."""
        if self._pool is not None:
            raise RuntimeError("prepare/settle are blocking calls; this run is pipelined (use call)")
        if len(slots) != self.groups:
            raise ValueError(f"slots: expected {self.groups} groups, got {len(slots)}")
        queries = self._take_queries()
        keys, values = cache_kv(cache)
        norms = self._slot_norms(keys, values, queries.tokens)
        return self._summary(queries, keys, values, slots, kind, None, norms)

    def settle(self, decision: StepDecision, cache: Any, slots: list[torch.Tensor]) -> list[list[int]]:
        """The second half: check the answer to the call :meth:`prepare` built and cut what it evicts
        from ``cache`` and ``slots`` (in place); returns the evicted positions per group."""
        rows, evicted = self._checked(decision, slots)
        self._apply(cache, slots, rows, evicted)
        self.calls += 1
        self.held_at_call.append(max(cache_lengths(cache)))
        return evicted

    def drain(self, cache: Any, slots: list[torch.Tensor]) -> list[list[int]]:
        """Apply the answer in flight now (waiting for it); returns what it evicted (nothing when
        none is in flight). Only with no tokens pending: their summary would otherwise lose the
        mass they paid to the slots this cut removes."""
        if self._inflight is None:
            return [[] for _ in range(self.groups)]
        if self.pending:
            raise RuntimeError(f"drain with {self.pending} tokens pending: make a call first")
        flight, decision = self._collect()
        rows, evicted = self._checked(decision, flight.slots)
        self._apply(cache, slots, rows, evicted)
        return evicted

    def close(self) -> None:
        """Wait for a call in flight (its answer is not applied), then release the backend session."""
        try:
            if self._inflight is not None:
                flight, self._inflight = self._inflight, None
                flight.future.result()
        finally:
            if self._pool is not None and self._own_pool:
                self._pool.shutdown(wait=True)
            self._pool = None
            self.backend.close(self.session)


def _step_on_thread(backend: PolicyBackend, outgoing: list[_Outgoing], batched: bool,
                    inference: bool) -> list[StepDecision]:  # fmt: skip
    # Inference mode is thread-local: an in-process engine whose state was made under it must
    # keep running under it (in-place updates of inference tensors are refused outside it).
    with torch.inference_mode(inference):
        tensors = [o.run._summary(o.queries, o.keys, o.values, o.slots, o.kind, o.retain, o.norms) for o in outgoing]
        if not batched:
            return [backend.step(outgoing[0].run.session, tensors[0])]
        return backend.step_many([o.run.session for o in outgoing], tensors)  # type: ignore[attr-defined]


def call_many(runs: Sequence[PolicyRun], caches: Sequence[Any], slots: Sequence[list[torch.Tensor]],
              kinds: Sequence[str]) -> list[list[list[int]]]:  # fmt: skip
    """One policy call for several runs (sequences decoded together) in **one** backend call
    (``backend.step_many``: one engine step in-process, one ``StepBatch`` RPC for a sidecar).

    The runs share one backend; blocking or pipelined alike (pipelined runs share one pool, the
    ``pool`` given to each). Per run, the same steps as :meth:`PolicyRun.call`: blocking, each
    summary is built, the batch is sent and each answer is checked and cut from its cache and
    slots; pipelined, each run's answer in flight is applied, then the summaries are built and sent
    on the pool's thread together. Returns per run the positions evicted from its cache (per group).
    """
    if not runs or not len(runs) == len(caches) == len(slots) == len(kinds):
        raise ValueError(f"call_many: {len(runs)} runs, {len(caches)} caches, {len(slots)} slot lists, "
                         f"{len(kinds)} kinds; need one of each per run")
    first = runs[0]
    if any(r.backend is not first.backend for r in runs):
        raise ValueError("call_many: every run must use the same backend (one call carries them all)")
    if any((r._pool is None) != (first._pool is None) or r._pool is not first._pool for r in runs):
        raise ValueError("call_many: the runs must be all blocking, or all pipelined on one shared pool")
    if not hasattr(first.backend, "step_many"):
        raise TypeError(f"{type(first.backend).__name__} has no step_many (one call for several sequences)")
    if first._pool is None:
        tensors = [r.prepare(c, s, k) for r, c, s, k in zip(runs, caches, slots, kinds, strict=True)]
        t0 = time.perf_counter()
        decisions = first.backend.step_many([r.session for r in runs], tensors)  # type: ignore[attr-defined]
        spent = time.perf_counter() - t0
        out = []
        for r, d, c, s in zip(runs, decisions, caches, slots, strict=True):
            r.seconds += spent / len(runs)
            out.append(r.settle(d, c, s))
        return out
    begun = [r._begin(c, s, k) for r, c, s, k in zip(runs, caches, slots, kinds, strict=True)]
    first._send([o for _, o in begun], batched=True)
    return [e for e, _ in begun]
