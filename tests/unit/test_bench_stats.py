"""The bench's statistics (scripts/benchlib/stats.py) and figures computed from known samples."""

from __future__ import annotations

import json

import numpy as np
import pytest

from scripts.benchlib import figures, report, stats

# The fleet-efficiency runs of the committed full run (bench/results.json, 2 cores).
RUNS = [0.9542, 0.9141, 0.9503, 0.9835, 0.9445, 0.9596, 1.0732]


def width(band: list[float] | None) -> float:
    assert band is not None
    return band[1] - band[0]


def test_median_of_known_samples() -> None:
    assert stats.median([3, 1, 2, 10, 4]) == 3.0
    assert stats.median([4, 1, 3, 2]) == 2.5  # an even count: the mean of the middle two
    assert stats.median(RUNS) == 0.9542
    assert stats.spread([1.0, 2.0, 3.0]) == pytest.approx(1.0)
    assert stats.spread([5.0]) == 0.0


def test_interval_holds_the_median_is_seeded_and_needs_three_runs() -> None:
    band = stats.interval90(RUNS)
    assert band is not None and band[0] <= stats.median(RUNS) <= band[1]
    assert min(RUNS) <= band[0] < band[1] <= max(RUNS)
    assert stats.interval90(list(RUNS)) == band  # the same runs give the same interval
    # the same interval the hand-written bootstrap gave for these runs (bench/results.md)
    assert band == [0.9445, 0.9835]
    assert stats.interval90([1.0, 1.1]) is None
    assert stats.interval90([2.0, 2.0, 2.0]) == [2.0, 2.0]  # tied runs: no NaN (unlike BCa)


def test_interval_narrows_with_more_runs() -> None:
    rng = np.random.default_rng(7)
    draws = rng.normal(1.0, 0.1, 400)
    few, many = stats.interval90(draws[:7]), stats.interval90(draws)
    assert width(many) < width(few) / 2
    for band, values in ((few, draws[:7]), (many, draws)):
        assert band is not None and band[0] <= np.median(values) <= band[1]


def test_within_noise_means_the_goal_strictly_inside_the_interval() -> None:
    assert stats.within_noise([0.94, 0.98], 0.95)
    assert not stats.within_noise([0.94, 0.98], 0.98)  # on the edge: outside
    assert not stats.within_noise([0.94, 0.98], 0.99)
    assert not stats.within_noise(None, 0.95)


def test_goals_and_the_judged_figure() -> None:
    assert stats.met(0.97, ">=", 0.98) is False
    assert stats.met(0.98, ">=", 0.98) is True
    assert stats.met(1.5, "<=", 2.0) is True
    assert stats.met(None, ">=", 0.98) is None
    fig = figures.judge({"value": stats.median(RUNS), "runs": RUNS}, figures.GOALS["scale_out"])
    assert (fig["goal"], fig["goal_value"], fig["met"]) == (">= 1.9", 1.9, False)
    assert fig["within_noise"] is False  # 1.9 is far above the interval
    fig = figures.judge({"value": 0.9542, "runs": RUNS}, figures.GOALS["fleet_efficiency"])
    assert fig["met"] is False and fig["within_noise"] is True  # 0.98 lies in 0.9445-0.9835


def test_bulk_and_latency_figures_from_known_samples() -> None:
    bulk = figures.bulk_figure(
        {
            "jobs": 1000,
            "queue": "bench.bulk",
            "bulk_s": [0.1, 0.2, 0.1],
            "one_by_one_s": [0.5, 0.8, 0.6],
            "submit_each_s": [1.0, 2.0, 1.0],
            "messages_identical_but_ids": True,
        }
    )
    assert bulk["runs"] == [5.0, 4.0, 6.0]  # one-by-one seconds / bulk seconds, per run
    assert bulk["value"] == pytest.approx(5.0)
    assert bulk["bulk_jobs_per_s"] == pytest.approx(10_000)
    assert bulk["client_submit_each_jobs_per_s"] == pytest.approx(1000)
    latency = figures.latency_figure(
        {
            "fleet_started_s": [0.004, 0.005, 0.006],
            "fleet_done_s": [0.01, 0.02, 0.03],
            "trivial_started_s": [0.001, 0.002, 0.003],
            "trivial_done_s": [0.004, 0.005, 0.002],
            "job": "64x64",
        }
    )
    # the ratio of the medians (5 ms / 4 ms), not the median of the per-sample ratios
    assert latency["value"] == pytest.approx(1.25)
    assert latency["runs"] == [1.0, 1.0, 3.0]
    assert latency["fleet_submit_to_done_ms"] == pytest.approx(20.0)


def test_results_json_keeps_flat_sample_lists_on_one_line() -> None:
    doc = {"samples": {"seconds": [0.1, 0.25, 3.0], "nodes": {"a": 2}, "ok": True}, "x": []}
    text = report.dumps(doc)
    assert json.loads(text) == doc
    assert '"seconds": [0.1, 0.25, 3.0]' in text
