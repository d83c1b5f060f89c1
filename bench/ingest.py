"""Ingest: telemetry stored durably by the hub with zero loss, against a bare subscriber
receiving the same stream; and what data collection costs ``/score``.

    python -m bench.ingest [--devices 100] [--messages 50000] [--batched-messages 3000]
                           [--records-per-message 100] [--database-url URL]

- project: a real hub (``outpost-hub serve``: SQLite in its data dir, or a fresh schema of
  ``--database-url``, its embedded Mosquitto) in a child process, N devices enrolled through its
  bulk endpoint. One paho client per device (``bench.ingest_load``) publishes its telemetry
  messages (the wire format, seqs 1..K, QoS 1) on ``outpost/d/{id}/tm``; timed from the first
  publish until the hub's ack of every device's last seq has arrived. The hub acks only after
  the commit, so that is "stored durably"; then the rows are counted in ``telemetry_point``:
  every (device, seq) exactly once.
- floor: the same publishers, payloads and broker, before the hub's pass, to one bare paho
  subscriber in a process of its own (as the hub is), timed from the first publish until it
  has received every message. They publish on ``outpost/f/{id}/tm`` (same length, same
  payloads) with the hub's broker account, a topic the hub does not subscribe to: on the
  devices' own topics the hub would take the floor's stream too.
- Twice: one record per message, then ``--records-per-message`` per message (records/s), the
  devices' seqs going on from where the first pass ended.
- ``/score`` (``bench.ingest_score``): a real agent with collection off and on, p50 and p99.
"""

import argparse
import asyncio
import logging
import re
import secrets
import shutil
import sys
import tempfile
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

from sqlalchemy import func, text
from sqlmodel import Session, col, select

from agent.protocol.topics import Channel, Topics
from agent.state import StateDir
from agent.telemetry import percentile
from bench.bare import Account
from bench.hub import HubProcess
from bench.ingest_load import (
    AGENT_RESEND_S,
    FloorConfig,
    FloorReceived,
    FloorSubscriber,
    Load,
    Published,
    device_accounts,
    publish_stream,
    telemetry_load,
)
from bench.ingest_score import ScoreConfig, ScoreMeasured, measure_score
from bench.machine import Machine, cpu_seconds, raise_fd_limit
from bench.options import finish
from bench.results import RESULTS_PATH, Figure, Report
from bench.rollout import enroll
from bench.testbed import quiet_agents, scratch_parent
from hub.broker import DEFAULT_HUB_USERNAME
from hub.database import make_engine
from hub.telemetry.models import DeadLetter, TelemetryPoint
from outpost_sim.fleet import device_dirs

logger = logging.getLogger(__name__)

MICRO = 1e6
# A topic level beside the devices' ``d``: the floor's stream must not reach the hub.
FLOOR_LEVEL = "f"
_MESSAGE_COUNTER = re.compile(r'^outpost_device_messages_total\{result="(\w+)"\} ([0-9.e+]+)$')


@dataclass(frozen=True)
class IngestConfig:
    devices: int
    messages: int  # the first pass's total, one record each
    batched_messages: int  # the second pass's total
    records_per_message: int  # in the second pass
    window: int  # messages per device published and not yet acknowledged by the hub
    mqtt_inflight: int  # messages per device published and not yet acknowledged by the broker
    resend_s: float
    connect_timeout_s: float
    pass_timeout_s: float
    database_url: str | None  # also run the passes on a hub with this PostgreSQL database
    score: ScoreConfig | None
    work_dir: Path


@dataclass(frozen=True)
class Stored:
    """What the hub's database holds of one pass's records."""

    expected: int
    stored: int  # rows with a seq of the pass (one per (device, seq): the primary key)
    devices_complete: int  # devices holding every seq of the pass
    beyond: int  # rows past the pass's last seq (there must be none)
    dead_letters: int


