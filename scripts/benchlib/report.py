"""The bench's report: reads results.json, computes the figures from its samples (figures.py)
and writes them back with results.md. Runs after every measurement, or alone on an existing
results.json (``scripts/bench --report-only [--out DIR]``).

A results.json from before the samples were recorded (schema 1) keeps its figures as they are:
only results.md is written from it.
"""

from __future__ import annotations

import json
import re
from pathlib import Path
from typing import Any

from . import log
from .figures import compute
from .stats import spread

RESULTS_JSON = "results.json"
RESULTS_MD = "results.md"


def _fmt(x: Any, digits: int = 3) -> str:
    if x is None:
        return "—"
    if isinstance(x, float):
        return f"{x:,.{digits}f}"
    return str(x)


def _met(fig: dict[str, Any]) -> str:
    met = fig.get("met")
    if met is None:
        return "n/a"
    text = "met" if met else "**MISSED**"
    band = fig.get("interval90")
    if band:
        text += f" (90% interval {band[0]:g}–{band[1]:g}"
        text += ", goal inside: within noise)" if fig.get("within_noise") else ")"
    return text


def explain_misses(res: dict[str, Any]) -> list[str]:
    f = res["figures"]
    out: list[str] = []
    share = res["machine"].get("other_processes_cpu_share", {}).get("throughput", {})
    other = share.get("median")
    busy_text = (
        f" Other processes on this machine used a median {100 * other:.0f}% of all CPUs during "
        "these runs, taken from the same cores as the measured work."
        if other is not None and other > 0.05
        else ""
    )
    e = f["fleet_efficiency"]
    if e["met"] is False:
        p = e["per_job_ms"]
        fixed = p["worker_store_and_png"] + p["dispatch_and_result"]
        image = p["in_process_generate"]
        extra = p["slower_generate_in_worker"]
        ceiling = image / (image + fixed) if image + fixed > 0 else 0.0
        text = (
            f"**Fleet efficiency {e['value']:.3f} (goal {e['goal']}).** The fleet does fixed "
            f"work per job that the in-process loop does not: PNG encoding with the recipe, "
            f"S3 uploads of the image and the manifest and the failure-index cleanup "
            f"({p['worker_store_and_png']:.0f} ms, uploads alone {p['worker_upload']:.0f} ms), "
            f"then the task's Celery bookkeeping (delivery count, states, progress, result, "
            f"acknowledgement) and the hand-off of the next message "
            f"({p['dispatch_and_result']:.0f} ms): {fixed:.0f} ms per job, not overlapped with "
            f"the diffusion (a worker generates, stores, then takes the next job). Against a "
            f"{image:.0f} ms image (the 128 px random-weight test model) that alone caps the "
            f"ratio near {ceiling:.3f} at equal diffusion speed; the goal leaves "
            f"{0.02 * image / 0.98:.0f} ms per job. "
            "With real models (seconds per image) the same fixed cost is well under 2%. The "
            "overlapped worker (next row) takes this work off the generation's path; batching "
            "shares it out over several images."
        )
        if extra > 0.02 * image:
            text += (
                f" On top of that the diffusion itself ran {extra:.0f} ms per image slower in "
                f"the worker ({p['worker_generate']:.0f} vs {image:.0f} ms in process). The "
                f"likely reason: with FLEET_TORCH_THREADS={e['torch_threads']} on "
                f"{res['machine']['cores']} cores, torch's OpenMP threads wait for each other "
                "at every parallel step, so whenever "
                "another process runs (the worker's Celery parent with its events and "
                "heartbeats, SeaweedFS and Redis serving the uploads and results, the client's "
                "result listener) the thread it preempts holds the other one up; the in-process "
                "loop has no such neighbours."
                if e["torch_threads"] > 1
                else f" On top of that the diffusion itself ran {extra:.0f} ms per image slower "
                f"in the worker ({p['worker_generate']:.0f} vs {image:.0f} ms in process)."
            )
        elif extra < -0.02 * image:
            text += (
                f" (The diffusion ran {-extra:.0f} ms per image faster in the worker than in "
                "process in these runs: the machine's speed drifts, see Noise.)"
            )
        text += (
            " The ratio is the median of per-run ratios; the per-job figures are medians of "
            "each quantity over the runs." + busy_text
        )
        out.append(text)
    ov = f.get("fleet_efficiency_overlapped")
    if ov and ov["met"] is False:
        p = ov["per_job_ms"]
        hidden = p["fleet_wall"] - p["worker_generate"]
        slower = p["slower_generate_in_worker"]
        out.append(
            f"**Fleet efficiency, overlapped worker {ov['value']:.3f} (goal {ov['goal']}).** "
            f"The overlap itself works: per job the fleet took {p['fleet_wall']:.0f} ms of wall "
            f"time for {p['worker_generate']:.0f} ms of diffusion ({hidden:+.0f} ms: storing "
            "and Celery's bookkeeping run while the next job generates). What is left is the "
            f"diffusion itself, {slower:+.0f} ms per image against the same call in process "
            f"({p['worker_generate']:.0f} vs {p['in_process_generate']:.0f} ms): the storing "
            "thread's Python work (botocore, PNG, JSON, Celery) holds the interpreter lock "
            "that the generating thread needs between torch operations, and on this machine "
            f"it also takes CPU from torch's {ov['torch_threads']} thread(s) on "
            f"{res['machine']['cores']} cores. On a GPU worker the CPU is free while the GPU "
            "computes, which is the case this mode is for." + busy_text
        )
    bg = f.get("batching_gain")
    if bg and bg["met"] is False:
        main = bg["by_batch_size"][str(bg["batch_size"])]
        out.append(
            f"**Batching gain {bg['value']:.2f} (goal {bg['goal']}).** The bare pipeline "
            f"itself gained x{main['bare_pipeline_gain']:.2f} from images={bg['batch_size']} "
            "in one call in the same run; the batch worker adds per job what the default "
            "worker adds (PNG, S3, Celery), and on 2 cores that work competes with torch "
            "for the CPU." + busy_text
        )
    s = f["scale_out"]
    ref = s.get("bare_reference")
    bare_text = ""
    if ref:
        bare_text = (
            f" Without the fleet, in the same runs, two bare one-thread pipeline processes "
            f"made x{ref['value']:.2f} the images/s of one bare two-thread process (each image "
            f"{ref['generate_ms']:.0f} ms when both run at once); the fleet reaches "
            f"{100 * s['fleet_share_of_bare']:.0f}% of that bare ratio."
        )
        if ref["value"] < s["goal_value"]:
            bare_text += (
                " So during this run the machine itself did not give two one-thread "
                "processes the speed-up the goal assumes (2.17x measured earlier): two "
                "computing processes slowed each other down on these two vCPUs (likely shared "
                "host resources of the VM), which no fleet setting can win back"
            )
            if s["fleet_share_of_bare"] < 0.995:
                bare_text += (
                    "; the remaining "
                    f"{100 * (1 - s['fleet_share_of_bare']):.0f}% is the fleet's own per-job "
                    "work (storing, Celery, SeaweedFS and Redis) on two cores that torch "
                    "already keeps busy."
                )
            else:
                bare_text += "."
        else:
            bare_text += (
                " The machine allowed the goal here, so the difference is the fleet's own "
                "per-job work (storing, Celery, S3 and Redis on the same two cores)."
            )
    if s["met"] is False:
        out.append(
            f"**Scale-out {s['value']:.3f} (goal {s['goal']}).** Two one-thread workers made "
            f"{s['two_workers_images_per_s']:.3f} images/s, one two-thread worker "
            f"{s['one_worker_images_per_s']:.3f}; per-job diffusion took "
            f"{s['two_workers_generate_ms']:.0f} ms in each one-thread worker vs "
            f"{s['one_worker_generate_ms']:.0f} ms with two threads. With both cores busy "
            "with torch, every other process (the workers' Celery parents, SeaweedFS, Redis, "
            "the bench) takes its CPU from the diffusion." + bare_text + busy_text
        )
    b = f["bulk_enqueue"]
    if b["met"] is False:
        out.append(
            f"**Bulk enqueue {b['value']:.2f}x (goal {b['goal']}).** Bulk "
            f"{b['bulk_jobs_per_s']:,.0f} jobs/s vs one by one {b['one_by_one_jobs_per_s']:,.0f} "
            "jobs/s. Per message the bulk path still pays validation, Celery's message "
            "building and JSON/base64 encoding in Python on one core." + busy_text
        )
    lat = f["idle_latency"]
    if lat["met"] is False:
        out.append(
            f"**Idle latency {lat['value']:.2f}x (goal {lat['goal']}).** Submit -> STARTED "
            f"{lat['fleet_submit_to_started_ms']:.1f} ms vs a trivial task's round trip "
            f"{lat['trivial_round_trip_ms']:.1f} ms; the fleet's submit validates and claims "
            "the job id (one Redis round trip) before sending." + busy_text
        )
    for name, label in (("gateway_submit_rate", "Gateway submit rate"),
                        ("gateway_started_added_ms", "Gateway submit -> STARTED")):  # fmt: skip
        g = f.get(name)
        if g and g["met"] is False:
            out.append(f"**{label} {_gw_value(name, g)} (goal {g['goal']}).** See Gateway.")
    return out


