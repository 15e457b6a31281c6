"""The Redis part of the fault matrix: connections reset without a restart (``CLIENT KILL``)
with the workers idle and busy, and Redis paused (SIGSTOP) for 30 s with jobs running.

Each case runs a real fleet (real ``celery worker`` processes, the tiny pipeline) on a Redis and
a SeaweedFS of its own, since it breaks that Redis, and counts submitted, succeeded, failed,
lost and generated twice (tests/fault_tally.py): every case loses nothing and generates nothing
twice. celery#10205 and #10302 report workers that stop consuming after such resets on Celery
5.5-5.6; these are the regression tests for it on the Celery this fleet pins.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
import uuid
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager, suppress
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest
import redis
from celery.result import AsyncResult
from kombu.exceptions import OperationalError

from fleet.contract import JobSpec
from fleet.localdev import LocalServices
from fleet.settings import ProducerSettings
from producer.client import Client
from tests.conftest import own_fleet_env
from tests.fault_tally import assert_clean, cases, tally
from tests.fleet_fixtures import WorkerProcess, settings_kwargs, wait_until

pytestmark = pytest.mark.integration

#: A job sent 1 s after a fault must succeed within this long.
RECOVER_S = 60.0
#: Steps of a job that is still in the pipeline while the fault happens (~4 s on a 2-core VM).
LONG_STEPS = 60
#: How long Redis stays paused in the soak case.
PAUSE_S = 30.0


def job(steps: int) -> JobSpec:
    return JobSpec(prompt="a lighthouse in a gale", width=64, height=64, steps=steps)


@dataclass
class OwnFleet:
    services: LocalServices
    workers: list[WorkerProcess]
    client: Client
    env: dict[str, str]
    submitted: list[str] = field(default_factory=list)

    def logs(self) -> list[str]:
        return [w.log() for w in self.workers]

    def submit(self, steps: int, count: int = 1) -> list[str]:
        ids = [h.job_id for h in self.client.submit_many([job(steps) for _ in range(count)])]
        self.submitted += ids
        return ids

    def in_pipeline(self, job_ids: list[str]) -> list[str]:
        """The jobs whose denoising steps are under way (PROGRESS)."""
        app = self.client.celery
        return [j for j in job_ids if AsyncResult(j, app=app).state == "PROGRESS"]

    def answering(self) -> bool:
        """Every worker answers a remote-control ping (its pidbox, a pub/sub consumer)."""
        try:
            nodes = [w.node for w in self.workers]
            replies = self.client.celery.control.ping(destination=nodes, timeout=0.5)
        except (OSError, redis.RedisError, OperationalError):
            return False
        return {n for r in replies for n in r} == set(nodes)

    def alive(self) -> bool:
        return all(w.proc is not None and w.proc.poll() is None for w in self.workers)


@contextmanager
def own_fleet(
    tmp_path: Path, tiny_model: Path, workers: int = 1, **extra: str
) -> Iterator[OwnFleet]:
    services = LocalServices(tmp_path / "own-services")
    ep = services.start()
    env = own_fleet_env(ep.env(), tiny_model, FLEET_SPOOL_DIR=str(tmp_path / "spool"), **extra)
    tag = uuid.uuid4().hex[:4]
    procs = [WorkerProcess(f"redisfault{i}-{tag}@localhost", env, tmp_path / f"w{i}.log")
             for i in range(workers)]  # fmt: skip
    try:
        with ThreadPoolExecutor(workers) as pool:  # both load their pipeline at once
            list(pool.map(lambda w: w.start(), procs))
        with Client(ProducerSettings(_env_file=None, **settings_kwargs(env))) as c:
            yield OwnFleet(services, procs, c, env)
    finally:
        pid = services.redis.pid
        if pid is not None:
            with suppress(ProcessLookupError):
                os.kill(pid, signal.SIGCONT)  # a failed pause case must not leave it stopped
        for w in procs:
            w.stop()
        services.stop()


def client_kill(services: LocalServices, kind: str) -> int:
    """``CLIENT KILL TYPE kind``: Redis closes every such connection (not this one); how many."""
    admin = services.redis.client(socket_timeout=5)
    try:
        return int(admin.client_kill_filter(_type=kind))
    finally:
        admin.close()


def job_after(f: OwnFleet, fault_over_at: float) -> tuple[str, float]:
    """A short job sent 1 s after the fault: it succeeds within RECOVER_S of being sent.
    Returns its id and the seconds from the end of the fault to its success."""
    time.sleep(max(0.0, fault_over_at + 1.0 - time.monotonic()))  # the case: "1 s after"
    (job_id,) = f.submit(2)
    st = f.client.wait([job_id], timeout=RECOVER_S)[0]
    assert st.state == "succeeded", f"the job sent after the fault: {st}"
    return job_id, round(time.monotonic() - fault_over_at, 1)


def lost_connection(f: OwnFleet) -> int:
    return sum(log.count("Connection to broker lost") for log in f.logs())


def deliveries(f: OwnFleet) -> dict[str, int]:
    """Jobs delivered to a worker more than once (received, or found complete in storage)."""
    counts: dict[str, int] = {}
    for log in f.logs():
        for line in log.splitlines():
            if "[job=" in line and ("] received:" in line or "already complete" in line):
                job_id = line.split("[job=", 1)[1].split(" ", 1)[0]
                counts[job_id] = counts.get(job_id, 0) + 1
    return {j: n for j, n in counts.items() if n > 1}


def test_connection_resets_leave_an_idle_worker_consuming(tmp_path: Path, tiny_model: Path) -> None:
    """CLIENT KILL TYPE normal, then TYPE pubsub, in one idle worker's life: a job sent 1 s
    after each kill succeeds within 60 s, and the worker answers remote control again."""
    with own_fleet(tmp_path, tiny_model) as f:
        (warm,) = f.submit(2)
        assert f.client.wait([warm], timeout=120)[0].state == "succeeded"
        extra: dict[str, Any] = {}
        for kind in ("normal", "pubsub"):
            losses = lost_connection(f)
            killed = client_kill(f.services, kind)
            at = time.monotonic()
            assert killed >= 1, f"no {kind} connection to kill"
            _, extra[f"{kind}_job_done_s"] = job_after(f, at)
            wait_until(f.answering, RECOVER_S, f"the worker answering after the {kind} kill")
            extra[f"{kind}_ping_s"] = round(time.monotonic() - at, 1)
            extra[f"{kind}_killed"] = killed
            extra[f"{kind}_consumer_reconnects"] = lost_connection(f) - losses
        assert extra["normal_consumer_reconnects"] >= 1, "the kill did not reach the consumer"
        assert f.alive()
        fig = tally("redis-client-kill-idle", f.client, f.submitted, f.logs, **extra)
    assert_clean(fig)


def busy_round(f: OwnFleet, fault: Callable[[], float], name: str, extra: dict[str, Any]) -> None:
    """Two jobs in the pipeline (one per worker) and two queued behind them; ``fault`` breaks
    Redis and returns when it is over (monotonic); a job sent 1 s later succeeds in 60 s."""
    long_ids = f.submit(LONG_STEPS, count=2 * len(f.workers))
    wait_until(lambda: len(f.in_pipeline(long_ids)) >= len(f.workers), 120,
               "every worker with a job in the pipeline", interval=0.1)  # fmt: skip
    losses = lost_connection(f)
    over_at = fault()
    _, extra[f"{name}_job_done_s"] = job_after(f, over_at)
    wait_until(f.answering, RECOVER_S, f"every worker answering after {name}")
    extra[f"{name}_ping_s"] = round(time.monotonic() - over_at, 1)
    extra[f"{name}_consumer_reconnects"] = lost_connection(f) - losses


@pytest.mark.parametrize("fault", cases(ci=["client-kill"], soak_only=["pause-30s"]))
def test_a_redis_fault_while_jobs_run_generates_each_job_once(
    fault: str, tmp_path: Path, tiny_model: Path
) -> None:
    """Jobs in the pipeline and queued behind them while Redis drops every connection (CLIENT
    KILL TYPE normal, then TYPE pubsub) or stops answering for 30 s (SIGSTOP, SIGCONT), with
    the default visibility timeout and restore sweep: each job succeeds and is generated once,
    the workers go on consuming, and a job sent 1 s after the fault succeeds within 60 s."""
    extra: dict[str, Any] = {}
    with own_fleet(tmp_path, tiny_model, workers=2) as f:
        if fault == "client-kill":
            for kind in ("normal", "pubsub"):

                def kill(kind: str = kind) -> float:
                    extra[f"{kind}_killed"] = client_kill(f.services, kind)
                    assert extra[f"{kind}_killed"] >= 1, f"no {kind} connection to kill"
                    return time.monotonic()

                busy_round(f, kill, kind, extra)
            # A busy consumer is not reading its BRPOP socket: the normal kill reaches it when
            # redis-py reconnects quietly; the pubsub kill (its pidbox) makes it reconnect.
            reconnects = extra["normal_consumer_reconnects"] + extra["pubsub_consumer_reconnects"]
            assert reconnects >= len(f.workers), "the kills did not reach the consumers"
        else:
            busy_round(f, lambda: pause_redis(f, extra), "pause", extra)
        assert f.alive()
        extra["delivered_more_than_once"] = deliveries(f)
        fig = tally(f"redis-{fault}-busy", f.client, f.submitted, f.logs, **extra)
        held = f.services.redis.client(socket_timeout=5).hlen("unacked")
    assert_clean(fig)
    assert not extra["delivered_more_than_once"], "a running or queued job was delivered again"
    assert held == 0, f"{held} message(s) left unacknowledged after every job ended"


def pause_redis(f: OwnFleet, extra: dict[str, Any]) -> float:
    """SIGSTOP redis-server for PAUSE_S, with `producer submit` run meanwhile; SIGCONT."""
    pid = f.services.redis.pid
    assert pid is not None
    os.kill(pid, signal.SIGSTOP)
    stopped_at = time.monotonic()
    cli = subprocess.Popen(
        [sys.executable, "-m", "producer", "submit", "a paused lighthouse",
         "--width", "64", "--height", "64", "--steps", "2", "--json"],
        env=f.env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
    )  # fmt: skip
    ended_at = None
    while time.monotonic() - stopped_at < PAUSE_S:  # the case: 30 s paused (and a stopwatch)
        if ended_at is None and cli.poll() is not None:
            ended_at = time.monotonic()
        time.sleep(0.1)
    os.kill(pid, signal.SIGCONT)
    resumed_at = time.monotonic()
    out, err = cli.communicate(timeout=120)
    extra["producer_submit_during_pause"] = {
        "rc": cli.returncode,
        "returned_s_after_pause_began": round((ended_at or time.monotonic()) - stopped_at, 1),
        "returned_before_resume": ended_at is not None,
        "stderr": err.strip()[-300:],
    }
    if cli.returncode == 0:  # it enqueued its job once Redis answered: count that job too
        f.submitted += [entry["job_id"] for entry in json.loads(out)]
    return resumed_at
