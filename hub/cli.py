"""``outpost-hub``: run the hub, manage its keys and database, and drive it over HTTP.

Local commands (serve, db, keys) work on ``--data-dir``; the rest talk to a running hub at
``--hub`` with the admin token from ``OUTPOST_HUB_TOKEN`` or ``<data-dir>/admin.token``.
User errors print one line and exit 2.
"""

import logging
import os
import sys
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any, NoReturn

import click
import httpx

from hub.errors import HubError
from hub.settings import HubSettings

DEFAULT_HUB_URL = "http://127.0.0.1:8780"
EXIT_USAGE = 2
EXIT_FAILED = 1
EXIT_TIMEOUT = 3
POLL_S = 0.5


class CliError(click.ClickException):
    exit_code = EXIT_USAGE


def _fail(message: str) -> NoReturn:
    raise CliError(message)


def _settings(data_dir: Path | None) -> HubSettings:
    try:
        return HubSettings(data_dir=data_dir) if data_dir is not None else HubSettings()
    except ValueError as exc:
        _fail(f"invalid settings: {exc}")


data_dir_option = click.option(
    "--data-dir",
    type=click.Path(file_okay=False, path_type=Path),
    envvar="OUTPOST_HUB_DATA_DIR",
    default=None,
    help="hub data directory (default ./var/hub)",
)


class HubClient:
    """The hub's REST API, with errors turned into one-line CLI errors."""

    def __init__(self, base_url: str, token: str | None) -> None:
        headers = {"Authorization": f"Bearer {token}"} if token else {}
        self.base_url = base_url
        self._http = httpx.Client(base_url=base_url, headers=headers, timeout=60.0)

    def request(self, method: str, path: str, **kwargs: Any) -> httpx.Response:
        try:
            response = self._http.request(method, path, **kwargs)
        except httpx.TransportError as exc:
            _fail(f"cannot reach the hub at {self.base_url}: {exc}")
        if response.status_code >= 400:
            try:
                detail = response.json().get("detail", response.text)
            except ValueError:
                detail = response.text
            _fail(f"hub refused ({response.status_code}): {detail}")
        return response

    def json(self, method: str, path: str, **kwargs: Any) -> Any:
        return self.request(method, path, **kwargs).json()


@click.group()
@click.option("--hub", "hub_url", envvar="OUTPOST_HUB_URL", default=DEFAULT_HUB_URL)
@data_dir_option
@click.option("-v", "--verbose", is_flag=True, help="log at INFO")
@click.pass_context
def main(ctx: click.Context, hub_url: str, data_dir: Path | None, verbose: bool) -> None:
    """Outpost hub: ship signed models to edge devices."""
    logging.basicConfig(level=logging.INFO if verbose else logging.WARNING)
    ctx.obj = {"hub_url": hub_url.rstrip("/"), "data_dir": data_dir}


def _client(ctx: click.Context) -> HubClient:
    token = os.environ.get("OUTPOST_HUB_TOKEN")
    if not token:
        token_path = _settings(ctx.obj["data_dir"]).admin_token_path
        try:
            token = token_path.read_text(encoding="utf-8").strip()
        except OSError:
            _fail(
                f"no admin token: set OUTPOST_HUB_TOKEN or point --data-dir at the hub's data "
                f"({token_path} not readable)"
            )
    return HubClient(ctx.obj["hub_url"], token)


def _local_settings(ctx: click.Context, data_dir: Path | None) -> HubSettings:
    return _settings(data_dir if data_dir is not None else ctx.obj["data_dir"])


# -- serve and db ---------------------------------------------------------------------------


@main.command()
@data_dir_option
@click.option("--host", default=None, help="API bind address (default from settings)")
@click.option("--port", type=int, default=None, help="API port (default from settings)")
@click.pass_context
def serve(ctx: click.Context, data_dir: Path | None, host: str | None, port: int | None) -> None:
    """Run the hub (API, embedded broker unless a broker URL is set, MQTT side)."""
    import uvicorn

    from hub.main import create_app

    logging.getLogger().setLevel(logging.INFO)
    settings = _local_settings(ctx, data_dir)
    app = create_app(settings)
    # uvicorn turns Ctrl-C into a lifespan shutdown, which stops the MQTT side and mosquitto.
    uvicorn.run(
        app,
        host=host or settings.api.host,
        port=port or settings.api.port,
        log_level="info",
    )


