"""The hub SIGKILLed mid-ingest, as an OOM kill would end it, while devices keep measuring: once
it is back, every telemetry record each device made before, during and after the crash is stored
exactly once, and the devices' outboxes drain with nothing dropped.

Two ways to die: killed from outside at an arbitrary moment of a busy ingest, and the failpoint
``after_ingest_commit``, which kills the hub after records are committed and before the devices
hear so: the devices send them again, and the hub must store them once and ack them then.
"""

import signal
import sqlite3
from pathlib import Path

import pytest

from agent.core import utc_now
from agent.enroll import enroll
from agent.state import StateDir
from bench.hub import HubProcess
from hub.failpoints import ENV_VAR, HubFailpoint
from tests.support.agents import AgentThread, fast_settings, make_agent
from tests.support.waiting import wait_until

pytestmark = pytest.mark.e2e

DEVICES = 4
# A record every 50 ms per device: the hub is ingesting all the time it is killed.
TELEMETRY = {"interval_s": 0.05, "resend_s": 1.0}


def _stored_seqs(hub: HubProcess) -> dict[str, list[int]]:
    # Read-only beside the running hub (SQLite in WAL mode lets a reader in).
    db = sqlite3.connect(f"file:{hub.data_dir / 'hub.db'}?mode=ro", uri=True, timeout=10)
    try:
        rows = db.execute("SELECT device_id, seq FROM telemetry_point ORDER BY device_id, seq")
        stored: dict[str, list[int]] = {}
        for device_id, seq in rows:
            stored.setdefault(device_id, []).append(seq)
        return stored
    finally:
        db.close()


def _start_fleet(hub: HubProcess, tmp_path: Path) -> list[AgentThread]:
    fleet = []
    for i in range(DEVICES):
        token = hub.call("POST", "/api/v1/enrollment-tokens", json={"uses": 1})["token"]
        state = StateDir(tmp_path / f"agent-{i}")
        enroll(hub_url=hub.url, token=token, state=state, now=utc_now(), name=f"sensor-{i}")
        runner = AgentThread(make_agent(fast_settings(state.root, telemetry=TELEMETRY)))
        runner.start()
        fleet.append(runner)
    return fleet


def _outbox(runner: AgentThread, what: str) -> int:
    agent = runner.agent
    assert agent is not None

    def read() -> int:
        outbox = agent.outbox
        if outbox is None:
            return 0
        value: int = getattr(outbox, what)("tm")
        return value

    return runner.call(read)


@pytest.mark.parametrize("how", ["killed while ingesting", "failpoint after_ingest_commit"])
def test_a_hub_killed_mid_ingest_loses_no_record_and_stores_none_twice(
    tmp_path: Path, how: str
) -> None:
    armed = how.startswith("failpoint")
    hub = HubProcess(tmp_path / "hub")
    hub.start()
    fleet: list[AgentThread] = []
    try:
        fleet = _start_fleet(hub, tmp_path)
        ids = [r.agent.device_id for r in fleet if r.agent is not None]

        def busy() -> bool:
            stored = _stored_seqs(hub)
            return all(len(stored.get(d, [])) >= 20 for d in ids)

        wait_until(busy, 60, "every device's first 20 records stored")
        if armed:
            # Armed on a restart, so the kill falls in the middle of a busy stream.
            hub.stop()
            hub.env[ENV_VAR] = HubFailpoint.AFTER_INGEST_COMMIT
            # Not waited for: the first commit may kill it before its API has answered once.
            hub.start(wait=False)
            assert hub.wait_exit(timeout_s=60) == -signal.SIGKILL
            hub.env.clear()
        else:
            hub.kill()
        made_while_down = {r.agent.device_id: _outbox(r, "last_seq") for r in fleet if r.agent}
        wait_until(
            lambda: all(
                _outbox(r, "last_seq") >= made_while_down[d] + 20
                for r, d in zip(fleet, ids, strict=True)
            ),
            30,
            "20 more records made by each device while the hub is down",
        )
        hub.start()  # same data dir; its broker comes back on the devices' port

        # Every record a device has made up to now must arrive, whatever it was doing.
        made = {d: _outbox(r, "last_seq") for r, d in zip(fleet, ids, strict=True)}

        def arrived() -> bool:
            stored = _stored_seqs(hub)
            return all(stored.get(d, [])[-1:] and stored[d][-1] >= made[d] for d in ids)

        wait_until(arrived, 90, "every record made before, during and after the crash stored")
        stored = _stored_seqs(hub)
        for d in ids:
            seqs = stored[d]
            # The primary key makes a duplicate impossible; a hole would be a lost record.
            assert seqs == list(range(1, seqs[-1] + 1)), f"{d}: records missing"
        for runner in fleet:
            assert _outbox(runner, "dropped") == 0
        wait_until(
            lambda: all(_outbox(r, "backlog") < 10 for r in fleet),
            30,
            "the outboxes drained down to the records still being made",
        )
    finally:
        for runner in fleet:
            runner.stop()
        hub.stop()
