"""Every figure of the bench, computed from the raw samples in results.json (no measuring here).

``compute(res)`` adds ``figures`` (value, goal, met, 90% interval, within noise and the details
the report shows), ``goals`` and the per-phase CPU-share summaries to a results document whose
``samples`` measure.py recorded. The same samples always give the same figures.
"""

from __future__ import annotations

from collections import Counter
from typing import Any

from .stats import (
    interval90,
    interval90_diff,
    median,
    met,
    percentile,
    share_summary,
    spread,
    within_noise,
)

GOALS: dict[str, dict[str, Any]] = {
    "fleet_efficiency": {"text": ">= 0.98", "op": ">=", "value": 0.98},
    "fleet_efficiency_overlapped": {"text": ">= 0.98", "op": ">=", "value": 0.98},
    "batching_gain": {"text": ">= 2.5", "op": ">=", "value": 2.5},
    "scale_out": {"text": ">= 1.9", "op": ">=", "value": 1.9},
    "bulk_enqueue": {"text": ">= 4", "op": ">=", "value": 4.0},
    "idle_latency": {"text": "<= 2", "op": "<=", "value": 2.0},
    "gateway_submit_rate": {"text": ">= 0.5", "op": ">=", "value": 0.5},
    "gateway_started_added_ms": {"text": "<= 5 ms", "op": "<=", "value": 5.0},
}
PER_JOB_KEYS = ("generate_s", "upload_s", "total_s", "per_call_s")
#: the bulk-enqueue samples: seconds per run of submit_bulk, send_task each, client.submit each
TIMED_ENQUEUE = ("bulk_s", "one_by_one_s", "submit_each_s")

Row = dict[str, Any]


def runs(values: list[float]) -> list[float]:
    return [round(x, 4) for x in values]


def ms(values: list[float]) -> float:
    """The median of seconds, in milliseconds."""
    return 1000 * median(values)


# =============================================================================================
# Throughput: fleet efficiency (both workers) and scale-out, from the same runs.


def combine(parts: list[dict[str, Any]]) -> dict[str, Any]:
    """One measurement made of several parts: images/s over all of them, medians per job."""
    n = sum(p["n"] for p in parts)
    seconds = sum(p["seconds"] for p in parts)
    out: dict[str, Any] = {"n": n, "seconds": seconds, "images_per_s": n / seconds}
    for key in PER_JOB_KEYS:
        values = [v for p in parts for v in p.get(key, [])]
        if values:
            out[key] = median(values)
    nodes: Counter[str] = Counter()
    for p in parts:
        nodes.update(p.get("nodes", {}))
    if nodes:
        out["jobs_per_node"] = dict(nodes)
    return out


def throughput_row(parts: dict[str, list[dict[str, Any]]]) -> Row:
    """One run: each side combined, and the run's ratios. "one2" (the two-thread worker on its
    own queue) is there only with --threads 1; otherwise the fleet-efficiency worker is it."""
    row: Row = {what: combine(p) for what, p in parts.items()}
    inproc = row["inproc"]["images_per_s"]
    row["efficiency"] = row["fleet"]["images_per_s"] / inproc
    row["overlap_efficiency"] = row["overlap"]["images_per_s"] / inproc
    row["one_worker"] = row.get("one2", row["fleet"])
    row["scale_out"] = row["two"]["images_per_s"] / row["one_worker"]["images_per_s"]
    if "bare2" in row:
        row["bare_scale"] = row["bare2"]["images_per_s"] / inproc
    return row


def over_runs(rows: list[Row], what: str, key: str) -> float:
    """The median over runs of one side's combined ``key``."""
    return median([r[what][key] for r in rows])


