"""`python -m worker launch`: one supervised worker per device, health keys, warm shutdown."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time

import pytest

from fleet.contract import JobSpec
from tests.fleet_fixtures import REPO, wait_until
from worker.ops.heartbeat import alive_nodes

pytestmark = pytest.mark.integration


def wait_for(predicate, timeout: float = 90.0, what: str = "condition"):  # type: ignore[no-untyped-def]
    return wait_until(predicate, timeout, what, interval=0.2)


@pytest.fixture()
def launcher_env(fleet_env: dict) -> dict:
    return {**fleet_env, "FLEET_HEARTBEAT_INTERVAL_S": "0.5", "FLEET_HEARTBEAT_TTL_S": "3"}


def test_cpu_workers_share_jobs_restart_after_a_crash_and_stop_warmly(
    launcher_env: dict, client
) -> None:
    redis_url = launcher_env["FLEET_REDIS_URL"]
    before = {b["node"] for b in alive_nodes(redis_url)}
    proc = subprocess.Popen(
        [sys.executable, "-m", "worker", "launch", "--cpu", "2", "--queues", "fleet.launch",
         "--backoff-base", "0.2"],
        cwd=REPO, env=launcher_env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
    )  # fmt: skip
    try:

        def ours() -> dict[str, dict]:
            return {
                b["node"].split("@")[0]: b
                for b in alive_nodes(redis_url)
                if b["node"] not in before and "fleet.launch" in b["queues"]
            }

        def both_ready() -> dict[str, dict] | None:
            # A heartbeat appears at start; a worker consumes only once its gate opened.
            now = ours()
            return now if len(now) == 2 and all(b.get("state") == "ready" for b in now.values()) \
                else None  # fmt: skip

        beats = wait_for(both_ready, what="two workers ready")
        assert set(beats) == {"cpu0", "cpu1"}

        # Jobs spread over both workers (each pulls one at a time).
        client.settings.queue = "fleet.launch"
        handles = client.submit_many(
            [JobSpec(prompt=f"p{i}", width=64, height=64, steps=4) for i in range(8)]
        )
        statuses = client.wait([h.job_id for h in handles], timeout=120)
        assert {s.state for s in statuses} == {"succeeded"}
        nodes = {s.result.worker["node"] for s in statuses}
        assert len(nodes) == 2, nodes

        # Health check and status see both, with their device.
        check = subprocess.run([sys.executable, "-m", "worker", "check"], env=launcher_env,
                               capture_output=True, text=True)  # fmt: skip
        assert check.returncode == 0 and "cpu0@" in check.stdout
        status = subprocess.run([sys.executable, "-m", "worker", "status", "--json"],
                                env=launcher_env, capture_output=True, text=True)  # fmt: skip
        rows = {r["node"].split("@")[0]: r for r in json.loads(status.stdout)}
        assert rows["cpu0"]["device"] == "cpu" and rows["cpu1"]["device"] == "cpu"

        # `producer stats` shows the launch queue and both workers with their device.
        stats = subprocess.run([sys.executable, "-m", "producer", "stats", "--json"],
                               env={**launcher_env, "FLEET_QUEUE": "fleet.launch"},
                               capture_output=True, text=True)  # fmt: skip
        assert stats.returncode == 0, stats.stderr
        data = json.loads(stats.stdout)
        assert data["queues"]["fleet.launch"] == 0
        mine = [w for w in data["workers"] if "fleet.launch" in w["queues"]]
        assert sorted(w["node"].split("@")[0] for w in mine) == ["cpu0", "cpu1"]
        assert {w["device"] for w in mine} == {"cpu"}

        # A crashed worker is restarted by the launcher.
        old_pid = beats["cpu0"]["pid"]
        os.kill(old_pid, signal.SIGKILL)
        wait_for(lambda: ours().get("cpu0", {}).get("pid") not in (None, old_pid),
                 what="cpu0 restarted")  # fmt: skip
    finally:
        proc.send_signal(signal.SIGTERM)
        code = proc.wait(timeout=60)
    out = proc.stdout.read().decode() if proc.stdout else ""
    assert code == 0, out
    assert "restart 1" in out
    # Warm shutdown removed the health keys; `check` now fails.
    wait_for(
        lambda: (
            not alive_nodes(redis_url)
            or not any("fleet.launch" in b["queues"] for b in alive_nodes(redis_url))
        ),
        what="heartbeats gone",
    )
    check = subprocess.run([sys.executable, "-m", "worker", "check", "--node", "cpu0@nowhere"],
                           env=launcher_env, capture_output=True, text=True)  # fmt: skip
    assert check.returncode == 1 and "unhealthy" in check.stderr


def test_a_worker_that_keeps_failing_makes_the_launcher_exit_non_zero(launcher_env: dict) -> None:
    started = time.monotonic()
    proc = subprocess.run(
        [sys.executable, "-m", "worker", "launch", "--cpu", "1", "--max-restarts", "2",
         "--backoff-base", "0.1", "--", "--pool", "no-such-pool"],
        cwd=REPO, env=launcher_env, capture_output=True, text=True, timeout=120,
    )  # fmt: skip
    assert proc.returncode == 1, proc.stdout + proc.stderr
    assert "failed 3 times in a row" in proc.stderr
    assert time.monotonic() - started < 100


def test_launch_refuses_gpus_that_are_not_there(launcher_env: dict) -> None:
    proc = subprocess.run([sys.executable, "-m", "worker", "launch", "--gpus", "7"],
                          cwd=REPO, env=launcher_env, capture_output=True, text=True)  # fmt: skip
    assert proc.returncode != 0
    assert "not found" in proc.stderr or "no GPU found" in proc.stderr
