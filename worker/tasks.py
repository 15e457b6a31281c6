"""The Celery task: a thin shell around the job runner. Torch is imported on first use only."""

from __future__ import annotations

import json
import logging
import threading
import time
from typing import TYPE_CHECKING, Any

import redis
from celery import Task
from celery.exceptions import SoftTimeLimitExceeded

from producer.contract import CANCEL_KEY, TASK_GENERATE
from producer.errors import (
    DeviceOutOfMemory,
    FleetError,
    JobTimedOut,
    JobValidationError,
    StorageError,
    StorageUnavailable,
    TooManyDeliveries,
)
from worker.app import app
from worker.failures import oom_fallback
from worker.heartbeat import publish_info
from worker.settings import WorkerSettings
from worker.webhooks import notify

if TYPE_CHECKING:
    from worker.engine import Engine
    from worker.jobrunner import JobRunner

log = logging.getLogger(__name__)

_init_lock = threading.Lock()  # the threads pool (batch workers) may race to build these
_settings: WorkerSettings | None = None
_engine: Engine | None = None
_runner: JobRunner | None = None


def get_settings() -> WorkerSettings:
    global _settings
    if _settings is None:
        _settings = WorkerSettings()
    return _settings


def get_engine() -> Engine:
    """The process-wide warm engine (created in the pool child, never in the forking parent)."""
    global _engine
    with _init_lock:
        if _engine is None:
            from worker.engine import Engine

            _engine = Engine(get_settings())
    return _engine


def get_runner() -> JobRunner:
    global _runner
    engine = get_engine()
    with _init_lock:
        if _runner is not None:
            return _runner
        from producer.storage import ObjectStore
        from worker.jobrunner import JobRunner

        settings = get_settings()
        batcher = None
        if settings.batch_size > 1 or threading.current_thread() is not threading.main_thread():
            # Tasks off the main thread: a threads pool, where several jobs are in flight at
            # once. One batcher thread owns the pipeline (a pipeline is not thread-safe): with
            # batch size 1 it generates one job at a time while the task threads encode and
            # upload the previous ones (docs/batching.md, "Overlapped workers").
            from worker.batcher import Batcher

            batcher = Batcher(engine, settings.batch_size, settings.batch_wait_s)
        _runner = JobRunner(settings, engine, ObjectStore(settings), batcher)
    return _runner


@app.task(
    name=TASK_GENERATE,
    bind=True,
    acks_late=True,
    reject_on_worker_lost=True,
    max_retries=None,  # storage retries are bounded in time instead: see _retry_storage
)
def generate(self: Task, job: Any = None, **unexpected: Any) -> dict[str, Any]:
    """Generate one job's images. ``job`` is the JSON job of docs/contract.md."""
    if unexpected or job is None:
        # Wrong message shape: fail it once with a clear reason; it is never retried.
        raise JobValidationError(
            [
                (
                    "kwargs",
                    sorted(unexpected),
                    f"a {TASK_GENERATE} message takes exactly one keyword argument 'job' "
                    "(see docs/contract.md)",
                )
            ]
        )

    deliveries = _count_delivery(self)
    # The first delivery of a first attempt cannot have stored anything before: the runner
    # skips its "already complete?" lookup in S3. Any redelivery or retry looks.
    first_attempt = (
        deliveries == 1
        and not self.request.retries
        and not (self.request.delivery_info or {}).get("redelivered")
    )
    if deliveries > get_settings().max_deliveries:
        error = TooManyDeliveries(
            f"delivered {deliveries} times and its worker died each time "
            f"(limit FLEET_MAX_DELIVERIES={get_settings().max_deliveries}); not run again"
        )
        _record_raw_failure(job, error)
        _notify_failure(job, error)
        raise error

    task_id = self.request.id  # progress may be reported from the batcher's thread

    def progress(meta: dict[str, Any]) -> None:
        try:
            self.update_state(task_id=task_id, state="PROGRESS", meta=meta)
        except Exception as exc:  # progress is best effort; never fail a job over it
            log.warning("[job=%s] progress update failed: %s", task_id, exc)

    started = time.perf_counter()
    runner: JobRunner | None = None
    try:
        runner = get_runner()  # inside: creating the store checks the bucket, S3 may be down
        result = runner.run(
            job,
            task_id=self.request.id,
            on_progress=progress,
            node=self.request.hostname,
            is_cancelled=_cancel_checker(job),
            queue=(self.request.delivery_info or {}).get("routing_key"),
            first_attempt=first_attempt,
        )
        notify(job, result)
        _record_metrics(job, result, runner)
        return result
    except StorageError as exc:
        raise _retry_storage(self, job, exc) from exc
    except DeviceOutOfMemory as exc:
        queue = (self.request.delivery_info or {}).get("routing_key")
        fallback = oom_fallback(get_settings(), queue)
        if fallback is None:
            _notify_failure(job, exc)
            raise
        # Same task id, same message, on the queue of a balanced or offloading worker.
        raise self.retry(exc=exc, queue=fallback, countdown=0) from exc
    except SoftTimeLimitExceeded:
        timeout = JobTimedOut(
            f"stopped after {time.perf_counter() - started:.1f} s: past its soft time limit "
            "(set by the producer from FLEET_JOB_TIME_BASE_S and FLEET_JOB_TIME_PER_MPX_STEP_S)"
        )
        _record_raw_failure(job, timeout)
        _notify_failure(job, timeout)
        raise timeout from None
    except FleetError as exc:
        _notify_failure(job, exc)
        raise
    finally:
        if runner is not None:
            _publish_worker_info(str(self.request.hostname or ""), runner)


