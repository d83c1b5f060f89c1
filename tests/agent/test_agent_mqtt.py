"""The real agent core against a real Mosquitto (project config) and a scripted hub."""

import json
import tarfile
from pathlib import Path
from typing import Any

import pytest

from agent.protocol.messages import Reason, Step
from tests.support.agents import DEVICE, running_agent
from tests.support.fake_hub import FakeHub
from tests.support.repository import ExtraMember, RepositorySimulator, iris_files

pytestmark = pytest.mark.integration


def _steps(hub: FakeHub, deployment_id: str) -> list[Step]:
    return [e.step for _, e in hub.events if e.deployment_id == deployment_id]


def _terminal(hub: FakeHub, deployment_id: str) -> bool:
    return any(s in (Step.ACTIVE, Step.FAILED) for s in _steps(hub, deployment_id))


def test_agent_installs_reports_and_serves_after_restart_without_hub(
    hub: FakeHub, repo: RepositorySimulator, state_dir: Path, iris_model: Any
) -> None:
    files = iris_files(iris_model.directory)
    package = repo.build_package(files)
    hub.offer(package)
    hub.desired[DEVICE] = repo.desired_message([package.ref])

    with running_agent(state_dir) as (runner, agent):
        hub.wait_for(lambda: _terminal(hub, package.ref.deployment_id))
        steps = _steps(hub, package.ref.deployment_id)
        assert steps[-1] is Step.ACTIVE, hub.events
        for step in (Step.DOWNLOADING, Step.DOWNLOADED, Step.VERIFIED, Step.HEALTH_CHECK):
            assert step in steps
        seqs = [e.seq for _, e in hub.events]
        assert seqs == sorted(set(seqs)), "event sequence numbers must be unique and rising"
        sample = json.loads(files["sample_input.json"])
        expected = json.loads(files["expected_output.json"])
        active = runner.call(lambda: agent.get("iris"))
        assert active.runtime.predict(sample)["label"].tolist() == expected["label"]
        hub.wait_for(lambda: any(s.active for _, s in hub.states))
    # Graceful stop says so explicitly instead of leaving it to the will.
    hub.wait_for(lambda: any(not s.online and s.reason == "shutdown" for _, s in hub.statuses))

    hub.stop()  # the hub is gone: the device must still serve its model
    with running_agent(state_dir) as (restarted, agent2):
        active = restarted.call(lambda: agent2.get())
        assert active is not None
        assert active.digest == package.ref.digest


def test_tampered_package_fails_with_reason_and_v1_keeps_serving(
    hub: FakeHub, repo: RepositorySimulator, state_dir: Path, iris_model: Any
) -> None:
    files = iris_files(iris_model.directory)
    v1 = repo.build_package(files, version=1)
    v2 = repo.build_package(
        files, version=2, tamper={"model.onnx": files["model.onnx"][:-2] + b"\x00\x00"}
    )
    hub.offer(v1, v2)
    hub.desired[DEVICE] = repo.desired_message([v1.ref])
    with running_agent(state_dir) as (runner, agent):
        hub.wait_for(lambda: _terminal(hub, v1.ref.deployment_id))
        hub.publish_desired(DEVICE, repo.desired_message([v2.ref]))
        hub.wait_for(lambda: _terminal(hub, v2.ref.deployment_id))
        failed = [e for _, e in hub.events if e.deployment_id == v2.ref.deployment_id][-1]
        assert failed.step is Step.FAILED
        assert failed.reason is Reason.HASH
        assert runner.call(lambda: agent.get("iris")).version == 1
        # Marked bad: the same deployment is not retried on the next reconcile.
        hub.publish_desired(DEVICE, hub.desired[DEVICE])
        hub.wait_for(lambda: any(v2.ref.digest in s.bad for _, s in hub.states))
        assert _steps(hub, v2.ref.deployment_id).count(Step.FAILED) == 1


