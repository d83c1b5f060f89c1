"""THREATS E4: every API route without a token, with malformed and wrong credentials, an
expired and a revoked token, a device's broker password and an enrolment token, and with each
role: 0 unauthorized 2xx. A route that is neither guarded nor on the allowlist fails the test.
Each role can do what it is for; tokens are shown once, stored hashed, expire and are revoked;
the API serves HTTPS by configuration and the CLI trusts the hub's CA by option."""

import base64
import datetime as dt
import re
import socket
import threading
import time
from collections import Counter
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import httpx
import pytest
import uvicorn
from click.testing import CliRunner, Result
from fastapi import FastAPI
from fastapi.routing import APIRoute, iter_route_contexts
from pydantic import ValidationError
from sqlalchemy import text
from sqlmodel import Session

from hub.auth.models import ApiToken
from hub.auth.policy import PUBLIC_ROUTES, required_role
from hub.auth.roles import Role
from hub.auth.tokens import hash_token
from hub.cli import api_server_options, main
from hub.cli_client import CliError
from hub.database import utcnow
from hub.dependencies import require_role
from hub.main import create_app
from hub.messaging.publisher import RecordingPublisher
from hub.security.ca import DeviceCA
from hub.settings import ApiSettings, HubSettings

from .conftest import RunningHub, ServedHub

if TYPE_CHECKING:
    from fastapi.dependencies.models import Dependant

    from examples.build_example_model import IrisModel

WRITE_METHODS = {"POST", "PUT", "PATCH", "DELETE"}


def _routes(app: FastAPI) -> list[tuple[str, str, Any]]:
    """(method, path template, route) for every route the app serves, included routers too."""
    out = []
    for rc in iter_route_contexts(app.routes):
        methods = set(rc.methods or ())
        if "GET" in methods:
            methods.discard("HEAD")  # Starlette adds HEAD beside GET; it is the same route
        for method in sorted(methods):
            out.append((method, str(rc.path), rc.original_route))
    return out


def _calls(dependant: "Dependant") -> Iterator[Any]:
    for dep in dependant.dependencies:
        yield dep.call
        yield from _calls(dep)


def _guarded(route: Any) -> bool:
    return isinstance(route, APIRoute) and require_role in set(_calls(route.dependant))


def _url(path: str) -> str:
    return re.sub(r"\{[^}]+\}", "probe", path)


@dataclass
class Creds:
    """Authorization header values by case name; ``roles`` say which are valid and as what."""

    headers: dict[str, str | None]
    roles: dict[str, Role]
    ids: dict[str, str]


def _token(hub: RunningHub, name: str, role: Role, ttl_days: int | None = None) -> dict[str, Any]:
    response = hub.client.post(
        "/api/v1/tokens", json={"name": name, "role": role, "ttl_days": ttl_days}
    )
    assert response.status_code == 201, response.text
    body: dict[str, Any] = response.json()
    return body


