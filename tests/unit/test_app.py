"""The Celery app: JSON only, late acks, prefetch 1, and no torch import."""

from __future__ import annotations

import subprocess
import sys
import threading
from types import SimpleNamespace

from fleet.contract import TASK_GENERATE
from fleet.settings import WorkerSettings
from worker.app import create_app, worker_config


def test_reliability_and_serialization_settings() -> None:
    conf = worker_config(WorkerSettings(redis_url="redis://127.0.0.1:1/0"))
    assert conf["task_serializer"] == "json"
    assert conf["accept_content"] == ["json"]  # pickle is refused
    assert conf["result_accept_content"] == ["json"]
    assert conf["task_acks_late"] is True
    assert conf["task_reject_on_worker_lost"] is True
    assert conf["worker_prefetch_multiplier"] == 1
    assert conf["task_default_queue"] == "fleet"


def test_task_is_registered_by_contract_name() -> None:
    app = create_app(WorkerSettings(redis_url="redis://127.0.0.1:1/0"))
    app.loader.import_default_modules()
    import worker.tasks

    assert TASK_GENERATE in worker.tasks.app.tasks


def test_app_and_producer_import_no_torch() -> None:
    code = (
        "import sys, worker.app, worker.tasks, producer.client, producer.cli;"
        "bad = [m for m in ('torch', 'diffusers', 'transformers') if m in sys.modules];"
        "sys.exit(1 if bad else 0)"
    )
    assert subprocess.run([sys.executable, "-c", code], check=False).returncode == 0


def test_launcher_plans_one_pinned_worker_per_gpu_and_batch_workers() -> None:
    import argparse

    from worker.ops.launch import add_arguments, plan

    p = argparse.ArgumentParser()
    add_arguments(p)
    slots = plan(p.parse_args(["--gpus", "1,3"]), gpus=[0, 1, 2, 3], env={})
    assert [s.name for s in slots] == ["gpu1", "gpu3"]
    assert [s.env["CUDA_VISIBLE_DEVICES"] for s in slots] == ["1", "3"]
    assert "gpu3@%h" in slots[1].argv and "prefork" in slots[1].argv
    cpu = plan(p.parse_args(["--cpu", "2", "--batch", "4"]), gpus=[])
    assert [s.env["FLEET_TORCH_THREADS"] for s in cpu] == ["1", "1"]
    assert cpu[0].env["FLEET_BATCH_SIZE"] == "4" and cpu[0].env["CUDA_VISIBLE_DEVICES"] == ""
    argv = cpu[0].argv
    assert argv[argv.index("--pool") + 1] == "threads"
    assert argv[argv.index("--concurrency") + 1] == "8"  # one batch generating, one storing
    overlap = plan(p.parse_args(["--cpu", "1", "--overlap"]), gpus=[])[0].argv
    assert overlap[overlap.index("--pool") + 1] == "threads"
    assert overlap[overlap.index("--concurrency") + 1] == "2"
    assert "FLEET_BATCH_SIZE" not in plan(p.parse_args(["--cpu", "1", "--overlap"]), gpus=[])[0].env


def test_a_threads_pool_worker_generates_through_one_batcher_thread(monkeypatch) -> None:  # type: ignore[no-untyped-def]
    """A pipeline is not thread-safe: when tasks run off the main thread (threads pool), every
    generation goes through the one batcher thread, also at batch size 1; a prefork child
    (tasks on its main thread) calls the engine directly."""
    from worker import runtime

    monkeypatch.setattr(runtime, "ObjectStore", lambda settings: SimpleNamespace(verified=False))
    monkeypatch.setattr(runtime, "_settings", WorkerSettings(_env_file=None))
    monkeypatch.setattr(runtime, "_engine", "engine")
    monkeypatch.setattr(runtime, "_runner", None)
    assert runtime.get_runner().batcher is None
    monkeypatch.setattr(runtime, "_runner", None)
    runners = []
    thread = threading.Thread(target=lambda: runners.append(runtime.get_runner()))
    thread.start()
    thread.join()
    batcher = runners[0].batcher
    assert batcher is not None and batcher.max_batch == 1 and batcher.engine == "engine"


def test_recording_an_expired_job_makes_no_s3_call_on_the_consumers_thread(monkeypatch) -> None:  # type: ignore[no-untyped-def]
    """Celery sends task_revoked on the consumer's thread: a slow or retrying S3 write there
    would stall every queue of the worker, so the record is written from a thread of its own."""
    import worker.records
    import worker.runtime
    from worker import app as worker_app

    writing = threading.Event()
    release = threading.Event()
    threads: list[str] = []

    def slow_record(*_: object) -> None:
        threads.append(threading.current_thread().name)
        writing.set()
        release.wait(10)

    monkeypatch.setattr(worker.records, "record_raw_failure", slow_record)
    monkeypatch.setattr(worker.runtime, "get_store", lambda: None)
    monkeypatch.setattr(worker.runtime, "get_redis", lambda: None)
    request = SimpleNamespace(id="late-job", kwargs={"job": {"job_id": "late-job"}})
    try:
        worker_app._record_expired(request=request, expired=True)  # returns while S3 is slow
        assert writing.wait(5) and threads and threads[0] != threading.current_thread().name
    finally:
        release.set()
