"""One-off device commands: create (a fresh per-device seq), sign and publish them, take the
devices' answers, send pending ones again when a device comes back online, and read them.

Ordering matters: the agent runs a command only if its seq is above the last one it ran, so a
lower seq published after a higher one would be refused as a replay. Commands are therefore
stored first (committed, so an answer can never arrive before its row) and then published in a
second transaction that holds the device's row, which publishes every pending command of the
device not sent yet in seq order. Whichever hub thread (or replica) gets the row first sends
them all; the other finds nothing left to send.
"""

import logging
import uuid
from collections.abc import Sequence
from dataclasses import dataclass
from datetime import datetime, timedelta
from enum import StrEnum

from pydantic import ValidationError
from sqlalchemy import update
from sqlmodel import Session, col, select

from agent.protocol.documents import Command, CommandAction, Signed, document_dict
from agent.protocol.messages import CommandBody, CommandResultBody, LogsResult, Reason, encode
from agent.protocol.topics import Channel, Topics
from hub.commands.models import ANSWERABLE, CommandState, DeviceCommand
from hub.commands.schemas import CommandPublic, CommandSummary, WireArgs
from hub.database import utcnow
from hub.devices.models import Device
from hub.errors import HubError, NotFound
from hub.messaging.publisher import Publisher
from hub.signing.keystore import KeyStore

logger = logging.getLogger(__name__)

EXPIRED_DETAIL = "no answer from the device before the command expired"


@dataclass(frozen=True)
class CommandSender:
    """Signs commands with the director key and publishes them on the device's cmd topic."""

    keys: KeyStore
    publisher: Publisher
    topics: Topics

    def document(self, command: DeviceCommand) -> Signed:
        doc = Command(
            device_id=command.device_id,
            seq=command.seq,
            command_id=command.id,
            action=command.action,
            args=command.args,
            issued_at=command.created_at,
            expires_at=command.expires_at,
        )
        signed_part = document_dict(doc)
        return Signed(signed=signed_part, signatures=[self.keys.sign_director(signed_part)])

    def send(self, command: DeviceCommand) -> None:
        # Not retained: a command is for now, and a device coming online gets its pending
        # commands sent again by the hub (``resend_pending``), never an old one from the broker.
        payload = encode(
            CommandBody(
                keyring=self.keys.keyring(),
                keyrings=self.keys.keyring_chain(),
                command=self.document(command),
            )
        )
        self.publisher.publish(
            self.topics.device(command.device_id, Channel.CMD), payload, qos=1, retain=False
        )


# -- creating and sending ------------------------------------------------------------------------


def create_command(
    *,
    session: Session,
    sender: CommandSender,
    device_id: str,
    action: CommandAction,
    args: WireArgs,
    ttl_s: int,
    actor: str,
    now: datetime | None = None,
) -> DeviceCommand:
    """Store a command with the device's next seq and publish it; NotFound for an unknown
    device. A command the hub cannot send (no director key, broker client broken) is stored as
    failed, saying why, and the error is raised."""
    # Whole seconds, as the signed document has them (see DeviceCommand).
    issued = (now or utcnow()).replace(microsecond=0)
    # One conditional UPDATE takes the seq: concurrent creates for one device queue on its row
    # and each gets its own (the counter never goes back, so a seq is never used twice).
    seq = session.execute(
        update(Device)
        .where(col(Device.id) == device_id)
        .values(command_seq=Device.command_seq + 1)
        .returning(col(Device.command_seq))
    ).scalar_one_or_none()
    if seq is None:
        session.rollback()
        raise NotFound(f"device {device_id} not found")
    command = DeviceCommand(
        id=uuid.uuid4().hex,
        device_id=device_id,
        seq=seq,
        action=str(action),
        args=dict(args),
        created_by=actor,
        created_at=issued,
        expires_at=issued + timedelta(seconds=ttl_s),
    )
    session.add(command)
    session.commit()
    logger.info(
        "command created",
        extra={"device_id": device_id, "command_id": command.id, "seq": seq, "action": action},
    )
    try:
        _publish_pending(session, sender, device_id, unsent_only=True)
    except HubError as exc:
        session.rollback()
        _fail_unsent(session, command, exc)
        raise
    return command


