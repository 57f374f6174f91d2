"""The ``remote`` policy backend: the same decisions as ``LocalBackend``, made by a sidecar.

Each sequence gets one sidecar session. A call packs the worker's accumulated summary
(:class:`~nexus_client.summary.StepTensors`) into a one-session ``StepBatch`` with the next step
number and the worker's retained count/checksum, sends it with a deadline and bounded retries
(a retry re-sends the *same* step number, which the sidecar answers idempotently), and turns the
answer into a :class:`~nexus_client.hf.backends.StepDecision`.

With fp32 summaries (the default) the sidecar sees exactly the tensors the in-process engine
would, so for the same seed and config the decisions are identical. fp16 summaries halve the
float payload at the cost of bit-equality.
"""

from __future__ import annotations

import dataclasses
import itertools
import os
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import torch

from nexus_client.client import ClientOptions, NexusClient
from nexus_client.columnar import BatchBuilder, read_answer
from nexus_client.errors import DeadlineExceeded, FailedPrecondition, SessionNotFound, Unavailable
from nexus_client.fallback import FALLBACKS, Budget, advance_locally, streaming_keep
from nexus_client.hf.backends import StepDecision
from nexus_client.packing import WorkerSession
from nexus_client.summary import StepTensors
from nexus_client.v1 import sidecar_pb2 as pb

_WIRE_FLOATS = (torch.float32, torch.float16)


@dataclass(frozen=True)
class CallRecord:
    """What one policy call sent: new tokens ``k``, retained slots ``n`` (max over groups), bytes."""

    k: int
    slots: int
    bytes: int


