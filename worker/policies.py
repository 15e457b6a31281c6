"""The cross-cutting decisions around a job run, one small unit each, called from one place.

As dramatiq's middleware wrap its actors, these wrap the ``fleet.generate`` task: the task in
``worker.tasks`` calls :meth:`JobPolicies.before` and :meth:`JobPolicies.after_failure`, and
nothing else there decides anything. Each unit:

- **message shape and identity**: a message that is not one job fails once, clearly; a job
  without an id takes the task id, so every delivery is the same job;
- **delivery cap**: a job whose worker dies each time it runs it ends as a recorded failure;
- **retry table**: an error's disposition (``fleet.errors``) says whether it retries, for how
  long and with what backoff (:func:`retry_rules`);
- **storage window**: while S3 is down a job retries with backoff within the window, then fails;
- **OOM reroute**: out of memory at one image per call sends the job to the fallback queue once;
- **time limit**: past its soft time limit a job is stopped with a recorded reason;
- **cancellation**: the durable cancel mark in Redis stops a job before or while it generates;
- **failure recording**: failures outside the runner get a record, and the webhook hears of
  every failure.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import redis
from celery import Task
from celery.exceptions import SoftTimeLimitExceeded

from fleet import contract
from fleet.errors import (
    DeviceOutOfMemory,
    Disposition,
    FleetError,
    JobTimedOut,
    JobValidationError,
    StorageError,
    StorageUnavailable,
    TooManyDeliveries,
    WebhookError,
)
from fleet.settings import WorkerSettings
from fleet.storage import ObjectStore
from worker import webhooks
from worker.ops import metrics
from worker.records import flush_unstored, record_raw_failure
from worker.spool import Spool

log = logging.getLogger(__name__)

# -- the retry table ------------------------------------------------------------------------


@dataclass(frozen=True)
class RetryRule:
    """Whether an error of one disposition retries, for how long, with what backoff."""

    retry: bool
    #: Retried until this long after the first failure of the attempt (then it fails).
    window_s: float = 0.0
    backoff_base_s: float = 1.0
    backoff_max_s: float = 60.0

    def delay(self, retries: int) -> float:
        """Exponential backoff: base, 2 base, 4 base, ... capped at ``backoff_max_s``."""
        return float(min(self.backoff_base_s * 2.0**retries, self.backoff_max_s))


def retry_rules(settings: WorkerSettings) -> dict[Disposition, RetryRule]:
    """The one table of retries for jobs, by the error's disposition."""
    return {
        # A bad job fails alone; running it again gives the same answer.
        "job": RetryRule(retry=False),
        # This worker is broken (its model cannot load): the job is failed with the reason.
        "worker": RetryRule(retry=False),
        # Storage away: retried with backoff within FLEET_STORAGE_RETRY_WINDOW_S, the images
        # waiting in the spool (boto3's own retries give up within seconds).
        "transient": RetryRule(
            retry=True,
            window_s=settings.storage_retry_window_s,
            backoff_base_s=1.0,
            backoff_max_s=float(settings.storage_retry_backoff_max_s),
        ),
    }


def disposition_of(error: BaseException) -> Disposition:
    """A fleet error's declared disposition; anything else is this job's failure alone."""
    return error.disposition if isinstance(error, FleetError) else "job"


def webhook_retry_options(settings: WorkerSettings) -> dict[str, Any]:
    """Celery's own retry options for webhook deliveries (the transient row, for receivers)."""
    return {
        "autoretry_for": (WebhookError,),
        "retry_backoff": 1,
        "retry_backoff_max": 300,
        "retry_jitter": False,
        "max_retries": settings.webhook_max_retries,
    }


# -- message shape --------------------------------------------------------------------------


