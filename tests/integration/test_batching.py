"""Batch workers: compatible jobs share one pipeline call, each keeps its own result, a bad job
fails alone, a killed batch worker loses nothing, and batched images equal the bare pipeline's."""

from __future__ import annotations

import os
import signal
import time
import uuid
from pathlib import Path

import pytest
import torch

from fleet import contract
from fleet.contract import JobSpec
from fleet.settings import WorkerSettings
from producer.client import Client
from tests.fleet_fixtures import wait_until
from worker.engine.engine import Engine
from worker.engine.recipe import image_recipe, png_bytes

pytestmark = pytest.mark.integration

BATCH = {"FLEET_BATCH_SIZE": "4", "FLEET_BATCH_WAIT_S": "0.5"}


def jobs(n: int, seed0: int) -> list[JobSpec]:
    return [JobSpec(prompt=f"a lighthouse, take {i}", width=64, height=64, steps=4,
                    seed=seed0 + 10 * i) for i in range(n)]  # fmt: skip


def test_compatible_jobs_are_batched_and_equal_the_bare_pipeline(
    start_worker, qclient: Client, store, queue: str, tiny_model: Path
) -> None:
    specs = jobs(8, seed0=500)
    handles = qclient.submit_many(specs)  # queued before the worker starts: batches fill
    bad_id = f"bad-{uuid.uuid4().hex[:6]}"
    bad = jobs(1, 1)[0].model_dump(mode="json") | {"job_id": bad_id, "width": 100}
    qclient.celery.send_task(contract.TASK_GENERATE, kwargs={"job": bad}, queue=queue,
                             task_id=bad_id)  # fmt: skip
    start_worker("batch", queues=queue, pool="threads", concurrency=4, **BATCH)
    statuses = qclient.wait([h.job_id for h in handles] + [bad_id], timeout=120)
    assert [s.state for s in statuses[:8]] == ["succeeded"] * 8
    assert statuses[8].state == "failed" and "width=100" in statuses[8].result.error
    batches = {}
    for s in statuses[:8]:
        m = store.get_json(s.result.manifest_key)
        batch = m["worker"]["batch"]
        batches[tuple(r["job_id"] for r in batch["recipes"])] = batch["jobs"]
    assert max(batches.values()) >= 2, batches  # jobs really shared pipeline calls
    # The stored PNGs equal a bare in-process batched call with the same recipes and threads.
    torch.set_num_threads(1)
    engine = Engine(WorkerSettings(_env_file=None, model=str(tiny_model), model_name="tiny",
                                   local_files_only=True, torch_threads=1))  # fmt: skip
    by_id = {s.job_id: s for s in specs}
    for ids in batches:
        bare = engine.generate_batch([by_id[i] for i in ids])
        for job_id, generated in zip(ids, bare, strict=True):
            spec = by_id[job_id]
            expected = png_bytes(
                generated.images[0], image_recipe(spec, spec.seed, "tiny", None, "float32")
            )
            assert store.get_bytes(contract.image_key(job_id, 0)) == expected


def test_a_batch_worker_killed_mid_batch_loses_no_job(
    start_worker, qclient: Client, store, queue: str
) -> None:
    handles = qclient.submit_many(
        [JobSpec(prompt=f"slow {i}", width=128, height=128, steps=60) for i in range(4)]
    )
    w = start_worker("batchkill", queues=queue, pool="threads", concurrency=4, **BATCH,
                     FLEET_VISIBILITY_TIMEOUT_S="8", FLEET_UNACKED_RESTORE_INTERVAL_S="1",
                     FLEET_UNACKED_RESTORE_THROTTLE="1")  # fmt: skip
    deadline = time.monotonic() + 60
    while "batch of" not in w.log():
        assert time.monotonic() < deadline, w.log()[-2000:]
        time.sleep(0.05)
    os.killpg(w.proc.pid, signal.SIGKILL)  # the whole batch worker, mid-batch
    w.proc.wait(10)
    w.start()
    statuses = qclient.wait([h.job_id for h in handles], timeout=120)
    assert [s.state for s in statuses] == ["succeeded"] * 4
    for s in statuses:
        assert sorted(store.list_keys(contract.job_prefix(s.job_id))) == [
            contract.image_key(s.job_id, 0),
            contract.manifest_key(s.job_id),
        ]


def test_overlapped_worker_generates_one_job_at_a_time_with_the_default_workers_bytes(
    start_worker, qclient: Client, store, queue: str, tiny_model: Path
) -> None:
    """`launch --overlap`: threads pool, two jobs in flight, batch size 1. One thread owns the
    pipeline (a pipeline is not thread-safe), so each job is generated alone and its PNG equals
    the same job generated alone in process, while storing overlaps the next generation."""
    specs = jobs(6, seed0=900)
    handles = qclient.submit_many(specs)
    w = start_worker("overlap", queues=queue, pool="threads", concurrency=2)
    statuses = qclient.wait([h.job_id for h in handles], timeout=120)
    assert [s.state for s in statuses] == ["succeeded"] * 6
    for s in statuses:
        m = store.get_json(s.result.manifest_key)
        assert m["worker"]["batch"]["jobs"] == 1
    log = w.log()
    assert "batch of" not in log
    # Two jobs were in flight: the second was taken before the first was stored.
    lines = log.splitlines()
    second_received = [i for i, x in enumerate(lines) if "] received:" in x][1]
    first_stored = next(i for i, x in enumerate(lines) if "] stored " in x)
    assert second_received < first_stored, "\n".join(lines[-40:])
    torch.set_num_threads(1)
    engine = Engine(WorkerSettings(_env_file=None, model=str(tiny_model), model_name="tiny",
                                   local_files_only=True, torch_threads=1))  # fmt: skip
    for spec in specs:
        alone = engine.generate(spec)
        expected = png_bytes(
            alone.images[0], image_recipe(spec, spec.seed, "tiny", None, "float32")
        )
        assert store.get_bytes(contract.image_key(spec.job_id, 0)) == expected


def test_a_threads_pool_worker_loads_its_model_before_the_first_job(start_worker, queue) -> None:  # type: ignore[no-untyped-def]
    """No pool child means no worker_process_init: the worker loads the pipeline when it is
    ready instead, so its first job does not pay the load."""
    w = start_worker("warm-threads", queues=queue, pool="threads", concurrency=2)
    wait_until(lambda: "model ready in" in w.log(), 60, "the model loaded with no job sent")
