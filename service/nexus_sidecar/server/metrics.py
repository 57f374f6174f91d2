"""Prometheus metrics of the sidecar. Labels are bounded: tenant, policy, rpc, code, op, outcome,
kind, phase, writer, task, device. Session ids never become labels (unbounded cardinality)."""

from __future__ import annotations

import numpy as np
from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram

from nexus_sidecar.server.stores.base import ANSWERED, OUTCOMES

_LAT = (0.0005, 0.001, 0.002, 0.005, 0.01, 0.02, 0.05, 0.1, 0.2, 0.5, 1.0, 2.0, 5.0)
_BATCH = (1, 2, 4, 8, 16, 32, 64, 128, 256, 512, 1024)
_AGE = (1, 2, 4, 8, 16, 32, 64, 128, 256, 512, 1024, 4096, 16384)
_BYTES = (256, 1024, 4096, 16384, 65536, 262144, 1048576, 4194304, 16777216)
MAINTENANCE_TASKS = ("reaper", "checkpoint", "health")
CHECKPOINT_KINDS = ("full", "delta")
UNAUTHENTICATED = "unauthenticated"  # the tenant label of a call whose key was not accepted
# Every status an RPC (and each of its steps) can end with besides OK (server/errors.py, service.py).
STEP_CODES = ("INVALID_ARGUMENT", "NOT_FOUND", "ALREADY_EXISTS", "FAILED_PRECONDITION", "RESOURCE_EXHAUSTED",
              "ABORTED", "UNAVAILABLE", "DEADLINE_EXCEEDED", "UNAUTHENTICATED", "PERMISSION_DENIED", "DATA_LOSS",
              "CANCELLED", "INTERNAL")
_FRAC = (0.1, 0.2, 0.3, 0.4, 0.5, 0.6, 0.7, 0.8, 0.9, 0.95, 0.99, 1.0)


