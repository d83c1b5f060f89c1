"""Agent-side enrolment against a scripted hub: one request for a fleet, trust checked before
anything is written, and state dirs that cannot take an identity refused before the hub is
asked."""

import json
import threading
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

import pytest

import agent.enroll as enroll_module
from agent.enroll import DeviceRequest, enroll, enroll_many
from agent.errors import AgentError, EnrollmentError
from agent.protocol.keys import SigningKey
from agent.state import StateDir
from tests.support.repository import NOW, RepositorySimulator


class ScriptedHub:
    """Answers every POST with the next prepared (status, body), recording what it was sent."""

    def __init__(self) -> None:
        self.answers: list[tuple[int, Any]] = []
        self.requests: list[tuple[str, dict[str, Any]]] = []
        outer = self

        class Handler(BaseHTTPRequestHandler):
            def do_POST(self) -> None:
                body = json.loads(self.rfile.read(int(self.headers["content-length"])))
                outer.requests.append((self.path, body))
                status, answer = outer.answers.pop(0)
                data = json.dumps(answer).encode()
                self.send_response(status)
                self.send_header("content-type", "application/json")
                self.send_header("content-length", str(len(data)))
                self.end_headers()
                self.wfile.write(data)

            def log_message(self, format: str, *args: Any) -> None:
                pass

        self._server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self._server.server_address[1]}"
        self._thread = threading.Thread(
            target=self._server.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True
        )
        self._thread.start()

    def close(self) -> None:
        self._server.shutdown()
        self._server.server_close()


@pytest.fixture
def hub() -> Iterator[ScriptedHub]:
    server = ScriptedHub()
    try:
        yield server
    finally:
        server.close()


@pytest.fixture
def repo() -> RepositorySimulator:
    return RepositorySimulator()


def _identity(repo: RepositorySimulator, device_id: str, **overrides: Any) -> dict[str, Any]:
    answer = {
        "device_id": device_id,
        "broker": {"host": "127.0.0.1", "port": 1883, "username": device_id, "password": "pw"},
        "topic_root": "outpost",
        "root_public_key": repo.root.public_b64,
        "keyring": repo.keyring().model_dump(mode="json"),
    }
    answer.update(overrides)
    return answer


def _fleet(tmp_path: Path, count: int) -> list[tuple[StateDir, DeviceRequest]]:
    return [
        (
            StateDir(tmp_path / f"dev-{i}"),
            DeviceRequest(
                name=f"d{i}",
                device_class="rpi4" if i % 2 else "generic",
                tags={"site": "plant-1", "slot": str(i)},
            ),
        )
        for i in range(count)
    ]


def _nothing_written(devices: list[tuple[StateDir, DeviceRequest]]) -> bool:
    return not any(state.root.exists() for state, _ in devices)


def test_one_request_enrols_the_fleet_and_stores_each_identity_in_order(
    hub: ScriptedHub, repo: RepositorySimulator, tmp_path: Path
) -> None:
    devices = _fleet(tmp_path, 3)
    ids = [f"dev-00000000000{i}" for i in range(3)]
    hub.answers.append((201, {"devices": [_identity(repo, i) for i in ids]}))

    identities = enroll_many(hub_url=hub.url + "/", token="tok", devices=devices, now=NOW)

    assert len(hub.requests) == 1
    path, body = hub.requests[0]
    assert path == "/api/v1/enroll/bulk"
    assert body == {
        "token": "tok",
        "devices": [
            {
                "name": f"d{i}",
                "device_class": r.device_class,
                "tags": {"site": "plant-1", "slot": str(i)},
            }
            for i, (_, r) in enumerate(devices)
        ],
    }
    assert [i.device_id for i in identities] == ids
    for (state, request), identity in zip(devices, identities, strict=True):
        assert state.load_identity() == identity
        assert identity.device_class == request.device_class
        assert identity.hub_url == hub.url + "/"
        assert state.load_keyring() == repo.keyring()
        assert state.scoring_keys().primary


