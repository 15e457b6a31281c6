"""Kombu's Redis transport, made safe for a queue other services write into.

What it changes, and why:

- **No queue entry can stop a worker.** Every entry is decoded and checked here, before kombu
  hands it on: one that is not a Celery JSON envelope (``[1, 2, 3]``, ``null``, 100,000 levels
  of nesting, a broken envelope), or a JSON message whose body is not ``[args, kwargs, embed]``
  (base64 ``null``, ``{}``), a task message with a header or property of a type Celery cannot
  take (``timelimit`` ``"x"``, ``task`` a list, ``eta`` not a date, ...), content other than
  JSON (pickle), a body kombu's JSON decoder refuses (an unknown ``{"__type__": ...}`` marker) or
  nested deeper than MAX_BODY_DEPTH, is dead-lettered (``fleet:dead-letters``, bounded, shown by
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
- **A lost connection does not hand a running job to a second worker.** kombu restores every
  unacknowledged message of a channel when it closes, so after a connection loss (a Redis
  ``CLIENT KILL``, a network blip) the job still running in a pool process went back to its
  queue and another worker generated it again, in parallel. ``QoS.restore_unacked`` keeps the
  messages of running jobs held (leased, acknowledged or requeued when they end) and restores
  the rest; at shutdown everything is restored, as kombu does.
"""

from __future__ import annotations

import base64
import json
import logging
import math
import time
import weakref
from collections.abc import Callable
from datetime import datetime, timezone
from typing import Any

from celery.utils.time import maybe_iso8601
from kombu.transport import redis as kombu_redis
from kombu.transport import virtual
from kombu.transport.virtual import Empty
from kombu.utils import json as kombu_json
from kombu.utils.encoding import bytes_to_str

from fleet import contract
from worker.ops.periodic import Periodic

log = logging.getLogger(__name__)

#: How much of a dead letter's raw entry is kept.
DEAD_LETTER_RAW_CHARS = 2000

#: The QoS of channels closed by a connection loss that still hold running jobs' messages.
_KEPT: weakref.WeakSet[QoS] = weakref.WeakSet()


def running_delivery_tags() -> set[Any]:
    """The delivery tags of the jobs a pool process has started (Celery's active requests);
    none while the worker shuts down, when every held message goes back to its queue."""
    from celery.worker import state

    if state.should_stop not in (None, False) or state.should_terminate not in (None, False):
        return set()
    tags = set()
    for request in list(state.active_requests):
        message = getattr(request, "message", None)
        if message is not None and not getattr(request, "acknowledged", False):
            tags.add(message.delivery_tag)
    return tags


#: The one content type a task message may have: the fleet's Celery accepts JSON only
#: (``fleet.celeryconf``: ``accept_content``); anything else Celery refuses after delivery.
ACCEPTED_CONTENT_TYPE = "application/json"
#: What ``content-encoding`` may say of a JSON body (kombu reads JSON as UTF-8 whatever it says).
JSON_ENCODINGS = ("utf-8", "utf8")
#: Body encodings kombu's virtual transport decodes: base64, or none (the body is the text).
BODY_ENCODINGS = ("base64", None)
#: Deepest nesting of a task body let through. A job is 3 levels deep (``[args, {"job": {...}},
#: embed]``), 4 with a list in it; the pool pickles the decoded body for its child, which ends
#: in a RecursionError (and a stopped worker) from about 500 levels.
MAX_BODY_DEPTH = 64


class BadEntry(ValueError):
    """A queue entry no worker can run; the message says what is wrong with it."""


def decode_entry(raw: bytes | str) -> dict[str, Any]:
    """The kombu envelope of a queue entry, checked enough that kombu and Celery can take it;
    raises BadEntry otherwise.

    Every entry: a JSON object with ``headers``, a string ``body`` and ``properties`` with a
    string ``delivery_tag``, a ``delivery_info`` naming its exchange and routing key, and a body
    encoding kombu knows. A task message (protocol 2 names its task in the headers) also: the
    headers and properties Celery's worker reads, each of the type it needs; JSON content; a
    body ``[args, kwargs, embed]`` that kombu's JSON decoder takes, at most MAX_BODY_DEPTH
    deep. Other messages on these channels (remote-control commands and their replies) keep
    their own bodies."""
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
    _check_fields("properties", properties, PROPERTY_RULES)
    _check_fields("properties.delivery_info", properties["delivery_info"], DELIVERY_INFO_RULES)
    if "task" in headers:
        _check_fields("headers", headers, TASK_HEADER_RULES)
        _check_fields("properties", properties, TASK_PROPERTY_RULES)
        _check_content(envelope)
        _check_json_body(envelope)
    return envelope


