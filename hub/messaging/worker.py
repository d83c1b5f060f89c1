"""The thread that does the database work for incoming messages.

paho delivers messages on its network thread; doing SQL there would stall keepalives and every
other device's traffic. The callback only enqueues into a bounded queue; a full queue drops the
message with a count (devices resend: events, telemetry and data until acked, requests after a
timeout).

Telemetry and data-collection messages waiting in the queue together are stored in one
transaction (one commit and session instead of one per message: about 2.5 times the messages per
second on SQLite for one-record messages), and each is acked after that commit. The thread also
deletes what is past the retention.
"""

import logging
import queue
import threading
import time
from datetime import timedelta
from typing import TYPE_CHECKING

from sqlmodel import Session

from hub.database import utcnow
from hub.deployments.engine import RolloutEngine
from hub.deployments.service import publish
from hub.devices.liveness import mark_silent_offline
from hub.failpoints import HubFailpoint, hit
from hub.messaging.chunks import publish_chunks
from hub.messaging.handlers import (
    Handlers,
    handle_ingest_messages,
    handle_message,
    is_ingest_topic,
)
from hub.telemetry.retention import sweep

if TYPE_CHECKING:
    from hub.context import HubContext

logger = logging.getLogger(__name__)

QUEUE_SIZE = 10_000
# How often the rollout engine looks at running deployments (and devices past their timeout),
# and how soon after a device finished or changed state in one.
ROLLOUT_TICK_S = 1.0
ROLLOUT_NUDGED_S = 0.2
_STOP = ("", b"")
# A coalesced ingest transaction takes queued messages up to this many payload bytes (besides
# the settings' message count), so it holds SQLite's write lock for a bounded time.
COALESCE_MAX_BYTES = 4 * 1024 * 1024
# When a retention sweep stopped at its bound with rows left to delete.
SWEEP_AGAIN_S = 1.0


