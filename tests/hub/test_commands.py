"""One-off device commands on a real hub (API, SQLite files, handlers called as plain functions):
the signed command on the cmd topic verifies as the agent verifies it, seqs per device under
concurrent creates (SQLite and PostgreSQL), answers on req (and the ones that must be ignored),
expiry, argument checks, sending pending commands again when a device comes online, the
migration, and ``outpost-hub device logs|ping`` against a served hub with a device double that
answers, in process and over a real Mosquitto."""

import json
import queue
import threading
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import httpx
import pytest
from alembic import command as alembic_command
from click.testing import CliRunner, Result
from paho.mqtt.client import Client, MQTTMessage
from paho.mqtt.enums import CallbackAPIVersion
from sqlalchemy import text
from sqlmodel import Session

from agent.errors import RejectedError
from agent.protocol.documents import Command, CommandAction
from agent.protocol.messages import (
    MAX_LOG_ENTRIES,
    CommandBody,
    CommandResultBody,
    LogEntry,
    LogsResult,
    Reason,
    StatusBody,
    decode,
    encode,
)
from agent.protocol.topics import Channel, Topics
from agent.trust import verify_command, verify_keyring
from hub.cli import main as hub_cli
from hub.cli_device_commands import format_entry, parse_since
from hub.commands import service
from hub.commands.models import CommandState, DeviceCommand
from hub.context import HubContext
from hub.database import make_engine
from hub.messaging.handlers import Handlers, handle_message
from hub.messaging.publisher import Published, RecordingPublisher
from hub.migrations.runner import alembic_config, upgrade
from tests.e2e.conftest import LiveHub

# The end-to-end hub fixture (uvicorn, SQLite, embedded Mosquitto), reused rather than copied.
from tests.e2e.conftest import live_hub as live_hub
from tests.support.waiting import wait_until

from .conftest import RunningHub, ServedHub

T0 = datetime(2026, 12, 3, 17, 3, 26, 123000, tzinfo=UTC)
ENTRIES = [
    LogEntry(at=T0, level="INFO", logger="agent.core", message="connected"),
    LogEntry(
        at=T0 + timedelta(seconds=1),
        level="WARNING",
        logger="agent.install",
        message="health check failed\nTraceback (most recent call last):\n  boom",
    ),
]


def _handlers(ctx: HubContext, publisher: Any, packages_dir: Path) -> Handlers:
    return Handlers(
        director=ctx.director(), publisher=publisher, topics=ctx.topics, packages_dir=packages_dir
    )


def _send(ctx: HubContext, handlers: Handlers, device_id: str, channel: Channel, body: Any) -> None:
    with Session(ctx.engine, expire_on_commit=False) as session:
        handle_message(
            session=session,
            handlers=handlers,
            topic=ctx.topics.device(device_id, channel),
            payload=encode(body),
        )


def _commands_on(publisher: RecordingPublisher, topics: Topics, device_id: str) -> list[Published]:
    return publisher.on(topics.device(device_id, Channel.CMD))


@dataclass
class DeviceDouble:
    """A device's side of commands as the agent plays it: each command is checked with
    ``agent.trust`` (the keyring against the pinned root key, the director's signature, this
    device, a seq above the last one run, the expiry) and answered by ``answer``; a refused one
    is answered ok=false with the reason, as the agent does. ``answer`` returning None: silence."""

    root_public_key: str
    answer: Callable[[Command], CommandResultBody | None] = field(
        default_factory=lambda: _answer_logs
    )
    last_seq: dict[str, int] = field(default_factory=dict)
    seen: list[Command] = field(default_factory=list)

    def reply(self, device_id: str, payload: bytes) -> CommandResultBody | None:
        body = decode(payload).body
        assert isinstance(body, CommandBody)
        now = datetime.now(UTC)
        keyring = verify_keyring(
            body.keyring, root_public_b64=self.root_public_key, current=None, now=now
        )
        try:
            command = verify_command(
                body.command,
                keyring=keyring,
                device_id=device_id,
                last_seq=self.last_seq.get(device_id, 0),
                now=now,
            )
        except RejectedError as exc:
            return CommandResultBody(
                command_id=str(body.command.signed["command_id"]),
                seq=int(body.command.signed["seq"]),
                ok=False,
                reason=exc.reason,
                detail=exc.detail,
            )
        self.last_seq[device_id] = command.seq
        self.seen.append(command)
        return self.answer(command)


