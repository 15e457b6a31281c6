"""Nothing lost, nothing duplicated: real workers killed, stopped and starved of storage.

Each test counts outcomes on the real fleet; the figures they measure are in docs/reliability.md.
"""

from __future__ import annotations

import base64
import json
import os
import re
import signal
import subprocess
import sys
import time
import uuid
from pathlib import Path

import pytest

from fleet import contract
from fleet.contract import JobSpec
from fleet.settings import ProducerSettings
from producer.client import Client
from tests import fault_tally
from tests.conftest import own_fleet_env
from tests.fleet_fixtures import WorkerProcess, settings_kwargs, wait_until

pytestmark = pytest.mark.integration

FAST_REDELIVERY = {
    "FLEET_VISIBILITY_TIMEOUT_S": "8",
    "FLEET_UNACKED_RESTORE_INTERVAL_S": "1",
    "FLEET_UNACKED_RESTORE_THROTTLE": "1",
}


def job(steps: int = 30, side: int = 64, **kw) -> JobSpec:  # type: ignore[no-untyped-def]
    return JobSpec(prompt="a slow lighthouse", width=side, height=side, steps=steps, **kw)


def pool_children(pid: int) -> list[int]:
    out = subprocess.run(["ps", "-o", "pid=", "--ppid", str(pid)], capture_output=True, text=True)
    return [int(p) for p in out.stdout.split()]


def started_job(client: Client, job_ids: list[str]) -> str | None:
    from celery.result import AsyncResult

    for job_id in job_ids:
        if AsyncResult(job_id, app=client.celery).state in ("STARTED", "PROGRESS"):
            return job_id
    return None


def received(w: WorkerProcess, job_id: str | None = None) -> int:
    """How many times the worker's log says it received (started) a job."""
    tag = f"[job={job_id} " if job_id else "[job="
    return sum(1 for ln in w.log().splitlines() if tag in ln and "] received:" in ln)


_RECEIVED = re.compile(r"\[job=(\S+) .*\] received:")


def last_received(w: WorkerProcess) -> str:
    """The id of the job the worker's log says it received last."""
    ids = _RECEIVED.findall(w.log())
    assert ids, "no job received"
    return str(ids[-1])


def wait_in_pipeline(client: Client, job_id: str, timeout: float = 60) -> None:
    """Poll the job's PROGRESS state until the worker reports a denoising step, then forget that
    state: a job delivered again must report a step of its own run, not this one's."""
    wait_until(lambda: (client.status(job_id).step or 0) >= 1, timeout, "a denoising step")
    client.redis.delete(f"celery-task-meta-{job_id}")


def kill_pool_child_mid_job(
    w: WorkerProcess, client: Client, seen: int, job_id: str | None = None
) -> None:
    """Wait for the next job start in the log and its first denoising step, then SIGKILL the
    pool child running it."""
    wait_until(lambda: received(w, job_id) > seen, 60, "a job starting")
    wait_in_pipeline(client, job_id or last_received(w))
    children = pool_children(w.proc.pid)
    assert children, "no pool child"
    os.kill(children[0], signal.SIGKILL)
    wait_until(
        lambda: pool_children(w.proc.pid) and pool_children(w.proc.pid) != children,
        30,
        "a new pool child",
    )


def worker_is_ready(w: WorkerProcess) -> bool:
    check = subprocess.run([sys.executable, "-m", "worker", "check", "--node", w.node],
                           env=w.env, capture_output=True, text=True)  # fmt: skip
    return check.returncode == 0


def objects_of(store, job_id: str) -> list[str]:  # type: ignore[no-untyped-def]
    return sorted(store.list_keys(contract.job_prefix(job_id)))


