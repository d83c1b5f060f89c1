"""``outpost-hub``: run the hub, manage its keys and database, and drive it over HTTP.

Local commands (serve, db, keys) work on ``--data-dir``; the rest talk to a running hub at
``--hub`` with the admin token from ``OUTPOST_HUB_TOKEN`` or ``<data-dir>/admin.token``
(``hub.cli_client``). User errors print one line and exit 2. ``deploy`` and ``deployment``
live in ``hub.cli_deploy`` and ``hub.cli_deployments`` and are registered on ``main`` here.
"""

import gc
import logging
import os
import re
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import click

from hub.cli_client import (
    EXIT_FAILED,
    EXIT_TIMEOUT,
    EXIT_USAGE,
    client,
    fail,
    settings_for,
    split_ref,
)
from hub.cli_data import data
from hub.cli_deploy import deploy
from hub.cli_deployments import deployment
from hub.cli_device_commands import device_logs, device_ping
from hub.cli_enroll import ENROLL_COMMANDS
from hub.cli_keys import keys
from hub.cli_tokens import audit, token
from hub.devices.schemas import GROUP_PATTERN, check_tags
from hub.settings import HubSettings

# Re-exported: scripts and tests read the exit codes from here.
__all__ = ["EXIT_FAILED", "EXIT_TIMEOUT", "EXIT_USAGE", "main"]

DEFAULT_HUB_URL = "http://127.0.0.1:8780"
# Allocations between two young-generation collections (Python: 700).
GC_GEN0_THRESHOLD = 10_000

data_dir_option = click.option(
    "--data-dir",
    type=click.Path(file_okay=False, path_type=Path),
    envvar="OUTPOST_HUB_DATA_DIR",
    default=None,
    help="hub data directory (default ./var/hub)",
)


@click.group()
@click.option("--hub", "hub_url", envvar="OUTPOST_HUB_URL", default=DEFAULT_HUB_URL)
@data_dir_option
@click.option(
    "--ca-file",
    type=click.Path(dir_okay=False, path_type=Path),
    envvar="OUTPOST_HUB_CA_FILE",
    default=None,
    help="PEM CA bundle to trust for an https --hub (default: the system's)",
)
@click.option("-v", "--verbose", is_flag=True, help="log at INFO")
@click.pass_context
def main(
    ctx: click.Context, hub_url: str, data_dir: Path | None, ca_file: Path | None, verbose: bool
) -> None:
    """Outpost hub: ship signed models to edge devices."""
    logging.basicConfig(level=logging.INFO if verbose else logging.WARNING)
    ctx.obj = {"hub_url": hub_url.rstrip("/"), "data_dir": data_dir, "ca_file": ca_file}


main.add_command(deploy)
main.add_command(deployment)
main.add_command(data)
main.add_command(token)
main.add_command(audit)
main.add_command(keys)


def _local_settings(ctx: click.Context, data_dir: Path | None) -> HubSettings:
    return settings_for(data_dir if data_dir is not None else ctx.obj["data_dir"])


# -- serve and db ---------------------------------------------------------------------------


def tune_gc() -> None:
    """For a long-running hub: the objects of start-up (modules, the app, SQLAlchemy's and
    pydantic's caches) are set aside from the cyclic collector, and it runs less often. Ingest
    allocates a few hundred objects a message; with the defaults the collector took about a
    third of the hub's time per message, walking start-up's objects again and again."""
    gc.collect()
    gc.freeze()
    gc.set_threshold(GC_GEN0_THRESHOLD, *gc.get_threshold()[1:])


def api_server_options(
    settings: HubSettings,
    *,
    host: str | None = None,
    port: int | None = None,
    certfile: Path | None = None,
    keyfile: Path | None = None,
) -> dict[str, Any]:
    """uvicorn's options for the API: the options given win over the settings; with a
    certificate and key (both or neither) it serves HTTPS only."""
    if (certfile is None) != (keyfile is None):
        fail("--certfile and --keyfile go together: give both or neither")
    if certfile is None:
        certfile, keyfile = settings.api.certfile, settings.api.keyfile
    options: dict[str, Any] = {
        "host": host or settings.api.host,
        "port": port or settings.api.port,
    }
    if certfile is not None and keyfile is not None:
        for what, path in (("certificate", certfile), ("key", keyfile)):
            if not path.is_file() or not os.access(path, os.R_OK):
                fail(f"API TLS {what} {path} is not a readable file")
        options |= {"ssl_certfile": str(certfile), "ssl_keyfile": str(keyfile)}
    return options


