"""The processes the bench starts and stops, and the two child roles it runs itself.

Children: real `celery worker` processes (the README's command line), the bare pipeline process
(``scripts/bench.py --role pipeline``: Engine.generate in a loop, one JSON command per stdin
line), the trivial Celery worker (``--role noop-worker``: one task, ``bench.noop``) and the
HTTP gateway (``python -m producer serve`` on a free loopback port).
"""

from __future__ import annotations

import contextlib
import json
import os
import select
import signal
import socket
import subprocess
import sys
import time
import uuid
from pathlib import Path
from typing import Any

from . import BENCH_SCRIPT, REPO, log

NOOP_TASK = "bench.noop"
NOOP_QUEUE = "bench.noop"
PROMPTS = (
    "a lighthouse on a cliff at dusk",
    "a red fox in fresh snow",
    "a bowl of ramen, studio photo",
    "an old tram in Lisbon",
    "a watercolor of mountains",
    "a robot reading a book",
)
CELERY_FLAGS = ["--loglevel", "INFO", "--without-gossip", "--without-mingle"]


def make_spec(i: int, size: int, steps: int, seed: int, **extra: Any) -> Any:
    """Job ``i`` of a job set: the same prompt for the same ``i`` in every process."""
    from fleet.contract import JobSpec

    return JobSpec(
        prompt=PROMPTS[i % len(PROMPTS)], width=size, height=size, steps=steps, seed=seed, **extra
    )


def node_name(name: str) -> str:
    return f"{name}-{uuid.uuid4().hex[:6]}@localhost"


def free_port() -> int:
    """A loopback port free now (the gateway takes it a moment later)."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


# =============================================================================================
# Child roles.


def pipeline_role() -> int:
    """Keep Engine warm; answer one JSON command per stdin line with one JSON line."""
    out = os.fdopen(os.dup(1), "w", buffering=1)
    os.dup2(2, 1)  # library prints and progress bars go to the log, not the protocol
    from fleet.settings import WorkerSettings
    from worker.engine.engine import Engine

    try:
        import diffusers.utils.logging as dlog

        dlog.disable_progress_bar()
    except (ImportError, AttributeError):  # an older diffusers: its bar only costs log lines
        pass
    engine = Engine(WorkerSettings())  # the same FLEET_* settings as the workers
    for line in sys.stdin:
        cmd = json.loads(line)
        op = cmd.get("op")
        if op == "quit":
            break
        if op == "setup":
            began = time.perf_counter()
            engine.setup()
            import torch

            reply = {
                "load_s": time.perf_counter() - began,
                "torch_threads": torch.get_num_threads(),
                "pipeline": type(engine.pipe).__name__,
            }
        elif op == "loop":
            offset = cmd.get("offset", 0)
            specs = [
                make_spec(i, cmd["size"], cmd["steps"], cmd["seed0"] + i, images=cmd["images"])
                for i in range(offset, offset + cmd["n"])
            ]
            per_call = []
            began = time.perf_counter()
            for spec in specs:
                t = time.perf_counter()
                engine.generate(spec)
                per_call.append(time.perf_counter() - t)
            reply = {"seconds": time.perf_counter() - began, "per_call_s": per_call}
        else:
            reply = {"error": f"unknown op {op!r}"}
        out.write(json.dumps(reply) + "\n")
    return 0


def make_noop_app(redis_url: str) -> Any:
    """A tiny Celery app with the fleet workers' Celery settings and one trivial task."""
    from fleet.celeryconf import make_celery
    from fleet.settings import WorkerSettings
    from worker.app import worker_config

    settings = WorkerSettings(_env_file=None, redis_url=redis_url, queue=NOOP_QUEUE)
    app = make_celery("fleet-bench-noop", settings, **worker_config(settings))

    @app.task(name=NOOP_TASK)
    def noop() -> str:
        return "ok"

    return app


def noop_worker_role(node: str) -> int:
    app = make_noop_app(os.environ["FLEET_REDIS_URL"])
    app.worker_main(["worker", "--pool", "prefork", "--concurrency", "1", "--queues", NOOP_QUEUE,
                     "--hostname", node, *CELERY_FLAGS])  # fmt: skip
    return 0


# =============================================================================================
# Processes.


class Proc:
    """A subprocess in its own session, logging to a file; stopped with its whole group."""

    #: the Celery node name of a worker (pinged until it answers), None for other processes
    node: str | None = None

    def __init__(self, name: str, cmd: list[str], env: dict[str, str], run_dir: Path) -> None:
        self.name = name
        self.cmd = cmd
        self.env = env
        self.log_path = run_dir / f"{name}.log"
        self.proc: subprocess.Popen[str] | None = None

    def start(self, stdin: int | None = subprocess.DEVNULL, stdout: Any = None) -> Proc:
        logfh = self.log_path.open("a")
        try:
            self.proc = subprocess.Popen(  # nosec B603  # the bench's own command lines, no shell
                self.cmd,
                cwd=REPO,
                env=self.env,
                stdin=stdin,
                stdout=stdout if stdout is not None else logfh,
                stderr=logfh,
                start_new_session=True,
                text=True,
            )
        finally:
            logfh.close()
        return self

    def alive(self) -> bool:
        return self.proc is not None and self.proc.poll() is None

    def tail(self, chars: int = 3000) -> str:
        try:
            return self.log_path.read_text(errors="replace")[-chars:]
        except OSError:
            return "<no log>"

    def stop(self, timeout: float = 20.0) -> None:
        proc = self.proc
        if proc is None:
            return
        if proc.poll() is None:
            with contextlib.suppress(ProcessLookupError, PermissionError):
                os.killpg(proc.pid, signal.SIGTERM)
            try:
                proc.wait(timeout)
            except subprocess.TimeoutExpired:
                log(f"{self.name} ignored SIGTERM; killing it")
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.killpg(proc.pid, signal.SIGKILL)  # whatever is left of the group (pool children)
        with contextlib.suppress(subprocess.TimeoutExpired):
            proc.wait(10)
        for stream in (proc.stdin, proc.stdout):
            if stream is not None:
                with contextlib.suppress(OSError):
                    stream.close()


