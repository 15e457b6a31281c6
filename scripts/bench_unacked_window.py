"""kombu's window between BRPOP and recording the message as unacknowledged, measured.

    .venv/bin/python scripts/bench_unacked_window.py [--jobs 300] [--out bench/unacked_window.json]

A job popped from its queue by ``BRPOP`` is only safe once kombu's ``QoS.append`` wrote it to the
``unacked`` hash (one ``MULTI`` / ``ZADD unacked_index`` / ``HSET unacked`` / ``EXEC``). A worker
killed inside that window loses the job: it is in neither the queue nor the unacked hash, so no
visibility sweep brings it back. This is one of the two bounds the fault matrix claims instead of
"0 lost" (docs/reliability.md); the other is ``appendfsync everysec`` after a Redis SIGKILL.

The window is measured from outside, on Redis's own clock: ``MONITOR`` timestamps every command
as Redis runs it. With the queue filled before the worker starts, each ``BRPOP`` returns at once,
so its timestamp is the pop; the ``HSET unacked`` that follows is the record. A real worker (the
documented command, prefork, the tiny model on CPU) drains the jobs.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from fleet.contract import JobSpec  # noqa: E402
from fleet.localdev import LocalServices  # noqa: E402
from fleet.settings import ProducerSettings  # noqa: E402
from producer.client import Client  # noqa: E402

QUEUE = "window"


def monitor(url: str, events: list[dict[str, Any]], stop: threading.Event) -> None:
    import redis

    r = redis.Redis.from_url(url)
    with r.monitor() as m:
        for event in m.listen():
            command = event.get("command", "")
            if command.startswith(("BRPOP", "HSET unacked ", "HSET unacked\t")) or (
                command.startswith("HSET") and " unacked " in f" {command} "
            ):
                events.append(event)
            if stop.is_set():
                return


def windows_ms(events: list[dict[str, Any]]) -> list[float]:
    """For each HSET of the unacked hash, the time since the BRPOP before it (ms)."""
    out: list[float] = []
    last_pop: float | None = None
    for event in events:
        command = event["command"]
        if command.startswith("BRPOP"):
            last_pop = float(event["time"])
        elif command.startswith("HSET") and last_pop is not None:
            out.append((float(event["time"]) - last_pop) * 1000)
            last_pop = None
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--jobs", type=int, default=300)
    parser.add_argument("--out", type=Path, default=Path("bench/unacked_window.json"))
    args = parser.parse_args()
    from worker.testmodel import build_test_model

    model = build_test_model("tiny", REPO / ".models" / "tiny")
    workdir = Path(tempfile.mkdtemp(prefix="bench-window-"))
    services = LocalServices(workdir / "services")
    ep = services.start()
    worker = None
    stop = threading.Event()
    try:
        env = {k: v for k, v in os.environ.items() if not k.startswith("FLEET_")}
        env.update(ep.env(), FLEET_MODEL=str(model), FLEET_MODEL_NAME="tiny", FLEET_DEVICE="cpu",
                   FLEET_TORCH_THREADS="1", FLEET_LOCAL_FILES_ONLY="true", HF_HUB_OFFLINE="1",
                   FLEET_SPOOL_DIR=str(workdir / "spool"))  # fmt: skip
        kwargs: dict[str, Any] = {k.removeprefix("FLEET_").lower(): v for k, v in env.items()
                  if k.startswith("FLEET_")}  # fmt: skip
        settings = ProducerSettings(_env_file=None, **{**kwargs, "queue": QUEUE})
        with Client(settings) as client:
            specs = [JobSpec(prompt=f"window {i}", width=64, height=64, steps=1)
                     for i in range(args.jobs)]  # fmt: skip
            handles = client.submit_many(specs)
            events: list[dict[str, Any]] = []
            watcher = threading.Thread(target=monitor, args=(ep.redis_url, events, stop),
                                       daemon=True)  # fmt: skip
            watcher.start()
            log = (workdir / "worker.log").open("wb")
            worker = subprocess.Popen(  # nosec B603  # the documented worker command, no shell
                [sys.executable, "-m", "celery", "-A", "worker.app", "worker", "--pool",
                 "prefork", "--concurrency", "1", "--queues", QUEUE, "--hostname",
                 "window@localhost", "--loglevel", "INFO", "--without-gossip",
                 "--without-mingle"],
                cwd=REPO, env=env, stdout=log, stderr=subprocess.STDOUT,
            )  # fmt: skip
            statuses = client.wait([h.job_id for h in handles], timeout=60 + args.jobs * 2)
        stop.set()
        assert all(s.state == "succeeded" for s in statuses), "a job did not succeed"
        # Only pops made while the queue still held jobs: the last few may have blocked.
        measured = windows_ms(events)[: max(1, args.jobs - 5)]
        ordered = sorted(measured)
        report = {
            "jobs": args.jobs,
            "windows_measured": len(measured),
            "window_ms_median": round(statistics.median(ordered), 3),
            "window_ms_p99": round(ordered[int(0.99 * (len(ordered) - 1))], 3),
            "window_ms_max": round(ordered[-1], 3),
            "clock": "Redis MONITOR timestamps (BRPOP run -> HSET unacked run)",
            "worker": "prefork, concurrency 1, 64 px 1-step jobs, tiny model on CPU",
            "measured_at": time.strftime("%Y-%m-%dT%H:%M:%SZ"),
        }
    finally:
        stop.set()
        if worker is not None and worker.poll() is None:
            worker.terminate()
            try:
                worker.wait(30)
            except subprocess.TimeoutExpired:
                worker.kill()
        services.stop()
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(report, indent=2) + "\n")
    print(json.dumps(report, indent=2))


if __name__ == "__main__":
    main()
