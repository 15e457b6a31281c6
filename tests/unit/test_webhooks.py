"""``worker.webhooks.post`` against local HTTP servers: redirects are not followed, the POST goes
to the address that was checked, the signature covers a timestamp (replays are detectable the
way docs/webhooks.md tells receivers), a DNS failure is retried, a private address is refused
without connecting, and no log line holds the URL's path or query."""

from __future__ import annotations

import hashlib
import hmac
import json
import logging
import socket
import ssl
import subprocess
import threading
import time
from collections.abc import Callable, Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

import pytest
from celery.utils.time import get_exponential_backoff_interval

from fleet.contract import WEBHOOK_SIGNATURE_HEADER
from fleet.errors import FleetError, WebhookError
from fleet.settings import WorkerSettings
from worker.policies import webhook_retry_options
from worker.webhooks import post

SECRET = "unit-test-secret"
#: The receiver's replay window (docs/webhooks.md).
TOLERANCE_S = 300


def settings(**kw: Any) -> WorkerSettings:
    kw.setdefault("webhook_allow_private", True)  # the receivers here are on loopback
    return WorkerSettings(_env_file=None, webhook_timeout_s=5.0, **kw)


class Server:
    """A local HTTP server that records every request and answers ``answer(self)``."""

    def __init__(self, answer: Callable[[BaseHTTPRequestHandler], None] | None = None) -> None:
        self.requests: list[tuple[str, str, dict[str, str], bytes]] = []
        server = self

        class Handler(BaseHTTPRequestHandler):
            def handle_one(self) -> None:
                n = int(self.headers.get("Content-Length") or 0)
                body = self.rfile.read(n)
                server.requests.append((self.command, self.path, dict(self.headers), body))
                if answer is not None:
                    answer(self)
                else:
                    self.send_response(200)
                    self.send_header("Content-Length", "0")
                    self.end_headers()

            do_GET = do_POST = handle_one

            def log_message(self, *args: object) -> None:
                pass

        self.httpd = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.port = int(self.httpd.server_address[1])
        self.url = f"http://127.0.0.1:{self.port}"
        threading.Thread(target=self.httpd.serve_forever, daemon=True).start()

    def close(self) -> None:
        self.httpd.shutdown()
        self.httpd.server_close()


@pytest.fixture()
def serve() -> Iterator[Callable[..., Server]]:
    started: list[Server] = []

    def start(answer: Callable[[BaseHTTPRequestHandler], None] | None = None) -> Server:
        started.append(Server(answer))
        return started[-1]

    yield start
    for s in started:
        s.close()


def receiver_accepts(
    headers: dict[str, str], body: bytes, secret: str, seen: set[str], now: float
) -> bool:
    """The receiver's check, as docs/webhooks.md describes it."""
    timestamp = headers.get("X-Fleet-Timestamp", "")
    if not timestamp.isdigit() or abs(now - int(timestamp)) > TOLERANCE_S:
        return False
    message = timestamp.encode() + b"." + body
    expected = "sha256=" + hmac.new(secret.encode(), message, hashlib.sha256).hexdigest()
    if not hmac.compare_digest(expected, headers.get(WEBHOOK_SIGNATURE_HEADER, "")):
        return False
    delivery = headers.get("X-Fleet-Delivery", "")
    if delivery in seen:
        return False
    seen.add(delivery)
    return True


def test_a_redirect_is_not_followed_and_fails_the_delivery_for_good(
    serve: Callable[..., Server],
) -> None:
    inside = serve()  # stands for 169.254.169.254: it must never be reached

    def redirect(handler: BaseHTTPRequestHandler) -> None:
        handler.send_response(302)
        handler.send_header("Location", f"{inside.url}/latest/meta-data/")
        handler.send_header("Content-Length", "0")
        handler.end_headers()

    hook = serve(redirect)
    with pytest.raises(FleetError) as raised:
        post(f"{hook.url}/hook", {"job_id": "j1"}, "d1", settings())
    assert "answered 302 redirect; redirects are not followed" in str(raised.value)
    assert len(hook.requests) == 1 and inside.requests == []
    # Not retried: the same URL would redirect again.
    assert not isinstance(raised.value, webhook_retry_options(settings())["autoretry_for"])
    assert not raised.value.retryable


