"""The engine on the tiny pipeline, in-process: call arguments, schedulers, seeds, callbacks."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from fleet.contract import SCHEDULERS, validate_job
from fleet.errors import ModelLoadError
from fleet.settings import WorkerSettings
from worker.engine.engine import Engine


@pytest.fixture(scope="module")
def engine(tiny_model: Path) -> Engine:
    e = Engine(
        WorkerSettings(
            _env_file=None,
            model=str(tiny_model),
            model_name="tiny",
            torch_threads=1,
            local_files_only=True,
        )
    )
    e.setup()
    return e


def job(**kw):  # type: ignore[no-untyped-def]
    return validate_job({"prompt": "a fox", "width": 64, "height": 64, "steps": 3, **kw})


class FailingPipe:
    """The real pipeline, raising ``error`` on its first ``failures`` calls."""

    def __init__(self, real_pipe, failures: int, error: Exception) -> None:  # type: ignore[no-untyped-def]
        self.real_pipe, self.scheduler = real_pipe, real_pipe.scheduler
        self.failures, self.error = failures, error

    def __call__(self, **kw):  # type: ignore[no-untyped-def]
        if self.failures:
            self.failures -= 1
            raise self.error
        self.real_pipe.scheduler = self.scheduler
        return self.real_pipe(**kw)


def test_images_have_the_size_and_seeds_of_the_job(engine: Engine) -> None:
    out = engine.generate(job(width=96, height=64, images=3, seed=7))
    assert [im.shape for im in out.images] == [(64, 96, 3)] * 3  # HxWxC uint8 pixels
    assert all(im.dtype == np.uint8 for im in out.images)
    assert out.seeds == [7, 8, 9]


def test_image_i_equals_a_single_image_with_seed_plus_i(engine: Engine) -> None:
    batch = engine.generate(job(images=2, seed=20))
    single = engine.generate(job(images=1, seed=21))
    # Same latents for the same seed; allow float noise from the batch shape.
    diff = np.abs(np.asarray(batch.images[1], dtype=int) - np.asarray(single.images[0], dtype=int))
    assert diff.max() <= 2


def test_every_contract_scheduler_runs(engine: Engine) -> None:
    pixels = {}
    for name in SCHEDULERS:
        out = engine.generate(job(scheduler=name, seed=1))
        pixels[name] = np.asarray(out.images[0]).tobytes()
    assert (
        pixels["default"] == engine.generate(job(scheduler="default", seed=1)).images[0].tobytes()
    )
    assert len(set(pixels.values())) > 1  # the scheduler really changes the result


def test_call_kwargs_keep_only_what_the_pipeline_accepts(engine: Engine) -> None:
    spec = job(negative_prompt="blurry", images=2)
    kwargs = engine.call_kwargs(spec, spec.seeds(), on_step=lambda s, t: None)
    assert kwargs["negative_prompt"] == "blurry"
    assert kwargs["num_images_per_prompt"] == 2 and len(kwargs["generator"]) == 2
    assert "callback_on_step_end" in kwargs
    accepted = engine._call_params
    engine._call_params = {"prompt", "width", "height", "generator"}  # a narrower pipeline
    try:
        narrow = engine.call_kwargs(spec, spec.seeds())
    finally:
        engine._call_params = accepted
    assert set(narrow) == {"prompt", "width", "height", "generator"}


def test_step_callback_reports_every_step(engine: Engine) -> None:
    steps: list[tuple[int, int]] = []
    engine.generate(job(steps=4, scheduler="euler"), on_step=lambda s, t: steps.append((s, t)))
    assert steps == [(1, 4), (2, 4), (3, 4), (4, 4)]
    steps.clear()
    engine.generate(job(steps=4, scheduler="pndm"), on_step=lambda s, t: steps.append((s, t)))
    assert steps[-1][0] == steps[-1][1] and len(steps) == steps[-1][1]  # PNDM adds a step


def test_describe_records_device_and_versions(engine: Engine) -> None:
    info = engine.describe()
    assert info["device"] == "cpu" and info["dtype"] == "float32"
    assert info["pipeline"] == "StableDiffusionPipeline"
    assert info["torch"] and info["diffusers"] and info["model_name"] == "tiny"


def test_missing_model_is_a_clear_load_error(tmp_path: Path) -> None:
    e = Engine(WorkerSettings(_env_file=None, model=str(tmp_path / "nope"), local_files_only=True))
    with pytest.raises(ModelLoadError, match="cannot load model"):
        e.setup()


def test_an_sdxl_shaped_pipeline_runs_through_the_same_engine(tmp_path: Path) -> None:
    """Not tied to SD 1.5: an SDXL-shaped pipeline (two text encoders) loads through
    DiffusionPipeline and gets only the call arguments it accepts."""
    from worker.testmodel import build_test_model

    model = build_test_model("sdxl-tiny", tmp_path / "sdxl")
    e = Engine(WorkerSettings(_env_file=None, model=str(model), model_name="sdxl",
                              torch_threads=1, local_files_only=True))  # fmt: skip
    out = e.generate(job(images=2, seed=3, negative_prompt="blurry", scheduler="euler_a"))
    assert type(e.pipe).__name__ == "StableDiffusionXLPipeline"
    assert e.pipe.text_encoder_2 is not None
    assert [im.shape for im in out.images] == [(64, 64, 3), (64, 64, 3)]
    again = e.generate(job(images=2, seed=3, negative_prompt="blurry", scheduler="euler_a"))
    assert np.asarray(again.images[1]).tobytes() == np.asarray(out.images[1]).tobytes()


def test_out_of_memory_shrinks_the_call_then_reroutes_then_fails(engine: Engine) -> None:
    """CUDA out-of-memory handling, on the CPU by injecting torch.cuda.OutOfMemoryError."""
    import logging

    import torch

    from fleet.errors import DeviceOutOfMemory
    from worker.policies import oom_fallback
    from worker.runner import JobLog, JobRunner

    real_pipe = engine.pipe
    calls: list[int] = []

    class PickyPipe:  # runs out of memory above `limit` images per call
        limit = 1

        def __init__(self) -> None:
            self.scheduler = real_pipe.scheduler

        def __call__(self, **kw):  # type: ignore[no-untyped-def]
            calls.append(len(kw["generator"]))
            real_pipe.scheduler = self.scheduler
            if len(kw["generator"]) > self.limit:
                raise torch.cuda.OutOfMemoryError("CUDA out of memory (injected)")
            return real_pipe(**kw)

    picky = PickyPipe()
    engine.pipe = picky
    runner = JobRunner(engine.settings, engine, store=None)  # type: ignore[arg-type]
    jlog = JobLog(logging.getLogger("test"), {})
    try:
        spec = job(images=4, seed=70)
        out = runner.generate_shrinking(spec, None, jlog)
        assert calls == [4, 2, 1, 1, 1, 1]  # halved until it fit
        assert out.seeds == [70, 71, 72, 73] and len(out.images) == 4
        assert out.timings["images_per_call"] == 1.0
        alone = engine.generate(job(images=1, seed=72))  # image 2 is image "seed 72" alone
        assert np.asarray(out.images[2]).tobytes() == np.asarray(alone.images[0]).tobytes()
        picky.limit = 0  # not even one image fits
        with pytest.raises(DeviceOutOfMemory, match="out of device memory generating 1 image"):
            runner.generate_shrinking(job(images=1), None, jlog)
    finally:
        engine.pipe = real_pipe
    # Then the job goes to the fallback queue once; already there, it fails (no loop).
    settings = WorkerSettings(_env_file=None, oom_fallback_queue="fleet.balanced")
    assert oom_fallback(settings, "fleet") == "fleet.balanced"
    assert oom_fallback(settings, "fleet.balanced") is None
    assert oom_fallback(WorkerSettings(_env_file=None), "fleet") is None


def test_jobs_with_and_without_a_negative_prompt_share_one_call(engine: Engine) -> None:
    """No negative prompt is the empty one (the contract's default), so a batch may mix both."""
    plain, negative = job(seed=31), job(seed=32, negative_prompt="blurry")
    assert engine.batch_kwargs([plain, negative])["negative_prompt"] == ["", "blurry"]
    mixed = engine.generate_batch([plain, negative])
    assert [len(g.images) for g in mixed] == [1, 1]
    assert all(g.timings["batch_jobs"] == 2 for g in mixed)


def test_an_error_the_job_did_not_cause_is_the_workers_when_the_self_test_fails_too(
    engine: Engine,
) -> None:
    """A ValueError from the pipeline's input checks blames the job; any other error (a CUDA
    error, a ValueError from deep inside a model) is a GenerationError of that job while the
    self-test passes, and PipelineBroken (the worker's) once the self-test fails too."""
    from fleet.errors import GenerationError, JobValidationError, PipelineBroken

    real_pipe = engine.pipe

    cuda = RuntimeError("CUDA error: an illegal memory access was encountered")
    try:
        # Once: the device works again for the self-test.
        engine.pipe = FailingPipe(real_pipe, 1, cuda)
        with pytest.raises(GenerationError, match="not over a field of the job") as once:
            engine.generate(job())
        assert not isinstance(once.value, PipelineBroken)
        # Twice: the self-test fails as well, a broken device.
        engine.pipe = FailingPipe(real_pipe, 2, cuda)
        with pytest.raises(PipelineBroken, match="fails even on its self-test") as broken:
            engine.generate(job())
        assert broken.value.disposition == "worker" and "illegal memory access" in str(broken.value)
        engine.pipe = FailingPipe(real_pipe, 1, ValueError("Sequence length must be less than 77"))
        with pytest.raises(GenerationError) as deep:  # raised outside the input checks
            engine.generate(job())
        assert not isinstance(deep.value, JobValidationError)
    finally:
        engine.pipe = real_pipe
    # The pipeline's own input checks still blame the job, naming what it refused: 66 passes
    # the model's rules (a multiple of the tiny VAE's 2) but not SD's check_inputs (8).
    with pytest.raises(JobValidationError, match="the pipeline refused it"):
        engine.generate(validate_job({"prompt": "a fox", "width": 64, "height": 64, "steps": 3,
                                      "negative_prompt": "x"}).model_copy(
                                          update={"width": 66}))  # fmt: skip


def test_memory_is_released_after_a_soft_time_limit_too(engine: Engine, monkeypatch) -> None:  # type: ignore[no-untyped-def]
    from celery.exceptions import SoftTimeLimitExceeded

    released: list[bool] = []
    monkeypatch.setattr(engine, "release_memory", lambda: released.append(True))
    real_pipe = engine.pipe

    class StoppedPipe:
        scheduler = real_pipe.scheduler

        def __call__(self, **kw):  # type: ignore[no-untyped-def]
            raise SoftTimeLimitExceeded()

    engine.pipe = StoppedPipe()
    try:
        with pytest.raises(SoftTimeLimitExceeded):
            engine.generate(job())
    finally:
        engine.pipe = real_pipe
    assert released == [True]


def test_out_of_host_memory_fails_the_job_alone_saying_what_to_do(engine: Engine) -> None:
    """torch's CPU allocator failing (an address-space limit, RAM refused) or a MemoryError:
    HostOutOfMemory naming the size and what to change while the self-test passes; the worker's
    (PipelineBroken) when the self-test cannot get its memory either."""
    from fleet.errors import DeviceOutOfMemory, GenerationError, HostOutOfMemory, PipelineBroken

    real_pipe = engine.pipe

    # The message torch 2.13 gives under `prlimit --as` (measured on the worker's pool child).
    cpu = RuntimeError("[enforce fail at alloc_cpu.cpp:127] err == 0. DefaultCPUAllocator: can't "
                       "allocate memory: you tried to allocate 16777216 bytes. Error code 12 "
                       "(Cannot allocate memory)")  # fmt: skip
    try:
        for error in (cpu, MemoryError()):
            engine.pipe = FailingPipe(real_pipe, 1, error)
            with pytest.raises(HostOutOfMemory) as starved:
                engine.generate(job(width=96, height=64, images=2))
            message = str(starved.value)
            assert "out of host memory generating 2 image(s) of 96x64" in message
            assert "smaller width/height or fewer images" in message and "more memory" in message
            assert starved.value.disposition == "job"
            assert isinstance(starved.value, GenerationError)
            assert not isinstance(starved.value, DeviceOutOfMemory)  # no device to shrink for
        engine.pipe = FailingPipe(real_pipe, 2, cpu)  # the self-test gets no memory either
        with pytest.raises(PipelineBroken, match="fails even on its self-test"):
            engine.generate(job())
    finally:
        engine.pipe = real_pipe
    assert len(engine.generate(job()).images) == 1  # and the engine goes on


@pytest.mark.parametrize("bad", ["a\x00b", "line\nbreak", "x" * 100_000, 12, None, ["a"]])
def test_an_invalid_job_id_reaches_the_log_quoted_and_bounded(bad: object) -> None:
    from worker.runner import log_id

    shown = log_id(bad)
    assert "\x00" not in shown and "\n" not in shown and len(shown) < 200
    assert log_id("job-42.r1") == "job-42.r1"  # a valid id as it is: greppable
