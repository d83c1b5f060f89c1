"""The agent's settings: defaults, then a TOML config file, then OUTPOST_AGENT_* variables,
then command-line flags.

Nested sections use ``__`` in variable names, e.g. ``OUTPOST_AGENT_SCORING__PORT=8792``; names
are case-insensitive. A variable with the prefix that names no setting is an error, so a typo
is not silently ignored.

The layering is done here rather than with pydantic-settings: that package (and what it pulls
in) costs the agent daemon about 0.7 MB resident for the few lines below.
"""

import os
import tomllib
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator

from agent.errors import SettingsError
from agent.logbook import level_number
from agent.tlsfiles import TlsMode

ENV_PREFIX = "OUTPOST_AGENT_"
ENV_NESTED = "__"


class _Section(BaseModel):
    model_config = ConfigDict(frozen=True, extra="forbid")


class ScoringSettings(_Section):
    enabled: bool = True
    # Loopback unless the operator says otherwise: the endpoint is for local clients.
    host: str = "127.0.0.1"
    port: int = Field(default=8791, ge=0, le=65535)
    max_body_bytes: int = 16 * 1024 * 1024


class MqttSettings(_Section):
    keepalive_s: int = Field(default=30, ge=5)
    backoff_base_s: float = Field(default=0.5, gt=0)
    backoff_cap_s: float = Field(default=60.0, gt=0)
    connect_timeout_s: float = Field(default=10.0, gt=0)
    # Full jitter spreads a fleet's reconnects after a broker restart; off only to measure
    # the thundering herd it prevents (bench/storm.py).
    backoff_jitter: bool = True
    # A status message every this many seconds tells the hub the device is alive.
    heartbeat_s: float = Field(default=30.0, gt=0)
    # Overrides for the broker address the hub gave at enrolment (NAT, port forwarding).
    host: str | None = None
    port: int | None = None
    # auto: mutual TLS once the state dir holds a certificate (``outpost-agent certificate``),
    # never falling back to the password; on: TLS or no connection; off: the password.
    tls: TlsMode = TlsMode.AUTO
    # Override for the TLS listener's port the hub gave with the certificate.
    tls_port: int | None = Field(default=None, ge=1, le=65535)


class DownloadSettings(_Section):
    window_chunks: int = Field(default=64, ge=1)
    # Before asking for missing chunks, wait this long (to twice it) for chunks other devices
    # asked for: a fleet downloading one package then asks for each chunk about once.
    listen_s: float = Field(default=0.5, ge=0)
    chunk_timeout_s: float = Field(default=5.0, gt=0)
    max_package_bytes: int = 512 * 1024 * 1024
    max_archive_entries: int = 10_000


class TelemetrySettings(_Section):
    # Off: no telemetry records (a simulated fleet of thousands in one process, where each
    # device's outbox file costs file descriptors). Data collection is the deployments' say.
    enabled: bool = True
    # One telemetry record every this many seconds.
    interval_s: float = Field(default=60.0, gt=0)
    # A batch the hub has not acknowledged in this long is sent again.
    resend_s: float = Field(default=30.0, gt=0)
    # A telemetry or data-collection message stays under this (brokers cap messages, e.g.
    # at 256 KB; THREATS.md B11); a collected record that cannot fit in one is not kept.
    max_message_bytes: int = Field(default=256 * 1024, ge=16 * 1024, le=1024 * 1024)


class OutboxSettings(_Section):
    """The bound of each outbox stream (telemetry, data collection); past it, the oldest
    records are dropped and counted."""

    max_records: int = Field(default=100_000, ge=1)
    max_bytes: int = Field(default=32 * 1024 * 1024, ge=1024)


class CollectionSettings(_Section):
    # Sampled calls wait this long in memory, so that a burst is stored in one commit; a
    # SIGKILL loses at most this window's records.
    flush_s: float = Field(default=0.5, ge=0)
    # Sampled calls waiting for the outbox; past this, calls are skipped and counted.
    max_pending_bytes: int = Field(default=8 * 1024 * 1024, ge=1024)


class LogSettings(_Section):
    """The agent's own log entries kept on disk for ``outpost-hub device logs``."""

    enabled: bool = True
    # Entries below this level are not kept (the loggers' own level applies first).
    level: str = "info"
    # Both files together (the current one and the one before it) stay under this.
    max_bytes: int = Field(default=2 * 1024 * 1024, ge=16 * 1024)
    # A logs command's answer stays under this, whatever its tail asks for.
    max_result_bytes: int = Field(default=192 * 1024, ge=4 * 1024, le=768 * 1024)

    @field_validator("level")
    @classmethod
    def _known_level(cls, value: str) -> str:
        level_number(value)  # ValueError names the levels
        return value.lower()