# -- the fields Celery and kombu read, and what each must be ----------------------------------

#: A field's check: (whether the field must be there, whether its value will do, what it must be).
Rule = tuple[bool, Callable[[Any], bool], str]


def _check_fields(where: str, fields: dict[str, Any], rules: dict[str, Rule]) -> None:
    for name, (required, ok, what) in rules.items():
        if name not in fields:
            if required:
                raise BadEntry(f"{where}.{name} is missing: it must be {what}")
            continue
        value = fields[name]
        if not ok(value):
            raise BadEntry(f"{where}.{name}={contract.quote_value(value)!r}: must be {what}")


def _is_str(value: Any) -> bool:
    return isinstance(value, str)


def _is_name(value: Any) -> bool:
    return isinstance(value, str) and value != ""


def _is_str_or_none(value: Any) -> bool:
    return value is None or isinstance(value, str)


def _is_count(value: Any) -> bool:
    return type(value) is int and value >= 0


def _is_int_or_none(value: Any) -> bool:
    return value is None or type(value) is int


def _is_bool_or_none(value: Any) -> bool:
    return value is None or isinstance(value, bool)


def _is_dict_or_none(value: Any) -> bool:
    return value is None or isinstance(value, dict)


def _is_str_list_or_none(value: Any) -> bool:
    return value is None or (isinstance(value, list) and all(isinstance(v, str) for v in value))


def _is_seconds_or_none(value: Any) -> bool:
    if value is None:
        return True
    if not isinstance(value, int | float) or isinstance(value, bool):
        return False
    try:
        return math.isfinite(float(value)) and value >= 0
    except OverflowError:  # an integer past every float
        return False


def _is_time_limits(value: Any) -> bool:
    """Celery unpacks ``timelimit`` into (hard, soft) and hands both to the pool's timers."""
    return value is None or (
        isinstance(value, list) and len(value) == 2 and all(map(_is_seconds_or_none, value))
    )


def _is_date_or_none(value: Any) -> bool:
    """What Celery's request parses ``eta`` and ``expires`` with (``maybe_iso8601``), and a
    date that converts to UTC (its timers and comparisons do)."""
    if value is None:
        return True
    if not isinstance(value, str):
        return False
    try:
        parsed = maybe_iso8601(value)
        if parsed.tzinfo is not None:
            parsed.astimezone(timezone.utc)
    except (ValueError, TypeError, AttributeError, OverflowError):
        return False
    return True


def _is_body_encoding(value: Any) -> bool:
    return value in BODY_ENCODINGS


def _is_absent(value: Any) -> bool:
    return value is None


#: Every message: kombu's QoS keys its held messages by delivery tag (a string, as kombu writes
#: it), and decodes the body by its encoding.
PROPERTY_RULES: dict[str, Rule] = {
    "delivery_tag": (True, _is_name, "a non-empty string"),
    "body_encoding": (False, _is_body_encoding, '"base64" or null (the body as it is)'),
}
#: kombu's QoS keeps exchange and routing key beside every held message (to restore it).
DELIVERY_INFO_RULES: dict[str, Rule] = {
    "exchange": (True, _is_str_or_none, "a string (the exchange, '' by default) or null"),
    "routing_key": (True, _is_str_or_none, "a string (the queue's routing key) or null"),
}
_OPTIONAL_STR: Rule = (False, _is_str_or_none, "a string or null")
#: The headers of a task message that Celery's worker reads (celery/worker/request.py,
#: strategy.py, app/trace.py), each as Celery writes it.
TASK_HEADER_RULES: dict[str, Rule] = {
    "task": (True, _is_name, "a task name (a non-empty string)"),
    "id": (True, _is_name, "a task id (a non-empty string)"),
    "shadow": _OPTIONAL_STR,
    "root_id": _OPTIONAL_STR,
    "parent_id": _OPTIONAL_STR,
    "group": _OPTIONAL_STR,
    "group_index": (False, _is_int_or_none, "an integer or null"),
    "origin": _OPTIONAL_STR,
    "lang": _OPTIONAL_STR,
    "argsrepr": _OPTIONAL_STR,
    "kwargsrepr": _OPTIONAL_STR,
    "retries": (False, _is_count, "an integer of 0 or more"),
    "replaced_task_nesting": (False, _is_count, "an integer of 0 or more"),
    "ignore_result": (False, _is_bool_or_none, "true, false or null"),
    "timelimit": (False, _is_time_limits,
                  "[hard, soft]: two numbers of seconds of 0 or more, each or both null"),
    "eta": (False, _is_date_or_none, "null or an ISO-8601 date, e.g. 2030-01-01T00:00:00+00:00"),
    "expires": (False, _is_date_or_none,
                "null or an ISO-8601 date, e.g. 2030-01-01T00:00:00+00:00"),
    "stamped_headers": (False, _is_str_list_or_none, "a list of strings or null"),
    "stamps": (False, _is_dict_or_none, "an object or null"),
    "compression": (False, _is_absent, "absent: the fleet's messages are not compressed"),
}  # fmt: skip
#: The properties of a task message that Celery's worker reads.
TASK_PROPERTY_RULES: dict[str, Rule] = {
    "priority": (False, _is_int_or_none, "an integer (0 to 9) or null"),
    "correlation_id": _OPTIONAL_STR,
    "reply_to": _OPTIONAL_STR,
}