def job_of_message(args: tuple[Any, ...], kwargs: dict[str, Any]) -> Any:
    """The job of a ``fleet.generate`` message: ``kwargs={"job": {...}}`` (the contract), or the
    one positional argument ``args=[{...}]``; anything else is refused, naming what came."""
    if not args and set(kwargs) == {"job"}:
        return kwargs["job"]
    if len(args) == 1 and not kwargs:
        return args[0]
    got = f"{len(args)} positional argument(s) and keyword(s) {sorted(kwargs)}"
    raise JobValidationError(
        [
            (
                "kwargs",
                sorted(kwargs),
                f"a {contract.TASK_GENERATE} message takes exactly one keyword argument "
                f"'job' (see docs/contract.md); got {got}",
            )
        ]
    )


def with_identity(job: Any, task_id: str) -> Any:
    """A job sent without ``job_id`` takes its task id, on every delivery: its failure record,
    cancel key, spool and log lines name it, and a redelivery finds what the first stored."""
    if isinstance(job, dict) and job.get("job_id") is None:
        return {**job, "job_id": task_id}
    return job


# -- delivery cap ---------------------------------------------------------------------------


def count_delivery(client: redis.Redis, task_id: str, retries: int, ttl_s: int) -> int:
    """Count this delivery of this attempt (a retry is a new attempt) in Redis. The counter
    lives as long as the job id's claim (FLEET_JOB_CLAIM_TTL_S): while either remembers the id,
    a second delivery is not taken for a first one, and so looks in S3 before generating."""
    key = contract.DELIVERIES_KEY.format(task_id=task_id, retries=retries)
    with client.pipeline(transaction=False) as pipe:
        count, _ = pipe.incr(key).expire(key, ttl_s).execute()
    return int(count)


def over_delivery_cap(deliveries: int, max_deliveries: int) -> TooManyDeliveries | None:
    """The failure of a job delivered more often than allowed (its worker died each time)."""
    if deliveries <= max_deliveries:
        return None
    return TooManyDeliveries(
        f"delivered {deliveries} times and its worker died each time "
        f"(limit FLEET_MAX_DELIVERIES={max_deliveries}); not run again"
    )


def is_first_attempt(deliveries: int, retries: int, redelivered: bool) -> bool:
    """The first delivery of a first attempt cannot have stored anything before, so the runner
    skips its "already complete?" lookup in S3. Any redelivery or retry looks."""
    return deliveries == 1 and not retries and not redelivered


# -- storage window -------------------------------------------------------------------------


def storage_decision(
    since: float, now: float, retries: int, rule: RetryRule, error: Exception
) -> float | StorageUnavailable:
    """Seconds until the next try while inside the window that began at ``since``; past it,
    the failure that ends the job."""
    waited = now - since
    if waited > rule.window_s:
        return StorageUnavailable(
            f"storage unreachable for {waited:.0f} s (FLEET_STORAGE_RETRY_WINDOW_S="
            f"{rule.window_s:.0f}); last error: {error}"
        )
    return rule.delay(retries)


def outage_started(client: redis.Redis, task_id: str, window_s: float) -> float:
    """When storage first failed for this task (recorded in Redis on the first failure)."""
    key = contract.OUTAGE_KEY.format(task_id=task_id)
    client.set(key, time.time(), nx=True, ex=int(window_s) + 3600)
    return float(client.get(key) or time.time())


# -- OOM reroute ----------------------------------------------------------------------------


def oom_fallback(settings: WorkerSettings, queue: str | None) -> str | None:
    """Where a job that ran out of device memory at one image per call goes next: the
    configured fallback queue, unless it already is there (then it fails: no loop)."""
    fallback = settings.oom_fallback_queue
    if fallback and queue != fallback:
        return fallback
    return None


# -- time limit -----------------------------------------------------------------------------


def timed_out(elapsed_s: float) -> JobTimedOut:
    return JobTimedOut(
        f"stopped after {elapsed_s:.1f} s: past its soft time limit "
        "(set by the producer from FLEET_JOB_TIME_BASE_S and FLEET_JOB_TIME_PER_MPX_STEP_S)"
    )


