"""Sync and asyncio clients of the sidecar: deadlines, retries with deadline-aware exponential
backoff (the same step number, which the service answers idempotently) inside a total retry
budget that covers a replica restart, resync of a session from the worker's truth, typed
errors, connection options.

Targets: ``host:port``, or ``unix:/path.sock`` for a sidecar in the same pod.
"""

from __future__ import annotations

import asyncio
import random
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any, TypeVar

import grpc
import torch

from nexus_client.errors import SidecarError, from_rpc_error
from nexus_client.packing import WorkerSession
from nexus_client.v1 import sidecar_pb2 as pb
from nexus_client.v1 import sidecar_pb2_grpc as pb_grpc
from nexus_client.wire import ENUM_FIELDS, tensor_to_proto

T = TypeVar("T")


@dataclass(frozen=True)
class ClientOptions:
    """How to reach the sidecar."""

    target: str
    api_key: str | None = None
    timeout_s: float = 5.0  # per-attempt deadline
    retries: int = 100  # at most this many extra attempts for retryable codes ...
    retry_budget_s: float = 20.0  # ... and no attempt starts later than this after the first one
    backoff_s: float = 0.05  # first backoff; doubles, with jitter ...
    max_backoff_s: float = 1.0  # ... up to this
    max_message_mb: int = 64
    keepalive_s: float = 30.0

    def channel_options(self) -> list[tuple[str, Any]]:
        """gRPC channel options matching the server's limits."""
        size = self.max_message_mb * 1024 * 1024
        return [("grpc.max_send_message_length", size), ("grpc.max_receive_message_length", size),
                ("grpc.keepalive_time_ms", int(self.keepalive_s * 1000)), ("grpc.keepalive_timeout_ms", 10_000),
                ("grpc.keepalive_permit_without_calls", 1),
                # Reconnect quickly once a restarted replica listens again (gRPC's default backoff
                # grows to 120 s, far past the retry budget).
                ("grpc.initial_reconnect_backoff_ms", 100), ("grpc.min_reconnect_backoff_ms", 100),
                ("grpc.max_reconnect_backoff_ms", 1000)]

    def metadata(self) -> tuple[tuple[str, str], ...]:
        """Call metadata (the bearer key)."""
        return (("authorization", f"Bearer {self.api_key}"),) if self.api_key else ()


def config_message(config: Mapping[str, Any] | None) -> pb.PolicyConfig:
    """A ``PolicyConfig`` message from plain fields (unset fields take the server defaults)."""
    msg = pb.PolicyConfig()
    for name, value in (config or {}).items():
        if name == "policy":
            msg.policy = value
        elif name in ENUM_FIELDS:
            setattr(msg, name, ENUM_FIELDS[name][value])
        elif name == "seed":
            msg.seed = int(value) & ((1 << 64) - 1)
        else:
            setattr(msg, name, value)
    return msg


@dataclass
class _Budget:
    """Deadline-aware retry schedule of one call: exponential backoff with jitter, never past the budget."""

    options: ClientOptions
    attempts: int
    start: float

    def timeout(self) -> float:
        """This attempt's deadline: the per-attempt timeout, cut to what is left of the budget."""
        left = self.start + self.options.retry_budget_s - time.monotonic()
        return max(0.05, min(self.options.timeout_s, left)) if self.attempts > 1 else self.options.timeout_s

    def pause(self, attempt: int) -> float | None:
        """Seconds to wait before attempt ``attempt + 1``, or None when the budget is spent."""
        if attempt >= self.attempts - 1:
            return None
        wait = min(self.options.max_backoff_s, self.options.backoff_s * 2**attempt) * (0.5 + random.random())
        left = self.start + self.options.retry_budget_s - time.monotonic()
        if left <= 0.05:
            return None
        return min(wait, left - 0.05)


def _budget(options: ClientOptions, retry: bool = True) -> _Budget:
    return _Budget(options, options.retries + 1 if retry else 1, time.monotonic())


def resync_request(ws: WorkerSession, config: Mapping[str, Any] | None = None) -> pb.ResyncRequest:
    """The Resync message for a worker session (its step and retained positions per group)."""
    positions = ws.positions or ([torch.zeros(0, dtype=torch.int64)] * ws.groups if ws.step == 0 else [])
    if len(positions) != ws.groups:
        raise ValueError(f"session {ws.session_id!r} tracks {len(ws.positions)} groups of positions, "
                         f"expected {ws.groups} (advance it with WorkerSession.advance)")
    req = pb.ResyncRequest(session_id=ws.session_id, step=ws.step,
                           retained=[tensor_to_proto(p.to(torch.int64)) for p in positions])
    if config is not None:
        req.config.CopyFrom(config_message(config))
    return req


# Codes after which a worker re-seeds its session (the sidecar is behind it, or lost it).
RESYNC_CODES = (grpc.StatusCode.FAILED_PRECONDITION, grpc.StatusCode.NOT_FOUND)


