"""Durable failure records: a failed manifest per job plus an index entry under failures/.

Celery's results expire; these do not. Light module (no torch), used by the job runner, the
task policies and the worker's main process (jobs that expired before they started). When
storage is down, a failure goes to a Redis list instead (``producer failed`` reads both).
"""

from __future__ import annotations

import json
import logging
from datetime import datetime, timezone
from typing import Any

import redis

from fleet import contract
from fleet.contract import JobResult
from fleet.errors import StorageError
from fleet.storage import ObjectStore

log = logging.getLogger(__name__)


#: A refused job is kept in its failure record whole up to this size, shortened beyond it.
MAX_RECORDED_JOB_CHARS = 16_384


def bounded_job(job: Any) -> Any:
    """The job as a failure record keeps it: whole when small, else each long value quoted
    (its first characters and its size), so a 1 MB prompt never becomes a 1 MB record."""
    try:
        size = len(json.dumps(job, default=str))
    except (TypeError, ValueError, RecursionError):
        return contract.quote_value(job).__repr__()
    if size <= MAX_RECORDED_JOB_CHARS:
        return job
    if isinstance(job, dict):
        return {_short_key(k): _short(v) for k, v in list(job.items())[:50]}
    return repr(contract.quote_value(job))


def _short_key(key: Any) -> str:
    text = str(key)
    return text if len(text) <= contract.QUOTE_CHARS else repr(contract.quote_value(text))


def _short(value: Any) -> Any:
    if isinstance(value, str | int | float | bool) or value is None:
        quoted = contract.quote_value(value)
        return quoted if quoted is value else repr(quoted)
    return repr(contract.quote_value(value))


def raw_failure_manifest(
    job_id: str, job: Any, error: str, error_type: str, bucket: str, prefix: str
) -> dict[str, Any]:
    """A failure manifest for a job that never became a valid JobSpec (or never ran)."""
    result = JobResult(
        job_id=job_id,
        status="failed",
        bucket=bucket,
        manifest_key=contract.manifest_key(job_id, prefix),
        error=error,
        error_type=error_type,
    )
    return {
        "schema_version": contract.SCHEMA_VERSION,
        "job_id": job_id,
        "status": "failed",
        "job": bounded_job(job),
        "error": error,
        "error_type": error_type,
        "finished_at": datetime.now(timezone.utc).isoformat(),
        "result": result.model_dump(mode="json"),
    }


def write_failure(store: ObjectStore, prefix: str, manifest: dict[str, Any]) -> bool:
    """Store a failure manifest and its index entry, never over a succeeded manifest: written
    with a condition on what was read (If-None-Match / If-Match), so a success that lands in
    between is not replaced. False (logged) when storage is down."""
    job_id = manifest["job_id"]
    if not isinstance(job_id, str) or not contract.JOB_ID_PATTERN.match(job_id):
        log.error("failure of a job without a usable id not recorded: %s", manifest.get("error"))
        return False
    entry = {
        "job_id": job_id,
        "error": manifest.get("error"),
        "error_type": manifest.get("error_type"),
        "failed_at": manifest.get("finished_at"),
        "manifest_key": contract.manifest_key(job_id, prefix),
    }
    key = contract.manifest_key(job_id, prefix)
    index_key = contract.failure_key(job_id, prefix)
    indexed = False
    try:
        for _ in range(3):
            current, etag = store.get_json_tagged(key)
            if isinstance(current, dict) and current.get("status") == "succeeded":
                # Success beats failure: a job stored once stays stored.
                log.warning("job %s already succeeded; not replaced by a failure: %s",
                            job_id, manifest.get("error"))  # fmt: skip
                if indexed:
                    store.delete(index_key)
                return True
            if not indexed:
                # The index entry first: whoever reads a failed manifest finds the job listed
                # by `producer failed` too.
                store.put_json(index_key, entry)
                indexed = True
            if not store.conditional_writes:
                store.put_json(key, manifest)  # read, then write: a concurrent success can race
                break
            if store.put_json_if(key, manifest, etag):
                break  # nobody wrote in between; else read again
        return True
    except StorageError as exc:
        log.error("could not record the failure of job %s: %s", job_id, exc)
        return False


def clear_failure(store: ObjectStore, prefix: str, job_id: str) -> None:
    """A job that succeeded (e.g. after `producer retry`) leaves the failure index."""
    store.delete(contract.failure_key(job_id, prefix))


def record_raw_failure(
    store: ObjectStore, redis_client: redis.Redis, prefix: str, job: Any, error: Exception
) -> None:
    """Record the failure of a job that never became a valid JobSpec, or failed outside the
    runner (delivery cap, time limit, storage window). Storage down: the Redis list keeps it
    (AOF-persisted), so a failure is never silent. A job without a usable id is only logged."""
    job_id = job.get("job_id") if isinstance(job, dict) else None
    if not isinstance(job_id, str):
        log.error("failure of a job without a job_id not recorded: %s", error)
        return
    manifest = raw_failure_manifest(
        job_id, job, str(error), type(error).__name__, store.bucket, prefix
    )
    if not write_failure(store, prefix, manifest):
        entry = {k: manifest[k] for k in ("job_id", "error", "error_type")}
        entry["failed_at"] = manifest["finished_at"]
        with redis_client.pipeline(transaction=False) as pipe:
            pipe.lpush(contract.UNSTORED_FAILURES_KEY, json.dumps(entry))
            pipe.ltrim(contract.UNSTORED_FAILURES_KEY, 0, contract.UNSTORED_FAILURES_MAX - 1)
            pipe.execute()


def flush_unstored(store: ObjectStore, redis_client: redis.Redis, prefix: str) -> int:
    """Write the failures kept in Redis while storage was down to S3, oldest first, and take
    each off the list once written. Stops at the first storage error. Returns how many."""
    written = 0
    while True:
        raw = redis_client.lindex(contract.UNSTORED_FAILURES_KEY, -1)
        if raw is None:
            return written
        try:
            entry = json.loads(raw)
            job_id = entry["job_id"]
        except (ValueError, KeyError, TypeError):
            redis_client.lrem(contract.UNSTORED_FAILURES_KEY, -1, raw)
            continue
        error, error_type = str(entry.get("error")), str(entry.get("error_type"))
        manifest = raw_failure_manifest(
            job_id, {"job_id": job_id}, error, error_type, store.bucket, prefix
        )
        manifest["finished_at"] = entry.get("failed_at") or manifest["finished_at"]
        if not write_failure(store, prefix, manifest):
            return written
        redis_client.lrem(contract.UNSTORED_FAILURES_KEY, -1, raw)
        written += 1
