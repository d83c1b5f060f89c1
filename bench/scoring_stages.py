"""Where the scoring endpoint's time goes: the endpoint cut at each stage, over real loopback.

    python -m bench.scoring_stages [--runtime tflite|onnx] [--rounds 30] [--calls 200]

One server process per stage, each the agent's own ``ScoringServer`` (its key file watched as in
the agent, a telemetry observer) serving the iris model, its handler cut short:

- ``http``: the request parsed, routed and authorised; a fixed answer
- ``checks``: and the body read and checked into the model's input arrays
- ``model``: and the runtime's ``predict``
- ``answer``: and the answer written as JSON
- ``full``: the whole handler (the call also observed, as the agent counts it for telemetry)

beside two floors from ``bench.scoring_floor``: the bare server alone, and the bare server
making the raw runtime call. Every server is pinned to one core and the client (one keep-alive
connection, as in ``bench.scoring``) to the other; rounds of every server alternate, so the
shared VM's drifts fall on all of them. Each stage is reported against the runtime's floor: the
step from one stage to the next is what that stage costs a caller, cold caches included, which
a profiler in a hot loop does not show.
"""

import argparse
import asyncio
import json
import os
import subprocess
import sys
from collections.abc import Callable, Sequence
from datetime import UTC, datetime
from pathlib import Path
from typing import IO, Any

from agent.httpserver import Request, Response
from agent.jsonvalues import to_json
from agent.protocol.documents import (
    FileEntry,
    Framework,
    HealthCheck,
    Manifest,
    ModelInfo,
    RuntimeSpec,
)
from agent.runtimes.base import ActiveModel, Runtime
from agent.scoring import ScoringCall, ScoringServer
from agent.scoring_body import request_data
from agent.scoring_keys import ScoringKeyFile
from agent.state import StateDir
from agent.telemetry import ModelCalls, percentile
from bench.agentproc import ScoringClient
from bench.machine import Machine, raise_fd_limit
from bench.options import finish, in_scratch
from bench.results import RESULTS_PATH, Figure, Report
from bench.scoring import TFLITE_DIR, split_cpus
from examples.build_example_model import build_iris_model
from hub.broker.supervisor import free_loopback_port

STAGES = ("http", "checks", "model", "answer", "full")
_FIXED = Response(200, b"{}")
_MODEL = "iris"


class _One:
    """The one model, as the agent core offers it to the endpoint."""

    def __init__(self, model: ActiveModel) -> None:
        self.model = model

    def get(self, name: str | None = None) -> ActiveModel | None:
        return self.model if name in (None, _MODEL) else None

    def names(self) -> list[str]:
        return [_MODEL]


class _Telemetry:
    """The observer's work in the agent: the call counted for telemetry."""

    def __init__(self) -> None:
        import random

        self.calls = ModelCalls(random.Random(0))

    def scored(self, call: ScoringCall) -> None:
        model = call.model
        self.calls.record(
            model.name, model.version, call.latency_s * 1000, failed=call.outputs is None
        )


def _runtime(kind: str, model: Path) -> Runtime:
    if kind == "onnx":
        from agent.runtimes.onnx import OnnxRuntime

        return OnnxRuntime(model)
    from agent.runtimes.tflite import TfliteRuntime

    return TfliteRuntime(model)


def _cut(stage: str, server: ScoringServer, runtime: Any) -> None:
    """Make ``server`` stop after ``stage`` (the full handler is left as it is)."""
    # The runtime's input checks (TensorInput list): private, but this is a diagnosis of
    # exactly that step.
    inputs = getattr(runtime, "_checks", None) or runtime._inputs

    def checks(request: Request) -> Response:
        from agent.runtimes.tensors import feeds

        feeds(request_data(request.body, "application/json", max_unpacked_bytes=1 << 20), inputs)
        return _FIXED

    def model(request: Request) -> Response:
        runtime.predict(request_data(request.body, "application/json", max_unpacked_bytes=1 << 20))
        return _FIXED

    def answer(request: Request) -> Response:
        outputs = runtime.predict(
            request_data(request.body, "application/json", max_unpacked_bytes=1 << 20)
        )
        return Response(
            200,
            to_json(
                {
                    "result": next(iter(outputs.values()), None),
                    "outputs": outputs,
                    "model": {"name": _MODEL, "version": 1},
                }
            ),
        )

    cuts: dict[str, Callable[[Request], Response]] = {
        "http": lambda _request: _FIXED,
        "checks": checks,
        "model": model,
        "answer": answer,
    }
    if stage in cuts:
        server.handle = cuts[stage]  # type: ignore[method-assign,assignment]


async def _serve(stage: str, kind: str, model_path: Path, port: int, state_dir: Path) -> None:
    runtime = _runtime(kind, model_path)
    manifest = Manifest(
        model=ModelInfo(name=_MODEL, version=1, framework=Framework(kind)),
        runtime=RuntimeSpec(model_file=model_path.name),
        files=[FileEntry(path=model_path.name, size=1, sha256="0" * 64)],
        health_check=HealthCheck(input="in.json", expected_output="out.json"),
        created_at=datetime(2024, 1, 1, tzinfo=UTC),
    )
    state = StateDir(state_dir)
    state.create()
    server = ScoringServer(
        models=_One(ActiveModel(_MODEL, 1, "0" * 64, manifest, runtime)),
        keys=ScoringKeyFile(state),
        port=port,
        observer=_Telemetry(),
    )
    _cut(stage, server, runtime)
    await server.start()
    sys.stdout.write("ready\n")
    sys.stdout.flush()
    await asyncio.Event().wait()  # until the bench kills it


