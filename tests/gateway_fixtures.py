"""The real HTTP gateway for tests: `python -m producer serve` as a process, and API keys."""

from __future__ import annotations

import contextlib
import os
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest

from tests.fleet_fixtures import REPO, settings_kwargs


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


class GatewayProcess:
    """`python -m producer serve` on a free loopback port, its log in a file."""

    def __init__(self, env: dict[str, str], log_path: Path, args: tuple[str, ...] = ()) -> None:
        self.env = env
        self.args = args
        self.log_path = log_path
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.proc: subprocess.Popen[bytes] | None = None

    def start(self, timeout: float = 60.0) -> GatewayProcess:
        with self.log_path.open("ab") as log:
            self.proc = subprocess.Popen(
                [sys.executable, "-m", "producer", "serve", "--port", str(self.port),
                 *self.args],
                cwd=REPO, env=self.env, stdout=log, stderr=subprocess.STDOUT,
                start_new_session=True,
            )  # fmt: skip
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"the gateway exited:\n{self.log()[-3000:]}")
            with contextlib.suppress(httpx.TransportError):
                if httpx.get(self.url + "/healthz", timeout=2).status_code == 200:
                    return self
            time.sleep(0.1)
        raise TimeoutError(f"the gateway did not answer:\n{self.log()[-3000:]}")

    def log(self) -> str:
        return self.log_path.read_text(errors="replace") if self.log_path.exists() else ""

    def alive(self) -> bool:
        return self.proc is not None and self.proc.poll() is None

    def stop(self) -> None:
        if self.proc is None or self.proc.poll() is not None:
            return
        with contextlib.suppress(ProcessLookupError):
            os.killpg(self.proc.pid, signal.SIGTERM)
        try:
            self.proc.wait(timeout=20)
        except subprocess.TimeoutExpired:
            os.killpg(self.proc.pid, signal.SIGKILL)
            self.proc.wait()


def gateway_starter(
    fleet_env: dict[str, str], logs: Path, started: list[GatewayProcess]
) -> Callable[..., GatewayProcess]:
    def start(name: str = "gateway", args: tuple[str, ...] = (), **env: str) -> GatewayProcess:
        """``args``: more of `serve`'s options (e.g. ``("--workers", "2")``)."""
        gw = GatewayProcess({**fleet_env, **env}, logs / f"{name}-{len(started)}.log", args)
        started.append(gw)
        return gw.start()

    return start


@pytest.fixture(scope="session")
def start_gateway(
    fleet_env: dict[str, str], tmp_path_factory: pytest.TempPathFactory
) -> Iterator[Callable[..., GatewayProcess]]:
    """Starts gateway processes on the session's services; all are stopped at session end."""
    started: list[GatewayProcess] = []
    yield gateway_starter(fleet_env, tmp_path_factory.mktemp("gateway-logs"), started)
    for gw in started:
        gw.stop()


@pytest.fixture(scope="session")
def gateway(start_gateway: Callable[..., GatewayProcess], worker: Any) -> GatewayProcess:
    """The shared gateway, in front of the shared worker (default queue, tiny model)."""
    return start_gateway("main")


@pytest.fixture(scope="session")
def tenants(fleet_env: dict[str, str]) -> Iterator[Any]:
    """The gateway's tenant store on the session's Redis: make tenants and keys directly."""
    import redis

    from fleet.settings import GatewaySettings
    from producer.gateway.tenants import TenantStore

    settings = GatewaySettings(_env_file=None, **settings_kwargs(fleet_env))
    client = redis.Redis.from_url(settings.redis_url)
    yield TenantStore(client, settings)
    client.close()


def new_tenant(tenants: Any, prefix: str = "t", **limits: Any) -> tuple[str, str]:
    """A tenant of the test's own with these limits, and a key of it: (name, key)."""
    import uuid

    name = f"{prefix}-{uuid.uuid4().hex[:8]}"
    tenants.update(name, **limits)
    key, _ = tenants.create_key(name, "test")
    return name, key


def auth(key: str) -> dict[str, str]:
    return {"Authorization": f"Bearer {key}"}
