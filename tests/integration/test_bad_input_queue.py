"""Bad input on the queue, with a real worker: generated jobs (``tests/strategies.py``) sent
through a stock ``send_task`` and as raw Redis messages, and generated queue entries that are
not jobs at all, in batches, each batch followed by one valid job that must succeed.

For every entry: a job runs when valid and otherwise fails alone with a recorded reason that
names the mutated field (``client.status(...).state == "failed"``); a body shaped ``[args,
kwargs, embed]`` that carries no job fails under its task id; an entry that is not a job ends in
the dead letters. The worker never stops (its process alive after every batch, ``python -m
worker check`` healthy at the end) and no entry is lost (each ends in one of those ways).

FLEET_HYPOTHESIS_EXAMPLES entries (default 200: 4 batches of 50). The hand-written cases below
add what Celery would refuse after delivery (now dead-lettered by the transport) and the entries
that once stopped a worker, each sent once to this module's one worker. The counts go to
``<pytest base temp>/bad_input.json`` (or FLEET_BAD_INPUT_REPORT) and are printed.
"""

from __future__ import annotations

import contextlib
import json
import pickle
import re
import subprocess
import sys
import time
import uuid
from collections import Counter
from collections.abc import Iterator
from dataclasses import dataclass, field
from datetime import datetime
from typing import Any

import pytest
from kombu.utils.encoding import bytes_to_str

from fleet import contract
from fleet.contract import JobStatus
from fleet.settings import ProducerSettings
from producer.client import Client
from tests import strategies as S
from tests.fleet_fixtures import WorkerProcess, settings_kwargs, wait_until

pytestmark = pytest.mark.integration

BATCH = 50
#: A job of a newer schema fails at once (no passes to other workers) and is dead-lettered.
WORKER_ENV = {"FLEET_UNKNOWN_SCHEMA_TRIES": "0"}
DONE_TIMEOUT = 240.0
HANDLED_GRACE_S = 15.0
TERMINAL = ("succeeded", "failed", "cancelled")


# -- fixtures ------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def tally(tmp_path_factory: pytest.TempPathFactory) -> Iterator[dict[str, S.Tally]]:
    tallies = {n: S.Tally(f"queue.{n}") for n in ("generated", "hand_written", "stoppers")}
    yield tallies
    path = S.report_path(tmp_path_factory.getbasetemp())
    for t in tallies.values():
        if t.counts:
            t.write(path)


@pytest.fixture(scope="module")
def bad_queue() -> str:
    return f"fleet.bad-input-{uuid.uuid4().hex[:8]}"


@pytest.fixture(scope="module")
def bad_worker(module_workers, bad_queue: str) -> WorkerProcess:  # type: ignore[no-untyped-def]
    """A worker of this module's own, on its own queue."""
    return module_workers("bad-input", queues=bad_queue, **WORKER_ENV)


def queue_client(fleet_env: dict, queue: str) -> Client:  # type: ignore[type-arg]
    settings = ProducerSettings(_env_file=None, **settings_kwargs(fleet_env))
    settings.queue = queue
    return Client(settings)


@pytest.fixture(scope="module")
def bclient(fleet_env: dict, bad_queue: str) -> Iterator[Client]:  # type: ignore[type-arg]
    with queue_client(fleet_env, bad_queue) as c:
        yield c


# -- sending -------------------------------------------------------------------------------------


@dataclass
class Sent:
    """An entry as it was sent: its task id, and the bytes pushed (all but send_task)."""

    entry: S.Entry
    task_id: str
    job: Any = None
    raw: bytes | None = None
    notes: list[str] = field(default_factory=list)

    @property
    def key(self) -> tuple[str, int]:
        """What its dead letter keeps of it: the first 2,000 characters and the length."""
        assert self.raw is not None
        text = bytes_to_str(self.raw)
        return text[:2000], len(text)

    def __repr__(self) -> str:
        return f"Sent(task_id={self.task_id}, {self.entry!r})"


