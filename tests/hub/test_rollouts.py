"""Staged rollouts on a real hub (API, SQLite, handlers, engine), with devices played by the
messages they would send. The simulator tests (tests/sim/test_rollouts.py) run the same with real
agents over a real broker; these pin the engine's rules one by one."""

from datetime import datetime, timedelta
from typing import TYPE_CHECKING, Any, Literal

import pytest
from sqlmodel import Session

from agent.protocol.documents import DesiredState
from agent.protocol.messages import (
    DesiredBody,
    EventBody,
    ModelStatus,
    Reason,
    StateBody,
    StatusBody,
    Step,
    decode,
    encode,
)
from agent.protocol.topics import Channel
from hub.database import utcnow
from hub.deployments.engine import RolloutEngine, Tick
from hub.deployments.policy import RolloutPolicy
from hub.devices.models import Device
from hub.messaging.chunks import ChunkScheduler
from hub.messaging.handlers import Handlers, handle_message

from .conftest import RunningHub

if TYPE_CHECKING:
    from examples.build_example_model import IrisModel


class Fleet:
    """Devices that answer as the agent would, by sending its messages to the hub's handlers."""

    def __init__(self, hub: RunningHub) -> None:
        self.hub = hub
        self.seq: dict[str, int] = {}
        self.engine = RolloutEngine(owner="test-hub")
        self.handlers = Handlers(
            director=hub.ctx.director(),
            publisher=hub.publisher,
            topics=hub.ctx.topics,
            packages_dir=hub.settings.packages_dir,
            chunks=ChunkScheduler(gather_s=0, first_gather_max_s=0, min_interval_s=0),
        )

    def enroll(self, count: int, **tags: str) -> list[str]:
        client = self.hub.client
        token = client.post("/api/v1/enrollment-tokens", json={"uses": count}).json()["token"]
        response = client.post(
            "/api/v1/enroll/bulk", json={"token": token, "devices": [{"tags": tags}] * count}
        )
        assert response.status_code == 201, response.text
        ids = [d["device_id"] for d in response.json()["devices"]]
        for device_id in ids:
            self.send(device_id, Channel.STATUS, StatusBody(online=True))
        return ids

    def send(self, device_id: str, channel: Channel, body: Any) -> None:
        with Session(self.hub.ctx.engine, expire_on_commit=False) as session:
            handle_message(
                session=session,
                handlers=self.handlers,
                topic=self.hub.ctx.topics.device(device_id, channel),
                payload=encode(body),
            )

    def event(self, device_id: str, dep: dict[str, Any], step: Step, **kw: Any) -> None:
        self.seq[device_id] = self.seq.get(device_id, 0) + 1
        digest = kw.pop("digest", dep["package_digest"])
        body = EventBody(
            seq=self.seq[device_id],
            deployment_id=dep["id"],
            model=dep["model"],
            version=dep["version"],
            digest=digest,
            step=step,
            **kw,
        )
        self.send(device_id, Channel.EVT, body)

    def report(
        self, device_id: str, active: dict[str, str], health: Literal["ok", "degraded"] = "ok"
    ) -> None:
        self.seq[device_id] = self.seq.get(device_id, 0) + 1
        body = StateBody(
            seq=self.seq[device_id],
            agent_version="0.1.0",
            device_class="generic",
            active=[ModelStatus(model=m, version=1, digest=d) for m, d in active.items()],
            health=health,
        )
        self.send(device_id, Channel.STATE, body)

    def tick(self, now: datetime | None = None) -> Tick:
        with Session(self.hub.ctx.engine, expire_on_commit=False) as session:
            tick = self.engine.tick(session, now)
            if tick.published:
                self.hub.ctx.director().publish_many(session=session, device_ids=tick.published)
        return tick

    def desired(self, device_id: str) -> list[DesiredState]:
        out = []
        for msg in self.hub.publisher.on(self.hub.ctx.topics.device(device_id, Channel.DESIRED)):
            body = decode(msg.payload).body
            assert isinstance(body, DesiredBody)
            out.append(DesiredState.model_validate(body.desired.signed))
        return out

    def deploy(self, **body: Any) -> dict[str, Any]:
        response = self.hub.client.post(
            "/api/v1/deployments",
            json={"model": "iris", **body},
            headers={"X-Outpost-Actor": "alice@ops"},
        )
        assert response.status_code == 201, response.text
        dep: dict[str, Any] = response.json()
        return dep

    def view(self, dep: dict[str, Any]) -> dict[str, Any]:
        body: dict[str, Any] = self.hub.client.get(f"/api/v1/deployments/{dep['id']}").json()
        return body

    def states(self, dep: dict[str, Any]) -> dict[str, str]:
        return {d["device_id"]: d["state"] for d in self.view(dep)["devices"]}


