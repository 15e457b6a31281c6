"""What the worker's transport lets through to Celery, and the fleet's priority steps."""

from __future__ import annotations

import base64
import json

import pytest

from fleet import contract
from worker.ops.transport import BadEntry, decode_entry


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
    pickled = json.loads(envelope([[], {}, {}]))
    pickled["content-type"] = "application/x-python-serialize"
    pickled["body"] = base64.b64encode(b"\x80\x04pickle").decode()
    # Not JSON content: Celery refuses it itself (ContentDisallowed) and acknowledges it.
    assert decode_entry(json.dumps(pickled))["content-type"] == "application/x-python-serialize"


def test_a_message_without_a_priority_waits_at_the_default_priority() -> None:
    assert contract.celery_priority(contract.DEFAULT_PRIORITY) == 0  # what kombu gives no priority
    order = contract.WORKER_READ_ORDER
    assert sorted(order) == list(range(10))
    # Workers read fleet priority 9 first and 0 last; the default sits in the middle.
    assert [order.index(contract.celery_priority(p)) for p in range(9, -1, -1)] == list(range(10))
    assert contract.queue_keys("q")[order.index(0)] == "q"
    assert contract.queue_keys("q")[0] == f"q{contract.PRIORITY_SEP}4"


def test_remote_control_messages_keep_their_own_bodies() -> None:
    """Pidbox commands and replies (`celery control`, `celery inspect`) are not task messages."""
    reply = json.loads(envelope({"gpu0@host": {"ok": "no longer consuming from fleet"}}))
    del reply["headers"]["task"]
    assert decode_entry(json.dumps(reply))["body"] == reply["body"]