def prepare(entry: S.Entry) -> Sent:
    """Give a job entry an id of its own (a job id and task id used nowhere else), unless its
    mutation is of the job id; then its task id is new and its job id stays as generated."""
    task_id = S.unique_job_id()
    if entry.kind == "header-value":  # the job id says where its result is, whatever the id
        args, kwargs, embed = entry.body
        body = [args, {"job": {**kwargs["job"], "job_id": task_id}}, embed]
        return Sent(S.Entry(entry.kind, entry.how, entry.expect, body=body, mutate=entry.mutate),
                    task_id)  # fmt: skip
    if entry.case is None:
        return Sent(entry, task_id)
    job = dict(entry.case.job)
    mutated = entry.case.mutation is not None and entry.case.mutation.field == "job_id"
    if "job_id" in job and not mutated:
        job["job_id"] = task_id
    if entry.how == "raw":
        body = entry.body
        body = [[], {"job": job}, body[2]] if body[0] == [] else [[job], {}, body[2]]
        entry = S.Entry(entry.kind, entry.how, entry.expect, entry.case, body=body)
    return Sent(entry, task_id, job)


def push(client: Client, queue: str, sent: Sent) -> None:
    if sent.entry.how == "send_task":
        client.celery.send_task(contract.TASK_GENERATE, kwargs={"job": sent.job}, queue=queue,
                                task_id=sent.task_id)  # fmt: skip
        return
    sent.raw = sent.entry.render(queue, sent.task_id)
    client.redis.lpush(queue, sent.raw)


def newer_schema(sent: Sent) -> bool:
    m = sent.entry.case.mutation if sent.entry.case is not None else None
    v = m.value if m is not None else None
    return m is not None and m.field == "schema_version" and type(v) is int and v > 1


# -- judging -------------------------------------------------------------------------------------


def new_dead_letters(client: Client, queue: str, since: datetime) -> list[dict[str, Any]]:
    """The dead letters of ``queue`` kept since ``since`` (the list is newest first)."""
    out = []
    for raw in client.redis.lrange(contract.DEAD_LETTERS_KEY, 0, -1):
        d = json.loads(raw)
        if d.get("queue") == queue and datetime.fromisoformat(d["at"]) >= since:
            out.append(d)
    return out


def ended(client: Client, task_id: str) -> bool:
    from celery.result import AsyncResult

    return AsyncResult(task_id, app=client.celery).state in ("SUCCESS", "FAILURE", "REVOKED")


@dataclass
class Verdict:
    sent: Sent
    outcome: str  # succeeded, failed, dead-letter, or lost
    ok: bool
    why: str = ""


def judge(
    sent: Sent, status: JobStatus | None, dead: Counter[tuple[str, int]], crashed: set[str]
) -> Verdict:
    entry = sent.entry
    if sent.task_id in crashed:
        return Verdict(sent, "crashed", False, "the worker stopped on it")
    if entry.expect == "handled" and sent.raw is not None and dead[sent.key] > 0:
        dead[sent.key] -= 1
        return Verdict(sent, "dead-letter", True)
    if entry.expect == "dead-letter":
        if dead[sent.key] > 0:
            dead[sent.key] -= 1
            return Verdict(sent, "dead-letter", True)
        return Verdict(sent, "lost", False, "not in the dead letters")
    assert status is not None
    error = (status.result.error or "") if status.result is not None else ""
    if status.state not in TERMINAL:
        return Verdict(sent, "lost", False, f"still {status.state}: {status.detail}")
    if entry.expect == "handled":
        return Verdict(sent, status.state, True)
    if entry.expect == "recorded":
        ok = status.state == "failed" and bool(error)
        return Verdict(sent, status.state, ok, "" if ok else f"{status.state}: {error[:200]}")
    case = entry.case
    assert case is not None
    if case.mutation is None:
        ok = status.state == "succeeded"
        return Verdict(sent, status.state, ok, "" if ok else f"valid job {status.state}: {error}")
    named = S.names_field(error, case.mutation.name)
    ok = status.state == "failed" and named
    why = "" if ok else f"{status.state}, error {error[:300]!r} (must name {case.mutation.name})"
    return Verdict(sent, status.state, ok, why)


@dataclass
class BatchResult:
    verdicts: list[Verdict]
    after: JobStatus
    alive: bool
    unexpected_dead: list[dict[str, Any]]
    crashes: int = 0

    def failures(self) -> list[Verdict]:
        return [v for v in self.verdicts if not v.ok]


