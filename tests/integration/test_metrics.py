"""Prometheus metrics served by a real prefork worker (multiprocess mode)."""

from __future__ import annotations

import socket
import time
import urllib.error
import urllib.request
import uuid
from pathlib import Path

import pytest

from fleet.contract import JobSpec
from fleet.settings import ProducerSettings
from producer.client import Client
from tests.fleet_fixtures import WorkerProcess, settings_kwargs, wait_until

pytestmark = pytest.mark.integration

#: The reason labels of fleet_worker_broken and fleet_workers_broken (docs/alerts.md).
REASONS = ("model", "storage", "redis", "device", "other")


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


def scrape(port: int) -> str:
    """The worker's metrics page; empty while it does not serve it yet."""
    try:
        with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=10) as page:
            return str(page.read().decode())
    except (urllib.error.URLError, ConnectionError):
        return ""


def has(text: str, name: str, value: float) -> bool:
    try:
        return metric(text, name) == value
    except AssertionError:
        return False


def metrics_env(port: int, folder: Path) -> dict[str, str]:
    return {"FLEET_METRICS_PORT": str(port), "FLEET_METRICS_ADDR": "127.0.0.1",
            "PROMETHEUS_MULTIPROC_DIR": str(folder)}  # fmt: skip


@pytest.fixture(scope="module")
def metrics_worker(
    start_worker, tmp_path_factory: pytest.TempPathFactory
) -> tuple[WorkerProcess, int, str]:
    """A worker on a queue of its own, serving its metrics: (worker, port, queue)."""
    queue = f"fleet.metrics-{uuid.uuid4().hex[:6]}"
    port = free_port()
    w = start_worker("metrics", queues=queue,
                     **metrics_env(port, tmp_path_factory.mktemp("prom")))  # fmt: skip
    return w, port, queue


def test_worker_serves_job_image_failure_and_timing_metrics(
    metrics_worker: tuple[WorkerProcess, int, str], fleet_env: dict
) -> None:
    _, port, queue = metrics_worker
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


def test_a_ready_worker_says_it_consumes_and_that_nothing_waits(
    metrics_worker: tuple[WorkerProcess, int, str],
) -> None:
    _, port, queue = metrics_worker
    wait_until(lambda: has(scrape(port), "fleet_worker_consuming", 1.0), 60,
               "the worker reporting it consumes its queue")  # fmt: skip
    text = scrape(port)
    assert metric(text, "fleet_redis_up") == 1.0
    for reason in REASONS:
        assert metric(text, f'fleet_worker_broken{{reason="{reason}"}}') == 0.0
    assert metric(text, f'fleet_queue_length{{queue="{queue}"}}') == 0.0
    assert metric(text, f'fleet_queue_oldest_job_age_seconds{{queue="{queue}"}}') == 0.0
    assert metric(text, "fleet_dead_letters") >= 0
    assert metric(text, "fleet_unstored_failures") >= 0
    assert metric(text, 'fleet_workers_broken{reason="model"}') >= 0


def test_a_broken_worker_says_why_and_how_long_its_jobs_wait(
    start_worker, qclient: Client, queue: str, tmp_path: Path
) -> None:
    before = time.time()
    jobs = qclient.submit_many([JobSpec(prompt=f"waits {i}", width=64, height=64, steps=2)
                                for i in range(3)])  # fmt: skip
    qclient.submit(JobSpec(prompt="first", width=64, height=64, steps=2), priority=9)
    after = time.time()
    port = free_port()
    broken = start_worker("broken-metrics", queues=queue, FLEET_MODEL=str(tmp_path / "no-model"),
                          **metrics_env(port, tmp_path / "prom"))  # fmt: skip
    try:
        model = 'fleet_worker_broken{reason="model"}'
        wait_until(lambda: has(scrape(port), model, 1.0), 90,
                   "the worker reporting its model cannot load")  # fmt: skip
        asked = time.time()
        text = scrape(port)
        answered = time.time()
        assert metric(text, model) == 1.0
        assert metric(text, "fleet_worker_consuming") == 0.0
        for reason in set(REASONS) - {"model"}:
            assert metric(text, f'fleet_worker_broken{{reason="{reason}"}}') == 0.0
        assert metric(text, 'fleet_workers_broken{reason="model"}') >= 1.0
        # Nobody consumes its queue: every job still waits, and the oldest ages.
        assert metric(text, "fleet_redis_up") == 1.0
        assert metric(text, f'fleet_queue_length{{queue="{queue}"}}') == len(jobs) + 1
        age = metric(text, f'fleet_queue_oldest_job_age_seconds{{queue="{queue}"}}')
        # Its clock and ours are this host's: the first job was sent in [before, after].
        assert asked - after - 0.01 <= age <= answered - before + 0.01
    finally:
        broken.stop()  # `worker check` of this host would (rightly) report it to later tests
