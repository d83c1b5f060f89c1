"""``GET /metrics``: the Prometheus exposition of the fleet, read from the database at scrape
time, parsed back with prometheus_client's own parser."""

from datetime import UTC, datetime, timedelta
from typing import TYPE_CHECKING

import pytest
from prometheus_client.parser import text_string_to_metric_families
from sqlmodel import Session

from agent.protocol.messages import (
    ModelStats,
    TelemetryBody,
    TelemetryRecord,
    WorkerState,
    encode,
)
from agent.protocol.topics import Channel
from hub.messaging.handlers import Handlers, MessageStats, handle_message

from .conftest import RunningHub

if TYPE_CHECKING:
    from examples.build_example_model import IrisModel


def _samples(hub: RunningHub) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
    response = hub.client.get("/metrics")
    assert response.status_code == 200, response.text
    assert response.headers["content-type"].startswith("text/plain")
    return {
        (s.name, tuple(sorted(s.labels.items()))): s.value
        for family in text_string_to_metric_families(response.text)
        for s in family.samples
    }


def test_metrics_count_devices_rollouts_and_messages(
    running_hub: RunningHub, iris_model: "IrisModel"
) -> None:
    assert running_hub.register_iris(iris_model).status_code == 201
    devices = [running_hub.enroll()["device_id"] for _ in range(3)]
    created = running_hub.client.post(
        "/api/v1/deployments",
        json={"model": "iris", "devices": devices, "policy": {"canary": 1}},
    )
    assert created.status_code == 201, created.text
    running_hub.ctx.message_stats = MessageStats(handled=7, malformed=2)

    samples = _samples(running_hub)
    assert samples[("outpost_devices", (("state", "offline"),))] == 3
    assert samples[("outpost_devices", (("state", "online"),))] == 0
    assert samples[("outpost_deployments", (("state", "running"),))] == 1
    assert samples[("outpost_deployments", (("state", "completed"),))] == 0
    assert samples[("outpost_rollout_devices", (("state", "in_progress"),))] == 1
    assert samples[("outpost_rollout_devices", (("state", "pending"),))] == 2
    assert samples[("outpost_device_messages_total", (("result", "handled"),))] == 7
    assert samples[("outpost_device_messages_total", (("result", "malformed"),))] == 2


def test_metrics_need_the_admin_token(running_hub: RunningHub) -> None:
    running_hub.client.headers.pop("Authorization")
    assert running_hub.client.get("/metrics").status_code == 401


def _telemetry(hub: RunningHub, device_id: str, records: list[TelemetryRecord]) -> None:
    handlers = Handlers(
        director=hub.ctx.director(),
        publisher=hub.publisher,
        topics=hub.ctx.topics,
        packages_dir=hub.settings.packages_dir,
    )
    body = TelemetryBody(first_kept=records[0].seq, records=records)
    with Session(hub.ctx.engine, expire_on_commit=False) as session:
        handle_message(
            session=session,
            handlers=handlers,
            topic=hub.ctx.topics.device(device_id, Channel.TM),
            payload=encode(body),
        )


def _interval(seq: int, at: datetime, *models: ModelStats, dropped: int = 0) -> TelemetryRecord:
    return TelemetryRecord(
        seq=seq, at=at, interval_s=60, uptime_s=60 * seq, outbox_dropped=dropped, models=models
    )


@pytest.fixture(params=["sqlite", "postgresql"])
def any_hub(request: pytest.FixtureRequest) -> RunningHub:
    # PostgreSQL sums integers as NUMERIC: the collector once failed on Decimal there.
    hub: RunningHub = request.getfixturevalue(
        "running_hub" if request.param == "sqlite" else "pg_hub"
    )
    return hub


