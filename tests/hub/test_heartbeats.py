"""Heartbeats: a status change is written at once; plain heartbeats from online devices are
batched into one statement, so a large fleet's heartbeats do not cost a commit each."""

from datetime import datetime
from typing import Any

from sqlalchemy import event
from sqlmodel import Session

from agent.protocol.messages import StatusBody, encode
from agent.protocol.topics import Channel
from hub.devices.models import Device
from hub.messaging.handlers import Handlers, Heartbeats, handle_message
from tests.hub.conftest import RunningHub


def _device(hub: RunningHub, device_id: str) -> Device:
    with Session(hub.ctx.engine) as session:
        device = session.get(Device, device_id)
        assert device is not None
        return device


def test_heartbeats_from_online_devices_are_written_in_one_batch(running_hub: RunningHub) -> None:
    devices = [running_hub.enroll()["device_id"] for _ in range(5)]
    handlers = Handlers(
        director=running_hub.ctx.director(),
        publisher=running_hub.publisher,
        topics=running_hub.ctx.topics,
        packages_dir=running_hub.settings.packages_dir,
        heartbeats=Heartbeats(flush_every_s=0.0),
    )
    statements: list[str] = []

    def count(conn: Any, cursor: Any, statement: str, *args: Any) -> None:
        if statement.lstrip().upper().startswith("UPDATE"):
            statements.append(statement)

    def send(device_id: str, body: StatusBody) -> None:
        with Session(running_hub.ctx.engine, expire_on_commit=False) as session:
            handle_message(
                session=session,
                handlers=handlers,
                topic=running_hub.ctx.topics.device(device_id, Channel.STATUS),
                payload=encode(body),
            )

    for device_id in devices:
        send(device_id, StatusBody(online=True))  # a change: written at once
    assert all(_device(running_hub, d).online for d in devices)
    seen_before: dict[str, datetime | None] = {
        d: _device(running_hub, d).last_seen for d in devices
    }

    event.listen(running_hub.ctx.engine, "before_cursor_execute", count)
    try:
        for _ in range(3):
            for device_id in devices:
                send(device_id, StatusBody(online=True, uptime_s=10))
        assert statements == [], "heartbeats of online devices wait for the batch"
        assert handlers.heartbeats.due()
        with Session(running_hub.ctx.engine) as session:
            assert handlers.heartbeats.flush(session) == 5
        assert len(statements) == 1, "one statement for the whole batch"
    finally:
        event.remove(running_hub.ctx.engine, "before_cursor_execute", count)
    for device_id in devices:
        last_seen = _device(running_hub, device_id).last_seen
        before = seen_before[device_id]
        assert last_seen is not None
        assert before is not None
        assert last_seen > before

    # The will (offline) takes the full path at once, and the next online status does too.
    send(devices[0], StatusBody(online=False, reason="connection lost"))
    assert not _device(running_hub, devices[0]).online
    send(devices[0], StatusBody(online=True, uptime_s=1))
    assert _device(running_hub, devices[0]).online
    assert handlers.stats.handled == 5 + 15 + 2

    # A connect status (no uptime) takes the full path even from a device online already: a
    # reconnect the hub never saw as a drop still gets the device's pending commands.
    statements.clear()
    event.listen(running_hub.ctx.engine, "before_cursor_execute", count)
    try:
        send(devices[1], StatusBody(online=True))
    finally:
        event.remove(running_hub.ctx.engine, "before_cursor_execute", count)
    assert statements, "written at once, not held for the heartbeat batch"
