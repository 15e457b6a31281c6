"""One seed, one noise: where the engine draws a job's noise, what the recipe records, and how
a recipe from before the generator device was recorded replays."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from fleet import contract
from fleet.contract import validate_job
from fleet.errors import GenerationError, JobValidationError
from fleet.settings import WorkerSettings
from worker.engine.engine import Engine
from worker.engine.recipe import build_manifest, image_recipe


@pytest.fixture(scope="module")
def engine(tiny_model: Path) -> Engine:
    e = Engine(WorkerSettings(_env_file=None, model=str(tiny_model), model_name="tiny",
                              torch_threads=1, local_files_only=True))  # fmt: skip
    e.setup()
    return e


def job(**kw):  # type: ignore[no-untyped-def]
    return validate_job({"prompt": "a fox", "width": 64, "height": 64, "steps": 2, "seed": 3, **kw})


def test_cpu_noise_asked_for_or_not_gives_the_same_images(engine: Engine) -> None:
    default = np.asarray(engine.generate(job()).images[0])
    asked = np.asarray(engine.generate(job(generator_device="cpu")).images[0])
    assert np.array_equal(default, asked) and default.std() > 0


def test_a_cpu_worker_refuses_noise_on_cuda_as_the_jobs_fault(engine: Engine) -> None:
    """Refused, naming the field, not run on other noise and not a generation failure (which
    would run the self-test and blame the pipeline)."""
    with pytest.raises(JobValidationError) as err:
        engine.generate(job(generator_device="cuda"))
    assert not isinstance(err.value, GenerationError)
    assert err.value.problems[0][0] == "generator_device"
    assert "send it to a CUDA worker" in str(err.value)
    assert engine.generate(job()).images  # the engine goes on


def test_the_recipe_and_the_manifest_record_the_generator_device_and_the_dtype(
    engine: Engine,
) -> None:
    info = engine.describe()
    spec = job()
    recipe = image_recipe(spec, spec.seed, "tiny", None, info["dtype"])
    assert recipe["generator_device"] == "cpu" and recipe["dtype"] == "float32"
    manifest = build_manifest(spec, status="succeeded", images=[], worker=info, timings={})
    assert (manifest["generator_device"], manifest["dtype"]) == ("cpu", "float32")
    assert manifest["replay"]["generator_device"] == "cpu"
    on_gpu = job(generator_device="cuda")
    assert image_recipe(on_gpu, 3, "tiny", None)["generator_device"] == "cuda"


def old_manifest(**worker: object) -> dict:  # type: ignore[type-arg]
    """A manifest written before generator_device was a job field (its job lacks the key)."""
    spec = job()
    manifest = build_manifest(spec, status="succeeded", images=[], worker=dict(worker), timings={})
    del manifest["job"]["generator_device"]
    del manifest["replay"]["generator_device"]
    return manifest


def test_a_recipe_from_before_replays_with_the_device_it_was_made_on() -> None:
    pinned_gpu = old_manifest(device="cuda:0", placement="pinned", offload="none")
    assert contract.recorded_job(pinned_gpu)["generator_device"] == "cuda"
    for worker in ({"device": "cpu", "placement": "pinned"},
                   {"device": "cuda:0", "placement": "balanced"},
                   {"device": "cuda:0", "placement": "pinned", "offload": "model"}):  # fmt: skip
        assert contract.recorded_job(old_manifest(**worker))["generator_device"] == "cpu", worker
    # Where the manifest's replay field recorded the worker's generator, that one wins.
    recorded = old_manifest(device="cuda:0", placement="pinned")
    recorded["replay"]["generator_device"] = "cpu"
    assert contract.recorded_job(recorded)["generator_device"] == "cpu"
    # A manifest from now keeps its job's own choice (unset: the CPU).
    gpu = {"device": "cuda:0", "placement": "pinned"}
    now = build_manifest(job(), status="succeeded", images=[], worker=gpu, timings={})
    assert contract.recorded_job(now)["generator_device"] is None
    assert validate_job(contract.recorded_job(pinned_gpu)).generator_device == "cuda"


def test_a_message_leaves_an_unset_generator_device_out() -> None:
    """A worker from before the field (unknown fields are refused) still takes a plain job."""
    assert "generator_device" not in contract.job_payload(job())
    assert contract.job_payload(job(generator_device="cuda"))["generator_device"] == "cuda"
    spec = job()
    assert validate_job(contract.job_payload(spec)) == spec
