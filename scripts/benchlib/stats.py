"""The bench's statistics: numpy medians, a seeded scipy bootstrap interval, the goal rules.

Every figure is a median over runs. Its 90% interval is a percentile bootstrap of that median
(``scipy.stats.bootstrap``, method="percentile", seed 0): percentile rather than BCa because
with 3 to 9 runs the resampled medians take only a few distinct values, and BCa's jackknife
acceleration is then unstable and undefined (NaN) when runs tie.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import numpy.typing as npt
from scipy import stats

CONFIDENCE = 0.90
RESAMPLES = 2000
SEED = 0
#: fewer values than this give no interval (a bootstrap of one or two runs means nothing)
MIN_VALUES = 3
#: runs or samples: a list, or a numpy array
Values = Sequence[float] | npt.NDArray[np.floating]


def median(values: Values) -> float:
    return float(np.median(np.asarray(values, dtype=float)))


def percentile(values: Values, q: float) -> float:
    """The ``q``-th percentile (numpy's default, linear between the nearest samples)."""
    return float(np.percentile(np.asarray(values, dtype=float), q))


def spread(values: Values) -> float:
    """(max - min) / median: how much the runs of one figure disagree."""
    x = np.asarray(values, dtype=float)
    if x.size < 2 or not np.median(x):
        return 0.0
    return float(np.ptp(x) / np.median(x))


def interval90(values: Values) -> list[float] | None:
    """A 90% bootstrap interval of the median of ``values`` (seeded: the same runs give the same
    interval): how far the reported median could move on another day like this one."""
    x = np.asarray(values, dtype=float)
    if x.size < MIN_VALUES:
        return None
    res = stats.bootstrap(
        (x,),
        np.median,
        confidence_level=CONFIDENCE,
        n_resamples=RESAMPLES,
        method="percentile",
        rng=np.random.default_rng(SEED),
    )
    ci = res.confidence_interval
    return [round(float(ci.low), 4), round(float(ci.high), 4)]


def interval90_diff(x: Values, y: Values) -> list[float] | None:
    """A 90% bootstrap interval of median(x) - median(y), x and y resampled each on its own
    (two sets of samples, not pairs); seeded like ``interval90``."""
    a, b = np.asarray(x, dtype=float), np.asarray(y, dtype=float)
    if min(a.size, b.size) < MIN_VALUES:
        return None

    def diff(u: npt.NDArray[np.floating], v: npt.NDArray[np.floating], axis: int = -1) -> object:
        return np.median(u, axis=axis) - np.median(v, axis=axis)

    res = stats.bootstrap(
        (a, b),
        diff,
        confidence_level=CONFIDENCE,
        n_resamples=RESAMPLES,
        method="percentile",
        rng=np.random.default_rng(SEED),
    )
    ci = res.confidence_interval
    return [round(float(ci.low), 4), round(float(ci.high), 4)]


def met(value: float | None, op: str | None, goal: float) -> bool | None:
    """Whether ``value`` meets the goal ``op goal`` (None: no goal or nothing measured)."""
    if op is None or value is None:
        return None
    return bool(value >= goal) if op == ">=" else bool(value <= goal)


def within_noise(band: Sequence[float] | None, goal: float | None) -> bool:
    """The goal strictly inside the interval: the runs cannot tell met from missed."""
    return bool(band and goal and band[0] < goal < band[1])


def share_summary(values: Sequence[float | None]) -> dict[str, float | None]:
    """Median and max of the known values (a CPU share that could not be read is None)."""
    known = np.asarray([x for x in values if x is not None], dtype=float)
    if not known.size:
        return {"median": None, "max": None}
    return {"median": float(np.median(known)), "max": float(known.max())}