def test_the_keyring_is_verified_once_for_a_fleet(
    hub: ScriptedHub, repo: RepositorySimulator, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    calls: list[str] = []
    real = enroll_module.verify_keyring

    def counting(*args: Any, **kwargs: Any) -> Any:
        calls.append("verify")
        return real(*args, **kwargs)

    monkeypatch.setattr(enroll_module, "verify_keyring", counting)
    devices = _fleet(tmp_path, 5)
    hub.answers.append(
        (201, {"devices": [_identity(repo, f"dev-00000000000{i}") for i in range(5)]})
    )
    enroll_many(hub_url=hub.url, token="tok", devices=devices, now=NOW)
    assert calls == ["verify"]


def test_a_state_dir_with_an_identity_is_refused_before_the_hub_is_asked(
    hub: ScriptedHub, repo: RepositorySimulator, tmp_path: Path
) -> None:
    devices = _fleet(tmp_path, 3)
    hub.answers.append((201, {"devices": [_identity(repo, "dev-000000000001")]}))
    enroll_many(hub_url=hub.url, token="tok", devices=devices[1:2], now=NOW)

    with pytest.raises(EnrollmentError, match=r"dev-1 already holds an identity"):
        enroll_many(hub_url=hub.url, token="tok", devices=devices, now=NOW)
    assert len(hub.requests) == 1  # only the first, successful call reached the hub
    assert not devices[0][0].root.exists()


def test_the_same_state_dir_twice_is_refused(hub: ScriptedHub, tmp_path: Path) -> None:
    state = StateDir(tmp_path / "dev")
    with pytest.raises(EnrollmentError, match="given for two devices"):
        enroll_many(
            hub_url=hub.url,
            token="tok",
            devices=[(state, DeviceRequest("a")), (StateDir(tmp_path / "dev"), DeviceRequest("b"))],
            now=NOW,
        )
    assert hub.requests == []


def test_a_refusal_by_the_hub_is_reported_and_nothing_is_written(
    hub: ScriptedHub, tmp_path: Path
) -> None:
    devices = _fleet(tmp_path, 2)
    detail = "enrolment token is unknown, expired or has fewer than 2 uses left"
    hub.answers.append((401, {"detail": detail, "code": "unauthorized"}))
    with pytest.raises(EnrollmentError, match=r"\(401\).*fewer than 2 uses left"):
        enroll_many(hub_url=hub.url, token="tok", devices=devices, now=NOW)
    assert _nothing_written(devices)


def test_an_answer_for_fewer_devices_than_asked_is_refused(
    hub: ScriptedHub, repo: RepositorySimulator, tmp_path: Path
) -> None:
    devices = _fleet(tmp_path, 2)
    hub.answers.append((201, {"devices": [_identity(repo, "dev-000000000001")]}))
    with pytest.raises(EnrollmentError, match="asked the hub for 2 devices and it answered with 1"):
        enroll_many(hub_url=hub.url, token="tok", devices=devices, now=NOW)
    assert _nothing_written(devices)


def test_a_keyring_not_signed_by_the_root_key_is_refused_before_anything_is_written(
    hub: ScriptedHub, repo: RepositorySimulator, tmp_path: Path
) -> None:
    devices = _fleet(tmp_path, 2)
    forged = repo.keyring(signer=SigningKey.generate()).model_dump(mode="json")
    answers = [
        _identity(repo, "dev-000000000001"),
        _identity(repo, "dev-000000000002", keyring=forged),
    ]
    hub.answers.append((201, {"devices": answers}))
    with pytest.raises(AgentError, match="not signed by the pinned root key"):
        enroll_many(hub_url=hub.url, token="tok", devices=devices, now=NOW)
    assert _nothing_written(devices)


def test_a_pinned_root_fingerprint_that_does_not_match_is_refused(
    hub: ScriptedHub, repo: RepositorySimulator, tmp_path: Path
) -> None:
    devices = _fleet(tmp_path, 1)
    hub.answers.append((201, {"devices": [_identity(repo, "dev-000000000001")]}))
    with pytest.raises(EnrollmentError, match="does not match the pinned"):
        enroll_many(hub_url=hub.url, token="tok", devices=devices, now=NOW, root_fingerprint="00ff")
    assert _nothing_written(devices)


def test_identities_that_cannot_be_written_are_counted_and_the_rest_stored(
    hub: ScriptedHub, repo: RepositorySimulator, tmp_path: Path
) -> None:
    blocker = tmp_path / "not-a-dir"
    blocker.write_text("a file where a state dir's parent should be")
    devices = _fleet(tmp_path, 3)
    devices[1] = (StateDir(blocker / "dev-1"), devices[1][1])
    hub.answers.append(
        (201, {"devices": [_identity(repo, f"dev-00000000000{i}") for i in range(3)]})
    )
    with pytest.raises(EnrollmentError, match=r"could not store 1 of 3 identities.*not-a-dir"):
        enroll_many(hub_url=hub.url, token="tok", devices=devices, now=NOW)
    assert devices[0][0].load_identity().device_id == "dev-000000000000"
    assert devices[2][0].load_identity().device_id == "dev-000000000002"


def test_an_empty_fleet_asks_nothing(hub: ScriptedHub) -> None:
    assert enroll_many(hub_url=hub.url, token="tok", devices=[], now=NOW) == []
    assert hub.requests == []


def test_single_enrolment_sends_tags(
    hub: ScriptedHub, repo: RepositorySimulator, tmp_path: Path
) -> None:
    hub.answers.append((201, _identity(repo, "dev-000000000001")))
    state = StateDir(tmp_path / "dev")
    identity = enroll(
        hub_url=hub.url, token="tok", state=state, now=NOW, name="cam", tags={"hw": "rpi4"}
    )
    assert hub.requests == [
        (
            "/api/v1/enroll",
            {"token": "tok", "name": "cam", "device_class": "generic", "tags": {"hw": "rpi4"}},
        )
    ]
    assert state.load_identity() == identity
