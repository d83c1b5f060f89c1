"""The agent core: reconciles one device towards its signed desired state.

It owns no threads and no module-level state, so many instances can share one event loop (the
simulator runs thousands). The hub's database is the source of truth: on every (re)connect the
agent asks for its desired state again, so nothing depends on a retained message or a broker
queue surviving. Every report is an event with a per-device sequence number, kept until the
hub's ``ack`` says it was stored and sent again after a reconnect.

Telemetry and collected scoring calls take the same road on disk: each goes into the outbox
(``agent.outbox``) and leaves it only when the hub's ack for its stream covers its seq. One batch
per stream is in flight at a time; it is sent again after ``telemetry.resend_s`` without an ack,
and at once after a reconnect.
"""

import asyncio
import errno
import logging
import random
import shutil
import time
from collections import Counter
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from agent import __version__
from agent.aio import wait_set
from agent.archive import ArchiveLimits
from agent.collection import BUDGET_NOTE, CollectionCounts, Collector, ScoredSample
from agent.commands import CommandRunner, refused
from agent.download import ChunkAssembler
from agent.errors import AgentError, InstallError, NoSpaceError, RejectedError, TrustError
from agent.failpoints import Failpoint, FailpointCrash, Failpoints
from agent.install import HealthChecker, ModelStore, RuntimeLoader, StepReporter, TrustContext
from agent.logbook import LogBook, current_logbook, install_handler, level_number
from agent.mqtt import Backoff, BrokerAddress, MqttLink, Will
from agent.outbox import STREAMS, Outbox, OutboxError, OutboxLimits, Stream, restored, stored
from agent.protocol.documents import Command, DesiredState, Keyring, PackageRef, Signed
from agent.protocol.messages import (
    MAX_BATCH_RECORDS,
    AckBody,
    ChunkRequestBody,
    CollectedRecord,
    CommandBody,
    DataBody,
    DesiredBody,
    DesiredRequestBody,
    EventBody,
    MessageError,
    ModelStatus,
    Reason,
    StateBody,
    StatusBody,
    Step,
    TelemetryBody,
    TelemetryRecord,
    decode,
    encode,
)
from agent.protocol.topics import Channel, TopicError, Topics
from agent.runtimes import available_frameworks
from agent.runtimes.base import ActiveModel
from agent.runtimes.script import ScriptRuntime, WorkerState, WorkerStats
from agent.scoring import ScoringCall
from agent.settings import AgentSettings
from agent.state import BadVersion, InstallAttempt, StateDir
from agent.telemetry import Health, IntervalMeter, ModelCalls
from agent.tlsfiles import TlsFiles, broker_tls
from agent.trust import (
    DesiredVerdict,
    verify_command,
    verify_desired,
    verify_keyring_update,
    verify_stored_keyring,
)

logger = logging.getLogger(__name__)

MAX_PENDING_EVENTS = 10_000
# An install that kills the agent this many times in a row is given up (Mender breaks its state
# loops the same way): the version is marked bad instead of crashing the device forever.
MAX_INSTALL_ATTEMPTS = 3
MIB = 1024 * 1024
# Room for the state files and logs written while installing, beyond the package's two copies.
SPACE_MARGIN_BYTES = 4 * MIB

DiskFree = Callable[[Path], int]
LinkFactory = Callable[..., MqttLink]  # takes MqttLink's keyword arguments


def disk_free_bytes(path: Path) -> int:
    return shutil.disk_usage(path).free


@dataclass
class Download:
    """One package being fetched, and what its chunks' arrival wakes."""

    assembler: ChunkAssembler
    new_chunk: asyncio.Event = field(default_factory=asyncio.Event)  # or the download failed
    activity: asyncio.Event = field(default_factory=asyncio.Event)  # any chunk, even a copy


MAX_CHUNK_TIMEOUT_S = 30.0
# Room in a telemetry or data message for its envelope, and for each record's seq and comma
# (the outbox stores records without their seq).
ENVELOPE_BYTES = 2048
RECORD_SEQ_BYTES = 32
OUTBOX_FILE = "outbox.db"


@dataclass
class Sender:
    """One outbox stream's way to the hub: at most one batch in flight, until its ack."""

    wake: asyncio.Event = field(default_factory=asyncio.Event)
    in_flight: int | None = None  # the last seq of the batch sent and not yet acknowledged
    sent_at: float = 0.0  # time.monotonic() of that send
    acked: int = 0  # the highest seq the hub said it stored
    deleted: int = 0  # the outbox is cleared up to this seq


@dataclass(frozen=True)
class OutboxFigures:
    made: int  # records numbered (the streams' last seqs: seqs are never reused)
    backlog: int  # waiting for the hub's ack
    dropped: int  # lost since install: the bound, a full disk, a corrupt file


def utc_now() -> datetime:
    return datetime.now(UTC)


