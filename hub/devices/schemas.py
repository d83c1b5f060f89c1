"""Device and enrolment API shapes."""

from datetime import datetime
from typing import Any

from pydantic import BaseModel, Field


class TokenCreate(BaseModel):
    uses: int = Field(default=1, ge=1, le=100_000)
    ttl_s: int = Field(default=24 * 3600, ge=60, le=365 * 24 * 3600)


class TokenCreated(BaseModel):
    token: str  # shown once; the hub keeps only its hash
    expires_at: datetime
    uses: int


class EnrollRequest(BaseModel):
    token: str = Field(min_length=1, max_length=256)
    name: str | None = Field(default=None, max_length=255)
    device_class: str = "generic"


class BrokerCredentials(BaseModel):
    host: str
    port: int
    username: str
    password: str


class EnrollResponse(BaseModel):
    device_id: str
    broker: BrokerCredentials
    topic_root: str
    root_public_key: str  # base64 of the raw Ed25519 root key the device pins
    keyring: dict[str, Any]  # the root-signed keyring, {"signed": ..., "signatures": [...]}


class DevicePublic(BaseModel):
    id: str
    name: str | None
    device_class: str
    enrolled_at: datetime
    online: bool
    last_seen: datetime | None
    desired_counter: int
    reported_state: dict[str, Any] | None
