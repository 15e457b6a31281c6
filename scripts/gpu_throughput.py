"""GPU throughput on real-size models (issue 16): the fleet against the bare pipeline, batching,
torch.compile, Flux-size, and how busy NVML says the GPU was.

Run through scripts/gpu-throughput, in two runs of at most five minutes on one H100/H200:
``--models sd15,sdxl`` and ``--models flux``. ``--tiny`` builds small stand-ins with the same
structure (scripts/benchlib/realsize.py) and runs on the CPU when there is no GPU: that is how
CI tests this script. Writes ``gpu-throughput.json`` to --out after every step (what was
measured survives a timeout) and prints a markdown table at the end.

Figures (ratios inside one run, interleaved, same prompts and seeds; the bare loop is the
Engine's own pipeline call with ``output_type="pil"``, so it ends at PIL images):

- fleet_vs_bare: images/s of real `celery worker` processes (Redis -> worker -> PNG -> S3) over
  the pipeline in a loop in this process; per worker kind (threads pool with two jobs in
  flight, prefork with one; FLEET_STORE_PROCESS=child or inline);
- batch_gain_ratio: the batch worker's gain over batch 1 over the bare pipeline's;
- compile_vs_eager: the Engine with FLEET_COMPILE (inductor; FLEET_COMPILE_SCOPE full or
  regional) over the same Engine eager, after its warm-up at the served sizes
  (FLEET_WARMUP_SHAPES), with the recompiles during the timed calls counted;
- flux_bare: Flux-size seconds per image, eager and compiled, beside the published anchors;
- gpu_busy: NVML's GPU utilization at 10 Hz during the bare loop and during the fleet runs.
"""

from __future__ import annotations

import argparse
import contextlib
import gc
import io
import json
import os
import shutil
import signal
import statistics
import sys
import tempfile
import threading
import time
import traceback
from collections import Counter
from collections.abc import Callable, Iterator
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
sys.path.insert(0, str(REPO / "scripts"))

import torch  # noqa: E402
from benchlib import realsize  # noqa: E402
from benchlib.procs import PROMPTS, Worker  # noqa: E402

SCHEMA = 1
JSON_NAME = "gpu-throughput.json"
#: FLUX.1-dev, 1024x1024, 28 steps, one H100 (xDiT's performance page).
FLUX_ANCHORS = {
    "source": "xDiT performance page: FLUX.1-dev, 1024px, 28 steps, one H100",
    "eager_s_per_image": [6.7, 7.1],
    "compiled_s_per_image": 4.3,
}
GOALS = {
    "fleet_vs_bare": (">=", 0.98),
    "batch_gain_ratio": (">=", 0.9),
    "compile_vs_eager": (">=", 1.3),
    "flux_bare": ("reported", None),
    "gpu_busy": ("fleet >= bare -", 0.02),
}
DONE_STATES = ("SUCCESS", "FAILURE", "REVOKED")
SEED0 = 1000

RESULTS: dict[str, Any] = {"schema": SCHEMA, "figures": {}, "phases": {}, "models": {}}
OUT_DIR: Path = REPO / "out" / "gpu-throughput"
#: Models, the services' data and the spools: large, kept out of OUT_DIR (which a device run
#: sends back) and removed at the end unless --work names it.
WORK_DIR: Path = Path(tempfile.gettempdir())


# ============================================================================================
# Recording.


def write_json() -> None:
    OUT_DIR.mkdir(parents=True, exist_ok=True)
    tmp = OUT_DIR / (JSON_NAME + ".tmp")
    tmp.write_text(json.dumps(RESULTS, indent=2, default=str))
    tmp.replace(OUT_DIR / JSON_NAME)


def say(msg: str) -> None:
    print(f"gpu-throughput {time.strftime('%H:%M:%S')} {msg}", flush=True)


def step(name: str) -> Callable[[Callable[..., dict[str, Any]]], Callable[..., None]]:
    """Run a figure, recording its result or its error under figures[name]; one failing
    figure does not stop the others (as scripts/gpu_check.py's steps)."""

    def wrap(fn: Callable[..., dict[str, Any]]) -> Callable[..., None]:
        def run(*a: Any, **kw: Any) -> None:
            started = time.perf_counter()
            op, target = GOALS.get(name, ("reported", None))
            record: dict[str, Any] = {"goal": f"{op} {target}" if target is not None else op}
            try:
                record.update({"ok": True, **(fn(*a, **kw) or {})})
            except Exception as exc:
                record.update(
                    ok=False,
                    error=f"{type(exc).__name__}: {exc}",
                    trace=traceback.format_exc()[-2500:],
                )
            record["seconds"] = round(time.perf_counter() - started, 2)
            RESULTS["figures"][name] = record
            say(f"== {name}: {json.dumps(record, default=str)[:1200]}")
            write_json()

        return run

    return wrap


def record_failure(name: str, exc: BaseException) -> None:
    """A figure that could not run because what it needs failed before it."""
    op, target = GOALS.get(name, ("reported", None))
    RESULTS["figures"][name] = {
        "goal": f"{op} {target}" if target is not None else op,
        "ok": False,
        "error": f"{type(exc).__name__}: {exc}",
        "trace": "".join(traceback.format_exception(exc))[-2500:],
    }
    write_json()


@contextlib.contextmanager
def phase(name: str) -> Iterator[None]:
    started = time.perf_counter()
    try:
        yield
    finally:
        RESULTS["phases"][name] = round(time.perf_counter() - started, 2)
        write_json()


def met(value: float | None, target: float) -> bool | None:
    return None if value is None else bool(value >= target)


class Budget:
    """Device time: repeats are added only while the rest still fits."""

    def __init__(self, seconds: float) -> None:
        self.seconds = seconds
        self.started = time.monotonic()
        self.skipped: list[str] = []

    def elapsed(self) -> float:
        return time.monotonic() - self.started

    def left(self) -> float:
        return self.seconds - self.elapsed()

    def allows(self, need_s: float, what: str) -> bool:
        if self.left() >= need_s:
            return True
        self.skipped.append(f"{what} (needed {need_s:.0f} s, {self.left():.0f} s left)")
        RESULTS["budget"] = self.describe()
        return False

    def describe(self) -> dict[str, Any]:
        return {
            "budget_s": self.seconds,
            "elapsed_s": round(self.elapsed(), 1),
            "skipped": self.skipped,
        }


def sync() -> None:
    if torch.cuda.is_available():
        torch.cuda.synchronize()


def free_memory() -> None:
    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()


# ============================================================================================
# NVML.


