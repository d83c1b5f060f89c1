"""One deployment as the simulator sees it: followed through the hub's API, and reported beside
what the devices themselves said.

The hub says where the rollout stands: its state and why, its waves, each device's place in it,
and its history. The devices' own events say what they did: how often each one installed the
package, when, and whether a device outside the released waves heard of the deployment at all.
The report puts both side by side, so a disagreement between them shows.
"""

from collections import Counter
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from datetime import datetime
from typing import Any

from agent.protocol.documents import DesiredState
from agent.state import StateDir
from outpost_sim.device import SimulatedDevice
from outpost_sim.report import format_percentiles, percentiles

# Hub device states that keep a released device from being finished.
STILL_MOVING = ("in_progress", "soaking", "rolling_back")
# ... and those that leave a device unfinished when following ends (pending: never released).
UNFINISHED = ("pending", *STILL_MOVING)


@dataclass(frozen=True)
class DesiredSeen:
    """A device's desired state as it accepted it: its counter, and the deployments it names."""

    counter: int
    deployments: frozenset[str]


def read_desired(state: StateDir) -> DesiredSeen:
    """What the device's state directory holds: blocking file reads, so call it off the loop."""
    signed = state.load_desired()
    names: frozenset[str] = frozenset()
    if signed is not None:
        desired = DesiredState.model_validate(signed.signed)
        names = frozenset(ref.deployment_id for ref in desired.packages)
    return DesiredSeen(state.load_progress().desired_counter, names)


def desired_of(devices: Sequence[SimulatedDevice]) -> dict[str, DesiredSeen]:
    """``read_desired`` for each device, by id (blocking)."""
    return {d.device_id: read_desired(d.agent.state) for d in devices}


def settled(view: Mapping[str, Any]) -> bool:
    """Nothing more happens to this rollout by itself: it is done and has its final state, or
    it is paused with no device still installing, soaking or rolling back (an operator must
    resume or promote it)."""
    state = view.get("state")
    if view.get("done") and state != "running":
        # The hub calls a running rollout whose last wave settled done already; it has its
        # final state (completed) only after the engine's next tick.
        return True
    counts = view.get("counts", {})
    return state == "paused" and not any(counts.get(s) for s in STILL_MOVING)


def progress_label(model: str, view: Mapping[str, Any]) -> str:
    """A short line for the live view: ``iris:2 running wave 2 (3/4)``."""
    waves = view.get("waves") or []
    current = view.get("current_wave", 0)
    name = waves[current]["name"] if current < len(waves) else "?"
    return f"{model}:{view.get('version')} {view.get('state')} {name} ({current + 1}/{len(waves)})"


@dataclass
class WaveReport:
    index: int
    name: str  # "canary", "wave 1", ...
    devices: int
    counts: dict[str, int]  # the hub's devices per state
    released: bool
    finished: bool
    # Seconds after the deployment was created, by the hub's clock: the first release of one of
    # its devices, and the last state change of its devices once none of them is moving.
    started_s: float | None = None
    finished_s: float | None = None


@dataclass
class OutsideWaves:
    """The devices of waves never released (cancelled when the rollout aborted): none of them
    may hear of the deployment."""

    devices: int = 0
    received: int = 0  # sent an event for the deployment, or accepted a desired state naming it
    with_events: int = 0
    desired_names_it: int = 0
    # Accepted any new desired state meanwhile: with no reconnect that means touched; a device
    # that reconnected was re-sent its unchanged desired state under a new counter.
    desired_counter_changed: int = 0