def _answer_logs(command: Command) -> CommandResultBody:
    if command.action != CommandAction.LOGS:
        return CommandResultBody(command_id=command.command_id, seq=command.seq, ok=True)
    result = LogsResult(entries=ENTRIES, more=True)
    return CommandResultBody(
        command_id=command.command_id,
        seq=command.seq,
        ok=True,
        result=result.model_dump(mode="json"),
    )


class AnsweringPublisher:
    """The hub's publisher in the served-hub tests: records like ``RecordingPublisher`` and hands
    each command to the device double on a thread of its own, which answers through the hub's
    handlers, as the message worker would (never inside ``publish``: the hub publishes while it
    holds the device's row)."""

    def __init__(self, ctx: HubContext, packages_dir: Path, device: DeviceDouble) -> None:
        self.recorded = RecordingPublisher()
        self.device = device
        self._ctx = ctx
        self._handlers = _handlers(ctx, self, packages_dir)
        self._queue: queue.Queue[Published | None] = queue.Queue()
        self._thread = threading.Thread(target=self._run, name="device-double", daemon=True)
        self._thread.start()

    def publish(self, topic: str, payload: bytes, *, qos: int = 1, retain: bool = False) -> None:
        self.recorded.publish(topic, payload, qos=qos, retain=retain)
        if topic.endswith(f"/{Channel.CMD}"):
            self._queue.put(Published(topic, payload, qos, retain))

    def _run(self) -> None:
        while (message := self._queue.get()) is not None:
            device_id = self._ctx.topics.parse_device(message.topic).device_id
            answer = self.device.reply(device_id, message.payload)
            if answer is not None:
                _send(self._ctx, self._handlers, device_id, Channel.REQ, answer)

    def stop(self) -> None:
        self._queue.put(None)
        self._thread.join(10)


# -- creating and signing ---------------------------------------------------------------------


def _create(hub: RunningHub, device_id: str, **body: Any) -> Any:
    body.setdefault("action", "logs")
    return hub.client.post(f"/api/v1/devices/{device_id}/commands", json=body)


def test_a_command_is_signed_for_its_device_and_published_on_cmd(running_hub: RunningHub) -> None:
    enrolled = running_hub.enroll()
    device_id = enrolled["device_id"]
    response = _create(
        running_hub,
        device_id,
        args={"tail": 50, "since": "2026-12-03T19:00:00.250+02:00", "level": "warning"},
        ttl_s=120,
    )
    assert response.status_code == 202, response.text
    created = response.json()
    assert created["state"] == "pending"
    assert created["seq"] == 1
    assert created["sent_count"] == 1
    assert created["args"] == {"tail": 50, "since": "2026-12-03T17:00:00Z", "level": "warning"}

    (published,) = _commands_on(running_hub.publisher, running_hub.ctx.topics, device_id)
    assert (published.qos, published.retain) == (1, False)
    body = decode(published.payload).body
    assert isinstance(body, CommandBody)
    now = datetime.now(UTC)
    keyring = verify_keyring(
        body.keyring, root_public_b64=enrolled["root_public_key"], current=None, now=now
    )
    command = verify_command(
        body.command, keyring=keyring, device_id=device_id, last_seq=0, now=now
    )
    assert command.command_id == created["id"]
    assert command.action == CommandAction.LOGS
    assert command.args == created["args"]
    assert command.expires_at - command.issued_at == timedelta(seconds=120)
    # The device refuses it when it is not for it, or when it has run this seq already.
    with pytest.raises(RejectedError) as wrong:
        verify_command(body.command, keyring=keyring, device_id="dev-other", last_seq=0, now=now)
    assert wrong.value.reason is Reason.WRONG_DEVICE
    with pytest.raises(RejectedError) as replay:
        verify_command(body.command, keyring=keyring, device_id=device_id, last_seq=1, now=now)
    assert replay.value.reason is Reason.REPLAY