class GpuSampler:
    """GPU utilization (nvmlDeviceGetUtilizationRates) sampled at ``hz`` in a thread, and the
    windows (bare loop, fleet run) to average it over. Without NVML (no pynvml, no driver) it
    records nothing and says why in ``reason``."""

    def __init__(self, hz: float = 10.0) -> None:
        self.period = 1.0 / hz
        self.reason: str | None = None
        self.samples: list[tuple[float, float]] = []
        self.windows: list[tuple[str, float, float]] = []
        self.raw: list[tuple[float, float]] = []  # nvmlDeviceGetSamples: (unix s, fraction)
        self.raw_windows: list[tuple[str, float, float]] = []
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self._nvml: Any = None
        self._handle: Any = None
        self._last_raw_us = 0
        try:
            import pynvml  # nvidia-ml-py; optional: its wheel travels in .whl/ (docs/gpu.md)
        except ImportError as exc:
            self.reason = f"pynvml (nvidia-ml-py) not importable: {exc}"
            return
        try:
            pynvml.nvmlInit()
            self._handle = self._device_handle(pynvml)
            self.name = pynvml.nvmlDeviceGetName(self._handle)
        except Exception as exc:
            self.reason = f"NVML unavailable: {type(exc).__name__}: {exc}"
            return
        self._nvml = pynvml

    @staticmethod
    def _device_handle(nvml: Any) -> Any:
        """The GPU this process uses: the first of CUDA_VISIBLE_DEVICES (an index or a UUID);
        NVML's indices are the host's, which CUDA_VISIBLE_DEVICES does not renumber."""
        first = os.environ.get("CUDA_VISIBLE_DEVICES", "0").split(",")[0].strip() or "0"
        if first.isdigit():
            return nvml.nvmlDeviceGetHandleByIndex(int(first))
        return nvml.nvmlDeviceGetHandleByUUID(first)

    @property
    def available(self) -> bool:
        return self._nvml is not None

    def start(self) -> GpuSampler:
        if self.available:
            self._thread = threading.Thread(target=self._run, name="nvml-sampler", daemon=True)
            self._thread.start()
        return self

    def _run(self) -> None:
        nvml = self._nvml
        while not self._stop.wait(self.period):
            try:
                util = nvml.nvmlDeviceGetUtilizationRates(self._handle)
                self.samples.append((time.perf_counter(), util.gpu / 100.0))
            except Exception as exc:  # keep sampling; say what went wrong once
                self.reason = self.reason or f"nvmlDeviceGetUtilizationRates: {exc}"
            self._read_raw()

    def _read_raw(self) -> None:
        """The driver's own utilization samples (finer than the 10 Hz reads), when offered."""
        nvml = self._nvml
        try:
            _kind, samples = nvml.nvmlDeviceGetSamples(
                self._handle, nvml.NVML_GPU_UTILIZATION_SAMPLES, self._last_raw_us
            )
        except Exception:
            return
        for s in samples:
            stamp = int(s.timeStamp)
            if stamp <= self._last_raw_us:
                continue
            self._last_raw_us = stamp
            value = getattr(s.sampleValue, "uiVal", None)
            if value is not None:
                self.raw.append((stamp / 1e6, float(value) / 100.0))

    @contextlib.contextmanager
    def window(self, label: str) -> Iterator[None]:
        t0, u0 = time.perf_counter(), time.time()
        try:
            yield
        finally:
            self.windows.append((label, t0, time.perf_counter()))
            self.raw_windows.append((label, u0, time.time()))

    def stop(self) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join(2)

    def mean(self, label: str) -> dict[str, Any]:
        """Mean utilization over the windows named ``label``."""
        if not self.available:
            return {"value": None, "reason": self.reason}
        wins = [(a, b) for name, a, b in self.windows if name == label]
        vals = [u for t, u in self.samples if any(a <= t <= b for a, b in wins)]
        raw_wins = [(a, b) for name, a, b in self.raw_windows if name == label]
        raw = [u for t, u in self.raw if any(a <= t <= b for a, b in raw_wins)]
        return {
            "value": round(statistics.fmean(vals), 4) if vals else None,
            "samples": len(vals),
            "driver_samples_mean": round(statistics.fmean(raw), 4) if raw else None,
            "driver_samples": len(raw),
        }


# ============================================================================================
# Plans and jobs.


@dataclass(frozen=True)
class Plan:
    """Sizes and repeats of one run (real or tiny)."""

    side: int = 512
    steps: int = 30
    images: int = 6  # per block: bare or fleet, batch 1
    rounds: int = 2  # interleaved rounds of fleet_vs_bare and batch_gain_ratio
    batch: int = 4
    batch_jobs: int = 12  # per block of the batch figure (3 calls of 4)
    sd15_served: str = "512x512x1,512x512x4"
    sdxl_side: int = 1024
    sdxl_steps: int = 30
    sdxl_served: str = "1024x1024x1"
    flux_side: int = 1024
    flux_steps: int = 28
    flux_tokens: int = realsize.FLUX_T5_TOKENS
    compile_repeats: int = 2
    start_timeout_s: float = 300.0


REAL = Plan()
TINY = Plan(
    side=64,
    steps=4,
    images=4,
    rounds=2,
    batch=4,
    batch_jobs=8,
    sd15_served="64x64x1,64x64x2",
    sdxl_side=64,
    sdxl_steps=3,
    sdxl_served="64x64x1",
    flux_side=64,
    flux_steps=3,
    flux_tokens=realsize.TINY_T5_TOKENS,
    compile_repeats=2,
    start_timeout_s=240.0,
)


def parse_shapes(text: str) -> list[tuple[int, int, int]]:
    """``512x512x1,512x512x4`` -> [(width, height, images per call), ...]."""
    shapes = []
    for item in text.split(","):
        w, h, n = (int(x) for x in item.strip().lower().split("x"))
        shapes.append((w, h, n))
    return shapes


def job_specs(n: int, side: int, steps: int, offset: int, images: int = 1) -> list[Any]:
    """Jobs ``offset``.. ``offset + n``: the same prompt and seed for the same index on every
    side of a ratio."""
    from benchlib.procs import make_spec

    return [make_spec(i, side, steps, SEED0 + i, images=images) for i in range(offset, offset + n)]


def rate(images: int, seconds: float) -> float:
    return images / seconds if seconds > 0 else 0.0


# ============================================================================================
# The bare pipeline.


def bare_block(engine: Any, specs: list[Any], per_call: int = 1) -> dict[str, Any]:
    """The pipeline in a loop in this process, ``per_call`` jobs a call, ending at PIL images:
    the Engine's own call (its scheduler, generators and seeds) with ``output_type="pil"``."""
    sync()
    started = time.perf_counter()
    ends: list[float] = []
    for i in range(0, len(specs), per_call):
        kwargs = engine.batch_kwargs(specs[i : i + per_call])
        kwargs["output_type"] = "pil"
        with torch.inference_mode():
            engine.pipe(**kwargs)
        sync()
        ends.append(time.perf_counter())
    return block_rates(sum(s.images for s in specs), started, ends)


def block_rates(images: int, started: float, ends: list[float]) -> dict[str, Any]:
    """A block's images/s over its wall time, and in steady state: the images finished after
    the first result over the time from the first to the last (no pipeline fill or drain, so
    a short block does not count a fleet's first-job latency and last upload as throughput)."""
    ends = sorted(ends)
    seconds = ends[-1] - started
    per_end = images / len(ends)
    span = ends[-1] - ends[0]
    steady = rate(round(per_end * (len(ends) - 1)), span) if len(ends) > 1 else None
    return {
        "images": images,
        "seconds": round(seconds, 4),
        "images_per_s": rate(images, seconds),
        "steady_seconds": round(span, 4),
        "steady_images": round(per_end * (len(ends) - 1)),
        "steady_images_per_s": steady,
    }


def call_pipe(
    pipe: Any,
    shape: tuple[int, int, int],
    steps: int,
    guidance: float,
    seed: int,
    output_type: str = "pil",
    **extra: Any,
) -> Any:
    """One pipeline call of ``shape`` (width, height, images): one prompt and one seed an
    image, as the worker calls it."""
    w, h, n = shape
    gens = [torch.Generator("cpu").manual_seed(seed + i) for i in range(n)]
    with torch.inference_mode():
        out = pipe(
            prompt=[PROMPTS[i % len(PROMPTS)] for i in range(n)],
            width=w,
            height=h,
            num_inference_steps=steps,
            guidance_scale=guidance,
            generator=gens,
            output_type=output_type,
            **extra,
        )
    sync()
    return out.images