@main.group()
def db() -> None:
    """Database schema."""


@db.command("upgrade")
@data_dir_option
@click.pass_context
def db_upgrade(ctx: click.Context, data_dir: Path | None) -> None:
    """Apply the migrations to the configured database."""
    from hub.migrations.runner import upgrade

    settings = _local_settings(ctx, data_dir)
    settings.data_dir.mkdir(parents=True, exist_ok=True)
    upgrade(settings.resolved_database_url)
    click.echo("database is up to date")


# -- keys -------------------------------------------------------------------------------------


@main.group()
def keys() -> None:
    """Signing keys (root, release, director) and the keyring."""


def _keystore(ctx: click.Context, data_dir: Path | None) -> Any:
    from hub.signing.keystore import KeyStore

    return KeyStore(_local_settings(ctx, data_dir).keys_dir)


@keys.command("init")
@data_dir_option
@click.option("--force", is_flag=True, help="replace existing keys (devices must re-enrol)")
@click.pass_context
def keys_init(ctx: click.Context, data_dir: Path | None, force: bool) -> None:
    """Create the keys and a root-signed keyring."""
    settings = _local_settings(ctx, data_dir)
    store = _keystore(ctx, data_dir)
    try:
        store.init(keyring_ttl_days=settings.signing.keyring_ttl_days, force=force)
    except HubError as exc:
        _fail(exc.detail)
    _print_key_status(store)


def _print_key_status(store: Any) -> None:
    try:
        status = store.status()
    except HubError as exc:
        _fail(exc.detail)
    click.echo(f"keys in {store.keys_dir}")
    click.echo(f"keyring version {status.keyring_version}, expires {status.expires_at:%Y-%m-%d}")
    for role, keyid in (
        ("root", status.root_keyid),
        ("release", status.release_keyid),
        ("director", status.director_keyid),
    ):
        present = "online" if status.private_present[role] else "OFFLINE"
        exported = " (exported)" if status.exported.get(role) else ""
        click.echo(f"  {role:<9} {keyid[:16]}  private key {present}{exported}")


@keys.command("show")
@data_dir_option
@click.pass_context
def keys_show(ctx: click.Context, data_dir: Path | None) -> None:
    """Key ids, keyring expiry and which private keys are on this hub."""
    _print_key_status(_keystore(ctx, data_dir))


ROLE_CHOICE = click.Choice(["root", "release"])


@keys.command("export")
@data_dir_option
@click.option("--role", type=ROLE_CHOICE, required=True)
@click.option("--out", type=click.Path(dir_okay=False, path_type=Path), required=True)
@click.pass_context
def keys_export(ctx: click.Context, data_dir: Path | None, role: str, out: Path) -> None:
    """Write a private key to FILE (PEM, mode 0600) for offline keeping."""
    from hub.signing.keystore import OfflineRole

    try:
        _keystore(ctx, data_dir).export(OfflineRole(role), out)
    except HubError as exc:
        _fail(exc.detail)
    click.echo(f"exported the {role} key to {out}")


@keys.command("remove")
@data_dir_option
@click.option("--role", type=ROLE_CHOICE, required=True)
@click.option("--yes", is_flag=True, help="remove even if it was never exported")
@click.pass_context
def keys_remove(ctx: click.Context, data_dir: Path | None, role: str, yes: bool) -> None:
    """Take a private key offline (the director key always stays)."""
    from hub.signing.keystore import OfflineRole

    try:
        _keystore(ctx, data_dir).remove(OfflineRole(role), yes=yes)
    except HubError as exc:
        _fail(exc.detail)
    click.echo(f"removed the {role} private key from this hub")


@keys.command("import")
@data_dir_option
@click.option("--role", type=ROLE_CHOICE, required=True)
@click.option("--file", "pem_file", type=click.Path(dir_okay=False, path_type=Path), required=True)
@click.pass_context
def keys_import(ctx: click.Context, data_dir: Path | None, role: str, pem_file: Path) -> None:
    """Bring an exported key back online."""
    from hub.signing.keystore import OfflineRole

    try:
        _keystore(ctx, data_dir).import_key(OfflineRole(role), pem_file)
    except HubError as exc:
        _fail(exc.detail)
    click.echo(f"the {role} key is online again")


# -- models -----------------------------------------------------------------------------------


@main.group()
def model() -> None:
    """The model registry."""