@dataclass
class RolloutReport:
    deployment_id: str
    model: str
    version: int
    devices: int  # the targets the step named
    package_digest: str = ""
    state: str = "unknown"  # the hub's rollout state when following ended
    reason: str = ""  # the hub's reason for that state
    done: bool = False  # the hub says nothing is left to happen
    ok: bool = False  # ... and no device failed, timed out or was rolled back
    expected: str | None = None
    as_expected: bool | None = None  # None: nothing was expected
    counts: dict[str, int] = field(default_factory=dict)  # the hub's devices per state
    succeeded: int = 0
    failed: int = 0
    timed_out: int = 0
    unfinished: int = 0  # pending, in progress, soaking or rolling back when following ended
    waves: list[WaveReport] = field(default_factory=list)
    history: list[dict[str, Any]] = field(default_factory=list)  # at_s after creation, ...
    # From the devices' own events: installs (the package reported active) -> devices.
    installs_per_device: dict[str, int] = field(default_factory=dict)
    installed_more_than_once: list[str] = field(default_factory=list)
    switched_back: int = 0  # devices that reported their previous package active again for it
    outside_waves: OutsideWaves = field(default_factory=OutsideWaves)
    time_to_active_s: dict[str, float | None] = field(default_factory=dict)  # from the request
    failures_by_reason: dict[str, int] = field(default_factory=dict)  # the devices' reasons
    api_errors: int = 0  # polls the hub did not answer (while it restarted, say)
    elapsed_s: float = 0.0

    def lines(self) -> list[str]:
        """The rollout's lines of the human report."""
        counts = ", ".join(f"{k} {v}" for k, v in self.counts.items()) or "no devices"
        verdict = {None: "", True: " as expected", False: " NOT AS EXPECTED"}[self.as_expected]
        reason = f" ({self.reason})" if self.reason else ""
        lines = [
            f"  deploy {self.model}:{self.version} ({self.deployment_id}) to {self.devices}:"
            f" {self.state}{verdict}{reason} after {self.elapsed_s:.1f} s",
            f"    hub: {counts}",
        ]
        for w in self.waves:
            when = "not released"
            if w.started_s is not None:
                end = "..." if w.finished_s is None else f"{w.finished_s:.1f}"
                when = f"{w.started_s:.1f}-{end} s"
            states = ", ".join(f"{k} {v}" for k, v in sorted(w.counts.items()))
            lines.append(f"    {w.name}: {w.devices} devices, {when}: {states}")
        installs = ", ".join(f"{n}x {d}" for n, d in self.installs_per_device.items())
        lines.append(
            f"    devices: installs per device {installs}; switched back {self.switched_back};"
            f" time to active {format_percentiles(self.time_to_active_s)}"
        )
        lines += [f"    failed {k}: {v}" for k, v in self.failures_by_reason.items()]
        o = self.outside_waves
        if o.devices:
            lines.append(
                f"    outside the released waves: {o.devices} devices, {o.received} heard of it"
                f" ({o.with_events} sent events, {o.desired_names_it} were told to install it)"
            )
        if self.api_errors:
            lines.append(f"    polls the hub did not answer: {self.api_errors}")
        return lines


def _at(text: str) -> datetime:
    return datetime.fromisoformat(text)


def _seconds_after(start: datetime, text: str | None) -> float | None:
    return None if text is None else round((_at(text) - start).total_seconds(), 3)


def wave_reports(view: Mapping[str, Any]) -> list[WaveReport]:
    """Each wave with its counts and, from the device rows when the view has them, its times."""
    created = _at(view["created_at"])
    rows = [r for r in view.get("devices") or [] if r["state"] not in ("skipped", "overridden")]
    reports = []
    for wave in view.get("waves", []):
        report = WaveReport(
            index=wave["index"],
            name=wave["name"],
            devices=wave["devices"],
            counts=dict(wave["counts"]),
            released=wave["released"],
            finished=wave["finished"],
        )
        mine = [r for r in rows if r["wave"] == wave["index"]]
        released = [r["released_at"] for r in mine if r["released_at"]]
        if released:
            report.started_s = _seconds_after(created, min(released, key=_at))
        if released and wave["finished"] and mine:
            report.finished_s = _seconds_after(
                created, max((r["state_changed_at"] for r in mine), key=_at)
            )
        reports.append(report)
    return reports


def history_report(
    view: Mapping[str, Any], history: Sequence[Mapping[str, Any]]
) -> list[dict[str, Any]]:
    """The hub's history of the deployment, its times in seconds after it was created."""
    created = _at(view["created_at"])
    return [
        {
            "at_s": _seconds_after(created, entry["at"]),
            "actor": entry["actor"],
            "action": entry["action"],
            "detail": entry["detail"],
        }
        for entry in history
    ]


