"""The throughput benchmark behind scripts/bench, in three steps that meet at results.json.

- measure: starts the services and workers (procs), runs the workloads and records raw
  samples (seconds, per-job timings, CPU shares; machine facts from machine); the gateway
  phase (POST /v1/jobs against Client.submit) is in gateway;
- figures: computes every figure, its goal and its noise from those samples (stats: numpy
  medians, scipy bootstrap intervals);
- report: reads results.json, adds the figures and writes results.md (also alone:
  ``scripts/bench --report-only``).
"""

from __future__ import annotations

import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]
#: the command line children are started with (``--role pipeline`` / ``--role noop-worker``)
BENCH_SCRIPT = REPO / "scripts" / "bench.py"


def log(msg: str) -> None:
    print(f"bench {time.strftime('%H:%M:%S')} {msg}", file=sys.stderr, flush=True)
