"""A worker takes jobs only once it can do them: its pipeline loaded and its storage canary passed.

How:
- **Hold** (a consumer bootstep, right after Celery's Tasks step and before the event loop
  fetches anything): the worker stops consuming its job queues; the webhook queue stays.
- **Ready check** (where the pipeline lives: the prefork pool child, or the main process of a
  threads or solo pool): load the pipeline, run the storage canary (put, head, get, delete),
  then publish the state in ``fleet:worker-state:<node>``: ``ready``, or ``broken`` with what to
  fix. Storage that is only away is retried with backoff, the state ``starting`` meanwhile.
- **Open** (a thread of the main process): once the state reads ``ready``, the held queues are
  added back with Celery's own ``add_consumer`` control command. A broken worker stays up,
  consumes nothing, logs why, and its heartbeat carries the reason to ``python -m worker check``.
- **Close** (the same thread): a worker found broken while it runs (storage starts refusing
  its credentials, the device or pipeline fails its self-test) publishes ``broken`` from
  wherever it found out (:func:`declare_broken`); the gate then cancels its job queues with
  ``cancel_consumer``, and the job that found out goes back to its queue untouched.

Raising in ``worker_process_init`` instead would make billiard respawn the child in a loop; a
plain synchronous load would still let the main process reserve a message meanwhile.
"""

from __future__ import annotations

import json
import logging
import os
import time
from collections.abc import Callable
from typing import Any

import redis
from celery import bootsteps

from fleet.contract import WEBHOOK_QUEUE, WORKER_STATE_KEY
from fleet.errors import FleetError, StorageError, StorageRefused
from worker.ops.periodic import Periodic

log = logging.getLogger(__name__)

READY, STARTING, BROKEN = "ready", "starting", "broken"
#: The Celery node name, handed from the main process to its pool children.
NODE_ENV = "DIFFUSION_FLEET_NODE"
#: A worker's state outlives a restart of its main process by this much at most.
STATE_TTL_S = 24 * 3600


def node_name() -> str:
    return os.environ.get(NODE_ENV, "")


def publish_state(client: redis.Redis, node: str, state: str, reason: str | None = None) -> None:
    value = {"state": state, "reason": reason, "pid": os.getpid(), "at": time.time()}
    client.set(WORKER_STATE_KEY.format(node=node), json.dumps(value), ex=STATE_TTL_S)


def read_state(client: redis.Redis, node: str) -> dict[str, Any]:
    raw = client.get(WORKER_STATE_KEY.format(node=node))
    return dict(json.loads(raw)) if raw else {"state": STARTING, "reason": "not reported yet"}


def declare_broken(client: redis.Redis | None, node: str, reason: str) -> None:
    """This worker can take no job until it is fixed: say why, and close the gate."""
    log.error("this worker takes no jobs: %s", reason)
    if client is not None and node:
        publish_state(client, node, BROKEN, reason)


def check_readiness(
    client: redis.Redis,
    node: str,
    load_model: Callable[[], None] | None,
    canary: Callable[[], None],
    sleep: Callable[[float], None] = time.sleep,
    max_backoff_s: float = 30.0,
    self_test: Callable[[], None] | None = None,
    redis_check: Callable[[], None] | None = None,
) -> str:
    """Check Redis's settings, load the model, generate a self-test image, pass the storage
    canary, and publish the outcome; returns the state."""
    publish_state(client, node, STARTING, "loading the model")
    # Each step: what to run, the errors that mean "broken", and what to tell the operator.
    steps: list[tuple[Callable[[], None] | None, type[Exception], Callable[[Exception], str]]] = [
        (redis_check, FleetError, lambda e: f"Redis would lose the fleet's keys: {e}"),
        (load_model, Exception, lambda e: f"the model cannot load: {e} ({_load_hint(e)})"),
        (self_test, Exception, lambda e: f"the pipeline fails its self-test: {e}"),
    ]  # fmt: skip
    for step, fails_with, say in steps:
        if step is None:
            continue
        try:
            step()
        except fails_with as exc:
            declare_broken(client, node, say(exc))
            return BROKEN
    delay = 1.0
    while True:
        try:
            canary()
            break
        except StorageRefused as exc:
            declare_broken(client, node, f"storage refuses this worker: {exc}")
            return BROKEN
        except StorageError as exc:
            reason = f"storage unreachable, trying again in {delay:.0f} s: {exc}"
            log.warning("this worker takes no jobs yet: %s", reason)
            publish_state(client, node, STARTING, reason)
            sleep(delay)
            delay = min(delay * 2, max_backoff_s)
    publish_state(client, node, READY)
    log.info("ready: the model is loaded and storage took the canary")
    return READY


