"""`python -m worker launch`: one supervised worker per device, health keys, warm shutdown."""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import time
import uuid
from pathlib import Path

import pytest

from fleet.contract import JobSpec
from tests.fleet_fixtures import REPO, wait_until
from tests.integration.test_metrics import scrape
from tests.nvidia_smi import A100X4_MIG_ON_GPU0, path_with_stub
from worker.ops.heartbeat import alive_nodes

pytestmark = pytest.mark.integration


def wait_for(predicate, timeout: float = 90.0, what: str = "condition"):  # type: ignore[no-untyped-def]
    return wait_until(predicate, timeout, what, interval=0.2)


@pytest.fixture()
def launcher_env(fleet_env: dict) -> dict:
    return {**fleet_env, "FLEET_HEARTBEAT_INTERVAL_S": "0.5", "FLEET_HEARTBEAT_TTL_S": "3"}


def free_ports(n: int) -> int:
    """The first of ``n`` consecutive loopback ports free now (FLEET_METRICS_PORT + i)."""
    for _ in range(50):
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            first = int(s.getsockname()[1])
        if first + n >= 65536:
            continue
        try:
            for port in range(first, first + n):
                with socket.socket() as s:
                    s.bind(("127.0.0.1", port))
        except OSError:
            continue
        return first
    raise RuntimeError("no run of free ports")


def sample(text: str, name: str) -> float | None:
    """The value of the sample named exactly ``name`` (labels included), None if absent."""
    for line in text.splitlines():
        if line.rsplit(" ", 1)[0] == name:
            return float(line.rsplit(" ", 1)[1])
    return None


SUCCEEDED = 'fleet_jobs_total{outcome="succeeded"}'


