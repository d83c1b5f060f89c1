"""Signed documents: the keyring (root role), desired states (director role) and package
manifests (release role).

A signed document travels as ``{"signed": {...}, "signatures": [...]}`` (after TUF). Signatures
cover the canonical bytes of the ``signed`` object exactly as received, so a newer hub may add
fields an older agent ignores without breaking verification.
"""

from datetime import UTC, datetime
from enum import StrEnum
from typing import Any, Literal

from pydantic import AwareDatetime, BaseModel, ConfigDict, Field, field_serializer

from agent.protocol.keys import Signature

MANIFEST_FORMAT = 1
ANY_DEVICE_CLASS = "*"


def utc_iso(value: datetime) -> str:
    """The one way times are written into signed documents: UTC, seconds, trailing Z."""
    return value.astimezone(UTC).replace(microsecond=0).strftime("%Y-%m-%dT%H:%M:%SZ")


class _Doc(BaseModel):
    model_config = ConfigDict(frozen=True, extra="ignore")


class Role(StrEnum):
    ROOT = "root"
    RELEASE = "release"  # signs package manifests; may be kept offline
    DIRECTOR = "director"  # signs desired states and commands; online in the hub


class RoleKeys(_Doc):
    keyids: list[str]
    threshold: int = Field(default=1, ge=1)


class PublicKey(_Doc):
    scheme: Literal["ed25519"] = "ed25519"
    public: str  # base64 of the raw 32-byte key


class Keyring(_Doc):
    """Names the current release and director keys; signed by the root key."""

    type: Literal["keyring"] = "keyring"
    version: int = Field(ge=1)
    expires_at: AwareDatetime
    keys: dict[str, PublicKey]
    roles: dict[Role, RoleKeys]

    @field_serializer("expires_at")
    def _ser_time(self, value: datetime) -> str:
        return utc_iso(value)


class CollectPolicy(_Doc):
    """Data collection for one package on a device: the deployment's sampling of scoring calls
    (inputs, outputs, latency), bounded for metered links."""

    sample_rate: float = Field(ge=0, le=1)  # the share of scoring calls recorded
    max_per_minute: int = Field(default=60, ge=0)
    max_bytes_per_day: int = Field(default=10 * 1024 * 1024, ge=0)


class PackageRef(_Doc):
    """One package a device should run, as named by the director."""

    model: str
    version: int = Field(ge=1)
    digest: str  # sha256 of the package archive
    size: int = Field(ge=1)
    chunk_bytes: int = Field(ge=1)
    chunks: list[str]  # sha256 of each chunk, in order
    deployment_id: str
    collect: CollectPolicy | None = None  # None: no data collection


class DesiredState(_Doc):
    """What one device should run; signed by a director key."""

    type: Literal["desired"] = "desired"
    device_id: str
    counter: int = Field(ge=1)
    issued_at: AwareDatetime
    expires_at: AwareDatetime
    packages: list[PackageRef]

    @field_serializer("issued_at", "expires_at")
    def _ser_time(self, value: datetime) -> str:
        return utc_iso(value)


class CommandAction(StrEnum):
    """What a command asks a device to do. An agent answers an action it does not know with
    ``E_INCOMPATIBLE``, so a newer hub can add actions without breaking older agents."""

    LOGS = "logs"  # send recent log entries: args tail (int), since (ISO time), level (name)
    PING = "ping"  # answer at once: shows the device hears commands and how fast


class Command(_Doc):
    """A one-off command for one device; signed by a director key.

    ``seq`` counts the device's commands: the agent runs a command only if its seq is above the
    last one it ran, so a captured command cannot be replayed (as with the desired counter).
    """

    type: Literal["command"] = "command"
    device_id: str
    seq: int = Field(ge=1)
    command_id: str = Field(min_length=1, max_length=64)  # the hub's id, echoed in the result
    action: str = Field(min_length=1, max_length=32)  # a CommandAction, or one from a newer hub
    args: dict[str, str | int | float | bool | None] = Field(default_factory=dict)
    issued_at: AwareDatetime
    expires_at: AwareDatetime

    @field_serializer("issued_at", "expires_at")
    def _ser_time(self, value: datetime) -> str:
        return utc_iso(value)


class Framework(StrEnum):
    ONNX = "onnx"
    TFLITE = "tflite"


class TensorSpec(_Doc):
    name: str
    dtype: str
    shape: list[int | None]


class ModelSignature(_Doc):
    inputs: list[TensorSpec] = Field(default_factory=list)
    outputs: list[TensorSpec] = Field(default_factory=list)


class FileEntry(_Doc):
    path: str  # relative POSIX path inside the package's files/ directory
    size: int = Field(ge=0)
    sha256: str


class HealthCheck(_Doc):
    """The sample input must give the expected output within tolerance before a switch."""

    input: str  # path of a JSON file among the files
    expected_output: str  # path of a JSON file among the files
    rtol: float = 1e-4
    atol: float = 1e-5


class ModelInfo(_Doc):
    name: str
    version: int = Field(ge=1)
    framework: Framework


class RuntimeSpec(_Doc):
    """The inference config: a built-in runtime for the framework, or an entry script.

    With ``kind`` "script", ``entry_script`` names a file among the package's files defining
    ``init()`` and ``run(raw_data)`` (Azure ML's scoring-script contract); the agent runs it in a
    worker process of its own. ``requirements`` are PEP 508 strings the device's Python must
    satisfy; an agent refuses the package at install when one is missing. ``options`` are
    checked by ``agent.runtimes.options``. An agent older than the script kind refuses such a
    package as malformed rather than loading its model without the script.
    """

    kind: Literal["builtin", "script"] = "builtin"
    model_file: str  # path of the model among the files
    # Left out of the signed document when unset, so a built-in runtime's manifest is the same
    # bytes as before entry scripts existed.
    entry_script: str | None = Field(default=None, exclude_if=lambda v: v is None)
    requirements: list[str] = Field(default_factory=list, exclude_if=lambda v: not v)
    options: dict[str, str | int | bool | list[str]] = Field(default_factory=dict)


class Manifest(_Doc):
    """The package manifest; signed by a release key."""

    format: int = MANIFEST_FORMAT
    model: ModelInfo
    runtime: RuntimeSpec
    signature: ModelSignature = Field(default_factory=ModelSignature)
    files: list[FileEntry]
    health_check: HealthCheck
    device_classes: list[str] = Field(default_factory=lambda: [ANY_DEVICE_CLASS])
    min_agent_version: str = "0.1.0"
    created_at: AwareDatetime

    @field_serializer("created_at")
    def _ser_time(self, value: datetime) -> str:
        return utc_iso(value)


class Signed(_Doc):
    """A document with detached signatures over its canonical bytes."""

    signed: dict[str, Any]
    signatures: list[Signature]


class DetachedSignatures(_Doc):
    """The content of ``manifest.sig`` in a package."""

    signatures: list[Signature]


def document_dict(doc: BaseModel) -> dict[str, Any]:
    """The JSON-ready dict of a document, the exact object that gets signed."""
    return doc.model_dump(mode="json")