def _fail_unsent(session: Session, command: DeviceCommand, exc: HubError) -> None:
    session.execute(
        update(DeviceCommand)
        .where(col(DeviceCommand.id) == command.id, col(DeviceCommand.sent_count) == 0)
        .values(state=CommandState.FAILED, detail=f"the hub could not send it: {exc.detail}")
    )
    session.commit()
    session.refresh(command)


def resend_pending(*, session: Session, sender: CommandSender, device_id: str) -> int:
    """Publish the device's pending, unexpired commands again, in seq order (the device was
    offline, so what was sent before may never have reached it); returns how many. Errors are
    logged, never raised: this runs in message ingest."""
    try:
        sent = _publish_pending(session, sender, device_id, unsent_only=False)
    except HubError as exc:
        session.rollback()
        logger.warning(
            "cannot send pending commands", extra={"device_id": device_id, "error": exc.detail}
        )
        return 0
    if sent:
        logger.info("sent pending commands again", extra={"device_id": device_id, "count": sent})
    return sent


def _publish_pending(
    session: Session, sender: CommandSender, device_id: str, *, unsent_only: bool
) -> int:
    # A no-op UPDATE of the device row as the transaction's first statement: it holds the row
    # (PostgreSQL) or the write lock (SQLite) until the commit, so one device's commands are
    # published by one hub thread at a time, in seq order.
    held = session.execute(
        update(Device).where(col(Device.id) == device_id).values(command_seq=Device.command_seq)
    )
    if held.rowcount == 0:  # type: ignore[attr-defined]
        session.rollback()
        return 0
    query = select(DeviceCommand).where(
        DeviceCommand.device_id == device_id,
        DeviceCommand.state == CommandState.PENDING,
        col(DeviceCommand.expires_at) > utcnow(),
    )
    if unsent_only:
        query = query.where(DeviceCommand.sent_count == 0)
    commands = session.exec(query.order_by(col(DeviceCommand.seq))).all()
    for command in commands:
        command.sent_at = utcnow()
        sender.send(command)
        command.sent_count += 1
        session.add(command)
    session.commit()
    return len(commands)


# -- answers -------------------------------------------------------------------------------------


class ResultOutcome(StrEnum):
    RECORDED = "recorded"
    UNKNOWN = "unknown"  # no command has that id
    WRONG_DEVICE = "wrong_device"  # the command is another device's
    WRONG_SEQ = "wrong_seq"  # the id is right but the seq is not the command's
    FINISHED = "finished"  # answered before: a QoS 1 duplicate, or the answer to a copy


def record_result(
    *, session: Session, device_id: str, body: CommandResultBody, now: datetime
) -> ResultOutcome:
    """Take a device's answer to one of its commands. An answer that does not match a command
    of this device still waiting for one is logged and ignored: it must never stop ingest."""
    command = session.get(DeviceCommand, body.command_id)
    outcome = _check_answer(command, device_id, body)
    if command is None or outcome is not None:
        logger.warning(
            "ignored command result",
            extra={
                "device_id": device_id,
                "command_id": body.command_id,
                "seq": body.seq,
                "why": str(outcome or ResultOutcome.UNKNOWN),
            },
        )
        return outcome or ResultOutcome.UNKNOWN
    state, reason, detail, result = _judge(command, body)
    # Conditional on the state, so two answers racing (two hub replicas) record one.
    recorded = session.execute(
        update(DeviceCommand)
        .where(
            col(DeviceCommand.id) == command.id,
            col(DeviceCommand.state).in_([str(s) for s in ANSWERABLE]),
        )
        .values(state=state, reason=reason, detail=detail, result=result, completed_at=now)
    )
    session.commit()
    if recorded.rowcount == 0:  # type: ignore[attr-defined]
        return ResultOutcome.FINISHED
    logger.info(
        "command answered",
        extra={"device_id": device_id, "command_id": command.id, "state": str(state)},
    )
    return ResultOutcome.RECORDED


