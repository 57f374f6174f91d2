"""The gRPC servicer of ``nexus.v1.EvictionService``: authentication, then the session layer.

Every handler goes through :meth:`EvictionServicer._call`, which authenticates, times the
request, and maps any exception to a status code (``errors.to_status``) in one place.

Requests are parsed by :func:`add_to_server`'s lenient deserializers, not by grpc's: bytes that
are not a valid message (garbage, truncation, invalid UTF-8 in a string field) become a
:class:`Unparsable` request that the handler answers with INVALID_ARGUMENT, instead of grpc's
UNKNOWN plus an ERROR traceback in the log.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import Any, TypeVar

import grpc
from google.protobuf.message import DecodeError, Message
from nexus_client.v1 import sidecar_pb2 as pb
from nexus_client.v1 import sidecar_pb2_grpc as pb_grpc

from nexus_sidecar.engine import POLICIES, PolicyConfig
from nexus_sidecar.server import codec
from nexus_sidecar.server.auth import KeyRing, Principal
from nexus_sidecar.server.errors import Draining, InvalidArgument, forget_frames, to_status
from nexus_sidecar.server.metrics import UNAUTHENTICATED, Metrics
from nexus_sidecar.server.sessions import SessionManager

T = TypeVar("T")
log = logging.getLogger("nexus_sidecar.service")
SERVICE_DESCRIPTOR = pb.DESCRIPTOR.services_by_name["EvictionService"]


@dataclass(frozen=True)
class Unparsable:
    """A request whose bytes did not parse as the method's message type."""

    message_type: str
    size: int


def _lenient(cls: type[Message]) -> Callable[[bytes], Message | Unparsable]:
    def parse(data: bytes) -> Message | Unparsable:
        try:
            return cls.FromString(data)
        except (DecodeError, ValueError, RuntimeError):  # upb raises DecodeError; be generous
            return Unparsable(cls.DESCRIPTOR.full_name, len(data))

    return parse


def add_to_server(servicer: EvictionServicer, server: grpc.aio.Server) -> None:
    """Register every RPC of ``nexus.v1.EvictionService`` with lenient request parsing."""
    handlers = {}
    for method in SERVICE_DESCRIPTOR.methods:
        request_cls = getattr(pb, method.input_type.name)
        response_cls = getattr(pb, method.output_type.name)
        handlers[method.name] = grpc.unary_unary_rpc_method_handler(
            getattr(servicer, method.name), request_deserializer=_lenient(request_cls),
            response_serializer=response_cls.SerializeToString)
    server.add_generic_rpc_handlers((grpc.method_handlers_generic_handler(SERVICE_DESCRIPTOR.full_name, handlers),))


