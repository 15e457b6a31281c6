"""GPU checks for a session lent a GPU: pinned fp16 through Redis and S3, balanced placement,
reset_device_map, both offload modes, SDXL-shaped pipeline, batch 1 vs batch 4.

Run through scripts/gpu-check. Prints one JSON document and writes it to --out.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
import traceback
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

import torch  # noqa: E402

from fleet.contract import validate_job  # noqa: E402
from fleet.settings import WorkerSettings  # noqa: E402
from worker.engine.engine import Engine  # noqa: E402
from worker.testmodel import build_test_model  # noqa: E402

RESULTS: dict[str, Any] = {}


def step(name: str):  # type: ignore[no-untyped-def]
    def wrap(fn):  # type: ignore[no-untyped-def]
        def run(*a, **kw):  # type: ignore[no-untyped-def]
            started = time.perf_counter()
            try:
                RESULTS[name] = {"ok": True, **(fn(*a, **kw) or {})}
            except Exception as exc:
                RESULTS[name] = {
                    "ok": False,
                    "error": f"{type(exc).__name__}: {exc}",
                    "trace": traceback.format_exc()[-1500:],
                }
            RESULTS[name]["seconds"] = round(time.perf_counter() - started, 2)
            print(f"== {name}: {json.dumps(RESULTS[name], default=str)[:1500]}", flush=True)

        return run

    return wrap


def engine(model: Path, **kw: Any) -> Engine:
    e = Engine(
        WorkerSettings(
            _env_file=None, model=str(model), model_name=model.name, local_files_only=True, **kw
        )
    )
    e.setup()
    return e


def job(side: int = 512, steps: int = 20, **kw: Any):  # type: ignore[no-untyped-def]
    return validate_job(
        {
            "prompt": "a lighthouse at dusk",
            "width": side,
            "height": side,
            "steps": steps,
            "seed": 1,
            **kw,
        }
    )


def sync() -> None:
    if torch.cuda.is_available():
        torch.cuda.synchronize()


def timed(e: Engine, spec: Any, repeats: int = 3) -> float:
    e.generate(spec)  # warm-up
    sync()
    times = []
    for _ in range(repeats):
        t = time.perf_counter()
        e.generate(spec)
        sync()
        times.append(time.perf_counter() - t)
    return sorted(times)[len(times) // 2]


@step("pinned_fp16_in_process")
def pinned(medium: Path) -> dict:
    e = engine(medium)
    single = timed(e, job())
    batch4 = timed(e, job(images=4))
    info = e.describe()
    return {
        "device": info["device"],
        "gpu": info.get("gpu_name"),
        "dtype": info["dtype"],
        "s_per_image_batch1": round(single, 4),
        "s_per_image_batch4": round(batch4 / 4, 4),
        "batch4_gain": round(single * 4 / batch4, 2),
        "images_per_s_batch1": round(1 / single, 2),
    }


@step("sdxl_tiny_fp16")
def sdxl(sdxl_model: Path) -> dict:
    e = engine(sdxl_model)
    out = e.generate(job(side=128, steps=4, images=2))
    return {
        "pipeline": type(e.pipe).__name__,
        "sizes": [list(im.shape) for im in out.images],
        "device": e.describe()["device"],
    }


@step("balanced_max_memory")
def balanced(medium: Path) -> dict:
    sizes = {}
    e0 = engine(medium, device="cpu", dtype="float16")
    for name, comp in e0.pipe.components.items():
        if isinstance(comp, torch.nn.Module):
            sizes[name] = sum(p.numel() * p.element_size() for p in comp.parameters())
    del e0
    # Room on GPU 0 for the largest component only, so the others land on the CPU.
    cap = max(sizes.values()) + 64 * 1024
    e = engine(medium, placement="balanced", max_memory=f"0={cap}B,cpu=8GiB")
    dmap = dict(e.pipe.hf_device_map)
    print(f"balanced hf_device_map: {dmap}", flush=True)
    out = e.generate(job(side=256, steps=10))
    info = e.describe()
    e.placement.release(e.pipe)  # reset_device_map()
    after_reset = getattr(e.pipe, "hf_device_map", None)
    return {
        "component_bytes": sizes,
        "max_memory_gpu0": cap,
        "hf_device_map": dmap,
        "manifest_device_map": info["hf_device_map"],
        "generated": list(out.images[0].shape),
        "hf_device_map_after_reset": after_reset,
    }


@step("balanced_then_model_offload")
def model_offload(medium: Path) -> dict:
    e = engine(medium, placement="balanced", offload="model")
    t = timed(e, job(), repeats=2)
    return {"s_per_image": round(t, 4), "device_map_before_reset": e.placement.hf_device_map}


@step("sequential_offload")
def seq_offload(medium: Path) -> dict:
    e = engine(medium, offload="sequential")
    t = timed(e, job(), repeats=2)
    return {"s_per_image": round(t, 4)}


def run_fleet(medium: Path, workdir: Path, batch: int, overlap: bool = False) -> dict:
    """Jobs through a real worker on cuda:0 with Redis and SeaweedFS; batch > 1: a batch worker;
    overlap: the threads pool with two jobs in flight at batch size 1 (`launch --overlap`)."""
    from fleet.contract import JobSpec
    from fleet.localdev import local_services
    from fleet.settings import ProducerSettings
    from producer.client import Client

    name = f"b{batch}" + ("-overlap" if overlap else "")
    with local_services(workdir=workdir / f"services-{name}") as ep:
        env = {**os.environ, **ep.env(), "FLEET_MODEL": str(medium), "FLEET_MODEL_NAME": "medium",
               "FLEET_LOCAL_FILES_ONLY": "true", "CUDA_VISIBLE_DEVICES": "0",
               "FLEET_BATCH_SIZE": str(batch),
               "PYTHONPATH": os.environ.get("PYTHONPATH", "") + f":{REPO}"}  # fmt: skip
        pool = ["--pool", "threads", "--concurrency", str(2 * batch)] if batch > 1 or overlap else [
            "--pool", "prefork", "--concurrency", "1"]  # fmt: skip
        log = (workdir / f"worker-{name}.log").open("w")
        proc = subprocess.Popen(  # nosec B603  # the documented worker command, no shell
            [sys.executable, "-m", "celery", "-A", "worker.app", "worker", *pool,
             "--queues", "fleet", "--hostname", "gpu0@%h", "--loglevel", "INFO",
             "--without-gossip", "--without-mingle"],
            cwd=REPO, env=env, stdout=log, stderr=subprocess.STDOUT,
        )  # fmt: skip
        try:
            kw = {k.removeprefix("FLEET_").lower(): v for k, v in ep.env().items()}
            with Client(ProducerSettings(_env_file=None, **kw)) as client:
                warm = client.submit(JobSpec(prompt="warm", width=512, height=512, steps=20))
                warm.wait(timeout=180, raise_on_failure=True)
                n = 16
                t = time.perf_counter()
                handles = client.submit_many(
                    [JobSpec(prompt=f"p{i}", width=512, height=512, steps=20) for i in range(n)]
                )
                statuses = client.wait([h.job_id for h in handles], timeout=240)
                fleet_s = time.perf_counter() - t
                manifest = client.store.get_json(statuses[-1].result.manifest_key)
                return {
                    "states": sorted({s.state for s in statuses}),
                    "images_per_s": round(n / fleet_s, 2),
                    "worker": manifest["worker"].get("device"),
                    "gpu_name": manifest["worker"].get("gpu_name"),
                    "dtype": manifest["worker"].get("dtype"),
                    "gpu_memory_bytes": manifest["worker"].get("gpu_memory_bytes"),
                    "batch_jobs": manifest["worker"].get("batch", {}).get("jobs"),
                    "timings": manifest["timings"],
                }
        finally:
            proc.terminate()
            proc.wait(30)
            log.close()


def vs_in_process(out: dict, key: str) -> dict:
    """``out`` with its images/s over the in-process batch-1 rate measured earlier, as ``key``."""
    bare = RESULTS.get("pinned_fp16_in_process", {}).get("images_per_s_batch1")
    if bare:
        out[key] = round(out["images_per_s"] / bare, 3)
    return out


@step("fleet_pinned_fp16_redis_s3")
def fleet(medium: Path, workdir: Path) -> dict:
    return vs_in_process(run_fleet(medium, workdir, batch=1), "efficiency_vs_in_process_batch1")


@step("fleet_batch_worker_fp16")
def fleet_batched(medium: Path, workdir: Path) -> dict:
    return vs_in_process(run_fleet(medium, workdir, batch=4), "gain_vs_in_process_batch1")


@step("fleet_overlapped_worker_fp16")
def fleet_overlapped(medium: Path, workdir: Path) -> dict:
    out = run_fleet(medium, workdir, batch=1, overlap=True)
    return vs_in_process(out, "efficiency_vs_in_process_batch1")


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--out", type=Path, default=REPO / "out" / "gpu-check")
    args = ap.parse_args()
    args.out.mkdir(parents=True, exist_ok=True)
    import diffusers

    RESULTS["env"] = {
        "torch": torch.__version__,
        "diffusers": diffusers.__version__,
        "cuda": torch.version.cuda,
        "gpu": torch.cuda.get_device_name(0) if torch.cuda.is_available() else None,
    }
    print(json.dumps(RESULTS["env"]), flush=True)
    models = args.out / "models"  # not a shared /tmp folder another user could fill first
    medium = build_test_model("medium", models / "medium")
    sdxl_model = build_test_model("sdxl-tiny", models / "sdxl-tiny")
    pinned(medium)
    sdxl(sdxl_model)
    balanced(medium)
    model_offload(medium)
    seq_offload(medium)
    fleet(medium, args.out)
    fleet_overlapped(medium, args.out)
    fleet_batched(medium, args.out)
    (args.out / "gpu-check.json").write_text(json.dumps(RESULTS, indent=2, default=str))
    failed = [k for k, v in RESULTS.items() if isinstance(v, dict) and v.get("ok") is False]
    print("FAILED: " + ", ".join(failed) if failed else "ALL GPU CHECKS PASSED", flush=True)
    return 1 if failed else 0


if __name__ == "__main__":
    raise SystemExit(main())
