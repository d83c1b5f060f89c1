"""``outpost-hub deploy``: start a rollout (or a dry run) and follow it with a progress bar."""

from collections.abc import Sequence
from typing import Any

import click

from hub.cli_client import client, fail, split_ref
from hub.cli_policy import Amount, build_policy, count_or_percent, exponential_rate, parse_groups
from hub.cli_progress import OUT_OF_PLAY, count, wait_for
from hub.deployments.policy import MAX_SOAK_S


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
    callback=parse_groups,
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
    "--collect",
    "collect_rate",
    type=click.FloatRange(0, 1),
    help="collect this share of scoring calls (inputs, outputs, latency), e.g. 0.05",
)
@click.option(
    "--collect-per-minute",
    type=click.IntRange(0),
    default=60,
    show_default=True,
    help="at most this many collected calls per device and minute",
)
@click.option(
    "--collect-bytes-per-day",
    type=click.IntRange(0),
    default=10 * 1024 * 1024,
    show_default=True,
    help="at most this many bytes of collected calls per device and day (metered links)",
)
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
    collect_rate: float | None,
    collect_per_minute: int,
    collect_bytes_per_day: int,
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
    policy = build_policy(
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
        "data_collection": None
        if collect_rate is None
        else {
            "sample_rate": collect_rate,
            "max_per_minute": collect_per_minute,
            "max_bytes_per_day": collect_bytes_per_day,
        },
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
