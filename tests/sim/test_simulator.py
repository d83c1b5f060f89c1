"""The fleet simulator: many real agents on one event loop, against a real Mosquitto.

The hub is played by the scripted FakeHub and RepositorySimulator, so this needs no hub code.
"""

import asyncio
import random
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest

from agent.protocol.messages import Step
from outpost_sim.cli import main
from outpost_sim.fleet import Fleet, device_dir, ramp_delays
from outpost_sim.runtimes import SharedRuntimes
from tests.support.agents import fast_settings, write_identity
from tests.support.fake_hub import FakeHub
from tests.support.repository import RepositorySimulator, iris_files

DEVICES = 50
ROOT = Path(__file__).resolve().parents[2]


class FleetThread:
    """A fleet on its own event loop in one background thread (as AgentThread does for one)."""

    def __init__(self, fleet: Fleet) -> None:
        self.fleet = fleet
        self.loop: asyncio.AbstractEventLoop | None = None
        self._stop: asyncio.Event | None = None
        self._ready = threading.Event()
        self.error: BaseException | None = None
        self._thread = threading.Thread(target=self._main, name="fleet-loop", daemon=True)

    def _main(self) -> None:
        async def body() -> None:
            self.loop = asyncio.get_running_loop()
            self._stop = asyncio.Event()
            self._ready.set()
            await self.fleet.run(self._stop)

        try:
            asyncio.run(body())
        except BaseException as exc:  # reported to the test by stop()
            self.error = exc
            self._ready.set()

    def start(self) -> None:
        self._thread.start()
        if not self._ready.wait(20):
            raise TimeoutError("fleet did not start")

    def call(self, fn: Callable[[], Any], timeout_s: float = 10.0) -> Any:
        """Run ``fn`` on the fleet's loop (where the agents live) and return its result."""
        assert self.loop is not None

        async def run() -> Any:
            return fn()

        return asyncio.run_coroutine_threadsafe(run(), self.loop).result(timeout_s)

    def stop(self) -> None:
        if self.loop is not None and self._stop is not None and self._thread.is_alive():
            self.loop.call_soon_threadsafe(self._stop.set)
        self._thread.join(30)
        if self._thread.is_alive():
            raise TimeoutError("fleet did not stop")
        if self.error is not None:
            raise self.error


def test_ramp_spreads_every_start_over_the_window_in_order() -> None:
    delays = ramp_delays(100, 10.0, random.Random(7))
    assert all(0.0 <= d < 10.0 for d in delays)
    # One jittered slot each: device i starts within [i, i+1) tenths of the window.
    assert all(i * 0.1 <= d < (i + 1) * 0.1 for i, d in enumerate(delays))
    assert len(set(delays)) == 100
    assert ramp_delays(0, 10.0, random.Random(7)) == []


@pytest.mark.integration
def test_fleet_of_real_agents_installs_one_package_on_one_loop_with_one_runtime(
    hub: FakeHub, mosquitto: Any, iris_model: Any, tmp_path: Path
) -> None:
    repo = RepositorySimulator()
    package = repo.build_package(iris_files(iris_model.directory))
    hub.offer(package)
    device_ids = [f"sim-{i:05d}" for i in range(1, DEVICES + 1)]
    passwords = mosquitto.add_devices(device_ids)
    state_dirs = []
    for index, device_id in enumerate(device_ids, start=1):
        state_dir = device_dir(tmp_path / "fleet", index)
        write_identity(
            state_dir,
            device_id=device_id,
            host=mosquitto.host,
            port=mosquitto.port,
            password=passwords[device_id],
            root_public_key=repo.root.public_b64,
            keyring=repo.keyring(),
        )
        hub.desired[device_id] = repo.desired_message([package.ref], device_id=device_id)
        state_dirs.append(state_dir)

    fleet = Fleet(state_dirs=state_dirs, settings=fast_settings(tmp_path / "unused"), ramp_s=2.0)
    assert [a.device_id for a in fleet.agents] == device_ids
    threads_before = threading.active_count()
    runner = FleetThread(fleet)
    started = time.monotonic()
    runner.start()
    try:

        def all_active() -> bool:
            done = {
                device
                for device, event in hub.events
                if event.deployment_id == package.ref.deployment_id and event.step is Step.ACTIVE
            }
            return done == set(device_ids)

        hub.wait_for(all_active, timeout_s=120)
        elapsed_s = time.monotonic() - started
        assert [(d, e.reason) for d, e in hub.events if e.step is Step.FAILED] == []

        # No thread per device: the loop's thread plus the bounded install pool, nothing more.
        assert threading.active_count() - threads_before <= 1 + fleet.io_threads
        tasks = runner.call(lambda: {t.get_name() for t in asyncio.all_tasks()})
        assert {f"{d}-mqtt" for d in device_ids} <= tasks, "every device runs on this one loop"

        summary = runner.call(fleet.summary)
        assert summary.connected == DEVICES
        assert summary.started == DEVICES
        assert summary.active == {"iris:1": DEVICES}
        assert (summary.failed, summary.crashed, summary.malformed_received) == (0, 0, 0)
        assert summary.runtimes_loaded == 1
    finally:
        runner.stop()

    # One model loaded once, the same runtime object serving every device.
    assert fleet.runtimes.loads == 1
    assert fleet.runtimes.hits == DEVICES - 1
    runtimes = {id(model.runtime) for a in fleet.agents if (model := a.get("iris")) is not None}
    assert len(runtimes) == 1
    assert len([a for a in fleet.agents if a.get("iris") is not None]) == DEVICES
    # Graceful stop: every device said so itself instead of leaving it to the will.
    hub.wait_for(
        lambda: (
            {d for d, s in hub.statuses if not s.online and s.reason == "shutdown"}
            == set(device_ids)
        )
    )
    print(f"\n{DEVICES} devices active after {elapsed_s:.2f} s")  # visible with -s


def test_shared_runtimes_load_each_model_once_and_not_a_failure(tmp_path: Path) -> None:
    repo = RepositorySimulator()
    files = {"model.onnx": b"m1", "sample_input.json": b"[]", "expected_output.json": b"[]"}
    v1 = repo.build_package(files, version=1).manifest
    v2 = repo.build_package(files, version=2).manifest  # same model bytes: same runtime
    other = repo.build_package({**files, "model.onnx": b"m2"}, version=3).manifest
    calls: list[int] = []
    fail_next = [False]

    def load(model_dir: Path, manifest: Any) -> Any:
        if fail_next[0]:
            fail_next[0] = False
            raise RuntimeError("cannot load")
        calls.append(manifest.model.version)
        return object()

    shared = SharedRuntimes(load)
    first = shared(tmp_path / "a", v1)
    assert shared(tmp_path / "b", v1) is first
    assert shared(tmp_path / "c", v2) is first
    fail_next[0] = True
    with pytest.raises(RuntimeError):
        shared(tmp_path / "d", other)
    second = shared(tmp_path / "d", other)
    assert second is not first
    assert calls == [1, 3]
    assert (shared.loads, shared.hits, len(shared)) == (2, 2, 2)


def test_cli_refuses_to_run_devices_that_are_not_enrolled_without_a_hub(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    assert main(["run", "--devices", "2", "--state-dir", str(tmp_path)]) == 2
    assert "2 devices are not enrolled yet: give an enrolment token" in capsys.readouterr().err
