"""The Celery tasks, and nothing else: each delegates to the runner and the policies.

Torch is imported on first use only (``worker.runtime`` makes the engine in the pool child).
"""

from __future__ import annotations

import time
from typing import Any

from celery import Task

from fleet.contract import TASK_GENERATE, TASK_WEBHOOK
from worker import runtime, webhooks
from worker.app import app
from worker.policies import JobPolicies, webhook_retry_options

_policies = JobPolicies(runtime.get_settings(), runtime.get_redis, runtime.get_store)


@app.task(
    name=TASK_GENERATE,
    bind=True,
    acks_late=True,
    reject_on_worker_lost=True,
    max_retries=None,  # retries are bounded in time instead (worker.policies.retry_rules)
)
def generate(self: Task, *args: Any, **kwargs: Any) -> dict[str, Any]:
    """Generate one job's images: ``kwargs={"job": {...}}``, the JSON job of docs/contract.md."""
    attempt = _policies.before(self, args, kwargs)
    job = attempt.job
    started = time.perf_counter()
    try:
        runner = runtime.get_runner()  # making it checks the bucket: S3 may be down
        result = runner.run(
            job,
            task_id=attempt.task_id,
            on_progress=_policies.progress_reporter(self, attempt.task_id),
            node=self.request.hostname,
            is_cancelled=_policies.cancel_checker(job),
            queue=attempt.queue,
            first_attempt=attempt.first,
        )
    except Exception as exc:
        raise _policies.after_failure(self, job, exc, time.perf_counter() - started) from None
    finally:
        runtime.publish_worker_info(str(self.request.hostname or ""))
    _policies.after_success(self, job, result, runner.engine.describe)
    return result


@app.task(
    name=TASK_WEBHOOK,
    bind=True,
    acks_late=True,
    reject_on_worker_lost=True,
    **webhook_retry_options(runtime.get_settings()),
)
def deliver(self: Task, url: str, payload: dict[str, Any], tenant: str | None = None) -> int:
    """POST a finished job's result to its webhook; returns the HTTP status. A gateway
    tenant's deliveries are signed with that tenant's own secret."""
    return webhooks.post(url, payload, str(self.request.id), runtime.get_settings(),
                         presign=runtime.get_store().presign_get, tenant=tenant)  # fmt: skip
