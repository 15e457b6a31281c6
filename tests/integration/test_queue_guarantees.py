"""What a queue entry can and cannot do to the fleet, from senders that are not the producer.

Entries are pushed into the queue lists the way a buggy client in another language would, and
jobs are sent from a stock ``celery[redis]`` app that has none of the fleet's code.
"""

from __future__ import annotations

import itertools
import json
import subprocess
import sys
import textwrap
import uuid

import pytest

from fleet import contract
from fleet.contract import JobSpec
from producer.client import Client
from tests.integration.test_reliability import (
    FAST_REDELIVERY,
    kill_pool_child_mid_job,
    raw_message,
    received,
)

pytestmark = pytest.mark.integration


def small(prompt: str = "x", steps: int = 2) -> JobSpec:
    return JobSpec(prompt=prompt, width=64, height=64, steps=steps)


def order_received(w, job_ids: list[str]) -> list[str]:  # type: ignore[no-untyped-def]
    """The given jobs in the order the worker's log says it started them (first start)."""
    seen: list[str] = []
    for line in w.log().splitlines():
        if "] received:" not in line:
            continue
        for job_id in job_ids:
            if f"[job={job_id} " in line and job_id not in seen:
                seen.append(job_id)
    return seen


def test_no_queue_entry_can_stop_a_worker(start_worker, qclient: Client, queue: str) -> None:
    w = start_worker("deadletters", queues=queue, **FAST_REDELIVERY)
    r = qclient.redis
    r.delete(contract.DEAD_LETTERS_KEY)
    bodies = {
        "null body": b"null",
        "empty object body": b"{}",
        "two-item body": json.dumps([[], {}]).encode(),
    }
    entries = [b"[1, 2, 3]", b"null", b"[" * 100_000, b"{" * 100_000, b'{"body": 1}']
    entries += [raw_message(contract.TASK_GENERATE, body, "application/json", queue)
                for body in bodies.values()]  # fmt: skip
    for entry in entries:
        r.lpush(queue, entry)
    after = qclient.submit(small("after the garbage"))
    assert after.wait(timeout=60).state == "succeeded"
    assert w.proc.poll() is None
    # Every bad entry was dead-lettered once, with its reason, and none is held or comes back.
    letters = qclient.dead_letters()
    assert len(letters) == len(entries), letters
    assert all(d["queue"] == queue and d["reason"] for d in letters)
    assert r.llen(queue) == 0
    unacked = [json.loads(v) for v in r.hvals("unacked")]
    assert not [m for m in unacked if m[0]["properties"]["delivery_info"]["routing_key"] == queue]
    listed = [e for e in qclient.failed() if e["error_type"] == "DeadLetter"]
    assert len(listed) == len(entries)
    assert any("not [args, kwargs, embed]" in e["error"] for e in listed)
    # The worker still takes jobs after a restore sweep, and `worker check` calls it healthy.
    more = qclient.submit_many([small(f"more {i}") for i in range(3)])
    assert [s.state for s in qclient.wait([h.job_id for h in more], timeout=60)] == [
        "succeeded"
    ] * 3
    check = subprocess.run([sys.executable, "-m", "worker", "check", "--node", w.node],
                           env=w.env, capture_output=True, text=True)  # fmt: skip
    assert check.returncode == 0, check.stderr
    assert w.log().count("dead-lettered an entry") == len(entries)


def test_a_job_longer_than_the_visibility_timeout_is_delivered_once(
    start_worker, qclient: Client, queue: str
) -> None:
    # Two workers on the queue, the shortest visibility timeout (4 s) and a job of about 9 s:
    # without its lease the job would be handed to the second worker while the first runs it.
    short_lease = {**FAST_REDELIVERY, "FLEET_VISIBILITY_TIMEOUT_S": "4"}
    a = start_worker("lease-a", queues=queue, **short_lease)
    b = start_worker("lease-b", queues=queue, **short_lease)
    long = qclient.submit(JobSpec(prompt="long", width=128, height=128, steps=150))
    st = long.wait(timeout=180)
    assert st.state == "succeeded", st
    elapsed = st.result.timings["total_s"] if st.result else 0
    assert elapsed > 4 * 1.5, f"the job took {elapsed:.1f} s: not longer than the timeout"
    assert received(a, long.job_id) + received(b, long.job_id) == 1
    assert "TooManyDeliveries" not in a.log() + b.log()