def test_the_signature_covers_a_timestamp_so_a_receiver_can_refuse_a_replay(
    serve: Callable[..., Server],
) -> None:
    hook = serve()
    post(f"{hook.url}/hook", {"job_id": "j1"}, "d1", settings(webhook_secret=SECRET))
    ((method, path, headers, body),) = hook.requests
    assert (method, path) == ("POST", "/hook") and json.loads(body) == {"job_id": "j1"}
    assert abs(int(headers["X-Fleet-Timestamp"]) - time.time()) < 60
    now = time.time()
    assert receiver_accepts(headers, body, SECRET, set(), now)
    # The same request again: refused once its delivery id was seen...
    seen: set[str] = set()
    assert receiver_accepts(headers, body, SECRET, seen, now)
    assert not receiver_accepts(headers, body, SECRET, seen, now)
    # ...and, to a receiver that forgot it, refused once it is older than the window,
    assert not receiver_accepts(headers, body, SECRET, set(), now + TOLERANCE_S + 1)
    # while a fresh timestamp put on the old body does not match the signature.
    forged = {**headers, "X-Fleet-Timestamp": str(int(now + TOLERANCE_S + 1))}
    assert not receiver_accepts(forged, body, SECRET, set(), now + TOLERANCE_S + 1)
    # A body signed without the timestamp (the old scheme) is not accepted.
    old = {**headers, WEBHOOK_SIGNATURE_HEADER: "sha256="
           + hmac.new(SECRET.encode(), body, hashlib.sha256).hexdigest()}  # fmt: skip
    assert not receiver_accepts(old, body, SECRET, set(), now)


def test_a_dns_failure_at_delivery_is_retried_not_a_bad_job() -> None:
    with pytest.raises(Exception) as raised:
        post("http://nonexistent.invalid/hook", {"job_id": "j1"}, "d1",
             settings(webhook_allow_private=False))  # fmt: skip
    assert isinstance(raised.value, webhook_retry_options(settings())["autoretry_for"])
    assert isinstance(raised.value, WebhookError) and raised.value.retryable
    assert "cannot resolve nonexistent.invalid" in str(raised.value)


def test_a_private_address_is_refused_without_connecting(
    serve: Callable[..., Server], caplog: pytest.LogCaptureFixture
) -> None:
    inside = serve()
    caplog.set_level(logging.INFO)
    with pytest.raises(FleetError) as raised:
        post(f"{inside.url}/hook", {"job_id": "j1"}, "d1", settings(webhook_allow_private=False))
    assert inside.requests == []
    assert not isinstance(raised.value, webhook_retry_options(settings())["autoretry_for"])
    assert not raised.value.retryable
    assert "resolves to 127.0.0.1, a private, loopback or reserved address" in str(raised.value)
    assert any("refused, not retried" in r.getMessage() for r in caplog.records)


def test_the_post_connects_to_the_address_that_was_checked(
    serve: Callable[..., Server], monkeypatch: pytest.MonkeyPatch
) -> None:
    """DNS rebinding: the name first resolves to a public address (checked, allowed), then to
    an inside one. The POST must go to the first, and the name must be resolved once."""
    public, inside = serve(), serve()
    checked_ip = "93.184.215.14"  # a global address; connecting to it reaches ``public``
    calls: list[str] = []

    def getaddrinfo(host: str, port: int, *args: Any, **kw: Any) -> list[Any]:
        calls.append(host)
        ip, to = (checked_ip, port) if len(calls) == 1 else ("127.0.0.1", inside.port)
        return [(socket.AF_INET, socket.SOCK_STREAM, socket.IPPROTO_TCP, "", (ip, to))]

    real_connect = socket.socket.connect
    connected: list[Any] = []

    def connect(sock: socket.socket, address: Any) -> None:
        connected.append(address)
        if address[0] == checked_ip:
            address = ("127.0.0.1", public.port)
        real_connect(sock, address)

    monkeypatch.setattr(socket, "getaddrinfo", getaddrinfo)
    monkeypatch.setattr(socket.socket, "connect", connect)
    status = post(f"http://hooks.example:{public.port}/hook", {"job_id": "j1"}, "d1",
                  settings(webhook_allow_private=False))  # fmt: skip
    assert status == 200 and inside.requests == []
    ((_, path, headers, _),) = public.requests
    assert path == "/hook" and headers["Host"] == f"hooks.example:{public.port}"
    assert calls == ["hooks.example"] and connected == [(checked_ip, public.port)]


