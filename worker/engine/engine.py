"""Holds the warm pipeline: setup() once per worker process, generate(job) many times."""

from __future__ import annotations

import importlib
import inspect
import logging
import math
import platform
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import torch
from celery.exceptions import SoftTimeLimitExceeded

from fleet.contract import JobSpec, ModelRules
from fleet.errors import (
    DeviceOutOfMemory,
    FleetError,
    GenerationError,
    HostOutOfMemory,
    JobCancelled,
    JobValidationError,
    PipelineBroken,
)
from fleet.settings import WorkerSettings
from worker.engine.placement import Placement
from worker.engine.rules import model_rules
from worker.engine.speed import apply_speed_settings, compiled_graphs

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

#: Where diffusers checks a call's inputs: a ValueError raised there is the job's fault.
_INPUT_CHECKS = ("check_inputs", "__call__")


def raised_by_input_checks(exc: BaseException) -> bool:
    """Whether a ValueError came from a diffusers pipeline's own input checks (``check_inputs``
    or the pipeline's ``__call__``), rather than from deeper inside (a model's forward pass)."""
    import traceback

    frames = list(traceback.walk_tb(exc.__traceback__))
    if not frames:
        return False
    frame = frames[-1][0]  # where it was raised
    module = str(frame.f_globals.get("__name__", ""))
    return frame.f_code.co_name in _INPUT_CHECKS and module.startswith("diffusers.pipelines")


#: What torch's CPU allocator says when malloc/posix_memalign fails (RLIMIT_AS, overcommit
#: refused): "[enforce fail at alloc_cpu.cpp:127] err == 0. DefaultCPUAllocator: can't allocate
#: memory: you tried to allocate N bytes. Error code 12 (Cannot allocate memory)".
_HOST_OOM_MARKERS = ("DefaultCPUAllocator", "can't allocate memory", "Cannot allocate memory")


def out_of_host_memory(exc: BaseException) -> bool:
    """Whether an error says the host could not give memory (not the device): Python's
    MemoryError, or torch's CPU allocator failing (a RuntimeError, or an OutOfMemoryError
    naming the CPU allocator)."""
    if isinstance(exc, MemoryError):
        return True
    return isinstance(exc, RuntimeError) and any(m in str(exc) for m in _HOST_OOM_MARKERS)


def uint8_images(images: Any) -> list[Any]:
    """The pipeline's images as HxWxC uint8 numpy arrays, the pixels diffusers'
    ``numpy_to_pil`` would give (``(x * 255).round()`` in float32): from ``output_type="pt"``
    tensors (BxCxHxW in [0, 1]), converted on their device, so one uint8 copy per call crosses
    to the host; or from numpy arrays or PIL images, for pipelines that give those."""
    import numpy as np

    if isinstance(images, torch.Tensor):
        pixels = images.float().mul(255).round().to(torch.uint8).permute(0, 2, 3, 1)
        host = pixels.cpu().numpy()
        return [host[i] for i in range(host.shape[0])]
    if isinstance(images, np.ndarray):
        batch = images if images.ndim == 4 else images[None, ...]
        host = (batch * 255).round().astype("uint8")
        return [host[i] for i in range(host.shape[0])]
    return [np.asarray(im)[..., None] if im.mode == "L" else np.asarray(im) for im in images]


@dataclass
class Generated:
    """Images of one job (HxWxC uint8 arrays, see uint8_images) with the seeds that made them
    and how long it took."""

    images: list[Any]
    seeds: list[int]
    timings: dict[str, float] = field(default_factory=dict)
    #: The recipes generated in the same pipeline call (job ids and seeds), when batched.
    batch: list[dict[str, Any]] = field(default_factory=list)
    #: Per image, whether the pipeline's safety checker flagged it (and blacked it out); None
    #: when the pipeline has no checker.
    nsfw: list[bool] | None = None


