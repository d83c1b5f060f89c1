"""API tokens: made, listed, revoked, and a presented token turned into a ``Principal``.

A token reads ``opt_<id>_<secret>``: the id (12 hex digits) is public and names the token, the
secret is 256 random bits. The hub keeps the SHA-256 of the whole token and shows the token
once, when it is made. The data directory's ``admin.token`` stays an admin credential (the CLI
on the hub's machine and scripts use it); it is named "admin.token" wherever a token id goes.
"""

import hashlib
import hmac
import re
import secrets
from collections.abc import Sequence
from dataclasses import dataclass
from datetime import datetime, timedelta

from sqlmodel import Session, col, select

from hub.auth.models import ApiToken
from hub.auth.roles import Role
from hub.errors import Conflict, NotFound, Unauthorized

TOKEN_PREFIX = "opt"  # noqa: S105 (marks a string as an Outpost API token; not a secret)
ADMIN_FILE_ID = "admin.token"
TOKEN_ID_PATTERN = re.compile(r"[0-9a-f]{12}")
_TOKEN_SHAPE = re.compile(rf"{TOKEN_PREFIX}_([0-9a-f]{{12}})_[A-Za-z0-9_-]{{43}}")
# last_used_at is written at most this often per token: a busy read-only client must not turn
# every GET into a database write.
LAST_USED_EVERY = timedelta(minutes=1)


@dataclass(frozen=True)
class Principal:
    """Who is calling: the token's id and name and the role it grants."""

    token_id: str
    name: str
    role: Role

    @property
    def label(self) -> str:
        return f"{self.name} ({self.token_id})"


ADMIN_FILE_PRINCIPAL = Principal(token_id=ADMIN_FILE_ID, name=ADMIN_FILE_ID, role=Role.ADMIN)


def hash_token(token: str) -> str:
    return hashlib.sha256(token.encode("utf-8")).hexdigest()


def claimed_id(token: str) -> str | None:
    """The id part of a token of the right shape (not yet proven), else None."""
    match = _TOKEN_SHAPE.fullmatch(token)
    return match.group(1) if match else None


def create_token(
    *,
    session: Session,
    name: str,
    role: Role,
    ttl_days: int | None,
    created_by: str,
    now: datetime,
) -> tuple[ApiToken, str]:
    """A new token row and the token itself, which is shown once and never stored."""
    token_id = secrets.token_hex(6)
    while session.get(ApiToken, token_id) is not None:  # 48 bits: a clash is rare, not never
        token_id = secrets.token_hex(6)
    token = f"{TOKEN_PREFIX}_{token_id}_{secrets.token_urlsafe(32)}"
    row = ApiToken(
        id=token_id,
        name=name,
        role=role,
        token_hash=hash_token(token),
        created_at=now,
        created_by=created_by[:255],
        expires_at=now + timedelta(days=ttl_days) if ttl_days is not None else None,
    )
    session.add(row)
    session.commit()
    session.refresh(row)
    return row, token


def list_tokens(*, session: Session, include_revoked: bool) -> Sequence[ApiToken]:
    query = select(ApiToken).order_by(col(ApiToken.created_at).desc(), col(ApiToken.id))
    if not include_revoked:
        query = query.where(col(ApiToken.revoked_at).is_(None))
    return session.exec(query).all()


def revoke_token(*, session: Session, token_id: str, now: datetime) -> ApiToken:
    """Revoke at once: the next request with it is refused. Revoking twice is a conflict."""
    row = session.get(ApiToken, token_id)
    if row is None:
        raise NotFound(f"no API token {token_id!r}")
    if row.revoked_at is not None:
        raise Conflict(f"API token {token_id} was revoked at {row.revoked_at.isoformat()}")
    row.revoked_at = now
    session.add(row)
    session.commit()
    session.refresh(row)
    return row


def authenticate(*, session: Session, token: str, admin_token: str, now: datetime) -> Principal:
    """The principal for a presented bearer token, or ``Unauthorized``. Expired and revoked
    are named only once the token itself matched, so a guess learns nothing."""
    if admin_token and hmac.compare_digest(token.encode(), admin_token.encode()):
        return ADMIN_FILE_PRINCIPAL
    token_id = claimed_id(token)
    row = session.get(ApiToken, token_id) if token_id is not None else None
    if row is None or not hmac.compare_digest(hash_token(token), row.token_hash):
        raise Unauthorized("invalid bearer token")
    if row.revoked_at is not None:
        raise Unauthorized(f"API token {row.id} has been revoked")
    if row.expires_at is not None and row.expires_at <= now:
        raise Unauthorized(f"API token {row.id} expired at {row.expires_at.isoformat()}")
    if row.last_used_at is None or now - row.last_used_at >= LAST_USED_EVERY:
        row.last_used_at = now
        session.add(row)
        session.commit()
    return Principal(token_id=row.id, name=row.name, role=Role(row.role))
