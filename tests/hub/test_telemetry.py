"""Telemetry ingest on a real hub (API, SQLite files, the handlers called as plain functions):
duplicates dropped and acked again, the ack cursor across gaps, malformed messages kept as dead
letters while ingest goes on, batches coalesced by the worker, retention, a restart between two
batches, the query API, and the same ingest and aggregation on PostgreSQL."""

import json
import time
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import pytest
from sqlalchemy import event
from sqlalchemy.engine import Engine
from sqlmodel import Session, col, func, select

from agent.protocol import messages
from agent.protocol.messages import (
    AckBody,
    DataBody,
    EventBody,
    ModelStats,
    Step,
    TelemetryBody,
    TelemetryRecord,
    decode,
    encode,
)
from agent.protocol.topics import Channel
from hub.database import make_engine
from hub.messaging.handlers import Handlers, handle_ingest_messages, handle_message
from hub.messaging.worker import MessageWorker
from hub.migrations.runner import upgrade
from hub.settings import HubSettings, TelemetrySettings
from hub.telemetry import ingest, retention, service
from hub.telemetry.models import (
    CollectedRecord,
    DeadLetter,
    IngestCursor,
    IngestRefused,
    TelemetryPoint,
)
from tests.support.postgres import pg_available, pg_schema

from .conftest import RunningHub, hub_app

T0 = datetime(2026, 11, 20, 12, 0, tzinfo=UTC)


def _record(seq: int, *, at: datetime | None = None, **kw: Any) -> TelemetryRecord:
    fields: dict[str, Any] = {
        "seq": seq,
        "at": at or T0 + timedelta(seconds=10 * seq),
        "interval_s": 10.0,
        "uptime_s": 10.0 * seq,
        "cpu_percent": 20.0,
        "memory_bytes": 1000 + seq,
        "models": [ModelStats(model="iris", version=1, inferences=5, errors=1, p95_ms=3.0)],
    }
    fields.update(kw)
    return TelemetryRecord(**fields)


def _collected(seq: int) -> messages.CollectedRecord:
    return messages.CollectedRecord(
        seq=seq, at=T0, model="iris", version=1, latency_ms=1.0, inputs=[[1]], outputs=[0]
    )


def _batch(seqs: list[int], first_kept: int | None = None) -> TelemetryBody:
    return TelemetryBody(
        first_kept=first_kept if first_kept is not None else min(seqs),
        records=[_record(s) for s in seqs],
    )


class Device:
    """One device's side of the streams: what it sends, and the acks the hub sent it."""

    def __init__(self, hub: RunningHub, handlers: Handlers, device_id: str) -> None:
        self.hub = hub
        self.handlers = handlers
        self.id = device_id

    def topic(self, channel: Channel) -> str:
        return self.hub.ctx.topics.device(self.id, channel)

    def send_raw(self, channel: Channel, payload: bytes) -> None:
        with Session(self.hub.ctx.engine, expire_on_commit=False) as session:
            handle_message(
                session=session, handlers=self.handlers, topic=self.topic(channel), payload=payload
            )

    def send(self, channel: Channel, body: Any) -> None:
        self.send_raw(channel, encode(body))

    def acks(self, stream: str) -> list[int]:
        out = []
        for msg in self.hub.publisher.on(self.topic(Channel.ACK)):
            assert (msg.qos, msg.retain) == (1, False)
            body = decode(msg.payload).body
            assert isinstance(body, AckBody)
            if body.stream == stream:
                out.append(body.seq)
        return out


def _handlers(hub: RunningHub, **kw: Any) -> Handlers:
    return Handlers(
        director=hub.ctx.director(),
        publisher=hub.publisher,
        topics=hub.ctx.topics,
        packages_dir=hub.settings.packages_dir,
        **kw,
    )


@pytest.fixture
def device(running_hub: RunningHub) -> Device:
    return Device(running_hub, _handlers(running_hub), running_hub.enroll()["device_id"])


