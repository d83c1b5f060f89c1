"""Telemetry: one interval's figures from real readings and real scoring calls, and the records'
way through the outbox to a hub that acknowledges them (or does not)."""

from __future__ import annotations

import asyncio
import json
import os
import random
import time
from datetime import UTC, datetime
from pathlib import Path
from typing import TYPE_CHECKING, Any

import httpx
import pytest

from agent.outbox import Outbox, OutboxLimits, stored
from agent.protocol.messages import ModelStats, TelemetryRecord
from agent.runtimes.onnx import OnnxRuntime
from agent.scoring import ScoringCall, ScoringServer
from agent.telemetry import IntervalMeter, ModelCalls, ProcessProbe, Reservoir, percentile
from tests.agent.test_scoring import AUTH, KEY, ROWS, Models, active
from tests.support.agents import DEVICE, running_agent
from tests.support.fake_hub import FakeHub
from tests.support.waiting import wait_until

if TYPE_CHECKING:
    from examples.build_example_model import IrisModel

NOW = datetime(2025, 6, 1, 12, 0, tzinfo=UTC)


# -- the figures --------------------------------------------------------------------------------


def test_percentiles_are_nearest_rank() -> None:
    ordered = [float(v) for v in range(1, 101)]
    assert [percentile(ordered, q) for q in (0.50, 0.95, 0.99, 1.0)] == [50.0, 95.0, 99.0, 100.0]
    assert percentile([7.0], 0.99) == 7.0


def test_a_busy_model_keeps_a_bounded_uniform_sample_of_its_latencies() -> None:
    reservoir = Reservoir(1000, random.Random(1))
    for value in range(100_000):
        reservoir.add(float(value))
    assert len(reservoir.values) == 1000
    assert reservoir.seen == 100_000
    # Uniform: the sample's median is near the whole range's (50,000), not stuck at the start.
    assert 40_000 < percentile(reservoir.values, 0.50) < 60_000


def test_every_active_model_is_reported_even_without_calls() -> None:
    calls = ModelCalls(random.Random(0))
    calls.record("iris", 2, 1.5, failed=False)
    calls.record("iris", 1, 3.0, failed=True)  # the version replaced during the interval
    stats = calls.take([("iris", 2), ("other", 1)])
    assert [(s.model, s.version, s.inferences, s.errors) for s in stats] == [
        ("iris", 2, 1, 0),
        ("other", 1, 0, 0),
        ("iris", 1, 1, 1),
    ]
    assert stats[1].p50_ms is None
    assert calls.take([]) == []  # a new interval starts empty


def test_process_figures_are_sane(tmp_path: Path) -> None:
    meter = IntervalMeter(ModelCalls(random.Random(0)))
    meter.start()
    busy_until = time.process_time() + 0.2
    while time.process_time() < busy_until:
        pass  # burn CPU, so the interval has some to measure
    fields = meter.take(
        at=NOW,
        health="ok",
        connects=1,
        outbox_backlog=0,
        outbox_dropped=0,
        disk_free_bytes=None,
        active=[],
    )
    assert 0 < fields["cpu_percent"] <= 100 * (os.cpu_count() or 1)
    assert fields["memory_bytes"] > 10 * 1024 * 1024  # this interpreter, at least
    assert fields["interval_s"] >= 0.2
    assert fields["uptime_s"] >= fields["interval_s"]
    assert fields["reconnects"] == 0  # the first connect is not a reconnect


def test_reconnects_count_the_connects_after_the_first() -> None:
    meter = IntervalMeter(ModelCalls(random.Random(0)))
    meter.start()
    common: dict[str, Any] = {
        "at": NOW,
        "health": "ok",
        "outbox_backlog": 0,
        "outbox_dropped": 0,
        "disk_free_bytes": None,
        "active": [],
    }
    assert meter.take(connects=0, **common)["reconnects"] == 0
    assert meter.take(connects=1, **common)["reconnects"] == 0
    assert meter.take(connects=4, **common)["reconnects"] == 3
    assert meter.take(connects=4, **common)["reconnects"] == 0


def test_intervals_taken_back_to_back_still_make_valid_records() -> None:
    meter = IntervalMeter(ModelCalls(random.Random(0)))
    meter.start()
    for _ in range(3):
        fields = meter.take(
            at=NOW,
            health="ok",
            connects=1,
            outbox_backlog=0,
            outbox_dropped=0,
            disk_free_bytes=None,
            active=[],
        )
        assert json.loads(stored(TelemetryRecord, fields))["interval_s"] > 0


def test_the_hottest_thermal_zone_gives_the_temperature(tmp_path: Path) -> None:
    for name, milli in (("thermal_zone0", "41000"), ("thermal_zone1", "55500")):
        (tmp_path / name).mkdir()
        (tmp_path / name / "temp").write_text(milli + "\n")
    (tmp_path / "thermal_zone2").mkdir()  # a zone that will not say
    assert ProcessProbe(thermal_root=tmp_path).temperature_c() == 55.5
    assert ProcessProbe(thermal_root=tmp_path / "none").temperature_c() is None


class _Counting:
    """The observer the agent core is, reduced to its telemetry part."""

    def __init__(self, calls: ModelCalls) -> None:
        self.calls = calls

    def scored(self, call: ScoringCall) -> None:
        model = call.model
        failed = call.outputs is None
        self.calls.record(model.name, model.version, call.latency_s * 1000, failed=failed)