@pytest.fixture
def fleet(running_hub: RunningHub, iris_model: "IrisModel") -> Fleet:
    assert running_hub.register_iris(iris_model).status_code == 201
    return Fleet(running_hub)


def _in(states: dict[str, str], state: str) -> list[str]:
    return sorted(d for d, s in states.items() if s == state)


def test_waves_are_released_one_after_another(fleet: Fleet) -> None:
    ids = fleet.enroll(10)
    dep = fleet.deploy(devices=ids, policy={"canary": 2, "wave_size": 4})
    assert [w["devices"] for w in dep["waves"]] == [2, 4, 4]
    assert [w["name"] for w in dep["waves"]] == ["canary", "wave 1", "wave 2"]
    canary = _in(fleet.states(dep), "in_progress")
    assert len(canary) == 2
    # Only the canaries were sent anything.
    assert [d for d in ids if fleet.desired(d)] == sorted(canary, key=ids.index)

    for wave in (1, 2):
        moving = _in(fleet.states(dep), "in_progress")
        for device_id in moving:
            fleet.event(device_id, dep, Step.DOWNLOADING, progress=0.5)
        fleet.tick()
        assert _in(fleet.states(dep), "in_progress") == moving  # the wave is not finished
        for device_id in moving:
            fleet.event(device_id, dep, Step.ACTIVE)
        fleet.tick()
        view = fleet.view(dep)
        assert view["current_wave"] == wave
        assert len(_in(fleet.states(dep), "in_progress")) == 4
    for device_id in _in(fleet.states(dep), "in_progress"):
        fleet.event(device_id, dep, Step.ACTIVE)
    fleet.tick()
    view = fleet.view(dep)
    assert (view["state"], view["done"], view["ok"]) == ("completed", True, True)
    assert view["counts"] == {"succeeded": 10}
    assert all(w["finished"] and w["released"] for w in view["waves"])
    history = fleet.hub.client.get(f"/api/v1/deployments/{dep['id']}/history").json()
    assert [(h["actor"], h["action"]) for h in history] == [
        ("alice@ops", "created"),
        ("rollout", "wave"),
        ("rollout", "wave"),
        ("rollout", "completed"),
    ]
    assert history[1]["detail"] == "canary finished; wave 1 started"