def _stored(engine: Engine, model: Any, device_id: str) -> list[int]:
    with Session(engine) as session:
        return list(
            session.exec(
                select(model.seq).where(model.device_id == device_id).order_by(col(model.seq))
            ).all()
        )


def _dead_letters(engine: Engine) -> list[DeadLetter]:
    with Session(engine) as session:
        return list(session.exec(select(DeadLetter).order_by(col(DeadLetter.id))).all())


# -- ingest and acks ----------------------------------------------------------------------------


def test_the_same_batch_three_times_is_stored_once_and_acked_each_time(
    running_hub: RunningHub, device: Device
) -> None:
    inserts: list[str] = []

    def count(conn: Any, cursor: Any, statement: str, *args: Any) -> None:
        if statement.lstrip().upper().startswith("INSERT INTO TELEMETRY_POINT"):
            inserts.append(statement)

    event.listen(running_hub.ctx.engine, "before_cursor_execute", count)
    try:
        for _ in range(3):
            device.send(Channel.TM, _batch([1, 2, 3, 4, 5]))
    finally:
        event.remove(running_hub.ctx.engine, "before_cursor_execute", count)
    assert _stored(running_hub.ctx.engine, TelemetryPoint, device.id) == [1, 2, 3, 4, 5]
    assert device.acks("tm") == [5, 5, 5]
    assert len(inserts) == 3, "one INSERT per message, whatever its number of records"
    assert device.handlers.stats.handled == 3


def test_the_ack_skips_the_gap_below_first_kept(running_hub: RunningHub, device: Device) -> None:
    device.send(Channel.TM, _batch([1, 2, 3]))
    # 4..9 were dropped by the device's full outbox: it holds 10 on, and says so.
    device.send(Channel.TM, _batch([10, 11], first_kept=10))
    assert device.acks("tm") == [3, 11]
    # Even a device that never reached the hub before starts where it still holds records.
    other = Device(running_hub, device.handlers, running_hub.enroll()["device_id"])
    other.send(Channel.TM, _batch([500, 501], first_kept=500))
    assert other.acks("tm") == [501]
    assert _stored(running_hub.ctx.engine, TelemetryPoint, device.id) == [1, 2, 3, 10, 11]


def test_the_ack_stops_at_a_hole_until_the_missing_record_comes(
    running_hub: RunningHub, device: Device
) -> None:
    device.send(Channel.TM, _batch([1, 2, 3]))
    # 4 was lost on the way (QoS 1 with a broker restart, say); the device still holds it.
    device.send(Channel.TM, _batch([5, 6], first_kept=4))
    assert device.acks("tm") == [3, 3], "not acknowledged past the hole"
    device.send(Channel.TM, _batch([7], first_kept=4))
    assert device.acks("tm")[-1] == 3
    device.send(Channel.TM, _batch([4, 5, 6, 7, 8], first_kept=4))  # the resend
    assert device.acks("tm")[-1] == 8
    assert _stored(running_hub.ctx.engine, TelemetryPoint, device.id) == list(range(1, 9))
    # A hole inside one batch holds the ack the same way.
    device.send(Channel.TM, _batch([9, 11, 12], first_kept=9))
    assert device.acks("tm")[-1] == 9


def test_the_streams_have_their_own_cursors(running_hub: RunningHub, device: Device) -> None:
    device.send(Channel.TM, _batch([1, 2]))
    device.send(
        Channel.DC,
        DataBody(
            first_kept=1,
            records=[_collected(1)],
        ),
    )
    assert (device.acks("tm"), device.acks("dc")) == ([2], [1])
    with Session(running_hub.ctx.engine) as session:
        cursors = session.exec(select(IngestCursor.stream, IngestCursor.seq)).all()
    assert sorted(cursors) == [("dc", 1), ("tm", 2)]