def efficiency_figure(
    rows: list[Row], key: str, ratio: str, settings: dict[str, Any], stages: bool = True
) -> dict[str, Any]:
    """Fleet efficiency of the worker measured under ``key`` in each run. ``stages``: the
    worker runs one job at a time, so its per-job total splits into diffusion, storing
    and hand-off (not so when jobs overlap: their totals include waiting for the pipeline)."""
    eff = [r[ratio] for r in rows]
    per_job_fleet = median([r[key]["seconds"] / r[key]["n"] for r in rows])
    per_job_inproc = median([r["inproc"]["seconds"] / r["inproc"]["n"] for r in rows])
    gen_worker = over_runs(rows, key, "generate_s")
    gen_inproc = over_runs(rows, "inproc", "per_call_s")
    per_job_ms = {
        "fleet_wall": 1000 * per_job_fleet,
        "in_process_wall": 1000 * per_job_inproc,
        "extra": 1000 * (per_job_fleet - per_job_inproc),
        "worker_generate": 1000 * gen_worker,
        "in_process_generate": 1000 * gen_inproc,
        "slower_generate_in_worker": 1000 * (gen_worker - gen_inproc),
        "worker_upload": 1000 * over_runs(rows, key, "upload_s"),
    }
    if stages:
        total_worker = over_runs(rows, key, "total_s")
        per_job_ms["worker_store_and_png"] = 1000 * (total_worker - gen_worker)
        per_job_ms["dispatch_and_result"] = 1000 * (per_job_fleet - total_worker)
    return {
        "value": median(eff),
        "unit": "ratio (fleet images/s / in-process images/s)",
        "fleet_images_per_s": over_runs(rows, key, "images_per_s"),
        "in_process_images_per_s": over_runs(rows, "inproc", "images_per_s"),
        "runs": runs(eff),
        "spread": round(spread(eff), 4),
        "fleet_runs_images_per_s": runs([r[key]["images_per_s"] for r in rows]),
        "in_process_runs_images_per_s": runs([r["inproc"]["images_per_s"] for r in rows]),
        "per_job_ms": per_job_ms,
        "jobs": settings["jobs_per_run"],
        "warmup_jobs": settings["warmup_jobs_per_worker"],
        "torch_threads": settings["torch_threads_efficiency"],
    }


def scale_out_figure(rows: list[Row], settings: dict[str, Any]) -> dict[str, Any]:
    scale = [r["scale_out"] for r in rows]
    two_nodes: Counter[str] = Counter()
    for r in rows:
        two_nodes.update(r["two"]["jobs_per_node"])
    fig: dict[str, Any] = {
        "value": median(scale),
        "unit": "ratio (2 workers x 1 thread images/s / 1 worker x 2 threads images/s)",
        "two_workers_images_per_s": over_runs(rows, "two", "images_per_s"),
        "one_worker_images_per_s": over_runs(rows, "one_worker", "images_per_s"),
        "two_workers_generate_ms": 1000 * over_runs(rows, "two", "generate_s"),
        "one_worker_generate_ms": 1000 * over_runs(rows, "one_worker", "generate_s"),
        "jobs_per_worker": dict(two_nodes),
        "runs": runs(scale),
        "spread": round(spread(scale), 4),
        "jobs": settings["jobs_per_run"],
    }
    bare = [r["bare_scale"] for r in rows if "bare_scale" in r]
    if bare:
        fig["bare_reference"] = {
            "what": "the same jobs through two bare one-thread pipeline processes at once "
            "vs the bare two-thread in-process loop, measured in the same runs (no fleet)",
            "value": median(bare),
            "two_processes_images_per_s": over_runs(rows, "bare2", "images_per_s"),
            "one_process_images_per_s": over_runs(rows, "inproc", "images_per_s"),
            "generate_ms": 1000 * over_runs(rows, "bare2", "per_call_s"),
            "runs": runs(bare),
        }
        fig["fleet_share_of_bare"] = median(scale) / median(bare)
    return fig


