"""Scoring keys rotated without downtime, on a real scoring server over HTTP.

The order an operator follows (as with Azure ML's primary/secondary keys): clients use the
primary; rotate the secondary (nobody uses it); move the clients to the new secondary; rotate
the primary. A client that keeps calling through each rotation sees no failure, and a rotated
key is refused from the very next request, without restarting the endpoint.
"""

import asyncio
import io
from collections.abc import Awaitable
from contextlib import redirect_stderr, redirect_stdout
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TypeVar

import httpx

from agent.main import main as agent_main
from agent.main import scoring_server
from agent.protocol.documents import (
    FileEntry,
    Framework,
    HealthCheck,
    Manifest,
    ModelInfo,
    RuntimeSpec,
)
from agent.runtimes.base import ActiveModel
from agent.settings import ScoringSettings
from agent.state import ScoringKeyName, StateDir
from tests.support.repository import NOW

T = TypeVar("T")
BODY = {"data": [[1.0, 2.0]]}


class Echo:
    def predict(self, data: Any) -> dict[str, Any]:
        return {"echo": data}


class OneModel:
    def __init__(self) -> None:
        manifest = Manifest(
            model=ModelInfo(name="echo", version=1, framework=Framework.ONNX),
            runtime=RuntimeSpec(model_file="model.onnx"),
            files=[FileEntry(path="model.onnx", size=1, sha256="0" * 64)],
            health_check=HealthCheck(input="in.json", expected_output="out.json"),
            created_at=NOW,
        )
        self.model = ActiveModel("echo", 1, "d" * 64, manifest, Echo())

    def get(self, name: str | None = None) -> ActiveModel | None:
        return self.model if name in (None, "echo") else None

    def names(self) -> list[str]:
        return ["echo"]


def run(coro: Awaitable[T]) -> T:
    async def main() -> T:
        async with asyncio.timeout(30):
            return await coro

    return asyncio.run(main())


def _cli(state_dir: Path, *args: str) -> tuple[int, str]:
    """`outpost-agent` as an operator runs it beside the running agent (the key file is the
    only channel between them)."""
    out = io.StringIO()
    with redirect_stdout(out), redirect_stderr(io.StringIO()):
        code = agent_main(["--state-dir", str(state_dir), "key", *args])
    return code, out.getvalue().strip()


@dataclass
class Caller:
    """A client calling /score in a loop with one key, counting what it got."""

    client: httpx.AsyncClient
    key: str
    ok: int = 0
    failed: int = 0
    _target: int = 0
    _reached: asyncio.Event = field(default_factory=asyncio.Event)

    async def loop(self, stop: asyncio.Event) -> None:
        while not stop.is_set():
            response = await self.client.post(
                "/score", json=BODY, headers={"Authorization": f"Bearer {self.key}"}
            )
            if response.status_code == 200:
                self.ok += 1
                if self.ok >= self._target:
                    self._reached.set()
            else:
                self.failed += 1

    async def until(self, ok: int) -> None:
        """Wait until ``ok`` calls have succeeded (the test's timeout bounds it)."""
        self._target = ok
        self._reached.clear()
        if self.ok < ok:
            await self._reached.wait()


async def _status(client: httpx.AsyncClient, key: str) -> int:
    response = await client.post("/score", json=BODY, headers={"X-Api-Key": key})
    return response.status_code


async def _rotate_while_calling(
    client: httpx.AsyncClient, caller: Caller, state_dir: Path, which: str, times: int = 1
) -> str:
    """Rotate ``which`` ``times`` times in a thread (as another process would) while
    ``caller`` keeps calling; returns the last new key. The caller runs before, during and
    after the rotations."""
    stop = asyncio.Event()
    task = asyncio.create_task(caller.loop(stop))
    await caller.until(20)

    def rotate() -> str:
        key = ""
        for _ in range(times):
            code, key = _cli(state_dir, "rotate", f"--{which}")
            assert code == 0
        return key

    new_key = await asyncio.to_thread(rotate)
    await caller.until(caller.ok + 20)
    stop.set()
    await task
    return new_key


def test_rotate_secondary_then_primary_without_downtime(tmp_path: Path) -> None:
    state = StateDir(tmp_path)
    state.create()
    first = state.scoring_keys()
    settings = ScoringSettings(port=0)
    assert settings.host == "127.0.0.1"  # loopback unless configured otherwise

    async def scenario() -> dict[str, int]:
        server = scoring_server(settings, models=OneModel(), state=state)
        await server.start()
        try:
            assert server.address[0] == "127.0.0.1"
            async with httpx.AsyncClient(base_url=f"http://127.0.0.1:{server.port}") as client:
                assert await _status(client, first.primary) == 200
                assert await _status(client, first.secondary) == 200
                assert await _status(client, "not-a-key") == 401

                # 1. Clients on the primary; the secondary is rotated.
                on_primary = Caller(client, first.primary)
                # Rotated 20 times, so many key-file reloads happen under the caller.
                new_secondary = await _rotate_while_calling(
                    client, on_primary, tmp_path, "secondary", times=20
                )
                assert new_secondary != first.secondary
                assert await _status(client, first.secondary) == 401
                assert await _status(client, new_secondary) == 200

                # 2. Clients move to the new secondary; the primary is rotated.
                on_secondary = Caller(client, new_secondary)
                new_primary = await _rotate_while_calling(client, on_secondary, tmp_path, "primary")
                assert new_primary != first.primary
                assert await _status(client, first.primary) == 401
                assert await _status(client, new_primary) == 200
                assert await _status(client, new_secondary) == 200
                return {
                    "calls_during_secondary_rotation": on_primary.ok + on_primary.failed,
                    "failed_secondary": on_primary.failed,
                    "calls_during_primary_rotation": on_secondary.ok + on_secondary.failed,
                    "failed_primary": on_secondary.failed,
                }
        finally:
            await server.stop()

    figures = run(scenario())
    print(f"\nscoring key rotation: {figures}")
    assert figures["failed_secondary"] == 0
    assert figures["failed_primary"] == 0
    # What the CLI shows is what the file holds.
    assert _cli(tmp_path) == (0, state.scoring_keys().primary)
    assert _cli(tmp_path, "--secondary") == (0, state.scoring_keys().secondary)


def test_rotate_needs_to_be_told_which_key(tmp_path: Path) -> None:
    state = StateDir(tmp_path)
    state.create()
    before = state.scoring_keys_path.read_bytes() if state.scoring_keys_path.exists() else None
    code, _ = _cli(tmp_path, "rotate")
    assert code == 2
    after = state.scoring_keys_path.read_bytes() if state.scoring_keys_path.exists() else None
    assert before == after


def test_key_file_is_written_0600_and_atomically(tmp_path: Path) -> None:
    state = StateDir(tmp_path)
    state.create()
    keys = state.scoring_keys()
    rotated = state.rotate_scoring_key(ScoringKeyName.SECONDARY)
    assert rotated.primary == keys.primary
    assert rotated.secondary != keys.secondary
    assert state.scoring_keys_path.stat().st_mode & 0o777 == 0o600
    assert not list(tmp_path.glob(".scoring-keys.json.tmp"))
