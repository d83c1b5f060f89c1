"""``outpost-hub deploy`` and ``outpost-hub deployment ...``: start staged rollouts, follow them
with a progress bar, show their waves, devices and history, and pause, resume, promote, abort
or roll them back.

``hub.cli`` registers ``deploy`` and ``deployment`` on its ``main`` group; this module imports
``hub.cli_client`` and ``hub.cli_progress`` of the CLI, never ``hub.cli``, so there is no
import cycle.
"""

import math
import re
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import click

from hub.cli_client import client, fail, split_ref
from hub.cli_progress import FAILURES, OUT_OF_PLAY, count, label, wait_for
from hub.deployments.models import DeviceState, RolloutState
from hub.deployments.policy import MAX_SOAK_S
from hub.devices.schemas import GROUP_PATTERN

# -- option values ------------------------------------------------------------------------------


@dataclass(frozen=True)
class Amount:
    """A number of devices (``5``) or a percentage (``5%``) from the command line."""

    count: int | None = None
    percent: float | None = None


Callback = Callable[[click.Context, click.Parameter, str | None], Any]


def count_or_percent(*, min_count: int, ratio: bool = False) -> Callback:
    """An option callback for ``N`` (at least ``min_count``) or ``N%``. A percentage is above
    0 and at most 100; with ``ratio`` (a failure threshold) it is 0 or more and below 100,
    since a threshold of 100% could never be passed."""

    def convert(ctx: click.Context, param: click.Parameter, value: str | None) -> Amount | None:
        if value is None:
            return None
        text = value.strip()
        if text.endswith("%"):
            try:
                percent = float(text[:-1])
            except ValueError:
                raise click.BadParameter(f"{value!r} is not a percentage like 10%") from None
            low_ok = percent >= 0 if ratio else percent > 0
            high_ok = percent < 100 if ratio else percent <= 100
            if not (math.isfinite(percent) and low_ok and high_ok):
                bounds = "0% or more and below 100%" if ratio else "above 0% and at most 100%"
                raise click.BadParameter(f"{text} must be {bounds}")
            return Amount(percent=percent)
        try:
            number = int(text)
        except ValueError:
            raise click.BadParameter(
                f"{value!r} is not a number of devices (N) or a percentage (N%)"
            ) from None
        if number < min_count:
            raise click.BadParameter(f"{number} is below {min_count}")
        return Amount(count=number)

    return convert


def exponential_rate(
    ctx: click.Context, param: click.Parameter, value: str | None
) -> dict[str, Any] | None:
    """``FIRST[,FACTOR[,MAX]]`` as the policy's ``exponential``: waves of FIRST devices, each
    FACTOR times the one before (default 2), at most MAX."""
    if value is None:
        return None
    parts = [p.strip() for p in value.split(",")]
    if len(parts) > 3:
        raise click.BadParameter(f"{value!r} has {len(parts)} parts; give FIRST[,FACTOR[,MAX]]")
    try:
        first = int(parts[0])
        factor = float(parts[1]) if len(parts) > 1 else 2.0
        most = int(parts[2]) if len(parts) > 2 else None
    except ValueError:
        raise click.BadParameter(
            f"{value!r} is not FIRST[,FACTOR[,MAX]], e.g. 10,2,500 or 5,1.5"
        ) from None
    if first < 1:
        raise click.BadParameter(f"the first wave must have at least 1 device, not {first}")
    if not (math.isfinite(factor) and 1 < factor <= 100):
        raise click.BadParameter(f"the factor must be above 1 and at most 100, not {factor:g}")
    if most is not None and most < 1:
        raise click.BadParameter(f"the largest wave must have at least 1 device, not {most}")
    rate: dict[str, Any] = {"first": first, "factor": factor}
    if most is not None:
        rate["max"] = most
    return rate


def _groups(ctx: click.Context, param: click.Parameter, values: Sequence[str]) -> list[str]:
    """``--group a --group b`` or ``--group a,b``, each checked like a device's group."""
    groups = [g.strip() for item in values for g in item.split(",") if g.strip()]
    for group in groups:
        if not re.fullmatch(GROUP_PATTERN, group):
            raise click.BadParameter(
                f"{group!r} is not a group name (1-63 of a-z 0-9 . _ - starting with a letter"
                " or digit)",
                ctx,
                param,
            )
    return list(dict.fromkeys(groups))


