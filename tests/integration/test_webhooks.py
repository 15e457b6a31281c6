"""Webhooks against a real local HTTP server: signed with HMAC-SHA256 over the timestamp and the
body, retried with backoff by a light worker on the webhooks queue, sent for succeeded and failed
jobs; a redirect is never followed nor retried, and the URL's query never reaches the logs."""

from __future__ import annotations

import hashlib
import hmac
import json
import re
import threading
import time
import uuid
from collections.abc import Iterator
from dataclasses import dataclass
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import pytest

from fleet.contract import WEBHOOK_QUEUE, WEBHOOK_SIGNATURE_HEADER, JobSpec
from fleet.settings import ProducerSettings
from producer.client import Client
from tests.fleet_fixtures import WorkerProcess, settings_kwargs, wait_until

pytestmark = pytest.mark.integration

SECRET = "test-secret-" + uuid.uuid4().hex


class Receiver:
    """A local HTTP endpoint that fails the first ``fail_first`` requests with 500, or answers
    every request with a redirect to ``redirect_to``."""

    def __init__(self, fail_first: int = 0, redirect_to: str | None = None) -> None:
        self.requests: list[tuple[dict[str, str], bytes]] = []
        self.fail_first = fail_first
        receiver = self

        class Handler(BaseHTTPRequestHandler):
            def do_POST(self) -> None:
                body = self.rfile.read(int(self.headers.get("Content-Length") or 0))
                receiver.requests.append((dict(self.headers), body))
                if redirect_to is not None:
                    self.send_response(302)
                    self.send_header("Location", redirect_to)
                else:
                    failing = len(receiver.requests) <= receiver.fail_first
                    self.send_response(500 if failing else 200)
                self.send_header("Content-Length", "0")
                self.end_headers()

            do_GET = do_POST

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


@dataclass
class HookedFleet:
    """A generating worker on a queue of its own and the one webhooks worker of this module."""

    gen: WorkerProcess
    hooks: WorkerProcess
    settings: ProducerSettings


@pytest.fixture(scope="module")
def fleet(module_workers, fleet_env: dict) -> HookedFleet:
    queue = f"fleet.hooks-{uuid.uuid4().hex[:6]}"
    env = {"FLEET_WEBHOOK_SECRET": SECRET, "FLEET_WEBHOOK_ALLOW_PRIVATE": "true"}
    gen = module_workers("gen-hooks", queues=queue, **env)
    hooks = module_workers("hooks", queues=WEBHOOK_QUEUE, pool="threads", concurrency=4, **env)
    settings = ProducerSettings(_env_file=None, **settings_kwargs({**fleet_env, **env}))
    settings.queue = queue
    return HookedFleet(gen, hooks, settings)


def test_webhook_is_signed_retried_and_sent_for_success_and_failure(
    fleet: HookedFleet, receiver: Receiver
) -> None:
    hooks = fleet.hooks
    with Client(fleet.settings) as c:
        ok = c.submit(JobSpec(prompt="hooked", width=64, height=64, steps=2,
                              webhook=receiver.url))  # fmt: skip
        assert ok.wait(timeout=60).state == "succeeded"
        deadline = time.monotonic() + 30
        while len(receiver.requests) < 3:
            assert time.monotonic() < deadline, f"{len(receiver.requests)} deliveries"
            time.sleep(0.1)
        headers, body = receiver.requests[-1]
        # The receiver's check (docs/webhooks.md): the signature covers "<timestamp>." + body,
        # and the timestamp is recent.
        timestamp = headers["X-Fleet-Timestamp"]
        assert abs(int(timestamp) - time.time()) <= 300
        signed = f"{timestamp}.".encode() + body
        expected = "sha256=" + hmac.new(SECRET.encode(), signed, hashlib.sha256).hexdigest()
        assert hmac.compare_digest(headers[WEBHOOK_SIGNATURE_HEADER], expected)
        # One delivery, retried: the same delivery id on every attempt.
        assert len({h["X-Fleet-Delivery"] for h, _ in receiver.requests}) == 1
        payload = json.loads(body)
        assert payload["job_id"] == ok.job_id and payload["status"] == "succeeded"
        assert payload["images"][0]["key"].endswith("image-000.png")
        # Presigned when the delivery is sent (results keep keys only), and it works.
        import urllib.request

        with urllib.request.urlopen(payload["images"][0]["url"], timeout=30) as resp:
            assert resp.read()[:8] == b"\x89PNG\r\n\x1a\n"
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


