"""The audit log: every mutating API call, recorded by an ASGI middleware so that no route can
forget it, with who called (from ``hub.dependencies.require_role``), the status it got, when,
and from where. Refused calls (401, 403, 422, 404) are recorded like the others.

The entry is written after the response is sent: its status is known only then. If writing it
fails the error is logged; the caller already has its answer.
"""

import logging
from collections.abc import Sequence
from dataclasses import dataclass
from datetime import datetime

import anyio
from sqlalchemy.engine import Engine
from sqlmodel import Session, col, select
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from hub.auth.models import AuditEntry
from hub.auth.policy import WRITE_METHODS, public_route
from hub.auth.tokens import Principal
from hub.database import utcnow

logger = logging.getLogger(__name__)

NOTE_KEY = "outpost.audit"
_ACTOR_HEADER = b"x-outpost-actor"


@dataclass
class AuditNote:
    """What authentication learnt about the caller, filled in while the request runs."""

    token_id: str | None = None  # the id the presented token claimed, before it was checked
    principal: Principal | None = None  # set once the token was proven


def note_for(scope: Scope) -> AuditNote | None:
    """The request's note, when the request is one that is audited."""
    note = scope.get(NOTE_KEY)
    return note if isinstance(note, AuditNote) else None


def _entry(
    scope: Scope, note: AuditNote, status_code: int, started_at: datetime
) -> AuditEntry | None:
    route = scope.get("route")
    template = str(getattr(route, "path", ""))
    method = str(scope["method"])
    public = public_route(method, template) if template else None
    if public is not None and public.quiet and status_code not in (401, 403):
        return None
    headers = dict(scope.get("headers") or [])
    actor = headers.get(_ACTOR_HEADER, b"").decode("latin-1").strip()
    client = scope.get("client")
    principal = note.principal
    return AuditEntry(
        at=started_at,
        method=method[:8],
        path=str(scope.get("path", ""))[:512],
        route=template[:255],
        status_code=status_code,
        token_id=principal.token_id if principal else note.token_id,
        token_name=principal.name[:64] if principal else "",
        role=str(principal.role) if principal else "",
        actor=actor[:255],
        client=str(client[0])[:64] if client else "",
    )


def _store(engine: Engine, entry: AuditEntry) -> None:
    with Session(engine) as session:
        session.add(entry)
        session.commit()


class AuditMiddleware:
    """Records each POST, PUT, PATCH and DELETE that reaches the app, whatever its outcome."""

    def __init__(self, app: ASGIApp) -> None:
        self.app = app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http" or scope["method"] not in WRITE_METHODS:
            await self.app(scope, receive, send)
            return
        started_at = utcnow()  # when the call was made, not when it ended
        note = AuditNote()
        scope[NOTE_KEY] = note
        # An exception that escapes the app becomes a 500 in the middleware outside this one.
        status_code = 500

        async def send_and_watch(message: Message) -> None:
            nonlocal status_code
            if message["type"] == "http.response.start":
                status_code = int(message["status"])
            await send(message)

        try:
            await self.app(scope, receive, send_and_watch)
        finally:
            entry = _entry(scope, note, status_code, started_at)
            if entry is not None:
                engine: Engine = scope["app"].state.hub.engine
                # Shielded: a client that hangs up must not erase the record of its call.
                with anyio.CancelScope(shield=True):
                    try:
                        await anyio.to_thread.run_sync(_store, engine, entry)
                    except Exception:
                        logger.exception(
                            "audit entry not stored",
                            extra={"method": entry.method, "path": entry.path},
                        )


def list_entries(
    *,
    session: Session,
    since: datetime | None = None,
    until: datetime | None = None,
    token_id: str | None = None,
    method: str | None = None,
    status_code: int | None = None,
    refused: bool | None = None,
    path_prefix: str | None = None,
    limit: int = 100,
) -> Sequence[AuditEntry]:
    """Entries newest first; ``refused``: only 401 and 403 (True) or none of them (False)."""
    query = select(AuditEntry)
    if since is not None:
        query = query.where(col(AuditEntry.at) >= since)
    if until is not None:
        query = query.where(col(AuditEntry.at) < until)
    if token_id is not None:
        query = query.where(col(AuditEntry.token_id) == token_id)
    if method is not None:
        query = query.where(col(AuditEntry.method) == method.upper())
    if status_code is not None:
        query = query.where(col(AuditEntry.status_code) == status_code)
    if refused is not None:
        denied = col(AuditEntry.status_code).in_((401, 403))
        query = query.where(denied if refused else ~denied)
    if path_prefix is not None:
        query = query.where(col(AuditEntry.path).startswith(path_prefix, autoescape=True))
    query = query.order_by(col(AuditEntry.at).desc(), col(AuditEntry.id).desc()).limit(limit)
    return session.exec(query).all()