@pytest.mark.parametrize("kills", fault_tally.cases(ci=[2], soak_only=[5]))
def test_killed_pool_child_loses_and_duplicates_nothing(
    start_worker, qclient: Client, store, queue: str, kills: int
) -> None:
    w: WorkerProcess = start_worker("killchild", queues=queue, FLEET_MAX_DELIVERIES="10",
                                    **FAST_REDELIVERY)  # fmt: skip
    handles = qclient.submit_many([job() for _ in range(4 * kills)])
    ids = [h.job_id for h in handles]
    for _ in range(kills):
        kill_pool_child_mid_job(w, qclient, received(w))
    fig = fault_tally.tally("pool child SIGKILL", qclient, ids, lambda: [w.log()], kills=kills)
    fault_tally.assert_clean(fig)
    for job_id in ids:
        keys = objects_of(store, job_id)
        assert keys == [contract.image_key(job_id, 0), contract.manifest_key(job_id)]
        assert store.get_json(contract.manifest_key(job_id))["status"] == "succeeded"
    assert w.log().count("WorkerLostError") >= kills, w.log()[-3000:]


def test_a_job_that_kills_its_worker_every_time_ends_as_a_recorded_failure(
    start_worker, qclient: Client, store, queue: str
) -> None:
    w = start_worker("poison", queues=queue, FLEET_MAX_DELIVERIES="2", **FAST_REDELIVERY)
    handle = qclient.submit(job(steps=150))
    for attempt in range(2):
        kill_pool_child_mid_job(w, qclient, attempt, handle.job_id)
    st = handle.wait(timeout=60)
    assert st.state == "failed"
    assert "delivered 3 times and its worker died each time" in st.result.error
    entries = {e["job_id"]: e for e in qclient.failed()}
    assert entries[handle.job_id]["error_type"] == "TooManyDeliveries"
    assert w.proc.poll() is None
    # The worker goes on with the next job.
    assert qclient.submit(job(steps=2)).wait(timeout=60).state == "succeeded"


def test_whole_worker_killed_job_comes_back_after_the_visibility_timeout(
    start_worker, qclient: Client, queue: str
) -> None:
    w = start_worker("killall", queues=queue, **FAST_REDELIVERY)
    handle = qclient.submit(job(steps=150))
    wait_until(lambda: started_job(qclient, [handle.job_id]), 60, "the job running")
    behind = qclient.submit(job(steps=2))  # reserved or still queued: not lost either
    os.killpg(w.proc.pid, signal.SIGKILL)  # the worker and its pool child, as a crash would
    w.proc.wait(10)
    killed_at = time.monotonic()
    w.start()
    st = handle.wait(timeout=120)
    redelivered_after = time.monotonic() - killed_at
    fig = fault_tally.tally("whole worker SIGKILL", qclient, [handle.job_id, behind.job_id],
                            lambda: [w.log()], redelivered_after_s=round(redelivered_after, 1),
                            visibility_timeout_s=8)  # fmt: skip
    fault_tally.assert_clean(fig)
    assert st.state == "succeeded"
    assert redelivered_after >= 7  # not before the visibility timeout (8 s)...
    assert redelivered_after < 60  # ...and not the 1 h default or a 90 s sweep


def test_warm_shutdown_finishes_the_running_job(start_worker, qclient: Client, queue: str) -> None:
    """SIGTERM: the running job finishes and the worker exits 0; the jobs queued behind it are
    not lost (the default one-hour visibility timeout: none may wait for it) and a restarted
    worker runs them, each once."""
    w = start_worker("warm", queues=queue)
    handle = qclient.submit(job(steps=150))
    wait_until(lambda: started_job(qclient, [handle.job_id]), 60, "the job running")
    behind = [h.job_id for h in qclient.submit_many([job(steps=2) for _ in range(2)])]
    os.kill(w.proc.pid, signal.SIGTERM)
    assert w.proc.wait(120) == 0
    assert handle.status().state == "succeeded"
    ran_before_exit = sum(1 for j in behind if qclient.status(j).state == "succeeded")
    w.start()
    fig = fault_tally.tally("whole worker SIGTERM (warm)", qclient, [handle.job_id, *behind],
                            lambda: [w.log()], timeout=90,
                            behind_done_before_exit=ran_before_exit)  # fmt: skip
    fault_tally.assert_clean(fig)


