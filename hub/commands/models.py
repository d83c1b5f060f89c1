"""The device-command table: one row per one-off command sent to a device (logs, ping).

A command's ``seq`` comes from the device row's ``command_seq`` counter, so it is unique per
device and rises in the order commands were created; the agent runs a command only if its seq is
above the last one it ran. There is no foreign key to ``device`` (as for telemetry): commands
are a log, and must not stand in the way of removing a device.
"""

from datetime import datetime
from enum import StrEnum
from typing import Any

from sqlalchemy import JSON, Column, UniqueConstraint
from sqlmodel import Field, SQLModel

from hub.database import UTCDateTime, utcnow


class CommandState(StrEnum):
    """pending → succeeded | failed | expired; an expired command still takes a late answer
    (the device judged the expiry by its own clock and ran it), a finished one never changes."""

    PENDING = "pending"  # sent (or waiting for the device to come online), no answer yet
    SUCCEEDED = "succeeded"  # the device ran it and sent its result
    FAILED = "failed"  # the device refused it or failed running it (reason, detail)
    EXPIRED = "expired"  # no answer before its expiry


FINISHED = frozenset({CommandState.SUCCEEDED, CommandState.FAILED})
# The states a device's answer may still move a command out of.
ANSWERABLE = frozenset({CommandState.PENDING, CommandState.EXPIRED})


class DeviceCommand(SQLModel, table=True):
    __tablename__ = "device_command"
    # Also the index for a device's commands (device_id leads).
    __table_args__ = (UniqueConstraint("device_id", "seq", name="uq_device_command_seq"),)

    id: str = Field(primary_key=True, max_length=32)  # uuid4 hex; the command_id on the wire
    device_id: str = Field(max_length=63)
    seq: int
    action: str = Field(max_length=32)
    # The arguments exactly as signed (agent.protocol.documents.Command.args).
    args: dict[str, Any] = Field(default_factory=dict, sa_column=Column(JSON, nullable=False))
    state: str = Field(default=CommandState.PENDING, max_length=16)
    reason: str | None = Field(default=None, max_length=32)  # a Reason code when it failed
    detail: str = ""
    # What the device answered (for logs: agent.protocol.messages.LogsResult); None until then.
    result: dict[str, Any] | None = Field(default=None, sa_column=Column(JSON))
    created_by: str = Field(default="", max_length=255)
    # created_at (the document's issued_at) and expires_at are whole seconds, as the signed
    # document carries them: the hub then judges the expiry at the instant the device does.
    created_at: datetime = Field(default_factory=utcnow, sa_type=UTCDateTime)
    expires_at: datetime = Field(sa_type=UTCDateTime)
    # The last time the hub published it, and how often: the round trip counts from the last.
    sent_at: datetime | None = Field(default=None, sa_type=UTCDateTime)
    sent_count: int = 0
    completed_at: datetime | None = Field(default=None, sa_type=UTCDateTime)
