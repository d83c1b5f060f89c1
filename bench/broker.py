"""A Mosquitto for benchmarks, run by the hub's own ``EmbeddedBroker`` with the project's
config, ACL and ``$7$`` password file, on a loopback port that stays the same across restarts.

Every bench device gets the same password, and so the same hash line: the hash is computed once,
which keeps 10,000 accounts cheap to write (a fresh salt per line buys a benchmark nothing).
"""

import os
import secrets
import signal
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

from bench.timing import BenchTimeout
from hub.broker import DEFAULT_HUB_USERNAME, BrokerUser, EmbeddedBroker, hash_password
from hub.broker.supervisor import free_loopback_port

_POLL_S = 0.01


@dataclass(frozen=True)
class Restart:
    """When the broker went down and when it accepted connections again (monotonic)."""

    down_at: float
    up_at: float

    @property
    def outage_s(self) -> float:
        return self.up_at - self.down_at


class BenchBroker:
    """Mosquitto with a hub account and one account per device id, all device ids sharing one
    password. Inherits this process's file limit, so raise it first."""

    def __init__(self, data_dir: Path, device_ids: Sequence[str]) -> None:
        self.hub_username = DEFAULT_HUB_USERNAME
        self.hub_password = secrets.token_urlsafe(16)
        self.device_password = secrets.token_urlsafe(16)
        device_hash = hash_password(self.device_password)
        self._users = [
            BrokerUser(self.hub_username, hash_password(self.hub_password)),
            *(BrokerUser(d, device_hash) for d in device_ids),
        ]
        # A fixed port: a restarted broker must come back where the clients look for it.
        self._broker = EmbeddedBroker(
            data_dir=data_dir, port=free_loopback_port(), start_timeout_s=30.0
        )

    @property
    def host(self) -> str:
        return self._broker.host

    @property
    def port(self) -> int:
        return self._broker.port

    @property
    def pid(self) -> int | None:
        return self._broker.pid

    def start(self) -> None:
        self._broker.start(self._users)

    def stop(self) -> None:
        self._broker.stop()

    def restart(self, sig: signal.Signals, *, timeout_s: float = 30.0) -> Restart:
        """Take the broker down with ``sig`` and bring it back on the same port and config.

        SIGTERM is an operator's restart: stop (TERM, then KILL after a deadline) and start
        again. SIGKILL is a crash: the hub's supervisor notices and starts it again itself.
        Blocking; call it off the event loop the clients run on.
        """
        pid = self._broker.pid
        if pid is None:
            raise RuntimeError("broker is not running")
        if sig is signal.SIGKILL:
            restarts = self._broker.restarts
            down_at = time.monotonic()
            os.kill(pid, signal.SIGKILL)
            deadline = down_at + timeout_s
            while not (self._broker.restarts > restarts and self._broker.is_running()):
                if time.monotonic() > deadline:
                    raise BenchTimeout(f"mosquitto not restarted within {timeout_s:g} s")
                time.sleep(_POLL_S)
        else:
            down_at = time.monotonic()
            self._broker.stop()
            self._broker.start(self._users)
        return Restart(down_at=down_at, up_at=time.monotonic())

    def log_tail(self) -> str:
        return self._broker.log_tail()
