"""The message envelope and its bodies.

Every JSON message is ``{"v", "kind", "msg_id", "sent_at", "body"}``; the body's shape is chosen
by ``kind``. Unknown fields are ignored so an older agent accepts a newer hub. Package chunks are
the one exception: they are raw bytes on their own topic, since base64 in JSON would cost a third
more on every byte fanned out to the fleet.
"""

import json
import uuid
from datetime import UTC, datetime
from enum import StrEnum
from typing import Annotated, Any, Literal

from pydantic import AwareDatetime, BaseModel, ConfigDict, Field, TypeAdapter, ValidationError

from agent.protocol import PROTOCOL_VERSION
from agent.protocol.documents import Signed

MAX_MESSAGE_BYTES = 1024 * 1024


class _Body(BaseModel):
    model_config = ConfigDict(frozen=True, extra="ignore")


class Step(StrEnum):
    """Where a device is with one package, reported in events and state."""

    QUEUED = "queued"
    DOWNLOADING = "downloading"
    DOWNLOADED = "downloaded"
    VERIFIED = "verified"
    INSTALLING = "installing"
    HEALTH_CHECK = "health_check"
    ACTIVE = "active"
    FAILED = "failed"


TERMINAL_STEPS = frozenset({Step.ACTIVE, Step.FAILED})


class Reason(StrEnum):
    """Why a device refused or failed something; codes name the attack where there is one."""

    SIGNATURE = "E_SIGNATURE"  # a signature does not verify
    UNKNOWN_KEY = "E_UNKNOWN_KEY"  # signed by a key the keyring does not name for that role
    THRESHOLD = "E_THRESHOLD"  # too few distinct valid signatures
    EXPIRED = "E_EXPIRED"  # past its expiry
    REPLAY = "E_REPLAY"  # counter or version not above the last seen
    WRONG_DEVICE = "E_WRONG_DEVICE"  # meant for another device
    HASH = "E_HASH"  # bytes do not match the signed hash
    LENGTH = "E_LENGTH"  # bytes do not match the signed length
    UNSAFE_PATH = "E_UNSAFE_PATH"  # absolute path, "..", link or special file in a package
    TOO_LARGE = "E_TOO_LARGE"  # over the agent's size limits
    INCOMPATIBLE = "E_INCOMPATIBLE"  # for another device class, runtime or agent version
    NOT_RELEASED = "E_NOT_RELEASED"  # package manifest not signed by a release key
    MALFORMED = "E_MALFORMED"  # not a valid document or archive
    MODEL_LOAD = "E_MODEL_LOAD"  # the runtime could not load the model
    HEALTH_CHECK = "E_HEALTH_CHECK"  # sample input did not give the expected output
    NO_SPACE = "E_NO_SPACE"  # the disk is full
    MARKED_BAD = "E_MARKED_BAD"  # this version failed here before
    CRASH_LOOP = "E_CRASH_LOOP"  # installing this version crashed the agent again and again
    INTERNAL = "E_INTERNAL"  # a bug or an unexpected condition on the device


class DesiredBody(_Body):
    kind: Literal["desired"] = "desired"
    keyring: Signed
    desired: Signed
    # Earlier keyring versions the hub keeps, so a device that missed rotations can walk
    # N+1, N+2, ... up to ``keyring`` (agent.trust.verify_keyring_update); older agents
    # ignore it.
    keyrings: list[Signed] = Field(default_factory=list)


class ModelStatus(_Body):
    model: str
    version: int
    digest: str
    deployment_id: str | None = None


class StateBody(_Body):
    kind: Literal["state"] = "state"
    seq: int = Field(ge=0)
    agent_version: str
    device_class: str
    desired_counter: int = 0
    active: list[ModelStatus] = Field(default_factory=list)
    bad: list[str] = Field(default_factory=list)  # digests marked bad on this device
    # Frameworks the device can run ("onnx", "tflite"); empty: not said (older agents).
    runtimes: list[str] = Field(default_factory=list)
    health: Literal["ok", "degraded"] = "ok"
    # The last document the device refused that belongs to no deployment it trusts (a replayed
    # or forged desired state, say): "<reason code>: <detail>".
    last_rejection: str = ""


class StatusBody(_Body):
    kind: Literal["status"] = "status"
    online: bool
    reason: str = ""
    # Sent with every heartbeat, so the hub can tell a restart from a long-lived connection.
    uptime_s: float | None = Field(default=None, ge=0)


