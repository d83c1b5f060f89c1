"""Device profiles: what kind of hardware and network a group of simulated devices has."""

from pydantic import BaseModel, ConfigDict, Field


class _Spec(BaseModel):
    model_config = ConfigDict(frozen=True, extra="forbid")


class LinkProfile(_Spec):
    """The device's network: downstream bandwidth and one-way latency.

    ``kbps`` None means as fast as loopback. Messages to the device queue behind each other at
    that rate, as on a real link, so a 5 MiB package over 1 Mbit/s takes about 42 s.
    """

    kbps: float | None = Field(default=None, gt=0)
    latency_ms: float = Field(default=0.0, ge=0)

    @property
    def shaped(self) -> bool:
        return self.kbps is not None or self.latency_ms > 0


class DeviceProfile(_Spec):
    """What a group of devices looks like to the hub and to the agent."""

    device_class: str = "generic"
    tags: dict[str, str] = Field(default_factory=dict)  # e.g. site, hardware class
    link: LinkProfile = LinkProfile()
    disk_mb: float | None = Field(default=None, gt=0)  # None: the real disk's free space
    clock_offset_s: float = 0.0  # the device's clock runs this far ahead (negative: behind)
