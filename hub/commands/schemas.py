"""Device-command API shapes: one create body per action (chosen by ``action``), each with its
own typed arguments, so a bad argument is refused naming its field (``logs.args.tail``)."""

from datetime import datetime
from typing import Annotated, Any, Literal, get_args

from pydantic import AwareDatetime, BaseModel, ConfigDict, Field

from agent.protocol.documents import utc_iso
from agent.protocol.messages import MAX_LOG_ENTRIES

DEFAULT_TTL_S = 60
# A command is for now; a day covers "fetch the logs when the device is back from the night".
MAX_TTL_S = 24 * 3600
MIN_TTL_S = 5  # expiry is signed in whole seconds and judged on the device's clock
LogLevel = Literal["debug", "info", "warning", "error", "critical"]
LOG_LEVELS: tuple[str, ...] = get_args(LogLevel)

TtlSeconds = Annotated[
    int,
    Field(
        ge=MIN_TTL_S,
        le=MAX_TTL_S,
        description="seconds the device may still run it; pending past that, it is expired",
    ),
]


WireArgs = dict[str, str | int | float | bool | None]


class _Args(BaseModel):
    # A misspelt argument is refused rather than silently ignored by the device.
    model_config = ConfigDict(extra="forbid", frozen=True)

    def wire(self) -> WireArgs:
        """The arguments as the signed command carries them; unset ones left out."""
        return self.model_dump(mode="json", exclude_none=True)


class LogsArgs(_Args):
    tail: int = Field(default=100, ge=1, le=MAX_LOG_ENTRIES, description="newest N entries")
    since: AwareDatetime | None = Field(default=None, description="only entries from this time")
    level: LogLevel | None = Field(default=None, description="only entries at this level or above")

    def wire(self) -> WireArgs:
        args = super().wire()
        if self.since is not None:
            # The one time format of signed documents (UTC, seconds, Z), whatever offset came in.
            args["since"] = utc_iso(self.since)
        return args


class PingArgs(_Args):
    pass


# The actions are agent.protocol.documents.CommandAction values, written as plain strings so
# that a refusal lists them as such ("expected tags: 'logs', 'ping'").
class LogsCommandCreate(BaseModel):
    action: Literal["logs"]
    args: LogsArgs = Field(default_factory=LogsArgs)
    ttl_s: TtlSeconds = DEFAULT_TTL_S


class PingCommandCreate(BaseModel):
    action: Literal["ping"]
    args: PingArgs = Field(default_factory=PingArgs)
    ttl_s: TtlSeconds = DEFAULT_TTL_S


CommandCreate = Annotated[LogsCommandCreate | PingCommandCreate, Field(discriminator="action")]


class CommandSummary(BaseModel):
    """A command without its result (lists)."""

    id: str
    device_id: str
    seq: int
    action: str
    args: dict[str, Any]
    state: str  # hub.commands.models.CommandState
    reason: str | None
    detail: str
    created_by: str
    created_at: datetime
    expires_at: datetime
    sent_at: datetime | None
    sent_count: int
    completed_at: datetime | None
    # From the last publish to the answer being stored, as the hub saw it.
    round_trip_ms: float | None


class CommandPublic(CommandSummary):
    # The device's answer; for logs an agent.protocol.messages.LogsResult.
    result: dict[str, Any] | None
