"""The thread that does the database work for incoming messages.

paho delivers messages on its network thread; doing SQL there would stall keepalives and every
other device's traffic. The callback only enqueues into a bounded queue; a full queue drops the
message with a count (devices resend: events until acked, requests after a timeout).
"""

import logging
import queue
import threading
import time
from typing import TYPE_CHECKING

from sqlmodel import Session

from hub.deployments.engine import RolloutEngine
from hub.deployments.service import publish
from hub.failpoints import HubFailpoint, hit
from hub.messaging.chunks import publish_chunks
from hub.messaging.handlers import Handlers, handle_message

if TYPE_CHECKING:
    from hub.context import HubContext

logger = logging.getLogger(__name__)

QUEUE_SIZE = 10_000
# How often the rollout engine looks at running deployments (and devices past their timeout),
# and how soon after a device finished or changed state in one.
ROLLOUT_TICK_S = 1.0
ROLLOUT_NUDGED_S = 0.2
_STOP = ("", b"")


class MessageWorker:
    def __init__(self, ctx: "HubContext", *, queue_size: int = QUEUE_SIZE) -> None:
        self._ctx = ctx
        self._queue: queue.Queue[tuple[str, bytes]] = queue.Queue(maxsize=queue_size)
        self._thread: threading.Thread | None = None
        self._next_tick = 0.0
        # The engine runs on this thread, so its row changes never race the handlers'.
        self.engine = RolloutEngine(owner=ctx.instance_id)
        self.handlers = Handlers(
            director=ctx.director(),
            publisher=ctx.publisher,
            topics=ctx.topics,
            packages_dir=ctx.settings.packages_dir,
            nudge_rollouts=self._nudge,
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

    def _run(self) -> None:
        heartbeats = self.handlers.heartbeats
        chunks = self.handlers.chunks
        while True:
            # Wake up in time for the pending chunks' publish, or else the heartbeats' flush.
            timeout = min(heartbeats.flush_every_s, max(0.0, self._next_tick - time.monotonic()))
            if chunks.waiting:
                timeout = min(timeout, chunks.seconds_until_due())
            try:
                item = self._queue.get(timeout=timeout)
            except queue.Empty:
                item = None
            if item is not None and item is not _STOP:
                self._handle(*item)
            if chunks.due():
                self._publish_chunks()
            if heartbeats.due() or item is _STOP:
                self._flush_heartbeats()
            if time.monotonic() >= self._next_tick and item is not _STOP:
                self._tick_rollouts()
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
