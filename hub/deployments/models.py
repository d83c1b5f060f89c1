"""Deployment tables: deployments, per-device progress, each device's desired packages, the
progress events devices send and the operators' actions on deployments."""

from datetime import datetime
from enum import StrEnum
from typing import Any

from sqlalchemy import JSON, Column, UniqueConstraint
from sqlmodel import Field, SQLModel

from hub.database import UTCDateTime, utcnow


class RolloutState(StrEnum):
    RUNNING = "running"  # releasing devices wave by wave
    PAUSED = "paused"  # releasing nothing new; devices already released carry on
    COMPLETED = "completed"  # every wave released and every device finished
    ABORTED = "aborted"  # stopped by an operator or by the failure threshold
    ROLLED_BACK = "rolled_back"  # devices it updated were sent back to what they ran before


ROLLOUT_FINISHED = frozenset(
    {RolloutState.COMPLETED, RolloutState.ABORTED, RolloutState.ROLLED_BACK}
)


class DeviceState(StrEnum):
    """Where one device stands in one deployment, as the hub judges it (the device's own last
    reported step is kept beside it)."""

    PENDING = "pending"  # in a wave not released yet: nothing was sent to the device
    IN_PROGRESS = "in_progress"  # released: its desired state names the package
    SOAKING = "soaking"  # running the package; must stay healthy for the soak time
    SUCCEEDED = "succeeded"  # running the package and healthy through the soak time
    FAILED = "failed"  # the device failed the package (it kept what it ran before)
    TIMED_OUT = "timed_out"  # not done within the deployment's device timeout
    ROLLING_BACK = "rolling_back"  # sent back to what it ran before the deployment
    ROLLED_BACK = "rolled_back"  # confirmed back on what it ran before
    CANCELLED = "cancelled"  # never released: the rollout was aborted first
    SKIPPED = "skipped"  # not eligible when targeted (already on it, incompatible, marked bad)
    OVERRIDDEN = "overridden"  # a deployment of higher priority owns this device's model
    SUPERSEDED = "superseded"  # a later deployment of the same model took the device over


# Rows in these states never change again (a late event must not reopen them).
DEVICE_FINISHED = frozenset(
    {
        DeviceState.SUCCEEDED,
        DeviceState.FAILED,
        DeviceState.TIMED_OUT,
        DeviceState.ROLLED_BACK,
        DeviceState.CANCELLED,
        DeviceState.SKIPPED,
        DeviceState.OVERRIDDEN,
        DeviceState.SUPERSEDED,
    }
)
# What the failure threshold counts.
DEVICE_FAILURES = frozenset({DeviceState.FAILED, DeviceState.TIMED_OUT})


class Deployment(SQLModel, table=True):
    __tablename__ = "deployment"

    id: str = Field(primary_key=True, max_length=40)
    model: str = Field(index=True, max_length=63)
    version: int
    package_digest: str = Field(foreign_key="package.digest", max_length=64)
    created_at: datetime = Field(default_factory=utcnow, sa_type=UTCDateTime)
    # A device that is neither active nor failed this long after the deployment started ends
    # timed_out: no device stays "in progress" forever (hawkBit #693, Greengrass #1203).
    device_timeout_s: int = Field(default=3600, sa_column_kwargs={"server_default": "3600"})
    state: str = Field(default=RolloutState.RUNNING, max_length=16, index=True)
    # Why the rollout is in its state: "failure threshold: 3 of 10 failed", "aborted by ...".
    state_reason: str = ""
    # hub.deployments.policy.RolloutPolicy as JSON; {} is one wave of every device at once.
    policy: dict[str, Any] = Field(default_factory=dict, sa_column=Column(JSON, nullable=False))
    # The wave being released (0 is the canary when the policy has one).
    current_wave: int = 0
    waves: int = 1  # how many waves the target was split into
    # Layered deployments: a device's model follows the deployment of the highest priority.
    priority: int = 0
    # A continuous deployment also reaches devices that match its target later.
    continuous: bool = False
    selector: str | None = Field(default=None, max_length=1000)
    groups: list[str] = Field(default_factory=list, sa_column=Column(JSON, nullable=False))
    # Also reach devices where this version failed before (marked bad there).
    retry_bad: bool = False
    # agent.protocol.documents.CollectPolicy as JSON, put into each released device's desired
    # state; None: the devices collect nothing for this deployment.
    data_collection: dict[str, Any] | None = Field(default=None, sa_column=Column(JSON))
    created_by: str = Field(default="", max_length=255)
    updated_at: datetime = Field(default_factory=utcnow, sa_type=UTCDateTime)
    finished_at: datetime | None = Field(default=None, sa_type=UTCDateTime)
    # Hub replicas: only the holder of an unexpired lease advances this rollout.
    lease_owner: str | None = Field(default=None, max_length=64)
    lease_expires_at: datetime | None = Field(default=None, sa_type=UTCDateTime)