def take_restored(client: Client, queue: str) -> list[str]:
    """Take off the queue what a stopped worker put back (kombu marks it ``redelivered``);
    returns the task ids. Left there, it would stop the next worker too."""
    ids = []
    for key in contract.queue_keys(queue):
        for raw in client.redis.lrange(key, 0, -1):
            if b'"redelivered"' not in raw:
                continue
            try:
                message = json.loads(raw)
                headers = message["headers"]
            except (ValueError, KeyError, TypeError, RecursionError):
                continue
            if isinstance(headers, dict) and headers.get("redelivered"):
                client.redis.lrem(key, 1, raw)
                ids.append(str(headers.get("id")))
    return ids


def run_batch(
    client: Client, w: WorkerProcess, queue: str, entries: list[S.Entry], restart: bool = True
) -> BatchResult:
    """Send ``entries`` then one valid job; wait for all of it (a worker that stops is counted,
    the entry it stopped on taken off the queue, and the worker started again when
    ``restart``); judge each entry."""
    since = datetime.now().astimezone()
    sent = [prepare(e) for e in entries]
    for s in sent:
        push(client, queue, s)
    after = client.submit({**S.BASE_JOB, "prompt": "the valid job after the batch"})
    crashed: set[str] = set()
    crashes = 0

    def done(expects: tuple[str, ...] = ("run", "recorded")) -> bool:
        if w.proc is None or w.proc.poll() is not None:
            return True  # stopped: see below
        if not ended(client, after.job_id):
            return False
        return all(ended(client, s.task_id) for s in sent if s.entry.expect in expects)

    deadline = time.monotonic() + DONE_TIMEOUT
    while True:
        with contextlib.suppress(TimeoutError):  # judged below: what has not ended is lost
            wait_until(done, max(1.0, deadline - time.monotonic()), "the batch", interval=0.2)
        if w.proc is None or w.proc.poll() is None:
            break
        crashes += 1
        crashed.update(take_restored(client, queue))
        if not restart or time.monotonic() > deadline:
            break
        # The dead worker's "ready" would open the new one's queues before its model is loaded.
        client.redis.delete(contract.WORKER_STATE_KEY.format(node=w.node))
        w.start()
    alive = w.proc is not None and w.proc.poll() is None
    handled = [s for s in sent if s.entry.expect == "handled"]

    def settled() -> bool:
        """Every entry with odd headers ended or in the dead letters."""
        letters = {(d.get("raw") or "", int(d.get("raw_chars") or 0))
                   for d in new_dead_letters(client, queue, since)}  # fmt: skip
        return all(s.key in letters or ended(client, s.task_id) for s in handled)

    if alive and handled:
        # Entries with odd headers may run late (an eta) or never end: a short grace, no more.
        with contextlib.suppress(TimeoutError):
            wait_until(settled, HANDLED_GRACE_S, "odd headers", interval=0.2)
    if alive:  # every entry that must be dead-lettered is, before the verdicts (polled)
        expected = sum(s.entry.expect == "dead-letter" for s in sent)
        with contextlib.suppress(TimeoutError):
            wait_until(lambda: len(new_dead_letters(client, queue, since)) >= expected, 10,
                       "the dead letters", interval=0.1)  # fmt: skip
    letters = new_dead_letters(client, queue, since)
    dead = Counter((d.get("raw") or "", int(d.get("raw_chars") or 0)) for d in letters)
    schema_ids = {s.task_id for s in sent if newer_schema(s)}
    verdicts = [
        judge(s, None if s.entry.expect == "dead-letter" else client.status(s.task_id), dead,
              crashed)
        for s in sent
    ]  # fmt: skip
    unexpected = [d for d in letters if d.get("task_id") not in schema_ids
                  and dead[(d.get("raw") or "", int(d.get("raw_chars") or 0))] > 0]  # fmt: skip
    return BatchResult(verdicts, client.status(after.job_id), alive, unexpected, crashes)