def test_the_actor_and_defaults_are_recorded(running_hub: RunningHub) -> None:
    device_id = running_hub.enroll()["device_id"]
    response = running_hub.client.post(
        f"/api/v1/devices/{device_id}/commands",
        json={"action": "ping"},
        headers={"X-Outpost-Actor": "alice@ops"},
    )
    assert response.status_code == 202, response.text
    created = response.json()
    assert created["created_by"] == "alice@ops"
    assert created["args"] == {}
    expires = datetime.fromisoformat(created["expires_at"])
    assert expires - datetime.fromisoformat(created["created_at"]) == timedelta(seconds=60)
    logs = _create(running_hub, device_id).json()
    assert logs["args"] == {"tail": 100}


@pytest.mark.parametrize(
    ("body", "field_name"),
    [
        ({"action": "logs", "args": {"tail": 0}}, "logs.args.tail"),
        ({"action": "logs", "args": {"tail": MAX_LOG_ENTRIES + 1}}, "logs.args.tail"),
        ({"action": "logs", "args": {"since": "yesterday"}}, "logs.args.since"),
        ({"action": "logs", "args": {"since": "2026-12-03T17:00:00"}}, "logs.args.since"),
        ({"action": "logs", "args": {"level": "loud"}}, "logs.args.level"),
        ({"action": "logs", "args": {"tial": 5}}, "logs.args.tial"),
        ({"action": "ping", "args": {"x": 1}}, "ping.args.x"),
        ({"action": "ping", "ttl_s": 1}, "ping.ttl_s"),
        ({"action": "ping", "ttl_s": 10**9}, "ping.ttl_s"),
        ({"action": "reboot"}, "action"),
    ],
)
def test_bad_arguments_are_refused_naming_the_field(
    running_hub: RunningHub, body: dict[str, Any], field_name: str
) -> None:
    device_id = running_hub.enroll()["device_id"]
    response = running_hub.client.post(f"/api/v1/devices/{device_id}/commands", json=body)
    assert response.status_code == 422, response.text
    errors = response.json()["detail"]
    locs = [".".join(str(p) for p in e["loc"][1:]) for e in errors]
    assert field_name in locs or (field_name == "action" and "'logs', 'ping'" in errors[0]["msg"])
    assert _commands_on(running_hub.publisher, running_hub.ctx.topics, device_id) == []


def test_unknown_devices_and_commands_are_404(running_hub: RunningHub) -> None:
    response = _create(running_hub, "dev-nobody")
    assert response.status_code == 404
    assert response.json()["detail"] == "device dev-nobody not found"
    assert running_hub.client.get("/api/v1/devices/dev-nobody/commands").status_code == 404
    mine = running_hub.enroll()["device_id"]
    other = running_hub.enroll()["device_id"]
    created = _create(running_hub, mine).json()
    assert running_hub.client.get(f"/api/v1/devices/{mine}/commands/nope").status_code == 404
    # A command is only found under its own device.
    shown = running_hub.client.get(f"/api/v1/devices/{other}/commands/{created['id']}")
    assert shown.status_code == 404


def test_seqs_rise_per_device_and_stay_unique_under_concurrent_creates(
    running_hub: RunningHub,
) -> None:
    _create_concurrently(running_hub)


def test_seqs_under_concurrent_creates_on_postgresql(pg_hub: RunningHub) -> None:
    with Session(pg_hub.ctx.engine) as session:
        version = session.execute(text("SELECT version_num FROM alembic_version")).scalar_one()
        assert int(version) >= 6
    _create_concurrently(pg_hub)


def _create_concurrently(hub: RunningHub, threads: int = 8, each: int = 5) -> None:
    """``threads`` creators at once for one device, and a second device beside them: every
    seq is taken once, and the device's commands are published in seq order."""
    busy, quiet = hub.enroll()["device_id"], hub.enroll()["device_id"]
    sender = service.CommandSender(
        keys=hub.ctx.keys, publisher=hub.publisher, topics=hub.ctx.topics
    )
    start = threading.Barrier(threads)
    errors: list[BaseException] = []
    seqs: list[int] = []
    lock = threading.Lock()

    def create() -> None:
        try:
            start.wait()
            with Session(hub.ctx.engine, expire_on_commit=False) as session:
                for _ in range(each):
                    made = service.create_command(
                        session=session,
                        sender=sender,
                        device_id=busy,
                        action=CommandAction.PING,
                        args={},
                        ttl_s=60,
                        actor="test",
                    )
                    with lock:
                        seqs.append(made.seq)
        except BaseException as exc:
            errors.append(exc)

    workers = [threading.Thread(target=create) for _ in range(threads)]
    for w in workers:
        w.start()
    assert _create(hub, quiet, action="ping").json()["seq"] == 1
    for w in workers:
        w.join(60)
    assert errors == []
    assert sorted(seqs) == list(range(1, threads * each + 1))
    published = [
        Command.model_validate(decode(m.payload).body.command.signed).seq  # type: ignore[union-attr]
        for m in _commands_on(hub.publisher, hub.ctx.topics, busy)
    ]
    # Published once each, lowest first: a lower seq after a higher one would be a "replay".
    assert published == list(range(1, threads * each + 1))
    assert _create(hub, quiet, action="ping").json()["seq"] == 2


