"""The Celery task: a thin shell around the job runner. Torch is imported on first use only."""

from __future__ import annotations

import logging
from typing import TYPE_CHECKING, Any

import redis
from celery import Task

from producer.contract import TASK_GENERATE
from producer.errors import JobValidationError, StorageError, TooManyDeliveries
from worker.app import app
from worker.heartbeat import publish_info
from worker.settings import WorkerSettings

if TYPE_CHECKING:
    from worker.engine import Engine
    from worker.jobrunner import JobRunner

log = logging.getLogger(__name__)

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
    if _engine is None:
        from worker.engine import Engine

        _engine = Engine(get_settings())
    return _engine


def get_runner() -> JobRunner:
    global _runner
    if _runner is None:
        from producer.storage import ObjectStore
        from worker.jobrunner import JobRunner

        _runner = JobRunner(get_settings(), get_engine(), ObjectStore(get_settings()))
    return _runner


@app.task(
    name=TASK_GENERATE,
    bind=True,
    acks_late=True,
    reject_on_worker_lost=True,
    autoretry_for=(StorageError,),
    retry_backoff=2,
    retry_backoff_max=get_settings().storage_retry_backoff_max_s,
    retry_jitter=True,
    max_retries=get_settings().storage_retries,
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
    if deliveries > get_settings().max_deliveries:
        error = TooManyDeliveries(
            f"delivered {deliveries} times and its worker died each time "
            f"(limit FLEET_MAX_DELIVERIES={get_settings().max_deliveries}); not run again"
        )
        _record_raw_failure(job, error)
        raise error

    def progress(meta: dict[str, Any]) -> None:
        self.update_state(state="PROGRESS", meta=meta)

    runner = get_runner()
    try:
        return runner.run(
            job, task_id=self.request.id, on_progress=progress, node=self.request.hostname
        )
    finally:
        _publish_worker_info(str(self.request.hostname or ""), runner)


DELIVERIES_KEY = "fleet:deliveries:{task_id}:{retries}"
_redis: redis.Redis | None = None


def _count_delivery(task: Task) -> int:
    """Count deliveries of this attempt (a retry is a new attempt) in Redis, so a job that kills
    its worker every time ends as a recorded failure instead of an endless loop."""
    global _redis
    if _redis is None:
        _redis = redis.Redis.from_url(get_settings().redis_url, socket_timeout=5)
    key = DELIVERIES_KEY.format(task_id=task.request.id, retries=task.request.retries or 0)
    count = int(_redis.incr(key))
    _redis.expire(key, 7 * 24 * 3600)
    return count


def _record_raw_failure(job: Any, error: Exception) -> None:
    from producer.storage import ObjectStore
    from worker.failures import raw_failure_manifest, write_failure

    settings = get_settings()
    job_id = job.get("job_id") if isinstance(job, dict) else None
    if not isinstance(job_id, str):
        return
    store = ObjectStore(settings)
    manifest = raw_failure_manifest(
        job_id, job, str(error), type(error).__name__, store.bucket, settings.s3_prefix
    )
    write_failure(store, settings.s3_prefix, manifest)


def _publish_worker_info(node: str, runner: JobRunner) -> None:
    """Device facts of this worker for `python -m worker status` (best effort)."""
    if not node or runner.engine.pipe is None:
        return
    try:
        publish_info(get_settings().redis_url, node, runner.engine.describe())
    except Exception as exc:
        log.warning("could not publish worker info: %s", exc)