@dataclass(frozen=True)
class PassMeasured:
    messages: int
    records: int
    payload_bytes: int
    hub: Published
    hub_cpu_s: float
    hub_mosquitto_cpu_s: float
    floor: Published
    floor_received: FloorReceived
    floor_mosquitto_cpu_s: float
    stored: Stored
    # The hub's message counters over its pass (handled, overflow, ...); None when its
    # /metrics did not answer.
    hub_counts: dict[str, int] | None

    @property
    def hub_s(self) -> float:
        assert self.hub.acked_at is not None
        return self.hub.acked_at - self.hub.started_at

    @property
    def floor_s(self) -> float:
        return self.floor_received.last_at - self.floor.started_at

    @property
    def lost(self) -> int:
        """Records of the pass not in the database, and rows past its end (each (device, seq)
        can only be there once: it is the primary key)."""
        s = self.stored
        return s.expected - s.stored + s.beyond


@dataclass(frozen=True)
class HubMeasured:
    database: str  # "SQLite" or "PostgreSQL"
    single: PassMeasured
    batched: PassMeasured
    score: ScoreMeasured | None


class _Fleet:
    """The enrolled devices, their topics and accounts, on one hub."""

    def __init__(self, hub: HubProcess, state_dirs: list[Path]) -> None:
        identity = StateDir(state_dirs[0]).load_identity()
        self.hub = hub
        self.host = identity.broker.host
        self.port = identity.broker.port
        self.topics = Topics(identity.topic_root)
        self.accounts = device_accounts(state_dirs)
        self.device_ids = [a.username for a in self.accounts]
        self.next_seq = 1  # every device's next seq: the passes never start a stream again

    def hub_account(self, client_id: str) -> Account:
        return Account(client_id, DEFAULT_HUB_USERNAME, self.hub.broker_password)

    def floor_topic(self, device_id: str) -> str:
        return f"{self.topics.root}/{FLOOR_LEVEL}/{device_id}/tm"


def _message_counts(hub: HubProcess) -> dict[str, int] | None:
    """The hub's ``outpost_device_messages`` counters (handled, overflow, failed, ...), or None
    when ``/metrics`` fails: a drop at the hub's queue also shows as a resend, so the bench
    goes on without them."""
    with hub.api() as client:
        response = client.get("/metrics")
    if response.status_code != 200:
        logger.warning("GET /metrics answered %s; see the hub's log", response.status_code)
        return None
    counts = {}
    for line in response.text.splitlines():
        if match := _MESSAGE_COUNTER.match(line):
            counts[match[1]] = int(float(match[2]))
    return counts


def check_stored(database_url: str, device_ids: Sequence[str], first: int, last: int) -> Stored:
    """Count the pass's rows per device: seqs ``first..last`` each once, nothing past ``last``.
    The primary key (device_id, seq) rules out a second copy; a count short of the range is
    a loss."""
    engine = make_engine(database_url)
    try:
        with Session(engine) as session:
            seq = col(TelemetryPoint.seq)
            per_device = dict(
                session.exec(
                    select(col(TelemetryPoint.device_id), func.count())
                    .where(seq >= first, seq <= last)
                    .group_by(col(TelemetryPoint.device_id))
                ).all()
            )
            beyond = session.exec(select(func.count()).where(seq > last)).one()
            dead = session.exec(select(func.count()).select_from(DeadLetter)).one()
    finally:
        engine.dispose()
    span = last - first + 1
    return Stored(
        expected=span * len(device_ids),
        stored=sum(int(per_device.get(d, 0)) for d in device_ids),
        devices_complete=sum(1 for d in device_ids if per_device.get(d) == span),
        beyond=int(beyond),
        dead_letters=int(dead),
    )


Loads = dict[tuple[int, int, int, int], Load]  # (devices, per device, records each, first seq)


