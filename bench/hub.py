"""The real hub for a benchmark: ``outpost-hub serve`` in a child process, with its own data
dir, SQLite file and embedded Mosquitto, driven over its REST API."""

import os
import signal
import subprocess
import sys
import time
from pathlib import Path
from types import TracebackType
from typing import IO, Any, Protocol, Self

import httpx

from bench.machine import find_pid
from bench.timing import BenchTimeout
from hub.broker.supervisor import free_loopback_port

_POLL_S = 0.1
_HTTP_TIMEOUT_S = 300.0  # registering or deploying a large model takes a while


class ModelFileSet(Protocol):
    """A model's files as the registry takes them (the example's and the bench's own)."""

    @property
    def model(self) -> Path: ...
    @property
    def sample_input(self) -> Path: ...
    @property
    def expected_output(self) -> Path: ...


class HubProcess:
    """One hub; ``start`` creates its keys and waits until its API answers."""

    def __init__(
        self,
        data_dir: Path,
        *,
        start_timeout_s: float = 60.0,
        env: dict[str, str] | None = None,
    ) -> None:
        self.data_dir = data_dir
        # Extra environment for the hub process (a failpoint, say); ``start`` may change it.
        self.env = dict(env or {})
        self.port = free_loopback_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self._start_timeout_s = start_timeout_s
        self._proc: subprocess.Popen[bytes] | None = None
        self._log: IO[bytes] | None = None
        self.token = ""

    def _command(self, *args: str) -> list[str]:
        return [sys.executable, "-m", "hub.cli", "--data-dir", str(self.data_dir), *args]

    def _env(self) -> dict[str, str]:
        # The hub reads OUTPOST_HUB_* settings; the bench's hub must not pick up a user's.
        inherited = {k: v for k, v in os.environ.items() if not k.startswith("OUTPOST_HUB_")}
        return {**inherited, **self.env}

    def start(self, *, wait: bool = True) -> None:
        """Start the hub (creating its keys the first time) and wait until its API answers;
        ``wait=False`` only launches it (an armed failpoint may end it before it answers)."""
        self.data_dir.mkdir(parents=True, exist_ok=True)
        if not (self.data_dir / "keys").exists():
            subprocess.run(
                self._command("keys", "init"),
                env=self._env(),
                check=True,
                capture_output=True,
                timeout=self._start_timeout_s,
            )
        self._log = (self.data_dir / "hub.log").open("ab")
        self._proc = subprocess.Popen(
            self._command("serve", "--port", str(self.port)),
            env=self._env(),
            stdin=subprocess.DEVNULL,
            stdout=self._log,
            stderr=subprocess.STDOUT,
        )
        if not wait:
            return
        deadline = time.monotonic() + self._start_timeout_s
        while not self._healthy():
            if self._proc.poll() is not None:
                raise RuntimeError(f"hub exited during start-up; see {self.data_dir / 'hub.log'}")
            if time.monotonic() > deadline:
                raise BenchTimeout(f"hub did not answer within {self._start_timeout_s:g} s")
            time.sleep(_POLL_S)
        self.token = (self.data_dir / "admin.token").read_text(encoding="utf-8").strip()

    def _healthy(self) -> bool:
        try:
            return httpx.get(f"{self.url}/healthz", timeout=1.0).status_code == 200
        except httpx.TransportError:
            return False

    @property
    def pid(self) -> int | None:
        return self._proc.pid if self._proc is not None else None

    @property
    def mosquitto_pid(self) -> int | None:
        """The embedded broker's process, found by the config file it was started with."""
        return find_pid(str(self.data_dir / "broker" / "mosquitto.conf"))

    @property
    def hub_listener_port(self) -> int:
        """The embedded broker's hub listener, where hub-account clients keep their own client
        ids (on the device listener the client id is forced to the user name)."""
        return int((self.data_dir / "broker" / "hub-port").read_text(encoding="utf-8"))

    @property
    def broker_password(self) -> str:
        """The hub's own broker password (its account may publish anywhere under the root)."""
        return (self.data_dir / "hub-broker.password").read_text(encoding="utf-8").strip()

    def api(self) -> httpx.Client:
        return httpx.Client(
            base_url=self.url,
            headers={"Authorization": f"Bearer {self.token}"},
            timeout=_HTTP_TIMEOUT_S,
        )

    def call(self, method: str, path: str, **kwargs: Any) -> Any:
        """One API call; raises on an error status with the hub's answer in the message."""
        with self.api() as client:
            response = client.request(method, path, **kwargs)
        if response.status_code >= 400:
            raise RuntimeError(
                f"hub refused {method} {path}: {response.status_code} {response.text}"
            )
        return response.json()

    def register_model(self, name: str, files: ModelFileSet) -> int:
        """Register an ONNX model's files through the API, as ``outpost-hub model register``
        does; returns the new version."""
        body = self.call(
            "POST",
            "/api/v1/models",
            data={"name": name, "framework": "onnx"},
            files=[
                ("files", ("model.onnx", files.model.read_bytes())),
                ("sample_input", ("sample_input.json", files.sample_input.read_bytes())),
                ("expected_output", ("expected_output.json", files.expected_output.read_bytes())),
            ],
        )
        version: int = body["version"]
        return version

    def kill(self) -> None:
        """SIGKILL the hub, as a crash or an OOM kill would: nothing is cleaned up, and its
        Mosquitto is left running, as it would be."""
        proc = self._proc
        self._proc = None
        if proc is not None:
            proc.kill()
            proc.wait()

    def wait_exit(self, timeout_s: float) -> int:
        """Wait for the hub to end by itself (a failpoint); its exit status."""
        assert self._proc is not None, "the hub is not running"
        code = self._proc.wait(timeout=timeout_s)
        self._proc = None
        return code

    def stop(self, timeout_s: float = 60.0) -> None:
        """SIGINT, as Ctrl-C: uvicorn's shutdown stops the MQTT side, then Mosquitto."""
        proc = self._proc
        self._proc = None
        if proc is not None and proc.poll() is None:
            proc.send_signal(signal.SIGINT)
            try:
                proc.wait(timeout=timeout_s)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()
        # A hub killed before it could stop its broker leaves it running; it is ours to end.
        orphan = self.mosquitto_pid
        if orphan is not None:
            os.kill(orphan, signal.SIGTERM)
        if self._log is not None:
            self._log.close()
            self._log = None

    def __enter__(self) -> Self:
        self.start()
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.stop()