def _policy(
    *,
    canary: Amount | None,
    waves: Amount | None,
    exponential: dict[str, Any] | None,
    soak_s: int | None,
    max_failures: Amount | None,
    min_devices: int | None,
    rollback_on_abort: bool,
    max_concurrent: int | None,
    pause_after_canary: bool,
    in_order: bool,
) -> dict[str, Any]:
    """The ``policy`` of the request: only what was given, so the hub's defaults apply to the
    rest. Options that only make sense together are refused here, naming them."""
    if waves is not None and exponential is not None:
        raise click.BadOptionUsage(
            "waves", "--waves and --exponential both shape the waves; give one"
        )
    if pause_after_canary and canary is None:
        raise click.BadOptionUsage("pause_after_canary", "--pause-after-canary needs --canary")
    if min_devices is not None and max_failures is None:
        raise click.BadOptionUsage(
            "min_devices",
            "--min-devices says when the failure threshold starts to count; it needs"
            " --max-failures",
        )
    policy: dict[str, Any] = {}
    if canary is not None:
        policy["canary" if canary.count is not None else "canary_percent"] = (
            canary.count if canary.count is not None else canary.percent
        )
    if waves is not None:
        policy["wave_size" if waves.count is not None else "wave_percent"] = (
            waves.count if waves.count is not None else waves.percent
        )
    if exponential is not None:
        policy["exponential"] = exponential
    if soak_s is not None:
        policy["soak_s"] = soak_s
    if max_failures is not None:
        if max_failures.count is not None:
            policy["max_failures"] = max_failures.count
        else:
            assert max_failures.percent is not None
            policy["max_failure_ratio"] = max_failures.percent / 100
    if min_devices is not None:
        policy["min_devices"] = min_devices
    if rollback_on_abort:
        policy["rollback_on_abort"] = True
    if max_concurrent is not None:
        policy["max_concurrent"] = max_concurrent
    if pause_after_canary:
        policy["pause_after_canary"] = True
    if in_order:
        policy["order"] = "listed"
    return policy


# -- describing a rollout -----------------------------------------------------------------------


def describe_policy(policy: dict[str, Any]) -> str:
    """A rollout policy in one line."""
    parts: list[str] = []
    if policy.get("canary") is not None:
        parts.append(f"canary {policy['canary']}")
    elif policy.get("canary_percent") is not None:
        parts.append(f"canary {policy['canary_percent']:g}%")
    rate = policy.get("exponential")
    if policy.get("wave_size") is not None:
        parts.append(f"waves of {policy['wave_size']}")
    elif policy.get("wave_percent") is not None:
        parts.append(f"waves of {policy['wave_percent']:g}%")
    elif rate:
        most = f" up to {rate['max']}" if rate.get("max") is not None else ""
        parts.append(f"waves from {rate['first']} growing x{rate.get('factor', 2.0):g}{most}")
    else:
        parts.append("then the rest at once" if parts else "all at once")
    if policy.get("soak_s"):
        parts.append(f"soak {policy['soak_s']} s")
    if policy.get("max_failures") is not None:
        parts.append(f"abort over {policy['max_failures']} failed")
    if policy.get("max_failure_ratio") is not None:
        parts.append(f"abort over {policy['max_failure_ratio'] * 100:g}% failed")
    if (policy.get("min_devices") or 1) > 1:
        parts.append(f"judged after {policy['min_devices']} finished")
    if policy.get("rollback_on_abort"):
        parts.append("roll back on abort")
    if policy.get("max_concurrent") is not None:
        parts.append(f"at most {policy['max_concurrent']} downloading")
    if policy.get("pause_after_canary"):
        parts.append("pause after the canary")
    if policy.get("order") == "listed":
        parts.append("in the listed order")
    return ", ".join(parts)


# -- deploy -------------------------------------------------------------------------------------


