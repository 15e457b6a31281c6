"""Holds the warm pipeline: setup() once per worker process, generate(job) many times."""

from __future__ import annotations

import importlib
import inspect
import logging
import platform
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import torch
from celery.exceptions import SoftTimeLimitExceeded

from producer.contract import JobSpec
from producer.errors import GenerationError, JobCancelled, JobValidationError
from worker.placement import Placement
from worker.settings import WorkerSettings

log = logging.getLogger(__name__)

#: Contract scheduler names -> diffusers scheduler classes (with config overrides).
SCHEDULER_CLASSES: dict[str, tuple[str, dict[str, Any]]] = {
    "ddim": ("DDIMScheduler", {}),
    "pndm": ("PNDMScheduler", {}),
    "euler": ("EulerDiscreteScheduler", {}),
    "euler_a": ("EulerAncestralDiscreteScheduler", {}),
    "dpmpp_2m": ("DPMSolverMultistepScheduler", {"algorithm_type": "dpmsolver++"}),
    "lms": ("LMSDiscreteScheduler", {}),
    "heun": ("HeunDiscreteScheduler", {}),
    "unipc": ("UniPCMultistepScheduler", {}),
}

StepCallback = Callable[[int, int], None]


@dataclass
class Generated:
    """Images of one job with the seeds that made them and how long it took."""

    images: list[Any]
    seeds: list[int]
    timings: dict[str, float] = field(default_factory=dict)


class Engine:
    """The warm pipeline of one worker process (LitServe's setup/predict split)."""

    def __init__(self, settings: WorkerSettings) -> None:
        self.settings = settings
        self.pipe: Any = None
        self.placement: Placement | None = None
        self.load_seconds: float | None = None
        self._lock = threading.Lock()
        self._call_params: set[str] = set()
        self._base_scheduler_config: Any = None

    # -- set-up ----------------------------------------------------------------------------------

    def setup(self) -> None:
        """Load the pipeline once (thread-safe: warm-up thread and first job may race)."""
        with self._lock:
            if self.pipe is not None:
                return
            if self.settings.torch_threads:
                torch.set_num_threads(self.settings.torch_threads)
            started = time.perf_counter()
            placement = Placement.from_settings(self.settings)
            log.info(
                "loading model %s on %s (%s)",
                self.settings.model,
                placement.device,
                placement.dtype_name,
            )
            pipe = placement.load(self.settings)
            self._call_params = set(inspect.signature(pipe.__call__).parameters)
            self._base_scheduler_config = pipe.scheduler.config
            self._base_scheduler = pipe.scheduler
            self.placement = placement
            self.load_seconds = time.perf_counter() - started
            self.pipe = pipe
            log.info("model ready in %.2f s: %s", self.load_seconds, type(pipe).__name__)

    def describe(self) -> dict[str, Any]:
        """What this worker is: host, device, dtype, versions (for manifests and status)."""
        import diffusers

        info: dict[str, Any] = {
            "host": platform.node(),
            "node": self.settings.node_label or platform.node(),
            "model": self.settings.model,
            "model_name": self.settings.served_model,
            "revision": self.settings.model_revision,
            "pipeline": type(self.pipe).__name__ if self.pipe is not None else None,
            "torch": torch.__version__,
            "diffusers": diffusers.__version__,
            "python": platform.python_version(),
            "torch_threads": torch.get_num_threads(),
            "load_seconds": self.load_seconds,
        }
        if self.placement is not None:
            info.update(self.placement.describe())
            info["dtype"] = self.placement.dtype_name
        return info

    # -- generation ------------------------------------------------------------------------------

    def generate(self, spec: JobSpec, on_step: StepCallback | None = None) -> Generated:
        """Generate the images of one job; image i uses seed ``spec.seeds()[i]``."""
        self.setup()
        assert self.placement is not None
        seeds = spec.seeds()
        started = time.perf_counter()
        kwargs = self.call_kwargs(spec, seeds, on_step)
        try:
            with torch.inference_mode():
                out = self.pipe(**kwargs)
        except (SoftTimeLimitExceeded, JobCancelled):
            raise  # recorded as a timeout / a cancellation by the caller
        except ValueError as exc:
            # diffusers raises ValueError for inputs this model cannot take (e.g. a size).
            raise JobValidationError(
                [("job", spec.job_id, f"the pipeline refused it: {exc}")]
            ) from exc
        except Exception as exc:
            raise GenerationError(f"generation failed: {type(exc).__name__}: {exc}") from exc
        elapsed = time.perf_counter() - started
        return Generated(
            images=list(out.images),
            seeds=seeds,
            timings={"generate_s": elapsed, "per_image_s": elapsed / len(seeds)},
        )

    def release_memory(self) -> None:
        """Give cached GPU memory back after an interrupted generation."""
        if self.placement is not None and self.placement.device.startswith("cuda"):
            torch.cuda.empty_cache()

    def call_kwargs(
        self, spec: JobSpec, seeds: list[int], on_step: StepCallback | None = None
    ) -> dict[str, Any]:
        """The pipeline call for a job, keeping only the arguments this pipeline accepts."""
        assert self.placement is not None
        self.pipe.scheduler = self.scheduler_for(spec.scheduler)
        gen_device = self.placement.generator_device
        wanted: dict[str, Any] = {
            "prompt": spec.prompt,
            "negative_prompt": spec.negative_prompt or None,
            "width": spec.width,
            "height": spec.height,
            "num_inference_steps": spec.steps,
            "guidance_scale": spec.guidance,
            "num_images_per_prompt": len(seeds),
            "generator": [torch.Generator(gen_device).manual_seed(s) for s in seeds],
            "output_type": "pil",
        }
        if on_step is not None:
            total = spec.steps

            def _callback(pipe: Any, step: int, timestep: Any, kw: dict[str, Any]) -> dict:
                # Some schedulers run more timesteps than steps (PNDM's warm-up): report theirs.
                on_step(step + 1, int(getattr(pipe, "num_timesteps", 0) or total))
                return kw

            wanted["callback_on_step_end"] = _callback
        accepted = self._call_params
        if "kwargs" in accepted:
            accepted = accepted | set(wanted)
        return {k: v for k, v in wanted.items() if k in accepted and v is not None}

    def scheduler_for(self, name: str) -> Any:
        """A fresh scheduler per job, so no state leaks from one job into the next."""
        if name == "default":
            return type(self._base_scheduler).from_config(self._base_scheduler_config)
        class_name, overrides = SCHEDULER_CLASSES[name]
        cls = getattr(importlib.import_module("diffusers"), class_name)
        return cls.from_config(self._base_scheduler_config, **overrides)
