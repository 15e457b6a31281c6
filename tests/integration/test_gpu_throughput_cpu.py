"""scripts/gpu_throughput.py --tiny on the CPU: the script a GPU session runs for issue 16, to
its end, with tiny stand-ins of the real models.

One run (about 100 s on two cores) does what the two GPU runs do: real Redis and SeaweedFS, real
`celery worker` processes (a threads pool with a storing child, prefork), the bare loop, the
batch worker, the compile figure through the Engine (FLEET_COMPILE with regional scope) for
both SD models, and the Flux figure. What is checked is that every figure is there with a
number and that the fleet really stored what it was sent, not how fast anything was: CPU
timings say nothing about a GPU. The NVML sampler, which a CPU cannot exercise, is checked
against a stand-in NVML."""

from __future__ import annotations

import importlib.util
import json
import os
import subprocess
import sys
import time
import types
from typing import Any

import pytest

from tests.fleet_fixtures import REPO, wait_until

#: alone: it runs a benchmark script, whose run takes longer than its limit beside other tests
pytestmark = [pytest.mark.integration, pytest.mark.alone]

SCRIPT = REPO / "scripts" / "gpu_throughput.py"
FIGURES = ("fleet_vs_bare", "batch_gain_ratio", "compile_vs_eager", "flux_bare", "gpu_busy")
#: Two batch-1 worker kinds (and the batch worker): fewer processes to start on two cores.
#: "eager" compiles with dynamo only: inductor's C++ builds take minutes on a CPU, and the
#: GPU's inductor makes Triton kernels anyway.
ARGS = (
    "--tiny",
    "--models",
    "sd15,sdxl,flux",
    "--variants",
    "threads:child,prefork:inline",
    "--compile",
    "sd15=regional,sdxl=regional",
    "--compile-backend",
    "eager",
)


@pytest.fixture(scope="module")
def run(tmp_path_factory: pytest.TempPathFactory) -> tuple[dict[str, Any], str, float]:
    out = tmp_path_factory.mktemp("gpu-throughput")
    env = {k: v for k, v in os.environ.items() if not k.startswith("FLEET_")}
    env.update(HF_HUB_OFFLINE="1", PYTHONUNBUFFERED="1")
    began = time.monotonic()
    proc = subprocess.run(
        [sys.executable, str(SCRIPT), *ARGS, "--out", str(out)],
        cwd=REPO,
        env=env,
        capture_output=True,
        text=True,
        timeout=480,
    )
    seconds = time.monotonic() - began
    assert proc.returncode == 0, proc.stdout[-6000:] + proc.stderr[-4000:]
    return json.loads((out / "gpu-throughput.json").read_text()), proc.stdout, seconds


def test_every_figure_is_recorded_with_its_goal(run: tuple[dict[str, Any], str, float]) -> None:
    results, stdout, _ = run
    figures = results["figures"]
    assert set(figures) == set(FIGURES)
    for name in FIGURES:
        assert figures[name]["ok"] is True, (name, figures[name].get("error"))
        assert figures[name]["goal"]
        assert f"| {name} |" in stdout  # the markdown table
    for name in ("fleet_vs_bare", "batch_gain_ratio", "compile_vs_eager", "flux_bare"):
        assert isinstance(figures[name]["value"], float) and figures[name]["value"] > 0, name
        if name != "flux_bare":
            assert isinstance(figures[name]["met"], bool), name
    env = results["env"]
    assert env["torch"] and env["diffusers"] and env["device"] == "cpu"
    assert results["settings_support"]["store_process"] is True
    for phase in (
        "build_sd15",
        "workers_start",
        "fleet_rounds",
        "batch_rounds",
        "compile_sd15",
        "build_sdxl",
        "compile_sdxl",
        "build_flux",
        "flux_compile",
    ):
        assert results["phases"][phase] >= 0, phase
    assert results["budget"]["skipped"] == []


def test_the_fleet_stored_every_job_it_was_sent(run: tuple[dict[str, Any], str, float]) -> None:
    fleet = run[0]["figures"]["fleet_vs_bare"]
    plan = run[0]["plan"]
    assert set(fleet["variants"]) == {"threads-child", "prefork-inline"}
    assert fleet["rounds"] == plan["rounds"] == 2
    for name, variant in fleet["variants"].items():
        assert variant["error"] is None, name
        assert variant["jobs_sent"] == plan["rounds"] * plan["images"], name
        assert variant["manifests_found"] == variant["jobs_sent"], name  # counted in S3
        assert variant["ratio"] > 0 and all(r > 0 for r in variant["pair_ratios"]), name
        assert len(variant["pair_ratios"]) == plan["rounds"]
        assert variant["png_bytes_per_image"] > 1000, name  # noise, not a blank image
        assert variant["images_finite"] and variant["images_not_constant"], name
        assert variant["images_checked"] == plan["images"]
        assert variant["worker_device"] == "cpu"
    assert fleet["variants"]["threads-child"]["store_process"] == "child"
    assert fleet["jobs_sent"] == fleet["manifests_found"] == 2 * plan["rounds"] * plan["images"]
    batch = run[0]["figures"]["batch_gain_ratio"]
    assert batch["variant"] == "batch4-threads-child" and batch["jobs_in_flight"] == 8
    assert batch["jobs_sent"] == batch["manifests_found"] == plan["rounds"] * plan["batch_jobs"]
    assert batch["fleet_gain"] > 0 and batch["bare_gain"] > 0
    assert max(int(k) for k in batch["batch_jobs_seen"]) > 1  # jobs really shared calls