# -- answers ------------------------------------------------------------------------------------


@pytest.fixture
def handlers(running_hub: RunningHub) -> Handlers:
    return _handlers(running_hub.ctx, running_hub.publisher, running_hub.settings.packages_dir)


def _show(hub: RunningHub, device_id: str, command_id: str) -> dict[str, Any]:
    response = hub.client.get(f"/api/v1/devices/{device_id}/commands/{command_id}")
    assert response.status_code == 200, response.text
    shown: dict[str, Any] = response.json()
    return shown


def test_an_answer_on_req_completes_the_command(
    running_hub: RunningHub, handlers: Handlers
) -> None:
    device_id = running_hub.enroll()["device_id"]
    created = _create(running_hub, device_id).json()
    logs = LogsResult(entries=ENTRIES, more=True).model_dump(mode="json")
    answer = CommandResultBody(command_id=created["id"], seq=1, ok=True, result=logs)
    _send(running_hub.ctx, handlers, device_id, Channel.REQ, answer)
    shown = _show(running_hub, device_id, created["id"])
    assert shown["state"] == "succeeded"
    assert shown["result"] == logs
    assert shown["completed_at"] is not None
    assert shown["round_trip_ms"] >= 0
    assert handlers.stats.handled == 1
    assert handlers.stats.malformed == handlers.stats.failed == 0
    # A QoS 1 duplicate, or a different answer later, changes nothing.
    refusal = CommandResultBody(command_id=created["id"], seq=1, ok=False, reason=Reason.REPLAY)
    _send(running_hub.ctx, handlers, device_id, Channel.REQ, refusal)
    assert _show(running_hub, device_id, created["id"])["state"] == "succeeded"


def test_a_refusal_is_recorded_with_its_reason(running_hub: RunningHub, handlers: Handlers) -> None:
    device_id = running_hub.enroll()["device_id"]
    created = _create(running_hub, device_id, action="ping").json()
    refusal = CommandResultBody(
        command_id=created["id"], seq=1, ok=False, reason=Reason.EXPIRED, detail="expired at ..."
    )
    _send(running_hub.ctx, handlers, device_id, Channel.REQ, refusal)
    shown = _show(running_hub, device_id, created["id"])
    assert (shown["state"], shown["reason"], shown["detail"]) == (
        "failed",
        "E_EXPIRED",
        "expired at ...",
    )


def test_a_refusal_of_a_command_the_device_could_not_read_is_taken(
    running_hub: RunningHub, handlers: Handlers
) -> None:
    device_id = running_hub.enroll()["device_id"]
    created = _create(running_hub, device_id, action="ping").json()
    unread = CommandResultBody(
        command_id=created["id"], seq=0, ok=False, reason=Reason.MALFORMED, detail="bad"
    )
    _send(running_hub.ctx, handlers, device_id, Channel.REQ, unread)
    assert _show(running_hub, device_id, created["id"])["reason"] == "E_MALFORMED"


def test_a_logs_answer_that_is_no_logs_result_fails_the_command(
    running_hub: RunningHub, handlers: Handlers
) -> None:
    device_id = running_hub.enroll()["device_id"]
    created = _create(running_hub, device_id).json()
    answer = CommandResultBody(
        command_id=created["id"], seq=1, ok=True, result={"entries": [{"at": "noon"}]}
    )
    _send(running_hub.ctx, handlers, device_id, Channel.REQ, answer)
    shown = _show(running_hub, device_id, created["id"])
    assert (shown["state"], shown["reason"]) == ("failed", "E_MALFORMED")
    assert "entries.0.at" in shown["detail"]
    assert shown["result"] is None


