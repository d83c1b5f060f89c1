"""Deployment API shapes."""

from datetime import datetime

from pydantic import BaseModel, Field


class DeploymentCreate(BaseModel):
    model: str
    version: int | None = Field(default=None, ge=1)  # None: the latest version
    devices: list[str] = Field(min_length=1, max_length=10_000)
    # Devices not active or failed this long after the start end timed_out.
    device_timeout_s: int = Field(default=3600, ge=1, le=30 * 24 * 3600)


class DeploymentDevicePublic(BaseModel):
    device_id: str
    step: str
    reason: str | None
    detail: str
    progress: float | None
    updated_at: datetime


class DeploymentPublic(BaseModel):
    id: str
    model: str
    version: int
    package_digest: str
    created_at: datetime
    devices: list[DeploymentDevicePublic]
    counts: dict[str, int]  # devices per step
    done: bool  # every device is active or failed
    ok: bool  # done and every device is active
