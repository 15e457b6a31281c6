"""The storage and disk part of the fault matrix: S3 slow (slower than boto3's read timeout too),
S3 answering ``503 SlowDown``, and the spool folder full or read-only while S3 is down.

One real ``celery worker`` (the tiny pipeline) on a Redis and a SeaweedFS of this module's own
talks to S3 through :class:`tests.fault_proxies.StorageProxy`, a real TCP server that delays,
answers SlowDown or goes down on cue; the producer talks to SeaweedFS directly. The worker's
life carries every case: each starts and ends with the proxy healthy and the worker idle.
Every case counts submitted, succeeded, failed, lost and generated twice
(tests/fault_tally.py): none loses a job or generates one twice.
"""

from __future__ import annotations

import errno
import os
import subprocess
import time
import uuid
from collections.abc import Iterator
from contextlib import contextmanager, suppress
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest

from fleet import contract
from fleet.contract import JobSpec
from fleet.localdev import LocalServices
from fleet.settings import ProducerSettings
from producer.client import Client
from tests.conftest import own_fleet_env
from tests.fault_proxies import StorageProxy
from tests.fault_tally import assert_clean, cases, tally
from tests.fleet_fixtures import WorkerProcess, settings_kwargs, wait_until

pytestmark = pytest.mark.integration

#: The worker's storage settings: boto3 gives up after 2 attempts, the fleet retries every 1-2 s
#: for 20 s. boto3's read timeout is fleet/storage.py's 30 s (no setting).
WINDOW_S = 20.0
WORKER_ENV = {
    "FLEET_S3_MAX_ATTEMPTS": "2",
    "FLEET_STORAGE_RETRY_BACKOFF_MAX_S": "2",
    "FLEET_STORAGE_RETRY_WINDOW_S": f"{WINDOW_S:g}",
}
READ_TIMEOUT_S = 30.0


def job() -> JobSpec:
    return JobSpec(prompt="a harbour in the fog", width=64, height=64, steps=2)


def settle(client: Client, job_ids: list[str], timeout: float) -> None:
    """Wait until every job ended, or ``timeout`` passed (then tally counts the rest lost)."""
    with suppress(TimeoutError):
        wait_until(lambda: all(client.status(j).done for j in job_ids), timeout,
                   "every job ending", interval=0.2)  # fmt: skip


@dataclass
class StorageFleet:
    services: LocalServices
    proxy: StorageProxy
    worker: WorkerProcess
    client: Client
    spool: Path

    def submit(self, count: int) -> list[str]:
        return [h.job_id for h in self.client.submit_many([job() for _ in range(count)])]

    def logs(self) -> list[str]:
        return [self.worker.log()]

    def lines(self, job_id: str, text: str) -> int:
        """Lines of the worker's log about this job (the runner's ``[job=ID task=..]`` and the
        policies' and spool's ``[job=ID]``) that say ``text``."""
        tags = (f"[job={job_id} ", f"[job={job_id}]")
        return sum(1 for ln in self.worker.log().splitlines()
                   if any(t in ln for t in tags) and text in ln)  # fmt: skip

    def manifest(self, job_id: str) -> dict[str, Any]:
        got = self.client.store.get_json(contract.manifest_key(job_id))
        assert isinstance(got, dict), f"no manifest for {job_id}"
        return got


@pytest.fixture(scope="module")
def fleet(tmp_path_factory: pytest.TempPathFactory, tiny_model: Path) -> Iterator[StorageFleet]:
    base = tmp_path_factory.mktemp("storage-faults")
    services = LocalServices(base / "own-services")
    ep = services.start()
    proxy = StorageProxy(ep.s3_endpoint_url).start()
    spool = base / "spool"
    spool.mkdir()
    env = own_fleet_env({**ep.env(), "FLEET_S3_ENDPOINT_URL": proxy.url}, tiny_model,
                        FLEET_SPOOL_DIR=str(spool), **WORKER_ENV)  # fmt: skip
    w = WorkerProcess(f"s3fault-{uuid.uuid4().hex[:4]}@localhost", env, base / "w.log")
    try:
        w.start()
        # The producer reads and counts in SeaweedFS itself, never through the proxy.
        with Client(ProducerSettings(_env_file=None, **settings_kwargs(ep.env()))) as c:
            warm = c.submit(job())
            assert warm.wait(timeout=90).state == "succeeded"  # canary passed, pipeline warm
            yield StorageFleet(services, proxy, w, c, spool)
    finally:
        w.stop()
        proxy.stop()
        services.stop()


@pytest.fixture()
def healthy(fleet: StorageFleet) -> Iterator[StorageFleet]:
    """The proxy healthy before and after the case (also when the case failed)."""
    fleet.proxy.clear()
    fleet.proxy.up()
    yield fleet
    fleet.proxy.clear()
    fleet.proxy.up()


