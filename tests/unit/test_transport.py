"""What the worker's transport lets through to Celery, and the fleet's priority steps."""

from __future__ import annotations

import base64
import json
import math
import re
import uuid
from datetime import datetime, timezone

import pytest
from celery import Celery
from kombu import Connection
from kombu.serialization import prepare_accept_content

from fleet import contract
from fleet.celeryconf import celery_config
from fleet.settings import FleetSettings
from tests import strategies as S
from worker.ops.transport import (
    ACCEPTED_CONTENT_TYPE,
    MAX_BODY_DEPTH,
    BadEntry,
    decode_entry,
    nesting_depth,
)


def envelope(payload: object, encode: bool = True, **over: object) -> str:
    raw = json.dumps(payload).encode()
    message = {
        "body": base64.b64encode(raw).decode() if encode else raw.decode(),
        "content-encoding": "utf-8",
        "content-type": "application/json",
        "headers": {"task": contract.TASK_GENERATE, "id": "t1"},
        "properties": {"delivery_info": {"exchange": "", "routing_key": "fleet"},
                       "body_encoding": "base64" if encode else None, "delivery_tag": "d1",
                       "priority": 0},
    }  # fmt: skip
    message.update(over)
    return json.dumps(message)


@pytest.mark.parametrize(
    ("raw", "why"),
    [
        ("this is not json", "not JSON"),
        ("[1, 2, 3]", "a JSON list"),
        ("null", "a JSON NoneType"),
        ("[" * 100_000, "not JSON"),
        ("{" * 100_000, "not JSON"),
        ('{"body": "x"}', "properties"),
        (envelope(None), r"not \[args, kwargs, embed\]"),
        (envelope({}), r"not \[args, kwargs, embed\]"),
        (envelope([[], {}]), r"not \[args, kwargs, embed\]"),
        (envelope([{}, [], {}]), r"not \[args, kwargs, embed\]"),
        (envelope([[], {}, {}], properties={"delivery_info": {}}), "delivery_tag"),
        (envelope([[], {}, {}], body=5), "string body"),
    ],
)
def test_an_entry_no_worker_can_run_is_refused_with_a_reason(raw: str, why: str) -> None:
    with pytest.raises(BadEntry, match=why):
        decode_entry(raw)


def test_a_celery_message_passes_as_it_is() -> None:
    good = envelope([[], {"job": {"prompt": "x"}}, {"callbacks": None}])
    assert decode_entry(good)["headers"]["id"] == "t1"
    assert decode_entry(envelope([[{"prompt": "x"}], {}, None], encode=False))


def stock_message(**options: object) -> str:
    """A message as a stock Celery ``send_task`` writes it (kombu's in-memory transport keeps
    the envelope the Redis transport would store)."""
    app = Celery(broker="memory://")
    app.conf.update(task_serializer="json", accept_content=["json"])
    with Connection("memory://") as conn:
        queue = f"q-{uuid.uuid4().hex[:8]}"
        app.send_task(contract.TASK_GENERATE, kwargs={"job": {"prompt": "x"}}, queue=queue,
                      connection=conn, **options)  # fmt: skip
        return json.dumps(conn.default_channel._get(queue))


@pytest.mark.parametrize(
    "options",
    [
        {},
        {"countdown": 5, "expires": 60, "time_limit": 10, "soft_time_limit": 5, "priority": 3},
        {"eta": datetime(2030, 1, 1, tzinfo=timezone.utc), "retries": 2, "shadow": "name"},
        {"stamped_headers": ["a"], "a": "1", "ignore_result": True},
    ],
)
def test_a_stock_celery_message_passes_with_every_header_it_sets(options: dict) -> None:
    raw = stock_message(**options)
    assert decode_entry(raw) == json.loads(raw)


def test_the_content_type_taken_is_the_one_the_fleet_accepts() -> None:
    conf = celery_config(FleetSettings(_env_file=None, redis_url="redis://127.0.0.1:1/0"))
    assert prepare_accept_content(conf["accept_content"]) == {ACCEPTED_CONTENT_TYPE}


def changed(path: str, value: object, body: object = None) -> str:
    """A good task message with the envelope part at ``path`` set to ``value`` (REMOVE: taken
    out)."""
    message = json.loads(envelope(body if body is not None else [[], {"job": {}}, None]))
    S.set_path(message, path, value)
    return json.dumps(message)


REMOVE = S.REMOVE

