"""Device and enrolment API shapes."""

import re
from datetime import datetime
from typing import Annotated, Any, Self

from pydantic import (
    AfterValidator,
    BaseModel,
    BeforeValidator,
    ConfigDict,
    Field,
    model_validator,
)

from agent.protocol.topics import is_valid_device_id

# Tags select devices for deployments (``site=plant-3,hw=rpi4``), so keys and values stay clear
# of the selector's ``=`` and ``,`` and of anything a shell or URL would need quoting for.
MAX_TAGS = 16
TAG_KEY_PATTERN = re.compile(r"^[a-z][a-z0-9_.-]{0,31}$")
TAG_VALUE_PATTERN = re.compile(r"^[A-Za-z0-9_.:-]{1,64}$")
DEVICE_CLASS_PATTERN = r"^[a-z0-9][a-z0-9._-]{0,62}$"
# Group names are selected on like device classes, so they follow the same lowercase pattern.
GROUP_PATTERN = DEVICE_CLASS_PATTERN
# One bulk request is one transaction and one response body; the simulator's fleets fit.
MAX_BULK_DEVICES = 10_000


# Device ids are broker user names and topic levels (THREATS E3, CVE-2017-7650): nothing a
# broker could read as a wildcard, a separator, a substitution or a system topic gets in.
DEVICE_ID_RULE = (
    "3-63 of a-z 0-9 - starting with a letter or digit"
    " (no + # / % $, upper case, spaces or control characters)"
)


def check_device_id(value: str) -> str:
    """``value`` if it is a valid device id, else ValueError saying what one looks like."""
    if not is_valid_device_id(value):
        shown = repr(value) if len(value) <= 70 else repr(value[:70]) + "..."
        raise ValueError(f"{shown} is not a device id: {DEVICE_ID_RULE}")
    return value


DeviceId = Annotated[str, AfterValidator(check_device_id)]


def check_serials(serials: list[str]) -> list[str]:
    """Refuse a serial given twice: two tokens for one device would both look valid."""
    seen: set[str] = set()
    twice: set[str] = set()
    for serial in serials:
        (twice if serial in seen else seen).add(serial)
    if twice:
        raise ValueError(f"serial numbers given twice: {', '.join(sorted(twice)[:10])}")
    return serials


def check_tags(tags: dict[str, str]) -> dict[str, str]:
    """Refuse more than ``MAX_TAGS`` tags, or a key or value outside its pattern, by name."""
    if len(tags) > MAX_TAGS:
        raise ValueError(f"at most {MAX_TAGS} tags per device, got {len(tags)}")
    for key, value in tags.items():
        if not TAG_KEY_PATTERN.fullmatch(key):
            raise ValueError(
                f"tag key {key!r} must be 1-32 of a-z 0-9 _ . - starting with a letter"
            )
        if not TAG_VALUE_PATTERN.fullmatch(value):
            raise ValueError(
                f"tag {key!r} has value {value!r}; values must be 1-64 of A-Z a-z 0-9 _ . : -"
            )
    return tags


Tags = Annotated[dict[str, str], AfterValidator(check_tags)]
GroupName = Annotated[str, Field(pattern=GROUP_PATTERN)]


def check_fleet_size(devices: Any) -> Any:
    """Refuse an oversized bulk request before validating its devices, saying what to do."""
    if isinstance(devices, list) and len(devices) > MAX_BULK_DEVICES:
        raise ValueError(
            f"at most {MAX_BULK_DEVICES} devices per bulk enrolment, got {len(devices)};"
            " split them over several requests"
        )
    return devices


class TokenCreate(BaseModel):
    uses: int = Field(default=1, ge=1, le=100_000)
    ttl_s: int = Field(default=24 * 3600, ge=60, le=365 * 24 * 3600)


class TokenCreated(BaseModel):
    token: str  # shown once; the hub keeps only its hash
    expires_at: datetime
    uses: int


class SerialTokensCreate(BaseModel):
    """Manufacturing: one single-use token per serial number, each enrolling only the device
    whose id is that serial."""

    serials: Annotated[
        list[DeviceId], BeforeValidator(check_fleet_size), AfterValidator(check_serials)
    ] = Field(min_length=1, max_length=MAX_BULK_DEVICES)
    ttl_s: int = Field(default=7 * 24 * 3600, ge=60, le=365 * 24 * 3600)


class SerialToken(BaseModel):
    serial: str  # the device id it enrols
    token: str  # shown once; the hub keeps only its hash
    expires_at: datetime


class SerialTokensCreated(BaseModel):
    tokens: list[SerialToken]  # in the order of the request's serials


class DeviceSpec(BaseModel):
    """What a device asks to be enrolled as."""

    name: str | None = Field(default=None, max_length=255)
    device_class: str = Field(default="generic", pattern=DEVICE_CLASS_PATTERN)
    tags: Tags = Field(default_factory=dict)
    group: GroupName | None = None


class EnrollRequest(DeviceSpec):
    token: str = Field(min_length=1, max_length=256)
    # With a token made for a serial: the serial the device believes it is, checked against
    # the token's (a token put in the wrong box is refused rather than enrolling a stranger).
    serial: DeviceId | None = None


class BulkEnrollRequest(BaseModel):
    token: str = Field(min_length=1, max_length=256)
    devices: Annotated[list[DeviceSpec], BeforeValidator(check_fleet_size)] = Field(
        min_length=1, max_length=MAX_BULK_DEVICES
    )


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
    # "pending" when the hub requires approval: the broker refuses the device until accepted.
    status: str = "active"


class BulkEnrollResponse(BaseModel):
    devices: list[EnrollResponse]  # in the order of the request's devices


class DeviceUpdate(BaseModel):
    """The body of ``PATCH /api/v1/devices/{id}``: a field left out stays as it is."""

    model_config = ConfigDict(extra="forbid")

    group: GroupName | None = None  # null leaves the group
    tags: Tags | None = None  # the whole new set; {} removes every tag

    @model_validator(mode="after")
    def _tags_not_null(self) -> Self:
        # A null tag set would read as "no change" to one client and "clear" to another.
        if "tags" in self.model_fields_set and self.tags is None:
            raise ValueError("tags must be an object; send {} to remove every tag")
        return self


class FollowPublic(BaseModel):
    """The deployment a device's model follows: the one its desired state names."""

    model: str
    deployment_id: str
    version: int  # the version the desired state names (the older one after a rollback)
    priority: int
    state: str  # the rollout's state (hub.deployments.models.RolloutState)
    device_state: str | None  # this device's state in that deployment


class DevicePublic(BaseModel):
    id: str
    name: str | None
    device_class: str
    tags: dict[str, str]
    group: str | None
    enrolled_at: datetime
    status: str  # active, pending (waiting for approval) or disabled
    status_changed_at: datetime | None
    online: bool
    last_seen: datetime | None
    desired_counter: int
    reported_state: dict[str, Any] | None
    # Only on a single device (GET /api/v1/devices/{id}); None in the list, which can hold
    # 10,000 devices.
    follows: list[FollowPublic] | None = None


class DeviceStatusChanged(BaseModel):
    """The answer to accept, disable and enable."""

    device: DevicePublic
    # Deployments whose unfinished work for this device was cancelled (disable only), so no
    # rollout waits for a device that can no longer reach the broker.
    cancelled_deployments: list[str] = Field(default_factory=list)
