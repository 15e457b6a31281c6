"""Alert signals as metrics, computed when Prometheus scrapes the worker's main process.

What an operator pages on, read at scrape time by :class:`AlertCollector` (registered in
``worker.ops.metrics.serve``'s registry):

- ``fleet_queue_length{queue}`` and ``fleet_queue_oldest_job_age_seconds{queue}``, for every
  queue this worker serves (held ones too), all ten priority lists of each
  (``fleet.contract.queue_keys``). Kombu LPUSHes and workers BRPOP, so the oldest entries sit at
  the right end; the age is that of the oldest *timestamped* one among the last few of each list
  (the job's ``submitted_at``, which the producer stamps). Entries without one (a foreign sender,
  a webhook delivery, garbage) count in the length but not in the age.
- ``fleet_dead_letters``, ``fleet_dead_letters_newest_timestamp_seconds`` and
  ``fleet_unstored_failures``: the lengths of the fleet's two "look at me" lists.
- ``fleet_workers_broken{reason}``: live workers (heartbeat present) whose published state is
  ``broken``, fleet-wide, by a short reason class (``REASONS``).
- ``fleet_redis_up``: 0 when any of the above could not be read; they are left out then.
- ``fleet_worker_consuming`` and ``fleet_worker_broken{reason}``: this worker, from its gate
  (``worker.ops.gate.GATE``), known without Redis.

Redis is read with short socket timeouts, no retries and a time budget, so a scrape never hangs
on a Redis that is away or stuck, and never fails: it reports ``fleet_redis_up 0`` instead.
"""

from __future__ import annotations

import base64
import json
import logging
import math
import re
import time
from collections import Counter
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass, field
from datetime import datetime
from typing import Any

import redis
from prometheus_client.core import GaugeMetricFamily, Metric
from redis.backoff import NoBackoff
from redis.retry import Retry

from fleet.contract import (
    DEAD_LETTERS_KEY,
    HEARTBEAT_KEY,
    UNSTORED_FAILURES_KEY,
    WORKER_STATE_KEY,
    queue_keys,
)
from worker.ops import gate

log = logging.getLogger(__name__)

#: The reason classes of a broken worker (the ``reason`` label): a small, fixed set.
REASONS: tuple[str, ...] = ("model", "storage", "redis", "device", "other")
#: How many of the oldest entries of each priority list are read for a timestamp.
HEAD_ENTRIES = 4
#: Per-command socket timeout of the scrape's Redis client, in seconds.
SOCKET_TIMEOUT_S = 1.0
#: The most time one scrape spends reading Redis, in seconds.
BUDGET_S = 3.0
#: Keys per SCAN page (about a millisecond of Redis time each).
SCAN_COUNT = 5000

_DEVICE = re.compile(
    r"\b(cuda|cudnn|cublas|nccl|nvidia|rocm|hip error|mps backend|no kernel image)|"
    r"out of memory|deviceoutofmemory|device-side assert"
)
_PREFIXES: tuple[tuple[str, tuple[str, ...]], ...] = (
    ("storage", ("storage", "s3 ")),
    ("redis", ("redis", "broker")),
    ("model", ("the model", "modelloaderror", "the pipeline", "pipelinebroken")),
)


def reason_class(reason: str | None) -> str:
    """The class of a broken worker's reason text (as ``worker.ops.gate`` and the job policies
    publish it): what an operator must fix, one of ``REASONS``.

    Device trouble (CUDA errors, out of memory) wins over the step that met it: "the model
    cannot load: CUDA out of memory" is a device to fix, not a model."""
    text = (reason or "").strip().lower()
    if _DEVICE.search(text):
        return "device"
    for name, prefixes in _PREFIXES:
        if text.startswith(prefixes):
            return name
    for name, words in (("storage", ("storage",)), ("redis", ("redis",)), ("model", ("model",))):
        if any(word in text for word in words):
            return name
    return "other"


def enqueued_at(raw: bytes | str) -> float | None:
    """When a queue entry was enqueued: its job's ``submitted_at`` (Unix time, stamped by the
    producer); None for an entry that carries none or is not a Celery JSON message."""
    try:
        envelope = json.loads(raw)
        body: Any = envelope["body"]
        if envelope["properties"].get("body_encoding") == "base64":
            body = base64.b64decode(body)
        args, kwargs, _ = json.loads(body)
        job = kwargs.get("job") if isinstance(kwargs, dict) else None
        if job is None and isinstance(args, list) and args:
            job = args[0]
        stamp = job.get("submitted_at") if isinstance(job, dict) else None
    except Exception:  # not JSON, not an envelope, a body that is not [args, kwargs, embed]
        return None
    if isinstance(stamp, bool) or not isinstance(stamp, int | float) or not math.isfinite(stamp):
        return None
    return float(stamp)


