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
