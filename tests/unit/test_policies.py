"""Each policy around a job run, on its own (worker.policies). The integration tests
(test_reliability, test_cancel, test_bulk) prove them again through a real worker."""

from __future__ import annotations

import json
from types import SimpleNamespace
from typing import Any

import pytest
import redis
from celery.exceptions import SoftTimeLimitExceeded

from fleet import contract
from fleet.errors import (
    DISPOSITIONS,
    ConfigurationError,
    DeviceOutOfMemory,
    FleetError,
    GenerationError,
    JobTimedOut,
    JobValidationError,
    ModelLoadError,
    StorageError,
    StorageUnavailable,
    TooManyDeliveries,
    WebhookError,
)
from fleet.settings import WorkerSettings
from worker import policies
from worker.ops.heartbeat import InfoPublisher
from worker.records import record_raw_failure


def settings(**kw: Any) -> WorkerSettings:
    return WorkerSettings(_env_file=None, **kw)


class FakeRedis:
    """The few Redis commands the policies use, in memory (a narrow unit-test stand-in)."""

    def __init__(self, down: bool = False) -> None:
        self.data: dict[str, Any] = {}
        self.down = down

    def _check(self) -> None:
        if self.down:
            raise redis.ConnectionError("Error 111 connecting: Connection refused")

    def exists(self, key: str) -> int:
        self._check()
        return int(key in self.data)

    def set(self, key: str, value: Any, nx: bool = False, ex: int | None = None) -> bool:
        self._check()
        if nx and key in self.data:
            return False
        self.data[key] = str(value).encode()
        return True

    def get(self, key: str) -> Any:
        self._check()
        return self.data.get(key)

    def delete(self, key: str) -> int:
        return int(self.data.pop(key, None) is not None)

    def decr(self, key: str) -> int:
        self.data[key] = str(int(self.data.get(key, b"0")) - 1).encode()
        return int(self.data[key])

    def lpush(self, key: str, value: str) -> FakeRedis:
        self.data.setdefault(key, []).insert(0, value)
        return self

    def ltrim(self, key: str, start: int, end: int) -> FakeRedis:
        self.data[key] = self.data.get(key, [])[start : end + 1]
        return self

    def pipeline(self, transaction: bool = True) -> FakeRedis:
        return self

    def execute(self) -> list[Any]:
        return []

    def __enter__(self) -> FakeRedis:
        return self

    def __exit__(self, *_: object) -> None:
        pass


class FakeTask:
    """A bound Celery task's request and retry, as the policies see them."""

    def __init__(self, retries: int = 0, queue: str = "fleet") -> None:
        self.request = SimpleNamespace(
            id="task-1", retries=retries, delivery_info={"routing_key": queue}, hostname="n@h"
        )
        self.app = SimpleNamespace(send_task=self._send)
        self.forgotten: list[str] = []
        self.backend = SimpleNamespace(forget=self.forgotten.append)
        self.sent: list[tuple[str, dict[str, Any]]] = []
        self.retried: dict[str, Any] | None = None

    def _send(self, name: str, kwargs: dict[str, Any], queue: str) -> None:
        self.sent.append((name, kwargs))

    def retry(self, **kw: Any) -> Exception:
        self.retried = kw
        raise RuntimeError("retry")  # Celery raises Retry here


# -- the retry table ------------------------------------------------------------------------


def test_each_error_declares_a_disposition_the_retry_table_covers() -> None:
    rules = policies.retry_rules(
        settings(storage_retry_window_s=120, storage_retry_backoff_max_s=8)
    )
    assert set(rules) == set(DISPOSITIONS)
    assert not rules["job"].retry and not rules["worker"].retry
    assert rules["transient"].retry and rules["transient"].window_s == 120
    assert [rules["transient"].delay(n) for n in range(6)] == [1, 2, 4, 8, 8, 8]
    assert policies.disposition_of(StorageError("s3 down")) == "transient"
    assert policies.disposition_of(WebhookError("503")) == "transient"
    assert policies.disposition_of(ModelLoadError("no such model")) == "worker"
    assert policies.disposition_of(ConfigurationError("bad")) == "worker"
    for job_error in (JobValidationError("bad"), GenerationError("x"), DeviceOutOfMemory("x")):
        assert policies.disposition_of(job_error) == "job"
    assert policies.disposition_of(KeyError("a bug")) == "job"  # fails alone, worker goes on
    assert StorageError("x").retryable and not ModelLoadError("x").retryable
    assert not FleetError("x").retryable