def test_replayed_forged_and_malformed_desired_states_are_refused(
    hub: FakeHub, repo: RepositorySimulator, state_dir: Path, iris_model: Any
) -> None:
    files = iris_files(iris_model.directory)
    v1 = repo.build_package(files, version=1)
    hub.offer(v1)
    old_message = repo.desired_message([])  # counter 1, empty
    hub.desired[DEVICE] = repo.desired_message([v1.ref])  # counter 2
    with running_agent(state_dir) as (runner, agent):
        hub.wait_for(lambda: _terminal(hub, v1.ref.deployment_id))
        topic = hub.topics.device(
            DEVICE, hub.topics.parse_device(f"outpost/d/{DEVICE}/desired").channel
        )
        cases = [
            (old_message, "E_REPLAY"),
            (repo.desired_message([], unsigned=True), "E_UNKNOWN_KEY"),
            (repo.desired_message([], signer=repo.release), "E_UNKNOWN_KEY"),
        ]
        for message, code in cases:
            hub.publish_raw(topic, message)
            hub.wait_for(
                lambda code=code: any(s.last_rejection.startswith(code) for _, s in hub.states)
            )
        for garbage in (b"", b"{", b'{"v":1}', b"\xff" * 100):
            hub.publish_raw(topic, garbage)
        hub.publish_raw("outpost/d/" + DEVICE + "/ack", b"not json")
        before = runner.call(lambda: agent.malformed_received)
        hub.publish_raw(topic, b"[]")
        hub.wait_for(lambda: runner.call(lambda: agent.malformed_received) > before)
        assert runner.call(lambda: agent.malformed_received) >= 6
        assert runner.call(lambda: agent.get("iris")).version == 1
        assert runner.call(lambda: agent.connected)


def test_download_resumes_after_lost_and_corrupt_chunks(
    hub: FakeHub, repo: RepositorySimulator, state_dir: Path, iris_model: Any
) -> None:
    files = iris_files(iris_model.directory)
    package = repo.build_package(files, chunk_bytes=512)
    hub.chunk_bytes = 512
    assert len(package.ref.chunks) > 8
    hub.offer(package)
    hub.desired[DEVICE] = repo.desired_message([package.ref])
    seen: dict[int, int] = {}

    def lossy(digest: str, index: int, chunk: bytes) -> bytes | None:
        # First delivery of every chunk: even ones vanish, odd ones arrive corrupted.
        seen[index] = seen.get(index, 0) + 1
        if seen[index] > 1:
            return chunk
        return None if index % 2 == 0 else b"\x00" + chunk[1:]

    hub.chunk_filter = lossy
    with running_agent(state_dir) as (runner, agent):
        hub.wait_for(lambda: _terminal(hub, package.ref.deployment_id), timeout_s=60)
        assert _steps(hub, package.ref.deployment_id)[-1] is Step.ACTIVE
        assert hub.chunk_requests > 1
        assert runner.call(lambda: agent.get("iris")) is not None


def test_package_that_never_matches_its_signed_chunk_hashes_fails_instead_of_hanging(
    hub: FakeHub, repo: RepositorySimulator, state_dir: Path, iris_model: Any
) -> None:
    package = repo.build_package(iris_files(iris_model.directory))
    hub.offer(package)
    hub.desired[DEVICE] = repo.desired_message([package.ref])
    hub.chunk_filter = lambda digest, index, chunk: (
        bytes([chunk[0] ^ 0xFF]) + chunk[1:] if index == 1 else chunk
    )
    with running_agent(state_dir) as (runner, agent):
        hub.wait_for(lambda: _terminal(hub, package.ref.deployment_id), timeout_s=60)
        last = [e for _, e in hub.events if e.deployment_id == package.ref.deployment_id][-1]
        assert last.step is Step.FAILED
        assert last.reason is Reason.HASH
        assert "chunk 1" in last.detail
        assert runner.call(lambda: agent.get("iris")) is None
        assert not list((state_dir / "downloads").iterdir()), "rejected bytes must not be kept"


@pytest.mark.parametrize(
    ("extra", "reason"),
    [
        (ExtraMember("files/../../../outpost-escape", b"x"), Reason.UNSAFE_PATH),
        (
            ExtraMember("files/link", type=tarfile.SYMTYPE, linkname="/etc/passwd"),
            Reason.UNSAFE_PATH,
        ),
    ],
)
def test_validly_signed_hostile_archive_is_refused_over_mqtt(
    hub: FakeHub,
    repo: RepositorySimulator,
    state_dir: Path,
    iris_model: Any,
    extra: ExtraMember,
    reason: Reason,
) -> None:
    files = iris_files(iris_model.directory)
    v1 = repo.build_package(files, version=1)
    hostile = repo.build_package(files, version=2, extra=[extra])
    hub.offer(v1, hostile)
    hub.desired[DEVICE] = repo.desired_message([v1.ref])
    with running_agent(state_dir) as (runner, agent):
        hub.wait_for(lambda: _terminal(hub, v1.ref.deployment_id))
        hub.publish_desired(DEVICE, repo.desired_message([hostile.ref]))
        hub.wait_for(lambda: _terminal(hub, hostile.ref.deployment_id))
        last = [e for _, e in hub.events if e.deployment_id == hostile.ref.deployment_id][-1]
        assert (last.step, last.reason) == (Step.FAILED, reason)
        assert runner.call(lambda: agent.get("iris")).version == 1
        assert not (state_dir.parent / "outpost-escape").exists()
        assert not any(p.name.startswith(".staging") for p in (state_dir / "models").rglob("*"))
