"""scripts/bench --quick runs to the end and records every figure (not how fast they are)."""

from __future__ import annotations

import json
import os
import subprocess
import time

import pytest

from tests.fleet_fixtures import REPO

pytestmark = pytest.mark.integration

RATIOS = (
    "fleet_efficiency",
    "fleet_efficiency_overlapped",
    "batching_gain",
    "scale_out",
    "bulk_enqueue",
    "idle_latency",
)


@pytest.fixture(scope="module")
def bench_run(tmp_path_factory: pytest.TempPathFactory) -> tuple[dict, str, float]:  # type: ignore[type-arg]
    """One quick run shared by the tests below (how long it took is returned, not checked)."""
    out = tmp_path_factory.mktemp("bench")
    env = {k: v for k, v in os.environ.items() if not k.startswith("FLEET_")}
    began = time.monotonic()
    proc = subprocess.run(
        [str(REPO / "scripts" / "bench"), "--quick", "--out", str(out)],
        cwd=REPO,
        env=env,
        capture_output=True,
        text=True,
        timeout=600,
    )
    seconds = time.monotonic() - began
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-6000:]
    results = json.loads((out / "results.json").read_text())
    return results, (out / "results.md").read_text(), seconds


def positive(x: object) -> bool:
    return isinstance(x, int | float) and not isinstance(x, bool) and x > 0


def test_every_figure_is_measured_with_its_goal(bench_run) -> None:  # type: ignore[no-untyped-def]
    res, _, _ = bench_run
    figures = res["figures"]
    assert set(figures) == set(RATIOS)
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
    assert bulk["jobs"] == 1000 and bulk["messages_identical_but_ids"] is True

    lat = figures["idle_latency"]
    assert positive(lat["fleet_submit_to_started_ms"]) and positive(lat["trivial_round_trip_ms"])

    batching = figures["batching_gain"]
    assert batching["jobs"] == res["settings"]["batching_jobs"] == 16
    assert positive(batching["on_images_per_s"]) and positive(batching["off_images_per_s"])
    for size in res["settings"]["batch_sizes"]:
        by_size = batching["by_batch_size"][str(size)]
        assert positive(by_size["gain"]) and positive(by_size["bare_pipeline_gain"])
        # The batch worker really shared pipeline calls: some call held more than one job,
        # none more than the batch size, and every job was counted once.
        calls = {int(k): v for k, v in by_size["jobs_by_call_size"].items()}
        assert max(calls) > 1 and max(calls) <= size, calls
        assert sum(calls.values()) == batching["jobs"] * res["settings"]["batching_repeats"]


def test_machine_versions_and_settings_are_recorded(bench_run) -> None:  # type: ignore[no-untyped-def]
    res, _, _ = bench_run
    assert res["mode"] == "quick"
    assert res["machine"]["cpu_model"] and positive(res["machine"]["cores"])
    for name in ("torch", "diffusers", "celery", "kombu"):
        assert res["versions"][name] and res["versions"][name] != "not installed"
    settings = res["settings"]
    assert (settings["size_px"], settings["steps"]) == (128, 20)
    assert settings["model"].startswith("medium")


def test_markdown_reports_figures_and_misses(bench_run) -> None:  # type: ignore[no-untyped-def]
    res, md, _ = bench_run
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
