"""What the agent adds to a scoring call and to memory, per runtime (issue 7).

- **Project**: ``outpost-agent run`` in its own process, enrolled with a real hub and serving
  three models from real deployments: the example iris classifier with ONNX Runtime, the same
  classifier as a ``.tflite`` with LiteRT, and ``examples/score_iris/score.py`` (pre- and
  post-processing around the ONNX model) as an entry script in its worker process. One
  keep-alive client (http.client, Nagle off) calls ``POST /models/{name}/score`` with one row.
- **Floor** (``bench/scoring_floor.py``): per runtime, a bare loopback HTTP server (an asyncio
  protocol that only finds each request's end) that makes the raw runtime call per request on
  an input prepared once (ONNX ``session.run``, LiteRT ``invoke``, the script's own ``run``
  with the request body), answering a fixed body; the same client. Rounds of the floor and the
  agent alternate, so drifts in the shared machine's load fall on both.
- **Memory**: the agent's RSS with the ONNX model alone loaded (after the timed calls warmed
  it), against a bare process holding the same onnxruntime session. Private (anonymous)
  memory is reported beside it, and so is the same bare process with only the imports any
  agent on the project's stack needs (asyncio with ssl, paho-mqtt, sqlite3): the least an
  agent on this stack can weigh.

Servers are pinned to one core and the client to the other where the machine has two, so a
round trip does not depend on where the scheduler put whom.
"""

import argparse
import json
import os
import shutil
import subprocess
import sys
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import IO

from agent.state import StateDir
from agent.telemetry import percentile
from bench.agentproc import AgentProcess, ScoringClient, enroll_one, running
from bench.hub import HubProcess
from bench.machine import Machine, raise_fd_limit
from bench.options import finish, in_scratch
from bench.results import RESULTS_PATH, Figure, Report
from bench.timing import BenchTimeout
from examples.build_example_model import build_iris_model
from hub.broker.supervisor import free_loopback_port

ROOT = Path(__file__).resolve().parents[1]
TFLITE_DIR = ROOT / "examples/models/iris-tflite"
SCRIPT_DIR = ROOT / "examples/score_iris"
_READY_S = 60.0


@dataclass(frozen=True)
class Case:
    """One runtime: the model the agent serves, how the floor makes the same call, the body."""

    label: str
    model: str
    floor_args: list[str]
    body: bytes
    target: str = "≤ 1.3×"


@dataclass
class Timings:
    project_s: list[float] = field(default_factory=list)
    floor_s: list[float] = field(default_factory=list)


def _one_row_request(sample_file: Path) -> bytes:
    sample = json.loads(sample_file.read_text(encoding="utf-8"))
    rows = sample["data"] if isinstance(sample, dict) else sample
    return json.dumps({"data": rows[:1]}).encode()


def _register(
    hub: HubProcess,
    name: str,
    framework: str,
    directory: Path,
    model_file: str,
    *,
    entry_script: Path | None = None,
) -> int:
    files = [("files", (model_file, (directory / model_file).read_bytes()))]
    data = {"name": name, "framework": framework}
    if entry_script is not None:
        files.append(("entry_script", (entry_script.name, entry_script.read_bytes())))
    sample_dir = entry_script.parent if entry_script is not None else directory
    body = hub.call(
        "POST",
        "/api/v1/models",
        data=data,
        files=[
            *files,
            (
                "sample_input",
                ("sample_input.json", (sample_dir / "sample_input.json").read_bytes()),
            ),
            (
                "expected_output",
                ("expected_output.json", (sample_dir / "expected_output.json").read_bytes()),
            ),
        ],
    )
    version: int = body["version"]
    return version


def _deploy(hub: HubProcess, model: str, device_id: str) -> None:
    hub.call("POST", "/api/v1/deployments", json={"model": model, "devices": [device_id]})


class _FloorServer:
    """``bench.scoring_floor`` in a process of its own, pinned like the agent."""

    def __init__(self, args: list[str], cpus: set[int] | None, log: IO[bytes]) -> None:
        self.port = free_loopback_port()
        self._proc = subprocess.Popen(
            [sys.executable, "-m", "bench.scoring_floor", "--port", str(self.port), *args],
            stdin=subprocess.PIPE,  # --hold waits on it
            stdout=subprocess.PIPE,
            stderr=log,
            preexec_fn=(lambda: os.sched_setaffinity(0, cpus)) if cpus else None,
        )
        assert self._proc.stdout is not None
        line = self._proc.stdout.readline()  # the floor prints "ready" once it listens
        if line.strip() != b"ready":
            self.stop()
            raise RuntimeError(f"the floor server did not start: {line!r}")

    @property
    def pid(self) -> int:
        return self._proc.pid

    def stop(self) -> None:
        if self._proc.poll() is None:
            self._proc.terminate()
            try:
                self._proc.wait(10)
            except subprocess.TimeoutExpired:
                self._proc.kill()
                self._proc.wait()