def test_failing_canaries_abort_the_rollout_and_roll_back_and_nobody_else_is_touched(
    fleet: Fleet, running_hub: RunningHub, iris_model: "IrisModel"
) -> None:
    ids = fleet.enroll(20)
    first = fleet.deploy(devices=ids)
    for device_id in ids:
        fleet.event(device_id, first, Step.ACTIVE)
    assert running_hub.register_iris(iris_model).status_code == 201  # v2
    sent_before = {d: len(fleet.desired(d)) for d in ids}

    dep = fleet.deploy(
        version=2,
        devices=ids,
        policy={
            "canary_percent": 25,
            "wave_percent": 25,
            "max_failure_ratio": 0.2,
            "min_devices": 5,
            "rollback_on_abort": True,
        },
    )
    canary = _in(fleet.states(dep), "in_progress")
    assert len(canary) == 5
    # 2 of 5 fail their health check (40 %), the others install.
    for device_id in canary[:2]:
        fleet.event(device_id, dep, Step.FAILED, reason=Reason.HEALTH_CHECK, detail="bad labels")
    for device_id in canary[2:]:
        fleet.event(device_id, dep, Step.ACTIVE)
    fleet.tick()

    view = fleet.view(dep)
    assert view["state"] == "aborted"
    assert "2 of 5 finished devices failed (40%)" in view["state_reason"]
    states = fleet.states(dep)
    assert _in(states, "failed") == canary[:2]
    assert _in(states, "rolling_back") == canary[2:]
    outside = [d for d in ids if d not in canary]
    assert _in(states, "cancelled") == sorted(outside)
    # No device outside the canary was sent anything.
    assert all(len(fleet.desired(d)) == sent_before[d] for d in outside)
    # The updated canaries are sent back to v1's package, the failed ones are left as they are.
    for device_id in canary[2:]:
        [ref] = fleet.desired(device_id)[-1].packages
        assert (ref.digest, ref.deployment_id) == (first["package_digest"], dep["id"])
    assert all(len(fleet.desired(d)) == sent_before[d] + 1 for d in canary[:2])
    assert not fleet.view(dep)["done"]

    for device_id in canary[2:]:
        fleet.event(device_id, dep, Step.ACTIVE, digest=first["package_digest"])
    view = fleet.view(dep)
    assert view["counts"] == {"failed": 2, "rolled_back": 3, "cancelled": 15}
    assert (view["done"], view["ok"]) == (True, False)
    history = fleet.hub.client.get(f"/api/v1/deployments/{dep['id']}/history").json()
    assert history[-1]["actor"] == "rollout"
    assert history[-1]["action"] == "aborted"
    assert history[-1]["detail"].endswith("rolling back")


def test_a_device_new_to_the_model_is_rolled_back_by_removing_it(fleet: Fleet) -> None:
    ids = fleet.enroll(2)
    dep = fleet.deploy(devices=ids, policy={"wave_size": 1, "order": "listed"})
    fleet.event(ids[0], dep, Step.ACTIVE)
    response = fleet.hub.client.post(
        f"/api/v1/deployments/{dep['id']}/rollback", json={"reason": "wrong model"}
    )
    assert response.status_code == 200, response.text
    assert response.json()["state"] == "rolled_back"
    assert fleet.desired(ids[0])[-1].packages == []
    assert fleet.desired(ids[1]) == []  # never released
    fleet.report(ids[0], active={})
    assert fleet.states(dep) == {ids[0]: "rolled_back", ids[1]: "cancelled"}
    again = fleet.hub.client.post(f"/api/v1/deployments/{dep['id']}/rollback")
    assert again.status_code == 409


def test_a_device_counts_as_a_success_only_after_it_stayed_healthy_for_the_soak_time(
    fleet: Fleet,
) -> None:
    ids = fleet.enroll(3)
    dep = fleet.deploy(devices=ids, policy={"soak_s": 60})
    started = utcnow()
    for device_id in ids:
        fleet.event(device_id, dep, Step.ACTIVE)
    assert set(fleet.states(dep).values()) == {"soaking"}
    fleet.tick(started + timedelta(seconds=30))
    assert set(fleet.states(dep).values()) == {"soaking"}

    healthy, degraded, offline = ids
    fleet.report(degraded, active={"iris": dep["package_digest"]}, health="degraded")
    fleet.send(offline, Channel.STATUS, StatusBody(online=False))
    fleet.tick(started + timedelta(seconds=61))
    states = fleet.states(dep)
    assert (states[healthy], states[degraded], states[offline]) == (
        "succeeded",
        "failed",
        "soaking",  # judged when it is back
    )
    fleet.send(offline, Channel.STATUS, StatusBody(online=True))
    fleet.tick(started + timedelta(seconds=62))
    view = fleet.view(dep)
    assert fleet.states(dep)[offline] == "succeeded"
    assert (view["state"], view["ok"]) == ("completed", False)