class EventBody(_Body):
    kind: Literal["event"] = "event"
    seq: int = Field(ge=1)
    deployment_id: str
    model: str
    version: int
    digest: str
    step: Step
    reason: Reason | None = None
    detail: str = ""
    progress: float | None = Field(default=None, ge=0.0, le=1.0)


class DesiredRequestBody(_Body):
    kind: Literal["desired_request"] = "desired_request"
    have_counter: int = 0


class ChunkRequestBody(_Body):
    kind: Literal["chunk_request"] = "chunk_request"
    digest: str
    chunks: list[Annotated[int, Field(ge=0)]] = Field(max_length=100_000)


class AckBody(_Body):
    kind: Literal["ack"] = "ack"
    stream: Literal["evt", "tm", "dc"]
    seq: int = Field(ge=0)  # every record of the stream up to and including seq is stored


MAX_BATCH_RECORDS = 1000


WorkerState = Literal["ok", "restarting", "crash_loop"]


def _is_none(value: object) -> bool:
    return value is None


class ModelStats(_Body):
    """One model's scoring over a telemetry interval."""

    model: str = Field(max_length=63)
    version: int = Field(ge=1)
    inferences: int = Field(ge=0)
    errors: int = Field(ge=0)
    # Latency percentiles over the interval's calls; None when there were none.
    p50_ms: float | None = Field(default=None, ge=0)
    p95_ms: float | None = Field(default=None, ge=0)
    p99_ms: float | None = Field(default=None, ge=0)
    # Entry-script models only; None for a built-in runtime, and then left out of the JSON, so
    # the message of every other model is as it was. The state of the model's worker process
    # at the end of the interval ("crash_loop": calls refused after repeated failures), and
    # during the interval: workers started again, calls killed past their time limit, and
    # workers that died or failed to start.
    worker: WorkerState | None = Field(default=None, exclude_if=_is_none)
    restarts: int | None = Field(default=None, ge=0, exclude_if=_is_none)
    timeouts: int | None = Field(default=None, ge=0, exclude_if=_is_none)
    crashes: int | None = Field(default=None, ge=0, exclude_if=_is_none)


class TelemetryRecord(_Body):
    """What one device measured over one interval."""

    seq: int = Field(ge=1)
    at: AwareDatetime  # the end of the interval, on the device's clock
    interval_s: float = Field(gt=0)
    health: Literal["ok", "degraded"] = "ok"
    uptime_s: float = Field(ge=0)
    cpu_percent: float | None = Field(default=None, ge=0)
    memory_bytes: int | None = Field(default=None, ge=0)
    disk_free_bytes: int | None = Field(default=None, ge=0)
    temperature_c: float | None = None  # where the platform gives one
    reconnects: int = Field(default=0, ge=0)  # during the interval
    outbox_backlog: int = Field(default=0, ge=0)  # records waiting for the hub's ack
    # Records lost since install: dropped by the outbox bound, refused by a full disk, or lost
    # with a corrupt outbox file.
    outbox_dropped: int = Field(default=0, ge=0)
    models: list[ModelStats] = Field(default_factory=list, max_length=100)


class CollectedRecord(_Body):
    """One sampled scoring call: the edge ``ModelDataCollector`` record."""

    seq: int = Field(ge=1)
    at: AwareDatetime
    model: str = Field(max_length=63)
    version: int = Field(ge=1)
    deployment_id: str | None = Field(default=None, max_length=40)
    # Taken from the scoring request (``X-Correlation-Id``) when the caller gave one.
    correlation_id: str | None = Field(default=None, max_length=200)
    latency_ms: float = Field(ge=0)
    inputs: Any
    outputs: Any


class CommandBody(_Body):
    """A signed command (``documents.Command``) with the keyring that names its director key."""

    kind: Literal["command"] = "command"
    keyring: Signed
    command: Signed
    keyrings: list[Signed] = Field(default_factory=list)  # as in DesiredBody


MAX_LOG_ENTRIES = 1000


class LogEntry(_Body):
    at: AwareDatetime
    level: str = Field(max_length=16)
    logger: str = Field(max_length=200)
    message: str