def test_webhook_deliveries_use_celerys_own_retries_for_transient_errors() -> None:
    options = policies.webhook_retry_options(settings(webhook_max_retries=3))
    assert options["autoretry_for"] == (WebhookError,)
    assert options["max_retries"] == 3 and options["retry_backoff"] == 1


# -- message shape and delivery cap ---------------------------------------------------------


@pytest.mark.parametrize(
    ("args", "kwargs"),
    [((), {}), ((), {"job": {}, "spec": 1}), (({}, {}), {}), (({},), {"job": {}})],
)
def test_a_message_that_is_not_one_job_is_refused(args: Any, kwargs: Any) -> None:
    with pytest.raises(JobValidationError, match="exactly one keyword argument 'job'"):
        policies.job_of_message(args, kwargs)


def test_a_job_keeps_one_identity_the_task_id_when_it_has_none() -> None:
    job = {"prompt": "x"}
    assert policies.job_of_message((), {"job": job}) is job  # the contract's shape
    assert policies.job_of_message((job,), {}) is job  # one positional job: the same treatment
    assert policies.with_identity(job, "task-7") == {"prompt": "x", "job_id": "task-7"}
    assert policies.with_identity({"job_id": None}, "t")["job_id"] == "t"
    assert policies.with_identity({"job_id": "mine"}, "t")["job_id"] == "mine"
    assert policies.with_identity("not a dict", "t") == "not a dict"


def test_the_delivery_cap_fails_a_job_whose_worker_dies_every_time() -> None:
    assert policies.over_delivery_cap(3, 3) is None
    capped = policies.over_delivery_cap(4, 3)
    assert isinstance(capped, TooManyDeliveries) and "FLEET_MAX_DELIVERIES=3" in str(capped)
    assert policies.is_first_attempt(1, 0, redelivered=False)
    assert not policies.is_first_attempt(2, 0, redelivered=False)
    assert not policies.is_first_attempt(1, 1, redelivered=False)  # a retry looks in S3 first
    assert not policies.is_first_attempt(1, 0, redelivered=True)


# -- storage window, OOM, time limit --------------------------------------------------------


def test_storage_retries_with_backoff_inside_its_window_then_fails_with_the_reason() -> None:
    rule = policies.retry_rules(settings(storage_retry_window_s=60))["transient"]
    assert policies.storage_decision(1000.0, 1010.0, 2, rule, StorageError("down")) == 4
    failed = policies.storage_decision(1000.0, 1061.0, 7, rule, StorageError("refused"))
    assert isinstance(failed, StorageUnavailable)
    assert "61 s" in str(failed) and "refused" in str(failed)
    assert "FLEET_STORAGE_RETRY_WINDOW_S=60" in str(failed)


def test_the_task_retries_a_storage_failure_and_fails_past_the_window() -> None:
    r = FakeRedis()
    store = SimpleNamespace(bucket="b")
    p = policies.JobPolicies(settings(storage_retry_window_s=60), lambda: r, lambda: store)  # type: ignore[arg-type,return-value]
    task = FakeTask(retries=2)
    with pytest.raises(RuntimeError, match="retry"):
        p.after_failure(task, {"job_id": "j1"}, StorageError("down"), 1.0)  # type: ignore[arg-type]
    assert task.retried is not None and task.retried["countdown"] == 4
    key = contract.OUTAGE_KEY.format(task_id="task-1")
    r.data[key] = b"0"  # the outage began long ago
    recorded: list[Exception] = []
    p.record = lambda job, error: recorded.append(error)  # type: ignore[method-assign]
    last = FakeTask()
    job = {"job_id": "j1", "webhook": "https://example.com/hook"}
    error = p.after_failure(last, job, StorageError("down"), 1.0)  # type: ignore[arg-type]
    assert isinstance(error, StorageUnavailable) and recorded == [error]
    assert key not in r.data
    ((name, kwargs),) = last.sent  # the last try tells the webhook
    assert name == contract.TASK_WEBHOOK and kwargs["payload"]["error_type"] == "StorageUnavailable"


