"""What the gateway does for a tenant, without HTTP: submit, follow, list, cancel, delete.

The HTTP routes (``producer.gateway.app``) call these and turn their errors into answers.
Jobs are validated by the same ``Client.validate`` as the CLI's, then checked against the
tenant's limits, then put in the tenant's fair line (``producer.gateway.fairshare``)."""

from __future__ import annotations

import asyncio
import hashlib
import json
import logging
import time
from collections.abc import AsyncIterator
from typing import Any

import redis.asyncio
from starlette.concurrency import run_in_threadpool

from fleet import contract
from fleet.contract import JobSpec, JobStatus
from fleet.errors import DuplicateJobError, JobValidationError
from fleet.settings import GatewaySettings
from producer.client import Client, check_deadline, check_priority
from producer.gateway.errors import ApiError, not_found
from producer.gateway.fairshare import Dispatcher, FairLines, LineJob
from producer.gateway.tenants import Tenant, TenantStore

log = logging.getLogger(__name__)

#: Where the first attempt of an SDK request without an Idempotency-Key left its job id, so
#: that the SDK's own retries (x-stainless-retry-count > 0) wait for it instead of a new job.
RETRY_KEY = "fleet:gw:retry:{tenant}:{digest}"
RETRY_TTL_S = 900
#: Fields a caller may not set: the gateway sets them.
GATEWAY_FIELDS = ("tenant", "job_id", "submitted_at")


def idempotent_job_id(tenant: str, key: str) -> str:
    """The job id an Idempotency-Key makes: a hash of tenant and key, so that two tenants'
    keys never meet."""
    return "idem-" + hashlib.sha256(f"{tenant}\0{key}".encode()).hexdigest()[:40]


