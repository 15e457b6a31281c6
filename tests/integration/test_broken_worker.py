"""A worker that cannot work takes no job: it stays up, consumes nothing and says why."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

from fleet.contract import JobSpec
from producer.client import Client
from tests.fleet_fixtures import wait_until

pytestmark = pytest.mark.integration


def check(w) -> subprocess.CompletedProcess[str]:  # type: ignore[no-untyped-def]
    return subprocess.run([sys.executable, "-m", "worker", "check", "--node", w.node],
                          env=w.env, capture_output=True, text=True)  # fmt: skip


def queued(qclient: Client, ids: list[str]) -> bool:
    return all(qclient.status(i).state == "queued" for i in ids)


def _takes_no_job(start_worker, qclient: Client, queue: str, reason: str,  # type: ignore[no-untyped-def]
                  then_healthy: bool = True, **env: str) -> None:  # fmt: skip
    """A worker started with ``env`` takes none of 5 queued jobs and says ``reason``; then
    (``then_healthy``) a healthy worker runs all 5."""
    jobs = qclient.submit_many([JobSpec(prompt=f"kept {i}", width=64, height=64, steps=2)
                                for i in range(5)])  # fmt: skip
    ids = [h.job_id for h in jobs]
    broken = start_worker("broken", queues=queue, **env)
    wait_until(lambda: check(broken).returncode == 2, 90, "the worker reporting itself broken")
    said = check(broken)
    assert reason in said.stderr and "broken" in said.stderr, said.stderr
    assert "takes no jobs" in broken.log() and reason in broken.log()
    # Still up, still answering, and every job still waits for a worker that can run it.
    assert broken.proc.poll() is None
    assert qclient.stats()["queues"][queue] == 5 and queued(qclient, ids)
    assert "] received:" not in broken.log()
    if not then_healthy:
        broken.stop()
        return
    healthy = start_worker("healthy", queues=queue)
    assert [s.state for s in qclient.wait(ids, timeout=120)] == ["succeeded"] * 5
    assert "] received:" not in broken.log()
    wait_until(lambda: check(healthy).returncode == 0, 30, "the healthy worker's check")
    broken.stop()  # `worker check` of this host would (rightly) report it to later tests


def test_a_worker_whose_model_cannot_load_takes_no_job(
    start_worker, qclient: Client, queue: str, tmp_path: Path
) -> None:
    _takes_no_job(start_worker, qclient, queue, "the model cannot load",
                  FLEET_MODEL=str(tmp_path / "no-such-model"))  # fmt: skip


def test_a_worker_whose_storage_refuses_the_credentials_takes_no_job(
    start_worker, qclient: Client, queue: str
) -> None:
    _takes_no_job(start_worker, qclient, queue, "storage refuses this worker",
                  FLEET_S3_SECRET_ACCESS_KEY="not-the-secret")  # fmt: skip


def test_redis_that_refuses_the_password_or_is_away_is_one_clear_line(
    tmp_path: Path, fleet_env: dict
) -> None:
    from fleet.errors import BrokerRefused
    from fleet.localdev import LocalServices
    from fleet.settings import ProducerSettings
    from tests.fleet_fixtures import settings_kwargs

    services = LocalServices(tmp_path / "own-services")
    ep = services.start()
    try:
        services.redis.client().config_set("requirepass", "s3cret")
        port = services.redis.port
        cases = {
            "no password": (f"redis://127.0.0.1:{port}/0", "refused the password"),
            "wrong password": (f"redis://:nope@127.0.0.1:{port}/0", "refused the password"),
            "away": ("redis://127.0.0.1:1/0", "cannot reach Redis at redis://127.0.0.1:1/0"),
        }
        for name, (url, says) in cases.items():
            env = {**fleet_env, **ep.env(), "FLEET_REDIS_URL": url}
            for command in (["submit", "a fox", "--width", "64", "--height", "64"],
                            ["status", "some-id"], ["stats"]):  # fmt: skip
                run = subprocess.run([sys.executable, "-m", "producer", *command], env=env,
                                     capture_output=True, text=True, timeout=120)  # fmt: skip
                assert run.returncode == 4, (name, command, run.stderr[-2000:])
                lines = [ln for ln in run.stderr.splitlines() if ln.strip()]
                assert len(lines) == 1 and says in lines[0], (name, command, run.stderr)
                assert "Traceback" not in run.stderr and "nope" not in run.stderr
            check = subprocess.run([sys.executable, "-m", "worker", "check", "--any-host"],
                                   env=env, capture_output=True, text=True)  # fmt: skip
            assert check.returncode == 1 and says in check.stderr, (name, check.stderr)
        # The Python API raises the fleet's own error, with the password masked.
        settings = ProducerSettings(_env_file=None, **{**settings_kwargs(ep.env()),
                                    "redis_url": f"redis://:nope@127.0.0.1:{port}/0"})  # fmt: skip
        with Client(settings) as c, pytest.raises(BrokerRefused, match=r":\*\*\*@"):
            c.submit(JobSpec(prompt="a fox", width=64, height=64))
    finally:
        services.stop()


def test_a_worker_whose_pipeline_fails_its_self_test_takes_no_job(
    start_worker, qclient: Client, queue: str, tiny_model: Path, tmp_path: Path
) -> None:
    """A model whose parts do not fit each other loads, and fails every generation (here a
    tokenizer that pads past the text encoder's positions: a ValueError from deep inside
    transformers, which the worker used to report as the job's fault, failing every job)."""
    import shutil

    misfit = tmp_path / "misfit"
    shutil.copytree(tiny_model, misfit)
    config = misfit / "tokenizer" / "tokenizer_config.json"
    config.write_text(config.read_text().replace('"model_max_length": 77',
                                                 '"model_max_length": 200'))  # fmt: skip
    _takes_no_job(start_worker, qclient, queue, "the pipeline fails its self-test",
                  FLEET_MODEL=str(misfit))  # fmt: skip


def test_storage_that_starts_refusing_mid_run_closes_the_gate_and_loses_no_job(
    start_worker, tmp_path: Path, tiny_model: Path
) -> None:
    """The storage secret is rotated under a running worker: its next job finds a 403 on the
    upload. That job is neither failed nor recorded: it goes back to its queue, the worker
    stops consuming (a job queued after it stays queued), says why, and a worker with the new
    secret stores both, once each."""
    from fleet.localdev import LocalServices
    from fleet.settings import ProducerSettings
    from tests.fleet_fixtures import settings_kwargs

    services = LocalServices(tmp_path / "own-services")
    ep = services.start()
    try:
        env = {**ep.env(), "FLEET_QUEUE": "rotated"}
        settings = ProducerSettings(_env_file=None, **settings_kwargs(ep.env()), queue="rotated")
        old = start_worker("rotated-old", queues="rotated", **env)
        with Client(settings) as before:
            assert before.submit(JobSpec(prompt="before", width=64, height=64, steps=2)).wait(
                120).state == "succeeded"  # fmt: skip
        services.s3.secret_access_key = "rotated-" + services.s3.secret_access_key[:20]
        services.s3.restart()
        secret = {"FLEET_S3_SECRET_ACCESS_KEY": services.s3.secret_access_key}
        settings = ProducerSettings(_env_file=None, **settings_kwargs({**ep.env(), **secret}),
                                    queue="rotated")  # fmt: skip
        with Client(settings) as c:
            first = c.submit(JobSpec(prompt="after the rotation", width=64, height=64, steps=2))
            wait_until(lambda: check(old).returncode == 2, 120, "the old worker broken")
            said = check(old)
            assert "storage refuses this worker" in said.stderr, said.stderr
            wait_until(lambda: c.status(first.job_id).state == "queued", 30, "back in its queue")
            second = c.submit(JobSpec(prompt="queued behind it", width=64, height=64, steps=2))
            assert c.stats()["queues"]["rotated"] == 2
            assert old.proc.poll() is None and "back to its queue" in old.log()
            assert old.log().count("] received:") == 2  # "before" and the first only
            new = start_worker("rotated-new", queues="rotated", **{**env, **secret})
            done = c.wait([first.job_id, second.job_id], timeout=120)
            assert [s.state for s in done] == ["succeeded"] * 2
            # Generated by the new worker, stored once each; the old one never failed them.
            for s in done:
                assert s.result is not None and s.result.worker["node"] == new.node
            assert c.failed() == [] and old.log().count("] received:") == 2
            old.stop()
            new.stop()
    finally:
        services.stop()


def test_a_worker_whose_redis_password_is_refused_stays_up_and_says_why(
    fleet_env: dict, tmp_path: Path
) -> None:
    import os
    import signal
    import time

    from fleet.localdev import LocalServices
    from tests.fleet_fixtures import worker_command

    services = LocalServices(tmp_path / "own-services")
    ep = services.start()
    proc = None
    try:
        services.redis.client().config_set("requirepass", "s3cret")
        url = f"redis://:nope@127.0.0.1:{services.redis.port}/0"
        env = {**fleet_env, **ep.env(), "FLEET_REDIS_URL": url}
        log_path = tmp_path / "worker.log"
        with log_path.open("wb") as log:
            proc = subprocess.Popen(worker_command("refused@localhost", "fleet", "prefork", 1),
                                    env=env, stdout=log, stderr=subprocess.STDOUT,
                                    start_new_session=True)  # fmt: skip
        wait_until(lambda: "this worker takes no jobs" in log_path.read_text(), 60,
                   "the refused worker's reason")  # fmt: skip
        line = next(ln for ln in log_path.read_text().splitlines() if "takes no jobs" in ln)
        assert "refused the password" in line and ":***@" in line and "nope" not in line
        started = time.monotonic()
        wait_until(lambda: time.monotonic() - started > 3 and proc.poll() is None, 10,
                   "the worker staying up")  # fmt: skip
        said = subprocess.run([sys.executable, "-m", "worker", "check", "--any-host"], env=env,
                              capture_output=True, text=True)  # fmt: skip
        assert said.returncode == 1 and "refused the password" in said.stderr
    finally:
        if proc is not None and proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait(10)
        services.stop()


def test_redis_that_may_evict_the_fleets_keys_is_refused_or_warned_about(
    start_worker, tmp_path: Path, fleet_env: dict
) -> None:
    """maxmemory-policy volatile-lru (the default of several managed services) would drop
    claims and results: the producer refuses to enqueue and the worker takes no job, each
    saying what to set; FLEET_REDIS_CHECK=warn accepts it with a warning."""
    from fleet.errors import BrokerMisconfigured
    from fleet.localdev import LocalServices
    from fleet.settings import ProducerSettings
    from tests.fleet_fixtures import settings_kwargs

    services = LocalServices(tmp_path / "own-services")
    ep = services.start()
    try:
        services.redis.client().config_set("maxmemory-policy", "volatile-lru")
        settings = ProducerSettings(_env_file=None, **settings_kwargs(ep.env()), queue="evicting")
        with Client(settings) as c:
            with pytest.raises(BrokerMisconfigured, match="maxmemory-policy is volatile-lru"):
                c.submit(JobSpec(prompt="a fox", width=64, height=64, steps=2))
            assert c.stats()["queues"].get("evicting", 0) == 0
        run = subprocess.run([sys.executable, "-m", "producer", "submit", "a fox", "--width",
                              "64", "--height", "64"], env={**fleet_env, **ep.env()},
                             capture_output=True, text=True, timeout=120)  # fmt: skip
        assert run.returncode != 0 and "set maxmemory-policy noeviction" in run.stderr
        assert "Traceback" not in run.stderr
        w = start_worker("evicting", queues="evicting", **ep.env())
        wait_until(lambda: check(w).returncode == 2, 90, "the worker reporting itself broken")
        assert "maxmemory-policy is volatile-lru" in check(w).stderr
        w.stop()
        warned = ProducerSettings(_env_file=None, **settings_kwargs(ep.env()), queue="evicting",
                                  redis_check="warn")  # fmt: skip
        with Client(warned) as c:
            c.submit(JobSpec(prompt="a fox", width=64, height=64, steps=2))
            assert c.stats()["queues"]["evicting"] == 1
    finally:
        services.stop()


@pytest.mark.parametrize("token", [None, "hf_fleet-test-token-without-access"],
                         ids=["no token", "a token without access"])  # fmt: skip
def test_a_gated_hub_model_without_a_usable_token_takes_no_job_and_says_what_to_fix(
    start_worker, qclient: Client, queue: str, token: str | None
) -> None:
    """The hub answers 401 for a gated model without a token and 403 for a token whose account
    has no access (here a local HTTP server that answers as the hub does, at HF_ENDPOINT; the
    real huggingface_hub client asks it). FLEET_HF_TOKEN reaches the hub as the bearer token."""
    import threading
    from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

    asked: list[tuple[str, str | None]] = []

    class GatedHub(BaseHTTPRequestHandler):
        def _gated(self) -> None:
            sent = self.headers.get("Authorization")
            asked.append((self.path, sent))
            code = 403 if sent else 401
            body = b'{"error": "Access to model org/sd3 is restricted. You must have access."}'
            self.send_response(code)
            self.send_header("X-Error-Code", "GatedRepo")
            self.send_header("X-Error-Message", "Access to model org/sd3 is restricted.")
            self.send_header("Content-Type", "application/json")
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            if self.command != "HEAD":
                self.wfile.write(body)

        do_GET = do_HEAD = _gated

        def log_message(self, *_: object) -> None:
            pass

    hub = ThreadingHTTPServer(("127.0.0.1", 0), GatedHub)
    threading.Thread(target=hub.serve_forever, daemon=True).start()
    env = {"FLEET_MODEL": "org/sd3", "FLEET_LOCAL_FILES_ONLY": "false", "HF_HUB_OFFLINE": "0",
           "HF_ENDPOINT": f"http://127.0.0.1:{hub.server_address[1]}"}  # fmt: skip
    if token is not None:
        env["FLEET_HF_TOKEN"] = token
    try:
        reason = "the hub refused the token (403)" if token else "set HF_TOKEN"
        # That the jobs wait for a healthy worker is shown by the model-that-cannot-load case.
        _takes_no_job(start_worker, qclient, queue, reason, then_healthy=False, **env)
        model_requests = [(path, sent) for path, sent in asked if "/org/sd3/" in path]
        assert model_requests, f"the worker never asked the hub for the model: {asked}"
        assert {sent for _, sent in model_requests} == {f"Bearer {token}" if token else None}
    finally:
        hub.shutdown()
