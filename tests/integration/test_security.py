"""Security (docs/security.md): Redis with a password, over TLS; no secret in anything the fleet
leaves behind; presigned URLs that expire; a private bucket.

The fleet here runs on services of this module's own: a Redis with ``requirepass`` and a
SeaweedFS S3, a generating worker logging JSON at DEBUG and a webhooks worker logging text at
DEBUG, both with the password in FLEET_REDIS_URL. The secrets looked for are listed once, in
tests/secrets_registry.py.
"""

from __future__ import annotations

import contextlib
import json
import os
import secrets
import signal
import socket
import ssl
import subprocess
import sys
import threading
import time
import urllib.error
import urllib.request
import uuid
from collections.abc import Iterator
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from urllib.parse import quote, urlunsplit

import httpx
import pytest
import redis

from fleet.contract import WEBHOOK_QUEUE, JobSpec
from fleet.errors import BrokerRefused, BrokerUnavailable
from fleet.localdev import LocalServices
from fleet.settings import ProducerSettings
from fleet.storage import ObjectStore
from producer.client import Client
from tests import secrets_registry
from tests.conftest import own_fleet_env
from tests.fleet_fixtures import REPO, WorkerProcess, settings_kwargs, wait_until, worker_command
from tests.gateway_fixtures import GatewayProcess
from tests.secrets_registry import Artifact

pytestmark = pytest.mark.integration

#: A password with characters a URL must percent-encode: it travels in FLEET_REDIS_URL.
PASSWORD = "pw/" + secrets.token_urlsafe(18) + "+="
#: A hang guard for every command here (they end within seconds; see docs/security.md).
HANG_GUARD_S = 120
NO_PROXY = urllib.request.build_opener(urllib.request.ProxyHandler({}))
ONE_LINE = dict(width=64, height=64, steps=2)


def redis_url(port: int, password: str | None = PASSWORD, scheme: str = "redis",
              query: str = "") -> str:  # fmt: skip
    auth = f":{quote(password, safe='')}@" if password is not None else ""
    return urlunsplit((scheme, f"{auth}127.0.0.1:{port}", "/0", query, ""))


@dataclass
class Run:
    """One command line the test ran, with what it printed and how long it took."""

    args: list[str]
    returncode: int
    stdout: str
    stderr: str
    seconds: float

    def lines(self) -> list[str]:
        return [ln for ln in self.stderr.splitlines() if ln.strip()]


def run(env: dict[str, str], *args: str) -> Run:
    """``python -m ARGS`` (producer or worker), ended by the hang guard if it hangs."""
    began = time.monotonic()
    done = subprocess.run([sys.executable, "-m", *args], env=env, cwd=REPO, capture_output=True,
                          text=True, timeout=HANG_GUARD_S)  # fmt: skip
    return Run(list(args), done.returncode, done.stdout, done.stderr, time.monotonic() - began)


class DebugWorker(WorkerProcess):
    """The documented worker command line at --loglevel DEBUG."""

    def start(self, timeout: float = 90.0) -> DebugWorker:
        command = worker_command(self.node, self.queues, self.pool, self.concurrency)
        command[command.index("--loglevel") + 1] = "DEBUG"
        with self.log_path.open("ab") as log:
            self.proc = subprocess.Popen(
                command, cwd=REPO, env=self.env, stdout=log, stderr=subprocess.STDOUT,
                start_new_session=True,
            )  # fmt: skip
        self.wait_ready(timeout)
        return self


class Receiver:
    """A local webhook endpoint that keeps every request (headers and body) and answers 200."""

    def __init__(self) -> None:
        self.requests: list[tuple[dict[str, str], bytes]] = []
        requests = self.requests

        class Handler(BaseHTTPRequestHandler):
            def do_POST(self) -> None:
                body = self.rfile.read(int(self.headers.get("Content-Length") or 0))
                requests.append((dict(self.headers), body))
                self.send_response(200)
                self.send_header("Content-Length", "0")
                self.end_headers()

            def log_message(self, *_: object) -> None:
                pass

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}/hook"
        threading.Thread(target=self.server.serve_forever, daemon=True).start()

    def close(self) -> None:
        self.server.shutdown()
        self.server.server_close()