# =============================================================================================
# The gateway section.


def _gw_value(name: str, fig: dict[str, Any]) -> str:
    return f"x{fig['value']:.2f}" if name == "gateway_submit_rate" else f"{fig['value']:+.1f} ms"


def _ms2(q: dict[str, float], *keys: str) -> str:
    return " / ".join(f"{q[k]:.1f}" for k in keys)


def _cpu(cpu: dict[str, float | None], names: dict[str, str]) -> str:
    shown = [f"{label} {cpu[k]:.2f}" for k, label in names.items() if cpu.get(k) is not None]
    return ", ".join(shown)


def gateway_verdicts(res: dict[str, Any]) -> list[str]:
    """One sentence per gateway goal: met, or the shortfall with the measurements behind it."""
    f = res["figures"]
    rate, lat = f["gateway_submit_rate"], f["gateway_started_added_ms"]
    cores = res["machine"].get("cores") or 1
    other = res["machine"].get("other_processes_cpu_share", {}).get("gateway", {}).get("median")
    busy = (
        f" Other processes on this machine used a median {100 * other:.0f}% of all CPUs meanwhile."
        if other is not None and other > 0.05
        else ""
    )
    h, d, c = rate["http_jobs_per_s"], rate["direct_jobs_per_s"], rate["concurrency"]
    cpu_h, cpu_d = rate["cpu_ms_per_job"]["http"], rate["cpu_ms_per_job"]["direct"]
    out = []
    if rate["met"]:
        out.append(
            f"**Submit rate: met.** The gateway accepted {h:,.0f} jobs/s with {c} requests in "
            f"flight, x{rate['value']:.2f} the {d:,.0f} jobs/s of Client.submit (goal "
            f"{rate['goal']})."
        )
    else:
        gw, client, redis = (cpu_h.get(k) or 0.0 for k in ("gateway", "bench", "redis"))
        text = (
            f"**Submit rate: missed**, x{rate['value']:.2f} (goal {rate['goal']}): the gateway "
            f"accepted {h:,.0f} jobs/s with {c} requests in flight against {d:,.0f} jobs/s of "
            f"Client.submit, one call after another. Per job the gateway process used "
            f"{gw:.2f} ms of CPU and the httpx client {client:.2f} ms (Redis {redis:.2f} ms), "
            f"against {cpu_d.get('bench') or 0:.2f} ms in the calling process per Client.submit "
            f"(Redis {cpu_d.get('redis') or 0:.2f} ms)."
        )
        if gw > 0:
            text += (
                f" So one gateway process, one Python interpreter, can accept at most about "
                f"{1000 / gw:,.0f} jobs/s, and with its client on the same {cores} cores about "
                f"{cores * 1000 / (gw + client + redis):,.0f}; requests waited their turn for "
                f"that CPU: p50 {rate['http_request_ms']['p50']:.1f} ms, p99 "
                f"{rate['http_request_ms']['p99']:.1f} ms (Client.submit: "
                f"{_ms2(rate['direct_call_ms'], 'p50', 'p99')} ms)."
            )
        out.append(text + busy)
    hq, dq = lat["http_started_ms"], lat["direct_started_ms"]
    both = (
        f"{hq['p50']:.1f} ms through HTTP vs {dq['p50']:.1f} ms with Client.submit "
        f"({lat['samples']} samples each; p95 {hq['p95']:.1f} vs {dq['p95']:.1f} ms)"
    )
    if lat["met"]:
        out.append(
            f"**Submit -> STARTED: met.** HTTP added {lat['value']:+.1f} ms at the median: "
            f"{both} (goal {lat['goal']})."
        )
    else:
        call = lat["http_post_ms"] - lat["direct_submit_ms"]
        after = lat["http_after_answer_ms"] - lat["direct_after_return_ms"]
        out.append(
            f"**Submit -> STARTED: missed**, {lat['value']:+.1f} ms at the median (goal "
            f"{lat['goal']}): {both}. Split at the moment the call returned (medians): the call "
            f"itself {call:+.1f} ms (POST {lat['http_post_ms']:.1f} ms: the HTTP hop, the key's "
            "lookup, the rate count, validation and the line's script, against Client.submit "
            f"{lat['direct_submit_ms']:.1f} ms), and from there to STARTED {after:+.1f} ms "
            f"({lat['http_after_answer_ms']:.1f} ms after the 202 against "
            f"{lat['direct_after_return_ms']:.1f} ms after Client.submit returned: the gateway's "
            "job still waits for the dispatcher thread to take it from the line and send the "
            "Celery message, work that partly overlaps the 202's way back)." + busy
        )
    return out


