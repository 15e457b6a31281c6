"""How the store's answers are classified (botocore's Stubber), and the readiness check."""

from __future__ import annotations

from typing import Any

import boto3
import pytest
from botocore.stub import Stubber

from fleet.errors import StorageError, StorageRefused
from fleet.settings import WorkerSettings
from fleet.storage import ObjectStore
from worker.ops import gate


def stubbed() -> tuple[ObjectStore, Stubber]:
    client = boto3.client("s3", region_name="us-east-1", aws_access_key_id="k",
                          aws_secret_access_key="s")  # fmt: skip
    return ObjectStore(WorkerSettings(_env_file=None), client=client), Stubber(client)


@pytest.mark.parametrize(
    ("code", "status", "says"),
    [
        ("SignatureDoesNotMatch", 403, "FLEET_S3_SECRET_ACCESS_KEY"),
        ("InvalidAccessKeyId", 403, "FLEET_S3_ACCESS_KEY_ID"),
        ("AccessDenied", 403, "docs/operations.md"),
        ("NoSuchBucket", 404, "FLEET_S3_CREATE_BUCKET"),
        ("RequestTimeTooSkewed", 403, "clock"),
    ],
)
def test_a_refusal_names_what_to_fix_and_is_not_retried(code: str, status: int, says: str) -> None:
    store, stub = stubbed()
    stub.add_client_error("put_object", service_error_code=code, http_status_code=status)
    with stub, pytest.raises(StorageRefused, match=says) as exc:
        store.put_bytes("k", b"x", "text/plain")
    assert exc.value.disposition == "worker"


@pytest.mark.parametrize(("code", "status"), [("SlowDown", 503), ("InternalError", 500)])
def test_a_store_that_is_only_away_is_retried(code: str, status: int) -> None:
    store, stub = stubbed()
    stub.add_client_error("put_object", service_error_code=code, http_status_code=status)
    with stub, pytest.raises(StorageError) as exc:
        store.put_bytes("k", b"x", "text/plain")
    assert not isinstance(exc.value, StorageRefused) and exc.value.disposition == "transient"


def test_a_bare_403_to_a_head_is_a_refusal_until_the_canary_passed() -> None:
    store, stub = stubbed()
    # A HEAD answer has no body: a wrong secret reads as a bare 403.
    stub.add_client_error("head_object", service_error_code="403", http_status_code=403)
    with stub, pytest.raises(StorageRefused, match="403"):
        store.exists("jobs/x/manifest.json")
    # After the canary (these credentials write and read here), a 403 for one missing key is
    # AWS without s3:ListBucket: "no such object", not broken credentials.
    store.verified = True
    stub.add_client_error("head_object", service_error_code="403", http_status_code=403)
    stub.add_client_error("get_object", service_error_code="AccessDenied", http_status_code=403)
    with stub:
        assert store.exists("jobs/x/manifest.json") is False
        assert store.get_json("jobs/x/manifest.json") is None


class FakeRedis:
    def __init__(self) -> None:
        self.data: dict[str, Any] = {}

    def set(self, key: str, value: str, ex: int | None = None) -> None:
        self.data[key] = value

    def get(self, key: str) -> Any:
        return self.data.get(key)


def test_the_readiness_check_publishes_ready_broken_or_waits_for_storage() -> None:
    r = FakeRedis()
    assert gate.check_readiness(r, "n", lambda: None, lambda: None) == gate.READY  # type: ignore[arg-type]
    assert gate.read_state(r, "n")["state"] == gate.READY  # type: ignore[arg-type]

    def no_model() -> None:
        raise OSError("no such folder /models/x")

    assert gate.check_readiness(r, "n", no_model, lambda: None) == gate.BROKEN  # type: ignore[arg-type]
    assert "the model cannot load: no such folder" in gate.read_state(r, "n")["reason"]  # type: ignore[arg-type]

    def refused() -> None:
        raise StorageRefused("the secret key is wrong")

    assert gate.check_readiness(r, "n", None, refused) == gate.BROKEN  # type: ignore[arg-type]
    assert "storage refuses this worker" in gate.read_state(r, "n")["reason"]  # type: ignore[arg-type]

    tries: list[float] = []

    def away_twice() -> None:
        if len(tries) < 2:
            raise StorageError("connection refused")

    assert gate.check_readiness(r, "n", None, away_twice, sleep=tries.append) == gate.READY  # type: ignore[arg-type]
    assert tries == [1.0, 2.0]  # backoff while storage is away


def test_a_conditional_write_probe_that_meets_an_outage_is_not_kept() -> None:
    """A SlowDown during the first probe must not settle "no conditional writes" for the life
    of the process (failure records would race successes from then on)."""
    store, stub = stubbed()
    stub.add_response("put_object", {})  # the probe object
    stub.add_client_error("put_object", service_error_code="SlowDown", http_status_code=503)
    stub.add_response("delete_object", {})
    # The next use probes again, and the store does refuse the failed condition.
    stub.add_response("put_object", {})
    stub.add_client_error("put_object", service_error_code="PreconditionFailed",
                          http_status_code=412)  # fmt: skip
    stub.add_response("delete_object", {})
    with stub:
        assert store.conditional_writes is False  # read-then-write for this one call
        assert store.conditional_writes is True
        assert store.conditional_writes is True  # kept now: no third probe
        stub.assert_no_pending_responses()


@pytest.mark.parametrize(("code", "status"), [("NotImplemented", 501), ("InvalidArgument", 400)])
def test_a_store_that_answers_it_does_not_take_conditions_is_kept_as_such(
    code: str, status: int
) -> None:
    store, stub = stubbed()
    stub.add_response("put_object", {})
    stub.add_client_error("put_object", service_error_code=code, http_status_code=status)
    stub.add_response("delete_object", {})
    with stub:
        assert store.conditional_writes is False
        assert store.conditional_writes is False  # no second probe: nothing pending is used
        stub.assert_no_pending_responses()
