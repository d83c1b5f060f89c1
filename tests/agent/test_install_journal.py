"""The install journal: an agent that dies mid-install comes back on a whole version and
serving, retries, and gives a version up after it has crashed the agent three times."""

import json
from pathlib import Path
from typing import Any

import pytest

from agent.core import MAX_INSTALL_ATTEMPTS, Agent
from agent.failpoints import INSTALL_PATH, Action, Failpoint, FailpointCrash, Failpoints
from agent.protocol.messages import Reason, Step
from agent.runtimes import load_runtime
from agent.runtimes.health import check_health
from agent.state import StateDir
from tests.support.agents import DEVICE, AgentThread, fast_settings
from tests.support.fake_hub import FakeHub
from tests.support.repository import RepositorySimulator, iris_files

pytestmark = pytest.mark.integration


def _run_until_crash(state_dir: Path, point: Failpoint) -> None:
    """Run an agent whose install crashes at ``point``; return once it has."""
    runner = AgentThread(
        lambda: Agent(
            settings=fast_settings(state_dir),
            load_runtime=load_runtime,
            check_health=check_health,
            failpoints=Failpoints({point: Action.CRASH}),
        )
    )
    runner.start()
    with pytest.raises(FailpointCrash):
        runner.join(timeout_s=30)


def _steps(hub: FakeHub, deployment_id: str) -> list[Step]:
    return [e.step for _, e in hub.events if e.deployment_id == deployment_id]


def test_a_version_that_keeps_crashing_the_agent_is_given_up_and_v1_keeps_serving(
    hub: FakeHub, repo: RepositorySimulator, state_dir: Path, iris_model: Any
) -> None:
    files = iris_files(iris_model.directory)
    v1 = repo.build_package(files, version=1)
    v2 = repo.build_package(files, version=2)
    hub.offer(v1, v2)
    hub.desired[DEVICE] = repo.desired_message([v1.ref])
    runner = AgentThread(
        lambda: Agent(
            settings=fast_settings(state_dir), load_runtime=load_runtime, check_health=check_health
        )
    )
    runner.start()
    hub.wait_for(lambda: Step.ACTIVE in _steps(hub, v1.ref.deployment_id))
    runner.stop()

    hub.desired[DEVICE] = repo.desired_message([v2.ref])
    for attempt in range(1, MAX_INSTALL_ATTEMPTS + 1):
        _run_until_crash(state_dir, Failpoint.AFTER_LOAD)
        progress = StateDir(state_dir).load_progress()
        assert progress.installing is not None
        assert progress.installing.attempts == attempt
        # Whatever the crash left in the model's directory, the pointer still names v1.
        pointer = json.loads((state_dir / "models" / "iris" / "active.json").read_text())
        assert pointer["version"] == 1

    # The next start gives v2 up instead of crashing again, reports why, and serves v1.
    runner = AgentThread(
        lambda: Agent(
            settings=fast_settings(state_dir), load_runtime=load_runtime, check_health=check_health
        )
    )
    agent = runner.start()
    try:
        hub.wait_for(
            lambda: any(
                e.step is Step.FAILED and e.reason is Reason.CRASH_LOOP
                for _, e in hub.events
                if e.deployment_id == v2.ref.deployment_id
            )
        )
        active = runner.call(lambda: agent.get("iris"))
        assert active.version == 1
        progress = StateDir(state_dir).load_progress()
        assert progress.installing is None
        assert progress.bad[v2.ref.digest].reason == "E_CRASH_LOOP"
        # Only v1 and no leftovers: the half-installed v2 directories were removed.
        names = sorted(p.name for p in (state_dir / "models" / "iris").iterdir())
        assert [n for n in names if n.startswith(".staging")] == []
        assert [n for n in names if n.startswith("v2")] == []
    finally:
        runner.stop()


@pytest.mark.parametrize("point", INSTALL_PATH, ids=str)
def test_a_crash_at_any_step_restarts_into_a_whole_version_and_completes(
    point: Failpoint, hub: FakeHub, repo: RepositorySimulator, state_dir: Path, iris_model: Any
) -> None:
    package = repo.build_package(iris_files(iris_model.directory))
    hub.offer(package)
    hub.desired[DEVICE] = repo.desired_message([package.ref])
    _run_until_crash(state_dir, point)
    runner = AgentThread(
        lambda: Agent(
            settings=fast_settings(state_dir), load_runtime=load_runtime, check_health=check_health
        )
    )
    agent = runner.start()
    try:
        hub.wait_for(lambda: Step.ACTIVE in _steps(hub, package.ref.deployment_id))
        assert runner.call(lambda: agent.get("iris")) is not None
        hub.wait_for(lambda: StateDir(state_dir).load_progress().installing is None)
    finally:
        runner.stop()