def count(t: S.Tally, result: BatchResult) -> None:
    for v in result.verdicts:
        t.add("tried")
        e = v.sent.entry
        t.add(f"kind.{e.kind}.{e.how}")
        if e.case is not None:
            t.add("valid" if e.case.valid else "invalid")
            if e.case.valid:
                t.add("accepted" if v.outcome == "succeeded" else "refused_valid")
            elif v.outcome == "succeeded":
                t.add("accepted_invalid")
            elif v.outcome == "failed":
                t.add("refused_named" if v.ok else "refused_unnamed")
        elif v.outcome == "dead-letter":
            t.add("dead_lettered")
        elif v.outcome == "failed":
            t.add("recorded_failed")
        if v.outcome in ("lost", "crashed"):
            t.add(v.outcome)
    t.add("batches")
    t.add(
        "valid_after_batch_succeeded" if result.after.state == "succeeded" else "valid_after_lost"
    )
    t.add("worker_crashes", result.crashes)
    t.add("unexpected_dead_letters", len(result.unexpected_dead))


def assert_batch(result: BatchResult, w: WorkerProcess) -> None:
    bad = result.failures()
    lines = [f"  {v.outcome}: {v.why}\n    {v.sent!r}" for v in bad[:15]]
    assert not result.crashes, f"the worker stopped {result.crashes} time(s):\n" + "\n".join(lines)
    assert result.alive, "the worker stopped:\n" + w.log()[-3000:] + "\n" + "\n".join(lines)
    assert not bad, f"{len(bad)} of {len(result.verdicts)} entries went wrong:\n" + "\n".join(lines)
    assert result.after.state == "succeeded", result.after
    assert not result.unexpected_dead, result.unexpected_dead[:3]


def worker_check(w: WorkerProcess) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "worker", "check", "--node", w.node],
                          env=w.env, capture_output=True, text=True, timeout=60)  # fmt: skip


# -- generated -----------------------------------------------------------------------------------


def test_generated_entries_in_batches_never_stop_the_worker_nor_get_lost(
    bad_worker: WorkerProcess, bclient: Client, bad_queue: str, tally: dict[str, S.Tally]
) -> None:
    entries = S.draw_examples(S.queue_entries(), S.examples())
    t = tally["generated"]
    t.add("entries_drawn", len(entries))
    results = []
    for start in range(0, len(entries), BATCH):  # every batch, then the verdict: full counts
        result = run_batch(bclient, bad_worker, bad_queue, entries[start : start + BATCH])
        count(t, result)
        results.append(result)
    for result in results:
        assert_batch(result, bad_worker)
    r = bclient.redis
    assert sum(int(r.llen(k)) for k in contract.queue_keys(bad_queue)) == 0
    unacked = [json.loads(v) for v in r.hvals("unacked")]
    held = [m for m in unacked if m[0]["properties"]["delivery_info"]["routing_key"] == bad_queue]
    assert not held, f"{len(held)} messages held unacknowledged"
    check = worker_check(bad_worker)
    assert check.returncode == 0, check.stderr
    t.add("worker_check_healthy")


# -- hand-written ------------------------------------------------------------------------------

PICKLE_BODY = pickle.dumps(([], {"job": S.BASE_JOB}, S.EMBED))


def _raw(data: bytes) -> S.Entry:
    return S.Entry("hand-raw", "bytes", "dead-letter", data=data)


def _body(body: Any = None, data: bytes | None = None) -> S.Entry:
    return S.Entry("hand-body", "raw", "dead-letter", body=body, data=data)


def _deep_job(depth: int) -> bytes:
    """A body whose job's prompt is ``depth`` lists deep, written as text (no encoder
    recursion)."""
    head = json.dumps([[], {"job": {**S.BASE_JOB, "prompt": "@"}}, S.EMBED])
    before, after = head.split('"@"')
    return (before + "[" * depth + '"x"' + "]" * depth + after).encode()