def _check_content(envelope: dict[str, Any]) -> None:
    """JSON, as the workers accept it: any other content type (pickle above all) Celery refuses
    after delivery, logged and acknowledged, with no record of it."""
    content_type = envelope.get("content-type")
    if content_type != ACCEPTED_CONTENT_TYPE:
        raise BadEntry(
            f"content-type {contract.quote_value(content_type)!r} is not accepted: the fleet's "
            f"workers take {ACCEPTED_CONTENT_TYPE} only"
        )
    encoding = envelope.get("content-encoding")
    if encoding is not None and not (isinstance(encoding, str) and encoding.lower() in
                                     JSON_ENCODINGS):  # fmt: skip
        raise BadEntry(f"content-encoding {contract.quote_value(encoding)!r}: a JSON body is utf-8")


def _check_json_body(envelope: dict[str, Any]) -> None:
    """A Celery protocol-2 JSON body is ``[args, kwargs, embed]``, decoded here as kombu will
    decode it (its JSON with type markers such as ``{"__type__": "uuid", ...}``), nested at most
    MAX_BODY_DEPTH levels."""
    body = envelope["body"]
    try:
        if envelope["properties"].get("body_encoding") == "base64":
            data = base64.b64decode(body, validate=True)
        else:
            data = body.encode("utf-8")  # what kombu does before decoding it
        decoded = kombu_json.loads(data)
    except Exception as exc:  # kombu's type decoders raise anything
        raise BadEntry(f"body is not JSON kombu can decode: {type(exc).__name__}: "
                       f"{str(exc)[:200]}") from None  # fmt: skip
    if not (
        isinstance(decoded, list)
        and len(decoded) == 3
        and isinstance(decoded[0], list)
        and isinstance(decoded[1], dict)
        and isinstance(decoded[2], dict | None)
    ):
        raise BadEntry(f"body is not [args, kwargs, embed]: a JSON {type(decoded).__name__}")
    depth = nesting_depth(decoded)
    if depth > MAX_BODY_DEPTH:
        raise BadEntry(
            f"body nested {depth} levels deep: at most {MAX_BODY_DEPTH} are taken (a job is 3)"
        )


def nesting_depth(value: Any) -> int:
    """How many lists and objects deep ``value`` is (a scalar 0, ``[]`` 1), counted without
    recursion."""
    deepest = 0
    stack = [(value, 1)] if isinstance(value, list | dict) else []
    while stack:
        item, depth = stack.pop()
        deepest = max(deepest, depth)
        children = item.values() if isinstance(item, dict) else item
        stack.extend((c, depth + 1) for c in children if isinstance(c, list | dict))
    return deepest


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
                return [tag for tag in list(self._delivered.keys()) if tag not in self._dirty]
            except RuntimeError:  # changed while copied by the consumer's thread
                continue
        return []

    def restore_unacked(self, client: Any = None) -> None:
        """When the channel closes: every held message back to its queue, except those of jobs
        still running after a connection loss. Those stay held (in ``unacked``, leased by
        ``refresh_leases``) until the job acknowledges them, or its lost pool process requeues
        them: restored now, another worker would generate the job again while it runs."""
        running = running_delivery_tags()
        kept = {t: m for t, m in self._delivered.items() if t in running and t not in self._dirty}
        if not kept:
            super().restore_unacked(client)
            return
        others = len(self._delivered) - len(kept)
        log.warning("connection to Redis lost: %d running job(s) keep their message, %d "
                    "other(s) restored", len(kept), others)  # fmt: skip
        with self.channel.conn_or_acquire(client) as conn:
            for tag in list(self._delivered):
                if tag not in kept:
                    self.restore_by_tag(tag, client=conn)
        self._delivered.clear()
        self._delivered.update(kept)
        _KEPT.add(self)


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
        kept = [tag for qos in list(_KEPT) for tag in qos.held_tags()]  # older channels first
        tags = kept + self.qos.held_tags()  # in delivery order
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
