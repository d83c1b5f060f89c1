"""What data collection costs a scoring call: ``POST /score`` on a real agent, collection off and
on (every call sampled), the same client and connection for both.

The agent is ``outpost-agent run`` in a process of its own, enrolled with the bench's hub and
serving the example iris classifier (``examples/build_example_model.py``) from a real deployment.
Collection is switched by deploying a new version of the same model files with or without a
data-collection policy (the hub skips a device that already runs the version it is asked to
deploy, so the same version cannot carry a new policy), waiting until the agent serves it. Off
and on alternate in rounds (off, on, then on, off, ...), so a drift in the shared machine's
load falls on both; after a round with collection on, the next waits until the hub has stored
every collected call, so the agent's sending of them does not run into a round without
collection.
"""

import http.client
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import IO, Any

import httpx
from sqlalchemy import func
from sqlmodel import Session, col, select

from agent.enroll import DeviceRequest
from agent.state import StateDir
from bench.hub import HubProcess
from bench.machine import cpu_seconds
from bench.timing import BenchTimeout
from examples.build_example_model import IrisModel, build_iris_model
from hub.broker.supervisor import free_loopback_port
from hub.database import make_engine
from hub.telemetry.models import CollectedRecord
from outpost_sim.enrollment import DeviceToEnroll, enroll_devices

MODEL = "iris"
# Every call sampled, and budgets no run of this bench reaches.
EVERY_CALL = {"sample_rate": 1.0, "max_per_minute": 1_000_000_000, "max_bytes_per_day": 1 << 40}
_POLL_S = 0.05
_STOP_S = 30.0


@dataclass(frozen=True)
class ScoreConfig:
    calls: int  # timed calls with collection off, and as many with it on
    warmup: int  # untimed calls at the start of each round
    rounds: int  # off/on alternations; the timed calls are split between them
    timeout_s: float  # each wait: the agent up, a deployment applied, collected calls stored


@dataclass(frozen=True)
class ScoreMeasured:
    off_s: list[float]  # each timed call's latency, collection off
    on_s: list[float]
    collected_calls: int  # calls made while collection was on, warm-up included
    stored: int  # collected records the hub stored for the device
    agent_cpu_off_s: float  # the agent process's CPU over the timed calls
    agent_cpu_on_s: float
    sample_bytes: int  # the request body


class _Agent:
    """``outpost-agent run`` for one enrolled state directory, its scoring endpoint on a free
    loopback port."""

    def __init__(self, state_dir: Path, log: Path) -> None:
        self.state_dir = state_dir
        self.port = free_loopback_port()
        self._log_path = log
        self._log: IO[bytes] | None = None
        self._proc: subprocess.Popen[bytes] | None = None

    def start(self, timeout_s: float) -> None:
        env = {k: v for k, v in os.environ.items() if not k.startswith("OUTPOST_AGENT_")}
        env["OUTPOST_AGENT_SCORING__PORT"] = str(self.port)
        self._log = self._log_path.open("ab")
        self._proc = subprocess.Popen(
            [sys.executable, "-m", "agent.main", "--state-dir", str(self.state_dir), "run"],
            env=env,
            stdin=subprocess.DEVNULL,
            stdout=self._log,
            stderr=subprocess.STDOUT,
        )
        self.wait_serving(timeout_s, version=None)

    @property
    def pid(self) -> int:
        assert self._proc is not None
        return self._proc.pid

    def wait_serving(self, timeout_s: float, *, version: int | None) -> None:
        """Until ``/healthz`` answers, and with a ``version`` says it serves that version of the
        model (the one it replaces is served until the switch)."""
        deadline = time.monotonic() + timeout_s
        while True:
            if self._proc is not None and self._proc.poll() is not None:
                raise RuntimeError(f"the agent exited; see {self._log_path}")
            try:
                health = httpx.get(f"http://127.0.0.1:{self.port}/healthz", timeout=1.0)
                if version is None:
                    return
                served = {(m["name"], m["version"]) for m in health.json()["models"]}
                if (MODEL, version) in served:
                    return
            except httpx.TransportError:
                pass
            if time.monotonic() > deadline:
                raise BenchTimeout(
                    f"the agent was not serving {MODEL} v{version} within {timeout_s:g} s"
                )
            time.sleep(_POLL_S)

    def stop(self) -> None:
        proc, self._proc = self._proc, None
        if proc is not None and proc.poll() is None:
            proc.send_signal(signal.SIGTERM)
            try:
                proc.wait(_STOP_S)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()
        if self._log is not None:
            self._log.close()
            self._log = None


def _enroll_one(hub: HubProcess, state_dir: Path) -> str:
    token = hub.call("POST", "/api/v1/enrollment-tokens", json={"uses": 1, "ttl_s": 3600})
    enroll_devices(
        hub_url=hub.url,
        token=token["token"],
        devices=[DeviceToEnroll(state_dir, DeviceRequest(name="bench-score-agent"))],
    )
    return StateDir(state_dir).load_identity().device_id


