"""The Celery configuration the producer and the worker both load.

One place for what both sides must agree on: JSON only, extended results, the default queue,
kombu's priority steps and the visibility timeout (a producer and a worker with different
visibility timeouts would redeliver running jobs). The worker adds its own keys on top
(``worker.app.worker_config``: late acks, prefetch, the hardened transport).
"""

from __future__ import annotations

from typing import Any

from celery import Celery

from fleet.contract import DEFAULT_QUEUE, PRIORITY_TRANSPORT_OPTIONS
from fleet.settings import FleetSettings


def celery_config(settings: FleetSettings) -> dict[str, Any]:
    """The Celery settings every part of the fleet shares."""
    return {
        "broker_url": settings.redis_url,
        "result_backend": settings.backend_url,
        "result_expires": settings.result_expires_s,
        # Not extended: a result would keep a copy of the job's JSON (its kwargs) for
        # result_expires, in every state stored (STARTED, PROGRESS, FAILURE, SUCCESS); the
        # manifest in S3 keeps the recipe (scripts/bench_redis_memory.py measures the cost).
        "result_extended": False,
        # Celery's result backend waits 120 s on a Redis that accepts and never answers:
        # `producer status` would hang that long. Fail within seconds, clearly, instead.
        "redis_socket_timeout": 5.0,
        "redis_socket_connect_timeout": 5.0,
        # JSON only: pickle from the queue would run arbitrary code in the worker.
        "task_serializer": "json",
        "result_serializer": "json",
        "accept_content": ["json"],
        "result_accept_content": ["json"],
        "task_default_queue": settings.queue or DEFAULT_QUEUE,
        "task_create_missing_queues": True,
        "broker_connection_retry_on_startup": True,
        "broker_transport_options": {
            **PRIORITY_TRANSPORT_OPTIONS,
            "visibility_timeout": settings.visibility_timeout_s,
        },
        "result_backend_transport_options": {"retry_policy": {"timeout": 5.0}},
    }


def make_celery(name: str, settings: FleetSettings, **extra: Any) -> Celery:
    """A Celery app with the shared configuration, plus ``extra`` keys."""
    app = Celery(name)
    app.conf.update({**celery_config(settings), **extra})
    return app
