"""The per-process parts of a worker: its settings, warm engine, job runner and connections.

Each is made once per process on first use, in the pool child (never in the forking parent,
which must not load torch), and shared by every task that process runs. Torch is imported only
when the engine is first made.
"""

from __future__ import annotations

import threading
from typing import TYPE_CHECKING

import redis

from fleet.settings import WorkerSettings
from fleet.storage import ObjectStore
from worker.ops.heartbeat import InfoPublisher

if TYPE_CHECKING:
    from worker.engine.engine import Engine
    from worker.runner import JobRunner

_lock = threading.Lock()  # the threads pool (batch workers) may race to build these
_settings: WorkerSettings | None = None
_engine: Engine | None = None
_runner: JobRunner | None = None
_redis: redis.Redis | None = None
_store: ObjectStore | None = None
_info: InfoPublisher | None = None
_storage_verified = False


def get_settings() -> WorkerSettings:
    global _settings
    if _settings is None:
        _settings = WorkerSettings()
    return _settings


def get_redis() -> redis.Redis:
    """This process's Redis client for the fleet's own keys (cancel marks, counters)."""
    global _redis
    if _redis is None:
        _redis = redis.Redis.from_url(get_settings().redis_url, socket_timeout=5)
    return _redis


def get_store() -> ObjectStore:
    """A store for records written outside a job run (no bucket check: no I/O to make it)."""
    global _store
    if _store is None:
        _store = ObjectStore(get_settings(), create_bucket=False)
    return _store


def get_engine() -> Engine:
    """The process-wide warm engine (created in the pool child, never in the forking parent)."""
    global _engine
    with _lock:
        if _engine is None:
            from worker.engine.engine import Engine

            _engine = Engine(get_settings())
    return _engine


def get_runner() -> JobRunner:
    """The process-wide job runner; making it checks the bucket, so S3 may be down here."""
    global _runner
    engine = get_engine()
    with _lock:
        if _runner is not None:
            return _runner
        from worker.runner import JobRunner

        settings = get_settings()
        batcher = None
        if settings.batch_size > 1 or threading.current_thread() is not threading.main_thread():
            # Tasks off the main thread: a threads pool, where several jobs are in flight at
            # once. One batcher thread owns the pipeline (a pipeline is not thread-safe): with
            # batch size 1 it generates one job at a time while the task threads encode and
            # upload the previous ones (docs/batching.md, "Overlapped workers").
            from worker.engine.batcher import Batcher

            batcher = Batcher(engine, settings.batch_size, settings.batch_wait_s)
        store = ObjectStore(settings)
        store.verified = _storage_verified
        storer = None
        if settings.store_process == "child" or (
            settings.store_process == "auto" and batcher is not None
        ):
            from worker.storer import StoringChild

            storer = StoringChild(settings, store)
        _runner = JobRunner(settings, engine, store, batcher, gives_back=True, storer=storer)
    return _runner


def verify_storage() -> None:
    """The storage canary (put, head, get, delete of a probe key); raises StorageRefused or
    StorageError. Once it passed, this process's stores read a 403 as "no such object"."""
    global _storage_verified
    get_store().canary(get_settings().s3_prefix)
    _storage_verified = True
    for store in (get_store(), _runner.store if _runner is not None else None):
        if store is not None:
            store.verified = True


def check_redis() -> None:
    """Refuse (BrokerMisconfigured) a Redis that can lose the fleet's keys, or warn about it
    with FLEET_REDIS_CHECK=warn."""
    import logging

    from fleet.brokers import check_redis_config, masked

    settings = get_settings()
    for problem in check_redis_config(get_redis(), settings.redis_url, settings.redis_check):
        logging.getLogger(__name__).warning("Redis at %s: %s", masked(settings.redis_url), problem)


def publish_worker_info(node: str) -> None:
    """This process's device facts for `python -m worker status`, once its pipeline is loaded
    (throttled: see InfoPublisher)."""
    global _info
    if _engine is None or _engine.pipe is None:
        return
    if _info is None:
        _info = InfoPublisher(get_settings().heartbeat_interval_s)
    _info.publish(get_redis(), node, _engine.describe())
