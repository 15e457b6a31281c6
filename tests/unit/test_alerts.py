"""The alert collector (worker.ops.alerts) against a real Redis of its own, and without one."""

from __future__ import annotations

import base64
import json
import re
import socket
import time
import uuid
from collections.abc import Iterator
from datetime import datetime, timezone
from pathlib import Path

import pytest
import redis
from prometheus_client import CollectorRegistry, generate_latest
from prometheus_client.parser import text_string_to_metric_families

from fleet import contract
from fleet.localdev import RedisServer
from worker.ops.alerts import (
    REASONS,
    AlertCollector,
    WorkerView,
    alert_client,
    enqueued_at,
    reason_class,
)

#: The clock of the tests: "now" for the collector, so ages are exact.
NOW = 1_800_000_000.0


def message(job: dict | None = None, *, stamp: float | None = None, args: list | None = None,
            encode: bool = True) -> str:  # fmt: skip
    """A Celery protocol-2 JSON message as kombu's Redis transport stores it."""
    job = dict(job or {"prompt": "a fox"})
    if stamp is not None:
        job["submitted_at"] = stamp
    body = json.dumps([args or [], {} if args else {"job": job}, {"callbacks": None}])
    return json.dumps({
        "body": base64.b64encode(body.encode()).decode() if encode else body,
        "content-encoding": "utf-8",
        "content-type": "application/json",
        "headers": {"lang": "py", "task": contract.TASK_GENERATE, "id": uuid.uuid4().hex},
        "properties": {"delivery_info": {"exchange": "", "routing_key": "q"}, "priority": 0,
                       "body_encoding": "base64" if encode else None,
                       "delivery_tag": uuid.uuid4().hex},
    })  # fmt: skip


def scrape(collector: AlertCollector) -> dict[str, float]:
    """The samples of one scrape through a real registry, as ``name{label="v"}`` -> value."""
    registry = CollectorRegistry()
    registry.register(collector)
    text = generate_latest(registry).decode()
    out: dict[str, float] = {}
    for family in text_string_to_metric_families(text):
        for s in family.samples:
            labels = ",".join(f'{k}="{v}"' for k, v in sorted(s.labels.items()))
            out[f"{s.name}{{{labels}}}" if labels else s.name] = s.value
    return out


def view(*queues: str, state: str = "ready", reason: str | None = None,
         consuming: bool = True) -> WorkerView:  # fmt: skip
    return WorkerView(tuple(queues), state, reason, consuming)


@pytest.fixture(scope="module")
def redis_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[RedisServer]:
    server = RedisServer(tmp_path_factory.mktemp("alerts-redis")).start()
    yield server
    server.stop()


@pytest.fixture()
def r(redis_server: RedisServer) -> Iterator[redis.Redis]:
    client = redis_server.client()
    client.flushdb()
    yield client
    client.close()


def collector(server: RedisServer, *queues: str, **kw: object) -> AlertCollector:
    return AlertCollector(alert_client(server.url), lambda: view(*queues, **kw),  # type: ignore[arg-type]
                          clock=lambda: NOW)  # fmt: skip


# -- pure parts ------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("reason", "label"),
    [
        ("the model cannot load: /m is not a folder (fix FLEET_MODEL, or the hub token)", "model"),
        ("the pipeline fails its self-test: all images black", "model"),
        ("ModelLoadError: no such model", "model"),
        ("the model cannot load: CUDA out of memory. Tried to allocate 2 GiB", "device"),
        ("PipelineBroken: CUDA error: an illegal memory access was encountered", "device"),
        ("DeviceOutOfMemory: 8 GiB", "device"),
        ("storage refuses this worker: InvalidAccessKeyId", "storage"),
        ("StorageRefused: AccessDenied", "storage"),
        ("Redis would lose the fleet's keys: maxmemory-policy allkeys-lru", "redis"),
        ("BrokerRefused: invalid password", "redis"),
        ("the model cannot load: OSError: No space left on device", "model"),
        ("ConfigurationError: FLEET_DTYPE", "other"),
        (None, "other"),
        ("", "other"),
    ],
)
def test_a_broken_reason_falls_in_one_small_class(reason: str | None, label: str) -> None:
    assert reason_class(reason) == label
    assert label in REASONS