@contextmanager
def _floor(args: list[str], cpus: set[int] | None, log: IO[bytes]) -> Iterator[_FloorServer]:
    server = _FloorServer(args, cpus, log)
    try:
        yield server
    finally:
        server.stop()


def _memory(pid: int) -> tuple[int, int]:
    """(VmRSS, RssAnon) of a process, in bytes."""
    found = {"VmRSS": 0, "RssAnon": 0}
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        key, _, value = line.partition(":")
        if key in found:
            found[key] = int(value.split()[0]) * 1024
    return found["VmRSS"], found["RssAnon"]


def _time(client: ScoringClient, calls: int, warmup: int) -> list[float]:
    for _ in range(warmup):
        client.score()
    return [client.score() for _ in range(calls)]


def _alternate(
    project: Callable[[], ScoringClient],
    floor: Callable[[], ScoringClient],
    *,
    calls: int,
    rounds: int,
    warmup: int,
) -> Timings:
    timings = Timings()
    per_round = max(1, calls // rounds)
    project_client, floor_client = project(), floor()
    try:
        for r in range(rounds):
            order = (True, False) if r % 2 == 0 else (False, True)
            for is_project in order:
                client = project_client if is_project else floor_client
                times = _time(client, per_round, warmup)
                (timings.project_s if is_project else timings.floor_s).extend(times)
    finally:
        project_client.close()
        floor_client.close()
    return timings


@dataclass(frozen=True)
class Config:
    calls: int
    rounds: int
    warmup: int
    timeout_s: float


def split_cpus() -> tuple[set[int] | None, set[int] | None]:
    """(servers', client's) cores: apart when there are two or more."""
    available = sorted(os.sched_getaffinity(0))
    if len(available) < 2:
        return None, None
    return {available[1]}, {available[0]}


def measure(work: Path, cfg: Config) -> Report:
    server_cpus, client_cpus = split_cpus()
    if client_cpus:
        os.sched_setaffinity(0, client_cpus)
    onnx_dir = work / "onnx"
    build_iris_model(onnx_dir)
    script_dir = work / "script"
    shutil.copytree(SCRIPT_DIR, script_dir)
    shutil.copy(onnx_dir / "model.onnx", script_dir / "model.onnx")
    log = (work / "floor.log").open("ab")
    report = Report(
        bench="scoring",
        title=f"one row per call, {cfg.calls:,} calls per runtime (ONNX Runtime, LiteRT, score.py)",
    )
    with HubProcess(work / "hub", start_timeout_s=cfg.timeout_s) as hub:
        versions = {
            "iris": _register(hub, "iris", "onnx", onnx_dir, "model.onnx"),
            "iris-tflite": _register(hub, "iris-tflite", "tflite", TFLITE_DIR, "model.tflite"),
            "iris-script": _register(
                hub,
                "iris-script",
                "onnx",
                script_dir,
                "model.onnx",
                entry_script=script_dir / "score.py",
            ),
        }
        state_dir = work / "agent"
        device_id = enroll_one(hub, state_dir)
        key = StateDir(state_dir).scoring_keys().primary
        agent = AgentProcess(state_dir, work / "agent.log", cpus=server_cpus)
        cases = [
            Case(
                "ONNX Runtime",
                "iris",
                [
                    "--runtime",
                    "onnx",
                    "--model",
                    str(onnx_dir / "model.onnx"),
                    "--sample",
                    str(onnx_dir / "sample_input.json"),
                ],
                _one_row_request(onnx_dir / "sample_input.json"),
            ),
            Case(
                "LiteRT",
                "iris-tflite",
                [
                    "--runtime",
                    "tflite",
                    "--model",
                    str(TFLITE_DIR / "model.tflite"),
                    "--sample",
                    str(TFLITE_DIR / "sample_input.json"),
                ],
                _one_row_request(TFLITE_DIR / "sample_input.json"),
            ),
            Case(
                "score.py",
                "iris-script",
                [
                    "--runtime",
                    "script",
                    "--model",
                    str(script_dir / "model.onnx"),
                    "--script",
                    str(script_dir / "score.py"),
                ],
                _one_row_request(script_dir / "sample_input.json"),
            ),
            # The same calls against a floor that also crosses a process boundary: what the
            # isolation the issue asks for costs any server, apart from what the agent adds.
            Case(
                "score.py against a floor with a worker process",
                "iris-script",
                [
                    "--runtime",
                    "script-worker",
                    "--model",
                    str(script_dir / "model.onnx"),
                    "--script",
                    str(script_dir / "score.py"),
                ],
                _one_row_request(script_dir / "sample_input.json"),
                target="",
            ),
        ]
        with running(agent, cfg.timeout_s):
            # Memory first, with the ONNX model alone.
            _deploy(hub, "iris", device_id)
            agent.wait_serving(cfg.timeout_s, {"iris": versions["iris"]})
            first = cases[0]
            client = ScoringClient(agent.port, key, first.body, path="/models/iris/score")
            _time(client, cfg.calls // 4, cfg.warmup)
            client.close()
            agent_rss, agent_anon = _memory(agent.pid)
            with _floor([*first.floor_args, "--hold"], server_cpus, log) as held:
                floor_rss, floor_anon = _memory(held.pid)
            with _floor([*first.floor_args, "--hold", "--with-stack"], server_cpus, log) as held:
                stack_rss, _ = _memory(held.pid)
            report.figures.append(
                Figure(
                    "memory, ONNX model loaded (RSS)",
                    "MB",
                    agent_rss / 2**20,
                    floor_rss / 2**20,
                    "≤ 1.2×",
                )
            )
            report.figures.append(
                Figure(
                    "memory, ONNX model loaded (private)",
                    "MB",
                    agent_anon / 2**20,
                    floor_anon / 2**20,
                )
            )
            # What no agent on this stack can go below: the floor with the stack's imports
            # (asyncio with ssl, paho-mqtt, sqlite3) and none of the agent's own code.
            report.figures.append(
                Figure(
                    "memory, the stack's imports alone, ONNX model loaded (RSS)",
                    "MB",
                    stack_rss / 2**20,
                    floor_rss / 2**20,
                )
            )

            for name in ("iris-tflite", "iris-script"):
                _deploy(hub, name, device_id)
            agent.wait_serving(cfg.timeout_s, versions)
            with _floor(["--runtime", "none"], server_cpus, log) as bare:
                bare_client = ScoringClient(bare.port, key, cases[0].body)
                bare_s = _time(bare_client, cfg.calls, cfg.warmup)
                bare_client.close()
            for case in cases:
                with _floor(case.floor_args, server_cpus, log) as floor:
                    timings = _alternate(
                        lambda case=case: ScoringClient(  # type: ignore[misc]
                            agent.port, key, case.body, path=f"/models/{case.model}/score"
                        ),
                        lambda floor=floor, case=case: ScoringClient(  # type: ignore[misc]
                            floor.port, key, case.body
                        ),
                        calls=cfg.calls,
                        rounds=cfg.rounds,
                        warmup=cfg.warmup,
                    )
                for q, label in ((0.5, "p50"), (0.99, "p99")):
                    report.figures.append(
                        Figure(
                            f"/score {label}, {case.label}",
                            "µs",
                            percentile(timings.project_s, q) * 1e6,
                            percentile(timings.floor_s, q) * 1e6,
                            case.target,
                        )
                    )
    report.figures.append(
        Figure("bare loopback HTTP round trip p50 (no model)", "µs", percentile(bare_s, 0.5) * 1e6)
    )
    report.notes.append(
        f"each runtime: {cfg.calls:,} timed calls on the agent and as many on its floor, in "
        f"{cfg.rounds} alternating rounds after {cfg.warmup} warm-up calls each; one row per "
        f"request ({len(cases[0].body)} B for the built-in runtimes); servers pinned to cores "
        f"{sorted(server_cpus) if server_cpus else 'any'}, the client to "
        f"{sorted(client_cpus) if client_cpus else 'any'}"
    )
    return report


def main(argv: Sequence[str] | None = None, *, results_path: Path = RESULTS_PATH) -> Report:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0] if __doc__ else None)
    parser.add_argument("--calls", type=int, default=5000, help="timed calls per runtime")
    # Fine alternation (100 calls a round by default): the shared VM's load drifts over
    # seconds, and short rounds put each drift on the agent and its floor alike.
    parser.add_argument("--rounds", type=int, default=50)
    parser.add_argument("--warmup", type=int, default=100)
    parser.add_argument("--timeout-s", type=float, default=120.0)
    parser.add_argument("--quick", action="store_true", help="300 calls in 2 rounds")
    parser.add_argument("--work-dir", type=Path)
    parser.add_argument("--no-record", action="store_true")
    args = parser.parse_args(argv)
    if args.quick:
        args.calls, args.rounds, args.warmup = 300, 2, 20
    cfg = Config(args.calls, args.rounds, args.warmup, args.timeout_s)
    machine = Machine.describe(raise_fd_limit())
    try:
        report = in_scratch("outpost-bench-scoring-", args.work_dir, lambda w: measure(w, cfg))
    except BenchTimeout as exc:
        raise SystemExit(f"bench: {exc}") from None
    return finish(
        report,
        module="bench.scoring",
        argv=sys.argv[1:] if argv is None else list(argv),
        args=args,
        machine=machine,
        results_path=results_path,
    )


if __name__ == "__main__":
    main()
