"""Guarantees a foreign client depends on: one identity per job, one truth about its state.

Each test is named after the guarantee it proves, and runs against the real fleet: a real Redis,
a real SeaweedFS S3 server and a real `celery worker` running the tiny pipeline.
"""

from __future__ import annotations

import time
import uuid
from pathlib import Path

import pytest
from celery.result import AsyncResult

from fleet import contract
from fleet.contract import JobSpec
from fleet.settings import ProducerSettings
from producer.client import Client
from tests.conftest import own_fleet_env
from tests.fleet_fixtures import WorkerProcess, settings_kwargs, wait_until
from tests.integration.test_reliability import (
    FAST_REDELIVERY,
    kill_pool_child_mid_job,
    objects_of,
    received,
)

pytestmark = pytest.mark.integration

NO_ID_NO_SEED = {"prompt": "a slow lighthouse", "width": 64, "height": 64, "steps": 40}


def _result(client: Client, task_id: str, timeout: float = 120) -> dict:  # type: ignore[type-arg]
    res = AsyncResult(task_id, app=client.celery)
    wait_until(lambda: res.state in ("SUCCESS", "FAILURE"), timeout, f"task {task_id} ending")
    return res.result if res.state == "SUCCESS" else {"error": str(res.result)}


def test_a_job_without_id_and_seed_keeps_one_identity_across_deliveries(
    start_worker, qclient: Client, store, queue: str
) -> None:
    w = start_worker("identity", queues=queue, FLEET_MAX_DELIVERIES="10", **FAST_REDELIVERY)
    res = qclient.celery.send_task(contract.TASK_GENERATE, kwargs={"job": NO_ID_NO_SEED},
                                   queue=queue)  # fmt: skip
    for seen in range(2):
        kill_pool_child_mid_job(w, qclient, seen)
    result = _result(qclient, res.id)
    assert result.get("job_id") == res.id, result
    assert result["seed_derived"] is True
    # Three deliveries, one job: every one named the task id, and one prefix holds it all.
    assert received(w) == received(w, res.id) == 3
    assert objects_of(store, res.id) == [
        contract.image_key(res.id, 0),
        contract.manifest_key(res.id),
    ]
    manifest = store.get_json(contract.manifest_key(res.id))
    assert manifest["status"] == "succeeded"
    assert manifest["job"]["seed"] == contract.derived_seed(res.id)
    assert result["images"][0]["seed"] == contract.derived_seed(res.id)


def test_a_positional_job_gets_the_same_identity_and_a_wrong_shape_a_recorded_refusal(
    worker, qclient: Client, client: Client
) -> None:
    job = {**NO_ID_NO_SEED, "steps": 2}
    res = client.celery.send_task(contract.TASK_GENERATE, args=[job])
    result = _result(client, res.id)
    assert result.get("job_id") == res.id and result["status"] == "succeeded", result
    assert result["images"][0]["seed"] == contract.derived_seed(res.id)
    bad = client.celery.send_task(contract.TASK_GENERATE, args=[job, job])
    ended = _result(client, bad.id)
    assert "exactly one keyword argument 'job'" in ended["error"]
    failed = {e["job_id"]: e for e in client.failed()}
    assert failed[bad.id]["error_type"] == "JobValidationError"


def test_a_job_without_an_id_gets_a_failure_record_and_a_cancel_key_under_its_task_id(
    worker, client: Client
) -> None:
    bad = client.celery.send_task(contract.TASK_GENERATE, kwargs={"job": {"prompt": "x",
                                                                          "steps": 0}})  # fmt: skip
    assert "steps=0" in _result(client, bad.id)["error"]
    failed = {e["job_id"]: e for e in client.failed()}
    assert "steps=0" in failed[bad.id]["error"]
    assert worker.log().count(f"[job={bad.id} ") >= 1  # its log lines name it

    slow = client.celery.send_task(contract.TASK_GENERATE,
                                   kwargs={"job": {**NO_ID_NO_SEED, "steps": 150}})  # fmt: skip
    wait_until(lambda: client.status(slow.id).state == "started", 60, "the slow job running")
    client.cancel(slow.id)
    assert client.wait([slow.id], timeout=60)[0].state == "cancelled"


