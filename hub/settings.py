"""Hub settings, read from the environment (prefix ``OUTPOST_HUB_``, nested with ``__``).

Built once in ``main()`` (or by a test) and passed down; nothing reads settings at import time.
"""

from pathlib import Path
from urllib.parse import urlsplit

from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator
from pydantic_settings import BaseSettings, SettingsConfigDict

DEFAULT_DATA_DIR = Path("var/hub")
# Passwords that only ever appear in examples; the hub refuses to start with them.
PLACEHOLDER_SECRETS = frozenset({"changeme", "change-me", "password", "secret", "example"})


class _Frozen(BaseModel):
    model_config = ConfigDict(frozen=True, extra="forbid")


class ApiSettings(_Frozen):
    host: str = "127.0.0.1"
    port: int = Field(default=8780, ge=1, le=65535)
    # PEM files: with both set the API is served over HTTPS only (docs/security-api.md).
    certfile: Path | None = None
    keyfile: Path | None = None

    @model_validator(mode="after")
    def _check_tls(self) -> "ApiSettings":
        if (self.certfile is None) != (self.keyfile is None):
            raise ValueError("api certfile and keyfile go together: set both or neither")
        return self


class BrokerTlsSettings(_Frozen):
    """The embedded Mosquitto's TLS listener for devices holding a certificate from the hub's
    device CA (docs/security-tls.md); devices without one keep the password listener."""

    enabled: bool = False
    # None: a free port at the first start, kept from then on (devices are told it).
    port: int | None = Field(default=None, ge=1, le=65535)
    # The TLS port devices are told, when they reach it by another port than the hub binds.
    public_port: int | None = Field(default=None, ge=1, le=65535)
    client_cert_days: int = Field(default=365, ge=1, le=3650)
    server_cert_days: int = Field(default=365, ge=31, le=3650)


class BrokerSettings(_Frozen):
    # None: start the embedded Mosquitto in data_dir/broker.
    url: str | None = None
    # The embedded Mosquitto's port; None: a free one at the first start, kept from then on.
    port: int | None = Field(default=None, ge=1, le=65535)
    # What enrolment tells devices, when they reach the broker by another name than the hub does.
    public_host: str | None = None
    public_port: int | None = Field(default=None, ge=1, le=65535)
    topic_root: str = "outpost"
    tls: BrokerTlsSettings = BrokerTlsSettings()
    # Sent by an external broker (EMQX) in the X-Outpost-Broker-Secret header of its HTTP
    # authentication and authorization calls (docs/security-devices.md); None: those
    # endpoints answer 404.
    # (16 characters at least: longer than every placeholder the hub refuses.)
    http_auth_secret: str | None = Field(default=None, min_length=16, max_length=256)

    @field_validator("url")
    @classmethod
    def _check_url(cls, value: str | None) -> str | None:
        if value is None:
            return None
        parts = urlsplit(value)
        if parts.scheme not in ("mqtt", "tcp") or not parts.hostname:
            raise ValueError("broker url must look like mqtt://user:pass@host:port")
        if parts.password is not None and parts.password.lower() in PLACEHOLDER_SECRETS:
            raise ValueError("broker url carries a placeholder password; set a real one")
        return value


class DeploySettings(_Frozen):
    desired_ttl_s: int = Field(default=7 * 24 * 3600, ge=60)


class SigningSettings(_Frozen):
    keyring_ttl_days: int = Field(default=365, ge=1)


class RegistrySettings(_Frozen):
    max_package_bytes: int = Field(default=512 * 1024 * 1024, ge=1024)


class TelemetrySettings(_Frozen):
    # Telemetry points, data-collection records and dead letters older than this (by when the
    # hub received them: a device's clock may be wrong) are deleted by the message worker.
    retention_days: int = Field(default=30, ge=1, le=3650)
    # How often the worker looks for expired rows; each sweep is a few indexed DELETEs.
    sweep_every_s: float = Field(default=300.0, ge=1.0)
    # A dead letter keeps this much of the payload: enough to see what was wrong, while a
    # device sending 1 MB of garbage a second cannot fill the disk faster than its ingest would.
    dead_letter_payload_bytes: int = Field(default=4096, ge=0, le=1024 * 1024)
    # Telemetry and data-collection messages already queued are stored together in one
    # transaction, up to this many (1: one transaction per message). A commit costs a few ms
    # (the fsync that makes "stored" true), so under load it is shared by many messages.
    coalesce_max_messages: int = Field(default=512, ge=1, le=10_000)
    # ``/metrics`` gives per-model rates and latency, and the ingest rate, over this window.
    metrics_window_s: float = Field(default=300.0, ge=10.0, le=86_400.0)


class DeviceSettings(_Frozen):
    # A device online by its last status that has not been heard from (heartbeat, state,
    # event) in this long is marked offline. Keep it a few times the agents'
    # ``mqtt.heartbeat_s`` (30 s by default), so one late heartbeat does not flap a device.
    offline_after_s: float = Field(default=90.0, ge=5.0)
    # Newly enrolled devices wait as "pending", without broker access, until an operator
    # accepts them (``outpost-hub device accept ID``).
    approval_required: bool = False


class HubSettings(BaseSettings):
    """Everything the hub process is configured by."""

    model_config = SettingsConfigDict(
        env_prefix="OUTPOST_HUB_", env_nested_delimiter="__", frozen=True, extra="ignore"
    )

    data_dir: Path = DEFAULT_DATA_DIR
    # None: a SQLite file in data_dir.
    database_url: str | None = None
    # This hub's name as the holder of rollout leases, when several replicas share a database.
    # None: the host name and data directory, which stay the same when the hub restarts.
    instance_id: str | None = Field(default=None, max_length=64)
    api: ApiSettings = ApiSettings()
    broker: BrokerSettings = BrokerSettings()
    deploy: DeploySettings = DeploySettings()
    signing: SigningSettings = SigningSettings()
    registry: RegistrySettings = RegistrySettings()
    telemetry: TelemetrySettings = TelemetrySettings()
    devices: DeviceSettings = DeviceSettings()

    @property
    def resolved_database_url(self) -> str:
        if self.database_url:
            return self.database_url
        return f"sqlite:///{(self.data_dir / 'hub.db').resolve()}"

    @property
    def keys_dir(self) -> Path:
        return self.data_dir / "keys"

    @property
    def models_dir(self) -> Path:
        return self.data_dir / "models"

    @property
    def packages_dir(self) -> Path:
        return self.data_dir / "packages"

    @property
    def broker_dir(self) -> Path:
        return self.data_dir / "broker"

    @property
    def ca_dir(self) -> Path:
        return self.data_dir / "ca"

    @property
    def admin_token_path(self) -> Path:
        return self.data_dir / "admin.token"

    @property
    def hub_broker_password_path(self) -> Path:
        return self.data_dir / "hub-broker.password"