def _split_ref(ref: str) -> tuple[str, str]:
    name, _, version = ref.partition(":")
    return name, version or "latest"


def _open(path: Path) -> Any:
    try:
        return path.open("rb")
    except OSError as exc:
        _fail(f"cannot read {path}: {exc.strerror}")


@model.command("register")
@click.argument("paths", nargs=-1, required=True, type=click.Path(path_type=Path))
@click.option("--name", required=True)
@click.option("--framework", type=click.Choice(["onnx", "tflite"]), required=True)
@click.option("--sample-input", type=click.Path(path_type=Path), required=True)
@click.option("--expected-output", type=click.Path(path_type=Path), required=True)
@click.option("--tag", "tags", multiple=True, help="key=value, repeatable")
@click.option("--description", default="")
@click.pass_context
def model_register(
    ctx: click.Context,
    paths: Sequence[Path],
    name: str,
    framework: str,
    sample_input: Path,
    expected_output: Path,
    tags: Sequence[str],
    description: str,
) -> None:
    """Register model file(s) as the next version of NAME (the first file is the model)."""
    client = _client(ctx)
    handles = [_open(p) for p in (*paths, sample_input, expected_output)]
    try:
        files: list[tuple[str, tuple[str, Any]]] = [
            ("files", (p.name, h)) for p, h in zip(paths, handles, strict=False)
        ]
        files.append(("sample_input", (sample_input.name, handles[-2])))
        files.append(("expected_output", (expected_output.name, handles[-1])))
        data: dict[str, Any] = {
            "name": name,
            "framework": framework,
            "description": description,
            "tags": list(tags),
        }
        body = client.json("POST", "/api/v1/models", data=data, files=files)
    finally:
        for h in handles:
            h.close()
    click.echo(f"registered {body['name']}:{body['version']}")


@model.command("list")
@click.pass_context
def model_list(ctx: click.Context) -> None:
    """Registered models, newest version of each."""
    for m in _client(ctx).json("GET", "/api/v1/models"):
        tags = " ".join(f"{k}={v}" for k, v in sorted(m["tags"].items()))
        click.echo(f"{m['name']:<24} v{m['latest_version']:<4} {m['framework']:<7} {tags}")


@model.command("show")
@click.argument("ref")
@click.pass_context
def model_show(ctx: click.Context, ref: str) -> None:
    """Details of NAME[:VERSION] (latest by default)."""
    name, version = _split_ref(ref)
    m = _client(ctx).json("GET", f"/api/v1/models/{name}/{version}")
    click.echo(f"{m['name']}:{m['version']}  {m['framework']}  registered {m['created_at']}")
    if m["description"]:
        click.echo(f"  {m['description']}")
    for k, v in sorted(m["tags"].items()):
        click.echo(f"  tag {k}={v}")
    for io_name in ("inputs", "outputs"):
        for t in m["signature"].get(io_name, []):
            click.echo(f"  {io_name[:-1]:<6} {t['name']} {t['dtype']} {t['shape']}")
    for f in m["files"]:
        click.echo(f"  file   {f['path']}  {f['size']} bytes  sha256 {f['sha256'][:16]}")


@model.command("download")
@click.argument("ref")
@click.option("--out", type=click.Path(file_okay=False, path_type=Path), required=True)
@click.pass_context
def model_download(ctx: click.Context, ref: str, out: Path) -> None:
    """Download every file of NAME:VERSION into DIR."""
    client = _client(ctx)
    name, version = _split_ref(ref)
    m = client.json("GET", f"/api/v1/models/{name}/{version}")
    try:
        out.mkdir(parents=True, exist_ok=True)
        for f in m["files"]:
            data = client.request(
                "GET", f"/api/v1/models/{name}/{m['version']}/files/{f['path']}"
            ).content
            (out / f["path"]).write_bytes(data)
    except OSError as exc:
        _fail(f"cannot write to {out}: {exc.strerror}")
    click.echo(f"downloaded {name}:{m['version']} ({len(m['files'])} files) to {out}")


# -- devices ----------------------------------------------------------------------------------


@main.group()
def device() -> None:
    """Devices and enrolment."""


