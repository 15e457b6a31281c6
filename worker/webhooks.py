"""Webhook delivery: a finished job (succeeded, failed or cancelled) queues one signed POST on
its own light queue (task ``fleet.webhook`` in ``worker.tasks``), retried with backoff; a killed
worker loses none (late acks), and a slow receiver never blocks the next job. No torch here.

A delivery cannot be turned against the fleet's own network (docs/webhooks.md): the host is
resolved once, every address must be public (unless FLEET_WEBHOOK_ALLOW_PRIVATE), the POST
connects to exactly those addresses (TLS still checks the name), and redirects are never
followed. A URL is logged as ``scheme://host[:port]/…`` only: its path and query may hold tokens.
"""

from __future__ import annotations

import hashlib
import hmac
import http.client
import ipaddress
import json
import logging
import socket
import ssl
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any
from urllib.parse import urlsplit

from celery import Celery

from fleet import contract
from fleet.contract import SCHEMA_VERSION, TASK_WEBHOOK, WEBHOOK_QUEUE, WEBHOOK_SIGNATURE_HEADER
from fleet.errors import WebhookError, WebhookRefused
from fleet.settings import WorkerSettings

log = logging.getLogger(__name__)

#: Unix seconds of the delivery attempt; the signature covers it (replays can be refused).
TIMESTAMP_HEADER = "X-Fleet-Timestamp"
#: The delivery task id, the same on every retry of one delivery.
DELIVERY_HEADER = "X-Fleet-Delivery"

#: One resolved address: ``(family, type, proto, sockaddr)`` as ``socket.getaddrinfo`` gives it.
Address = tuple[int, int, int, Any]


def sign(body: bytes, secret: str, timestamp: str) -> str:
    """The signature header: ``sha256=<hex HMAC-SHA256(secret, f"{timestamp}." + body)>``."""
    message = f"{timestamp}.".encode() + body
    return "sha256=" + hmac.new(secret.encode(), message, hashlib.sha256).hexdigest()


def redact(url: str) -> str:
    """What of a webhook URL may be logged: ``scheme://host[:port]/…`` (no user, path or query)."""
    parts = urlsplit(url)
    host = parts.hostname or "?"
    host = f"[{host}]" if ":" in host else host
    try:
        port = f":{parts.port}" if parts.port is not None else ""
    except ValueError:
        port = ":?"
    return f"{parts.scheme}://{host}{port}/…"


@dataclass(frozen=True)
class Target:
    """A webhook URL resolved once and checked: the POST connects to these addresses only."""

    scheme: str
    host: str
    port: int
    #: Path and query, as sent in the request line.
    path: str
    addresses: tuple[Address, ...]


def resolve(url: str, allow_private: bool) -> Target:
    """Resolve the URL's host once and check every address is public (unless allowed).

    Raises WebhookError (retried) when the name does not resolve now, and WebhookRefused (not
    retried) for a URL that is not http(s) or a host with a private, loopback or reserved
    address."""
    parts = urlsplit(url)
    where = redact(url)
    try:
        port = parts.port
    except ValueError:
        raise WebhookRefused(f"webhook {where}: the port is not a number") from None
    if parts.scheme not in ("http", "https") or not parts.hostname:
        raise WebhookRefused(f"webhook {where}: not an http:// or https:// URL with a host")
    port = port or (443 if parts.scheme == "https" else 80)
    try:
        infos = socket.getaddrinfo(parts.hostname, port, type=socket.SOCK_STREAM)
    except UnicodeError as exc:
        raise WebhookRefused(f"webhook {where}: the host name is not valid: {exc}") from None
    except OSError as exc:
        raise WebhookError(f"webhook {where}: cannot resolve {parts.hostname}: {exc}") from None
    if not infos:
        raise WebhookError(f"webhook {where}: {parts.hostname} has no address")
    if not allow_private:
        for info in infos:
            addr = ipaddress.ip_address(info[4][0])
            if isinstance(addr, ipaddress.IPv6Address) and addr.ipv4_mapped is not None:
                addr = addr.ipv4_mapped
            if not addr.is_global:
                raise WebhookRefused(
                    f"webhook {where}: {parts.hostname} resolves to {addr}, a private, loopback "
                    "or reserved address (allow it with FLEET_WEBHOOK_ALLOW_PRIVATE=true)"
                )
    path = (parts.path or "/") + (f"?{parts.query}" if parts.query else "")
    addresses = tuple((family, kind, proto, sockaddr) for family, kind, proto, _, sockaddr in infos)
    return Target(parts.scheme, parts.hostname, port, path, addresses)


def _connect(addresses: tuple[Address, ...], timeout: float) -> socket.socket:
    """A TCP connection to the first of the checked addresses that answers (no lookup here)."""
    error: OSError = OSError("no address to connect to")
    for family, kind, proto, sockaddr in addresses:
        sock = socket.socket(family, kind, proto)
        try:
            sock.settimeout(timeout)
            sock.connect(sockaddr)
            return sock
        except OSError as exc:
            sock.close()
            error = exc
    raise error


