"""What the hub does with each device message: plain functions on a Session, testable without a
broker. The topic's device id is the authority (the broker ACL pins each device to its topics);
a device id inside a body is never trusted over it.
"""

import logging
import threading
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from datetime import datetime
from pathlib import Path

from sqlalchemy import update
from sqlalchemy.exc import IntegrityError
from sqlmodel import Session, col, select

from agent.protocol.messages import (
    TERMINAL_STEPS,
    AckBody,
    ChunkRequestBody,
    CommandResultBody,
    DataBody,
    DesiredRequestBody,
    Envelope,
    EventBody,
    MessageError,
    StateBody,
    StatusBody,
    TelemetryBody,
    decode,
    encode,
)
from agent.protocol.topics import Channel, TopicError, Topics, is_valid_device_id
from hub.commands import service as command_service
from hub.database import utcnow
from hub.deployments.desired import Director
from hub.deployments.models import DeviceDesired, DeviceEvent
from hub.deployments.progress import on_event, on_reported_state
from hub.devices.known import KnownDevices
from hub.devices.models import Device
from hub.errors import HubError
from hub.failpoints import HubFailpoint, hit
from hub.messaging.chunks import ChunkScheduler, ChunkWanted
from hub.messaging.publisher import Publisher
from hub.packages.models import Package
from hub.telemetry import ingest

logger = logging.getLogger(__name__)


def _nothing() -> None:
    pass


_TERMINAL = frozenset(str(s) for s in TERMINAL_STEPS)
# Which body kinds may arrive on which channel; anything else is dropped as malformed.
_KINDS_BY_CHANNEL: dict[Channel, frozenset[str]] = {
    Channel.STATE: frozenset({"state"}),
    Channel.STATUS: frozenset({"status"}),
    Channel.EVT: frozenset({"event"}),
    Channel.REQ: frozenset({"desired_request", "chunk_request", "command_result"}),
    Channel.TM: frozenset({"telemetry"}),
    Channel.DC: frozenset({"data"}),
}
# Channels whose messages the worker may store several at a time (``handle_ingest_messages``).
INGEST_CHANNELS = frozenset({Channel.TM, Channel.DC})


@dataclass
class MessageStats:
    """Counters an operator can read to see that devices send garbage, or that the hub lags."""

    handled: int = 0
    malformed: int = 0
    unknown_device: int = 0
    overflow: int = 0
    failed: int = 0
    _lock: threading.Lock = field(default_factory=threading.Lock, repr=False)

    def bump(self, name: str) -> None:
        with self._lock:
            setattr(self, name, getattr(self, name) + 1)


class Heartbeats:
    """Last-seen times of devices already known to be online, written in batches.

    A heartbeat from an online device changes nothing but ``last_seen``. Writing each one in its
    own transaction would cost the hub a commit per device per heartbeat (1,000/s for 10,000
    devices at 10 s) and crowd out the events behind them in the queue; instead they are kept
    here and flushed in one statement every ``flush_every_s``. Status changes (online after
    offline, the will) still take the full path at once.
    """

    def __init__(self, flush_every_s: float = 2.0) -> None:
        self.flush_every_s = flush_every_s
        self._online: set[str] = set()
        self._pending: dict[str, datetime] = {}
        self._last_flush = time.monotonic()
        self.flushed = 0

    def absorb(self, device_id: str, body: StatusBody) -> bool:
        """True when this status is a plain heartbeat that was taken care of here. The status
        a device sends on each connect (no uptime) always takes the full path: a reconnect the
        hub did not see as a drop still gets the device's pending commands."""
        if body.online and body.uptime_s is not None and device_id in self._online:
            self._pending[device_id] = utcnow()
            return True
        return False

    def status_written(self, device_id: str, online: bool) -> None:
        if online:
            self._online.add(device_id)
        else:
            self._online.discard(device_id)
            self._pending.pop(device_id, None)

    def due(self) -> bool:
        return bool(self._pending) and time.monotonic() - self._last_flush >= self.flush_every_s

    def flush(self, session: Session) -> int:
        self._last_flush = time.monotonic()
        if not self._pending:
            return 0
        rows = [{"id": d, "last_seen": t} for d, t in self._pending.items()]
        self._pending.clear()
        # ORM bulk UPDATE by primary key: one executemany for the whole batch.
        session.execute(update(Device), rows)
        session.commit()
        self.flushed += len(rows)
        return len(rows)


