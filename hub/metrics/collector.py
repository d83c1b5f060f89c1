"""What ``GET /metrics`` reports, read at scrape time from the database and the message worker's
counters (a collector, not counters kept in memory: every hub replica reports the same fleet
figures from the shared database, and a restart loses nothing)."""

from collections.abc import Callable, Iterator
from datetime import timedelta

import sqlalchemy as sa
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric
from prometheus_client.registry import Collector
from sqlalchemy import func
from sqlalchemy.engine import Engine
from sqlmodel import Session, col, select

from hub.database import UTCDateTime, utcnow
from hub.deployments.models import Deployment, DeploymentDevice, RolloutState
from hub.devices.models import Device
from hub.messaging.handlers import MessageStats
from hub.telemetry.models import CollectedRecord, DeadLetter, TelemetryPoint

# The message worker's counters, by the name they carry in the metric's ``result`` label.
_MESSAGE_RESULTS = ("handled", "malformed", "unknown_device", "overflow", "failed")
# Rollouts whose devices are still counted per state (finished ones would only grow the list).
_LIVE = (RolloutState.RUNNING, RolloutState.PAUSED)


# Each device's per-model figures, unpacked from ``telemetry_point.models`` in SQL and summed
# per model and version: calls, errors, each device's percentiles weighted by its calls (a
# fleet-wide estimate: devices send percentiles, not calls), and the worst device's p99. The
# same query in each database's JSON dialect. Entry-script models also report their worker:
# restarts, calls killed past their time limit, crashes, and devices that said "crash loop".
_SQLITE_PER_MODEL = """
SELECT json_extract(m.value, '$.model'), json_extract(m.value, '$.version'),
       SUM(json_extract(m.value, '$.inferences')), SUM(json_extract(m.value, '$.errors')),
       SUM(json_extract(m.value, '$.p50_ms') * json_extract(m.value, '$.inferences')),
       SUM(json_extract(m.value, '$.p95_ms') * json_extract(m.value, '$.inferences')),
       SUM(json_extract(m.value, '$.p99_ms') * json_extract(m.value, '$.inferences')),
       MAX(json_extract(m.value, '$.p99_ms')),
       SUM(json_extract(m.value, '$.restarts')), SUM(json_extract(m.value, '$.timeouts')),
       SUM(json_extract(m.value, '$.crashes')),
       COUNT(DISTINCT CASE WHEN json_extract(m.value, '$.worker') = 'crash_loop'
                           THEN t.device_id END)
FROM telemetry_point AS t, json_each(t.models) AS m
WHERE t.at >= :since
GROUP BY 1, 2
"""
_POSTGRESQL_PER_MODEL = """
SELECT m->>'model', (m->>'version')::bigint,
       SUM((m->>'inferences')::bigint), SUM((m->>'errors')::bigint),
       SUM((m->>'p50_ms')::float8 * (m->>'inferences')::bigint),
       SUM((m->>'p95_ms')::float8 * (m->>'inferences')::bigint),
       SUM((m->>'p99_ms')::float8 * (m->>'inferences')::bigint),
       MAX((m->>'p99_ms')::float8),
       SUM((m->>'restarts')::bigint), SUM((m->>'timeouts')::bigint),
       SUM((m->>'crashes')::bigint),
       COUNT(DISTINCT CASE WHEN m->>'worker' = 'crash_loop' THEN t.device_id END)
FROM telemetry_point AS t, json_array_elements(t.models) AS m
WHERE t.at >= :since
GROUP BY 1, 2
"""
_PER_MODEL = {
    dialect: sa.text(sql).bindparams(sa.bindparam("since", type_=UTCDateTime()))
    for dialect, sql in (("sqlite", _SQLITE_PER_MODEL), ("postgresql", _POSTGRESQL_PER_MODEL))
}


