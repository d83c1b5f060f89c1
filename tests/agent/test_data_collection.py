"""Data collection: the policy's sampling and budgets, through the real scoring endpoint of a
real agent, and records made offline that reach the hub exactly once after a reconnect."""

from __future__ import annotations

import asyncio
import json
import random
from collections.abc import Callable, Coroutine, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from datetime import datetime, timedelta
from pathlib import Path
from typing import TYPE_CHECKING, Any

import httpx
import pytest

from agent.collection import Collector, ScoredSample
from agent.core import Agent
from agent.mqtt import MqttLink
from agent.protocol.documents import CollectPolicy
from agent.protocol.messages import CollectedRecord, Step
from agent.runtimes import load_runtime
from agent.runtimes.health import check_health
from agent.scoring import ScoringServer
from tests.support.agents import DEVICE, AgentThread, fast_settings
from tests.support.fake_hub import FakeHub
from tests.support.repository import NOW, RepositorySimulator, iris_files
from tests.support.waiting import wait_until

if TYPE_CHECKING:
    from examples.build_example_model import IrisModel

pytestmark = pytest.mark.integration

KEY = "collect-key-0123456789"
ROWS = [[5.1, 3.5, 1.4, 0.2], [6.9, 3.2, 5.7, 2.3]]
# A fixed device clock: the minute and the UTC day of the budgets do not move under a test.
CLOCK_AT = NOW + timedelta(minutes=30)
EVERY_CALL = CollectPolicy(sample_rate=1.0, max_per_minute=10_000, max_bytes_per_day=1 << 30)


# -- the policy on its own ------------------------------------------------------------------------


def sample(policy: CollectPolicy, at: datetime = CLOCK_AT, n: int = 0) -> ScoredSample:
    return ScoredSample(
        policy=policy,
        at=at,
        model="iris",
        version=1,
        deployment_id="dep-1",
        correlation_id=f"call-{n}",
        latency_ms=0.5,
        inputs=ROWS,
        outputs={"label": [0, 2]},
        size_hint=100,
    )


def collector(seed: int = 0, **kwargs: Any) -> Collector:
    values = {"max_record_bytes": 64 * 1024, "max_pending_bytes": 1 << 20, **kwargs}
    return Collector(rng=random.Random(seed), **values)


def test_the_sample_rate_draws_from_the_seeded_rng() -> None:
    policy = CollectPolicy(sample_rate=0.3, max_per_minute=10_000, max_bytes_per_day=1 << 30)
    c = collector(seed=5)
    kept = [c.offer(sample(policy, n=n)) for n in range(1000)]
    draws = random.Random(5)
    assert kept == [draws.random() < 0.3 for _ in range(1000)]
    assert c.counts.not_sampled == kept.count(False)


def test_at_most_max_per_minute_each_minute() -> None:
    policy = CollectPolicy(sample_rate=1.0, max_per_minute=3)
    c = collector()
    first = [c.offer(sample(policy, CLOCK_AT + timedelta(seconds=s))) for s in range(0, 50, 10)]
    second = [c.offer(sample(policy, CLOCK_AT + timedelta(minutes=1, seconds=s))) for s in (1, 2)]
    assert first == [True, True, True, False, False]
    assert second == [True, True]
    assert c.counts.over_minute == 2


def test_the_day_budget_counts_record_bytes_and_starts_again_each_utc_day() -> None:
    probe = collector()  # one record's size
    probe.offer(sample(EVERY_CALL))
    (one,), _ = probe.drain()
    c = collector()
    policy = CollectPolicy(sample_rate=1.0, max_per_minute=100, max_bytes_per_day=3 * len(one))
    for n in range(5):
        c.offer(sample(policy, n=n))
    records, (_, note) = c.drain()
    assert len(records) == 3
    assert c.counts.over_day == 2
    assert json.loads(note) == {"day": CLOCK_AT.date().isoformat(), "spent": {"iris": 3 * len(one)}}

    restarted = collector()
    restarted.restore(note)  # as the outbox gives it back after a restart
    restarted.offer(sample(policy, n=9))
    assert restarted.drain()[0] == []
    tomorrow = CLOCK_AT + timedelta(days=1)
    restarted.offer(sample(policy, at=tomorrow))
    assert len(restarted.drain()[0]) == 1


def test_calls_too_large_for_a_message_or_a_full_queue_are_skipped_and_counted() -> None:
    c = collector(max_record_bytes=1000, max_pending_bytes=250)
    big = ScoredSample(**{**sample(EVERY_CALL).__dict__, "size_hint": 5000})
    assert not c.offer(big)
    assert c.offer(sample(EVERY_CALL))
    assert c.offer(sample(EVERY_CALL))
    assert not c.offer(sample(EVERY_CALL))  # 3 x 100 bytes waiting would be over 250
    assert (c.counts.too_large, c.counts.queue_full) == (1, 1)


# -- a real agent serving /score ------------------------------------------------------------------


