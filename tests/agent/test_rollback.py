"""Rollbacks ordered by the hub: switching back to the kept previous version from disk, without
downloading, and uninstalling a model the desired state no longer lists (DESIGN.md, "Agent
install and rollback"). A crash at any step of either leaves a whole version or none."""

import hashlib
from pathlib import Path
from typing import Any

import pytest

from agent.archive import ArchiveLimits
from agent.core import Agent
from agent.failpoints import Action, Failpoint, FailpointCrash, Failpoints
from agent.install import POINTER_NAME, ModelStore, Pointer, TrustContext
from agent.protocol.documents import PackageRef
from agent.protocol.messages import DesiredBody, Step, encode
from agent.runtimes import load_runtime
from agent.runtimes.base import ActiveModel
from agent.runtimes.health import check_health
from agent.state import StateDir
from agent.trust import verify_keyring
from tests.support.agents import DEVICE, AgentThread, fast_settings, running_agent
from tests.support.fake_hub import FakeHub
from tests.support.repository import NOW, BuiltPackage, RepositorySimulator, iris_files

pytestmark = pytest.mark.integration

# The points a switch-back passes: before the pointer write the old version stays, from it on
# the new one.
SWITCH_BACK_POINTS = [Failpoint.AFTER_LOAD, Failpoint.AFTER_HEALTH, Failpoint.AFTER_SWITCH]


def _trust(repo: RepositorySimulator) -> TrustContext:
    keyring = verify_keyring(
        repo.keyring(), root_public_b64=repo.root.public_b64, current=None, now=NOW
    )
    return TrustContext(keyring, "generic", "0.1.0")


def _store(models: Path) -> ModelStore:
    return ModelStore(
        models, load_runtime=load_runtime, check_health=check_health, limits=ArchiveLimits()
    )


def _pointer(state_dir: Path, model: str = "iris") -> Pointer:
    return Pointer.model_validate_json((state_dir / "models" / model / POINTER_NAME).read_bytes())


def _served_from_disk(state_dir: Path, repo: RepositorySimulator) -> ActiveModel:
    """What a restarted device would serve, loaded and re-verified from disk alone."""
    active = _store(StateDir(state_dir).models).load_active("iris", _trust(repo))
    assert active is not None, "the device must serve a whole version"
    return active


def _files_of(state_dir: Path, model: str, directory: str) -> dict[str, bytes]:
    files = state_dir / "models" / model / directory / "files"
    return {p.name: p.read_bytes() for p in files.iterdir()}


def _tree(root: Path) -> dict[str, str]:
    return {
        str(p.relative_to(root)): hashlib.sha256(p.read_bytes()).hexdigest()
        for p in sorted(root.rglob("*"))
        if p.is_file()
    }


def _steps(hub: FakeHub, ref: PackageRef) -> list[Step]:
    """The steps reported for this exact package in this deployment, each event once (a
    resent event may arrive twice)."""
    by_seq = {
        e.seq: e.step
        for _, e in hub.events
        if e.deployment_id == ref.deployment_id and e.digest == ref.digest
    }
    return list(by_seq.values())


def _rollback_ref(old: BuiltPackage, aborted: BuiltPackage) -> PackageRef:
    """What the hub names to roll a device back: the old package, in the aborted deployment."""
    return old.ref.model_copy(update={"deployment_id": aborted.ref.deployment_id})


def _v1_then_v2(
    hub: FakeHub, repo: RepositorySimulator, state_dir: Path, files: dict[str, bytes]
) -> tuple[BuiltPackage, BuiltPackage]:
    """A device that ran v1 and was then updated to v2 (so v1 is kept as the rollback target)."""
    v1 = repo.build_package(files, version=1)
    v2 = repo.build_package(files, version=2)
    hub.offer(v1, v2)
    hub.desired[DEVICE] = repo.desired_message([v1.ref])
    with running_agent(state_dir):
        hub.wait_for(lambda: Step.ACTIVE in _steps(hub, v1.ref))
        hub.publish_desired(DEVICE, repo.desired_message([v2.ref]))
        hub.wait_for(lambda: Step.ACTIVE in _steps(hub, v2.ref))
    pointer = _pointer(state_dir)
    assert (pointer.version, pointer.previous and pointer.previous.version) == (2, 1)
    return v1, v2