def test_the_download_cap_keeps_at_most_that_many_devices_fetching(fleet: Fleet) -> None:
    ids = fleet.enroll(6)
    dep = fleet.deploy(devices=ids, policy={"max_concurrent": 2})
    first = _in(fleet.states(dep), "in_progress")
    assert len(first) == 2
    fleet.tick()
    assert len(_in(fleet.states(dep), "in_progress")) == 2
    # A device past its download (verifying, installing) no longer counts.
    fleet.event(first[0], dep, Step.DOWNLOADED, progress=1.0)
    fleet.tick()
    assert len(_in(fleet.states(dep), "in_progress")) == 3
    for _ in range(len(ids)):  # each round finishes the released devices, releasing more
        moving = _in(fleet.states(dep), "in_progress")
        assert len(moving) <= 3
        for device_id in moving:
            fleet.event(device_id, dep, Step.ACTIVE)
        fleet.tick()
    assert fleet.view(dep)["counts"] == {"succeeded": 6}


def test_pause_resume_promote_and_abort_are_recorded_with_who_did_them(fleet: Fleet) -> None:
    ids = fleet.enroll(8)
    dep = fleet.deploy(
        devices=ids, policy={"canary": 2, "wave_size": 2, "pause_after_canary": True}
    )
    client = fleet.hub.client
    bob = {"X-Outpost-Actor": "bob@ops"}
    for device_id in _in(fleet.states(dep), "in_progress"):
        fleet.event(device_id, dep, Step.ACTIVE)
    fleet.tick()
    view = fleet.view(dep)
    assert view["state"] == "paused"
    assert "promote" in view["state_reason"]
    assert client.post(f"/api/v1/deployments/{dep['id']}/pause").status_code == 409
    fleet.tick()
    assert len(_in(fleet.states(dep), "in_progress")) == 0  # nothing released while paused

    promoted = client.post(f"/api/v1/deployments/{dep['id']}/promote", headers=bob)
    assert promoted.status_code == 200, promoted.text
    assert promoted.json()["current_wave"] == 1
    assert len(_in(fleet.states(dep), "in_progress")) == 2

    paused = client.post(
        f"/api/v1/deployments/{dep['id']}/pause", json={"reason": "night shift"}, headers=bob
    )
    assert paused.json()["state"] == "paused"
    assert client.post(f"/api/v1/deployments/{dep['id']}/resume", headers=bob).status_code == 200
    everything = client.post(
        f"/api/v1/deployments/{dep['id']}/promote", json={"all_waves": True}, headers=bob
    )
    assert everything.json()["current_wave"] == 3
    assert len(_in(fleet.states(dep), "in_progress")) == 6

    aborted = client.post(
        f"/api/v1/deployments/{dep['id']}/abort", json={"reason": "enough"}, headers=bob
    )
    assert aborted.json()["state"] == "aborted"
    # Without rollback the devices still installing are sent back; finished ones stay.
    assert aborted.json()["counts"] == {"succeeded": 2, "rolling_back": 6}
    history = client.get(f"/api/v1/deployments/{dep['id']}/history").json()
    assert [(h["actor"], h["action"]) for h in history] == [
        ("alice@ops", "created"),
        ("rollout", "paused"),
        ("bob@ops", "promoted"),
        ("bob@ops", "paused"),
        ("bob@ops", "resumed"),
        ("bob@ops", "promoted"),
        ("bob@ops", "aborted"),
    ]
    assert history[3]["detail"] == "night shift"
    assert client.post(f"/api/v1/deployments/{dep['id']}/resume").status_code == 409
    assert client.post("/api/v1/deployments/dep-nothere/abort").status_code == 404


