"""producer.bulk.submit_bulk against a real Redis, S3 and Celery worker (the tiny model)."""

from __future__ import annotations

import base64
import json
import random
import string
import subprocess
import sys
import uuid
from collections.abc import Iterator

import pytest
from celery.utils.saferepr import saferepr

from fleet import contract
from fleet.contract import JobSpec
from fleet.errors import JobValidationError
from fleet.settings import ProducerSettings
from producer import bulk
from producer.bulk import kwargs_repr, submit_bulk
from producer.client import Client
from tests.fleet_fixtures import REPO, settings_kwargs, wait_until

pytestmark = pytest.mark.integration

TIMEOUT = 120


def small_job(**kw) -> JobSpec:  # type: ignore[no-untyped-def]
    base = {"prompt": "a red fox in the snow", "width": 64, "height": 64, "steps": 2}
    base.update(kw)
    return JobSpec(**base)


def depth(client: Client, queue: str) -> int:
    """Messages waiting in ``queue``: one Redis list per priority step."""
    return sum(int(client.redis.llen(key)) for key in contract.queue_keys(queue))


def messages(client: Client, queue: str) -> list[dict]:  # type: ignore[type-arg]
    """The waiting messages of ``queue``, highest priority first, oldest first within one."""
    out = []
    for key in contract.queue_keys(queue):
        out += [json.loads(m) for m in reversed(client.redis.lrange(key, 0, -1))]
    return out


def uid(tag: str) -> str:
    return f"bulk-{tag}-{uuid.uuid4().hex[:10]}"


@pytest.fixture()
def idle_client(fleet_env: dict) -> Iterator[Client]:
    """A client whose queue no worker consumes: messages stay countable in Redis."""
    queue = uid("idle-queue")
    settings = ProducerSettings(_env_file=None, **{**settings_kwargs(fleet_env), "queue": queue})
    with Client(settings) as c:
        yield c
        c.redis.delete(*contract.queue_keys(queue))


def test_bulk_jobs_all_succeed(worker, client, store) -> None:  # type: ignore[no-untyped-def]
    specs = [small_job(job_id=uid(f"ok{i}"), seed=100 + i) for i in range(5)]
    handles = submit_bulk(client, specs)
    assert [h.job_id for h in handles] == [s.job_id for s in specs]
    assert not any(h.duplicate for h in handles)
    assert {h.queue for h in handles} == {"fleet"}
    statuses = client.wait([h.job_id for h in handles], timeout=TIMEOUT)
    assert [s.state for s in statuses] == ["succeeded"] * 5, [s.result for s in statuses]
    for spec, st in zip(specs, statuses, strict=True):
        assert st.result is not None and len(st.result.images) == 1
        assert st.result.images[0].seed == spec.seed
        assert store.get_bytes(st.result.images[0].key) is not None
        manifest = store.get_json(contract.manifest_key(spec.job_id))
        assert manifest["status"] == "succeeded"


def test_duplicate_id_is_reported_and_not_run_again(worker, client) -> None:  # type: ignore[no-untyped-def]
    first = small_job(job_id=uid("dup"), seed=7)
    # The same job twice in one call (the same id with another recipe is a DuplicateJobError:
    # test_guarantees.py).
    handles = submit_bulk(client, [first, small_job(job_id=first.job_id, seed=7)])
    assert [h.duplicate for h in handles] == [False, True]
    assert client.wait([first.job_id], timeout=TIMEOUT)[0].state == "succeeded"
    meta_key = f"celery-task-meta-{first.job_id}"

    def stored_success() -> bytes | None:
        raw = client.redis.get(meta_key)
        return raw if raw and json.loads(raw)["status"] == "SUCCESS" else None

    # Once seen a late PROGRESS write still sat in the key after the client saw SUCCESS: take
    # the stored SUCCESS document itself as the reference.
    meta_before = wait_until(stored_success, 30, "the stored SUCCESS result")

    fresh = small_job(job_id=uid("fresh"), seed=9)
    again = submit_bulk(client, [small_job(job_id=first.job_id, seed=7), fresh])
    assert [h.duplicate for h in again] == [True, False]
    assert again[0].queue == "fleet"
    # The worker runs messages in order; once the fresh job is done, a re-sent duplicate would
    # have been delivered (counted) and its result rewritten.
    assert client.wait([fresh.job_id], timeout=TIMEOUT)[0].state == "succeeded"
    assert client.redis.get(contract.DELIVERIES_KEY.format(task_id=first.job_id, retries=0)) == b"1"
    assert client.redis.get(meta_key) == meta_before
    assert worker.log().count(f"[job={first.job_id} task={first.job_id}] received") == 1