class Agent:
    """One device. ``run`` until ``stop`` is set; also the scoring endpoint's model source."""

    def __init__(
        self,
        *,
        settings: AgentSettings,
        load_runtime: RuntimeLoader,
        check_health: HealthChecker,
        clock: Callable[[], datetime] = utc_now,
        rng: random.Random | None = None,
        failpoints: Failpoints | None = None,
        disk_free: DiskFree = disk_free_bytes,
        link_factory: LinkFactory = MqttLink,
        on_event: Callable[[EventBody], None] | None = None,
        runtimes: Sequence[str] | None = None,
        collect_rng: random.Random | None = None,
    ) -> None:
        """The keyword hooks default to the real device; the simulator replaces them to give
        each simulated device its own clock, disk, network and crash points. ``collect_rng``
        draws data collection's samples (seeded in tests)."""
        self.settings = settings
        self._failpoints = failpoints or Failpoints.from_env()
        self._disk_free = disk_free
        self._on_event = on_event
        self.state = StateDir(settings.state_dir)
        self.state.create()
        self.identity = self.state.load_identity()
        self.device_id = self.identity.device_id
        self._clock = clock
        self._topics = Topics(self.identity.topic_root)
        self._progress = self.state.load_progress()
        self._store = ModelStore(
            self.state.models,
            load_runtime=load_runtime,
            check_health=check_health,
            limits=ArchiveLimits(
                max_total_bytes=settings.download.max_package_bytes,
                max_entries=settings.download.max_archive_entries,
            ),
            failpoints=self._failpoints,
        )
        self._keyring: Keyring | None = None
        self._desired: DesiredState | None = None
        self._active: dict[str, ActiveModel] = {}
        self._closing: set[asyncio.Task[None]] = set()  # runtimes being closed
        self._reported_active: dict[str, str | None] = {}
        self._runtimes = sorted(available_frameworks() if runtimes is None else runtimes)
        # The desired counter the last state report was sent for.
        self._state_counter = -1
        self._downloads: dict[str, Download] = {}  # by package digest
        self._pending_events: dict[int, bytes] = {}
        self._wake = asyncio.Event()
        self.last_rejection = ""
        self.malformed_received = 0
        self.events_dropped = 0
        self.heartbeats_sent = 0
        self.corrupt_chunks_received = 0
        self.rejections: Counter[str] = Counter()  # refused desired states, by reason
        self._rng = rng or random.Random()
        self._calls = ModelCalls(self._rng)
        self._meter = IntervalMeter(self._calls)
        self._collector = Collector(
            rng=collect_rng or random.Random(),
            max_record_bytes=settings.telemetry.max_message_bytes - ENVELOPE_BYTES,
            max_pending_bytes=settings.collection.max_pending_bytes,
        )
        self._collected = asyncio.Event()
        self._outbox: Outbox | None = None
        self._outbox_at_close = OutboxFigures(0, 0, 0)
        self._outbox_opening = asyncio.Lock()
        self._senders: dict[Stream, Sender] = {s: Sender() for s in STREAMS}
        # Records lost because no outbox could be opened (a read-only or full disk).
        self.records_lost = 0
        self.logbook: LogBook | None = None
        if settings.logs.enabled:
            install_handler(level_number(settings.logs.level))
            self.logbook = LogBook(self.state.root / "logs", max_bytes=settings.logs.max_bytes)
        self._commands = CommandRunner(
            logbook=self.logbook, max_result_bytes=settings.logs.max_result_bytes
        )
        self._command_tasks: set[asyncio.Task[None]] = set()
        self.commands_refused: Counter[str] = Counter()  # by reason
        broker = self.identity.broker
        host, port = settings.mqtt.host or broker.host, settings.mqtt.port or broker.port
        # With a certificate in the state dir: its TLS listener, and only that (tlsfiles.py).
        tls = broker_tls(
            TlsFiles(self.state.root),
            mode=settings.mqtt.tls,
            host=settings.mqtt.host,
            port=settings.mqtt.tls_port,
        )
        if tls is not None:
            host, port, _ = tls
        self._link = link_factory(
            client_id=self.device_id,
            broker=BrokerAddress(
                host=host, port=port, username=broker.username, password=broker.password
            ),
            tls=tls[2] if tls is not None else None,
            on_message=self._on_message,
            on_connected=self._on_connected,
            will=Will(
                self._topics.device(self.device_id, Channel.STATUS),
                encode(StatusBody(online=False, reason="connection lost"), msg_id="will"),
            ),
            keepalive_s=settings.mqtt.keepalive_s,
            backoff=Backoff(
                settings.mqtt.backoff_base_s,
                settings.mqtt.backoff_cap_s,
                jitter=settings.mqtt.backoff_jitter,
            ),
            connect_timeout_s=settings.mqtt.connect_timeout_s,
            rng=rng,
        )
        self._load_trust()

    # -- ActiveModels, for the scoring endpoint ---------------------------------------------

    def get(self, name: str | None = None) -> ActiveModel | None:
        if name is None:
            names = self.names()
            return self._active[names[0]] if names else None
        return self._active.get(name)

    def names(self) -> list[str]:
        return sorted(self._active)

    @property
    def connected(self) -> bool:
        return self._link.connected

    @property
    def bad_versions(self) -> int:
        """Package digests marked bad on this device (failed here; not retried)."""
        return len(self._progress.bad)

    @property
    def unconfirmed_events(self) -> int:
        """Events sent but not yet acknowledged as stored by the hub."""
        return len(self._pending_events)

    @property
    def link(self) -> MqttLink:
        return self._link

    @property
    def outbox(self) -> Outbox | None:
        """The outbox, once it is open (at start when a file is there, else at first use)."""
        return self._outbox

    @property
    def collection(self) -> CollectionCounts:
        """What data collection did with the scoring calls offered to it."""
        return self._collector.counts

    # -- the scoring endpoint's observer --------------------------------------------------

    def scored(self, call: ScoringCall) -> None:
        """Count a scoring call for telemetry, and offer it to data collection."""
        model = call.model
        latency_ms = call.latency_s * 1000
        self._calls.record(model.name, model.version, latency_ms, failed=call.outputs is None)
        if call.outputs is None:
            return
        ref = self._served_ref(model)
        if ref is None or ref.collect is None:
            return
        sample = ScoredSample(
            policy=ref.collect,
            at=self._clock(),
            model=model.name,
            version=model.version,
            deployment_id=ref.deployment_id,
            correlation_id=call.correlation_id,
            latency_ms=latency_ms,
            inputs=call.data,
            outputs=call.outputs,
            size_hint=call.body_bytes,
        )
        if self._collector.offer(sample):
            self._collected.set()

    def _served_ref(self, model: ActiveModel) -> PackageRef | None:
        """The desired state's entry for exactly the package being served, if it lists it.

        Its collection policy is the deployment's; while another version is being installed,
        the one still served is no longer listed, and nothing is collected from it.
        """
        desired = self._desired
        if desired is None:
            return None
        for ref in desired.packages:
            if ref.model == model.name and ref.digest == model.digest:
                return ref
        return None

    # -- start-up ---------------------------------------------------------------------------

    def _load_trust(self) -> None:
        root = self.identity.root_public_key
        stored = self.state.load_keyring()
        if stored is not None:
            self._keyring = verify_stored_keyring(stored, root_public_b64=root)
        desired = self.state.load_desired()
        if desired is not None and self._keyring is not None:
            self._desired = verify_desired(
                desired,
                keyring=self._keyring,
                device_id=self.device_id,
                last_counter=0,
                last_fingerprint=None,
                now=None,
            ).state

    def _trust_context(self) -> TrustContext:
        if self._keyring is None:
            raise TrustError("no keyring yet", reason=Reason.UNKNOWN_KEY)
        return TrustContext(self._keyring, self.settings.device_class, __version__)

    def load_installed(self) -> None:
        """Serve what was active before the restart, without the hub."""
        completed = self._recover_interrupted_install()
        if self._keyring is None:
            return
        for model in self._store.models():
            active = self._store.load_active(model, self._trust_context())
            if active is not None:
                self._active[model] = active
                self._reported_active[model] = self._store_deployment(model)
                logger.info("serving %s v%s", model, active.version)
        if completed is not None:
            # It stopped after the switch but before saying so: the reconcile loop reports it.
            self._reported_active.pop(completed, None)

    def _recover_interrupted_install(self) -> str | None:
        """After a crash mid-install: clear what it left, and stop a crash loop.

        The pointer switch is atomic, so the model is on the old or the new version already;
        only staging and unreferenced version directories remain to remove. The attempt stays
        in the journal, so the reconcile loop retries it, until it has crashed the agent
        ``MAX_INSTALL_ATTEMPTS`` times.
        """
        attempt = self._progress.installing
        if attempt is None:
            return None
        self._store.remove_leftovers(attempt.ref.model)
        pointer = self._store.pointer(attempt.ref.model)
        if pointer is not None and pointer.digest == attempt.ref.digest:
            # It stopped after the switch: the install is complete.
            self._progress.installing = None
            self.state.save_progress(self._progress)
            return attempt.ref.model
        logger.warning(
            "the agent stopped while installing %s v%s (attempt %d)",
            attempt.ref.model,
            attempt.ref.version,
            attempt.attempts,
        )
        if attempt.attempts >= MAX_INSTALL_ATTEMPTS:
            self._progress.installing = None
            self._fail(
                attempt.ref,
                InstallError(
                    f"installing it stopped the agent {attempt.attempts} times in a row",
                    reason=Reason.CRASH_LOOP,
                ),
            )
        return None

    def _journal_install(self, ref: PackageRef) -> None:
        """Write down that an install starts, before it changes anything on the device."""
        previous = self._progress.installing
        attempts = previous.attempts + 1 if previous and previous.ref.digest == ref.digest else 1
        self._progress.installing = InstallAttempt(ref=ref, attempts=attempts)
        self.state.save_progress(self._progress)

    def _store_deployment(self, model: str) -> str | None:
        pointer = self._store.pointer(model)
        return pointer.deployment_id if pointer else None

    # -- running ------------------------------------------------------------------------------

    async def run(self, stop: asyncio.Event) -> None:
        """Connect, reconcile and report until ``stop`` is set."""
        # Every task started from here inherits it: this agent's log entries go to its book.
        logbook_token = current_logbook.set(self.logbook)
        try:
            await self._run(stop)
        finally:
            current_logbook.reset(logbook_token)

    async def _run(self, stop: asyncio.Event) -> None:
        self.load_installed()
        if self._desired is not None:
            self._wake.set()
        self._meter.start()
        if (self.state.root / OUTBOX_FILE).exists():
            await self._ensure_outbox()  # records from before the restart go out first
        name = self.device_id
        tasks = [
            asyncio.create_task(self._link.run(), name=f"{name}-mqtt"),
            asyncio.create_task(self._reconcile_loop(), name=f"{name}-reconcile"),
            asyncio.create_task(self._resend_loop(), name=f"{name}-resend"),
            asyncio.create_task(self._heartbeat_loop(), name=f"{name}-heartbeat"),
            asyncio.create_task(self._collect_loop(), name=f"{name}-collect"),
            *(asyncio.create_task(self._send_loop(s), name=f"{name}-send-{s}") for s in STREAMS),
        ]
        if self.settings.telemetry.enabled:
            tasks.append(asyncio.create_task(self._telemetry_loop(), name=f"{name}-telemetry"))
        stopper = asyncio.create_task(stop.wait(), name=f"{name}-stop")
        try:
            done, _ = await asyncio.wait([stopper, *tasks], return_when=asyncio.FIRST_COMPLETED)
            for task in done:
                if task is not stopper:
                    task.result()  # a crashed loop is a bug: surface it
        finally:
            if self._link.connected:
                self._publish(
                    Channel.STATUS, encode(StatusBody(online=False, reason="shutdown")), retain=True
                )
            running = [stopper, *tasks, *self._command_tasks]
            for task in running:
                task.cancel()
            await asyncio.gather(*running, return_exceptions=True)
            await self._close_runtimes()
            await self._close_outbox(flush=stop.is_set())

    def _on_connected(self) -> None:
        topics = [
            (self._topics.device(self.device_id, Channel.DESIRED), 1),
            (self._topics.device(self.device_id, Channel.ACK), 1),
            (self._topics.device(self.device_id, Channel.CMD), 1),
        ]
        topics += [(self._topics.package_wildcard(d), 1) for d in self._downloads]
        self._link.subscribe(topics)
        self._publish(Channel.STATUS, encode(StatusBody(online=True)), retain=True)
        self._publish_state()
        self._publish(
            Channel.REQ,
            encode(DesiredRequestBody(have_counter=self._progress.desired_counter)),
        )
        for payload in list(self._pending_events.values()):
            self._publish(Channel.EVT, payload)
        for download in self._downloads.values():
            download.new_chunk.set()
        for sender in self._senders.values():
            # What was in flight may have been lost with the connection: send it again now.
            sender.in_flight = None
            sender.wake.set()

    async def _heartbeat_loop(self) -> None:
        started = time.monotonic()
        # Devices that started together should not beat together: the first beat is offset.
        await asyncio.sleep(self._rng.uniform(0, self.settings.mqtt.heartbeat_s))
        while True:
            self.send_heartbeat(uptime_s=time.monotonic() - started)
            await asyncio.sleep(self.settings.mqtt.heartbeat_s)

    def send_heartbeat(self, *, uptime_s: float) -> bool:
        """One ``online`` status with the uptime; False when not connected."""
        body = StatusBody(online=True, uptime_s=round(uptime_s, 1))
        sent = self._publish(Channel.STATUS, encode(body), retain=True)
        self.heartbeats_sent += sent
        return sent

    async def _resend_loop(self) -> None:
        while True:
            await asyncio.sleep(self.settings.event_resend_s)
            if self._link.connected:
                for payload in list(self._pending_events.values()):
                    self._publish(Channel.EVT, payload)

    # -- telemetry, data collection and the outbox -----------------------------------------

    async def _telemetry_loop(self) -> None:
        interval_s = self.settings.telemetry.interval_s
        # Devices that started together should not report together: the first interval is
        # shortened by a random part (each record says how long its interval was).
        due = time.monotonic() + self._rng.uniform(0.5, 1.0) * interval_s
        while True:
            await asyncio.sleep(max(0.0, due - time.monotonic()))
            await self.record_telemetry()
            due = max(due + interval_s, time.monotonic())

    async def record_telemetry(self) -> None:
        """End the current telemetry interval: its record goes into the outbox."""
        figures = self.outbox_figures()
        fields = self._meter.take(
            at=self._clock(),
            health=self.health(),
            connects=self._link.connects,
            outbox_backlog=figures.backlog,
            outbox_dropped=figures.dropped,
            disk_free_bytes=self._disk_free_or_none(),
            active=[(m.name, m.version) for m in self._active.values()],
            workers=self._workers(),
        )
        try:
            record = stored(TelemetryRecord, fields)
        except ValueError:
            # A figure out of the contract's range is a bug, but not one to stop a device for.
            logger.exception("telemetry record refused by its own schema, skipped")
            return
        await self._keep("tm", [record])

    def outbox_figures(self) -> OutboxFigures:
        """Records numbered, waiting for the hub's ack, and lost since install, all streams;
        after the agent stopped, as they were when its outbox closed."""
        inside = self._outbox_figures()
        return OutboxFigures(inside.made, inside.backlog, inside.dropped + self.records_lost)

    def _outbox_figures(self) -> OutboxFigures:
        outbox = self._outbox
        if outbox is None:
            return self._outbox_at_close
        return OutboxFigures(
            made=sum(outbox.last_seq(s) for s in STREAMS),
            backlog=sum(outbox.backlog(s) for s in STREAMS),
            dropped=sum(outbox.dropped(s) for s in STREAMS),
        )

    def health(self) -> Health:
        """Degraded while a package the desired state lists has failed here for its deployment
        (the device does not run what it was told to), or while an entry script's worker is in
        a crash loop (its model refuses every call)."""
        if any(w.state is WorkerState.CRASH_LOOP for w in self._workers().values()):
            return "degraded"
        desired = self._desired
        if desired is None:
            return "ok"
        for ref in desired.packages:
            bad = self._progress.bad.get(ref.digest)
            if bad is not None and bad.deployment_id == ref.deployment_id:
                return "degraded"
        return "ok"

    def _workers(self) -> dict[tuple[str, int], WorkerStats]:
        """The entry-script models' workers, by model name and version."""
        return {
            (m.name, m.version): m.runtime.stats()
            for m in self._active.values()
            if isinstance(m.runtime, ScriptRuntime)
        }

    def _disk_free_or_none(self) -> int | None:
        try:
            return self._disk_free(self.state.root)
        except OSError:
            return None

    async def _collect_loop(self) -> None:
        while True:
            await self._collected.wait()
            # Sampled calls gather for a moment, so a burst costs one commit (one fsync).
            await asyncio.sleep(self.settings.collection.flush_s)
            self._collected.clear()
            await self.flush_collected()

    async def flush_collected(self) -> None:
        """Move the sampled calls waiting in memory into the outbox."""
        if not self._collector.pending:
            return
        # Opened before the draw: the day's byte budget is restored from it on opening.
        await self._ensure_outbox()
        records, note = self._collector.drain()
        await self._keep("dc", records, note=note)

    async def _keep(
        self, stream: Stream, records: list[bytes], *, note: tuple[str, str] | None = None
    ) -> None:
        """Append to the outbox off the event loop (a commit waits for the disk)."""
        if not records:
            return
        outbox = await self._ensure_outbox()
        if outbox is not None:
            try:
                if await asyncio.to_thread(outbox.append, stream, records, note=note):
                    self._senders[stream].wake.set()
                return  # stored, or dropped and counted by the outbox
            except OutboxError as exc:
                logger.error("outbox lost: %s", exc)
                self._outbox = None
        self.records_lost += len(records)

    async def _ensure_outbox(self) -> Outbox | None:
        """The outbox, opened on first use; None while it cannot be (tried again next use)."""
        async with self._outbox_opening:
            if self._outbox is None:
                limits = OutboxLimits(
                    max_records=self.settings.outbox.max_records,
                    max_bytes=self.settings.outbox.max_bytes,
                )
                try:
                    outbox = await asyncio.to_thread(Outbox, self.state.root / OUTBOX_FILE, limits)
                except OutboxError as exc:
                    logger.error("no outbox, records are dropped and counted: %s", exc)
                    return None
                self._collector.restore(await asyncio.to_thread(outbox.note, BUDGET_NOTE))
                self._outbox = outbox
                for sender in self._senders.values():
                    sender.wake.set()
        return self._outbox

    async def _close_outbox(self, *, flush: bool) -> None:
        if flush:
            # A clean stop keeps the sampled calls still in memory; a crash loses them.
            await self.flush_collected()
        if self._outbox is not None:
            self._outbox_at_close = self._outbox_figures()
        outbox, self._outbox = self._outbox, None
        if outbox is not None:
            await asyncio.to_thread(outbox.close)

    async def _send_loop(self, stream: Stream) -> None:
        sender = self._senders[stream]
        resend_s = self.settings.telemetry.resend_s
        while True:
            timeout = None
            if sender.in_flight is not None:
                timeout = max(0.0, sender.sent_at + resend_s - time.monotonic())
            if not await wait_set(sender.wake, timeout):
                sender.in_flight = None  # no ack in time: the oldest records go again
            sender.wake.clear()
            await self._send_batch(stream, sender)

    async def _send_batch(self, stream: Stream, sender: Sender) -> None:
        outbox = self._outbox
        if outbox is None:
            return
        try:
            if sender.acked > sender.deleted:
                up_to = sender.acked
                await asyncio.to_thread(outbox.ack, stream, up_to)
                sender.deleted = up_to
            if sender.in_flight is not None or not self._link.connected:
                return
            built = await asyncio.to_thread(self._build_batch, outbox, stream)
        except OutboxError as exc:
            logger.error("outbox lost: %s", exc)
            self._outbox = None
            return
        if built is None:
            return
        last_seq, payload = built
        if sender.acked >= last_seq or sender.in_flight is not None:
            sender.wake.set()  # an ack overtook the batch while it was built: build anew
            return
        channel = Channel.TM if stream == "tm" else Channel.DC
        if self._publish(channel, payload):
            sender.in_flight = last_seq
            sender.sent_at = time.monotonic()

    def _build_batch(self, outbox: Outbox, stream: Stream) -> tuple[int, bytes] | None:
        """The next message of ``stream`` and its last seq; runs in a worker thread."""
        max_bytes = self.settings.telemetry.max_message_bytes - ENVELOPE_BYTES
        while True:
            batch = outbox.batch(
                stream,
                max_records=MAX_BATCH_RECORDS,
                max_bytes=max_bytes,
                record_overhead=RECORD_SEQ_BYTES,
            )
            if batch is None:
                return None
            records: list[Any] = []
            for record in batch.records:
                try:
                    if stream == "tm":
                        records.append(restored(TelemetryRecord, record))
                    else:
                        records.append(restored(CollectedRecord, record))
                except ValueError as exc:
                    if records:
                        break  # sent up to it; once those are acked it is the oldest
                    # It can never be sent (written by another agent version?): it must not
                    # hold the stream back for ever.
                    logger.error("dropping an outbox record that cannot be sent: %s", exc)
                    if not outbox.discard(stream, record.seq):
                        return None  # could not even do that: try again at the next wake
                    break
            if not records:
                continue
            body: TelemetryBody | DataBody
            if stream == "tm":
                body = TelemetryBody(first_kept=batch.first_kept, records=records)
            else:
                body = DataBody(first_kept=batch.first_kept, records=records)
            return records[-1].seq, encode(body)

    # -- incoming messages --------------------------------------------------------------------

    def _on_message(self, topic: str, payload: bytes) -> None:
        try:
            if topic.startswith(f"{self._topics.root}/pkg/"):
                self._on_chunk(topic, payload)
                return
            channel = self._topics.parse_device(topic)
            if channel.device_id != self.device_id:
                raise TopicError(f"message for another device on {topic}")
            envelope = decode(payload)
        except (MessageError, TopicError) as exc:
            self.malformed_received += 1
            logger.warning("dropping malformed message on %s: %s", topic, exc)
            return
        body = envelope.body
        if channel.channel is Channel.DESIRED and isinstance(body, DesiredBody):
            self._on_desired(body)
        elif channel.channel is Channel.ACK and isinstance(body, AckBody):
            self._on_ack(body)
        elif channel.channel is Channel.CMD and isinstance(body, CommandBody):
            self._on_command(body)
        else:
            self.malformed_received += 1
            logger.warning("dropping %s message on %s", body.kind, topic)

    def _check_keyring(self, signed: Signed, earlier: list[Signed], now: datetime) -> Keyring:
        """The keyring a desired state or command came with: the one kept, or a newer one
        reached one version at a time through ``earlier`` (each signed by the current and the
        new root keys: ``verify_keyring_update``). ``now`` is the update's one start time, the
        same instant the document it came with is judged by."""
        return verify_keyring_update(
            signed,
            earlier,
            root_public_b64=self.identity.root_public_key,
            current=self._keyring,
            now=now,
        )

    def _adopt_keyring(self, signed: Signed, keyring: Keyring) -> None:
        """Keep a new keyring only once the document it came with verified under it too; a
        refused one never reaches the disk, so the kept file stays byte-identical."""
        if keyring != self._keyring:
            self.state.save_keyring(signed)
            previous = self._keyring
            self._keyring = keyring
            logger.info(
                "adopted keyring version %s (was %s)",
                keyring.version,
                previous.version if previous is not None else None,
            )

    def _on_desired(self, body: DesiredBody) -> None:
        now = self._clock()
        try:
            keyring = self._check_keyring(body.keyring, body.keyrings, now)
            verified = verify_desired(
                body.desired,
                keyring=keyring,
                device_id=self.device_id,
                last_counter=self._progress.desired_counter,
                last_fingerprint=self._progress.desired_fingerprint,
                now=now,
            )
        except AgentError as exc:
            self._reject(exc)
            return
        self._adopt_keyring(body.keyring, keyring)
        if verified.verdict is DesiredVerdict.NEW:
            self.state.save_desired(body.desired)
            self._progress.desired_counter = verified.state.counter
            self._progress.desired_fingerprint = verified.fingerprint
            self.state.save_progress(self._progress)
            self._desired = verified.state
        self._wake.set()

    def _on_command(self, body: CommandBody) -> None:
        now = self._clock()
        try:
            keyring = self._check_keyring(body.keyring, body.keyrings, now)
            command = verify_command(
                body.command,
                keyring=keyring,
                device_id=self.device_id,
                last_seq=self._progress.command_seq,
                now=now,
            )
        except AgentError as exc:
            self._refuse_command(body.command, exc)
            return
        self._adopt_keyring(body.keyring, keyring)
        # Taken before it runs: a crash mid-command must not let the same command run again.
        self._progress.command_seq = command.seq
        self.state.save_progress(self._progress)
        logger.info("running command %s (%s)", command.action, command.command_id)
        task = asyncio.get_running_loop().create_task(self._answer(command))
        self._command_tasks.add(task)
        task.add_done_callback(self._command_tasks.discard)

    async def _answer(self, command: Command) -> None:
        result = await self._commands.run(command)
        if not result.ok:
            self.commands_refused[str(result.reason)] += 1
        self._publish(Channel.REQ, encode(result))

    def _refuse_command(self, signed: Signed, exc: AgentError) -> None:
        self.commands_refused[str(exc.reason)] += 1
        logger.warning("refused command: %s", exc)
        answer = refused(signed, exc)
        if answer is not None:
            self._publish(Channel.REQ, encode(answer))

    def _reject(self, exc: AgentError) -> None:
        self.last_rejection = str(exc)
        self.rejections[str(exc.reason)] += 1
        logger.warning("rejected desired state: %s", exc)
        self._publish_state()

    def _on_ack(self, body: AckBody) -> None:
        if body.stream == "evt":
            for seq in [s for s in self._pending_events if s <= body.seq]:
                del self._pending_events[seq]
            return
        sender = self._senders[body.stream]
        sender.acked = max(sender.acked, body.seq)
        if sender.in_flight is not None and body.seq >= sender.in_flight:
            sender.in_flight = None  # stored: the next batch may go
        sender.wake.set()  # the send loop deletes what the ack covers, off the event loop

    def _on_chunk(self, topic: str, payload: bytes) -> None:
        chunk = self._topics.parse_chunk(topic)
        download = self._downloads.get(chunk.digest)
        if download is None:
            return
        download.activity.set()
        try:
            if download.assembler.add(chunk.index, payload):
                download.new_chunk.set()
        except AgentError as exc:
            # The download task raises it: it owns the event reporting and the cleanup.
            download.assembler.failure = exc
            download.new_chunk.set()

    # -- reconciling ----------------------------------------------------------------------------

    async def _reconcile_loop(self) -> None:
        while True:
            await self._wake.wait()
            self._wake.clear()
            desired = self._desired
            if desired is None:
                continue  # nothing verified yet: no reason to change what the device runs
            await self._uninstall_unlisted(desired)
            for ref in desired.packages:
                if self._desired is not desired:
                    break  # a newer desired state arrived: start over from it
                await self._reconcile_one(ref)
            else:
                if self._state_counter != self._progress.desired_counter:
                    # Say what the device runs once it has acted on a new desired state, even
                    # when nothing changed: the hub learns that a cancelled install of a model
                    # new to the device left nothing behind.
                    self._publish_state()

    async def _reconcile_one(self, ref: PackageRef) -> None:
        active = self._active.get(ref.model)
        if active is not None and active.digest == ref.digest:
            if self._reported_active.get(ref.model) != ref.deployment_id:
                # Already running this exact package: the new deployment is done at once.
                self._report(ref, Step.ACTIVE, detail="already active")
                self._reported_active[ref.model] = ref.deployment_id
            return
        bad = self._progress.bad.get(ref.digest)
        if bad is not None and bad.deployment_id == ref.deployment_id:
            return  # failed here for this deployment; only a new deployment retries it
        model = await self._switch_back(ref)
        if model is None:
            model = await self._download_and_install(ref)
        if model is not None:
            self._activate(ref, model)

    async def _download_and_install(self, ref: PackageRef) -> ActiveModel | None:
        """Fetch and install ``ref``; None when it failed (reported) or is no longer wanted."""
        try:
            archive = await self._download(ref)
            if archive is None:
                return None
            self._failpoints.hit(Failpoint.AFTER_DOWNLOAD)
            self._report(ref, Step.DOWNLOADED, progress=1.0)
            self._journal_install(ref)
            model = await asyncio.to_thread(
                self._store.install, archive, ref, self._trust_context(), self._reporter(ref)
            )
        except FailpointCrash:
            raise  # a simulated kill stops this agent where it stands
        except (RejectedError, InstallError) as exc:
            self._fail(ref, exc)
            return None
        except Exception as exc:
            if isinstance(exc, OSError) and exc.errno == errno.ENOSPC:
                self._fail(ref, NoSpaceError(f"disk full while installing: {exc}"))
                return None
            logger.exception("unexpected error installing %s v%s", ref.model, ref.version)
            self._fail(ref, AgentError(f"{type(exc).__name__}: {exc}"))
            return None
        archive.unlink(missing_ok=True)
        return model

    async def _switch_back(self, ref: PackageRef) -> ActiveModel | None:
        """Roll back to the kept previous version from disk when ``ref`` names it; None when
        it is not kept or did not re-verify, load or pass its health check.

        A failure here is not reported as one: the hub serves the old package too, so the
        normal download path gets the say, and its own failure is the one reported.
        """
        if not self._store.kept_previous(ref):
            return None
        before = self._progress.installing
        # Journaled like an install, so a crash at the switch still ends in ACTIVE being
        # reported after the restart, and a rollback that keeps crashing the agent is given up.
        self._journal_install(ref)
        try:
            return await asyncio.to_thread(
                self._store.switch_back, ref, self._trust_context(), self._reporter(ref)
            )
        except FailpointCrash:
            raise  # a simulated kill stops this agent where it stands
        except Exception as exc:
            logger.warning(
                "cannot switch back to the kept %s v%s, downloading it again: %s",
                ref.model,
                ref.version,
                exc,
            )
            # It ended without a crash and without touching the pointer: not an attempt that
            # the crash-loop counter should see.
            self._progress.installing = before
            self.state.save_progress(self._progress)
            return None

    def _reporter(self, ref: PackageRef) -> StepReporter:
        """A step reporter the installer can call from its worker thread."""
        loop = asyncio.get_running_loop()

        def report_from_thread(step: Step) -> None:
            loop.call_soon_threadsafe(self._report, ref, step)

        return report_from_thread

    def _activate(self, ref: PackageRef, model: ActiveModel) -> None:
        """Serve ``model``, installed or switched back to, and say so."""
        # New requests get the new runtime from here on; the old one is closed in a thread,
        # which lets a call already holding it finish first (an entry script's worker process
        # would otherwise be left running).
        replaced = self._active.get(ref.model)
        self._active[ref.model] = model
        if replaced is not None and replaced.runtime is not model.runtime:
            self._retire(replaced)
        self._reported_active[ref.model] = ref.deployment_id
        self._progress.bad.pop(ref.digest, None)
        self._progress.installing = None
        self.state.save_progress(self._progress)
        self._report(ref, Step.ACTIVE)
        self._publish_state()
        logger.info("now serving %s v%s", ref.model, ref.version)

    async def _uninstall_unlisted(self, desired: DesiredState) -> None:
        """Remove every model the verified desired state no longer lists, and say so.

        What gets removed is named by this device (what it serves, what is on its disk), never
        by the document, which only lists what to keep: a model name in it cannot point a
        removal anywhere. Directories without a pointer count too, so a crash mid-uninstall
        (pointer gone, directories not yet) is finished here after the restart.
        """
        wanted = {ref.model for ref in desired.packages}
        unlisted = sorted((set(self._active) | set(self._store.on_disk())) - wanted)
        removed = False
        for model in unlisted:
            if self._desired is not desired:
                break  # a newer desired state may list it again: start over from that one
            await self._uninstall(model)
            removed = True
        if removed:
            self._publish_state()

    def _retire(self, model: ActiveModel) -> None:
        """Close a runtime that no longer serves, off the event loop."""
        task = asyncio.get_running_loop().create_task(
            asyncio.to_thread(model.runtime.close), name=f"close-{model.name}-v{model.version}"
        )
        self._closing.add(task)
        task.add_done_callback(self._closed_runtime)

    def _closed_runtime(self, task: "asyncio.Task[None]") -> None:
        self._closing.discard(task)
        if not task.cancelled() and task.exception() is not None:
            logger.error("closing %s failed: %s", task.get_name(), task.exception())

    async def _close_runtimes(self) -> None:
        """At stop: close every runtime, so no entry script's worker outlives the agent."""
        for model in self._active.values():
            self._retire(model)
        await asyncio.gather(*self._closing, return_exceptions=True)

    async def _uninstall(self, model: str) -> None:
        served = self._active.pop(model, None)
        self._reported_active.pop(model, None)
        if served is not None:
            # Before its files go: a script's worker runs in that folder.
            try:
                await asyncio.to_thread(served.runtime.close)
            except Exception:
                logger.exception("closing the runtime of %s failed", model)
        attempt = self._progress.installing
        if attempt is not None and attempt.ref.model == model:
            # An interrupted install of a model no longer wanted is not to be retried or
            # counted towards a crash loop after the next restart.
            self._progress.installing = None
            self.state.save_progress(self._progress)
        try:
            await asyncio.to_thread(self._store.uninstall, model)
        except OSError:
            # It is not served any more; what stayed on disk is removed on the next reconcile.
            logger.exception("could not remove the files of %s", model)
            return
        logger.info(
            "uninstalled %s: the desired state no longer lists it",
            model,
            extra={"m": model, "version": served.version if served else None},
        )

    def _check_space(self, ref: PackageRef, assembler: ChunkAssembler) -> None:
        """Refuse before the first byte when the archive and its unpacked copy cannot fit.

        A download that fills the disk half-way would leave a partial file that makes every
        retry fail too (THREATS.md C3); asking first costs one statvfs. What is already
        downloaded (a resumed part file, a finished archive) is already on the disk.
        """
        need = 2 * ref.size + SPACE_MARGIN_BYTES - assembler.bytes_on_disk
        free = self._disk_free(self.state.root)
        if free < need:
            raise NoSpaceError(
                f"{ref.model} v{ref.version} needs {need / MIB:.1f} MiB free,"
                f" the disk has {free / MIB:.1f} MiB"
            )

    def _fail(self, ref: PackageRef, exc: AgentError) -> None:
        logger.warning("package %s v%s failed: %s", ref.model, ref.version, exc)
        if isinstance(exc, RejectedError):
            # Bytes that failed verification are never kept for another try.
            for path in (
                self.state.downloads / f"{ref.digest}.part",
                self.state.downloads / f"{ref.digest}.tar",
            ):
                path.unlink(missing_ok=True)
        self._progress.bad[ref.digest] = BadVersion(
            deployment_id=ref.deployment_id, reason=str(exc.reason)
        )
        if self._progress.installing and self._progress.installing.ref.digest == ref.digest:
            self._progress.installing = None
        self.state.save_progress(self._progress)
        self._report(ref, Step.FAILED, reason=exc.reason, detail=exc.detail[:500])
        self._publish_state()

    async def _download(self, ref: PackageRef) -> Path | None:
        """Fetch the package's chunks over MQTT; None when the target changed meanwhile."""
        assembler = ChunkAssembler(
            ref, self.state.downloads, max_package_bytes=self.settings.download.max_package_bytes
        )
        self._check_space(ref, assembler)
        if not assembler.done:
            self._report(ref, Step.DOWNLOADING, progress=assembler.progress)
            download = self._downloads[ref.digest] = Download(assembler)
            wildcard = self._topics.package_wildcard(ref.digest)
            self._link.subscribe([(wildcard, 1)])
            try:
                if not await self._fetch_chunks(ref, download):
                    return None
            finally:
                self.corrupt_chunks_received += assembler.corrupt_chunks
                self._link.unsubscribe(wildcard)
                del self._downloads[ref.digest]
        return await asyncio.to_thread(assembler.finish)

    async def _fetch_chunks(self, ref: PackageRef, download: Download) -> bool:
        assembler, wakeup = download.assembler, download.new_chunk
        base_timeout = self.settings.download.chunk_timeout_s
        timeout = base_timeout
        next_report = 0.25
        while not assembler.done:
            await self._listen(assembler, download.activity)
            if assembler.failure is not None:
                raise assembler.failure
            if assembler.done:
                break
            if not self._still_wanted(ref):
                return False
            window = assembler.missing()[: self.settings.download.window_chunks]
            self._publish(Channel.REQ, encode(ChunkRequestBody(digest=ref.digest, chunks=window)))
            while any(assembler.lacks(i) for i in window):
                wakeup.clear()
                if not await wait_set(wakeup, timeout):
                    # Chunks lost (broker queue limits, a dropped link): ask again, slower.
                    timeout = min(timeout * 2, MAX_CHUNK_TIMEOUT_S)
                    break
                if not self._link.connected or assembler.failure is not None:
                    break
            else:
                timeout = base_timeout
            if assembler.progress >= next_report and not assembler.done:
                self._report(ref, Step.DOWNLOADING, progress=round(assembler.progress, 3))
                next_report = assembler.progress + 0.25
        return True

    async def _listen(self, assembler: ChunkAssembler, activity: asyncio.Event) -> None:
        """Wait while chunks of the package keep arriving; return after a random quiet period.

        Every device downloading a package is subscribed to its chunks, so the chunks another
        device asked for arrive here too. Asking only after a quiet period, of a random length
        so that a fleet does not ask all at once, suppresses the duplicate requests that would
        make the hub publish, and the broker fan out to every device, the same chunk again
        (the NACK suppression of reliable multicast, as in SRM). Copies of chunks this device
        already holds count as arrivals too: while the broker is still draining its queues,
        what is missing here may be on its way.
        """
        listen_s = self.settings.download.listen_s
        if listen_s <= 0:
            return
        while not assembler.done and assembler.failure is None:
            activity.clear()
            if not await wait_set(activity, self._rng.uniform(listen_s, 2 * listen_s)):
                return

    def _still_wanted(self, ref: PackageRef) -> bool:
        return self._desired is not None and ref in self._desired.packages

    # -- outgoing -------------------------------------------------------------------------------

    def _publish(self, channel: Channel, payload: bytes, *, retain: bool = False) -> bool:
        return self._link.publish(
            self._topics.device(self.device_id, channel), payload, qos=1, retain=retain
        )

    def _report(
        self,
        ref: PackageRef,
        step: Step,
        *,
        reason: Reason | None = None,
        detail: str = "",
        progress: float | None = None,
    ) -> None:
        self._progress.evt_seq += 1
        seq = self._progress.evt_seq
        # The sequence number is on disk before the event leaves, so a restart never reuses one
        # and the hub's (device_id, seq) de-duplication stays sound.
        self.state.save_progress(self._progress)
        event = EventBody(
            seq=seq,
            deployment_id=ref.deployment_id,
            model=ref.model,
            version=ref.version,
            digest=ref.digest,
            step=step,
            reason=reason,
            detail=detail,
            progress=progress,
        )
        payload = encode(event)
        if self._on_event is not None:
            self._on_event(event)
        self._pending_events[seq] = payload
        if len(self._pending_events) > MAX_PENDING_EVENTS:
            del self._pending_events[min(self._pending_events)]
            self.events_dropped += 1
            logger.error("event backlog full, dropped the oldest unacknowledged event")
        self._publish(Channel.EVT, payload)

    def _publish_state(self) -> None:
        self._progress.state_seq += 1
        self.state.save_progress(self._progress)
        body = StateBody(
            seq=self._progress.state_seq,
            agent_version=__version__,
            device_class=self.settings.device_class,
            desired_counter=self._progress.desired_counter,
            active=[
                ModelStatus(
                    model=m.name,
                    version=m.version,
                    digest=m.digest,
                    deployment_id=self._reported_active.get(m.name),
                )
                for m in self._active.values()
            ],
            bad=sorted(self._progress.bad),
            runtimes=self._runtimes,
            last_rejection=self.last_rejection,
        )
        self._state_counter = self._progress.desired_counter
        self._publish(Channel.STATE, encode(body), retain=True)