TLS_FILE = click.Path(dir_okay=False, path_type=Path)


@main.command()
@data_dir_option
@click.option("--host", default=None, help="API bind address (default from settings)")
@click.option("--port", type=int, default=None, help="API port (default from settings)")
@click.option("--certfile", type=TLS_FILE, default=None, help="PEM certificate: serve HTTPS")
@click.option("--keyfile", type=TLS_FILE, default=None, help="PEM private key of --certfile")
@click.pass_context
def serve(
    ctx: click.Context,
    data_dir: Path | None,
    host: str | None,
    port: int | None,
    certfile: Path | None,
    keyfile: Path | None,
) -> None:
    """Run the hub (API, embedded broker unless a broker URL is set, MQTT side)."""
    import uvicorn

    from hub.main import create_app

    logging.getLogger().setLevel(logging.INFO)
    settings = _local_settings(ctx, data_dir)
    options = api_server_options(settings, host=host, port=port, certfile=certfile, keyfile=keyfile)
    app = create_app(settings)
    tune_gc()
    # uvicorn turns Ctrl-C into a lifespan shutdown, which stops the MQTT side and mosquitto.
    uvicorn.run(app, log_level="info", **options)


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


# -- models -----------------------------------------------------------------------------------


@main.group()
def model() -> None:
    """The model registry."""


def _open(path: Path) -> Any:
    try:
        return path.open("rb")
    except OSError as exc:
        fail(f"cannot read {path}: {exc.strerror}")


@model.command("register")
@click.argument("paths", nargs=-1, required=True, type=click.Path(path_type=Path))
@click.option("--name", required=True)
@click.option("--framework", type=click.Choice(["onnx", "tflite"]), required=True)
@click.option("--sample-input", type=click.Path(path_type=Path), required=True)
@click.option("--expected-output", type=click.Path(path_type=Path), required=True)
@click.option("--tag", "tags", multiple=True, help="key=value, repeatable")
@click.option("--description", default="")
@click.option(
    "--entry-script",
    type=click.Path(path_type=Path),
    help="score.py with init() and run(raw_data): devices run the model through it",
)
@click.option(
    "--requirement",
    "requirements",
    multiple=True,
    help="a PEP 508 requirement of the entry script (e.g. 'pillow>=10'), repeatable",
)
@click.option(
    "--requirements-file",
    type=click.Path(path_type=Path),
    help="a requirements.txt of the entry script (names and version ranges only)",
)
@click.option(
    "--option",
    "options",
    multiple=True,
    help="a runtime option key=value (e.g. timeout_ms=2000, threads=2), repeatable",
)
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
    entry_script: Path | None,
    requirements: Sequence[str],
    requirements_file: Path | None,
    options: Sequence[str],
) -> None:
    """Register model file(s) as the next version of NAME (the first file is the model).

    Further files (a script's helper modules, label lists) go into the package beside it.
    """
    wanted = list(requirements)
    if requirements_file is not None:
        wanted += _requirements_file(requirements_file)
    api = client(ctx)
    handles = [_open(p) for p in (*paths, sample_input, expected_output)]
    if entry_script is not None:
        handles.append(_open(entry_script))
    try:
        files: list[tuple[str, tuple[str, Any]]] = [
            ("files", (p.name, h)) for p, h in zip(paths, handles, strict=False)
        ]
        files.append(("sample_input", (sample_input.name, handles[len(paths)])))
        files.append(("expected_output", (expected_output.name, handles[len(paths) + 1])))
        if entry_script is not None:
            files.append(("entry_script", (entry_script.name, handles[-1])))
        data: dict[str, Any] = {
            "name": name,
            "framework": framework,
            "description": description,
            "tags": list(tags),
            "requirements": wanted,
            "options": list(options),
        }
        body = api.json("POST", "/api/v1/models", data=data, files=files)
    finally:
        for h in handles:
            h.close()
    click.echo(f"registered {body['name']}:{body['version']} ({_describe_runtime(body)})")