@dataclass
class Secured:
    """This module's fleet: services with a Redis password and the workers that use it."""

    services: LocalServices
    env: dict[str, str]
    gen: WorkerProcess
    hooks: WorkerProcess
    logs: Path
    receiver: Receiver
    started: list[WorkerProcess] = field(default_factory=list)
    gateway: GatewayProcess | None = None

    @property
    def port(self) -> int:
        return self.services.redis.port

    def settings(self, **env: str) -> ProducerSettings:
        return ProducerSettings(_env_file=None, **settings_kwargs({**self.env, **env}))

    def start_worker(self, name: str, queues: str, **env: str) -> WorkerProcess:
        node = f"{name}-{uuid.uuid4().hex[:6]}@localhost"
        w = WorkerProcess(node, {**self.env, **env}, self.logs / f"{name}.log", queues=queues)
        self.started.append(w)
        return w.start()


@pytest.fixture(scope="module")
def secured(tiny_model: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Secured]:
    root = tmp_path_factory.mktemp("secured")
    services = LocalServices(root / "services")
    endpoints = services.start()
    receiver = Receiver()
    workers: list[WorkerProcess] = []
    fleet: Secured | None = None
    try:
        services.redis.client().config_set("requirepass", PASSWORD)
        logs = root / "logs"
        logs.mkdir()
        env = own_fleet_env(
            endpoints.env(), tiny_model, FLEET_REDIS_URL=redis_url(services.redis.port),
            FLEET_WEBHOOK_ALLOW_PRIVATE="true", PYTHONUNBUFFERED="1",
            **secrets_registry.provided(),
        )  # fmt: skip
        gen = DebugWorker(f"gen-{uuid.uuid4().hex[:6]}@localhost", {**env, "FLEET_LOG_FORMAT":
                          "json"}, logs / "gen.log")  # fmt: skip
        workers.append(gen)
        gen.start()
        hooks = DebugWorker(f"hooks-{uuid.uuid4().hex[:6]}@localhost", env, logs / "hooks.log",
                            queues=WEBHOOK_QUEUE, pool="threads", concurrency=2)  # fmt: skip
        workers.append(hooks)
        hooks.start()
        fleet = Secured(services, env, gen, hooks, logs, receiver, workers)
        # The HTTP gateway, with a key it takes and one revoked (made by the CLI, as operators
        # do; `keys create` prints the key once, the only output not searched for it).
        gateway = fleet.gateway = GatewayProcess(env, logs / "gateway.log")
        made = []
        for label in ("used", "revoked"):
            out = run(env, "producer", "keys", "create", "--tenant", "sec", "--label", label)
            assert out.returncode == 0, out.stderr
            made.append(out.stdout.split()[0])
        env["GATEWAY_API_KEYS"] = " ".join(made)
        gateway.start()
        wait_until(lambda: run(env, "worker", "check", "--node", gen.node).returncode == 0, 120,
                   "the generating worker ready")  # fmt: skip
        yield fleet
    finally:
        if fleet is not None and fleet.gateway is not None:
            fleet.gateway.stop()
        for w in workers:
            w.stop()
        receiver.close()
        services.stop()


# --------------------------------------------------------------------------- Redis password


