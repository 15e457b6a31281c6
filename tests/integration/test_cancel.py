"""`producer cancel` on a real worker: a running job stops at its next step, a queued job
never generates, both are recorded as cancelled, and the worker goes on."""

from __future__ import annotations

import subprocess
import sys
import time
import uuid

import pytest

from fleet import contract
from fleet.contract import JobSpec
from fleet.settings import ProducerSettings
from producer.client import Client
from tests.fleet_fixtures import settings_kwargs

pytestmark = pytest.mark.integration


def test_cancel_a_running_and_a_queued_job(start_worker, fleet_env: dict, store) -> None:
    queue = f"fleet.cancel-{uuid.uuid4().hex[:6]}"
    w = start_worker("cancel", queues=queue)
    settings = ProducerSettings(_env_file=None, **settings_kwargs(fleet_env))
    settings.queue = queue
    with Client(settings) as c:
        slow = c.submit(JobSpec(prompt="slow", width=256, height=256, steps=150))
        queued = c.submit(JobSpec(prompt="queued", width=64, height=64, steps=2))
        deadline = time.monotonic() + 60
        while f"[job={slow.job_id} " not in w.log() or "received" not in w.log():
            assert time.monotonic() < deadline, "slow job never started"
            time.sleep(0.05)
        time.sleep(0.3)  # inside the denoising loop
        cancelled_at = time.monotonic()
        env = {**fleet_env, "FLEET_QUEUE": queue}
        out = subprocess.run(
            [sys.executable, "-m", "producer", "cancel", slow.job_id, queued.job_id],
            env=env, capture_output=True, text=True,
        )  # fmt: skip
        assert out.returncode == 0, out.stderr
        st_slow, st_queued = c.wait([slow.job_id, queued.job_id], timeout=60)
        stopped_after = time.monotonic() - cancelled_at
        assert st_slow.state == "cancelled", st_slow
        assert st_queued.state == "cancelled", st_queued
        assert stopped_after < 10  # the 150-step job stopped, it did not run to the end
        assert "cancelled at step" in w.log()
        # No images are kept; the manifest records the cancellation.
        assert store.list_keys(contract.job_prefix(slow.job_id)) == [
            contract.manifest_key(slow.job_id)
        ]
        assert store.get_json(contract.manifest_key(slow.job_id))["status"] == "cancelled"
        assert not [ln for ln in w.log().splitlines()
                    if f"[job={queued.job_id} " in ln and "generated" in ln]  # fmt: skip
        # The worker goes on.
        assert (
            c.submit(JobSpec(prompt="after", width=64, height=64, steps=2)).wait(timeout=60).state
            == "succeeded"
        )
    assert w.proc.poll() is None
