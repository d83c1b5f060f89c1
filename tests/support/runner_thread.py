"""A scenario run on its own event loop in a background thread, for tests that act on the hub or
the fleet while the simulator's runner follows a rollout."""

import asyncio
import sys
import threading
from collections.abc import Callable
from typing import Any

from outpost_sim.device import SimulatedDevice
from outpost_sim.report import RunReport, format_report
from outpost_sim.runner import ScenarioRunner, enroll_scenario
from outpost_sim.scenario import Scenario
from outpost_sim.view import ProgressView


class RunnerThread:
    """A scenario run on its own event loop in a background thread, so that the test can act
    on the hub and on the fleet while the runner follows the rollout."""

    def __init__(self, scenario: Scenario) -> None:
        assert enroll_scenario(scenario) is not None
        self.runner = ScenarioRunner(scenario, view=ProgressView(sys.stderr, interval_s=5.0))
        self.loop: asyncio.AbstractEventLoop | None = None
        self.result: RunReport | None = None
        self.error: BaseException | None = None
        self._thread = threading.Thread(target=self._main, name="scenario-loop", daemon=True)

    def _main(self) -> None:
        async def body() -> RunReport:
            self.loop = asyncio.get_running_loop()
            return await self.runner.run()

        try:
            self.result = asyncio.run(body())
        except BaseException as exc:  # raised in the test by report()
            self.error = exc

    def start(self) -> "RunnerThread":
        self._thread.start()
        return self

    def call(self, fn: Callable[[], Any], timeout_s: float = 10.0) -> Any:
        """Run ``fn`` on the fleet's loop (where the agents live) and return its result."""
        assert self.loop is not None

        async def run() -> Any:
            return fn()

        return asyncio.run_coroutine_threadsafe(run(), self.loop).result(timeout_s)

    def report(self, timeout_s: float) -> RunReport:
        """Wait for the scenario to end by itself; its report."""
        self._thread.join(timeout_s)
        if self._thread.is_alive():
            assert self.loop is not None
            self.loop.call_soon_threadsafe(self.runner.stop)
            self._thread.join(30)
            raise AssertionError(f"the scenario did not end within {timeout_s} s")
        if self.error is not None:
            raise self.error
        assert self.result is not None
        print(format_report(self.result))  # for -s: the report a person would read
        return self.result

    def group(self, name: str) -> list[SimulatedDevice]:
        """The devices of a fleet group, in fleet order."""
        return [
            d
            for d, p in zip(self.runner.fleet.devices, self.runner.planned, strict=True)
            if p.group == name
        ]
