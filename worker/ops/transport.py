"""Kombu's Redis transport, made safe for a queue other services write into.

What it changes, and why:

- **No queue entry can stop a worker.** Every entry is decoded and checked here, before kombu
  hands it on: one that is not a Celery JSON envelope (``[1, 2, 3]``, ``null``, 100,000 levels
  of nesting, a broken envelope), or a JSON message whose body is not ``[args, kwargs, embed]``
  (base64 ``null``, ``{}``), is dead-lettered (``fleet:dead-letters``, bounded, shown by
  ``producer failed``) with a log line and never delivered, so it takes no worker slot and never
  comes back. Only the decode is guarded: an error of the consumer's callback is not taken for
  a bad entry.
- **Priority steps in the fleet's order** (``fleet.contract.WORKER_READ_ORDER``): step 0, where
  a message without a priority lands, is the default priority.
- **A requeued job goes back to the front.** kombu's ``reject(requeue=True)`` LPUSHes it to the
  back (consumers BRPOP from the right); a job whose pool child died is RPUSHed instead, as the
  visibility restore does.
- **Leases.** While a worker holds a message (reserved or running), ``refresh_leases`` moves its
  score in kombu's ``unacked_index`` forward, so the visibility timeout only ever restores the
  messages of a worker that died: a job running longer than the timeout is not handed to a
  second worker. Every pool: the lease is kept by the main process, which holds the messages.
"""

from __future__ import annotations

import base64
import json
import logging
import time
from datetime import datetime, timezone
from typing import Any

from kombu.transport import redis as kombu_redis
from kombu.transport import virtual
from kombu.transport.virtual import Empty
from kombu.utils.encoding import bytes_to_str

from fleet import contract
from worker.ops.periodic import Periodic

log = logging.getLogger(__name__)

#: How much of a dead letter's raw entry is kept.
DEAD_LETTER_RAW_CHARS = 2000


class BadEntry(ValueError):
    """A queue entry no worker can run; the message says what is wrong with it."""


def decode_entry(raw: bytes | str) -> dict[str, Any]:
    """The kombu envelope of a queue entry, checked enough that kombu and Celery can take it;
    raises BadEntry otherwise."""
    try:
        envelope = json.loads(bytes_to_str(raw))
    except (ValueError, RecursionError) as exc:
        raise BadEntry(f"not JSON: {type(exc).__name__}: {str(exc)[:200]}") from None
    if not isinstance(envelope, dict):
        raise BadEntry(f"a JSON {type(envelope).__name__}, not a Celery message envelope")
    properties, headers = envelope.get("properties"), envelope.get("headers")
    if not isinstance(properties, dict) or not isinstance(properties.get("delivery_info"), dict):
        raise BadEntry("envelope without properties.delivery_info")
    if not isinstance(headers, dict) or not isinstance(envelope.get("body"), str):
        raise BadEntry("envelope without headers or a string body")
    if "delivery_tag" not in properties:
        raise BadEntry("envelope without properties.delivery_tag")
    # A task message (protocol 2 names its task in the headers) must carry a task body; other
    # messages on these channels (remote-control commands and their replies) keep their own.
    if "task" in headers and str(envelope.get("content-type", "")) == "application/json":
        _check_json_body(envelope)
    return envelope


def _check_json_body(envelope: dict[str, Any]) -> None:
    """A Celery protocol-2 JSON body is ``[args, kwargs, embed]``."""
    body = envelope["body"]
    try:
        if envelope["properties"].get("body_encoding") == "base64":
            body = base64.b64decode(body, validate=True).decode("utf-8")
        decoded = json.loads(body)
    except (ValueError, RecursionError, UnicodeDecodeError) as exc:
        raise BadEntry(f"body is not JSON: {type(exc).__name__}") from None
    if not (
        isinstance(decoded, list)
        and len(decoded) == 3
        and isinstance(decoded[0], list)
        and isinstance(decoded[1], dict)
        and isinstance(decoded[2], dict | None)
    ):
        raise BadEntry(f"body is not [args, kwargs, embed]: a JSON {type(decoded).__name__}")


class QoS(kombu_redis.QoS):  # type: ignore[misc]
    def reject(self, delivery_tag: Any, requeue: bool = False) -> None:
        if requeue:
            # To the front (the right end, where consumers BRPOP), not behind the whole queue.
            self.restore_by_tag(delivery_tag, leftmost=False)
            virtual.QoS.ack(self, delivery_tag)  # what kombu's reject does after restoring
            return
        super().reject(delivery_tag, requeue=False)

    def held_tags(self) -> list[Any]:
        """The delivery tags of the messages this consumer holds unacknowledged."""
        for _ in range(3):
            try:
                return list(self._delivered.keys())
            except RuntimeError:  # changed while copied by the consumer's thread
                continue
        return []