class EvictionServicer(pb_grpc.EvictionServiceServicer):
    """Implements the RPCs on top of a :class:`SessionManager`."""

    def __init__(self, sessions: SessionManager, keys: KeyRing, metrics: Metrics) -> None:
        self.sessions = sessions
        self.keys = keys
        self.metrics = metrics
        self.draining = False

    async def _call(self, rpc: str, request: Any, context: grpc.aio.ServicerContext, write: bool,
                    body: Callable[[Principal], Awaitable[T]]) -> T:
        start = time.perf_counter()
        code = grpc.StatusCode.OK
        tenant = UNAUTHENTICATED
        try:
            metadata = dict(context.invocation_metadata() or ())
            principal = self.keys.authenticate(metadata.get("authorization"))
            tenant = principal.tenant
            if isinstance(request, Unparsable):
                raise InvalidArgument("request", f"{request.size} bytes are not a valid {request.message_type} "
                                                 "message (malformed protobuf or invalid UTF-8 in a string field)")
            if write:
                principal.require_write()
                if self.draining:
                    raise Draining()
            return await body(principal)
        except asyncio.CancelledError:  # the caller went away (deadline, cancel): not an OK
            code = grpc.StatusCode.CANCELLED
            raise
        except Exception as exc:  # one place maps every error to a status code
            code, message = to_status(exc)
            if code in (grpc.StatusCode.INTERNAL, grpc.StatusCode.UNKNOWN):
                log.exception("%s failed with %s", rpc, code.name)  # a bug: the only case worth a traceback
            forget_frames(exc)
            if rpc in ("Step", "StepBatch"):  # every step of a refused RPC was answered with the error
                steps = len(request.steps) if isinstance(request, pb.StepRequest) else \
                    len(request.session_ids) if isinstance(request, pb.StepBatchRequest) else 1
                self.metrics.steps_rejected.labels(tenant, code.name).inc(max(1, steps))
            # set_code + return instead of context.abort: abort raises an exception whose traceback
            # holds this frame (and the request) in a cycle that only the cyclic GC frees.
            context.set_code(code)
            context.set_details(message)
            return None  # type: ignore[return-value]  # grpc sends the status, not a message
        finally:
            self.metrics.request_seconds.labels(rpc, code.name).observe(time.perf_counter() - start)
            self.metrics.requests.labels(rpc, code.name).inc()

    def _deadline(self, context: grpc.aio.ServicerContext) -> float | None:
        remaining = context.time_remaining()
        return None if remaining is None else time.monotonic() + remaining

    async def OpenSession(self, request: pb.OpenSessionRequest, context: grpc.aio.ServicerContext
                          ) -> pb.OpenSessionResponse:
        """Open (or re-open with the same config) a session."""
        async def body(p: Principal) -> pb.OpenSessionResponse:
            cfg = codec.config_from_proto(request.config, self.sessions.settings.default_policy)
            hs = await self.sessions.open(p.tenant, request.session_id, cfg)
            return pb.OpenSessionResponse(session_id=hs.session_id, config=codec.config_to_proto(hs.cfg), step=hs.step)

        return await self._call("OpenSession", request, context, True, body)

    async def Step(self, request: pb.StepRequest, context: grpc.aio.ServicerContext) -> pb.StepResponse:
        """One step for each of many sessions."""
        async def body(p: Principal) -> pb.StepResponse:
            results = await self.sessions.step_many(p.tenant, list(request.steps), self._deadline(context))
            return pb.StepResponse(results=results)

        return await self._call("Step", request, context, True, body)

    async def StepBatch(self, request: pb.StepBatchRequest, context: grpc.aio.ServicerContext
                        ) -> pb.StepBatchResponse:
        """One step for each of many sessions, columnar both ways."""
        async def body(p: Principal) -> pb.StepBatchResponse:
            return await self.sessions.step_batch(p.tenant, request, self._deadline(context))

        return await self._call("StepBatch", request, context, True, body)

    async def CloseSession(self, request: pb.CloseSessionRequest, context: grpc.aio.ServicerContext
                           ) -> pb.CloseSessionResponse:
        """Close a session and delete its durable state."""
        async def body(p: Principal) -> pb.CloseSessionResponse:
            return pb.CloseSessionResponse(step=await self.sessions.close(p.tenant, request.session_id))

        return await self._call("CloseSession", request, context, True, body)

    async def GetSession(self, request: pb.GetSessionRequest, context: grpc.aio.ServicerContext
                         ) -> pb.GetSessionResponse:
        """Retention snapshot."""
        async def body(p: Principal) -> pb.GetSessionResponse:
            return await self.sessions.describe(p.tenant, request.session_id, request.include_weights)

        return await self._call("GetSession", request, context, False, body)

    async def Resync(self, request: pb.ResyncRequest, context: grpc.aio.ServicerContext) -> pb.ResyncResponse:
        """Re-seed a session from the worker's retained positions and step."""
        async def body(p: Principal) -> pb.ResyncResponse:
            given = codec.config_from_proto(request.config, self.sessions.settings.default_policy) \
                if request.HasField("config") else None
            hs, seeded, before = await self.sessions.resync(p.tenant, request.session_id, given, request.step,
                                                            list(request.retained))
            return pb.ResyncResponse(session_id=hs.session_id, config=codec.config_to_proto(hs.cfg), step=hs.step,
                                     retained_count=hs.count, retained_checksum=hs.checksum, known=seeded.known,
                                     admitted=seeded.admitted, previous_step=before)

        return await self._call("Resync", request, context, True, body)

    async def ListPolicies(self, request: pb.ListPoliciesRequest, context: grpc.aio.ServicerContext
                           ) -> pb.ListPoliciesResponse:
        """Registered policies with their default configs."""
        async def body(p: Principal) -> pb.ListPoliciesResponse:
            infos = []
            for name, cls in sorted(POLICIES.items()):
                cfg = PolicyConfig(policy=name).validate()
                infos.append(pb.PolicyInfo(name=name, description=cls.description,
                                           defaults=codec.config_to_proto(cfg)))
            return pb.ListPoliciesResponse(policies=infos)

        return await self._call("ListPolicies", request, context, False, body)