#: (path, value): header and property values Celery's worker cannot take; the first ones each
#: stopped the worker that took them before the transport checked them.
BAD_FIELDS: list[tuple[str, object]] = [
    ("headers.timelimit", "x"),
    ("headers.timelimit", [1, 2, 3]),
    ("headers.timelimit", ["a", "b"]),
    ("headers.task", ["fleet.generate"]),
    ("headers.stamped_headers", 5),
    ("properties.delivery_tag", {"a": 1}),
    ("headers.timelimit", [math.nan, None]),
    ("headers.timelimit", [-1, None]),
    ("headers.timelimit", [10**400, None]),
    ("headers.timelimit", [True, None]),
    ("headers.timelimit", {"hard": 1}),
    ("headers.task", ""),
    ("headers.task", 5),
    ("headers.task", None),
    ("headers.id", ["t1"]),
    ("headers.id", 5),
    ("headers.id", ""),
    ("headers.id", REMOVE),
    ("headers.stamped_headers", [1]),
    ("headers.stamped_headers", "abc"),
    ("headers.stamps", ["a"]),
    ("headers.eta", "garbage"),
    ("headers.eta", 1_700_000_000),
    ("headers.eta", {"__type__": "datetime", "__value__": "2030-01-01T00:00:00"}),
    ("headers.eta", "0001-01-01T00:00:00+01:00"),
    ("headers.expires", "x"),
    ("headers.expires", "2030-13-01T00:00:00"),
    ("headers.retries", "1"),
    ("headers.retries", -1),
    ("headers.retries", True),
    ("headers.retries", 1.5),
    ("headers.replaced_task_nesting", "0"),
    ("headers.group_index", "1"),
    ("headers.shadow", ["x"]),
    ("headers.root_id", {}),
    ("headers.parent_id", 5),
    ("headers.group", ["g"]),
    ("headers.origin", 5),
    ("headers.lang", ["py"]),
    ("headers.argsrepr", []),
    ("headers.kwargsrepr", {}),
    ("headers.ignore_result", "yes"),
    ("headers.compression", "application/x-gzip"),
    ("properties.delivery_tag", ""),
    ("properties.delivery_tag", 5),
    ("properties.body_encoding", "rot13"),
    ("properties.priority", "high"),
    ("properties.priority", 1.5),
    ("properties.priority", True),
    ("properties.correlation_id", 5),
    ("properties.reply_to", []),
    ("properties.delivery_info.exchange", REMOVE),
    ("properties.delivery_info.routing_key", REMOVE),
    ("properties.delivery_info.routing_key", ["fleet"]),
]


@pytest.mark.parametrize(
    ("path", "value"), BAD_FIELDS, ids=[f"{p}={v!r}"[:60] for p, v in BAD_FIELDS]
)
def test_a_header_of_the_wrong_type_is_refused_naming_it(path: str, value: object) -> None:
    with pytest.raises(BadEntry, match=re.escape(path)) as info:
        decode_entry(changed(path, value))
    assert "must be" in str(info.value) and len(str(info.value)) < 400


#: (path, value): what Celery writes or takes for the same headers.
GOOD_FIELDS: list[tuple[str, object]] = [
    ("headers.timelimit", None),
    ("headers.timelimit", [None, None]),
    ("headers.timelimit", [0, 0]),
    ("headers.timelimit", [600, 540.5]),
    ("headers.eta", None),
    ("headers.eta", "2030-01-01T00:00:00+00:00"),
    ("headers.eta", "2030-01-01T00:00:00"),
    ("headers.expires", "2030-01-01T00:00:00.123456Z"),
    ("headers.stamped_headers", None),
    ("headers.stamped_headers", ["a"]),
    ("headers.stamps", {"a": [1, 2]}),
    ("headers.retries", 3),
    ("headers.shadow", None),
    ("headers.ignore_result", False),
    ("headers.compression", None),
    ("headers.redelivered", True),
    ("headers.x-custom", {"any": ["thing"]}),
    ("properties.priority", None),
    ("properties.priority", 9),
    ("properties.reply_to", None),
    ("properties.delivery_info.exchange", None),
    ("content-encoding", "UTF-8"),
    ("content-encoding", REMOVE),
]


@pytest.mark.parametrize(("path", "value"), GOOD_FIELDS,
                         ids=[f"{p}={v!r}"[:60] for p, v in GOOD_FIELDS])  # fmt: skip
def test_a_header_celery_takes_passes(path: str, value: object) -> None:
    assert decode_entry(changed(path, value))


@pytest.mark.parametrize(
    ("content_type", "why"),
    [
        ("application/x-python-serialize", "'application/x-python-serialize' is not accepted"),
        ("application/x-yaml", "'application/x-yaml' is not accepted"),
        ("application/json; charset=utf-8", "is not accepted"),
        ("text/plain", "is not accepted"),
        (REMOVE, "content-type None is not accepted"),
    ],
)
def test_content_other_than_json_is_refused(content_type: object, why: str) -> None:
    """Celery would refuse it after delivery (ContentDisallowed), logged only: pickle above all."""
    raw = changed("content-type", content_type)
    message = json.loads(raw)
    message["body"] = base64.b64encode(b"\x80\x04pickle").decode()
    with pytest.raises(BadEntry, match=re.escape(why) + ".*take application/json only"):
        decode_entry(json.dumps(message))


