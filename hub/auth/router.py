"""Token routes under /api/v1/tokens and the audit log at /api/v1/audit (admin only, by
``hub.auth.policy``)."""

from typing import Annotated

from fastapi import APIRouter, Path, Query
from pydantic import AwareDatetime

from hub.auth import audit, tokens
from hub.auth.schemas import ApiTokenCreate, ApiTokenCreated, ApiTokenPublic, AuditEntryPublic
from hub.database import utcnow
from hub.dependencies import AuthDep, PrincipalDep, SessionDep

router = APIRouter(prefix="/api/v1", tags=["security"], dependencies=[AuthDep])

TokenId = Annotated[str, Path(pattern=tokens.TOKEN_ID_PATTERN.pattern)]


@router.post("/tokens", status_code=201)
def create_token(
    session: SessionDep, principal: PrincipalDep, body: ApiTokenCreate
) -> ApiTokenCreated:
    """A new API token with a role; the token is in this answer only."""
    row, token = tokens.create_token(
        session=session,
        name=body.name,
        role=body.role,
        ttl_days=body.ttl_days,
        created_by=principal.label,
        now=utcnow(),
    )
    return ApiTokenCreated(**ApiTokenPublic.model_validate(row).model_dump(), token=token)


@router.get("/tokens")
def list_tokens(session: SessionDep, revoked: bool = False) -> list[ApiTokenPublic]:
    """API tokens, newest first; ``?revoked=true`` includes revoked ones."""
    rows = tokens.list_tokens(session=session, include_revoked=revoked)
    return [ApiTokenPublic.model_validate(r) for r in rows]


@router.post("/tokens/{token_id}/revoke")
def revoke_token(session: SessionDep, token_id: TokenId) -> ApiTokenPublic:
    """Refuse the token from now on; 409 if it was revoked already."""
    row = tokens.revoke_token(session=session, token_id=token_id, now=utcnow())
    return ApiTokenPublic.model_validate(row)


@router.get("/audit")
def audit_log(
    session: SessionDep,
    since: Annotated[AwareDatetime | None, Query(description="from (with a time zone)")] = None,
    until: Annotated[AwareDatetime | None, Query(description="before (with a time zone)")] = None,
    token_id: Annotated[str | None, Query(max_length=16)] = None,
    method: Annotated[str | None, Query(pattern=r"^(?i:POST|PUT|PATCH|DELETE)$")] = None,
    status_code: Annotated[int | None, Query(ge=100, le=599)] = None,
    refused: Annotated[
        bool | None, Query(description="only 401/403 (true) or none (false)")
    ] = None,
    path: Annotated[str | None, Query(max_length=512, description="path prefix")] = None,
    limit: Annotated[int, Query(ge=1, le=10_000)] = 100,
) -> list[AuditEntryPublic]:
    """Mutating calls, newest first: who (token id, name, role, claimed actor), when, method,
    path, status and client address. Request bodies and credentials are never recorded."""
    rows = audit.list_entries(
        session=session,
        since=since,
        until=until,
        token_id=token_id,
        method=method,
        status_code=status_code,
        refused=refused,
        path_prefix=path,
        limit=limit,
    )
    return [AuditEntryPublic.model_validate(r) for r in rows]