@dataclass
class Handlers:
    """The collaborators the handlers need; one per hub process."""

    director: Director
    publisher: Publisher
    topics: Topics
    packages_dir: Path
    chunks: ChunkScheduler = field(default_factory=ChunkScheduler)
    stats: MessageStats = field(default_factory=MessageStats)
    heartbeats: Heartbeats = field(default_factory=Heartbeats)
    known_devices: KnownDevices = field(default_factory=KnownDevices)
    # Called when a device finished or changed state in a deployment, so the rollout engine
    # looks at it soon instead of at its next regular tick.
    nudge_rollouts: Callable[[], None] = field(default=lambda: None)
    # How much of a malformed message's payload its dead letter keeps.
    dead_letter_payload_bytes: int = 4096


@dataclass(frozen=True)
class Incoming:
    """A device message that passed every check: its device (from the topic), its envelope, and
    for telemetry and data collection the rows to store."""

    device_id: str
    envelope: Envelope
    batch: ingest.Batch | None = None


def _device_in_topic(topics: Topics, topic: str) -> str | None:
    """The device id a topic names, when it names a valid one, even on a channel the hub does
    not take: a dead letter should say whose it is."""
    prefix = f"{topics.root}/d/"
    if not topic.startswith(prefix):
        return None
    device_id = topic[len(prefix) :].split("/", 1)[0]
    return device_id if is_valid_device_id(device_id) else None


def is_ingest_topic(topics: Topics, topic: str) -> bool:
    """Whether ``topic`` is a telemetry or data-collection topic (cheap; no payload parsing)."""
    try:
        return topics.parse_device(topic).channel in INGEST_CHANNELS
    except TopicError:
        return False


def parse_message(
    *, session: Session, handlers: Handlers, topic: str, payload: bytes
) -> Incoming | None:
    """Check one device message. A malformed one is counted, logged and kept as a dead letter
    (committed at once, whatever else fails later); None then."""
    try:
        where = handlers.topics.parse_device(topic)
        if where.channel not in _KINDS_BY_CHANNEL:
            raise TopicError(f"the hub does not take messages on {where.channel}")
        envelope = decode(payload)
        body = envelope.body
        if body.kind not in _KINDS_BY_CHANNEL[where.channel]:
            raise MessageError(f"a {body.kind!r} message does not belong on {topic}")
        batch = (
            ingest.prepare(where.device_id, body)
            if isinstance(body, TelemetryBody | DataBody)
            else None
        )
    except (TopicError, MessageError) as exc:
        handlers.stats.bump("malformed")
        logger.warning("dropped malformed message", extra={"topic": topic, "reason": str(exc)})
        _keep_aside(session, handlers, topic, str(exc), payload, handlers.dead_letter_payload_bytes)
        return None
    if batch is not None and batch.refused:
        # The rest of the batch is stored and the ack passes these; so the message is kept
        # whole (it is at most a message's size), or the refused records would be lost.
        handlers.stats.bump("malformed")
        reason = f"{len(batch.refused)} of {len(batch.rows) + len(batch.refused)} records refused: "
        reason += "; ".join(batch.refused.values())
        logger.warning("refused records", extra={"topic": topic, "reason": reason})
        _keep_aside(session, handlers, topic, reason, payload, len(payload))
    return Incoming(device_id=where.device_id, envelope=envelope, batch=batch)


def _keep_aside(
    session: Session, handlers: Handlers, topic: str, reason: str, payload: bytes, keep: int
) -> None:
    """A dead letter, committed at once, whatever else fails later."""
    session.add(
        ingest.dead_letter(
            topic=topic,
            device_id=_device_in_topic(handlers.topics, topic),
            reason=reason,
            payload=payload,
            max_payload_bytes=keep,
            now=utcnow(),
        )
    )
    session.commit()


def handle_message(*, session: Session, handlers: Handlers, topic: str, payload: bytes) -> None:
    """Parse one device message and act on it; malformed messages are logged, dropped and kept
    aside as dead letters."""
    incoming = parse_message(session=session, handlers=handlers, topic=topic, payload=payload)
    if incoming is not None:
        _dispatch(session=session, handlers=handlers, incoming=incoming)


def _known(session: Session, handlers: Handlers, device_id: str) -> bool:
    if session.get(Device, device_id) is None:
        handlers.stats.bump("unknown_device")
        logger.warning("dropped message from unknown device", extra={"device_id": device_id})
        return False
    return True