def throughput_figures(
    samples: dict[str, Any], settings: dict[str, Any], pipeline_threads: int
) -> dict[str, Any]:
    rows = [throughput_row(parts) for parts in samples["runs"]]
    efficiency = efficiency_figure(rows, "fleet", "efficiency", settings)
    efficiency["worker"] = "prefork pool, one child (the default worker)"
    overlapped = efficiency_figure(rows, "overlap", "overlap_efficiency", settings, stages=False)
    overlapped["worker"] = (
        "threads pool, --concurrency 2, FLEET_BATCH_SIZE=1: one thread generates while the "
        "other stores the previous job"
    )
    for fig in (efficiency, overlapped):
        fig["pipeline_torch_threads"] = pipeline_threads
    return {
        "fleet_efficiency": efficiency,
        "fleet_efficiency_overlapped": overlapped,
        "scale_out": scale_out_figure(rows, settings),
    }


# =============================================================================================
# Batching gain.


def batching_run(run: dict[str, Any]) -> dict[str, Any]:
    """One run: the default worker's images/s over both halves, each batch worker's and gain."""
    off = combine(run["off"])["images_per_s"]
    rates = {b: part["n"] / part["seconds"] for b, part in run["on"].items()}
    return {"off": off, "rates": rates, "gains": {b: r / off for b, r in rates.items()}}


def bare_gains(bare: dict[str, Any]) -> tuple[float, dict[str, float]]:
    """One bare-pipeline repeat: images/s at images=1, and each images=B call's gain over it."""
    one = bare["one"]["n"] / bare["one"]["seconds"]
    return one, {b: (x["n"] / x["seconds"]) / one for b, x in bare["by_size"].items()}


def batching_figure(
    samples: dict[str, Any], settings: dict[str, Any], pipeline_threads: int
) -> dict[str, Any]:
    sizes = [str(b) for b in settings["batch_sizes"]]
    rows = [batching_run(r) for r in samples["runs"]]
    bare = [bare_gains(b) for b in samples["bare"]]
    gains = {b: [r["gains"][b] for r in rows] for b in sizes}
    rates = {b: [r["rates"][b] for r in rows] for b in sizes}
    bare_gain = {b: median([g[b] for _, g in bare]) for b in sizes}
    per_size = {}
    for b in sizes:
        call_sizes = Counter(int(k) for r in samples["runs"] for k in r["on"][b]["batch_jobs"])
        per_size[b] = {
            "gain": median(gains[b]),
            "images_per_s": median(rates[b]),
            "runs": runs(gains[b]),
            "jobs_by_call_size": {str(k): v for k, v in sorted(call_sizes.items())},
            "bare_pipeline_gain": bare_gain[b],
        }
    main = sizes[0]
    listed = ", ".join(sizes)
    return {
        "value": median(gains[main]),
        "unit": f"ratio (batch worker, FLEET_BATCH_SIZE={main}, images/s / default worker "
        "images/s)",
        "batch_size": int(main),
        "jobs": settings["batching_jobs"],
        "size_px": samples["size_px"],
        "steps": settings["steps"],
        "off_images_per_s": median([r["off"] for r in rows]),
        "on_images_per_s": median(rates[main]),
        "runs": runs(gains[main]),
        "spread": round(spread(gains[main]), 4),
        "by_batch_size": per_size,
        "worker_on": f"--pool threads --concurrency 2 x B, FLEET_BATCH_SIZE=B, "
        f"FLEET_TORCH_THREADS=2 (B = {listed})",
        "worker_off": "the default worker: --pool prefork --concurrency 1, FLEET_TORCH_THREADS=2",
        "reference_bare_pipeline": {
            "what": "Engine.generate with images=B in one call vs images=1 B times; "
            f"{samples['size_px']} px, {settings['steps']} steps, medium model, one process",
            "batch1_images_per_s": median([one for one, _ in bare]),
            "gain_by_batch_size": bare_gain,
            "torch_threads": pipeline_threads,
        },
    }


# =============================================================================================
# Idle latency and bulk enqueue.