# ============================================================================================
# The fleet.


@dataclass
class Variant:
    """One worker kind: pool, jobs in flight, where the storing happens, batch size."""

    name: str
    pool: str
    concurrency: int
    store: str
    batch: int = 1
    queue: str = ""
    worker: Any = field(default=None, repr=False)
    client: Any = field(default=None, repr=False)
    error: str | None = None
    blocks: list[dict[str, Any]] = field(default_factory=list)
    job_ids: list[str] = field(default_factory=list)
    warm_ids: list[str] = field(default_factory=list)

    def env(self) -> dict[str, str]:
        return {
            "FLEET_STORE_PROCESS": self.store,
            "FLEET_BATCH_SIZE": str(self.batch),
            "FLEET_QUEUE": self.queue,
        }


def store_process_supported() -> bool:
    from fleet.settings import WorkerSettings

    return "store_process" in WorkerSettings.model_fields


def warmup_shapes_supported() -> bool:
    from fleet.settings import WorkerSettings

    return "warmup_shapes" in WorkerSettings.model_fields


def parse_variants(text: str, batch: int) -> tuple[list[Variant], list[Variant], dict[str, str]]:
    """``threads:child,threads:inline,prefork:inline`` -> the batch-1 variants, the batch
    variant (threads, 2 x batch in flight, the first store process asked for that the worker
    takes) and the variants left out with the reason (FLEET_STORE_PROCESS unknown to
    WorkerSettings: it would be ignored, as every unknown FLEET_* variable is)."""
    supported = store_process_supported()
    kept: list[Variant] = []
    left_out: dict[str, str] = {}
    for item in text.split(","):
        pool, _, store = item.strip().partition(":")
        store = store or "inline"
        name = f"{pool}-{store}"
        if pool not in ("threads", "prefork") or store not in ("child", "inline"):
            raise SystemExit(
                f"--variants: {item!r} is not POOL:STORE (threads|prefork:child|inline)"
            )
        if store == "child" and not supported:
            left_out[name] = (
                "FLEET_STORE_PROCESS is not a WorkerSettings field yet (the worker "
                "would ignore it and store inline)"
            )
            continue
        kept.append(Variant(name, pool, 2 if pool == "threads" else 1, store, queue=f"tp.{name}"))
    stores = [v.store for v in kept if v.pool == "threads"] or ["inline"]
    bname = f"batch{batch}-threads-{stores[0]}"
    batch_variant = Variant(bname, "threads", 2 * batch, stores[0], batch, queue=f"tp.{bname}")
    return kept, [batch_variant], left_out


def worker_env(ep: Any, model_dir: Path, v: Variant) -> dict[str, str]:
    """The worker's environment: the services, the model, the variant's FLEET_* settings, and
    CUDA_VISIBLE_DEVICES as given (GPU 0 if unset). Nothing compiles in a fleet worker here, so
    FLEET_WARMUP_SHAPES has nothing to do and is not set."""
    env = {k: val for k, val in os.environ.items() if not k.startswith("FLEET_")}
    env.update(ep.env())
    env.update(
        FLEET_MODEL=str(model_dir),
        FLEET_MODEL_NAME="sd15",
        FLEET_LOCAL_FILES_ONLY="true",
        FLEET_SPOOL_DIR=str(WORK_DIR / f"spool-{v.name}"),
        HF_HUB_OFFLINE="1",
        PYTHONUNBUFFERED="1",
        **v.env(),
    )
    env["PYTHONPATH"] = os.pathsep.join(p for p in (env.get("PYTHONPATH"), str(REPO)) if p)
    if torch.cuda.is_available():
        env["CUDA_VISIBLE_DEVICES"] = os.environ.get("CUDA_VISIBLE_DEVICES", "0")
    return env


def make_client(ep: Any, queue: str) -> Any:
    from fleet.settings import ProducerSettings
    from producer.client import Client

    kw = {k.removeprefix("FLEET_").lower(): v for k, v in ep.env().items()}
    return Client(ProducerSettings(_env_file=None, **{**kw, "queue": queue}))


def wait_done(v: Variant, ids: list[str], timeout: float) -> dict[str, float]:
    """Poll the Celery result keys of ``ids`` (one MGET every 10 ms) until every job ended;
    returns when each was first seen ended. A dead worker fails at once."""
    backend = v.client.celery.backend
    keys = {i: backend.get_key_for_task(i) for i in ids}
    done: dict[str, float] = {}
    states: dict[str, str] = {}
    deadline = time.perf_counter() + timeout
    while len(done) < len(ids):
        pending = [i for i in ids if i not in done]
        values = v.client.redis.mget([keys[i] for i in pending])
        now = time.perf_counter()
        for job_id, raw in zip(pending, values, strict=True):
            if raw is None:
                continue
            status = json.loads(raw).get("status")
            if status in DONE_STATES:
                done[job_id], states[job_id] = now, status
        if len(done) < len(ids):
            if v.worker is not None and not v.worker.alive():
                raise RuntimeError(f"worker {v.name} exited:\n{v.worker.tail()}")
            if now > deadline:
                raise TimeoutError(
                    f"{len(ids) - len(done)} job(s) of {v.name} not done in "
                    f"{timeout:.0f} s:\n{v.worker.tail() if v.worker else ''}"
                )
            time.sleep(0.01)
    failed = {i: s for i, s in states.items() if s != "SUCCESS"}
    if failed:
        raise RuntimeError(
            f"{len(failed)} job(s) of {v.name} ended {sorted(set(failed.values()))}"
            f":\n{v.worker.tail() if v.worker else ''}"
        )
    return done


def fleet_block(v: Variant, specs: list[Any], timeout: float) -> dict[str, Any]:
    """Submit ``specs`` to the variant's queue at once; seconds until the last one succeeded
    (its images and manifest in S3: the worker returns only after storing)."""
    started = time.perf_counter()
    handles = v.client.submit_many(specs)
    ids = [h.job_id for h in handles]
    done = wait_done(v, ids, timeout)
    v.job_ids += ids
    block = {
        **block_rates(sum(s.images for s in specs), started, list(done.values())),
        "job_ids": ids,
    }
    v.blocks.append(block)
    return block


def start_variants(variants: list[Variant], ep: Any, model_dir: Path, run_dir: Path) -> None:
    """Start every worker at once, each on its own queue (warm_variants waits for them)."""
    for v in variants:
        v.worker = Worker(
            v.name,
            v.queue,
            worker_env(ep, model_dir, v),
            run_dir,
            pool=v.pool,
            concurrency=v.concurrency,
        ).start()
        v.client = make_client(ep, v.queue)


def warm_variants(variants: list[Variant], plan: Plan) -> None:
    """One job each (waits for the model load and the gate), all at once."""
    pending: list[tuple[Variant, list[str]]] = []
    for v in variants:
        try:
            specs = job_specs(1, plan.side, plan.steps, offset=10_000)
            ids = [h.job_id for h in v.client.submit_many(specs)]
            v.warm_ids += ids
            pending.append((v, ids))
        except Exception as exc:
            v.error = f"warm-up submit: {type(exc).__name__}: {exc}"
    for v, ids in pending:
        try:
            wait_done(v, ids, plan.start_timeout_s)
        except Exception as exc:
            v.error = f"warm-up: {type(exc).__name__}: {exc}"[:3000]


def stored_manifests(v: Variant) -> int:
    """How many of the variant's measured jobs have a manifest in S3."""
    from fleet import contract

    store = v.client.store
    return sum(
        store.exists(contract.manifest_key(i, v.client.settings.s3_prefix)) for i in v.job_ids
    )