@pytest.mark.parametrize("encoding", ["latin-1", "binary", 5])
def test_a_json_body_in_another_charset_is_refused(encoding: object) -> None:
    with pytest.raises(BadEntry, match=r"content-encoding .*utf-8"):
        decode_entry(changed("content-encoding", encoding))


@pytest.mark.parametrize(
    "marker",
    [
        {"__type__": "nope", "__value__": 1},
        {"__type__": "uuid", "__value__": 5},
        {"__type__": "decimal", "__value__": "not a number"},
        {"__type__": "datetime", "__value__": "garbage"},
        {"__type__": "bytes", "__value__": 5},
    ],
)
def test_a_kombu_type_marker_kombu_cannot_decode_is_refused(marker: dict) -> None:
    for encode in (True, False):
        with pytest.raises(BadEntry, match="body is not JSON kombu can decode"):
            decode_entry(envelope([[], {"job": {"prompt": marker}}, None], encode=encode))


def test_a_kombu_type_marker_kombu_decodes_passes() -> None:
    marker = {"__type__": "uuid", "__value__": {"hex": uuid.uuid4().hex}}
    assert decode_entry(envelope([[], {"job": {"prompt": marker}}, None]))


def test_an_unencoded_body_that_is_not_utf8_is_refused() -> None:
    """A lone surrogate in the body's text (a JSON escape in the envelope) has no UTF-8 bytes,
    and kombu decodes the bytes."""
    message = json.loads(envelope([[], {"job": {}}, None], encode=False))
    message["body"] = '[[], {"job": {"prompt": "a fox \ud800"}}, null]'
    with pytest.raises(BadEntry, match="UnicodeEncodeError"):
        decode_entry(json.dumps(message))


def deep_job(depth: int) -> str:
    """A message whose job's prompt is ``depth`` lists deep (its body 3 + ``depth``), written
    as text: no encoder recursion."""
    text = '[[], {"job": {"prompt": ' + "[" * depth + '"x"' + "]" * depth + "}}, null]"
    return envelope([], body=base64.b64encode(text.encode()).decode())


def test_a_body_as_deep_as_the_limit_passes() -> None:
    assert decode_entry(deep_job(MAX_BODY_DEPTH - 3))


@pytest.mark.parametrize("depth", [MAX_BODY_DEPTH - 2, 200, 500, 900])
def test_a_body_deeper_than_the_limit_is_refused_naming_depth_and_limit(depth: int) -> None:
    with pytest.raises(BadEntry, match=f"nested {depth + 3} levels deep: at most "
                                       f"{MAX_BODY_DEPTH}"):  # fmt: skip
        decode_entry(deep_job(depth))


def test_nesting_depth_counts_lists_and_objects_without_recursion() -> None:
    values: list[object] = ["x", [], {}, [[1]], {"a": [{}]}, [1, [2, [3]], {}]]
    assert [nesting_depth(v) for v in values] == [0, 1, 1, 2, 3, 3]
    value: object = "x"
    for _ in range(100_000):
        value = [value]
    assert nesting_depth(value) == 100_000


def test_the_envelope_of_the_bad_input_tests_passes_as_kombu_writes_it() -> None:
    """tests/strategies.py's envelope of a valid job is one the transport takes: what its
    mutations change is all that makes an entry bad."""
    raw = S.dumps(S.envelope(S.dumps([[], {"job": S.BASE_JOB}, S.EMBED]), "q", "t1"))
    assert decode_entry(raw)["headers"]["id"] == "t1"
    plain = S.envelope(S.dumps([[], {"job": S.BASE_JOB}, S.EMBED]), "q", "t2", base64_body=False)
    assert decode_entry(S.dumps(plain))["headers"]["id"] == "t2"


def test_a_message_without_a_priority_waits_at_the_default_priority() -> None:
    assert contract.celery_priority(contract.DEFAULT_PRIORITY) == 0  # what kombu gives no priority
    order = contract.WORKER_READ_ORDER
    assert sorted(order) == list(range(10))
    # Workers read fleet priority 9 first and 0 last; the default sits in the middle.
    assert [order.index(contract.celery_priority(p)) for p in range(9, -1, -1)] == list(range(10))
    assert contract.queue_keys("q")[order.index(0)] == "q"
    assert contract.queue_keys("q")[0] == f"q{contract.PRIORITY_SEP}4"


def test_remote_control_messages_keep_their_own_bodies() -> None:
    """Pidbox commands and replies (`celery control`, `celery inspect`) are not task messages:
    neither their bodies nor their headers are a task's."""
    reply = json.loads(envelope({"gpu0@host": {"ok": "no longer consuming from fleet"}}))
    del reply["headers"]["task"]
    reply["headers"].update(ticket="abc", timelimit="not a task's", id=5)
    reply["content-type"] = "application/x-kombu-reply"
    assert decode_entry(json.dumps(reply))["body"] == reply["body"]
