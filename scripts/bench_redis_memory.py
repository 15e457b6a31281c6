"""Redis bytes per queued and per finished job, with Celery's result_extended on and off.

    .venv/bin/python scripts/bench_redis_memory.py [--jobs 2000] [--out bench/redis_memory.json]

Both settings are measured in the same run against a Redis of its own (fleet.localdev): jobs are
enqueued as the producer sends them, then results stored as a worker stores them.
"""

from __future__ import annotations

import argparse
import json
import tempfile
import time
import uuid
from pathlib import Path
from types import SimpleNamespace

from fleet.celeryconf import make_celery
from fleet.contract import JobSpec
from fleet.localdev import RedisServer
from fleet.settings import ProducerSettings


def measure(url: str, client, jobs: int, extended: bool) -> dict[str, float]:  # type: ignore[no-untyped-def]
    client.flushall()
    app = make_celery("bench-redis-memory", ProducerSettings(_env_file=None, redis_url=url))
    app.conf.result_extended = extended
    base = client.info("memory")["used_memory"]
    sent = []
    for i in range(jobs):
        spec = JobSpec(prompt=f"a red fox in the snow, number {i}", width=512, height=512)
        job = {**spec.model_dump(mode="json"), "submitted_at": time.time()}
        task_id = uuid.uuid4().hex
        app.send_task("fleet.generate", kwargs={"job": job}, queue="fleet", task_id=task_id)
        sent.append((task_id, job))
    queued = (client.info("memory")["used_memory"] - base) / jobs
    client.flushall()
    base = client.info("memory")["used_memory"]
    for task_id, job in sent:
        request = SimpleNamespace(
            id=task_id, args=[], kwargs={"job": job}, task="fleet.generate", hostname="gpu0@h",
            retries=0, delivery_info={"routing_key": "fleet"}, parent_id=None, root_id=task_id,
            group=None, chord=None, ignore_result=False, properties={}, reply_to=None,
            correlation_id=task_id, children=[],
        )  # fmt: skip
        result = {"job_id": task_id, "status": "succeeded", "bucket": "fleet",
                  "images": [{"index": 0, "key": f"jobs/{task_id}/image-000.png", "seed": 1,
                              "width": 512, "height": 512, "url": None}],
                  "worker": {"node": "gpu0@h", "device": "cuda:0"},
                  "timings": {"generate_s": 1.0, "total_s": 1.1}}  # fmt: skip
        app.backend.store_result(task_id, result, "SUCCESS", request=request)
    finished = (client.info("memory")["used_memory"] - base) / jobs
    app.close()
    return {"bytes_per_queued_job": round(queued), "bytes_per_finished_job": round(finished)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--jobs", type=int, default=2000)
    parser.add_argument("--out", type=Path, default=Path("bench/redis_memory.json"))
    args = parser.parse_args()
    with RedisServer(Path(tempfile.mkdtemp(prefix="bench-redis-"))) as server:
        client = server.client()
        figures = {
            f"result_extended_{'on' if extended else 'off'}": measure(
                server.url, client, args.jobs, extended
            )
            for extended in (True, False)
        }
    report = {"jobs": args.jobs, "measured_at": time.strftime("%Y-%m-%dT%H:%M:%SZ"), **figures}
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(report, indent=2) + "\n")
    print(json.dumps(report, indent=2))


if __name__ == "__main__":
    main()