#: (id, entry): raw bodies and envelopes that are not jobs; each must end in the dead letters.
RAW_CASES: list[tuple[str, S.Entry]] = [
    ("entry-not-json", _raw(b"this is not json at all")),
    ("entry-json-array", _raw(b"[1, 2, 3]")),
    ("entry-json-null", _raw(b"null")),
    ("entry-100000-levels", _raw(b"[" * 100_000)),
    ("entry-100000-levels-closed", _raw(b"[" * 100_000 + b"]" * 100_000)),
    ("body-not-json", _body(data=b"{not json")),
    ("body-json-array", _body([1, 2, 3])),
    ("body-json-null", _body(None, data=b"null")),
    ("body-100000-levels", _body(data=b"[" * 100_000 + b"]" * 100_000)),
    ("job-100000-levels", _body(data=_deep_job(100_000))),
    ("body-binary", _body(data=b"\x80\x81\xfe\xff")),
    (
        "body-encoding-rot13",
        S.Entry(
            "hand-body",
            "raw",
            "dead-letter",
            body=[[], {"job": S.BASE_JOB}, S.EMBED],
            mutate=("properties.body_encoding", "rot13"),
        ),
    ),
]

#: (id, envelope change, content type, body, why): what Celery refuses after delivery (logged
#: and acknowledged, no record: lost to the sender). The transport refuses each first: it ends
#: in the dead letters, its reason matching ``why``.
DROPPED_CASES: list[tuple[str, tuple[str, Any] | None, str, bytes | None, str]] = [
    ("pickle", None, "application/x-python-serialize", PICKLE_BODY,
     "content-type 'application/x-python-serialize' is not accepted"),
    ("content-type-yaml", None, "application/x-yaml", b"job: {prompt: a fox}",
     "content-type 'application/x-yaml' is not accepted"),
    ("content-type-json-charset", None, "application/json; charset=utf-8", None,
     "content-type 'application/json; charset=utf-8' is not accepted"),
    ("eta-not-a-date", ("headers.eta", "garbage"), "application/json", None,
     "headers.eta='garbage': must be null or an ISO-8601 date"),
    ("expires-not-a-date", ("headers.expires", "x"), "application/json", None,
     "headers.expires='x': must be null or an ISO-8601 date"),
    ("compressed", ("headers.compression", "application/x-gzip"), "application/json", None,
     "headers.compression='application/x-gzip': must be absent"),
    ("kombu-type-marker", None, "application/json",
     json.dumps([[], {"job": {**S.BASE_JOB, "prompt": {"__type__": "nope", "__value__": 1}}},
                 S.EMBED]).encode(), "body is not JSON kombu can decode: ValueError"),
]  # fmt: skip


def dropped_entry(queue: str, task_id: str, change: Any, ctype: str, body: bytes | None) -> bytes:
    data = body if body is not None else S.dumps([[], {"job": S.BASE_JOB}, S.EMBED])
    message = S.envelope(data, queue, task_id, content_type=ctype)
    if change is not None:
        path, value = change
        part, key = path.split(".")
        message[part][key] = value
    return S.dumps(message)


@dataclass
class HandWritten:
    jobs: dict[str, Verdict]
    raw: dict[str, Verdict]
    dropped: dict[str, tuple[JobStatus, str | None]]  # status, the dead letter's reason
    after: JobStatus
    alive: bool
    crashes: int
    log: str


@pytest.fixture(scope="module")
def hand_written(bad_worker: WorkerProcess, bclient: Client, bad_queue: str,
                 tally: dict[str, S.Tally]) -> HandWritten:  # fmt: skip
    """Every hand-written case, sent once as one batch, then a valid job."""
    job_entries = [S.Entry("hand-job", "send_task", "run", S.Case(m.apply(S.BASE_JOB), m))
                   for _, m in S.HAND_WRITTEN]  # fmt: skip
    dropped_ids = {name: S.unique_job_id("dropped") for name, *_ in DROPPED_CASES}
    dropped_entries = [
        S.Entry("hand-dropped", "bytes", "dead-letter",
                data=dropped_entry(bad_queue, dropped_ids[name], change, ctype, body))
        for name, change, ctype, body, _ in DROPPED_CASES
    ]  # fmt: skip
    entries = job_entries + [e for _, e in RAW_CASES] + dropped_entries
    log_start = len(bad_worker.log())
    since = datetime.now().astimezone()
    result = run_batch(bclient, bad_worker, bad_queue, entries)
    count(tally["hand_written"], result)
    names = [n for n, _ in S.HAND_WRITTEN] + [n for n, _ in RAW_CASES] + list(dropped_ids)
    verdicts = dict(zip(names, result.verdicts, strict=True))
    reasons = {d.get("task_id"): d.get("reason") for d in new_dead_letters(bclient, bad_queue,
                                                                            since)}  # fmt: skip
    dropped = {n: (bclient.status(tid), reasons.get(tid)) for n, tid in dropped_ids.items()}
    jobs = {n: verdicts[n] for n, _ in S.HAND_WRITTEN}
    raw = {n: verdicts[n] for n, _ in RAW_CASES}
    log = bad_worker.log()[log_start:]
    return HandWritten(jobs, raw, dropped, result.after, result.alive, result.crashes, log)


