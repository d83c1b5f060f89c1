"""Run Mosquitto as a supervised child process of the hub.

The hub writes the broker's configuration, password and ACL files itself, starts mosquitto in
its own process group (so a Ctrl-C in the hub's terminal reaches only the hub, which then stops
the broker in order), and restarts it if it dies, within a bounded budget.
"""

import logging
import os
import shutil
import signal
import socket
import subprocess
import threading
import time
from collections import deque
from collections.abc import Iterable
from pathlib import Path
from types import TracebackType
from typing import IO, Self

from agent.protocol.topics import DEFAULT_ROOT, Topics
from hub.atomic import write_atomic
from hub.broker.config import render_acl, render_config
from hub.broker.kick import KickError, take_over_client_id
from hub.broker.passwords import BrokerUser, check_hub_username, render_passwords
from hub.broker.tls_listener import TlsListener

logger = logging.getLogger(__name__)

DEFAULT_HUB_USERNAME = "outpost_hub"  # the underscore keeps it out of the device-id space
HUB_LISTENER_HOST = "127.0.0.1"  # the hub's own listener is never reachable from elsewhere
SEARCH_DIRS = ("/usr/sbin", "/usr/local/sbin", "/opt/homebrew/sbin")
_LOG_TAIL_BYTES = 4096
_POLL_S = 0.02
_READY_LINE = b" running"  # "mosquitto version 2.0.11 running", after the listeners are bound


class BrokerError(RuntimeError):
    """The embedded broker could not be started, reloaded or found."""


class MosquittoNotFoundError(BrokerError):
    """No mosquitto binary on this machine."""


def find_mosquitto() -> str:
    """The path of the mosquitto binary, from PATH or the usual sbin directories."""
    found = shutil.which("mosquitto")
    if found is not None:
        return found
    for directory in SEARCH_DIRS:
        candidate = Path(directory) / "mosquitto"
        if candidate.is_file() and os.access(candidate, os.X_OK):
            return str(candidate)
    raise MosquittoNotFoundError(
        "mosquitto not found on PATH or in "
        + ", ".join(SEARCH_DIRS)
        + "; install it (Debian/Ubuntu: `apt-get install mosquitto`, macOS: `brew install"
        " mosquitto`) or point the hub at an external broker"
    )


def free_loopback_port(host: str = "127.0.0.1") -> int:
    """A TCP port the OS reports free right now (another process may still take it)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind((host, 0))
        port: int = s.getsockname()[1]
        return port


def _port_open(host: str, port: int) -> bool:
    try:
        with socket.create_connection((host, port), timeout=0.5):
            return True
    except OSError:
        return False


def pid_alive(pid: int) -> bool:
    """Whether ``pid`` runs (a zombie has exited and let go of its sockets already)."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text(encoding="utf-8")
    except OSError:
        return False
    return stat.rpartition(")")[2].split()[0] != "Z"


