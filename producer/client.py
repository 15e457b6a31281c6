"""The Python API other services import: validate a job, enqueue it by name, follow it."""

from __future__ import annotations

import json
import logging
import math
import re
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import redis
from celery.result import AsyncResult

from fleet import contract
from fleet.brokers import check_redis_config, masked, translating
from fleet.celeryconf import make_celery
from fleet.contract import JobResult, JobSpec, JobStatus, validate_job
from fleet.errors import DuplicateJobError, FleetError, JobFailed, JobValidationError
from fleet.settings import ProducerSettings
from fleet.storage import ObjectStore

log = logging.getLogger(__name__)
#: Redis failures leave the client's methods as BrokerRefused / BrokerUnavailable (FleetError).
_redis_errors = translating(lambda client: client.settings.redis_url)

#: Queued jobs get their place in line only while their queue holds at most this many messages
#: (counting reads every message; a deeper queue is not scanned).
POSITION_SCAN_LIMIT = 1000
#: `wait` counts places in line at most this often (it polls states far more often).
POSITION_REFRESH_S = 1.0
#: The task id in a message's headers (kombu's JSON envelope; the body is base64).
_MESSAGE_ID = re.compile(rb'"id":\s*"([^"]+)"')

_RUNNING_STATES = {"STARTED", "PROGRESS", "RETRY"}

#: The longest ``deadline_s`` (``--deadline``) a job may have: 30 days, far past any real wait
#: in a queue and well inside what Celery turns into an ``expires`` date.
MAX_DEADLINE_S = 30 * 24 * 3600


def _ended(
    job_id: str, state: Literal["failed", "cancelled"], error: str, error_type: str | None
) -> JobStatus:
    """The status of a job that ended without a stored result (Celery's answer only)."""
    result = JobResult(job_id=job_id, status=state, error=error, error_type=error_type)
    return JobStatus(job_id=job_id, state=state, result=result)


def check_priority(priority: int) -> None:
    if not contract.MIN_PRIORITY <= priority <= contract.MAX_PRIORITY:
        raise JobValidationError([("priority", priority, "must be from 0 (last) to 9 (first)")])


def check_deadline(deadline_s: float | None) -> None:
    """A deadline is None (none) or a finite number of seconds above 0, at most
    MAX_DEADLINE_S; JobValidationError naming ``deadline`` otherwise."""
    if deadline_s is None:
        return
    ok = (
        isinstance(deadline_s, int | float)
        and not isinstance(deadline_s, bool)
        and math.isfinite(deadline_s)
        and 0 < deadline_s <= MAX_DEADLINE_S
    )
    if not ok:
        why = f"must be a number of seconds above 0 and at most {MAX_DEADLINE_S} (30 days)"
        raise JobValidationError([("deadline", deadline_s, why)])


#: How long a client keeps the model rules it read from the workers before reading them again.
RULES_REFRESH_S = 5.0


@dataclass(frozen=True)
class _WorkerRules:
    """The rules one live worker published: the queues it consumes and the model it serves."""

    queues: frozenset[str]
    model: str | None
    rules: contract.ModelRules


def _json_object(raw: bytes | str | None) -> dict[str, Any] | None:
    try:
        value = json.loads(raw) if raw is not None else None
    except ValueError:
        return None
    return value if isinstance(value, dict) else None


@dataclass
class JobHandle:
    """A submitted job: ask for its status or wait for its result."""

    job_id: str
    queue: str
    client: Client = field(repr=False)
    #: True when this id had been submitted before and no new job was created.
    duplicate: bool = False

    def status(self) -> JobStatus:
        return self.client.status(self.job_id)

    def wait(self, timeout: float | None = None, raise_on_failure: bool = False) -> JobStatus:
        st = self.client.wait([self.job_id], timeout=timeout)[0]
        if raise_on_failure and st.state == "failed":
            raise JobFailed(self.job_id, (st.result.error if st.result else None) or "unknown")
        return st