def test_the_fleet_works_with_a_redis_password_and_refuses_a_wrong_one_at_once(
    secured: Secured, request: pytest.FixtureRequest
) -> None:
    env = secured.env
    # The CLI: submit, wait, status and stats, all with the password in FLEET_REDIS_URL.
    submitted = run(env, "producer", "submit", "a fox behind a password", "--width", "64",
                    "--height", "64", "--steps", "2", "--wait", "--json")  # fmt: skip
    assert submitted.returncode == 0, submitted.stderr[-2000:]
    [done] = json.loads(submitted.stdout)
    assert done["state"] == "succeeded" and done["result"]["worker"]["node"] == secured.gen.node
    status = run(env, "producer", "status", done["job_id"], "--json")
    assert status.returncode == 0 and json.loads(status.stdout)[0]["state"] == "succeeded"
    stats = run(env, "producer", "stats", "--json")
    assert stats.returncode == 0, stats.stderr
    assert secured.gen.node in [w["node"] for w in json.loads(stats.stdout)["workers"]]
    check = run(env, "worker", "check", "--node", secured.gen.node)
    assert check.returncode == 0 and secured.gen.node in check.stdout, check.stderr
    # The Python API.
    with Client(secured.settings()) as c:
        assert c.submit(JobSpec(prompt="by the API", **ONE_LINE)).wait(60).state == "succeeded"
        assert secured.gen.node in [w["node"] for w in c.stats()["workers"]]

    # A wrong password, and Redis away (nothing listening; a listener that never answers):
    # one line each, naming the URL with its password masked, and the process ends.
    stalled = socket.create_server(("127.0.0.1", 0))
    held: list[socket.socket] = []

    def accept_and_say_nothing() -> None:
        while True:
            try:
                held.append(stalled.accept()[0])
            except OSError:
                return

    threading.Thread(target=accept_and_say_nothing, daemon=True).start()
    web = socket.create_server(("127.0.0.1", 0))  # a port that speaks HTTP, not Redis

    def answer_as_http() -> None:
        while True:
            try:
                conn = web.accept()[0]
            except OSError:
                return
            with conn:
                conn.recv(65536)
                conn.sendall(b"HTTP/1.1 400 Bad Request\r\nContent-Length: 0\r\n\r\n")

    threading.Thread(target=answer_as_http, daemon=True).start()
    try:
        cases = {
            "wrong password": (redis_url(secured.port, "nope-" + PASSWORD), "refused the password"),
            "unreachable": (redis_url(free_port()), "cannot reach Redis at redis://:***@"),
            "stalled": (redis_url(stalled.getsockname()[1]), "cannot reach Redis at redis://:***@"),
            "not redis": (redis_url(web.getsockname()[1]), "answered, but not as Redis"),
        }
        for case, (url, says) in cases.items():
            bad = {**env, "FLEET_REDIS_URL": url}
            submit = run(bad, "producer", "submit", "a fox", "--width", "64", "--height", "64")
            assert submit.returncode == 4 and len(submit.lines()) == 1, (case, submit.stderr)
            assert says in submit.stderr and "Traceback" not in submit.stderr, (case, submit)
            # status reads through Celery's result backend: its own socket timeouts.
            status = run(bad, "producer", "status", "some-job")
            assert status.returncode == 4 and len(status.lines()) == 1, (case, status.stderr)
            assert says in status.stderr and "Traceback" not in status.stderr, (case, status)
            check = run(bad, "worker", "check", "--any-host")
            assert check.returncode == 1 and says in check.stderr, (case, check.stderr)
            for r in (submit, status, check):
                assert PASSWORD not in r.stderr and quote(PASSWORD, safe="") not in r.stderr
            slug = case.replace(" ", "_")
            # How long each took to fail, in the report (docs/security.md lists measured ones).
            request.node.user_properties += [
                (f"producer_submit_{slug}_s", round(submit.seconds, 2)),
                (f"producer_status_{slug}_s", round(status.seconds, 2)),
                (f"worker_check_{slug}_s", round(check.seconds, 2)),
            ]
    finally:
        stalled.close()
        web.close()
        for s in held:
            s.close()
    settings = secured.settings(FLEET_REDIS_URL=redis_url(secured.port, "nope"))
    with Client(settings) as c, pytest.raises(BrokerRefused, match=r"redis://:\*\*\*@"):
        c.submit(JobSpec(prompt="a fox", **ONE_LINE))


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


# --------------------------------------------------------------------------- secrets