def test_telemetry_from_an_unknown_device_is_counted_and_not_stored(
    running_hub: RunningHub,
) -> None:
    stranger = Device(running_hub, _handlers(running_hub), "not-enrolled-1")
    stranger.send(Channel.TM, _batch([1]))
    assert stranger.handlers.stats.unknown_device == 1
    assert stranger.acks("tm") == []
    assert _stored(running_hub.ctx.engine, TelemetryPoint, stranger.id) == []


# -- malformed messages -------------------------------------------------------------------------


def _valid_payload(seq: int) -> bytes:
    return encode(_batch([seq], first_kept=1))


def _with(payload: bytes, path: list[Any], value: Any) -> bytes:
    """The payload with one field replaced: what a broken or hostile device might send."""
    doc = json.loads(payload)
    target = doc
    for key in path[:-1]:
        target = target[key]
    target[path[-1]] = value
    return json.dumps(doc).encode()


def test_malformed_payloads_are_dead_lettered_and_ingest_goes_on_between_them(
    running_hub: RunningHub, device: Device
) -> None:
    device.handlers.dead_letter_payload_bytes = 64
    event_payload = encode(
        EventBody(
            seq=1, deployment_id="dep-x", model="iris", version=1, digest="0" * 64, step=Step.QUEUED
        )
    )
    record = ["body", "records", 0]
    bad: list[tuple[Channel, bytes, str]] = [
        (Channel.TM, b"{not json", "not JSON"),
        (Channel.TM, b"\xff\xfe\x00garbage", "not JSON"),
        (Channel.TM, _with(_valid_payload(1), ["v"], 99), "unsupported protocol version"),
        (Channel.TM, _with(_valid_payload(1), [*record, "seq"], "one"), "invalid message"),
        (Channel.TM, _with(_valid_payload(1), [*record, "seq"], 2**70), "64-bit"),
        (Channel.TM, _with(_valid_payload(1), [*record, "cpu_percent"], 1e999), "finite"),
        (Channel.TM, _with(_valid_payload(1), ["body", "records"], []), "invalid message"),
        (Channel.TM, event_payload, "does not belong"),
        (Channel.DC, _valid_payload(1), "does not belong"),
        (Channel.DC, b"[" * 100_000, "not JSON"),
        (Channel.EVT, b"[]", "not a JSON object"),
        (Channel.EVT, _with(event_payload, ["body", "step"], "exploded"), "invalid message"),
        (Channel.TM, b"x" * 2_000_000, "exceeds"),
    ]
    for seq, (channel, payload, _) in enumerate(bad, start=1):
        device.send_raw(channel, payload)
        device.send(Channel.TM, _batch([seq], first_kept=1))  # a valid one after each

    assert _stored(running_hub.ctx.engine, TelemetryPoint, device.id) == list(
        range(1, len(bad) + 1)
    )
    # The record with an infinite CPU figure is refused on its own: its message is acked like
    # any other (the device must not resend it for ever) and kept whole, not cut to 64 bytes.
    refused = [i for i, (_, _, reason) in enumerate(bad, start=1) if reason == "finite"]
    assert refused == [6]
    acks = list(range(1, len(bad) + 1))
    acks.insert(5, 5)
    assert device.acks("tm") == acks
    letters = _dead_letters(running_hub.ctx.engine)
    assert len(letters) == len(bad)
    assert device.handlers.stats.malformed == len(bad)
    for n, (letter, (channel, payload, reason)) in enumerate(zip(letters, bad, strict=True), 1):
        assert letter.topic == device.topic(channel)
        assert letter.device_id == device.id
        assert reason in letter.reason
        assert letter.payload == (payload if n in refused else payload[:64])
        assert letter.payload_bytes == len(payload)

    # A topic the hub has no channel for is kept too; its device is named when it is valid.
    with Session(running_hub.ctx.engine, expire_on_commit=False) as session:
        for topic in ("outpost/d/x/tm", f"outpost/d/{device.id}/nope", "elsewhere/\x00"):
            handle_message(session=session, handlers=device.handlers, topic=topic, payload=b"{}")
    tail = _dead_letters(running_hub.ctx.engine)[-3:]
    assert [(d.topic, d.device_id) for d in tail] == [
        ("outpost/d/x/tm", None),
        (f"outpost/d/{device.id}/nope", device.id),
        ("elsewhere/\\x00", None),
    ]

    listed = running_hub.client.get("/api/v1/dead-letters", params={"limit": 2}).json()
    assert [d["topic"] for d in listed] == ["elsewhere/\\x00", f"outpost/d/{device.id}/nope"]
    mine = running_hub.client.get(
        "/api/v1/dead-letters", params={"device": device.id, "limit": 1000}
    ).json()
    assert len(mine) == len(bad) + 1
    assert mine[-1]["payload"] == "{not json"
    assert mine[-2]["payload"] == "\\xff\\xfe\x00garbage"