@pytest.fixture
def creds(running_hub: RunningHub) -> Creds:
    hub = running_hub
    made = {role: _token(hub, f"t-{role}", role) for role in Role}
    expired = _token(hub, "expired", Role.ADMIN, ttl_days=1)
    with Session(hub.ctx.engine) as session:
        row = session.get(ApiToken, expired["id"])
        assert row is not None
        row.expires_at = utcnow() - dt.timedelta(seconds=1)
        session.add(row)
        session.commit()
    revoked = _token(hub, "revoked", Role.ADMIN)
    assert hub.client.post(f"/api/v1/tokens/{revoked['id']}/revoke").status_code == 200
    device = hub.enroll("victim")
    enrolment = hub.client.post("/api/v1/enrollment-tokens", json={"uses": 5}).json()["token"]
    admin_file = hub.ctx.admin_token
    viewer = made[Role.VIEWER]
    basic = base64.b64encode(b"admin:" + admin_file.encode()).decode()
    headers: dict[str, str | None] = {
        "none": None,
        "malformed: Basic scheme": f"Basic {basic}",
        "malformed: Bearer and nothing": "Bearer",
        "malformed: admin token without a scheme": admin_file,
        "malformed: admin token under another scheme": f"Token {admin_file}",
        "wrong: garbage": "Bearer not-a-token",
        "wrong: a viewer's id with another secret": f"Bearer opt_{viewer['id']}_{'A' * 43}",
        "wrong: an unknown id": f"Bearer opt_000000000000_{viewer['token'][-43:]}",
        "wrong: the admin token with a byte changed": "Bearer "
        + admin_file[:-1]
        + ("x" if admin_file[-1] != "x" else "y"),
        "wrong: a token's hash as the token": f"Bearer {hash_token(made[Role.ADMIN]['token'])}",
        "wrong: a device's broker password": f"Bearer {device['broker']['password']}",
        "wrong: an enrolment token": f"Bearer {enrolment}",
        "expired admin token": f"Bearer {expired['token']}",
        "revoked admin token": f"Bearer {revoked['token']}",
    }
    roles: dict[str, Role] = {}
    for role in Role:
        headers[f"role {role}"] = f"Bearer {made[role]['token']}"
        roles[f"role {role}"] = role
    headers["admin.token file"] = f"Bearer {admin_file}"
    roles["admin.token file"] = Role.ADMIN
    return Creds(headers=headers, roles=roles, ids={r: made[r]["id"] for r in Role})


def _unguarded(app: FastAPI) -> list[str]:
    return [
        f"{m} {p}" for m, p, r in _routes(app) if (m, p) not in PUBLIC_ROUTES and not _guarded(r)
    ]


def test_every_route_is_guarded_or_on_the_allowlist(running_hub: RunningHub) -> None:
    app = running_hub.client.app
    assert isinstance(app, FastAPI)
    routes = _routes(app)
    unguarded = _unguarded(app)
    assert unguarded == [], (
        "routes without require_role and not in hub.auth.policy.PUBLIC_ROUTES: "
        + ", ".join(unguarded)
    )
    # The dependency reads the route's own path: it must be the path the app serves, or the
    # policy would judge another path than the one called (a router included with a prefix).
    for _, path, route in routes:
        assert getattr(route, "path", path) == path
    # And the OpenAPI document says which operations take a bearer token.
    spec = app.openapi()
    assert spec["components"]["securitySchemes"]["HTTPBearer"]["scheme"] == "bearer"
    for method, path, route in routes:
        if not isinstance(route, APIRoute) or not route.include_in_schema:
            continue
        operation = spec["paths"][path.replace(":path", "")][method.lower()]
        assert bool(operation.get("security")) == ((method, path) not in PUBLIC_ROUTES), path


def test_the_check_catches_a_route_added_without_auth(running_hub: RunningHub) -> None:
    app = running_hub.client.app
    assert isinstance(app, FastAPI)
    assert _unguarded(app) == []

    @app.post("/api/v1/widgets")
    def make_widget() -> dict[str, str]:
        return {"made": "yes"}

    assert _unguarded(app) == ["POST /api/v1/widgets"]
    running_hub.client.headers.pop("Authorization")
    assert running_hub.client.post("/api/v1/widgets").status_code == 200  # open indeed