@device.command("token")
@click.option("--uses", type=int, default=1, show_default=True)
@click.option("--ttl-s", type=int, default=24 * 3600, show_default=True)
@click.pass_context
def device_token(ctx: click.Context, uses: int, ttl_s: int) -> None:
    """Create an enrolment token (shown once)."""
    body = _client(ctx).json(
        "POST", "/api/v1/enrollment-tokens", json={"uses": uses, "ttl_s": ttl_s}
    )
    click.echo(body["token"])
    click.echo(f"valid for {body['uses']} enrolment(s) until {body['expires_at']}", err=True)


@device.command("list")
@click.pass_context
def device_list(ctx: click.Context) -> None:
    """Enrolled devices with their online flag and active models."""
    for d in _client(ctx).json("GET", "/api/v1/devices"):
        state = d.get("reported_state") or {}
        active = ",".join(f"{m['model']}:{m['version']}" for m in state.get("active", []))
        online = "online" if d["online"] else "offline"
        click.echo(
            f"{d['id']:<18} {d['name'] or '-':<16} {online:<8} "
            f"last seen {d['last_seen'] or 'never'}  {active}"
        )


# -- deployments ------------------------------------------------------------------------------


def _progress_line(dep: dict[str, Any]) -> str:
    total = len(dep["devices"])
    parts = [f"{dep['model']}:{dep['version']} {dep['id']}"]
    counts = dep["counts"]
    parts.append(f"active {counts.get('active', 0)}/{total}")
    if counts.get("failed"):
        parts.append(f"failed {counts['failed']}")
    moving = [d for d in dep["devices"] if d["step"] not in ("active", "failed")]
    if len(moving) <= 3:
        for d in moving:
            downloading = d["step"] == "downloading" and d["progress"] is not None
            pct = f" {d['progress'] * 100:.0f}%" if downloading else ""
            parts.append(f"{d['device_id']} {d['step']}{pct}")
    else:
        for step in sorted({d["step"] for d in moving}):
            parts.append(f"{step} {sum(1 for d in moving if d['step'] == step)}")
    return "  ".join(parts)


def _print_failures(dep: dict[str, Any]) -> None:
    for d in dep["devices"]:
        if d["step"] in ("failed", "timed_out"):
            why = d["reason"] or d["step"]
            click.echo(f"  {d['device_id']}: {why} {d['detail']}".rstrip())


def _wait(client: HubClient, deployment_id: str, timeout_s: float) -> int:
    deadline = time.monotonic() + timeout_s
    interactive = sys.stdout.isatty()
    last = ""
    while True:
        dep = client.json("GET", f"/api/v1/deployments/{deployment_id}")
        line = _progress_line(dep)
        if interactive:
            # Redraw one line in place; pad so a shorter line erases the longer one before it.
            click.echo("\r" + line.ljust(len(last)), nl=False)
        elif line != last:
            click.echo(line)
        last = line
        if dep["done"]:
            if interactive:
                click.echo()
            if dep["ok"]:
                click.echo(f"deployment {deployment_id}: all {len(dep['devices'])} active")
                return 0
            counts = dep["counts"]
            click.echo(
                f"deployment {deployment_id}: {counts.get('failed', 0)} failed,"
                f" {counts.get('timed_out', 0)} timed out"
            )
            _print_failures(dep)
            return EXIT_FAILED
        if time.monotonic() > deadline:
            if interactive:
                click.echo()
            pending = [
                d["device_id"]
                for d in dep["devices"]
                if d["step"] not in ("active", "failed", "timed_out")
            ]
            click.echo(
                f"timed out after {timeout_s:g}s waiting for {deployment_id}; "
                f"still pending: {', '.join(pending)}"
            )
            _print_failures(dep)
            return EXIT_TIMEOUT
        time.sleep(POLL_S)