def test_the_enqueue_time_is_the_jobs_submitted_at_and_only_that() -> None:
    assert enqueued_at(message(stamp=NOW - 5)) == NOW - 5
    assert enqueued_at(message(stamp=NOW, encode=False)) == NOW
    assert enqueued_at(message(args=[{"prompt": "x", "submitted_at": 7}])) == 7.0
    not_base64 = json.dumps({"body": "!!", "properties": {"body_encoding": "base64"}})
    for foreign in (message(), message(stamp="yesterday"), message(stamp=True),  # type: ignore[arg-type]
                    message({"prompt": "x", "submitted_at": float("nan")}),
                    "not json", "[1, 2]", "null", json.dumps({"body": "x", "properties": {}}),
                    not_base64):  # fmt: skip
        assert enqueued_at(foreign) is None, foreign


# -- against a real Redis ----------------------------------------------------------------------


def test_queue_age_is_that_of_the_oldest_job_over_every_priority_list(
    r: redis.Redis, redis_server: RedisServer
) -> None:
    q = "fleet.ages"
    # Oldest at the right end (kombu LPUSHes and workers BRPOP): 120 s in the default list,
    # 300 s in the list of priority 9 (step 4), which workers read first.
    for age in (120, 60, 10):
        r.lpush(q, message(stamp=NOW - age))
    r.lpush(contract.step_key(q, contract.celery_priority(9)), message(stamp=NOW - 300))
    r.lpush("fleet.other", message(stamp=NOW - 9999))  # a queue this worker does not serve
    got = scrape(collector(redis_server, q, "fleet.empty"))
    assert got["fleet_redis_up"] == 1.0
    assert got[f'fleet_queue_length{{queue="{q}"}}'] == 4.0
    assert got[f'fleet_queue_oldest_job_age_seconds{{queue="{q}"}}'] == pytest.approx(300, abs=1e-6)
    assert got['fleet_queue_length{queue="fleet.empty"}'] == 0.0
    assert got['fleet_queue_oldest_job_age_seconds{queue="fleet.empty"}'] == 0.0
    assert not any("fleet.other" in k for k in got)


def test_jobs_sent_by_the_real_producer_carry_their_age(
    r: redis.Redis, redis_server: RedisServer
) -> None:
    from fleet.settings import ProducerSettings
    from producer.client import Client

    q = "fleet.produced"
    settings = ProducerSettings(_env_file=None, redis_url=redis_server.url, queue=q)
    before = time.time()
    with Client(settings) as c:
        c.submit(contract.JobSpec(prompt="a fox", width=64, height=64), priority=9)
        c.submit(contract.JobSpec(prompt="a hen", width=64, height=64))
    later = 90.0  # the scrape's clock runs this far ahead: the jobs look 90 s old
    got = scrape(AlertCollector(alert_client(redis_server.url), lambda: view(q),
                                clock=lambda: time.time() + later))  # fmt: skip
    done = time.time()
    assert got[f'fleet_queue_length{{queue="{q}"}}'] == 2.0
    age = got[f'fleet_queue_oldest_job_age_seconds{{queue="{q}"}}']
    assert later <= age <= later + done - before


def test_an_entry_without_a_timestamp_is_ignored(r: redis.Redis, redis_server: RedisServer) -> None:
    q, foreign_only = "fleet.mixed", "fleet.foreign"
    r.lpush(q, message(stamp=NOW - 42))
    r.rpush(q, message(), "not json at all", "[1, 2, 3]")  # at the head, where workers read
    r.lpush(foreign_only, message(), "garbage")
    got = scrape(collector(redis_server, q, foreign_only))
    assert got[f'fleet_queue_length{{queue="{q}"}}'] == 4.0
    assert got[f'fleet_queue_oldest_job_age_seconds{{queue="{q}"}}'] == pytest.approx(42)
    # Waiting entries whose age nobody knows: counted, and no made-up age.
    assert got[f'fleet_queue_length{{queue="{foreign_only}"}}'] == 2.0
    assert f'fleet_queue_oldest_job_age_seconds{{queue="{foreign_only}"}}' not in got