def test_a_bad_job_means_nothing_is_enqueued(idle_client: Client) -> None:
    good = [small_job(job_id=uid("good"), seed=i) for i in range(3)]
    bad = {"prompt": "a bad one", "width": 100, "height": 64, "job_id": uid("bad")}
    with pytest.raises(JobValidationError) as info:
        submit_bulk(idle_client, [good[0], good[1], bad, good[2]])
    assert "width=100" in str(info.value)
    assert depth(idle_client, idle_client.settings.queue) == 0
    for spec in good:
        assert not idle_client.redis.exists(contract.CLAIM_KEY.format(job_id=spec.job_id))


def test_bulk_messages_match_send_task(idle_client: Client) -> None:
    """Same headers, properties and body as the message Client.submit sends (ids aside)."""
    queue = idle_client.settings.queue
    one = small_job(job_id=uid("single"), seed=5, prompt="a lighthouse at dusk")
    idle_client.submit(one, deadline_s=600, priority=7)
    twin = one.model_copy(update={"job_id": uid("twin")})
    [handle] = submit_bulk(idle_client, [twin], deadline_s=600, priority=7)
    assert handle.queue == queue and not handle.duplicate
    single_msg, bulk_msg = messages(idle_client, queue)  # same priority list, oldest first

    def normalised(msg: dict) -> dict:  # type: ignore[type-arg]
        body = json.loads(base64.b64decode(msg["body"]))
        stamped = body[1]["job"].pop("submitted_at", None)  # enqueue time: differs by ms
        assert (stamped is None) == ("submitted_at" not in JobSpec.model_fields)
        headers = {**msg["headers"], "kwargsrepr": msg["headers"]["kwargsrepr"].split(", 'sub")[0]}
        msg = {**msg, "body": body, "headers": headers}
        text = json.dumps(msg, sort_keys=True)
        for job_id in (one.job_id, twin.job_id):
            text = text.replace(job_id, "<id>")
        out = json.loads(text)
        out["properties"].pop("delivery_tag")
        out["headers"].pop("expires")  # both now + 600 s, a few ms apart
        return out

    assert normalised(bulk_msg) == normalised(single_msg)
    assert bulk_msg["headers"]["expires"] and single_msg["headers"]["expires"]
    assert bulk_msg["headers"]["task"] == contract.TASK_GENERATE
    assert bulk_msg["headers"]["id"] == twin.job_id
    assert bulk_msg["properties"]["priority"] == contract.celery_priority(7)
    assert bulk_msg["properties"]["delivery_info"]["routing_key"] == queue


def test_priority_picks_the_list(idle_client: Client) -> None:
    queue = idle_client.settings.queue
    low = [small_job(job_id=uid("low"), seed=i) for i in range(2)]
    high = [small_job(job_id=uid("high"), seed=i) for i in range(2)]
    submit_bulk(idle_client, low, priority=0)
    submit_bulk(idle_client, high, priority=9)
    waiting = [m["headers"]["id"] for m in messages(idle_client, queue)]
    assert waiting == [s.job_id for s in high + low]  # priority 9 first
    with pytest.raises(JobValidationError):
        submit_bulk(idle_client, [small_job(job_id=uid("p"))], priority=10)


