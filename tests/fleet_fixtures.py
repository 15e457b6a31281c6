"""Test helpers that start real parts: a Celery worker process on the real services."""

from __future__ import annotations

import contextlib
import os
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

from celery import Celery

REPO = Path(__file__).resolve().parents[1]


def wait_until(predicate: Any, timeout: float, what: str, interval: float = 0.05) -> Any:
    """Poll ``predicate`` until it returns something truthy (returned) or ``timeout`` passes."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = predicate()
        if value:
            return value
        time.sleep(interval)
    raise TimeoutError(what)


def settings_kwargs(env: dict[str, str]) -> dict[str, Any]:
    """FLEET_* variables as keyword arguments of the settings classes."""
    return {k.removeprefix("FLEET_").lower(): v for k, v in env.items() if k.startswith("FLEET_")}


def worker_command(
    node: str, queues: str = "fleet", pool: str = "prefork", concurrency: int = 1
) -> list[str]:
    """The documented worker command line (README, docs/operations.md)."""
    return [
        sys.executable, "-m", "celery", "-A", "worker.app", "worker",
        "--pool", pool, "--concurrency", str(concurrency), "--queues", queues,
        "--hostname", node, "--loglevel", "INFO", "--without-gossip", "--without-mingle",
    ]  # fmt: skip


class WorkerProcess:
    """A real `celery worker` subprocess with its log in a file."""

    def __init__(
        self,
        node: str,
        env: dict[str, str],
        log_path: Path,
        queues: str = "fleet",
        pool: str = "prefork",
        concurrency: int = 1,
    ):
        self.node = node
        self.env = env
        self.queues = queues
        self.pool = pool
        self.concurrency = concurrency
        self.log_path = log_path
        self.proc: subprocess.Popen[bytes] | None = None

    def start(self, timeout: float = 90.0) -> WorkerProcess:
        log = self.log_path.open("ab")
        self.proc = subprocess.Popen(
            worker_command(self.node, self.queues, self.pool, self.concurrency),
            cwd=REPO,
            env=self.env,
            stdout=log,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )
        self.wait_ready(timeout)
        return self

    def wait_ready(self, timeout: float) -> None:
        app = Celery(broker=self.env["FLEET_REDIS_URL"])
        try:
            deadline = time.monotonic() + timeout
            while time.monotonic() < deadline:
                if self.proc is not None and self.proc.poll() is not None:
                    raise RuntimeError(f"worker {self.node} exited:\n{self.log()[-3000:]}")
                if app.control.ping(destination=[self.node], timeout=0.5):
                    return
            raise TimeoutError(f"worker {self.node} not ready:\n{self.log()[-3000:]}")
        finally:
            app.close()

    def log(self) -> str:
        return self.log_path.read_text(errors="replace") if self.log_path.exists() else ""

    def signal_stop(self) -> None:
        """Send the warm-shutdown signal without waiting (``stop`` waits)."""
        if self.proc is not None and self.proc.poll() is None:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(self.proc.pid, signal.SIGTERM)

    def stop(self, timeout: float = 30.0) -> None:
        if self.proc is None or self.proc.poll() is not None:
            return
        with contextlib.suppress(ProcessLookupError):
            os.killpg(self.proc.pid, signal.SIGTERM)
        try:
            self.proc.wait(timeout)
        except subprocess.TimeoutExpired:
            os.killpg(self.proc.pid, signal.SIGKILL)
            self.proc.wait(10)