DELIVERIES_KEY = "fleet:deliveries:{task_id}:{retries}"
OUTAGE_KEY = "fleet:storage-outage:{task_id}"
#: Failures that could not be written to S3 (storage down); `producer failed` lists them too.
UNSTORED_FAILURES_KEY = "fleet:failures:unstored"
_redis: redis.Redis | None = None


def _get_redis() -> redis.Redis:
    global _redis
    if _redis is None:
        _redis = redis.Redis.from_url(get_settings().redis_url, socket_timeout=5)
    return _redis


def _retry_storage(task: Task, job: Any, exc: StorageError) -> Exception:
    """Retry with exponential backoff while S3 is down, for at most FLEET_STORAGE_RETRY_WINDOW_S
    from the first failure (boto3's own retries give up within seconds); then fail with the
    reason. The generated images wait in the spool meanwhile, so they are not generated again."""
    settings = get_settings()
    key = OUTAGE_KEY.format(task_id=task.request.id)
    r = _get_redis()
    r.set(key, time.time(), nx=True, ex=int(settings.storage_retry_window_s) + 3600)
    since = float(r.get(key) or time.time())
    waited = time.time() - since
    if waited > settings.storage_retry_window_s:
        r.delete(key)
        failure = StorageUnavailable(
            f"storage unreachable for {waited:.0f} s (FLEET_STORAGE_RETRY_WINDOW_S="
            f"{settings.storage_retry_window_s:.0f}); last error: {exc}"
        )
        _record_raw_failure(job, failure)  # best effort: storage may still be down
        return failure
    retries = task.request.retries or 0
    delay = min(2.0**retries, settings.storage_retry_backoff_max_s)
    log.warning(
        "[job=%s] storage unavailable for %.0f s; retry %d in %.0f s: %s",
        task.request.id,
        waited,
        retries + 1,
        delay,
        exc,
    )
    return task.retry(exc=exc, countdown=delay)


def _record_metrics(job: Any, result: dict[str, Any], runner: JobRunner) -> None:
    from worker.metrics import get_metrics

    metrics = get_metrics()
    if metrics is None:
        return
    try:
        steps = int(job.get("steps") or 0) if isinstance(job, dict) else 0
        metrics.job_done(result, steps, str(get_settings().served_model))
        metrics.engine_facts(runner.engine.describe())
    except Exception as exc:  # metrics never fail a job
        log.warning("metrics update failed: %s", exc)


def _notify_failure(job: Any, exc: Exception) -> None:
    from worker.metrics import get_metrics

    metrics = get_metrics()
    if metrics is not None:
        metrics.job_failed(type(exc).__name__)
    job_id = job.get("job_id") if isinstance(job, dict) else None
    if isinstance(job_id, str):
        notify(job, {"schema_version": 1, "job_id": job_id, "status": "failed",
                     "error": str(exc), "error_type": type(exc).__name__})  # fmt: skip


def _cancel_checker(job: Any) -> Any:
    """A check of the durable cancel mark in Redis. Celery's revoke list lives in each worker's
    memory and a prefork child never sees it, so `producer cancel` also sets this key."""
    job_id = job.get("job_id") if isinstance(job, dict) else None
    if not isinstance(job_id, str):
        return None
    key = CANCEL_KEY.format(job_id=job_id)

    def is_cancelled() -> bool:
        try:
            return bool(_get_redis().exists(key))
        except redis.RedisError:
            return False  # Redis briefly away: keep generating rather than fail the job

    return is_cancelled


def _count_delivery(task: Task) -> int:
    """Count deliveries of this attempt (a retry is a new attempt) in Redis, so a job that kills
    its worker every time ends as a recorded failure instead of an endless loop."""
    key = DELIVERIES_KEY.format(task_id=task.request.id, retries=task.request.retries or 0)
    with _get_redis().pipeline(transaction=False) as pipe:
        count, _ = pipe.incr(key).expire(key, 7 * 24 * 3600).execute()
    return int(count)


def _record_raw_failure(job: Any, error: Exception) -> None:
    from producer.storage import ObjectStore
    from worker.failures import raw_failure_manifest, write_failure

    settings = get_settings()
    job_id = job.get("job_id") if isinstance(job, dict) else None
    if not isinstance(job_id, str):
        return
    store = ObjectStore(settings, create_bucket=False)
    manifest = raw_failure_manifest(
        job_id, job, str(error), type(error).__name__, store.bucket, settings.s3_prefix
    )
    if not write_failure(store, settings.s3_prefix, manifest):
        # Storage is down: keep the failure in Redis (AOF-persisted) so it is never silent.
        entry = {k: manifest[k] for k in ("job_id", "error", "error_type")}
        entry["failed_at"] = manifest["finished_at"]
        _get_redis().lpush(UNSTORED_FAILURES_KEY, json.dumps(entry))


_published: tuple[str, float] | None = None  # (the info as JSON, when)


def _publish_worker_info(node: str, runner: JobRunner) -> None:
    """Device facts of this worker for `python -m worker status` (best effort): after the first
    job, then only when they changed and at most once per heartbeat interval, so a stream of
    short jobs does not pay a Redis write each."""
    global _published
    if not node or runner.engine.pipe is None:
        return
    try:
        info = runner.engine.describe()
        text = json.dumps(info, sort_keys=True, default=str)
        now = time.monotonic()
        if _published is not None:
            age = now - _published[1]
            if age < get_settings().heartbeat_interval_s or (_published[0] == text and age < 3600):
                return  # the key lives a day: refreshed hourly while nothing changes
        publish_info(_get_redis(), node, info)
        _published = (text, now)
    except Exception as exc:
        log.warning("could not publish worker info: %s", exc)