def render_gateway(res: dict[str, Any]) -> list[str]:
    f = res["figures"]
    if "gateway_submit_rate" not in f or "gateway_started_added_ms" not in f:
        return []
    rate, lat = f["gateway_submit_rate"], f["gateway_started_added_ms"]
    hq, dq = lat["http_started_ms"], lat["direct_started_ms"]
    cpu_h, cpu_d = rate["cpu_ms_per_job"]["http"], rate["cpu_ms_per_job"]["direct"]
    lines = [
        "## Gateway",
        "",
        "`python -m producer serve` (one uvicorn process) on the bench's own Redis and S3, "
        "tenant `bench` with its limits off, against `Client.submit` in the same run with the "
        f"same jobs. **Submit rate**: {rate['jobs_per_run']} jobs per side per run, "
        f"{len(rate['runs'])} runs, the side going first alternating; jobs of {rate['job']}, "
        "which both sides route to a queue of their own that no worker reads. POST /v1/jobs "
        f"from one asyncio httpx client, {rate['concurrency']} requests in flight (a 202: the "
        "job is in its tenant's line); Client.submit one call after another (it returns once "
        "the Celery message is queued); afterwards every job is counted where it must be, then "
        f"deleted. **Submit -> STARTED**: {lat['samples']} jobs each ({lat['job']}), one at a "
        "time, in turns, from the call to the STARTED state the worker publishes.",
        "",
        "| | Client.submit | POST /v1/jobs | gateway vs direct | goal | result |",
        "|---|---|---|---|---|---|",
        f"| submit rate, jobs/s | {rate['direct_jobs_per_s']:,.0f} | "
        f"{rate['http_jobs_per_s']:,.0f} | x{rate['value']:.2f} | {rate['goal']} | "
        f"{_met(rate)} |",
        f"| latency per call, p50 / p99 ms | {_ms2(rate['direct_call_ms'], 'p50', 'p99')} | "
        f"{_ms2(rate['http_request_ms'], 'p50', 'p99')} ({rate['concurrency']} in flight) "
        "| | | |",
        f"| CPU per job, ms | {_cpu(cpu_d, {'bench': 'caller', 'redis': 'Redis'})} | "
        f"{_cpu(cpu_h, {'gateway': 'gateway', 'bench': 'httpx client', 'redis': 'Redis'})} "
        "| | | |",
        f"| submit -> STARTED, p50 ms | {dq['p50']:.1f} | {hq['p50']:.1f} | "
        f"{lat['value']:+.1f} ms | {lat['goal']} | {_met(lat)} |",
        f"| submit -> STARTED, p95 / p99 ms | {_ms2(dq, 'p95', 'p99')} | "
        f"{_ms2(hq, 'p95', 'p99')} | | | |",
        f"| the call, then to STARTED, p50 ms | {lat['direct_submit_ms']:.1f} + "
        f"{lat['direct_after_return_ms']:.1f} | {lat['http_post_ms']:.1f} + "
        f"{lat['http_after_answer_ms']:.1f} | | | |",
        "",
    ]
    lines += [f"- {x}" for x in gateway_verdicts(res)]
    lines += ["", f"Runs (gateway jobs/s / direct jobs/s): {rate['runs']}.", ""]
    return lines


