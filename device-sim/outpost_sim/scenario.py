"""Scenario files: the fleet, its faults and what to do, in YAML or TOML.

    name: canary-on-bad-links
    seed: 7
    hub: {url: "http://127.0.0.1:8780", admin_token_file: var/hub/admin.token}
    fleet:
      - {group: plant-1, count: 200, profile: {tags: {site: plant-1, hw: rpi4}}}
      - {group: remote, count: 50, profile: {link: {kbps: 2000, latency_ms: 80}}}
    faults:
      - {kind: connection_drops, rate_per_min: 2, devices: 10%}
      - {kind: health_fail, devices: 3, group: remote}
    steps:
      - {do: deploy, model: iris, version: 1, timeout_s: 120}
      - {do: idle, for_s: 10}
      - do: deploy
        model: iris
        version: 2
        policy: {canary: 10, wave_percent: 30, soak_s: 5, max_failure_ratio: 0.1, min_devices: 10}
        device_timeout_s: 120
        expect: completed

Every field is checked before anything starts; an error names the field and the file.
"""

import os
import tomllib
from pathlib import Path
from typing import Annotated, Any, Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, model_validator

from outpost_sim.faults import FaultSpec
from outpost_sim.profiles import DeviceProfile

GROUP_PATTERN = r"^[a-z0-9][a-z0-9-]{0,30}$"
MAX_DEVICES = 20_000  # one process holds at most ~19,990 sockets (FLOORS.md)


class ScenarioError(ValueError):
    """A scenario file that cannot be read or does not describe a valid run."""


class _Spec(BaseModel):
    model_config = ConfigDict(frozen=True, extra="forbid")


class HubSpec(_Spec):
    url: str = "http://127.0.0.1:8780"
    # For deploy steps and for creating an enrolment token; read from the file when given.
    admin_token: str | None = None
    admin_token_file: Path | None = None
    enrollment_token: str | None = None  # else one is created with the admin token

    def resolved_admin_token(self) -> str | None:
        if self.admin_token:
            return self.admin_token
        if from_env := os.environ.get("OUTPOST_SIM_ADMIN_TOKEN"):
            return from_env
        if self.admin_token_file is not None:
            try:
                return self.admin_token_file.read_text(encoding="utf-8").strip()
            except OSError as exc:
                raise ScenarioError(f"cannot read admin_token_file: {exc}") from None
        return None


class GroupSpec(_Spec):
    group: str = Field(default="sim", pattern=GROUP_PATTERN)
    count: int = Field(ge=1, le=MAX_DEVICES)
    profile: DeviceProfile = DeviceProfile()


class ExponentialSpec(_Spec):
    first: int = Field(ge=1)
    factor: float = Field(default=2.0, gt=1.0, le=100.0)
    max: int | None = Field(default=None, ge=1)


class PolicySpec(_Spec):
    """A deployment's rollout policy, as the hub takes it (``policy`` of
    POST /api/v1/deployments); unset fields take the hub's defaults.

    Names and bounds are checked here, so a misspelt field fails before the fleet starts; the
    hub judges the combinations (one wave shape, a canary for ``pause_after_canary``) and its
    refusal names the field. ``order: listed`` releases the devices in fleet order: the
    scenario's groups as listed, so a group listed first holds the canaries.
    """

    canary: int | None = Field(default=None, ge=1)
    canary_percent: float | None = Field(default=None, gt=0, le=100)
    wave_size: int | None = Field(default=None, ge=1)
    wave_percent: float | None = Field(default=None, gt=0, le=100)
    exponential: ExponentialSpec | None = None
    soak_s: int | None = Field(default=None, ge=0)
    max_failures: int | None = Field(default=None, ge=0)
    max_failure_ratio: float | None = Field(default=None, ge=0, lt=1)
    min_devices: int | None = Field(default=None, ge=1)
    rollback_on_abort: bool | None = None
    max_concurrent: int | None = Field(default=None, ge=1)
    pause_after_canary: bool | None = None
    order: Literal["random", "listed"] | None = None


class DeployStep(_Spec):
    """Create a deployment and follow it through the hub's API until it is done (or
    ``timeout_s``); the report says how it went, wave by wave."""

    do: Literal["deploy"]
    model: str
    version: int | None = Field(default=None, ge=1)  # None: the latest
    groups: list[str] | None = None  # fleet groups to target, in fleet order; None: every device
    policy: PolicySpec | None = None  # None: every device at once
    priority: int | None = Field(default=None, ge=-1000, le=1000)
    device_timeout_s: int | None = Field(default=None, ge=1)  # the hub's per-device timeout
    # The rollout must end so (the report says whether it did; the CLI exits 1 if not).
    expect: Literal["completed", "aborted"] | None = None
    timeout_s: float = Field(default=300.0, gt=0)  # how long to follow it; then reported as is

    def body(self, devices: list[str]) -> dict[str, Any]:
        """The POST /api/v1/deployments body for ``devices``."""
        body: dict[str, Any] = {"model": self.model, "version": self.version, "devices": devices}
        if self.policy is not None:
            body["policy"] = self.policy.model_dump(exclude_none=True)
        if self.priority is not None:
            body["priority"] = self.priority
        if self.device_timeout_s is not None:
            body["device_timeout_s"] = self.device_timeout_s
        return body