# -- coalescing in the worker -------------------------------------------------------------------


def test_a_record_the_database_cannot_hold_is_kept_aside_and_the_ack_passes_it(
    running_hub: RunningHub, device: Device
) -> None:
    # Records 3 and 4 arrive before 2 (which went missing): the refused 3 must not stop the
    # cursor once 2 comes, nor be forgotten before then.
    nul = messages.CollectedRecord(
        seq=3,
        at=T0,
        model="iris",
        version=1,
        latency_ms=1.0,
        inputs=[[1]],
        outputs=[0],
        correlation_id="a\x00b",
    )
    device.send(Channel.DC, DataBody(first_kept=1, records=[_collected(1)]))
    device.send(Channel.DC, DataBody(first_kept=1, records=[nul, _collected(4)]))
    assert device.acks("dc") == [1, 1], "2 is missing: the cursor waits at 1"
    device.send(Channel.DC, DataBody(first_kept=1, records=[_collected(2)]))
    assert device.acks("dc") == [1, 1, 4], "2 came: the cursor passes the refused 3"
    device.send(Channel.DC, DataBody(first_kept=3, records=[nul]))  # the device resends it
    assert device.acks("dc")[-1] == 4
    assert _stored(running_hub.ctx.engine, CollectedRecord, device.id) == [1, 2, 4]
    letters = _dead_letters(running_hub.ctx.engine)
    assert len(letters) == 2
    assert all("1 of " in d.reason and "record 3: correlation_id" in d.reason for d in letters)
    assert b"a\\u0000b" in letters[0].payload, "the refused record kept whole"
    with Session(running_hub.ctx.engine) as session:
        assert session.exec(select(func.count()).select_from(IngestRefused)).one() == 0


def test_queued_batches_are_stored_in_one_transaction_and_acked_once_a_stream(
    running_hub: RunningHub,
) -> None:
    handlers = _handlers(running_hub)
    devices = [Device(running_hub, handlers, running_hub.enroll()["device_id"]) for _ in range(3)]
    a, b, c = devices
    messages = [
        (a.topic(Channel.TM), encode(_batch([1, 2]))),
        (b.topic(Channel.TM), encode(_batch([1]))),
        (a.topic(Channel.TM), encode(_batch([3, 4], first_kept=1))),
        (c.topic(Channel.TM), b"garbage"),
        (a.topic(Channel.TM), encode(_batch([1, 2]))),  # a redelivery
        (c.topic(Channel.TM), encode(_batch([7], first_kept=7))),
    ]
    commits: list[int] = []

    def count(conn: Any) -> None:
        commits.append(1)

    event.listen(running_hub.ctx.engine, "commit", count)
    try:
        with Session(running_hub.ctx.engine, expire_on_commit=False) as session:
            handle_ingest_messages(session=session, handlers=handlers, messages=messages)
    finally:
        event.remove(running_hub.ctx.engine, "commit", count)
    # One commit for the dead letter (kept at once), one for every batch together; and one
    # ack per stream, for everything stored of it (acks are cumulative).
    assert len(commits) == 2
    assert (a.acks("tm"), b.acks("tm"), c.acks("tm")) == ([4], [1], [7])
    assert _stored(running_hub.ctx.engine, TelemetryPoint, a.id) == [1, 2, 3, 4]
    assert handlers.stats.handled == 5
    assert handlers.stats.malformed == 1