def _over(shares: dict[str, dict[str, Any]], limit: float) -> list[tuple[str, float, float]]:
    """(phase in words, max, median) of each phase whose largest CPU share exceeds ``limit``."""
    return [
        (phase.replace("_", " "), share["max"], share.get("median") or 0)
        for phase, share in shares.items()
        if share.get("max") is not None and share["max"] > limit
    ]


def noise_notes(res: dict[str, Any]) -> list[str]:
    notes = []
    m = res["machine"]
    busy = m.get("cpu_busy_before_start")
    if busy is not None and busy > 0.15:
        notes.append(
            f"The machine was not idle: {100 * busy:.0f}% of all CPUs were busy before the "
            f"bench started (load average {m['loadavg_before']} before, {m['loadavg_after']} "
            "after)."
        )
    for phase, top, mid in _over(m.get("other_processes_cpu_share", {}), 0.05):
        notes.append(
            f"During the {phase} measurements, processes other than the bench's own used up to "
            f"{100 * top:.0f}% (median {100 * mid:.0f}%) of all CPUs: they compete with the "
            "measured work on the same cores, so those figures are noisier than on an idle "
            "machine."
        )
    for phase, top, _ in _over(m.get("steal_share", {}), 0.02):
        notes.append(
            f"During the {phase} measurements the hypervisor took up to {100 * top:.0f}% of "
            "this VM's CPU time for other guests (steal)."
        )
    bare = res["figures"]["fleet_efficiency"].get("in_process_runs_images_per_s") or []
    if len(bare) > 1 and spread(bare) > 0.05:
        notes.append(
            f"The bare in-process rate alone ranged from {min(bare):.3f} to {max(bare):.3f} "
            f"images/s between runs ({100 * spread(bare):.0f}% of its median) with no fleet "
            "involved: the speed of this machine itself drifts from one run to the next (a VM "
            "on a shared host), which is why each ratio pairs measurements taken back to back "
            "and the median over runs is reported."
        )
    for name, fig in res["figures"].items():
        if fig.get("spread", 0) > 0.10:
            notes.append(
                f"{name}: the runs disagree by {100 * fig['spread']:.0f}% (max-min over median; "
                f"runs {fig['runs']}): noisy; the median is reported."
            )
    return notes