class NexusClient:
    """Blocking client."""

    def __init__(self, options: ClientOptions | str, **kwargs: Any) -> None:
        self.options = options if isinstance(options, ClientOptions) else ClientOptions(options, **kwargs)
        self._channel = grpc.insecure_channel(self.options.target, options=self.options.channel_options())
        self._stub = pb_grpc.EvictionServiceStub(self._channel)

    def _call(self, fn: Callable[..., T], request: Any, retry: bool = True) -> T:
        budget = _budget(self.options, retry)
        attempt = 0
        while True:
            try:
                return fn(request, timeout=budget.timeout(), metadata=self.options.metadata())
            except grpc.RpcError as err:
                exc = from_rpc_error(err)
                wait = budget.pause(attempt) if exc.retryable else None
                if wait is None:
                    raise exc from None
                time.sleep(wait)
                attempt += 1

    def open_session(self, session_id: str, config: Mapping[str, Any] | None = None) -> pb.OpenSessionResponse:
        """Open (idempotently) a session."""
        return self._call(self._stub.OpenSession, pb.OpenSessionRequest(session_id=session_id,
                                                                         config=config_message(config)))

    def step(self, steps: Sequence[pb.SessionStep]) -> list[pb.SessionResult]:
        """One RPC carrying one step of each session (the per-session form); retried with the same
        step numbers."""
        return list(self._call(self._stub.Step, pb.StepRequest(steps=list(steps))).results)

    def step_batch(self, request: pb.StepBatchRequest) -> pb.StepBatchResponse:
        """The columnar form of :meth:`step` (build ``request`` with
        :class:`nexus_client.columnar.BatchBuilder`, read the answer with
        :func:`nexus_client.columnar.read_answer`); retried with the same step numbers."""
        return self._call(self._stub.StepBatch, request)

    def close_session(self, session_id: str) -> int:
        """Close a session; returns its last step."""
        return self._call(self._stub.CloseSession, pb.CloseSessionRequest(session_id=session_id)).step

    def get_session(self, session_id: str, include_weights: bool = False) -> pb.GetSessionResponse:
        """Retention snapshot."""
        return self._call(self._stub.GetSession, pb.GetSessionRequest(session_id=session_id,
                                                                       include_weights=include_weights))

    def list_policies(self) -> list[pb.PolicyInfo]:
        """Policies the server runs."""
        return list(self._call(self._stub.ListPolicies, pb.ListPoliciesRequest()).policies)

    def resync(self, ws: WorkerSession, config: Mapping[str, Any] | None = None) -> pb.ResyncResponse:
        """Re-seed the sidecar's session from the worker's truth (``ws.positions`` and ``ws.step``);
        ``ws`` then carries the sidecar's count and checksum for its next step. ``config`` is needed
        only when the sidecar lost the session entirely."""
        resp = self._call(self._stub.Resync, resync_request(ws, config))
        ws.retained_count, ws.retained_checksum = resp.retained_count, resp.retained_checksum
        return resp

    def close(self) -> None:
        """Close the channel."""
        self._channel.close()

    def __enter__(self) -> NexusClient:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


class AsyncNexusClient:
    """asyncio client (``grpc.aio``)."""

    def __init__(self, options: ClientOptions | str, **kwargs: Any) -> None:
        self.options = options if isinstance(options, ClientOptions) else ClientOptions(options, **kwargs)
        self._channel = grpc.aio.insecure_channel(self.options.target, options=self.options.channel_options())
        self._stub = pb_grpc.EvictionServiceStub(self._channel)

    async def _call(self, fn: Callable[..., Any], request: Any) -> Any:
        budget = _budget(self.options)
        attempt = 0
        while True:
            try:
                return await fn(request, timeout=budget.timeout(), metadata=self.options.metadata())
            except grpc.aio.AioRpcError as err:
                exc = from_rpc_error(err)
                wait = budget.pause(attempt) if exc.retryable else None
                if wait is None:
                    raise exc from None
                await asyncio.sleep(wait)
                attempt += 1

    async def open_session(self, session_id: str, config: Mapping[str, Any] | None = None
                           ) -> pb.OpenSessionResponse:
        """Open (idempotently) a session."""
        return await self._call(self._stub.OpenSession, pb.OpenSessionRequest(session_id=session_id,
                                                                               config=config_message(config)))

    async def step(self, steps: Sequence[pb.SessionStep]) -> list[pb.SessionResult]:
        """One RPC carrying one step of each session (the per-session form); retried with the same
        step numbers."""
        return list((await self._call(self._stub.Step, pb.StepRequest(steps=list(steps)))).results)

    async def step_batch(self, request: pb.StepBatchRequest) -> pb.StepBatchResponse:
        """Asyncio :meth:`NexusClient.step_batch` (the columnar form)."""
        return await self._call(self._stub.StepBatch, request)

    async def close_session(self, session_id: str) -> int:
        """Close a session; returns its last step."""
        return (await self._call(self._stub.CloseSession, pb.CloseSessionRequest(session_id=session_id))).step

    async def get_session(self, session_id: str, include_weights: bool = False) -> pb.GetSessionResponse:
        """Retention snapshot."""
        return await self._call(self._stub.GetSession, pb.GetSessionRequest(session_id=session_id,
                                                                             include_weights=include_weights))

    async def list_policies(self) -> list[pb.PolicyInfo]:
        """Policies the server runs."""
        return list((await self._call(self._stub.ListPolicies, pb.ListPoliciesRequest())).policies)

    async def resync(self, ws: WorkerSession, config: Mapping[str, Any] | None = None) -> pb.ResyncResponse:
        """Asyncio :meth:`NexusClient.resync`."""
        resp = await self._call(self._stub.Resync, resync_request(ws, config))
        ws.retained_count, ws.retained_checksum = resp.retained_count, resp.retained_checksum
        return resp

    async def close(self) -> None:
        """Close the channel."""
        await self._channel.close()

    async def __aenter__(self) -> AsyncNexusClient:
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.close()


__all__ = ["RESYNC_CODES", "AsyncNexusClient", "ClientOptions", "NexusClient", "SidecarError", "config_message",
           "resync_request"]
