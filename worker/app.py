"""The Celery app and its configuration. No torch here: `celery inspect` and imports stay light."""

from __future__ import annotations

import logging
import os
import signal
import threading
from typing import Any

import redis
from celery import Celery
from celery.exceptions import TimeLimitExceeded
from celery.signals import (
    after_setup_logger,
    after_setup_task_logger,
    celeryd_after_setup,
    task_failure,
    task_revoked,
    worker_process_init,
    worker_ready,
    worker_shutdown,
    worker_shutting_down,
)

from fleet import contract
from fleet.brokers import broker_error
from fleet.celeryconf import celery_config, make_celery
from fleet.contract import TASK_GENERATE, WEBHOOK_QUEUE
from fleet.errors import JobExpired
from fleet.settings import WorkerSettings
from worker.ops import gate
from worker.ops.heartbeat import Heartbeat
from worker.ops.transport import LeaseKeeper

log = logging.getLogger(__name__)


def worker_config(settings: WorkerSettings) -> dict[str, Any]:
    """The shared Celery configuration plus what only a worker needs (reliability, events)."""
    shared = celery_config(settings)
    return {
        **shared,
        # Kombu's Redis transport, but a garbage list entry cannot stop the worker.
        "broker_transport": "worker.ops.transport:Transport",
        # A job is acknowledged after it ran, so a killed worker's job is delivered again.
        "task_acks_late": True,
        "task_reject_on_worker_lost": True,
        # A lost broker connection lets running jobs finish (and be acknowledged once it is
        # back) instead of killing their pool process: True would throw away every running
        # generation on each Redis blip, count a delivery each time (TooManyDeliveries after
        # FLEET_MAX_DELIVERIES blips), and with Redis away leave the job for the visibility
        # timeout. Our transport keeps running jobs' messages held over the reconnect, so
        # they are not delivered twice (worker/ops/transport.py; Celery 6 flips the default).
        "worker_cancel_long_running_tasks_on_connection_loss": False,
        "worker_prefetch_multiplier": 1,
        "task_track_started": True,
        "worker_hijack_root_logger": False,
        "worker_send_task_events": True,
        "task_send_sent_event": True,
        "broker_transport_options": {
            **shared["broker_transport_options"],
            "unacked_restore_interval": settings.unacked_restore_interval_s,
            "unacked_restore_throttle": settings.unacked_restore_throttle,
        },
        # Storing a result (or PROGRESS) survives a Redis outage as storing images survives an
        # S3 outage: retried with backoff for about the storage retry window, not failed.
        "result_backend_always_retry": True,
        "result_backend_base_sleep_between_retries_ms": 100,
        "result_backend_max_sleep_between_retries_ms": 5000,
        "result_backend_max_retries": int(settings.storage_retry_window_s / 5) + 10,
        # Registers the tasks by name; worker.tasks imports no torch at module level either.
        "include": ["worker.tasks"],
    }


def create_app(settings: WorkerSettings | None = None) -> Celery:
    settings = settings or WorkerSettings()
    app = make_celery("fleet", settings, **worker_config(settings))
    app.steps["consumer"].add(gate.HoldJobQueues)  # no job is fetched before the gate opens
    return app


app = create_app()

if WorkerSettings().metrics_port:
    # Before anything imports prometheus_client, and before the pool forks.
    from worker.ops.metrics import prepare_multiprocess_dir

    prepare_multiprocess_dir()


@after_setup_logger.connect
@after_setup_task_logger.connect
def _json_logs(logger: logging.Logger | None = None, **_: Any) -> None:
    if logger is not None and WorkerSettings().log_format == "json":
        from worker.ops.logs import use_json

        use_json(logger)


@worker_process_init.connect
def _warm_up_in_child(**_: Any) -> None:
    """Load the pipeline in the pool child, in a thread: Celery kills init handlers after 4 s."""
    _warm_up()


def _runs_tasks_in_this_process(consumer: Any) -> bool:
    """True for the threads and solo pools: no pool child, so no worker_process_init either,
    and the pipeline is loaded in the main process. Never for prefork (its parent must not load
    torch before forking)."""
    pool = getattr(consumer, "pool", None)
    return pool is not None and not type(pool).__module__.endswith(".prefork")


def _warm_up() -> None:
    """Load the pipeline and run the storage canary in a thread, then publish whether this
    worker can take jobs (the gate in the main process opens the job queues on "ready")."""
    settings = WorkerSettings()
    node = gate.node_name()
    if not node:
        return  # not started by `celery worker` (no main process holding queues)

    def check() -> None:
        from worker import runtime

        warm = bool(settings.warmup and settings.model)
        load = runtime.get_engine().setup if warm else None

        def self_test() -> None:
            runtime.get_engine().self_test()
            # The model's rules (in the worker info) are there before the gate opens, so
            # producers refuse what this model cannot honour from the first job on.
            runtime.publish_worker_info(node)

        gate.check_readiness(runtime.get_redis(), node, load, runtime.verify_storage,
                             self_test=self_test if warm else None,
                             redis_check=runtime.check_redis)  # fmt: skip

    threading.Thread(target=check, name="fleet-warmup", daemon=True).start()