def _dispatch(*, session: Session, handlers: Handlers, incoming: Incoming) -> None:
    envelope = incoming.envelope
    device_id = incoming.device_id
    if isinstance(envelope.body, StatusBody) and envelope.body.uptime_s is None:
        # Sent on every (re)connect: the device's old subscriptions are gone.
        handlers.chunks.forget_device(device_id)
    if isinstance(envelope.body, StatusBody) and handlers.heartbeats.absorb(
        device_id, envelope.body
    ):
        handlers.stats.bump("handled")
        return
    if not _known(session, handlers, device_id):
        return
    body = envelope.body
    if incoming.batch is not None:
        handle_batch(
            session=session,
            publisher=handlers.publisher,
            topics=handlers.topics,
            batch=incoming.batch,
        )
    elif isinstance(body, DesiredRequestBody):
        handle_desired_request(session=session, director=handlers.director, device_id=device_id)
    elif isinstance(body, ChunkRequestBody):
        handle_chunk_request(
            session=session, chunks=handlers.chunks, device_id=device_id, body=body
        )
    elif isinstance(body, EventBody):
        handle_event(
            session=session,
            publisher=handlers.publisher,
            topics=handlers.topics,
            device_id=device_id,
            body=body,
            sent_at=envelope.sent_at,
            nudge=handlers.nudge_rollouts,
        )
    elif isinstance(body, StateBody):
        handle_state(session=session, device_id=device_id, body=body, nudge=handlers.nudge_rollouts)
    elif isinstance(body, CommandResultBody):
        command_service.record_result(session=session, device_id=device_id, body=body, now=utcnow())
    elif isinstance(body, StatusBody):
        sender = command_service.CommandSender(
            keys=handlers.director.keys, publisher=handlers.publisher, topics=handlers.topics
        )
        handle_status(session=session, device_id=device_id, body=body, commands=sender)
        handlers.heartbeats.status_written(device_id, body.online)
    handlers.stats.bump("handled")


def handle_batch(
    *, session: Session, publisher: Publisher, topics: Topics, batch: ingest.Batch
) -> int:
    """Store one telemetry or data-collection batch (duplicates dropped), commit, then ack;
    returns the acknowledged seq."""
    acked = ingest.store(session, batch, utcnow())
    session.commit()
    ingest.acknowledge(
        publisher=publisher,
        topics=topics,
        device_id=batch.device_id,
        stream=batch.stream,
        seq=acked,
    )
    return acked


def handle_ingest_messages(
    *, session: Session, handlers: Handlers, messages: Sequence[tuple[str, bytes]]
) -> None:
    """Several telemetry and data-collection messages stored in one transaction, and after
    the commit one ack per stream (acks are cumulative: the highest stored seq says it for
    every message of the stream). Should that transaction fail, they are stored one by one, so
    one message the database refuses cannot hold back the others."""
    parsed: list[Incoming] = []
    others: list[Incoming] = []
    for topic, payload in messages:
        incoming = parse_message(session=session, handlers=handlers, topic=topic, payload=payload)
        if incoming is None:
            continue
        (others if incoming.batch is None else parsed).append(incoming)  # others: usual path
    known = handlers.known_devices.enrolled(session, {i.device_id for i in parsed})
    batches: list[ingest.Batch] = []
    for incoming in parsed:
        if incoming.device_id not in known:
            handlers.stats.bump("unknown_device")
            logger.warning(
                "dropped message from unknown device", extra={"device_id": incoming.device_id}
            )
        elif incoming.batch is not None:
            batches.append(incoming.batch)
    try:
        acked = ingest.store_many(session, batches, utcnow())
        session.commit()
        if batches:
            hit(HubFailpoint.AFTER_INGEST_COMMIT)  # stored, not yet acked: the worst moment
    except Exception:
        session.rollback()
        logger.exception("storing batches together failed; storing them one by one")
        for batch in batches:
            try:
                handle_batch(
                    session=session,
                    publisher=handlers.publisher,
                    topics=handlers.topics,
                    batch=batch,
                )
                handlers.stats.bump("handled")
            except Exception:
                session.rollback()
                handlers.stats.bump("failed")
                logger.exception(
                    "storing a batch failed",
                    extra={"device_id": batch.device_id, "stream": str(batch.stream)},
                )
    else:
        for (device_id, stream), seq in acked.items():
            ingest.acknowledge(
                publisher=handlers.publisher,
                topics=handlers.topics,
                device_id=device_id,
                stream=stream,
                seq=seq,
            )
        for _ in batches:
            handlers.stats.bump("handled")
    for incoming in others:
        _dispatch(session=session, handlers=handlers, incoming=incoming)


