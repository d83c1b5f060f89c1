"""Data collection on a real hub: a deployment's policy reaches each released device's desired
state, collected records are stored once and read back newest first a page at a time, and values
the database cannot store are dead letters, not failed transactions."""

from datetime import UTC, datetime, timedelta
from typing import TYPE_CHECKING, Any

import pytest
from sqlmodel import Session

from agent.protocol.documents import CollectPolicy, DesiredState, Role
from agent.protocol.keys import verify_signature
from agent.protocol.messages import (
    AckBody,
    CollectedRecord,
    DataBody,
    DesiredBody,
    DesiredRequestBody,
    EventBody,
    Step,
    decode,
    encode,
)
from agent.protocol.topics import Channel
from hub.database import make_engine
from hub.messaging.handlers import Handlers, handle_message
from hub.migrations.runner import upgrade
from hub.telemetry import ingest, service
from tests.support.postgres import pg_available, pg_schema

from .conftest import RunningHub

if TYPE_CHECKING:
    from examples.build_example_model import IrisModel

T0 = datetime(2026, 11, 20, 12, 0, tzinfo=UTC)
POLICY = {"sample_rate": 0.25, "max_per_minute": 30, "max_bytes_per_day": 1_000_000}


def _handlers(hub: RunningHub) -> Handlers:
    return Handlers(
        director=hub.ctx.director(),
        publisher=hub.publisher,
        topics=hub.ctx.topics,
        packages_dir=hub.settings.packages_dir,
    )


def _send(hub: RunningHub, device_id: str, channel: Channel, payload: bytes) -> None:
    with Session(hub.ctx.engine, expire_on_commit=False) as session:
        handle_message(
            session=session,
            handlers=_handlers(hub),
            topic=hub.ctx.topics.device(device_id, channel),
            payload=payload,
        )


def _desired(hub: RunningHub, device_id: str) -> DesiredState:
    """The device's latest desired state, its director signature checked."""
    [*_, msg] = hub.publisher.on(hub.ctx.topics.device(device_id, Channel.DESIRED))
    body = decode(msg.payload).body
    assert isinstance(body, DesiredBody)
    keyring = hub.ctx.keys.keyring_document()
    sig = body.desired.signatures[0]
    assert sig.keyid in keyring.roles[Role.DIRECTOR].keyids
    assert verify_signature(keyring.keys[sig.keyid].public, sig.sig, body.desired.signed)
    return DesiredState.model_validate(body.desired.signed)


def _deploy(hub: RunningHub, **body: Any) -> dict[str, Any]:
    response = hub.client.post("/api/v1/deployments", json={"model": "iris", **body})
    assert response.status_code == 201, response.text
    dep: dict[str, Any] = response.json()
    return dep


def _active(hub: RunningHub, device_id: str, dep: dict[str, Any], seq: int) -> None:
    body = EventBody(
        seq=seq,
        deployment_id=dep["id"],
        model="iris",
        version=dep["version"],
        digest=dep["package_digest"],
        step=Step.ACTIVE,
    )
    _send(hub, device_id, Channel.EVT, encode(body))


# -- the policy ---------------------------------------------------------------------------------


def test_the_collect_policy_reaches_each_released_device_s_package_ref(
    running_hub: RunningHub, iris_model: "IrisModel"
) -> None:
    assert running_hub.register_iris(iris_model).status_code == 201
    collecting, plain = (running_hub.enroll()["device_id"] for _ in range(2))
    dep = _deploy(running_hub, devices=[collecting], data_collection=POLICY)
    assert dep["data_collection"] == POLICY
    shown = running_hub.client.get(f"/api/v1/deployments/{dep['id']}").json()
    assert shown["data_collection"] == POLICY
    [ref] = _desired(running_hub, collecting).packages
    assert ref.collect == CollectPolicy(**POLICY)
    assert ref.deployment_id == dep["id"]

    # The policy is the deployment's, so every later publish carries it (here: the device
    # asking for its desired state again after a reconnect).
    _send(running_hub, collecting, Channel.REQ, encode(DesiredRequestBody(have_counter=1)))
    again = _desired(running_hub, collecting)
    assert again.counter == 2
    assert again.packages[0].collect == CollectPolicy(**POLICY)

    other = _deploy(running_hub, devices=[plain])
    assert other["data_collection"] is None
    assert _desired(running_hub, plain).packages[0].collect is None


