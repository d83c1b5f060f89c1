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


class DryRunDevice(BaseModel):
    device_id: str
    why: str  # for a skipped device, the reason; for a targeted one, anything to know


class DryRunPublic(BaseModel):
    """What a deployment would do, without doing it."""

    model: str
    version: int
    package_digest: str | None  # None: the version has no package yet (built on deploy)
    package_bytes: int  # the package's size, or an estimate from its files before it is built
    targeted: list[DryRunDevice]
    skipped: list[DryRunDevice]
    bytes_from_hub: int  # each chunk published once; the broker fans it out
    bytes_to_devices: int  # what the targeted devices download between them