def raw_message(task: str, body: bytes, content_type: str, queue: str) -> bytes:
    task_id = str(uuid.uuid4())
    return json.dumps({
        "body": base64.b64encode(body).decode(),
        "content-encoding": "utf-8" if content_type.endswith("json") else "binary",
        "content-type": content_type,
        "headers": {"lang": "py", "task": task, "id": task_id, "root_id": task_id,
                    "parent_id": None, "group": None, "retries": 0, "eta": None,
                    "expires": None, "timelimit": [None, None]},
        "properties": {"correlation_id": task_id, "reply_to": "", "delivery_mode": 2,
                       "delivery_info": {"exchange": "", "routing_key": queue},
                       "priority": 0, "body_encoding": "base64",
                       "delivery_tag": str(uuid.uuid4())},
    }).encode()  # fmt: skip


def test_poison_messages_are_rejected_and_logged_and_the_worker_goes_on(
    start_worker, qclient: Client, queue: str
) -> None:
    import pickle

    w = start_worker("poison-msgs", queues=queue, **FAST_REDELIVERY)
    r = qclient.redis
    good_body = json.dumps([[], {"job": job(steps=2).model_dump(mode="json")}, {}]).encode()
    wrong_shape = json.dumps([[], {"prompt": "no job wrapper"}, {}]).encode()
    r.lpush(queue, b"this is not json at all")
    r.lpush(queue, raw_message(contract.TASK_GENERATE, b"{not json", "application/json", queue))
    r.lpush(queue, raw_message(contract.TASK_GENERATE, pickle.dumps(([], {}, {})),
                               "application/x-python-serialize", queue))  # fmt: skip
    r.lpush(queue, raw_message(contract.TASK_GENERATE, wrong_shape, "application/json", queue))
    r.lpush(queue, raw_message("no.such.task", good_body, "application/json", queue))
    after = qclient.submit(job(steps=2))
    assert after.wait(timeout=60).state == "succeeded"
    time.sleep(3)  # past a restore sweep: nothing may come back
    assert r.llen(queue) == 0
    unacked = [json.loads(v) for v in r.hvals("unacked")]
    assert not [m for m in unacked if m[0]["properties"]["delivery_info"]["routing_key"] == queue]
    assert w.proc.poll() is None
    log = w.log()
    # Pickle refused before Celery sees it (never unpickled), kept in the dead letters.
    assert "x-python-serialize' is not accepted" in log
    assert any("x-python-serialize' is not accepted" in d.get("reason", "")
               for d in qclient.dead_letters())  # fmt: skip
    assert "no.such.task" in log  # unknown task logged
    assert "takes exactly one keyword argument 'job'" in log  # wrong shape failed alone
    assert log.count(after.job_id) >= 1


def test_soft_time_limit_records_a_failure_and_the_worker_survives(
    start_worker, fleet_env: dict, queue: str
) -> None:
    w = start_worker("limits", queues=queue)
    settings = ProducerSettings(_env_file=None, **settings_kwargs(fleet_env))
    settings.queue = queue
    settings.job_time_base_s = 0.3
    settings.job_time_per_mpx_step_s = 0.0
    with Client(settings) as c:
        settings.job_time_base_s = 300
        assert c.submit(job(steps=2)).wait(timeout=60).state == "succeeded"  # warm
        settings.job_time_base_s = 0.3
        slow = c.submit(job(steps=150, side=128))
        st = slow.wait(timeout=60)
        assert st.state == "failed" and "soft time limit" in st.result.error
        assert st.result.error_type == "JobTimedOut"
        assert c.store.get_json(contract.manifest_key(slow.job_id))["status"] == "failed"
        settings.job_time_base_s = 300
        assert c.submit(job(steps=2)).wait(timeout=60).state == "succeeded"
    assert w.proc.poll() is None


