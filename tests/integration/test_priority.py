"""Priorities: a high-priority job overtakes queued low-priority ones; stats count every
priority sub-queue."""

from __future__ import annotations

import uuid

import pytest

from fleet.contract import JobSpec
from fleet.errors import JobValidationError
from fleet.settings import ProducerSettings
from producer.client import Client
from tests.fleet_fixtures import settings_kwargs

pytestmark = pytest.mark.integration


def test_high_priority_overtakes_queued_low_priority_jobs(start_worker, fleet_env: dict) -> None:
    queue = f"fleet.prio-{uuid.uuid4().hex[:6]}"
    settings = ProducerSettings(_env_file=None, **settings_kwargs(fleet_env))
    settings.queue = queue
    with Client(settings) as c:
        spec = dict(width=64, height=64, steps=2)
        low = c.submit_many([JobSpec(prompt=f"low {i}", **spec) for i in range(5)], priority=1)
        normal = c.submit(JobSpec(prompt="normal", **spec))
        high = c.submit(JobSpec(prompt="high", **spec), priority=9)
        assert c.stats()["queues"][queue] == 7  # counted over the priority sub-queues
        with pytest.raises(JobValidationError, match="priority=10"):
            c.submit(JobSpec(prompt="x", **spec), priority=10)
        start_worker("prio", queues=queue)
        ids = [high.job_id, normal.job_id] + [h.job_id for h in low]
        statuses = c.wait(ids, timeout=120)
        assert {s.state for s in statuses} == {"succeeded"}
        finished = {
            s.job_id: c.store.get_json(s.result.manifest_key)["finished_at"] for s in statuses
        }
        order = sorted(finished, key=finished.__getitem__)
        assert order[0] == high.job_id
        assert order[1] == normal.job_id
        assert order[2:] == [h.job_id for h in low]  # first in, first out within a priority


def test_a_job_a_worker_reserved_reads_as_next_not_as_an_unknown_place(fleet_env: dict) -> None:
    """A job taken from its queue by a consumer that has not acknowledged it (kombu's unacked
    hash: a worker's prefetched message) is no longer in any queue list: its place is 0, next
    at that worker, not unknown."""
    queue = f"reserve-{uuid.uuid4().hex[:6]}"
    settings = ProducerSettings(
        _env_file=None, **settings_kwargs({**fleet_env, "FLEET_QUEUE": queue})
    )
    with Client(settings) as client:
        first, second = client.submit_many([JobSpec(prompt=f"reserved {i}", steps=2)
                                            for i in range(2)])  # fmt: skip
        [a, b] = client.with_queue_positions([client.status(first.job_id),
                                              client.status(second.job_id)])  # fmt: skip
        assert (a.ahead, b.ahead) == (0, 1)
        with client.celery.connection_for_read() as conn:
            channel = conn.channel()
            taken = channel.basic_get(queue, no_ack=False)  # as a worker's prefetch takes it
            assert taken is not None and taken.headers["id"] == first.job_id
            try:
                [a, b] = client.with_queue_positions([client.status(first.job_id),
                                                      client.status(second.job_id)])  # fmt: skip
                assert a.state == "queued" and a.ahead == 0 and "reserved" in (a.detail or "")
                assert b.ahead == 0  # the job before it left the queue list
            finally:
                taken.ack()
                channel.close()