class MessageWorker:
    def __init__(self, ctx: "HubContext", *, queue_size: int = QUEUE_SIZE) -> None:
        self._ctx = ctx
        self._queue: queue.Queue[tuple[str, bytes]] = queue.Queue(maxsize=queue_size)
        self._thread: threading.Thread | None = None
        self._next_tick = 0.0
        self._telemetry = ctx.settings.telemetry
        self._next_sweep = 0.0
        # No device is judged silent before the hub has listened for a whole offline_after_s:
        # after a restart, last_seen is as old as the hub's downtime, and devices that are
        # online would flap offline until their next heartbeat.
        self._offline_after_s = ctx.settings.devices.offline_after_s
        self._next_liveness = time.monotonic() + self._offline_after_s
        # A message taken from the queue while gathering an ingest batch, handled next.
        self._held: tuple[str, bytes] | None = None
        # The engine runs on this thread, so its row changes never race the handlers'.
        self.engine = RolloutEngine(owner=ctx.instance_id)
        self.handlers = Handlers(
            director=ctx.director(),
            publisher=ctx.publisher,
            topics=ctx.topics,
            packages_dir=ctx.settings.packages_dir,
            nudge_rollouts=self._nudge,
            dead_letter_payload_bytes=ctx.settings.telemetry.dead_letter_payload_bytes,
        )

    def _nudge(self) -> None:
        self._next_tick = min(self._next_tick, time.monotonic() + ROLLOUT_NUDGED_S)

    def bind_publisher(self) -> None:
        """Use the context's current publisher (set once the MQTT client exists)."""
        self.handlers.publisher = self._ctx.publisher
        self.handlers.director = self._ctx.director()

    def submit(self, topic: str, payload: bytes) -> None:
        """Called on paho's thread: never blocks."""
        try:
            self._queue.put_nowait((topic, payload))
        except queue.Full:
            self.handlers.stats.bump("overflow")
            logger.warning("message queue full, dropped", extra={"topic": topic})

    def start(self) -> None:
        self._thread = threading.Thread(target=self._run, name="hub-messages", daemon=True)
        self._thread.start()

    def stop(self, timeout_s: float = 5.0) -> None:
        if self._thread is None:
            return
        self._queue.put(_STOP)
        self._thread.join(timeout_s)
        self._thread = None

    def _next_item(self, timeout: float) -> tuple[str, bytes] | None:
        if self._held is not None:
            item, self._held = self._held, None
            return item
        try:
            return self._queue.get(timeout=timeout)
        except queue.Empty:
            return None

    def _gather_ingest(self, first: tuple[str, bytes]) -> list[tuple[str, bytes]]:
        """``first`` and the telemetry and data messages queued right behind it, within bounds;
        the first other message met is held for the next turn (order within a channel holds)."""
        batch = [first]
        size = len(first[1])
        while len(batch) < self._telemetry.coalesce_max_messages and size < COALESCE_MAX_BYTES:
            try:
                item = self._queue.get_nowait()
            except queue.Empty:
                break
            if item is _STOP or not is_ingest_topic(self.handlers.topics, item[0]):
                self._held = item
                break
            batch.append(item)
            size += len(item[1])
        return batch

    def _run(self) -> None:
        heartbeats = self.handlers.heartbeats
        chunks = self.handlers.chunks
        while True:
            # Wake up in time for the pending chunks' publish, or else the heartbeats' flush.
            timeout = min(heartbeats.flush_every_s, max(0.0, self._next_tick - time.monotonic()))
            if chunks.waiting:
                timeout = min(timeout, chunks.seconds_until_due())
            item = self._next_item(timeout)
            if item is not None and item is not _STOP:
                if is_ingest_topic(self.handlers.topics, item[0]):
                    self._handle_ingest(self._gather_ingest(item))
                else:
                    self._handle(*item)
            if chunks.due():
                self._publish_chunks()
            if heartbeats.due() or item is _STOP:
                self._flush_heartbeats()
            if time.monotonic() >= self._next_tick and item is not _STOP:
                self._tick_rollouts()
            if time.monotonic() >= self._next_sweep and item is not _STOP:
                self._sweep()
            if time.monotonic() >= self._next_liveness and item is not _STOP:
                self._mark_silent_offline()
            if item is _STOP:
                self._release_leases()
                return

    def _publish_chunks(self) -> None:
        handlers = self.handlers
        try:
            publish_chunks(
                chunks=handlers.chunks.take(),
                publisher=handlers.publisher,
                topics=handlers.topics,
                packages_dir=handlers.packages_dir,
            )
        except Exception:
            handlers.stats.bump("failed")
            logger.exception("publishing chunks failed")

    def _handle(self, topic: str, payload: bytes) -> None:
        try:
            with Session(self._ctx.engine, expire_on_commit=False) as session:
                handle_message(
                    session=session, handlers=self.handlers, topic=topic, payload=payload
                )
        except Exception:
            # A bug or a database hiccup must not end message handling for every device.
            self.handlers.stats.bump("failed")
            logger.exception("handling a message failed", extra={"topic": topic})

    def _handle_ingest(self, messages: list[tuple[str, bytes]]) -> None:
        try:
            with Session(self._ctx.engine, expire_on_commit=False) as session:
                handle_ingest_messages(session=session, handlers=self.handlers, messages=messages)
        except Exception:
            # Nothing was acked: the devices send these again.
            self.handlers.stats.bump("failed")
            logger.exception("storing telemetry failed", extra={"messages": len(messages)})

    def _sweep(self) -> None:
        self._next_sweep = time.monotonic() + self._telemetry.sweep_every_s
        try:
            with Session(self._ctx.engine, expire_on_commit=False) as session:
                swept = sweep(session, retention_days=self._telemetry.retention_days, now=utcnow())
        except Exception:
            logger.exception("deleting expired telemetry failed")
            return
        if not swept.done:
            # More to delete: go on after a turn of message handling, not in a few minutes.
            self._next_sweep = time.monotonic() + SWEEP_AGAIN_S

    def _mark_silent_offline(self) -> None:
        # A quarter of the bound: a silent device is marked at most 25 % late.
        self._next_liveness = time.monotonic() + self._offline_after_s / 4
        self._flush_heartbeats()  # last_seen of the heartbeats still held here first
        try:
            with Session(self._ctx.engine, expire_on_commit=False) as session:
                silent = mark_silent_offline(
                    session, silent_since=utcnow() - timedelta(seconds=self._offline_after_s)
                )
        except Exception:
            self.handlers.stats.bump("failed")
            logger.exception("marking silent devices offline failed")
            return
        for device_id in silent:
            # Its next heartbeat takes the full path and marks it online again.
            self.handlers.heartbeats.status_written(device_id, online=False)

    def _tick_rollouts(self) -> None:
        self._next_tick = time.monotonic() + ROLLOUT_TICK_S
        try:
            with Session(self._ctx.engine, expire_on_commit=False) as session:
                tick = self.engine.tick(session)
                if tick.published:
                    hit(HubFailpoint.AFTER_RELEASE_COMMIT)
                publish(self.handlers.director, session, tick.published, "rollout tick")
        except Exception:
            self.handlers.stats.bump("failed")
            logger.exception("advancing rollouts failed")

    def _release_leases(self) -> None:
        try:
            with Session(self._ctx.engine, expire_on_commit=False) as session:
                self.engine.release_leases(session)
        except Exception:
            logger.exception("releasing rollout leases failed")

    def _flush_heartbeats(self) -> None:
        try:
            with Session(self._ctx.engine, expire_on_commit=False) as session:
                self.handlers.heartbeats.flush(session)
        except Exception:
            self.handlers.stats.bump("failed")
            logger.exception("writing heartbeats failed")