class EmbeddedBroker:
    """A mosquitto child process configured with the project's ACL and password file."""

    def __init__(
        self,
        *,
        data_dir: Path,
        topic_root: str = DEFAULT_ROOT,
        bind: str = "127.0.0.1",
        port: int | None = None,
        mosquitto_bin: str = "mosquitto",
        hub_username: str = DEFAULT_HUB_USERNAME,
        start_timeout_s: float = 10.0,
        stop_timeout_s: float = 5.0,
        max_restarts_per_minute: int = 5,
        tls: TlsListener | None = None,
    ) -> None:
        check_hub_username(hub_username)
        self.tls = tls  # the listener for devices with client certificates, when enabled
        self._data_dir = data_dir
        self._topic_root = Topics(topic_root).root
        self._bind = bind
        self._fixed_port = port
        self._port = port
        self._hub_port: int | None = None
        self._mosquitto_bin = mosquitto_bin
        self.hub_username = hub_username
        self._start_timeout_s = start_timeout_s
        self._stop_timeout_s = stop_timeout_s
        self._max_restarts_per_minute = max_restarts_per_minute
        self._lock = threading.RLock()
        self._stopping = threading.Event()
        self._proc: subprocess.Popen[bytes] | None = None
        self._log: IO[bytes] | None = None
        self._supervisor: threading.Thread | None = None
        self._restart_times: deque[float] = deque()
        self.restarts = 0  # how many times the supervisor brought mosquitto back
        # The hub account's password, set by the hub, for ``disconnect_client``.
        self.hub_password: str | None = None

    # -- paths and addresses ---------------------------------------------------------------

    @property
    def config_file(self) -> Path:
        return self._data_dir / "mosquitto.conf"

    @property
    def password_file(self) -> Path:
        return self._data_dir / "passwords"

    @property
    def hub_password_file(self) -> Path:
        """The hub listener's password file: the hub account only."""
        return self._data_dir / "hub-passwords"

    @property
    def acl_file(self) -> Path:
        return self._data_dir / "acl"

    @property
    def hub_port_file(self) -> Path:
        """Where the hub listener's port of the running broker is written."""
        return self._data_dir / "hub-port"

    @property
    def port_file(self) -> Path:
        """The port picked at the first start: devices are enrolled with it, so it stays."""
        return self._data_dir / "port"

    @property
    def log_file(self) -> Path:
        return self._data_dir / "mosquitto.log"

    @property
    def host(self) -> str:
        return self._bind

    @property
    def port(self) -> int:
        if self._port is None:
            raise BrokerError("broker not started")
        return self._port

    @property
    def url(self) -> str:
        return f"mqtt://{self.host}:{self.port}"

    @property
    def hub_host(self) -> str:
        return HUB_LISTENER_HOST

    @property
    def hub_port(self) -> int:
        """The hub's own listener (loopback, the hub account only, client ids left as sent):
        hub replicas and tools connect there side by side. Picked afresh at each start."""
        if self._hub_port is None:
            raise BrokerError("broker not started")
        return self._hub_port

    @property
    def pid(self) -> int | None:
        proc = self._proc
        return proc.pid if proc is not None and proc.poll() is None else None

    def is_running(self) -> bool:
        return self.pid is not None

    @property
    def supervising(self) -> bool:
        """Whether the supervisor still watches mosquitto (False once it has given up)."""
        return self._supervisor is not None and self._supervisor.is_alive()

    # -- lifecycle ----------------------------------------------------------------------------

    def start(self, users: Iterable[BrokerUser]) -> None:
        """Write the files, launch mosquitto and wait until it accepts TCP connections."""
        mosquitto = self._resolve_binary()
        self._data_dir.mkdir(parents=True, exist_ok=True)
        with self._lock:
            if self._proc is not None:
                raise BrokerError("broker already started")
            self._stopping.clear()
            self._write_access(list(users))
            self._stop_leftover()
            # Enrolled devices know the port: a restart must come back on the same one.
            kept = self._fixed_port or self._remembered_port()
            # A port we picked may be taken between picking and binding; pick again then.
            attempts = 1 if kept is not None else 3
            for attempt in range(1, attempts + 1):
                port = kept or free_loopback_port(self._bind)
                self._port = port
                self._hub_port = free_loopback_port(HUB_LISTENER_HOST)
                config = render_config(
                    bind=self._bind,
                    port=port,
                    data_dir=self._data_dir,
                    password_file=self.password_file,
                    acl_file=self.acl_file,
                    hub_port=self._hub_port,
                    hub_password_file=self.hub_password_file,
                    hub_bind=HUB_LISTENER_HOST,
                    tls=self.tls,
                )
                write_atomic(self.config_file, config.encode(), mode=0o600)
                try:
                    self._launch(mosquitto)
                    break
                except BrokerError as exc:
                    if kept is not None:
                        raise BrokerError(
                            f"mosquitto could not start on port {port}, the port enrolled devices"
                            f" use (kept in {self.port_file}); free it, or move every device:"
                            f" {exc}"
                        ) from exc
                    if attempt == attempts:
                        raise
                    logger.warning("mosquitto failed to start on port %d, retrying", port)
            if self._fixed_port is None:
                write_atomic(self.port_file, f"{port}\n".encode(), mode=0o600)
            # For tools on this machine that log in with the hub account (benchmarks, several
            # clients at once): on the device listener their client ids would all be "hub".
            write_atomic(self.hub_port_file, f"{self._hub_port}\n".encode(), mode=0o600)
        self._supervisor = threading.Thread(
            target=self._supervise, name="mosquitto-supervisor", daemon=True
        )
        self._supervisor.start()
        logger.info("embedded broker listening", extra={"url": self.url, "pid": self.pid})

    @property
    def pid_file(self) -> Path:
        return self._data_dir / "mosquitto.pid"

    def _stop_leftover(self) -> None:
        """Stop a mosquitto that a hub killed outright (SIGKILL, power cut of the hub only)
        left running: it still holds the port the devices know, so this hub's broker could
        never start. Only a process whose command line names this data dir's config is
        touched."""
        try:
            pid = int(self.pid_file.read_text(encoding="utf-8").strip())
        except (FileNotFoundError, ValueError):
            return
        try:
            cmdline = Path(f"/proc/{pid}/cmdline").read_bytes()
        except OSError:
            return  # gone, or no /proc to tell what it is: leave it alone
        if str(self.config_file).encode() not in cmdline.split(b"\0"):
            return  # the pid was reused by another process
        logger.warning("stopping a mosquitto left by a hub that did not stop", extra={"pid": pid})
        os.kill(pid, signal.SIGTERM)
        deadline = time.monotonic() + self._stop_timeout_s
        while pid_alive(pid) and time.monotonic() < deadline:
            time.sleep(_POLL_S)
        if pid_alive(pid):
            os.kill(pid, signal.SIGKILL)

    def _remembered_port(self) -> int | None:
        try:
            text = self.port_file.read_text(encoding="utf-8").strip()
        except FileNotFoundError:
            return None
        if not text.isdigit() or not 0 < int(text) < 65536:
            raise BrokerError(f"{self.port_file} holds {text!r}, not a port number")
        return int(text)

    def _write_access(self, users: list[BrokerUser]) -> None:
        """Write both password files and the ACL for ``users``; caller holds the lock."""
        passwords = render_passwords(users, hub_username=self.hub_username)
        hub_only = [u for u in users if u.username == self.hub_username]
        hub_passwords = render_passwords(hub_only, hub_username=self.hub_username)
        denied = [u.username for u in users if not u.active and u.username != self.hub_username]
        acl = render_acl(self._topic_root, self.hub_username, denied)
        # The ACL first: a device being disabled must have lost its topics by the time its
        # password line goes, whichever file mosquitto happens to read first.
        write_atomic(self.acl_file, acl.encode(), mode=0o600)
        write_atomic(self.password_file, passwords.encode(), mode=0o600)
        write_atomic(self.hub_password_file, hub_passwords.encode(), mode=0o600)

    def update_users(self, users: Iterable[BrokerUser], *, timeout_s: float = 5.0) -> None:
        """Rewrite the password files and the ACL and make mosquitto reload them.

        Clients of active accounts stay connected; mosquitto disconnects, during the reload,
        every client whose account is no longer in the password file (a disabled device), and
        a denied account keeps no topic even on a connection the password file does not govern
        (a certificate). Returns once mosquitto has logged the reload, so a user added here can
        connect next.
        """
        with self._lock:
            self._write_access(list(users))
            proc = self._proc
            if proc is None or proc.poll() is not None:
                # Nothing to signal; the next (re)start reads the new file.
                return
            offset = self.log_file.stat().st_size
            proc.send_signal(signal.SIGHUP)
            deadline = time.monotonic() + timeout_s
            while b"Reloading config" not in self._read_log(offset):
                if time.monotonic() > deadline:
                    raise BrokerError(
                        f"mosquitto did not reload within {timeout_s}s; log:\n{self.log_tail()}"
                    )
                time.sleep(_POLL_S)

    def disconnect_client(self, client_id: str, *, timeout_s: float = 5.0) -> None:
        """Drop the live connection of ``client_id`` (hub.broker.kick), if there is one."""
        if self.hub_password is None:
            raise BrokerError("the hub account's password is not set; cannot disconnect clients")
        try:
            take_over_client_id(
                host=self.hub_host,
                port=self.hub_port,
                username=self.hub_username,
                password=self.hub_password,
                client_id=client_id,
                timeout_s=timeout_s,
            )
        except KickError as exc:
            raise BrokerError(f"could not disconnect {client_id}: {exc}") from exc

    def stop(self) -> None:
        """Stop mosquitto (SIGTERM, then SIGKILL after a deadline) and reap it."""
        self._stopping.set()
        with self._lock:
            proc = self._proc
            self._proc = None
            if proc is not None:
                self._terminate(proc)
            self._close_log()
        supervisor = self._supervisor
        if supervisor is not None and supervisor is not threading.current_thread():
            supervisor.join(timeout=self._stop_timeout_s)
        self._supervisor = None

    def __enter__(self) -> Self:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.stop()

    def log_tail(self, max_bytes: int = _LOG_TAIL_BYTES) -> str:
        """The end of mosquitto's log, for error messages."""
        try:
            size = self.log_file.stat().st_size
        except FileNotFoundError:
            return "(no log)"
        return self._read_log(max(0, size - max_bytes)).decode("utf-8", "replace")

    # -- internals ----------------------------------------------------------------------------

    def _resolve_binary(self) -> str:
        if os.sep in self._mosquitto_bin:
            if not Path(self._mosquitto_bin).is_file():
                raise MosquittoNotFoundError(f"mosquitto binary {self._mosquitto_bin} not found")
            return self._mosquitto_bin
        if self._mosquitto_bin == "mosquitto":
            return find_mosquitto()
        found = shutil.which(self._mosquitto_bin)
        if found is None:
            raise MosquittoNotFoundError(f"{self._mosquitto_bin!r} not found on PATH")
        return found

    def _read_log(self, offset: int) -> bytes:
        try:
            with self.log_file.open("rb") as f:
                f.seek(offset)
                return f.read()
        except FileNotFoundError:
            return b""

    def _close_log(self) -> None:
        if self._log is not None:
            self._log.close()
            self._log = None

    def _launch(self, mosquitto: str) -> None:
        """Start the process and wait for the port; caller holds the lock."""
        self._close_log()
        self._log = self.log_file.open("ab")
        log_offset = self._log.tell()
        port = self.port
        proc = subprocess.Popen(
            [mosquitto, "-c", str(self.config_file)],
            stdin=subprocess.DEVNULL,
            stdout=self._log,
            stderr=subprocess.STDOUT,
            # Own process group: the terminal's SIGINT goes to the hub only, and the hub
            # decides when the broker stops (after its own clients have said goodbye).
            process_group=0,
        )
        deadline = time.monotonic() + self._start_timeout_s
        # An open port alone could be another process's listener; mosquitto logs "running"
        # only once its own listeners are bound.
        while not (_READY_LINE in self._read_log(log_offset) and _port_open(self._bind, port)):
            rc = proc.poll()
            if rc is not None:
                raise BrokerError(
                    f"mosquitto exited with code {rc} during start; log:\n{self.log_tail()}"
                )
            if time.monotonic() > deadline:
                self._terminate(proc)
                raise BrokerError(
                    f"mosquitto did not accept connections on {self._bind}:{port} within "
                    f"{self._start_timeout_s}s; log:\n{self.log_tail()}"
                )
            time.sleep(_POLL_S)
        self._proc = proc
        write_atomic(self.pid_file, f"{proc.pid}\n".encode(), mode=0o600)

    def _terminate(self, proc: subprocess.Popen[bytes]) -> None:
        if proc.poll() is not None:
            return
        proc.terminate()
        try:
            proc.wait(timeout=self._stop_timeout_s)
        except subprocess.TimeoutExpired:
            logger.warning("mosquitto ignored SIGTERM, killing it", extra={"pid": proc.pid})
            proc.kill()
            proc.wait()

    def _supervise(self) -> None:
        """Restart mosquitto when it dies on its own, at most N times a minute."""
        while not self._stopping.is_set():
            proc = self._proc
            if proc is None:
                return
            rc = proc.wait()
            with self._lock:
                if self._stopping.is_set() or self._proc is not proc:
                    return
                now = time.monotonic()
                while self._restart_times and now - self._restart_times[0] > 60.0:
                    self._restart_times.popleft()
                if len(self._restart_times) >= self._max_restarts_per_minute:
                    logger.error(
                        "mosquitto keeps dying; giving up after %d restarts in a minute",
                        len(self._restart_times),
                        extra={"returncode": rc, "log_tail": self.log_tail()},
                    )
                    self._proc = None
                    self._close_log()
                    return
                self._restart_times.append(now)
                logger.warning(
                    "mosquitto exited unexpectedly with code %s; restarting",
                    rc,
                    extra={"log_tail": self.log_tail()},
                )
                try:
                    self._launch(self._resolve_binary())
                except BrokerError:
                    # Counted against the budget; the loop tries again until it runs out.
                    logger.exception("mosquitto restart failed")
                    self._proc = proc
                    continue
                self.restarts += 1