@dataclass
class Collected:
    """Every text the fleet left behind, by kind, with where it came from."""

    items: list[tuple[Artifact, str, bytes]] = field(default_factory=list)

    def add(self, kind: Artifact, where: str, data: str | bytes) -> None:
        self.items.append((kind, where, data.encode() if isinstance(data, str) else data))

    def run(self, run: Run) -> Run:
        """Keep a command's output: standard error holds its log lines and error messages."""
        where = "python -m " + " ".join(run.args)
        self.add(Artifact.CLI_OUTPUT, where + " (stdout)", run.stdout)
        self.add(Artifact.ERRORS, where + " (stderr)", run.stderr)
        self.add(Artifact.LOGS, where + " (stderr)", run.stderr)
        return run

    def kinds(self) -> set[Artifact]:
        return {kind for kind, _, data in self.items if data}


def collect_s3(c: Collected, secured: Secured) -> int:
    s3 = secured.services.s3.client()
    keys = [o["Key"] for page in s3.get_paginator("list_objects_v2").paginate(
        Bucket=secured.services.bucket) for o in page.get("Contents", [])]  # fmt: skip
    for key in keys:
        body = s3.get_object(Bucket=secured.services.bucket, Key=key)["Body"].read()
        c.add(Artifact.S3, f"s3://{secured.services.bucket}/{key}", body)
    return len(keys)


def collect_redis(c: Collected, client: redis.Redis) -> list[str]:
    """Every value of every key, whatever its type."""
    keys = []
    for raw in client.scan_iter(count=1000):
        key = raw.decode()
        keys.append(key)
        kind = client.type(raw).decode()
        values: list[bytes] = []
        if kind == "string":
            values = [client.get(raw) or b""]
        elif kind == "list":
            values = client.lrange(raw, 0, -1)
        elif kind == "hash":
            values = [b"%s=%s" % kv for kv in client.hgetall(raw).items()]
        elif kind == "set":
            values = list(client.smembers(raw))
        elif kind == "zset":
            values = [m for m, _ in client.zrange(raw, 0, -1, withscores=True)]
        elif kind == "stream":
            values = [json.dumps(e, default=repr).encode() for e in client.xrange(raw)]
        c.add(Artifact.REDIS, f"redis {kind} {key}", key.encode() + b"\n" + b"\n".join(values))
    return keys


