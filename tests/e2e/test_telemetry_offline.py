"""Telemetry and data collection across a hub outage, end to end: the real hub (its Mosquitto,
SQLite), a real agent scoring the iris model through its own endpoint. The hub goes down (its
broker with it) while the device keeps scoring and collecting; when the hub is back, every record
made before, during and after the outage is stored exactly once and the device's outbox is
empty."""

from datetime import UTC, datetime, timedelta
from typing import Any

import httpx
import pytest

from agent.scoring import ScoringServer
from tests.support.live_hub import LiveHub

pytestmark = pytest.mark.e2e

KEY = "test-scoring-key"
ROWS = [[5.1, 3.5, 1.4, 0.2]]


def _get(live_hub: LiveHub, path: str, **params: Any) -> Any:
    with live_hub.api as client:
        response = client.get(path, params=params)
    assert response.status_code == 200, response.text
    return response.json()


def _stored_correlation_ids(live_hub: LiveHub, device_id: str) -> list[str]:
    page = _get(live_hub, "/api/v1/data", device=device_id, limit=1000)
    assert page["next_cursor"] is None
    return [r["correlation_id"] for r in page["records"]]


def test_records_made_while_the_hub_is_down_arrive_exactly_once(
    live_hub: LiveHub, iris_model: Any
) -> None:
    live_hub.register(iris_model)
    runner = live_hub.start_agent("collector", telemetry={"interval_s": 0.3, "resend_s": 1.0})
    agent = runner.agent
    assert agent is not None
    device_id = agent.device_id
    with live_hub.api as client:
        created = client.post(
            "/api/v1/deployments",
            json={
                "model": "iris",
                "devices": [device_id],
                "data_collection": {"sample_rate": 1.0, "max_per_minute": 10_000},
            },
        )
    assert created.status_code == 201, created.text
    live_hub.wait_until(
        lambda: runner.call(lambda: agent.get("iris")) is not None, 60, "iris active"
    )
    server = ScoringServer(models=agent, keys=lambda: [KEY])
    runner.run(server.start())
    scoring = httpx.Client(base_url=f"http://127.0.0.1:{server.port}", timeout=10)

    def score(correlation_id: str) -> None:
        response = scoring.post(
            "/score",
            json={"data": ROWS},
            headers={"x-api-key": KEY, "X-Correlation-Id": correlation_id},
        )
        assert response.status_code == 200, response.text

    def backlog() -> tuple[int, int]:
        outbox = agent.outbox
        return (outbox.backlog("tm"), outbox.backlog("dc")) if outbox is not None else (0, 0)

    try:
        before = [f"before-{i}" for i in range(20)]
        for cid in before:
            score(cid)
        live_hub.wait_until(
            lambda: len(_stored_correlation_ids(live_hub, device_id)) == 20, 30, "20 stored"
        )

        assert live_hub.served is not None
        live_hub.served.stop()  # the hub and its broker: the device is cut off
        live_hub.wait_until(
            lambda: not runner.call(lambda: agent.connected), 30, "the device disconnected"
        )
        during = [f"during-{i}" for i in range(30)]
        for cid in during:
            score(cid)
        # Ten telemetry intervals pass offline (ten minutes of a device reporting once a
        # minute, at 0.3 s an interval), kept in the outbox with the scored calls.
        live_hub.wait_until(
            lambda: runner.call(backlog)[0] >= 10 and runner.call(backlog)[1] >= 30,
            30,
            "the outbox holding the offline records",
        )

        live_hub.restart()
        after = [f"after-{i}" for i in range(10)]
        live_hub.wait_until(lambda: runner.call(lambda: agent.connected), 60, "reconnected")
        for cid in after:
            score(cid)
        live_hub.wait_until(
            lambda: len(_stored_correlation_ids(live_hub, device_id)) == 60, 60, "60 stored"
        )
        live_hub.wait_until(lambda: runner.call(backlog) == (0, 0), 30, "the outbox empty")
    finally:
        scoring.close()
        runner.run(server.stop())

    stored = _stored_correlation_ids(live_hub, device_id)
    assert sorted(stored) == sorted(before + during + after), "each record exactly once"
    since = (datetime.now(UTC) - timedelta(hours=1)).isoformat()
    points = _get(live_hub, f"/api/v1/devices/{device_id}/telemetry", since=since)["points"]
    seqs = [p["seq"] for p in points]
    assert seqs == list(range(seqs[0], seqs[0] + len(seqs))), "no telemetry record missing"
    assert len(seqs) >= 12
    assert max(p["outbox_backlog"] for p in points) >= 30  # what the device held offline
    assert all(p["outbox_dropped"] == 0 for p in points)
    assert sum(p["reconnects"] for p in points) >= 1
