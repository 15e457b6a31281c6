"""scripts/bench --quick runs to the end and records every figure (not how fast they are),
computed from the raw samples it records; --report-only recomputes them from those samples.
That includes the gateway's (POST /v1/jobs against Client.submit): measured and sane, not met."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import time
from pathlib import Path

import numpy as np
import pytest

from tests.fleet_fixtures import REPO

#: alone: it runs a benchmark script, whose run takes longer than its limit beside other tests
pytestmark = [pytest.mark.integration, pytest.mark.alone]

RATIOS = (
    "fleet_efficiency",
    "fleet_efficiency_overlapped",
    "batching_gain",
    "scale_out",
    "bulk_enqueue",
    "idle_latency",
)
#: the gateway's figures: POST /v1/jobs against Client.submit (their goals need not be met)
GATEWAY = ("gateway_submit_rate", "gateway_started_added_ms")


#: the quick run with fewer jobs and steps: every phase and figure, in about half the time
SMALL = ("--quick", "--jobs", "3", "--steps", "8", "--batch-jobs", "12", "--bulk-jobs", "300",
         "--gateway-jobs", "50")  # fmt: skip


def run_bench(*args: str, timeout: float = 600) -> subprocess.CompletedProcess[str]:
    """scripts/bench as users run it, without this shell's FLEET_* settings."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("FLEET_")}
    return subprocess.run(
        [str(REPO / "scripts" / "bench"), *args],
        cwd=REPO,
        env=env,
        capture_output=True,
        text=True,
        timeout=timeout,
    )


@pytest.fixture(scope="module")
def bench_run(tmp_path_factory: pytest.TempPathFactory) -> tuple[dict, str, float, Path]:  # type: ignore[type-arg]
    """One quick run, made smaller still (the figures' values are not what is tested here), shared
    by the tests below; how long it took is returned, not checked."""
    out = tmp_path_factory.mktemp("bench")
    began = time.monotonic()
    proc = run_bench(*SMALL, "--out", str(out))
    seconds = time.monotonic() - began
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-6000:]
    results = json.loads((out / "results.json").read_text())
    return results, (out / "results.md").read_text(), seconds, out


def report_only(out: Path) -> tuple[dict, str]:  # type: ignore[type-arg]
    proc = run_bench("--report-only", "--out", str(out), timeout=120)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-6000:]
    return json.loads((out / "results.json").read_text()), (out / "results.md").read_text()


def positive(x: object) -> bool:
    return isinstance(x, int | float) and not isinstance(x, bool) and x > 0


def test_every_figure_is_measured_with_its_goal(bench_run) -> None:  # type: ignore[no-untyped-def]
    res, *_ = bench_run
    figures = res["figures"]
    assert set(figures) == set(RATIOS) | set(GATEWAY)
    for name in RATIOS:
        fig = figures[name]
        assert positive(fig["value"]), (name, fig)
        assert fig["goal"] and positive(fig["goal_value"])
        assert isinstance(fig["met"], bool)
        assert fig["runs"] and all(positive(r) for r in fig["runs"])
        assert res["goals"][name] == {"goal": fig["goal"], "value": fig["value"], "met": fig["met"]}

    eff = figures["fleet_efficiency"]
    assert positive(eff["fleet_images_per_s"]) and positive(eff["in_process_images_per_s"])
    assert len(eff["runs"]) == res["settings"]["repeats"]
    assert eff["torch_threads"] == eff["pipeline_torch_threads"] == 2
    assert positive(eff["per_job_ms"]["worker_generate"])
    overlapped = figures["fleet_efficiency_overlapped"]
    assert positive(overlapped["fleet_images_per_s"]) and len(overlapped["runs"]) == len(
        eff["runs"]
    )

    scale = figures["scale_out"]
    assert positive(scale["two_workers_images_per_s"]) and positive(
        scale["one_worker_images_per_s"]
    )
    assert len(scale["jobs_per_worker"]) == 2  # both one-thread workers took jobs
    assert positive(scale["bare_reference"]["value"])  # the same ratio without the fleet

    bulk = figures["bulk_enqueue"]
    assert positive(bulk["bulk_jobs_per_s"]) and positive(bulk["one_by_one_jobs_per_s"])
    assert bulk["jobs"] == 300 and bulk["messages_identical_but_ids"] is True

    lat = figures["idle_latency"]
    assert positive(lat["fleet_submit_to_started_ms"]) and positive(lat["trivial_round_trip_ms"])

    batching = figures["batching_gain"]
    assert batching["jobs"] == res["settings"]["batching_jobs"] == 12
    assert positive(batching["on_images_per_s"]) and positive(batching["off_images_per_s"])
    for size in res["settings"]["batch_sizes"]:
        by_size = batching["by_batch_size"][str(size)]
        assert positive(by_size["gain"]) and positive(by_size["bare_pipeline_gain"])
        # The batch worker really shared pipeline calls: some call held more than one job,
        # none more than the batch size, and every job was counted once.
        calls = {int(k): v for k, v in by_size["jobs_by_call_size"].items()}
        assert max(calls) > 1 and max(calls) <= size, calls
        assert sum(calls.values()) == batching["jobs"] * res["settings"]["batching_repeats"]