class LogsResult(_Body):
    """The result of a ``logs`` command: the newest entries that match, oldest first."""

    entries: list[LogEntry] = Field(max_length=MAX_LOG_ENTRIES)
    # True when older matching entries were left out (by ``tail`` or the message size bound).
    more: bool = False


class CommandResultBody(_Body):
    """What became of a command: sent on the ``req`` channel."""

    kind: Literal["command_result"] = "command_result"
    command_id: str = Field(min_length=1, max_length=64)
    seq: int = Field(ge=0)  # 0 when the command was too malformed to read its seq
    ok: bool
    reason: Reason | None = None  # why it was refused or failed
    detail: str = Field(default="", max_length=2000)
    result: dict[str, Any] = Field(default_factory=dict)  # by action: LogsResult for logs


class TelemetryBody(_Body):
    kind: Literal["telemetry"] = "telemetry"
    # The oldest seq of the stream the device still holds. Every seq below it was acknowledged
    # or dropped by the outbox bound, so the hub acknowledges past that gap instead of waiting.
    first_kept: int = Field(ge=1)
    records: list[TelemetryRecord] = Field(min_length=1, max_length=MAX_BATCH_RECORDS)


class DataBody(_Body):
    kind: Literal["data"] = "data"
    first_kept: int = Field(ge=1)  # as in TelemetryBody
    records: list[CollectedRecord] = Field(min_length=1, max_length=MAX_BATCH_RECORDS)


Body = Annotated[
    DesiredBody
    | StateBody
    | StatusBody
    | EventBody
    | DesiredRequestBody
    | ChunkRequestBody
    | AckBody
    | TelemetryBody
    | DataBody
    | CommandBody
    | CommandResultBody,
    Field(discriminator="kind"),
]


class Envelope(BaseModel):
    model_config = ConfigDict(frozen=True, extra="ignore")

    v: int = PROTOCOL_VERSION
    kind: str
    msg_id: str
    sent_at: AwareDatetime
    body: Body


_ENVELOPE = TypeAdapter(Envelope)


class MessageError(ValueError):
    """A payload that is not a valid message; the receiver logs and drops it."""


def new_envelope(body: Any, *, now: datetime | None = None, msg_id: str | None = None) -> Envelope:
    return Envelope(
        kind=body.kind,
        msg_id=msg_id or uuid.uuid4().hex,
        sent_at=now or datetime.now(UTC),
        body=body,
    )


def encode(body: Any, *, now: datetime | None = None, msg_id: str | None = None) -> bytes:
    """Wrap a body in an envelope and serialise it."""
    env = new_envelope(body, now=now, msg_id=msg_id)
    return env.model_dump_json().encode("utf-8")


def decode(payload: bytes, *, max_bytes: int = MAX_MESSAGE_BYTES) -> Envelope:
    """Parse and validate a message; raises MessageError with a reason on anything malformed."""
    if len(payload) > max_bytes:
        raise MessageError(f"message of {len(payload)} bytes exceeds {max_bytes}")
    try:
        # The fast path, in one pass of pydantic's own parser: the hub decodes every device
        # message, and parsing to Python objects first cost as much again.
        env = _ENVELOPE.validate_json(payload)
    except ValidationError:
        _explain(payload)  # raises the precise reason
        raise AssertionError("unreachable") from None  # pragma: no cover
    if env.v != PROTOCOL_VERSION:
        raise MessageError(f"unsupported protocol version {env.v!r}")
    if env.kind != env.body.kind:
        raise MessageError(f"envelope kind {env.kind!r} does not match body {env.body.kind!r}")
    return env


def _explain(payload: bytes) -> None:
    """Why a payload the fast path refused is malformed, as a MessageError."""
    try:
        raw = json.loads(payload)
    except (UnicodeDecodeError, json.JSONDecodeError, RecursionError) as exc:
        raise MessageError(f"not JSON: {exc}") from None
    if not isinstance(raw, dict):
        raise MessageError("message is not a JSON object")
    if raw.get("v") != PROTOCOL_VERSION:
        raise MessageError(f"unsupported protocol version {raw.get('v')!r}")
    try:
        _ENVELOPE.validate_python(raw)
    except ValidationError as exc:
        raise MessageError(f"invalid message: {exc.errors(include_url=False)[:3]}") from None
    # Valid as Python objects, not as JSON: a case of the JSON parser's own (a lone surrogate).
    raise MessageError("invalid message: not valid as JSON text")