def stored_images(v: Variant, ids: list[str]) -> dict[str, Any]:
    """PNG bytes per image, whether the stored images are usable (finite, not constant), the
    per-job timings and batch sizes, from the manifests and images of ``ids`` in S3."""
    from PIL import Image

    from fleet import contract

    store = v.client.store
    sizes: list[int] = []
    images: list[Any] = []
    timings: dict[str, list[float]] = {}
    batch_jobs: list[int] = []
    worker: dict[str, Any] = {}
    for job_id in ids:
        manifest = store.get_json(contract.manifest_key(job_id, v.client.settings.s3_prefix))
        if not manifest:
            continue
        worker = manifest.get("worker") or {}
        batch_jobs.append(int((worker.get("batch") or {}).get("jobs") or 1))
        for key, value in (manifest.get("timings") or {}).items():
            if isinstance(value, int | float):
                timings.setdefault(key, []).append(float(value))
        for record in manifest.get("images") or []:
            data = store.get_bytes(record["key"])
            if data:
                sizes.append(len(data))
                images.append(Image.open(io.BytesIO(data)).convert("RGB"))
    check = realsize.finite(images) if images else {"finite": None, "not_constant": None}
    return {
        "png_bytes_per_image": round(statistics.fmean(sizes)) if sizes else None,
        "images_checked": len(images),
        "images_finite": check["finite"],
        "images_not_constant": check["not_constant"],
        "pixel_std": check.get("std"),
        "timings_mean_s": {k: round(statistics.fmean(x), 4) for k, x in timings.items()},
        "batch_jobs_seen": dict(Counter(batch_jobs)),
        "worker_device": worker.get("device"),
        "worker_dtype": worker.get("dtype"),
        "worker_gpu": worker.get("gpu_name"),
        "worker_store_process": worker.get("store_process"),
    }


def pooled(blocks: list[dict[str, Any]], steady: bool = False) -> float:
    """Images/s of several blocks together: wall time, or steady state (``block_rates``)."""
    if steady:
        return rate(
            sum(b["steady_images"] for b in blocks), sum(b["steady_seconds"] for b in blocks)
        )
    return rate(sum(b["images"] for b in blocks), sum(b["seconds"] for b in blocks))


# ============================================================================================
# Figures 1, 2 and 5: the SD1.5-size fleet.


@dataclass
class FleetRun:
    """What the fleet rounds measured, for the figures computed from them."""

    variants: list[Variant]
    batch_variants: list[Variant]
    left_out: dict[str, str]
    pairs: list[dict[str, Any]] = field(default_factory=list)  # bare block, then fleet block
    batch_pairs: list[dict[str, Any]] = field(default_factory=list)
    rounds_done: int = 0
    batch_rounds_done: int = 0
    start_s: float = 0.0
    stored: dict[str, int] = field(default_factory=dict)
    images: dict[str, dict[str, Any]] = field(default_factory=dict)


def interleaved_rounds(
    variants: list[Variant],
    engine: Any,
    plan: Plan,
    budget: Budget,
    reserve_s: float,
    sampler: GpuSampler,
    *,
    figure: str,
    jobs: int,
    offset: int,
    per_call: int = 1,
    kind: str = "",
) -> tuple[list[dict[str, Any]], int]:
    """Interleaved rounds on the same jobs: bare, fleet A, bare, fleet B, ... (``jobs`` jobs a
    block, the bare loop at ``per_call`` jobs a call); a round after the first only while the
    budget keeps ``reserve_s`` for what follows. A variant that fails is left out of the rounds
    after, with its error. Returns the (bare, fleet) pairs and the rounds done."""
    pairs: list[dict[str, Any]] = []
    done = 0
    last_round_s = 0.0
    for r in range(plan.rounds):
        if r and not budget.allows(last_round_s + reserve_s, f"{figure} round {r + 1}"):
            break
        began = time.perf_counter()
        for v in variants:
            if v.error is not None:
                continue
            specs = job_specs(jobs, plan.side, plan.steps, offset)
            offset += jobs
            with sampler.window(f"bare{kind}"):
                bare = bare_block(engine, specs, per_call=per_call)
            try:
                with sampler.window(f"fleet{kind}:{v.name}"):
                    fleet = fleet_block(v, specs, timeout=120 + 30 * jobs)
            except Exception as exc:
                v.error = f"round {r + 1}: {type(exc).__name__}: {exc}"[:3000]
                continue
            pair = {
                "round": r + 1,
                "variant": v.name,
                "bare": bare,
                "fleet": {k: x for k, x in fleet.items() if k != "job_ids"},
            }
            pairs.append(pair)
            say(
                f"{figure} round {r + 1} {v.name}: steady bare {pooled([bare], True):.3f} img/s, "
                f"fleet {pooled([fleet], True):.3f} img/s (wall {bare['images_per_s']:.3f}, "
                f"{fleet['images_per_s']:.3f})"
            )
        done = r + 1
        last_round_s = time.perf_counter() - began
    return pairs, done


def fleet_rounds(
    run: FleetRun, engine: Any, plan: Plan, budget: Budget, reserve_s: float, sampler: GpuSampler
) -> None:
    """The batch-1 workers against the bare loop, one job a call."""
    pairs, run.rounds_done = interleaved_rounds(
        run.variants, engine, plan, budget, reserve_s, sampler,
        figure="fleet_vs_bare", jobs=plan.images, offset=0,
    )  # fmt: skip
    for p in pairs:
        p["ratio"] = round(pooled([p["fleet"]], True) / pooled([p["bare"]], True), 4)
        p["wall_ratio"] = round(p["fleet"]["images_per_s"] / p["bare"]["images_per_s"], 4)
    run.pairs.extend(pairs)


def batch_rounds(
    run: FleetRun, engine: Any, plan: Plan, budget: Budget, reserve_s: float, sampler: GpuSampler
) -> None:
    """The bare loop at ``batch`` prompts a call, then the batch worker with 2 x batch jobs in
    flight (the same jobs)."""
    pairs, run.batch_rounds_done = interleaved_rounds(
        run.batch_variants, engine, plan, budget, reserve_s, sampler,
        figure="batch_gain_ratio", jobs=plan.batch_jobs, offset=50_000, per_call=plan.batch,
        kind="-batch",
    )  # fmt: skip
    run.batch_pairs.extend(pairs)