def test_a_batch_the_database_refuses_does_not_hold_back_the_others(
    running_hub: RunningHub, monkeypatch: pytest.MonkeyPatch
) -> None:
    handlers = _handlers(running_hub)
    a, b = (Device(running_hub, handlers, running_hub.enroll()["device_id"]) for _ in range(2))
    prepare = ingest.prepare

    def prepare_with_a_flaw(device_id: str, body: Any) -> ingest.Batch:
        batch = prepare(device_id, body)
        if device_id == a.id:
            # A value no check foresaw: the database itself refuses the row (NOT NULL).
            batch.rows[0]["health"] = None
        return batch

    monkeypatch.setattr(ingest, "prepare", prepare_with_a_flaw)
    messages = [
        (a.topic(Channel.TM), encode(_batch([1]))),
        (b.topic(Channel.TM), encode(_batch([1, 2]))),
    ]
    with Session(running_hub.ctx.engine, expire_on_commit=False) as session:
        handle_ingest_messages(session=session, handlers=handlers, messages=messages)
    # The transaction of both failed; stored one by one, b's went in and was acked.
    assert (a.acks("tm"), b.acks("tm")) == ([], [2])
    assert _stored(running_hub.ctx.engine, TelemetryPoint, a.id) == []
    assert _stored(running_hub.ctx.engine, TelemetryPoint, b.id) == [1, 2]
    assert (handlers.stats.handled, handlers.stats.failed) == (1, 1)


def test_the_worker_coalesces_what_is_queued_and_acks_each_stream_once_a_transaction(
    running_hub: RunningHub,
) -> None:
    worker = MessageWorker(running_hub.ctx)
    ids = [running_hub.enroll()["device_id"] for _ in range(5)]
    handlers = worker.handlers
    devices = [Device(running_hub, handlers, d) for d in ids]
    # Queued before the worker starts: it finds them all waiting and gathers them.
    for seq in range(1, 121):
        for d in devices:
            worker.submit(d.topic(Channel.TM), encode(_batch([seq], first_kept=1)))
    worker.submit(devices[0].topic(Channel.STATUS), b"not json")
    groups: list[int] = []
    handle_ingest = worker._handle_ingest

    def spy(messages: list[tuple[str, bytes]]) -> None:
        groups.append(len(messages))
        handle_ingest(messages)

    worker._handle_ingest = spy  # type: ignore[method-assign]
    worker.start()
    try:
        deadline = time.monotonic() + 20
        while not all(d.acks("tm")[-1:] == [120] for d in devices):
            assert time.monotonic() < deadline, [d.acks("tm")[-1:] for d in devices]
            time.sleep(0.02)
    finally:
        worker.stop()
    assert groups == [512, 88], "gathered up to the configured 512 messages a transaction"
    for d in devices:
        # 102 or 103 messages of each device in the first transaction, the rest in the second:
        # two acks each.
        assert d.acks("tm") in ([102, 120], [103, 120])
        assert _stored(running_hub.ctx.engine, TelemetryPoint, d.id) == list(range(1, 121))
    assert handlers.stats.malformed == 1
    assert handlers.stats.failed == 0


# -- retention ----------------------------------------------------------------------------------