class Engine:
    """The warm pipeline of one worker process (LitServe's setup/predict split)."""

    def __init__(self, settings: WorkerSettings) -> None:
        self.settings = settings
        self.pipe: Any = None
        self.placement: Placement | None = None
        self.load_seconds: float | None = None
        self._lock = threading.Lock()
        #: One pipeline call at a time: a restarted pool child's self-test (warm-up thread) and
        #: its first job (task thread) must not share the pipeline and its scheduler.
        self._calls = threading.RLock()
        self._call_params: set[str] = set()
        self._base_scheduler_config: Any = None
        self.speed: dict[str, Any] = {}
        #: What the loaded model can honour (derived at setup; published in describe()).
        self.rules: ModelRules | None = None
        #: Graphs torch.compile had made after the warm-up (FLEET_COMPILE), and how many jobs'
        #: calls compiled since (shapes FLEET_WARMUP_SHAPES did not cover).
        self._graphs = 0
        self.recompiles = 0

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
            self.rules = model_rules(pipe, SCHEDULER_CLASSES)  # before compile wraps the denoiser
            self.speed = apply_speed_settings(pipe, self.settings, placement.device)
            self._call_params = set(inspect.signature(pipe.__call__).parameters)
            self._base_scheduler_config = pipe.scheduler.config
            self._base_scheduler = pipe.scheduler
            self.placement = placement
            self.pipe = pipe
            if self.settings.compile:
                self._warm_up()
            self.load_seconds = time.perf_counter() - started
            log.info("model ready in %.2f s: %s", self.load_seconds, type(pipe).__name__)

    def _warm_up(self) -> None:
        """Generate once at each FLEET_WARMUP_SHAPES call (else one small one), two steps, so
        torch.compile compiles for them before the first job; records the time and graphs."""
        side = self._probe_side()
        shapes = self.settings.warmup_calls() or [(side, side, 1)]
        # Guidance above 1 (two passes a step with classifier-free guidance), as most jobs ask.
        guidance = 1.0 if self.rules is not None and self.rules.guidance == "none" else 7.5
        started = time.perf_counter()
        for width, height, images in shapes:
            spec = JobSpec(prompt="warm-up", width=width, height=height, steps=2,
                           guidance=guidance, images=images)  # fmt: skip
            t = time.perf_counter()
            self.pipe.scheduler = self.scheduler_for("default")
            with torch.inference_mode():
                self.pipe(**self.batch_kwargs([spec]))
            log.info("warmed up %dx%d, %d image(s) a call, in %.1f s", width, height, images,
                     time.perf_counter() - t)  # fmt: skip
        self.speed["compile_warmup_s"] = round(time.perf_counter() - started, 2)
        self.speed["warmup_shapes"] = [f"{w}x{h}x{n}" for w, h, n in shapes]
        self._graphs = compiled_graphs()
        self.speed["graphs_after_warmup"] = self._graphs
        log.info("compiled and warmed up in %.1f s (%d graphs)",
                 self.speed["compile_warmup_s"], self._graphs)  # fmt: skip

    def _count_compiles(self, specs: list[JobSpec]) -> None:
        """After a call, with FLEET_COMPILE: warn when it compiled (a shape not warmed up)."""
        now = compiled_graphs()
        if now > self._graphs:
            first = specs[0]
            log.warning("job %s compiled %d new graph(s) (%dx%d, %d image(s) a call): add "
                        "%dx%dx%d to FLEET_WARMUP_SHAPES so that no job pays a compile",
                        first.job_id, now - self._graphs, first.width, first.height,
                        first.images * len(specs), first.width, first.height,
                        first.images * len(specs))  # fmt: skip
            self.recompiles += now - self._graphs
            self._graphs = now

    def self_test(self) -> None:
        """Generate one small image with two steps, as a job would; raises when the pipeline or
        its device cannot (parts that do not fit each other, a device in a failed state)."""
        self.setup()
        side = self._probe_side()
        spec = JobSpec(prompt="self-test", width=side, height=side, steps=2, guidance=1.0)
        with self._calls, torch.inference_mode():
            self.pipe.scheduler = self.scheduler_for("default")
            self.pipe(**self.batch_kwargs([spec]))

    def _probe_side(self) -> int:
        """The side of the warm-up and self-test images: small, and one the model takes."""
        side = max(64, 8 * int(getattr(self.pipe, "vae_scale_factor", 8) or 8))
        multiple = math.lcm(8, self.rules.side_multiple if self.rules is not None else 8)
        return -(-side // multiple) * multiple

    def _speed(self) -> dict[str, Any]:
        if not self.settings.compile:
            return dict(self.speed)
        return {**self.speed, "compiles_after_warmup": self.recompiles}

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
            "speed": self._speed(),
            "rules": self.rules.model_dump(mode="json") if self.rules is not None else None,
        }
        if self.placement is not None:
            info.update(self.placement.describe())
            info["dtype"] = self.placement.dtype_name
        if str(info.get("device", "")).startswith("cuda"):
            info["memory_allocated_bytes"] = torch.cuda.memory_allocated()
        return info

    # -- generation ------------------------------------------------------------------------------

    def generate(self, spec: JobSpec, on_step: StepCallback | None = None) -> Generated:
        """Generate the images of one job; image i uses seed ``spec.seeds()[i]``."""
        return self.generate_batch([spec], on_step)[0]

    def generate_batch(
        self, specs: list[JobSpec], on_step: StepCallback | None = None
    ) -> list[Generated]:
        """Generate compatible jobs (same size, steps, guidance, scheduler, images per job) in
        one pipeline call, one generator per image, so each image depends only on its seed."""
        self.setup()
        assert self.placement is not None
        started = time.perf_counter()
        try:
            with self._calls, torch.inference_mode():
                out = self.pipe(**self.batch_kwargs(specs, on_step))
                images = uint8_images(out.images)  # one copy to the host for the whole call
        except (SoftTimeLimitExceeded, JobCancelled):
            self.release_memory()  # the interrupted call's activations stay cached otherwise
            raise  # recorded as a timeout / a cancellation by the caller
        except JobValidationError:
            raise  # refused before the call (a field this worker cannot honour): the job's
        except torch.cuda.OutOfMemoryError as exc:
            self.release_memory()
            if out_of_host_memory(exc):
                raise self._worker_or_job_failure(exc, specs) from exc
            count = sum(s.images for s in specs)
            raise DeviceOutOfMemory(
                f"out of device memory generating {count} image(s) of "
                f"{specs[0].width}x{specs[0].height} in one call: {exc}"
            ) from exc
        except ValueError as exc:
            if not raised_by_input_checks(exc):
                raise self._worker_or_job_failure(exc, specs) from exc
            # The pipeline's own input checks: this model cannot take the job (e.g. a size).
            ids = ", ".join(s.job_id for s in specs)
            raise JobValidationError([("job", ids, f"the pipeline refused it: {exc}")]) from exc
        except Exception as exc:
            raise self._worker_or_job_failure(exc, specs) from exc
        elapsed = time.perf_counter() - started
        if self.settings.compile:
            self._count_compiles(specs)
        per_job = specs[0].images
        total = per_job * len(specs)
        # StableDiffusionSafetyChecker's verdicts, one per image (None without a checker).
        flags = getattr(out, "nsfw_content_detected", None)
        nsfw = [bool(f) for f in flags] if flags is not None else None
        return [
            Generated(
                images=images[i * per_job : (i + 1) * per_job],
                seeds=spec.seeds(),
                timings={
                    "generate_s": elapsed,
                    "per_image_s": elapsed / total,
                    "batch_jobs": float(len(specs)),
                },
                nsfw=nsfw[i * per_job : (i + 1) * per_job] if nsfw is not None else None,
            )
            for i, spec in enumerate(specs)
        ]

    def _worker_or_job_failure(
        self, exc: BaseException, specs: list[JobSpec] | None = None
    ) -> FleetError:
        """An error the job's fields did not cause (a CUDA error, a model whose parts do not
        fit): the worker's, when its self-test fails too (PipelineBroken: the job goes back to
        its queue and this worker stops taking jobs); else this job's alone (GenerationError,
        or HostOutOfMemory when the host could not give the call its memory)."""
        what = f"{type(exc).__name__}: {str(exc)[:500]}"
        host_oom = out_of_host_memory(exc)
        if host_oom:
            import gc

            gc.collect()  # the failed call's tensors, before the self-test asks for memory
        try:
            self.self_test()
        except Exception as again:
            log.error("the pipeline fails its self-test after %s: %s", what, again)
            return PipelineBroken(
                f"the pipeline fails even on its self-test ({type(again).__name__}: "
                f"{str(again)[:300]}) after {what}: restart the worker; if it persists, check "
                "the device (nvidia-smi, the kernel log) and the model's files"
            )
        if host_oom:
            count = sum(s.images for s in specs) if specs else "?"
            size = f"{specs[0].width}x{specs[0].height}" if specs else "this size"
            return HostOutOfMemory(
                f"out of host memory generating {count} image(s) of {size} in one call "
                f"({what}): ask for a smaller width/height or fewer images per prompt, or give "
                "the worker more memory (RAM, its container's memory limit, ulimit -v); the "
                "worker's self-test passes, so other jobs go on"
            )
        return GenerationError(
            f"generation failed inside the pipeline, not over a field of the job ({what}); "
            "the worker's self-test passes, so other jobs go on"
        )

    def release_memory(self) -> None:
        """Give cached GPU memory back after an interrupted generation."""
        if self.placement is not None and self.placement.device.startswith("cuda"):
            torch.cuda.empty_cache()

    def call_kwargs(
        self, spec: JobSpec, seeds: list[int], on_step: StepCallback | None = None
    ) -> dict[str, Any]:
        """The pipeline call for one job (see batch_kwargs)."""
        assert seeds == spec.seeds()
        return self.batch_kwargs([spec], on_step)

    def batch_kwargs(
        self, specs: list[JobSpec], on_step: StepCallback | None = None
    ) -> dict[str, Any]:
        """The pipeline call for compatible jobs, keeping only the arguments this pipeline
        accepts. Images come back job by job (diffusers repeats each prompt's embeddings
        ``num_images_per_prompt`` times), matching the order of the generators.

        A job with a field the model cannot honour (its rules: a scheduler that does not fit a
        flow-matching model, a size it would resize, a negative prompt it would ignore) is
        refused with JobValidationError naming the field, before anything runs."""
        assert self.placement is not None
        if self.rules is not None:
            for spec in specs:
                self.rules.check(spec)
        first = specs[0]
        self.pipe.scheduler = self.scheduler_for(first.scheduler)
        negatives = [s.negative_prompt for s in specs]
        wanted: dict[str, Any] = {
            "prompt": first.prompt if len(specs) == 1 else [s.prompt for s in specs],
            "negative_prompt": (
                (negatives[0] or None)
                if len(specs) == 1
                else (negatives if any(negatives) else None)
            ),
            "width": first.width,
            "height": first.height,
            "num_inference_steps": first.steps,
            "guidance_scale": first.guidance,
            "num_images_per_prompt": first.images,
            # SD3 and Flux: the text tokens of their T5 encoder (the rules say how many).
            "max_sequence_length": self.rules.max_sequence_length if self.rules else None,
            "generator": [
                torch.Generator(self.placement.generator_device(s.generator_device)).manual_seed(
                    seed
                )
                for s in specs
                for seed in s.seeds()
            ],
            # Tensors, turned into uint8 on the device (uint8_images): PIL images would be
            # made here, in the process that launches the kernels, for nothing.
            "output_type": "pt",
        }
        if on_step is not None:
            total = first.steps

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
        """A fresh scheduler per job, so no state leaks from one job into the next. A scheduler
        the model's own does not fit (rules.schedulers) is refused, naming ``scheduler``."""
        if name == "default":
            return type(self._base_scheduler).from_config(self._base_scheduler_config)
        if self.rules is not None and name not in self.rules.schedulers:
            problems = self.rules.problems(JobSpec(prompt="-", scheduler=name))
            raise JobValidationError([p for p in problems if p[0] == "scheduler"])
        class_name, overrides = SCHEDULER_CLASSES[name]
        cls = getattr(importlib.import_module("diffusers"), class_name)
        return cls.from_config(self._base_scheduler_config, **overrides)

    # -- what the text encoders read -------------------------------------------------------------

    @property
    def has_safety_checker(self) -> bool:
        return getattr(self.pipe, "safety_checker", None) is not None

    def prompt_tokens(self, spec: JobSpec) -> dict[str, Any]:
        """How many tokens the prompt (and negative prompt) has for each tokenizer of the
        pipeline, against what its text encoder reads: CLIP reads 77, T5 the
        ``max_sequence_length`` the worker calls with. diffusers cuts the rest off with only a
        log warning, so ``truncated`` says whether any encoder saw less than the whole prompt."""
        self.setup()
        t5_limit = self.rules.max_sequence_length if self.rules else None  # what the call uses
        encoders: dict[str, Any] = {}
        truncated = False
        texts = {"prompt": spec.prompt, "negative_prompt": spec.negative_prompt}
        for name in ("tokenizer", "tokenizer_2", "tokenizer_3"):
            tok = getattr(self.pipe, name, None)
            if tok is None:
                continue
            is_t5 = type(tok).__name__.startswith("T5")
            limit = int(t5_limit or 0) if is_t5 else 0
            limit = limit or int(getattr(tok, "model_max_length", 0) or 0)
            counts = {k: len(tok(v, truncation=False)["input_ids"]) for k, v in texts.items() if v}
            cut = any(n > limit for n in counts.values()) if limit else False
            truncated = truncated or cut
            encoders[name] = {"class": type(tok).__name__, "limit": limit, **counts,
                              "truncated": cut}  # fmt: skip
        return {"truncated": truncated, "tokenizers": encoders}