# -- 1. S3 slow ---------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("case", "delay_s", "for_s", "requests", "jobs"),
    cases(
        # Every answer 2 s late, well inside the 30 s read timeout: slow, nothing retried.
        ci=[("s3-slow-2s", 2.0, None, None, 3)],
        soak_only=[
            # One answer later than the read timeout (the upload was done; boto3 gave up on it
            # and sent it again): boto3's retry stores it, no fleet retry.
            ("s3-beyond-read-timeout-once", READ_TIMEOUT_S + 2, None, 1, 1),
            # Every answer later than the read timeout for 40 s: both of boto3's attempts time
            # out, the fleet retries, and the retry stores the PNGs it kept (not generated again).
            ("s3-beyond-read-timeout-40s", READ_TIMEOUT_S + 2, 40.0, None, 1),
        ],
    ),
)
def test_slow_s3_answers_store_every_job_once(
    healthy: StorageFleet,
    case: str,
    delay_s: float,
    for_s: float | None,
    requests: int | None,
    jobs: int,
) -> None:
    f = healthy
    began = time.monotonic()
    before = f.proxy.snapshot()
    f.proxy.delay(delay_s, for_s=for_s, requests=requests)
    ids = f.submit(jobs)
    settle(f.client, ids, timeout=60 + 3 * delay_s)
    after = f.proxy.snapshot()
    fig = tally(case, f.client, ids, f.logs, timeout=10, seconds=round(time.monotonic() - began, 1),
                delay_s=delay_s, delay_for_s=for_s, delayed_requests=requests,
                delayed=after.delayed - before.delayed,
                forwarded=after.forwarded - before.forwarded)  # fmt: skip
    assert_clean(fig)
    retried = [j for j in ids if f.lines(j, "storage unavailable")]
    for job_id in ids:
        upload_s = f.manifest(job_id)["result"]["timings"]["upload_s"]
        if job_id not in retried:  # its image upload waited for a delayed answer
            assert upload_s >= min(delay_s, READ_TIMEOUT_S), (job_id, upload_s)
    if delay_s < READ_TIMEOUT_S:
        assert retried == [], f"{case}: a slow answer inside the read timeout made a retry"
        assert fig.extra["delayed"] >= 2 * jobs  # the image and the manifest of each job
    elif requests == 1:
        assert retried == [], f"{case}: boto3's own retry should have stored it"
        # The image upload twice (the timed-out one was done upstream), then the manifest.
        assert fig.extra["forwarded"] == 3, fig.extra
    else:
        assert retried == ids, f"{case}: both boto3 attempts timed out, the fleet retries"
        for job_id in ids:
            assert f.lines(job_id, "reusing 1 image(s) generated before storage failed") >= 1


# -- 2. S3 answering 503 SlowDown ---------------------------------------------------------------


@pytest.mark.parametrize(
    ("case", "for_s", "requests", "jobs", "ends"),
    cases(
        ci=[
            # One SlowDown: boto3's standard mode retries it (throttling), no fleet retry.
            ("s3-slowdown-1-request", None, 1, 1, "boto3"),
            # Two: FLEET_S3_MAX_ATTEMPTS=2 is two attempts (not two retries), so the fleet
            # retries once, from the spool.
            ("s3-slowdown-2-requests", None, 2, 1, "fleet"),
            # SlowDown for 6 s: boto3 gives up after 2 attempts, the fleet's backoff takes over
            # and the retries store the PNGs kept in the spool.
            ("s3-slowdown-6s", 6.0, None, 3, "fleet"),
        ],
        soak_only=[
            # SlowDown past the 20 s retry window: a recorded failure naming SlowDown.
            ("s3-slowdown-past-the-window", WINDOW_S + 12, None, 1, "failed"),
        ],
    ),
)
def test_s3_slowdown_is_retried_by_boto3_then_by_the_fleet(
    healthy: StorageFleet,
    case: str,
    for_s: float | None,
    requests: int | None,
    jobs: int,
    ends: str,
) -> None:
    f = healthy
    began = time.monotonic()
    before = f.proxy.snapshot()
    f.proxy.slowdown(for_s=for_s, requests=requests)
    ids = f.submit(jobs)
    settle(f.client, ids, timeout=60 + 2 * (for_s or 0))
    fig = tally(case, f.client, ids, f.logs, timeout=10, expect_failed=ids if ends == "failed"
                else [], seconds=round(time.monotonic() - began, 1), slowdown_for_s=for_s,
                slowdown_requests=requests,
                slowed_down=f.proxy.snapshot().slowed_down - before.slowed_down)  # fmt: skip
    retried = [j for j in ids if f.lines(j, "storage unavailable")]
    if ends == "failed":
        assert_clean(fig, succeeded=0)
        assert fig.failed == jobs and "unexpected_failures" not in fig.extra
        (entry,) = [e for e in f.client.failed() if e["job_id"] == ids[0]]
        assert entry["error_type"] == "StorageUnavailable"
        assert "storage unreachable for" in entry["error"] and "SlowDown" in entry["error"]
        assert not (f.spool / ids[0]).exists()
        return
    assert_clean(fig)
    if ends == "boto3":
        assert fig.extra["slowed_down"] == 1
        assert retried == [], f"{case}: boto3's retry should have absorbed one SlowDown"
    else:
        assert fig.extra["slowed_down"] >= 2 * len(retried) > 0
        for job_id in retried:  # not generated again (tally counted that), stored from the spool
            assert f.lines(job_id, "reusing 1 image(s) generated before storage failed") >= 1