def test_a_requeued_job_goes_back_to_the_front(start_worker, qclient: Client, queue: str) -> None:
    w = start_worker("front", queues=queue, FLEET_MAX_DELIVERIES="5", **FAST_REDELIVERY)
    assert qclient.submit(small("warm")).wait(timeout=90).state == "succeeded"
    first = qclient.submit(small("killed", steps=150))
    rest = qclient.submit_many([small(f"behind {i}", steps=10) for i in range(4)])
    kill_pool_child_mid_job(w, qclient, 0, first.job_id)
    ids = [first.job_id] + [h.job_id for h in rest]
    assert {s.state for s in qclient.wait(ids, timeout=180)} == {"succeeded"}
    # The killed job ran again before any job that was queued behind it.
    lines = [ln for ln in w.log().splitlines() if "] received:" in ln]
    starts = [next((j for j in ids if f"[job={j} " in ln), None) for ln in lines]
    starts = [s for s in starts if s]
    assert starts[:2] == [first.job_id, first.job_id], starts


SEND_STOCK = """
import json, sys
from celery import Celery
app = Celery(broker=sys.argv[1], backend=sys.argv[1])
app.conf.update(task_serializer="json", accept_content=["json"], result_accept_content=["json"])
job = json.loads(sys.argv[2])
app.send_task("fleet.generate", kwargs={"job": job}, queue=sys.argv[3], task_id=job["job_id"])
assert not [m for m in sys.modules if m.split(".")[0] in ("fleet", "producer", "worker")]
"""


def test_a_job_from_a_stock_sender_without_a_priority_waits_at_the_default(
    start_worker, qclient: Client, queue: str, fleet_env: dict
) -> None:
    normal = qclient.submit(small("producer, default priority"))
    stock_id = f"stock-{uuid.uuid4().hex[:8]}"
    job = {"prompt": "stock sender, no priority", "width": 64, "height": 64, "steps": 2,
           "job_id": stock_id}  # fmt: skip
    sent = subprocess.run(
        [sys.executable, "-c", textwrap.dedent(SEND_STOCK), fleet_env["FLEET_REDIS_URL"],
         json.dumps(job), queue],
        capture_output=True, text=True, cwd="/",
    )  # fmt: skip
    assert sent.returncode == 0, sent.stderr
    high = qclient.submit(small("producer, priority 9"), priority=9)
    low = qclient.submit(small("producer, priority 1"), priority=1)
    w = start_worker("stockprio", queues=queue)
    ids = [normal.job_id, stock_id, high.job_id, low.job_id]
    assert {s.state for s in qclient.wait(ids, timeout=120)} == {"succeeded"}
    assert order_received(w, ids) == [high.job_id, normal.job_id, stock_id, low.job_id]


def test_a_worker_on_two_queues_serves_them_in_turn(start_worker, fleet_env: dict) -> None:
    from fleet.settings import ProducerSettings
    from tests.fleet_fixtures import settings_kwargs

    q1, q2 = f"fleet.rr1-{uuid.uuid4().hex[:6]}", f"fleet.rr2-{uuid.uuid4().hex[:6]}"
    ids: dict[str, list[str]] = {}
    for q in (q1, q2):
        settings = ProducerSettings(_env_file=None, **settings_kwargs(fleet_env))
        settings.queue = q
        with Client(settings) as c:
            ids[q] = [h.job_id for h in c.submit_many([small(f"{q} {i}") for i in range(4)])]
    w = start_worker("tworoutes", queues=f"{q1},{q2}")
    every = ids[q1] + ids[q2]
    settings = ProducerSettings(_env_file=None, **settings_kwargs(fleet_env))
    with Client(settings) as c:
        assert {s.state for s in c.wait(every, timeout=120)} == {"succeeded"}
    order = order_received(w, every)
    queue_of = {j: q for q, js in ids.items() for j in js}
    served = [queue_of[j] for j in order]
    # In turn, not all of the first queue before the second: no queue is served more than
    # twice in a row (the gate adds the queues back one by one, and the reserved message of a
    # prefetching worker may come from either).
    runs = [len(list(group)) for _, group in itertools.groupby(served)]
    assert max(runs) <= 2, served
    for q in (q1, q2):  # first in, first out within each queue
        assert [j for j in order if queue_of[j] == q] == ids[q]