def _requirements_file(path: Path) -> list[str]:
    """The requirements of a requirements.txt: one per line, comments and blank lines skipped.
    pip's options (-r, --index-url, ...) name how to install, and a device installs nothing."""
    try:
        text = path.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as exc:
        fail(f"cannot read {path}: {exc}")
    found = []
    for number, line in enumerate(text.splitlines(), start=1):
        spec = line.split(" #", 1)[0].strip()
        if not spec or spec.startswith("#"):
            continue
        if spec.startswith("-"):
            fail(f"{path}:{number}: {spec!r}: only requirements (name and versions) are taken")
        found.append(spec)
    return found


def _describe_runtime(version: dict[str, Any]) -> str:
    """ "script score.py (timeout_ms=2000)" or "built-in onnx runtime"."""
    runtime = version.get("runtime") or {}
    options = " ".join(f"{k}={v}" for k, v in sorted((runtime.get("options") or {}).items()))
    if runtime.get("kind") == "script":
        text = f"script {runtime.get('entry_script')}"
    else:
        text = f"built-in {version['framework']} runtime"
    return f"{text} ({options})" if options else text


@model.command("list")
@click.pass_context
def model_list(ctx: click.Context) -> None:
    """Registered models, newest version of each."""
    for m in client(ctx).json("GET", "/api/v1/models"):
        tags = " ".join(f"{k}={v}" for k, v in sorted(m["tags"].items()))
        click.echo(f"{m['name']:<24} v{m['latest_version']:<4} {m['framework']:<7} {tags}")


@model.command("show")
@click.argument("ref")
@click.pass_context
def model_show(ctx: click.Context, ref: str) -> None:
    """Details of NAME[:VERSION] (latest by default)."""
    name, version = split_ref(ref)
    m = client(ctx).json("GET", f"/api/v1/models/{name}/{version}")
    click.echo(f"{m['name']}:{m['version']}  {m['framework']}  registered {m['created_at']}")
    if m["description"]:
        click.echo(f"  {m['description']}")
    for k, v in sorted(m["tags"].items()):
        click.echo(f"  tag {k}={v}")
    click.echo(f"  runtime {_describe_runtime(m)}")
    for spec in (m.get("runtime") or {}).get("requirements", []):
        click.echo(f"  needs  {spec}")
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
    api = client(ctx)
    name, version = split_ref(ref)
    m = api.json("GET", f"/api/v1/models/{name}/{version}")
    try:
        out.mkdir(parents=True, exist_ok=True)
        for f in m["files"]:
            data = api.request(
                "GET", f"/api/v1/models/{name}/{m['version']}/files/{f['path']}"
            ).content
            (out / f["path"]).write_bytes(data)
    except OSError as exc:
        fail(f"cannot write to {out}: {exc.strerror}")
    click.echo(f"downloaded {name}:{m['version']} ({len(m['files'])} files) to {out}")


# -- devices ----------------------------------------------------------------------------------


@main.group()
def device() -> None:
    """Devices and enrolment, and one-off commands to a device (logs, ping)."""


device.add_command(device_logs)
device.add_command(device_ping)
for _command in ENROLL_COMMANDS:  # tokens, pending, accept, disable, enable
    device.add_command(_command)


@device.command("token")
@click.option("--uses", type=int, default=1, show_default=True)
@click.option("--ttl-s", type=int, default=24 * 3600, show_default=True)
@click.pass_context
def device_token(ctx: click.Context, uses: int, ttl_s: int) -> None:
    """Create an enrolment token (shown once)."""
    body = client(ctx).json(
        "POST", "/api/v1/enrollment-tokens", json={"uses": uses, "ttl_s": ttl_s}
    )
    click.echo(body["token"])
    click.echo(f"valid for {body['uses']} enrolment(s) until {body['expires_at']}", err=True)


def _group_option(ctx: click.Context, param: click.Parameter, value: str | None) -> str | None:
    """A group name, checked as the hub checks it, so a typo is refused naming the option."""
    if value is not None and not re.fullmatch(GROUP_PATTERN, value):
        raise click.BadParameter(
            f"{value!r} is not a group name (1-63 of a-z 0-9 . _ - starting with a letter or"
            " digit)",
            ctx,
            param,
        )
    return value


