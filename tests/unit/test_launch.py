"""The launcher's plan on multi-GPU hosts (GPUs found by running a stub ``nvidia-smi -L`` that
prints real hosts' output, tests/fixtures/nvidia-smi/SOURCES.md), its supervisor with real
processes, and the metrics folder a worker makes for itself."""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import threading
from pathlib import Path

import pytest

from tests.fleet_fixtures import REPO, wait_until
from tests.nvidia_smi import A100_MIG7, A100X4_MIG_ON_GPU0, path_with_stub
from worker.ops.launch import FAILED, STOPPED, Supervisor, add_arguments, detect_gpus, plan
from worker.ops.launch import Slot as LaunchSlot

#: The telegraf#5812 host's UUIDs, as its `nvidia-smi -L` printed them.
GPU_UUIDS = [
    "GPU-513536b6-7d19-9063-b049-1e69664bb298",
    "GPU-d8594bd4-0fc3-8595-e355-7c98138f3b95",
    "GPU-5e375e7e-b41f-155b-dcdc-534524c356fc",
    "GPU-69ec2344-ebac-b028-f88f-452abb3d7f11",
]
GPU0_MIGS = [
    "MIG-ce861fb0-a248-58ce-a9a8-f9adbc22a66a",
    "MIG-a45882f0-9215-5733-a0c1-49286ab31cb5",
    "MIG-f00d722c-f4e1-52c9-aa31-750441ae1bfe",
    "MIG-930574a9-d43a-5d2b-95da-3e68384c8d6b",
]


def parse(*argv: str) -> argparse.Namespace:
    p = argparse.ArgumentParser()
    add_arguments(p)
    return p.parse_args(list(argv))