class Gateway:
    """One per gateway process: a producer client, the tenants, the lines and the dispatcher."""

    def __init__(self, settings: GatewaySettings) -> None:
        self.settings = settings
        self.client = Client(settings)
        self.tenants = TenantStore(self.client.redis, settings)
        self.lines = FairLines(self.client.redis, settings.job_claim_ttl_s)
        self.dispatcher = Dispatcher(self.lines, self.client.celery, settings.fair_queue_depth)
        self._aredis: redis.asyncio.Redis | None = None

    async def start_async(self) -> None:
        """On the event loop that serves requests: the dispatcher, and an asyncio Redis client
        that authenticates each request without a thread-pool hop."""
        self.dispatcher.start()
        self._aredis = redis.asyncio.Redis.from_url(self.settings.redis_url)
        self.tenants.use_async(self._aredis)

    async def close_async(self) -> None:
        self.tenants.use_async(None)
        if self._aredis is not None:
            await self._aredis.aclose()  # type: ignore[attr-defined]  # types-redis predates it
            self._aredis = None
        await run_in_threadpool(self.close)

    def close(self) -> None:
        self.dispatcher.stop()
        self.client.close()

    def prefix(self, tenant: str) -> str:
        return contract.tenant_prefix(self.settings.s3_prefix, tenant)

    # -- submitting -----------------------------------------------------------------------------

    def submit(
        self,
        tenant: Tenant,
        job: dict[str, Any],
        priority: int = contract.DEFAULT_PRIORITY,
        deadline_s: float | None = None,
        idempotency_key: str | None = None,
    ) -> tuple[JobStatus, bool]:
        """Validate and line up one job of ``tenant``; (its status, whether it was made now).
        The same Idempotency-Key again gives the first job (same recipe) or 409 (another)."""
        if not isinstance(job, dict):
            raise ApiError(422, "the body must be a job: a JSON object", code="invalid_value")
        for name in GATEWAY_FIELDS:
            if name in job:
                why = ("the gateway names jobs; send an Idempotency-Key header to make a "
                       "retried POST make one job" if name == "job_id"
                       else "the gateway sets it")  # fmt: skip
                raise ApiError(422, f"{name}: {why}", param=name, code="invalid_value")
        check_priority(priority)
        check_deadline(deadline_s)
        job_id = idempotent_job_id(tenant.name, idempotency_key) if idempotency_key else None
        spec = self.client.validate(
            {**job, "tenant": tenant.name, **({"job_id": job_id} if job_id else {})}
        )
        self.check_allowed(tenant, spec)
        retry_after = self.tenants.take_rate(tenant)
        if retry_after is not None:
            raise ApiError(429, f"tenant {tenant.name} may send {tenant.rate_per_min} jobs a "
                           f"minute; try again in {retry_after:.0f} s", "rate_limit_error",
                           code="rate_limit_exceeded", retry=True,
                           headers={"Retry-After": f"{retry_after:.0f}"})  # fmt: skip
        queue = self.client.queue_for(spec)
        soft, hard = contract.time_limits(
            spec, self.settings.job_time_base_s, self.settings.job_time_per_mpx_step_s
        )
        message = {**contract.job_payload(spec), "submitted_at": time.time()}
        line_job = LineJob(
            job_id=spec.job_id, tenant=tenant.name, queue=queue,
            priority=min(priority, tenant.max_priority), message=message,
            soft_time_limit=soft, time_limit=hard,
            expires_at=time.time() + deadline_s if deadline_s else None,
        )  # fmt: skip
        self.client.check_redis()
        added, prior = self.lines.add(line_job, contract.claim_value(queue, spec),
                                      tenant.max_queued)  # fmt: skip
        if added != 1:
            self.tenants.refund_rate(tenant)
        if added == -1:
            raise ApiError(429, f"tenant {tenant.name} has {tenant.max_queued} jobs waiting, its "
                           "limit; try again when some have started", "rate_limit_error",
                           code="queue_full", retry=True,
                           headers={"Retry-After": "5"})  # fmt: skip
        if added == 0:
            try:
                self.client.duplicate(spec, prior, queue)
            except DuplicateJobError as exc:
                raise ApiError(
                    409,
                    f"Idempotency-Key was used before for another job: {exc}",
                    param="Idempotency-Key",
                    code="idempotency_conflict",
                ) from None
            return self.status(tenant, spec.job_id), False
        log.debug("tenant %s: job %s in line for %s (priority %d)", tenant.name, spec.job_id,
                 queue, line_job.priority)  # fmt: skip
        return JobStatus(job_id=spec.job_id, state="queued"), True

    def check_allowed(self, tenant: Tenant, spec: JobSpec) -> None:
        if tenant.models is not None and (spec.model or "") not in tenant.models:
            shown = spec.model if spec.model is not None else "the default model"
            raise ApiError(403, f"tenant {tenant.name} may not use {shown}; it may use: "
                           f"{', '.join(tenant.models) or 'none'}", "permission_error",
                           param="model", code="model_not_allowed")  # fmt: skip
        size = tenant.job_size(spec)
        if tenant.max_job_mpx_steps and size > tenant.max_job_mpx_steps:
            raise ApiError(403, f"the job is {size:.1f} megapixel-steps (width x height / 1e6 x "
                           f"steps x images); tenant {tenant.name} may send at most "
                           f"{tenant.max_job_mpx_steps:g}", "permission_error",
                           param="steps", code="job_too_large")  # fmt: skip

    def remember_attempt(self, tenant: Tenant, body: bytes, job_id: str) -> None:
        digest = hashlib.sha256(body).hexdigest()
        self.client.redis.set(RETRY_KEY.format(tenant=tenant.name, digest=digest), job_id,
                              ex=RETRY_TTL_S)  # fmt: skip

    def first_attempt(self, tenant: Tenant, body: bytes) -> str | None:
        digest = hashlib.sha256(body).hexdigest()
        raw = self.client.redis.get(RETRY_KEY.format(tenant=tenant.name, digest=digest))
        return raw.decode() if isinstance(raw, bytes) else raw

    # -- following ------------------------------------------------------------------------------

    def owned(self, tenant: Tenant, job_id: str) -> LineJob:
        """The job's record, if ``tenant`` sent it; 404 otherwise (another tenant's id reads
        as no job at all)."""
        job = self.lines.record(job_id) if contract.JOB_ID_PATTERN.match(job_id) else None
        if job is None or job.tenant != tenant.name:
            raise not_found(job_id)
        return job

    def status(self, tenant: Tenant, job_id: str) -> JobStatus:
        job = self.owned(tenant, job_id)
        ahead = self.lines.place(job)
        if ahead is not None:
            return JobStatus(job_id=job_id, state="queued", ahead=ahead,
                             detail=f"{ahead} ahead")  # fmt: skip
        st = self.client.status(job_id, prefix=self.prefix(tenant.name))
        if st.state == "queued":
            st = self.client.with_queue_positions([st])[0]
        return st

    async def wait(self, tenant: Tenant, job_id: str, timeout: float) -> JobStatus:
        deadline = time.monotonic() + timeout
        while True:
            st = await run_in_threadpool(self.status, tenant, job_id)
            if st.done or time.monotonic() >= deadline:
                return st
            await asyncio.sleep(self.settings.poll_interval_s)

    async def events(self, tenant: Tenant, job_id: str) -> AsyncIterator[tuple[str, dict]]:
        """The job's life as events: queued (with jobs ahead, again when that changes),
        started, one per denoising step, then succeeded, failed or cancelled. A step the poll
        did not see is still sent, in order."""
        total = (await run_in_threadpool(self.owned, tenant, job_id)).message.get("steps")
        last_ahead: int | None = -1
        started = False
        step_sent = 0
        steps: int | None = None
        while True:
            st = await run_in_threadpool(self.status, tenant, job_id)
            if st.state == "queued" and not started:
                if st.ahead != last_ahead:
                    last_ahead = st.ahead
                    yield "queued", {"job_id": job_id, "ahead": st.ahead}
            elif st.state in ("started", "succeeded"):
                if not started:
                    started = True
                    yield "started", {"job_id": job_id}
                steps = st.steps or steps or (total if isinstance(total, int) else None)
                upto = (steps or 0) if st.state == "succeeded" else (st.step or 0)
                for n in range(step_sent + 1, upto + 1):
                    yield "step", {"job_id": job_id, "step": n, "steps": steps}
                step_sent = max(step_sent, upto)
            if st.done:
                yield st.state, json.loads(st.model_dump_json())
                return
            await asyncio.sleep(self.settings.poll_interval_s)

    def jobs(self, tenant: Tenant, state: str | None, limit: int) -> list[JobStatus]:
        """The tenant's newest jobs (newest first), only those in ``state`` when given."""
        from producer.gateway.fairshare import INDEX_KEY

        ids = self.client.redis.zrevrange(INDEX_KEY.format(tenant=tenant.name), 0, -1)
        found: list[JobStatus] = []
        for raw in ids:
            job_id = raw.decode() if isinstance(raw, bytes) else raw
            try:
                st = self.status(tenant, job_id)
            except ApiError:  # its record expired
                continue
            if state is None or st.state == state:
                found.append(st)
                if len(found) >= limit:
                    break
        return found

    def cancel(self, tenant: Tenant, job_id: str) -> JobStatus:
        """Cancel a job: one still in its line leaves it and never runs; one sent to Celery
        is cancelled as the CLI cancels (queued: never runs; running: stops at its next step)."""
        job = self.owned(tenant, job_id)
        self.client.redis.set(contract.CANCEL_KEY.format(job_id=job_id), "1",
                              ex=self.settings.job_claim_ttl_s)  # fmt: skip
        if self.lines.cancel(job):
            self.client.celery.backend.mark_as_revoked(job_id, "cancelled before it started")
        else:
            self.client.cancel(job_id)
        return self.status(tenant, job_id)

    def delete_images(self, tenant: Tenant, job_id: str) -> int:
        """Delete a finished job's objects (images and manifest); how many were deleted."""
        st = self.status(tenant, job_id)
        if not st.done:
            raise ApiError(409, f"job {job_id} is {st.state}; cancel it first or wait for it",
                           param="job_id", code="job_not_done")  # fmt: skip
        keys = self.client.store.list_keys(contract.job_prefix(job_id, self.prefix(tenant.name)))
        for key in keys:
            self.client.store.delete(key)
        log.info("tenant %s: deleted %d object(s) of job %s", tenant.name, len(keys), job_id)
        return len(keys)

    # -- the fleet ------------------------------------------------------------------------------

    def models(self, tenant: Tenant) -> list[str]:
        """The models the fleet serves now: those of ready workers, and the routed ones; only
        those the tenant may use."""
        served = set(self.settings.model_routes)
        for raw_key in self.client.redis.scan_iter(contract.HEARTBEAT_KEY.format(node="*")):
            beat = _json(self.client.redis.get(raw_key))
            node = beat.get("node") if beat else None
            if not isinstance(node, str):
                continue
            state = _json(self.client.redis.get(contract.WORKER_STATE_KEY.format(node=node)))
            info = _json(self.client.redis.get(contract.WORKER_INFO_KEY.format(node=node)))
            if state and state.get("state") == "ready" and info and info.get("model_name"):
                served.add(str(info["model_name"]))
        if tenant.models is not None:
            served &= set(tenant.models)
        return sorted(served)

    def health(self) -> dict[str, str]:
        """Whether Redis and S3 answer (each "ok" or the error)."""
        checks: dict[str, str] = {}
        try:
            self.client.redis.ping()
            checks["redis"] = "ok"
        except Exception as exc:
            checks["redis"] = f"unreachable: {type(exc).__name__}"
        try:
            self.client.store.exists("fleet-probes/healthz")
            checks["s3"] = "ok"
        except Exception as exc:
            checks["s3"] = f"unreachable: {type(exc).__name__}"
        return checks


def _json(raw: bytes | str | None) -> dict[str, Any] | None:
    try:
        value = json.loads(raw) if raw else None
    except ValueError:
        return None
    return value if isinstance(value, dict) else None


def validation_param(exc: JobValidationError) -> str | None:
    return exc.problems[0][0] if exc.problems else None