def _tag_options(
    ctx: click.Context, param: click.Parameter, values: Sequence[str]
) -> dict[str, str]:
    """``--tag k=v`` (repeatable) as a dict, each checked like a device's tag."""
    tags: dict[str, str] = {}
    for item in values:
        key, sep, value = item.partition("=")
        if not sep:
            raise click.BadParameter(f"{item!r} is not key=value", ctx, param)
        if key in tags:
            raise click.BadParameter(f"tag {key!r} is given twice", ctx, param)
        tags[key] = value
    try:
        return check_tags(tags)
    except ValueError as exc:
        raise click.BadParameter(str(exc), ctx, param) from None


def _active(d: dict[str, Any]) -> str:
    state = d.get("reported_state") or {}
    return ",".join(f"{m['model']}:{m['version']}" for m in state.get("active", []))


@device.command("list")
@click.option("--group", callback=_group_option, help="only the members of this group")
@click.option(
    "--tag", "tags", multiple=True, callback=_tag_options, help="key=value; repeat for several"
)
@click.pass_context
def device_list(ctx: click.Context, group: str | None, tags: dict[str, str]) -> None:
    """Enrolled devices with their group, online flag and active models."""
    params: dict[str, Any] = {"tag": [f"{k}={v}" for k, v in tags.items()]}
    if group is not None:
        params["group"] = group
    for d in client(ctx).json("GET", "/api/v1/devices", params=params):
        online = "online" if d["online"] else "offline"
        click.echo(
            f"{d['id']:<18} {d['name'] or '-':<16} {d.get('group') or '-':<12} {online:<8} "
            f"last seen {d['last_seen'] or 'never'}  {_active(d)}"
        )


def _print_device(d: dict[str, Any]) -> None:
    online = "online" if d["online"] else "offline"
    click.echo(
        f"{d['id']}  {d['name'] or '-'}  class {d['device_class']}  group {d['group'] or '-'}"
        f"  {online}, last seen {d['last_seen'] or 'never'}"
    )
    tags = " ".join(f"{k}={v}" for k, v in sorted(d["tags"].items()))
    click.echo(f"  tags    {tags or '-'}")
    click.echo(f"  runs    {_active(d) or '-'}")
    follows = d.get("follows") or []
    for f in follows:
        mine = f" (this device: {f['device_state']})" if f.get("device_state") else ""
        click.echo(
            f"  follows {f['model']}:{f['version']} from {f['deployment_id']}"
            f"  priority {f['priority']}  {f['state']}{mine}"
        )
    if not follows:
        click.echo("  follows no deployment")


@device.command("show")
@click.argument("device_id")
@click.pass_context
def device_show(ctx: click.Context, device_id: str) -> None:
    """A device: its group, tags, what it runs, and the deployment each of its models
    follows."""
    _print_device(client(ctx).json("GET", f"/api/v1/devices/{device_id}"))


@device.command("set")
@click.argument("device_id")
@click.option("--group", callback=_group_option, help="put the device in this group")
@click.option("--no-group", is_flag=True, help="take the device out of its group")
@click.option(
    "--tag",
    "tags",
    multiple=True,
    callback=_tag_options,
    help="key=value, repeatable: the device's whole new tag set",
)
@click.option("--no-tags", is_flag=True, help="remove every tag")
@click.pass_context
def device_set(
    ctx: click.Context,
    device_id: str,
    group: str | None,
    no_group: bool,
    tags: dict[str, str],
    no_tags: bool,
) -> None:
    """Change a device's group or tags; continuous deployments that follow a group or tag
    selector pick the device up."""
    if group is not None and no_group:
        raise click.BadOptionUsage("no_group", "give --group or --no-group, not both")
    if tags and no_tags:
        raise click.BadOptionUsage("no_tags", "give --tag or --no-tags, not both")
    changes: dict[str, Any] = {}
    if group is not None or no_group:
        changes["group"] = group
    if tags or no_tags:
        changes["tags"] = tags
    if not changes:
        raise click.UsageError("nothing to change: give --group, --no-group, --tag or --no-tags")
    _print_device(client(ctx).json("PATCH", f"/api/v1/devices/{device_id}", json=changes))


if __name__ == "__main__":
    main()