@step("fleet_vs_bare")
def fleet_vs_bare(run: FleetRun, plan: Plan) -> dict[str, Any]:
    by_variant: dict[str, Any] = {}
    for v in run.variants:
        pairs = [p for p in run.pairs if p["variant"] == v.name]
        entry: dict[str, Any] = {
            "pool": v.pool,
            "concurrency": v.concurrency,
            "store_process": v.store,
            "error": v.error,
            "jobs_sent": len(v.job_ids),
            "manifests_found": run.stored.get(v.name),
        }
        if pairs:
            bare = pooled([p["bare"] for p in pairs], steady=True)
            fleet = pooled([p["fleet"] for p in pairs], steady=True)
            bare_wall = pooled([p["bare"] for p in pairs])
            fleet_wall = pooled([p["fleet"] for p in pairs])
            entry.update(
                ratio=round(fleet / bare, 4),
                fleet_images_per_s=round(fleet, 4),
                bare_images_per_s=round(bare, 4),
                pair_ratios=[p["ratio"] for p in pairs],
                wall_ratio=round(fleet_wall / bare_wall, 4),
                fleet_wall_images_per_s=round(fleet_wall, 4),
                bare_wall_images_per_s=round(bare_wall, 4),
            )
        entry.update(run.images.get(v.name, {}))
        by_variant[v.name] = entry
    measured = {k: e["ratio"] for k, e in by_variant.items() if "ratio" in e}
    if not measured:
        errors = {k: e["error"] for k, e in by_variant.items()}
        raise RuntimeError(f"no fleet variant was measured: {errors}")
    best = max(measured, key=lambda k: measured[k])
    broken = {k: e["error"] for k, e in by_variant.items() if e["error"]}
    if broken:
        raise RuntimeError(f"fleet variant(s) failed: {broken}; measured: {measured}")
    return {
        "value": measured[best],
        "best_variant": best,
        "met": met(measured[best], 0.98),
        "measure": "steady-state images/s (first to last result of a block), fleet over bare; "
        "wall_ratio: over each block's whole time",
        "variants": by_variant,
        "variants_left_out": run.left_out,
        "rounds": run.rounds_done,
        "images_per_block": plan.images,
        "size": plan.side,
        "steps": plan.steps,
        "jobs_sent": sum(len(v.job_ids) for v in run.variants),
        "manifests_found": sum(run.stored.get(v.name, 0) for v in run.variants),
        "workers_start_s": round(run.start_s, 2),
    }


@step("batch_gain_ratio")
def batch_gain_ratio(run: FleetRun, plan: Plan) -> dict[str, Any]:
    v = run.batch_variants[0]
    if v.error:
        raise RuntimeError(f"batch worker {v.name}: {v.error}")
    pairs = [p for p in run.batch_pairs if p["variant"] == v.name]
    if not pairs:
        raise RuntimeError(f"batch worker {v.name} was not measured")
    # Batch 1 on each side: the threads worker with the same store process, and the bare loop.
    ref = next((x for x in run.variants if x.pool == "threads" and x.store == v.store), None)
    ref_pairs = [p for p in run.pairs if ref is not None and p["variant"] == ref.name]
    if not ref_pairs:
        raise RuntimeError(f"no batch-1 threads worker storing {v.store} was measured")
    fleet_b1 = pooled([p["fleet"] for p in ref_pairs])
    bare_b1 = pooled([p["bare"] for p in ref_pairs])
    fleet_bn = pooled([p["fleet"] for p in pairs])
    bare_bn = pooled([p["bare"] for p in pairs])
    fleet_gain, bare_gain = fleet_bn / fleet_b1, bare_bn / bare_b1
    value = round(fleet_gain / bare_gain, 4)
    return {
        "value": value,
        "met": met(value, 0.9),
        "batch": plan.batch,
        "jobs_in_flight": v.concurrency,
        "variant": v.name,
        "batch1_variant": ref.name if ref is not None else None,
        "fleet_gain": round(fleet_gain, 4),
        "bare_gain": round(bare_gain, 4),
        "fleet_images_per_s": {
            "batch1": round(fleet_b1, 4),
            f"batch{plan.batch}": round(fleet_bn, 4),
        },
        "bare_images_per_s": {"batch1": round(bare_b1, 4), f"batch{plan.batch}": round(bare_bn, 4)},
        "bare_batch": f"{plan.batch} prompts a call (as the batch worker calls)",
        "rounds": run.batch_rounds_done,
        "jobs_sent": len(v.job_ids),
        "manifests_found": run.stored.get(v.name),
        **run.images.get(v.name, {}),
    }


@step("gpu_busy")
def gpu_busy(run: FleetRun, sampler: GpuSampler) -> dict[str, Any]:
    bare = sampler.mean("bare")
    if bare["value"] is None and not sampler.available:
        return {"value": None, "reason": sampler.reason, "met": None}
    fleets = {v.name: sampler.mean(f"fleet:{v.name}") for v in run.variants}
    measured = {k: f["value"] for k, f in fleets.items() if f["value"] is not None}
    if bare["value"] is None or not measured:
        return {
            "value": None,
            "reason": sampler.reason or "no samples in the windows",
            "bare": bare,
            "fleet": fleets,
            "met": None,
        }
    best = max(measured, key=lambda k: measured[k])
    return {
        "value": round(measured[best] - bare["value"], 4),
        "meaning": "fleet busy fraction minus bare busy fraction (best worker kind)",
        "bare": bare,
        "fleet": fleets,
        "best_variant": best,
        "batch": {
            "bare": sampler.mean("bare-batch"),
            "fleet": {v.name: sampler.mean(f"fleet-batch:{v.name}") for v in run.batch_variants},
        },
        "met": bool(measured[best] >= bare["value"] - 0.02),
        "hz": round(1 / sampler.period, 1),
    }


def sd15_fleet(
    model_dir: Path,
    plan: Plan,
    args: argparse.Namespace,
    budget: Budget,
    sampler: GpuSampler,
    reserve_s: float,
) -> None:
    """Services, workers and the bare engine; the rounds; the three figures."""
    from fleet.localdev import local_services
    from fleet.settings import WorkerSettings
    from worker.engine.engine import Engine

    variants, batch_variants, left_out = parse_variants(args.variants, plan.batch)
    run = FleetRun(variants, batch_variants, left_out)
    everyone = variants + batch_variants
    run_dir = OUT_DIR / "logs"  # the workers' logs come back with the JSON
    run_dir.mkdir(parents=True, exist_ok=True)
    with contextlib.ExitStack() as stack, phase("sd15_fleet"):
        ep = stack.enter_context(local_services(workdir=WORK_DIR / "services"))
        began = time.perf_counter()
        with phase("workers_start"):
            start_variants(everyone, ep, model_dir, run_dir)
            stack.callback(stop_variants, everyone)
            with phase("bare_engine_load"):
                engine = Engine(
                    WorkerSettings(
                        _env_file=None,
                        model=str(model_dir),
                        model_name="sd15",
                        local_files_only=True,
                    )
                )
                engine.setup()
                bare_block(engine, job_specs(1, plan.side, plan.steps, offset=20_000))
            warm_variants(everyone, plan)
        run.start_s = time.perf_counter() - began
        RESULTS["models"]["sd15"]["bare_engine"] = {
            k: engine.describe().get(k) for k in ("device", "dtype", "gpu_name", "speed")
        }
        with phase("fleet_rounds"):
            fleet_rounds(run, engine, plan, budget, reserve_s, sampler)
        with phase("batch_rounds"):
            batch_rounds(run, engine, plan, budget, reserve_s, sampler)
        with phase("storage_check"):
            for v in everyone:
                if v.client is None:
                    continue
                with contextlib.suppress(Exception):
                    run.stored[v.name] = stored_manifests(v)
                last = v.blocks[-1]["job_ids"] if v.blocks else []
                try:
                    run.images[v.name] = stored_images(v, last)
                except Exception as exc:
                    run.images[v.name] = {"stored_images_error": f"{type(exc).__name__}: {exc}"}
        del engine
        free_memory()
    fleet_vs_bare(run, plan)
    batch_gain_ratio(run, plan)
    gpu_busy(run, sampler)


def stop_variants(variants: list[Variant]) -> None:
    for v in variants:
        if v.worker is not None and v.worker.proc is not None and v.worker.alive():
            with contextlib.suppress(ProcessLookupError, PermissionError):
                os.killpg(v.worker.proc.pid, signal.SIGTERM)  # all at once: each takes seconds
    for v in variants:
        if v.worker is not None:
            v.worker.stop(timeout=15)
        if v.client is not None:
            with contextlib.suppress(Exception):
                v.client.close()