def test_a_device_sent_back_to_its_previous_package_does_not_collect_for_the_new_one(
    running_hub: RunningHub, iris_model: "IrisModel"
) -> None:
    assert running_hub.register_iris(iris_model).status_code == 201
    device_id = running_hub.enroll()["device_id"]
    first = _deploy(running_hub, devices=[device_id])
    _active(running_hub, device_id, first, seq=1)
    assert running_hub.register_iris(iris_model).status_code == 201  # v2
    second = _deploy(running_hub, version=2, devices=[device_id], data_collection=POLICY)
    assert _desired(running_hub, device_id).packages[0].collect == CollectPolicy(**POLICY)
    _active(running_hub, device_id, second, seq=2)

    response = running_hub.client.post(f"/api/v1/deployments/{second['id']}/rollback")
    assert response.status_code == 200, response.text
    [ref] = _desired(running_hub, device_id).packages
    # Back on v1's package under the rolled-back deployment's id, without its sampling: that
    # was decided for v2.
    assert (ref.version, ref.deployment_id, ref.collect) == (1, second["id"], None)


@pytest.mark.parametrize(
    "policy",
    [{"sample_rate": 1.5}, {"sample_rate": -0.1}, {"sample_rate": 0.5, "max_per_minute": -1}],
)
def test_a_policy_out_of_range_is_refused(
    running_hub: RunningHub, iris_model: "IrisModel", policy: dict[str, Any]
) -> None:
    assert running_hub.register_iris(iris_model).status_code == 201
    device_id = running_hub.enroll()["device_id"]
    response = running_hub.client.post(
        "/api/v1/deployments",
        json={"model": "iris", "devices": [device_id], "data_collection": policy},
    )
    assert response.status_code == 422
    assert "data_collection" in response.text


# -- collected records --------------------------------------------------------------------------


def _record(seq: int, minute: int, model: str = "iris", version: int = 1) -> CollectedRecord:
    return CollectedRecord(
        seq=seq,
        at=T0 + timedelta(minutes=minute),
        model=model,
        version=version,
        deployment_id="dep-1",
        correlation_id=f"req-{seq}",
        latency_ms=1.5,
        # A NUL inside JSON is fine: it is stored escaped, also by PostgreSQL's json type.
        inputs={"data": [[5.1, 3.5, 1.4, 0.2]], "note": "a\x00b"},
        outputs={"label": [seq]},
    )


def _acks(hub: RunningHub, device_id: str) -> list[int]:
    out = []
    for msg in hub.publisher.on(hub.ctx.topics.device(device_id, Channel.ACK)):
        body = decode(msg.payload).body
        assert isinstance(body, AckBody)
        assert body.stream == "dc"
        out.append(body.seq)
    return out