class Channel(kombu_redis.Channel):  # type: ignore[misc]
    QoS = QoS

    def _brpop_start(self, timeout: Any = None) -> None:
        if timeout is None:
            timeout = self.brpop_timeout
        queues = self._queue_cycle.consume(len(self.active_queues))
        if not queues:
            return
        keys = [
            self._q_for_pri(queue, step)
            for step in contract.WORKER_READ_ORDER
            for queue in queues
        ] + [timeout or 0]  # fmt: skip
        self._in_poll = self.client.connection
        self._brpop_sent_at = time.monotonic()  # type: ignore[assignment]
        command_args = ["BRPOP", *keys]
        if self.global_keyprefix:
            command_args = self.client._prefix_args(command_args)
        self.client.connection.send_command(*command_args)

    def _brpop_read(self, **options: Any) -> bool:
        try:
            try:
                dest_item = self.client.parse_response(self.client.connection, "BRPOP", **options)
            except self.connection_errors:
                self.client.connection.disconnect()  # reconnect on the next iteration
                raise
            if not dest_item:
                raise Empty()
            dest, item = dest_item
            dest = bytes_to_str(dest).rsplit(self.sep, 1)[0]
            self._queue_cycle.rotate(dest)  # the next read starts at the next queue
            try:
                envelope = decode_entry(item)
            except BadEntry as exc:
                self.dead_letter(dest, item, exc)
                raise Empty() from None
            self.connection._deliver(envelope, dest)  # the callback's errors are its own
            return True
        finally:
            self._in_poll = None  # type: ignore[assignment]
            self._flush_brpop_reauth()

    def _get(self, queue: Any, timeout: Any = None) -> Any:
        with self.conn_or_acquire() as client:
            for step in contract.WORKER_READ_ORDER:
                while True:
                    item = client.rpop(self._q_for_pri(queue, step))
                    if not item:
                        break
                    try:
                        envelope = decode_entry(item)
                    except BadEntry as exc:
                        self.dead_letter(queue, item, exc)
                        continue
                    self._maybe_update_queues_expire(client, queue)
                    return envelope
            self._maybe_update_queues_expire(client, queue)
            raise Empty()

    def dead_letter(self, queue: str, raw: bytes | str, reason: Exception) -> None:
        """Keep an entry no worker can run, with why, in the bounded dead-letter list."""
        text = bytes_to_str(raw) if isinstance(raw, bytes | str) else repr(raw)
        task_id = None
        try:
            headers = json.loads(text).get("headers", {})
            task_id = headers.get("id") if isinstance(headers, dict) else None
        except (ValueError, TypeError, AttributeError, RecursionError):  # not a JSON object: no id
            pass
        entry = {
            "queue": queue,
            "task_id": task_id if isinstance(task_id, str) else None,
            "reason": str(reason),
            "raw": text[:DEAD_LETTER_RAW_CHARS],
            "raw_chars": len(text),
            "at": datetime.now(timezone.utc).isoformat(),
        }
        log.error("dead-lettered an entry of queue %s that no worker can run: %s", queue, reason)
        try:
            with self.conn_or_acquire() as client, client.pipeline(transaction=False) as pipe:
                pipe.lpush(contract.DEAD_LETTERS_KEY, json.dumps(entry))
                pipe.ltrim(contract.DEAD_LETTERS_KEY, 0, contract.DEAD_LETTERS_MAX - 1)
                pipe.execute()
        except self.connection_errors as exc:
            log.error("could not keep the dead letter: %s", exc)

    def refresh_leases(self) -> int:
        """Move the unacked-index score of every held message to now; returns how many."""
        tags = self.qos.held_tags()  # in delivery order
        if tags:
            # Older deliveries keep smaller scores, so a dead worker's messages are restored in
            # the order it got them (kombu restores newest first, each to the front).
            now = time.time() - len(tags) * 1e-3
            scores = {tag: now + i * 1e-3 for i, tag in enumerate(tags)}
            # A client of its own from the pool: the channel's ``client`` owns the connection
            # of the pending BRPOP, whose reply (a message) another command would swallow.
            with self.conn_or_acquire() as client:
                client.zadd(self.unacked_index_key, scores, xx=True)
        return len(tags)


class Transport(kombu_redis.Transport):  # type: ignore[misc]
    Channel = Channel


class LeaseKeeper(Periodic):
    """In the worker's main process: refreshes the leases of held messages every
    ``interval_s`` (a quarter of the visibility timeout), while the worker runs."""

    name = "fleet-leases"

    def __init__(self, consumer: Any, interval_s: float) -> None:
        super().__init__(interval_s, at_start=False)
        self.consumer = consumer

    def tick(self) -> None:
        channel = self.consumer.task_consumer.channel
        if isinstance(channel, Channel):
            channel.refresh_leases()
