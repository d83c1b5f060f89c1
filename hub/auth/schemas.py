"""API shapes for tokens and the audit log."""

from datetime import datetime

from pydantic import BaseModel, ConfigDict, Field

from hub.auth.roles import Role

NAME_PATTERN = r"^[A-Za-z0-9][A-Za-z0-9._@-]{0,63}$"
MAX_TTL_DAYS = 3650


class ApiTokenCreate(BaseModel):
    model_config = ConfigDict(extra="forbid")

    name: str = Field(pattern=NAME_PATTERN, description="what uses it: ci, grafana, alice")
    role: Role
    ttl_days: int | None = Field(
        default=None, ge=1, le=MAX_TTL_DAYS, description="days until it expires; null: never"
    )


class ApiTokenPublic(BaseModel):
    """A token as listed: never the token or its hash."""

    model_config = ConfigDict(from_attributes=True)

    id: str
    name: str
    role: Role
    created_at: datetime
    created_by: str
    expires_at: datetime | None
    revoked_at: datetime | None
    last_used_at: datetime | None


class ApiTokenCreated(ApiTokenPublic):
    token: str = Field(description="the bearer token; shown this once, not stored by the hub")


class AuditEntryPublic(BaseModel):
    model_config = ConfigDict(from_attributes=True)

    id: int
    at: datetime
    method: str
    path: str
    route: str
    status_code: int
    token_id: str | None
    token_name: str
    role: str
    actor: str
    client: str
