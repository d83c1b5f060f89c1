"""``outpost-hub deployment ...``: list rollouts, show their waves, devices and history, follow
them with a progress bar, and pause, resume, promote, abort or roll them back.

``hub.cli`` registers ``deploy`` (``hub.cli_deploy``) and ``deployment`` on its ``main``
group; these modules import ``hub.cli_client`` and ``hub.cli_progress``, never ``hub.cli``, so
there is no import cycle.
"""

from typing import Any

import click

from hub.cli_client import client
from hub.cli_policy import describe_policy
from hub.cli_progress import FAILURES, OUT_OF_PLAY, count, label, wait_for
from hub.deployments.models import DeviceState, RolloutState


@click.group()
def deployment() -> None:
    """Deployments: list, show, history, logs, wait, and pause, resume, promote, abort or roll
    back a rollout."""


@deployment.command("list")
@click.option("--model", help="only deployments of this model")
@click.option("--state", type=click.Choice([s.value for s in RolloutState]))
@click.option("--limit", type=click.IntRange(1, 1000), default=100, show_default=True)
@click.pass_context
def deployment_list(ctx: click.Context, model: str | None, state: str | None, limit: int) -> None:
    """Deployments, newest first."""
    params: dict[str, Any] = {"limit": limit}
    if model:
        params["model"] = model
    if state:
        params["state"] = state
    rows = client(ctx).json("GET", "/api/v1/deployments", params=params)
    for d in rows:
        counts: dict[str, int] = d["counts"]
        in_play = d["total"] - count(counts, *OUT_OF_PLAY)
        failed = count(counts, *FAILURES)
        click.echo(
            f"{d['id']}  {d['model'] + ':' + str(d['version']):<20} {d['state']:<11}"
            f" {counts.get(DeviceState.SUCCEEDED, 0)}/{in_play} succeeded"
            + (f", {failed} failed" if failed else "")
            + f"  {_when(d['created_at'])} by {d['created_by'] or '-'}"
            + ("  continuous" if d["continuous"] else "")
        )
    if not rows:
        click.echo("no deployments")


def _when(stamp: str | None) -> str:
    """An API timestamp to the second, as ``2026-11-25 16:44:44``."""
    return stamp[:19].replace("T", " ") if stamp else "-"


def _print_header(dep: dict[str, Any]) -> None:
    waves = dep["waves"]
    at = ""
    if len(waves) > 1 and dep["state"] in (RolloutState.RUNNING, RolloutState.PAUSED):
        at = f"  at {waves[dep['current_wave']]['name']} ({dep['current_wave'] + 1}/{len(waves)})"
    click.echo(f"{dep['id']}  {dep['model']}:{dep['version']}  {dep['state']}{at}")
    if dep["state_reason"]:
        click.echo(f"  reason: {dep['state_reason']}")
    click.echo(f"  policy: {describe_policy(dep['policy'])}")
    target = [f"selector {dep['selector']}"] if dep["selector"] else []
    if dep["groups"]:
        target.append(f"groups {', '.join(dep['groups'])}")
    extras = [f"priority {dep['priority']}", f"device timeout {dep['device_timeout_s']} s"]
    if dep["continuous"]:
        extras.append("continuous")
    click.echo(
        f"  created {_when(dep['created_at'])} by {dep['created_by'] or '-'}; "
        + "; ".join([*target, *extras])
    )


def _print_waves(dep: dict[str, Any]) -> None:
    waves = dep["waves"]
    present = {s for w in waves for s, n in w["counts"].items() if n}
    states = [s for s in DeviceState if s in present]
    widths = [max(len(label(s)), 4) for s in states]
    head = "".join(f"  {label(s):>{w}}" for s, w in zip(states, widths, strict=True))
    click.echo(f"  {'wave':<10} {'devices':>7}{head}  released finished")
    for w in waves:
        cells = "".join(
            f"  {w['counts'].get(s, 0):>{n}}" for s, n in zip(states, widths, strict=True)
        )
        click.echo(
            f"  {w['name']:<10} {w['devices']:>7}{cells}  {_yes(w['released']):<8} "
            f"{_yes(w['finished'])}"
        )


def _yes(flag: bool) -> str:
    return "yes" if flag else "no"


def _print_device_rows(dep: dict[str, Any]) -> None:
    names = {w["index"]: w["name"] for w in dep["waves"]}
    for d in dep["devices"] or []:
        pct = f"{d['progress'] * 100:.0f}%" if d["progress"] is not None else ""
        why = f"{d['reason'] or ''} {d['detail']}".strip()
        click.echo(
            f"  {d['device_id']:<18} {d['state']:<12} {d['step']:<12} {pct:>4}"
            f"  {names.get(d['wave'], d['wave']):<8}  {why}".rstrip()
        )


