"""A worker that cannot work takes no job: it stays up, consumes nothing and says why."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

from fleet.contract import JobSpec
from producer.client import Client
from tests.fleet_fixtures import wait_until

pytestmark = pytest.mark.integration


def check(w) -> subprocess.CompletedProcess[str]:  # type: ignore[no-untyped-def]
    return subprocess.run([sys.executable, "-m", "worker", "check", "--node", w.node],
                          env=w.env, capture_output=True, text=True)  # fmt: skip


def queued(qclient: Client, ids: list[str]) -> bool:
    return all(qclient.status(i).state == "queued" for i in ids)


def _takes_no_job(start_worker, qclient: Client, queue: str, reason: str, **env: str) -> None:  # type: ignore[no-untyped-def]
    jobs = qclient.submit_many([JobSpec(prompt=f"kept {i}", width=64, height=64, steps=2)
                                for i in range(5)])  # fmt: skip
    ids = [h.job_id for h in jobs]
    broken = start_worker("broken", queues=queue, **env)
    wait_until(lambda: check(broken).returncode == 2, 90, "the worker reporting itself broken")
    said = check(broken)
    assert reason in said.stderr and "broken" in said.stderr, said.stderr
    assert "takes no jobs" in broken.log() and reason in broken.log()
    # Still up, still answering, and every job still waits for a worker that can run it.
    assert broken.proc.poll() is None
    assert qclient.stats()["queues"][queue] == 5 and queued(qclient, ids)
    assert "] received:" not in broken.log()
    healthy = start_worker("healthy", queues=queue)
    assert [s.state for s in qclient.wait(ids, timeout=120)] == ["succeeded"] * 5
    assert "] received:" not in broken.log()
    wait_until(lambda: check(healthy).returncode == 0, 30, "the healthy worker's check")
    broken.stop()  # `worker check` of this host would (rightly) report it to later tests


def test_a_worker_whose_model_cannot_load_takes_no_job(
    start_worker, qclient: Client, queue: str, tmp_path: Path
) -> None:
    _takes_no_job(start_worker, qclient, queue, "the model cannot load",
                  FLEET_MODEL=str(tmp_path / "no-such-model"))  # fmt: skip


def test_a_worker_whose_storage_refuses_the_credentials_takes_no_job(
    start_worker, qclient: Client, queue: str
) -> None:
    _takes_no_job(start_worker, qclient, queue, "storage refuses this worker",
                  FLEET_S3_SECRET_ACCESS_KEY="not-the-secret")  # fmt: skip


def test_redis_that_refuses_the_password_or_is_away_is_one_clear_line(
    tmp_path: Path, fleet_env: dict
) -> None:
    from fleet.errors import BrokerRefused
    from fleet.localdev import LocalServices
    from fleet.settings import ProducerSettings
    from tests.fleet_fixtures import settings_kwargs

    services = LocalServices(tmp_path / "own-services")
    ep = services.start()
    try:
        services.redis.client().config_set("requirepass", "s3cret")
        port = services.redis.port
        cases = {
            "no password": (f"redis://127.0.0.1:{port}/0", "refused the password"),
            "wrong password": (f"redis://:nope@127.0.0.1:{port}/0", "refused the password"),
            "away": ("redis://127.0.0.1:1/0", "cannot reach Redis at redis://127.0.0.1:1/0"),
        }
        for name, (url, says) in cases.items():
            env = {**fleet_env, **ep.env(), "FLEET_REDIS_URL": url}
            for command in (["submit", "a fox", "--width", "64", "--height", "64"],
                            ["status", "some-id"], ["stats"]):  # fmt: skip
                run = subprocess.run([sys.executable, "-m", "producer", *command], env=env,
                                     capture_output=True, text=True, timeout=120)  # fmt: skip
                assert run.returncode == 4, (name, command, run.stderr[-2000:])
                lines = [ln for ln in run.stderr.splitlines() if ln.strip()]
                assert len(lines) == 1 and says in lines[0], (name, command, run.stderr)
                assert "Traceback" not in run.stderr and "nope" not in run.stderr
            check = subprocess.run([sys.executable, "-m", "worker", "check", "--any-host"],
                                   env=env, capture_output=True, text=True)  # fmt: skip
            assert check.returncode == 1 and says in check.stderr, (name, check.stderr)
        # The Python API raises the fleet's own error, with the password masked.
        settings = ProducerSettings(_env_file=None, **{**settings_kwargs(ep.env()),
                                    "redis_url": f"redis://:nope@127.0.0.1:{port}/0"})  # fmt: skip
        with Client(settings) as c, pytest.raises(BrokerRefused, match=r":\*\*\*@"):
            c.submit(JobSpec(prompt="a fox", width=64, height=64))
    finally:
        services.stop()