# ============================================================================================
# Figures 3 and 4: torch.compile, through the worker's Engine (FLEET_COMPILE and its settings).


def dynamo_counts() -> dict[str, int]:
    from torch._dynamo.utils import counters

    return {
        f"{group}.{key}": int(n)
        for group, table in counters.items()
        for key, n in table.items()
        if isinstance(n, int)
    }


def counts_delta(before: dict[str, int], after: dict[str, int]) -> dict[str, int]:
    return {k: n - before.get(k, 0) for k, n in after.items() if n != before.get(k, 0)}


def timed(fn: Callable[[], Any]) -> float:
    sync()
    t = time.perf_counter()
    fn()
    sync()
    return time.perf_counter() - t


def timed_generate(engine: Any, spec: Any) -> float:
    return timed(lambda: engine.generate(spec))


@contextlib.contextmanager
def given_pipeline(pipe: Any) -> Iterator[None]:
    """Engine.setup over a pipeline built in memory: Placement.load places ``pipe`` instead of
    reading a folder, and everything else of the set-up (speed settings, FLEET_COMPILE, the
    warm-up at FLEET_WARMUP_SHAPES, the compile count) is the worker's own. Real sizes are thus
    never written to disk and read back (SDXL-size: 7 GB, Flux-size: 34 GB)."""
    from unittest import mock

    from worker.engine.placement import Placement

    def load(self: Any, settings: Any) -> Any:
        self.place(pipe)
        pipe.set_progress_bar_config(disable=True)
        return pipe

    with mock.patch.object(Placement, "load", load):
        yield


def compile_settings(
    model: str, name: str, dtype: str, scope: str, served: str, args: argparse.Namespace
) -> Any:
    """The WorkerSettings of a worker with FLEET_COMPILE=true serving ``served``."""
    from fleet.settings import WorkerSettings

    fields = WorkerSettings.model_fields
    wanted: dict[str, Any] = {
        "compile": True,
        "compile_backend": args.compile_backend,
        "compile_scope": scope,
        "compile_mode": args.compile_mode,
        "warmup_shapes": served,
    }
    missing = [k for k, v in wanted.items() if k not in fields and v not in (None, "full")]
    if missing:
        raise RuntimeError(f"this worker has no FLEET_{'/FLEET_'.join(missing).upper()} setting")
    known = {k: v for k, v in wanted.items() if k in fields}
    return WorkerSettings(
        _env_file=None, model=model, model_name=name, local_files_only=True, dtype=dtype, **known
    )


def shape_spec(shape: tuple[int, int, int], steps: int, guidance: float, seed: int) -> Any:
    from fleet.contract import JobSpec

    w, h, n = shape
    return JobSpec(
        prompt=PROMPTS[0], width=w, height=h, steps=steps, guidance=guidance, seed=seed, images=n
    )


def compile_rounds(
    engine: Any,
    shapes: list[tuple[int, int, int]],
    steps: int,
    guidance: float,
    repeats: int,
    budget: Budget,
    reserve_s: float,
    label: str,
    sampler: GpuSampler,
) -> dict[str, Any]:
    """Set the compiling Engine up (compile, then its warm-up at every served shape), then
    interleaved rounds at every shape: eager (torch.compiler.set_stance("force_eager"): the
    same modules, not compiled) and compiled. Dynamo's counters and the Engine's own count
    say whether any timed call compiled again."""
    before = dynamo_counts()
    setup_s = timed(engine.setup)
    after_setup = dynamo_counts()
    with torch.compiler.set_stance("force_eager"):
        for shape in shapes:  # the eager side's own warm-up (allocator, cuDNN), two steps
            engine.generate(shape_spec(shape, 2, guidance, SEED0))
    eager: dict[str, list[float]] = {}
    compiled: dict[str, list[float]] = {}
    last_s = 0.0
    for r in range(repeats):
        if r and not budget.allows(last_s + reserve_s, f"{label} compile round {r + 1}"):
            break
        began = time.perf_counter()
        for shape in shapes:
            key = "x".join(map(str, shape))
            spec = shape_spec(shape, steps, guidance, SEED0 + r)
            with torch.compiler.set_stance("force_eager"), sampler.window(f"{label}-eager"):
                eager.setdefault(key, []).append(timed_generate(engine, spec))
            with sampler.window(f"{label}-compiled"):
                compiled.setdefault(key, []).append(timed_generate(engine, spec))
        last_s = time.perf_counter() - began
    delta = counts_delta(after_setup, dynamo_counts())
    per_shape = {}
    for key, times in eager.items():
        e, c, n = statistics.median(times), statistics.median(compiled[key]), shape_images(key)
        per_shape[key] = {
            "eager_s": round(e, 4),
            "compiled_s": round(c, 4),
            "speedup": round(e / c, 4),
            "eager_s_per_image": round(e / n, 4),
            "compiled_s_per_image": round(c / n, 4),
            "repeats": len(times),
        }
    speed = dict(engine.speed)
    first = next(iter(per_shape))
    return {
        "speedup": per_shape[first]["speedup"],
        "speedup_shape": first,
        "per_shape": per_shape,
        "engine_speed": speed,
        "compile_backend": speed.get("compile"),
        "compile_scope": speed.get("compile_scope", "full"),
        "compile_mode": speed.get("compile_mode") or "default",
        "setup_s": round(setup_s, 2),
        "warmup_s": speed.get("compile_warmup_s"),
        "graphs_compiled_in_setup": counts_delta(before, after_setup).get("stats.unique_graphs"),
        "recompiles_after_warmup": delta.get("stats.unique_graphs", 0),
        "engine_compiles_after_warmup": getattr(engine, "recompiles", None),
        "frames_after_warmup": delta.get("frames.total", 0),
        "dynamo_counters_after_warmup": delta,
    }


def shape_images(key: str) -> int:
    return int(key.split("x")[2])


def compile_scopes(text: str) -> dict[str, str]:
    """``sd15=full,sdxl=regional`` -> {"sd15": "full", "sdxl": "regional"}."""
    out = {}
    for item in text.split(","):
        model, _, scope = item.strip().partition("=")
        if scope not in ("full", "regional"):
            raise SystemExit(f"--compile: {item!r} is not MODEL=full|regional")
        out[model] = scope
    return out


def compile_model(
    name: str,
    source: Path | Any,
    dtype: str,
    plan: Plan,
    args: argparse.Namespace,
    budget: Budget,
    reserve_s: float,
    sampler: GpuSampler,
) -> dict[str, Any]:
    """The compile figure of one model: ``source`` is its saved folder (the worker's own load)
    or a pipeline built in memory."""
    from worker.engine.engine import Engine

    served = plan.sd15_served if name == "sd15" else plan.sdxl_served
    steps = plan.steps if name == "sd15" else plan.sdxl_steps
    scope = compile_scopes(args.compile).get(name, "full")
    in_memory = not isinstance(source, Path)
    model = f"in-memory:{name}" if in_memory else str(source)
    engine = Engine(compile_settings(model, name, dtype, scope, served, args))
    with given_pipeline(source) if in_memory else contextlib.nullcontext():
        out = compile_rounds(
            engine,
            parse_shapes(served),
            steps,
            7.5,
            plan.compile_repeats,
            budget,
            reserve_s,
            name,
            sampler,
        )
    del engine
    free_memory()
    return {"served": served, "steps": steps, "guidance": 7.5, "dtype": dtype, **out}