def killed_at_hard_limit(limit_s: Any) -> JobTimedOut:
    return JobTimedOut(
        f"killed at its hard time limit ({limit_s} s): its pool child was replaced (the soft "
        "limit did not stop it; FLEET_JOB_TIME_BASE_S and FLEET_JOB_TIME_PER_MPX_STEP_S set both)"
    )


# -- cancellation ---------------------------------------------------------------------------


def cancel_checker(get_redis: Callable[[], redis.Redis], job: Any) -> Callable[[], bool] | None:
    """A check of the durable cancel mark in Redis. Celery's revoke list lives in each worker's
    memory and a prefork child never sees it, so `producer cancel` also sets this key."""
    job_id = job.get("job_id") if isinstance(job, dict) else None
    if not isinstance(job_id, str):
        return None
    key = contract.CANCEL_KEY.format(job_id=job_id)

    def is_cancelled() -> bool:
        try:
            return bool(get_redis().exists(key))
        except redis.RedisError:
            return False  # Redis briefly away: keep generating rather than fail the job

    return is_cancelled


# -- the one place the task calls -----------------------------------------------------------


@dataclass(frozen=True)
class Attempt:
    """What the policies found out about this delivery before the job runs."""

    task_id: str
    #: The job as the runner gets it: with its id (the task id when the sender gave none).
    job: Any
    deliveries: int
    first: bool
    queue: str | None


