"""The retention page on the HTTP side port: ``/ui/sessions`` and ``/ui/sessions/{id}``.

Same keys and tenant scoping as the admin API. A browser cannot send a bearer header from the
address bar, so the page also takes HTTP Basic credentials whose password is the API key (any
user name) and answers 401 with a Basic challenge, which makes browsers ask for it.
"""

from __future__ import annotations

import base64
import binascii
from typing import TYPE_CHECKING, Annotated

from fastapi import APIRouter, Header, Request
from fastapi.responses import HTMLResponse

from nexus_sidecar.server.auth import Principal
from nexus_sidecar.server.errors import http_status, to_status
from nexus_sidecar.server.ui_render import SessionSummary, error_page, index_page, page

if TYPE_CHECKING:
    from nexus_sidecar.server.app import Sidecar

router = APIRouter(prefix="/ui", tags=["retention page"])


def bearer_of(authorization: str | None) -> str | None:
    """``Basic base64(user:key)`` -> ``Bearer key``; any other header value is passed on unchanged."""
    if not authorization:
        return authorization
    scheme, _, token = authorization.partition(" ")
    if scheme.lower() != "basic":
        return authorization
    try:
        user_pass = base64.b64decode(token.strip(), validate=True).decode()
    except (binascii.Error, UnicodeDecodeError):
        return "Bearer "  # malformed: refused by the key ring like an empty key
    return "Bearer " + user_pass.partition(":")[2]


def _html_error(exc: Exception) -> HTMLResponse:
    code, message = to_status(exc)
    status = http_status(code)
    headers = {"WWW-Authenticate": 'Basic realm="nexus-sidecar", charset="UTF-8"'} if status == 401 else None
    return HTMLResponse(error_page(status, message), status_code=status, headers=headers)


def _caller(request: Request, authorization: str | None) -> Principal:
    sidecar: Sidecar = request.app.state.sidecar
    return sidecar.keys.authenticate(bearer_of(authorization))


@router.get("/sessions", response_class=HTMLResponse, summary="The caller's sessions, linked to their pages")
async def sessions_index(request: Request, authorization: Annotated[str | None, Header()] = None) -> HTMLResponse:
    """A list of the caller's sessions."""
    try:
        caller = _caller(request, authorization)
        ids = await request.app.state.sidecar.sessions.list_ids(caller.tenant)
    except Exception as exc:
        return _html_error(exc)
    return HTMLResponse(index_page(caller.tenant, ids))


@router.get("/sessions/{session_id}", response_class=HTMLResponse, summary="Retention page of one session")
async def session_page(session_id: str, request: Request,
                       authorization: Annotated[str | None, Header()] = None) -> HTMLResponse:
    """Heatmap of retained positions over the recorded calls, evictions per call, policy config."""
    sidecar: Sidecar = request.app.state.sidecar
    try:
        caller = _caller(request, authorization)
        snap = await sidecar.sessions.describe(caller.tenant, session_id)  # tenant-scoped: NOT_FOUND otherwise
        hs = await sidecar.sessions.get(caller.tenant, session_id)
    except Exception as exc:
        return _html_error(exc)
    summary = SessionSummary(tenant=caller.tenant, session_id=session_id, step=snap.step, policy=hs.cfg.policy,
                             config=hs.cfg.to_dict(), groups=hs.cfg.groups, retained=snap.retained_count,
                             tokens_seen=snap.tokens_seen, tokens_evicted=snap.tokens_evicted)
    calls = sidecar.sessions.history.calls(caller.tenant, session_id)
    return HTMLResponse(page(summary, calls, history_sessions=sidecar.settings.ui_history_sessions))
