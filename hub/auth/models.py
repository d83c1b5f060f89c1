"""The API-token and audit-log tables."""

from datetime import datetime

from sqlmodel import Field, SQLModel

from hub.database import UTCDateTime, utcnow


class ApiToken(SQLModel, table=True):
    """A bearer token for the API. Only the SHA-256 of the token is kept: the token carries
    256 random bits, so a plain hash cannot be reversed, and a database leak lets no one in."""

    __tablename__ = "api_token"

    # The public part of the token ("opt_<id>_<secret>"): names it in lists, the audit log
    # and ``token revoke``, and finds its row without comparing every hash.
    id: str = Field(primary_key=True, max_length=16)
    name: str = Field(max_length=64)
    role: str = Field(max_length=16)
    token_hash: str = Field(max_length=64)
    created_at: datetime = Field(default_factory=utcnow, sa_type=UTCDateTime)
    # Who created it (a token id and name, or "admin.token").
    created_by: str = Field(default="", max_length=255)
    expires_at: datetime | None = Field(default=None, sa_type=UTCDateTime)
    revoked_at: datetime | None = Field(default=None, sa_type=UTCDateTime)
    # Updated at most once a minute, so reads do not each cost a write.
    last_used_at: datetime | None = Field(default=None, sa_type=UTCDateTime)


class AuditEntry(SQLModel, table=True):
    """One mutating API call (POST, PUT, PATCH, DELETE), allowed or refused. Never the body,
    the query string or a credential: only who, when, what and how it ended."""

    __tablename__ = "audit_entry"

    id: int | None = Field(default=None, primary_key=True)
    at: datetime = Field(default_factory=utcnow, sa_type=UTCDateTime, index=True)
    method: str = Field(max_length=8)
    path: str = Field(max_length=512)
    # The route's template ("/api/v1/deployments/{deployment_id}/pause"); "" for no route.
    route: str = Field(default="", max_length=255)
    status_code: int
    # The token presented: its id when it had a well-formed one (even a refused one: who
    # was trying), "admin.token" for the data directory's token, None for none.
    token_id: str | None = Field(default=None, max_length=16, index=True)
    token_name: str = Field(default="", max_length=64)
    role: str = Field(default="", max_length=16)  # "" when not authenticated
    # What the X-Outpost-Actor header claimed ("alice@laptop"): informative, not proven.
    actor: str = Field(default="", max_length=255)
    client: str = Field(default="", max_length=64)  # the peer's address