class DeploymentDevice(SQLModel, table=True):
    __tablename__ = "deployment_device"
    __table_args__ = (UniqueConstraint("deployment_id", "device_id", name="uq_deployment_device"),)

    id: int | None = Field(default=None, primary_key=True)
    deployment_id: str = Field(foreign_key="deployment.id", index=True, max_length=40)
    device_id: str = Field(foreign_key="device.id", index=True, max_length=63)
    state: str = Field(default=DeviceState.PENDING, max_length=16, index=True)
    wave: int = 0
    # The device's last reported step (queued until it reports one).
    step: str = Field(default="queued", max_length=32)
    reason: str | None = Field(default=None, max_length=32)
    detail: str = ""
    progress: float | None = None
    # The package the device's desired state named for this model before the release: what a
    # rollback sends it back to. None: the model was new there, so a rollback removes it.
    previous_digest: str | None = Field(default=None, max_length=64)
    released_at: datetime | None = Field(default=None, sa_type=UTCDateTime)
    activated_at: datetime | None = Field(default=None, sa_type=UTCDateTime)
    # When ``state`` last changed: the device timeout counts from here.
    state_changed_at: datetime = Field(default_factory=utcnow, sa_type=UTCDateTime)
    updated_at: datetime = Field(default_factory=utcnow, sa_type=UTCDateTime)


class DeviceDesired(SQLModel, table=True):
    """The package a device should run for one model name; one row per (device, model)."""

    __tablename__ = "device_desired"

    device_id: str = Field(foreign_key="device.id", primary_key=True, max_length=63)
    model: str = Field(primary_key=True, max_length=63)
    package_digest: str = Field(foreign_key="package.digest", max_length=64)
    deployment_id: str = Field(foreign_key="deployment.id", max_length=40)
    updated_at: datetime = Field(default_factory=utcnow, sa_type=UTCDateTime)


class DeviceEvent(SQLModel, table=True):
    """A deployment progress event as the device sent it; (device_id, seq) drops duplicates."""

    __tablename__ = "device_event"
    __table_args__ = (UniqueConstraint("device_id", "seq", name="uq_device_event_seq"),)

    id: int | None = Field(default=None, primary_key=True)
    device_id: str = Field(foreign_key="device.id", index=True, max_length=63)
    seq: int
    deployment_id: str = Field(max_length=40)
    model: str = Field(max_length=63)
    version: int
    digest: str = Field(max_length=64)
    step: str = Field(max_length=32)
    reason: str | None = Field(default=None, max_length=32)
    detail: str = ""
    progress: float | None = None
    sent_at: datetime = Field(sa_type=UTCDateTime)
    received_at: datetime = Field(default_factory=utcnow, sa_type=UTCDateTime)


class DeploymentAudit(SQLModel, table=True):
    """Who did what to a deployment, and what the rollout did by itself (actor "rollout")."""

    __tablename__ = "deployment_audit"

    id: int | None = Field(default=None, primary_key=True)
    deployment_id: str = Field(foreign_key="deployment.id", index=True, max_length=40)
    at: datetime = Field(default_factory=utcnow, sa_type=UTCDateTime)
    actor: str = Field(max_length=255)
    action: str = Field(max_length=32)
    detail: str = ""