@pytest.fixture()
def host(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> dict[str, str]:
    """The launcher's environment on the four-A100 host (GPU 0 in MIG mode); run from a
    folder without a .env."""
    monkeypatch.chdir(tmp_path)
    return {"PATH": path_with_stub(tmp_path / "bin", A100X4_MIG_ON_GPU0)}


def test_nvidia_smi_lists_gpus_in_bus_order_and_the_mig_instances_under_gpu_0(
    host: dict[str, str],
) -> None:
    gpus = detect_gpus(host)
    assert [g.index for g in gpus] == [0, 1, 2, 3]
    assert [g.uuid for g in gpus] == GPU_UUIDS
    assert {g.name for g in gpus} == {"NVIDIA A100-SXM4-80GB"}
    assert [m.mig_uuid for m in gpus[0].migs] == GPU0_MIGS
    assert [(m.mig, m.profile) for m in gpus[0].migs] == [(i, "1g.20gb") for i in range(4)]
    assert [g.migs for g in gpus[1:]] == [(), (), ()]


def test_one_worker_per_mig_instance_and_per_whole_gpu_each_in_pci_bus_order(
    host: dict[str, str],
) -> None:
    slots = plan(parse(), env=host)
    assert [s.name for s in slots] == [
        "gpu0-mig0", "gpu0-mig1", "gpu0-mig2", "gpu0-mig3", "gpu1", "gpu2", "gpu3",
    ]  # fmt: skip
    # A MIG instance is pinned by its UUID; a whole GPU by its nvidia-smi index, which CUDA
    # counts the same way only with CUDA_DEVICE_ORDER=PCI_BUS_ID (its default: fastest first).
    assert [s.env["CUDA_VISIBLE_DEVICES"] for s in slots] == [*GPU0_MIGS, "1", "2", "3"]
    assert {s.env["CUDA_DEVICE_ORDER"] for s in slots} == {"PCI_BUS_ID"}
    assert slots[1].argv[slots[1].argv.index("--hostname") + 1] == "gpu0-mig1@%h"
    assert slots[6].device is not None and slots[6].device.uuid == GPU_UUIDS[3]


def test_every_mig_instance_of_a_gpu_gets_its_own_worker(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.chdir(tmp_path)
    env = {"PATH": path_with_stub(tmp_path / "bin", A100_MIG7)}
    listing = A100_MIG7.read_text()
    slots = plan(parse(), env=env)
    assert [s.name for s in slots] == [f"gpu0-mig{i}" for i in range(7)]
    visible = [s.env["CUDA_VISIBLE_DEVICES"] for s in slots]
    assert all(v.startswith("MIG-") and f"(UUID: {v})" in listing for v in visible)
    assert len(set(visible)) == 7


def test_an_existing_cuda_visible_devices_is_respected_and_gpus_picks_among_it(
    host: dict[str, str],
) -> None:
    slots = plan(parse(), env={**host, "CUDA_VISIBLE_DEVICES": "2,3"})
    pinned = [(s.name, s.env["CUDA_VISIBLE_DEVICES"]) for s in slots]
    assert pinned == [("gpu2", "2"), ("gpu3", "3")]
    assert {s.env["CUDA_DEVICE_ORDER"] for s in slots} == {"PCI_BUS_ID"}

    picked = plan(parse("--gpus", "3"), env={**host, "CUDA_VISIBLE_DEVICES": "2,3"})
    assert [s.name for s in picked] == ["gpu3"]
    with pytest.raises(SystemExit, match=r"--gpus: GPU 1 .* not among the devices "
                                         r"CUDA_VISIBLE_DEVICES='2,3' leaves visible"):  # fmt: skip
        plan(parse("--gpus", "1"), env={**host, "CUDA_VISIBLE_DEVICES": "2,3"})

    # UUIDs (and prefixes of them, as CUDA takes them): a GPU, or one MIG instance.
    by_uuid = plan(parse(), env={**host, "CUDA_VISIBLE_DEVICES": "GPU-69ec2344,MIG-a45882f0"})
    assert [(s.name, s.env["CUDA_VISIBLE_DEVICES"]) for s in by_uuid] == [
        ("gpu3", "3"), ("gpu0-mig1", GPU0_MIGS[1]),
    ]  # fmt: skip
    # A GPU in MIG mode named by its index means each of its instances.
    assert [s.name for s in plan(parse(), env={**host, "CUDA_VISIBLE_DEVICES": "0"})] == [
        f"gpu0-mig{i}" for i in range(4)
    ]


def test_visible_devices_that_name_nothing_here_stop_the_launcher_saying_so(
    host: dict[str, str],
) -> None:
    with pytest.raises(SystemExit, match=r"no GPU found \(CUDA_VISIBLE_DEVICES=''\)"):
        plan(parse(), env={**host, "CUDA_VISIBLE_DEVICES": ""})
    with pytest.raises(SystemExit, match=r"CUDA_VISIBLE_DEVICES: GPU '7' not found; this "
                                         r"machine has: MIG 1g.20gb device 0"):  # fmt: skip
        plan(parse(), env={**host, "CUDA_VISIBLE_DEVICES": "2,7"})
    with pytest.raises(SystemExit, match="--gpus: GPU 'GPU-0000' not found"):
        plan(parse("--gpus", "GPU-0000"), env=host)


def test_each_worker_gets_its_own_metrics_port_from_the_environment_or_dotenv(
    host: dict[str, str], tmp_path: Path
) -> None:
    slots = plan(parse(), env={**host, "CUDA_VISIBLE_DEVICES": "1,2,3",
                               "FLEET_METRICS_PORT": "9300"})  # fmt: skip
    assert [s.env["FLEET_METRICS_PORT"] for s in slots] == ["9300", "9301", "9302"]
    cpu = plan(parse("--cpu", "2"), env={**host, "FLEET_METRICS_PORT": "9400"})
    assert [s.env["FLEET_METRICS_PORT"] for s in cpu] == ["9400", "9401"]
    assert all("FLEET_METRICS_PORT" not in s.env for s in plan(parse("--cpu", "2"), env=host))
    # The same setting in .env (the launcher's working folder), as the workers read it.
    (tmp_path / ".env").write_text("FLEET_METRICS_PORT=9500\n")
    dotenv = plan(parse(), env={**host, "CUDA_VISIBLE_DEVICES": "2,3"})
    assert [s.env["FLEET_METRICS_PORT"] for s in dotenv] == ["9500", "9501"]


def python_slot(name: str, code: str) -> LaunchSlot:
    return LaunchSlot(name, {"PATH": "/usr/bin:/bin"}, [sys.executable, "-c", code])


def test_a_worker_that_keeps_failing_is_given_up_alone_and_named_in_the_status(
    tmp_path: Path,
) -> None:
    """Real processes: one exits at once every time, the other runs until SIGTERM."""
    status_file = tmp_path / "run" / "launch.json"
    args = parse("--max-restarts", "1", "--backoff-base", "0.05", "--grace", "20",
                 "--status-file", str(status_file))  # fmt: skip
    good = python_slot("gpu2", "import signal, sys, time\n"
                       "signal.signal(signal.SIGTERM, lambda *_: sys.exit(0))\n"
                       "time.sleep(120)")  # fmt: skip
    bad = python_slot("gpu3", "raise SystemExit(70)")
    sup = Supervisor([good, bad], args)
    codes: list[int] = []
    thread = threading.Thread(target=lambda: codes.append(sup.run()))
    thread.start()
    try:

        def degraded() -> dict | None:
            try:
                status = json.loads(status_file.read_text())
            except (OSError, ValueError):
                return None
            return status if status["state"] == "degraded" else None

        status = wait_until(degraded, 30, "the failing worker given up")
        assert status["given_up"] == ["gpu3"]
        workers = {w["name"]: w for w in status["workers"]}
        assert workers["gpu3"]["state"] == FAILED and workers["gpu3"]["last_exit"] == 70
        assert workers["gpu3"]["failures"] == 2 and workers["gpu3"]["starts"] == 2
        assert workers["gpu2"]["state"] == "running" and workers["gpu2"]["starts"] == 1
        assert good.proc is not None and good.proc.poll() is None
        assert workers["gpu2"]["pid"] == good.proc.pid
    finally:
        sup.request_stop(15)
        thread.join(30)
    assert codes == [1]  # one worker given up: the exit status says so
    final = json.loads(status_file.read_text())
    assert final["state"] == "stopped" and final["exit_code"] == 1
    assert final["given_up"] == ["gpu3"]
    assert [w["state"] for w in final["workers"]] == [STOPPED, FAILED]
    assert good.proc is not None and good.proc.returncode == 0  # stopped warmly, not killed


def test_the_launcher_exits_1_at_once_when_every_worker_was_given_up(tmp_path: Path) -> None:
    args = parse("--max-restarts", "0", "--backoff-base", "0.05")
    sup = Supervisor([python_slot("gpu0", "raise SystemExit(3)"),
                      python_slot("gpu1", "raise SystemExit(4)")], args)  # fmt: skip
    assert sup.run() == 1
    assert [(s.state, s.last_exit) for s in sup.slots] == [(FAILED, 3), (FAILED, 4)]


def run_python(code: str, env: dict[str, str]) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-c", code], cwd=REPO, env=env, capture_output=True,
                          text=True, check=True)  # fmt: skip


def test_a_workers_metrics_folder_is_its_own_and_nothing_else_is_wiped(tmp_path: Path) -> None:
    shared = tmp_path / "prom"
    shared.mkdir()
    (shared / "counter_4242.db").write_text("another worker's live metrics")
    env = {"PATH": "/usr/bin:/bin", "PROMETHEUS_MULTIPROC_DIR": str(shared)}
    code = (
        "import json, os, subprocess, sys\n"
        "from worker.ops.metrics import prepare_multiprocess_dir\n"
        "own = prepare_multiprocess_dir()\n"
        "child = subprocess.run([sys.executable, '-c', 'from worker.ops.metrics import "
        "prepare_multiprocess_dir as p; print(p())'], capture_output=True, text=True, check=True)\n"
        "print(json.dumps({'own': own, 'env': os.environ['PROMETHEUS_MULTIPROC_DIR'], "
        "'child': child.stdout.strip(), 'exists': os.path.isdir(own)}))\n"
    )
    first = json.loads(run_python(code, env).stdout)
    second = json.loads(run_python(code, env).stdout)
    for run in (first, second):
        own = Path(run["own"])
        assert own.parent == shared and own.name.startswith("fleet-worker-")
        assert run["env"] == run["own"] and run["exists"]
        assert run["child"] == run["own"]  # a child of the worker keeps its folder
    assert first["own"] != second["own"]
    # The other worker's file is untouched; each worker's own folder went with it.
    assert (shared / "counter_4242.db").read_text() == "another worker's live metrics"
    assert sorted(p.name for p in shared.iterdir()) == ["counter_4242.db"]
