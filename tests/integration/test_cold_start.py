"""Cold start: a worker consumes no job before its pipeline is ready, its health check says
"loading" meanwhile, and the first job's time is only its own (not the model load).

The load is held by the test itself (tests/standins/slow_load: a ``sitecustomize`` that makes
``Placement.load`` wait for a file the test creates), on a real `celery worker`.
"""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

from fleet.contract import JobSpec
from producer.client import Client
from tests.fleet_fixtures import REPO, WorkerProcess, wait_until

pytestmark = pytest.mark.integration

HOLD = REPO / "tests" / "standins" / "slow_load"


def check(w: WorkerProcess) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "worker", "check", "--node", w.node],
                          env=w.env, capture_output=True, text=True)  # fmt: skip


def first_line(w: WorkerProcess, text: str) -> str:
    return next(ln for ln in w.log().splitlines() if text in ln)


def test_a_worker_takes_no_job_before_its_model_is_loaded(
    start_worker, qclient: Client, queue: str, tmp_path: Path
) -> None:
    gate = tmp_path / "load-may-finish"
    path = os.pathsep.join(p for p in (str(HOLD), os.environ.get("PYTHONPATH", "")) if p)
    w = start_worker("coldstart", queues=queue, PYTHONPATH=path, FLEET_TEST_LOAD_GATE=str(gate))
    wait_until(lambda: "stand-in: model load held" in w.log(), 60, "the model load starting")
    first = qclient.submit(JobSpec(prompt="first", width=64, height=64, steps=2))
    # While the model loads: the health check says so and is not healthy, the job waits.
    said = check(w)
    assert said.returncode == 1 and "is starting: loading the model" in said.stderr, said.stderr
    wait_until(lambda: "holding queue(s)" in w.log(), 30, "the queues held")
    assert qclient.status(first.job_id).state == "queued"
    assert qclient.stats()["queues"][queue] == 1  # still in Redis, not reserved by the worker
    assert "] received:" not in w.log()
    gate.touch()
    st = first.wait(timeout=90)
    assert st.state == "succeeded", st
    # The job started after the model was ready, and its time is its own.
    ready, received = first_line(w, "model ready in"), first_line(w, "] received:")
    assert w.log().index(ready) < w.log().index(received)
    assert st.result is not None
    # The load (held for as long as the checks above took) is not counted in the job's time.
    load_s = float(re.search(r"model ready in ([\d.]+) s", ready).group(1))  # type: ignore[union-attr]
    assert st.result.timings["total_s"] < load_s, (st.result.timings, load_s)
    wait_until(lambda: check(w).returncode == 0, 30, "the health check turning healthy")
    assert "healthy: " + w.node in check(w).stdout