def run_pass(
    cfg: IngestConfig,
    fleet: _Fleet,
    loads: Loads,
    *,
    database_url: str,
    rpm: int,
    messages: int,
) -> PassMeasured:
    """The floor's pass, then the hub's, with the same messages."""
    hub = fleet.hub
    per_device = max(1, messages // len(fleet.device_ids))
    key = (len(fleet.device_ids), per_device, rpm, fleet.next_seq)
    if key not in loads:
        # Encoding 300,000 records takes seconds: the second hub's passes reuse the first's.
        loads[key] = telemetry_load(
            len(fleet.device_ids),
            messages_per_device=per_device,
            records_per_message=rpm,
            first_seq=fleet.next_seq,
        )
    load = loads[key]
    mosquitto = hub.mosquitto_pid
    assert mosquitto is not None
    hub_pid = hub.pid
    assert hub_pid is not None  # else cpu_seconds would read this process
    floor, received, floor_mosquitto = _floor_pass(cfg, fleet, load, mosquitto)

    counts_before = _message_counts(hub)
    cpu_at_start: dict[str, float] = {}

    def started() -> None:
        cpu_at_start.update(hub=cpu_seconds(hub_pid), mosquitto=cpu_seconds(mosquitto))

    published = asyncio.run(
        publish_stream(
            host=fleet.host,
            port=fleet.port,
            accounts=fleet.accounts,
            topics=[fleet.topics.device(d, Channel.TM) for d in fleet.device_ids],
            load=load,
            mqtt_inflight=cfg.mqtt_inflight,
            connect_timeout_s=cfg.connect_timeout_s,
            timeout_s=cfg.pass_timeout_s,
            ack_topics=[fleet.topics.device(d, Channel.ACK) for d in fleet.device_ids],
            window=cfg.window,
            resend_s=cfg.resend_s,
            on_connected=started,
        )
    )
    hub_cpu = cpu_seconds(hub_pid) - cpu_at_start["hub"]
    hub_mosquitto = cpu_seconds(mosquitto) - cpu_at_start["mosquitto"]
    counts_after = _message_counts(hub)
    stored = check_stored(database_url, fleet.device_ids, load.first_seq, load.last_seq)
    fleet.next_seq = load.last_seq + 1
    return PassMeasured(
        messages=load.messages,
        records=load.records,
        payload_bytes=load.payload_bytes,
        hub=published,
        hub_cpu_s=hub_cpu,
        hub_mosquitto_cpu_s=hub_mosquitto,
        floor=floor,
        floor_received=received,
        floor_mosquitto_cpu_s=floor_mosquitto,
        stored=stored,
        hub_counts=(
            {k: v - counts_before.get(k, 0) for k, v in counts_after.items()}
            if counts_before is not None and counts_after is not None
            else None
        ),
    )


def _floor_pass(
    cfg: IngestConfig, fleet: _Fleet, load: Load, mosquitto: int
) -> tuple[Published, FloorReceived, float]:
    # Many clients with the hub account: on its own listener, where client ids are kept.
    floor_port = fleet.hub.hub_listener_port
    floor_cfg = FloorConfig(
        host=fleet.host,
        port=floor_port,
        account=fleet.hub_account("bench-floor-subscriber"),
        topic=f"{fleet.topics.root}/{FLOOR_LEVEL}/+/tm",
        expected=load.messages,
        timeout_s=cfg.pass_timeout_s,
    )
    cpu_at_start: list[float] = []
    with FloorSubscriber(floor_cfg) as subscriber:

        async def both() -> tuple[Published, FloorReceived]:
            published = await publish_stream(
                host=fleet.host,
                port=floor_port,
                accounts=[fleet.hub_account(f"bench-floor-{d}") for d in fleet.device_ids],
                topics=[fleet.floor_topic(d) for d in fleet.device_ids],
                load=load,
                mqtt_inflight=cfg.mqtt_inflight,
                connect_timeout_s=cfg.connect_timeout_s,
                timeout_s=cfg.pass_timeout_s,
                on_connected=lambda: cpu_at_start.append(cpu_seconds(mosquitto)),
            )
            return published, await subscriber.result()

        published, received = asyncio.run(both())
    return published, received, cpu_seconds(mosquitto) - cpu_at_start[0]


def _postgres_schema(url: str) -> tuple[str, str]:
    """A fresh schema in the database at ``url``: (the hub's URL with it as search path, its
    name)."""
    schema = f"bench_ingest_{secrets.token_hex(4)}"
    admin = make_engine(url)
    try:
        with admin.begin() as conn:
            conn.execute(text(f'CREATE SCHEMA "{schema}"'))
    finally:
        admin.dispose()
    joiner = "&" if "?" in url else "?"
    return f"{url}{joiner}options=-csearch_path%3D{schema}", schema


def _drop_schema(url: str, schema: str) -> None:
    admin = make_engine(url)
    try:
        with admin.begin() as conn:
            conn.execute(text(f'DROP SCHEMA "{schema}" CASCADE'))
    finally:
        admin.dispose()


def measure_hub(
    cfg: IngestConfig, root: Path, loads: Loads, *, database_url: str | None, score: bool
) -> HubMeasured:
    """Both passes (and the ``/score`` part when ``score``) on one fresh hub."""
    env = {"OUTPOST_HUB_DATABASE_URL": database_url} if database_url else {}
    url = database_url or f"sqlite:///{(root / 'hub' / 'hub.db').resolve()}"
    with HubProcess(root / "hub", env=env) as hub:
        enroll(hub, root / "devices", cfg.devices)
        fleet = _Fleet(hub, device_dirs(root / "devices", cfg.devices))
        single = run_pass(cfg, fleet, loads, database_url=url, rpm=1, messages=cfg.messages)
        batched = run_pass(
            cfg,
            fleet,
            loads,
            database_url=url,
            rpm=cfg.records_per_message,
            messages=cfg.batched_messages,
        )
        measured_score = None
        if score and cfg.score is not None:
            measured_score = measure_score(hub, root / "score", cfg.score, database_url=url)
    return HubMeasured(
        database="PostgreSQL" if database_url else "SQLite",
        single=single,
        batched=batched,
        score=measured_score,
    )


def measure(cfg: IngestConfig) -> list[HubMeasured]:
    root = Path(tempfile.mkdtemp(prefix="outpost-bench-ingest-", dir=cfg.work_dir))
    try:
        loads: Loads = {}
        hubs = [measure_hub(cfg, root / "sqlite", loads, database_url=None, score=True)]
        if cfg.database_url:
            url, schema = _postgres_schema(cfg.database_url)
            try:
                hubs.append(
                    measure_hub(cfg, root / "postgres", loads, database_url=url, score=False)
                )
            finally:
                _drop_schema(cfg.database_url, schema)
        return hubs
    finally:
        shutil.rmtree(root, ignore_errors=True)


def _overflow(p: PassMeasured) -> float:
    return float("nan") if p.hub_counts is None else p.hub_counts.get("overflow", 0)


def _per(total_s: float, count: int) -> float:
    return total_s / count * MICRO if count else float("nan")


def build_report(cfg: IngestConfig, hubs: list[HubMeasured]) -> Report:
    figures: list[Figure] = []
    notes: list[str] = []
    for m in hubs:
        s, b = m.single, m.batched
        suffix = "" if m.database == "SQLite" else f" ({m.database})"
        rpm = cfg.records_per_message
        figures += [
            Figure(
                f"messages stored durably, 1 record each{suffix}",
                "msg/s",
                s.messages / s.hub_s,
                s.messages / s.floor_s,
                "≥ 0.5×",
            ),
            Figure(
                f"time until the last of {s.messages:,} is stored / received{suffix}",
                "s",
                s.hub_s,
                s.floor_s,
            ),
            Figure(
                f"records stored durably, {rpm} per message{suffix}",
                "records/s",
                b.records / b.hub_s,
                b.records / b.floor_s,
            ),
            Figure(
                f"batching: records/s at {rpm} per message / at 1 per message{suffix}",
                "records/s",
                b.records / b.hub_s,
                s.records / s.hub_s,
            ),
            Figure(
                f"time until the last of {b.messages:,} is stored / received{suffix}",
                "s",
                b.hub_s,
                b.floor_s,
            ),
            Figure(
                f"records missing or extra in the database, both passes{suffix}",
                "",
                s.lost + b.lost,
                target="0",
            ),
            Figure(
                f"messages sent again (no ack within {cfg.resend_s:g} s){suffix}",
                "",
                s.hub.resent + b.hub.resent,
            ),
            Figure(
                f"messages dropped at the hub's full queue{suffix}",
                "",
                _overflow(s) + _overflow(b),
                target="0",
            ),
        ]
        for label, p in (("1 record", s), (f"{rpm} records", b)):
            figures += [
                Figure(
                    f"consumer CPU per message, {label}: hub / bare subscriber{suffix}",
                    "µs",
                    _per(p.hub_cpu_s, p.messages),
                    _per(p.floor_received.cpu_s, p.messages),
                ),
                Figure(
                    f"Mosquitto CPU per message, {label}{suffix}",
                    "µs",
                    _per(p.hub_mosquitto_cpu_s, p.messages),
                    _per(p.floor_mosquitto_cpu_s, p.messages),
                ),
                Figure(
                    f"publishers' CPU per message, {label} (this process){suffix}",
                    "µs",
                    _per(p.hub.cpu_s, p.messages),
                    _per(p.floor.cpu_s, p.messages),
                ),
            ]
        notes.append(
            f"{m.database}: {cfg.devices} devices; {s.messages:,} messages of 1 record "
            f"({s.payload_bytes / s.messages:,.0f} B each), then {b.messages:,} of {rpm} "
            f"({b.payload_bytes / b.messages / 1024:,.1f} KiB each), seqs going on. Stored rows "
            f"checked: {s.stored.stored:,} + {b.stored.stored:,} of "
            f"{s.stored.expected:,} + {b.stored.expected:,}; devices complete "
            f"{s.stored.devices_complete} / {b.stored.devices_complete}; dead letters "
            f"{b.stored.dead_letters}; hub message counters over the passes: "
            f"{s.hub_counts or 'unavailable (GET /metrics failed)'} / "
            f"{b.hub_counts or 'unavailable (GET /metrics failed)'}."
        )
        if m.score is not None:
            figures += _score_figures(m.score)
    sc = next((m.score for m in hubs if m.score is not None), None)
    notes += [
        "floor: the same publishers and payloads, before the hub's pass on the same broker, "
        f"to one bare paho subscriber (its own process, paho's network thread, QoS 1) on "
        f"`outpost/{FLOOR_LEVEL}/+/tm`, published with the hub's broker account (the hub does "
        "not subscribe there; on `outpost/d/+/tm` it would take the floor's stream too). "
        "Separately, not concurrently, so the two consumers do not share the two cores.",
        f"publishers: one paho client per device on one asyncio loop in this process, QoS 1, at "
        f"most {cfg.mqtt_inflight} publishes per device awaiting the broker's PUBACK; towards "
        f"the hub also at most {cfg.window} messages per device awaiting the hub's ack (the "
        "hub's queue holds 10,000 and drops past it, and a device sends again only after its "
        f"resend delay), sent again after {cfg.resend_s:g} s without progress. Payloads are "
        "encoded with the agent's encoder before the clock starts.",
        "project time: from the first publish until the hub's ack of every device's last seq "
        "has arrived (acks are sent after the commit); floor time: from the first publish "
        "until the subscriber has every message. CPU per message is the process's CPU from "
        "the first publish to the end of the pass over the pass's messages.",
    ]
    if sc is not None:
        notes.append(
            f"/score: `outpost-agent run` (its own process) serving the example iris model from "
            f"a deployment on the SQLite hub; one keep-alive connection (http.client, "
            f"TCP_NODELAY), a {sc.sample_bytes} B request; {len(sc.off_s):,} timed calls each "
            f"way after {cfg.score.warmup if cfg.score else 0} warm-up calls per round, in "
            f"{cfg.score.rounds if cfg.score else 0} rounds alternating off/on (on: sample "
            f"rate 1.0, every call collected, sent to the hub and stored: {sc.stored:,} of "
            f"{sc.collected_calls:,})."
        )
    title = (
        f"{cfg.devices} devices, {hubs[0].single.messages:,} × 1 record and "
        f"{hubs[0].batched.messages:,} × {cfg.records_per_message} records"
        f"{', SQLite and PostgreSQL' if len(hubs) > 1 else ', SQLite'}"
    )
    if sc is not None:
        title += f"; /score {len(sc.off_s):,} calls off and on"
    return Report(bench="ingest", title=title, figures=figures, notes=notes)


def _score_figures(sc: ScoreMeasured) -> list[Figure]:
    def pct(values: list[float], q: float) -> float:
        return percentile(values, q) * MICRO

    return [
        Figure("/score p50, collection on / off", "µs", pct(sc.on_s, 0.5), pct(sc.off_s, 0.5)),
        Figure("/score p99, collection on / off", "µs", pct(sc.on_s, 0.99), pct(sc.off_s, 0.99)),
        Figure(
            "agent CPU per call, collection on / off",
            "µs",
            _per(sc.agent_cpu_on_s, len(sc.on_s)),
            _per(sc.agent_cpu_off_s, len(sc.off_s)),
        ),
        Figure(
            "collected calls stored by the hub", "", sc.stored, target=f"{sc.collected_calls:,}"
        ),
    ]


def parse_args(argv: Sequence[str]) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        prog="python -m bench.ingest",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("--devices", type=int, default=100)
    parser.add_argument("--messages", type=int, default=50_000, help="1-record messages")
    parser.add_argument(
        "--batched-messages",
        type=int,
        default=3_000,
        help="messages of --records-per-message records",
    )
    parser.add_argument("--records-per-message", type=int, default=100)
    parser.add_argument(
        "--window", type=int, default=32, help="messages per device awaiting the hub's ack"
    )
    parser.add_argument(
        "--mqtt-inflight",
        type=int,
        default=10,
        help="publishes per device awaiting the broker's PUBACK",
    )
    parser.add_argument(
        "--resend-s",
        type=float,
        default=AGENT_RESEND_S,
        help="send unacknowledged messages again after this long without progress (the agent's)",
    )
    parser.add_argument(
        "--score-calls",
        type=int,
        default=2_000,
        help="timed /score calls each way (0: skip the /score part)",
    )
    parser.add_argument("--score-warmup", type=int, default=200, help="per round")
    parser.add_argument("--score-rounds", type=int, default=2)
    parser.add_argument(
        "--database-url",
        default=None,
        help="also run the passes on a hub with a fresh schema in this "
        "PostgreSQL database, e.g. postgresql://postgres@127.0.0.1:5432/test",
    )
    parser.add_argument("--connect-timeout-s", type=float, default=60.0)
    parser.add_argument("--pass-timeout-s", type=float, default=600.0)
    parser.add_argument("--score-timeout-s", type=float, default=120.0)
    parser.add_argument(
        "--work-dir",
        type=Path,
        default=None,
        help="scratch space for the hub, devices and agent (default: /dev/shm if it has room)",
    )
    parser.add_argument(
        "--quick", action="store_true", help="20 devices, 2,000 + 200 messages, 200 /score calls"
    )
    parser.add_argument("--no-record", action="store_true", help="print only")
    return parser.parse_args(argv)


def main(argv: Sequence[str] | None = None, *, results_path: Path = RESULTS_PATH) -> Report:
    argv = list(sys.argv[1:] if argv is None else argv)
    args = parse_args(argv)
    if args.quick:
        args.devices, args.messages, args.batched_messages = 20, 2_000, 200
        args.score_calls, args.score_warmup = 200, 50
    score = (
        ScoreConfig(
            calls=args.score_calls,
            warmup=args.score_warmup,
            rounds=max(1, args.score_rounds),
            timeout_s=args.score_timeout_s,
        )
        if args.score_calls > 0
        else None
    )
    payload_bytes = (args.messages + args.batched_messages * args.records_per_message) * 600
    cfg = IngestConfig(
        devices=args.devices,
        messages=args.messages,
        batched_messages=args.batched_messages,
        records_per_message=args.records_per_message,
        window=args.window,
        mqtt_inflight=args.mqtt_inflight,
        resend_s=args.resend_s,
        connect_timeout_s=args.connect_timeout_s,
        pass_timeout_s=args.pass_timeout_s,
        database_url=args.database_url,
        score=score,
        # The hub's database and Mosquitto's persistence hold the payloads a few times over.
        work_dir=args.work_dir or scratch_parent(4 * payload_bytes),
    )
    machine = Machine.describe(raise_fd_limit())
    quiet_agents()
    started = time.monotonic()
    hubs = measure(cfg)
    report = build_report(cfg, hubs)
    report.notes.append(f"the whole run took {time.monotonic() - started:.0f} s.")
    return finish(
        report,
        module="bench.ingest",
        argv=argv,
        args=args,
        machine=machine,
        results_path=results_path,
    )


if __name__ == "__main__":
    main()