def test_no_route_answers_2xx_without_the_right_credentials(
    running_hub: RunningHub, creds: Creds
) -> None:
    app = running_hub.client.app
    assert isinstance(app, FastAPI)
    http = running_hub.client
    http.headers.pop("Authorization")  # each request sends only what its case sends
    guarded = [(m, p) for m, p, _ in _routes(app) if (m, p) not in PUBLIC_ROUTES]
    requests = 0
    unauthorized_2xx: list[str] = []
    wrong_status: list[str] = []
    outcomes: Counter[str] = Counter()
    for method, path in guarded:
        needed = required_role(method, path)
        for case, header in creds.headers.items():
            response = http.request(
                method,
                _url(path),
                headers={"Authorization": header} if header is not None else {},
                json={} if method in WRITE_METHODS else None,
            )
            requests += 1
            role = creds.roles.get(case)
            expected: int | None
            if role is None:
                expected = 401
            elif not role.allows(needed):
                expected = 403
            else:
                expected = None  # allowed: anything but 401/403 (404, 422 for probe values)
            got = response.status_code
            if expected is not None and 200 <= got < 300:
                unauthorized_2xx.append(f"{method} {path} [{case}] -> {got}")
            if expected is not None and got != expected:
                wrong_status.append(f"{method} {path} [{case}] -> {got}, wanted {expected}")
            if expected is None and got in (401, 403):
                wrong_status.append(f"{method} {path} [{case}] refused ({got}) but allowed")
            outcomes[str(got)] += 1
    print(
        f"\nE4: {len(guarded)} guarded routes x {len(creds.headers)} credential cases ="
        f" {requests} requests; unauthorized 2xx: {len(unauthorized_2xx)};"
        f" statuses {dict(sorted(outcomes.items()))}"
    )
    assert unauthorized_2xx == []
    assert wrong_status == []
    assert requests == len(guarded) * len(creds.headers)


def test_the_public_routes_are_few_and_want_their_own_credential(
    running_hub: RunningHub,
) -> None:
    http = running_hub.client
    http.headers.pop("Authorization")
    assert len(PUBLIC_ROUTES) <= 10
    assert all(route.guarded_by for route in PUBLIC_ROUTES.values())
    assert http.get("/healthz").status_code == 200
    for path, body in (
        ("/api/v1/enroll", {"token": "x" * 43}),
        ("/api/v1/enroll/bulk", {"token": "x" * 43, "devices": [{"name": "d"}]}),
    ):
        response = http.post(path, json=body)
        assert response.status_code == 401, response.text
    # Whatever else is public answers no write without its own credential.
    for method, path in PUBLIC_ROUTES:
        if method in WRITE_METHODS:
            response = http.request(method, _url(path), json={})
            assert not 200 <= response.status_code < 300, (method, path, response.text)


def test_each_role_can_do_what_it_is_for_and_no_more(
    running_hub: RunningHub, creds: Creds, iris_model: "IrisModel"
) -> None:
    hub = running_hub
    device_id = hub.enroll("d1")["device_id"]

    def call(case: str, method: str, path: str, **kw: Any) -> httpx.Response:
        header = creds.headers[case]
        assert header is not None
        return hub.client.request(method, path, headers={"Authorization": header}, **kw)

    # viewer: reads, nothing else.
    assert call("role viewer", "GET", "/api/v1/devices").status_code == 200
    assert call("role viewer", "GET", f"/api/v1/devices/{device_id}").status_code == 200
    assert call("role viewer", "GET", "/metrics").status_code == 200
    refused = call("role viewer", "POST", "/api/v1/deployments/dry-run", json={})
    assert refused.status_code == 403
    assert refused.json()["code"] == "forbidden"
    assert "needs the deployer role" in refused.json()["detail"]
    assert call("role viewer", "GET", "/api/v1/tokens").status_code == 403

    # deployer: registers a model, creates a deployment and steers it.
    with (
        iris_model.model.open("rb") as model,
        iris_model.sample_input.open("rb") as sample,
        iris_model.expected_output.open("rb") as expected,
    ):
        registered = call(
            "role deployer",
            "POST",
            "/api/v1/models",
            data={"name": "iris", "framework": "onnx"},
            files=[
                ("files", ("model.onnx", model)),
                ("sample_input", ("sample_input.json", sample)),
                ("expected_output", ("expected_output.json", expected)),
            ],
        )
    assert registered.status_code == 201, registered.text
    created = call(
        "role deployer",
        "POST",
        "/api/v1/deployments",
        json={"model": "iris", "devices": [device_id]},
    )
    assert created.status_code == 201, created.text
    paused = call("role deployer", "POST", f"/api/v1/deployments/{created.json()['id']}/pause")
    assert paused.status_code == 200, paused.text
    for method, path, body in (
        ("POST", "/api/v1/enrollment-tokens", {"uses": 1}),
        ("PATCH", f"/api/v1/devices/{device_id}", {"group": "g"}),
        ("POST", f"/api/v1/devices/{device_id}/commands", {"action": "ping"}),
        ("POST", "/api/v1/tokens", {"name": "x", "role": "viewer"}),
    ):
        assert call("role deployer", method, path, json=body).status_code == 403, path
    assert call("role deployer", "GET", "/api/v1/audit").status_code == 403

    # admin (an API token, not the file): devices, enrolment, tokens, the audit log.
    assert (
        call("role admin", "POST", "/api/v1/enrollment-tokens", json={"uses": 1}).status_code == 201
    )
    patched = call("role admin", "PATCH", f"/api/v1/devices/{device_id}", json={"group": "g"})
    assert patched.status_code == 200, patched.text
    made = call("role admin", "POST", "/api/v1/tokens", json={"name": "y", "role": "viewer"})
    assert made.status_code == 201
    assert call("role admin", "GET", "/api/v1/audit").status_code == 200
    assert (
        call("role admin", "POST", f"/api/v1/tokens/{made.json()['id']}/revoke").status_code == 200
    )