def test_collected_records_are_stored_once_and_read_newest_first_a_page_at_a_time(
    running_hub: RunningHub,
) -> None:
    a, b = (running_hub.enroll()["device_id"] for _ in range(2))
    batch_a = DataBody(first_kept=1, records=[_record(1, 0), _record(2, 2), _record(3, 4)])
    for _ in range(2):  # a resend: stored once, acked twice
        _send(running_hub, a, Channel.DC, encode(batch_a))
    batch_b = DataBody(first_kept=1, records=[_record(1, 1), _record(2, 3, model="kws", version=2)])
    _send(running_hub, b, Channel.DC, encode(batch_b))
    assert (_acks(running_hub, a), _acks(running_hub, b)) == ([3, 3], [2])

    window = {"since": T0.isoformat(), "until": (T0 + timedelta(hours=1)).isoformat()}
    seen: list[tuple[str, int]] = []
    params: dict[str, Any] = {**window, "limit": 2}
    pages = 0
    while True:
        page = running_hub.client.get("/api/v1/data", params=params).json()
        pages += 1
        seen += [(r["device_id"], r["seq"]) for r in page["records"]]
        if page["next_cursor"] is None:
            break
        params["cursor"] = page["next_cursor"]
    assert pages == 3
    assert seen == [(a, 3), (b, 2), (a, 2), (b, 1), (a, 1)], "newest first, each once"

    [newest] = running_hub.client.get("/api/v1/data", params={**window, "limit": 1}).json()[
        "records"
    ]
    assert newest["inputs"] == {"data": [[5.1, 3.5, 1.4, 0.2]], "note": "a\x00b"}
    assert newest["outputs"] == {"label": [3]}
    assert (newest["correlation_id"], newest["latency_ms"]) == ("req-3", 1.5)
    assert newest["deployment_id"] == "dep-1"

    def keys(**filters: Any) -> list[tuple[str, int]]:
        body = running_hub.client.get("/api/v1/data", params={**window, **filters}).json()
        return [(r["device_id"], r["seq"]) for r in body["records"]]

    assert keys(model="kws") == [(b, 2)]
    assert keys(model="iris", version=2) == []
    assert keys(model="iris", version=1, device=b) == [(b, 1)]
    assert keys(device=a, since=(T0 + timedelta(minutes=1)).isoformat()) == [(a, 3), (a, 2)]
    assert keys(until=(T0 + timedelta(minutes=1)).isoformat()) == [(a, 1)]
    # Without since and until: the last hour, and these were collected long before.
    assert running_hub.client.get("/api/v1/data").json() == {"records": [], "next_cursor": None}


def test_values_the_database_cannot_store_are_dead_letters(running_hub: RunningHub) -> None:
    device_id = running_hub.enroll()["device_id"]
    valid = encode(DataBody(first_kept=1, records=[_record(1, 0)]))
    nan_inputs = valid.replace(b'"inputs":{"data":[[5.1', b'"inputs":{"data":[[NaN')
    nul_id = valid.replace(b'"req-1"', b'"req-\\u0000"')
    surrogate = valid.replace(b'"req-1"', b'"req-\\ud800"')
    assert len({valid, nan_inputs, nul_id, surrogate}) == 4
    for payload in (nan_inputs, nul_id, surrogate, valid):
        _send(running_hub, device_id, Channel.DC, payload)
    # The NaN and NUL records are refused one by one and acked, so the device does not resend
    # them for ever; the message that is not valid Unicode names no record to ack.
    assert _acks(running_hub, device_id) == [1, 1, 1]
    reasons = [d["reason"] for d in running_hub.client.get("/api/v1/dead-letters").json()]
    assert len(reasons) == 3
    assert "unable to parse raw data as a unicode string" in reasons[0]
    assert reasons[1] == "1 of 1 records refused: record 1: correlation_id holds a NUL character"
    assert reasons[2].startswith(
        "1 of 1 records refused: record 1: inputs cannot be stored as JSON: Out of range float"
    )


# -- PostgreSQL ---------------------------------------------------------------------------------


@pytest.mark.skipif(not pg_available(), reason="no PostgreSQL at 127.0.0.1:5432")
def test_collected_records_and_their_pages_on_postgresql() -> None:
    with pg_schema() as url:
        upgrade(url)
        engine = make_engine(url)
        try:
            now = datetime.now(UTC)
            batch = DataBody(first_kept=1, records=[_record(s, s) for s in (1, 2, 3)])
            with Session(engine) as session:
                for _ in range(2):
                    assert ingest.store(session, ingest.prepare("dev-a", batch), now) == 3
                session.commit()
                span = service.time_range(
                    since=T0, until=T0 + timedelta(hours=1), now=now, interval_s=None
                )
                first = service.data_records(
                    session=session,
                    span=span,
                    model="iris",
                    version=1,
                    device_id=None,
                    limit=2,
                    cursor=None,
                )
                assert [r.seq for r in first.records] == [3, 2]
                rest = service.data_records(
                    session=session,
                    span=span,
                    model="iris",
                    version=1,
                    device_id=None,
                    limit=2,
                    cursor=first.next_cursor,
                )
                assert [r.seq for r in rest.records] == [1]
                assert rest.next_cursor is None
                assert rest.records[0].inputs == {"data": [[5.1, 3.5, 1.4, 0.2]], "note": "a\x00b"}
        finally:
            engine.dispose()