def test_rollback_to_the_kept_version_switches_from_disk_without_downloading(
    hub: FakeHub, repo: RepositorySimulator, state_dir: Path, iris_model: Any
) -> None:
    files = iris_files(iris_model.directory)
    v1, v2 = _v1_then_v2(hub, repo, state_dir, files)
    requests_before = hub.chunk_requests
    back = _rollback_ref(v1, v2)
    hub.desired[DEVICE] = repo.desired_message([back])
    with running_agent(state_dir) as (runner, agent):
        hub.wait_for(lambda: Step.ACTIVE in _steps(hub, back))
        assert _steps(hub, back) == [
            Step.VERIFIED,
            Step.INSTALLING,
            Step.HEALTH_CHECK,
            Step.ACTIVE,
        ], "a switch-back downloads nothing"
        assert hub.chunk_requests == requests_before
        assert not list((state_dir / "downloads").iterdir())
        active = runner.call(lambda: agent.get("iris"))
        assert (active.version, active.digest) == (1, v1.ref.digest)
        pointer = _pointer(state_dir)
        assert (pointer.version, pointer.deployment_id) == (1, v2.ref.deployment_id)
        assert pointer.previous is not None
        assert pointer.previous.digest == v2.ref.digest, "v2 is now the rollback target"
        assert _files_of(state_dir, "iris", pointer.directory) == files
        hub.wait_for(
            lambda: any(
                [(m.digest, m.deployment_id) for m in s.active]
                == [(v1.ref.digest, v2.ref.deployment_id)]
                for _, s in hub.states
            )
        )

        # Re-promoting v2 (a rollout resumed) is local too, because v2 was kept.
        again = v2.ref.model_copy(update={"deployment_id": "dep-resumed"})
        hub.publish_desired(DEVICE, repo.desired_message([again]))
        hub.wait_for(lambda: Step.ACTIVE in _steps(hub, again))
        assert Step.DOWNLOADING not in _steps(hub, again)
        assert hub.chunk_requests == requests_before
        assert runner.call(lambda: agent.get("iris")).version == 2
        assert _pointer(state_dir).previous.digest == v1.ref.digest  # type: ignore[union-attr]


def test_a_tampered_kept_version_is_downloaded_again_instead(
    hub: FakeHub, repo: RepositorySimulator, state_dir: Path, iris_model: Any
) -> None:
    files = iris_files(iris_model.directory)
    v1, v2 = _v1_then_v2(hub, repo, state_dir, files)
    kept = _pointer(state_dir).previous
    assert kept is not None
    model_file = state_dir / "models" / "iris" / kept.directory / "files" / "model.onnx"
    model_file.write_bytes(model_file.read_bytes() + b"\x00")
    requests_before = hub.chunk_requests
    back = _rollback_ref(v1, v2)
    hub.desired[DEVICE] = repo.desired_message([back])
    with running_agent(state_dir) as (runner, agent):
        hub.wait_for(lambda: Step.ACTIVE in _steps(hub, back))
        steps = _steps(hub, back)
        assert Step.FAILED not in steps
        assert Step.DOWNLOADED in steps
        assert hub.chunk_requests > requests_before
        active = runner.call(lambda: agent.get("iris"))
        assert (active.version, active.digest) == (1, v1.ref.digest)
        pointer = _pointer(state_dir)
        assert pointer.previous is not None
        assert pointer.previous.digest == v2.ref.digest
        assert _files_of(state_dir, "iris", pointer.directory) == files
        assert StateDir(state_dir).load_progress().installing is None
    assert _served_from_disk(state_dir, repo).digest == v1.ref.digest


