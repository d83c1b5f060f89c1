"""The real agent process SIGKILLed at every named crash point (OUTPOST_FAILPOINT=...:kill):
on restart it is on the old or the new version, never between, then finishes the update."""

import os
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

from agent.archive import ArchiveLimits
from agent.failpoints import INSTALL_PATH, Failpoint
from agent.install import ModelStore, TrustContext
from agent.protocol.messages import Step
from agent.runtimes import load_runtime
from agent.runtimes.health import check_health
from agent.state import StateDir
from agent.trust import verify_keyring
from tests.support.agents import DEVICE, running_agent
from tests.support.fake_hub import FakeHub
from tests.support.repository import NOW, RepositorySimulator, iris_files

pytestmark = pytest.mark.integration
ROOT = Path(__file__).resolve().parents[2]
# Test-speed timers for the agent process, through its environment.
FAST_ENV = {
    "OUTPOST_AGENT_SCORING__ENABLED": "false",
    "OUTPOST_AGENT_EVENT_RESEND_S": "1",
    "OUTPOST_AGENT_MQTT__BACKOFF_BASE_S": "0.05",
    "OUTPOST_AGENT_MQTT__BACKOFF_CAP_S": "0.5",
    "OUTPOST_AGENT_DOWNLOAD__CHUNK_TIMEOUT_S": "0.5",
    "OUTPOST_AGENT_DOWNLOAD__LISTEN_S": "0.05",
}


def _agent_process(state_dir: Path, **env: str) -> subprocess.Popen[str]:
    return subprocess.Popen(
        [sys.executable, "-m", "agent.main", "--state-dir", str(state_dir), "run"],
        cwd=ROOT,
        env={**os.environ, "PYTHONPATH": str(ROOT), **FAST_ENV, **env},
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
        text=True,
    )


def _served_version(state_dir: Path, repo: RepositorySimulator) -> int:
    """What the device serves after a restart, loaded and re-verified from disk alone."""
    keyring = verify_keyring(
        repo.keyring(), root_public_b64=repo.root.public_b64, current=None, now=NOW
    )
    store = ModelStore(
        StateDir(state_dir).models,
        load_runtime=load_runtime,
        check_health=check_health,
        limits=ArchiveLimits(),
    )
    active = store.load_active("iris", TrustContext(keyring, "generic", "0.1.0"))
    assert active is not None, "the device must serve a whole version"
    return active.version


def _serving_v1_told_to_install_v2(
    hub: FakeHub, repo: RepositorySimulator, state_dir: Path, iris_model: Any
) -> Any:
    """The device installs v1 (the agent then stops), and the hub's desired state names v2;
    returns v2's package."""
    files = iris_files(iris_model.directory)
    v1 = repo.build_package(files, version=1)
    v2 = repo.build_package(files, version=2)
    hub.offer(v1, v2)
    hub.desired[DEVICE] = repo.desired_message([v1.ref])
    with running_agent(state_dir):
        hub.wait_for(lambda: any(e.step is Step.ACTIVE for _, e in hub.events))
    hub.desired[DEVICE] = repo.desired_message([v2.ref])
    return v2


@pytest.mark.parametrize("point", INSTALL_PATH, ids=str)
def test_killed_at_each_crash_point_the_device_serves_old_or_new_then_updates(
    point: Failpoint, hub: FakeHub, repo: RepositorySimulator, state_dir: Path, iris_model: Any
) -> None:
    v2 = _serving_v1_told_to_install_v2(hub, repo, state_dir, iris_model)
    killed = _agent_process(state_dir, OUTPOST_FAILPOINT=f"{point}:kill")
    try:
        killed.wait(timeout=60)
    finally:
        killed.kill()
    assert killed.returncode == -9, killed.stderr.read() if killed.stderr else ""
    # Old until the pointer switch, new from it on; never a half-installed version.
    assert _served_version(state_dir, repo) == (2 if point is Failpoint.AFTER_SWITCH else 1)

    restarted = _agent_process(state_dir)
    try:
        hub.wait_for(
            lambda: any(
                e.step is Step.ACTIVE and e.deployment_id == v2.ref.deployment_id
                for _, e in hub.events
            ),
            timeout_s=60,
        )
    finally:
        restarted.terminate()
        restarted.wait(timeout=30)
    assert _served_version(state_dir, repo) == 2
    assert StateDir(state_dir).load_progress().installing is None


def test_a_runtime_crashing_on_a_new_model_leaves_the_agent_process_running_the_old_one(
    hub: FakeHub, repo: RepositorySimulator, state_dir: Path, iris_model: Any
) -> None:
    """THREATS.md C4 on the real daemon: v2 crashes its runtime (SIGSEGV in the trial process
    that loads it first, injected there); the install fails with E_MODEL_LOAD, reported to the
    hub, and the agent process lives on, serving v1."""
    v2 = _serving_v1_told_to_install_v2(hub, repo, state_dir, iris_model)
    agent = _agent_process(state_dir, OUTPOST_FAILPOINT="in_trial_load:segv")
    try:

        def v2_failed() -> list[Any]:
            return [
                e
                for _, e in hub.events
                if e.step is Step.FAILED and e.deployment_id == v2.ref.deployment_id
            ]

        hub.wait_for(lambda: bool(v2_failed()), timeout_s=60)
        failed = v2_failed()[0]
        assert failed.reason == "E_MODEL_LOAD"
        assert "killed a trial process with SIGSEGV" in failed.detail
        assert agent.poll() is None  # still running
    finally:
        agent.terminate()
        agent.wait(timeout=30)
    assert agent.returncode == 0, agent.stderr.read() if agent.stderr else ""
    assert _served_version(state_dir, repo) == 1