@dataclass(frozen=True)
class WorkerView:
    """What this worker's gate says: the queues it serves, its state, whether it consumes."""

    queues: tuple[str, ...]
    state: str | None
    reason: str | None
    consuming: bool


def gate_view() -> WorkerView | None:
    """This main process's worker as its gate sees it; None outside a `celery worker`."""
    g = gate.GATE
    if g is None:
        return None
    names = set(g.held)
    consumer = g.consumer
    task_consumer = getattr(consumer, "task_consumer", None) if consumer is not None else None
    if task_consumer is not None:
        names |= {q.name for q in list(task_consumer.queues)}
    status = g.status()
    state = status.get("state")
    return WorkerView(
        queues=tuple(sorted(names)),
        state=state,
        reason=status.get("reason"),
        consuming=bool(g.opened) and state != gate.BROKEN,
    )


@dataclass
class QueueFacts:
    length: int = 0
    #: Unix time of the oldest timestamped entry among the heads of its lists.
    oldest_at: float | None = None


@dataclass
class FleetFacts:
    """What one scrape read from Redis."""

    queues: dict[str, QueueFacts] = field(default_factory=dict)
    dead_letters: int = 0
    dead_letter_newest_at: float | None = None
    unstored_failures: int = 0
    #: None when the keyspace was too large to scan within the scrape's budget.
    broken: Counter[str] | None = field(default_factory=Counter)


def alert_client(redis_url: str, timeout_s: float = SOCKET_TIMEOUT_S) -> redis.Redis:
    """A Redis client that gives up fast: short connect and read timeouts, no retries."""
    return redis.Redis.from_url(
        redis_url,
        socket_timeout=timeout_s,
        socket_connect_timeout=timeout_s,
        retry=Retry(NoBackoff(), 0),
    )


def read_fleet(
    client: redis.Redis, queues: Iterable[str], budget_s: float = BUDGET_S
) -> FleetFacts:
    """Read the queues, the two failure lists and the broken workers; raises redis.RedisError
    when Redis cannot answer in time. The broken workers are left out (None) when scanning for
    them takes longer than ``budget_s``."""
    deadline = time.monotonic() + budget_s
    facts = FleetFacts()
    names = list(queues)
    with client.pipeline(transaction=False) as pipe:
        for name in names:
            for key in queue_keys(name):
                pipe.llen(key)
                pipe.lrange(key, -HEAD_ENTRIES, -1)
        pipe.llen(DEAD_LETTERS_KEY)
        pipe.lindex(DEAD_LETTERS_KEY, 0)
        pipe.llen(UNSTORED_FAILURES_KEY)
        replies = pipe.execute()
    answers = iter(replies)
    for name in names:
        q = facts.queues[name] = QueueFacts()
        for _ in queue_keys(name):
            q.length += int(next(answers))
            for raw in next(answers):
                at = enqueued_at(raw)
                if at is not None and (q.oldest_at is None or at < q.oldest_at):
                    q.oldest_at = at
    dead, newest, unstored = answers
    facts.dead_letters, facts.unstored_failures = int(dead), int(unstored)
    facts.dead_letter_newest_at = _entry_time(newest)
    facts.broken = broken_workers(client, deadline)
    return facts


def broken_workers(client: redis.Redis, deadline: float) -> Counter[str] | None:
    """Live workers (heartbeat present) whose state is broken, by reason class (SCAN, paged);
    None when the scan is not done by ``deadline`` (time.monotonic)."""
    prefix, pattern = WORKER_STATE_KEY.format(node=""), WORKER_STATE_KEY.format(node="*")
    keys: list[bytes | str] = []
    cursor: int = 0
    while True:
        cursor, page = client.scan(cursor, match=pattern, count=SCAN_COUNT)
        keys.extend(page)
        if not cursor:
            break
        if time.monotonic() > deadline:
            return None
    out: Counter[str] = Counter()
    if not keys:
        return out
    with client.pipeline(transaction=False) as pipe:
        for key in keys:
            text = key.decode(errors="replace") if isinstance(key, bytes) else key
            node = text.removeprefix(prefix)
            pipe.get(key)
            pipe.exists(HEARTBEAT_KEY.format(node=node))
        replies = pipe.execute()
    for raw, alive in zip(replies[0::2], replies[1::2], strict=True):
        try:
            state = json.loads(raw) if raw else None
        except ValueError:
            continue
        if alive and isinstance(state, dict) and state.get("state") == gate.BROKEN:
            out[reason_class(state.get("reason"))] += 1
    return out