@deployment.command("show")
@click.argument("deployment_id")
@click.option("--devices/--no-devices", default=True, help="list every device (default yes)")
@click.pass_context
def deployment_show(ctx: click.Context, deployment_id: str, devices: bool) -> None:
    """A rollout: its state and policy, each wave's counts, and each device."""
    dep = client(ctx).json(
        "GET", f"/api/v1/deployments/{deployment_id}", params={"devices": str(devices).lower()}
    )
    _print_header(dep)
    _print_waves(dep)
    if devices:
        _print_device_rows(dep)


@deployment.command("history")
@click.argument("deployment_id")
@click.pass_context
def deployment_history(ctx: click.Context, deployment_id: str) -> None:
    """Who created, paused, resumed, promoted, aborted or rolled back a deployment, and what
    the rollout did by itself (actor "rollout"), oldest first."""
    for a in client(ctx).json("GET", f"/api/v1/deployments/{deployment_id}/history"):
        click.echo(f"{_when(a['at'])}  {a['actor']:<24} {a['action']:<11} {a['detail']}".rstrip())


@deployment.command("logs")
@click.argument("deployment_id")
@click.option("--limit", type=click.IntRange(1, 10_000), default=1000, show_default=True)
@click.pass_context
def deployment_logs(ctx: click.Context, deployment_id: str, limit: int) -> None:
    """What each device reported for a deployment, in the order the hub received it."""
    events = client(ctx).json(
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
    """Follow a rollout with a progress bar until it is done; exit 1 when it ended with
    failures, aborted or rolled back, 3 on timeout."""
    ctx.exit(wait_for(client(ctx), deployment_id, timeout_s))


def _state_line(dep: dict[str, Any]) -> str:
    waves = dep["waves"]
    at = ""
    if len(waves) > 1 and dep["state"] in (RolloutState.RUNNING, RolloutState.PAUSED):
        at = f" at {waves[dep['current_wave']]['name']} ({dep['current_wave'] + 1}/{len(waves)})"
    reason = f": {dep['state_reason']}" if dep["state_reason"] else ""
    return f"deployment {dep['id']}: {dep['state']}{at}{reason}"


def _control(ctx: click.Context, deployment_id: str, action: str, body: dict[str, Any]) -> None:
    dep = client(ctx).json("POST", f"/api/v1/deployments/{deployment_id}/{action}", json=body)
    click.echo(_state_line(dep))


reason_option = click.option("--reason", default="", help="why; kept in the history")


@deployment.command("pause")
@click.argument("deployment_id")
@reason_option
@click.pass_context
def deployment_pause(ctx: click.Context, deployment_id: str, reason: str) -> None:
    """Release no more devices; those already released carry on."""
    _control(ctx, deployment_id, "pause", {"reason": reason})


@deployment.command("resume")
@click.argument("deployment_id")
@reason_option
@click.pass_context
def deployment_resume(ctx: click.Context, deployment_id: str, reason: str) -> None:
    """Go on releasing a paused rollout."""
    _control(ctx, deployment_id, "resume", {"reason": reason})


@deployment.command("promote")
@click.argument("deployment_id")
@reason_option
@click.option("--all", "all_waves", is_flag=True, help="release every wave left, not only the next")
@click.pass_context
def deployment_promote(
    ctx: click.Context, deployment_id: str, reason: str, all_waves: bool
) -> None:
    """Release the next wave now, without waiting for the current one (a paused rollout runs
    again)."""
    _control(ctx, deployment_id, "promote", {"reason": reason, "all_waves": all_waves})


@deployment.command("abort")
@click.argument("deployment_id")
@reason_option
@click.option(
    "--rollback/--no-rollback",
    default=None,
    help="also send the devices already updated back (default: the rollout's policy)",
)
@click.pass_context
def deployment_abort(
    ctx: click.Context, deployment_id: str, reason: str, rollback: bool | None
) -> None:
    """Stop the rollout: cancel devices not released and send back those still installing."""
    _control(ctx, deployment_id, "abort", {"reason": reason, "rollback": rollback})


@deployment.command("rollback")
@click.argument("deployment_id")
@reason_option
@click.pass_context
def deployment_rollback(ctx: click.Context, deployment_id: str, reason: str) -> None:
    """Send every device the deployment updated back to what it ran before."""
    _control(ctx, deployment_id, "rollback", {"reason": reason})