def test_no_secret_appears_in_anything_the_fleet_leaves_behind(secured: Secured) -> None:
    """A run that succeeds and fails in every way (a bad job, a model nobody serves, storage
    refusing a worker, a wrong Redis password, Redis away), then every log line, CLI output,
    error message, S3 object, Redis value and webhook request is searched for
    every secret of tests/secrets_registry.py."""
    env = secured.env
    values = {s.name: s.obtain(env) for s in secrets_registry.SECRETS}
    for name, found in values.items():
        assert found and all(len(v) >= 12 for v in found), f"the run never set the {name}"
    c = Collected()

    # Jobs that succeed and fail, with webhooks, through the Python API.
    hook = secured.receiver
    before = len(hook.requests)
    with Client(secured.settings()) as api:
        ok = api.submit(JobSpec(prompt="a hooked fox", webhook=hook.url, **ONE_LINE))
        unserved = api.submit(JobSpec(prompt="a fox", model="not-served", webhook=hook.url,
                                      **ONE_LINE))  # fmt: skip
        states = [s.state for s in api.wait([ok.job_id, unserved.job_id], timeout=120)]
        assert states == ["succeeded", "failed"]
        wait_until(lambda: len(hook.requests) >= before + 2, 60, "both webhooks delivered")
    # The CLI: a job, a bad job (refused before it is queued), a job nobody can run.
    good = c.run(run(env, "producer", "-v", "submit", "a fox", "--width", "64", "--height",
                     "64", "--steps", "2", "--wait", "--json"))  # fmt: skip
    assert good.returncode == 0, good.stderr[-2000:]
    bad = c.run(run(env, "producer", "submit", "a fox", "--width", "63", "--steps", "0"))
    assert bad.returncode == 2 and "width" in bad.stderr
    nobody = c.run(run(env, "producer", "submit", "a fox", "--width", "64", "--height", "64",
                       "--model", "not-served", "--wait", "--json"))  # fmt: skip
    assert nobody.returncode == 1 and json.loads(nobody.stdout)[0]["state"] == "failed"

    # The HTTP gateway: a job with the key, the revoked key, a forged secret, keys listed.
    assert secured.gateway is not None
    used, revoked = env["GATEWAY_API_KEYS"].split()
    listed = c.run(run(env, "producer", "keys", "revoke", revoked.split("_")[1]))
    assert listed.returncode == 0, listed.stderr
    head, _, secret = used.partition("_")[2].partition("_")  # dfk_<id>_<secret>
    forged = f"dfk_{head}_{secrets.token_urlsafe(32)}"
    with httpx.Client(base_url=secured.gateway.url, timeout=60) as http:
        posted = http.post("/v1/jobs", json={"prompt": "a fox at the gate", **ONE_LINE},
                           headers={"Authorization": f"Bearer {used}"})  # fmt: skip
        assert posted.status_code == 202, posted.text
        job_id = posted.json()["job_id"]
        wait_until(lambda: http.get(f"/v1/jobs/{job_id}", headers={
            "Authorization": f"Bearer {used}"}).json()["state"] == "succeeded", 120,
            "the gateway's job done")  # fmt: skip
        shown = http.get(f"/v1/jobs/{job_id}", headers={"Authorization": f"Bearer {used}"})
        c.add(Artifact.CLI_OUTPUT, "GET /v1/jobs/{id}", shown.text)
        for key in (revoked, forged, f"dfk_0123456789ab_{secret}"):
            denied = http.post("/v1/jobs", json={"prompt": "x", **ONE_LINE},
                               headers={"Authorization": f"Bearer {key}"})  # fmt: skip
            assert denied.status_code == 401, denied.text
            c.add(Artifact.ERRORS, "POST /v1/jobs with a bad key", denied.text)
    c.run(run(env, "producer", "keys", "list"))

    # A worker the storage refuses (a wrong S3 secret): it takes no job and says why.
    refused_q = "fleet.refused-s3"
    wrong_s3 = {"FLEET_S3_SECRET_ACCESS_KEY": "wrong-" + uuid.uuid4().hex}
    s3_refused = secured.start_worker("s3-refused", refused_q, **wrong_s3)
    with Client(secured.settings(FLEET_QUEUE=refused_q)) as api:
        kept = api.submit(JobSpec(prompt="kept waiting", **ONE_LINE))
    wait_until(lambda: run(env, "worker", "check", "--node", s3_refused.node).returncode == 2, 90,
               "the storage-refused worker reporting itself broken")  # fmt: skip
    said = c.run(run(env, "worker", "check", "--node", s3_refused.node))
    assert "storage refuses this worker" in said.stderr, said.stderr

    # A wrong Redis password: the CLI, `worker check`, the Python API and a worker.
    wrong = {**env, "FLEET_REDIS_URL": redis_url(secured.port, "wrong-" + uuid.uuid4().hex)}
    for args in (["producer", "submit", "a fox", "--width", "64", "--height", "64"],
                 ["producer", "status", kept.job_id], ["producer", "stats"],
                 ["worker", "check", "--any-host"]):  # fmt: skip
        r = c.run(run(wrong, *args))
        assert r.returncode in (1, 4) and "refused the password" in r.stderr, r.stderr
    with Client(secured.settings(FLEET_REDIS_URL=wrong["FLEET_REDIS_URL"])) as api:
        with pytest.raises(BrokerRefused) as refusal:
            api.submit(JobSpec(prompt="a fox", **ONE_LINE))
        c.add(Artifact.ERRORS, "Client.submit with a wrong password", str(refusal.value))
    log_path = secured.logs / "redis-refused.log"
    with log_path.open("wb") as log:
        refused = subprocess.Popen(
            worker_command("redis-refused@localhost"), cwd=REPO, env=wrong, stdout=log,
            stderr=subprocess.STDOUT, start_new_session=True,
        )  # fmt: skip
    try:
        wait_until(lambda: "this worker takes no jobs" in log_path.read_text(), 90,
                   "the Redis-refused worker's reason")  # fmt: skip
    finally:
        os.killpg(refused.pid, signal.SIGKILL)
        refused.wait(10)
    # Redis away, with the right password in the URL: masked in what it says.
    away = {**env, "FLEET_REDIS_URL": redis_url(free_port())}
    for args in (["producer", "submit", "a fox", "--width", "64", "--height", "64"],
                 ["producer", "stats"], ["worker", "check", "--any-host"]):  # fmt: skip
        r = c.run(run(away, *args))
        assert r.returncode in (1, 4) and "cannot reach Redis" in r.stderr, r.stderr
    with Client(secured.settings(FLEET_REDIS_URL=away["FLEET_REDIS_URL"])) as api:
        with pytest.raises(BrokerUnavailable) as unreachable:
            api.stats()
        c.add(Artifact.ERRORS, "Client.stats with Redis away", str(unreachable.value))

    # What the operators read.
    ids = [ok.job_id, unserved.job_id, kept.job_id, json.loads(good.stdout)[0]["job_id"],
           json.loads(nobody.stdout)[0]["job_id"]]  # fmt: skip
    # `producer status` exits 0 with a failed job among them; `worker check` 2: one is broken.
    reads = {("producer", "status", *ids): 0, ("producer", "stats"): 0,
             ("producer", "stats", "--json"): 0, ("producer", "failed"): 0,
             ("worker", "status", "--json"): 0, ("worker", "check", "--any-host"): 2}  # fmt: skip
    for read, code in reads.items():
        assert c.run(run(env, *read)).returncode == code, read
    shown = c.run(run(env, "producer", "status", *ids, "--json"))
    assert [s["state"] for s in json.loads(shown.stdout)] == [
        "succeeded", "failed", "queued", "succeeded", "failed"]  # fmt: skip
    failed = c.run(run(env, "producer", "failed", "--json", "--all"))
    assert {unserved.job_id, ids[-1]} <= {e["job_id"] for e in json.loads(failed.stdout)}

    # Everything left behind.
    s3_refused.stop()
    for w in secured.started:  # the generating and webhooks workers among them
        c.add(Artifact.LOGS, f"worker log {w.log_path.name}", w.log())
    c.add(Artifact.LOGS, "worker log redis-refused.log", log_path.read_bytes())
    c.add(Artifact.LOGS, "gateway log", secured.gateway.log())
    assert "tenant=sec" in secured.gateway.log()  # it logged the requests it served
    for headers, body in hook.requests:
        c.add(Artifact.WEBHOOKS, f"webhook {headers.get('X-Fleet-Job-Id')}",
              json.dumps(headers) + "\n" + body.decode())  # fmt: skip
    objects = collect_s3(c, secured)
    client = secured.services.redis.client(password=PASSWORD)
    try:
        keys = collect_redis(c, client)
    finally:
        client.close()

    # The search covered what it claims: DEBUG and JSON lines, results, manifests, webhooks.
    gen_log = secured.gen.log()
    assert '"level": "DEBUG"' in gen_log and '"level": "INFO"' in gen_log
    assert "DEBUG" in secured.hooks.log() and "webhook delivered" in secured.hooks.log()
    assert any(k.startswith("celery-task-meta-") for k in keys), keys
    assert objects >= 5 and any(w.endswith("manifest.json") for _, w, _ in c.items)
    assert len(hook.requests) >= 2
    assert c.kinds() >= {Artifact.LOGS, Artifact.CLI_OUTPUT, Artifact.ERRORS, Artifact.S3,
                         Artifact.REDIS, Artifact.WEBHOOKS}, c.kinds()  # fmt: skip

    leaks = []
    for secret in secrets_registry.SECRETS:
        for value in values[secret.name]:
            for form in secret.forms(value):
                needle = form.encode()
                for kind, where, data in c.items:
                    at = data.find(needle)
                    if kind in secret.never_in and at >= 0:
                        context = data[max(0, at - 80) : at + len(needle) + 40]
                        leaks.append(f"{secret.name} in {kind.name} {where}: …{context!r}…")
    assert not leaks, "\n".join(leaks)