def test_answers_that_match_no_waiting_command_are_ignored(
    running_hub: RunningHub, handlers: Handlers
) -> None:
    device_id = running_hub.enroll()["device_id"]
    other = running_hub.enroll()["device_id"]
    created = _create(running_hub, device_id, action="ping").json()
    ok = {"command_id": created["id"], "ok": True}
    stray = [
        (other, CommandResultBody(**ok, seq=1), service.ResultOutcome.WRONG_DEVICE),
        (device_id, CommandResultBody(**ok, seq=2), service.ResultOutcome.WRONG_SEQ),
        (device_id, CommandResultBody(**ok, seq=0), service.ResultOutcome.WRONG_SEQ),
        (
            device_id,
            CommandResultBody(command_id="f" * 32, seq=1, ok=True),
            service.ResultOutcome.UNKNOWN,
        ),
    ]
    for sender_id, answer, outcome in stray:
        with Session(running_hub.ctx.engine) as session:
            got = service.record_result(
                session=session, device_id=sender_id, body=answer, now=datetime.now(UTC)
            )
        assert got is outcome
        # Through the handlers too: taken as handled, and ingest goes on.
        _send(running_hub.ctx, handlers, sender_id, Channel.REQ, answer)
    assert handlers.stats.handled == len(stray)
    assert handlers.stats.failed == handlers.stats.malformed == 0
    assert _show(running_hub, device_id, created["id"])["state"] == "pending"


def test_a_result_elsewhere_than_on_req_is_dropped_as_malformed(
    running_hub: RunningHub, handlers: Handlers
) -> None:
    device_id = running_hub.enroll()["device_id"]
    created = _create(running_hub, device_id, action="ping").json()
    answer = CommandResultBody(command_id=created["id"], seq=1, ok=True)
    _send(running_hub.ctx, handlers, device_id, Channel.EVT, answer)
    assert handlers.stats.malformed == 1
    assert _show(running_hub, device_id, created["id"])["state"] == "pending"


# -- expiry, listing, sending again ------------------------------------------------------------


def _create_at(hub: RunningHub, device_id: str, now: datetime, ttl_s: int = 60) -> DeviceCommand:
    sender = service.CommandSender(
        keys=hub.ctx.keys, publisher=hub.publisher, topics=hub.ctx.topics
    )
    with Session(hub.ctx.engine, expire_on_commit=False) as session:
        return service.create_command(
            session=session,
            sender=sender,
            device_id=device_id,
            action=CommandAction.PING,
            args={},
            ttl_s=ttl_s,
            actor="test",
            now=now,
        )


def test_a_pending_command_past_its_expiry_reads_as_expired_and_takes_a_late_answer(
    running_hub: RunningHub, handlers: Handlers
) -> None:
    device_id = running_hub.enroll()["device_id"]
    old = _create_at(running_hub, device_id, datetime.now(UTC) - timedelta(seconds=30), ttl_s=10)
    # Already past its expiry when created: never published.
    assert _commands_on(running_hub.publisher, running_hub.ctx.topics, device_id) == []
    shown = _show(running_hub, device_id, old.id)
    assert shown["state"] == "expired"
    assert "no answer" in shown["detail"]
    with Session(running_hub.ctx.engine) as session:
        row = session.get(DeviceCommand, old.id)
        assert row is not None
        assert row.state == CommandState.EXPIRED
    listed = running_hub.client.get(f"/api/v1/devices/{device_id}/commands").json()
    assert [c["state"] for c in listed] == ["expired"]
    # The device judged the expiry by its own clock and ran it: its answer is the truth.
    late = CommandResultBody(command_id=old.id, seq=old.seq, ok=True)
    _send(running_hub.ctx, handlers, device_id, Channel.REQ, late)
    assert _show(running_hub, device_id, old.id)["state"] == "succeeded"