def test_a_token_is_shown_once_stored_hashed_and_stops_at_revocation_and_expiry(
    running_hub: RunningHub,
) -> None:
    hub = running_hub
    made = _token(hub, "ci", Role.DEPLOYER, ttl_days=30)
    token = made["token"]
    assert re.fullmatch(r"opt_[0-9a-f]{12}_[A-Za-z0-9_-]{43}", token)
    expires = dt.datetime.fromisoformat(made["expires_at"])
    assert dt.timedelta(days=29, hours=23) < expires - utcnow() <= dt.timedelta(days=30)
    # Listed without the token; the database holds its SHA-256 only.
    listed = hub.client.get("/api/v1/tokens").json()
    assert [t["id"] for t in listed if t["name"] == "ci"] == [made["id"]]
    assert all("token" not in t and "token_hash" not in t for t in listed)
    with Session(hub.ctx.engine) as session:
        dump = " ".join(
            str(v) for row in session.execute(text("SELECT * FROM api_token")) for v in row
        )
    assert token not in dump
    assert hash_token(token) in dump

    def whoami() -> int:
        return hub.client.get(
            "/api/v1/devices", headers={"Authorization": f"Bearer {token}"}
        ).status_code

    assert whoami() == 200
    revoked = hub.client.post(f"/api/v1/tokens/{made['id']}/revoke")
    assert revoked.status_code == 200
    assert revoked.json()["revoked_at"]
    response = hub.client.get("/api/v1/devices", headers={"Authorization": f"Bearer {token}"})
    assert response.status_code == 401
    assert "revoked" in response.json()["detail"]
    assert response.headers["www-authenticate"] == "Bearer"
    assert hub.client.post(f"/api/v1/tokens/{made['id']}/revoke").status_code == 409
    assert hub.client.post("/api/v1/tokens/0123456789ab/revoke").status_code == 404
    # Revoked tokens are listed only when asked for.
    assert made["id"] not in {t["id"] for t in hub.client.get("/api/v1/tokens").json()}
    everything = hub.client.get("/api/v1/tokens", params={"revoked": True}).json()
    assert made["id"] in {t["id"] for t in everything}

    short = _token(hub, "short", Role.VIEWER, ttl_days=1)
    auth = {"Authorization": f"Bearer {short['token']}"}
    assert hub.client.get("/api/v1/devices", headers=auth).status_code == 200
    with Session(hub.ctx.engine) as session:
        row = session.get(ApiToken, short["id"])
        assert row is not None
        assert row.last_used_at is not None
        row.expires_at = utcnow()
        session.add(row)
        session.commit()
    response = hub.client.get("/api/v1/devices", headers=auth)
    assert response.status_code == 401
    assert "expired" in response.json()["detail"]