def _check_answer(
    command: DeviceCommand | None, device_id: str, body: CommandResultBody
) -> ResultOutcome | None:
    """Why the answer cannot be taken, or None when it can."""
    if command is None:
        return ResultOutcome.UNKNOWN
    if command.device_id != device_id:
        return ResultOutcome.WRONG_DEVICE
    # Seq 0 says the device could not read the command far enough to find its seq: a refusal
    # of the command with this id from the device it was for is still its answer.
    unread = body.seq == 0 and not body.ok
    if body.seq != command.seq and not unread:
        return ResultOutcome.WRONG_SEQ
    if command.state not in ANSWERABLE:
        return ResultOutcome.FINISHED
    return None


def _judge(
    command: DeviceCommand, body: CommandResultBody
) -> tuple[CommandState, str | None, str, dict[str, object] | None]:
    """(state, reason, detail, result) for an answer."""
    if not body.ok:
        detail = body.detail
        if body.reason is Reason.REPLAY and command.sent_count > 1:
            detail += (
                f" (the hub sent it {command.sent_count} times: the device may have run an"
                " earlier copy and its answer was lost)"
            )
        reason = str(body.reason) if body.reason is not None else None
        return CommandState.FAILED, reason, detail, body.result or None
    if command.action == CommandAction.LOGS:
        try:
            logs = LogsResult.model_validate(body.result)
        except ValidationError as exc:
            problem = "; ".join(
                f"{'.'.join(map(str, e['loc']))}: {e['msg']}" for e in exc.errors()[:3]
            )
            detail = f"the device's answer is not a logs result: {problem}"
            return CommandState.FAILED, str(Reason.MALFORMED), detail, None
        return CommandState.SUCCEEDED, None, body.detail, logs.model_dump(mode="json")
    return CommandState.SUCCEEDED, None, body.detail, body.result


# -- reading -------------------------------------------------------------------------------------


def _device(session: Session, device_id: str) -> Device:
    device = session.get(Device, device_id)
    if device is None:
        raise NotFound(f"device {device_id} not found")
    return device


def _expire_due(session: Session, commands: Sequence[DeviceCommand], now: datetime) -> bool:
    """Write the pending commands past their expiry as expired; True when any was."""
    due = [c.id for c in commands if c.state == CommandState.PENDING and c.expires_at <= now]
    if not due:
        return False
    session.execute(
        update(DeviceCommand)
        .where(col(DeviceCommand.id).in_(due), col(DeviceCommand.state) == CommandState.PENDING)
        .values(state=CommandState.EXPIRED, detail=EXPIRED_DETAIL)
    )
    session.commit()
    return True


def get_command(
    *, session: Session, device_id: str, command_id: str, now: datetime | None = None
) -> CommandPublic:
    _device(session, device_id)
    command = session.get(DeviceCommand, command_id)
    if command is None or command.device_id != device_id:
        raise NotFound(f"device {device_id} has no command {command_id}")
    if _expire_due(session, [command], now or utcnow()):
        session.refresh(command)
    return to_public(command)


def list_commands(
    *, session: Session, device_id: str, limit: int, now: datetime | None = None
) -> list[CommandSummary]:
    """The device's commands, newest first."""
    _device(session, device_id)
    query = (
        select(DeviceCommand)
        .where(DeviceCommand.device_id == device_id)
        .order_by(col(DeviceCommand.seq).desc())
        .limit(limit)
    )
    commands = session.exec(query).all()
    if _expire_due(session, commands, now or utcnow()):
        commands = session.exec(query.execution_options(populate_existing=True)).all()
    return [_summary(c) for c in commands]


def _summary(command: DeviceCommand) -> CommandSummary:
    round_trip_ms = None
    if command.completed_at is not None and command.sent_at is not None:
        round_trip_ms = max((command.completed_at - command.sent_at).total_seconds(), 0) * 1000
    return CommandSummary(
        id=command.id,
        device_id=command.device_id,
        seq=command.seq,
        action=command.action,
        args=command.args,
        state=command.state,
        reason=command.reason,
        detail=command.detail,
        created_by=command.created_by,
        created_at=command.created_at,
        expires_at=command.expires_at,
        sent_at=command.sent_at,
        sent_count=command.sent_count,
        completed_at=command.completed_at,
        round_trip_ms=round_trip_ms,
    )


def to_public(command: DeviceCommand) -> CommandPublic:
    return CommandPublic(**_summary(command).model_dump(), result=command.result)