class JobPolicies:
    """The policies of one worker process, with the connections they need."""

    def __init__(
        self,
        settings: WorkerSettings,
        get_redis: Callable[[], redis.Redis],
        get_store: Callable[[], ObjectStore],
    ) -> None:
        self.settings = settings
        self.get_redis = get_redis
        self.get_store = get_store
        self.rules = retry_rules(settings)
        self._progress: Any = None  # the result backend for PROGRESS states, made on first use

    def before(self, task: Task, args: tuple[Any, ...], kwargs: dict[str, Any]) -> Attempt:
        """Take the job from the message and count the delivery; raises (recorded) when the
        job must not run."""
        request = task.request
        task_id = str(request.id)
        try:
            job = with_identity(job_of_message(args, kwargs), task_id)
        except JobValidationError as exc:  # recorded under the task id, never retried
            self.record({"job_id": task_id, "args": list(args), "kwargs": kwargs}, exc)
            self.report_failure(task, {"job_id": task_id}, exc)
            raise
        retries = request.retries or 0
        delivery_info = request.delivery_info or {}
        deliveries = count_delivery(
            self.get_redis(), task_id, retries, self.settings.job_claim_ttl_s
        )
        capped = over_delivery_cap(deliveries, self.settings.max_deliveries)
        if capped is not None:
            self.record(job, capped)
            self.report_failure(task, job, capped)
            raise capped
        first = is_first_attempt(deliveries, retries, bool(delivery_info.get("redelivered")))
        # The counter is the task's: it speaks for the job only when the job's id is the task id
        # (the producer's way). A job id sent under other task ids may be stored already.
        first = first and isinstance(job, dict) and job.get("job_id") == task_id
        return Attempt(task_id, job, deliveries, first, delivery_info.get("routing_key"))

    def cancel_checker(self, job: Any) -> Callable[[], bool] | None:
        return cancel_checker(self.get_redis, job)

    def progress_reporter(self, task: Task, task_id: str) -> Callable[[dict[str, Any]], None]:
        """Progress goes to the result backend as a PROGRESS state, best effort: a job never
        fails or waits over it. Results retry through a Redis outage (result_backend_always_
        retry); progress must not, or generation would stall until Redis is back, so it has a
        backend of its own that gives up at once. ``task_id`` is explicit: the batcher's thread
        reports too."""
        backend = self._progress_backend(task)
        request = task.request  # this task's, also when the batcher's thread reports

        def report(meta: dict[str, Any]) -> None:
            try:
                backend.store_result(task_id, meta, "PROGRESS", request=request)
            except Exception as exc:
                log.warning("[job=%s] progress update failed: %s", task_id, exc)

        return report

    def _progress_backend(self, task: Task) -> Any:
        if self._progress is None:
            backend = type(task.backend)(app=task.app, url=task.app.conf.result_backend)
            backend.always_retry = False
            self._progress = backend
        return self._progress

    def after_success(
        self, task: Task, job: Any, result: dict[str, Any], describe: Callable[[], Any]
    ) -> None:
        webhooks.notify(task.app, job, result)
        self.flush_unstored()
        if metrics.get_metrics() is not None:
            metrics.record_done(job, result, describe(), str(self.settings.served_model))

    def after_failure(self, task: Task, job: Any, error: Exception, elapsed_s: float) -> Exception:
        """The exception the task raises for ``error``: a retry (Celery's ``Retry``, raised
        here), or the failure to record; every failure is reported to the job's webhook."""
        if isinstance(error, SoftTimeLimitExceeded):
            timeout = timed_out(elapsed_s)
            self.record(job, timeout)
            self.report_failure(task, job, timeout)
            return timeout
        if isinstance(error, StorageError):
            return self._storage_failure(task, job, error)
        if isinstance(error, DeviceOutOfMemory):
            fallback = oom_fallback(self.settings, (task.request.delivery_info or {}).get(
                "routing_key"))  # fmt: skip
            if fallback is not None:
                # Same task id, same message, on the queue of a balanced or offloading worker.
                raise task.retry(exc=error, queue=fallback, countdown=0)
        if isinstance(error, FleetError):  # the runner recorded it
            self.report_failure(task, job, error)
        return error

    def _storage_failure(self, task: Task, job: Any, error: StorageError) -> Exception:
        rule = self.rules[disposition_of(error)]
        task_id = str(task.request.id)
        client = self.get_redis()
        since = outage_started(client, task_id, rule.window_s)
        retries = task.request.retries or 0
        decision = storage_decision(since, time.time(), retries, rule, error)
        if isinstance(decision, StorageUnavailable):
            client.delete(contract.OUTAGE_KEY.format(task_id=task_id))
            self.record(job, decision)  # best effort: storage may still be down
            if isinstance(job, dict) and isinstance(job.get("job_id"), str):
                Spool(self.settings).discard(job["job_id"])
            self.report_failure(task, job, decision)
            return decision
        log.warning(
            "[job=%s] storage unavailable for %.0f s; retry %d in %.0f s: %s",
            task_id, time.time() - since, retries + 1, decision, error,
        )  # fmt: skip
        raise task.retry(exc=error, countdown=decision)

    def after_hard_time_limit(self, task: Task, task_id: str, args: Any, kwargs: Any,
                              limit_s: Any) -> None:  # fmt: skip
        """In the worker's main process, after it killed a job at its hard time limit (Celery
        >= 5.6 sends task_failure there): record the failure and tell the webhook."""
        try:
            job = with_identity(job_of_message(tuple(args or ()), dict(kwargs or {})), task_id)
        except JobValidationError:
            job = {"job_id": task_id}
        error = killed_at_hard_limit(limit_s)
        log.error("[job=%s] %s", task_id, error)
        self.record(job, error)
        self.report_failure(task, job, error)

    def flush_unstored(self) -> None:
        """Storage just took a job: write the failures kept in Redis meanwhile to S3."""
        try:
            client = self.get_redis()
            if client.llen(contract.UNSTORED_FAILURES_KEY):
                n = flush_unstored(self.get_store(), client, self.settings.s3_prefix)
                log.info("wrote %d failure record(s) kept in Redis while storage was down", n)
        except Exception as exc:  # never fail a stored job over it
            log.warning("could not write the failures kept in Redis to storage: %s", exc)

    def record(self, job: Any, error: Exception) -> None:
        """A durable record of a failure the runner did not record itself."""
        record_raw_failure(self.get_store(), self.get_redis(), self.settings.s3_prefix, job, error)

    def report_failure(self, task: Task, job: Any, error: BaseException) -> None:
        metrics.record_failed(error)
        webhooks.notify_failure(task.app, job, error)