@click.command()
@click.argument("ref")
@click.argument("more_devices", nargs=-1, metavar="[ID]...")
@click.option(
    "--device", "devices", multiple=True, help="device id; repeatable, or a comma-separated list"
)
@click.option("--select", "selector", help="devices with all these tags, e.g. site=plant-3,hw=rpi4")
@click.option(
    "--group",
    "groups",
    multiple=True,
    callback=_groups,
    help="the members of a device group; repeatable",
)
@click.option(
    "--canary",
    metavar="N|N%",
    callback=count_or_percent(min_count=1),
    help="a first wave of N devices (or N% of them) on its own",
)
@click.option(
    "--waves",
    metavar="N|N%",
    callback=count_or_percent(min_count=1),
    help="then waves of N devices (or N% of them); default: the rest at once",
)
@click.option(
    "--exponential",
    metavar="FIRST[,FACTOR[,MAX]]",
    callback=exponential_rate,
    help="then waves that grow: FIRST devices, FACTOR times more each wave (2), at most MAX",
)
@click.option(
    "--soak",
    "soak_s",
    type=click.IntRange(0, MAX_SOAK_S),
    help="seconds a device must stay healthy on the new version to count as a success",
)
@click.option(
    "--max-failures",
    metavar="N|N%",
    callback=count_or_percent(min_count=0, ratio=True),
    help="abort when more than N devices (or N% of the finished ones) failed",
)
@click.option(
    "--min-devices",
    type=click.IntRange(1),
    help="judge --max-failures only once this many devices finished",
)
@click.option(
    "--rollback-on-abort", is_flag=True, help="on abort, also roll back the devices updated"
)
@click.option(
    "--max-concurrent", type=click.IntRange(1), help="at most N devices downloading at once"
)
@click.option(
    "--pause-after-canary", is_flag=True, help="stop after the canary until promoted or resumed"
)
@click.option(
    "--in-order",
    is_flag=True,
    help="cut waves in the order the devices are named (default: a random sample)",
)
@click.option(
    "--priority",
    type=click.IntRange(-1000, 1000),
    default=0,
    show_default=True,
    help="the deployment of the highest priority owns a device's model",
)
@click.option(
    "--continuous", is_flag=True, help="also reach devices that join --select or --group later"
)
@click.option("--retry-bad", is_flag=True, help="also retry devices where this version failed")
@click.option(
    "--device-timeout",
    "device_timeout_s",
    type=click.IntRange(1),
    default=3600,
    show_default=True,
    help="seconds after its release after which a device not done ends timed_out",
)
@click.option(
    "--dry-run", is_flag=True, help="show what it would do (targets, skips, waves, bytes)"
)
@click.option("--wait", is_flag=True, help="follow the rollout with a progress bar until done")
@click.option("--timeout", "timeout_s", type=float, default=600.0, show_default=True)
@click.pass_context
def deploy(
    ctx: click.Context,
    ref: str,
    more_devices: Sequence[str],
    devices: Sequence[str],
    selector: str | None,
    groups: list[str],
    canary: Amount | None,
    waves: Amount | None,
    exponential: dict[str, Any] | None,
    soak_s: int | None,
    max_failures: Amount | None,
    min_devices: int | None,
    rollback_on_abort: bool,
    max_concurrent: int | None,
    pause_after_canary: bool,
    in_order: bool,
    priority: int,
    continuous: bool,
    retry_bad: bool,
    device_timeout_s: int,
    dry_run: bool,
    wait: bool,
    timeout_s: float,
) -> None:
    """Deploy NAME[:VERSION] to devices: `deploy iris:2 --device ID [ID]...`, `--select
    site=a`, `--group line-4`; staged with `--canary 5 --waves 20% --soak 600`."""
    # `--device a b c`, `--device a --device b` and `--device a,b` all name the same devices.
    named = [d for item in (*devices, *more_devices) for d in item.split(",") if d]
    if not named and not selector and not groups:
        fail(
            "name the devices with --device ID, select them with --select key=value,...,"
            " or name groups with --group NAME"
        )
    if continuous and not selector and not groups:
        raise click.BadOptionUsage(
            "continuous", "--continuous follows --select or --group; give one of them"
        )
    name, version = split_ref(ref)
    if version != "latest" and not version.isdigit():
        fail(f"version must be a number, not {version!r}")
    policy = _policy(
        canary=canary,
        waves=waves,
        exponential=exponential,
        soak_s=soak_s,
        max_failures=max_failures,
        min_devices=min_devices,
        rollback_on_abort=rollback_on_abort,
        max_concurrent=max_concurrent,
        pause_after_canary=pause_after_canary,
        in_order=in_order,
    )
    request = {
        "model": name,
        "version": None if version == "latest" else int(version),
        "devices": named,
        "selector": selector,
        "groups": groups,
        "device_timeout_s": device_timeout_s,
        "policy": policy,
        "priority": priority,
        "continuous": continuous,
        "retry_bad": retry_bad,
    }
    api = client(ctx)
    if dry_run:
        plan = api.json("POST", "/api/v1/deployments/dry-run", json=request)
        _print_dry_run(plan, has_canary=canary is not None)
        return
    body = api.json("POST", "/api/v1/deployments", json=request)
    counts: dict[str, int] = body["counts"]
    skipped = count(counts, *OUT_OF_PLAY)
    staged = f" in {len(body['waves'])} waves" if len(body["waves"]) > 1 else ""
    click.echo(
        f"deployment {body['id']}: {body['model']}:{body['version']}"
        f" to {body['total'] - skipped} device(s){staged}"
        + (f", {skipped} skipped" if skipped else "")
    )
    if wait:
        ctx.exit(wait_for(api, body["id"], timeout_s))


def _print_dry_run(plan: dict[str, Any], *, has_canary: bool) -> None:
    targeted, skipped = plan["targeted"], plan["skipped"]
    built = "" if plan["package_digest"] else " (estimated: not packaged yet)"
    click.echo(
        f"dry run {plan['model']}:{plan['version']}: {len(targeted)} targeted,"
        f" {len(skipped)} skipped; package {_mib(plan['package_bytes'])}{built},"
        f" {_mib(plan['bytes_from_hub'])} from the hub, {_mib(plan['bytes_to_devices'])}"
        " to devices"
    )
    sizes: list[int] = plan.get("waves", [])
    if sizes:
        first = " (the first is the canary)" if has_canary and len(sizes) > 1 else ""
        click.echo(f"{len(sizes)} wave(s) of {', '.join(str(s) for s in sizes)} device(s){first}")
    for d in targeted:
        click.echo(f"  + {d['device_id']}  {d['why']}".rstrip())
    for d in skipped:
        click.echo(f"  - {d['device_id']}  {d['why']}")


def _mib(size: int) -> str:
    return f"{size / (1024 * 1024):.2f} MiB"


# -- deployment ---------------------------------------------------------------------------------


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