def test_success_beats_failure_a_resent_job_never_replaces_its_stored_images(
    worker, client: Client, store
) -> None:
    done = client.submit(JobSpec(prompt="kept", width=64, height=64, steps=2))
    assert done.wait(timeout=60).state == "succeeded"
    images = objects_of(store, done.job_id)
    # The same id sent again by a foreign client, now with a model this worker does not serve.
    again = {"prompt": "kept", "job_id": done.job_id, "model": "not-served", "steps": 2}
    res = client.celery.send_task(contract.TASK_GENERATE, kwargs={"job": again},
                                  task_id=done.job_id + "-resend")  # fmt: skip
    result = _result(client, res.id)
    assert result.get("status") == "succeeded" and result["job_id"] == done.job_id, result
    assert store.get_json(contract.manifest_key(done.job_id))["status"] == "succeeded"
    assert objects_of(store, done.job_id) == images
    assert done.job_id not in {e["job_id"] for e in client.failed()}


def test_a_job_that_finishes_while_redis_is_down_reads_as_succeeded(
    tmp_path: Path, tiny_model: Path
) -> None:
    from fleet.localdev import LocalServices

    services = LocalServices(tmp_path / "own-services")
    ep = services.start()
    # The default visibility timeout (1 h): no redelivery can paper over a lost result.
    env = own_fleet_env(ep.env(), tiny_model)
    w = WorkerProcess(f"redisdown-{uuid.uuid4().hex[:4]}@localhost", env, tmp_path / "w.log")
    try:
        w.start()
        with Client(ProducerSettings(_env_file=None, **settings_kwargs(env))) as c:
            assert c.submit(JobSpec(prompt="warm", width=64, height=64, steps=2)).wait(
                timeout=60).state == "succeeded"  # fmt: skip
            handle = c.submit(JobSpec(prompt="through an outage", width=64, height=64, steps=60))
            wait_until(lambda: c.status(handle.job_id).state == "started", 60, "job running")
            services.redis.stop()
            down_at = time.monotonic()
            manifest = contract.manifest_key(handle.job_id)
            wait_until(lambda: (c.store.get_json(manifest) or {}).get("status") == "succeeded",
                       60, "the job stored while Redis is down")  # fmt: skip
            wait_until(lambda: time.monotonic() - down_at >= 15, 20, "15 s of outage")
            services.redis.start()
            st = c.wait([handle.job_id], timeout=60)[0]
            assert st.state == "succeeded", st
            assert st.result is not None and st.result.images
            assert handle.job_id not in {e["job_id"] for e in c.failed()}
            # The worker goes on.
            after = c.submit(JobSpec(prompt="after", width=64, height=64, steps=2))
            assert after.wait(timeout=120).state == "succeeded"
        assert w.proc.poll() is None
    finally:
        w.stop()
        services.stop()


def test_success_beats_failure_a_failure_record_never_lands_over_a_success(store) -> None:
    from worker.records import raw_failure_manifest, write_failure

    assert store.conditional_writes is True  # SeaweedFS >= 3.97 honours If-None-Match / If-Match
    job_id = f"race-{uuid.uuid4().hex[:8]}"
    key = contract.manifest_key(job_id)
    success = {"job_id": job_id, "status": "succeeded", "result": {}}

    def failure(reason: str) -> dict:  # type: ignore[type-arg]
        return raw_failure_manifest(job_id, {"job_id": job_id}, reason, "GenerationError",
                                    store.bucket, "")  # fmt: skip

    # A success that lands between the failure writer's read and its write is kept.
    read = store.get_json_tagged
    raced = []

    def read_then_success_lands(k: str):  # type: ignore[no-untyped-def]
        got = read(k)
        if not raced:
            raced.append(k)
            store.put_json(k, success)
        return got

    store.get_json_tagged = read_then_success_lands
    try:
        assert write_failure(store, "", failure("late failure"))
    finally:
        del store.get_json_tagged
    assert raced == [key]
    assert store.get_json(key)["status"] == "succeeded"
    assert store.get_json(contract.failure_key(job_id)) is None

    # A failure replaces an earlier failure (If-Match on its ETag), and is indexed: the index
    # entry is there before the failed manifest, so whoever sees the job failed finds it listed.
    other = f"twice-{uuid.uuid4().hex[:8]}"
    write_if = store.put_json_if
    indexed_first = []

    def manifest_write(k: str, value, etag):  # type: ignore[no-untyped-def]
        indexed_first.append(store.get_json(contract.failure_key(other)) is not None)
        return write_if(k, value, etag)

    store.put_json_if = manifest_write
    try:
        for reason in ("first", "second"):
            m = raw_failure_manifest(other, {"job_id": other}, reason, "GenerationError",
                                     store.bucket, "")  # fmt: skip
            assert write_failure(store, "", m)
    finally:
        del store.put_json_if
    assert indexed_first == [True, True]
    assert store.get_json(contract.manifest_key(other))["error"] == "second"
    assert store.get_json(contract.failure_key(other))["error"] == "second"


