"""``make demo``: one model from the hub's registry to predictions on three devices.

Starts the hub (which starts and supervises its own Mosquitto), enrols three agents, registers
the example iris classifier, deploys it to all three with live progress, then sends one scoring
request to each agent and prints the answers. Everything runs under ``.demo/`` and goes through
the same commands a user types. Ctrl-C (or ``--exit``) stops every process it started.

``--framework tflite`` does the same with the committed TFLite build of the classifier
(examples/models/iris-tflite), which the agents run with LiteRT.
"""

import argparse
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from pathlib import Path
from typing import Any

from examples.build_example_model import build_iris_model
from examples.build_tflite_model import committed_model

AGENTS = 3


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port: int = sock.getsockname()[1]
        return port


def say(message: str) -> None:
    print(f"\033[1m==> {message}\033[0m", flush=True)


class Processes:
    """The long-running processes the demo starts, each in its own process group."""

    def __init__(self, log_dir: Path) -> None:
        self.log_dir = log_dir
        self.running: list[tuple[str, subprocess.Popen[bytes]]] = []

    def start(self, name: str, argv: list[str], env: dict[str, str]) -> subprocess.Popen[bytes]:
        log = (self.log_dir / f"{name}.log").open("wb")
        proc = subprocess.Popen(
            argv, stdout=log, stderr=subprocess.STDOUT, env=env, start_new_session=True
        )
        self.running.append((name, proc))
        return proc

    def stop_all(self) -> None:
        for _, proc in reversed(self.running):
            if proc.poll() is None:
                os.killpg(proc.pid, signal.SIGTERM)
        deadline = time.monotonic() + 15
        for name, proc in reversed(self.running):
            try:
                proc.wait(max(0.1, deadline - time.monotonic()))
            except subprocess.TimeoutExpired:
                print(f"{name} did not stop in time; killing it", file=sys.stderr)
                os.killpg(proc.pid, signal.SIGKILL)
                proc.wait()
        self.running.clear()


def run(argv: list[str], env: dict[str, str]) -> str:
    """Run one CLI command, echoing it; stop the demo with its output if it fails."""
    print("$ " + " ".join(Path(a).name if i == 0 else a for i, a in enumerate(argv)), flush=True)
    result = subprocess.run(argv, env=env, capture_output=True, text=True, check=False)
    if result.stderr.strip():
        print(result.stderr.rstrip(), file=sys.stderr)
    if result.returncode != 0:
        print(result.stdout)
        raise SystemExit(f"command failed with exit code {result.returncode}")
    return result.stdout


def wait_http(url: str, deadline_s: float, proc: subprocess.Popen[bytes], log: Path) -> None:
    deadline = time.monotonic() + deadline_s
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise SystemExit(f"process exited early; see {log}:\n{log.read_text()[-2000:]}")
        try:
            with urllib.request.urlopen(url, timeout=1):
                return
        except urllib.error.HTTPError:
            return  # it answers; a status other than 200 is fine for "is it up"
        except OSError:
            time.sleep(0.1)
    raise SystemExit(f"{url} did not come up within {deadline_s:.0f} s; see {log}")


def score(port: int, key: str, data: Any) -> Any:
    request = urllib.request.Request(
        f"http://127.0.0.1:{port}/score",
        data=json.dumps({"data": data}).encode(),
        headers={"content-type": "application/json", "authorization": f"Bearer {key}"},
        method="POST",
    )
    with urllib.request.urlopen(request, timeout=10) as response:
        return json.loads(response.read())


def example_model(framework: str, base: Path) -> tuple[Path, Path, Path]:
    """The model file, sample input and expected output the demo registers."""
    if framework == "tflite":
        say("Using the committed TFLite example (iris classifier, built without TensorFlow)")
        tflite = committed_model()
        return tflite.model, tflite.sample_input, tflite.expected_output
    say("Building the example model (iris classifier, scikit-learn → ONNX)")
    onnx = build_iris_model(base / "model")
    return onnx.model, onnx.sample_input, onnx.expected_output