def test_the_list_is_newest_first_limited_and_without_results(
    running_hub: RunningHub, handlers: Handlers
) -> None:
    device_id = running_hub.enroll()["device_id"]
    ids = [_create(running_hub, device_id, action="ping").json()["id"] for _ in range(4)]
    _send(
        running_hub.ctx,
        handlers,
        device_id,
        Channel.REQ,
        CommandResultBody(command_id=ids[0], seq=1, ok=True, result={"x": 1}),
    )
    listed = running_hub.client.get(
        f"/api/v1/devices/{device_id}/commands", params={"limit": 3}
    ).json()
    assert [c["id"] for c in listed] == ids[::-1][:3]
    assert all("result" not in c for c in listed)
    everything = running_hub.client.get(f"/api/v1/devices/{device_id}/commands").json()
    assert [c["seq"] for c in everything] == [4, 3, 2, 1]
    assert everything[-1]["state"] == "succeeded"


def test_pending_commands_are_sent_again_when_the_device_comes_online(
    running_hub: RunningHub, handlers: Handlers
) -> None:
    ctx = running_hub.ctx
    device_id = running_hub.enroll()["device_id"]
    expired = _create_at(running_hub, device_id, datetime.now(UTC) - timedelta(seconds=30), 10)
    answered = _create(running_hub, device_id, action="ping").json()
    pending = [_create(running_hub, device_id, action="ping").json() for _ in range(2)]
    _send(
        ctx,
        handlers,
        device_id,
        Channel.REQ,
        CommandResultBody(command_id=answered["id"], seq=answered["seq"], ok=True),
    )

    def sent_seqs() -> list[int]:
        return [
            Command.model_validate(decode(m.payload).body.command.signed).seq  # type: ignore[union-attr]
            for m in _commands_on(running_hub.publisher, ctx.topics, device_id)
        ]

    first = [answered["seq"], *(p["seq"] for p in pending)]
    assert sent_seqs() == first
    # The device connects (its status without an uptime): what is still pending goes again,
    # in seq order; the expired and the answered ones do not.
    _send(ctx, handlers, device_id, Channel.STATUS, StatusBody(online=True))
    again = [p["seq"] for p in pending]
    assert sent_seqs() == first + again
    assert expired.seq not in sent_seqs()
    assert [_show(running_hub, device_id, p["id"])["sent_count"] for p in pending] == [2, 2]
    # A heartbeat of a device already online sends nothing.
    _send(ctx, handlers, device_id, Channel.STATUS, StatusBody(online=True, uptime_s=10))
    assert sent_seqs() == first + again
    # Offline (its will), then online again with a heartbeat: sent once more.
    _send(ctx, handlers, device_id, Channel.STATUS, StatusBody(online=False, reason="lost"))
    _send(ctx, handlers, device_id, Channel.STATUS, StatusBody(online=True, uptime_s=20))
    assert sent_seqs() == first + again + again


def test_a_command_the_hub_cannot_sign_is_stored_failed_and_refused_with_503(
    running_hub: RunningHub,
) -> None:
    device_id = running_hub.enroll()["device_id"]
    (running_hub.settings.keys_dir / "director.pem").unlink()
    response = _create(running_hub, device_id, action="ping")
    assert response.status_code == 503
    assert "director" in response.json()["detail"]
    (listed,) = running_hub.client.get(f"/api/v1/devices/{device_id}/commands").json()
    assert listed["state"] == "failed"
    assert listed["detail"].startswith("the hub could not send it")


# -- migration ----------------------------------------------------------------------------------


def test_the_migration_gives_existing_devices_a_command_counter(tmp_path: Path) -> None:
    url = f"sqlite:///{tmp_path / 'm.db'}"
    upgrade(url, "0005")
    engine = make_engine(url)
    with engine.begin() as conn:
        conn.execute(
            text(
                "INSERT INTO device (id, device_class, tags, password_hash, enrolled_at,"
                " desired_counter, online, evt_acked_seq)"
                " VALUES ('dev-before', 'generic', '{}', 'x', '2026-12-01 00:00:00', 0, 0, 0)"
            )
        )
    upgrade(url, "0006")
    with engine.connect() as conn:
        seq = conn.execute(text("SELECT command_seq FROM device")).scalar_one()
        assert seq == 0
    alembic_command.downgrade(alembic_config(url), "0005")
    with engine.connect() as conn:
        assert conn.execute(text("SELECT count(*) FROM device")).scalar_one() == 1
        tables = conn.execute(text("SELECT name FROM sqlite_master WHERE type='table'")).all()
        assert ("device_command",) not in tables
    engine.dispose()


# -- the CLI ------------------------------------------------------------------------------------


