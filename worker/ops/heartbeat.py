"""A heartbeat key with a TTL in Redis (as arq does), refreshed by the worker's main process.

`python -m worker check` reads it: a container health check that needs no broadcast to workers
(with the solo pool, `celery inspect ping` blocks while a job runs).
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import socket
import time
from collections.abc import Callable
from typing import Any

import redis

from fleet.contract import HEARTBEAT_KEY
from fleet.contract import WORKER_INFO_KEY as INFO_KEY
from worker.ops.periodic import Periodic

log = logging.getLogger(__name__)


class Heartbeat(Periodic):
    """Refreshes ``fleet:heartbeat:<node>`` every ``interval_s``; it expires after ``ttl_s``."""

    name = "fleet-heartbeat"

    def __init__(
        self, redis_url: str, node: str, queues: list[str], interval_s: float, ttl_s: int,
        status: Callable[[], dict[str, Any]] | None = None,
    ) -> None:  # fmt: skip
        super().__init__(interval_s)
        #: Whether the worker can take jobs (the gate's state and reason), in every beat.
        self.status = status
        self.client = redis.Redis.from_url(redis_url, socket_timeout=5)
        self.node = node
        self.queues = queues
        self.ttl_s = ttl_s

    def stop(self) -> None:
        super().stop()
        with contextlib.suppress(redis.RedisError):
            self.client.delete(HEARTBEAT_KEY.format(node=self.node))

    def tick(self) -> None:
        self.beat()

    def beat(self) -> None:
        value = {
            "node": self.node,
            "host": socket.gethostname(),
            "pid": os.getpid(),
            "queues": self.queues,
            "at": time.time(),
            **(self.status() if self.status is not None else {"state": "ready"}),
        }
        self.client.set(HEARTBEAT_KEY.format(node=self.node), json.dumps(value), ex=self.ttl_s)


def alive_nodes(redis_url: str, host: str | None = None) -> list[dict[str, Any]]:
    """Heartbeats present in Redis, optionally only those of workers on ``host``."""
    client = redis.Redis.from_url(redis_url, socket_timeout=5)
    try:
        out = []
        for key in client.scan_iter(HEARTBEAT_KEY.format(node="*")):
            raw = client.get(key)
            if raw is None:
                continue
            beat = json.loads(raw)
            if host is None or beat.get("host") == host:
                out.append(beat)
        return sorted(out, key=lambda b: b["node"])
    finally:
        client.close()


def publish_info(client: redis.Redis, node: str, info: dict[str, Any], ttl_s: int = 86400) -> None:
    """The pool child's device facts (device, GPU, memory, device map) for `status`."""
    client.set(INFO_KEY.format(node=node), json.dumps(info, default=str), ex=ttl_s)


def read_info(redis_url: str, node: str) -> dict[str, Any] | None:
    client = redis.Redis.from_url(redis_url, socket_timeout=5)
    try:
        raw = client.get(INFO_KEY.format(node=node))
        return None if raw is None else dict(json.loads(raw))
    finally:
        client.close()


class InfoPublisher:
    """Publishes a pool child's device facts for `python -m worker status` (best effort): after
    the first job, then only when they changed and at most once per ``interval_s``, so a stream
    of short jobs does not pay a Redis write each. Unchanged facts are refreshed hourly (the
    key lives a day)."""

    def __init__(self, interval_s: float, refresh_s: float = 3600.0) -> None:
        self.interval_s = interval_s
        self.refresh_s = refresh_s
        self._published: tuple[str, float] | None = None  # (the facts as JSON, when)

    def due(self, info: dict[str, Any], now: float) -> bool:
        if self._published is None:
            return True
        text, at = self._published
        age = now - at
        if age < self.interval_s:
            return False
        return text != _facts_text(info) or age >= self.refresh_s

    def publish(self, client: redis.Redis, node: str, info: dict[str, Any]) -> None:
        now = time.monotonic()
        if not node or not self.due(info, now):
            return
        try:
            publish_info(client, node, info)
            self._published = (_facts_text(info), now)
        except Exception as exc:
            log.warning("could not publish worker info: %s", exc)


def _facts_text(info: dict[str, Any]) -> str:
    return json.dumps(info, sort_keys=True, default=str)
