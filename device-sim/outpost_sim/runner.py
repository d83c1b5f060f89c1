"""Running a scenario: enrol what is missing, start the fleet, do the steps, report.

The fleet runs on this process's event loop; the steps run beside it on the same loop, so they
read the agents' state directly. Hub calls (blocking HTTP) go to a thread.
"""

import asyncio
import logging
import signal
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from agent.aio import wait_set
from agent.enroll import DeviceRequest
from agent.errors import AgentError
from agent.settings import AgentSettings
from outpost_sim.device import SimulatedDevice
from outpost_sim.enrollment import (
    DeviceToEnroll,
    EnrollmentReport,
    ProgressCallback,
    enroll_devices,
    is_enrolled,
)
from outpost_sim.faults import DeviceSlot, plan_faults
from outpost_sim.fleet import Fleet
from outpost_sim.hubapi import HubApi, HubApiError
from outpost_sim.report import ResourceMeter, RunReport, run_report
from outpost_sim.rollout import (
    RolloutReport,
    desired_of,
    outside_wave_devices,
    progress_label,
    rollout_report,
    settled,
)
from outpost_sim.scenario import (
    DeployStep,
    IdleStep,
    Scenario,
    Step,
    TelemetryStep,
    WaitConnectedStep,
)
from outpost_sim.view import ProgressView

logger = logging.getLogger(__name__)

POLL_S = 0.1  # how often a step looks at the fleet while it waits for something
FOLLOW_POLL_S = 0.5  # how often a deploy step asks the hub how its rollout stands


@dataclass(frozen=True)
class PlannedDevice:
    index: int
    group: str
    state_dir: Path


def plan_devices(scenario: Scenario) -> list[PlannedDevice]:
    """Every device of the scenario with its state directory, ``<base>/<group>-00001``..."""
    base = scenario.base_dir()
    planned: list[PlannedDevice] = []
    for group in scenario.fleet:
        for n in range(1, group.count + 1):
            planned.append(
                PlannedDevice(len(planned), group.group, base / f"{group.group}-{n:05d}")
            )
    return planned


def enroll_scenario(
    scenario: Scenario, *, on_progress: ProgressCallback | None = None
) -> EnrollmentReport | None:
    """Enrol the scenario's devices that have no identity yet; None when none was missing.

    The enrolment token is the scenario's, or one made for exactly the missing devices with
    the hub's admin token.
    """
    groups = {g.group: g for g in scenario.fleet}
    missing = [p for p in plan_devices(scenario) if not is_enrolled(p.state_dir)]
    if not missing:
        return None
    token = scenario.hub.enrollment_token
    if not token:
        admin_token = scenario.hub.resolved_admin_token()
        if not admin_token:
            raise AgentError(
                f"{len(missing)} devices are not enrolled yet: give an enrolment token (--token,"
                " hub.enrollment_token) or the hub's admin token (hub.admin_token_file)"
            )
        token = HubApi(scenario.hub.url, admin_token).create_enrollment_token(uses=len(missing))
    devices = [
        DeviceToEnroll(
            p.state_dir,
            DeviceRequest(
                name=p.state_dir.name,
                device_class=groups[p.group].profile.device_class,
                tags=groups[p.group].profile.tags,
            ),
        )
        for p in missing
    ]
    return enroll_devices(
        hub_url=scenario.hub.url, token=token, devices=devices, on_progress=on_progress
    )


def agent_settings(scenario: Scenario, config_file: Path | None = None) -> AgentSettings:
    # Simulated devices serve no scoring endpoint: thousands of them would fight over ports.
    overrides: dict[str, Any] = dict(scenario.agent)
    overrides["scoring"] = {**overrides.get("scoring", {}), "enabled": False}
    overrides["mqtt"] = {"heartbeat_s": scenario.heartbeat_s, **overrides.get("mqtt", {})}
    return AgentSettings.load(config_file, **overrides)