def test_compile_figures_count_recompiles(run: tuple[dict[str, Any], str, float]) -> None:
    compiled = run[0]["figures"]["compile_vs_eager"]
    assert set(compiled["models"]) == {"sd15", "sdxl"}
    for name, model in compiled["models"].items():
        assert model["compile_scope"] == "regional" and model["compile_backend"] == "eager"
        assert model["warmup_s"] >= 0 and model["graphs_compiled_in_setup"] >= 1, name
        assert model["recompiles_after_warmup"] == 0, (name, model["dynamo_counters_after_warmup"])
        for shape, row in model["per_shape"].items():
            assert row["eager_s"] > 0 and row["compiled_s"] > 0 and row["speedup"] > 0, shape
    assert set(compiled["models"]["sd15"]["per_shape"]) == {"64x64x1", "64x64x2"}
    flux = run[0]["figures"]["flux_bare"]
    assert flux["eager_s_per_image"] > 0 and flux["compiled_s_per_image"] > 0
    assert flux["anchors"]["compiled_s_per_image"] == 4.3
    assert flux["compile_scope"] == "regional" and flux["recompiles_after_warmup"] == 0
    for name in ("sd15", "sdxl", "flux"):
        model = run[0]["models"][name]
        assert model["tiny"] is True and model["finite"]["finite"] is True, name
        assert model["finite"]["not_constant"] is True, name


def test_gpu_busy_says_why_it_has_no_number_without_nvml(
    run: tuple[dict[str, Any], str, float],
) -> None:
    busy = run[0]["figures"]["gpu_busy"]
    nvml = run[0]["env"]["nvml"]
    if nvml["available"]:  # a host with a driver: numbers
        assert isinstance(busy["bare"]["value"], float)
    else:
        assert busy["value"] is None and busy["met"] is None
        assert busy["reason"] == nvml["reason"] and "NVML" in busy["reason"].upper()


# ------------------------------------------------------------------------------ stand-in NVML


def load_script() -> Any:
    """scripts/gpu_throughput.py as a module (its dataclasses need it in sys.modules)."""
    name = "gpu_throughput_under_test"
    if name not in sys.modules:
        spec = importlib.util.spec_from_file_location(name, SCRIPT)
        assert spec is not None and spec.loader is not None
        module = importlib.util.module_from_spec(spec)
        sys.modules[name] = module
        spec.loader.exec_module(module)
    return sys.modules[name]


def fake_nvml(utilization: list[float]) -> types.ModuleType:
    """A pynvml whose GPU reports the given utilization percentages, one per read."""
    nvml = types.ModuleType("pynvml")
    reads = iter(utilization)
    last = [utilization[-1]]

    def rates(handle: object) -> Any:
        last[0] = next(reads, last[0])
        return types.SimpleNamespace(gpu=last[0], memory=0)

    nvml.nvmlInit = lambda: None  # type: ignore[attr-defined]
    nvml.nvmlDeviceGetHandleByIndex = lambda i: ("gpu", i)  # type: ignore[attr-defined]
    nvml.nvmlDeviceGetName = lambda h: "Stand-in GPU"  # type: ignore[attr-defined]
    nvml.nvmlDeviceGetUtilizationRates = rates  # type: ignore[attr-defined]
    nvml.NVML_GPU_UTILIZATION_SAMPLES = 1  # type: ignore[attr-defined]
    return nvml


def test_sampler_averages_nvml_over_its_windows(monkeypatch: pytest.MonkeyPatch) -> None:
    module = load_script()
    monkeypatch.setitem(sys.modules, "pynvml", fake_nvml([100.0] * 1000))
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "3")
    sampler = module.GpuSampler(hz=100).start()
    assert sampler.available and sampler._handle == ("gpu", 3)
    try:
        with sampler.window("bare"):
            wait_until(lambda: len(sampler.samples) >= 5, 5, "five NVML samples", interval=0.01)
    finally:
        sampler.stop()
    bare = sampler.mean("bare")
    assert bare["value"] == 1.0 and bare["samples"] >= 5
    assert bare["driver_samples_mean"] is None  # the stand-in has no nvmlDeviceGetSamples
    assert sampler.mean("fleet:none")["value"] is None


def test_sampler_without_nvml_records_the_reason(monkeypatch: pytest.MonkeyPatch) -> None:
    module = load_script()
    broken = fake_nvml([0.0])

    def no_driver() -> None:
        raise OSError("NVML Shared Library Not Found")

    broken.nvmlInit = no_driver  # type: ignore[attr-defined]
    monkeypatch.setitem(sys.modules, "pynvml", broken)
    sampler = module.GpuSampler().start()
    assert not sampler.available
    assert "NVML unavailable" in sampler.reason and "Not Found" in sampler.reason
    assert sampler.mean("bare") == {"value": None, "reason": sampler.reason}
    sampler.stop()


def test_budget_adds_repeats_only_while_they_fit() -> None:
    budget = load_script().Budget(10.0)
    assert budget.allows(5.0, "round 2")
    assert not budget.allows(60.0, "round 3")
    assert budget.skipped and budget.skipped[0].startswith("round 3")