def test_metrics_give_per_model_rates_and_latency_ingest_rate_and_losses(
    any_hub: RunningHub,
) -> None:
    running_hub = any_hub
    now = datetime.now(UTC)
    a, b = (running_hub.enroll()["device_id"] for _ in range(2))
    iris = "iris"
    _telemetry(
        running_hub,
        a,
        [
            _interval(
                1,
                now - timedelta(seconds=120),
                ModelStats(
                    model=iris, version=2, inferences=300, errors=3, p50_ms=1, p95_ms=2, p99_ms=4
                ),
                dropped=5,
            ),
            _interval(
                2,
                now - timedelta(seconds=60),
                ModelStats(
                    model=iris, version=2, inferences=300, errors=0, p50_ms=1, p95_ms=2, p99_ms=4
                ),
                dropped=7,
            ),
            # Older than the window: counted in no rate.
            _interval(
                3,
                now - timedelta(hours=1),
                ModelStats(
                    model=iris, version=1, inferences=10_000, errors=0, p50_ms=9, p95_ms=9, p99_ms=9
                ),
            ),
        ],
    )
    _telemetry(
        running_hub,
        b,
        [
            _interval(
                1,
                now - timedelta(seconds=30),
                ModelStats(
                    model=iris, version=2, inferences=600, errors=0, p50_ms=4, p95_ms=8, p99_ms=20
                ),
                dropped=1,
            ),
        ],
    )
    samples = _samples(running_hub)
    v2 = (("model", iris), ("version", "2"))
    assert samples[("outpost_model_inferences_per_second", v2)] == pytest.approx(1200 / 300)
    assert samples[("outpost_model_errors_per_second", v2)] == pytest.approx(3 / 300)
    # Weighted by calls: (300*1 + 300*1 + 600*4) / 1200 = 2.5
    assert samples[
        ("outpost_model_latency_ms", (("model", iris), ("quantile", "0.5"), ("version", "2")))
    ] == pytest.approx(2.5)
    assert samples[
        ("outpost_model_latency_ms", (("model", iris), ("quantile", "0.99"), ("version", "2")))
    ] == pytest.approx(12)
    assert samples[("outpost_model_latency_worst_p99_ms", v2)] == 20
    assert ("outpost_model_inferences_per_second", (("model", iris), ("version", "1"))) not in (
        samples
    )
    assert samples[("outpost_ingest_records_per_second", (("stream", "tm"),))] == pytest.approx(
        4 / 300
    )
    assert samples[("outpost_device_records_dropped", ())] == 7 + 1
    assert samples[("outpost_dead_letters", ())] == 0


def test_metrics_report_entry_script_workers_restarts_timeouts_and_crash_loops(
    any_hub: RunningHub,
) -> None:
    now = datetime.now(UTC)
    a, b = (any_hub.enroll()["device_id"] for _ in range(2))

    def script(worker: WorkerState, restarts: int, timeouts: int, crashes: int) -> ModelStats:
        return ModelStats(
            model="scored",
            version=1,
            inferences=10,
            errors=restarts,
            worker=worker,
            restarts=restarts,
            timeouts=timeouts,
            crashes=crashes,
        )

    _telemetry(
        any_hub,
        a,
        [
            _interval(1, now - timedelta(seconds=90), script("restarting", 1, 1, 0)),
            _interval(2, now - timedelta(seconds=30), script("crash_loop", 4, 0, 4)),
        ],
    )
    _telemetry(
        any_hub,
        b,
        [
            _interval(
                1,
                now - timedelta(seconds=20),
                script("ok", 0, 0, 0),
                ModelStats(model="iris", version=2, inferences=5, errors=0),
            ),
        ],
    )
    samples = _samples(any_hub)
    labels = (("model", "scored"), ("version", "1"))
    events = {
        event: samples[("outpost_model_worker_events", (("event", event), *labels))]
        for event in ("restart", "timeout", "crash")
    }
    assert events == {"restart": 5, "timeout": 1, "crash": 4}
    assert samples[("outpost_model_worker_crash_loop_devices", labels)] == 1
    # A built-in model has no worker, so no worker series.
    assert not any(
        name.startswith("outpost_model_worker") and ("model", "iris") in key
        for name, key in samples
    )