def test_retention_deletes_rows_received_before_it_and_nothing_newer(
    running_hub: RunningHub, device: Device
) -> None:
    now = datetime.now(UTC)
    old, recent = now - timedelta(days=31), now - timedelta(days=29)
    engine = running_hub.ctx.engine
    with Session(engine, expire_on_commit=False) as session:
        # A device clock far in the past on recent rows: age counts from received_at.
        ancient = TelemetryBody(
            first_kept=1, records=[_record(s, at=T0 - timedelta(days=900)) for s in (4, 5)]
        )
        ingest.store(session, ingest.prepare(device.id, _batch([1, 2, 3])), old)
        ingest.store(session, ingest.prepare(device.id, ancient), recent)
        data = DataBody(
            first_kept=1,
            records=[_collected(s) for s in (1, 2)],
        )
        ingest.store(session, ingest.prepare(device.id, data), old)
        for when in (old, old, recent):
            session.add(
                ingest.dead_letter(
                    topic="t",
                    device_id=None,
                    reason="r",
                    payload=b"",
                    max_payload_bytes=1,
                    now=when,
                )
            )
        session.commit()
        partly = retention.sweep(session, retention_days=30, now=now, chunk_rows=2, max_chunks=1)
        assert partly.deleted == {
            "telemetry_point": 3,
            "collected_record": 2,
            "dead_letter": 2,
            "ingest_refused": 0,
        }
        assert not partly.done, "one chunk a table: the sweep does not know it finished"
        rest = retention.sweep(session, retention_days=30, now=now, chunk_rows=2)
        assert (rest.deleted, rest.done) == (dict.fromkeys(partly.deleted, 0), True)
    assert _stored(engine, TelemetryPoint, device.id) == [4, 5]
    assert _stored(engine, CollectedRecord, device.id) == []
    assert [d.received_at for d in _dead_letters(engine)] == [recent]
    with Session(engine) as session:
        assert session.get(IngestCursor, (device.id, "tm")) is not None, "cursors are kept"


def test_the_worker_sweeps_with_the_configured_retention(tmp_path: Path) -> None:
    settings = HubSettings(data_dir=tmp_path / "hub", telemetry=TelemetrySettings(retention_days=1))
    with hub_app(settings) as hub:
        device_id = hub.enroll()["device_id"]
        with Session(hub.ctx.engine) as session:
            before = datetime.now(UTC) - timedelta(days=2)
            ingest.store(session, ingest.prepare(device_id, _batch([1])), before)
            ingest.store(session, ingest.prepare(device_id, _batch([2])), datetime.now(UTC))
            session.commit()
        worker = MessageWorker(hub.ctx)
        worker.start()
        try:
            deadline = time.monotonic() + 20
            while _stored(hub.ctx.engine, TelemetryPoint, device_id) != [2]:
                assert time.monotonic() < deadline
                time.sleep(0.05)
        finally:
            worker.stop()


# -- restart ------------------------------------------------------------------------------------


def test_a_hub_restart_between_two_batches_loses_nothing(hub_settings: HubSettings) -> None:
    with hub_app(hub_settings) as first:
        device = Device(first, _handlers(first), first.enroll()["device_id"])
        device.send(Channel.TM, _batch([1, 2, 3, 4, 5]))
        # 7 arrived, 6 did not: the hub goes down with a hole.
        device.send(Channel.TM, _batch([7], first_kept=6))
        assert device.acks("tm") == [5, 5]

    with hub_app(hub_settings) as second:
        device = Device(second, _handlers(second), device.id)
        # The device resends what it holds (the ack of 5 reached it; 6 and 7 did not go).
        device.send(Channel.TM, _batch([6, 7, 8], first_kept=6))
        device.send(Channel.TM, _batch([9, 10], first_kept=6))
        assert device.acks("tm") == [8, 10]
        assert _stored(second.ctx.engine, TelemetryPoint, device.id) == list(range(1, 11))
        points = second.client.get(
            f"/api/v1/devices/{device.id}/telemetry",
            params={"since": T0.isoformat(), "until": (T0 + timedelta(hours=1)).isoformat()},
        ).json()["points"]
        assert [p["seq"] for p in points] == list(range(1, 11))


