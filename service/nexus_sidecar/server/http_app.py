"""The HTTP side port (FastAPI): health, readiness, Prometheus metrics, tenant-scoped admin.

Same credentials as gRPC (``Authorization: Bearer <key>``); a tenant only ever sees its own
sessions. The OpenAPI spec is served at ``/openapi.json`` (and ``/docs``).
"""

from __future__ import annotations

import asyncio
from typing import TYPE_CHECKING, Annotated, Any

from fastapi import Depends, FastAPI, Header, Request
from fastapi.responses import JSONResponse, Response
from nexus_client.wire import WireError, tensor_from_proto
from prometheus_client import CONTENT_TYPE_LATEST, generate_latest
from pydantic import BaseModel

from nexus_sidecar.engine import EngineError
from nexus_sidecar.server.auth import Principal
from nexus_sidecar.server.errors import (
    Draining,
    ServiceError,
    Unauthenticated,
    forget_frames,
    http_status,
    to_status,
)
from nexus_sidecar.server.stores import StoreError
from nexus_sidecar.server.ui import router as ui_router

if TYPE_CHECKING:
    from nexus_sidecar.server.app import Sidecar


class GroupView(BaseModel):
    """One layer group's retention."""

    group: int
    retained: int
    positions: list[int]
    weight_min: float
    weight_max: float
    weight_mean: float
    weight_p50: float
    weight_p90: float


class SessionView(BaseModel):
    """Retention snapshot of a session."""

    session_id: str
    tenant: str
    step: int
    policy: str
    config: dict[str, Any]
    tokens_seen: int
    tokens_evicted: int
    retained: int
    groups: list[GroupView]


class SessionList(BaseModel):
    """A tenant's sessions (hot or checkpointed)."""

    tenant: str
    sessions: list[str]


class Closed(BaseModel):
    """Result of a DELETE."""

    session_id: str
    step: int


def _principal(request: Request, authorization: Annotated[str | None, Header()] = None) -> Principal:
    """The caller, from the same API keys as gRPC."""
    return request.app.state.sidecar.keys.authenticate(authorization)


Caller = Annotated[Principal, Depends(_principal)]


def build_app(sidecar: Sidecar) -> FastAPI:
    """The FastAPI app bound to a running sidecar."""
    app = FastAPI(title="Nexus eviction sidecar", version="1.0",
                  description="Health, metrics and tenant-scoped session inspection of the eviction sidecar.")
    app.state.sidecar = sidecar
    app.include_router(ui_router)  # /ui/sessions/{id}: the retention page (server/ui.py)

    async def _errors(request: Request, exc: Exception) -> JSONResponse:
        code, message = to_status(exc)
        forget_frames(exc)
        return JSONResponse({"error": code.name, "message": message}, status_code=http_status(code))

    # The errors a client can cause, one handler per base class: Starlette answers these in its
    # ExceptionMiddleware (a clean response, the keep-alive connection stays open). A handler for
    # bare Exception runs in ServerErrorMiddleware instead, which re-raises after answering: the
    # "Exception in ASGI application" traceback and a closed connection on every 404.
    for cls in (ServiceError, EngineError, WireError, StoreError):
        app.add_exception_handler(cls, _errors)  # type: ignore[arg-type]
    app.add_exception_handler(Exception, _errors)  # a bug: 500, logged with its traceback

    @app.get("/healthz", summary="Liveness")
    async def healthz() -> dict[str, str]:
        return {"status": "ok"}

    @app.get("/readyz", summary="Readiness: store and device answer, not draining")
    async def readyz() -> JSONResponse:
        report = await sidecar.readiness()
        return JSONResponse(report, status_code=200 if report["ready"] else 503)

    @app.get("/metrics", summary="Prometheus metrics (a valid API key when metrics_require_key)")
    async def metrics(authorization: Annotated[str | None, Header()] = None) -> Response:
        if sidecar.settings.metrics_require_key:
            if sidecar.keys.single_tenant:  # no keys to check against: refuse rather than expose
                raise Unauthenticated("metrics_require_key is set but the server has no keys file")
            sidecar.keys.authenticate(authorization)
        # Rendered off the event loop: a few thousand series take tens of ms (prometheus_client is thread-safe).
        body = await asyncio.to_thread(generate_latest, sidecar.metrics.registry)
        return Response(body, media_type=CONTENT_TYPE_LATEST)

    @app.get("/v1/sessions", response_model=SessionList, summary="The caller's sessions")
    async def list_sessions(caller: Caller) -> SessionList:
        return SessionList(tenant=caller.tenant, sessions=await sidecar.sessions.list_ids(caller.tenant))

    @app.get("/v1/sessions/{session_id}", response_model=SessionView, summary="Retention snapshot")
    async def get_session(session_id: str, caller: Caller) -> SessionView:
        snap = await sidecar.sessions.describe(caller.tenant, session_id)
        hs = await sidecar.sessions.get(caller.tenant, session_id)
        groups = []
        for g in snap.groups:
            pos = tensor_from_proto(g.positions, field="positions").tolist()
            ws = g.weight_summary
            groups.append(GroupView(group=g.group, retained=len(pos), positions=pos, weight_min=ws.min,
                                    weight_max=ws.max, weight_mean=ws.mean, weight_p50=ws.p50, weight_p90=ws.p90))
        return SessionView(session_id=session_id, tenant=caller.tenant, step=snap.step, policy=hs.cfg.policy,
                           config=hs.cfg.to_dict(), tokens_seen=snap.tokens_seen, tokens_evicted=snap.tokens_evicted,
                           retained=snap.retained_count, groups=groups)

    @app.delete("/v1/sessions/{session_id}", response_model=Closed, summary="Close a session")
    async def delete_session(session_id: str, caller: Caller) -> Closed:
        caller.require_write()
        if sidecar.servicer.draining:
            raise Draining()
        return Closed(session_id=session_id, step=await sidecar.sessions.close(caller.tenant, session_id))

    return app