def _deploy(
    hub: HubProcess,
    agent: _Agent,
    model: IrisModel,
    *,
    device_id: str,
    collect: dict[str, Any] | None,
    timeout_s: float,
) -> None:
    """Deploy a new version of the model to the agent with (or without) collection, and wait
    until it serves it (its desired state, and so the policy, came before the download)."""
    version = hub.register_model(MODEL, model)  # again: a new version
    hub.call(
        "POST",
        "/api/v1/deployments",
        json={
            "model": MODEL,
            "version": version,
            "devices": [device_id],
            "data_collection": collect,
        },
    )
    agent.wait_serving(timeout_s, version=version)


def _stored(engine: Any, device_id: str) -> int:
    with Session(engine) as session:
        count = session.exec(
            select(func.count()).where(col(CollectedRecord.device_id) == device_id)
        ).one()
    return int(count)


def _wait_stored(engine: Any, device_id: str, expected: int, timeout_s: float) -> int:
    deadline = time.monotonic() + timeout_s
    while (stored := _stored(engine, device_id)) < expected:
        if time.monotonic() > deadline:
            raise BenchTimeout(
                f"the hub stored {stored} of {expected} collected calls within {timeout_s:g} s"
            )
        time.sleep(_POLL_S)
    return stored


class _Client:
    """One keep-alive connection, Nagle off, the same request every time: as little client
    as there can be between the clock and the endpoint."""

    def __init__(self, port: int, key: str, data: bytes) -> None:
        self._conn = http.client.HTTPConnection("127.0.0.1", port, timeout=10)
        self._conn.connect()
        assert self._conn.sock is not None
        self._conn.sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        self._body = b'{"data": ' + data.strip() + b"}"
        self._headers = {"content-type": "application/json", "x-api-key": key}

    def score(self) -> float:
        """One call; its latency in seconds."""
        started = time.perf_counter()
        self._conn.request("POST", "/score", self._body, self._headers)
        response = self._conn.getresponse()
        answer = response.read()
        elapsed = time.perf_counter() - started
        if response.status != 200:
            raise RuntimeError(f"/score answered {response.status}: {answer[:200]!r}")
        return elapsed

    @property
    def body_bytes(self) -> int:
        return len(self._body)

    def close(self) -> None:
        self._conn.close()


@contextmanager
def _running(agent: _Agent, timeout_s: float) -> Iterator[_Agent]:
    try:
        agent.start(timeout_s)
        yield agent
    finally:
        agent.stop()


def measure_score(
    hub: HubProcess, root: Path, cfg: ScoreConfig, *, database_url: str
) -> ScoreMeasured:
    """Stand up the agent against ``hub`` (whose database is at ``database_url``) and time
    ``/score`` with collection off and on."""
    root.mkdir(parents=True, exist_ok=True)
    try:
        model = build_iris_model(root / "model")
        state_dir = root / "agent"
        device_id = _enroll_one(hub, state_dir)
        key = StateDir(state_dir).scoring_keys().primary
        engine = make_engine(database_url)
        agent = _Agent(state_dir, root / "agent.log")
        off: list[float] = []
        on: list[float] = []
        cpu = {False: 0.0, True: 0.0}
        collected = 0
        stored = 0
        per_round = max(1, cfg.calls // cfg.rounds)
        with _running(agent, cfg.timeout_s):
            _deploy(hub, agent, model, device_id=device_id, collect=None, timeout_s=cfg.timeout_s)
            sample = json.dumps(json.loads(model.sample_input.read_bytes())).encode()
            client = _Client(agent.port, key, sample)
            collecting = False
            try:
                for r in range(cfg.rounds):
                    for mode in (False, True) if r % 2 == 0 else (True, False):
                        if mode != collecting:
                            if collecting:
                                stored = _wait_stored(engine, device_id, collected, cfg.timeout_s)
                            _deploy(
                                hub,
                                agent,
                                model,
                                device_id=device_id,
                                collect=EVERY_CALL if mode else None,
                                timeout_s=cfg.timeout_s,
                            )
                            collecting = mode
                        for _ in range(cfg.warmup):
                            client.score()
                        cpu_before = cpu_seconds(agent.pid)
                        times = [client.score() for _ in range(per_round)]
                        cpu[mode] += cpu_seconds(agent.pid) - cpu_before
                        (on if mode else off).extend(times)
                        if mode:
                            collected += cfg.warmup + per_round
                stored = _wait_stored(engine, device_id, collected, cfg.timeout_s)
                body_bytes = client.body_bytes
            finally:
                client.close()
        engine.dispose()
        return ScoreMeasured(
            off_s=off,
            on_s=on,
            collected_calls=collected,
            stored=stored,
            agent_cpu_off_s=cpu[False],
            agent_cpu_on_s=cpu[True],
            sample_bytes=body_bytes,
        )
    finally:
        shutil.rmtree(root, ignore_errors=True)