def outside_waves(
    view: Mapping[str, Any],
    devices: Mapping[str, SimulatedDevice],
    *,
    desired_before: Mapping[str, int],
    desired_after: Mapping[str, DesiredSeen],
) -> OutsideWaves:
    """What the devices of the waves never released heard of the deployment."""
    deployment_id = view["id"]
    outside = OutsideWaves()
    for device_id in outside_wave_devices(view):
        outside.devices += 1
        device = devices.get(device_id)
        events = device is not None and deployment_id in device.record.deployments
        seen = desired_after.get(device_id)
        names_it = seen is not None and deployment_id in seen.deployments
        changed = seen is not None and seen.counter != desired_before.get(device_id)
        outside.with_events += events
        outside.desired_names_it += names_it
        outside.desired_counter_changed += changed
        outside.received += events or names_it
    return outside


def outside_wave_devices(view: Mapping[str, Any]) -> list[str]:
    """The devices of the waves the rollout never released (needs the view's device rows)."""
    unreleased = {w["index"] for w in view.get("waves", []) if not w["released"]}
    return [
        r["device_id"]
        for r in view.get("devices") or []
        if r["wave"] in unreleased and r["state"] not in ("skipped", "overridden")
    ]


def rollout_report(
    devices: Sequence[SimulatedDevice],
    *,
    created: Mapping[str, Any],
    view: Mapping[str, Any] | None,
    history: Sequence[Mapping[str, Any]],
    desired_before: Mapping[str, int],
    desired_after: Mapping[str, DesiredSeen],
    expected: str | None,
    started_at: float,
    ended_at: float,
    api_errors: int,
) -> RolloutReport:
    """How one deployment went: the hub's ``view`` of it (the last one read, with the device
    rows when it could be read at the end) beside what the targeted ``devices`` reported."""
    deployment_id = str(created["id"])
    digest = str(created["package_digest"])
    report = RolloutReport(
        deployment_id,
        str(created["model"]),
        int(created["version"]),
        devices=len(devices),
        package_digest=digest,
        expected=expected,
        api_errors=api_errors,
        elapsed_s=round(ended_at - started_at, 3),
    )
    if view is not None:
        counts = {str(k): int(v) for k, v in view["counts"].items()}
        report.state = str(view["state"])
        report.reason = str(view["state_reason"])
        report.done, report.ok = bool(view["done"]), bool(view["ok"])
        report.counts = dict(sorted(counts.items()))
        report.succeeded = counts.get("succeeded", 0)
        report.failed = counts.get("failed", 0)
        report.timed_out = counts.get("timed_out", 0)
        report.unfinished = sum(counts.get(s, 0) for s in UNFINISHED)
        report.waves = wave_reports(view)
        report.history = history_report(view, history)
        if view.get("devices") is not None:
            report.outside_waves = outside_waves(
                view,
                {d.device_id: d for d in devices},
                desired_before=desired_before,
                desired_after=desired_after,
            )
    if expected is not None:
        report.as_expected = report.done and report.state == expected

    installs: Counter[int] = Counter()
    reasons: Counter[str] = Counter()
    times: list[float] = []
    for device in devices:
        trace = device.record.deployments.get(deployment_id)
        count = trace.installs(digest) if trace is not None else 0
        installs[count] += 1
        if count > 1:
            report.installed_more_than_once.append(device.device_id)
        if trace is None:
            continue
        if (active_at := trace.active_at(digest)) is not None:
            times.append(active_at - started_at)
        if any(d != digest for d, _ in trace.actives):
            report.switched_back += 1
        if trace.failed is not None:
            reasons[trace.failed] += 1
    report.installs_per_device = {str(n): installs[n] for n in sorted(installs)}
    report.time_to_active_s = percentiles(times)
    report.failures_by_reason = dict(sorted(reasons.items()))
    return report
