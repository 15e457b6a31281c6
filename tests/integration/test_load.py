"""Load: thousands of the smallest jobs submitted in bulk and drained by two workers.

All complete, none lost, none generated twice (generations counted in the workers' logs), and
Redis's memory returns to its baseline once the results and claims expire. CI runs 300 jobs;
`scripts/soak` runs 10,000 (FLEET_LOAD_JOBS) and writes the figures to bench/load.json.
"""

from __future__ import annotations

import json
import os
import re
import time
import uuid
from collections import Counter
from pathlib import Path

import pytest

from fleet.contract import JobSpec
from fleet.localdev import LocalServices
from fleet.settings import ProducerSettings
from producer.bulk import submit_bulk
from producer.client import Client
from tests.fleet_fixtures import settings_kwargs, wait_until

pytestmark = pytest.mark.integration

JOBS = int(os.environ.get("FLEET_LOAD_JOBS", "300"))
#: Results and claims expire this soon in this test, so memory can be seen to come back.
TTL_S = 30
#: Redis's used_memory must come back to within this of its baseline once they expired.
BOUND_MB = 2.0
GENERATED = re.compile(r"\[job=(\S+) .*generated 1 image\(s\)")


def test_thousands_of_jobs_complete_once_each_and_redis_memory_comes_back(
    start_worker, tmp_path: Path
) -> None:
    services = LocalServices(tmp_path / "load-services")
    ep = services.start()
    try:
        env = {**ep.env(), "FLEET_RESULT_EXPIRES_S": str(TTL_S),
               "FLEET_JOB_CLAIM_TTL_S": str(TTL_S), "FLEET_PROGRESS_INTERVAL_S": "60"}  # fmt: skip
        settings = ProducerSettings(_env_file=None, **{**settings_kwargs(env), "queue": "load"})
        r = services.redis.client()
        baseline = r.info("memory")["used_memory"]
        workers = [start_worker(f"load{i}", queues="load", **env) for i in range(2)]
        run = uuid.uuid4().hex[:8]
        specs = [JobSpec(job_id=f"load-{run}-{i:05d}", prompt=f"load {i}", width=64, height=64,
                         steps=1) for i in range(JOBS)]  # fmt: skip
        started = time.monotonic()
        with Client(settings) as client:
            handles = submit_bulk(client, specs)
        submitted_s = time.monotonic() - started
        assert len(handles) == JOBS and not any(h.duplicate for h in handles)
        pending = {s.job_id for s in specs}
        peak = baseline
        states: Counter[str] = Counter()
        deadline = time.monotonic() + 60 + JOBS * 0.5
        while pending:  # results live TTL_S: each is read while it is there
            assert time.monotonic() < deadline, f"{len(pending)} of {JOBS} jobs never finished"
            ids = sorted(pending)[:2000]
            metas = r.mget([f"celery-task-meta-{i}" for i in ids])
            for job_id, meta in zip(ids, metas, strict=True):
                state = json.loads(meta)["status"] if meta else None
                if state in ("SUCCESS", "FAILURE"):
                    states[state] += 1
                    pending.discard(job_id)
            peak = max(peak, r.info("memory")["used_memory"])
            time.sleep(0.2)  # the sampling interval of the poll, not a wait for an event
        drained_s = time.monotonic() - started
        assert states == Counter({"SUCCESS": JOBS}), states
        # Every manifest stored, and each job generated exactly once (both workers' logs).
        stored = {k.split("/")[1] for k in _keys(services, "jobs/") if k.endswith("manifest.json")}
        assert stored == {s.job_id for s in specs}
        generations = Counter(m.group(1) for w in workers for m in GENERATED.finditer(w.log()))
        assert set(generations) == {s.job_id for s in specs}
        twice = {j: n for j, n in generations.items() if n != 1}
        assert not twice, f"generated more than once: {list(twice.items())[:5]}"
        assert all(w.log().count("] received:") > JOBS // 10 for w in workers)  # both drained
        for w in workers:
            w.stop()
        # Results and claims expire; Redis hands the memory back.
        wait_until(lambda: r.info("memory")["used_memory"] - baseline < BOUND_MB * 2**20,
                   TTL_S + 90, "Redis memory back near its baseline", interval=1.0)  # fmt: skip
        final = r.info("memory")["used_memory"]
        figures = {"jobs": JOBS, "submit_s": round(submitted_s, 2), "drain_s": round(drained_s, 1),
                   "jobs_per_s": round(JOBS / drained_s, 1), "workers": 2,
                   "redis_baseline_mb": round(baseline / 2**20, 2),
                   "redis_peak_mb": round(peak / 2**20, 2),
                   "redis_after_expiry_mb": round(final / 2**20, 2), "bound_mb": BOUND_MB,
                   "lost": 0, "generated_twice": 0}  # fmt: skip
        out = Path(os.environ.get("FLEET_LOAD_REPORT", str(tmp_path / "load.json")))
        out.parent.mkdir(parents=True, exist_ok=True)
        out.write_text(json.dumps(figures, indent=2) + "\n")
        print(json.dumps(figures))
    finally:
        services.stop()


def _keys(services: LocalServices, prefix: str) -> list[str]:
    s3 = services.s3.client()
    keys: list[str] = []
    for page in s3.get_paginator("list_objects_v2").paginate(Bucket="fleet", Prefix=prefix):
        keys += [o["Key"] for o in page.get("Contents", [])]
    return keys