def latency_figure(samples: dict[str, Any]) -> dict[str, Any]:
    started, trivial = samples["fleet_started_s"], samples["trivial_done_s"]
    ratios = [f / t for f, t in zip(started, trivial, strict=True)]
    return {
        "value": median(started) / median(trivial),
        "unit": "ratio (fleet submit->STARTED / trivial task submit->SUCCESS)",
        "fleet_submit_to_started_ms": ms(started),
        "trivial_round_trip_ms": ms(trivial),
        "trivial_submit_to_started_ms": ms(samples["trivial_started_s"]),
        "fleet_submit_to_done_ms": ms(samples["fleet_done_s"]),
        "runs": runs(ratios),
        "samples": len(started),
        "job": samples["job"],
    }


def bulk_figure(samples: dict[str, Any]) -> dict[str, Any]:
    n, queue = samples["jobs"], samples["queue"]
    bulk, single, each = ([n / s for s in samples[k]] for k in TIMED_ENQUEUE)
    ratios = [b / s for b, s in zip(bulk, single, strict=True)]
    return {
        "value": median(ratios),
        "unit": "ratio (submit_bulk jobs/s / one-by-one send_task jobs/s)",
        "bulk_jobs_per_s": median(bulk),
        "one_by_one_jobs_per_s": median(single),
        "client_submit_each_jobs_per_s": median(each),
        "bulk_vs_client_submit_each": median(bulk) / median(each),
        "jobs": n,
        "runs": runs(ratios),
        "messages_identical_but_ids": samples["messages_identical_but_ids"],
        "how": (
            f"{n} real Celery messages per run onto queue {queue!r} (default "
            "priority 5), which no worker consumes; after each timed run the bench counts "
            "them with LLEN over the queue's priority lists (must equal the jobs sent), "
            "compares the first message of each method (same headers, properties and body "
            "apart from the job id, delivery tag and reply-to), then purges the queue "
            "(DEL) and the job-id claims. Only enqueueing is timed. One "
            "by one: client.celery.send_task per job with the arguments Client._enqueue "
            "uses (no claim); bulk: producer.bulk.submit_bulk (validation and claims "
            "included); client.submit each: validation + claim + send_task per job."
        ),
    }


# =============================================================================================
# The gateway: POST /v1/jobs against Client.submit.


def quantiles_ms(values: list[float], qs: tuple[int, ...] = (50, 99)) -> dict[str, float]:
    """Percentiles of seconds, in milliseconds: {"p50": ..., "p99": ...}."""
    return {f"p{q}": 1000 * percentile(values, q) for q in qs}


def cpu_ms_per_job(parts: list[dict[str, Any]]) -> dict[str, float | None]:
    """Per process, the median over runs of its CPU milliseconds per job."""
    out: dict[str, float | None] = {}
    for who in parts[0]["cpu_s"]:
        known = [p["cpu_s"][who] / p["n"] for p in parts if p["cpu_s"].get(who) is not None]
        out[who] = 1000 * median(known) if known else None
    return out


def gateway_rate_figure(samples: dict[str, Any]) -> dict[str, Any]:
    acc = samples["acceptance"]
    sides = {side: [r[side] for r in acc["runs"]] for side in ("direct", "http")}
    rates = {side: [p["n"] / p["seconds"] for p in parts] for side, parts in sides.items()}
    ratios = [h / d for h, d in zip(rates["http"], rates["direct"], strict=True)]
    calls = {side: [x for p in parts for x in p["per_call_s"]] for side, parts in sides.items()}
    return {
        "value": median(ratios),
        "unit": f"ratio (POST /v1/jobs jobs/s, {acc['concurrency']} requests in flight / "
        "Client.submit jobs/s, one call after another)",
        "http_jobs_per_s": median(rates["http"]),
        "direct_jobs_per_s": median(rates["direct"]),
        "http_request_ms": quantiles_ms(calls["http"]),
        "direct_call_ms": quantiles_ms(calls["direct"]),
        "cpu_ms_per_job": {side: cpu_ms_per_job(parts) for side, parts in sides.items()},
        "concurrency": acc["concurrency"],
        "jobs_per_run": acc["jobs_per_run"],
        "requests": len(calls["http"]),
        "runs": runs(ratios),
        "spread": round(spread(ratios), 4),
        "http_runs_jobs_per_s": runs(rates["http"]),
        "direct_runs_jobs_per_s": runs(rates["direct"]),
        "job": acc["job"],
        "fair_queue_depth": samples.get("fair_queue_depth"),
    }