def _entry_time(raw: bytes | None) -> float | None:
    """The ``at`` (ISO 8601) of a dead letter, as Unix time."""
    try:
        return datetime.fromisoformat(json.loads(raw or b"")["at"]).timestamp()
    except Exception:
        return None


class AlertCollector:
    """A custom collector: reads Redis and the gate on every scrape (see the module doc)."""

    def __init__(
        self,
        client: redis.Redis,
        view: Callable[[], WorkerView | None] = gate_view,
        clock: Callable[[], float] = time.time,
        budget_s: float = BUDGET_S,
    ) -> None:
        self.client = client
        self.view = view
        self.clock = clock
        self.budget_s = budget_s
        self._redis_was_up = True
        self._scan_was_done = True

    def describe(self) -> list[Metric]:
        return []  # registering must not read Redis

    def collect(self) -> Iterator[Metric]:
        try:
            worker = self.view()
        except Exception as exc:
            log.warning("alert metrics: cannot read this worker's gate: %s", exc)
            worker = None
        if worker is not None:
            yield from self._worker(worker)
        yield from self._fleet(worker.queues if worker is not None else ())

    def _worker(self, worker: WorkerView) -> Iterator[Metric]:
        consuming = GaugeMetricFamily(
            "fleet_worker_consuming",
            "1 while this worker consumes its job queues; 0 while held (starting) or broken",
            value=1.0 if worker.consuming else 0.0,
        )
        yield consuming
        broken = GaugeMetricFamily(
            "fleet_worker_broken",
            "1 (reason label: what to fix) while this worker's state is broken",
            labels=["reason"],
        )
        mine = reason_class(worker.reason) if worker.state == gate.BROKEN else None
        for reason in REASONS:
            broken.add_metric([reason], 1.0 if reason == mine else 0.0)
        yield broken

    def _fleet(self, queues: Iterable[str]) -> Iterator[Metric]:
        try:
            facts = read_fleet(self.client, queues, self.budget_s)
        except Exception as exc:  # away, stuck, refusing, or an answer we did not expect
            if self._redis_was_up:
                log.warning("alert metrics: cannot read Redis: %s", exc)
            self._redis_was_up = False
            yield GaugeMetricFamily("fleet_redis_up", _REDIS_UP_HELP, value=0.0)
            return
        if not self._redis_was_up:
            log.info("alert metrics: Redis answers again")
        self._redis_was_up = True
        self._scan_was_done = True
        yield GaugeMetricFamily("fleet_redis_up", _REDIS_UP_HELP, value=1.0)
        now = self.clock()
        length = GaugeMetricFamily(
            "fleet_queue_length", "Messages waiting in a queue (all priority lists)",
            labels=["queue"],
        )  # fmt: skip
        age = GaugeMetricFamily(
            "fleet_queue_oldest_job_age_seconds",
            "Seconds the oldest timestamped job of a queue has waited; 0 when the queue is empty",
            labels=["queue"],
        )
        for name, q in sorted(facts.queues.items()):
            length.add_metric([name], float(q.length))
            if q.oldest_at is not None:
                age.add_metric([name], max(0.0, now - q.oldest_at))
            elif q.length == 0:
                age.add_metric([name], 0.0)
        yield length
        yield age
        yield GaugeMetricFamily(
            "fleet_dead_letters", "Queue entries no worker could run (fleet:dead-letters)",
            value=float(facts.dead_letters),
        )  # fmt: skip
        if facts.dead_letter_newest_at is not None:
            yield GaugeMetricFamily(
                "fleet_dead_letters_newest_timestamp_seconds",
                "Unix time of the newest dead letter (the list is capped: watch this too)",
                value=facts.dead_letter_newest_at,
            )
        yield GaugeMetricFamily(
            "fleet_unstored_failures",
            "Failure records waiting in Redis for storage to come back",
            value=float(facts.unstored_failures),
        )
        if facts.broken is None:
            if self._scan_was_done:
                log.warning(
                    "alert metrics: the keyspace is too large to scan for broken workers within "
                    "%.1f s; fleet_workers_broken is left out", self.budget_s,
                )  # fmt: skip
            self._scan_was_done = False
            return
        self._scan_was_done = True
        fleet_broken = GaugeMetricFamily(
            "fleet_workers_broken", "Live workers of the fleet whose state is broken, by reason",
            labels=["reason"],
        )  # fmt: skip
        for reason in REASONS:
            fleet_broken.add_metric([reason], float(facts.broken.get(reason, 0)))
        yield fleet_broken


_REDIS_UP_HELP = "1 when this scrape could read the fleet's Redis; 0: its metrics are left out"