@step("compile_vs_eager")
def compile_vs_eager(results: dict[str, dict[str, Any]]) -> dict[str, Any]:
    if not results:
        raise RuntimeError("no model was compiled")
    errors = {k: r["error"] for k, r in results.items() if "error" in r}
    measured = {k: r["speedup"] for k, r in results.items() if "speedup" in r}
    recompiles = {k: r["recompiles_after_warmup"] for k, r in results.items() if "speedup" in r}
    if errors:
        raise RuntimeError(f"compile figure failed for {errors}; measured: {measured}")
    value = min(measured.values())
    return {
        "value": value,
        "met": bool(value >= 1.3 and not any(recompiles.values())),
        "recompiles_after_warmup": recompiles,
        "models": results,
        "note": "met: every model's speed-up >= 1.3 and no recompile after the warm-up",
    }


def probe(
    pipe: Any, shape: tuple[int, int, int], steps: int, guidance: float, **extra: Any
) -> dict[str, Any]:
    """One call at the served size ending at numpy: the values before they become pixels."""
    t = time.perf_counter()
    images = call_pipe(pipe, shape, steps, guidance, SEED0, output_type="np", **extra)
    check = realsize.finite(images)
    check["seconds"] = round(time.perf_counter() - t, 3)
    return check


def usable(check: dict[str, Any], what: str) -> None:
    if not check["finite"] or not check["not_constant"]:
        raise RuntimeError(f"{what} images are not usable figures (NaN or constant): {check}")


@step("flux_bare")
def flux_bare(
    device: str,
    dtype: Any,
    plan: Plan,
    args: argparse.Namespace,
    budget: Budget,
    sampler: GpuSampler,
) -> dict[str, Any]:
    """Flux-size s/image, eager and regionally compiled, through the Engine."""
    from worker.engine.engine import Engine

    with phase("build_flux"):
        built = realsize.build("flux", device, dtype, tiny=args.tiny)
    RESULTS["models"]["flux"] = built.describe()
    shape = (plan.flux_side, plan.flux_side, 1)
    tokens = {"max_sequence_length": plan.flux_tokens}
    check = probe(built.pipe, shape, plan.flux_steps, 3.5, **tokens)  # also an eager warm-up
    RESULTS["models"]["flux"]["finite"] = check
    usable(check, "Flux-size")
    served = f"{shape[0]}x{shape[1]}x1"
    settings = compile_settings("in-memory:flux", "flux", built.dtype, "regional", served, args)
    engine = Engine(settings)
    with phase("flux_compile"), given_pipeline(built.pipe):
        out = compile_rounds(
            engine,
            [shape],
            plan.flux_steps,
            3.5,
            plan.compile_repeats,
            budget,
            0.0,
            "flux",
            sampler,
        )
    row = out["per_shape"][served]
    return {
        "value": row["eager_s_per_image"],
        "eager_s_per_image": row["eager_s_per_image"],
        "compiled_s_per_image": row["compiled_s_per_image"],
        "speedup": row["speedup"],
        "size": plan.flux_side,
        "steps": plan.flux_steps,
        "guidance": 3.5,
        "max_sequence_length": (engine.rules.max_sequence_length if engine.rules else None),
        "dtype": built.dtype,
        "anchors": FLUX_ANCHORS,
        "gpu_busy": {
            "eager": sampler.mean("flux-eager"),
            "compiled": sampler.mean("flux-compiled"),
        },
        **{
            k: out[k]
            for k in (
                "compile_backend",
                "compile_scope",
                "compile_mode",
                "setup_s",
                "warmup_s",
                "recompiles_after_warmup",
                "per_shape",
            )
        },
    }


# ============================================================================================
# The run.


def environment(device: str) -> dict[str, Any]:
    import diffusers
    import transformers

    env: dict[str, Any] = {
        "torch": torch.__version__,
        "diffusers": diffusers.__version__,
        "transformers": transformers.__version__,
        "cuda": torch.version.cuda,
        "device": device,
        "gpu": torch.cuda.get_device_name(0) if torch.cuda.is_available() else None,
        "gpu_memory_bytes": (
            torch.cuda.get_device_properties(0).total_memory if torch.cuda.is_available() else None
        ),
        "cuda_visible_devices": os.environ.get("CUDA_VISIBLE_DEVICES"),
        "python": sys.version.split()[0],
        "cpus": os.cpu_count(),
    }
    for name in ("celery", "redis", "boto3", "pynvml"):
        with contextlib.suppress(Exception):
            from importlib import metadata

            env[name] = metadata.version("nvidia-ml-py" if name == "pynvml" else name)
    return env


def table() -> str:
    rows = ["| figure | value | goal | met | detail |", "|---|---|---|---|---|"]
    for name in GOALS:
        fig = RESULTS["figures"].get(name)
        if fig is None:
            continue
        if not fig.get("ok"):
            rows.append(
                f"| {name} | error | {fig.get('goal')} | - | {fig.get('error', '')[:120]} |"
            )
            continue
        detail = ""
        if name == "fleet_vs_bare":
            detail = ", ".join(f"{k} {v.get('ratio')}" for k, v in fig["variants"].items())
            detail += f"; PNG {fig['variants'][fig['best_variant']].get('png_bytes_per_image')} B"
        elif name == "batch_gain_ratio":
            detail = f"fleet gain {fig['fleet_gain']}, bare gain {fig['bare_gain']}"
        elif name == "compile_vs_eager":
            detail = ", ".join(
                f"{k} {m.get('speedup')} ({m.get('compile_scope')}, warm-up "
                f"{m.get('warmup_s')} s, recompiles "
                f"{m.get('recompiles_after_warmup')})"
                for k, m in fig["models"].items()
            )
        elif name == "flux_bare":
            detail = (
                f"eager {fig['eager_s_per_image']} s, compiled {fig['compiled_s_per_image']}"
                f" s (anchors 6.7-7.1 / 4.3 s on H100)"
            )
        elif name == "gpu_busy":
            detail = fig.get("reason") or (
                f"bare {fig['bare']['value']}, fleet {fig['fleet'][fig['best_variant']]['value']}"
            )
        rows.append(
            f"| {name} | {fig.get('value')} | {fig.get('goal')} | {fig.get('met')} | {detail} |"
        )
    return "\n".join(rows)


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--models", default="sd15,sdxl", help="comma-separated: sd15, sdxl, flux")
    ap.add_argument("--tiny", action="store_true", help="small stand-ins (CPU without a GPU)")
    ap.add_argument("--out", type=Path, default=None, help="default: $OUT or out/gpu-throughput")
    ap.add_argument(
        "--work",
        type=Path,
        default=None,
        help="models, services' data, spools (default: a temporary folder, removed at the end)",
    )
    ap.add_argument(
        "--budget-s",
        type=float,
        default=None,
        help="add repeats only while this many seconds are not spent (default 280, tiny 600)",
    )
    ap.add_argument(
        "--reserve-s",
        type=float,
        default=None,
        help="seconds the fleet rounds leave for the compile figures "
        "(default: 45%% of the budget when a compile figure follows)",
    )
    ap.add_argument(
        "--variants",
        default="threads:child,threads:inline,prefork:inline",
        help="batch-1 worker kinds POOL:STORE (FLEET_STORE_PROCESS child|inline)",
    )
    ap.add_argument("--images", type=int, default=None, help="images per bare/fleet block")
    ap.add_argument("--rounds", type=int, default=None, help="interleaved rounds")
    ap.add_argument("--batch-jobs", type=int, default=None, help="jobs per batch block")
    ap.add_argument(
        "--compile",
        default="sd15=full,sdxl=regional",
        help="FLEET_COMPILE_SCOPE per model, MODEL=full|regional (Flux: always regional)",
    )
    ap.add_argument("--compile-backend", default="inductor")
    ap.add_argument("--compile-mode", default=None, help="torch.compile mode, e.g. max-autotune")
    return ap.parse_args(argv)


