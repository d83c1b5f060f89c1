"""Which devices are enrolled, as ingest asks it for every group of messages.

A device's telemetry is stored only if the device exists. Asking the database for every group
cost about a tenth of ingest's time, for an answer that almost never changes: enrolled devices
are remembered for ``ttl_s``. A removed device's records may then still be stored for that long,
which is harmless (no foreign key; retention takes them) — its broker access is what stops it.
"""

import time
from collections.abc import Callable

from sqlmodel import Session, col, select

from hub.devices.models import Device


class KnownDevices:
    def __init__(self, ttl_s: float = 10.0, clock: Callable[[], float] = time.monotonic) -> None:
        self._ttl_s = ttl_s
        self._clock = clock
        self._seen: dict[str, float] = {}  # device id -> when the database said it exists

    def enrolled(self, session: Session, device_ids: set[str]) -> set[str]:
        """The ids of ``device_ids`` that are enrolled; asks the database for those not
        confirmed within ``ttl_s`` (never remembers an unknown one: it may enrol next)."""
        now = self._clock()
        fresh = {d for d in device_ids if now - self._seen.get(d, -self._ttl_s - 1) <= self._ttl_s}
        ask = device_ids - fresh
        if ask:
            found = set(session.exec(select(Device.id).where(col(Device.id).in_(ask))).all())
            for device_id in found:
                self._seen[device_id] = now
            fresh |= found
        return fresh
