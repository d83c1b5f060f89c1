"""Deployment API shapes."""

from datetime import datetime

from pydantic import BaseModel, Field, model_validator

from agent.protocol.documents import CollectPolicy
from hub.deployments.policy import RolloutPolicy
from hub.devices.schemas import GroupName
from hub.registry.models import MAX_VERSION


class DeploymentCreate(BaseModel):
    model: str
    version: int | None = Field(default=None, ge=1, le=MAX_VERSION)  # None: the latest version
    devices: list[str] = Field(default_factory=list, max_length=10_000)
    # Tag selector, e.g. "site=plant-3,hw=rpi4": every device carrying all of them (and the
    # devices named in ``devices``).
    selector: str | None = Field(default=None, max_length=1000)
    # Named device groups (see PATCH /api/v1/devices/{id}).
    groups: list[GroupName] = Field(default_factory=list, max_length=100)
    # Devices not active or failed this long after their release end timed_out.
    device_timeout_s: int = Field(default=3600, ge=1, le=30 * 24 * 3600)
    policy: RolloutPolicy = Field(default_factory=RolloutPolicy)
    # When two deployments name the same device and model, the higher priority wins.
    priority: int = Field(default=0, ge=-1000, le=1000)
    # Also reach devices that match the selector or groups later (enrolled or re-tagged).
    continuous: bool = False
    # Also reach devices where this version failed before (marked bad there).
    retry_bad: bool = False
    # Sample the devices' scoring calls (inputs, outputs, latency) back to the hub; None: no
    # data collection. Each released device gets it in its desired state.
    data_collection: CollectPolicy | None = None

    @model_validator(mode="after")
    def _has_a_target(self) -> "DeploymentCreate":
        if not self.devices and not self.selector and not self.groups:
            raise ValueError("name the target: devices, a tag selector, groups, or several")
        if self.continuous and not self.selector and not self.groups:
            raise ValueError("a continuous deployment needs a selector or groups to follow")
        return self


class DeploymentDevicePublic(BaseModel):
    device_id: str
    state: str  # hub.deployments.models.DeviceState
    wave: int
    step: str  # the device's last reported step
    reason: str | None
    detail: str
    progress: float | None
    released_at: datetime | None
    activated_at: datetime | None
    state_changed_at: datetime
    updated_at: datetime


class WavePublic(BaseModel):
    index: int
    name: str  # "canary", "wave 1", ...
    devices: int
    counts: dict[str, int]  # devices per state
    released: bool  # the rollout has reached this wave
    finished: bool  # none of its devices is pending, installing or soaking


class DeploymentPublic(BaseModel):
    id: str
    model: str
    version: int
    package_digest: str
    created_at: datetime
    created_by: str
    state: str  # hub.deployments.models.RolloutState
    state_reason: str
    finished_at: datetime | None
    policy: RolloutPolicy
    data_collection: CollectPolicy | None
    priority: int
    continuous: bool
    selector: str | None
    groups: list[str]
    device_timeout_s: int
    current_wave: int
    waves: list[WavePublic]
    total: int  # devices in the deployment
    counts: dict[str, int]  # devices per state
    steps: dict[str, int]  # devices still installing, per reported step
    devices: list[DeploymentDevicePublic] | None  # None when left out (?devices=false)
    done: bool  # nothing is left to happen: the rollout ended and no device is still moving
    ok: bool  # done, and no device failed, timed out or was rolled back


class DeploymentSummary(BaseModel):
    id: str
    model: str
    version: int
    state: str
    state_reason: str
    priority: int
    continuous: bool
    created_at: datetime
    created_by: str
    total: int
    counts: dict[str, int]


class AuditPublic(BaseModel):
    at: datetime
    actor: str
    action: str
    detail: str


class ControlRequest(BaseModel):
    """The body of pause, resume, promote, abort and rollback (all optional)."""

    reason: str = Field(default="", max_length=500)
    # abort: also roll back the devices already updated (default: the policy's choice).
    rollback: bool | None = None
    # promote: release every remaining wave, not only the next.
    all_waves: bool = False


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
    waves: list[int]  # devices per wave, the canary first when the policy has one
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