class _Servers:
    """The stage servers and floors, each in its own pinned process."""

    def __init__(self, cpus: set[int] | None, log: IO[bytes]) -> None:
        self._cpus = cpus
        self._log = log
        self._procs: list[subprocess.Popen[bytes]] = []

    def start(self, args: list[str]) -> int:
        port = free_loopback_port()
        cpus = self._cpus
        proc = subprocess.Popen(
            [sys.executable, "-m", *args, "--port", str(port)],
            stdin=subprocess.DEVNULL,
            stdout=subprocess.PIPE,
            stderr=self._log,
            preexec_fn=(lambda: os.sched_setaffinity(0, cpus)) if cpus else None,
        )
        self._procs.append(proc)
        assert proc.stdout is not None
        if proc.stdout.readline().strip() != b"ready":
            raise RuntimeError(f"{args} did not start; see the log")
        return port

    def stop(self) -> None:
        for proc in self._procs:
            proc.kill()
            proc.wait()


def measure(work: Path, kind: str, rounds: int, calls: int) -> Report:
    server_cpus, client_cpus = split_cpus()
    if client_cpus:
        os.sched_setaffinity(0, client_cpus)
    if kind == "onnx":
        build_iris_model(work / "model")
        model, sample = work / "model" / "model.onnx", work / "model" / "sample_input.json"
    else:
        model, sample = TFLITE_DIR / "model.tflite", TFLITE_DIR / "sample_input.json"
    rows = json.loads(sample.read_text())
    body = json.dumps({"data": (rows["data"] if isinstance(rows, dict) else rows)[:1]}).encode()
    servers = _Servers(server_cpus, (work / "servers.log").open("ab"))
    clients: dict[str, ScoringClient] = {}
    try:
        for stage in STAGES:
            port = servers.start(
                [
                    "bench.scoring_stages",
                    "--serve",
                    stage,
                    "--runtime",
                    kind,
                    "--model",
                    str(model),
                    "--state-dir",
                    str(work / f"state-{stage}"),
                ]
            )
            key = StateDir(work / f"state-{stage}").scoring_keys().primary
            clients[stage] = ScoringClient(port, key, body, path=f"/models/{_MODEL}/score")
        floor_args = ["--model", str(model), "--sample", str(sample)]
        bare = servers.start(["bench.scoring_floor", "--runtime", "none"])
        raw = servers.start(["bench.scoring_floor", "--runtime", kind, *floor_args])
        clients["bare"] = ScoringClient(bare, "-", body)
        clients["floor"] = ScoringClient(raw, "-", body)
        times: dict[str, list[float]] = {name: [] for name in clients}
        for _ in range(rounds):
            for name, client in clients.items():
                for _ in range(calls // 10):
                    client.score()
                times[name].extend(client.score() for _ in range(calls))
    finally:
        for client in clients.values():
            client.close()
        servers.stop()
    p50 = {name: percentile(values, 0.5) * 1e6 for name, values in times.items()}
    report = Report(
        bench="scoring-stages",
        title=f"/score p50 with the endpoint cut at each stage ({kind}, one row per call)",
    )
    report.figures.append(Figure("bare loopback HTTP round trip p50", "µs", p50["bare"]))
    for stage in STAGES:
        report.figures.append(Figure(f"p50 up to {stage}", "µs", p50[stage], p50["floor"]))
    report.notes.append(
        f"{rounds} rounds of {calls} calls on each server, rounds alternating; the floor is the "
        f"bare server making the raw {kind} call; servers pinned to "
        f"{sorted(server_cpus) if server_cpus else 'any'}, the client to "
        f"{sorted(client_cpus) if client_cpus else 'any'}"
    )
    return report


def main(argv: Sequence[str] | None = None, *, results_path: Path = RESULTS_PATH) -> Report:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0] if __doc__ else None)
    parser.add_argument("--runtime", choices=["tflite", "onnx"], default="tflite")
    parser.add_argument("--rounds", type=int, default=30)
    parser.add_argument("--calls", type=int, default=200, help="timed calls a round per server")
    parser.add_argument("--no-record", action="store_true")
    parser.add_argument("--work-dir", type=Path)
    # The stage servers themselves (started by the bench):
    parser.add_argument("--serve", choices=STAGES, help=argparse.SUPPRESS)
    parser.add_argument("--model", type=Path, help=argparse.SUPPRESS)
    parser.add_argument("--state-dir", type=Path, help=argparse.SUPPRESS)
    parser.add_argument("--port", type=int, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.serve:
        asyncio.run(_serve(args.serve, args.runtime, args.model, args.port, args.state_dir))
        raise SystemExit(0)
    machine = Machine.describe(raise_fd_limit())
    report = in_scratch(
        "outpost-bench-stages-",
        args.work_dir,
        lambda work: measure(work, args.runtime, args.rounds, args.calls),
    )
    return finish(
        report,
        module="bench.scoring_stages",
        argv=sys.argv[1:] if argv is None else list(argv),
        args=args,
        machine=machine,
        results_path=results_path,
    )


if __name__ == "__main__":
    main()