def test_deadline_passed_job_is_not_started_is_recorded_and_can_be_retried(
    start_worker, qclient: Client, queue: str, fleet_env: dict
) -> None:
    late = qclient.submit(job(steps=2), deadline_s=1)
    time.sleep(2)
    start_worker("deadline", queues=queue)
    st = late.wait(timeout=60)
    assert st.state == "failed" and "deadline" in (st.result.error or "")
    wait_until(lambda: late.job_id in {e["job_id"] for e in qclient.failed()}, 30,
               "the expiry recorded in storage")  # fmt: skip
    failed = subprocess.run([sys.executable, "-m", "producer", "failed", "--json"],
                            env=fleet_env, capture_output=True, text=True)  # fmt: skip
    assert late.job_id in [e["job_id"] for e in json.loads(failed.stdout)]
    env = {**fleet_env, "FLEET_QUEUE": queue}
    retry = subprocess.run([sys.executable, "-m", "producer", "retry", late.job_id, "--json"],
                           env=env, capture_output=True, text=True)  # fmt: skip
    assert retry.returncode == 0, retry.stderr
    new_id = json.loads(retry.stdout)[0]["job_id"]
    assert new_id == f"{late.job_id}.r1"
    again = qclient.wait([new_id], timeout=60)[0]
    assert again.state == "succeeded"
    assert store_seed(qclient, new_id) == store_seed(qclient, late.job_id)  # same recipe
    assert late.job_id not in [e["job_id"] for e in qclient.failed()]
    retried = {e["job_id"]: e for e in qclient.failed(include_retried=True)}
    assert retried[late.job_id]["retried_as"] == new_id


def store_seed(client: Client, job_id: str) -> int:
    return int(client.store.get_json(contract.manifest_key(job_id))["job"]["seed"])


def test_storage_down_for_30s_fails_nothing_and_generates_once(
    tmp_path: Path, tiny_model: Path
) -> None:
    from fleet.localdev import LocalServices

    services = LocalServices(tmp_path / "own-services")
    ep = services.start()
    env = own_fleet_env(ep.env(), tiny_model, FLEET_SPOOL_DIR=str(tmp_path / "spool"),
                        FLEET_STORAGE_RETRY_BACKOFF_MAX_S="4", FLEET_STORAGE_RETRY_WINDOW_S="120",
                        FLEET_S3_MAX_ATTEMPTS="2")  # fmt: skip
    w = WorkerProcess(f"s3down-{uuid.uuid4().hex[:4]}@localhost", env, tmp_path / "w.log")
    try:
        w.start()
        with Client(ProducerSettings(_env_file=None, **settings_kwargs(env))) as c:
            assert c.submit(job(steps=2)).wait(timeout=60).state == "succeeded"  # warm
            services.s3.kill()
            down_at = time.monotonic()
            handles = c.submit_many([job(steps=4) for _ in range(3)])
            wait_until(lambda: "storage unavailable" in w.log(), 60, "a storage retry")
            time.sleep(max(0.0, 30 - (time.monotonic() - down_at)))
            services.s3.restart()
            statuses = c.wait([h.job_id for h in handles], timeout=120)
            assert [s.state for s in statuses] == ["succeeded"] * 3
            for h in handles:
                generated = [
                    ln
                    for ln in w.log().splitlines()
                    if f"[job={h.job_id} " in ln and "generated 1 image" in ln
                ]
                assert len(generated) == 1, "generated again after the outage"
            assert "reusing 1 image(s) generated before storage failed" in w.log()
    finally:
        w.stop()
        services.stop()


def test_redis_restart_mid_run_loses_no_acknowledged_job(tmp_path: Path, tiny_model: Path) -> None:
    from fleet.localdev import LocalServices

    services = LocalServices(tmp_path / "own-services")
    ep = services.start()
    env = own_fleet_env(ep.env(), tiny_model, **FAST_REDELIVERY)
    w = WorkerProcess(f"redisrestart-{uuid.uuid4().hex[:4]}@localhost", env, tmp_path / "w.log")
    try:
        w.start()
        with Client(ProducerSettings(_env_file=None, **settings_kwargs(env))) as c:
            handles = c.submit_many([job(steps=20) for _ in range(10)])
            wait_until(lambda: received(w) >= 1, 60, "a job running")
            services.redis.restart()  # clean restart: AOF keeps every acknowledged job
            more = c.submit_many([job(steps=2) for _ in range(3)])  # the producer reconnects
            ids = [h.job_id for h in handles + more]
            statuses = c.wait(ids, timeout=180)
            assert [s.state for s in statuses] == ["succeeded"] * len(ids)
        assert w.proc.poll() is None
    finally:
        w.stop()
        services.stop()