def test_out_of_memory_goes_to_the_fallback_queue_once_then_fails() -> None:
    s = settings(oom_fallback_queue="fleet.balanced")
    assert policies.oom_fallback(s, "fleet") == "fleet.balanced"
    assert policies.oom_fallback(s, "fleet.balanced") is None  # already there: no loop
    assert policies.oom_fallback(settings(), "fleet") is None
    p = policies.JobPolicies(s, FakeRedis, lambda: None)  # type: ignore[arg-type,return-value]
    task = FakeTask(queue="fleet")
    with pytest.raises(RuntimeError, match="retry"):
        p.after_failure(task, {"job_id": "j"}, DeviceOutOfMemory("oom"), 1.0)  # type: ignore[arg-type]
    assert task.retried is not None and task.retried["queue"] == "fleet.balanced"
    there = FakeTask(queue="fleet.balanced")
    job = {"job_id": "j", "webhook": "https://example.com/hook"}
    error = p.after_failure(there, job, DeviceOutOfMemory("oom"), 1.0)  # type: ignore[arg-type]
    assert isinstance(error, DeviceOutOfMemory) and there.retried is None
    ((name, kwargs),) = there.sent  # the webhook hears of the failure
    assert name == contract.TASK_WEBHOOK and kwargs["payload"]["status"] == "failed"


def test_a_job_past_its_soft_time_limit_is_recorded_as_timed_out() -> None:
    p = policies.JobPolicies(settings(), FakeRedis, lambda: None)  # type: ignore[arg-type,return-value]
    recorded: list[Exception] = []
    p.record = lambda job, error: recorded.append(error)  # type: ignore[method-assign]
    error = p.after_failure(FakeTask(), {"job_id": "j"}, SoftTimeLimitExceeded(), 12.34)  # type: ignore[arg-type]
    assert isinstance(error, JobTimedOut) and recorded == [error]
    assert "stopped after 12.3 s" in str(error) and "FLEET_JOB_TIME_BASE_S" in str(error)


# -- cancellation ---------------------------------------------------------------------------


def test_the_cancel_mark_in_redis_stops_a_job_and_a_redis_blip_does_not() -> None:
    r = FakeRedis()
    check = policies.cancel_checker(lambda: r, {"job_id": "j1"})  # type: ignore[arg-type,return-value]
    assert check is not None and check() is False
    r.data[contract.CANCEL_KEY.format(job_id="j1")] = b"1"
    assert check() is True
    r.down = True
    assert check() is False  # keep generating rather than fail the job
    assert policies.cancel_checker(lambda: r, {"prompt": "no id"}) is None  # type: ignore[arg-type,return-value]


# -- failure records and worker facts -------------------------------------------------------


def test_a_failure_that_cannot_reach_storage_waits_in_redis() -> None:
    class DownStore:
        bucket = "fleet"

        def put_json(self, key: str, obj: Any) -> None:
            raise StorageError("connection refused")

        def get_json_tagged(self, key: str) -> Any:
            raise StorageError("connection refused")

    r = FakeRedis()
    record_raw_failure(DownStore(), r, "", {"job_id": "j9"}, TooManyDeliveries("died"))  # type: ignore[arg-type]
    (entry,) = [json.loads(x) for x in r.data[contract.UNSTORED_FAILURES_KEY]]
    assert entry["job_id"] == "j9" and entry["error_type"] == "TooManyDeliveries"
    record_raw_failure(DownStore(), r, "", {"prompt": "no id"}, TooManyDeliveries("x"))  # type: ignore[arg-type]
    assert len(r.data[contract.UNSTORED_FAILURES_KEY]) == 1  # no id: logged, not recorded