class Client:
    """``Client(settings).submit(JobSpec(prompt="a fox")) -> JobHandle``."""

    def __init__(self, settings: ProducerSettings | None = None) -> None:
        self.settings = settings or ProducerSettings()
        # Knows task names, not task code: it sends and reads results only.
        self.celery = make_celery("fleet-producer", self.settings)
        self._redis: redis.Redis | None = None
        self._store: ObjectStore | None = None
        self._redis_checked = False
        #: The model rules the live workers published, and when they were read.
        self._rules: tuple[float, list[_WorkerRules]] | None = None

    # -- connections, made on first use ---------------------------------------------------------

    @property
    def redis(self) -> redis.Redis:
        if self._redis is None:
            self._redis = redis.Redis.from_url(self.settings.redis_url)
        return self._redis

    @property
    def store(self) -> ObjectStore:
        if self._store is None:
            self._store = ObjectStore(self.settings)
        return self._store

    def close(self) -> None:
        if self._redis is not None:
            self._redis.close()
        self.celery.close()

    def __enter__(self) -> Client:
        return self

    def __exit__(self, *_: object) -> None:
        self.close()

    # -- submitting -----------------------------------------------------------------------------

    def validate(self, job: JobSpec | dict[str, Any]) -> JobSpec:
        """Check a job against this fleet's limits, and against the rules of the model that the
        live workers of its queue serve, where they published them (a flow-matching model takes
        no DDIM, Flux no negative prompt, ...); raises JobValidationError naming each field."""
        spec = validate_job(job, self.settings.limits())
        problems: list[tuple[str, object, str]] = []
        for rules in self.model_rules(self.queue_for(spec), spec.model):
            problems += [p for p in rules.problems(spec) if p not in problems]
        if problems:
            raise JobValidationError(problems)
        return spec

    def model_rules(self, queue: str, model: str | None = None) -> list[contract.ModelRules]:
        """The rules of the models the live workers consuming ``queue`` serve (only those
        serving ``model`` when a job names one), from their heartbeats and published info, read
        at most every RULES_REFRESH_S. Any of them may take the job, so a job must keep the
        rules of each. Empty when none is known (no live worker yet, a worker from before the
        rules, Redis away): the worker checks the job again anyway."""
        now = time.monotonic()
        if self._rules is None or now - self._rules[0] > RULES_REFRESH_S:
            self._rules = (now, self._read_rules())
        return [r.rules for r in self._rules[1]
                if queue in r.queues and (model is None or model == r.model)]  # fmt: skip

    def _read_rules(self) -> list[_WorkerRules]:
        found: list[_WorkerRules] = []
        try:
            pattern = contract.HEARTBEAT_KEY.format(node="*")
            for key in self.redis.scan_iter(pattern, count=1000):
                beat = _json_object(self.redis.get(key))
                node = beat.get("node") if beat is not None else None
                if beat is None or not isinstance(node, str):
                    continue
                # Ready only: a worker still loading may have the info of its last model.
                state = _json_object(self.redis.get(contract.WORKER_STATE_KEY.format(node=node)))
                info = _json_object(self.redis.get(contract.WORKER_INFO_KEY.format(node=node)))
                ready = state is not None and state.get("state") == "ready"
                if not ready or info is None or not isinstance(info.get("rules"), dict):
                    continue
                try:
                    rules = contract.ModelRules.model_validate(info["rules"])
                except ValueError as exc:
                    log.warning("worker %s published rules this producer cannot read: %s",
                                node, exc)  # fmt: skip
                    continue
                queues = frozenset(q for q in beat.get("queues") or () if isinstance(q, str))
                found.append(_WorkerRules(queues, info.get("model_name"), rules))
        except redis.RedisError as exc:
            log.debug("the workers' model rules are unknown: %s", exc)
        return found

    def queue_for(self, spec: JobSpec) -> str:
        return contract.queue_for(spec.model, self.settings.model_routes, self.settings.queue)

    @_redis_errors
    def submit(
        self,
        job: JobSpec | dict[str, Any],
        deadline_s: float | None = None,
        priority: int = contract.DEFAULT_PRIORITY,
    ) -> JobHandle:
        """Validate and enqueue one job. The same job id submitted twice enqueues once.

        ``deadline_s``: a job not started within this many seconds is not started at all
        (above 0, at most MAX_DEADLINE_S: 30 days).
        ``priority``: 0 (last) to 9 (first); the default is 5.
        """
        return self.submit_many([job], deadline_s=deadline_s, priority=priority)[0]

    @_redis_errors
    def submit_many(
        self,
        jobs: Iterable[JobSpec | dict[str, Any]],
        deadline_s: float | None = None,
        priority: int = contract.DEFAULT_PRIORITY,
    ) -> list[JobHandle]:
        """Validate every job first (nothing is enqueued if one is bad), then enqueue each."""
        check_priority(priority)
        check_deadline(deadline_s)
        specs = [self.validate(job) for job in jobs]
        self.check_redis()
        return [self._enqueue(spec, deadline_s, priority) for spec in specs]

    def check_redis(self) -> None:
        """Once per client, before its first job: refuse a Redis that can lose the fleet's
        keys (BrokerMisconfigured), or warn about it with FLEET_REDIS_CHECK=warn."""
        if self._redis_checked:
            return
        url = self.settings.redis_url
        for problem in check_redis_config(self.redis, url, self.settings.redis_check):
            log.warning("Redis at %s: %s", masked(url), problem)
        self._redis_checked = True

    def _enqueue(
        self,
        spec: JobSpec,
        deadline_s: float | None = None,
        priority: int = contract.DEFAULT_PRIORITY,
    ) -> JobHandle:
        queue = self.queue_for(spec)
        claim = contract.CLAIM_KEY.format(job_id=spec.job_id)
        value = contract.claim_value(queue, spec)
        claimed = self.redis.set(claim, value, nx=True, ex=self.settings.job_claim_ttl_s)
        if not claimed:
            return self.duplicate(spec, self.redis.get(claim), queue)
        try:
            soft, hard = contract.time_limits(
                spec, self.settings.job_time_base_s, self.settings.job_time_per_mpx_step_s
            )
            self.celery.send_task(
                contract.TASK_GENERATE,
                kwargs={"job": {**contract.job_payload(spec), "submitted_at": time.time()}},
                queue=queue,
                task_id=spec.job_id,
                soft_time_limit=soft,
                time_limit=hard,
                expires=deadline_s,
                priority=contract.celery_priority(priority),
            )
        except Exception:
            self.redis.delete(claim)  # not enqueued: the id is free for a retry
            raise
        log.info("enqueued job %s on %s", spec.job_id, queue)
        return JobHandle(spec.job_id, queue, self)

    def duplicate(self, spec: JobSpec, prior: bytes | str | None, queue: str) -> JobHandle:
        """The handle of a job id submitted before with the same recipe (nothing is enqueued);
        DuplicateJobError, naming what differs, when the id was used for another recipe."""
        prior_queue, recipe = contract.parse_claim(prior)
        if recipe is not None:
            differs = contract.recipe_differences(recipe, spec)
            if differs:
                raise DuplicateJobError(
                    f"job id {spec.job_id} was submitted before with another recipe ("
                    + "; ".join(differs)
                    + "); use a new job id"
                )
        log.info("job %s was submitted before; not enqueued again", spec.job_id)
        return JobHandle(spec.job_id, prior_queue or queue, self, duplicate=True)

    def handle(self, job_id: str) -> JobHandle:
        return JobHandle(job_id, self.settings.queue, self)

    # -- following ------------------------------------------------------------------------------

    @_redis_errors
    def status(self, job_id: str, prefix: str | None = None) -> JobStatus:
        """The job's state. Celery says PENDING for ids it does not know or whose results
        expired, so a PENDING job is looked up in S3 (its manifest) before it reads as queued;
        a job Celery calls failed or revoked reads as its manifest says, when it has one.
        ``prefix``: where its manifest is (a gateway tenant's); default the fleet's."""
        res = AsyncResult(job_id, app=self.celery)
        state = res.state
        if state == "SUCCESS":
            result = self._fresh_urls(JobResult.model_validate(res.result))
            done: contract.JobState = "cancelled" if result.status == "cancelled" else "succeeded"
            return JobStatus(job_id=job_id, state=done, result=result)
        if state == "FAILURE":
            # Where the two disagree the manifest is the truth: a job stored while Redis was
            # away may carry a failure result of that outage.
            from_store = self._from_manifest(job_id, prefix)
            if from_store is not None:
                return from_store
            reason = str(res.result) if res.result is not None else "unknown error"
            error_type = type(res.result).__name__ if res.result is not None else None
            return _ended(job_id, "failed", reason, error_type)
        if state == "REVOKED":
            from_store = self._from_manifest(job_id, prefix)
            if from_store is not None:
                return from_store
            if self.redis.exists(contract.CANCEL_KEY.format(job_id=job_id)):
                return _ended(job_id, "cancelled", "cancelled before it started", "JobCancelled")
            if "expired" in str(res.result):  # the worker's record of it may follow a moment later
                return _ended(job_id, "failed", "expired: not started before its deadline",
                              "JobExpired")  # fmt: skip
            return _ended(job_id, "failed", f"revoked: {res.result}", "JobRevoked")
        if state in _RUNNING_STATES:
            info = res.info if isinstance(res.info, dict) else {}
            if state == "PROGRESS" and info:
                return JobStatus(job_id=job_id, state="started",
                                 detail=f"step {info.get('step')}/{info.get('steps')}",
                                 step=info.get("step"), steps=info.get("steps"))  # fmt: skip
            detail = f"retrying: {res.info}" if state == "RETRY" else None
            return JobStatus(job_id=job_id, state="started", detail=detail)
        from_store = self._from_manifest(job_id, prefix)
        if from_store is not None:
            return from_store
        if self.redis.exists(contract.CLAIM_KEY.format(job_id=job_id)):
            return JobStatus(job_id=job_id, state="queued")
        return JobStatus(
            job_id=job_id, state="unknown", detail="no such job known to Redis or storage"
        )

    def queue_positions(
        self, queue: str, limit: int = POSITION_SCAN_LIMIT
    ) -> dict[str, int] | None:
        """For each job waiting in ``queue``: how many jobs workers take before it (priority
        lists in the order workers read them, each from its right end). None when the queue
        holds more than ``limit`` messages."""
        keys = contract.queue_keys(queue)
        with self.redis.pipeline(transaction=False) as pipe:
            for key in keys:
                pipe.llen(key)
            lengths = [int(n) for n in pipe.execute()]
        if sum(lengths) > limit:
            return None
        with self.redis.pipeline(transaction=False) as pipe:
            for key, n in zip(keys, lengths, strict=True):
                if n:
                    pipe.lrange(key, 0, -1)
            lists = pipe.execute()
        positions: dict[str, int] = {}
        ahead = 0
        for messages in lists:
            for raw in reversed(messages):
                found = _MESSAGE_ID.search(raw)
                if found:
                    positions.setdefault(found.group(1).decode(), ahead)
                ahead += 1
        return positions

    @_redis_errors
    def with_queue_positions(self, statuses: list[JobStatus]) -> list[JobStatus]:
        """The same statuses, queued ones with their place in line (``ahead``) where their queue
        is shallow enough to count (POSITION_SCAN_LIMIT)."""
        queued = [s for s in statuses if s.state == "queued"]
        if not queued:
            return statuses
        names = self.redis.mget([contract.CLAIM_KEY.format(job_id=s.job_id) for s in queued])
        scans: dict[str, dict[str, int] | None] = {}
        placed: dict[str, JobStatus] = {}
        for st, name in zip(queued, names, strict=True):
            if name is None:
                continue
            queue = contract.parse_claim(name)[0] or ""
            if queue not in scans:
                scans[queue] = self.queue_positions(queue)
            ahead = (scans[queue] or {}).get(st.job_id)
            if ahead is not None:
                placed[st.job_id] = st.model_copy(
                    update={"ahead": ahead, "detail": f"{ahead} ahead in {queue}"}
                )
        unplaced = [s.job_id for s in queued if s.job_id not in placed]
        for job_id in self.reserved(unplaced):
            st = next(s for s in queued if s.job_id == job_id)
            placed[job_id] = st.model_copy(
                update={"ahead": 0, "detail": "reserved by a worker: it starts next there"}
            )
        return [placed.get(s.job_id, s) for s in statuses]

    def reserved(self, job_ids: list[str], limit: int = POSITION_SCAN_LIMIT) -> set[str]:
        """Which of these jobs a worker holds reserved, taken from its queue but not started
        (kombu's ``unacked`` hash; not read when it holds more than ``limit`` messages)."""
        if not job_ids or self.redis.hlen(contract.UNACKED_KEY) > limit:
            return set()
        wanted = set(job_ids)
        found: set[str] = set()
        for raw in self.redis.hvals(contract.UNACKED_KEY):
            match = _MESSAGE_ID.search(raw)
            if match and match.group(1).decode() in wanted:
                found.add(match.group(1).decode())
        return found

    def _from_manifest(self, job_id: str, prefix: str | None = None) -> JobStatus | None:
        where = self.settings.s3_prefix if prefix is None else prefix
        manifest = self.store.get_json(contract.manifest_key(job_id, where))
        if not manifest or "result" not in manifest:
            return None
        result = self._fresh_urls(JobResult.model_validate(manifest["result"]))
        state: contract.JobState = result.status
        return JobStatus(job_id=job_id, state=state, result=result)

    def _fresh_urls(self, result: JobResult) -> JobResult:
        for record in result.images:
            record.url = self.store.presign_get(record.key)
        return result

    @_redis_errors
    def wait(
        self,
        job_ids: list[str],
        timeout: float | None = None,
        on_update: Callable[[JobStatus], None] | None = None,
    ) -> list[JobStatus]:
        """Poll until every job is done (or ``timeout`` passes); statuses in the given order."""
        deadline = None if timeout is None else time.monotonic() + timeout
        latest: dict[str, JobStatus] = {}
        pending = list(dict.fromkeys(job_ids))
        counted_at = float("-inf")
        places: dict[str, JobStatus] = {}
        while pending:
            statuses = {job_id: self.status(job_id) for job_id in pending}
            queued = [st for st in statuses.values() if st.state == "queued"]
            if queued and time.monotonic() - counted_at >= POSITION_REFRESH_S:
                counted_at = time.monotonic()
                places = {st.job_id: st for st in self.with_queue_positions(queued)}
            for st in queued:
                place = places.get(st.job_id)
                if place is not None and place.ahead is not None:
                    statuses[st.job_id] = place
            for job_id, st in statuses.items():
                previous = latest.get(job_id)
                latest[job_id] = st
                if on_update is not None and (previous is None or previous != st):
                    on_update(st)
                if st.done:
                    pending.remove(job_id)
            if not pending:
                break
            if deadline is not None and time.monotonic() >= deadline:
                raise TimeoutError(
                    f"{len(pending)} job(s) not done after {timeout} s: " + ", ".join(pending[:5])
                )
            time.sleep(self.settings.poll_interval_s)
        return [latest[j] for j in job_ids]

    # -- replay ---------------------------------------------------------------------------------

    @_redis_errors
    def replay(self, source: str, index: int | None = None) -> JobHandle:
        """Submit a stored recipe again as a new job: a manifest's S3 key or a local file.

        The whole job replays byte for byte when device type, thread count and library versions
        match (see the manifest's ``replay`` field). ``index`` replays one image alone, with its
        own seed; in a batch of one its pixels can differ slightly from the original batch.
        """
        path = Path(source)
        if path.is_file():
            manifest = json.loads(path.read_text())
        else:
            manifest = self.store.get_json(source)
            if manifest is None:
                raise FleetError(f"no manifest at s3://{self.store.bucket}/{source} or {source}")
        job = contract.recorded_job(manifest)
        if not job:
            raise FleetError(f"{source} holds no job recipe (is it a fleet manifest?)")
        if index is not None:
            seeds = manifest.get("seeds") or [job.get("seed")]
            if not 0 <= index < len(seeds):
                raise FleetError(f"--index {index}: the job has images 0 to {len(seeds) - 1}")
            job.update(seed=seeds[index], images=1)
        job.pop("job_id", None)
        job.pop("submitted_at", None)
        return self.submit(job)

    # -- the fleet at a glance ------------------------------------------------------------------

    @_redis_errors
    def stats(self, inspect_timeout: float = 1.0) -> dict[str, Any]:
        """Queue depths and live workers (heartbeats) with their device and current jobs."""
        workers: dict[str, dict[str, Any]] = {}
        for key in self.redis.scan_iter(contract.HEARTBEAT_KEY.format(node="*")):
            raw = self.redis.get(key)
            if raw is None:
                continue
            beat = json.loads(raw)
            info_raw = self.redis.get(contract.WORKER_INFO_KEY.format(node=beat["node"]))
            info = json.loads(info_raw) if info_raw else {}
            workers[beat["node"]] = {
                "node": beat["node"], "queues": beat.get("queues", []),
                "device": info.get("device"), "gpu_name": info.get("gpu_name"),
                "model": info.get("model_name"), "active": [],
            }  # fmt: skip
        if workers:
            # The main process answers while its pool child generates (prefork).
            active = (
                self.celery.control.inspect(
                    destination=list(workers), timeout=inspect_timeout
                ).active()
                or {}
            )
            for node, tasks in active.items():
                if node in workers:
                    workers[node]["active"] = [t.get("id") for t in tasks]
        queues = {self.settings.queue, *self.settings.model_routes.values()}
        for w in workers.values():
            queues.update(w["queues"])
        depths = {
            q: sum(int(self.redis.llen(key)) for key in contract.queue_keys(q))
            for q in sorted(queues)
        }
        return {"queues": depths, "workers": sorted(workers.values(), key=lambda w: w["node"])}

    # -- cancelling -----------------------------------------------------------------------------

    @_redis_errors
    def cancel(self, job_id: str) -> None:
        """Cancel a job: a queued job never generates, a running one stops at its next step.

        The mark is durable in Redis (``fleet:cancel:<job_id>``), because Celery's revoke list
        lives in each worker's memory and a prefork pool child never sees it.
        """
        self.redis.set(contract.CANCEL_KEY.format(job_id=job_id), "1",
                       ex=self.settings.job_claim_ttl_s)  # fmt: skip
        self.celery.control.revoke(job_id)  # also drops it from workers that hold it reserved

    # -- failures ---------------------------------------------------------------------------

    @_redis_errors
    def failed(self, limit: int | None = None, include_retried: bool = False) -> list[dict]:
        """Failed jobs, from the durable failure index in S3, the failures kept in Redis while
        storage was down, and the dead letters (queue entries no worker could run); newest
        first."""
        # Failures recorded while storage was down wait in Redis (see worker/records.py).
        entries = [
            json.loads(raw) for raw in self.redis.lrange(contract.UNSTORED_FAILURES_KEY, 0, -1)
        ]
        entries += [
            {"job_id": d.get("task_id"), "error_type": "DeadLetter", "failed_at": d.get("at"),
             "error": f"dead letter in queue {d.get('queue')}: {d.get('reason')}",
             "queue": d.get("queue")}
            for d in self.dead_letters()
        ]  # fmt: skip
        for key in self.store.list_keys(contract.failures_prefix(self.settings.s3_prefix)):
            entry = self.store.get_json(key)
            if entry is not None and (include_retried or not entry.get("retried_as")):
                entries.append(entry)
        entries.sort(key=lambda e: str(e.get("failed_at") or ""), reverse=True)
        return entries[:limit] if limit else entries

    @_redis_errors
    def dead_letters(self) -> list[dict[str, Any]]:
        """Queue entries workers could not run, with why (newest first, the newest 1,000)."""
        return [json.loads(raw) for raw in self.redis.lrange(contract.DEAD_LETTERS_KEY, 0, -1)]

    @_redis_errors
    def retry(self, job_id: str) -> JobHandle:
        """Submit a failed job again, with the recipe its manifest recorded, as a new job
        ``<job_id>.r<N>``. A new id, because workers remember revoked and expired task ids and
        Celery results and delivery counters belong to the old attempt. The failure entry is
        marked ``retried_as`` and leaves the default ``failed`` listing."""
        prefix = self.settings.s3_prefix
        manifest = self.store.get_json(contract.manifest_key(job_id, prefix))
        if manifest is None or not isinstance(manifest.get("job"), dict):
            raise FleetError(f"job {job_id} has no stored manifest with its recipe to retry")
        if manifest.get("status") != "failed":
            raise FleetError(f"job {job_id} did not fail (status {manifest.get('status')!r})")
        base, _, attempt = job_id.rpartition(".r")
        if not (base and attempt.isdigit()):
            base, attempt = job_id, "0"
        # The next attempt number no job has taken: retrying X twice makes X.r1, then X.r2.
        for n in range(int(attempt) + 1, int(attempt) + 1000):
            new_id = f"{base}.r{n}"
            taken = self.redis.exists(contract.CLAIM_KEY.format(job_id=new_id))
            if not taken and not self.store.exists(contract.manifest_key(new_id, prefix)):
                break
        else:
            raise FleetError(f"job {job_id} was retried 1,000 times; not again")
        spec = self.validate({**contract.recorded_job(manifest), "job_id": new_id})  # or why not
        handle = self._enqueue(spec)
        entry = self.store.get_json(contract.failure_key(job_id, prefix)) or {"job_id": job_id}
        entry["retried_as"] = new_id
        self.store.put_json(contract.failure_key(job_id, prefix), entry)
        return handle

    def download(self, result: JobResult, output: Path) -> list[Path]:
        """Copy a job's images into ``output`` as ``<job_id>-<index>.png``."""
        output.mkdir(parents=True, exist_ok=True)
        paths: list[Path] = []
        for record in result.images:
            data = self.store.get_bytes(record.key)
            if data is None:
                raise FleetError(f"{self.store.uri(record.key)} is missing from storage")
            path = output / f"{result.job_id}-{record.index:03d}.png"
            path.write_bytes(data)
            paths.append(path)
        return paths