class _PinnedHTTP(http.client.HTTPConnection):
    """HTTP to the checked addresses; the Host header still names the host."""

    def __init__(self, target: Target, timeout: float) -> None:
        super().__init__(target.host, target.port, timeout=timeout)
        self._addresses = target.addresses
        self._timeout_s = timeout

    def connect(self) -> None:
        self.sock = _connect(self._addresses, self._timeout_s)


class _PinnedHTTPS(http.client.HTTPSConnection):
    """HTTPS to the checked addresses; SNI and the certificate check use the host name."""

    def __init__(self, target: Target, timeout: float, context: ssl.SSLContext) -> None:
        super().__init__(target.host, target.port, timeout=timeout, context=context)
        self._addresses = target.addresses
        self._timeout_s = timeout
        self._tls = context

    def connect(self) -> None:
        sock = _connect(self._addresses, self._timeout_s)
        self.sock = self._tls.wrap_socket(sock, server_hostname=self.host)


def notify(app: Celery, job: Any, result: dict[str, Any]) -> None:
    """Queue the delivery of ``result`` to the job's webhook, if it has one (best effort)."""
    url = job.get("webhook") if isinstance(job, dict) else None
    if not url:
        return
    kwargs: dict[str, Any] = {"url": url, "payload": result}
    tenant = job.get("tenant")
    if isinstance(tenant, str) and contract.TENANT_PATTERN.match(tenant):
        kwargs["tenant"] = tenant  # signed with the tenant's own secret
    try:
        app.send_task(TASK_WEBHOOK, kwargs=kwargs, queue=WEBHOOK_QUEUE)
    except Exception as exc:
        log.error("[job=%s] could not queue its webhook: %s", result.get("job_id"), exc)


def notify_failure(app: Celery, job: Any, error: BaseException) -> None:
    """Queue the failure result of a job to its webhook (when the job has an id and a webhook)."""
    job_id = job.get("job_id") if isinstance(job, dict) else None
    if isinstance(job_id, str):
        notify(app, job, {"schema_version": SCHEMA_VERSION, "job_id": job_id, "status": "failed",
                          "error": str(error), "error_type": type(error).__name__})  # fmt: skip


def with_fresh_urls(payload: dict[str, Any], presign: Callable[[str], str]) -> dict[str, Any]:
    """The payload with a URL presigned now for each image (results store keys only)."""
    images = payload.get("images")
    if not isinstance(images, list):
        return payload
    fresh = [{**image, "url": presign(image["key"])}
             if isinstance(image, dict) and isinstance(image.get("key"), str) else image
             for image in images]  # fmt: skip
    return {**payload, "images": fresh}


def post(
    url: str,
    payload: dict[str, Any],
    delivery_id: str,
    settings: WorkerSettings,
    presign: Callable[[str], str] | None = None,
    tenant: str | None = None,
) -> int:
    """POST the payload as JSON to the checked address, signed when a secret is configured
    (with the tenant's own secret, derived from it, for a gateway tenant's job); returns the
    HTTP status (2xx).

    Raises WebhookError (transient: retried) when the name does not resolve, the receiver is
    away or answers non-2xx; WebhookRefused (not retried) for a private address or a redirect."""
    job_id = payload.get("job_id")
    where = redact(url)
    try:
        target = resolve(url, allow_private=settings.webhook_allow_private)
    except WebhookRefused as exc:
        log.error("[job=%s] %s; the delivery is refused, not retried", job_id, exc)
        raise
    if presign is not None:
        payload = with_fresh_urls(payload, presign)
    timestamp = str(int(time.time()))
    body = json.dumps(payload, sort_keys=True).encode()
    headers = {"Content-Type": "application/json", "User-Agent": "diffusion-fleet",
               "X-Fleet-Job-Id": str(job_id), DELIVERY_HEADER: delivery_id,
               TIMESTAMP_HEADER: timestamp}  # fmt: skip
    if settings.webhook_secret is not None:
        secret = settings.webhook_secret.get_secret_value()
        if tenant:
            secret = contract.tenant_webhook_secret(secret, tenant)
        headers[WEBHOOK_SIGNATURE_HEADER] = sign(body, secret, timestamp)
    timeout = settings.webhook_timeout_s
    if target.scheme == "https":
        conn: http.client.HTTPConnection = _PinnedHTTPS(
            target, timeout, ssl.create_default_context()
        )
    else:
        conn = _PinnedHTTP(target, timeout)
    try:
        conn.request("POST", target.path, body=body, headers=headers)
        status = conn.getresponse().status
    except (OSError, http.client.HTTPException) as exc:
        raise WebhookError(f"webhook {where} unreachable: {exc}") from None
    finally:
        conn.close()
    if 300 <= status < 400:
        refused = WebhookRefused(
            f"webhook {where} answered {status} redirect; redirects are not followed"
        )
        log.error("[job=%s] %s; the delivery failed, not retried", job_id, refused)
        raise refused
    if not 200 <= status < 300:
        raise WebhookError(f"webhook {where} answered {status}")
    log.info("[job=%s] webhook delivered to %s (%d)", job_id, where, status)
    return status
