#!/usr/bin/env python3
"""Throughput benchmark of the fleet on this machine: every figure is a ratio measured in one run.

    scripts/bench [--quick] [--out DIR] [--threads 1|2] [--jobs N] [--repeats R]
    scripts/bench --report-only [--out DIR]

Starts its own Redis and SeaweedFS S3, real `celery worker` processes serving the random-weight
`medium` model, a bare pipeline process, a trivial Celery app and the HTTP gateway (`python -m
producer serve`, for its own phase); measures; stops everything
(also on errors and Ctrl-C); writes the raw samples to DIR/results.json (default bench/), then
the figures computed from them to results.json and results.md. ``--report-only`` does the last
step alone, on the results.json already in DIR. The parts are in scripts/benchlib/: measure
(workloads, samples), figures and stats (the figures from the samples), report (the files).

Figures (medians of several runs, each run measuring both sides of its ratio back to back):

- fleet efficiency: images/s through the fleet (producer Client -> Redis -> one worker ->
  PNG -> S3 -> result seen by the client) / images/s of Engine.generate in a loop in one
  process; same model, size, steps and torch threads. Goal >= 0.98.
- fleet efficiency, overlapped worker: the same through a threads-pool worker with two jobs in
  flight (one generating, one storing). Goal >= 0.98.
- batching gain: 64 compatible 64 px jobs queued at once, a batch worker (FLEET_BATCH_SIZE=8;
  batch 4 too in full runs) / the default worker. Goal >= 2.5. The bare pipeline's images=B vs
  images=1 gain is given for reference.
- scale-out: two workers with one torch thread each / one worker with two threads, images/s over
  the same jobs. Goal >= 1.9.
- bulk enqueue: producer.bulk.submit_bulk / one-by-one client.celery.send_task, jobs/s of real
  Celery messages (counted with LLEN, checked, then purged). Goal >= 4.
- idle latency: submit -> the job's STARTED state (published by the worker as it starts the
  task), fleet idle / a trivial Celery task's round trip (submit -> SUCCESS). Goal <= 2.
- gateway submit rate: POST /v1/jobs jobs/s (one asyncio httpx client, 8 requests in flight)
  / Client.submit jobs/s (one call after another), same jobs, no worker consuming them (each
  side's jobs are counted where they must be, then deleted). Goal >= 0.5.
- gateway submit -> STARTED: median POST /v1/jobs -> STARTED minus median Client.submit ->
  STARTED, one job at a time in turns on the idle worker. Goal <= 5 ms.
"""

from __future__ import annotations

import argparse
import signal
import sys
import traceback
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[1]
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))

from benchlib import log  # noqa: E402
from benchlib.report import report, write_results  # noqa: E402


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(
        prog="scripts/bench",
        description="Measure fleet efficiency, batching gain, scale-out, bulk enqueue, idle "
        "latency and the HTTP gateway against the direct client in one run; write results.json "
        "and results.md.",
    )
    p.add_argument("--quick", action="store_true", help="a smaller run (under 2 minutes)")
    p.add_argument("--out", type=Path, default=REPO / "bench", help="output folder (bench/)")
    p.add_argument(
        "--report-only",
        action="store_true",
        help="measure nothing: recompute the figures from the samples in OUT/results.json and "
        "write them with OUT/results.md",
    )
    p.add_argument(
        "--threads",
        type=int,
        choices=(1, 2),
        default=2,
        help="FLEET_TORCH_THREADS of both the fleet worker and the in-process loop (2)",
    )
    p.add_argument("--jobs", type=int, help="jobs per throughput run (12; quick 6)")
    p.add_argument("--repeats", type=int, help="throughput runs (7; quick 3)")
    p.add_argument("--bulk-jobs", type=int, help="jobs per bulk enqueue run (10000; quick 1000)")
    p.add_argument("--steps", type=int, help="denoising steps per image (20)")
    p.add_argument("--batch-jobs", type=int, help="jobs per batching run (64; quick 16)")
    p.add_argument("--gateway-jobs", type=int,
                   help="jobs per side per gateway acceptance run (500; quick 100)")  # fmt: skip
    p.add_argument("--gateway-concurrency", type=int,
                   help="POST /v1/jobs requests in flight at once (8)")  # fmt: skip
    p.add_argument("--keep", action="store_true", help="keep worker logs (kept on failure)")
    p.add_argument("--role", choices=("main", "pipeline", "noop-worker"), default="main",
                   help=argparse.SUPPRESS)  # fmt: skip
    p.add_argument("--node", help=argparse.SUPPRESS)
    return p.parse_args(argv)


def _terminate(signum: int, frame: Any) -> None:
    raise KeyboardInterrupt(f"signal {signum}")


def measure(args: argparse.Namespace) -> int:
    """Run the workloads; on success write the raw samples to OUT/results.json."""
    from benchlib.measure import Bench

    signal.signal(signal.SIGTERM, _terminate)
    bench = Bench(args)
    failed = True
    try:
        result = bench.run()
        failed = False
    except KeyboardInterrupt:
        log("interrupted; stopping everything")
        return 130
    except Exception:
        traceback.print_exc()
        for p in bench.procs:
            log(f"--- {p.name} log tail ---\n{p.tail(2000)}")
        return 1
    finally:
        bench.close(keep_dir=failed or args.keep)
    log(f"samples in {write_results(result, args.out)}")
    return 0


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    if args.role != "main":
        from benchlib import procs

        return (
            procs.pipeline_role() if args.role == "pipeline" else procs.noop_worker_role(args.node)
        )
    if args.report_only and not (args.out / "results.json").is_file():
        log(f"--report-only: no {args.out / 'results.json'} to report on")
        return 2
    if not args.report_only and (rc := measure(args)):
        return rc
    report(args.out)
    return 0


if __name__ == "__main__":
    sys.exit(main())