class RemoteBackend:
    """Runs each sequence's policy session on a sidecar over gRPC.

    ``target`` is ``host:port`` or ``unix:/path.sock``. ``float_dtype`` is the wire type of the
    float summaries (``torch.float32`` for results equal to the in-process engine, or
    ``torch.float16``). ``timeout_s`` is the per-attempt deadline, ``retries`` the extra attempts
    for retryable codes (UNAVAILABLE, RESOURCE_EXHAUSTED, DEADLINE_EXCEEDED). ``bytes_sent`` and
    ``calls`` count every step message (first attempts only); ``records`` keeps one
    :class:`CallRecord` per call.
    """

    def __init__(self, target: str | ClientOptions, *, api_key: str | None = None,
                 float_dtype: torch.dtype = torch.float32, timeout_s: float = 10.0, retries: int = 100,
                 session_prefix: str | None = None, fallback: str = "wait", fallback_after_s: float = 1.0,
                 probe_every_s: float = 1.0) -> None:
        if float_dtype not in _WIRE_FLOATS:
            raise ValueError(f"float_dtype must be torch.float32 or torch.float16, got {float_dtype}")
        if fallback not in FALLBACKS:
            raise ValueError(f"fallback must be one of {FALLBACKS}, got {fallback!r}")
        options = target if isinstance(target, ClientOptions) else ClientOptions(
            target, api_key=api_key, timeout_s=timeout_s, retries=retries)
        if fallback != "wait":  # give up on the sidecar quickly, then evict locally (never stall)
            options = dataclasses.replace(options, retry_budget_s=fallback_after_s,
                                          timeout_s=min(options.timeout_s, fallback_after_s))
        # "wait": retry through an outage (the retry budget); "streaming": after fallback_after_s
        # without an answer, evict locally (StreamingLLM) and resync once the sidecar is back,
        # trying it again at most every probe_every_s meanwhile.
        self.fallback = fallback
        self.probe_every_s = probe_every_s
        self.local_calls = 0
        self._down_until = 0.0
        self._budgets: dict[str, Budget] = {}
        self._unsynced: set[str] = set()
        self.client = NexusClient(options)
        self.float_dtype = float_dtype
        self._prefix = session_prefix or f"w{os.getpid()}-{id(self):x}"
        self._ids = itertools.count(1)
        self.bytes_sent = 0
        self.calls = 0
        self.records: list[CallRecord] = []
        self.resyncs = 0  # sessions re-seeded after the sidecar lost or fell behind their state
        self._configs: dict[str, Mapping[str, Any]] = {}

    @property
    def bytes_per_call(self) -> float:
        """Mean serialized request size over all calls so far (0.0 before the first)."""
        return self.bytes_sent / self.calls if self.calls else 0.0

    def open(self, config: Mapping[str, Any]) -> WorkerSession:
        """Open a sidecar session with these policy fields (engine ``PolicyConfig`` names)."""
        sid = f"{self._prefix}-{next(self._ids)}"
        resp = self.client.open_session(sid, config)
        wanted = config.get("groups")
        if wanted is not None and resp.config.groups != wanted:
            raise RuntimeError(f"sidecar opened session {sid!r} with {resp.config.groups} groups, asked for {wanted}")
        self._configs[sid] = dict(config)
        c = resp.config  # the effective config: what a local fallback must respect
        self._budgets[sid] = Budget(budget=c.budget, slack=c.slack, sinks=c.sinks)
        return WorkerSession(sid, groups=resp.config.groups, step=resp.step)

    def step(self, session: WorkerSession, tensors: StepTensors) -> StepDecision:
        """One call (the columnar ``StepBatch`` form); the worker's retained count/checksum ride
        along for the mismatch check."""
        return self.step_many([session], [tensors])[0]

    def step_many(self, sessions: Sequence[WorkerSession], tensors: Sequence[StepTensors]) -> list[StepDecision]:
        """One call for several sessions (a worker decoding a batch of sequences): one ``StepBatch``
        RPC carrying every session's step, one decision per session in order. Retries, resyncs and
        the local fallback act on the whole batch."""
        if len(sessions) != len(tensors) or not sessions:
            raise ValueError(f"step_many: {len(sessions)} sessions for {len(tensors)} summaries")
        ids = [s.session_id for s in sessions]
        if len(set(ids)) != len(ids):
            raise ValueError("step_many: a session appears twice in one batch")

        def pack() -> pb.StepBatchRequest:  # again after a resync: the counts and checksums changed
            batch = BatchBuilder(self.float_dtype)
            for s, t in zip(sessions, tensors, strict=True):
                batch.add(s, t.new_positions, t.attn, t.last, t.edge_pos, t.edge_w, call=t.call, **t.priors)
            return batch.request()

        msg = pack()
        size = msg.ByteSize()
        self.bytes_sent += size
        self.calls += 1
        self.records.append(CallRecord(max(int(t.new_positions.numel()) for t in tensors),
                                       max(int(t.attn.shape[-1]) for t in tensors), size))
        if self.fallback != "wait" and time.monotonic() < self._down_until:
            return [self._local(s, t) for s, t in zip(sessions, tensors, strict=True)]
        try:
            stale = [s for s in sessions if s.session_id in self._unsynced]
            for s in stale:  # decided locally meanwhile: tell the sidecar first
                self.client.resync(s, self._configs.get(s.session_id))
                self._unsynced.discard(s.session_id)
                self.resyncs += 1
            if stale:
                msg = pack()
            resp = self.client.step_batch(msg)
        except (Unavailable, DeadlineExceeded):
            if self.fallback == "wait":
                raise
            self._down_until = time.monotonic() + self.probe_every_s
            return [self._local(s, t) for s, t in zip(sessions, tensors, strict=True)]
        except (FailedPrecondition, SessionNotFound):
            # Failover to an older checkpoint, or the store lost it: re-seed the sidecar from this
            # worker's cache (its truth) and send the same call again.
            for s in sessions:
                self.client.resync(s, self._configs.get(s.session_id))
                self.resyncs += 1
            msg = pack()
            resp = self.client.step_batch(msg)
        answer = read_answer(resp, msg, [s.groups for s in sessions])
        want = [s.step + 1 for s in sessions]
        if len(answer) != len(sessions) or answer.steps.tolist() != want:
            raise RuntimeError(f"sidecar answered steps {answer.steps.tolist()} for steps {want} of sessions {ids}")
        out = []
        for b, (s, t) in enumerate(zip(sessions, tensors, strict=True)):
            out.append(StepDecision(keep=answer.keep_of(b), evicted=answer.evicted_of(b)))
            answer.settle(s, b, t.new_positions)
        return out

    def _local(self, session: WorkerSession, tensors: StepTensors) -> StepDecision:
        """This call decided by the worker (the sidecar is unreachable): StreamingLLM within budget."""
        keep = streaming_keep(session, tensors.new_positions, int(tensors.attn.shape[-1]),
                              self._budgets[session.session_id])
        evicted = advance_locally(session, tensors.new_positions, keep)
        self._unsynced.add(session.session_id)
        self.local_calls += 1
        return StepDecision(keep=keep, evicted=evicted)

    def close(self, session: WorkerSession) -> None:
        """Close the sidecar session."""
        self.client.close_session(session.session_id)

    def shutdown(self) -> None:
        """Close the channel."""
        self.client.close()

    def __enter__(self) -> RemoteBackend:
        return self

    def __exit__(self, *exc: object) -> None:
        self.shutdown()