# -- the query API ------------------------------------------------------------------------------


def test_a_device_s_points_and_its_aggregates_per_interval(
    running_hub: RunningHub, device: Device
) -> None:
    records = [
        _record(1, at=T0 + timedelta(seconds=5), cpu_percent=10.0, memory_bytes=100),
        _record(
            2,
            at=T0 + timedelta(seconds=50),
            cpu_percent=30.0,
            memory_bytes=300,
            health="degraded",
            reconnects=2,
            models=[
                ModelStats(model="iris", version=1, inferences=5, errors=1, p95_ms=9.0),
                ModelStats(model="kws", version=2, inferences=7, errors=0),
            ],
        ),
        _record(3, at=T0 + timedelta(seconds=130), cpu_percent=None, memory_bytes=None),
    ]
    device.send(Channel.TM, TelemetryBody(first_kept=1, records=records))
    params = {"since": T0.isoformat(), "until": (T0 + timedelta(minutes=5)).isoformat()}
    url = f"/api/v1/devices/{device.id}/telemetry"

    points = running_hub.client.get(url, params=params).json()
    assert points["intervals"] is None
    assert [p["seq"] for p in points["points"]] == [1, 2, 3]
    assert points["points"][1]["models"][1] == {
        "model": "kws",
        "version": 2,
        "inferences": 7,
        "errors": 0,
        "p50_ms": None,
        "p95_ms": None,
        "p99_ms": None,
    }
    limited = running_hub.client.get(url, params={**params, "limit": 2}).json()
    assert [p["seq"] for p in limited["points"]] == [1, 2]

    body = running_hub.client.get(url, params={**params, "interval_s": 60}).json()
    assert body["points"] is None
    first, third = body["intervals"]  # the minute with no point is left out
    assert (first["start"], first["end"]) == ("2026-11-20T12:00:00Z", "2026-11-20T12:01:00Z")
    assert (first["points"], first["degraded"], first["avg_cpu_percent"]) == (2, 1, 20.0)
    assert (first["max_memory_bytes"], first["reconnects"]) == (300, 2)
    assert first["models"] == [
        {"model": "iris", "version": 1, "inferences": 10, "errors": 2, "max_p95_ms": 9.0},
        {"model": "kws", "version": 2, "inferences": 7, "errors": 0, "max_p95_ms": None},
    ]
    assert third["start"] == "2026-11-20T12:02:00Z"
    assert (third["points"], third["avg_cpu_percent"], third["max_memory_bytes"]) == (1, None, None)


def test_the_fleet_view_sums_and_averages_per_interval(running_hub: RunningHub) -> None:
    handlers = _handlers(running_hub)
    a, b = (Device(running_hub, handlers, running_hub.enroll()["device_id"]) for _ in range(2))
    a.send(
        Channel.TM,
        TelemetryBody(
            first_kept=1,
            records=[
                _record(1, at=T0 + timedelta(seconds=10), cpu_percent=10.0, memory_bytes=100),
                _record(2, at=T0 + timedelta(seconds=70), cpu_percent=50.0, memory_bytes=500),
            ],
        ),
    )
    b.send(
        Channel.TM,
        TelemetryBody(
            first_kept=1,
            records=[
                _record(1, at=T0 + timedelta(seconds=20), cpu_percent=30.0, memory_bytes=300),
                _record(2, at=T0 + timedelta(hours=2)),  # outside the range
            ],
        ),
    )
    body = running_hub.client.get(
        "/api/v1/telemetry/fleet",
        params={
            "since": T0.isoformat(),
            "until": (T0 + timedelta(minutes=10)).isoformat(),
            "interval_s": 60,
        },
    ).json()
    first, second = body["intervals"]
    assert (first["start"], first["devices"], first["points"]) == ("2026-11-20T12:00:00Z", 2, 2)
    assert (first["avg_cpu_percent"], first["avg_memory_bytes"]) == (20.0, 200.0)
    assert (first["inferences"], first["errors"]) == (10, 2)
    assert (second["start"], second["devices"], second["avg_cpu_percent"]) == (
        "2026-11-20T12:01:00Z",
        1,
        50.0,
    )


