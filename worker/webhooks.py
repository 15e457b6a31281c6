"""Webhook delivery: a light Celery task on its own queue, signed, retried with backoff.

A finished job (succeeded, failed or cancelled) enqueues one delivery; a killed worker loses
none (late acks), and a slow receiver never blocks the next job. No torch here.
"""

from __future__ import annotations

import hashlib
import hmac
import json
import logging
import urllib.error
import urllib.request
from typing import Any

from celery import Task

from producer.contract import (
    TASK_WEBHOOK,
    WEBHOOK_QUEUE,
    WEBHOOK_SIGNATURE_HEADER,
    check_webhook_url,
)
from producer.errors import FleetError
from worker.app import app
from worker.settings import WorkerSettings

log = logging.getLogger(__name__)


class WebhookError(FleetError):
    """The receiver did not answer 2xx; delivery is retried."""

    retryable = True


def sign(body: bytes, secret: str) -> str:
    """The value of the signature header: ``sha256=<hex HMAC-SHA256(secret, body)>``."""
    return "sha256=" + hmac.new(secret.encode(), body, hashlib.sha256).hexdigest()


def notify(job: Any, result: dict[str, Any]) -> None:
    """Queue the delivery of ``result`` to the job's webhook, if it has one (best effort)."""
    url = job.get("webhook") if isinstance(job, dict) else None
    if not url:
        return
    try:
        app.send_task(TASK_WEBHOOK, kwargs={"url": url, "payload": result}, queue=WEBHOOK_QUEUE)
    except Exception as exc:
        log.error("[job=%s] could not queue its webhook: %s", result.get("job_id"), exc)


_settings = WorkerSettings()


@app.task(
    name=TASK_WEBHOOK,
    bind=True,
    acks_late=True,
    reject_on_worker_lost=True,
    autoretry_for=(WebhookError,),
    retry_backoff=1,
    retry_backoff_max=300,
    retry_jitter=False,
    max_retries=_settings.webhook_max_retries,
)
def deliver(self: Task, url: str, payload: dict[str, Any]) -> int:
    """POST the payload as JSON, signed when a secret is configured; returns the HTTP status."""
    settings = _settings
    # Checked again at delivery: the name may resolve elsewhere by now (DNS rebinding).
    check_webhook_url(url, allow_private=settings.webhook_allow_private)
    body = json.dumps(payload, sort_keys=True).encode()
    headers = {"Content-Type": "application/json", "User-Agent": "diffusion-fleet",
               "X-Fleet-Job-Id": str(payload.get("job_id")),
               "X-Fleet-Delivery": str(self.request.id)}  # fmt: skip
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