def test_a_restored_job_of_a_dead_worker_goes_back_to_the_front(
    start_worker, qclient: Client, queue: str
) -> None:
    import os
    import signal

    from tests.fleet_fixtures import wait_until
    from tests.integration.test_reliability import started_job

    w = start_worker("restorefront", queues=queue, **FAST_REDELIVERY)
    assert qclient.submit(small("warm")).wait(timeout=90).state == "succeeded"
    first = qclient.submit(small("its worker dies", steps=150))
    wait_until(lambda: started_job(qclient, [first.job_id]), 60, "the job running")
    os.killpg(w.proc.pid, signal.SIGKILL)  # the whole worker, as a crash would
    w.proc.wait(10)
    rest = qclient.submit_many([small(f"behind {i}", steps=10) for i in range(3)])
    # Any consumer of this Redis restores a dead worker's messages at the visibility timeout:
    # here one on another queue, so that nothing takes the jobs before we look.
    start_worker("sweeper", queues=f"{queue}.sweeper", **FAST_REDELIVERY)
    places = lambda: qclient.queue_positions(queue) or {}  # noqa: E731
    wait_until(lambda: first.job_id in places(), 60, "the job restored to its queue")
    assert places()[first.job_id] == 0  # at the front, ahead of the three queued behind it
    assert sorted(places()[h.job_id] for h in rest) == [1, 2, 3]
    logged = len(w.log())
    w.start()
    ids = [first.job_id] + [h.job_id for h in rest]
    assert {s.state for s in qclient.wait(ids, timeout=180)} == {"succeeded"}
    after = [ln for ln in w.log()[logged:].splitlines() if "] received:" in ln]
    assert f"[job={first.job_id} " in after[0], after  # the restarted worker ran it first


def test_a_job_of_a_newer_schema_waits_for_a_worker_that_knows_it(
    start_worker, qclient: Client, queue: str, fleet_env: dict
) -> None:
    """A fleet mid-upgrade: a new producer sends schema_version 2 to a worker that speaks 1.
    The worker neither runs nor fails it at once: it passes it back to the end of the queue
    (FLEET_UNKNOWN_SCHEMA_TRIES times), then records why and keeps it in the dead letters;
    and it serves a valid job meanwhile."""
    w = start_worker("old-schema", queues=queue, FLEET_UNKNOWN_SCHEMA_TRIES="2")
    newer = {**small("from the future").model_dump(mode="json"),
             "schema_version": contract.SCHEMA_VERSION + 1, "job_id": uuid.uuid4().hex}  # fmt: skip
    subprocess.run([sys.executable, "-c", SEND_STOCK, fleet_env["FLEET_REDIS_URL"],
                    json.dumps(newer), queue], check=True, timeout=60)  # fmt: skip
    valid = qclient.submit(small("today's"))
    assert valid.wait(timeout=120).state == "succeeded"
    st = qclient.wait([newer["job_id"]], timeout=120)[0]
    assert st.state == "failed" and st.result is not None, st
    assert st.result.error_type == "SchemaTooNew", st
    assert f"schema_version {contract.SCHEMA_VERSION + 1} is newer" in (st.result.error or "")
    assert w.log().count("is newer than this worker's") == 2  # passed on twice, then failed
    assert "] received:" not in "".join(ln for ln in w.log().splitlines() if newer["job_id"] in ln)
    letters = [d for d in qclient.dead_letters() if d.get("task_id") == newer["job_id"]]
    assert len(letters) == 1 and "newer" in letters[0]["reason"]


def test_a_drain_lets_a_short_job_finish_and_puts_a_long_one_back_at_once(
    start_worker, qclient: Client, queue: str
) -> None:
    """SIGTERM, as `docker compose stop` sends it: a job that ends within FLEET_DRAIN_TIMEOUT_S
    finishes and the worker exits as soon as it did; one that cannot goes back to its queue at
    once (not after the one-hour visibility timeout), and another worker completes it."""
    import os
    import signal
    import time

    from tests.fleet_fixtures import wait_until

    short = start_worker("drain-short", queues=queue, FLEET_DRAIN_TIMEOUT_S="120")
    job = qclient.submit(small("finishes", steps=60))
    wait_until(lambda: qclient.status(job.job_id).state == "started", 60, "the job started")
    os.kill(short.proc.pid, signal.SIGTERM)  # the main process, as tini forwards it
    short.proc.wait(110)  # well before the drain timeout: it exits once the job is done
    assert qclient.status(job.job_id).state == "succeeded"
    assert "back to its queue" not in short.log()

    long = start_worker("drain-long", queues=queue, FLEET_DRAIN_TIMEOUT_S="3")
    slow = qclient.submit(JobSpec(prompt="too long", width=128, height=128, steps=150))
    wait_until(lambda: qclient.status(slow.job_id).state == "started", 60, "the job started")
    stopped = time.monotonic()
    os.kill(long.proc.pid, signal.SIGTERM)
    long.proc.wait(60)
    wait_until(lambda: qclient.stats()["queues"][queue] == 1, 30, "the job back in its queue")
    assert time.monotonic() - stopped < 60  # the visibility timeout is 3600 s
    assert "back to its queue for another worker" in long.log()
    start_worker("drain-next", queues=queue)
    assert slow.wait(timeout=300).state == "succeeded"
