"""The worker commands in docker-compose.yml run as written, on the real Redis and S3.

Each worker service's `command` (the exact argv, `%h` left for Celery to expand) is started in
this project's environment, with the services' FLEET_* settings and the tiny model: it must
answer a Celery ping, pass the container's health check, run a job sent to its queue, be
drained as docs/operations.md says, and stop warmly on SIGTERM (what `docker stop` sends,
through tini, to the main process only).
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path
from urllib.parse import urlsplit, urlunsplit

import pytest
import yaml
from celery import Celery
from celery.utils.nodenames import host_format

from fleet.contract import JobSpec
from tests.fleet_fixtures import REPO, settings_kwargs

pytestmark = pytest.mark.integration

COMPOSE = yaml.safe_load((REPO / "docker-compose.yml").read_text())
SERVICES = ["worker-gpu0", "worker-balanced", "worker-cpu"]
# A Redis database of its own: no other test's worker consumes these queues or answers pings.
REDIS_DB = 7
TIMEOUT = 120


def local_argv(argv: list[str]) -> list[str]:
    """The container's argv for this interpreter: `celery ...` and `python -m ...` as modules."""
    if argv[0] == "celery":
        return [sys.executable, "-m", "celery", *argv[1:]]
    if argv[0] in {"python", "python3"}:
        return [sys.executable, *argv[1:]]
    raise AssertionError(f"unexpected program {argv[0]!r} in {argv}")


def healthcheck_argv(service: dict) -> list[str]:
    test = list(service["healthcheck"]["test"])
    assert test[0] == "CMD", test
    return local_argv(test[1:])


def own_db(url: str) -> str:
    parts = urlsplit(url)
    return urlunsplit(parts._replace(path=f"/{REDIS_DB}"))


def ping(app: Celery, node: str) -> bool:
    return bool(app.control.ping(destination=[node], timeout=0.5))


def group_alive(pgid: int) -> bool:
    try:
        os.killpg(pgid, 0)
    except ProcessLookupError:
        return False
    return True


@pytest.mark.parametrize("name", SERVICES)
def test_compose_worker_command_runs_a_job_and_stops_warmly(
    name: str, fleet_env: dict, tmp_path: Path
) -> None:
    from fleet.settings import ProducerSettings
    from producer.client import Client

    service = COMPOSE["services"][name]
    argv = list(service["command"])
    queue = argv[argv.index("--queues") + 1]
    node = host_format(argv[argv.index("--hostname") + 1])  # gpu0@%h -> gpu0@<this host>
    env = {**fleet_env, "FLEET_REDIS_URL": own_db(fleet_env["FLEET_REDIS_URL"])}
    env.pop("FLEET_RESULT_BACKEND_URL", None)
    log_path = tmp_path / f"{name}.log"
    app = Celery(broker=env["FLEET_REDIS_URL"])
    # Run from an empty folder, as in the image: nothing may depend on the repository's cwd.
    with log_path.open("wb") as log:
        proc = subprocess.Popen(
            local_argv(argv),
            cwd=tmp_path,
            env=env,
            stdout=log,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )
    log_text = lambda: log_path.read_text(errors="replace")[-4000:]  # noqa: E731
    try:
        deadline = time.monotonic() + 90
        while not ping(app, node):
            assert proc.poll() is None, f"{name} exited {proc.returncode}:\n{log_text()}"
            assert time.monotonic() < deadline, f"{name} ({node}) not ready:\n{log_text()}"

        # The container's health check passes while the worker runs.
        check = healthcheck_argv(service)
        deadline = time.monotonic() + 30
        while True:
            health = subprocess.run(
                check, cwd=tmp_path, env=env, capture_output=True, text=True, timeout=30
            )
            if health.returncode == 0 or time.monotonic() > deadline:
                break
            time.sleep(0.5)
        assert health.returncode == 0, health.stderr
        assert node in health.stdout

        # A job for the served model, routed to this worker's queue as the producer would.
        settings = ProducerSettings(
            _env_file=None, **{**settings_kwargs(env), "model_routes": {"tiny": queue}}
        )
        with Client(settings) as client:
            job = JobSpec(
                prompt=f"a lighthouse ({name})", width=64, height=64, steps=2, model="tiny"
            )
            handle = client.submit(job)
            assert handle.queue == queue
            status = handle.wait(timeout=TIMEOUT)
        assert status.state == "succeeded", status
        assert status.result is not None
        assert status.result.worker["node"] == node
        assert len(status.result.images) == 1

        # Draining (docs/operations.md): cancel_consumer, a new job waits, nothing is active;
        # add_consumer takes it up again.
        celery_cli = [sys.executable, "-m", "celery", "-A", "worker.app"]
        run = lambda *a: subprocess.run(  # noqa: E731
            [*celery_cli, *a, "-d", node], cwd=tmp_path, env=env, capture_output=True, text=True,
            timeout=60,
        )  # fmt: skip
        cancel = run("control", "cancel_consumer", queue)
        assert cancel.returncode == 0 and "no longer consuming" in cancel.stdout, cancel
        with Client(settings) as client:
            waiting = client.submit(
                job.model_copy(update={"job_id": f"drain-{name}-{time.time_ns()}"})
            )
            time.sleep(2)
            assert waiting.status().state == "queued"
            active = run("inspect", "active")
            assert active.returncode == 0 and "empty" in active.stdout, active
            added = run("control", "add_consumer", queue)
            assert added.returncode == 0 and "add consumer" in added.stdout, added
            assert waiting.wait(timeout=TIMEOUT).state == "succeeded"

        # docker stop: SIGTERM to the main process; warm shutdown, then exit 0, no child left.
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(timeout=60) == 0, log_text()
        deadline = time.monotonic() + 10
        while group_alive(proc.pid) and time.monotonic() < deadline:
            time.sleep(0.1)
        assert not group_alive(proc.pid), "a pool child outlived the worker"
        assert "Warm shutdown" in log_text()
        after = subprocess.run(check, cwd=tmp_path, env=env, capture_output=True, timeout=30)
        assert after.returncode == 1  # its heartbeat went with it
    finally:
        app.close()
        if group_alive(proc.pid):
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait(10)