def test_gateway_figures_are_measured_and_sane(bench_run) -> None:  # type: ignore[no-untyped-def]
    """The gateway phase ran against a real `python -m producer serve`: every figure there with
    its goal and verdict (met or not), positive rates, ordered percentiles, the asked counts."""
    res, md, *_ = bench_run
    settings, figures = res["settings"], res["figures"]
    rate, lat = figures["gateway_submit_rate"], figures["gateway_started_added_ms"]
    for name, fig in (("gateway_submit_rate", rate), ("gateway_started_added_ms", lat)):
        assert isinstance(fig["met"], bool) and fig["goal"] and positive(fig["goal_value"])
        assert res["goals"][name] == {"goal": fig["goal"], "value": fig["value"], "met": fig["met"]}

    assert positive(rate["value"]) and positive(rate["http_jobs_per_s"])
    assert positive(rate["direct_jobs_per_s"])
    assert rate["value"] == pytest.approx(np.median(np.array(rate["runs"])), abs=1e-3)
    for q in (rate["http_request_ms"], rate["direct_call_ms"]):
        assert 0 < q["p50"] <= q["p99"]
    assert rate["concurrency"] == settings["gateway_concurrency"] == 8
    assert rate["jobs_per_run"] == settings["gateway_jobs_per_run"] == 50
    assert len(rate["runs"]) == settings["gateway_repeats"] == 2
    assert rate["requests"] == 2 * 50 and all(positive(r) for r in rate["runs"])
    assert positive(rate["cpu_ms_per_job"]["http"]["gateway"])
    assert positive(rate["cpu_ms_per_job"]["direct"]["bench"])

    samples = res["samples"]["gateway"]
    for side in ("http", "direct"):
        q = lat[f"{side}_started_ms"]
        assert 0 < q["p50"] <= q["p95"] <= q["p99"]
        started = samples["started"][f"{side}_started_s"]
        assert len(started) == settings["gateway_latency_samples"] == 5
        # each job was answered before it ended, and started before it ended
        done, call = samples["started"][f"{side}_done_s"], samples["started"][f"{side}_call_s"]
        assert all(0 < c < d and 0 < s < d for c, s, d in zip(call, started, done, strict=True))
        for part in (r[side] for r in samples["acceptance"]["runs"]):
            assert part["n"] == len(part["per_call_s"]) == 50 and positive(part["seconds"])
    assert lat["samples"] == lat["direct_samples"] == 5
    assert lat["value"] == pytest.approx(
        lat["http_started_ms"]["p50"] - lat["direct_started_ms"]["p50"]
    )

    section = md.split("## Gateway")[1].split("\n## ")[0]
    assert "| submit rate, jobs/s |" in section and "| submit -> STARTED, p50 ms |" in section
    for name, verdict in zip(GATEWAY, ("Submit rate", "Submit -> STARTED"), strict=True):
        assert f"**{verdict}: {'met.' if figures[name]['met'] else 'missed'}" in section


def test_machine_versions_and_settings_are_recorded(bench_run) -> None:  # type: ignore[no-untyped-def]
    res, *_ = bench_run
    assert res["mode"] == "quick"
    assert res["machine"]["cpu_model"] and positive(res["machine"]["cores"])
    for name in ("torch", "diffusers", "celery", "kombu"):
        assert res["versions"][name] and res["versions"][name] != "not installed"
    settings = res["settings"]
    assert (settings["size_px"], settings["steps"]) == (128, 8)
    assert settings["model"].startswith("medium")


def test_markdown_reports_figures_and_misses(bench_run) -> None:  # type: ignore[no-untyped-def]
    res, md, *_ = bench_run
    for label in (
        "fleet efficiency",
        "fleet efficiency, overlapped worker",
        "batching gain",
        "scale-out",
        "bulk enqueue",
        "idle latency",
    ):
        assert f"| {label} |" in md
    assert res["machine"]["cpu_model"] in md and res["versions"]["torch"] in md
    assert "## Goals missed" in md
    for name in RATIOS:
        if res["figures"][name]["met"] is False:
            assert "**MISSED**" in md
            assert name.replace("_", " ").capitalize().split()[0] in md.split("## Goals missed")[1]


def images_per_s(parts: list[dict]) -> float:  # type: ignore[type-arg]
    return sum(p["n"] for p in parts) / sum(p["seconds"] for p in parts)