class IdleStep(_Spec):
    do: Literal["idle"]
    for_s: float = Field(ge=0)


class TelemetryStep(_Spec):
    """Every device sends a heartbeat every ``interval_s`` for ``for_s`` seconds."""

    do: Literal["telemetry"]
    interval_s: float = Field(default=1.0, gt=0)
    for_s: float = Field(gt=0)


class WaitConnectedStep(_Spec):
    do: Literal["wait_connected"]
    fraction: float = Field(default=1.0, gt=0, le=1)
    timeout_s: float = Field(default=120.0, gt=0)


Step = Annotated[
    DeployStep | IdleStep | TelemetryStep | WaitConnectedStep, Field(discriminator="do")
]


class Scenario(_Spec):
    name: str = "scenario"
    seed: int = 0
    hub: HubSpec = HubSpec()
    state_dir: Path | None = None  # default: var/sim/<name>
    ramp_s: float = Field(default=10.0, ge=0)
    io_threads: int = Field(default=4, ge=1, le=64)
    heartbeat_s: float = Field(default=30.0, gt=0)
    # Extra agent settings for every device, as in the agent's TOML file.
    agent: dict[str, Any] = Field(default_factory=dict)
    fleet: list[GroupSpec] = Field(min_length=1)
    faults: list[FaultSpec] = Field(default_factory=list)
    steps: list[Step] = Field(default_factory=list)
    # Stop this long after the last step; None with no steps: run until interrupted.
    linger_s: float = Field(default=0.0, ge=0)

    @model_validator(mode="after")
    def _check(self) -> "Scenario":
        groups = [g.group for g in self.fleet]
        if len(set(groups)) != len(groups):
            raise ValueError(f"fleet groups must have distinct names: {groups}")
        if sum(g.count for g in self.fleet) > MAX_DEVICES:
            raise ValueError(f"at most {MAX_DEVICES} devices in one simulator process")
        known = set(groups)
        for fault in self.faults:
            if fault.group is not None and fault.group not in known:
                raise ValueError(f"fault {fault.kind} names unknown group {fault.group!r}")
        for step in self.steps:
            if isinstance(step, DeployStep) and step.groups:
                unknown = set(step.groups) - known
                if unknown:
                    raise ValueError(f"deploy step names unknown groups {sorted(unknown)}")
        return self

    @property
    def devices(self) -> int:
        return sum(g.count for g in self.fleet)

    def base_dir(self) -> Path:
        return self.state_dir or Path("var/sim") / self.name

    def horizon_s(self) -> float:
        """How long the run can last at most: the bound for expanding fault rates."""
        total = self.ramp_s + self.linger_s + 60.0
        for step in self.steps:
            if isinstance(step, DeployStep | WaitConnectedStep):
                total += step.timeout_s
            else:
                total += step.for_s
        return total


def parse_scenario(raw: object, *, source: str = "scenario") -> Scenario:
    try:
        return Scenario.model_validate(raw)
    except ValidationError as exc:
        problems = "; ".join(
            f"{'.'.join(str(p) for p in error['loc']) or '(top)'}: {error['msg']}"
            for error in exc.errors()
        )
        raise ScenarioError(f"{source}: {problems}") from None


def load_scenario(path: Path) -> Scenario:
    """Read a ``.yaml``/``.yml`` or ``.toml`` scenario file."""
    if path.suffix not in {".yaml", ".yml", ".toml"}:
        raise ScenarioError(f"{path}: scenario files end in .yaml, .yml or .toml")
    try:
        text = path.read_text(encoding="utf-8")
    except OSError as exc:
        raise ScenarioError(f"cannot read scenario {path}: {exc}") from None
    try:
        raw = yaml.safe_load(text) if path.suffix in {".yaml", ".yml"} else tomllib.loads(text)
    except (yaml.YAMLError, tomllib.TOMLDecodeError) as exc:
        raise ScenarioError(f"{path} is not valid {path.suffix[1:].upper()}: {exc}") from None
    if not isinstance(raw, dict):
        raise ScenarioError(f"{path}: a scenario is a mapping of fields, not {type(raw).__name__}")
    return parse_scenario(raw, source=str(path))
