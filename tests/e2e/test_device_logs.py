"""``outpost-hub device logs`` and ``device ping`` end to end: the CLI, the hub's API, a signed
command over the real broker, the real agent reading its own log book, the answer back on
``req``. And a command sent while the device is offline runs when it is back."""

import json
import logging

import pytest

from tests.support.live_hub import LiveHub

pytestmark = pytest.mark.e2e


@pytest.fixture(autouse=True)
def agent_info_logs(caplog: pytest.LogCaptureFixture) -> None:
    # The daemon logs at INFO (agent.main); pytest leaves the root logger at WARNING, and a
    # benchmark's smoke test in the same process may have set the agent's loggers to ERROR.
    caplog.set_level(logging.INFO)
    caplog.set_level(logging.INFO, logger="agent")


def test_device_logs_and_ping_from_the_cli(live_hub: LiveHub) -> None:
    runner = live_hub.start_agent("logger")
    agent = runner.agent
    assert agent is not None
    live_hub.wait_until(lambda: live_hub.device(agent.device_id)["online"], 30, "online")

    ping = live_hub.cli("device", "ping", agent.device_id, "--timeout", "20")
    assert ping.exit_code == 0, ping.output

    result = live_hub.cli("device", "logs", agent.device_id, "--tail", "3", "--timeout", "20")
    assert result.exit_code == 0, result.output
    print(ping.output, result.output)  # for -s
    lines = [line for line in result.output.splitlines() if line.strip()]
    assert len([line for line in lines if " INFO " in line or " WARNING " in line]) <= 3
    assert any("running command logs" in line for line in lines), result.output
    assert any("running command ping" in line for line in lines), result.output

    as_json = live_hub.cli(
        "device", "logs", agent.device_id, "--level", "info", "--json", "--timeout", "20"
    )
    assert as_json.exit_code == 0, as_json.output
    entries = json.loads(as_json.output)["entries"]
    assert any(e["message"].startswith("running command logs") for e in entries)
    assert all(e["level"] in ("INFO", "WARNING", "ERROR", "CRITICAL") for e in entries)

    bad = live_hub.cli("device", "logs", agent.device_id, "--since", "last tuesday")
    assert bad.exit_code != 0
    assert "since" in bad.output.lower()


def test_a_command_for_an_offline_device_runs_when_it_is_back(live_hub: LiveHub) -> None:
    runner = live_hub.start_agent("sleepy")
    agent = runner.agent
    assert agent is not None
    device_id = agent.device_id
    live_hub.wait_until(lambda: live_hub.device(device_id)["online"], 30, "online")
    runner.stop()
    live_hub.wait_until(lambda: not live_hub.device(device_id)["online"], 30, "offline")

    with live_hub.api as client:
        created = client.post(
            f"/api/v1/devices/{device_id}/commands",
            json={"action": "logs", "args": {"tail": 10}, "ttl_s": 120},
        )
    assert created.status_code == 202, created.text
    command_id = created.json()["id"]

    back = runner.again()
    back.start()
    live_hub.agents.append(back)

    def answered() -> bool:
        with live_hub.api as client:
            state = client.get(f"/api/v1/devices/{device_id}/commands/{command_id}").json()
        return bool(state["state"] == "succeeded")

    live_hub.wait_until(answered, 30, "the command answered after the device came back")