def test_every_end_is_recorded_a_job_killed_at_its_hard_time_limit(
    start_worker, qclient: Client, queue: str, store
) -> None:
    w = start_worker("hardlimit", queues=queue)
    warm = qclient.submit(JobSpec(prompt="warm", width=64, height=64, steps=2))
    assert warm.wait(timeout=90).state == "succeeded"
    job = {"prompt": "stuck", "width": 128, "height": 128, "steps": 150}
    res = qclient.celery.send_task(contract.TASK_GENERATE, kwargs={"job": job}, queue=queue,
                                   time_limit=2)  # a foreign sender's own hard limit  # fmt: skip
    manifest = contract.manifest_key(res.id)
    wait_until(lambda: (store.get_json(manifest) or {}).get("status") == "failed", 60,
               "a failure manifest for the killed job")  # fmt: skip
    record = store.get_json(manifest)
    assert record["error_type"] == "JobTimedOut" and "hard time limit (2" in record["error"]
    failed = {e["job_id"]: e for e in qclient.failed()}
    assert failed[res.id]["error_type"] == "JobTimedOut"
    assert qclient.status(res.id).state == "failed"
    # The worker replaced its pool child and goes on.
    after = qclient.submit(JobSpec(prompt="after", width=64, height=64, steps=2))
    assert after.wait(timeout=90).state == "succeeded"
    assert w.proc.poll() is None


def test_an_id_reused_with_another_recipe_is_refused_naming_what_differs(
    client: Client, qclient: Client
) -> None:
    from fleet.errors import DuplicateJobError
    from producer.bulk import submit_bulk

    job_id = f"reused-{uuid.uuid4().hex[:8]}"
    first = qclient.submit(JobSpec(prompt="a fox", job_id=job_id, steps=2))
    again = qclient.submit(JobSpec(prompt="a fox", job_id=job_id, steps=2))
    assert again.duplicate and again.job_id == first.job_id  # the same recipe: the same job
    with pytest.raises(DuplicateJobError, match=r"prompt: 'a fox' then, 'a wolf' now") as exc:
        qclient.submit(JobSpec(prompt="a wolf", job_id=job_id, steps=2))
    assert job_id in str(exc.value)
    fresh = JobSpec(prompt="new", steps=2)
    with pytest.raises(DuplicateJobError, match="steps: 2 then, 3 now"):
        submit_bulk(qclient, [fresh, JobSpec(prompt="a fox", job_id=job_id, steps=3)])
    assert not qclient.redis.exists(contract.CLAIM_KEY.format(job_id=fresh.job_id))


def test_retrying_a_failed_job_twice_makes_a_second_attempt(worker, client: Client) -> None:
    bad = client.submit(JobSpec(prompt="x", steps=2, model="not-served"))
    assert bad.wait(timeout=60).state == "failed"
    first = client.retry(bad.job_id)
    second = client.retry(bad.job_id)
    assert (first.job_id, second.job_id) == (f"{bad.job_id}.r1", f"{bad.job_id}.r2")
    assert not second.duplicate
    states = [s.state for s in client.wait([first.job_id, second.job_id], timeout=60)]
    assert states == ["failed", "failed"]  # still the model this worker does not serve


def test_the_id_claim_and_the_delivery_counter_expire_together(worker, client: Client) -> None:
    done = client.submit(JobSpec(prompt="ttl", width=64, height=64, steps=2))
    assert done.wait(timeout=60).state == "succeeded"
    claim = client.redis.ttl(contract.CLAIM_KEY.format(job_id=done.job_id))
    counter = client.redis.ttl(contract.DELIVERIES_KEY.format(task_id=done.job_id, retries=0))
    assert claim > 7 * 24 * 3600 and abs(claim - counter) < 120, (claim, counter)
