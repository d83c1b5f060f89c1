"""Deployment API shapes."""

from datetime import datetime

from pydantic import BaseModel, Field, model_validator


class DeploymentCreate(BaseModel):
    model: str
    version: int | None = Field(default=None, ge=1)  # None: the latest version
    devices: list[str] = Field(default_factory=list, max_length=10_000)
    # Tag selector, e.g. "site=plant-3,hw=rpi4": every device carrying all of them (and the
    # devices named in ``devices``).
    selector: str | None = Field(default=None, max_length=1000)
    # Devices not active or failed this long after the start end timed_out.
    device_timeout_s: int = Field(default=3600, ge=1, le=30 * 24 * 3600)

    @model_validator(mode="after")
    def _has_a_target(self) -> "DeploymentCreate":
        if not self.devices and not self.selector:
            raise ValueError("name the target: devices, a tag selector, or both")
        return self


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


class DeploymentEventPublic(BaseModel):
    """One progress event a device sent for a deployment, as the hub stored it."""

    device_id: str
    seq: int
    step: str
    reason: str | None
    detail: str
    progress: float | None
    sent_at: datetime
    received_at: datetime
