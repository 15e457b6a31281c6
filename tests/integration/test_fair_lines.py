"""The tenants' fair lines and the dispatcher's sweep, on a real Redis (a database of this
module's own, so no gateway of another test dispatches from it)."""

from __future__ import annotations

import time
import uuid
from collections.abc import Iterator
from typing import Any

import pytest
import redis
from celery import Celery

from fleet import contract
from fleet.celeryconf import make_celery
from fleet.settings import ProducerSettings
from producer.gateway.fairshare import DISPATCHING_KEY, Dispatcher, FairLines, LineJob
from tests.fleet_fixtures import settings_kwargs

pytestmark = pytest.mark.integration


@pytest.fixture(scope="module")
def redis_url(fleet_env: dict) -> str:
    return fleet_env["FLEET_REDIS_URL"].rsplit("/", 1)[0] + "/11"


@pytest.fixture()
def lines(redis_url: str) -> Iterator[FairLines]:
    client = redis.Redis.from_url(redis_url)
    client.flushdb()
    yield FairLines(client, claim_ttl_s=600)
    client.close()


@pytest.fixture()
def celery(redis_url: str, fleet_env: dict) -> Iterator[Celery]:
    """A Celery app on this module's Redis database, for the dispatcher to send with."""
    settings = ProducerSettings(_env_file=None, **{**settings_kwargs(fleet_env),
                                                    "redis_url": redis_url,
                                                    "result_backend_url": redis_url})  # fmt: skip
    app = make_celery("fleet-test", settings)
    yield app
    app.close()


def job(tenant: str, queue: str, priority: int = 5) -> LineJob:
    job_id = uuid.uuid4().hex
    return LineJob(job_id=job_id, tenant=tenant, queue=queue, priority=priority,
                   message={"job_id": job_id, "prompt": "x"}, soft_time_limit=60,
                   time_limit=90, expires_at=None)  # fmt: skip


def add(lines: FairLines, j: LineJob, cap: int = 0) -> int:
    return lines.add(j, "{}", cap)[0]


def test_tenants_take_turns_and_each_tenants_priorities_order_its_own_jobs(
    lines: FairLines,
) -> None:
    q = "fleet.lines"
    flood = [job("a", q, 9) for _ in range(6)]
    for j in flood:
        assert add(lines, j) == 1
    b_low, b_high = job("b", q, 1), job("b", q, 8)
    add(lines, b_low)
    add(lines, b_high)
    order = []
    while (popped := lines.pop(q)) is not None:
        order.append(popped)
    assert [j.tenant for j in order] == ["a", "b", "a", "b", "a", "a", "a", "a"]
    assert [j.job_id for j in order if j.tenant == "b"] == [b_high.job_id, b_low.job_id]
    assert [j.job_id for j in order if j.tenant == "a"] == [j.job_id for j in flood]  # FIFO


def test_a_tenant_new_to_the_ring_goes_before_the_one_served_last(lines: FairLines) -> None:
    q = "fleet.lines"
    for _ in range(4):
        add(lines, job("a", q))
    assert lines.pop(q).tenant == "a"  # type: ignore[union-attr]
    late = job("c", q)
    add(lines, late)
    assert lines.pop(q).job_id == late.job_id  # type: ignore[union-attr]


def test_the_cap_the_claim_the_cancel_and_the_place_in_line(lines: FairLines) -> None:
    q = "fleet.lines"
    first, second, third = job("a", q), job("a", q), job("a", q)
    assert add(lines, first, cap=2) == 1 and add(lines, second, cap=2) == 1
    assert add(lines, third, cap=2) == -1  # the cap: nothing claimed
    assert not lines.redis.exists(contract.CLAIM_KEY.format(job_id=third.job_id))
    assert lines.add(first, "{}", 0)[0] == 0  # the same id again: its claim, nothing added
    assert lines.waiting("a") == 2
    other = job("b", q)
    add(lines, other)
    assert lines.place(first) == 0 and lines.place(second) == 2  # b's turn comes between
    assert lines.cancel(second) and not lines.cancel(second)
    assert lines.waiting("a") == 1 and lines.place(second) is None
    popped = [lines.pop(q), lines.pop(q), lines.pop(q)]
    assert [p.job_id if p else None for p in popped] == [first.job_id, other.job_id, None]


def test_a_job_taken_from_its_line_and_never_sent_is_sent_by_the_sweep_once(
    lines: FairLines, celery: Celery
) -> None:
    q = f"fleet.sweep-{uuid.uuid4().hex[:6]}"
    dispatcher = Dispatcher(lines, celery, depth=1)
    lost, sent = job("a", q), job("a", q)
    add(lines, lost)
    add(lines, sent)
    assert lines.pop(q).job_id == lost.job_id  # type: ignore[union-attr]  # then "died"
    dispatcher.send(lines.pop(q))  # type: ignore[arg-type]
    assert lines.depth(q) == 1
    old = time.time() - 120
    lines.redis.hset(DISPATCHING_KEY, mapping={lost.job_id: old, sent.job_id: old})
    dispatcher.sweep()
    assert lines.depth(q) == 2  # the lost one sent, the sent one not again
    assert lines.redis.hlen(DISPATCHING_KEY) == 0
    dispatcher.sweep()
    assert lines.depth(q) == 2
    queued: list[Any] = []
    for key in contract.queue_keys(q):
        queued += lines.redis.lrange(key, 0, -1)
    assert sum(lost.job_id.encode() in m for m in queued) == 1
    assert sum(sent.job_id.encode() in m for m in queued) == 1


def test_the_dispatcher_fills_a_queue_up_to_its_depth_woken_by_the_new_jobs_queue(
    lines: FairLines, celery: Celery
) -> None:
    q = f"fleet.room-{uuid.uuid4().hex[:6]}"
    dispatcher = Dispatcher(lines, celery, depth=2)
    assert lines.take(q, 2) == (None, False)  # nothing waiting
    jobs = [job("a", q) for _ in range(3)]
    for j in jobs:
        add(lines, j)
    # The new job's queue is the wake-up's value: the dispatcher sends for it first.
    assert lines.redis.lrange("fleet:fair:notify", 0, -1) == [q.encode()]
    assert dispatcher.tick(first=q) == 2 and lines.depth(q) == 2
    assert dispatcher.full  # the third waits behind a full queue
    assert lines.take(q, 2) == (None, True) and lines.waiting("a") == 1
    # A worker takes one: a place is free, and the third goes.
    assert any(lines.redis.rpop(key) for key in contract.queue_keys(q))
    assert lines.depth(q) == 1
    assert dispatcher.tick() == 1 and lines.depth(q) == 2 and lines.waiting("a") == 0
    assert not dispatcher.full and dispatcher.tick() == 0
    assert lines.redis.hlen(DISPATCHING_KEY) == 0
