"""Prometheus metrics served by a real prefork worker (multiprocess mode)."""

from __future__ import annotations

import os
import socket
import subprocess
import time
import urllib.error
import urllib.request
import uuid
from pathlib import Path

import pytest

from fleet.contract import JobSpec
from fleet.settings import ProducerSettings
from producer.client import Client
from tests.fleet_fixtures import REPO, WorkerProcess, settings_kwargs, wait_until, worker_command

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
    module_workers, tmp_path_factory: pytest.TempPathFactory
) -> tuple[WorkerProcess, int, str]:
    """A worker on a queue of its own, serving its metrics: (worker, port, queue)."""
    queue = f"fleet.metrics-{uuid.uuid4().hex[:6]}"
    port = free_port()
    w = module_workers("metrics", queues=queue,
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


SUCCEEDED = 'fleet_jobs_total{outcome="succeeded"}'


def sample(text: str, name: str) -> float | None:
    try:
        return metric(text, name)
    except AssertionError:
        return None


def submit_one(fleet_env: dict, queue: str, prompt: str) -> None:
    settings = ProducerSettings(_env_file=None, **settings_kwargs(fleet_env))
    settings.queue = queue
    with Client(settings) as c:
        handle = c.submit(JobSpec(prompt=prompt, width=64, height=64, steps=2))
        assert handle.wait(timeout=60).state == "succeeded"


class WorkerIn(WorkerProcess):
    """A real worker started in a folder of the test's own (where its .env is)."""

    def __init__(self, cwd: Path, *args: object, **kwargs: object) -> None:
        super().__init__(*args, **kwargs)  # type: ignore[arg-type]
        self.cwd = cwd

    def start(self, timeout: float = 90.0) -> WorkerIn:
        log = self.log_path.open("ab")
        # This checkout's packages, also where the project is installed from another folder.
        path = os.pathsep.join(p for p in (str(REPO), self.env.get("PYTHONPATH")) if p)
        self.proc = subprocess.Popen(worker_command(self.node, self.queues), cwd=self.cwd,
                                     env={**self.env, "PYTHONPATH": path}, stdout=log,
                                     stderr=subprocess.STDOUT, start_new_session=True)  # fmt: skip
        self.wait_ready(timeout)
        return self


def test_a_worker_sharing_the_metrics_folder_wipes_nothing_and_its_dotenv_port_counts(
    metrics_worker: tuple[WorkerProcess, int, str], fleet_env: dict, tmp_path: Path
) -> None:
    """A second worker is given the first one's PROMETHEUS_MULTIPROC_DIR (a host's workers may
    share one) and its FLEET_METRICS_PORT only in its .env: its start deletes none of the first
    worker's files (it used to wipe the folder), each serves only its own counts, and the
    second's pool child counts its jobs (it used to look for the port in the environment)."""
    first, port, queue = metrics_worker
    folder = Path(first.env["PROMETHEUS_MULTIPROC_DIR"])
    (folder / "not-a-worker.txt").write_text("kept")
    before = sample(scrape(port), SUCCEEDED) or 0.0
    submit_one(fleet_env, queue, "counted before the second worker")
    wait_until(lambda: sample(scrape(port), SUCCEEDED) == before + 1, 30, "the job counted")

    second_port = free_port()
    (tmp_path / ".env").write_text(f"FLEET_METRICS_PORT={second_port}\n")
    second_queue = f"fleet.metrics2-{uuid.uuid4().hex[:6]}"
    env = {k: v for k, v in fleet_env.items() if k != "FLEET_METRICS_PORT"}
    env.update(FLEET_METRICS_ADDR="127.0.0.1", PROMETHEUS_MULTIPROC_DIR=str(folder))
    second = WorkerIn(tmp_path, f"metrics2-{uuid.uuid4().hex[:6]}@localhost", env,
                      tmp_path / "worker.log", queues=second_queue)  # fmt: skip
    try:
        second.start()
        wait_until(lambda: "fleet_worker_consuming" in scrape(second_port), 60,
                   "the second worker serving on the port of its .env")  # fmt: skip
        assert sample(scrape(port), SUCCEEDED) == before + 1, "the first worker's counts wiped"
        assert (folder / "not-a-worker.txt").read_text() == "kept"
        own = sorted(p.name for p in folder.iterdir() if p.is_dir())
        assert len(own) == 2 and all(name.startswith("fleet-worker-") for name in own), own

        submit_one(fleet_env, second_queue, "counted from .env")
        wait_until(lambda: sample(scrape(second_port), SUCCEEDED) == 1.0, 30,
                   "the second worker's pool child counting its job")  # fmt: skip
        assert metric(scrape(second_port), 'fleet_images_total{model="tiny"}') == 1.0
        assert sample(scrape(port), SUCCEEDED) == before + 1  # not the first's job
    finally:
        second.stop()
