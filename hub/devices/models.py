"""Device and enrolment-token tables."""

from datetime import datetime
from enum import StrEnum
from typing import Any

from sqlalchemy import JSON, Column
from sqlmodel import Field, SQLModel

from hub.database import UTCDateTime, utcnow


class DeviceStatus(StrEnum):
    """Whether a device may use the broker."""

    ACTIVE = "active"  # enrolled and allowed on the broker
    PENDING = "pending"  # enrolled while approval is required; no broker access until accepted
    DISABLED = "disabled"  # access revoked by an operator; enabling it gives it back


class EnrollmentToken(SQLModel, table=True):
    __tablename__ = "enrollment_token"

    id: int | None = Field(default=None, primary_key=True)
    # Only the hash is kept: a database leak must not let anyone enrol devices.
    token_hash: str = Field(unique=True, max_length=64)
    created_at: datetime = Field(default_factory=utcnow, sa_type=UTCDateTime)
    expires_at: datetime = Field(sa_type=UTCDateTime)
    max_uses: int
    uses: int = 0
    # A token made for one serial number (manufacturing): it enrols that device id only, once.
    device_id: str | None = Field(default=None, max_length=63, index=True)


class Device(SQLModel, table=True):
    __tablename__ = "device"

    id: str = Field(primary_key=True, max_length=63)
    name: str | None = Field(default=None, max_length=255)
    device_class: str = Field(default="generic", max_length=63)
    # Labels such as site=plant-3 that tag-selector deployments match; checked at enrolment.
    tags: dict[str, str] = Field(
        default_factory=dict, sa_column=Column(JSON, nullable=False, server_default="{}")
    )
    # A named group of devices a deployment can target ("line-4", "pilot"); one per device.
    group: str | None = Field(default=None, max_length=63, index=True)
    # The mosquitto $7$ hash; the password itself is shown to the device once, at enrolment.
    password_hash: str
    token_id: int | None = Field(default=None, foreign_key="enrollment_token.id")
    enrolled_at: datetime = Field(default_factory=utcnow, sa_type=UTCDateTime)
    status: str = Field(
        default=DeviceStatus.ACTIVE,
        max_length=16,
        index=True,
        sa_column_kwargs={"server_default": DeviceStatus.ACTIVE.value},
    )
    status_changed_at: datetime | None = Field(default=None, sa_type=UTCDateTime)
    # The counter of the last desired state signed for this device; each publish takes the next.
    desired_counter: int = 0
    # The seq of the last command created for this device (hub.commands); each takes the next.
    command_seq: int = Field(default=0, sa_column_kwargs={"server_default": "0"})
    online: bool = False
    last_seen: datetime | None = Field(default=None, sa_type=UTCDateTime)
    reported_state: dict[str, Any] | None = Field(default=None, sa_column=Column(JSON))
    # Highest event seq such that every event 1..seq is stored; what the ack reports.
    evt_acked_seq: int = 0