# -- 3. The spool folder full or read-only while S3 is down -------------------------------------


@contextmanager
def spool_fault(spool: Path, kind: str) -> Iterator[dict[str, Any]]:
    """A 256 KiB tmpfs over the spool folder, filled up (``full``) or remounted read-only."""
    subprocess.run(["mount", "-t", "tmpfs", "-o", "size=256k", "tmpfs", str(spool)], check=True)
    try:
        if kind == "full":
            with (spool / "filler").open("wb", buffering=0) as filler:
                try:
                    while True:
                        filler.write(b"\0" * 4096)
                        filler.flush()
                except OSError as exc:
                    assert exc.errno == errno.ENOSPC
        else:
            subprocess.run(["mount", "-o", "remount,ro", str(spool)], check=True)
        probe = spool / f"probe-{uuid.uuid4().hex}"
        with pytest.raises(OSError) as refused:  # the fault is real: root cannot write either
            probe.write_bytes(b"x" * 8192)
        with suppress(OSError):
            probe.unlink()  # a full disk still made the empty file
        yield {"errno": errno.errorcode[refused.value.errno or 0],
               "free_bytes": os.statvfs(spool).f_bavail * os.statvfs(spool).f_frsize}  # fmt: skip
    finally:
        subprocess.run(["umount", "-l", str(spool)], check=True)


@pytest.mark.parametrize(
    ("case", "kind", "outage_s", "ends"),
    cases(
        ci=[
            ("spool-full-s3-down-6s", "full", 6.0, "succeeded"),
            ("spool-read-only-s3-down-6s", "ro", 6.0, "succeeded"),
        ],
        soak_only=[
            # Down past the 20 s retry window: recorded failures, the kept PNGs dropped.
            ("spool-full-s3-down-past-the-window", "full", WINDOW_S + 12, "failed"),
        ],
    ),
)
def test_a_spool_that_cannot_be_written_keeps_the_pngs_in_memory_while_s3_is_down(
    healthy: StorageFleet, case: str, kind: str, outage_s: float, ends: str
) -> None:
    f = healthy
    with spool_fault(f.spool, kind) as fault:
        began = time.monotonic()
        f.proxy.down()
        ids = f.submit(2)
        for job_id in ids:
            wait_until(lambda j=job_id: f.lines(j, "storage unavailable")
                       and f.lines(j, "in memory for its retries"), 60,
                       f"{job_id}: a storage retry with its PNGs kept in memory")  # fmt: skip
        time.sleep(max(0.0, outage_s - (time.monotonic() - began)))  # the outage is the case
        f.proxy.up()
        settle(f.client, ids, timeout=60)
        fig = tally(case, f.client, ids, f.logs, timeout=10, outage_s=outage_s,
                    expect_failed=ids if ends == "failed" else [],
                    seconds=round(time.monotonic() - began, 1), **fault)  # fmt: skip
        left = sorted(p.name for p in f.spool.iterdir())
    assert left == (["filler"] if kind == "full" else []), "a partial spool left behind"
    if ends == "failed":
        assert_clean(fig, succeeded=0)
        assert fig.failed == len(ids) and "unexpected_failures" not in fig.extra
        entries = {e["job_id"]: e for e in f.client.failed() if e["job_id"] in ids}
        assert sorted(entries) == sorted(ids)
        for entry in entries.values():
            assert entry["error_type"] == "StorageUnavailable"
            assert "storage unreachable for" in entry["error"]
    else:
        assert_clean(fig)
    for job_id in ids:
        assert f.lines(job_id, "reusing 1 image(s) generated before storage failed") >= 1
        assert f.lines(job_id, f"spool dir {f.spool} cannot be written") >= 1
        assert f.lines(job_id, "free space on it or set FLEET_SPOOL_DIR") >= 1