def test_worker_facts_are_published_first_then_on_change_at_most_once_per_interval() -> None:
    pub = InfoPublisher(interval_s=10.0, refresh_s=100.0)
    facts = {"device": "cpu"}
    assert pub.due(facts, now=0.0)
    pub._published = ('{"device": "cpu"}', 0.0)
    assert not pub.due({"device": "cuda:0"}, now=5.0)  # changed, but inside the interval
    assert pub.due({"device": "cuda:0"}, now=11.0)
    assert not pub.due(facts, now=50.0)  # unchanged: only the hourly refresh
    assert pub.due(facts, now=101.0)


# -- a broken worker and a newer schema -----------------------------------------------------


def test_a_worker_error_puts_the_job_back_untouched_and_closes_the_gate(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """Storage refusing the credentials, or a pipeline failing its self-test, mid-run: the
    job is not failed or recorded but rejected back to its queue, its delivery uncounted and
    its state reset to queued; this worker's state turns broken; and a job it reserved
    meanwhile goes back before it is counted or run."""
    from celery.exceptions import Reject

    from fleet.errors import PipelineBroken, StorageRefused
    from worker.ops import gate

    r = FakeRedis()
    recorded: list[Any] = []
    monkeypatch.setenv(gate.NODE_ENV, "n@h")
    p = policies.JobPolicies(settings(), lambda: r, lambda: None)  # type: ignore[arg-type,return-value]
    monkeypatch.setattr(p, "record", lambda job, exc: recorded.append(exc))
    for error in (StorageRefused("403 SignatureDoesNotMatch: fix FLEET_S3_SECRET_ACCESS_KEY"),
                  PipelineBroken("the pipeline fails even on its self-test")):  # fmt: skip
        p.broken = None
        task = FakeTask()
        key = contract.DELIVERIES_KEY.format(task_id="task-1", retries=0)
        r.data[key] = b"1"
        with pytest.raises(Reject) as rejected:
            p.after_failure(task, {"job_id": "task-1"}, error, 1.0)  # type: ignore[arg-type]
        assert rejected.value.requeue and str(error) in str(rejected.value.reason)
        assert r.data[key] == b"0" and task.forgotten == ["task-1"] and not recorded
        state = json.loads(r.data[contract.WORKER_STATE_KEY.format(node="n@h")])
        assert state["state"] == "broken" and str(error) in state["reason"]
        # A job reserved before the gate closed: back again, before its delivery is counted.
        r.data.pop(key)
        with pytest.raises(Reject):
            p.before(task, (), {"job": {"job_id": "task-1", "prompt": "x"}})  # type: ignore[arg-type]
        assert key not in r.data and not task.sent


def test_a_job_of_a_newer_schema_is_passed_on_then_dead_lettered(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    from fleet.errors import SchemaTooNew

    r = FakeRedis()
    failed: list[Any] = []
    slept: list[float] = []
    p = policies.JobPolicies(settings(unknown_schema_tries=3), lambda: r, lambda: None)  # type: ignore[arg-type,return-value]
    monkeypatch.setattr(p, "record", lambda job, exc: failed.append(exc))
    monkeypatch.setattr(policies.time, "sleep", slept.append)
    job = {"schema_version": contract.SCHEMA_VERSION + 1, "job_id": "task-1", "prompt": "x"}
    assert policies.newer_schema(job) == contract.SCHEMA_VERSION + 1
    assert policies.newer_schema({**job, "schema_version": contract.SCHEMA_VERSION}) is None
    assert policies.newer_schema({**job, "schema_version": True}) is None
    for tries in range(3):  # to the end of its queue, a little later each time, not failed
        task = FakeTask(retries=tries)
        with pytest.raises(RuntimeError, match="retry"):
            p.before(task, (), {"job": job})  # type: ignore[arg-type]
        assert task.retried == {"countdown": 0, "max_retries": None} and not failed
    assert slept == [1.0, 2.0, 4.0]
    task = FakeTask(retries=3)
    with pytest.raises(SchemaTooNew, match="newer than this fleet's workers know"):
        p.before(task, (), {"job": job})  # type: ignore[arg-type]
    assert len(failed) == 1 and isinstance(failed[0], SchemaTooNew)
    [letter] = [json.loads(x) for x in r.data[contract.DEAD_LETTERS_KEY]]
    assert letter["task_id"] == "task-1" and "schema_version" in letter["reason"]
    assert json.loads(letter["raw"])["kwargs"]["job"] == job