def with_port(argv: list[str], port: int) -> list[str]:
    """The argv with the container's port 8000 (taken on a test host, maybe) replaced."""
    argv = list(argv)
    argv[argv.index("--port") + 1] = str(port)
    return argv


def test_compose_gateway_command_serves_and_passes_its_healthcheck(
    fleet_env: dict, tmp_path: Path
) -> None:
    """The gateway service's command and health check, as written but for the port: the check
    fails while nothing listens, passes once the gateway answers /healthz, and the gateway
    stops cleanly on SIGTERM (what `docker stop` sends through tini)."""
    import socket

    import httpx

    service = COMPOSE["services"]["gateway"]
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = int(s.getsockname()[1])
    argv = with_port(local_argv(list(service["command"])), port)
    test = list(service["healthcheck"]["test"])
    assert test[:3] == ["CMD", "python", "-c"] and "127.0.0.1:8000/healthz" in test[3]
    check = [sys.executable, "-c", test[3].replace("127.0.0.1:8000/", f"127.0.0.1:{port}/")]
    # A Redis database of its own: its fair dispatcher does not meet the session gateway's.
    env = {**fleet_env, "FLEET_REDIS_URL": own_db(fleet_env["FLEET_REDIS_URL"])}
    env.pop("FLEET_RESULT_BACKEND_URL", None)

    before = subprocess.run(check, cwd=tmp_path, env=env, capture_output=True, timeout=30)
    assert before.returncode != 0  # nothing listens yet: the check can fail
    log_path = tmp_path / "gateway.log"
    with log_path.open("wb") as log:
        proc = subprocess.Popen(argv, cwd=tmp_path, env=env, stdout=log,
                                stderr=subprocess.STDOUT, start_new_session=True)  # fmt: skip
    log_text = lambda: log_path.read_text(errors="replace")[-4000:]  # noqa: E731
    try:
        deadline = time.monotonic() + 60
        while True:
            assert proc.poll() is None, f"the gateway exited {proc.returncode}:\n{log_text()}"
            health = subprocess.run(check, cwd=tmp_path, env=env, capture_output=True,
                                    text=True, timeout=30)  # fmt: skip
            if health.returncode == 0:
                break
            assert time.monotonic() < deadline, f"{health.stderr}\n{log_text()}"
            time.sleep(0.2)
        answer = httpx.get(f"http://127.0.0.1:{port}/healthz", timeout=10)
        assert answer.status_code == 200 and answer.json()["status"] == "ok", answer.text
        assert "diffusion-fleet" in httpx.get(f"http://127.0.0.1:{port}/", timeout=10).text

        # A graceful stop: uvicorn finishes the lifespan (the dispatcher lets go), then exits
        # by the signal it got again (-15 here, 143 in Docker), as uvicorn >= 0.29 does.
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(timeout=30) in (0, -signal.SIGTERM), log_text()
        assert "Application shutdown complete" in log_text()
        after = subprocess.run(check, cwd=tmp_path, env=env, capture_output=True, timeout=30)
        assert after.returncode != 0
    finally:
        if group_alive(proc.pid):
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait(10)
