"""``outpost-hub token create|list|revoke`` and ``outpost-hub audit``: API tokens with roles,
and the log of mutating API calls. Both go through the hub's API with an admin token, so
making and revoking tokens is itself in the audit log.

``hub.cli`` registers ``token`` and ``audit`` on ``main``; this module imports
``hub.cli_client``, never ``hub.cli``, so there is no import cycle.
"""

from datetime import UTC, datetime
from typing import Any

import click

from hub.auth.roles import Role
from hub.auth.schemas import MAX_TTL_DAYS
from hub.cli_client import client
from hub.cli_device_commands import parse_since


@click.group()
def token() -> None:
    """API tokens with a role: viewer (reads), deployer (models and deployments), admin."""


def _when(value: str | None, never: str = "never") -> str:
    return value[:19].replace("T", " ") if value else never


def _state(t: dict[str, Any]) -> str:
    if t.get("revoked_at"):
        return "revoked"
    expires = t.get("expires_at")
    if expires and datetime.fromisoformat(expires) <= datetime.now(UTC):
        return "expired"
    return "active"


def _since_option(ctx: click.Context, param: click.Parameter, value: str | None) -> datetime | None:
    if value is None:
        return None
    try:
        return parse_since(value, now=datetime.now(UTC))
    except ValueError as exc:
        raise click.BadParameter(str(exc), ctx, param) from None


@token.command("create")
@click.option("--name", required=True, help="what will use it: ci, grafana, alice")
@click.option("--role", type=click.Choice([r.value for r in Role]), required=True)
@click.option(
    "--ttl-days",
    type=click.IntRange(1, MAX_TTL_DAYS),
    default=None,
    help="days until it expires (default: never)",
)
@click.pass_context
def token_create(ctx: click.Context, name: str, role: str, ttl_days: int | None) -> None:
    """Create a token; it is printed once (stdout), the hub keeps only its hash."""
    body = client(ctx).json(
        "POST", "/api/v1/tokens", json={"name": name, "role": role, "ttl_days": ttl_days}
    )
    click.echo(body["token"])
    click.echo(
        f"token {body['id']} ({body['name']}, {body['role']}), expires"
        f" {_when(body['expires_at'])}; it is not shown again",
        err=True,
    )


@token.command("list")
@click.option("--all", "include_revoked", is_flag=True, help="include revoked tokens")
@click.pass_context
def token_list(ctx: click.Context, include_revoked: bool) -> None:
    """API tokens, newest first (never the tokens themselves)."""
    rows = client(ctx).json("GET", "/api/v1/tokens", params={"revoked": include_revoked})
    click.echo(f"{'ID':<13} {'NAME':<20} {'ROLE':<9} {'STATE':<8} {'EXPIRES':<20} LAST USED")
    for t in rows:
        click.echo(
            f"{t['id']:<13} {t['name']:<20} {t['role']:<9} {_state(t):<8}"
            f" {_when(t['expires_at']):<20} {_when(t['last_used_at'])}"
        )


@token.command("revoke")
@click.argument("token_id")
@click.pass_context
def token_revoke(ctx: click.Context, token_id: str) -> None:
    """Refuse TOKEN_ID from now on."""
    body = client(ctx).json("POST", f"/api/v1/tokens/{token_id}/revoke")
    click.echo(f"revoked token {body['id']} ({body['name']}, {body['role']})")


@click.command()
@click.option(
    "--since", callback=_since_option, help="ISO time or a duration back from now: 10m, 2h, 1d"
)
@click.option("--limit", type=click.IntRange(1, 10_000), default=50, show_default=True)
@click.option("--token-id", help="only calls made with this token")
@click.option("--refused", is_flag=True, help="only refused calls (401, 403)")
@click.pass_context
def audit(
    ctx: click.Context, since: datetime | None, limit: int, token_id: str | None, refused: bool
) -> None:
    """Mutating API calls, newest first: when, who, what and the answer."""
    params: dict[str, Any] = {"limit": limit}
    if since is not None:
        params["since"] = since.isoformat()
    if token_id:
        params["token_id"] = token_id
    if refused:
        params["refused"] = True
    for e in client(ctx).json("GET", "/api/v1/audit", params=params):
        who = f"{e['token_name']}({e['token_id']})" if e["role"] else f"-({e['token_id'] or '-'})"
        role = e["role"] or "-"
        actor = f" as {e['actor']}" if e["actor"] else ""
        click.echo(
            f"{_when(e['at'])}  {e['status_code']}  {e['method']:<6} {e['path']}  "
            f"{who} {role}{actor} from {e['client'] or '?'}"
        )
