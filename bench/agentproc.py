"""A real agent for a benchmark: ``outpost-agent run`` in a process of its own, enrolled with the
bench's hub, its scoring endpoint on a free loopback port, and a keep-alive scoring client."""

import http.client
import os
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from pathlib import Path
from typing import IO

import httpx

from agent.enroll import DeviceRequest
from agent.state import StateDir
from bench.hub import HubProcess
from bench.timing import BenchTimeout
from hub.broker.supervisor import free_loopback_port
from outpost_sim.enrollment import DeviceToEnroll, enroll_devices

_POLL_S = 0.05
_STOP_S = 30.0


class AgentProcess:
    """``outpost-agent run`` for one enrolled state directory. ``cpus`` pins it (and the
    workers it starts) to those cores, so a latency bench does not share a core with its
    client."""

    def __init__(self, state_dir: Path, log: Path, *, cpus: set[int] | None = None) -> None:
        self.state_dir = state_dir
        self.port = free_loopback_port()
        self._cpus = cpus
        self._log_path = log
        self._log: IO[bytes] | None = None
        self._proc: subprocess.Popen[bytes] | None = None

    def start(self, timeout_s: float) -> None:
        env = {k: v for k, v in os.environ.items() if not k.startswith("OUTPOST_AGENT_")}
        env["OUTPOST_AGENT_SCORING__PORT"] = str(self.port)
        self._log = self._log_path.open("ab")
        cpus = self._cpus
        self._proc = subprocess.Popen(
            [sys.executable, "-m", "agent.main", "--state-dir", str(self.state_dir), "run"],
            env=env,
            stdin=subprocess.DEVNULL,
            stdout=self._log,
            stderr=subprocess.STDOUT,
            preexec_fn=(lambda: os.sched_setaffinity(0, cpus)) if cpus else None,
        )
        self.wait_serving(timeout_s, {})

    @property
    def pid(self) -> int:
        assert self._proc is not None
        return self._proc.pid

    def wait_serving(self, timeout_s: float, models: Mapping[str, int]) -> None:
        """Until ``/healthz`` answers and lists each of ``models`` at its version (the version
        a new one replaces is served until the switch)."""
        deadline = time.monotonic() + timeout_s
        while True:
            if self._proc is not None and self._proc.poll() is not None:
                raise RuntimeError(f"the agent exited; see {self._log_path}")
            try:
                health = httpx.get(f"http://127.0.0.1:{self.port}/healthz", timeout=1.0)
                served = {(m["name"], m["version"]) for m in health.json()["models"]}
                if all((name, version) in served for name, version in models.items()):
                    return
            except httpx.TransportError:
                pass
            if time.monotonic() > deadline:
                raise BenchTimeout(
                    f"the agent was not serving {dict(models)} within {timeout_s:g} s"
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


@contextmanager
def running(agent: AgentProcess, timeout_s: float) -> Iterator[AgentProcess]:
    try:
        agent.start(timeout_s)
        yield agent
    finally:
        agent.stop()


def enroll_one(hub: HubProcess, state_dir: Path, name: str = "bench-score-agent") -> str:
    """Enrol one device into ``state_dir`` with the hub; its device id."""
    token = hub.call("POST", "/api/v1/enrollment-tokens", json={"uses": 1, "ttl_s": 3600})
    enroll_devices(
        hub_url=hub.url,
        token=token["token"],
        devices=[DeviceToEnroll(state_dir, DeviceRequest(name=name))],
    )
    return StateDir(state_dir).load_identity().device_id


class ScoringClient:
    """One keep-alive connection, Nagle off, the same request every time: as little client
    as there can be between the clock and the endpoint."""

    def __init__(
        self,
        port: int,
        key: str,
        body: bytes,
        *,
        path: str = "/score",
        content_type: str = "application/json",
    ) -> None:
        self._conn = http.client.HTTPConnection("127.0.0.1", port, timeout=10)
        self._conn.connect()
        assert self._conn.sock is not None
        self._conn.sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        self._path = path
        self._body = body
        self._headers = {"content-type": content_type, "x-api-key": key}

    def score(self) -> float:
        """One call; its latency in seconds."""
        started = time.perf_counter()
        self._conn.request("POST", self._path, self._body, self._headers)
        response = self._conn.getresponse()
        answer = response.read()
        elapsed = time.perf_counter() - started
        if response.status != 200:
            raise RuntimeError(f"{self._path} answered {response.status}: {answer[:200]!r}")
        return elapsed

    @property
    def body_bytes(self) -> int:
        return len(self._body)

    def close(self) -> None:
        self._conn.close()