def gateway_started_figure(samples: dict[str, Any]) -> dict[str, Any]:
    st = samples["started"]
    http, direct = st["http_started_s"], st["direct_started_s"]
    qs = (50, 95, 99)
    after = {side: [s - c for s, c in zip(st[f"{side}_started_s"], st[f"{side}_call_s"],
                                          strict=True)]
             for side in ("direct", "http")}  # fmt: skip
    return {
        "value": ms(http) - ms(direct),
        "unit": "ms (median POST /v1/jobs -> STARTED minus median Client.submit -> STARTED)",
        "http_started_ms": quantiles_ms(http, qs),
        "direct_started_ms": quantiles_ms(direct, qs),
        "ratio": median(http) / median(direct),
        # where the time went: the submitting call itself, then until the worker started it
        "http_post_ms": ms(st["http_call_s"]),
        "direct_submit_ms": ms(st["direct_call_s"]),
        "http_after_answer_ms": ms(after["http"]),
        "direct_after_return_ms": ms(after["direct"]),
        "http_done_ms": ms(st["http_done_s"]),
        "direct_done_ms": ms(st["direct_done_s"]),
        "samples": len(http),
        "direct_samples": len(direct),
        # each pair (one of each, back to back) as measured; the interval is of the
        # difference of the medians (both sets resampled)
        "runs": runs([1000 * (h - d) for h, d in zip(http, direct, strict=True)]),
        "interval90": interval90_diff([1000 * x for x in http], [1000 * x for x in direct]),
        "job": st["job"],
    }


# =============================================================================================
# All of them.


def judge(fig: dict[str, Any], goal: dict[str, Any]) -> dict[str, Any]:
    """The goal, whether the median meets it, and whether the runs can tell (in place)."""
    fig["goal"] = goal["text"]
    fig["goal_value"] = goal["value"]
    fig["met"] = met(fig.get("value"), goal["op"], goal["value"])
    if "interval90" not in fig:  # a figure that is not a median of runs brings its own
        fig["interval90"] = interval90(fig.get("runs") or [])
    fig["within_noise"] = within_noise(fig["interval90"], goal["value"])
    return fig


def compute(res: dict[str, Any]) -> dict[str, Any]:
    """``res`` with figures, goals and CPU-share summaries computed from ``res["samples"]``."""
    samples, settings = res["samples"], res["settings"]
    threads = samples["pipeline_torch_threads"]
    found = {
        **throughput_figures(samples["throughput"], settings, threads),
        "batching_gain": batching_figure(samples["batching"], settings, threads),
        "bulk_enqueue": bulk_figure(samples["bulk_enqueue"]),
        "idle_latency": latency_figure(samples["idle_latency"]),
    }
    if "gateway" in samples:  # not in results from before the gateway phase
        found["gateway_submit_rate"] = gateway_rate_figure(samples["gateway"])
        found["gateway_started_added_ms"] = gateway_started_figure(samples["gateway"])
    figures = {name: judge(found[name], goal) for name, goal in GOALS.items() if name in found}
    machine = dict(res["machine"])
    for key, share in (("other_processes_cpu_share", "other"), ("steal_share", "steal")):
        machine[key] = {phase: share_summary(v[share]) for phase, v in samples["cpu_share"].items()}
    goals = {
        name: {"goal": fig["goal"], "value": fig.get("value"), "met": fig["met"]}
        for name, fig in figures.items()
    }
    # the same keys in the same order, the figures before the samples they come from
    rest = {k: v for k, v in res.items() if k not in ("figures", "goals", "samples")}
    return {**rest, "machine": machine, "figures": figures, "goals": goals, "samples": samples}
