"""Watching a file through inotify on its folder (agent.filewatch), and the scoring key file
that uses it to look at the disk only after a change: real files, a real event loop."""

import asyncio
import itertools
import os
import shutil
from collections.abc import Callable
from pathlib import Path

import pytest

from agent.filewatch import FileWatch
from agent.scoring_keys import ScoringKeyFile
from agent.state import ScoringKeyName, StateDir

DEADLINE_S = 10.0


async def until(condition: Callable[[], bool]) -> None:
    """Let the loop run (and read events) until ``condition`` holds, within the deadline."""
    async with asyncio.timeout(DEADLINE_S):
        for _ in itertools.count():
            if condition():
                return
            await asyncio.sleep(0.001)


def renamed_over(target: Path) -> None:
    """What ``key rotate`` does: a new file renamed over the old one."""
    fresh = target.with_name("fresh.json")
    fresh.write_text("2")
    fresh.replace(target)


def test_a_look_is_real_only_after_a_change_to_the_file(tmp_path: Path) -> None:
    target = tmp_path / "keys.json"
    target.write_text("1")

    async def main() -> None:
        watch = FileWatch(target)
        assert watch.start()
        assert watch.watching
        assert watch.look()  # the first look is real: nothing is known yet
        assert not watch.look()

        # Other files in the folder do not count. The kernel queues events as the calls
        # happen, so reading them now (as the loop would) sees them all.
        (tmp_path / "other.json").write_text("x")
        (tmp_path / "other.json").replace(tmp_path / "moved.json")
        watch._events()
        assert not watch.look()

        for change in (
            lambda: renamed_over(target),
            lambda: target.write_text("3"),  # written in place
            lambda: os.utime(target, (1, 1)),  # touched
            target.unlink,  # removed
            lambda: target.write_text("4"),  # created again
        ):
            change()
            await until(watch.look)
            assert not watch.look()
        watch.close()
        assert not watch.watching
        assert watch.look()  # closed: every look is real

    asyncio.run(main())


def test_without_a_running_loop_or_a_folder_every_look_is_real(tmp_path: Path) -> None:
    watch = FileWatch(tmp_path / "keys.json")
    assert not watch.start()  # no event loop here
    assert all(watch.look() for _ in range(3))

    async def missing_folder() -> None:
        gone = FileWatch(tmp_path / "absent" / "keys.json")
        assert not gone.start()
        assert gone.look()
        assert gone.look()

    asyncio.run(missing_folder())


def test_a_watch_whose_folder_goes_away_falls_back_to_real_looks(tmp_path: Path) -> None:
    folder = tmp_path / "state"
    folder.mkdir()
    (folder / "keys.json").write_text("1")

    async def main() -> None:
        watch = FileWatch(folder / "keys.json")
        assert watch.start()
        assert watch.look()
        shutil.rmtree(folder)
        await until(lambda: not watch.watching)  # the folder's watch ends with it
        assert watch.look()
        assert watch.look()

    asyncio.run(main())


def test_the_key_file_looks_at_the_disk_only_after_a_rotation(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    state = StateDir(tmp_path)
    state.create()
    first = state.scoring_keys()
    looks = 0
    real_stat = os.stat

    def counting_stat(path: str, *args: object, **kwargs: object) -> os.stat_result:
        nonlocal looks
        if path == str(state.scoring_keys_path):
            looks += 1
        return real_stat(path, *args, **kwargs)  # type: ignore[arg-type]

    async def main() -> None:
        nonlocal looks
        keys = ScoringKeyFile(state)
        monkeypatch.setattr(os, "stat", counting_stat)
        looks = 0
        assert keys() == (first.primary, first.secondary)  # starts the watch, looks once
        assert keys.watching
        for _ in range(100):
            assert keys() == (first.primary, first.secondary)
        assert looks == 1  # no stat per call while nothing changed

        rotated = state.rotate_scoring_key(ScoringKeyName.SECONDARY)
        await until(lambda: keys() == (first.primary, rotated.secondary))
        assert looks == 2  # one look for the one change

    asyncio.run(main())


def test_the_key_file_without_a_loop_looks_every_time(tmp_path: Path) -> None:
    """Called from a thread with no event loop (or where inotify is missing): a rotation is
    seen on the very next call, as before the watch existed."""
    state = StateDir(tmp_path)
    state.create()
    keys = ScoringKeyFile(state)
    assert keys()[0] == state.scoring_keys().primary
    assert not keys.watching
    rotated = state.rotate_scoring_key(ScoringKeyName.PRIMARY)
    assert keys()[0] == rotated.primary
