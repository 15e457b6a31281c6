"""Kombu's Redis transport, hardened: a list entry that is not a JSON envelope is dropped and
logged instead of stopping the worker ("Unrecoverable error: JSONDecodeError", kombu 5.7)."""

from __future__ import annotations

import logging
from typing import Any

from kombu.transport import redis as kombu_redis
from kombu.transport.virtual import Empty

log = logging.getLogger(__name__)


class Channel(kombu_redis.Channel):  # type: ignore[misc]
    def _brpop_read(self, **options: Any) -> bool:
        try:
            return bool(super()._brpop_read(**options))
        except ValueError as exc:  # json.JSONDecodeError on a raw LPUSH of garbage
            log.error(
                "dropped a malformed message from Redis (not a Celery JSON envelope): %s", exc
            )
            raise Empty() from None

    def _get(self, queue: Any, timeout: Any = None) -> Any:
        try:
            return super()._get(queue)
        except ValueError as exc:
            log.error("dropped a malformed message from queue %s: %s", queue, exc)
            raise Empty() from None


class Transport(kombu_redis.Transport):  # type: ignore[misc]
    Channel = Channel
