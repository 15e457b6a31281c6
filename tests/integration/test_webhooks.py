"""Webhooks against a real local HTTP server: signed with HMAC-SHA256, retried with backoff by a
light worker on the webhooks queue, sent for succeeded and failed jobs."""

from __future__ import annotations

import hashlib
import hmac
import json
import threading
import time
import uuid
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import pytest

from fleet.contract import WEBHOOK_QUEUE, WEBHOOK_SIGNATURE_HEADER, JobSpec
from fleet.settings import ProducerSettings
from producer.client import Client
from tests.fleet_fixtures import settings_kwargs

pytestmark = pytest.mark.integration

SECRET = "test-secret-" + uuid.uuid4().hex


class Receiver:
    """A local HTTP endpoint that fails the first ``fail_first`` requests with 500."""

    def __init__(self, fail_first: int) -> None:
        self.requests: list[tuple[dict[str, str], bytes]] = []
        self.fail_first = fail_first
        receiver = self

        class Handler(BaseHTTPRequestHandler):
            def do_POST(self) -> None:
                body = self.rfile.read(int(self.headers["Content-Length"]))
                receiver.requests.append((dict(self.headers), body))
                failing = len(receiver.requests) <= receiver.fail_first
                self.send_response(500 if failing else 200)
                self.end_headers()

            def log_message(self, *args: object) -> None:
                pass

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}/hook"
        threading.Thread(target=self.server.serve_forever, daemon=True).start()

    def close(self) -> None:
        self.server.shutdown()


@pytest.fixture()
def receiver() -> Iterator[Receiver]:
    r = Receiver(fail_first=2)
    yield r
    r.close()


def test_webhook_is_signed_retried_and_sent_for_success_and_failure(
    start_worker, fleet_env: dict, receiver: Receiver
) -> None:
    queue = f"fleet.hooks-{uuid.uuid4().hex[:6]}"
    env = {"FLEET_WEBHOOK_SECRET": SECRET, "FLEET_WEBHOOK_ALLOW_PRIVATE": "true"}
    start_worker("gen-hooks", queues=queue, **env)
    hooks = start_worker("hooks", queues=WEBHOOK_QUEUE, pool="threads", concurrency=4, **env)
    settings = ProducerSettings(_env_file=None, **settings_kwargs({**fleet_env, **env}))
    settings.queue = queue
    with Client(settings) as c:
        ok = c.submit(JobSpec(prompt="hooked", width=64, height=64, steps=2,
                              webhook=receiver.url))  # fmt: skip
        assert ok.wait(timeout=60).state == "succeeded"
        deadline = time.monotonic() + 30
        while len(receiver.requests) < 3:
            assert time.monotonic() < deadline, f"{len(receiver.requests)} deliveries"
            time.sleep(0.1)
        headers, body = receiver.requests[-1]
        expected = "sha256=" + hmac.new(SECRET.encode(), body, hashlib.sha256).hexdigest()
        assert headers[WEBHOOK_SIGNATURE_HEADER] == expected
        payload = json.loads(body)
        assert payload["job_id"] == ok.job_id and payload["status"] == "succeeded"
        assert payload["images"][0]["key"].endswith("image-000.png")
        assert [json.loads(b)["job_id"] for _, b in receiver.requests] == [ok.job_id] * 3

        bad = c.submit(JobSpec(prompt="hooked", width=64, height=64, steps=2,
                               model="not-served", webhook=receiver.url))  # fmt: skip
        assert bad.wait(timeout=60).state == "failed"
        deadline = time.monotonic() + 30
        while len(receiver.requests) < 4:
            assert time.monotonic() < deadline
            time.sleep(0.1)
        failed = json.loads(receiver.requests[3][1])
        assert failed["job_id"] == bad.job_id and failed["status"] == "failed"
        assert "serves 'tiny'" in failed["error"]
    # The webhooks worker runs the threads pool but serves no generation queue: it never loads
    # the model (threads-pool workers that do serve one load it at start).
    assert "model ready in" not in hooks.log()