@pytest.mark.parametrize(
    "body",
    [
        {"name": "", "role": "viewer"},
        {"name": "a b", "role": "viewer"},
        {"name": "x", "role": "root"},
        {"name": "x", "role": "viewer", "ttl_days": 0},
        {"name": "x", "role": "viewer", "ttl_days": 100_000},
        {"name": "x", "role": "viewer", "extra": 1},
    ],
)
def test_bad_token_requests_are_refused(running_hub: RunningHub, body: dict[str, Any]) -> None:
    assert running_hub.client.post("/api/v1/tokens", json=body).status_code == 422


# -- the CLI --------------------------------------------------------------------------------


def _run(args: list[str], env: dict[str, str] | None = None) -> Result:
    return CliRunner().invoke(main, args, env=env, catch_exceptions=False)


def test_token_cli_create_list_revoke(served_hub: ServedHub) -> None:
    env = {"OUTPOST_HUB_URL": served_hub.url, "OUTPOST_HUB_TOKEN": served_hub.token}
    created = _run(
        ["token", "create", "--role", "deployer", "--name", "ci", "--ttl-days", "7"], env
    )
    assert created.exit_code == 0, created.output
    token = created.stdout.strip()
    assert re.fullmatch(r"opt_([0-9a-f]{12})_\S{43}", token)
    token_id = token.split("_")[1]
    assert "not shown again" in created.stderr
    listed = _run(["token", "list"], env)
    assert listed.exit_code == 0
    line = next(x for x in listed.stdout.splitlines() if x.startswith(token_id))
    assert "ci" in line
    assert "deployer" in line
    assert "active" in line
    assert token not in listed.stdout
    # The new token works for the CLI as OUTPOST_HUB_TOKEN, and only as far as its role.
    as_ci = {"OUTPOST_HUB_URL": served_hub.url, "OUTPOST_HUB_TOKEN": token}
    assert _run(["device", "list"], as_ci).exit_code == 0
    refused = _run(["device", "token"], as_ci)
    assert refused.exit_code == 2
    assert "403" in refused.output
    assert _run(["token", "revoke", token_id], env).exit_code == 0
    gone = _run(["device", "list"], as_ci)
    assert gone.exit_code == 2
    assert "401" in gone.output
    assert "revoked" in gone.output
    assert "revoked" in _run(["token", "list", "--all"], env).stdout
    bad = _run(["token", "create", "--role", "root", "--name", "x"], env)
    assert bad.exit_code == 2


# -- TLS --------------------------------------------------------------------------------------


def _make_ca_and_server_cert(directory: Path) -> tuple[Path, Path, Path]:
    """A CA and a server certificate for loopback signed by it: the hub's own CA code, the
    way the broker's certificate is made."""
    ca = DeviceCA(directory / "ca")
    ca.ensure()
    cert_path, key_path = ca.ensure_server_certificate([], validity=dt.timedelta(days=1))
    return ca.cert_file, cert_path, key_path


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port: int = sock.getsockname()[1]
        return port