@main.command()
@click.argument("ref")
@click.argument("more_devices", nargs=-1, metavar="[ID]...")
@click.option(
    "--device", "devices", multiple=True, help="device id; repeatable, or a comma-separated list"
)
@click.option("--wait", is_flag=True, help="follow the rollout until every device is done")
@click.option("--timeout", "timeout_s", type=float, default=600.0, show_default=True)
@click.option(
    "--device-timeout",
    "device_timeout_s",
    type=click.IntRange(1),
    default=3600,
    show_default=True,
    help="seconds after which a device that is not active or failed ends timed_out",
)
@click.option("--dry-run", is_flag=True, help="show what it would do (targets, skips, bytes)")
@click.option("--select", "selector", help="devices with all these tags, e.g. site=plant-3,hw=rpi4")
@click.pass_context
def deploy(
    ctx: click.Context,
    ref: str,
    more_devices: Sequence[str],
    devices: Sequence[str],
    wait: bool,
    timeout_s: float,
    device_timeout_s: int,
    dry_run: bool,
    selector: str | None,
) -> None:
    """Deploy NAME[:VERSION] to devices: `deploy iris:2 --device ID [ID]...`."""
    # `--device a b c`, `--device a --device b` and `--device a,b` all name the same devices.
    devices = [d for item in (*devices, *more_devices) for d in item.split(",") if d]
    if not devices and not selector:
        _fail("name the devices with --device ID, or select them with --select key=value,...")
    client = _client(ctx)
    name, version = _split_ref(ref)
    if version != "latest" and not version.isdigit():
        _fail(f"version must be a number, not {version!r}")
    request = {
        "model": name,
        "version": None if version == "latest" else int(version),
        "devices": list(devices),
        "selector": selector,
        "device_timeout_s": device_timeout_s,
    }
    if dry_run:
        _print_dry_run(client.json("POST", "/api/v1/deployments/dry-run", json=request))
        return
    body = client.json("POST", "/api/v1/deployments", json=request)
    click.echo(
        f"deployment {body['id']}: {body['model']}:{body['version']}"
        f" to {len(body['devices'])} device(s)"
    )
    if wait:
        ctx.exit(_wait(client, body["id"], timeout_s))


def _print_dry_run(plan: dict[str, Any]) -> None:
    targeted, skipped = plan["targeted"], plan["skipped"]
    built = "" if plan["package_digest"] else " (estimated: not packaged yet)"
    click.echo(
        f"dry run {plan['model']}:{plan['version']}: {len(targeted)} targeted,"
        f" {len(skipped)} skipped; package {_mib(plan['package_bytes'])}{built},"
        f" {_mib(plan['bytes_from_hub'])} from the hub, {_mib(plan['bytes_to_devices'])}"
        " to devices"
    )
    for d in targeted:
        click.echo(f"  + {d['device_id']}  {d['why']}".rstrip())
    for d in skipped:
        click.echo(f"  - {d['device_id']}  {d['why']}")


def _mib(size: int) -> str:
    return f"{size / (1024 * 1024):.2f} MiB"


@main.group()
def deployment() -> None:
    """Deployments."""


@deployment.command("show")
@click.argument("deployment_id")
@click.pass_context
def deployment_show(ctx: click.Context, deployment_id: str) -> None:
    """Per-device progress of a deployment."""
    dep = _client(ctx).json("GET", f"/api/v1/deployments/{deployment_id}")
    state = "ok" if dep["ok"] else ("done" if dep["done"] else "in progress")
    click.echo(f"{dep['id']}  {dep['model']}:{dep['version']}  {state}  {dep['counts']}")
    for d in dep["devices"]:
        pct = f" {d['progress'] * 100:.0f}%" if d["progress"] is not None else ""
        why = f"  {d['reason'] or ''} {d['detail']}".rstrip() if d["step"] == "failed" else ""
        click.echo(f"  {d['device_id']:<18} {d['step']}{pct}{why}")


@deployment.command("logs")
@click.argument("deployment_id")
@click.option("--limit", type=click.IntRange(1, 10_000), default=1000, show_default=True)
@click.pass_context
def deployment_logs(ctx: click.Context, deployment_id: str, limit: int) -> None:
    """What each device reported for a deployment, in the order the hub received it."""
    events = _client(ctx).json(
        "GET", f"/api/v1/deployments/{deployment_id}/events", params={"limit": limit}
    )
    for e in events:
        pct = f" {e['progress'] * 100:.0f}%" if e["progress"] is not None else ""
        why = f" {e['reason'] or ''} {e['detail']}".rstrip()
        click.echo(f"{e['received_at']}  {e['device_id']:<18} {e['step']}{pct}{why}")
    if not events:
        click.echo(f"no events yet for {deployment_id}")


@deployment.command("wait")
@click.argument("deployment_id")
@click.option("--timeout", "timeout_s", type=float, default=600.0, show_default=True)
@click.pass_context
def deployment_wait(ctx: click.Context, deployment_id: str, timeout_s: float) -> None:
    """Follow a deployment until every device is done; exit 1 on failures, 3 on timeout."""
    ctx.exit(_wait(_client(ctx), deployment_id, timeout_s))


if __name__ == "__main__":
    main()
