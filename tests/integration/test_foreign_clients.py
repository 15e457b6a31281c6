"""The message contract holds for services that do not import the project.

One sends with a bare Celery app and ``send_task`` by name; the other writes the Celery
protocol-2 JSON message into Redis with plain redis-py, as a service in another language would.
Both scripts run in a fresh interpreter and check that no project module was imported.
"""

from __future__ import annotations

import json
import subprocess
import sys
import textwrap
import uuid

import pytest

pytestmark = pytest.mark.integration

JOB = {"prompt": "a lighthouse", "width": 64, "height": 64, "steps": 2, "seed": "7"}

SEND_TASK = """
import json, sys
from celery import Celery
app = Celery(broker=sys.argv[1], backend=sys.argv[1])
app.conf.update(task_serializer="json", accept_content=["json"], result_accept_content=["json"])
job = json.loads(sys.argv[2])
res = app.send_task("fleet.generate", kwargs={"job": job}, queue="fleet", task_id=job["job_id"])
out = res.get(timeout=120)
assert not [m for m in sys.modules if m.split(".")[0] in ("producer", "worker")]
print(json.dumps(out))
"""

RAW_REDIS = """
import base64, json, sys, time, uuid
import redis
r = redis.Redis.from_url(sys.argv[1])
job = json.loads(sys.argv[2])
task_id = job["job_id"]
body = [[], {"job": job}, {"callbacks": None, "errbacks": None, "chain": None, "chord": None}]
message = {
    "body": base64.b64encode(json.dumps(body).encode()).decode(),
    "content-encoding": "utf-8",
    "content-type": "application/json",
    "headers": {
        "lang": "py", "task": "fleet.generate", "id": task_id, "root_id": task_id,
        "parent_id": None, "group": None, "retries": 0, "eta": None, "expires": None,
        "timelimit": [None, None], "argsrepr": "()", "kwargsrepr": "{}", "origin": "raw-redis",
        "shadow": None, "ignore_result": False,
    },
    "properties": {
        "correlation_id": task_id, "reply_to": "", "delivery_mode": 2,
        "delivery_info": {"exchange": "", "routing_key": "fleet"},
        "priority": 0, "body_encoding": "base64", "delivery_tag": str(uuid.uuid4()),
    },
}
r.lpush("fleet", json.dumps(message))
deadline = time.time() + 120
while time.time() < deadline:
    raw = r.get("celery-task-meta-" + task_id)
    if raw:
        meta = json.loads(raw)
        if meta["status"] in ("SUCCESS", "FAILURE"):
            break
    time.sleep(0.1)
assert not [m for m in sys.modules if m.split(".")[0] in ("producer", "worker")]
print(json.dumps(meta))
"""


def run_foreign(script: str, *args: str) -> dict:
    proc = subprocess.run(
        [sys.executable, "-c", textwrap.dedent(script), *args],
        capture_output=True, text=True, timeout=180, cwd="/",
    )  # fmt: skip
    assert proc.returncode == 0, proc.stderr
    return json.loads(proc.stdout)


def test_bare_send_task_by_name(worker, fleet_env, store) -> None:
    job = {**JOB, "job_id": f"sendtask-{uuid.uuid4().hex[:8]}"}
    result = run_foreign(SEND_TASK, fleet_env["FLEET_REDIS_URL"], json.dumps(job))
    assert result["schema_version"] == 1 and result["status"] == "succeeded"
    assert result["images"][0]["key"] == f"jobs/{job['job_id']}/image-000.png"
    assert result["images"][0]["seed"] == 7
    assert store.exists(result["images"][0]["key"])


def test_raw_protocol2_message_written_with_redis_py(worker, fleet_env, store) -> None:
    job = {**JOB, "job_id": f"raw-{uuid.uuid4().hex[:8]}"}
    meta = run_foreign(RAW_REDIS, fleet_env["FLEET_REDIS_URL"], json.dumps(job))
    assert meta["status"] == "SUCCESS", meta
    key = meta["result"]["images"][0]["key"]
    assert key == f"jobs/{job['job_id']}/image-000.png"
    assert store.exists(key)
    assert store.get_json(f"jobs/{job['job_id']}/manifest.json")["status"] == "succeeded"