class ModelSettings(_Section):
    # Load and health-check each built-in runtime's model in a throwaway process before the
    # agent does, so a runtime that crashes or hangs on a corrupt model is refused instead of
    # taking the agent down (agent/runtimes/trial.py). Costs a process start per load.
    trial_load: bool = True
    trial_timeout_s: float = Field(default=300.0, gt=0)


class AgentSettings(_Section):
    state_dir: Path = Path("var/agent")
    device_class: str = "generic"
    event_resend_s: float = Field(default=10.0, gt=0)
    scoring: ScoringSettings = ScoringSettings()
    mqtt: MqttSettings = MqttSettings()
    download: DownloadSettings = DownloadSettings()
    telemetry: TelemetrySettings = TelemetrySettings()
    outbox: OutboxSettings = OutboxSettings()
    collection: CollectionSettings = CollectionSettings()
    logs: LogSettings = LogSettings()
    models: ModelSettings = ModelSettings()

    @classmethod
    def load(
        cls,
        config_file: Path | None = None,
        *,
        environ: Mapping[str, str] | None = None,
        **overrides: Any,
    ) -> "AgentSettings":
        """Defaults < config file < environment < explicit overrides (command-line flags).

        Raises `SettingsError` naming the file, variable or flag a bad value came from.
        """
        file_values = _read_config(config_file) if config_file is not None else {}
        env_values, env_names = _environment_values(os.environ if environ is None else environ)
        merged = _deep_merge(_deep_merge(file_values, env_values), overrides)
        try:
            return cls.model_validate(merged)
        except ValidationError as exc:
            problems = []
            for error in exc.errors():
                where = ".".join(str(part) for part in error["loc"])
                source = _source(where, overrides, env_names, config_file)
                problems.append(f"{where} ({source}): {error['msg']}")
            raise SettingsError("bad settings: " + "; ".join(problems)) from None


def _read_config(config_file: Path) -> dict[str, Any]:
    try:
        return tomllib.loads(config_file.read_text(encoding="utf-8"))
    except OSError as exc:
        raise SettingsError(f"cannot read the config file {config_file}: {exc.strerror}") from None
    except (tomllib.TOMLDecodeError, UnicodeDecodeError) as exc:
        raise SettingsError(f"the config file {config_file} is not valid TOML: {exc}") from None


def _environment_values(environ: Mapping[str, str]) -> tuple[dict[str, Any], dict[str, str]]:
    """The OUTPOST_AGENT_* variables as nested values, and each value's variable name.

    ``OUTPOST_AGENT_SCORING__PORT=8792`` gives ``{"scoring": {"port": "8792"}}``; pydantic
    turns the text into the field's type (and names the field when it cannot).
    """
    values: dict[str, Any] = {}
    names: dict[str, str] = {}
    for name, value in environ.items():
        if not name.upper().startswith(ENV_PREFIX):
            continue
        path = name[len(ENV_PREFIX) :].lower().split(ENV_NESTED)
        node = values
        for part in path[:-1]:
            child = node.setdefault(part, {})
            if not isinstance(child, dict):
                raise SettingsError(f"{name} sets a part of a setting another variable sets whole")
            node = child
        if isinstance(node.get(path[-1]), dict):
            raise SettingsError(f"{name} sets a whole section another variable sets a part of")
        node[path[-1]] = value
        names[".".join(path)] = name
    return values, names


def _source(
    dotted: str,
    overrides: Mapping[str, Any],
    env_names: Mapping[str, str],
    config_file: Path | None,
) -> str:
    """Where the value at ``dotted`` (``scoring.port``) came from, the last layer setting it."""
    if dotted.partition(".")[0] in overrides:
        return "command line"
    if dotted in env_names:
        return env_names[dotted]
    if config_file is not None:
        return f"config file {config_file}"
    return "defaults"


def _deep_merge(base: dict[str, Any], top: dict[str, Any]) -> dict[str, Any]:
    merged = dict(base)
    for key, value in top.items():
        if isinstance(value, dict) and isinstance(merged.get(key), dict):
            merged[key] = _deep_merge(merged[key], value)
        else:
            merged[key] = value
    return merged