def handle_desired_request(*, session: Session, director: Director, device_id: str) -> None:
    """Re-sign and publish the device's desired state, even when it names no packages."""
    try:
        director.publish(session=session, device_id=device_id)
    except HubError as exc:
        logger.warning(
            "cannot answer desired request", extra={"device_id": device_id, "error": exc.detail}
        )


def handle_chunk_request(
    *, session: Session, chunks: ChunkScheduler, device_id: str, body: ChunkRequestBody
) -> int:
    """Schedule the requested chunks of a package in this device's desired state; returns how
    many need a publish (the rest are pending already or on their way to the device)."""
    wanted = session.exec(
        select(DeviceDesired).where(
            DeviceDesired.device_id == device_id, DeviceDesired.package_digest == body.digest
        )
    ).first()
    if wanted is None:
        logger.warning(
            "chunk request for a package not desired by the device",
            extra={"device_id": device_id, "digest": body.digest},
        )
        return 0
    package = session.get(Package, body.digest)
    if package is None:
        return 0
    count = len(package.chunks)
    valid = sorted({i for i in body.chunks if 0 <= i < count})
    if len(valid) != len(set(body.chunks)):
        logger.info(
            "ignored out-of-range chunk indexes",
            extra={"device_id": device_id, "digest": body.digest, "chunks": count},
        )
    return sum(
        chunks.request(device_id, ChunkWanted(body.digest, index, package.chunk_bytes))
        for index in valid
    )


def _advance_ack(session: Session, device: Device) -> int:
    seqs = session.exec(
        select(DeviceEvent.seq)
        .where(DeviceEvent.device_id == device.id, col(DeviceEvent.seq) > device.evt_acked_seq)
        .order_by(col(DeviceEvent.seq))
    ).all()
    acked = device.evt_acked_seq
    for seq in seqs:
        if seq != acked + 1:
            break
        acked = seq
    return acked


def handle_event(
    *,
    session: Session,
    publisher: Publisher,
    topics: Topics,
    device_id: str,
    body: EventBody,
    sent_at: datetime,
    nudge: Callable[[], None] = _nothing,
) -> int:
    """Store a progress event once, update the deployment, and ack what is stored; returns the
    acked sequence number."""
    now = utcnow()
    session.add(
        DeviceEvent(
            device_id=device_id,
            seq=body.seq,
            deployment_id=body.deployment_id,
            model=body.model,
            version=body.version,
            digest=body.digest,
            step=str(body.step),
            reason=str(body.reason) if body.reason is not None else None,
            detail=body.detail,
            progress=body.progress,
            sent_at=sent_at,
            received_at=now,
        )
    )
    try:
        session.flush()
        duplicate = False
    except IntegrityError:
        # QoS 1 redelivery or an outbox resend: stored already, but ack it again.
        session.rollback()
        duplicate = True
    if not duplicate and on_event(session=session, device_id=device_id, body=body, now=now):
        nudge()
    device = session.get(Device, device_id)
    assert device is not None
    device.evt_acked_seq = _advance_ack(session, device)
    device.last_seen = now
    session.add(device)
    session.commit()
    publisher.publish(
        topics.device(device_id, Channel.ACK),
        encode(AckBody(stream="evt", seq=device.evt_acked_seq)),
        qos=1,
        retain=False,
    )
    return device.evt_acked_seq


def handle_state(
    *, session: Session, device_id: str, body: StateBody, nudge: Callable[[], None] = _nothing
) -> None:
    """Store the reported state and apply it to the device's deployments (see
    ``progress.on_reported_state``)."""
    now = utcnow()
    device = session.get(Device, device_id)
    assert device is not None
    device.reported_state = body.model_dump(mode="json")
    device.last_seen = now
    session.add(device)
    if on_reported_state(
        session=session, device_id=device_id, reported=device.reported_state, now=now
    ):
        nudge()
    session.commit()


def handle_status(
    *,
    session: Session,
    device_id: str,
    body: StatusBody,
    commands: command_service.CommandSender | None = None,
) -> None:
    """Store the device's online flag; a device that came (back) online gets its pending
    commands again (with ``commands``): what was sent while it was away never reached it."""
    device = session.get(Device, device_id)
    assert device is not None
    # The status without an uptime is the one sent on every connect.
    came_online = body.online and (not device.online or body.uptime_s is None)
    device.online = body.online
    device.last_seen = utcnow()
    session.add(device)
    session.commit()
    if came_online and commands is not None:
        command_service.resend_pending(session=session, sender=commands, device_id=device_id)