def test_cpu_workers_share_jobs_serve_their_own_metrics_restart_after_a_crash_and_stop_warmly(
    launcher_env: dict, client, tmp_path: Path
) -> None:
    redis_url = launcher_env["FLEET_REDIS_URL"]
    before = {b["node"] for b in alive_nodes(redis_url)}
    port = free_ports(2)
    # Both workers are given the same multiprocess folder: each makes its own inside it.
    env = {**launcher_env, "FLEET_METRICS_PORT": str(port), "FLEET_METRICS_ADDR": "127.0.0.1",
           "PROMETHEUS_MULTIPROC_DIR": str(tmp_path / "prom")}  # fmt: skip
    proc = subprocess.Popen(
        [sys.executable, "-m", "worker", "launch", "--cpu", "2", "--queues", "fleet.launch",
         "--backoff-base", "0.2"],
        cwd=REPO, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
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

        # Each worker serves its own metrics on its own port (FLEET_METRICS_PORT + its index),
        # counting the jobs it ran and no other's.
        ran_on = [s.result.worker["node"].split("@")[0] for s in statuses]
        done = {f"cpu{i}": ran_on.count(f"cpu{i}") for i in range(2)}
        for i in range(2):
            wait_until(lambda i=i: sample(scrape(port + i), SUCCEEDED) == done[f"cpu{i}"], 30,
                       f"cpu{i} counting its {done[f'cpu{i}']} jobs on :{port + i}")  # fmt: skip
        assert len([p for p in (tmp_path / "prom").iterdir() if p.is_dir()]) == 2

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
        # The restarted worker serves on the same port again (its counts start afresh).
        wait_for(lambda: "fleet_worker_consuming" in scrape(port), what="cpu0's metrics back")
        assert sample(scrape(port + 1), SUCCEEDED) == done["cpu1"]
        # The killed worker could not remove its own metrics folder: the launcher did.
        assert not list((tmp_path / "prom").glob(f"fleet-worker-{old_pid}-*"))
        assert len([p for p in (tmp_path / "prom").iterdir() if p.is_dir()]) == 2
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


#: The worker pinned to GPU 3 dies as it starts, every time (as one on a GPU that fell off the
#: bus would): a fault for that GPU alone, in the real worker processes the launcher starts.
BROKEN_GPU3 = """import os
if os.environ.get("CUDA_VISIBLE_DEVICES") == "3":
    os._exit(70)
"""


def test_a_gpu_whose_worker_keeps_crashing_is_given_up_alone_while_the_others_serve(
    launcher_env: dict, client, tmp_path: Path
) -> None:
    """Four A100s (nvidia-smi -L of a real host, GPU 0 in MIG mode), CUDA_VISIBLE_DEVICES=2,3:
    workers on GPUs 2 and 3 only, each counting GPUs in PCI bus order; GPU 3's keeps dying and
    is given up, GPU 2's keeps serving, and the exit status and the status file say which."""
    (tmp_path / "fault").mkdir()
    (tmp_path / "fault" / "sitecustomize.py").write_text(BROKEN_GPU3)
    queue = f"fleet.gpus-{uuid.uuid4().hex[:6]}"
    port = free_ports(2)
    status_file = tmp_path / "launch.json"
    python_path = os.pathsep.join(p for p in (str(tmp_path / "fault"),
                                              launcher_env.get("PYTHONPATH")) if p)  # fmt: skip
    env = {
        **launcher_env,  # FLEET_DEVICE=cpu: the "GPU" workers run the tiny model on the CPU
        "PATH": path_with_stub(tmp_path / "bin", A100X4_MIG_ON_GPU0, launcher_env["PATH"]),
        "CUDA_VISIBLE_DEVICES": "2,3",
        "PYTHONPATH": python_path,
        "FLEET_METRICS_PORT": str(port),
        "FLEET_METRICS_ADDR": "127.0.0.1",
    }
    proc = subprocess.Popen(
        [sys.executable, "-m", "worker", "launch", "--queues", queue, "--max-restarts", "1",
         "--backoff-base", "0.1", "--status-file", str(status_file)],
        cwd=REPO, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
    )  # fmt: skip
    try:

        def status() -> dict:
            try:
                return dict(json.loads(status_file.read_text()))
            except (OSError, ValueError):
                return {}

        given_up = wait_for(lambda: status() if status().get("given_up") else None, 60,
                            "GPU 3's worker given up")  # fmt: skip
        assert given_up["state"] == "degraded" and given_up["given_up"] == ["gpu3"]
        workers = {w["name"]: w for w in given_up["workers"]}
        assert sorted(workers) == ["gpu2", "gpu3"]  # GPUs 0 and 1 are not visible: no worker
        gpu3 = workers["gpu3"]
        assert gpu3["state"] == "failed" and gpu3["last_exit"] == 70 and gpu3["failures"] == 2
        assert gpu3["gpu"]["uuid"] == "GPU-69ec2344-ebac-b028-f88f-452abb3d7f11"
        assert gpu3["cuda_visible_devices"] == "3" and gpu3["metrics_port"] == port + 1
        assert workers["gpu2"]["state"] == "running"

        def gpu2_ready() -> dict | None:
            beats = [b for b in alive_nodes(launcher_env["FLEET_REDIS_URL"])
                     if b["node"].startswith("gpu2@") and queue in b["queues"]]  # fmt: skip
            return beats[0] if beats and beats[0].get("state") == "ready" else None

        beat = wait_for(gpu2_ready, what="GPU 2's worker ready")
        assert beat["pid"] == status()["workers"][0]["pid"]
        # The environment the real worker process runs with.
        environ = dict(
            item.split("=", 1)
            for item in Path(f"/proc/{beat['pid']}/environ").read_text().split("\0")
            if "=" in item
        )
        assert environ["CUDA_DEVICE_ORDER"] == "PCI_BUS_ID"
        assert environ["CUDA_VISIBLE_DEVICES"] == "2"
        assert environ["FLEET_METRICS_PORT"] == str(port)

        client.settings.queue = queue
        handles = client.submit_many(
            [JobSpec(prompt=f"gpu2 {i}", width=64, height=64, steps=2) for i in range(2)]
        )
        statuses = client.wait([h.job_id for h in handles], timeout=120)
        assert {s.state for s in statuses} == {"succeeded"}
        assert {s.result.worker["node"].split("@")[0] for s in statuses} == {"gpu2"}
        wait_for(lambda: sample(scrape(port), SUCCEEDED) == 2.0, 30, "gpu2 counting 2 jobs")
        assert scrape(port + 1) == ""  # nothing serves the given-up worker's port
    finally:
        proc.send_signal(signal.SIGTERM)
        code = proc.wait(timeout=60)
    out = proc.stdout.read().decode() if proc.stdout else ""
    assert code == 1, out  # stopped, but a GPU was given up: not a clean exit
    assert ("gpu3 (GPU 3 NVIDIA A100-SXM4-80GB GPU-69ec2344-ebac-b028-f88f-452abb3d7f11, "
            "CUDA_VISIBLE_DEVICES='3') failed 2 times in a row (last exit 70); giving up on it; "
            "still serving: gpu2") in out  # fmt: skip
    assert "exit 1: gave up on gpu3 (GPU 3" in out
    final = status()
    assert final["state"] == "stopped" and final["exit_code"] == 1
    assert [(w["name"], w["state"]) for w in final["workers"]] == [("gpu2", "stopped"),
                                                                   ("gpu3", "failed")]  # fmt: skip