def test_api_serves_https_by_configuration_and_the_cli_trusts_the_ca_file(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    ca, cert, key = _make_ca_and_server_cert(tmp_path)
    monkeypatch.setenv("OUTPOST_HUB_API__CERTFILE", str(cert))
    monkeypatch.setenv("OUTPOST_HUB_API__KEYFILE", str(key))
    settings = HubSettings(data_dir=tmp_path / "hub")
    assert settings.api.certfile == cert
    options = api_server_options(settings, port=_free_port())
    assert options["ssl_certfile"] == str(cert)
    assert options["ssl_keyfile"] == str(key)
    app = create_app(settings, publisher=RecordingPublisher())
    server = uvicorn.Server(uvicorn.Config(app, log_level="warning", lifespan="on", **options))
    thread = threading.Thread(target=server.run, name="tls-hub", daemon=True)
    thread.start()
    deadline = time.monotonic() + 20
    while not server.started:
        assert thread.is_alive(), "hub server exited during startup"
        assert time.monotonic() < deadline, "hub server did not start"
        time.sleep(0.02)
    try:
        url = f"https://127.0.0.1:{options['port']}"
        env = {"OUTPOST_HUB_URL": url, "OUTPOST_HUB_TOKEN": app.state.hub.admin_token}
        trusted = _run(["--ca-file", str(ca), "token", "list"], env)
        assert trusted.exit_code == 0, trusted.output
        via_env = _run(["token", "list"], env | {"OUTPOST_HUB_CA_FILE": str(ca)})
        assert via_env.exit_code == 0, via_env.output
        # Without the CA the certificate is not trusted; plain HTTP gets no answer.
        untrusted = _run(["token", "list"], env)
        assert untrusted.exit_code == 2
        assert "CERTIFICATE_VERIFY_FAILED" in untrusted.output
        plain = _run(["token", "list"], env | {"OUTPOST_HUB_URL": url.replace("https", "http")})
        assert plain.exit_code == 2
        assert "cannot reach the hub" in plain.output
        missing = _run(["--ca-file", str(tmp_path / "nope.pem"), "token", "list"], env)
        assert missing.exit_code == 2
        assert "CA file" in missing.output
    finally:
        server.should_exit = True
        thread.join(10)


def test_tls_settings_and_options_go_in_pairs_of_readable_files(tmp_path: Path) -> None:
    with pytest.raises(ValidationError, match="certfile and keyfile go together"):
        ApiSettings(certfile=tmp_path / "c.pem")
    settings = HubSettings(data_dir=tmp_path)
    assert "ssl_certfile" not in api_server_options(settings)
    with pytest.raises(CliError, match="go together"):
        api_server_options(settings, certfile=tmp_path / "c.pem")
    with pytest.raises(CliError, match="not a readable file"):
        api_server_options(settings, certfile=tmp_path / "c.pem", keyfile=tmp_path / "k.pem")


@pytest.mark.parametrize(
    ("method", "path", "role"),
    [
        ("GET", "/api/v1/devices", Role.VIEWER),
        ("GET", "/metrics", Role.VIEWER),
        ("HEAD", "/api/v1/models", Role.VIEWER),
        ("GET", "/api/v1/tokens", Role.ADMIN),
        ("GET", "/api/v1/audit", Role.ADMIN),
        ("GET", "/api/v1/enrollment-tokens/anything", Role.ADMIN),
        ("GET", "/api/v1/tokensmith", Role.VIEWER),  # a prefix is a path segment, not a string
        ("POST", "/api/v1/models", Role.DEPLOYER),
        ("POST", "/api/v1/models/{name}/{version}/retire", Role.ADMIN),  # exact, not a prefix
        ("POST", "/api/v1/deployments", Role.DEPLOYER),
        ("POST", "/api/v1/deployments/{deployment_id}/pause", Role.DEPLOYER),
        ("DELETE", "/api/v1/deployments/{deployment_id}", Role.ADMIN),
        ("PATCH", "/api/v1/devices/{device_id}", Role.ADMIN),
        ("POST", "/api/v1/devices/{device_id}/commands", Role.ADMIN),
        ("PUT", "/api/v1/something/new", Role.ADMIN),  # an unknown write fails closed
    ],
)
def test_the_role_each_route_needs(method: str, path: str, role: Role) -> None:
    assert required_role(method, path) == role
