"""FastAPI dependencies, as ``Annotated`` aliases routers use in their signatures."""

from collections.abc import Iterator
from typing import Annotated

from fastapi import Depends, Request
from fastapi.security import HTTPAuthorizationCredentials, HTTPBearer
from sqlmodel import Session

from hub.auth import audit, policy, tokens
from hub.auth.roles import Role
from hub.context import HubContext
from hub.database import utcnow
from hub.errors import Forbidden, Unauthorized


def get_context(request: Request) -> HubContext:
    ctx: HubContext = request.app.state.hub
    return ctx


ContextDep = Annotated[HubContext, Depends(get_context)]


def get_session(ctx: ContextDep) -> Iterator[Session]:
    with Session(ctx.engine, expire_on_commit=False) as session:
        yield session


SessionDep = Annotated[Session, Depends(get_session)]

# Declared as a security scheme, so the OpenAPI document says every guarded route takes a
# bearer token; errors are ours (401 with the hub's error body), not FastAPI's.
_bearer = HTTPBearer(
    auto_error=False,
    description="an API token (`outpost-hub token create`) or the hub's admin.token",
)


def require_role(
    request: Request,
    ctx: ContextDep,
    session: SessionDep,
    credentials: Annotated[HTTPAuthorizationCredentials | None, Depends(_bearer)],
) -> tokens.Principal:
    """The caller, if its token is valid and its role may call this route (``hub.auth.policy``
    decides from the method and the route's path template); else 401 or 403."""
    template: str | None = getattr(request.scope.get("route"), "path", None)
    # Without a route (never, for a dependency of one) the strictest rule applies.
    needed = policy.required_role(request.method, template) if template else Role.ADMIN
    if credentials is None:
        raise Unauthorized("missing bearer token (Authorization: Bearer <token>)")
    note = audit.note_for(request.scope)
    if note is not None:
        note.token_id = tokens.claimed_id(credentials.credentials)
    principal = tokens.authenticate(
        session=session, token=credentials.credentials, admin_token=ctx.admin_token, now=utcnow()
    )
    if note is not None:
        note.principal = principal
    if not principal.role.allows(needed):
        raise Forbidden(
            f"{request.method} {template or request.url.path} needs the {needed} "
            f"role; token {principal.token_id} has {principal.role}"
        )
    return principal


PrincipalDep = Annotated[tokens.Principal, Depends(require_role)]
AuthDep = Depends(require_role)
# The name the routers use since the hub had only the admin token; each route's role now
# comes from hub.auth.policy.
AdminDep = AuthDep