def test_log_entries_are_printed_one_per_line_with_later_lines_indented() -> None:
    assert format_entry(ENTRIES[0]) == "2026-12-03T17:03:26.123Z INFO agent.core: connected"
    assert format_entry(ENTRIES[1]).splitlines() == [
        "2026-12-03T17:03:27.123Z WARNING agent.install: health check failed",
        "    Traceback (most recent call last):",
        "      boom",
    ]


@pytest.mark.parametrize(
    ("text_in", "expected"),
    [
        ("10m", T0 - timedelta(minutes=10)),
        ("2h", T0 - timedelta(hours=2)),
        ("1d", T0 - timedelta(days=1)),
        ("45s", T0 - timedelta(seconds=45)),
        ("2026-12-01T08:00:00Z", datetime(2026, 12, 1, 8, tzinfo=UTC)),
        ("2026-12-01T10:00:00+02:00", datetime(2026, 12, 1, 8, tzinfo=UTC)),
        ("2026-12-01 08:00", datetime(2026, 12, 1, 8, tzinfo=UTC)),
    ],
)
def test_since_takes_iso_times_and_durations(text_in: str, expected: datetime) -> None:
    assert parse_since(text_in, now=T0) == expected


@dataclass
class CliHub:
    served: ServedHub
    device: DeviceDouble
    device_id: str

    def run(self, *args: str) -> Result:
        return CliRunner().invoke(
            hub_cli,
            ["--hub", self.served.url, *args],
            env={"OUTPOST_HUB_TOKEN": self.served.token},
            catch_exceptions=False,
        )


@pytest.fixture
def cli_hub(served_hub: ServedHub) -> Iterator[CliHub]:
    with httpx.Client(
        base_url=served_hub.url, headers={"Authorization": f"Bearer {served_hub.token}"}
    ) as api:
        token = api.post("/api/v1/enrollment-tokens", json={"uses": 1}).json()["token"]
        enrolled = api.post("/api/v1/enroll", json={"token": token}).json()
    device = DeviceDouble(root_public_key=enrolled["root_public_key"])
    publisher = AnsweringPublisher(served_hub.ctx, served_hub.settings.packages_dir, device)
    served_hub.ctx.publisher = publisher
    try:
        yield CliHub(served_hub, device, enrolled["device_id"])
    finally:
        publisher.stop()


def test_device_logs_prints_the_entries_and_says_when_older_ones_were_left_out(
    cli_hub: CliHub,
) -> None:
    result = cli_hub.run(
        "device", "logs", cli_hub.device_id, "--since", "10m", "--level", "WARNING", "--tail", "20"
    )
    assert result.exit_code == 0, result.output
    assert result.stdout.splitlines() == [
        "2026-12-03T17:03:26.123Z INFO agent.core: connected",
        "2026-12-03T17:03:27.123Z WARNING agent.install: health check failed",
        "    Traceback (most recent call last):",
        "      boom",
    ]
    assert "older matching entries were left out" in result.stderr
    (command,) = cli_hub.device.seen
    assert command.args["tail"] == 20
    assert command.args["level"] == "warning"
    since = datetime.fromisoformat(str(command.args["since"]))
    assert timedelta(minutes=9) < datetime.now(UTC) - since < timedelta(minutes=11)


def test_device_logs_json_is_the_logs_result(cli_hub: CliHub) -> None:
    result = cli_hub.run("device", "logs", cli_hub.device_id, "--json")
    assert result.exit_code == 0, result.output
    printed = LogsResult.model_validate(json.loads(result.stdout))
    assert printed.entries == ENTRIES
    assert printed.more


def test_device_logs_exits_1_with_the_reason_when_the_device_refuses(cli_hub: CliHub) -> None:
    def refuse(command: Command) -> CommandResultBody:
        return CommandResultBody(
            command_id=command.command_id,
            seq=command.seq,
            ok=False,
            reason=Reason.INCOMPATIBLE,
            detail="this agent does not know the action 'logs'",
        )

    cli_hub.device.answer = refuse
    result = cli_hub.run("device", "logs", cli_hub.device_id)
    assert result.exit_code == 1, result.output
    assert result.stdout == ""
    assert "E_INCOMPATIBLE: this agent does not know the action 'logs'" in result.stderr


