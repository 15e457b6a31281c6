"""The embedded local Redis and SeaweedFS S3 really start, answer, restart and go away."""

from __future__ import annotations

import os
import pty
import select
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from urllib.parse import urlparse

import psutil
import pytest
import redis
from botocore.exceptions import ClientError
from redis.backoff import NoBackoff
from redis.retry import Retry

from fleet import localdev as ls
from tests.fleet_fixtures import wait_until

pytestmark = [pytest.mark.integration, pytest.mark.timeout(180)]

ROOT = Path(__file__).resolve().parents[2]


def _port_of(url: str) -> int:
    port = urlparse(url).port
    assert port is not None
    return port


def _accepts(port: int, host: str = "127.0.0.1") -> bool:
    try:
        with socket.create_connection((host, port), timeout=1):
            return True
    except OSError:
        return False


def _dead(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return True
    return False


def _listens(pid: int, port: int) -> bool:
    """Whether process ``pid`` itself (not somebody else) listens on TCP ``port``."""
    return any(
        c.laddr and c.laddr.port == port and c.status == psutil.CONN_LISTEN
        for c in psutil.Process(pid).net_connections(kind="tcp")
    )


@pytest.fixture
def occupied_port() -> Iterator[tuple[int, socket.socket]]:
    """A loopback port somebody else already listens on (high enough to have a gRPC twin)."""
    while True:
        sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        sock.bind(("127.0.0.1", 0))
        if sock.getsockname()[1] - ls.WEED_GRPC_OFFSET >= 1024:
            break
        sock.close()
    sock.listen()
    try:
        yield sock.getsockname()[1], sock
    finally:
        sock.close()


def test_services_answer_and_go_away(tmp_path: Path) -> None:
    with ls.local_services(tmp_path / "svc", bucket="images") as ep:
        assert ep.redis_url.startswith("redis://127.0.0.1:") and ep.redis_url.endswith("/0")
        assert ep.s3_endpoint_url.startswith("http://127.0.0.1:")
        assert ep.s3_region == "us-east-1" and ep.s3_bucket == "images"
        assert ep.s3_secret_access_key not in repr(ep)
        env = ep.env()
        assert env == {
            "FLEET_REDIS_URL": ep.redis_url,
            "FLEET_S3_ENDPOINT_URL": ep.s3_endpoint_url,
            "FLEET_S3_ACCESS_KEY_ID": ep.s3_access_key_id,
            "FLEET_S3_SECRET_ACCESS_KEY": ep.s3_secret_access_key,
            "FLEET_S3_REGION": "us-east-1",
            "FLEET_S3_BUCKET": "images",
            "FLEET_S3_CREATE_BUCKET": "true",
        }
        redis_port, s3_port = _port_of(ep.redis_url), _port_of(ep.s3_endpoint_url)

        # Redis answers on the reported port and listens on 127.0.0.1 only.
        r = redis.Redis.from_url(ep.redis_url)
        assert r.ping() is True
        assert r.config_get("bind")["bind"] == "127.0.0.1"
        assert r.config_get("appendonly")["appendonly"] == "yes"
        r.close()
        if sys.platform.startswith("linux"):  # all of 127/8 is local there, yet nobody on .2
            assert not _accepts(redis_port, "127.0.0.2")
            assert not _accepts(s3_port, "127.0.0.2")

        # S3 put/get with the returned credentials.
        import boto3

        s3 = boto3.client(
            "s3",
            endpoint_url=ep.s3_endpoint_url,
            region_name=ep.s3_region,
            aws_access_key_id=ep.s3_access_key_id,
            aws_secret_access_key=ep.s3_secret_access_key,
            config=ls.s3_client_config(),
        )
        s3.put_object(
            Bucket=ep.s3_bucket, Key="jobs/1/0.png", Body=b"\x89PNG-ish", ContentType="image/png"
        )
        got = s3.get_object(Bucket=ep.s3_bucket, Key="jobs/1/0.png")
        assert got["Body"].read() == b"\x89PNG-ish"
        assert got["ContentType"] == "image/png"
        names = [b["Name"] for b in s3.list_buckets()["Buckets"]]
        assert "images" in names

        # Wrong credentials are refused: auth is really on.
        bad = boto3.client(
            "s3",
            endpoint_url=ep.s3_endpoint_url,
            region_name=ep.s3_region,
            aws_access_key_id=ep.s3_access_key_id,
            aws_secret_access_key="not-the-secret",
            config=ls.s3_client_config(retries={"max_attempts": 1}),
        )
        with pytest.raises(ClientError) as refused:
            bad.list_buckets()
        assert refused.value.response["Error"]["Code"] in {"SignatureDoesNotMatch", "AccessDenied"}

    assert not _accepts(redis_port)
    assert not _accepts(s3_port)
    assert (tmp_path / "svc" / "redis.log").exists()  # a given workdir is kept
    assert (tmp_path / "svc" / "weed.log").exists()


def test_processes_dead_and_tempdir_removed_after_stop(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv(ls.KEEP_DIR_ENV, raising=False)
    with ls.LocalServices() as services:
        workdir = services.workdir
        pids = [services.redis.pid, services.s3.pid]
        ports = [services.redis.port, *services.s3.ports.values()]
        assert workdir.is_dir()
        assert all(pid is not None for pid in pids)
        assert services.alive()
        assert _listens(services.redis.pid or 0, services.redis.port)
        assert _listens(services.s3.pid or 0, services.s3.port)
    assert not services.alive()
    for pid in pids:
        assert pid is not None and _dead(pid)
    for port in ports:
        assert not _accepts(port), port
    assert not workdir.exists()
    leftovers = [
        p for p in Path("/tmp").glob("seaweedfs-*.sock") if any(str(x) in p.name for x in ports)
    ]
    assert leftovers == []


def test_redis_restart_keeps_data(tmp_path: Path) -> None:
    with ls.RedisServer(tmp_path) as server:
        port, first_pid = server.port, server.pid
        client = server.client()
        client.set("job:1", "done")
        client.close()
        server.restart()
        assert server.port == port and server.pid != first_pid
        client = server.client()
        assert client.get("job:1") == b"done"
        client.close()

        # A crash (SIGKILL) and a start come back on the same port as well.
        server.kill()
        assert not server.is_running and not _accepts(port)
        server.start()
        assert server.port == port
        assert server.client().ping() is True
    assert not _accepts(port)
    assert (tmp_path / "redis" / "appendonly.aof").exists()


def test_redis_answers_at_once_after_a_restart_with_much_data(tmp_path: Path) -> None:
    """Redis listens before it has loaded its AOF (and answers LOADING until then): start()
    returns only once it answers, so the first command after it works without retries."""
    with ls.RedisServer(tmp_path) as server:
        client = server.client()
        client.execute_command("DEBUG", "POPULATE", 500_000, "job", 64)
        client.bgrewriteaof()  # into the AOF (DEBUG POPULATE itself is not written there)
        wait_until(
            lambda: (
                client.info("persistence")["aof_rewrite_in_progress"] == 0
                and client.info("persistence")["aof_rewrite_scheduled"] == 0
            ),
            60,
            "the AOF rewrite",
        )
        client.close()
        server.restart()
        first = server.client(retry=Retry(NoBackoff(), 0))  # redis-py would retry LOADING
        assert first.dbsize() == 500_000
        first.close()


def test_seaweed_is_ready_for_a_put_at_once_and_restarts_keep_objects(tmp_path: Path) -> None:
    """Right after start() returns (first start, restart, start after a crash) a PUT and a
    GET of older objects work at the first try: the client here never retries."""
    with ls.SeaweedS3(tmp_path) as s3:
        ports = s3.ports
        client = s3.client(retries={"max_attempts": 1})
        client.create_bucket(Bucket="keep")
        client.put_object(Bucket="keep", Key="k", Body=b"v")
        s3.restart()
        assert s3.ports == ports
        assert client.get_object(Bucket="keep", Key="k")["Body"].read() == b"v"
        client.put_object(Bucket="keep", Key="after-restart", Body=b"r")

        first_pid = s3.pid
        s3.kill()  # a crash: SIGKILL, the way test_reliability takes storage away
        assert first_pid is not None and _dead(first_pid) and not _accepts(s3.port)
        s3.start()
        assert s3.ports == ports
        client.put_object(Bucket="keep", Key="after-kill", Body=b"c")
        assert client.get_object(Bucket="keep", Key="after-restart")["Body"].read() == b"r"


def test_servers_a_program_forgets_to_stop_are_stopped_when_it_exits(tmp_path: Path) -> None:
    """Stopped, not killed: gracefully, by the module's atexit hook (Redis writes its AOF and
    says goodbye in its log), before mirakuru's own hook would SIGKILL them."""
    workdir = tmp_path / "svc"
    script = (
        "import logging, sys;"
        "from fleet.localdev import LocalServices;"
        "logging.basicConfig(level=logging.INFO);"
        "s = LocalServices(sys.argv[1]);"
        "s.start();"
        "print(s.redis.port, s.s3.port, flush=True)"
    )
    pythonpath = os.pathsep.join(filter(None, [str(ROOT), os.environ.get("PYTHONPATH")]))
    done = subprocess.run(
        [sys.executable, "-c", script, str(workdir)],
        cwd=ROOT,
        env={**os.environ, "PYTHONPATH": pythonpath},
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert done.returncode == 0, done.stderr
    ports = [int(p) for p in done.stdout.split()]
    assert len(ports) == 2
    assert not any(_accepts(port) for port in ports)
    assert _processes_mentioning(str(workdir)) == []
    assert "seaweedfs stopped" in done.stderr and "redis stopped" in done.stderr
    assert "ready to exit" in (workdir / "redis.log").read_text()


def _first_pick_uses(monkeypatch: pytest.MonkeyPatch, name: str, busy: int, index: int) -> None:
    """Make the next call of ls.<name> hand out ``busy`` at ``index``, as a lost race would."""
    real = getattr(ls, name)
    calls = {"n": 0}

    def pick(count: int) -> list[int]:
        ports: list[int] = real(count)
        calls["n"] += 1
        if calls["n"] == 1:
            ports[index] = busy
        return ports

    monkeypatch.setattr(ls, name, pick)


def test_redis_moves_off_a_busy_port(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, occupied_port: tuple[int, socket.socket]
) -> None:
    busy, _ = occupied_port
    _first_pick_uses(monkeypatch, "_free_ports", busy, 0)
    with ls.RedisServer(tmp_path) as server:
        assert server.port != busy
        info = server.client().info("server")
        assert info["process_id"] == server.pid  # our redis, not whatever holds the busy port


def test_redis_is_not_fooled_by_another_redis(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    with ls.RedisServer(tmp_path / "other") as other:
        _first_pick_uses(monkeypatch, "_free_ports", other.port, 0)
        with ls.RedisServer(tmp_path / "mine") as mine:
            assert mine.port != other.port
            assert mine.client().info("server")["process_id"] == mine.pid


@pytest.mark.parametrize("component", ["s3", "master"])
@pytest.mark.parametrize("kind", ["http", "grpc"])
def test_seaweed_moves_off_a_busy_port(
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    occupied_port: tuple[int, socket.socket],
    component: str,
    kind: str,
) -> None:
    """weed exits on a busy HTTP port but silently moves off a busy gRPC port; either way the
    server must come up on ports that really are its own."""
    busy, _ = occupied_port
    real = ls._free_port_pairs
    calls = {"n": 0}
    index = ls.WEED_COMPONENTS.index(component)

    def pick(count: int, offset: int = ls.WEED_GRPC_OFFSET) -> list[int]:
        ports = real(count, offset)
        calls["n"] += 1
        if calls["n"] == 1:
            # http: hand out the busy port itself; grpc: one whose +offset twin is the busy one
            ports[index] = busy if kind == "http" else busy - offset
        return ports

    monkeypatch.setattr(ls, "_free_port_pairs", pick)
    with ls.SeaweedS3(tmp_path) as s3:
        assert calls["n"] >= 2  # the first try failed and a second one was made
        assert busy not in s3.ports.values()
        log_text = (tmp_path / "weed.log").read_text()
        if (component, kind) == ("s3", "http"):
            # Found busy before weed was run (nothing may answer there yet): two starts in the
            # log, weed's own output under the second only.
            assert log_text.count("\n=== ") == 2
            assert log_text.count("Starting SeaweedFS") == 1
        else:  # weed was run, and said so in its log
            assert "not available" in log_text or "Port allocation failed" in log_text
        client = s3.client()
        client.create_bucket(Bucket="probe")
        client.put_object(Bucket="probe", Key="k", Body=b"v")
        assert client.get_object(Bucket="probe", Key="k")["Body"].read() == b"v"
        assert _listens(s3.pid or 0, s3.port)


def test_pinned_busy_port_is_a_clear_error(
    tmp_path: Path, occupied_port: tuple[int, socket.socket]
) -> None:
    busy, _ = occupied_port
    server = ls.RedisServer(tmp_path, port=busy, startup_timeout=10)
    with pytest.raises(ls.ServiceStartError, match=r"redis-server did not start(.|\n)*last lines"):
        server.start()
    assert not server.is_running


def _cli(*args: str, env: dict[str, str] | None = None) -> subprocess.Popen[str]:
    pythonpath = os.pathsep.join(filter(None, [str(ROOT), os.environ.get("PYTHONPATH")]))
    return subprocess.Popen(
        [sys.executable, "-m", "fleet.localdev", *args],
        cwd=ROOT,
        env={**os.environ, "PYTHONPATH": pythonpath, **(env or {})},
        text=True,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
    )


def test_cli_run_passes_env_and_exit_code(tmp_path: Path) -> None:
    script = (
        "import os, redis, sys;"
        "r = redis.Redis.from_url(os.environ['FLEET_REDIS_URL']);"
        "print(os.environ['FLEET_REDIS_URL'], os.environ['FLEET_S3_BUCKET'], r.ping());"
        "sys.exit(7)"
    )
    proc = _cli(
        "run",
        "--bucket",
        "clibucket",
        "--workdir",
        str(tmp_path),
        "--",
        sys.executable,
        "-c",
        script,
    )
    out, err = proc.communicate(timeout=120)
    assert proc.returncode == 7, err
    url, bucket, pong = out.split()
    assert url.startswith("redis://127.0.0.1:") and bucket == "clibucket" and pong == "True"
    assert not _accepts(_port_of(url))


def test_cli_run_forwards_sigterm(tmp_path: Path) -> None:
    script = (
        "import signal, sys;"
        "signal.signal(signal.SIGTERM, lambda *a: sys.exit(42));"
        "print('ready', flush=True);"
        "signal.pause()"
    )
    proc = _cli("run", "--workdir", str(tmp_path), "--", sys.executable, "-c", script)
    assert proc.stdout is not None
    assert proc.stdout.readline().strip() == "ready"
    proc.send_signal(signal.SIGTERM)
    proc.communicate(timeout=60)
    assert proc.returncode == 42


def test_cli_env_prints_exports_and_stops_on_sigterm(tmp_path: Path) -> None:
    proc = _cli("env", "--workdir", str(tmp_path))
    assert proc.stdout is not None
    exports: dict[str, str] = {}
    deadline = time.monotonic() + 60
    while len(exports) < 7 and time.monotonic() < deadline:
        line = proc.stdout.readline()
        if not line:
            break
        assert line.startswith("export ")
        key, _, value = line.removeprefix("export ").strip().partition("=")
        exports[key] = value
    assert set(exports) == {
        "FLEET_REDIS_URL",
        "FLEET_S3_ENDPOINT_URL",
        "FLEET_S3_ACCESS_KEY_ID",
        "FLEET_S3_SECRET_ACCESS_KEY",
        "FLEET_S3_REGION",
        "FLEET_S3_BUCKET",
        "FLEET_S3_CREATE_BUCKET",
    }
    redis_port = _port_of(exports["FLEET_REDIS_URL"])
    s3_port = _port_of(exports["FLEET_S3_ENDPOINT_URL"])
    assert _accepts(redis_port) and _accepts(s3_port)
    proc.send_signal(signal.SIGTERM)
    proc.communicate(timeout=60)
    assert proc.returncode == 0
    assert not _accepts(redis_port) and not _accepts(s3_port)


def _processes_mentioning(text: str) -> list[int]:
    pids = []
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                cmdline = (entry / "cmdline").read_bytes()
            except OSError:
                continue
            if text.encode() in cmdline:
                pids.append(int(entry.name))
    return pids


def test_cli_sigterm_while_starting_leaves_nothing_behind(tmp_path: Path) -> None:
    # weed starts 120 s late (a wrapper that waits, then runs the real one), so the signal
    # surely comes while it starts: on a fast machine a plain weed was sometimes up, and the
    # command done, before the signal arrived (CI, stop 23 session's run: exit 0, not 143).
    late_weed = tmp_path / "late-weed"
    late_weed.write_text(f'#!/bin/sh\nsleep 120\nexec {ls.find_weed()} "$@"\n')
    late_weed.chmod(0o755)
    workdir = tmp_path / "svc"
    proc = _cli("run", "--workdir", str(workdir), "--", sys.executable, "-c", "pass",
                env={ls.WEED_BIN_ENV: str(late_weed)})  # fmt: skip
    assert proc.stderr is not None
    for line in proc.stderr:  # redis is up, weed is starting: interrupt now
        if "redis ready" in line:
            break
    proc.send_signal(signal.SIGTERM)
    proc.communicate(timeout=60)
    assert proc.returncode == 143
    assert _processes_mentioning(str(workdir)) == []
    assert _processes_mentioning(str(late_weed)) == []  # the starting one, killed


def test_cli_run_ctrl_c_in_a_terminal_stops_cmd_and_the_services(tmp_path: Path) -> None:
    """Ctrl-C typed in the terminal `run` was started from reaches CMD, which exits; then the
    services stop and nothing is left running."""
    workdir = tmp_path / "svc"
    script = (
        "import os, signal, sys;"
        "signal.signal(signal.SIGINT, lambda *a: sys.exit(42));"
        "print('ready', os.environ['FLEET_REDIS_URL'], flush=True);"
        "signal.pause()"
    )
    primary, secondary = pty.openpty()

    def take_the_terminal() -> None:  # in the child, after setsid: the pty becomes its terminal
        import fcntl
        import termios

        fcntl.ioctl(0, termios.TIOCSCTTY, 0)

    pythonpath = os.pathsep.join(filter(None, [str(ROOT), os.environ.get("PYTHONPATH")]))
    proc = subprocess.Popen(
        [sys.executable, "-m", "fleet.localdev", "run", "--workdir", str(workdir), "--",
         sys.executable, "-c", script],
        cwd=ROOT,
        env={**os.environ, "PYTHONPATH": pythonpath},
        stdin=secondary,
        stdout=secondary,
        stderr=secondary,
        start_new_session=True,
        preexec_fn=take_the_terminal,
    )  # fmt: skip
    os.close(secondary)
    output = b""

    def read_until(done: bytes | None, seconds: float) -> None:
        """Read the terminal until ``done`` was written to it (None: until everybody closed it)."""
        nonlocal output
        deadline = time.monotonic() + seconds
        while (done is None or done not in output) and time.monotonic() < deadline:
            if select.select([primary], [], [], 0.2)[0]:
                try:
                    chunk = os.read(primary, 65536)
                except OSError:  # EIO: every end of the terminal's other side is closed
                    return
                if not chunk:
                    return
                output += chunk

    try:
        read_until(b"ready redis://", 120)
        assert b"ready redis://" in output, output.decode(errors="replace")
        line = output[output.index(b"ready redis://") :].split(b"\n", 1)[0].decode()
        redis_port = _port_of(line.split()[1])
        assert _accepts(redis_port)
        os.write(primary, b"\x03")  # the terminal's intr character: Ctrl-C
        read_until(None, 60)
        assert proc.wait(timeout=10) == 42, output.decode(errors="replace")
    finally:
        if proc.poll() is None:
            proc.kill()
        os.close(primary)
    assert not _accepts(redis_port)
    assert _processes_mentioning(str(workdir)) == []