def test_publish_failure_releases_unsent_claims(
    idle_client: Client, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(bulk, "CHUNK_SIZE", 2)
    amqp = idle_client.celery.amqp
    send = amqp.send_task_message
    calls = {"n": 0}

    def failing_send(*args, **kwargs):  # type: ignore[no-untyped-def]
        calls["n"] += 1
        if calls["n"] == 5:
            raise ConnectionError("broker went away")
        return send(*args, **kwargs)

    monkeypatch.setattr(amqp, "send_task_message", failing_send)
    specs = [small_job(job_id=uid(f"fail{i}"), seed=i) for i in range(7)]
    with pytest.raises(ConnectionError):
        submit_bulk(idle_client, specs)
    # Chunks [0, 1] and [2, 3] were flushed; chunk [4, 5] failed and was discarded; 6 never sent.
    assert depth(idle_client, idle_client.settings.queue) == 4
    claimed = [
        bool(idle_client.redis.exists(contract.CLAIM_KEY.format(job_id=s.job_id))) for s in specs
    ]
    assert claimed == [True, True, True, True, False, False, False]
    monkeypatch.undo()
    # The released ids can be submitted again; the sent ones are duplicates.
    retry = submit_bulk(idle_client, specs)
    assert [h.duplicate for h in retry] == [True, True, True, True, False, False, False]
    assert depth(idle_client, idle_client.settings.queue) == 7


def test_kwargs_repr_is_celerys_saferepr() -> None:
    rng = random.Random(1234)
    alphabet = string.printable + "éü漢字🦊'\"\\\n\t\x07"
    for i in range(3000):
        job = small_job(
            job_id=f"r{i}",
            prompt="x" + "".join(rng.choice(alphabet) for _ in range(rng.randint(0, 80))),
            negative_prompt=rng.choice(["", "blurry", "it's bad", "a\\b"]),
            seed=rng.randrange(2**64),
            guidance=rng.choice([0.0, 7.5, 1 / 3, 30.0]),
            model=rng.choice([None, "m1"]),
        ).model_dump(mode="json")
        kwargs = {"job": job}
        assert kwargs_repr(kwargs, 1024, 3) == saferepr(kwargs, 1024, maxlevels=3)
    for length in range(850, 1100, 7):  # around the truncation limit
        kwargs = {"job": small_job(job_id="long", prompt="a" * length).model_dump(mode="json")}
        assert kwargs_repr(kwargs, 1024, 3) == saferepr(kwargs, 1024, maxlevels=3)


def test_queued_jobs_show_their_place_in_line(idle_client: Client, fleet_env: dict) -> None:  # type: ignore[type-arg]
    """`status` and `wait` tell a queued job how many jobs workers take before it: priority
    first, then first come first served (by single submits and bulk alike)."""
    queue = idle_client.settings.queue
    early = [idle_client.submit(small_job(job_id=uid(f"line{i}"))) for i in range(2)]
    late = submit_bulk(idle_client, [small_job(job_id=uid("line-bulk"))])[0]
    urgent = idle_client.submit(small_job(job_id=uid("line-urgent")), priority=9)
    order = [urgent, *early, late]
    statuses = idle_client.with_queue_positions([idle_client.status(h.job_id) for h in order])
    assert [s.state for s in statuses] == ["queued"] * 4
    assert [s.ahead for s in statuses] == [0, 1, 2, 3]
    assert statuses[3].detail == f"3 ahead in {queue}"

    seen: list = []  # type: ignore[type-arg]
    with pytest.raises(TimeoutError):  # no worker consumes this queue
        idle_client.wait([late.job_id], timeout=1.5, on_update=seen.append)
    assert seen and seen[-1].ahead == 3

    env = {**fleet_env, "FLEET_QUEUE": queue}
    out = subprocess.run([sys.executable, "-m", "producer", "status", late.job_id], env=env,
                         capture_output=True, text=True, timeout=60, cwd=REPO)  # fmt: skip
    assert out.returncode == 0, out.stderr
    assert "queued" in out.stdout and f"3 ahead in {queue}" in out.stdout

    # A queue deeper than the scan limit is not read message by message.
    assert idle_client.queue_positions(queue, limit=3) is None