def test_the_worker_survives_every_hand_written_case(hand_written: HandWritten) -> None:
    stopped = [ln for ln in hand_written.log.splitlines() if "Unrecoverable error" in ln]
    assert not hand_written.crashes, f"the worker stopped {hand_written.crashes} time(s): {stopped}"
    assert hand_written.alive, hand_written.log[-3000:]
    assert hand_written.after.state == "succeeded", hand_written.after


@pytest.mark.parametrize(("name", "mutation"), S.HAND_WRITTEN, ids=[n for n, _ in S.HAND_WRITTEN])
def test_each_hand_written_bad_job_fails_alone_naming_the_field(
    name: str, mutation: S.Mutation, hand_written: HandWritten
) -> None:
    v = hand_written.jobs[name]
    assert v.ok, f"{v.outcome}: {v.why}"
    assert v.outcome == "failed"


@pytest.mark.parametrize("name", [n for n, _ in RAW_CASES])
def test_each_hand_written_raw_entry_ends_in_the_dead_letters(
    name: str, hand_written: HandWritten
) -> None:
    v = hand_written.raw[name]
    assert v.ok and v.outcome == "dead-letter", f"{v.outcome}: {v.why}"


@pytest.mark.parametrize("name", [c[0] for c in DROPPED_CASES])
def test_an_entry_celery_refuses_is_never_run(name: str, hand_written: HandWritten) -> None:
    status, _ = hand_written.dropped[name]
    assert status.state != "succeeded", status


@pytest.mark.parametrize(("name", "why"), [(c[0], c[4]) for c in DROPPED_CASES],
                         ids=[c[0] for c in DROPPED_CASES])  # fmt: skip
def test_an_entry_celery_refuses_is_recorded(
    name: str, why: str, hand_written: HandWritten
) -> None:
    """Recorded: in the dead letters (``producer failed`` shows them), saying why."""
    status, reason = hand_written.dropped[name]
    assert reason is not None or status.state == "failed", f"{status.state}: only logged"
    assert reason is not None and why in reason, reason


def test_pickle_is_refused_as_disallowed_content(hand_written: HandWritten) -> None:
    """Pickle would run code in the worker: refused before Celery sees it, never unpickled."""
    _, reason = hand_written.dropped["pickle"]
    assert reason is not None and "application/x-python-serialize' is not accepted" in reason
    assert "take application/json only" in reason
    assert "dead-lettered an entry" in hand_written.log and "x-python-serialize" in hand_written.log


# -- entries that once stopped a worker ---------------------------------------------------------

#: The body of a valid job, in the envelopes below.
GOOD_BODY = [[], {"job": S.BASE_JOB}, S.EMBED]


def _stopper(change: tuple[str, Any] | None = None, data: bytes | None = None,
             base64_body: bool = True, expect: str = "dead-letter") -> S.Entry:  # fmt: skip
    return S.Entry("stopper", "raw", expect, body=GOOD_BODY, data=data, mutate=change,
                   base64_body=base64_body)  # fmt: skip


