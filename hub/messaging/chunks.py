"""Package chunk delivery: each chunk published once for every device that can still receive
that publish, through the broker's fan-out.

Every device downloading a package subscribes to its chunk topics, then asks for the chunks
it lacks. One publish of a chunk reaches every device subscribed at that moment. So a request
needs a new publish only when the asking device subscribed *after* the chunk's last publish (it
could not have received it), or when that publish is so old that it must have been lost.

When did the device subscribe? The agent subscribes before it sends its first request for a
package, and the broker handles one client's packets in order, so the subscription is active
before the hub receives that first request: the time of the first request is a safe (late)
bound. A reconnect loses the subscription; the agent then sends an ``online`` status without
``uptime_s``, and ``forget_device`` starts that device afresh.

The first publish of a package waits until no new device has asked for it for
``first_quiet_s`` (at most ``first_gather_max_s``), so the devices of a rollout, which get their
desired states over a few seconds, are subscribed before it goes out, as the subscribers of a
plain fan-out are; later requests are gathered for ``gather_s``. A publish costs one copy per
subscribed device, so one chunk is published again at most every ``min_interval_s``: a late
request waits for that, it is never dropped.
"""

import logging
import time
from dataclasses import dataclass
from pathlib import Path

from agent.protocol.topics import Topics
from hub.errors import HubError
from hub.messaging.publisher import Publisher
from hub.packages.service import package_path

logger = logging.getLogger(__name__)

GATHER_S = 0.05
MIN_INTERVAL_S = 1.0
FIRST_QUIET_S = 0.5
FIRST_GATHER_MAX_S = 5.0
# A device subscribed before a publish that still asks for the chunk this long after it lost it
# (a broker queue limit) or got it corrupt: it is published again. Agents ask only after a
# quiet moment with no chunks arriving, so a chunk still queued for them does not trigger this.
LOST_AFTER_S = 2.0
MAX_TRACKED = 100_000  # devices whose subscriptions are remembered


@dataclass(frozen=True)
class ChunkWanted:
    digest: str
    index: int
    chunk_bytes: int


class ChunkScheduler:
    def __init__(
        self,
        *,
        gather_s: float = GATHER_S,
        first_quiet_s: float = FIRST_QUIET_S,
        first_gather_max_s: float = FIRST_GATHER_MAX_S,
        min_interval_s: float = MIN_INTERVAL_S,
        lost_after_s: float = LOST_AFTER_S,
    ) -> None:
        self.gather_s = gather_s
        self.first_quiet_s = first_quiet_s
        self.first_gather_max_s = first_gather_max_s
        self.min_interval_s = min_interval_s
        self.lost_after_s = lost_after_s
        self._pending: dict[tuple[str, int], tuple[ChunkWanted, float]] = {}  # -> due at
        self._published_at: dict[tuple[str, int], float] = {}
        self._digests_seen: set[str] = set()
        # Packages not published yet: (first request, latest first request of a device).
        self._gathering: dict[str, tuple[float, float]] = {}
        self._subscribed_at: dict[str, dict[str, float]] = {}  # device -> digest -> time
        self.requested = 0
        self.folded = 0  # served by a pending publish or by one the device will still receive
        self.published = 0

    def request(self, device_id: str, wanted: ChunkWanted, now: float | None = None) -> bool:
        """Note one device's request for one chunk; True when it needs a publish."""
        now = time.monotonic() if now is None else now
        self.requested += 1
        key = (wanted.digest, wanted.index)
        subscribed = self._subscribed(device_id, wanted.digest, now)
        if wanted.digest not in self._digests_seen:
            first, latest_new = self._gathering.get(wanted.digest, (now, now))
            if subscribed == now:  # this device's first request: it has just subscribed
                latest_new = now
            self._gathering[wanted.digest] = (first, latest_new)
        last = self._published_at.get(key)
        on_its_way = last is not None and last >= subscribed and now - last < self.lost_after_s
        if key in self._pending or on_its_way:
            self.folded += 1
            return False
        due = now + self.gather_s
        if last is not None:
            due = max(due, last + self.min_interval_s)
        self._pending[key] = (wanted, due)
        return True

    def _due_at(self, wanted: ChunkWanted, due: float) -> float:
        gathering = self._gathering.get(wanted.digest)
        if gathering is None:
            return due
        first, latest_new = gathering
        return min(first + self.first_gather_max_s, max(due, latest_new + self.first_quiet_s))

    def _subscribed(self, device_id: str, digest: str, now: float) -> float:
        if device_id not in self._subscribed_at and len(self._subscribed_at) >= MAX_TRACKED:
            # Forgetting is safe: a forgotten device counts as subscribed now, which can only
            # cost an extra publish. Dicts keep insertion order: the oldest go first.
            for stale in list(self._subscribed_at)[: MAX_TRACKED // 10]:
                del self._subscribed_at[stale]
        return self._subscribed_at.setdefault(device_id, {}).setdefault(digest, now)

    def forget_device(self, device_id: str) -> None:
        """The device (re)connected: its subscriptions are new."""
        self._subscribed_at.pop(device_id, None)

    @property
    def waiting(self) -> bool:
        return bool(self._pending)

    def seconds_until_due(self, now: float | None = None) -> float:
        now = time.monotonic() if now is None else now
        dues = (self._due_at(w, due) for w, due in self._pending.values())
        return max(0.0, min(dues, default=now) - now)

    def due(self, now: float | None = None) -> bool:
        now = time.monotonic() if now is None else now
        return any(self._due_at(w, due) <= now for w, due in self._pending.values())

    def take(self, now: float | None = None) -> list[ChunkWanted]:
        """The pending chunks that are due, in the order first asked for, marked published."""
        now = time.monotonic() if now is None else now
        taken = [w for w, due in self._pending.values() if self._due_at(w, due) <= now]
        for chunk in taken:
            del self._pending[(chunk.digest, chunk.index)]
            self._gathering.pop(chunk.digest, None)
            self._digests_seen.add(chunk.digest)
        for chunk in taken:
            self._published_at[(chunk.digest, chunk.index)] = now
        self.published += len(taken)
        return taken


def publish_chunks(
    *, chunks: list[ChunkWanted], publisher: Publisher, topics: Topics, packages_dir: Path
) -> int:
    """Read each chunk from its package file and publish it; returns how many went out."""
    sent = 0
    for digest in dict.fromkeys(c.digest for c in chunks):
        path = package_path(packages_dir, digest)
        try:
            with path.open("rb") as fh:
                for chunk in (c for c in chunks if c.digest == digest):
                    fh.seek(chunk.index * chunk.chunk_bytes)
                    data = fh.read(chunk.chunk_bytes)
                    publisher.publish(topics.chunk(digest, chunk.index), data, qos=1, retain=False)
                    sent += 1
        except FileNotFoundError:
            logger.error("package file missing", extra={"digest": digest, "path": str(path)})
        except HubError as exc:
            logger.warning("could not publish chunks", extra={"error": exc.detail})
    return sent