def render_markdown(res: dict[str, Any]) -> str:
    f, m, v, s = res["figures"], res["machine"], res["versions"], res["settings"]
    e, ov, sc, b, lat, bg = (
        f["fleet_efficiency"],
        f["fleet_efficiency_overlapped"],
        f["scale_out"],
        f["bulk_enqueue"],
        f["idle_latency"],
        f["batching_gain"],
    )
    ref = bg["reference_bare_pipeline"]
    by_size = bg["by_batch_size"]
    lines = [
        "# Fleet throughput benchmark",
        "",
        f"`{res['command']}` — {res['mode']} run, {res['created']}, {res['duration_s']} s. "
        "Every figure is the median of several runs; each run measures both sides of its "
        "ratio back to back in the same process tree.",
        "",
        "## Machine",
        "",
        f"- CPU: {m['cpu_model']}, {m['cores']} cores ({m['platform']}), no GPU: all on CPU",
        f"- busy before start: {_fmt(m['cpu_busy_before_start'], 2)} of all CPUs; load average "
        f"before {m['loadavg_before']}, after {m['loadavg_after']}",
        "- share of all CPUs used by other processes (not the bench's) while measuring: "
        + ", ".join(
            f"{phase.replace('_', ' ')} median {_fmt(v.get('median'), 2)} / max "
            f"{_fmt(v.get('max'), 2)}"
            for phase, v in m.get("other_processes_cpu_share", {}).items()
        )
        + "; hypervisor steal: "
        + ", ".join(
            f"{phase.replace('_', ' ')} max {_fmt(v.get('max'), 2)}"
            for phase, v in m.get("steal_share", {}).items()
        ),
        f"- versions: torch {v['torch']}, diffusers {v['diffusers']}, transformers "
        f"{v['transformers']}, celery {v['celery']}, kombu {v['kombu']}, redis-py {v['redis']}, "
        f"Python {v['python']}",
        "",
        "## Settings",
        "",
        f"- model: {s['model']}; {s['size_px']}x{s['size_px']} px, {s['steps']} steps, "
        "default scheduler",
        f"- torch threads: FLEET_TORCH_THREADS={s['torch_threads_efficiency']} for both the "
        f"fleet worker and the in-process loop (fleet efficiency); scale-out compares 2 workers "
        "x 1 thread with 1 worker x 2 threads",
        f"- {s['jobs_per_run']} jobs queued at once per run, {s['repeats']} runs, "
        f"{s['warmup_jobs_per_worker']} warm-up job(s) per worker first; bulk enqueue "
        f"{s['bulk_jobs']:,} jobs x {s['bulk_repeats']} runs; idle latency "
        f"{s['latency_samples']} samples; batching {s['batching_jobs']} jobs x "
        f"{s['batching_repeats']} run(s) at 64 px, batch sizes {s['batch_sizes']}"
        + (
            f"; gateway {s['gateway_jobs_per_run']} jobs per side x {s['gateway_repeats']} "
            f"runs, {s['gateway_concurrency']} requests in flight, submit -> STARTED "
            f"{s['gateway_latency_samples']} samples each"
            if "gateway_jobs_per_run" in s
            else ""
        ),
        "- services: Redis and SeaweedFS S3 started by the bench (LocalServices, loopback); "
        "default workers: `celery -A worker.app worker --pool prefork --concurrency 1 --queues "
        "<bench queue>`; overlapped worker: `--pool threads --concurrency 2`; batch workers: "
        "`FLEET_BATCH_SIZE=B ... --pool threads --concurrency 2B`",
        "",
        "## Figures",
        "",
        "| figure | value | goal | result | detail |",
        "|---|---|---|---|---|",
        f"| fleet efficiency | {e['value']:.3f} | {e['goal']} | {_met(e)} | fleet "
        f"{e['fleet_images_per_s']:.3f} img/s vs in-process {e['in_process_images_per_s']:.3f} "
        f"img/s; runs {e['runs']}; default worker (prefork) |",
        f"| fleet efficiency, overlapped worker | {ov['value']:.3f} | {ov['goal']} | {_met(ov)} "
        f"| fleet {ov['fleet_images_per_s']:.3f} img/s vs in-process "
        f"{ov['in_process_images_per_s']:.3f} img/s; runs {ov['runs']}; threads pool, 2 jobs in "
        "flight |",
        f"| batching gain | {bg['value']:.2f} | {bg['goal']} | {_met(bg)} | "
        f"{bg['jobs']} jobs at 64 px: batch worker (FLEET_BATCH_SIZE={bg['batch_size']}) "
        f"{bg['on_images_per_s']:.2f} img/s vs default worker {bg['off_images_per_s']:.2f} "
        "img/s; "
        + "; ".join(
            f"batch {k}: x{v['gain']:.2f} (bare pipeline images={k} in one call: "
            f"x{v['bare_pipeline_gain']:.2f})"
            for k, v in by_size.items()
        )
        + f"; runs {bg['runs']} |",
        f"| scale-out | {sc['value']:.3f} | {sc['goal']} | {_met(sc)} | 2 workers x 1 thread "
        f"{sc['two_workers_images_per_s']:.3f} img/s vs 1 worker x 2 threads "
        f"{sc['one_worker_images_per_s']:.3f} img/s; jobs per worker {sc['jobs_per_worker']}; "
        f"runs {sc['runs']}"
        + (
            f"; bare processes, same runs: x{sc['bare_reference']['value']:.3f}"
            if sc.get("bare_reference")
            else ""
        )
        + " |",
        f"| bulk enqueue | {b['value']:.2f} | {b['goal']} | {_met(b)} | submit_bulk "
        f"{b['bulk_jobs_per_s']:,.0f} jobs/s vs one-by-one send_task "
        f"{b['one_by_one_jobs_per_s']:,.0f} jobs/s ({b['jobs']:,} jobs; client.submit each: "
        f"{b['client_submit_each_jobs_per_s']:,.0f} jobs/s); runs {b['runs']} |",
        f"| idle latency | {lat['value']:.2f} | {lat['goal']} | {_met(lat)} | submit -> "
        f"STARTED {lat['fleet_submit_to_started_ms']:.1f} ms vs trivial task round trip "
        f"{lat['trivial_round_trip_ms']:.1f} ms (trivial submit -> STARTED "
        f"{lat['trivial_submit_to_started_ms']:.1f} ms) |",
        "",
        "Result: the goal against the median of the runs. The 90% interval is a bootstrap of "
        "that median over the runs (scipy.stats.bootstrap, percentile method, seeded): how far "
        "it could move in another run on this machine; 'within noise' means the goal lies "
        "inside it, so these runs cannot tell met from missed.",
        "",
        *render_gateway(res),
        "## How each figure is measured",
        "",
        "- **Fleet efficiency**: N jobs submitted at once with `Client.submit_many` to a queue "
        "served by one real `celery worker` (prefork, 1 child); the clock stops when the "
        "client has every result (Celery result over Redis pub/sub, i.e. after the PNGs and "
        "manifest are in S3). Baseline: `worker.engine.engine.Engine.generate` on the same jobs "
        "(same prompts, seeds, size, steps) in a loop in one process with the same FLEET_* "
        "settings, half of its N images right before the fleet run and half right after, so "
        "that a steady drift in the machine's speed cancels out (ABBA). Per job: fleet "
        f"{e['per_job_ms']['fleet_wall']:.0f} ms, in process "
        f"{e['per_job_ms']['in_process_wall']:.0f} ms; in the worker: diffusion "
        f"{e['per_job_ms']['worker_generate']:.0f} ms, PNG + S3 + manifest "
        f"{e['per_job_ms']['worker_store_and_png']:.0f} ms; queue + Celery + result "
        f"{e['per_job_ms']['dispatch_and_result']:.0f} ms.",
        "- **Fleet efficiency, overlapped worker**: the same, through a worker on the threads "
        "pool with two jobs in flight (`--pool threads --concurrency 2`, batch size 1): one "
        "thread owns the pipeline and generates, the other encodes and stores the job before "
        "(docs/batching.md). It runs right after or right before the default worker (turns "
        "alternate between runs), between the same two in-process halves.",
        f"- **Batching gain**: {bg['jobs']} compatible jobs (64 px, 20 steps, the same prompts "
        "and seeds each time) queued at once with `Client.submit_many`; images/s of a batch "
        "worker (`FLEET_BATCH_SIZE=B`, threads pool with 2B jobs in flight, so one batch "
        "generates while the previous one is stored) vs the default worker (batching off), "
        "each until the client has every result. The default worker runs half the jobs right "
        "before the batch workers and half right after (ABBA). Jobs by the size of the "
        "pipeline call they shared, as their results recorded it (size: jobs): "
        + "; ".join(f"B={k}: {v['jobs_by_call_size']}" for k, v in by_size.items())
        + ". Reference without the fleet: the bare pipeline's gain from `images=B` in one "
        f"call over `images=1` B times ({ref['batch1_images_per_s']:.2f} img/s at images=1).",
        "- **Scale-out**: the same N jobs through two one-thread workers sharing one queue "
        "(two halves of N/2 jobs queued at once, the first before the in-process half that "
        "precedes the fleet run, the second after the one that follows it) vs one two-thread "
        "worker (the fleet-efficiency run when threads = 2). Reference without the fleet, in "
        "the same runs: two bare one-thread pipeline processes sharing the same jobs at once "
        "vs the bare two-thread loop.",
        f"- **Bulk enqueue**: {b['how']}",
        "- **Idle latency**: with every worker idle, the bench subscribes to the job's result "
        "channel, submits with `Client.submit`, and takes the time until the worker publishes "
        "the STARTED state (task_track_started: stored and published just before the task "
        "body runs). The trivial task (`bench.noop`, defined in scripts/benchlib/procs.py, run "
        "by its own prefork worker with the fleet workers' Celery settings) is timed from "
        "send_task to SUCCESS the same way, interleaved with the fleet samples. Milliseconds "
        "are medians.",
    ]
    misses = explain_misses(res)
    lines += ["", "## Goals missed", ""]
    lines += [f"- {x}" for x in misses] if misses else ["- none"]
    notes = noise_notes(res) + list(res.get("notes", []))
    lines += ["", "## Noise", ""]
    lines += [f"- {x}" for x in notes] if notes else ["- the runs agree within 10%"]
    return "\n".join(lines) + "\n"


