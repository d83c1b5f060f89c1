"""A rollout policy and the waves it splits a target into (pure logic, no database).

The shape follows what fleets already use: AWS IoT Jobs' exponential rate and abort criteria
(a failure threshold judged only after a minimum number of devices), hawkBit's groups with an
error threshold, and Greengrass' ROLLBACK failure handling; plus a soak time, so a device counts
as a success only after it stayed healthy on the new version for a while (hawkBit #3185: success
recorded before the device proved healthy).
"""

import math
import random
from typing import Literal, Self

from pydantic import BaseModel, ConfigDict, Field, model_validator

MAX_SOAK_S = 7 * 24 * 3600
# A bound on every device count: larger than any fleet, small enough for the database's
# integers (an unbounded max_concurrent reached SQL and answered 500; found by schemathesis).
MAX_DEVICES = 10_000_000


class ExponentialRate(BaseModel):
    """Waves that grow: ``first``, then each ``factor`` times the one before, up to ``max``."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    first: int = Field(ge=1, le=MAX_DEVICES)
    factor: float = Field(default=2.0, gt=1.0, le=100.0)
    max: int | None = Field(default=None, ge=1, le=MAX_DEVICES)


class RolloutPolicy(BaseModel):
    """How a deployment reaches its devices. The default is every device at once, as a plain
    ``deploy`` always did."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    # The canary: the first wave, on its own.
    canary: int | None = Field(
        default=None, ge=1, le=MAX_DEVICES, description="devices in the canary wave"
    )
    canary_percent: float | None = Field(default=None, gt=0, le=100)
    # The rest, in waves of one of these shapes (none: the rest in one wave).
    wave_size: int | None = Field(default=None, ge=1, le=MAX_DEVICES)
    wave_percent: float | None = Field(default=None, gt=0, le=100)
    exponential: ExponentialRate | None = None
    # A device that reached the new version must stay healthy this long to count as a success.
    soak_s: int = Field(default=0, ge=0, le=MAX_SOAK_S)
    # Abort when more devices than this failed or timed out ...
    max_failures: int | None = Field(default=None, ge=0, le=MAX_DEVICES)
    # ... or when more than this share of the finished devices did ...
    max_failure_ratio: float | None = Field(default=None, ge=0, lt=1)
    # ... judged only once this many devices have finished (succeeded, failed or timed out).
    # None: 1 for a count; for a ratio, enough devices that one failure alone cannot cross it
    # (otherwise the first finished device failing would be 100 % and abort at once).
    min_devices: int | None = Field(default=None, ge=1, le=MAX_DEVICES)
    # On abort, also send the devices it already updated back to what they ran before.
    rollback_on_abort: bool = False
    # At most this many devices fetching the package at once (None: no cap).
    max_concurrent: int | None = Field(default=None, ge=1, le=MAX_DEVICES)
    # Stop after the canary until an operator promotes the rollout.
    pause_after_canary: bool = False
    # "random": waves are a shuffle of the target, seeded by the deployment id, so canaries are a
    # fair sample; "listed": in the order given (name the canary devices first).
    order: Literal["random", "listed"] = "random"

    @model_validator(mode="after")
    def _one_shape_each(self) -> Self:
        if self.canary is not None and self.canary_percent is not None:
            raise ValueError("give the canary as a count or a percent, not both")
        shapes = [self.wave_size, self.wave_percent, self.exponential]
        if sum(s is not None for s in shapes) > 1:
            raise ValueError("give the waves one shape: wave_size, wave_percent or exponential")
        if self.pause_after_canary and not self.has_canary:
            raise ValueError("pause_after_canary needs a canary")
        return self

    @property
    def has_canary(self) -> bool:
        return self.canary is not None or self.canary_percent is not None

    @property
    def has_threshold(self) -> bool:
        return self.max_failures is not None or self.max_failure_ratio is not None

    @property
    def judged_after(self) -> int:
        """How many devices must have finished before the threshold is judged."""
        if self.min_devices is not None:
            return self.min_devices
        if self.max_failure_ratio:
            return math.ceil(1 / self.max_failure_ratio)
        return 1

    def breach(self, *, failures: int, finished: int) -> str | None:
        """Why the rollout must abort with these counts, or None while it may go on."""
        if finished < self.judged_after:
            return None
        if self.max_failures is not None and failures > self.max_failures:
            return f"{failures} devices failed, more than the {self.max_failures} allowed"
        if self.max_failure_ratio is not None and failures > self.max_failure_ratio * finished:
            return (
                f"{failures} of {finished} finished devices failed"
                f" ({failures / finished:.0%}), more than {self.max_failure_ratio:.0%}"
            )
        return None


def _percent_of(total: int, percent: float) -> int:
    return max(1, math.ceil(total * percent / 100))


def plan_waves(total: int, policy: RolloutPolicy) -> list[int]:
    """The size of each wave for ``total`` devices; the sizes add up to ``total``."""
    if total <= 0:
        return []
    sizes: list[int] = []
    left = total
    if policy.canary is not None:
        sizes.append(min(policy.canary, left))
    elif policy.canary_percent is not None:
        sizes.append(min(_percent_of(total, policy.canary_percent), left))
    left -= sum(sizes)
    step = 0
    while left > 0:
        if policy.wave_size is not None:
            size = policy.wave_size
        elif policy.wave_percent is not None:
            size = _percent_of(total, policy.wave_percent)
        elif policy.exponential is not None:
            rate = policy.exponential
            size = math.floor(rate.first * rate.factor**step)
            if rate.max is not None:
                size = min(size, rate.max)
        else:
            size = left
        size = min(size, left)
        sizes.append(size)
        left -= size
        step += 1
    return sizes


def order_targets(devices: list[str], policy: RolloutPolicy, seed: str) -> list[str]:
    """The target in release order: shuffled with a stable seed, or as listed."""
    ordered = list(devices)
    if policy.order == "random":
        random.Random(seed).shuffle(ordered)
    return ordered


def assign_waves(devices: list[str], sizes: list[int]) -> dict[str, int]:
    """Each device's wave index, taking the devices in order."""
    waves: dict[str, int] = {}
    it = iter(devices)
    for index, size in enumerate(sizes):
        for _ in range(size):
            waves[next(it)] = index
    return waves
