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
from nexus_sidecar.server.checkpoint import load
from nexus_sidecar.server.errors import SessionNotFound, http_status, to_status
from nexus_sidecar.server.stores import validate_id
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
        summary = await _summary(sidecar, caller.tenant, session_id)
    except Exception as exc:
        return _html_error(exc)
    calls = sidecar.sessions.history.calls(caller.tenant, session_id)
    return HTMLResponse(page(summary, calls, history_sessions=sidecar.settings.ui_history_sessions))


async def _summary(sidecar: Sidecar, tenant: str, session_id: str) -> SessionSummary:
    """The page header: from the hot session, or else from its checkpoint in the store.

    Looking must not move a session: resuming it here (as a step or GetSession would) could take it
    from the replica that steps it, so a session that is not hot here is read from the store only.
    """
    validate_id("session_id", session_id)
    if any(hs.session_id == session_id for hs in sidecar.sessions.hot_sessions(tenant)):
        snap = await sidecar.sessions.describe(tenant, session_id)
        hs = await sidecar.sessions.get(tenant, session_id)
        return SessionSummary(tenant=tenant, session_id=session_id, step=snap.step, policy=hs.cfg.policy,
                              config=hs.cfg.to_dict(), groups=hs.cfg.groups, retained=snap.retained_count,
                              tokens_seen=snap.tokens_seen, tokens_evicted=snap.tokens_evicted)
    stored = await sidecar.store.get(tenant, session_id)
    if stored is None:
        raise SessionNotFound(session_id)
    cp = load(stored.blob, stored.delta).checkpoint
    st = cp.state
    return SessionSummary(tenant=tenant, session_id=session_id, step=cp.step, policy=st.config.policy,
                          config=st.config.to_dict(), groups=st.config.groups,
                          retained=sum(g.pos.numel() for g in st.groups), tokens_seen=st.tokens_seen,
                          tokens_evicted=st.tokens_evicted, source=f"the store's checkpoint at step {cp.step} "
                          "(not live on this replica: its recent calls are drawn by the replica that steps it)")
