"""FLEET_LOG_FORMAT=json: the worker loop's lines are JSON objects with job id, task id, queue
and device."""

from __future__ import annotations

import json
import uuid

import pytest

from fleet.contract import JobSpec
from fleet.settings import ProducerSettings
from producer.client import Client
from tests.fleet_fixtures import settings_kwargs

pytestmark = pytest.mark.integration


def test_worker_loop_logs_json_lines_with_job_fields(start_worker, fleet_env: dict) -> None:
    queue = f"fleet.json-{uuid.uuid4().hex[:6]}"
    w = start_worker("jsonlogs", queues=queue, FLEET_LOG_FORMAT="json")
    settings = ProducerSettings(_env_file=None, **settings_kwargs(fleet_env))
    settings.queue = queue
    with Client(settings) as c:
        handle = c.submit(JobSpec(prompt="logged", width=64, height=64, steps=2))
        assert handle.wait(timeout=60).state == "succeeded"
    records = []
    for line in w.log().splitlines():
        try:
            records.append(json.loads(line))
        except ValueError:
            continue
    mine = [r for r in records if isinstance(r, dict) and r.get("job_id") == handle.job_id]
    assert {"received", "generated", "stored"} <= {r["msg"].split("] ", 1)[1].split(":")[0]
                                                   .split(" ")[0] for r in mine}  # fmt: skip
    for r in mine:
        assert r["task_id"] == handle.job_id and r["queue"] == queue
        assert r["device"] and r["level"] and r["ts"]
