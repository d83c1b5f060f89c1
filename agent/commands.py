"""Running the hub's one-off commands (``logs``, ``ping``) once they are verified, and the
result each one sends back on the ``req`` channel.

Verification (director signature, this device, a seq above the last run, not expired) is
``agent.trust.verify_command``; this module only runs what passed and words every refusal, so
the operator waiting at ``outpost-hub device logs`` sees why instead of a timeout.
"""

import asyncio
import time
from datetime import datetime
from typing import Any

from agent.errors import AgentError, IncompatibleError, RejectedError
from agent.logbook import LogBook, LogQuery, level_number
from agent.protocol.documents import Command, CommandAction, Signed
from agent.protocol.messages import MAX_LOG_ENTRIES, CommandResultBody

DEFAULT_TAIL = 100


def logs_query(args: dict[str, Any]) -> LogQuery:
    """A ``logs`` command's arguments; RejectedError naming the one that is wrong."""
    tail = args.get("tail", DEFAULT_TAIL)
    if isinstance(tail, bool) or not isinstance(tail, int) or not 1 <= tail <= MAX_LOG_ENTRIES:
        raise RejectedError(f"tail must be a whole number, 1 to {MAX_LOG_ENTRIES}: {tail!r}")
    since = args.get("since")
    since_at: datetime | None = None
    if since is not None:
        try:
            since_at = datetime.fromisoformat(str(since))
        except ValueError:
            raise RejectedError(f"since must be an ISO-8601 time, not {since!r}") from None
        if since_at.tzinfo is None:
            raise RejectedError(f"since must name its time zone (…Z or +hh:mm): {since!r}")
    level = args.get("level", "debug")
    try:
        min_level = level_number(str(level))
    except ValueError as exc:
        raise RejectedError(str(exc)) from None
    return LogQuery(tail=tail, since=since_at, min_level=min_level)


def refused(signed: Signed, exc: AgentError) -> CommandResultBody | None:
    """The answer to a command that was not run, or None when it names no command id to
    answer (too malformed to tell whose it is: then it is only counted and logged)."""
    command_id = signed.signed.get("command_id")
    seq = signed.signed.get("seq")
    if not isinstance(command_id, str) or not 1 <= len(command_id) <= 64:
        return None
    return CommandResultBody(
        command_id=command_id,
        seq=seq if isinstance(seq, int) and not isinstance(seq, bool) and seq >= 0 else 0,
        ok=False,
        reason=exc.reason,
        detail=exc.detail[:2000],
    )


class CommandRunner:
    """Runs verified commands for one agent."""

    def __init__(self, *, logbook: LogBook | None, max_result_bytes: int) -> None:
        self._logbook = logbook
        self._max_result_bytes = max_result_bytes
        self._started = time.monotonic()

    async def run(self, command: Command) -> CommandResultBody:
        try:
            result = await self._run(command)
        except AgentError as exc:
            return CommandResultBody(
                command_id=command.command_id,
                seq=command.seq,
                ok=False,
                reason=exc.reason,
                detail=exc.detail[:2000],
            )
        return CommandResultBody(
            command_id=command.command_id, seq=command.seq, ok=True, result=result
        )

    async def _run(self, command: Command) -> dict[str, Any]:
        if command.action == CommandAction.PING:
            return {"uptime_s": round(time.monotonic() - self._started, 1)}
        if command.action == CommandAction.LOGS:
            query = logs_query(command.args)
            if self._logbook is None:
                raise IncompatibleError("this agent keeps no log book (logs.enabled is false)")
            # Reading two files of up to half a MiB each: off the event loop.
            result = await asyncio.to_thread(
                self._logbook.read, query, max_bytes=self._max_result_bytes
            )
            return result.model_dump(mode="json")
        raise IncompatibleError(f"this agent does not know the command {command.action!r}")