#: (id, entry, the dead letter's reason): envelope headers and properties of the wrong type and
#: jobs nested hundreds of levels deep. The timelimit-string, -three-items and -strings,
#: task-name, stamped-headers, delivery-tag and 500-levels cases stopped the worker that took
#: them ("Unrecoverable error", and the entry restored to stop the next one) before the
#: transport checked them; the others reach the same unguarded code in Celery and kombu (an
#: unhashable or missing task id, a time limit no timer can add, kombu's QoS reading the
#: exchange, an unknown body codec). All go to one worker in one batch; each must end in the
#: dead letters saying why.
STOPPERS: list[tuple[str, S.Entry, str]] = [
    ("timelimit-string", _stopper(("headers.timelimit", "x")), r"headers\.timelimit='x'"),
    ("timelimit-three-items", _stopper(("headers.timelimit", [1, 2, 3])),
     r"headers\.timelimit=\[1, 2, 3\]"),
    ("timelimit-strings", _stopper(("headers.timelimit", ["a", "b"])), r"headers\.timelimit="),
    ("timelimit-past-every-float", _stopper(("headers.timelimit", [10**400, None])),
     r"headers\.timelimit="),
    ("task-name-a-list", _stopper(("headers.task", ["fleet.generate"])), r"headers\.task="),
    ("task-id-a-list", _stopper(("headers.id", ["x"])), r"headers\.id="),
    ("task-id-missing", _stopper(("headers.id", S.REMOVE)), r"headers\.id is missing"),
    ("stamped-headers-an-int", _stopper(("headers.stamped_headers", 5)),
     r"headers\.stamped_headers=5"),
    ("delivery-tag-an-object", _stopper(("properties.delivery_tag", {"a": 1})),
     r"properties\.delivery_tag="),
    ("delivery-info-without-exchange", _stopper(("properties.delivery_info.exchange", S.REMOVE)),
     r"properties\.delivery_info\.exchange is missing"),
    ("body-encoding-rot13-plain-body",
     _stopper(("properties.body_encoding", "rot13"), base64_body=False),
     r"properties\.body_encoding='rot13'"),
    ("job-500-levels-deep", _stopper(data=_deep_job(500)), r"nested 503 levels deep: at most 64"),
    # Deep enough that kombu's decoder may run out of stack first: refused either way.
    ("job-900-levels-deep", _stopper(data=_deep_job(900)),
     r"nested 903 levels deep: at most 64|RecursionError"),
]  # fmt: skip
#: Time limits Celery takes, however long: the job runs (or fails alone), the worker stays.
TAKEN = [("timelimit-1e308", _stopper(("headers.timelimit", [1e308, 1e308]), expect="handled"))]


@dataclass
class Stoppers:
    result: BatchResult
    verdicts: dict[str, Verdict]
    reasons: dict[str, str | None]  # the dead letter's reason, by case


@pytest.fixture(scope="module")
def stoppers(bad_worker: WorkerProcess, bclient: Client, bad_queue: str,
             tally: dict[str, S.Tally]) -> Stoppers:  # fmt: skip
    """Every entry that once stopped a worker, sent as one batch to this module's worker (one
    worker start for all of them; started again if one stops it), then a valid job."""
    since = datetime.now().astimezone()
    cases = [(n, e) for n, e, _ in STOPPERS] + TAKEN
    result = run_batch(bclient, bad_worker, bad_queue, [e for _, e in cases])
    count(tally["stoppers"], result)
    letters = {(d.get("raw") or "", int(d.get("raw_chars") or 0)): d.get("reason")
               for d in new_dead_letters(bclient, bad_queue, since)}  # fmt: skip
    verdicts = dict(zip([n for n, _ in cases], result.verdicts, strict=True))
    reasons = {n: letters.get(v.sent.key) for n, v in verdicts.items()}
    return Stoppers(result, verdicts, reasons)


def test_no_entry_that_once_stopped_a_worker_stops_it(
    stoppers: Stoppers, bad_worker: WorkerProcess
) -> None:
    """The worker alive after all of them, the valid job after them succeeded, nothing lost."""
    assert_batch(stoppers.result, bad_worker)
    assert stoppers.verdicts["timelimit-1e308"].ok, stoppers.verdicts["timelimit-1e308"]


@pytest.mark.parametrize(("name", "why"), [(n, w) for n, _, w in STOPPERS],
                         ids=[n for n, _, _ in STOPPERS])  # fmt: skip
def test_an_entry_that_once_stopped_a_worker_is_dead_lettered_saying_why(
    name: str, why: str, stoppers: Stoppers
) -> None:
    v = stoppers.verdicts[name]
    assert v.ok and v.outcome == "dead-letter", f"{v.outcome}: {v.why}"
    reason = stoppers.reasons[name]
    assert reason is not None and re.search(why, reason), reason