# --------------------------------------------------------------------------- the bucket


def _get(url: str | urllib.request.Request) -> tuple[int, bytes]:
    try:
        with NO_PROXY.open(url, timeout=30) as response:
            return response.status, response.read()
    except urllib.error.HTTPError as exc:
        return exc.code, exc.read()


def test_a_presigned_url_expires_and_a_fresh_one_works(secured: Secured) -> None:
    store = ObjectStore(secured.settings())
    key = f"security/{uuid.uuid4().hex}.txt"
    store.put_bytes(key, b"only for a while", "text/plain")
    short = store.presign_get(key, expires_s=1)
    began = time.monotonic()

    def refused() -> tuple[int, bytes] | None:
        status, body = _get(short)
        return (status, body) if status != 200 else None

    status, body = wait_until(refused, 30, "the presigned URL expiring", interval=0.2)
    assert status == 403 and b"expired" in body.lower(), (status, body)
    assert time.monotonic() - began < 30
    assert _get(store.presign_get(key)) == (200, b"only for a while")
    # A URL signed for one object opens no other.
    other = f"security/{uuid.uuid4().hex}.txt"
    store.put_bytes(other, b"another", "text/plain")
    status, body = _get(store.presign_get(key).replace(key, other))
    assert status == 403 and b"another" not in body