def test_figures_are_computed_from_the_recorded_samples(bench_run) -> None:  # type: ignore[no-untyped-def]
    """Each figure again, straight from the raw samples with numpy (not with the bench's code)."""
    res, *_ = bench_run
    figures, samples = res["figures"], res["samples"]
    runs = samples["throughput"]["runs"]
    assert len(runs) == res["settings"]["repeats"]
    inproc = np.array([images_per_s(r["inproc"]) for r in runs])
    fleet = np.array([images_per_s(r["fleet"]) for r in runs])
    overlap = np.array([images_per_s(r["overlap"]) for r in runs])
    two = np.array([images_per_s(r["two"]) for r in runs])
    assert figures["fleet_efficiency"]["value"] == pytest.approx(np.median(fleet / inproc))
    assert figures["fleet_efficiency_overlapped"]["value"] == pytest.approx(
        np.median(overlap / inproc)
    )
    assert figures["scale_out"]["value"] == pytest.approx(np.median(two / fleet))
    assert figures["fleet_efficiency"]["runs"] == pytest.approx(fleet / inproc, abs=1e-4)
    generate = [np.median([x for p in r["fleet"] for x in p["generate_s"]]) for r in runs]
    assert figures["fleet_efficiency"]["per_job_ms"]["worker_generate"] == pytest.approx(
        1000 * np.median(generate)
    )

    batching = samples["batching"]["runs"]
    size = str(res["settings"]["batch_sizes"][0])
    gains = [
        (r["on"][size]["n"] / r["on"][size]["seconds"]) / images_per_s(r["off"]) for r in batching
    ]
    assert figures["batching_gain"]["value"] == pytest.approx(np.median(gains))

    bulk = samples["bulk_enqueue"]
    ratio = np.array(bulk["one_by_one_s"]) / np.array(bulk["bulk_s"])
    assert figures["bulk_enqueue"]["value"] == pytest.approx(np.median(ratio))
    lat = samples["idle_latency"]
    assert len(lat["fleet_started_s"]) == res["settings"]["latency_samples"]
    assert figures["idle_latency"]["value"] == pytest.approx(
        np.median(lat["fleet_started_s"]) / np.median(lat["trivial_done_s"])
    )

    gw = samples["gateway"]
    http = np.array([r["http"]["n"] / r["http"]["seconds"] for r in gw["acceptance"]["runs"]])
    direct = np.array([r["direct"]["n"] / r["direct"]["seconds"] for r in gw["acceptance"]["runs"]])
    assert figures["gateway_submit_rate"]["value"] == pytest.approx(np.median(http / direct))
    posts = [x for r in gw["acceptance"]["runs"] for x in r["http"]["per_call_s"]]
    assert figures["gateway_submit_rate"]["http_request_ms"]["p99"] == pytest.approx(
        1000 * np.percentile(posts, 99)
    )
    started = gw["started"]
    assert figures["gateway_started_added_ms"]["value"] == pytest.approx(
        1000 * (np.median(started["http_started_s"]) - np.median(started["direct_started_s"]))
    )
    for name, fig in figures.items():
        band, goal = fig["interval90"], fig["goal_value"]
        assert (band is None) == (len(fig["runs"]) < 3), name
        assert fig["within_noise"] == bool(band and band[0] < goal < band[1]), name
        if band:
            assert band[0] <= band[1], name


def test_report_only_recomputes_the_figures_from_the_samples(bench_run, tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    res, md, _, out = bench_run
    shutil.copy(out / "results.json", tmp_path / "results.json")
    again, again_md = report_only(tmp_path)
    assert again == res and again_md == md  # the same samples give the same figures and report

    # Twice the one-by-one seconds: the bulk-enqueue ratio doubles, in results.json and .md.
    doubled = json.loads((out / "results.json").read_text())
    bulk = doubled["samples"]["bulk_enqueue"]
    bulk["one_by_one_s"] = [2 * s for s in bulk["one_by_one_s"]]
    (tmp_path / "results.json").write_text(json.dumps(doubled))
    changed, changed_md = report_only(tmp_path)
    value = changed["figures"]["bulk_enqueue"]["value"]
    assert value == pytest.approx(2 * res["figures"]["bulk_enqueue"]["value"])
    assert f"| bulk enqueue | {value:.2f} |" in changed_md
    assert changed["figures"]["fleet_efficiency"] == res["figures"]["fleet_efficiency"]


def test_report_only_on_the_committed_results_gives_the_committed_table(tmp_path: Path) -> None:
    """The committed bench/results.json (also one from before samples were recorded, whose
    figures are kept as they are) gives the committed results.md's table and stays as it was."""
    committed = REPO / "bench" / "results.json"
    shutil.copy(committed, tmp_path / "results.json")
    res, md = report_only(tmp_path)
    assert res == json.loads(committed.read_text())  # left as it was
    committed_md = (REPO / "bench" / "results.md").read_text()
    table = [line for line in committed_md.splitlines() if line.startswith("| ")]
    figures = committed_md.split("## Figures")[1].split("\n## ")[0]
    assert len([line for line in figures.splitlines() if line.startswith("| ")]) == 7  # 6 + header
    if "gateway_submit_rate" in res["figures"]:  # its own section: the header and 6 rows
        gateway = committed_md.split("## Gateway")[1].split("\n## ")[0]
        assert len([line for line in gateway.splitlines() if line.startswith("| ")]) == 7
    assert [line for line in md.splitlines() if line.startswith("| ")] == table

    empty = tmp_path / "empty"
    empty.mkdir()
    proc = run_bench("--report-only", "--out", str(empty), timeout=60)
    assert proc.returncode == 2 and "no " in proc.stderr
    assert not (empty / "results.md").exists()