def make_plan(args: argparse.Namespace) -> Plan:
    plan = TINY if args.tiny else REAL
    over = {
        k: v
        for k, v in (
            ("images", args.images),
            ("rounds", args.rounds),
            ("batch_jobs", args.batch_jobs),
        )
        if v is not None
    }
    return Plan(**{**asdict(plan), **over})


def failure(exc: BaseException) -> dict[str, Any]:
    return {"error": f"{type(exc).__name__}: {exc}", "trace": traceback.format_exc()[-2000:]}


def run_sd15(
    device: str,
    dtype: Any,
    plan: Plan,
    args: argparse.Namespace,
    budget: Budget,
    sampler: GpuSampler,
    reserve_s: float,
) -> Path | None:
    """Build and save the SD1.5-size model, then the fleet figures. Returns its folder (None
    when it could not be built)."""
    try:
        with phase("build_sd15"):
            built = realsize.build("sd15", device, dtype, tiny=args.tiny)
            RESULTS["models"]["sd15"] = built.describe()
            check = probe(built.pipe, (plan.side, plan.side, 1), plan.steps, 7.5)
            RESULTS["models"]["sd15"]["finite"] = check
            usable(check, "SD1.5-size")
            model_dir = realsize.save(built.pipe, WORK_DIR / "models" / "sd15", built)
            del built
            free_memory()
    except Exception as exc:
        fleet_failed(exc)
        return None
    try:
        sd15_fleet(model_dir, plan, args, budget, sampler, reserve_s)
    except Exception as exc:  # the services or the workers' start: every fleet figure says so
        fleet_failed(exc)
    return model_dir


def fleet_failed(exc: BaseException) -> None:
    for name in ("fleet_vs_bare", "batch_gain_ratio", "gpu_busy"):
        if name not in RESULTS["figures"]:
            record_failure(name, exc)


def compiled_one(
    name: str,
    source: Path | Any,
    dtype_name: str,
    plan: Plan,
    args: argparse.Namespace,
    budget: Budget,
    reserve_s: float,
    sampler: GpuSampler,
) -> dict[str, Any]:
    """One model's compile figure, kept in the JSON at once (a run cut short keeps it)."""
    try:
        with phase(f"compile_{name}"):
            out = compile_model(name, source, dtype_name, plan, args, budget, reserve_s, sampler)
    except Exception as exc:
        out = failure(exc)
    RESULTS["models"].setdefault(name, {})["compile"] = out
    write_json()
    free_memory()
    return out


def run_sd_models(
    models: list[str],
    device: str,
    plan: Plan,
    args: argparse.Namespace,
    budget: Budget,
    sampler: GpuSampler,
) -> None:
    """sd15: the fleet figures, then its compile figure; sdxl: its compile figure."""
    on_gpu = device.startswith("cuda")
    dtype, dtype_name = (torch.float16, "float16") if on_gpu else (torch.float32, "float32")
    compiled: dict[str, dict[str, Any]] = {}
    reserve = 0.45 * budget.seconds if args.reserve_s is None else args.reserve_s
    if "sd15" in models:
        model_dir = run_sd15(device, dtype, plan, args, budget, sampler, reserve)
        left = 0.3 * budget.seconds if "sdxl" in models else 0.0
        if model_dir is None:
            compiled["sd15"] = {"error": "the SD1.5-size model was not built (see fleet_vs_bare)"}
        else:
            compiled["sd15"] = compiled_one(
                "sd15", model_dir, dtype_name, plan, args, budget, left, sampler
            )
    if "sdxl" in models:
        try:
            with phase("build_sdxl"):
                built = realsize.build("sdxl", device, dtype, tiny=args.tiny)
                RESULTS["models"]["sdxl"] = built.describe()
                side = plan.sdxl_side
                check = probe(built.pipe, (side, side, 1), plan.sdxl_steps, 7.5)
                RESULTS["models"]["sdxl"]["finite"] = check
                usable(check, "SDXL-size")
            compiled["sdxl"] = compiled_one(
                "sdxl", built.pipe, dtype_name, plan, args, budget, 0.0, sampler
            )
            del built
        except Exception as exc:
            compiled["sdxl"] = failure(exc)
        free_memory()
    compile_vs_eager(compiled)
    for name in compiled:  # the figure has them now
        RESULTS["models"].get(name, {}).pop("compile", None)
    write_json()


def interrupted(signum: int, frame: Any) -> None:
    raise KeyboardInterrupt(f"signal {signum}")


def main(argv: list[str] | None = None) -> int:
    global OUT_DIR, WORK_DIR
    args = parse_args(argv)
    OUT_DIR = args.out or Path(os.environ.get("OUT") or REPO / "out" / "gpu-throughput")
    OUT_DIR = OUT_DIR.absolute()
    OUT_DIR.mkdir(parents=True, exist_ok=True)
    WORK_DIR = (args.work or Path(tempfile.mkdtemp(prefix="fleet-gpu-throughput-"))).absolute()
    WORK_DIR.mkdir(parents=True, exist_ok=True)
    models = [m.strip() for m in args.models.split(",") if m.strip()]
    unknown = sorted(set(models) - set(realsize.MODELS))
    if unknown:
        raise SystemExit(f"--models: unknown {unknown}; expected {', '.join(realsize.MODELS)}")
    device = "cuda" if torch.cuda.is_available() else "cpu"
    if device == "cpu" and not args.tiny:
        raise SystemExit("real sizes are built on a GPU only; use --tiny on a CPU")
    plan = make_plan(args)
    budget = Budget(args.budget_s or (600.0 if args.tiny else 280.0))
    # A timeout's SIGTERM stops the workers and services and keeps what was measured.
    signal.signal(signal.SIGTERM, interrupted)
    import diffusers.utils.logging as dlog
    import transformers.utils.logging as tlog

    dlog.disable_progress_bar()
    tlog.disable_progress_bar()
    dlog.set_verbosity_error()
    RESULTS.update(
        args={k: str(v) for k, v in vars(args).items()},
        plan=asdict(plan),
        env=environment(device),
        settings_support={
            "store_process": store_process_supported(),
            "warmup_shapes": warmup_shapes_supported(),
        },
    )
    say(json.dumps(RESULTS["env"]))
    sampler = GpuSampler().start()
    RESULTS["env"]["nvml"] = {"available": sampler.available, "reason": sampler.reason}
    try:
        if "sd15" in models or "sdxl" in models:
            run_sd_models(models, device, plan, args, budget, sampler)
        if "flux" in models:
            flux_dtype = torch.bfloat16 if device.startswith("cuda") else torch.float32
            flux_bare(device, flux_dtype, plan, args, budget, sampler)
    except KeyboardInterrupt:
        RESULTS["interrupted"] = f"stopped after {budget.elapsed():.0f} s"
    finally:
        sampler.stop()
        RESULTS["budget"] = budget.describe()
        write_json()
        if args.work is None:
            shutil.rmtree(WORK_DIR, ignore_errors=True)
    print(table(), flush=True)
    failed = [k for k, v in RESULTS["figures"].items() if not v.get("ok")]
    say(
        ("FAILED: " + ", ".join(failed))
        if failed
        else f"all figures recorded: {OUT_DIR / JSON_NAME}"
    )
    return 1 if failed or "interrupted" in RESULTS else 0


if __name__ == "__main__":
    raise SystemExit(main())