def test_the_bucket_is_private(secured: Secured) -> None:
    store = ObjectStore(secured.settings())
    key = f"security/{uuid.uuid4().hex}.txt"
    store.put_bytes(key, b"private", "text/plain")
    base = f"{secured.services.s3.endpoint_url}/{secured.services.bucket}"
    status, body = _get(f"{base}/{key}")
    assert status == 403 and b"private" not in body
    status, body = _get(f"{base}?list-type=2")
    assert status == 403 and key.encode() not in body
    put = urllib.request.Request(f"{base}/security/anonymous.txt", data=b"x", method="PUT")
    status, _ = _get(put)
    assert status == 403 and not store.exists("security/anonymous.txt")


# --------------------------------------------------------------------------- TLS


class TlsTerminator:
    """TLS on a loopback port in front of the plain Redis, as stunnel or a managed service's
    TLS endpoint does (the redis-server bundled here is built without TLS: docs/security.md).
    The handshake is the real one of the fleet's clients (redis-py, kombu, Celery)."""

    def __init__(self, target_port: int, certfile: Path, keyfile: Path) -> None:
        self.context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
        self.context.load_cert_chain(certfile, keyfile)
        self.target = ("127.0.0.1", target_port)
        self.sock = socket.create_server(("127.0.0.1", 0))
        self.port = int(self.sock.getsockname()[1])
        self.refused: list[str] = []
        self.served = 0
        threading.Thread(target=self._serve, daemon=True).start()

    def _serve(self) -> None:
        while True:
            try:
                raw, _ = self.sock.accept()
            except OSError:
                return
            threading.Thread(target=self._relay, args=(raw,), daemon=True).start()

    def _relay(self, raw: socket.socket) -> None:
        try:
            tls = self.context.wrap_socket(raw, server_side=True)
        except OSError as exc:  # ssl.SSLError is an OSError
            self.refused.append(str(exc))
            raw.close()
            return
        self.served += 1
        try:
            upstream = socket.create_connection(self.target)
        except OSError:
            tls.close()
            return
        threading.Thread(target=self._pump, args=(upstream, tls), daemon=True).start()
        self._pump(tls, upstream)

    @staticmethod
    def _pump(src: socket.socket, dst: socket.socket) -> None:
        try:
            while data := src.recv(65536):
                dst.sendall(data)
        except OSError:
            pass
        finally:
            for s in (src, dst):
                with contextlib.suppress(OSError):
                    s.shutdown(socket.SHUT_RDWR)

    def close(self) -> None:
        self.sock.close()


