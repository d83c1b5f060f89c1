"""The deploy command's rollout options: parsing "5" or "5%", an exponential rate and group
names into the API's policy, and describing a policy in one line."""

import math
import re
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import click

from hub.devices.schemas import GROUP_PATTERN


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


def parse_groups(ctx: click.Context, param: click.Parameter, values: Sequence[str]) -> list[str]:
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


def build_policy(
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
