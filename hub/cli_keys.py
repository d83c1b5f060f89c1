"""``outpost-hub keys``: the hub's signing keys, the keyring, rotation and offline signing.

All of it works on ``--data-dir`` locally, except ``sign-request``, which needs only the request
and a key file (it runs on the offline machine), and the publishing after a rotation, which
asks the running hub at ``--hub`` to send the new keyring to the fleet.
"""

from pathlib import Path
from typing import TYPE_CHECKING

import click

from hub.cli_client import CliError, client, fail, settings_for
from hub.errors import HubError
from hub.settings import HubSettings

if TYPE_CHECKING:
    from hub.signing.keystore import KeyStore, Rotation

data_dir_option = click.option(
    "--data-dir",
    type=click.Path(file_okay=False, path_type=Path),
    envvar="OUTPOST_HUB_DATA_DIR",
    default=None,
    help="hub data directory (default ./var/hub)",
)
ROLE_CHOICE = click.Choice(["root", "release"])
ROTATE_CHOICE = click.Choice(["root", "release", "director"])


@click.group()
def keys() -> None:
    """Signing keys (root, release, director), the keyring and its rotation."""


def _local_settings(ctx: click.Context, data_dir: Path | None) -> HubSettings:
    obj = ctx.find_root().obj or {}
    return settings_for(data_dir if data_dir is not None else obj.get("data_dir"))


def _keystore(ctx: click.Context, data_dir: Path | None) -> "KeyStore":
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
        fail(exc.detail)
    _print_key_status(store)


def _print_key_status(store: "KeyStore") -> None:
    try:
        status = store.status()
    except HubError as exc:
        fail(exc.detail)
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
    if status.pending is not None:
        click.echo(f"waiting for signatures: {status.pending}")
    for request in store.release_requests():
        click.echo(
            f"waiting for a release signature: {request.summary}, request "
            f"{store.keys_dir / 'release-requests' / (request.sha256 + '.json')}"
        )


@keys.command("show")
@data_dir_option
@click.pass_context
def keys_show(ctx: click.Context, data_dir: Path | None) -> None:
    """Key ids, keyring expiry and which private keys are on this hub."""
    _print_key_status(_keystore(ctx, data_dir))


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
        fail(exc.detail)
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
        fail(exc.detail)
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
        fail(exc.detail)
    click.echo(f"the {role} key is online again")


# -- rotation and offline signing -----------------------------------------------------------


def _report(ctx: click.Context, rotation: "Rotation", *, out: Path | None, publish: bool) -> None:
    if not rotation.done:
        if out is not None:
            try:
                out.write_text(rotation.request.model_dump_json(indent=2) + "\n", encoding="utf-8")
            except OSError as exc:
                fail(f"cannot write the request to {out}: {exc}")
            click.echo(f"signing request for keyring version {rotation.version} written to {out}")
        needed = ", ".join(
            f"{g.threshold} of {', '.join(k[:16] for k in g.keyids)} ({g.name})"
            for g in rotation.missing
        )
        click.echo(f"waiting for signatures by: {needed}")
        click.echo(
            "sign it where the key is: outpost-hub keys sign-request REQUEST --key KEY.pem "
            "--out SIG; then here: outpost-hub keys import-signature SIG"
        )
        return
    click.echo(
        f"keyring version {rotation.version} in force: new {rotation.role} key "
        f"{rotation.new_keyid[:16]}"
    )
    if publish:
        _publish(ctx)


def _publish(ctx: click.Context) -> None:
    """Ask the running hub to send the new keyring to every device; a hub that is down sends
    it with each device's desired state when the device next asks."""
    try:
        answer = client(ctx).json("POST", "/api/v1/keys/publish")
    except CliError as exc:
        click.echo(
            f"not published now ({exc.message}); devices get the new keyring with their next "
            "desired state, or run `outpost-hub keys publish` once the hub is up"
        )
        return
    click.echo(f"published keyring version {answer['version']} to {answer['devices']} devices")


