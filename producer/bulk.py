"""Enqueue many jobs at once: one validation pass, one claim pipeline, one publishing connection.

``Client.submit_many`` sends each job with its own ``send_task`` call: a claim round trip, a
broker round trip and a result-channel subscription per job (about 1,500 jobs/s on the 2-core
benchmark machine, see ``scripts/bench``). :func:`submit_bulk` makes the same Celery messages --
task name, ``kwargs={"job": ...}``, task id = job id, queue and routing, soft/hard time limits,
expiry and headers, built by Celery's own ``amqp.create_task_message`` and sent by its
``amqp.send_task_message`` -- and

- validates every job before anything is claimed or sent (a bad job enqueues nothing);
- claims every job id in one Redis pipeline (``SET NX EX`` on ``fleet:job:<job_id>``, as
  ``Client.submit`` does), so ids submitted before come back as duplicate handles, not sent;
- publishes over one producer connection, in kombu publish batches (one Redis pipeline per
  chunk of messages on the Redis transport; one publish per message on other transports), with
  each queue declared once instead of once per message;
- on a publish failure releases the claims of every job whose message was not confirmed sent,
  and raises: those ids are free for a retry.

It does not subscribe to each task's result channel as ``send_task`` does (Redis result
backend); ``JobHandle.wait`` and ``Client.status`` read the stored state, and
``AsyncResult.get`` subscribes when it is called.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Iterable, Sequence
from contextlib import nullcontext
from typing import Any

from celery.utils.saferepr import saferepr

from fleet import contract
from fleet.contract import JobSpec
from producer.client import Client, JobHandle, check_deadline, check_priority

log = logging.getLogger(__name__)

#: Messages per publish batch (one Redis pipeline each on the Redis transport).
CHUNK_SIZE = 500


def submit_bulk(
    client: Client,
    jobs: Iterable[JobSpec | dict[str, Any]],
    deadline_s: float | None = None,
    priority: int = contract.DEFAULT_PRIORITY,
) -> list[JobHandle]:
    """Validate, claim and enqueue ``jobs``; handles in the given order.

    A job whose id was claimed before (by an earlier submission or earlier in ``jobs``) comes
    back with ``duplicate=True`` and is not sent again. ``deadline_s``: a job not started within
    this many seconds is not started at all; ``priority``: 0 (last) to 9 (first), default 5
    (both as for ``Client.submit``).
    """
    check_priority(priority)
    check_deadline(deadline_s)
    specs = [client.validate(job) for job in jobs]  # raises before anything is claimed
    if not specs:
        return []
    queues = [client.queue_for(spec) for spec in specs]
    claimed = _claim(client, specs, queues)
    handles: list[JobHandle | None] = [None] * len(specs)
    to_send: list[int] = []
    duplicates: list[int] = []
    for i, ok in enumerate(claimed):
        (to_send if ok else duplicates).append(i)
    if duplicates:
        try:
            _duplicate_handles(client, specs, queues, duplicates, handles)
        except BaseException:  # an id reused for another recipe: nothing of this call is sent
            _release(client, [specs[i] for i in to_send])
            raise

    progress = _Progress()
    try:
        _publish(
            client,
            [specs[i] for i in to_send],
            [queues[i] for i in to_send],
            deadline_s,
            contract.celery_priority(priority),
            progress,
        )
    except BaseException:
        unsent = to_send[progress.sent :]
        if unsent:
            _release(client, [specs[i] for i in unsent])
        log.error(
            "bulk submit failed after %d of %d job(s); released %d claim(s)",
            progress.sent,
            len(to_send),
            len(unsent),
        )
        raise
    for i in to_send:
        handles[i] = JobHandle(specs[i].job_id, queues[i], client)
    log.info(
        "enqueued %d job(s) in bulk (%d duplicate(s) not sent again)", len(to_send), len(duplicates)
    )
    return [h for h in handles if h is not None]


# --------------------------------------------------------------------------- claims


def _claim(client: Client, specs: Sequence[JobSpec], queues: Sequence[str]) -> list[bool]:
    """SET NX EX every job id in one pipeline; True where this call got the claim."""
    ttl = client.settings.job_claim_ttl_s
    with client.redis.pipeline(transaction=False) as pipe:
        for spec, queue in zip(specs, queues, strict=True):
            value = contract.claim_value(queue, spec)
            pipe.set(contract.CLAIM_KEY.format(job_id=spec.job_id), value, nx=True, ex=ttl)
        replies = pipe.execute(raise_on_error=False)
    errors = [r for r in replies if isinstance(r, Exception)]
    if errors:  # free what this call did claim (never ids claimed before), then fail
        _release(client, [s for s, r in zip(specs, replies, strict=True) if r is True])
        raise errors[0]
    return [bool(r) for r in replies]


def _duplicate_handles(
    client: Client,
    specs: Sequence[JobSpec],
    queues: Sequence[str],
    indexes: Sequence[int],
    handles: list[JobHandle | None],
) -> None:
    with client.redis.pipeline(transaction=False) as pipe:
        for i in indexes:
            pipe.get(contract.CLAIM_KEY.format(job_id=specs[i].job_id))
        priors = pipe.execute()
    for i, prior in zip(indexes, priors, strict=True):
        handles[i] = client.duplicate(specs[i], prior, queues[i])


def _release(client: Client, specs: Sequence[JobSpec]) -> None:
    """Free the ids of jobs that were not sent (best effort: Redis may be what failed)."""
    try:
        with client.redis.pipeline(transaction=False) as pipe:
            for spec in specs:
                pipe.delete(contract.CLAIM_KEY.format(job_id=spec.job_id))
            pipe.execute()
    except Exception as exc:
        log.warning("could not release %d claim(s): %s", len(specs), exc)


# --------------------------------------------------------------------------- publishing


class _Progress:
    """How many messages are known to be in the broker."""

    sent = 0


def _publish(
    client: Client,
    specs: Sequence[JobSpec],
    queues: Sequence[str],
    deadline_s: float | None,
    celery_priority: int,
    progress: _Progress,
) -> None:
    """Publish one message per job over one producer, as ``send_task`` would make them.

    ``progress.sent`` counts the messages confirmed in the broker: per flushed chunk when the
    transport batches publishes (Redis), else per message.
    """
    if not specs:
        return
    app = client.celery
    amqp = app.amqp
    settings = client.settings
    kwargsrepr_max = int(getattr(amqp, "kwargsrepr_maxsize", 1024))
    maxlevels = int(app.conf.task_repr_maxlevels)
    sent_event = bool(app.conf.task_send_sent_event)
    # send_task's routing, once per queue: {"queue": <Queue>, "priority": p} here.
    routes = {
        name: amqp.router.route(
            {"queue": name, "priority": celery_priority}, contract.TASK_GENERATE, (), {}, None
        )
        for name in dict.fromkeys(queues)
    }
    stamp = "submitted_at" in JobSpec.model_fields
    create_message = amqp.create_task_message
    send_message = amqp.send_task_message  # a property that builds the sender: fetch it once
    with app.producer_or_acquire() as producer:
        batch = getattr(producer, "batch", None)  # kombu >= 5.7
        batched = batch is not None and bool(getattr(producer, "supports_batch_publish", False))
        for route in routes.values():  # declared once per queue instead of once per message
            queue = route.get("queue")
            if queue is not None:
                producer.maybe_declare(queue)
        for start in range(0, len(specs), CHUNK_SIZE):
            chunk = range(start, min(start + CHUNK_SIZE, len(specs)))
            # room for every command of the chunk (an LPUSH, plus PEXPIREs where the queue has
            # an expiry), so a chunk is flushed once, when the batch is left
            size = 16 * len(chunk) + 16
            grouping = batch(max_size=size) if batch is not None else nullcontext()
            with grouping:
                for i in chunk:
                    spec = specs[i]
                    soft, hard = contract.time_limits(
                        spec, settings.job_time_base_s, settings.job_time_per_mpx_step_s
                    )
                    options: dict[str, Any] = dict(routes[queues[i]])
                    if deadline_s is not None:
                        options["expiration"] = max(float(deadline_s), 0.0)
                    job = contract.job_payload(spec)
                    if stamp:
                        job["submitted_at"] = time.time()  # as Client._enqueue: queue-wait metric
                    kwargs = {"job": job}
                    message = create_message(
                        spec.job_id,
                        contract.TASK_GENERATE,
                        (),
                        kwargs,
                        expires=deadline_s,
                        reply_to=app.thread_oid,
                        time_limit=hard,
                        soft_time_limit=soft,
                        create_sent_event=sent_event,
                        ignore_result=None,  # as send_task passes it
                        argsrepr="()",
                        kwargsrepr=kwargs_repr(kwargs, kwargsrepr_max, maxlevels),
                        **options,
                    )
                    send_message(producer, contract.TASK_GENERATE, message, declare=(), **options)
                    if not batched:
                        progress.sent += 1  # published at once
            progress.sent = chunk.stop  # leaving the batch flushed the whole chunk


def _simple_text(value: str) -> bool:
    return value.isprintable() and "'" not in value and "\\" not in value


def kwargs_repr(kwargs: dict[str, Any], maxsize: int, maxlevels: int) -> str:
    """The ``kwargsrepr`` header ``send_task`` writes (Celery's ``saferepr``), computed fast.

    For a job whose strings are plain printable text without quotes or backslashes and whose
    repr fits ``maxsize``, ``saferepr`` and ``repr`` agree character for character (checked in
    tests/integration/test_bulk.py); anything else goes through ``saferepr`` itself.
    """
    job = kwargs.get("job")
    if maxlevels >= 3 and len(kwargs) == 1 and isinstance(job, dict):
        simple = True
        for key, value in job.items():
            if not isinstance(key, str) or not _simple_text(key):
                simple = False
                break
            if isinstance(value, str):
                if not _simple_text(value):
                    simple = False
                    break
            elif value is not None and not isinstance(value, int | float):
                simple = False
                break
        if simple:
            text = repr(kwargs)
            if len(text) <= maxsize:
                return text
    return saferepr(kwargs, maxsize, maxlevels=maxlevels)
