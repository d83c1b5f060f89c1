"""Data collection, the edge ``ModelDataCollector``: which scoring calls are recorded.

A deployment's ``CollectPolicy`` keeps a call with probability ``sample_rate``, at most
``max_per_minute`` calls a minute and ``max_bytes_per_day`` bytes of record JSON a UTC day, per
model (the last for metered links). Whatever is skipped is counted, by why.

``offer`` runs on the request path and does only the cheap part (the draw, the minute's count,
a place in a bounded queue); ``drain`` builds the records later, off the request path, applies
the day's byte budget and gives the records to the outbox in one commit with the budget's new
state, so a restart neither forgets what the day has spent nor counts what was never kept.
Both run on the agent's event loop.
"""

import json
import random
from collections import deque
from dataclasses import dataclass, field
from datetime import datetime
from typing import Any

from pydantic import ValidationError

from agent.jsonvalues import plain
from agent.outbox import stored
from agent.protocol.documents import CollectPolicy
from agent.protocol.messages import CollectedRecord

BUDGET_NOTE = "collection.day_budget"
MAX_CORRELATION_ID = 200  # CollectedRecord.correlation_id's limit


@dataclass(frozen=True)
class ScoredSample:
    """One scoring call offered for collection, with the policy it falls under."""

    policy: CollectPolicy
    at: datetime  # UTC
    model: str
    version: int
    deployment_id: str | None
    correlation_id: str | None
    latency_ms: float
    inputs: Any
    outputs: Any
    size_hint: int  # bytes of the request body: what the record will about weigh


@dataclass
class CollectionCounts:
    """Calls offered and what became of them, since start."""

    offered: int = 0
    not_sampled: int = 0  # the draw said no: the policy working, not a loss
    over_minute: int = 0
    over_day: int = 0
    too_large: int = 0  # would not fit in one message to the hub
    queue_full: int = 0  # the outbox could not keep up
    invalid: int = 0  # not a valid record (a field over its contract limit)
    kept: int = 0  # handed to the outbox


@dataclass
class _DayBudget:
    day: str  # ISO date, UTC
    spent: dict[str, int] = field(default_factory=dict)  # model -> bytes of record JSON


class Collector:
    """Sampling and budgets of data collection, and the queue in front of the outbox."""

    def __init__(
        self, *, rng: random.Random, max_record_bytes: int, max_pending_bytes: int
    ) -> None:
        self._rng = rng
        self.max_record_bytes = max_record_bytes
        self.max_pending_bytes = max_pending_bytes
        self._pending: deque[ScoredSample] = deque()
        self._pending_bytes = 0
        self._minute: dict[str, tuple[datetime, int]] = {}  # model -> (minute, calls kept)
        self._budget = _DayBudget(day="")
        self.counts = CollectionCounts()

    @property
    def pending(self) -> int:
        return len(self._pending)

    def offer(self, sample: ScoredSample) -> bool:
        """Queue ``sample`` when the policy keeps it; False when it is skipped."""
        counts = self.counts
        counts.offered += 1
        policy = sample.policy
        if policy.sample_rate <= 0 or self._rng.random() >= policy.sample_rate:
            counts.not_sampled += 1
            return False
        if sample.size_hint > self.max_record_bytes:
            # Said now, so a large request is not held in memory only to be refused later.
            counts.too_large += 1
            return False
        minute = sample.at.replace(second=0, microsecond=0)
        start, kept = self._minute.get(sample.model, (minute, 0))
        if start != minute:
            kept = 0
        if kept >= policy.max_per_minute:
            counts.over_minute += 1
            return False
        if self._pending_bytes + sample.size_hint > self.max_pending_bytes:
            counts.queue_full += 1
            return False
        self._minute[sample.model] = (minute, kept + 1)
        self._pending.append(sample)
        self._pending_bytes += sample.size_hint
        return True

    def restore(self, note: str | None) -> None:
        """Take up the day's spending as the outbox last stored it."""
        if note is None:
            return
        try:
            doc = json.loads(note)
            self._budget = _DayBudget(
                day=str(doc["day"]), spent={str(k): int(v) for k, v in doc["spent"].items()}
            )
        except (ValueError, TypeError, KeyError, AttributeError):
            self._budget = _DayBudget(day="")

    def drain(self) -> tuple[list[bytes], tuple[str, str]]:
        """The queued calls as stored records (see ``agent.outbox.stored``) within the day's
        budget, and the budget's new state to store with them."""
        samples, self._pending = self._pending, deque()
        self._pending_bytes = 0
        records = []
        for sample in samples:
            record = self._record(sample)
            if record is None:
                continue
            day = sample.at.date().isoformat()
            if day > self._budget.day:
                self._budget = _DayBudget(day=day)
            spent = self._budget.spent.get(sample.model, 0)
            if spent + len(record) > sample.policy.max_bytes_per_day:
                self.counts.over_day += 1
                continue
            self._budget.spent[sample.model] = spent + len(record)
            records.append(record)
        self.counts.kept += len(records)
        note = json.dumps({"day": self._budget.day, "spent": self._budget.spent})
        return records, (BUDGET_NOTE, note)

    def _record(self, sample: ScoredSample) -> bytes | None:
        try:
            record = stored(
                CollectedRecord,
                {
                    "at": sample.at,
                    "model": sample.model,
                    "version": sample.version,
                    "deployment_id": sample.deployment_id,
                    "correlation_id": (sample.correlation_id or "")[:MAX_CORRELATION_ID] or None,
                    "latency_ms": round(sample.latency_ms, 3),
                    # Arrays (a .npy request's data, a model's outputs) as the answer wrote them.
                    "inputs": plain(sample.inputs),
                    "outputs": plain(sample.outputs),
                },
            )
        except (ValidationError, ValueError, TypeError):
            self.counts.invalid += 1
            return None
        if len(record) > self.max_record_bytes:
            self.counts.too_large += 1
            return None
        return record