def test_a_higher_priority_deployment_wins_and_the_device_says_which_it_follows(
    fleet: Fleet,
) -> None:
    [device] = fleet.enroll(1)
    high = fleet.deploy(devices=[device], priority=10)
    low = fleet.deploy(devices=[device], priority=0)
    assert fleet.states(low) == {device: "overridden"}
    assert "overridden by " + high["id"] in fleet.view(low)["devices"][0]["detail"]
    assert fleet.states(high) == {device: "in_progress"}
    higher = fleet.deploy(devices=[device], priority=20)
    assert fleet.states(high) == {device: "superseded"}
    assert fleet.states(higher) == {device: "in_progress"}
    dry = fleet.hub.client.post(
        "/api/v1/deployments/dry-run", json={"model": "iris", "devices": [device], "priority": 5}
    ).json()
    assert dry["skipped"] == [
        {"device_id": device, "why": f"overridden by {higher['id']} (priority 20 > 5)"}
    ]


def test_a_continuous_deployment_reaches_devices_enrolled_later(fleet: Fleet) -> None:
    first = fleet.enroll(2, site="plant-3")
    fleet.enroll(1, site="plant-9")
    dep = fleet.deploy(selector="site=plant-3", continuous=True)
    assert sorted(fleet.states(dep)) == sorted(first)
    later = fleet.enroll(2, site="plant-3")
    fleet.tick()
    states = fleet.states(dep)
    assert sorted(states) == sorted(first + later)
    assert all(fleet.desired(d) for d in later)
    for device_id in states:
        fleet.event(device_id, dep, Step.ACTIVE)
    fleet.tick()
    view = fleet.view(dep)
    assert (view["state"], view["done"]) == ("running", False)  # it never ends by itself
    history = fleet.hub.client.get(f"/api/v1/deployments/{dep['id']}/history").json()
    assert history[-1]["action"] == "enlisted"
    empty = fleet.hub.client.post(
        "/api/v1/deployments", json={"model": "iris", "selector": "site=mars", "continuous": True}
    )
    assert empty.status_code == 201, empty.text


def test_the_device_timeout_counts_from_the_release_not_the_start(fleet: Fleet) -> None:
    ids = fleet.enroll(2)
    dep = fleet.deploy(devices=ids, device_timeout_s=60, policy={"wave_size": 1, "order": "listed"})
    start = utcnow()
    fleet.event(ids[0], dep, Step.ACTIVE)
    fleet.tick(start + timedelta(seconds=50))  # releases the second wave at +50 s
    assert fleet.states(dep)[ids[1]] == "in_progress"
    fleet.tick(start + timedelta(seconds=70))
    assert fleet.states(dep)[ids[1]] == "in_progress"
    fleet.tick(start + timedelta(seconds=111))
    assert fleet.states(dep)[ids[1]] == "timed_out"


def test_only_the_lease_holder_drives_a_rollout(fleet: Fleet) -> None:
    ids = fleet.enroll(2)
    dep = fleet.deploy(devices=ids, policy={"wave_size": 1})
    now = utcnow()
    other = RolloutEngine(owner="other-replica")
    with Session(fleet.hub.ctx.engine, expire_on_commit=False) as session:
        assert other.tick(session, now).driven == [dep["id"]]
        assert fleet.engine.tick(session, now + timedelta(seconds=1)).driven == []
        # The holder stopped renewing: after the lease runs out another replica takes over.
        later = now + timedelta(seconds=other.lease_s + 1)
        assert fleet.engine.tick(session, later).driven == [dep["id"]]
        assert other.tick(session, later).driven == []
        fleet.engine.release_leases(session)
        assert other.tick(session, later).driven == [dep["id"]]


