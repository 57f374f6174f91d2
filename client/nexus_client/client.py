"""Sync and asyncio clients of the sidecar: deadlines, bounded retries with backoff (the same
step number, which the service answers idempotently), typed errors, connection options.

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

from nexus_client.errors import SidecarError, from_rpc_error
from nexus_client.v1 import sidecar_pb2 as pb
from nexus_client.v1 import sidecar_pb2_grpc as pb_grpc
from nexus_client.wire import ENUM_FIELDS

T = TypeVar("T")


@dataclass(frozen=True)
class ClientOptions:
    """How to reach the sidecar."""

    target: str
    api_key: str | None = None
    timeout_s: float = 5.0  # per-attempt deadline
    retries: int = 3  # extra attempts for retryable codes
    backoff_s: float = 0.05  # first backoff; doubles, with jitter
    max_message_mb: int = 64
    keepalive_s: float = 30.0

    def channel_options(self) -> list[tuple[str, Any]]:
        """gRPC channel options matching the server's limits."""
        size = self.max_message_mb * 1024 * 1024
        return [("grpc.max_send_message_length", size), ("grpc.max_receive_message_length", size),
                ("grpc.keepalive_time_ms", int(self.keepalive_s * 1000)), ("grpc.keepalive_timeout_ms", 10_000),
                ("grpc.keepalive_permit_without_calls", 1)]

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


def _backoff(options: ClientOptions, attempt: int) -> float:
    return options.backoff_s * (2**attempt) * (0.5 + random.random())


class NexusClient:
    """Blocking client."""

    def __init__(self, options: ClientOptions | str, **kwargs: Any) -> None:
        self.options = options if isinstance(options, ClientOptions) else ClientOptions(options, **kwargs)
        self._channel = grpc.insecure_channel(self.options.target, options=self.options.channel_options())
        self._stub = pb_grpc.EvictionServiceStub(self._channel)

    def _call(self, fn: Callable[..., T], request: Any, retry: bool = True) -> T:
        attempts = self.options.retries + 1 if retry else 1
        for attempt in range(attempts):
            try:
                return fn(request, timeout=self.options.timeout_s, metadata=self.options.metadata())
            except grpc.RpcError as err:
                exc = from_rpc_error(err)
                if not exc.retryable or attempt == attempts - 1:
                    raise exc from None
                time.sleep(_backoff(self.options, attempt))
        raise AssertionError("unreachable")

    def open_session(self, session_id: str, config: Mapping[str, Any] | None = None) -> pb.OpenSessionResponse:
        """Open (idempotently) a session."""
        return self._call(self._stub.OpenSession, pb.OpenSessionRequest(session_id=session_id,
                                                                         config=config_message(config)))

    def step(self, steps: Sequence[pb.SessionStep]) -> list[pb.SessionResult]:
        """One RPC carrying one step of each session; retried with the same step numbers."""
        return list(self._call(self._stub.Step, pb.StepRequest(steps=list(steps))).results)

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
        attempts = self.options.retries + 1
        for attempt in range(attempts):
            try:
                return await fn(request, timeout=self.options.timeout_s, metadata=self.options.metadata())
            except grpc.aio.AioRpcError as err:
                exc = from_rpc_error(err)
                if not exc.retryable or attempt == attempts - 1:
                    raise exc from None
                await asyncio.sleep(_backoff(self.options, attempt))
        raise AssertionError("unreachable")

    async def open_session(self, session_id: str, config: Mapping[str, Any] | None = None
                           ) -> pb.OpenSessionResponse:
        """Open (idempotently) a session."""
        return await self._call(self._stub.OpenSession, pb.OpenSessionRequest(session_id=session_id,
                                                                               config=config_message(config)))

    async def step(self, steps: Sequence[pb.SessionStep]) -> list[pb.SessionResult]:
        """One RPC carrying one step of each session; retried with the same step numbers."""
        return list((await self._call(self._stub.Step, pb.StepRequest(steps=list(steps)))).results)

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

    async def close(self) -> None:
        """Close the channel."""
        await self._channel.close()

    async def __aenter__(self) -> AsyncNexusClient:
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.close()


__all__ = ["AsyncNexusClient", "ClientOptions", "NexusClient", "SidecarError", "config_message"]