class ScenarioRunner:
    def __init__(
        self,
        scenario: Scenario,
        *,
        view: ProgressView,
        config_file: Path | None = None,
        duration_s: float | None = None,
    ) -> None:
        self.scenario = scenario
        self.view = view
        self.duration_s = duration_s
        self.planned = plan_devices(scenario)
        groups = {g.group: g for g in scenario.fleet}
        self.plan = plan_faults(
            scenario.faults,
            [DeviceSlot(p.index, p.group) for p in self.planned],
            seed=scenario.seed,
            horizon_s=scenario.horizon_s() if duration_s is None else duration_s,
        )
        self.fleet = Fleet(
            state_dirs=[p.state_dir for p in self.planned],
            settings=agent_settings(scenario, config_file),
            ramp_s=scenario.ramp_s,
            io_threads=scenario.io_threads,
            profiles=[groups[p.group].profile for p in self.planned],
            fault_plan=self.plan,
        )
        self.api = HubApi(scenario.hub.url, scenario.hub.resolved_admin_token())
        self.rollouts: list[RolloutReport] = []
        self.step_label = "starting"
        # The version a deploy step rolls out, which the live view counts ("iris:2").
        self.step_target: str | None = None
        self._stop = asyncio.Event()

    async def run(self) -> RunReport:
        meter = ResourceMeter()
        started = time.monotonic()
        loop = asyncio.get_running_loop()
        # Signals reach only the main thread's loop; elsewhere (tests) stop() is the way.
        handles_signals = threading.current_thread() is threading.main_thread()
        if handles_signals:
            for sig in (signal.SIGINT, signal.SIGTERM):
                loop.add_signal_handler(sig, self._stop.set)
        fleet_task = asyncio.create_task(self.fleet.run(self._stop), name="fleet")
        view_task = asyncio.create_task(self._show_progress(meter), name="progress")
        try:
            await self._script()
        finally:
            self._stop.set()
            await fleet_task
            await view_task
            if handles_signals:
                for sig in (signal.SIGINT, signal.SIGTERM):
                    loop.remove_signal_handler(sig)
            self.view.done()
        report = run_report(
            scenario=self.scenario.name,
            seed=self.scenario.seed,
            fleet=self.fleet,
            rollouts=self.rollouts,
            meter=meter,
            elapsed_s=time.monotonic() - started,
        )
        if self.api.admin_token:
            try:
                report.hub_messages = await asyncio.to_thread(self.api.message_stats)
            except HubApiError as exc:
                logger.warning("could not read the hub's message counters: %s", exc.detail)
        return report

    def stop(self) -> None:
        """Stop the run (from the runner's loop); the report covers what happened so far."""
        self._stop.set()

    async def _script(self) -> None:
        if not self.scenario.steps:
            self.step_label = "running"
            await self._until(lambda: False, self.duration_s)
            return
        for number, step in enumerate(self.scenario.steps, start=1):
            if self._stop.is_set():
                return
            self.step_label = f"step {number}/{len(self.scenario.steps)} {step.do}"
            self.step_target = None
            await self._do(step)
        if self.scenario.linger_s:
            self.step_label = "lingering"
            await self._until(lambda: False, self.scenario.linger_s)

    async def _do(self, step: Step) -> None:
        if isinstance(step, DeployStep):
            await self._deploy(step)
        elif isinstance(step, IdleStep):
            await self._until(lambda: False, step.for_s)
        elif isinstance(step, TelemetryStep):
            await self._telemetry(step)
        else:
            await self._wait_connected(step)

    async def _until(self, done: Callable[[], bool], timeout_s: float | None) -> bool:
        """Wait until ``done()``, the timeout or the stop; True when ``done()`` held."""
        deadline = None if timeout_s is None else time.monotonic() + timeout_s
        while not done():
            left = None if deadline is None else deadline - time.monotonic()
            if left is not None and left <= 0:
                return False
            if await wait_set(self._stop, POLL_S if left is None else min(left, POLL_S)):
                return False
        return True

    async def _wait_connected(self, step: WaitConnectedStep) -> None:
        need = step.fraction * len(self.fleet.devices)
        await self._until(
            lambda: sum(a.connected for a in self.fleet.agents) >= need, step.timeout_s
        )

    def _targets(self, step: DeployStep) -> list[SimulatedDevice]:
        groups = set(step.groups or [p.group for p in self.planned])
        return [
            d for d, p in zip(self.fleet.devices, self.planned, strict=True) if p.group in groups
        ]

    async def _deploy(self, step: DeployStep) -> None:
        targets = self._targets(step)
        # Before the request: what each target had accepted, to tell later who heard of it.
        before = await asyncio.to_thread(desired_of, targets)
        started = time.monotonic()
        created = await asyncio.to_thread(
            self.api.deploy, step.body([d.device_id for d in targets])
        )
        deployment_id = str(created["id"])
        self.step_label = f"deploy {step.model}:{created['version']}"
        self.step_target = f"{step.model}:{created['version']}"
        view, api_errors = await self._follow(deployment_id, step)
        ended = time.monotonic()
        history: list[dict[str, Any]] = []
        try:
            # Once more with every device's row, for the waves' times and who was outside them.
            view = await asyncio.to_thread(self.api.deployment, deployment_id, devices=True)
            history = await asyncio.to_thread(self.api.history, deployment_id)
        except HubApiError as exc:
            api_errors += 1
            logger.warning("cannot read deployment %s at its end: %s", deployment_id, exc.detail)
        by_id = {d.device_id: d for d in targets}
        outside = [by_id[i] for i in outside_wave_devices(view or {}) if i in by_id]
        after = await asyncio.to_thread(desired_of, outside)
        self.rollouts.append(
            rollout_report(
                targets,
                created=created,
                view=view,
                history=history,
                desired_before={i: seen.counter for i, seen in before.items()},
                desired_after=after,
                expected=step.expect,
                started_at=started,
                ended_at=ended,
                api_errors=api_errors,
            )
        )

    async def _follow(
        self, deployment_id: str, step: DeployStep
    ) -> tuple[dict[str, Any] | None, int]:
        """Poll the rollout until it has settled, the step's timeout or the stop; returns the
        last view read and how many polls the hub did not answer (it may be restarting: the
        rollout goes on meanwhile, so keep asking)."""
        deadline = time.monotonic() + step.timeout_s
        view: dict[str, Any] | None = None
        errors = 0
        while not self._stop.is_set():
            try:
                view = await asyncio.to_thread(self.api.deployment, deployment_id)
            except HubApiError as exc:
                errors += 1
                logger.info("hub did not answer about %s: %s", deployment_id, exc.detail)
            else:
                self.step_label = progress_label(step.model, view)
                if settled(view):
                    break
            left = deadline - time.monotonic()
            if left <= 0:
                logger.warning("stopped following %s after %g s", deployment_id, step.timeout_s)
                break
            await self._until(lambda: False, min(FOLLOW_POLL_S, left))
        return view, errors

    async def _telemetry(self, step: TelemetryStep) -> None:
        """Every device beats every ``interval_s``, each at its own offset in the interval, as
        a fleet's independent clocks would (not all in the same millisecond)."""
        devices = self.fleet.devices
        ends = time.monotonic() + step.for_s
        slot_s = step.interval_s / max(len(devices), 1)
        beats = 0
        started = time.monotonic()
        n = 0
        while not self._stop.is_set() and time.monotonic() < ends:
            device = devices[n % len(devices)]
            now = time.monotonic()
            beats += device.agent.send_heartbeat(uptime_s=now - (device.record.started_at or now))
            n += 1
            # Sleep only when ahead of the schedule: one wake-up per few ms, not per device.
            ahead_s = started + n * slot_s - time.monotonic()
            if ahead_s > 0.005:
                await self._until(lambda: False, ahead_s)
        logger.info("telemetry step sent %d heartbeats", beats)

    async def _show_progress(self, meter: ResourceMeter) -> None:
        while not self._stop.is_set():
            self.view.show(self.step_label, self.fleet, meter, self.step_target)
            await wait_set(self._stop, self.view.interval_s)
