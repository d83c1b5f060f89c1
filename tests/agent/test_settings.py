"""The agent's settings: defaults < config file < OUTPOST_AGENT_* variables < flags, and errors
that name where a bad value came from."""

from pathlib import Path

import pytest

from agent.errors import SettingsError
from agent.main import main
from agent.settings import AgentSettings
from agent.tlsfiles import TlsMode


def _config(tmp_path: Path, text: str) -> Path:
    path = tmp_path / "agent.toml"
    path.write_text(text, encoding="utf-8")
    return path


def test_defaults_with_no_file_and_no_variables() -> None:
    settings = AgentSettings.load(environ={"PATH": "/usr/bin", "OUTPOSTAGENT_X": "1"})
    assert settings == AgentSettings()
    assert settings.scoring.port == 8791


def test_each_layer_overrides_the_one_below(tmp_path: Path) -> None:
    config = _config(
        tmp_path,
        '[scoring]\nport = 9000\nhost = "0.0.0.0"\n[mqtt]\nkeepalive_s = 40\n',
    )
    settings = AgentSettings.load(
        config,
        environ={"OUTPOST_AGENT_SCORING__PORT": "9001", "OUTPOST_AGENT_STATE_DIR": "/env"},
        state_dir=Path("/flag"),
    )
    assert settings.scoring.port == 9001  # the variable over the file
    assert settings.scoring.host == "0.0.0.0"  # the file's, in the same section
    assert settings.mqtt.keepalive_s == 40
    assert settings.state_dir == Path("/flag")  # the flag over the variable


def test_variables_are_converted_to_the_settings_types_whatever_their_case() -> None:
    settings = AgentSettings.load(
        environ={
            "outpost_agent_mqtt__tls": "off",
            "OUTPOST_AGENT_SCORING__ENABLED": "false",
            "OUTPOST_AGENT_TELEMETRY__INTERVAL_S": "2.5",
            "OUTPOST_AGENT_MQTT__HOST": "broker.local",
        }
    )
    assert settings.mqtt.tls is TlsMode.OFF
    assert settings.scoring.enabled is False
    assert settings.telemetry.interval_s == 2.5
    assert settings.mqtt.host == "broker.local"


@pytest.mark.parametrize(
    ("environ", "expected"),
    [
        (
            {"OUTPOST_AGENT_SCORING__PORT": "eighty"},
            "scoring.port (OUTPOST_AGENT_SCORING__PORT): Input should be a valid integer",
        ),
        (
            {"OUTPOST_AGENT_SCORING__PROT": "8000"},
            "scoring.prot (OUTPOST_AGENT_SCORING__PROT): Extra inputs are not permitted",
        ),
        (
            {"OUTPOST_AGENT_STATEDIR": "/x"},
            "statedir (OUTPOST_AGENT_STATEDIR): Extra inputs are not permitted",
        ),
        (
            {"OUTPOST_AGENT_LOGS__LEVEL": "loud"},
            "logs.level (OUTPOST_AGENT_LOGS__LEVEL): Value error, unknown log level 'loud'",
        ),
        (
            {"OUTPOST_AGENT_SCORING": "on", "OUTPOST_AGENT_SCORING__PORT": "1"},
            "another variable sets",
        ),
    ],
)
def test_a_bad_variable_is_named(environ: dict[str, str], expected: str) -> None:
    with pytest.raises(SettingsError) as caught:
        AgentSettings.load(environ=environ)
    assert expected in str(caught.value)


def test_a_bad_value_in_the_file_names_the_file(tmp_path: Path) -> None:
    config = _config(tmp_path, "[download]\nwindow_chunks = 0\n")
    with pytest.raises(SettingsError, match=r"download\.window_chunks \(config file .*agent\.toml"):
        AgentSettings.load(config, environ={})


@pytest.mark.parametrize(
    ("text", "expected"),
    [(None, "cannot read the config file"), ("[scoring\n", "is not valid TOML")],
)
def test_an_unreadable_or_broken_file_is_a_clear_error(
    tmp_path: Path, text: str | None, expected: str
) -> None:
    config = tmp_path / "agent.toml" if text is None else _config(tmp_path, text)
    with pytest.raises(SettingsError, match=expected):
        AgentSettings.load(config, environ={})


def test_the_command_says_what_is_wrong_and_does_not_start(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    monkeypatch.setenv("OUTPOST_AGENT_SCORING__PORT", "70000")
    assert main(["--state-dir", str(tmp_path), "run"]) == 2
    err = capsys.readouterr().err
    assert err.startswith("outpost-agent: bad settings: scoring.port (OUTPOST_AGENT_SCORING__PORT)")
    assert "Traceback" not in err
