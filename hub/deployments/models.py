"""Deployment tables: deployments, per-device progress, each device's desired packages and the
progress events devices send."""

from datetime import datetime

from sqlalchemy import UniqueConstraint
from sqlmodel import Field, SQLModel

from hub.database import UTCDateTime, utcnow


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


# Set by the hub, not sent by devices: the device never answered in time.
TIMED_OUT = "timed_out"


class DeploymentDevice(SQLModel, table=True):
    __tablename__ = "deployment_device"
    __table_args__ = (UniqueConstraint("deployment_id", "device_id", name="uq_deployment_device"),)

    id: int | None = Field(default=None, primary_key=True)
    deployment_id: str = Field(foreign_key="deployment.id", index=True, max_length=40)
    device_id: str = Field(foreign_key="device.id", index=True, max_length=63)
    step: str = Field(default="queued", max_length=32)
    reason: str | None = Field(default=None, max_length=32)
    detail: str = ""
    progress: float | None = None
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
