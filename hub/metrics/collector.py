"""What ``GET /metrics`` reports, read at scrape time from the database and the message worker's
counters (a collector, not counters kept in memory: every hub replica reports the same fleet
figures from the shared database, and a restart loses nothing)."""

from collections.abc import Callable, Iterator

from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric
from prometheus_client.registry import Collector
from sqlalchemy import func
from sqlalchemy.engine import Engine
from sqlmodel import Session, col, select

from hub.deployments.models import Deployment, DeploymentDevice, RolloutState
from hub.devices.models import Device
from hub.messaging.handlers import MessageStats

# The message worker's counters, by the name they carry in the metric's ``result`` label.
_MESSAGE_RESULTS = ("handled", "malformed", "unknown_device", "overflow", "failed")
# Rollouts whose devices are still counted per state (finished ones would only grow the list).
_LIVE = (RolloutState.RUNNING, RolloutState.PAUSED)


class FleetCollector(Collector):
    """Devices, rollouts and message handling, as Prometheus metrics."""

    def __init__(self, engine: Engine, stats: Callable[[], MessageStats | None]) -> None:
        self._engine = engine
        self._stats = stats

    def collect(self) -> Iterator[Metric]:
        with Session(self._engine) as session:
            yield from self._devices(session)
            yield from self._deployments(session)
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