# =============================================================================================
# Files.


def dumps(res: dict[str, Any]) -> str:
    """JSON with two-space indents, but a flat list of numbers on one line (the samples)."""
    text = json.dumps(res, indent=2)
    flat = re.compile(r"\[[^\[\]{}\"]*\]")
    return flat.sub(lambda m: json.dumps(json.loads(m.group())), text) + "\n"


def write_results(res: dict[str, Any], out: Path) -> Path:
    out.mkdir(parents=True, exist_ok=True)
    path = out / RESULTS_JSON
    path.write_text(dumps(res), encoding="utf-8")
    return path


def summary(res: dict[str, Any]) -> list[str]:
    """One line per goal, for the terminal."""
    lines = []
    for name, goal in res["goals"].items():
        value = goal["value"]
        shown = f"{value:.3f}" if isinstance(value, float) else "not measured"
        state = {True: "met", False: "MISSED", None: "n/a"}[goal["met"]]
        lines.append(f"{name:27} {shown:>8}  goal {goal['goal']:<10} {state}")
    return lines


def report(out: Path) -> dict[str, Any]:
    """Read ``out``/results.json; with samples in it, compute the figures from them and write
    them back; write ``out``/results.md; print one line per goal."""
    path = out / RESULTS_JSON
    res: dict[str, Any] = json.loads(path.read_text(encoding="utf-8"))
    if "samples" in res:
        res = compute(res)
        log(f"figures computed from the samples into {write_results(res, out)}")
    else:
        log(f"{path} has no samples (schema {res.get('schema')}): its figures are kept as they are")
    (out / RESULTS_MD).write_text(render_markdown(res), encoding="utf-8")
    log(f"wrote {out / RESULTS_MD}")
    print("\n".join(summary(res)))
    return res