@pytest.mark.parametrize("point", SWITCH_BACK_POINTS, ids=str)
def test_a_crash_during_the_switch_back_restarts_on_a_whole_version_and_finishes(
    point: Failpoint, hub: FakeHub, repo: RepositorySimulator, state_dir: Path, iris_model: Any
) -> None:
    files = iris_files(iris_model.directory)
    v1, v2 = _v1_then_v2(hub, repo, state_dir, files)
    requests_before = hub.chunk_requests
    back = _rollback_ref(v1, v2)
    hub.desired[DEVICE] = repo.desired_message([back])
    failpoints = Failpoints({point: Action.CRASH})
    crashing = AgentThread(
        lambda: Agent(
            settings=fast_settings(state_dir),
            load_runtime=load_runtime,
            check_health=check_health,
            failpoints=failpoints,
        )
    )
    crashing.start()
    with pytest.raises(FailpointCrash):
        crashing.join(timeout_s=30)
    assert failpoints.fired == {point: 1}
    assert Step.ACTIVE not in _steps(hub, back)
    # Old until the pointer write, new from it on; never a half-switched device.
    served = _served_from_disk(state_dir, repo)
    assert served.version == (1 if point is Failpoint.AFTER_SWITCH else 2)
    assert StateDir(state_dir).load_progress().installing is not None

    with running_agent(state_dir) as (runner, agent):
        hub.wait_for(lambda: Step.ACTIVE in _steps(hub, back))
        active = runner.call(lambda: agent.get("iris"))
        assert (active.version, active.digest) == (1, v1.ref.digest)
        hub.wait_for(lambda: StateDir(state_dir).load_progress().installing is None)
    assert hub.chunk_requests == requests_before, "neither run downloaded anything"
    pointer = _pointer(state_dir)
    assert pointer.digest == v1.ref.digest
    assert pointer.previous is not None
    assert pointer.previous.digest == v2.ref.digest
    assert _files_of(state_dir, "iris", pointer.directory) == files
    assert _files_of(state_dir, "iris", pointer.previous.directory) == files


def test_a_model_the_desired_state_no_longer_lists_is_uninstalled_and_others_stay(
    hub: FakeHub, repo: RepositorySimulator, state_dir: Path, iris_model: Any
) -> None:
    files = iris_files(iris_model.directory)
    iris = repo.build_package(files, model="iris")
    other = repo.build_package(files, model="other")
    hub.offer(iris, other)
    hub.desired[DEVICE] = repo.desired_message([iris.ref, other.ref])
    with running_agent(state_dir) as (runner, agent):
        hub.wait_for(lambda: Step.ACTIVE in _steps(hub, iris.ref))
        hub.wait_for(lambda: Step.ACTIVE in _steps(hub, other.ref))
        assert runner.call(agent.names) == ["iris", "other"]
        iris_before = _tree(state_dir / "models" / "iris")
        seen = len(hub.states)
        hub.publish_desired(DEVICE, repo.desired_message([iris.ref]))
        hub.wait_for(
            lambda: any([m.model for m in s.active] == ["iris"] for _, s in hub.states[seen:])
        )
        assert runner.call(agent.names) == ["iris"]
        assert runner.call(lambda: agent.get("other")) is None
        assert not (state_dir / "models" / "other").exists()
        assert _tree(state_dir / "models" / "iris") == iris_before
        assert runner.call(lambda: agent.get("iris")).digest == iris.ref.digest
        assert Step.FAILED not in _steps(hub, iris.ref) + _steps(hub, other.ref)

    # Nothing brings it back on a restart.
    seen = len(hub.states)
    with running_agent(state_dir) as (runner, agent):
        hub.wait_for(lambda: len(hub.states) > seen)
        assert [m.model for m in hub.states[seen][1].active] == ["iris"]
        assert runner.call(agent.names) == ["iris"]


