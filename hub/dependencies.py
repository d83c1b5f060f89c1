"""FastAPI dependencies, as ``Annotated`` aliases routers use in their signatures."""

import hmac
from collections.abc import Iterator
from typing import Annotated

from fastapi import Depends, Header, Request
from sqlmodel import Session

from hub.context import HubContext
from hub.errors import Unauthorized


def get_context(request: Request) -> HubContext:
    ctx: HubContext = request.app.state.hub
    return ctx


ContextDep = Annotated[HubContext, Depends(get_context)]


def get_session(ctx: ContextDep) -> Iterator[Session]:
    with Session(ctx.engine, expire_on_commit=False) as session:
        yield session


SessionDep = Annotated[Session, Depends(get_session)]


def require_admin(ctx: ContextDep, authorization: Annotated[str | None, Header()] = None) -> None:
    """The admin bearer token from data_dir/admin.token (roles come later)."""
    scheme, _, token = (authorization or "").partition(" ")
    if scheme.lower() != "bearer" or not token:
        raise Unauthorized("missing bearer token")
    if not ctx.admin_token or not hmac.compare_digest(token.encode(), ctx.admin_token.encode()):
        raise Unauthorized("invalid bearer token")


AdminDep = Depends(require_admin)