@celeryd_after_setup.connect
def _make_gate(sender: str | None = None, **_: Any) -> None:
    """In the main process, before the pool forks: the gate that holds the job queues."""
    if not sender:
        return
    os.environ[gate.NODE_ENV] = sender
    url = WorkerSettings().redis_url
    client = redis.Redis.from_url(url, socket_timeout=5)
    gate.GATE = gate.Gate(client)
    try:
        # A restarted worker keeps its node name: the state its last process left ("ready")
        # must not open the gate before this one's pool child has checked again.
        gate.publish_state(client, sender, gate.STARTING, "starting")
    except redis.RedisError as exc:
        # Celery's consumer retries the connection forever, saying little: say what to fix.
        error = broker_error(exc, url)
        log.error("this worker takes no jobs: %s", error or exc)


_heartbeat: Heartbeat | None = None
_leases: LeaseKeeper | None = None


@worker_ready.connect
def _start_heartbeat(sender: Any = None, **_: Any) -> None:
    """In the worker's main process: refresh the health key while the worker runs."""
    global _heartbeat
    settings = WorkerSettings()
    queues = sorted(q.name for q in sender.task_consumer.queues) if sender is not None else []
    held = gate.GATE.held if gate.GATE is not None else []
    queues = sorted(set(queues) | set(held))
    _heartbeat = Heartbeat(
        settings.redis_url,
        sender.hostname if sender is not None else "unknown",
        queues,
        settings.heartbeat_interval_s,
        settings.heartbeat_ttl_s,
        status=gate.GATE.status if gate.GATE is not None else None,
    )
    _heartbeat.start()
    if gate.GATE is not None:
        gate.GATE.start()
    if sender is not None:
        global _leases
        _leases = LeaseKeeper(sender, max(1.0, settings.visibility_timeout_s / 4))
        _leases.start()
    if sender is not None and _runs_tasks_in_this_process(sender) and set(queues) - {WEBHOOK_QUEUE}:
        _warm_up()  # the first job should not pay the model load on a threads-pool worker
    if settings.metrics_port:
        from worker.ops.metrics import serve

        try:
            serve(settings.metrics_port, settings.redis_url)
        except OSError as exc:
            log.error("cannot serve metrics on port %d: %s", settings.metrics_port, exc)


@worker_shutting_down.connect
def _bound_the_drain(how: str | None = None, **_: Any) -> None:
    """A warm shutdown (SIGTERM) lets the running job finish, for FLEET_DRAIN_TIMEOUT_S at most;
    then a cold shutdown puts it back in its queue at once (Celery cancels the unacknowledged
    job and restores its message), rather than after the visibility timeout, before the
    orchestrator's SIGKILL. Celery's own worker_soft_shutdown_timeout waits its whole timeout
    even when the job ends sooner, so the timer is ours and the cold shutdown Celery's."""
    if how != "Warm":
        return
    timeout = WorkerSettings().drain_timeout_s

    def escalate() -> None:
        log.warning("drain: a job still runs after %.0f s (FLEET_DRAIN_TIMEOUT_S): back to its "
                    "queue for another worker (cold shutdown)", timeout)  # fmt: skip
        os.kill(os.getpid(), signal.SIGQUIT)

    timer = threading.Timer(timeout, escalate)
    timer.daemon = True
    timer.start()
    log.info("draining: the running job may finish for %.0f s", timeout)


@worker_shutdown.connect
def _stop_heartbeat(**_: Any) -> None:
    if _heartbeat is not None:
        _heartbeat.stop()
    if _leases is not None:
        _leases.stop()


@task_revoked.connect
def _record_expired(request: Any = None, expired: bool = False, **_: Any) -> None:
    """A job past its deadline is not started; record that, since results expire."""
    if not expired or request is None:
        return
    from worker.records import record_raw_failure
    from worker.runtime import get_redis, get_settings, get_store

    job = (request.kwargs or {}).get("job")
    if not isinstance(job, dict):
        job = {"job_id": request.id}

    def record() -> None:
        try:
            error = JobExpired("expired: not started before its deadline")
            prefix = contract.raw_job_prefix(get_settings().s3_prefix, job)
            record_raw_failure(get_store(), get_redis(), prefix, job, error)
        except Exception:
            log.exception("could not record the expiry of job %s", job.get("job_id"))

    # Celery sends this on the consumer's thread: S3 (maybe slow, or retrying) must not stall it.
    threading.Thread(target=record, name="fleet-expiry-record", daemon=True).start()


@task_failure.connect
def _record_hard_time_limit(
    sender: Any = None, task_id: str | None = None, exception: BaseException | None = None,
    args: Any = None, kwargs: Any = None, **_: Any,
) -> None:  # fmt: skip
    """A job killed at its hard time limit gets a failure record and its webhook. Celery sends
    this in the main process, on the consumer's thread: the S3 write goes to a thread."""
    if not isinstance(exception, TimeLimitExceeded) or sender is None or task_id is None:
        return
    if sender.name != TASK_GENERATE:
        return
    from worker.policies import JobPolicies
    from worker.runtime import get_redis, get_settings, get_store

    policies = JobPolicies(get_settings(), get_redis, get_store)
    limit = exception.args[0] if exception.args else "?"
    threading.Thread(
        target=policies.after_hard_time_limit,
        args=(sender, task_id, args, kwargs, limit),
        name="fleet-hard-limit-record",
        daemon=True,
    ).start()