def test_latencies_and_errors_come_from_real_scoring_calls(iris_model: IrisModel) -> None:
    iris = active("iris", OnnxRuntime(iris_model.model), version=3)
    calls = ModelCalls(random.Random(0))
    client_ms: list[float] = []

    async def main() -> list[ModelStats]:
        server = ScoringServer(models=Models(iris), keys=lambda: [KEY], observer=_Counting(calls))
        await server.start()
        try:
            async with httpx.AsyncClient(base_url=f"http://127.0.0.1:{server.port}") as client:
                for _ in range(50):
                    started = time.perf_counter()
                    r = await client.post("/score", json={"data": ROWS}, headers=AUTH)
                    client_ms.append((time.perf_counter() - started) * 1000)
                    assert r.status_code == 200
                for _ in range(3):  # the model refuses these: errors
                    r = await client.post("/score", json={"data": [[1, 2]]}, headers=AUTH)
                    assert r.status_code == 400
                r = await client.post("/score", content=b"{not json", headers=AUTH)
                assert r.status_code == 400  # never reached the model: not counted
        finally:
            await server.stop()
        return calls.take([("iris", 3)])

    (stats,) = asyncio.run(main())
    assert (stats.inferences, stats.errors) == (53, 3)
    assert stats.p50_ms is not None
    assert stats.p95_ms is not None
    assert stats.p99_ms is not None
    assert 0 < stats.p50_ms <= stats.p95_ms <= stats.p99_ms
    # The model's own time is part of what the client waited for.
    assert stats.p50_ms < sorted(client_ms)[len(client_ms) // 2]


# -- through the outbox to the hub ---------------------------------------------------------------


def _held(runner: Any, agent: Any) -> int:
    return int(runner.call(lambda: agent.outbox.backlog("tm") if agent.outbox else -1))


@pytest.mark.integration
def test_telemetry_records_reach_the_hub_once_and_leave_the_outbox_when_acked(
    hub: FakeHub, state_dir: Path
) -> None:
    with running_agent(state_dir, telemetry={"interval_s": 0.1}) as (runner, agent):
        hub.wait_for(lambda: len(hub.telemetry) >= 5)
        wait_until(lambda: _held(runner, agent) == 0)
    seqs = sorted(seq for device, seq in hub.telemetry if device == DEVICE)
    assert seqs == list(range(1, len(seqs) + 1))
    record = hub.telemetry[(DEVICE, seqs[-1])]
    assert record.health == "ok"
    assert record.disk_free_bytes is not None
    assert record.disk_free_bytes > 0
    assert record.memory_bytes is not None
    assert record.outbox_dropped == 0
    assert all(0 < len(sent) <= 1000 for _, _, _, sent, _ in hub.batches)


@pytest.mark.integration
def test_a_batch_without_an_ack_is_sent_again_and_stays_until_acked(
    hub: FakeHub, state_dir: Path
) -> None:
    hub.ack_records = False
    settings = {"telemetry": {"interval_s": 0.1, "resend_s": 0.3}}
    with running_agent(state_dir, **settings) as (runner, agent):
        hub.wait_for(lambda: hub.duplicates >= 2)  # the unacknowledged batch, sent again
        assert _held(runner, agent) >= 1
        sends = [seqs for _, stream, _, seqs, _ in hub.batches if stream == "tm"]
        assert sends[1][0] == sends[0][0], "a resend starts from the oldest unacknowledged"
        hub.ack_records = True
        hub.wait_for(lambda: len(hub.telemetry) >= 10)
        wait_until(lambda: _held(runner, agent) == 0)


@pytest.mark.integration
def test_records_over_the_bound_are_dropped_counted_and_acknowledged_past(
    hub: FakeHub, state_dir: Path
) -> None:
    hub.ack_records = False  # the hub stores but does not confirm: the outbox fills up
    settings = {
        "telemetry": {"interval_s": 0.05, "resend_s": 0.2},
        "outbox": {"max_records": 3},
    }
    with running_agent(state_dir, **settings) as (runner, agent):
        wait_until(lambda: runner.call(lambda: agent.outbox_figures().dropped) >= 10)
        assert _held(runner, agent) <= 3
        hub.ack_records = True
        # A resend carries first_kept past the dropped seqs; the hub acks across that gap.
        hub.wait_for(lambda: any(first > 1 for _, _, first, _, _ in hub.batches))
        wait_until(lambda: _held(runner, agent) == 0)
        hub.wait_for(lambda: max(r.outbox_dropped for r in hub.telemetry.values()) >= 10)


@pytest.mark.integration
def test_a_stored_record_that_no_longer_validates_is_dropped_not_stuck(
    hub: FakeHub, state_dir: Path
) -> None:
    fields = {"at": NOW, "interval_s": 60.0, "uptime_s": 1.0}
    left = Outbox(state_dir / "outbox.db", OutboxLimits(max_records=100, max_bytes=1 << 20))
    good = stored(TelemetryRecord, fields)
    left.append("tm", [good, b'{"interval_s": "not a number"}', good])  # as another version left
    left.close()
    with running_agent(state_dir, telemetry={"interval_s": 3600}) as (runner, agent):
        hub.wait_for(lambda: (DEVICE, 3) in hub.telemetry)
        wait_until(lambda: _held(runner, agent) == 0)
        assert runner.call(lambda: agent.outbox_figures().dropped) == 1
    assert sorted(seq for _, seq in hub.telemetry) == [1, 3]
    assert hub.acked[(DEVICE, "tm")] == 3  # past the dropped seq, by first_kept