def test_a_redirecting_webhook_is_not_followed_nor_retried_and_its_token_is_not_logged(
    fleet: HookedFleet,
) -> None:
    inside = Receiver()  # stands for 169.254.169.254: never reached
    hook = Receiver(redirect_to=inside.url)
    token = "TOKEN" + uuid.uuid4().hex
    # Celery's own line for a task that failed for good: after it, no retry can follow. Other
    # tests' refused deliveries wrote it before: wait for one more than there were.
    ended = re.compile(r"Task fleet\.webhook\[([0-9a-f-]+)\] raised unexpected: WebhookRefused")
    before = len(ended.findall(fleet.hooks.log()))
    try:
        with Client(fleet.settings) as c:
            job = c.submit(JobSpec(prompt="hooked", width=64, height=64, steps=2,
                                   webhook=f"{hook.url}?token={token}"))  # fmt: skip
            assert job.wait(timeout=60).state == "succeeded"
        wait_until(lambda: len(ended.findall(fleet.hooks.log())) > before, 30,
                   "the delivery's end")  # fmt: skip
        found = list(ended.finditer(fleet.hooks.log()))[before]
        assert f"fleet.webhook[{found.group(1)}] retry" not in fleet.hooks.log()
        assert len(hook.requests) == 1 and inside.requests == []
        assert "answered 302 redirect; redirects are not followed" in fleet.hooks.log()
        assert token not in fleet.hooks.log() and token not in fleet.gen.log()
    finally:
        hook.close()
        inside.close()


def test_a_tenants_webhooks_are_signed_with_its_own_secret_and_its_objects_kept_apart(
    fleet: HookedFleet, receiver: Receiver, fleet_env: dict
) -> None:
    """A gateway tenant's job (the gateway sets ``tenant``): signed with the secret
    `producer keys webhook-secret --tenant` prints, which no other tenant's nor the fleet's
    own secret matches; its images under tenants/<tenant>/."""
    import subprocess
    import sys

    from fleet.contract import tenant_webhook_secret
    from tests.fleet_fixtures import REPO

    tenant = f"hooks-{uuid.uuid4().hex[:6]}"
    printed = subprocess.run(
        [sys.executable, "-m", "producer", "keys", "webhook-secret", "--tenant", tenant],
        cwd=REPO, env={**fleet_env, "FLEET_WEBHOOK_SECRET": SECRET}, capture_output=True,
        text=True, timeout=60,
    )  # fmt: skip
    assert printed.returncode == 0, printed.stderr
    theirs = printed.stdout.strip()
    assert theirs == tenant_webhook_secret(SECRET, tenant) and theirs != SECRET
    with Client(fleet.settings) as c:
        job = c.submit(JobSpec(prompt="tenant hook", width=64, height=64, steps=2,
                               webhook=receiver.url, tenant=tenant))  # fmt: skip
        assert job.wait(timeout=60).state == "succeeded"
    wait_until(lambda: len(receiver.requests) >= 3, 30, "the delivery (after two 500s)")
    headers, body = receiver.requests[-1]
    signed = f"{headers['X-Fleet-Timestamp']}.".encode() + body

    def signature(secret: str) -> str:
        return "sha256=" + hmac.new(secret.encode(), signed, hashlib.sha256).hexdigest()

    got = headers[WEBHOOK_SIGNATURE_HEADER]
    assert hmac.compare_digest(got, signature(theirs))
    assert got != signature(SECRET) and got != signature(tenant_webhook_secret(SECRET, "other"))
    assert json.loads(body)["images"][0]["key"].startswith(f"tenants/{tenant}/jobs/")
