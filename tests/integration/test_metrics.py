"""Prometheus metrics served by a real prefork worker (multiprocess mode)."""

from __future__ import annotations

import socket
import urllib.request
import uuid

import pytest

from fleet.contract import JobSpec
from fleet.settings import ProducerSettings
from producer.client import Client
from tests.fleet_fixtures import settings_kwargs

pytestmark = pytest.mark.integration


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def metric(text: str, name: str) -> float:
    """The value of the sample named exactly ``name`` (with its labels, if any)."""
    for line in text.splitlines():
        if line.rsplit(" ", 1)[0] == name:
            return float(line.rsplit(" ", 1)[1])
    raise AssertionError(f"{name} not in metrics")


def test_worker_serves_job_image_failure_and_timing_metrics(
    start_worker, fleet_env: dict, tmp_path
) -> None:
    queue = f"fleet.metrics-{uuid.uuid4().hex[:6]}"
    port = free_port()
    start_worker("metrics", queues=queue, FLEET_METRICS_PORT=str(port),
                 FLEET_METRICS_ADDR="127.0.0.1",
                 PROMETHEUS_MULTIPROC_DIR=str(tmp_path / "prom"))  # fmt: skip
    settings = ProducerSettings(_env_file=None, **settings_kwargs(fleet_env))
    settings.queue = queue
    with Client(settings) as c:
        ok = c.submit(JobSpec(prompt="counted", width=64, height=64, steps=4, images=2))
        bad = c.submit(JobSpec(prompt="x", width=64, height=64, steps=2, model="other"))
        assert ok.wait(timeout=60).state == "succeeded"
        assert bad.wait(timeout=60).state == "failed"
    text = urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=10).read().decode()
    assert metric(text, 'fleet_images_total{model="tiny"}') == 2.0
    assert metric(text, 'fleet_failures_total{reason="JobValidationError"}') == 1.0
    assert metric(text, 'fleet_jobs_total{outcome="succeeded"}') == 1.0
    assert metric(text, "fleet_seconds_per_image_count") == 1.0
    assert metric(text, "fleet_seconds_per_step_sum") > 0
    assert metric(text, "fleet_queue_wait_seconds_count") == 1.0
    assert metric(text, "fleet_model_load_seconds") > 0