def test_only_a_verified_desired_state_uninstalls(
    hub: FakeHub, repo: RepositorySimulator, state_dir: Path, iris_model: Any, tmp_path: Path
) -> None:
    # Installed on disk before the device ever heard from the hub.
    package = repo.build_package(iris_files(iris_model.directory))
    archive = tmp_path / "iris.tar"
    archive.write_bytes(package.data)
    _store(StateDir(state_dir).models).install(archive, package.ref, _trust(repo), lambda _: None)
    hub.offer(package)
    with running_agent(state_dir) as (runner, agent):
        # No desired state yet: what the device has keeps serving.
        hub.wait_for(lambda: any([m.model for m in s.active] == ["iris"] for _, s in hub.states))
        topic = f"outpost/d/{DEVICE}/desired"
        forged = [
            (repo.desired_message([], signer=repo.release), "E_UNKNOWN_KEY"),
            (repo.desired_message([], unsigned=True), "E_UNKNOWN_KEY"),
        ]
        for message, code in forged:
            seen = len(hub.states)
            hub.publish_raw(topic, message)

            def rejected(code: str = code, seen: int = seen) -> bool:
                return any(s.last_rejection.startswith(code) for _, s in hub.states[seen:])

            hub.wait_for(rejected)
        assert runner.call(agent.names) == ["iris"]
        assert (state_dir / "models" / "iris" / POINTER_NAME).exists()

        seen = len(hub.states)
        hub.publish_desired(DEVICE, repo.desired_message([]))
        hub.wait_for(lambda: any(not s.active for _, s in hub.states[seen:]))
        assert runner.call(agent.names) == []
        assert not (state_dir / "models" / "iris").exists()


def test_an_uninstall_interrupted_after_the_pointer_went_is_finished_on_restart(
    hub: FakeHub, repo: RepositorySimulator, state_dir: Path, iris_model: Any
) -> None:
    files = iris_files(iris_model.directory)
    iris = repo.build_package(files, model="iris")
    other = repo.build_package(files, model="other")
    hub.offer(iris, other)
    hub.desired[DEVICE] = repo.desired_message([iris.ref, other.ref])
    with running_agent(state_dir):
        hub.wait_for(lambda: Step.ACTIVE in _steps(hub, other.ref))
        hub.wait_for(lambda: Step.ACTIVE in _steps(hub, iris.ref))
    # What a crash inside the uninstall leaves: the new desired state accepted and stored,
    # the pointer gone, the directories not yet.
    desired = repo.desired([iris.ref])
    StateDir(state_dir).save_desired(desired)
    hub.desired[DEVICE] = encode(DesiredBody(keyring=repo.keyring(), desired=desired))
    (state_dir / "models" / "other" / POINTER_NAME).unlink()
    requests_before = hub.chunk_requests
    with running_agent(state_dir) as (runner, agent):
        hub.wait_for(lambda: not (state_dir / "models" / "other").exists())
        assert runner.call(agent.names) == ["iris"]
    assert hub.chunk_requests == requests_before, "the half-removed model is not reinstalled"
    assert _served_from_disk(state_dir, repo).digest == iris.ref.digest


@pytest.mark.parametrize("point", SWITCH_BACK_POINTS, ids=str)
def test_store_switch_back_crashing_at_each_point_leaves_old_or_new(
    point: Failpoint, tmp_path: Path, repo: RepositorySimulator, iris_model: Any
) -> None:
    files = iris_files(iris_model.directory)
    trust = _trust(repo)
    v1 = repo.build_package(files, version=1)
    v2 = repo.build_package(files, version=2)
    store = _store(tmp_path / "models")
    for package in (v1, v2):
        archive = tmp_path / f"{package.ref.digest}.tar"
        archive.write_bytes(package.data)
        store.install(archive, package.ref, trust, lambda _: None)
    back = _rollback_ref(v1, v2)
    assert store.kept_previous(back)
    crashing = ModelStore(
        tmp_path / "models",
        load_runtime=load_runtime,
        check_health=check_health,
        limits=ArchiveLimits(),
        failpoints=Failpoints({point: Action.CRASH}),
    )
    with pytest.raises(FailpointCrash):
        crashing.switch_back(back, trust, lambda _: None)
    restarted = _store(tmp_path / "models")
    restarted.remove_leftovers("iris")
    active = restarted.load_active("iris", trust)
    assert active is not None
    assert active.version == (1 if point is Failpoint.AFTER_SWITCH else 2)
    if point is not Failpoint.AFTER_SWITCH:
        assert restarted.switch_back(back, trust, lambda _: None).version == 1
    pointer = restarted.pointer("iris")
    assert pointer is not None
    assert (pointer.version, pointer.previous and pointer.previous.version) == (1, 2)
    assert sorted(p.name for p in (tmp_path / "models" / "iris").iterdir() if p.is_dir()) == sorted(
        [pointer.directory, pointer.previous.directory]  # type: ignore[union-attr]
    )
