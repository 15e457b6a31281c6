"""An error quotes a value, never a megabyte: a job with a 1 MB prompt, sent straight to the
queue (as a client that skips the producer's validation would) or given to the producer, fails
with records of a few hundred bytes that name the field, and the worker goes on."""

from __future__ import annotations

import json
import subprocess
import sys
import uuid
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

from fleet import contract
from fleet.contract import JobStatus
from fleet.errors import JobValidationError
from fleet.settings import ProducerSettings
from producer.client import Client
from tests.fleet_fixtures import REPO, settings_kwargs, wait_until

pytestmark = pytest.mark.integration

TIMEOUT = 120
#: Most bytes any record of the failed job may take (the prompt alone is 1,000,000).
SMALL = 10_000
BIG_PROMPT = "a" * 1_000_000
#: What every record of it says: the field, the start of the value and its length.
QUOTED = f"prompt='{'a' * 80}…' (1,000,000 characters)"


@dataclass
class Sent:
    """The oversized job and the valid one sent right after it, both done."""

    client: Client
    big_id: str
    big: JobStatus
    after: JobStatus
    log: str


def send_raw(client: Client, job: dict) -> None:  # type: ignore[type-arg]
    """Enqueue a job by task name, skipping the producer's validation (a foreign client)."""
    client.celery.send_task(contract.TASK_GENERATE, kwargs={"job": job},
                            queue=contract.DEFAULT_QUEUE, task_id=job["job_id"])  # fmt: skip


@pytest.fixture(scope="module")
def sent(worker, fleet_env: dict) -> Iterator[Sent]:  # type: ignore[no-untyped-def,type-arg]
    settings = ProducerSettings(_env_file=None, **settings_kwargs(fleet_env))
    with Client(settings) as client:
        big_id, after_id = f"big-{uuid.uuid4().hex[:8]}", f"after-{uuid.uuid4().hex[:8]}"
        log_start = len(worker.log())
        send_raw(client, {"job_id": big_id, "prompt": BIG_PROMPT, "width": 64, "height": 64,
                          "steps": 2})  # fmt: skip
        send_raw(client, {"job_id": after_id, "prompt": "a fox, right after", "width": 64,
                          "height": 64, "steps": 2})  # fmt: skip
        big = wait_until(lambda: done(client, big_id), TIMEOUT, "the oversized job to end")
        after = wait_until(lambda: done(client, after_id), TIMEOUT, "the next job to end")
        # Celery logs the task's failure after it stored the result: wait for that line too.
        failed_line = f"{contract.TASK_GENERATE}[{big_id}] raised"
        wait_until(lambda: failed_line in worker.log(), 30, "the worker to log the failure")
        yield Sent(client, big_id, big, after, worker.log()[log_start:])


def done(client: Client, job_id: str) -> JobStatus | None:
    status = client.status(job_id)
    return status if status.done else None


def size(record: object) -> int:
    return len(json.dumps(record).encode())


def largest(record: dict) -> str:  # type: ignore[type-arg]
    """The biggest parts of a record, for the failure message: what to cut."""
    parts = sorted(((size(v), k) for k, v in record.items()), reverse=True)[:3]
    return "largest parts: " + ", ".join(f"{k}: {n:,} bytes" for n, k in parts)


def test_the_status_and_the_failure_entry_are_small_and_the_worker_goes_on(sent: Sent) -> None:
    assert sent.big.state == "failed", sent.big.detail
    assert sent.big.result is not None and sent.big.result.error
    assert QUOTED in sent.big.result.error
    assert "the prompt has 1,000,000 characters; at most 2,000 are allowed" in sent.big.result.error
    assert size(sent.big.model_dump(mode="json")) < SMALL
    entry = sent.client.store.get_json(contract.failure_key(sent.big_id))
    assert entry is not None and entry["error_type"] == "JobValidationError"
    assert QUOTED in entry["error"]
    assert size(entry) < SMALL
    # The valid job sent right after it succeeded.
    assert sent.after.state == "succeeded", sent.after
    assert sent.after.result is not None and len(sent.after.result.images) == 1


def test_the_failure_manifest_is_small(sent: Sent) -> None:
    manifest = sent.client.store.get_json(contract.manifest_key(sent.big_id))
    assert manifest is not None and manifest["status"] == "failed"
    assert QUOTED in manifest["error"]
    assert size(manifest) < SMALL, largest(manifest)


def test_the_celery_result_in_redis_is_small(sent: Sent) -> None:
    backend = sent.client.celery.backend
    raw = backend.get(backend.get_key_for_task(sent.big_id))
    assert raw is not None
    meta = json.loads(raw)
    assert meta["status"] == "FAILURE"
    assert QUOTED in json.dumps(meta["result"], ensure_ascii=False)
    assert len(raw) < SMALL, largest(meta)


def test_the_worker_log_quotes_it_short(sent: Sent) -> None:
    assert QUOTED in sent.log
    assert len(sent.log.encode()) < 5 * SMALL


def test_the_producer_refuses_it_with_a_short_error(fleet_env: dict, tmp_path: Path) -> None:  # type: ignore[type-arg]
    prompts = tmp_path / "prompts.txt"
    prompts.write_text(f"a fox\n{BIG_PROMPT}\n")
    command = [sys.executable, "-m", "producer", "submit", "--file", str(prompts)]
    proc = subprocess.run(command, env=fleet_env, capture_output=True, text=True, timeout=60,
                          cwd=REPO)  # fmt: skip
    assert proc.returncode == 2, proc.stderr[:400]
    assert len(proc.stderr) < 400, proc.stderr[:400]
    assert QUOTED in proc.stderr
    assert proc.stdout == ""  # no job id printed: nothing was enqueued, not even "a fox"

    settings = ProducerSettings(_env_file=None, **settings_kwargs(fleet_env))
    with Client(settings) as client, pytest.raises(JobValidationError) as info:
        client.submit({"prompt": BIG_PROMPT})
    assert len(str(info.value)) < 400 and QUOTED in str(info.value)


@pytest.mark.parametrize(
    ("field", "bad", "what"),
    [("prompt", "\ud800", "a lone surrogate"), ("negative_prompt", "\x00", "a NUL character")],
)
def test_the_worker_refuses_text_that_is_not_text_naming_the_field(
    worker, client: Client, field: str, bad: str, what: str
) -> None:  # type: ignore[no-untyped-def]
    job_id = f"text-{uuid.uuid4().hex[:8]}"
    job = {"job_id": job_id, "prompt": "a fox", "width": 64, "height": 64, "steps": 2}
    send_raw(client, {**job, field: f"a fox{bad}"})
    status = wait_until(lambda: done(client, job_id), TIMEOUT, "the job to end")
    assert status.state == "failed" and status.result is not None
    assert status.result.error_type == "JobValidationError", status.result.error
    assert f"{field}='a fox\\" in (status.result.error or "")
    assert f"contains {what} (" in (status.result.error or "")