def _causes(exc: BaseException) -> list[BaseException]:
    """The error and the ones it was raised from or during (diffusers turns the hub's
    ``GatedRepoError`` into a plain ``OSError`` raised while handling it)."""
    chain: list[BaseException] = []
    seen: BaseException | None = exc
    while seen is not None and seen not in chain and len(chain) < 10:
        chain.append(seen)
        seen = seen.__cause__ or seen.__context__
    return chain


def _load_hint(exc: BaseException) -> str:
    """What to fix when the model does not load: a gated or private hub model wants a token,
    and a 403 means the token has no access to it."""
    statuses = set()
    text = ""
    for cause in _causes(exc):
        text += f" {type(cause).__name__} {cause}"
        status = getattr(getattr(cause, "response", None), "status_code", None)
        if isinstance(status, int):
            statuses.add(status)
    if 403 in statuses:
        return ("the hub refused the token (403): give HF_TOKEN a token of an account that "
                "accepted the model's license on the hub, with read access")  # fmt: skip
    if 401 in statuses or "GatedRepo" in text:
        return "a gated or private hub model: set HF_TOKEN to a token with access to it"
    return "fix FLEET_MODEL, or the hub token and network"


class Gate(Periodic):
    """In the main process: holds the job queues until the worker's state reads ready."""

    name = "fleet-gate"

    def __init__(self, client: redis.Redis, interval_s: float = 0.5) -> None:
        super().__init__(interval_s)
        self.client = client
        self.consumer: Any = None
        self.held: list[str] = []
        self.opened = False
        self.state: dict[str, Any] = {"state": STARTING, "reason": "starting"}
        self._said: str | None = None

    def hold(self, consumer: Any) -> None:
        """Stop consuming the job queues (on a consumer restart too, until the gate opened)."""
        self.consumer = consumer
        if self.opened:
            return
        names = [q.name for q in consumer.task_consumer.queues if q.name != WEBHOOK_QUEUE]
        for name in names:
            consumer.cancel_task_queue(name)
        self.held = sorted(set(self.held) | set(names))
        if not self.held:  # e.g. a webhooks-only worker: nothing to wait for
            self.opened = True
            self.state = {"state": READY, "reason": None}
            publish_state(self.client, consumer.hostname, READY)
        else:
            log.info("holding queue(s) %s until the model is loaded and storage works",
                     ", ".join(self.held))  # fmt: skip

    def status(self) -> dict[str, Any]:
        return {"state": self.state.get("state"), "reason": self.state.get("reason")}

    def tick(self) -> None:
        if self.consumer is None:
            return
        self.state = read_state(self.client, self.consumer.hostname)
        state, reason = self.state.get("state"), self.state.get("reason")
        if state == BROKEN and self._said != reason:
            self._said = reason
            log.error("broken: consuming no job queue: %s", reason)
        if self.opened:
            if state == BROKEN and self.held:
                self.close()
            return
        if state != READY:
            return
        consumer = self.consumer
        for name in self.held:
            if not consumer.task_consumer.consuming_from(name):
                consumer.app.control.add_consumer(
                    name, destination=[consumer.hostname], reply=True, timeout=5
                )
        if all(consumer.task_consumer.consuming_from(name) for name in self.held):
            self.opened = True
            log.info("consuming %s", ", ".join(self.held))

    def close(self) -> None:
        """Stop consuming the job queues of a worker found broken while it ran."""
        consumer = self.consumer
        for name in self.held:
            if consumer.task_consumer.consuming_from(name):
                consumer.app.control.cancel_consumer(
                    name, destination=[consumer.hostname], reply=True, timeout=5
                )
        if not any(consumer.task_consumer.consuming_from(name) for name in self.held):
            self.opened = False
            log.error("stopped consuming %s", ", ".join(self.held))


#: The gate of this main process (one consumer per worker).
GATE: Gate | None = None


class HoldJobQueues(bootsteps.StartStopStep):
    """Consumer bootstep: hand the job queues to the gate before any message is fetched."""

    requires = ("celery.worker.consumer.tasks:Tasks",)

    def start(self, c: Any) -> None:
        if GATE is not None:
            GATE.hold(c)
