"""Webhook delivery: a finished job (succeeded, failed or cancelled) queues one signed POST on
its own light queue (task ``fleet.webhook`` in ``worker.tasks``), retried with backoff; a killed
worker loses none (late acks), and a slow receiver never blocks the next job. No torch here.
"""

from __future__ import annotations

import hashlib
import hmac
import json
import logging
import urllib.error
import urllib.request
from typing import Any

from celery import Celery

from fleet.contract import (
    SCHEMA_VERSION,
    TASK_WEBHOOK,
    WEBHOOK_QUEUE,
    WEBHOOK_SIGNATURE_HEADER,
    check_webhook_url,
)
from fleet.errors import WebhookError
from fleet.settings import WorkerSettings

log = logging.getLogger(__name__)


def sign(body: bytes, secret: str) -> str:
    """The value of the signature header: ``sha256=<hex HMAC-SHA256(secret, body)>``."""
    return "sha256=" + hmac.new(secret.encode(), body, hashlib.sha256).hexdigest()


def notify(app: Celery, job: Any, result: dict[str, Any]) -> None:
    """Queue the delivery of ``result`` to the job's webhook, if it has one (best effort)."""
    url = job.get("webhook") if isinstance(job, dict) else None
    if not url:
        return
    try:
        app.send_task(TASK_WEBHOOK, kwargs={"url": url, "payload": result}, queue=WEBHOOK_QUEUE)
    except Exception as exc:
        log.error("[job=%s] could not queue its webhook: %s", result.get("job_id"), exc)


def notify_failure(app: Celery, job: Any, error: BaseException) -> None:
    """Queue the failure result of a job to its webhook (when the job has an id and a webhook)."""
    job_id = job.get("job_id") if isinstance(job, dict) else None
    if isinstance(job_id, str):
        notify(app, job, {"schema_version": SCHEMA_VERSION, "job_id": job_id, "status": "failed",
                          "error": str(error), "error_type": type(error).__name__})  # fmt: skip


def post(url: str, payload: dict[str, Any], delivery_id: str, settings: WorkerSettings) -> int:
    """POST the payload as JSON, signed when a secret is configured; returns the HTTP status.

    Raises WebhookError (transient: retried) when the receiver is away or answers non-2xx."""
    # Checked again at delivery: the name may resolve elsewhere by now (DNS rebinding).
    check_webhook_url(url, allow_private=settings.webhook_allow_private)
    body = json.dumps(payload, sort_keys=True).encode()
    headers = {"Content-Type": "application/json", "User-Agent": "diffusion-fleet",
               "X-Fleet-Job-Id": str(payload.get("job_id")),
               "X-Fleet-Delivery": delivery_id}  # fmt: skip
    if settings.webhook_secret is not None:
        headers[WEBHOOK_SIGNATURE_HEADER] = sign(body, settings.webhook_secret.get_secret_value())
    request = urllib.request.Request(url, data=body, headers=headers, method="POST")
    try:
        with urllib.request.urlopen(request, timeout=settings.webhook_timeout_s) as resp:
            status = int(resp.status)
    except urllib.error.HTTPError as exc:
        raise WebhookError(f"webhook {url} answered {exc.code}") from None
    except (urllib.error.URLError, TimeoutError, OSError) as exc:
        raise WebhookError(f"webhook {url} unreachable: {exc}") from None
    log.info("[job=%s] webhook delivered to %s (%d)", payload.get("job_id"), url, status)
    return status