@pytest.mark.parametrize(
    ("path", "params", "message"),
    [
        (
            "/api/v1/telemetry/fleet",
            {"since": "2026-11-20T12:00:00Z", "until": "2026-11-20T11:00:00Z"},
            "since must be before until",
        ),
        (
            "/api/v1/telemetry/fleet",
            {"since": "2026-01-01T00:00:00Z", "until": "2026-11-20T00:00:00Z", "interval_s": 60},
            "at most 10000",
        ),
        ("/api/v1/telemetry/fleet", {"since": "2026-11-20T12:00:00"}, "timezone"),
        ("/api/v1/telemetry/fleet", {"interval_s": 0}, "greater than or equal to 1"),
        ("/api/v1/data", {"version": 2}, "version needs model"),
        ("/api/v1/data", {"cursor": "bm9wZQ=="}, "cursor is not one this API gave out"),
        ("/api/v1/data", {"device": "Bad/Id"}, "pattern"),
        ("/api/v1/data", {"limit": 0}, "greater than or equal to 1"),
        ("/api/v1/dead-letters", {"limit": 5000}, "less than or equal to 1000"),
    ],
)
def test_query_parameters_are_checked_with_a_clear_message(
    running_hub: RunningHub, path: str, params: dict[str, Any], message: str
) -> None:
    response = running_hub.client.get(path, params=params)
    assert response.status_code == 422, response.text
    assert message in response.text


def test_the_telemetry_of_an_unknown_device_is_not_found(running_hub: RunningHub) -> None:
    response = running_hub.client.get("/api/v1/devices/nobody-here/telemetry")
    assert response.status_code == 404
    assert "nobody-here" in response.json()["detail"]


def test_the_query_routes_need_the_admin_token(running_hub: RunningHub) -> None:
    for path in ("/api/v1/telemetry/fleet", "/api/v1/data", "/api/v1/dead-letters"):
        assert running_hub.client.get(path, headers={"Authorization": ""}).status_code == 401


# -- PostgreSQL ---------------------------------------------------------------------------------


@pytest.mark.skipif(not pg_available(), reason="no PostgreSQL at 127.0.0.1:5432")
def test_ingest_cursor_and_fleet_view_on_postgresql() -> None:
    with pg_schema() as url:
        upgrade(url)
        engine = make_engine(url)
        try:
            now = datetime.now(UTC)
            with Session(engine) as session:
                for _ in range(2):  # a redelivery: dropped by ON CONFLICT
                    assert ingest.store(session, ingest.prepare("dev-a", _batch([1, 2])), now) == 2
                batch = _batch([4], first_kept=1)
                assert ingest.store(session, ingest.prepare("dev-a", batch), now) == 2
                batch = _batch([7], first_kept=7)
                assert ingest.store(session, ingest.prepare("dev-b", batch), now) == 7
                session.commit()
                count = session.exec(select(func.count()).select_from(TelemetryPoint)).one()
                assert count == 4
                span = service.time_range(
                    since=T0, until=T0 + timedelta(hours=1), now=now, interval_s=60
                )
                fleet = service.fleet_telemetry(session=session, span=span, interval_s=60)
                # seq n is at T0 + 10n s: 1, 2 and 4 in the first minute, 7 in the second.
                assert [(i.devices, i.points, i.inferences) for i in fleet.intervals] == [
                    (1, 3, 15),
                    (1, 1, 5),
                ]
                assert session.get(IngestCursor, ("dev-a", "tm")) is not None
        finally:
            engine.dispose()
