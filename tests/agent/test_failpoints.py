"""Named crash points: parsed strictly, fired once, and a crash at any install step leaves the
device on the old or the new version (DESIGN.md), with the next install completing."""

import hashlib
import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest

from agent.archive import ArchiveLimits
from agent.failpoints import (
    INSTALL_PATH,
    Action,
    Failpoint,
    FailpointCrash,
    FailpointError,
    Failpoints,
)
from agent.install import ModelStore, TrustContext
from agent.runtimes import load_runtime
from agent.runtimes.health import check_health
from agent.trust import verify_keyring
from tests.support.repository import NOW, RepositorySimulator, iris_files

# Before the pointer switch the old version stays active; from the switch on, the new one.
INSTALL_POINTS = [p for p in INSTALL_PATH if p is not Failpoint.AFTER_DOWNLOAD]
SWITCHED = {Failpoint.AFTER_SWITCH}


def test_specs_parse_and_unknown_points_or_actions_are_refused() -> None:
    points = Failpoints.parse("after_unpack:kill, after_load:crash,after_switch")
    assert points.armed == {
        Failpoint.AFTER_UNPACK: Action.KILL,
        Failpoint.AFTER_LOAD: Action.CRASH,
        Failpoint.AFTER_SWITCH: Action.KILL,  # kill is the default action
    }
    assert Failpoints.parse("").armed == {}
    for bad in ("after_lunch:kill", "after_unpack:explode"):
        with pytest.raises(FailpointError, match="after_download"):
            Failpoints.parse(bad)


def test_a_crash_point_fires_once_and_unarmed_points_do_nothing() -> None:
    points = Failpoints({Failpoint.AFTER_LOAD: Action.CRASH})
    points.hit(Failpoint.AFTER_UNPACK)
    with pytest.raises(FailpointCrash) as caught:
        points.hit(Failpoint.AFTER_LOAD)
    assert caught.value.point is Failpoint.AFTER_LOAD
    points.hit(Failpoint.AFTER_LOAD)  # disarmed after firing
    assert points.fired == {Failpoint.AFTER_LOAD: 1}
    assert points.armed == {}


def test_kill_sends_sigkill_to_the_process_itself(tmp_path: Path) -> None:
    code = (
        "from agent.failpoints import Failpoints, Failpoint\n"
        "Failpoints.from_env().hit(Failpoint.AFTER_UNPACK)\n"
        "print('survived')\n"
    )
    env = {**os.environ, "OUTPOST_FAILPOINT": "after_unpack:kill"}
    done = subprocess.run(
        [sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=60
    )
    assert done.returncode == -signal.SIGKILL
    assert "survived" not in done.stdout


@pytest.mark.parametrize("point", INSTALL_POINTS, ids=str)
def test_a_crash_at_each_install_step_leaves_old_or_new_and_the_retry_completes(
    point: Failpoint, tmp_path: Path, iris_model: object
) -> None:
    repo = RepositorySimulator()
    keyring = verify_keyring(
        repo.keyring(), root_public_b64=repo.root.public_b64, current=None, now=NOW
    )
    trust = TrustContext(keyring, "generic", "0.1.0")
    files = iris_files(iris_model.directory)  # type: ignore[attr-defined]
    v1 = repo.build_package(files, version=1)
    v2 = repo.build_package(files, version=2)

    def store(failpoints: Failpoints | None = None) -> ModelStore:
        return ModelStore(
            tmp_path / "models",
            load_runtime=load_runtime,
            check_health=check_health,
            limits=ArchiveLimits(),
            failpoints=failpoints,
        )

    def archive(data: bytes) -> Path:
        path = tmp_path / f"{hashlib.sha256(data).hexdigest()}.tar"
        path.write_bytes(data)
        return path

    store().install(archive(v1.data), v1.ref, trust, lambda step: None)
    with pytest.raises(FailpointCrash):
        store(Failpoints({point: Action.CRASH})).install(
            archive(v2.data), v2.ref, trust, lambda step: None
        )

    # "Restart": a new store on the same directory finds a whole version and serves it.
    restarted = store()
    active = restarted.load_active("iris", trust)
    assert active is not None
    assert active.version == (2 if point in SWITCHED else 1)
    # And installing v2 again (the agent's retry) completes from whatever the crash left.
    if point not in SWITCHED:
        new = restarted.install(archive(v2.data), v2.ref, trust, lambda step: None)
        assert new.version == 2
    again = store().load_active("iris", trust)
    assert again is not None
    assert again.version == 2
    pointer = restarted.pointer("iris")
    assert pointer is not None
    assert pointer.previous is not None
    assert pointer.previous.version == 1, "the rollback target is still v1"