def test_dead_letters_and_unstored_failures_are_counted(
    r: redis.Redis, redis_server: RedisServer
) -> None:
    got = scrape(collector(redis_server))
    assert got["fleet_dead_letters"] == 0.0 and got["fleet_unstored_failures"] == 0.0
    assert "fleet_dead_letters_newest_timestamp_seconds" not in got
    newest = datetime(2027, 1, 2, 3, 4, 5, tzinfo=timezone.utc)
    for at in (datetime(2026, 1, 1, tzinfo=timezone.utc), newest):
        r.lpush(contract.DEAD_LETTERS_KEY, json.dumps({"reason": "not JSON", "at": at.isoformat()}))
    r.lpush(contract.UNSTORED_FAILURES_KEY, *[json.dumps({"job_id": f"j{i}"}) for i in range(3)])
    got = scrape(collector(redis_server))
    assert got["fleet_dead_letters"] == 2.0
    assert got["fleet_dead_letters_newest_timestamp_seconds"] == newest.timestamp()
    assert got["fleet_unstored_failures"] == 3.0


def test_broken_workers_are_counted_fleet_wide_by_reason_live_ones_only(
    r: redis.Redis, redis_server: RedisServer
) -> None:
    def worker(node: str, state: str, reason: str | None, alive: bool = True) -> None:
        r.set(contract.WORKER_STATE_KEY.format(node=node),
              json.dumps({"state": state, "reason": reason, "at": NOW}))  # fmt: skip
        if alive:
            r.set(contract.HEARTBEAT_KEY.format(node=node), json.dumps({"node": node}), ex=60)

    worker("a@h", "broken", "the model cannot load: no such folder")
    worker("b@h", "broken", "the model cannot load: nope")
    worker("c@h", "broken", "storage refuses this worker: AccessDenied")
    worker("d@h", "ready", None)
    worker("e@h", "starting", "storage unreachable, trying again in 2 s")
    worker("gone@h", "broken", "CUDA error: device lost", alive=False)  # stopped: no heartbeat
    r.set(contract.WORKER_STATE_KEY.format(node="junk@h"), "not json")
    r.set(contract.HEARTBEAT_KEY.format(node="junk@h"), "{}")
    fill(r, 12_000)  # more keys than one SCAN page
    got = scrape(collector(redis_server))
    assert {k: v for k, v in got.items() if k.startswith("fleet_workers_broken")} == {
        'fleet_workers_broken{reason="model"}': 2.0,
        'fleet_workers_broken{reason="storage"}': 1.0,
        'fleet_workers_broken{reason="redis"}': 0.0,
        'fleet_workers_broken{reason="device"}': 0.0,
        'fleet_workers_broken{reason="other"}': 0.0,
    }


def fill(r: redis.Redis, keys: int) -> None:
    with r.pipeline(transaction=False) as pipe:
        for i in range(keys):
            pipe.set(f"celery-task-meta-{i}", "{}")
        pipe.execute()


def test_a_keyspace_too_large_to_scan_in_time_leaves_out_only_the_fleet_count(
    r: redis.Redis, redis_server: RedisServer
) -> None:
    fill(r, 12_000)
    r.lpush("fleet", message(stamp=NOW - 3))
    c = AlertCollector(alert_client(redis_server.url), lambda: view("fleet"), clock=lambda: NOW,
                       budget_s=0.0)  # fmt: skip
    got = scrape(c)
    assert got["fleet_redis_up"] == 1.0 and got['fleet_queue_length{queue="fleet"}'] == 1.0
    assert got['fleet_queue_oldest_job_age_seconds{queue="fleet"}'] == 3.0
    assert not any(k.startswith("fleet_workers_broken") for k in got)


