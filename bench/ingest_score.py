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

import json
import shutil
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from sqlalchemy import func
from sqlmodel import Session, col, select

from agent.state import StateDir
from bench.agentproc import AgentProcess, ScoringClient, enroll_one, running
from bench.hub import HubProcess
from bench.machine import cpu_seconds
from bench.timing import BenchTimeout
from examples.build_example_model import IrisModel, build_iris_model
from hub.database import make_engine
from hub.telemetry.models import CollectedRecord

MODEL = "iris"
# Every call sampled, and budgets no run of this bench reaches.
EVERY_CALL = {"sample_rate": 1.0, "max_per_minute": 1_000_000_000, "max_bytes_per_day": 1 << 40}
_POLL_S = 0.05


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


def _deploy(
    hub: HubProcess,
    agent: AgentProcess,
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
    agent.wait_serving(timeout_s, {MODEL: version})


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


def measure_score(
    hub: HubProcess, root: Path, cfg: ScoreConfig, *, database_url: str
) -> ScoreMeasured:
    """Stand up the agent against ``hub`` (whose database is at ``database_url``) and time
    ``/score`` with collection off and on."""
    root.mkdir(parents=True, exist_ok=True)
    try:
        model = build_iris_model(root / "model")
        state_dir = root / "agent"
        device_id = enroll_one(hub, state_dir)
        key = StateDir(state_dir).scoring_keys().primary
        engine = make_engine(database_url)
        agent = AgentProcess(state_dir, root / "agent.log")
        off: list[float] = []
        on: list[float] = []
        cpu = {False: 0.0, True: 0.0}
        collected = 0
        stored = 0
        per_round = max(1, cfg.calls // cfg.rounds)
        with running(agent, cfg.timeout_s):
            _deploy(hub, agent, model, device_id=device_id, collect=None, timeout_s=cfg.timeout_s)
            sample = json.dumps(json.loads(model.sample_input.read_bytes())).encode()
            client = ScoringClient(agent.port, key, b'{"data": ' + sample.strip() + b"}")
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
