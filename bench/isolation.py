"""Run one side of a benchmark in a fresh process, so neither side inherits the other's memory,
sockets or warmed-up caches (RSS and CPU are read per process)."""

import multiprocessing
import signal
import traceback
from collections.abc import Callable
from multiprocessing.connection import Connection
from typing import Any, TypeVar

from bench.timing import BenchTimeout

T = TypeVar("T")
_JOIN_S = 10.0
_CLEANUP_S = 30.0


class ChildFailed(RuntimeError):
    """The isolated side raised; the message carries its traceback."""


def _exit_on_term(signum: int, frame: object) -> None:
    # SystemExit unwinds the child's ``finally`` blocks, which stop the Mosquitto it started.
    raise SystemExit(f"terminated by signal {signum}")


def _child(conn: Connection, fn: Callable[..., Any], args: tuple[Any, ...]) -> None:
    signal.signal(signal.SIGTERM, _exit_on_term)
    try:
        result = fn(*args)
    except BaseException:
        conn.send((False, traceback.format_exc()))
    else:
        conn.send((True, result))
    finally:
        conn.close()


def run_isolated(fn: Callable[..., T], *args: Any, timeout_s: float) -> T:
    """``fn(*args)`` in a spawned process; killed, and ``BenchTimeout`` raised, after
    ``timeout_s``. ``fn`` and its arguments and result must pickle."""
    ctx = multiprocessing.get_context("spawn")
    receiver, sender = ctx.Pipe(duplex=False)
    proc = ctx.Process(target=_child, args=(sender, fn, args), name=f"bench-{fn.__name__}")
    proc.start()
    sender.close()
    try:
        if not receiver.poll(timeout_s):
            proc.terminate()
            raise BenchTimeout(f"{fn.__name__} did not finish within {timeout_s:g} s")
        ok, value = receiver.recv()
    except EOFError:
        proc.join(_JOIN_S)
        raise ChildFailed(f"{fn.__name__} died (exit code {proc.exitcode})") from None
    finally:
        receiver.close()
        proc.join(_CLEANUP_S)
        if proc.is_alive():
            proc.kill()
            proc.join(_JOIN_S)
    if not ok:
        raise ChildFailed(f"{fn.__name__} failed:\n{value}")
    result: T = value
    return result