def test_dry_run_says_why_devices_are_skipped_and_the_deployment_skips_the_same(
    fleet: Fleet, running_hub: RunningHub, iris_model: "IrisModel"
) -> None:
    ids = fleet.enroll(4)
    on_it, marked_bad, fine, _ = ids
    first = fleet.deploy(devices=[on_it])
    fleet.report(on_it, active={"iris": first["package_digest"]})
    with Session(running_hub.ctx.engine) as session:
        device = session.get(Device, marked_bad)
        assert device is not None
        device.reported_state = {"active": [], "bad": [first["package_digest"]]}
        session.add(device)
        session.commit()
    body = {"model": "iris", "version": 1, "devices": ids[:3], "policy": {"canary": 1}}
    dry = running_hub.client.post("/api/v1/deployments/dry-run", json=body).json()
    assert [d["device_id"] for d in dry["targeted"]] == [fine]
    assert {d["device_id"]: d["why"] for d in dry["skipped"]} == {
        on_it: "already runs v1",
        marked_bad: "v1 is marked bad there (it failed before); retry_bad tries it again",
    }
    assert dry["waves"] == [1]
    dep = fleet.deploy(**{k: v for k, v in body.items() if k != "model"})
    assert fleet.states(dep) == {on_it: "skipped", marked_bad: "skipped", fine: "in_progress"}
    retried = running_hub.client.post(
        "/api/v1/deployments/dry-run", json={**body, "devices": [marked_bad], "retry_bad": True}
    ).json()
    assert [d["device_id"] for d in retried["targeted"]] == [marked_bad]

    # A version for another device class skips the devices of other classes.
    assert (
        running_hub.register_iris(iris_model, tags="device_classes=jetson-nano").status_code == 201
    )
    dry = running_hub.client.post(
        "/api/v1/deployments/dry-run", json={"model": "iris", "version": 2, "devices": [fine]}
    ).json()
    assert dry["skipped"] == [
        {
            "device_id": fine,
            "why": "incompatible: device class 'generic', the model is for jetson-nano",
        }
    ]


def test_policies_that_make_no_sense_are_refused_naming_the_field(fleet: Fleet) -> None:
    [device] = fleet.enroll(1)
    for policy, words in [
        ({"canary": 1, "canary_percent": 5}, "count or a percent"),
        ({"wave_size": 2, "wave_percent": 5}, "one shape"),
        ({"pause_after_canary": True}, "needs a canary"),
        ({"max_failure_ratio": 1.5}, "max_failure_ratio"),
        ({"exponential": {"first": 1, "factor": 1.0}}, "factor"),
        ({"wave_sise": 2}, "wave_sise"),
    ]:
        response = fleet.hub.client.post(
            "/api/v1/deployments", json={"model": "iris", "devices": [device], "policy": policy}
        )
        assert response.status_code == 422, (policy, response.text)
        assert words in response.text, (policy, response.text)


def test_a_staged_rollout_with_an_abort_and_the_lease_on_postgresql(
    pg_hub: RunningHub, iris_model: "IrisModel"
) -> None:
    assert pg_hub.register_iris(iris_model).status_code == 201
    fleet = Fleet(pg_hub)
    ids = fleet.enroll(6)
    dep = fleet.deploy(devices=ids, policy={"canary": 2, "wave_size": 2, "max_failures": 0})
    canary = _in(fleet.states(dep), "in_progress")
    fleet.event(canary[0], dep, Step.ACTIVE)
    fleet.tick()
    assert fleet.view(dep)["current_wave"] == 0  # the canary is not finished yet
    fleet.event(canary[1], dep, Step.FAILED, reason=Reason.HEALTH_CHECK)
    other = RolloutEngine(owner="other-replica")
    with Session(pg_hub.ctx.engine, expire_on_commit=False) as session:
        assert other.tick(session).driven == []  # test-hub holds the lease
    fleet.tick()
    view = fleet.view(dep)
    assert view["state"] == "aborted"
    assert view["counts"] == {"succeeded": 1, "failed": 1, "cancelled": 4}