@pytest.mark.parametrize(
    ("state", "reason", "consuming", "broken"),
    [
        ("ready", None, True, None),
        ("starting", "loading the model", False, None),
        ("broken", "storage refuses this worker: AccessDenied", False, "storage"),
        ("broken", "the pipeline fails its self-test: CUDA error: unknown", False, "device"),
    ],
)
def test_this_worker_says_whether_it_consumes_and_why_not(
    redis_server: RedisServer, state: str, reason: str | None, consuming: bool, broken: str | None
) -> None:
    got = scrape(collector(redis_server, "fleet", state=state, reason=reason, consuming=consuming))
    assert got["fleet_worker_consuming"] == (1.0 if consuming else 0.0)
    for label in REASONS:
        assert got[f'fleet_worker_broken{{reason="{label}"}}'] == (1.0 if label == broken else 0.0)


def test_no_gate_no_worker_metrics(redis_server: RedisServer) -> None:
    got = scrape(AlertCollector(alert_client(redis_server.url), lambda: None))
    assert got["fleet_redis_up"] == 1.0
    assert not any(k.startswith(("fleet_worker_", "fleet_queue_")) for k in got)


# -- without Redis ---------------------------------------------------------------------------


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def test_redis_away_is_redis_up_0_and_the_worker_metrics_still(tmp_path: Path) -> None:
    url = f"redis://127.0.0.1:{_free_port()}/0"  # nothing listens there
    c = AlertCollector(alert_client(url), lambda: view("fleet", state="broken",
                       reason="the model cannot load: x", consuming=False))  # fmt: skip
    began = time.monotonic()
    got = scrape(c)
    assert time.monotonic() - began < 5
    assert got["fleet_redis_up"] == 0.0
    assert got["fleet_worker_consuming"] == 0.0
    assert got['fleet_worker_broken{reason="model"}'] == 1.0
    assert not any(k.startswith(("fleet_queue_", "fleet_dead", "fleet_workers_")) for k in got)


def test_a_redis_that_never_answers_does_not_hang_the_scrape() -> None:
    with socket.socket() as stuck:  # accepts connections (the backlog) and never replies
        stuck.bind(("127.0.0.1", 0))
        stuck.listen(16)
        url = f"redis://127.0.0.1:{stuck.getsockname()[1]}/0"
        c = AlertCollector(alert_client(url, timeout_s=0.3), lambda: view("fleet"))
        began = time.monotonic()
        got = scrape(c)
        assert time.monotonic() - began < 3
    assert got["fleet_redis_up"] == 0.0 and got["fleet_worker_consuming"] == 1.0


def test_redis_coming_back_is_seen_by_the_next_scrape(tmp_path: Path) -> None:
    server = RedisServer(tmp_path)
    server.start()
    try:
        c = AlertCollector(alert_client(server.url), lambda: view("fleet"))
        assert scrape(c)["fleet_redis_up"] == 1.0
        server.stop()
        assert scrape(c)["fleet_redis_up"] == 0.0
        server.start()
        assert scrape(c)["fleet_redis_up"] == 1.0
    finally:
        server.stop()


def test_a_broken_gate_is_no_crash(redis_server: RedisServer) -> None:
    def boom() -> WorkerView:
        raise RuntimeError("consumer restarting")

    got = scrape(AlertCollector(alert_client(redis_server.url), boom))
    assert got["fleet_redis_up"] == 1.0 and "fleet_worker_consuming" not in got


# -- docs/alerts.md --------------------------------------------------------------------------


def _doc_rules() -> str:
    doc = (Path(__file__).resolve().parents[2] / "docs" / "alerts.md").read_text()
    return doc.split("```yaml\n", 1)[1].split("```", 1)[0]


def test_the_documented_rules_use_only_metrics_a_worker_serves(
    r: redis.Redis, redis_server: RedisServer
) -> None:
    r.lpush(contract.DEAD_LETTERS_KEY, json.dumps({"at": datetime.now(timezone.utc).isoformat()}))
    served = {k.split("{")[0] for k in scrape(collector(redis_server, "fleet"))}
    used = set(re.findall(r"\bfleet_[a-z_]+", _doc_rules()))
    assert used and used <= served, used - served


def test_the_documented_rules_are_prometheus_rule_groups() -> None:
    import yaml

    doc = yaml.safe_load(_doc_rules())
    rules = [rule for group in doc["groups"] for rule in group["rules"]]
    assert rules and all({"alert", "expr", "labels"} <= set(r) for r in rules)
