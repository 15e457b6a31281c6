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
- **broken worker**: an error that says this worker cannot work (storage refuses it, its pipeline
  fails its self-test) closes the gate and puts the job back, untouched, for a healthy worker;
- **newer schema**: a job of a ``schema_version`` this worker does not know goes back to the end
  of its queue for a worker that knows it (a fleet mid-upgrade), then to the dead letters;
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
from celery.exceptions import Reject, SoftTimeLimitExceeded

from fleet import contract
from fleet.errors import (
    DeviceOutOfMemory,
    Disposition,
    FleetError,
    JobTimedOut,
    JobValidationError,
    SchemaTooNew,
    StorageError,
    StorageRefused,
    StorageUnavailable,
    TooManyDeliveries,
    WebhookError,
)
from fleet.settings import WorkerSettings
from fleet.storage import ObjectStore
from worker import webhooks
from worker.ops import gate, metrics
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
    """Celery's own retry options for webhook deliveries (the transient row, for receivers):
    exponential backoff with full jitter (a random delay up to 1 s, 2 s, 4 s … 300 s), so the
    deliveries that failed together do not all come back to a receiver at the same second.
    ``WebhookRefused`` (a private address, a redirect) is not a WebhookError: never retried."""
    return {
        "autoretry_for": (WebhookError,),
        "retry_backoff": 1,
        "retry_backoff_max": 300,
        "retry_jitter": True,
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
    names = [contract.quote_value(str(k)) for k in list(kwargs)[:10]]
    got = f"{len(args)} positional argument(s) and keyword(s) {names}"
    raise JobValidationError(
        [
            (
                "kwargs",
                names,
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


# -- newer schema ---------------------------------------------------------------------------


def newer_schema(job: Any) -> int | None:
    """The job's ``schema_version`` when it is a version newer than this worker's."""
    version = job.get("schema_version") if isinstance(job, dict) else None
    known = contract.SCHEMA_VERSION
    if isinstance(version, int) and not isinstance(version, bool) and version > known:
        return version
    return None


def schema_decision(version: int, tries: int, max_tries: int) -> float | SchemaTooNew:
    """Seconds to wait before the job goes back to the end of its queue, or, after
    ``max_tries`` workers that did not know its schema, the failure that ends it."""
    if tries >= max_tries:
        return SchemaTooNew(
            f"schema_version {version} is newer than this fleet's workers know (they speak "
            f"{contract.SCHEMA_VERSION}); {tries + 1} workers passed it on. Upgrade the "
            "workers, then `producer retry` it (docs/operations.md, upgrades)"
        )
    return float(min(2.0**tries, 30.0))


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


def dead_letter(client: redis.Redis, task: Task, job: Any, reason: str) -> None:
    """Keep a job no worker could run in the dead letters (``producer failed`` lists them)."""
    import json
    from datetime import datetime, timezone

    raw = json.dumps({"kwargs": {"job": job}}, default=str)
    entry = {"queue": (task.request.delivery_info or {}).get("routing_key"),
             "task_id": task.request.id, "reason": reason, "raw": raw[:4096],
             "raw_chars": len(raw), "at": datetime.now(timezone.utc).isoformat()}  # fmt: skip
    try:
        with client.pipeline(transaction=False) as pipe:
            pipe.lpush(contract.DEAD_LETTERS_KEY, json.dumps(entry))
            pipe.ltrim(contract.DEAD_LETTERS_KEY, 0, contract.DEAD_LETTERS_MAX - 1)
            pipe.execute()
    except redis.RedisError as exc:
        log.error("[job=%s] could not keep it in the dead letters: %s", task.request.id, exc)


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
        #: Why this process can take no job, once it found out while running one.
        self.broken: str | None = None

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
        if self.broken is not None:  # reserved before the gate closed: back, untouched
            self.give_back(task, job, self.broken)
        version = newer_schema(job)
        if version is not None:
            self.pass_on_newer_schema(task, job, version)
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
        if disposition_of(error) == "worker":
            self.broken = (
                f"storage refuses this worker: {error}"
                if isinstance(error, StorageRefused)
                else f"{type(error).__name__}: {error}"
            )
            gate.declare_broken(self.get_redis(), gate.node_name(), self.broken)
            self._uncount_delivery(task)
            if isinstance(job, dict) and isinstance(job.get("job_id"), str):
                Spool(self.settings).discard(job["job_id"])
            self.give_back(task, job, self.broken)
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

    def give_back(self, task: Task, job: Any, reason: str) -> None:
        """Put the job back at the front of its queue, untouched, for a healthy worker: this
        worker cannot run it (the reason). It reads as queued again, not as started."""
        job_id = job.get("job_id") if isinstance(job, dict) else task.request.id
        log.error("[job=%s] back to its queue for a healthy worker: %s", job_id, reason)
        try:
            task.backend.forget(task.request.id)
        except Exception as exc:
            log.warning("[job=%s] could not reset its state to queued: %s", job_id, exc)
        raise Reject(reason, requeue=True)

    def _uncount_delivery(self, task: Task) -> None:
        key = contract.DELIVERIES_KEY.format(task_id=task.request.id,
                                             retries=task.request.retries or 0)  # fmt: skip
        try:
            self.get_redis().decr(key)
        except redis.RedisError as exc:
            log.warning("could not uncount the delivery of %s: %s", task.request.id, exc)

    def pass_on_newer_schema(self, task: Task, job: Any, version: int) -> None:
        """A fleet mid-upgrade: this worker does not know the job's schema. The job goes to the
        end of its queue (a retry: the same task id), waiting a little longer each time, for a
        worker that knows it; after FLEET_UNKNOWN_SCHEMA_TRIES it fails, recorded, and waits in
        the dead letters."""
        tries = task.request.retries or 0
        decision = schema_decision(version, tries, self.settings.unknown_schema_tries)
        if isinstance(decision, SchemaTooNew):
            log.error("[job=%s] %s", task.request.id, decision)
            self.record(job, decision)
            self.report_failure(task, job, decision)
            dead_letter(self.get_redis(), task, job, str(decision))
            raise decision
        log.warning("[job=%s] schema_version %d is newer than this worker's %d: passed on to "
                    "another worker in %.0f s (try %d of %d)", task.request.id, version,
                    contract.SCHEMA_VERSION, decision, tries + 1,
                    self.settings.unknown_schema_tries)  # fmt: skip
        time.sleep(decision)  # not a countdown: an ETA message would sit in this worker
        raise task.retry(countdown=0, max_retries=None)

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
        prefix = contract.raw_job_prefix(self.settings.s3_prefix, job)
        record_raw_failure(self.get_store(), self.get_redis(), prefix, job, error)

    def report_failure(self, task: Task, job: Any, error: BaseException) -> None:
        metrics.record_failed(error)
        webhooks.notify_failure(task.app, job, error)