def demo(base: Path, processes: Processes, exit_after: bool, framework: str = "onnx") -> None:
    bin_dir = Path(sys.executable).parent
    hub_cli, agent_cli = str(bin_dir / "outpost-hub"), str(bin_dir / "outpost-agent")
    shutil.rmtree(base, ignore_errors=True)
    (base / "logs").mkdir(parents=True)
    hub_dir = base / "hub"
    api_port = free_port()
    hub_url = f"http://127.0.0.1:{api_port}"
    env = dict(os.environ, OUTPOST_HUB_DATA_DIR=str(hub_dir), OUTPOST_HUB_URL=hub_url)

    say("Creating the hub's keys (root, release, director)")
    run([hub_cli, "keys", "init", "--data-dir", str(hub_dir)], env)

    say(f"Starting the hub on {hub_url} (it starts its own Mosquitto)")
    hub = processes.start("hub", [hub_cli, "serve", "--port", str(api_port)], env)
    wait_http(f"{hub_url}/healthz", 60, hub, base / "logs" / "hub.log")
    env["OUTPOST_HUB_TOKEN"] = (hub_dir / "admin.token").read_text().strip()

    model_file, sample_input, expected_output = example_model(framework, base)
    run(
        [
            hub_cli, "model", "register", str(model_file), "--name", "iris",
            "--framework", framework, "--sample-input", str(sample_input),
            "--expected-output", str(expected_output), "--tag", "dataset=iris",
            "--description", f"logistic regression on the iris data set ({framework})",
        ],
        env,
    )  # fmt: skip

    say(f"Enrolling {AGENTS} agents")
    token = run([hub_cli, "device", "token", "--uses", str(AGENTS)], env).strip()
    agents: list[tuple[str, int, Path]] = []
    for i in range(AGENTS):
        state_dir = base / f"agent-{i + 1}"
        run(
            [agent_cli, "--state-dir", str(state_dir), "enroll", "--hub", hub_url,
             f"--token={token}", "--name", f"demo-{i + 1}"],
            env,
        )  # fmt: skip
        device_id = json.loads((state_dir / "identity.json").read_text())["device_id"]
        port = free_port()
        agent_env = dict(env, OUTPOST_AGENT_SCORING__PORT=str(port))
        proc = processes.start(
            f"agent-{i + 1}", [agent_cli, "--state-dir", str(state_dir), "run"], agent_env
        )
        wait_http(
            f"http://127.0.0.1:{port}/healthz", 30, proc, base / "logs" / f"agent-{i + 1}.log"
        )
        agents.append((device_id, port, state_dir))

    say("Deploying iris:1 to every agent")
    deploy = [hub_cli, "deploy", "iris:1", "--wait", "--timeout", "120"]
    for device_id, _, _ in agents:
        deploy += ["--device", device_id]
    print(run(deploy, env).rstrip())

    say("Scoring one request on each agent (POST /score with its key)")
    sample = json.loads(sample_input.read_text())
    for device_id, port, state_dir in agents:
        key = run([agent_cli, "--state-dir", str(state_dir), "key"], env).strip()
        answer = score(port, key, sample)
        print(f"{device_id} (port {port}): {json.dumps(answer['result'])}")
    say("Done.")
    if not exit_after:
        print(f"Hub API: {hub_url} (token in {hub_dir / 'admin.token'}); logs in {base / 'logs'}")
        print("Press Ctrl-C to stop everything.", flush=True)
        signal.pause()


def _interrupt(signum: int, frame: object) -> None:
    """SIGTERM takes the same clean path as Ctrl-C."""
    raise KeyboardInterrupt


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--dir", type=Path, default=Path(".demo"), help="working directory")
    parser.add_argument("--exit", action="store_true", help="stop everything after scoring")
    parser.add_argument(
        "--framework",
        choices=["onnx", "tflite"],
        default="onnx",
        help="the example model to deploy: ONNX (built here) or TFLite (committed)",
    )
    args = parser.parse_args(argv)
    processes = Processes(args.dir / "logs")
    signal.signal(signal.SIGTERM, _interrupt)
    try:
        demo(args.dir, processes, args.exit, args.framework)
    except KeyboardInterrupt:
        print("\nstopping", file=sys.stderr)
    finally:
        processes.stop_all()
    return 0


if __name__ == "__main__":
    sys.exit(main())