def make_ca_and_server_cert(where: Path) -> tuple[Path, Path, Path]:
    """A private CA and a server certificate it signed for 127.0.0.1, made by openssl."""
    where.mkdir(parents=True, exist_ok=True)
    ca, ca_key = where / "ca.pem", where / "ca.key"
    cert, key, csr = where / "server.pem", where / "server.key", where / "server.csr"
    (where / "san.ext").write_text("subjectAltName=IP:127.0.0.1,DNS:localhost\n")
    for command in (
        ["req", "-x509", "-newkey", "rsa:2048", "-nodes", "-keyout", ca_key, "-out", ca,
         "-days", "2", "-subj", "/CN=diffusion-fleet test CA"],
        ["req", "-newkey", "rsa:2048", "-nodes", "-keyout", key, "-out", csr,
         "-subj", "/CN=127.0.0.1"],
        ["x509", "-req", "-in", csr, "-CA", ca, "-CAkey", ca_key, "-CAcreateserial",
         "-out", cert, "-days", "2", "-extfile", where / "san.ext"],
    ):  # fmt: skip
        subprocess.run(["openssl", *map(str, command)], check=True, capture_output=True,
                       timeout=60)  # fmt: skip
    return ca, cert, key


def test_producer_and_worker_talk_to_redis_over_tls_and_check_its_certificate(
    secured: Secured, tmp_path: Path
) -> None:
    ca, cert, key = make_ca_and_server_cert(tmp_path / "tls")
    tls = TlsTerminator(secured.port, cert, key)
    try:
        verified = redis_url(tls.port, scheme="rediss",
                             query=f"ssl_cert_reqs=required&ssl_ca_certs={ca}")  # fmt: skip
        queue = f"fleet.tls-{uuid.uuid4().hex[:6]}"
        env = {"FLEET_REDIS_URL": verified, "FLEET_QUEUE": queue}
        w = secured.start_worker("tls", queue, **env)
        wait_until(lambda: run({**secured.env, **env}, "worker", "check", "--node",
                               w.node).returncode == 0, 120, "the TLS worker ready")  # fmt: skip
        done = run({**secured.env, **env}, "producer", "submit", "over TLS", "--width", "64",
                   "--height", "64", "--steps", "2", "--wait", "--json")  # fmt: skip
        assert done.returncode == 0, done.stderr[-2000:]
        assert json.loads(done.stdout)[0]["result"]["worker"]["node"] == w.node
        with Client(secured.settings(**env)) as c:
            assert c.submit(JobSpec(prompt="by the API", **ONE_LINE)).wait(60).state == "succeeded"
        # Redis listens in plain text on another port: all of it went through TLS.
        assert tls.served and not tls.refused, tls.refused

        # A client that does not trust the CA is refused at the handshake, saying so.
        untrusting = {**secured.env, "FLEET_REDIS_URL": redis_url(
            tls.port, scheme="rediss", query="ssl_cert_reqs=required")}  # fmt: skip
        submit = run(untrusting, "producer", "submit", "a fox", "--width", "64", "--height", "64")
        assert submit.returncode == 4 and len(submit.lines()) == 1, submit.stderr
        assert "certificate verify failed" in submit.stderr, submit.stderr
        check = run(untrusting, "worker", "check", "--any-host")
        assert check.returncode == 1 and "certificate verify failed" in check.stderr
        assert tls.refused and all("unknown ca" in r.lower() for r in tls.refused), tls.refused
        w.stop()
    finally:
        tls.close()