def test_storage_down_past_the_retry_window_fails_with_a_recorded_reason(
    tmp_path: Path, tiny_model: Path
) -> None:
    from fleet.localdev import LocalServices

    services = LocalServices(tmp_path / "own-services")
    ep = services.start()
    env = own_fleet_env(ep.env(), tiny_model, FLEET_SPOOL_DIR=str(tmp_path / "spool"),
                        FLEET_STORAGE_RETRY_BACKOFF_MAX_S="1", FLEET_STORAGE_RETRY_WINDOW_S="4",
                        FLEET_S3_MAX_ATTEMPTS="1")  # fmt: skip
    w = WorkerProcess(f"s3gone-{uuid.uuid4().hex[:4]}@localhost", env, tmp_path / "w.log")
    try:
        w.start()
        # Storage goes away after the worker took it (its canary passed: it consumes jobs).
        wait_until(lambda: worker_is_ready(w), 90, "the worker ready")
        with Client(ProducerSettings(_env_file=None, **settings_kwargs(env))) as c:
            services.s3.kill()
            spec = job(steps=2)
            handle = c.celery.send_task(contract.TASK_GENERATE, task_id=spec.job_id,
                                        kwargs={"job": spec.model_dump(mode="json")},
                                        queue="fleet")  # fmt: skip
            from celery.result import AsyncResult

            res = AsyncResult(handle.id, app=c.celery)
            wait_until(lambda: res.state == "FAILURE", 60, "the job to fail")
            assert "storage unreachable for" in str(res.result)
            entries = [json.loads(x) for x in c.redis.lrange("fleet:failures:unstored", 0, -1)]
            assert [e["job_id"] for e in entries if e["error_type"] == "StorageUnavailable"] == [
                handle.id
            ]
            spool = tmp_path / "spool" / handle.id
            assert not spool.exists()  # its spooled images are cleaned with the last try
            # Storage back: listed from Redis; the next stored job writes it to S3, once.
            services.s3.start()
            assert [e["job_id"] for e in c.failed()].count(handle.id) == 1
            assert c.submit(job(steps=2)).wait(timeout=60).state == "succeeded"
            wait_until(lambda: not c.redis.llen("fleet:failures:unstored"), 30, "the flush")
            record = c.store.get_json(contract.failure_key(handle.id))
            assert record["error_type"] == "StorageUnavailable"
            assert [e["job_id"] for e in c.failed()].count(handle.id) == 1
            assert c.status(handle.id).state == "failed"
        assert w.proc.poll() is None
    finally:
        w.stop()
        services.stop()


def test_redis_sigkill_loses_nothing_acknowledged_with_appendfsync_always(
    tmp_path: Path,
) -> None:
    """Redis killed (SIGKILL) right after `submit` returned: with `appendfsync always` every
    acknowledged job survives. (With `everysec`, the default, up to about 1 s of writes may go;
    docs/reliability.md has the measurement.)"""
    fsync = "always"
    from fleet.localdev import LocalServices

    services = LocalServices(tmp_path / "own-services")
    ep = services.start()
    try:
        services.redis.client().config_set("appendfsync", fsync)
        env = {k.removeprefix("FLEET_").lower(): v for k, v in ep.env().items()}
        settings = ProducerSettings(_env_file=None, **env)
        settings.queue = "fleet.sigkill"
        with Client(settings) as c:
            handles = c.submit_many([job(steps=2) for _ in range(200)])
            services.redis.kill()
        services.redis.start()
        queued = sum(services.redis.client().llen(k) for k in contract.queue_keys("fleet.sigkill"))
        assert queued == len(handles), f"{len(handles) - queued} acknowledged jobs lost"
    finally:
        services.stop()
