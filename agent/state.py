"""What a device keeps on disk between runs, each file written atomically.

identity.json      device id, broker credentials, pinned root key (mode 0600)
keyring.json       the newest root-signed keyring accepted
desired.json       the newest director-signed desired state accepted
progress.json      desired counter and fingerprint, sequence numbers, versions marked bad
scoring-keys.json  primary and secondary keys of the local scoring endpoint (mode 0600)
models/            installed versions and their active pointers (see install.py)
downloads/         partial and complete package archives
"""

import secrets
from enum import StrEnum
from pathlib import Path
from typing import TypeVar

from pydantic import BaseModel, ConfigDict, Field, ValidationError

from agent.atomic import write_atomic
from agent.errors import AgentError
from agent.protocol.documents import PackageRef, Signed

SECRET_MODE = 0o600
_M = TypeVar("_M", bound=BaseModel)


class BrokerCredentials(BaseModel):
    model_config = ConfigDict(frozen=True, extra="ignore")

    host: str
    port: int
    username: str
    password: str


class Identity(BaseModel):
    """Who this device is, as issued by the hub at enrolment."""

    model_config = ConfigDict(frozen=True, extra="ignore")

    device_id: str
    hub_url: str
    broker: BrokerCredentials
    topic_root: str
    root_public_key: str
    device_class: str = "generic"


class BadVersion(BaseModel):
    model_config = ConfigDict(frozen=True)

    deployment_id: str
    reason: str


class InstallAttempt(BaseModel):
    """The journal entry written before an install starts changing the device, and cleared
    when it ends either way: found on start-up, it means the agent died mid-install."""

    ref: PackageRef
    attempts: int = Field(ge=1)


class Progress(BaseModel):
    desired_counter: int = 0
    desired_fingerprint: str | None = None
    evt_seq: int = 0
    state_seq: int = 0
    command_seq: int = 0  # the seq of the last command run; older ones are replays
    bad: dict[str, BadVersion] = Field(default_factory=dict)  # digest -> why
    installing: InstallAttempt | None = None


class ScoringKeyName(StrEnum):
    PRIMARY = "primary"
    SECONDARY = "secondary"


class ScoringKeys(BaseModel):
    model_config = ConfigDict(frozen=True)

    primary: str
    secondary: str

    @classmethod
    def generate(cls) -> "ScoringKeys":
        return cls(primary=secrets.token_urlsafe(32), secondary=secrets.token_urlsafe(32))


class NotEnrolledError(AgentError):
    """The state directory holds no identity: run ``outpost-agent enroll`` first."""


class StateDir:
    """Typed access to one device's state directory."""

    def __init__(self, root: Path) -> None:
        self.root = root
        self.models = root / "models"
        self.downloads = root / "downloads"

    def create(self) -> None:
        self.root.mkdir(parents=True, exist_ok=True, mode=0o700)
        self.models.mkdir(exist_ok=True)
        self.downloads.mkdir(exist_ok=True)

    def _path(self, name: str) -> Path:
        return self.root / name

    def load_identity(self) -> Identity:
        try:
            return Identity.model_validate_json(self._path("identity.json").read_bytes())
        except FileNotFoundError:
            raise NotEnrolledError(
                f"no identity in {self.root}: enrol with `outpost-agent enroll`"
            ) from None
        except ValidationError as exc:
            raise AgentError(f"corrupt identity.json: {exc}") from None

    def save_identity(self, identity: Identity) -> None:
        write_atomic(
            self._path("identity.json"), identity.model_dump_json().encode(), mode=SECRET_MODE
        )

    def load_keyring(self) -> Signed | None:
        return _load_optional(self._path("keyring.json"), Signed)

    def save_keyring(self, keyring: Signed) -> None:
        write_atomic(self._path("keyring.json"), keyring.model_dump_json().encode())

    def load_desired(self) -> Signed | None:
        return _load_optional(self._path("desired.json"), Signed)

    def save_desired(self, desired: Signed) -> None:
        write_atomic(self._path("desired.json"), desired.model_dump_json().encode())

    def load_progress(self) -> Progress:
        return _load_optional(self._path("progress.json"), Progress) or Progress()

    def save_progress(self, progress: Progress) -> None:
        write_atomic(self._path("progress.json"), progress.model_dump_json().encode())

    @property
    def scoring_keys_path(self) -> Path:
        return self._path("scoring-keys.json")

    def scoring_keys(self) -> ScoringKeys:
        """The endpoint's keys, made on first use."""
        path = self.scoring_keys_path
        keys = _load_optional(path, ScoringKeys)
        if keys is None:
            keys = ScoringKeys.generate()
            write_atomic(path, keys.model_dump_json().encode(), mode=SECRET_MODE)
        return keys

    def rotate_scoring_key(self, which: ScoringKeyName) -> ScoringKeys:
        """Replace one of the endpoint's keys with a fresh one, atomically; the other keeps
        working, so clients move over without a moment with no valid key. A running endpoint
        sees the new file on its next request (``agent.scoring_keys.ScoringKeyFile``)."""
        keys = self.scoring_keys()
        fresh = keys.model_copy(update={which.value: secrets.token_urlsafe(32)})
        write_atomic(self.scoring_keys_path, fresh.model_dump_json().encode(), mode=SECRET_MODE)
        return fresh


def _load_optional(path: Path, model: type[_M]) -> _M | None:
    try:
        return model.model_validate_json(path.read_bytes())
    except FileNotFoundError:
        return None
    except ValidationError as exc:
        raise AgentError(f"corrupt {path.name}: {exc}") from None