class Worker(Proc):
    """The documented worker command line (README), on the given queues."""

    def __init__(
        self,
        name: str,
        queues: str,
        env: dict[str, str],
        run_dir: Path,
        pool: str = "prefork",
        concurrency: int = 1,
    ) -> None:
        self.node = node_name(name)
        cmd = [sys.executable, "-m", "celery", "-A", "worker.app", "worker", "--pool", pool,
               "--concurrency", str(concurrency), "--queues", queues, "--hostname", self.node,
               *CELERY_FLAGS]  # fmt: skip
        super().__init__(name, cmd, env, run_dir)


class NoopWorker(Proc):
    """The trivial task's own prefork worker (``--role noop-worker``)."""

    def __init__(self, env: dict[str, str], run_dir: Path) -> None:
        self.node = node_name("noop")
        cmd = [sys.executable, str(BENCH_SCRIPT), "--role", "noop-worker", "--node", self.node]
        super().__init__("noop-worker", cmd, env, run_dir)


class GatewayProc(Proc):
    """The HTTP gateway as users run it: `python -m producer serve` (one uvicorn process)."""

    def __init__(self, env: dict[str, str], run_dir: Path) -> None:
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        cmd = [sys.executable, "-m", "producer", "serve", "--host", "127.0.0.1", "--port",
               str(self.port)]  # fmt: skip
        super().__init__("gateway", cmd, env, run_dir)

    def wait_ready(self, timeout: float) -> None:
        """Ask /healthz until it answers 200 (Redis and S3 reached); a dead process fails."""
        import httpx

        deadline = time.monotonic() + timeout
        while True:
            if not self.alive():
                raise RuntimeError(f"the gateway exited at start:\n{self.tail()}")
            with contextlib.suppress(httpx.TransportError):
                if httpx.get(self.url + "/healthz", timeout=2).status_code == 200:
                    return
            if time.monotonic() > deadline:
                raise TimeoutError(f"the gateway did not answer in {timeout:.0f} s:\n{self.tail()}")
            time.sleep(0.05)


class PipelineProc(Proc):
    """The in-process baseline: Engine.generate in a loop, in a process of its own."""

    def __init__(self, env: dict[str, str], run_dir: Path, name: str = "pipeline") -> None:
        super().__init__(name, [sys.executable, str(BENCH_SCRIPT), "--role", "pipeline"], env,
                         run_dir)  # fmt: skip

    def start_pipe(self) -> PipelineProc:
        self.start(stdin=subprocess.PIPE, stdout=subprocess.PIPE)
        return self

    def send(self, **cmd: Any) -> None:
        assert self.proc is not None and self.proc.stdin
        self.proc.stdin.write(json.dumps(cmd) + "\n")
        self.proc.stdin.flush()

    def receive(self, timeout: float) -> dict[str, Any]:
        assert self.proc is not None and self.proc.stdout
        ready, _, _ = select.select([self.proc.stdout], [], [], timeout)
        line = self.proc.stdout.readline() if ready else ""
        if not line:
            raise RuntimeError(f"{self.name} gave no answer in {timeout:.0f} s:\n{self.tail()}")
        reply: dict[str, Any] = json.loads(line)
        if "error" in reply:
            raise RuntimeError(f"{self.name}: {reply['error']}")
        return reply

    def call(self, timeout: float, **cmd: Any) -> dict[str, Any]:
        self.send(**cmd)
        return self.receive(timeout)

    def loop(
        self, n: int, size: int, steps: int, seed0: int, offset: int = 0, images: int = 1
    ) -> None:
        """Start ``n`` calls with ``images`` each (jobs ``offset`` on); ``receive`` the reply."""
        self.send(op="loop", n=n, size=size, steps=steps, seed0=seed0, offset=offset,
                  images=images)  # fmt: skip

    def generate(self, n: int, size: int, steps: int, seed0: int, **kw: int) -> dict[str, Any]:
        """``loop`` and wait: {"seconds": all calls, "per_call_s": [...]}."""
        self.loop(n, size, steps, seed0, **kw)
        return self.receive(600)

    def stop(self, timeout: float = 20.0) -> None:
        if self.alive() and self.proc is not None and self.proc.stdin is not None:
            with contextlib.suppress(OSError, ValueError):
                self.proc.stdin.write(json.dumps({"op": "quit"}) + "\n")
                self.proc.stdin.flush()
            with contextlib.suppress(subprocess.TimeoutExpired):
                self.proc.wait(5)
        super().stop(timeout)


def wait_ready(app: Any, procs: list[Proc], timeout: float) -> None:
    """Ping every Celery node until it answers (a dead process fails at once)."""
    deadline = time.monotonic() + timeout
    pending = {p.node: p for p in procs if p.node is not None}
    while pending:
        for node, p in list(pending.items()):
            if not p.alive():
                raise RuntimeError(f"{p.name} exited at start:\n{p.tail()}")
            if app.control.ping(destination=[node], timeout=0.5):
                del pending[node]
        if pending and time.monotonic() > deadline:
            names = ", ".join(p.name for p in pending.values())
            raise TimeoutError(f"not ready after {timeout:.0f} s: {names}")