class Metrics:
    """All metrics of one server, in their own registry (several servers can share a process)."""

    def __init__(self, registry: CollectorRegistry | None = None) -> None:
        r = self.registry = registry or CollectorRegistry()
        self.request_seconds = Histogram("nexus_request_duration_seconds", "gRPC request duration",
                                         ["rpc", "code"], buckets=_LAT, registry=r)
        self.requests = Counter("nexus_requests_total", "gRPC requests by rpc and status code (the same calls as "
                                "nexus_request_duration_seconds_count, every rpc and code created at 0)",
                                ["rpc", "code"], registry=r)
        self.queue_seconds = Histogram("nexus_queue_wait_seconds", "Time a session step waited for its batch",
                                       buckets=_LAT, registry=r)
        self.compute_seconds = Histogram("nexus_engine_compute_seconds", "Engine time per batched call",
                                         ["device"], buckets=_LAT, registry=r)
        # CPU time of the engine thread inside Engine.step (the wall time above also counts waits for
        # a core on a busy host): what the service benchmark subtracts to get the server's own CPU.
        self.compute_cpu_seconds = Counter("nexus_engine_compute_cpu_seconds",
                                           "Engine-thread CPU time inside batched engine calls", ["device"],
                                           registry=r)
        self.batch_sessions = Histogram("nexus_batch_sessions", "Sessions per batched engine call",
                                        buckets=_BATCH, registry=r)
        self.queue_depth = Gauge("nexus_queue_depth", "Session steps waiting in the micro-batcher", registry=r)
        self.tokens_seen = Counter("nexus_tokens_seen_total", "Tokens appended to sessions",
                                   ["tenant", "policy"], registry=r)
        self.tokens_evicted = Counter("nexus_tokens_evicted_total", "Token slots evicted (summed over groups)",
                                      ["tenant", "policy"], registry=r)
        self.tokens_retained = Gauge("nexus_tokens_retained", "Token slots held by hot sessions (summed over groups)",
                                     ["tenant", "policy"], registry=r)
        self.retention_ratio = Histogram("nexus_step_retention_ratio",
                                         "Kept slots / slots per step (after the eviction)",
                                         ["tenant", "policy"], buckets=_FRAC, registry=r)
        self.retained_mass = Histogram("nexus_retained_attention_mass",
                                       "Share of a step's attention mass on slots that were kept",
                                       ["tenant", "policy"], buckets=_FRAC, registry=r)
        self.eviction_age = Histogram("nexus_evicted_token_age_calls", "Age (in calls) of tokens at eviction",
                                      ["tenant", "policy"], buckets=_AGE, registry=r)
        self.sessions_open = Gauge("nexus_sessions_open", "Hot sessions", ["tenant"], registry=r)
        self.sessions_opened = Counter("nexus_sessions_opened_total", "Sessions opened", ["tenant"], registry=r)
        self.sessions_resumed = Counter("nexus_sessions_resumed_total", "Sessions resumed from the store",
                                        ["tenant"], registry=r)
        self.sessions_closed = Counter("nexus_sessions_closed_total", "Sessions closed", ["tenant"], registry=r)
        self.sessions_expired = Counter("nexus_sessions_expired_total", "Hot sessions unloaded after idling",
                                        ["tenant"], registry=r)
        self.sessions_resynced = Counter("nexus_sessions_resynced_total",
                                         "Sessions re-seeded from a worker's retained positions (Resync)",
                                         ["tenant"], registry=r)
        self.sessions_unloaded = Counter("nexus_sessions_unloaded_total",
                                         "Idle sessions checkpointed and unloaded to make room in the hot pool",
                                         ["tenant"], registry=r)
        self.pool_bytes = Gauge("nexus_pool_bytes", "Bytes the hot session pool occupies on the device", registry=r)
        self.store_seconds = Histogram("nexus_store_operation_seconds", "State store operation latency",
                                       ["op", "outcome"], buckets=_LAT, registry=r)
        self.store_ops = Counter("nexus_store_operations_total", "State store operations by op and outcome (see "
                                 "stores/base.py OnOp; every op and its outcomes created at 0)",
                                 ["op", "outcome"], registry=r)
        self.store_errors = Counter(
            "nexus_store_errors_total", "State store operations that failed: the store was unreachable or did not "
            "answer in time (outcome unavailable) or rejected the request (outcome error); fenced writes and CAS "
            "conflicts are not errors", ["op"], registry=r)
        self.store_cas_conflicts = Counter(
            "nexus_store_cas_conflicts_total", "Checkpoints that met a stored step >= theirs: writer=other, the "
            "store holds another writer's newer step (two replicas on one session) and the write was refused; "
            "writer=self, a retried write met its own earlier write of that step (a store timeout after Redis had "
            "executed it) and counts as written", ["writer"], registry=r)
        self.store_fenced = Counter("nexus_store_fenced_total",
                                    "Writes refused because another replica holds a newer owner epoch (or the session "
                                    "was closed while the write was pending)", registry=r)
        self.sessions_fenced = Counter("nexus_sessions_fenced_total",
                                       "Hot sessions dropped because another replica took them over", ["tenant"],
                                       registry=r)
        self.degraded = Gauge("nexus_degraded",
                              "1 while the state store is unreachable (since an operation failed to reach it)",
                              registry=r)
        self.checkpoint_bytes = Counter("nexus_checkpoint_bytes_total",
                                        "Checkpoint bytes written to the store, by kind (full or delta)",
                                        ["tenant", "kind"], registry=r)
        self.checkpoint_bytes_per_step = Histogram(
            "nexus_checkpoint_bytes_per_step", "Bytes of a written checkpoint / steps since the previous one",
            ["tenant"], buckets=_BYTES, registry=r)
        self.checkpoint_seconds = Histogram(
            "nexus_checkpoint_duration_seconds", "Checkpoint time by kind and phase: capture (on the engine "
            "thread), encode (on the checkpoint thread), write (the store)", ["kind", "phase"], buckets=_LAT,
            registry=r)
        self.checkpoint_fallbacks = Counter(
            "nexus_checkpoint_delta_fallbacks_total", "Resumes from the full checkpoint because the delta after "
            "it was missing, corrupt or not taken against it (the worker resyncs the steps in between)",
            ["tenant"], registry=r)
        self.maintenance_errors = Counter(
            "nexus_maintenance_errors_total", "Unexpected errors in a background task, which logged it and went on "
            "(reaper: idle unloading and pool trim; checkpoint: cadence checkpoints; health: readiness watch)",
            ["task"], registry=r)
        for task in MAINTENANCE_TASKS:
            self.maintenance_errors.labels(task)
        self.steps_rejected = Counter("nexus_steps_rejected_total", "Session steps answered with an error",
                                      ["tenant", "code"], registry=r)

    def on_store_op(self, op: str, seconds: float, outcome: str) -> None:
        """The stores' ``on_op`` hook; also the one place that sets ``nexus_degraded``: 1 from the
        first operation that could not reach the store (pings included), 0 from the next one that did."""
        self.store_seconds.labels(op, outcome).observe(seconds)
        self.store_ops.labels(op, outcome).inc()
        if outcome == "unavailable":
            self.degraded.set(1)
        elif outcome in ANSWERED:
            self.degraded.set(0)
        if outcome in ("error", "unavailable"):
            self.store_errors.labels(op).inc()
        elif outcome == "conflict":
            self.store_cas_conflicts.labels("other").inc()
        elif outcome == "conflict_self":
            self.store_cas_conflicts.labels("self").inc()
        elif outcome == "fenced":
            self.store_fenced.inc()

    def prime(self, tenants: list[str], policies: list[str], rpcs: list[str], device: str) -> None:
        """Create every labelled series at 0 for the label values known at start: the tenants (from
        the keys file), policies, RPCs and codes, store ops and their outcomes.

        A counter born at its first increment has no earlier sample, so ``rate()`` and
        ``increase()`` never see that first burst (an error burst would draw no point at all).
        The latency histograms are created for their common case only (code OK, outcome ok): the
        rates by code and outcome are read from the counters ``nexus_requests_total`` and
        ``nexus_store_operations_total``, which are created for every value. That keeps the first
        scrape at about 3,000 lines for one tenant (+500 per tenant with the 9 policies).
        """
        for tenant in tenants:
            for policy in policies:
                for m in (self.tokens_seen, self.tokens_evicted, self.tokens_retained, self.retention_ratio,
                          self.retained_mass, self.eviction_age):
                    m.labels(tenant, policy)
            for m in (self.sessions_opened, self.sessions_resumed, self.sessions_closed, self.sessions_expired,
                      self.sessions_resynced, self.sessions_unloaded, self.sessions_fenced, self.sessions_open,
                      self.checkpoint_fallbacks, self.checkpoint_bytes_per_step):
                m.labels(tenant)
            for kind in CHECKPOINT_KINDS:
                self.checkpoint_bytes.labels(tenant, kind)
        for tenant in (*tenants, UNAUTHENTICATED):
            for code in STEP_CODES:
                self.steps_rejected.labels(tenant, code)
        for rpc in rpcs:
            self.request_seconds.labels(rpc, "OK")
            for code in ("OK", *STEP_CODES):
                self.requests.labels(rpc, code)
        for op, outcomes in OUTCOMES.items():
            self.store_errors.labels(op)
            self.store_seconds.labels(op, "ok")
            for outcome in outcomes:
                self.store_ops.labels(op, outcome)
        for writer in ("other", "self"):
            self.store_cas_conflicts.labels(writer)
        for kind in CHECKPOINT_KINDS:
            for phase in ("capture", "encode", "write"):
                self.checkpoint_seconds.labels(kind, phase)
        self.compute_seconds.labels(device)


def observe_many(child: Histogram, values: np.ndarray) -> None:
    """``child.observe(v)`` for every ``v`` of ``values``, in one bucketing pass.

    The same counts and sum as observing one by one (a value lands in the first bucket whose upper
    bound is >= it), without a Python call per value: the session layer observes a batch's
    retention ratios, retained masses and eviction ages at once. Uses prometheus_client's
    histogram internals (``_upper_bounds``, ``_buckets``, ``_sum``); a test pins the equivalence.
    """
    values = np.asarray(values, dtype=np.float64).reshape(-1)
    if not values.size:
        return
    bounds = np.asarray(child._upper_bounds, dtype=np.float64)  # type: ignore[attr-defined]
    hits = np.bincount(np.searchsorted(bounds, values, side="left"), minlength=bounds.shape[0])
    for i in np.flatnonzero(hits[: bounds.shape[0]]).tolist():
        child._buckets[i].inc(int(hits[i]))  # type: ignore[attr-defined]
    child._sum.inc(float(values.sum()))  # type: ignore[attr-defined]