class GatedLink(MqttLink):
    """The real MQTT link, with a network that can be pulled: offline, the connection is cut (no
    DISCONNECT, as a lost network looks) and no reconnect is tried until it is back."""

    def __init__(self, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self.network = asyncio.Event()
        self.network.set()

    async def wait_for_network(self) -> None:
        await self.network.wait()

    def go_offline(self) -> None:
        self.network.clear()
        assert self.drop(), "there was no connection to cut"

    def go_online(self) -> None:
        self.network.set()


@dataclass
class Device:
    """A running agent with its scoring endpoint, driven from the test's thread."""

    runner: AgentThread
    agent: Agent
    loop: asyncio.AbstractEventLoop
    client: httpx.Client

    def score(self, correlation_id: str | None = None, data: Any = ROWS) -> dict[str, Any]:
        headers = {"x-api-key": KEY}
        if correlation_id is not None:
            headers["X-Correlation-Id"] = correlation_id
        r = self.client.post("/score", json={"data": data}, headers=headers)
        assert r.status_code == 200, r.text
        body: dict[str, Any] = r.json()
        return body

    def on_loop(self, coro: Callable[[], Coroutine[Any, Any, Any]]) -> Any:
        return asyncio.run_coroutine_threadsafe(coro(), self.loop).result(20)

    def call(self, fn: Callable[[], Any]) -> Any:
        return self.runner.call(fn)

    @property
    def link(self) -> GatedLink:
        link = self.agent.link
        assert isinstance(link, GatedLink)
        return link

    def held(self, stream: str) -> int:
        return int(self.call(lambda: self.agent.outbox.backlog(stream) if self.agent.outbox else 0))


def deploy(hub: FakeHub, repo: RepositorySimulator, iris_model: IrisModel, policy: Any) -> str:
    """Offer the iris package with ``policy`` and name it in the device's desired state."""
    package = repo.build_package(iris_files(iris_model.directory))
    hub.offer(package)
    ref = package.ref.model_copy(update={"collect": policy})
    hub.desired[DEVICE] = repo.desired_message([ref])
    return ref.deployment_id


@contextmanager
def serving(
    state_dir: Path,
    *,
    collect_rng: random.Random | None = None,
    **settings: Any,
) -> Iterator[Device]:
    """The agent (gated link, fixed clock) and its scoring endpoint, until iris is served."""
    values = {"telemetry": {"interval_s": 3600}, "collection": {"flush_s": 0.02}, **settings}
    runner = AgentThread(
        lambda: Agent(
            settings=fast_settings(state_dir, **values),
            load_runtime=load_runtime,
            check_health=check_health,
            clock=lambda: CLOCK_AT,
            link_factory=GatedLink,
            collect_rng=collect_rng,
        )
    )
    agent = runner.start()
    loop: asyncio.AbstractEventLoop = runner.call(asyncio.get_running_loop)
    server = ScoringServer(models=agent, keys=lambda: [KEY])
    asyncio.run_coroutine_threadsafe(server.start(), loop).result(10)
    try:
        with httpx.Client(base_url=f"http://127.0.0.1:{server.port}", timeout=10) as client:
            device = Device(runner, agent, loop, client)
            wait_until(lambda: device.call(lambda: agent.get("iris")) is not None, 30)
            yield device
    finally:
        asyncio.run_coroutine_threadsafe(server.stop(), loop).result(10)
        runner.stop()


def collected(hub: FakeHub) -> list[CollectedRecord]:
    with hub.changed:
        return [r for (device, _), r in hub.collected.items() if device == DEVICE]


def test_scoring_calls_are_collected_with_their_correlation_id_up_to_the_minute_limit(
    hub: FakeHub, repo: RepositorySimulator, state_dir: Path, iris_model: IrisModel
) -> None:
    policy = CollectPolicy(sample_rate=1.0, max_per_minute=5)
    deployment_id = deploy(hub, repo, iris_model, policy)
    with serving(state_dir) as device:
        answers = [device.score()]  # no correlation id
        answers += [device.score(f"req-{n}") for n in range(1, 5)]
        answers += [device.score("x" * 300)]  # over the minute's five: not collected
        answers += [device.score(f"late-{n}") for n in range(2)]
        hub.wait_for(lambda: len(collected(hub)) == 5)
        assert device.call(lambda: device.agent.collection.over_minute) == 3
        wait_until(lambda: device.held("dc") == 0)
    records = sorted(collected(hub), key=lambda r: r.seq)
    assert [r.correlation_id for r in records] == [None, "req-1", "req-2", "req-3", "req-4"]
    first = records[0]
    assert (first.model, first.version, first.deployment_id) == ("iris", 1, deployment_id)
    assert first.at == CLOCK_AT
    assert first.inputs == ROWS
    assert first.outputs == answers[0]["outputs"]
    assert first.latency_ms > 0


def test_a_long_correlation_id_is_cut_to_what_a_record_holds(
    hub: FakeHub, repo: RepositorySimulator, state_dir: Path, iris_model: IrisModel
) -> None:
    deploy(hub, repo, iris_model, EVERY_CALL)
    with serving(state_dir) as device:
        device.score("y" * 300)
        hub.wait_for(lambda: len(collected(hub)) == 1)
    assert collected(hub)[0].correlation_id == "y" * 200


def test_half_the_calls_are_collected_as_the_seeded_rng_draws(
    hub: FakeHub, repo: RepositorySimulator, state_dir: Path, iris_model: IrisModel
) -> None:
    policy = CollectPolicy(sample_rate=0.5, max_per_minute=10_000)
    deploy(hub, repo, iris_model, policy)
    with serving(state_dir, collect_rng=random.Random(11)) as device:
        for n in range(40):
            device.score(f"call-{n}")
        draws = random.Random(11)
        expected = [f"call-{n}" for n in range(40) if draws.random() < 0.5]
        hub.wait_for(lambda: len(collected(hub)) == len(expected))
        assert device.call(lambda: device.agent.collection.not_sampled) == 40 - len(expected)
    assert sorted(r.correlation_id or "" for r in collected(hub)) == sorted(expected)


def test_without_a_policy_nothing_is_collected_and_no_outbox_file_is_made(
    hub: FakeHub, repo: RepositorySimulator, state_dir: Path, iris_model: IrisModel
) -> None:
    deploy(hub, repo, iris_model, None)
    with serving(state_dir, telemetry={"enabled": False}) as device:
        for _ in range(5):
            device.score("nobody-asked")
        assert device.call(lambda: device.agent.collection.offered) == 0
    assert not (state_dir / "outbox.db").exists()


def test_the_day_byte_budget_holds_across_a_restart(
    hub: FakeHub, repo: RepositorySimulator, state_dir: Path, iris_model: IrisModel
) -> None:
    budget = 2000
    policy = CollectPolicy(sample_rate=1.0, max_per_minute=10_000, max_bytes_per_day=budget)
    deploy(hub, repo, iris_model, policy)
    with serving(state_dir) as device:
        for n in range(20):
            device.score(f"first-{n:02d}")
        counts = device.agent.collection
        wait_until(lambda: device.call(lambda: counts.kept + counts.over_day) == 20)
        kept = device.call(lambda: counts.kept)
        assert 0 < kept < 20
        hub.wait_for(lambda: len(collected(hub)) == kept)
    with serving(state_dir) as device:  # the same UTC day after a restart
        for n in range(5):
            device.score(f"again-{n}")
        wait_until(lambda: device.call(lambda: device.agent.collection.over_day) == 5)
    sizes = [len(r.model_dump_json(exclude={"seq"})) for r in collected(hub)]
    assert sum(sizes) <= budget
    assert budget - sum(sizes) < max(sizes)  # spent up to the last record that fitted


def test_records_made_offline_arrive_exactly_once_after_the_reconnect(
    hub: FakeHub, repo: RepositorySimulator, state_dir: Path, iris_model: IrisModel
) -> None:
    deploy(hub, repo, iris_model, EVERY_CALL)
    settings = {"telemetry": {"interval_s": 0.2, "resend_s": 1.0}}
    with serving(state_dir, **settings) as device:
        hub.wait_for(lambda: any(e.step is Step.ACTIVE for _, e in hub.events))
        online = [f"online-{n}" for n in range(10)]
        for cid in online:
            device.score(cid)
        hub.wait_for(lambda: len(collected(hub)) == len(online))
        wait_until(lambda: device.held("dc") == 0)  # acked

        device.call(device.link.go_offline)
        wait_until(lambda: not device.call(lambda: device.agent.connected))
        tm_before = device.call(lambda: device.agent.outbox.last_seq("tm"))
        offline = [f"offline-{n}" for n in range(60)]
        for cid in offline:
            device.score(cid)
        wait_until(lambda: device.held("dc") == len(offline))
        # Telemetry goes on offline too: a few intervals' records, taken with all that waiting.
        held_tm = device.held("tm")
        wait_until(lambda: device.held("tm") >= held_tm + 2)
        assert device.call(lambda: device.agent.outbox.last_seq("tm")) > tm_before

        device.call(device.link.go_online)
        hub.wait_for(lambda: len(collected(hub)) == len(online) + len(offline))
        hub.wait_for(lambda: any(r.reconnects == 1 for r in hub.telemetry.values()))

        def drained() -> tuple[int, int] | None:
            """(last tm seq, last dc seq) at a moment the outbox holds nothing."""
            outbox = device.agent.outbox
            assert outbox is not None
            if outbox.backlog("tm") or outbox.backlog("dc"):
                return None
            return outbox.last_seq("tm"), outbox.last_seq("dc")

        wait_until(lambda: device.call(drained) is not None)
        last_tm, last_dc = device.call(drained) or (0, 0)

    cids = [r.correlation_id for r in collected(hub)]
    assert sorted(cids, key=str) == sorted(online + offline, key=str)  # each exactly once
    assert sorted(r.seq for r in collected(hub)) == list(range(1, last_dc + 1))
    tm_seqs = sorted(seq for device_id, seq in hub.telemetry if device_id == DEVICE)
    assert tm_seqs[:last_tm] == list(range(1, last_tm + 1))
    assert sum(r.reconnects for r in hub.telemetry.values()) == 1
    assert any(r.outbox_backlog >= len(offline) for r in hub.telemetry.values())
    assert all(r.outbox_dropped == 0 for r in hub.telemetry.values())