def test_device_logs_exits_3_when_the_device_does_not_answer(cli_hub: CliHub) -> None:
    cli_hub.device.answer = lambda command: None
    result = cli_hub.run("device", "logs", cli_hub.device_id, "--timeout", "1")
    assert result.exit_code == 3, result.output
    assert f"no answer from {cli_hub.device_id} within 1s" in result.stderr
    assert "may be offline (last seen never)" in result.stderr
    assert "stays pending until" in result.stderr


def test_device_logs_refuses_bad_options_before_asking_the_hub(cli_hub: CliHub) -> None:
    for args in (["--since", "last tuesday"], ["--tail", "0"], ["--level", "loud"]):
        result = cli_hub.run("device", "logs", cli_hub.device_id, *args)
        assert result.exit_code == 2, result.output
    assert "neither an ISO time" in cli_hub.run("device", "logs", "x", "--since", "soon").output
    assert cli_hub.device.seen == []
    unknown = cli_hub.run("device", "logs", "dev-nobody")
    assert unknown.exit_code == 2
    assert "device dev-nobody not found" in unknown.output


def test_device_ping_prints_the_round_trip(cli_hub: CliHub) -> None:
    result = cli_hub.run("device", "ping", cli_hub.device_id)
    assert result.exit_code == 0, result.output
    assert result.stdout.startswith(f"{cli_hub.device_id} answered in ")
    assert result.stdout.rstrip().endswith(" ms")


# -- over a real Mosquitto ----------------------------------------------------------------------


class MqttDevice:
    """The device double on the broker: its own credentials, subscribed to its cmd topic,
    answering on req."""

    def __init__(self, enrolled: dict[str, Any], device: DeviceDouble) -> None:
        self.id: str = enrolled["device_id"]
        self.topics = Topics(enrolled["topic_root"])
        self.device = device
        self.client = Client(callback_api_version=CallbackAPIVersion.VERSION2, client_id=self.id)
        broker = enrolled["broker"]
        self.client.username_pw_set(broker["username"], broker["password"])
        self._address = (broker["host"], broker["port"])
        self.subscribed = threading.Event()
        self.client.on_subscribe = lambda *a: self.subscribed.set()
        self.client.on_message = self._on_message

    def _on_message(self, client: Client, userdata: Any, message: MQTTMessage) -> None:
        answer = self.device.reply(self.id, bytes(message.payload))
        if answer is not None:
            client.publish(self.topics.device(self.id, Channel.REQ), encode(answer), qos=1)

    def connect(self) -> None:
        """As the agent does: subscribe first, then say online."""
        self.client.connect(*self._address, keepalive=30)
        self.client.loop_start()
        self.client.subscribe(self.topics.device(self.id, Channel.CMD), qos=1)
        wait_until(self.subscribed.is_set, 10, "the broker to confirm the subscription")
        self.client.publish(
            self.topics.device(self.id, Channel.STATUS), encode(StatusBody(online=True)), qos=1
        )

    def stop(self) -> None:
        self.client.disconnect()
        self.client.loop_stop()


@pytest.mark.integration
def test_over_mosquitto_a_command_waits_for_the_device_then_the_cli_gets_its_logs(
    live_hub: LiveHub,
) -> None:
    with live_hub.api as api:
        token = api.post("/api/v1/enrollment-tokens", json={"uses": 1}).json()["token"]
        enrolled = api.post("/api/v1/enroll", json={"token": token}).json()
        device_id = enrolled["device_id"]
        # Created while the device is away: published to nobody, pending.
        ping = api.post(f"/api/v1/devices/{device_id}/commands", json={"action": "ping"}).json()
    device = MqttDevice(enrolled, DeviceDouble(root_public_key=enrolled["root_public_key"]))
    try:
        device.connect()

        def ping_state() -> str:
            with live_hub.api as api:
                shown = api.get(f"/api/v1/devices/{device_id}/commands/{ping['id']}").json()
            return str(shown["state"])

        wait_until(lambda: ping_state() == "succeeded", 20, "the ping sent again to be answered")
        result = live_hub.cli("device", "logs", device_id, "--level", "info", "--timeout", "20")
        assert result.exit_code == 0, result.output
        assert "WARNING agent.install: health check failed" in result.stdout
        assert [c.action for c in device.device.seen] == ["ping", "logs"]
        assert live_hub.message_stats()["malformed"] == 0
    finally:
        device.stop()
