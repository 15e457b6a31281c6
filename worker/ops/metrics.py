"""Prometheus metrics of a worker: images, seconds per image and step, queue wait, failures by
reason, model load time, device memory.

The pool child records them; the worker's main process serves them on FLEET_METRICS_PORT, in
prometheus-client's multiprocess mode (PROMETHEUS_MULTIPROC_DIR, set before the pool forks to a
folder the worker makes for itself: workers of one host may share the parent folder, and each
serves its own metrics on its own port; ``python -m worker launch`` gives worker i the port
FLEET_METRICS_PORT + i).
The alert signals (``worker.ops.alerts``, docs/alerts.md) are computed at scrape time, in the
main process, by a collector of the same registry.
"""

from __future__ import annotations

import logging
import os
from typing import Any

from fleet.prometheus_dir import MULTIPROC_ENV, own_multiprocess_dir

#: Prometheus scrapes from another host or container; FLEET_METRICS_ADDR narrows it.
ALL_INTERFACES = "0.0.0.0"  # nosec B104  # by design: docs/alerts.md, docs/security.md
log = logging.getLogger(__name__)

OWN_DIR_PREFIX = "fleet-worker-"


def prepare_multiprocess_dir() -> str:
    """Give this worker a fresh multiprocess folder of its own (``fleet-worker-<pid>-*``),
    before prometheus_client is imported: ``fleet.prometheus_dir.own_multiprocess_dir``. Its pool
    children inherit it; the worker serves only its own processes' files on its own port."""
    return own_multiprocess_dir(OWN_DIR_PREFIX)


_enabled: bool | None = None


def metrics_enabled() -> bool:
    """Whether this process records metrics: FLEET_METRICS_PORT is set (environment or .env,
    like every setting) and the worker prepared its multiprocess folder."""
    global _enabled
    if _enabled is None:
        from fleet.settings import WorkerSettings

        _enabled = bool(os.environ.get(MULTIPROC_ENV)) and WorkerSettings().metrics_port is not None
    return _enabled


def serve(port: int, redis_url: str | None = None) -> None:
    """Serve the metrics of every process of this worker on ``port`` (main process), and, with
    ``redis_url``, the alert signals read from Redis and the gate at scrape time
    (``worker.ops.alerts``: queue age and length, dead letters, consuming, broken workers)."""
    from prometheus_client import CollectorRegistry, start_http_server
    from prometheus_client.multiprocess import MultiProcessCollector

    registry = CollectorRegistry()
    MultiProcessCollector(registry)
    if redis_url:
        from worker.ops.alerts import AlertCollector, alert_client

        registry.register(AlertCollector(alert_client(redis_url)))
    addr = os.environ.get("FLEET_METRICS_ADDR", ALL_INTERFACES)
    start_http_server(port, addr=addr, registry=registry)
    log.info("metrics on :%d/metrics", port)


class Metrics:
    """The fleet's metrics, created lazily in the process that records them."""

    def __init__(self) -> None:
        from prometheus_client import Counter, Gauge, Histogram

        self.images = Counter("fleet_images_total", "Images generated and stored", ["model"])
        self.jobs = Counter("fleet_jobs_total", "Jobs finished, by outcome", ["outcome"])
        self.failures = Counter("fleet_failures_total", "Failed jobs by reason", ["reason"])
        self.seconds_per_image = Histogram(
            "fleet_seconds_per_image", "Generation seconds per image",
            buckets=(0.05, 0.1, 0.25, 0.5, 1, 2, 5, 10, 30, 60, 120),
        )  # fmt: skip
        self.seconds_per_step = Histogram(
            "fleet_seconds_per_step", "Generation seconds per denoising step",
            buckets=(0.001, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2),
        )  # fmt: skip
        self.queue_wait = Histogram(
            "fleet_queue_wait_seconds", "From submit to the start of generation",
            buckets=(0.01, 0.05, 0.1, 0.5, 1, 5, 15, 60, 300, 1800),
        )  # fmt: skip
        self.model_load = Gauge("fleet_model_load_seconds", "Seconds the pipeline took to load",
                                multiprocess_mode="max")  # fmt: skip
        self.device_memory = Gauge("fleet_device_memory_bytes", "CUDA memory allocated",
                                   multiprocess_mode="max")  # fmt: skip

    def job_done(self, result: dict[str, Any], steps: int, model: str) -> None:
        outcome = str(result.get("status"))
        self.jobs.labels(outcome).inc()
        if outcome != "succeeded":
            return
        images = len(result.get("images") or [])
        timings = result.get("timings") or {}
        self.images.labels(model).inc(images)
        if "queue_wait_s" in timings:
            self.queue_wait.observe(timings["queue_wait_s"])
        if "per_image_s" in timings and not timings.get("reused_from_spool"):
            self.seconds_per_image.observe(timings["per_image_s"])
            if steps:
                self.seconds_per_step.observe(timings["generate_s"] / steps)

    def job_failed(self, reason: str) -> None:
        self.jobs.labels("failed").inc()
        self.failures.labels(reason).inc()

    def engine_facts(self, info: dict[str, Any]) -> None:
        if info.get("load_seconds"):
            self.model_load.set(info["load_seconds"])
        if info.get("memory_allocated_bytes") is not None:
            self.device_memory.set(info["memory_allocated_bytes"])


_metrics: Metrics | None = None


def get_metrics() -> Metrics | None:
    """The metrics of this process, or None when FLEET_METRICS_PORT is not set."""
    global _metrics
    if not metrics_enabled():
        return None
    if _metrics is None:
        _metrics = Metrics()
    return _metrics


def record_done(job: Any, result: dict[str, Any], engine_info: dict[str, Any], model: str) -> None:
    """Count a finished job (best effort: metrics never fail a job)."""
    metrics = get_metrics()
    if metrics is None:
        return
    try:
        steps = int(job.get("steps") or 0) if isinstance(job, dict) else 0
        metrics.job_done(result, steps, model)
        metrics.engine_facts(engine_info)
    except Exception as exc:
        log.warning("metrics update failed: %s", exc)


def record_failed(error: BaseException) -> None:
    """Count a failed job by its error type."""
    metrics = get_metrics()
    if metrics is not None:
        metrics.job_failed(type(error).__name__)