def test_https_connects_to_the_checked_address_and_checks_the_certificate_for_the_name(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    cert, key = tmp_path / "cert.pem", tmp_path / "key.pem"
    subprocess.run(["openssl", "req", "-x509", "-newkey", "rsa:2048", "-nodes", "-days", "1",
                    "-keyout", str(key), "-out", str(cert), "-subj", "/CN=hooks.test",
                    "-addext", "subjectAltName=DNS:hooks.test"],
                   check=True, capture_output=True)  # fmt: skip
    names: list[str | None] = []

    def remember_sni(_sock: Any, name: str | None, _ctx: ssl.SSLContext) -> None:
        names.append(name)

    tls = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    tls.load_cert_chain(cert, key)
    tls.sni_callback = remember_sni
    server = Server()
    server.httpd.socket = tls.wrap_socket(server.httpd.socket, server_side=True)
    trusting = ssl.create_default_context(cafile=str(cert))
    monkeypatch.setattr(ssl, "create_default_context", lambda *a, **kw: trusting)
    real = socket.getaddrinfo
    monkeypatch.setattr(socket, "getaddrinfo",
                        lambda host, port, *a, **kw: real("127.0.0.1", port, *a, **kw))  # fmt: skip
    try:
        status = post(f"https://hooks.test:{server.port}/hook", {"job_id": "j1"}, "d1",
                      settings())  # fmt: skip
    finally:
        server.close()
    assert status == 200 and names == ["hooks.test"] and len(server.requests) == 1


def test_logs_and_errors_never_hold_the_urls_path_or_query(
    serve: Callable[..., Server], caplog: pytest.LogCaptureFixture
) -> None:
    def fail(handler: BaseHTTPRequestHandler) -> None:
        handler.send_response(500)
        handler.send_header("Content-Length", "0")
        handler.end_headers()

    ok, failing = serve(), serve(fail)
    closed = socket.socket()
    closed.bind(("127.0.0.1", 0))
    closed_port = closed.getsockname()[1]
    closed.close()
    caplog.set_level(logging.DEBUG)
    secret_part = "/hook/PATHTOKEN?token=QUERYTOKEN"
    errors: list[str] = []
    post(f"{ok.url}{secret_part}", {"job_id": "j1"}, "d1", settings())
    assert ok.requests[0][1] == secret_part  # the receiver gets the whole URL
    assert not [r for r in caplog.records if "TOKEN" in r.getMessage()]
    for url in (f"{failing.url}{secret_part}", f"http://127.0.0.1:{closed_port}{secret_part}",
                f"http://user:USERTOKEN@nonexistent.invalid{secret_part}"):  # fmt: skip
        with pytest.raises(WebhookError) as raised:
            post(url, {"job_id": "j1"}, "d1", settings())
        errors.append(str(raised.value))
    logged = [r.getMessage() for r in caplog.records]
    assert any(f"{ok.url}/…" in line for line in logged)
    for text in logged + errors:
        for token in ("PATHTOKEN", "QUERYTOKEN", "USERTOKEN"):
            assert token not in text, text


def test_webhook_retries_have_jitter() -> None:
    options = webhook_retry_options(settings(webhook_max_retries=3))
    assert options["retry_jitter"] is True and options["retry_backoff"]
    assert options["autoretry_for"] == (WebhookError,) and options["max_retries"] == 3
    # What Celery makes of them: a random delay up to the backoff, not the same for everyone.
    delays = {
        get_exponential_backoff_interval(
            options["retry_backoff"], 5, options["retry_backoff_max"], options["retry_jitter"]
        )
        for _ in range(50)
    }
    assert len(delays) > 1 and max(delays) <= 32
