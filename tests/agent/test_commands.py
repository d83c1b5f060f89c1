"""Signed one-off commands (``logs``, ``ping``) run by a real agent on a real Mosquitto, and every
way a command is refused, each answered with its reason."""

import logging
from collections.abc import Callable
from datetime import UTC, datetime, timedelta
from pathlib import Path

import pytest

from agent.protocol.documents import Signed
from agent.protocol.messages import CommandBody, LogsResult, Reason, encode
from tests.support.agents import DEVICE, running_agent
from tests.support.fake_hub import FakeHub
from tests.support.repository import RepositorySimulator

pytestmark = pytest.mark.integration


@pytest.fixture(autouse=True)
def agent_info_logs(caplog: pytest.LogCaptureFixture) -> None:
    # The daemon logs at INFO (agent.main); pytest leaves the root logger at WARNING, and a
    # benchmark's smoke test in the same process may have set the agent's loggers to ERROR.
    caplog.set_level(logging.INFO)
    caplog.set_level(logging.INFO, logger="agent")
    return


def _connected(hub: FakeHub) -> None:
    # The agent subscribes before it reports its state, on the same connection.
    hub.wait_for(lambda: bool(hub.states))


def _logs(hub: FakeHub, repo: RepositorySimulator, **args: object) -> LogsResult:
    command = repo.command("logs", dict(args))
    hub.send_command(DEVICE, repo_message(repo, command))
    result = hub.command_result(str(command.signed["command_id"]))
    assert result.ok, result
    assert result.seq == command.signed["seq"]
    return LogsResult.model_validate(result.result)


def repo_message(repo: RepositorySimulator, command: Signed) -> bytes:
    return encode(CommandBody(keyring=repo.keyring(), command=command))


def test_logs_command_returns_recent_entries_filtered_by_tail_level_and_time(
    hub: FakeHub, repo: RepositorySimulator, state_dir: Path
) -> None:
    with running_agent(state_dir) as (runner, agent):
        _connected(hub)
        # A warning of the agent's own: a malformed desired state is dropped and logged.
        hub.publish_raw(f"outpost/d/{DEVICE}/desired", b"not json")
        hub.wait_for(lambda: runner.call(lambda: agent.malformed_received) >= 1)

        everything = _logs(hub, repo, tail=1000)
        messages = [e.message for e in everything.entries]
        assert any("dropping malformed message" in m for m in messages), messages
        assert any(m.startswith("running command logs") for m in messages), messages
        assert [e.at for e in everything.entries] == sorted(e.at for e in everything.entries)
        assert all(e.logger.startswith("agent") for e in everything.entries)

        last_two = _logs(hub, repo, tail=2)
        assert len(last_two.entries) == 2
        assert last_two.more
        assert last_two.entries[-1].message.startswith("running command logs")

        warnings = _logs(hub, repo, level="warning")
        assert warnings.entries
        assert {e.level for e in warnings.entries} == {"WARNING"}

        future = (datetime.now(UTC) + timedelta(hours=1)).isoformat()
        assert _logs(hub, repo, since=future).entries == []


def test_log_entries_and_the_command_counter_survive_a_restart(
    hub: FakeHub, repo: RepositorySimulator, state_dir: Path
) -> None:
    with running_agent(state_dir):
        _connected(hub)
        first = repo.command("ping")
        hub.send_command(DEVICE, repo_message(repo, first))
        assert hub.command_result("cmd-0001").ok
    started = datetime.now(UTC)
    with running_agent(state_dir):
        hub.wait_for(lambda: sum(1 for _, s in hub.states) >= 2)
        # The same command again, after the restart: still a replay.
        hub.send_command(DEVICE, repo_message(repo, first))
        hub.wait_for(lambda: len([r for _, r in hub.command_results]) >= 2)
        replay = [r for _, r in hub.command_results][-1]
        assert not replay.ok
        assert replay.reason is Reason.REPLAY
        entries = _logs(hub, repo, tail=1000).entries
        before = [e for e in entries if e.at < started]
        assert any(e.message.startswith("running command ping") for e in before), entries


REFUSALS: list[tuple[Callable[[RepositorySimulator], Signed], Reason, str]] = [
    (lambda r: r.command("ping", signer=r.release), Reason.UNKNOWN_KEY, "director"),
    (lambda r: r.command("ping", signer=r.root), Reason.UNKNOWN_KEY, "director"),
    (lambda r: r.command("ping", device_id="dev-other"), Reason.WRONG_DEVICE, "dev-other"),
    (lambda r: r.command("ping", expires_in=timedelta(seconds=-1)), Reason.EXPIRED, "expired"),
    (lambda r: r.command("reboot"), Reason.INCOMPATIBLE, "reboot"),
    (lambda r: r.command("logs", {"tail": 0}), Reason.MALFORMED, "tail"),
    (lambda r: r.command("logs", {"tail": "ten"}), Reason.MALFORMED, "tail"),
    (lambda r: r.command("logs", {"since": "yesterday"}), Reason.MALFORMED, "since"),
    (lambda r: r.command("logs", {"since": "2026-01-01T00:00"}), Reason.MALFORMED, "zone"),
    (lambda r: r.command("logs", {"level": "loud"}), Reason.MALFORMED, "loud"),
]


def test_refused_commands_are_answered_with_their_reason(
    hub: FakeHub, repo: RepositorySimulator, state_dir: Path
) -> None:
    with running_agent(state_dir) as (runner, agent):
        _connected(hub)
        for make, reason, detail in REFUSALS:
            command = make(repo)
            hub.send_command(DEVICE, repo_message(repo, command))
            result = hub.command_result(str(command.signed["command_id"]))
            assert not result.ok, command
            assert result.reason is reason, (command, result)
            assert detail in result.detail, result
        refused = runner.call(lambda: dict(agent.commands_refused))
        assert sum(refused.values()) == len(REFUSALS)
        # Still listening: the next good command runs.
        hub.send_command(DEVICE, repo_message(repo, repo.command("ping", seq=50)))
        assert hub.command_result("cmd-0050").ok


def test_a_replayed_command_is_refused_and_a_garbled_one_does_not_stop_the_agent(
    hub: FakeHub, repo: RepositorySimulator, state_dir: Path
) -> None:
    with running_agent(state_dir) as (runner, agent):
        _connected(hub)
        ping = repo.command("ping")
        hub.send_command(DEVICE, repo_message(repo, ping))
        answer = hub.command_result("cmd-0001")
        assert answer.ok
        assert answer.result["uptime_s"] >= 0
        hub.send_command(DEVICE, repo_message(repo, ping))
        hub.wait_for(lambda: len(hub.command_results) == 2)
        assert hub.command_results[-1][1].reason is Reason.REPLAY
        # A lower seq than the last one run is a replay too, even if never seen before.
        hub.send_command(DEVICE, repo_message(repo, repo.command("ping", seq=1)))
        hub.wait_for(lambda: len(hub.command_results) == 3)
        assert hub.command_results[-1][1].reason is Reason.REPLAY
        before = runner.call(lambda: agent.malformed_received)
        hub.send_command(DEVICE, b'{"v": 1, "kind": "command"}')
        hub.wait_for(lambda: runner.call(lambda: agent.malformed_received) > before)
        hub.send_command(DEVICE, repo_message(repo, repo.command("ping")))
        assert hub.command_result("cmd-0002").ok