class FleetCollector(Collector):
    """Devices, rollouts and message handling, as Prometheus metrics."""

    def __init__(
        self,
        engine: Engine,
        stats: Callable[[], MessageStats | None],
        *,
        window_s: float = 300.0,
    ) -> None:
        self._engine = engine
        self._stats = stats
        # Rates and latencies are over the last window_s: a few telemetry intervals, so one
        # late interval moves them little, and a scrape reads a bounded, indexed range.
        self._window_s = window_s

    def collect(self) -> Iterator[Metric]:
        with Session(self._engine) as session:
            yield from self._devices(session)
            yield from self._deployments(session)
            yield from self._models(session)
            yield from self._ingest(session)
        yield from self._messages()

    def _devices(self, session: Session) -> Iterator[Metric]:
        online = dict(
            session.exec(select(Device.online, func.count()).group_by(col(Device.online))).all()
        )
        family = GaugeMetricFamily(
            "outpost_devices", "Enrolled devices, by connection state", labels=["state"]
        )
        family.add_metric(["online"], online.get(True, 0))
        family.add_metric(["offline"], online.get(False, 0))
        yield family

    def _deployments(self, session: Session) -> Iterator[Metric]:
        by_state = dict(
            session.exec(
                select(Deployment.state, func.count()).group_by(col(Deployment.state))
            ).all()
        )
        rollouts = GaugeMetricFamily(
            "outpost_deployments", "Deployments, by rollout state", labels=["state"]
        )
        for state in RolloutState:
            rollouts.add_metric([str(state)], by_state.get(state, 0))
        yield rollouts
        devices = GaugeMetricFamily(
            "outpost_rollout_devices",
            "Devices of running or paused rollouts, by their state in the rollout",
            labels=["state"],
        )
        for device_state, count in session.exec(
            select(DeploymentDevice.state, func.count())
            .join(Deployment, col(Deployment.id) == col(DeploymentDevice.deployment_id))
            .where(col(Deployment.state).in_(_LIVE))
            .group_by(col(DeploymentDevice.state))
        ).all():
            devices.add_metric([device_state], count)
        yield devices

    def _models(self, session: Session) -> Iterator[Metric]:
        since = utcnow() - timedelta(seconds=self._window_s)
        dialect = session.get_bind().dialect.name
        rows = session.execute(_PER_MODEL[dialect], {"since": since}).all()
        window = f"over the last {self._window_s:g} s of devices' telemetry"
        rate = GaugeMetricFamily(
            "outpost_model_inferences_per_second",
            f"Scoring calls per second on devices, {window}",
            labels=["model", "version"],
        )
        errors = GaugeMetricFamily(
            "outpost_model_errors_per_second",
            f"Failed scoring calls per second on devices, {window}",
            labels=["model", "version"],
        )
        latency = GaugeMetricFamily(
            "outpost_model_latency_ms",
            f"Scoring latency on devices: each device's percentile weighted by its calls, {window}",
            labels=["model", "version", "quantile"],
        )
        worst = GaugeMetricFamily(
            "outpost_model_latency_worst_p99_ms",
            f"The highest p99 scoring latency any device reported, {window}",
            labels=["model", "version"],
        )
        worker_events = GaugeMetricFamily(
            "outpost_model_worker_events",
            f"Entry-script worker restarts, calls past their time limit and crashes devices"
            f" reported, {window}",
            labels=["model", "version", "event"],
        )
        crash_loops = GaugeMetricFamily(
            "outpost_model_worker_crash_loop_devices",
            f"Devices that reported an entry script's worker in crash loop, {window}",
            labels=["model", "version"],
        )
        for model, version, *figures in rows:
            # PostgreSQL sums integers as NUMERIC (Decimal), which does not mix with float.
            calls, failed, p50, p95, p99, max_p99, restarts, timeouts, crashes, looping = (
                None if f is None else float(f) for f in figures
            )
            labels = [model, str(version)]
            rate.add_metric(labels, (calls or 0) / self._window_s)
            errors.add_metric(labels, (failed or 0) / self._window_s)
            if calls:
                for quantile, weighted in (("0.5", p50), ("0.95", p95), ("0.99", p99)):
                    if weighted is not None:
                        latency.add_metric([*labels, quantile], weighted / calls)
            if max_p99 is not None:
                worst.add_metric(labels, max_p99)
            if restarts is not None or timeouts is not None or crashes is not None:
                # Only entry-script models report a worker; built-in ones get no series.
                for event, count in (
                    ("restart", restarts),
                    ("timeout", timeouts),
                    ("crash", crashes),
                ):
                    worker_events.add_metric([*labels, event], count or 0)
                crash_loops.add_metric(labels, looping or 0)
        yield from (rate, errors, latency, worst, worker_events, crash_loops)

    def _ingest(self, session: Session) -> Iterator[Metric]:
        since = utcnow() - timedelta(seconds=self._window_s)
        stored = GaugeMetricFamily(
            "outpost_ingest_records_per_second",
            f"Records stored per second, by stream, over the last {self._window_s:g} s",
            labels=["stream"],
        )
        for stream, table in (("tm", TelemetryPoint), ("dc", CollectedRecord)):
            count = session.exec(select(func.count()).where(col(table.received_at) >= since)).one()
            stored.add_metric([stream], count / self._window_s)
        yield stored
        # Cumulative per device (since its install), so the latest report of each device
        # that reported in the window is its whole count.
        latest = (
            select(func.max(TelemetryPoint.outbox_dropped).label("dropped"))
            .where(col(TelemetryPoint.at) >= since)
            .group_by(col(TelemetryPoint.device_id))
            .subquery()
        )
        dropped = float(session.exec(select(func.coalesce(func.sum(latest.c.dropped), 0))).one())
        yield GaugeMetricFamily(
            "outpost_device_records_dropped",
            "Records devices' outboxes dropped since their install (bound hit, disk full),"
            f" summed over the devices that reported in the last {self._window_s:g} s",
            value=dropped,
        )
        yield GaugeMetricFamily(
            "outpost_dead_letters",
            "Malformed device messages kept aside (within the telemetry retention)",
            value=session.exec(select(func.count()).select_from(DeadLetter)).one(),
        )

    def _messages(self) -> Iterator[Metric]:
        stats = self._stats()
        if stats is None:
            return  # messaging does not run in this process (API-only)
        family = CounterMetricFamily(
            "outpost_device_messages",
            "Device messages taken off the broker, by what became of them",
            labels=["result"],
        )
        for result in _MESSAGE_RESULTS:
            family.add_metric([result], getattr(stats, result))
        yield family