@keys.command("rotate")
@data_dir_option
@click.option("--role", type=ROTATE_CHOICE, required=True)
@click.option(
    "--offline",
    is_flag=True,
    help="do not sign with a root key on this hub: write a signing request (--out) instead",
)
@click.option(
    "--out",
    type=click.Path(dir_okay=False, path_type=Path),
    default=None,
    help="where to write the signing request (default keyring-v<N>.request.json)",
)
@click.option("--no-publish", is_flag=True, help="do not ask the running hub to publish it")
@click.pass_context
def keys_rotate(
    ctx: click.Context,
    data_dir: Path | None,
    role: str,
    offline: bool,
    out: Path | None,
    no_publish: bool,
) -> None:
    """A new key for ROLE in the next keyring version, signed by the current root (and the
    new root too when the root itself changes)."""
    from agent.protocol.documents import Role

    settings = _local_settings(ctx, data_dir)
    store = _keystore(ctx, data_dir)
    try:
        rotation = store.rotate(
            Role(role), keyring_ttl_days=settings.signing.keyring_ttl_days, offline=offline
        )
    except HubError as exc:
        fail(exc.detail)
    if not rotation.done and out is None:
        out = Path(f"keyring-v{rotation.version}.request.json")
    _report(ctx, rotation, out=out, publish=not no_publish)


@keys.command("request")
@data_dir_option
@click.option("--out", type=click.Path(dir_okay=False, path_type=Path), required=True)
@click.pass_context
def keys_request(ctx: click.Context, data_dir: Path | None, out: Path) -> None:
    """Write the pending rotation's signing request again (with the signatures so far)."""
    request = _keystore(ctx, data_dir).pending_request()
    if request is None:
        fail("no rotation is waiting for signatures")
    out.write_text(request.model_dump_json(indent=2) + "\n", encoding="utf-8")
    click.echo(f"signing request for {request.label()} written to {out}")


@keys.command("sign-request")
@click.argument("request_file", type=click.Path(dir_okay=False, exists=True, path_type=Path))
@click.option("--key", "key_file", type=click.Path(dir_okay=False, path_type=Path), required=True)
@click.option("--out", type=click.Path(dir_okay=False, path_type=Path), required=True)
def keys_sign_request(request_file: Path, key_file: Path, out: Path) -> None:
    """Sign a request with an offline key (no hub data needed: run it where the key is)."""
    from agent.protocol.keys import SigningKey
    from hub.signing.requests import parse_request, sign_request

    try:
        request = parse_request(request_file.read_bytes(), source=str(request_file))
        try:
            key = SigningKey.from_pem(key_file.read_bytes())
        except (OSError, ValueError) as exc:
            fail(f"cannot read an Ed25519 private key from {key_file}: {exc}")
        answer = sign_request(request, key)
    except HubError as exc:
        fail(exc.detail)
    click.echo(f"signing: {request.summary}")
    click.echo(f"sha256 {request.sha256}")
    try:
        with out.open("x", encoding="utf-8") as fh:
            fh.write(answer.model_dump_json(indent=2) + "\n")
    except FileExistsError:
        fail(f"{out} exists; choose another path")
    click.echo(f"signature by key {key.keyid[:16]} written to {out}")


@keys.command("import-signature")
@data_dir_option
@click.argument("signature_file", type=click.Path(dir_okay=False, exists=True, path_type=Path))
@click.option("--no-publish", is_flag=True, help="do not ask the running hub to publish it")
@click.pass_context
def keys_import_signature(
    ctx: click.Context, data_dir: Path | None, signature_file: Path, no_publish: bool
) -> None:
    """Add an offline signature to the pending rotation or to a waiting package manifest."""
    from hub.signing.keystore import ReleaseSigned
    from hub.signing.requests import parse_signature

    store = _keystore(ctx, data_dir)
    try:
        answer = parse_signature(signature_file.read_bytes(), source=str(signature_file))
        outcome = store.import_signature(answer)
    except HubError as exc:
        fail(exc.detail)
    if isinstance(outcome, ReleaseSigned):
        if outcome.done:
            click.echo(f"signed: {outcome.request.summary}; deploy it again to build the package")
        else:
            click.echo(f"more release signatures needed for {outcome.request.summary}")
        return
    _report(ctx, outcome, out=None, publish=not no_publish)


@keys.command("cancel")
@data_dir_option
@click.pass_context
def keys_cancel(ctx: click.Context, data_dir: Path | None) -> None:
    """Drop the rotation waiting for signatures."""
    try:
        _keystore(ctx, data_dir).cancel_pending()
    except HubError as exc:
        fail(exc.detail)
    click.echo("dropped the pending rotation")


@keys.command("publish")
@click.pass_context
def keys_publish(ctx: click.Context) -> None:
    """Ask the running hub to send the current keyring to every device now."""
    answer = client(ctx).json("POST", "/api/v1/keys/publish")
    click.echo(f"published keyring version {answer['version']} to {answer['devices']} devices")