def test_an_aborted_rollout_lets_go_of_its_devices_for_a_lower_priority_one(fleet: Fleet) -> None:
    device, later = fleet.enroll(2)
    high = fleet.deploy(
        devices=[device, later], priority=5, policy={"wave_size": 1, "order": "listed"}
    )
    fleet.event(device, high, Step.ACTIVE)
    aborted = fleet.hub.client.post(
        f"/api/v1/deployments/{high['id']}/abort", json={"rollback": True}
    )
    assert aborted.json()["state"] == "aborted"
    assert aborted.json()["devices"] is None  # actions answer with the state only
    low = fleet.deploy(devices=[device], priority=0)
    assert fleet.states(low) == {device: "in_progress"}


def test_a_failure_ratio_is_judged_once_one_failure_alone_cannot_cross_it() -> None:
    assert RolloutPolicy(max_failure_ratio=0.2).judged_after == 5
    assert RolloutPolicy(max_failure_ratio=0.2, min_devices=2).judged_after == 2
    assert RolloutPolicy(max_failures=0).judged_after == 1
    policy = RolloutPolicy(max_failure_ratio=0.2)
    assert policy.breach(failures=1, finished=1) is None
    assert policy.breach(failures=1, finished=5) is None  # 20 % is not more than 20 %
    assert policy.breach(failures=2, finished=5) == (
        "2 of 5 finished devices failed (40%), more than 20%"
    )


def test_list_filters_and_group_names_are_checked(fleet: Fleet) -> None:
    client = fleet.hub.client
    [device] = fleet.enroll(1)
    dep = fleet.deploy(devices=[device])
    listed = client.get("/api/v1/deployments", params={"state": "running"}).json()
    assert [d["id"] for d in listed] == [dep["id"]]
    assert listed[0]["counts"] == {"in_progress": 1}
    assert client.get("/api/v1/deployments", params={"state": "runing"}).status_code == 422
    bad_group = client.post("/api/v1/deployments", json={"model": "iris", "groups": ["Bad/G"]})
    assert bad_group.status_code == 422
    assert "groups" in bad_group.text
    summary = client.get(f"/api/v1/deployments/{dep['id']}", params={"devices": "false"}).json()
    assert (summary["devices"], summary["total"], summary["steps"]) == (None, 1, {"queued": 1})


def test_the_last_device_s_report_completes_the_rollout_in_the_same_commit(fleet: Fleet) -> None:
    ids = fleet.enroll(2)
    dep = fleet.deploy(devices=ids)
    fleet.event(ids[0], dep, Step.ACTIVE)
    assert fleet.view(dep)["state"] == "running"
    fleet.report(ids[1], active={"iris": dep["package_digest"]})  # the event was lost
    view = fleet.view(dep)
    assert (view["state"], view["state_reason"], view["done"]) == (
        "completed",
        "2 succeeded",
        True,
    )
    fleet.tick()  # the engine finds nothing left to do, and records nothing twice
    history = fleet.hub.client.get(f"/api/v1/deployments/{dep['id']}/history").json()
    assert [h["action"] for h in history] == ["created", "completed"]


def test_a_released_device_that_says_nothing_is_sent_its_desired_state_again(
    fleet: Fleet,
) -> None:
    # The hub may die between committing a release and publishing it, or a device's request
    # for its desired state may reach no hub: nothing else would ever repair that.
    silent, talking = fleet.enroll(2)
    dep = fleet.deploy(devices=[silent, talking])
    start = utcnow()
    fleet.event(talking, dep, Step.DOWNLOADING, progress=0.1)
    assert [len(fleet.desired(d)) for d in (silent, talking)] == [1, 1]
    fleet.tick(start + timedelta(seconds=10))
    assert len(fleet.desired(silent)) == 1
    assert fleet.tick(start + timedelta(seconds=21)).published == [silent]
    [first, again] = fleet.desired(silent)
    assert again.packages == first.packages
    assert again.counter > first.counter
    assert fleet.tick(start + timedelta(seconds=30)).published == []  # not more than every 20 s
    assert fleet.tick(start + timedelta(seconds=42)).published == [silent]
    assert len(fleet.desired(talking)) == 1  # a device that reports progress is left alone
