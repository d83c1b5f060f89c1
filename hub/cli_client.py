"""The CLI's side of the hub's REST API: the HTTP client, who is acting, and one-line errors.

Shared by ``hub.cli`` (which owns ``main``) and the command modules it registers
(``hub.cli_deployments``); it imports neither, so they import it without a cycle.
"""

import getpass
import os
import socket
import ssl
from pathlib import Path
from typing import Any, NoReturn

import click
import httpx

from hub.settings import HubSettings

EXIT_FAILED = 1  # the command ran and what it followed failed (a rollout with failures)
EXIT_USAGE = 2  # the command could not do what was asked (bad input, hub refused or away)
EXIT_TIMEOUT = 3  # gave up waiting (--timeout)
ACTOR_HEADER = "X-Outpost-Actor"
_MAX_ACTOR_CHARS = 255  # what the hub records


class CliError(click.ClickException):
    exit_code = EXIT_USAGE


def fail(message: str) -> NoReturn:
    raise CliError(message)


def settings_for(data_dir: Path | None) -> HubSettings:
    try:
        return HubSettings(data_dir=data_dir) if data_dir is not None else HubSettings()
    except ValueError as exc:
        fail(f"invalid settings: {exc}")


def actor() -> str:
    """``user@host`` for the ``X-Outpost-Actor`` header: who the deployment history names."""
    try:
        user = getpass.getuser()
    except (KeyError, OSError):  # no login name in the environment or the password database
        user = "unknown"
    text = f"{user}@{socket.gethostname() or 'localhost'}"
    # Header values must be ASCII; an odd user or host name must not stop the command.
    return "".join(c if c.isascii() and c.isprintable() else "?" for c in text)[:_MAX_ACTOR_CHARS]


def _detail(response: httpx.Response) -> str:
    """The hub's reason for refusing, in one line."""
    try:
        body = response.json()
    except ValueError:
        return response.text
    detail = body.get("detail", response.text) if isinstance(body, dict) else response.text
    if isinstance(detail, list):
        # FastAPI's request validation errors: [{"loc": ["body", "tags"], "msg": ...}, ...]
        return "; ".join(
            f"{'.'.join(str(p) for p in e.get('loc', [])[1:]) or 'request'}: {e.get('msg', e)}"
            if isinstance(e, dict)
            else str(e)
            for e in detail
        )
    return str(detail)


class HubClient:
    """The hub's REST API, with errors turned into one-line CLI errors. Every request names
    the acting user (``X-Outpost-Actor``), which the hub records in deployment histories."""

    def __init__(
        self,
        base_url: str,
        token: str | None,
        *,
        acting: str | None = None,
        ca_file: Path | None = None,
    ) -> None:
        headers = {"Authorization": f"Bearer {token}"} if token else {}
        headers[ACTOR_HEADER] = acting if acting is not None else actor()
        self.base_url = base_url
        self._http = httpx.Client(
            base_url=base_url, headers=headers, timeout=60.0, verify=_tls_context(ca_file)
        )

    def request(self, method: str, path: str, **kwargs: Any) -> httpx.Response:
        try:
            response = self._http.request(method, path, **kwargs)
        except httpx.TransportError as exc:
            fail(f"cannot reach the hub at {self.base_url}: {exc}")
        if response.status_code >= 400:
            fail(f"hub refused ({response.status_code}): {_detail(response)}")
        return response

    def json(self, method: str, path: str, **kwargs: Any) -> Any:
        return self.request(method, path, **kwargs).json()


def _tls_context(ca_file: Path | None) -> ssl.SSLContext:
    """Certificates checked against ``ca_file`` (a hub with its own CA) or the system's."""
    try:
        return ssl.create_default_context(cafile=str(ca_file) if ca_file else None)
    except (OSError, ssl.SSLError) as exc:
        fail(f"cannot use {ca_file} as a CA file: {exc}")


def client(ctx: click.Context) -> HubClient:
    """A client for the hub named by ``--hub``, with the API token from ``OUTPOST_HUB_TOKEN``
    (any role: ``outpost-hub token create``) or else the data directory's admin token."""
    obj = ctx.find_root().obj
    token = os.environ.get("OUTPOST_HUB_TOKEN")
    if not token:
        token_path = settings_for(obj["data_dir"]).admin_token_path
        try:
            token = token_path.read_text(encoding="utf-8").strip()
        except OSError:
            fail(
                f"no admin token: set OUTPOST_HUB_TOKEN or point --data-dir at the hub's data "
                f"({token_path} not readable)"
            )
    return HubClient(obj["hub_url"], token, ca_file=obj.get("ca_file"))


def split_ref(ref: str) -> tuple[str, str]:
    """``iris:3`` → ("iris", "3"); ``iris`` → ("iris", "latest")."""
    name, _, version = ref.partition(":")
    return name, version or "latest"
