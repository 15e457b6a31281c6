#!/usr/bin/env python3
"""Throughput benchmark of the fleet on this machine: every figure is a ratio measured in one run.

    scripts/bench [--quick] [--out DIR] [--threads 1|2] [--jobs N] [--repeats R]

Starts its own Redis and SeaweedFS S3 (fleet.localdev.LocalServices, free loopback
ports), real `celery worker` processes (prefork with one child; threads-pool overlapped and
batch workers) serving the random-weight `medium` model, a bare pipeline process and a trivial
Celery app; measures; stops everything (also on errors and Ctrl-C); writes results.json and
results.md into DIR (default bench/).

Figures (medians of several runs, each run measuring both sides of its ratio back to back):

- fleet efficiency: images/s through the fleet (producer Client -> Redis -> one worker ->
  PNG -> S3 -> result seen by the client) / images/s of Engine.generate in a loop in one
  process; same model, size, steps and torch threads. Goal >= 0.98.
- fleet efficiency, overlapped worker: the same through a threads-pool worker with two jobs in
  flight (one generating, one storing). Goal >= 0.98.
- batching gain: 64 compatible 64 px jobs queued at once, a batch worker (FLEET_BATCH_SIZE=8;
  batch 4 too in full runs) / the default worker. Goal >= 2.5. The bare pipeline's images=B vs
  images=1 gain is given for reference.
- scale-out: two workers with one torch thread each / one worker with two threads, images/s over
  the same jobs. Goal >= 1.9.
- bulk enqueue: producer.bulk.submit_bulk / one-by-one client.celery.send_task, jobs/s of real
  Celery messages (counted with LLEN, checked, then purged). Goal >= 4.
- idle latency: submit -> the job's STARTED state (published by the worker as it starts the
  task), fleet idle / a trivial Celery task's round trip (submit -> SUCCESS). Goal <= 2.
"""

from __future__ import annotations

import argparse
import base64
import contextlib
import json
import os
import platform
import random
import select
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import threading
import time
import traceback
import uuid
from collections import Counter
from collections.abc import Callable
from datetime import datetime, timezone
from importlib import metadata
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[1]
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))

NOOP_TASK = "bench.noop"
NOOP_QUEUE = "bench.noop"
Q_ONE = "bench.one"  # the worker with FLEET_TORCH_THREADS=2
Q_TWO = "bench.two"  # shared by the two one-thread workers
Q_BULK = "bench.bulk"  # no consumer: counted with LLEN, then purged
Q_OVL = "bench.overlap"  # the overlapped worker: threads pool, 2 jobs in flight, batch size 1
Q_BATCH = "bench.batch{size}"  # batch workers: FLEET_BATCH_SIZE=size, 2 x size jobs in flight
BATCH_SIZES = (8, 4)  # the first is the batching-gain figure; the others (full run) for reference
PROMPTS = (
    "a lighthouse on a cliff at dusk",
    "a red fox in fresh snow",
    "a bowl of ramen, studio photo",
    "an old tram in Lisbon",
    "a watercolor of mountains",
    "a robot reading a book",
)

GOALS: dict[str, dict[str, Any]] = {
    "fleet_efficiency": {"text": ">= 0.98", "op": ">=", "value": 0.98},
    "fleet_efficiency_overlapped": {"text": ">= 0.98", "op": ">=", "value": 0.98},
    "batching_gain": {"text": ">= 2.5", "op": ">=", "value": 2.5},
    "scale_out": {"text": ">= 1.9", "op": ">=", "value": 1.9},
    "bulk_enqueue": {"text": ">= 4", "op": ">=", "value": 4.0},
    "idle_latency": {"text": "<= 2", "op": "<=", "value": 2.0},
}


def log(msg: str) -> None:
    print(f"bench {time.strftime('%H:%M:%S')} {msg}", file=sys.stderr, flush=True)


def median(values: list[float]) -> float:
    return float(statistics.median(values))


def spread(values: list[float]) -> float:
    """(max - min) / median: how much the runs of one figure disagree."""
    if len(values) < 2 or not median(values):
        return 0.0
    return (max(values) - min(values)) / median(values)


def interval90(values: list[float], resamples: int = 2000) -> list[float] | None:
    """A 90% bootstrap interval of the median of ``values`` (seeded: the same runs give the same
    interval): how far the reported median could move on another day like this one."""
    if len(values) < 3:
        return None
    rng = random.Random(0)
    medians = sorted(
        statistics.median(rng.choices(values, k=len(values))) for _ in range(resamples)
    )
    return [round(medians[int(0.05 * resamples)], 4), round(medians[int(0.95 * resamples)], 4)]


# =============================================================================================
# Child roles: the bare pipeline process and the trivial Celery worker.


def pipeline_role() -> int:
    """Keep Engine warm; answer one JSON command per stdin line with one JSON line."""
    out = os.fdopen(os.dup(1), "w", buffering=1)
    os.dup2(2, 1)  # library prints and progress bars go to the log, not the protocol
    from fleet.contract import JobSpec
    from fleet.settings import WorkerSettings
    from worker.engine.engine import Engine

    try:
        import diffusers.utils.logging as dlog

        dlog.disable_progress_bar()
    except Exception:
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
                JobSpec(
                    prompt=PROMPTS[i % len(PROMPTS)],
                    width=cmd["size"],
                    height=cmd["size"],
                    steps=cmd["steps"],
                    seed=cmd["seed0"] + i,
                    images=cmd.get("images", 1),
                )
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
    from celery import Celery

    from fleet.settings import WorkerSettings
    from worker.app import celery_config

    app = Celery("fleet-bench-noop")
    app.conf.update(
        celery_config(WorkerSettings(_env_file=None, redis_url=redis_url, queue=NOOP_QUEUE))
    )

    @app.task(name=NOOP_TASK)
    def noop() -> str:
        return "ok"

    return app


def noop_worker_role(node: str) -> int:
    app = make_noop_app(os.environ["FLEET_REDIS_URL"])
    app.worker_main(
        ["worker", "--pool", "prefork", "--concurrency", "1", "--queues", NOOP_QUEUE,
         "--hostname", node, "--loglevel", "INFO", "--without-gossip", "--without-mingle"]
    )  # fmt: skip
    return 0


# =============================================================================================
# Processes the bench starts and stops.


class Proc:
    """A subprocess in its own session, logging to a file; stopped with its whole group."""

    def __init__(self, name: str, cmd: list[str], env: dict[str, str], log_path: Path) -> None:
        self.name = name
        self.cmd = cmd
        self.env = env
        self.log_path = log_path
        self.proc: subprocess.Popen[str] | None = None

    def start(self, stdin: int | None = subprocess.DEVNULL, stdout: Any = None) -> Proc:
        logfh = self.log_path.open("a")
        try:
            self.proc = subprocess.Popen(
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
        self.node = f"{name}-{uuid.uuid4().hex[:6]}@localhost"
        self.queues = queues
        cmd = [
            sys.executable, "-m", "celery", "-A", "worker.app", "worker",
            "--pool", pool, "--concurrency", str(concurrency), "--queues", queues,
            "--hostname", self.node, "--loglevel", "INFO", "--without-gossip", "--without-mingle",
        ]  # fmt: skip
        super().__init__(name, cmd, env, run_dir / f"{name}.log")


class PipelineProc(Proc):
    """The in-process baseline: Engine.generate in a loop, in a process of its own."""

    def __init__(self, env: dict[str, str], run_dir: Path, name: str = "pipeline") -> None:
        cmd = [sys.executable, str(Path(__file__).resolve()), "--role", "pipeline"]
        super().__init__(name, cmd, env, run_dir / f"{name}.log")

    def start_pipe(self) -> PipelineProc:
        return self.start(stdin=subprocess.PIPE, stdout=subprocess.PIPE)  # type: ignore[return-value]

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

    def stop(self, timeout: float = 20.0) -> None:
        if self.alive() and self.proc is not None and self.proc.stdin is not None:
            with contextlib.suppress(OSError, ValueError):
                self.proc.stdin.write(json.dumps({"op": "quit"}) + "\n")
                self.proc.stdin.flush()
            with contextlib.suppress(subprocess.TimeoutExpired):
                self.proc.wait(5)
        super().stop(timeout)


def wait_ready(app: Any, procs: list[Worker | Proc], timeout: float) -> None:
    """Ping every Celery node until it answers (a dead process fails at once)."""
    deadline = time.monotonic() + timeout
    pending = {p.node: p for p in procs if isinstance(p, Worker | NoopWorker)}
    while pending:
        for node, p in list(pending.items()):
            if not p.alive():
                raise RuntimeError(f"{p.name} exited at start:\n{p.tail()}")
            if app.control.ping(destination=[node], timeout=0.5):
                del pending[node]
        if pending and time.monotonic() > deadline:
            names = ", ".join(p.name for p in pending.values())
            raise TimeoutError(f"not ready after {timeout:.0f} s: {names}")


class NoopWorker(Proc):
    def __init__(self, env: dict[str, str], run_dir: Path) -> None:
        self.node = f"noop-{uuid.uuid4().hex[:6]}@localhost"
        cmd = [sys.executable, str(Path(__file__).resolve()), "--role", "noop-worker",
               "--node", self.node]  # fmt: skip
        super().__init__("noop-worker", cmd, env, run_dir / "noop-worker.log")


# =============================================================================================
# Measurements.


def job_specs(
    n: int, size: int, steps: int, seed0: int = 1000, tag: str = "job", offset: int = 0
) -> list[Any]:
    """The job set: the same prompts and seeds as the in-process loop, fresh ids."""
    from fleet.contract import JobSpec

    run = uuid.uuid4().hex[:8]
    return [
        JobSpec(
            job_id=f"bench-{tag}-{run}-{i:03d}",
            prompt=PROMPTS[i % len(PROMPTS)],
            width=size,
            height=size,
            steps=steps,
            seed=seed0 + i,
        )
        for i in range(offset, offset + n)
    ]


def wait_results(client: Any, job_ids: list[str], timeout: float) -> list[dict[str, Any]]:
    """Each job's result as the client sees it (Celery result, pushed over Redis pub/sub)."""
    deadline = time.monotonic() + timeout
    results = []
    for job_id in job_ids:
        res = client.celery.AsyncResult(job_id)
        value = res.get(timeout=max(1.0, deadline - time.monotonic()), propagate=False)
        if res.state != "SUCCESS" or not isinstance(value, dict):
            raise RuntimeError(f"job {job_id} ended {res.state}: {value!r}")
        if value.get("status") != "succeeded":
            raise RuntimeError(f"job {job_id} did not succeed: {value!r}")
        results.append(value)
    return results


def fleet_run(client: Any, specs: list[Any], timeout: float) -> dict[str, Any]:
    """Submit every job at once, wait until the client has seen every result."""
    began = time.perf_counter()
    handles = client.submit_many(specs)
    results = wait_results(client, [h.job_id for h in handles], timeout)
    seconds = time.perf_counter() - began
    timings = [r.get("timings", {}) for r in results]
    return {
        "n": len(specs),
        "seconds": seconds,
        "nodes": dict(Counter(str(r.get("worker", {}).get("node")) for r in results)),
        "generate_s": [t.get("generate_s", 0.0) for t in timings],
        "upload_s": [t.get("upload_s", 0.0) for t in timings],
        "total_s": [t.get("total_s", 0.0) for t in timings],
        "batch_jobs": [int(t.get("batch_jobs", 1)) for t in timings],
    }


def inproc_run(pipe: PipelineProc, n: int, size: int, steps: int, offset: int) -> dict[str, Any]:
    """Engine.generate on the same jobs as job_specs(..., offset) would make, in a loop."""
    reply = pipe.call(
        600, op="loop", n=n, size=size, steps=steps, seed0=1000, offset=offset, images=1
    )
    return {"n": n, "seconds": reply["seconds"], "per_call_s": reply["per_call_s"]}


def bare_pair_run(
    pipes: list[PipelineProc], n: int, size: int, steps: int, offset: int
) -> dict[str, Any]:
    """The same jobs shared by two bare pipeline processes running at once."""
    first = n // 2
    began = time.perf_counter()
    pipes[0].send(op="loop", n=first, size=size, steps=steps, seed0=1000, offset=offset)
    pipes[1].send(op="loop", n=n - first, size=size, steps=steps, seed0=1000, offset=offset + first)
    replies = [p.receive(600) for p in pipes]
    seconds = time.perf_counter() - began
    return {"n": n, "seconds": seconds, "per_call_s": [x for r in replies for x in r["per_call_s"]]}


def combine(parts: list[dict[str, Any]]) -> dict[str, Any]:
    """One measurement made of several parts: images/s over all of them, medians per job."""
    n = sum(p["n"] for p in parts)
    seconds = sum(p["seconds"] for p in parts)
    out: dict[str, Any] = {"n": n, "seconds": seconds, "images_per_s": n / seconds}
    for key in ("generate_s", "upload_s", "total_s", "per_call_s"):
        values = [v for p in parts for v in p.get(key, [])]
        if values:
            out[key] = median(values)
    nodes: Counter[str] = Counter()
    for p in parts:
        nodes.update(p.get("nodes", {}))
    if nodes:
        out["jobs_per_node"] = dict(nodes)
    return out


def pubsub_timing(redis_client: Any, key: str, submit: Callable[[], Any], timeout: float) -> dict:
    """Seconds from submit() to the first STARTED and to SUCCESS/FAILURE published on ``key``
    (Celery's Redis backend publishes every state it stores on the key's channel)."""
    ps = redis_client.pubsub()
    try:
        ps.subscribe(key)
        deadline = time.monotonic() + 5
        while True:  # the subscription is confirmed before anything is sent
            msg = ps.get_message(timeout=1.0)
            if msg and msg["type"] == "subscribe":
                break
            if time.monotonic() > deadline:
                raise TimeoutError("no pub/sub subscription confirmation")
        began = time.perf_counter()
        submit()
        started = done = None
        deadline = time.monotonic() + timeout
        while done is None:
            msg = ps.get_message(timeout=1.0)
            now = time.perf_counter()
            if msg is None or msg["type"] != "message":
                if time.monotonic() > deadline:
                    raise TimeoutError(f"{key}: no result after {timeout:.0f} s")
                continue
            status = json.loads(msg["data"]).get("status")
            if status == "STARTED" and started is None:
                started = now - began
            if status in ("SUCCESS", "FAILURE", "REVOKED"):
                if status != "SUCCESS":
                    raise RuntimeError(f"{key} ended {status}")
                done = now - began
        return {"started_s": started, "done_s": done}
    finally:
        ps.close()


# =============================================================================================
# Machine facts.


def cpu_model() -> str:
    with contextlib.suppress(OSError):
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.lower().startswith("model name"):
                return line.split(":", 1)[1].strip()
    return platform.processor() or platform.machine()


def cpu_busy(seconds: float = 1.0) -> float | None:
    """Fraction of all CPUs busy over ``seconds`` (/proc/stat), i.e. load from anyone."""

    def sample() -> tuple[int, int]:
        fields = [int(x) for x in Path("/proc/stat").read_text().split("\n")[0].split()[1:]]
        idle = fields[3] + (fields[4] if len(fields) > 4 else 0)
        return sum(fields), idle

    try:
        t1, i1 = sample()
        time.sleep(seconds)
        t2, i2 = sample()
    except (OSError, ValueError, IndexError):
        return None
    return round(1 - (i2 - i1) / max(1, t2 - t1), 3)


def _machine_busy_s() -> tuple[float, float]:
    """(busy, steal) CPU-seconds of all CPUs since boot (/proc/stat; guests not counted twice).
    Steal is time the hypervisor gave this VM's CPUs to someone else."""
    fields = [int(x) for x in Path("/proc/stat").read_text().split("\n")[0].split()[1:9]]
    idle = fields[3] + fields[4]  # idle + iowait
    steal = fields[7] if len(fields) > 7 else 0
    tick = os.sysconf("SC_CLK_TCK")
    return (sum(fields) - idle - steal) / tick, steal / tick


def _own_cpu_s() -> float:
    """CPU-seconds used by this process and everything it started (workers, Redis, S3...)."""
    parent: dict[int, int] = {}
    used: dict[int, float] = {}
    tick = os.sysconf("SC_CLK_TCK")
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            rest = (entry / "stat").read_text().rsplit(")", 1)[1].split()
        except (OSError, IndexError):
            continue
        pid = int(entry.name)
        parent[pid] = int(rest[1])
        used[pid] = (int(rest[11]) + int(rest[12])) / tick  # utime + stime
    children: dict[int, list[int]] = {}
    for pid, ppid in parent.items():
        children.setdefault(ppid, []).append(pid)
    total, todo = 0.0, [os.getpid()]
    while todo:
        pid = todo.pop()
        total += used.get(pid, 0.0)
        todo += children.get(pid, [])
    return total


class CpuWatch:
    """How much of the machine other processes (not this bench's) used during a block."""

    def __enter__(self) -> CpuWatch:
        self.foreign: float | None = None
        self.steal: float | None = None
        try:
            self._start = (time.monotonic(), *_machine_busy_s(), _own_cpu_s())
        except (OSError, ValueError, IndexError):
            self._start = None  # type: ignore[assignment]
        return self

    def __exit__(self, *_: object) -> None:
        if self._start is None:
            return
        with contextlib.suppress(OSError, ValueError, IndexError):
            t0, busy0, steal0, own0 = self._start
            elapsed = max(time.monotonic() - t0, 1e-9) * (os.cpu_count() or 1)
            busy, steal = _machine_busy_s()
            own = _own_cpu_s() - own0
            self.foreign = round(max(0.0, busy - busy0 - own) / elapsed, 4)
            self.steal = round(max(0.0, steal - steal0) / elapsed, 4)


def loadavg() -> list[float] | None:
    try:
        return [round(x, 2) for x in os.getloadavg()]
    except OSError:
        return None


def versions() -> dict[str, str]:
    out = {"python": platform.python_version()}
    for name in ("torch", "diffusers", "transformers", "celery", "kombu", "redis"):
        try:
            out[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            out[name] = "not installed"
    return out


# =============================================================================================
# The benchmark.


class Bench:
    def __init__(self, args: argparse.Namespace) -> None:
        self.args = args
        self.quick = args.quick
        self.threads = args.threads
        self.n = args.jobs or (6 if self.quick else 12)
        self.repeats = args.repeats or (3 if self.quick else 7)
        self.warmup = 1 if self.quick else 2
        self.size, self.steps = 128, 20
        self.bulk_n = args.bulk_jobs or (1000 if self.quick else 10_000)
        self.bulk_repeats = 3
        self.latency_samples = 5 if self.quick else 9
        self.batch_repeats = 1 if self.quick else 3
        self.batch_jobs = 16 if self.quick else 64  # compatible jobs queued at once, 64 px
        self.batch_sizes = BATCH_SIZES[:1] if self.quick else BATCH_SIZES
        self.run_dir = Path(tempfile.mkdtemp(prefix="fleet-bench-"))
        self.procs: list[Proc] = []
        self.clients: list[Any] = []
        self.services: Any = None
        self.notes: list[str] = []
        #: per phase: the share of all CPUs other processes used while it was measured
        self.other_cpu: dict[str, list[float | None]] = {}
        #: per phase: the share of all CPUs the hypervisor gave to other guests (steal)
        self.steal: dict[str, list[float | None]] = {}

    # -- set-up -----------------------------------------------------------------------------

    def model_dir(self) -> Path:
        out = REPO / ".models" / "medium"
        proc = subprocess.run(
            [sys.executable, "-m", "worker.testmodel", "--size", "medium", "--out", str(out)],
            cwd=REPO,
            capture_output=True,
            text=True,
            timeout=600,
        )
        if proc.returncode != 0:
            raise RuntimeError(f"building the medium model failed:\n{proc.stderr[-3000:]}")
        return out

    def base_env(self, model: Path, threads: int) -> dict[str, str]:
        env = {k: v for k, v in os.environ.items() if not k.startswith("FLEET_")}
        env.update(self.services.endpoints.env())
        env.update(
            FLEET_MODEL=str(model),
            FLEET_MODEL_NAME="medium",
            FLEET_DEVICE="cpu",
            FLEET_TORCH_THREADS=str(threads),
            FLEET_LOCAL_FILES_ONLY="true",
            FLEET_SPOOL_DIR=str(self.run_dir / "spool"),
            HF_HUB_OFFLINE="1",
            PYTHONUNBUFFERED="1",
            TOKENIZERS_PARALLELISM="false",
        )
        return env

    def client(self, queue: str) -> Any:
        from fleet.settings import ProducerSettings
        from producer.client import Client

        env = self.services.endpoints.env()
        kwargs = {k.removeprefix("FLEET_").lower(): v for k, v in env.items()}
        kwargs["queue"] = queue
        c = Client(ProducerSettings(_env_file=None, **kwargs))
        self.clients.append(c)
        return c

    def start(self) -> None:
        from fleet.localdev import LocalServices

        log(f"run directory {self.run_dir}")
        model = self.model_dir()
        self.services = LocalServices()
        self.services.start()
        log("redis and seaweedfs up")
        env2 = self.base_env(model, 2)
        env1 = self.base_env(model, 1)
        env_t = env2 if self.threads == 2 else env1
        noop_env = {k: v for k, v in env1.items() if k not in ("FLEET_MODEL", "FLEET_MODEL_NAME")}
        noop_env["FLEET_WARMUP"] = "false"
        self.w_one = Worker("one-2threads", Q_ONE, env2, self.run_dir)
        self.w_b1 = Worker("two-a-1thread", f"{Q_TWO},{Q_TWO}.a", env1, self.run_dir)
        self.w_b2 = Worker("two-b-1thread", f"{Q_TWO},{Q_TWO}.b", env1, self.run_dir)
        self.noop = NoopWorker(noop_env, self.run_dir)
        # Overlapped worker: threads pool with two jobs in flight; one thread owns the
        # pipeline, the other stores the previous job (docs/batching.md).
        self.w_ovl = Worker("overlap", Q_OVL, env_t, self.run_dir, pool="threads", concurrency=2)
        self.w_batch = {
            size: Worker(
                f"batch{size}",
                Q_BATCH.format(size=size),
                {**env2, "FLEET_BATCH_SIZE": str(size)},
                self.run_dir,
                pool="threads",
                concurrency=2 * size,
            )
            for size in self.batch_sizes
        }
        self.pipe = PipelineProc(env_t, self.run_dir)
        workers = [self.w_one, self.w_b1, self.w_b2, self.noop, self.w_ovl,
                   *self.w_batch.values()]  # fmt: skip
        for p in workers:
            self.procs.append(p)
            p.start()
        self.procs.append(self.pipe)
        self.pipe.start_pipe()
        self.c_one = self.client(Q_ONE)
        self.c_two = self.client(Q_TWO)
        self.c_b1 = self.client(f"{Q_TWO}.a")
        self.c_b2 = self.client(f"{Q_TWO}.b")
        self.c_ovl = self.client(Q_OVL)
        self.c_batch = {size: self.client(Q_BATCH.format(size=size)) for size in self.batch_sizes}
        # --threads 1: the fleet-efficiency worker is a one-thread worker (its own queue).
        self.c_eff = self.c_one if self.threads == 2 else self.c_b1
        wait_ready(self.c_one.celery, workers, 180)
        setup = self.pipe.call(300, op="setup")
        log(f"workers ready; bare pipeline loaded in {setup['load_s']:.1f} s")
        self.pipeline_threads = setup["torch_threads"]
        # Scale-out reference without the fleet: two bare one-thread pipeline processes at once
        # vs the bare two-thread one above (only when that one has two threads).
        self.bare: list[PipelineProc] = []
        if self.threads == 2:
            self.bare = [
                PipelineProc(env1, self.run_dir, "bare-a-1thread"),
                PipelineProc(env1, self.run_dir, "bare-b-1thread"),
            ]
            for p in self.bare:
                self.procs.append(p)
                p.start_pipe()
                p.send(op="setup")
            for p in self.bare:
                p.receive(300)

    def warm_up(self) -> None:
        """Warm-up jobs on every worker and the bare pipeline (not timed), never more torch
        threads at once than cores: two-thread OpenMP teams sharing 2 cores spin at their
        barriers and slow down many times over (a first job took 60 s instead of 1 s)."""

        def on_workers(*clients: Any) -> None:
            warm = []
            for c in clients:
                specs = job_specs(self.warmup, self.size, self.steps, seed0=1, tag="warm")
                warm += [h.job_id for h in c.submit_many(specs)]
            wait_results(self.c_one, warm, 600)

        began = time.monotonic()
        on_workers(self.c_b1, self.c_b2)  # one thread each
        on_workers(self.c_one)  # two threads
        on_workers(self.c_ovl)
        for size, c in self.c_batch.items():  # a full batch of the batching figure's shape
            specs = job_specs(size, 64, self.steps, seed0=1, tag="warm")
            wait_results(c, [h.job_id for h in c.submit_many(specs)], 600)
        self.pipe.call(600, op="loop", n=self.warmup, size=self.size, steps=self.steps, seed0=1)
        if self.bare:
            bare_pair_run(self.bare, 2 * self.warmup, self.size, self.steps, 0)
        # the batching reference runs at 64 px with batches of 1 and up: warm those shapes too
        for images in (1, *self.batch_sizes):
            self.pipe.call(600, op="loop", n=1, size=64, steps=self.steps, seed0=1, images=images)
        log(f"warm-up done in {time.monotonic() - began:.1f} s")

    # -- figures ----------------------------------------------------------------------------

    def throughput(self) -> tuple[dict[str, Any], dict[str, Any], dict[str, Any]]:
        """Per run, each side of a ratio is measured around the other (ABBA): the in-process
        loop runs half its N images before the fleet run and half after, and the two-worker
        run likewise around those, so a steady drift in machine speed cancels out."""
        runs: list[dict[str, Any]] = []
        timeout = 60 + 20 * self.n
        h1 = self.n // 2
        h2 = self.n - h1
        if self.threads == 2:
            plan = [("two", 0, h1), ("bare2", 0, h1), ("inproc", 0, h1), ("fleet", 0, self.n),
                    ("overlap", 0, self.n), ("inproc", h1, h2), ("bare2", h1, h2),
                    ("two", h1, h2)]  # fmt: skip
        else:
            plan = [("inproc", 0, h1), ("fleet", 0, self.n), ("overlap", 0, self.n),
                    ("inproc", h1, h2), ("two", 0, h1), ("one2", 0, self.n),
                    ("two", h1, h2)]  # fmt: skip
        clients = {"fleet": self.c_eff, "overlap": self.c_ovl, "one2": self.c_one,
                   "two": self.c_two}  # fmt: skip
        for rep in range(self.repeats):
            parts: dict[str, list[dict[str, Any]]] = {}
            # the two fleet-efficiency workers take turns being nearer the first in-process half
            fleet_at = next(i for i, step in enumerate(plan) if step[0] == "fleet")
            order = list(plan)
            if rep % 2:
                order[fleet_at], order[fleet_at + 1] = order[fleet_at + 1], order[fleet_at]
            for what, offset, n in order:
                with CpuWatch() as watch:
                    if what == "inproc":
                        part = inproc_run(self.pipe, n, self.size, self.steps, offset)
                    elif what == "bare2":
                        part = bare_pair_run(self.bare, n, self.size, self.steps, offset)
                    else:
                        specs = job_specs(n, self.size, self.steps, tag=what, offset=offset)
                        part = fleet_run(clients[what], specs, timeout)
                part["other_cpu"], part["steal"] = watch.foreign, watch.steal
                parts.setdefault(what, []).append(part)
            row: dict[str, Any] = {what: combine(p) for what, p in parts.items()}
            row["parts"] = parts
            one2 = row["fleet"] if self.threads == 2 else row["one2"]
            row["efficiency"] = row["fleet"]["images_per_s"] / row["inproc"]["images_per_s"]
            row["overlap_efficiency"] = (
                row["overlap"]["images_per_s"] / row["inproc"]["images_per_s"]
            )
            row["scale_out"] = row["two"]["images_per_s"] / one2["images_per_s"]
            if "bare2" in row:
                row["bare_scale"] = row["bare2"]["images_per_s"] / row["inproc"]["images_per_s"]
            runs.append(row)
            log(
                f"run {rep + 1}/{self.repeats}: in-process "
                f"{row['inproc']['images_per_s']:.3f} img/s, fleet "
                f"{row['fleet']['images_per_s']:.3f} img/s (x{row['efficiency']:.3f}), "
                f"overlapped {row['overlap']['images_per_s']:.3f} img/s "
                f"(x{row['overlap_efficiency']:.3f}), two "
                f"workers {row['two']['images_per_s']:.3f} img/s (x{row['scale_out']:.3f} of one "
                "2-thread worker"
                + (f"; bare processes x{row['bare_scale']:.3f})" if "bare_scale" in row else ")")
            )
        all_parts = [p for r in runs for ps in r["parts"].values() for p in ps]
        self.other_cpu["throughput"] = [p["other_cpu"] for p in all_parts]
        self.steal["throughput"] = [p["steal"] for p in all_parts]
        efficiency = self.efficiency_figure(runs, "fleet", "efficiency")
        efficiency["worker"] = "prefork pool, one child (the default worker)"
        overlapped = self.efficiency_figure(runs, "overlap", "overlap_efficiency", stages=False)
        overlapped["worker"] = (
            "threads pool, --concurrency 2, FLEET_BATCH_SIZE=1: one thread generates while the "
            "other stores the previous job"
        )
        scale = [r["scale_out"] for r in runs]
        two_nodes: Counter[str] = Counter()
        for r in runs:
            two_nodes.update(r["two"]["jobs_per_node"])
        one_key = "fleet" if self.threads == 2 else "one2"
        scale_out = {
            "value": median(scale),
            "unit": "ratio (2 workers x 1 thread images/s / 1 worker x 2 threads images/s)",
            "two_workers_images_per_s": median([r["two"]["images_per_s"] for r in runs]),
            "one_worker_images_per_s": median([r[one_key]["images_per_s"] for r in runs]),
            "two_workers_generate_ms": 1000 * median([r["two"]["generate_s"] for r in runs]),
            "one_worker_generate_ms": 1000 * median([r[one_key]["generate_s"] for r in runs]),
            "jobs_per_worker": dict(two_nodes),
            "runs": [round(x, 4) for x in scale],
            "spread": round(spread(scale), 4),
            "jobs": self.n,
        }
        bare = [r["bare_scale"] for r in runs if "bare_scale" in r]
        if bare:
            scale_out["bare_reference"] = {
                "what": "the same jobs through two bare one-thread pipeline processes at once "
                "vs the bare two-thread in-process loop, measured in the same runs (no fleet)",
                "value": median(bare),
                "two_processes_images_per_s": median([r["bare2"]["images_per_s"] for r in runs]),
                "one_process_images_per_s": median([r["inproc"]["images_per_s"] for r in runs]),
                "generate_ms": 1000 * median([r["bare2"]["per_call_s"] for r in runs]),
                "runs": [round(x, 4) for x in bare],
            }
            scale_out["fleet_share_of_bare"] = median(scale) / median(bare)
        return efficiency, overlapped, scale_out

    def efficiency_figure(
        self, runs: list[dict[str, Any]], key: str, ratio: str, stages: bool = True
    ) -> dict:  # type: ignore[type-arg]
        """Fleet efficiency of the worker measured under ``key`` in each run. ``stages``: the
        worker runs one job at a time, so its per-job total splits into diffusion, storing
        and hand-off (not so when jobs overlap: their totals include waiting for the pipeline)."""
        eff = [r[ratio] for r in runs]
        per_job_fleet = median([r[key]["seconds"] / self.n for r in runs])
        per_job_inproc = median([r["inproc"]["seconds"] / self.n for r in runs])
        gen_worker = median([r[key]["generate_s"] for r in runs])
        gen_inproc = median([r["inproc"]["per_call_s"] for r in runs])
        total_worker = median([r[key]["total_s"] for r in runs])
        upload = median([r[key]["upload_s"] for r in runs])
        per_job_ms = {
            "fleet_wall": 1000 * per_job_fleet,
            "in_process_wall": 1000 * per_job_inproc,
            "extra": 1000 * (per_job_fleet - per_job_inproc),
            "worker_generate": 1000 * gen_worker,
            "in_process_generate": 1000 * gen_inproc,
            "slower_generate_in_worker": 1000 * (gen_worker - gen_inproc),
            "worker_upload": 1000 * upload,
        }
        if stages:
            per_job_ms["worker_store_and_png"] = 1000 * (total_worker - gen_worker)
            per_job_ms["dispatch_and_result"] = 1000 * (per_job_fleet - total_worker)
        return {
            "value": median(eff),
            "unit": "ratio (fleet images/s / in-process images/s)",
            "fleet_images_per_s": median([r[key]["images_per_s"] for r in runs]),
            "in_process_images_per_s": median([r["inproc"]["images_per_s"] for r in runs]),
            "runs": [round(x, 4) for x in eff],
            "spread": round(spread(eff), 4),
            "fleet_runs_images_per_s": [round(r[key]["images_per_s"], 4) for r in runs],
            "in_process_runs_images_per_s": [round(r["inproc"]["images_per_s"], 4) for r in runs],
            "per_job_ms": per_job_ms,
            "jobs": self.n,
            "warmup_jobs": self.warmup,
            "torch_threads": self.threads,
            "pipeline_torch_threads": self.pipeline_threads,
        }

    def batching(self) -> dict[str, Any]:
        """N compatible jobs (64 px) queued at once: each batch worker vs the default worker
        (batching off), measured as off-half, batch workers, off-half (ABBA); plus the bare
        pipeline's own gain from images=B in one call, as a reference."""
        n, size = self.batch_jobs, 64
        h1 = n // 2
        off_rates: list[float] = []
        rates: dict[int, list[float]] = {b: [] for b in self.batch_sizes}
        gains: dict[int, list[float]] = {b: [] for b in self.batch_sizes}
        batch_sizes: dict[int, Counter[int]] = {b: Counter() for b in self.batch_sizes}
        timeout = 60 + 5 * n
        for rep in range(self.batch_repeats):
            first = fleet_run(self.c_one, job_specs(n, size, self.steps, tag="boff")[:h1], timeout)
            sizes = list(self.batch_sizes) if rep % 2 == 0 else list(reversed(self.batch_sizes))
            on: dict[int, dict[str, Any]] = {}
            for b in sizes:
                on[b] = fleet_run(self.c_batch[b], job_specs(n, size, self.steps, tag=f"b{b}"),
                                  timeout)  # fmt: skip
                batch_sizes[b].update(on[b]["batch_jobs"])
            specs = job_specs(n, size, self.steps, tag="boff", offset=h1)
            second = fleet_run(self.c_one, specs, timeout)
            off = combine([first, second])["images_per_s"]
            off_rates.append(off)
            for b in self.batch_sizes:
                rates[b].append(n / on[b]["seconds"])
                gains[b].append(rates[b][-1] / off)
            log(
                f"batching run {rep + 1}/{self.batch_repeats}: off {off:.2f} img/s; "
                + ", ".join(
                    f"batch {b} {rates[b][-1]:.2f} img/s (x{gains[b][-1]:.2f})"
                    for b in self.batch_sizes
                )
            )
        bare: dict[int, list[float]] = {b: [] for b in self.batch_sizes}
        bare_one: list[float] = []
        for _ in range(self.batch_repeats):
            big = max(self.batch_sizes)
            one = self.pipe.call(600, op="loop", n=big, size=size, steps=self.steps, seed0=5,
                                 images=1)  # fmt: skip
            bare_one.append(big / one["seconds"])
            for b in self.batch_sizes:
                many = self.pipe.call(600, op="loop", n=big // b, size=size, steps=self.steps,
                                      seed0=5, images=b)  # fmt: skip
                bare[b].append((big / many["seconds"]) / bare_one[-1])
        main = self.batch_sizes[0]
        per_size = {
            str(b): {
                "gain": median(gains[b]),
                "images_per_s": median(rates[b]),
                "runs": [round(x, 4) for x in gains[b]],
                "jobs_by_call_size": {str(k): v for k, v in sorted(batch_sizes[b].items())},
                "bare_pipeline_gain": median(bare[b]),
            }
            for b in self.batch_sizes
        }
        log(
            "batching gain: "
            + ", ".join(
                f"batch {b} x{per_size[str(b)]['gain']:.2f} (bare pipeline "
                f"x{per_size[str(b)]['bare_pipeline_gain']:.2f})"
                for b in self.batch_sizes
            )
        )
        return {
            "value": median(gains[main]),
            "unit": f"ratio (batch worker, FLEET_BATCH_SIZE={main}, images/s / default worker "
            "images/s)",
            "batch_size": main,
            "jobs": n,
            "size_px": size,
            "steps": self.steps,
            "off_images_per_s": median(off_rates),
            "on_images_per_s": median(rates[main]),
            "runs": [round(x, 4) for x in gains[main]],
            "spread": round(spread(gains[main]), 4),
            "by_batch_size": per_size,
            "worker_on": f"--pool threads --concurrency 2 x B, FLEET_BATCH_SIZE=B, "
            f"FLEET_TORCH_THREADS=2 (B = {', '.join(str(b) for b in self.batch_sizes)})",
            "worker_off": "the default worker: --pool prefork --concurrency 1, "
            "FLEET_TORCH_THREADS=2",
            "reference_bare_pipeline": {
                "what": "Engine.generate with images=B in one call vs images=1 B times; "
                "64 px, 20 steps, medium model, one process",
                "batch1_images_per_s": median(bare_one),
                "gain_by_batch_size": {str(b): median(bare[b]) for b in self.batch_sizes},
                "torch_threads": self.pipeline_threads,
            },
        }

    def idle_latency(self) -> dict[str, Any]:
        r = self.c_one.redis
        backend = self.c_one.celery.backend
        fleet_started, fleet_done, noop_rt, noop_started = [], [], [], []
        for i in range(self.latency_samples):
            time.sleep(0.5)  # the fleet is idle: nothing queued, every worker waiting
            spec = job_specs(1, 64, 2, seed0=50 + i, tag="latency")[0]
            key = _text(backend.get_key_for_task(spec.job_id))
            t = pubsub_timing(r, key, lambda s=spec: self.c_one.submit(s), 120)
            fleet_started.append(t["started_s"])
            fleet_done.append(t["done_s"])
            time.sleep(0.5)
            task_id = f"bench-noop-{uuid.uuid4().hex}"
            key = _text(backend.get_key_for_task(task_id))

            def send(task_id: str = task_id) -> None:
                self.c_one.celery.send_task(NOOP_TASK, queue=NOOP_QUEUE, task_id=task_id)

            t = pubsub_timing(r, key, send, 60)
            noop_rt.append(t["done_s"])
            noop_started.append(t["started_s"])
        if any(x is None for x in fleet_started + noop_started):
            raise RuntimeError("a STARTED state was not published (task_track_started off?)")
        ratios = [f / n for f, n in zip(fleet_started, noop_rt, strict=True)]
        log(
            f"idle latency: submit -> started {1000 * median(fleet_started):.1f} ms, trivial "
            f"task round trip {1000 * median(noop_rt):.1f} ms"
        )
        return {
            "value": median(fleet_started) / median(noop_rt),
            "unit": "ratio (fleet submit->STARTED / trivial task submit->SUCCESS)",
            "fleet_submit_to_started_ms": 1000 * median(fleet_started),
            "trivial_round_trip_ms": 1000 * median(noop_rt),
            "trivial_submit_to_started_ms": 1000 * median(noop_started),
            "fleet_submit_to_done_ms": 1000 * median(fleet_done),
            "runs": [round(x, 4) for x in ratios],
            "samples": self.latency_samples,
            "job": "64x64, 2 steps, medium model, on the idle 2-thread worker",
        }

    def bulk(self) -> dict[str, Any]:
        from fleet import contract
        from fleet.contract import JobSpec
        from producer.bulk import submit_bulk

        def specs(tag: str) -> list[JobSpec]:
            run = uuid.uuid4().hex[:8]
            return [
                JobSpec(
                    job_id=f"bench-{tag}-{run}-{i:05d}",
                    prompt=PROMPTS[i % len(PROMPTS)],
                    width=64,
                    height=64,
                    steps=2,
                    seed=i,
                )
                for i in range(self.bulk_n)
            ]

        keys = contract.queue_keys(Q_BULK)  # one Redis list per priority step
        stamp = "submitted_at" in JobSpec.model_fields  # what Client._enqueue sends

        def drain(c: Any, jobs: list[JobSpec]) -> dict[str, Any]:
            count = sum(int(c.redis.llen(k)) for k in keys)
            if count != len(jobs):
                raise RuntimeError(f"{count} messages in {Q_BULK}, expected {len(jobs)}")
            first = next(k for k in keys if c.redis.llen(k))
            sample = json.loads(c.redis.lindex(first, -1))  # the first one sent
            c.redis.delete(*keys)
            with c.redis.pipeline(transaction=False) as pipe:
                for s in jobs:
                    pipe.delete(contract.CLAIM_KEY.format(job_id=s.job_id))
                pipe.execute()
            return sample

        def one_by_one(jobs: list[JobSpec]) -> tuple[float, dict[str, Any]]:
            c = self.client(Q_BULK)  # fresh: send_task subscribes each task's result channel
            settings = c.settings
            began = time.perf_counter()
            for s in jobs:
                soft, hard = contract.time_limits(
                    s, settings.job_time_base_s, settings.job_time_per_mpx_step_s
                )
                job = s.model_dump(mode="json")
                if stamp:
                    job["submitted_at"] = time.time()
                c.celery.send_task(
                    contract.TASK_GENERATE,
                    kwargs={"job": job},
                    queue=Q_BULK,
                    task_id=s.job_id,
                    soft_time_limit=soft,
                    time_limit=hard,
                    expires=None,
                    priority=contract.celery_priority(contract.DEFAULT_PRIORITY),
                )
            seconds = time.perf_counter() - began
            sample = drain(c, jobs)
            c.close()
            return len(jobs) / seconds, sample

        def submit_each(jobs: list[JobSpec]) -> float:
            c = self.client(Q_BULK)
            began = time.perf_counter()
            for s in jobs:
                c.submit(s)
            seconds = time.perf_counter() - began
            drain(c, jobs)
            c.close()
            return len(jobs) / seconds

        def in_bulk(jobs: list[JobSpec]) -> tuple[float, dict[str, Any]]:
            c = self.client(Q_BULK)
            began = time.perf_counter()
            handles = submit_bulk(c, jobs)
            seconds = time.perf_counter() - began
            if any(h.duplicate for h in handles) or len(handles) != len(jobs):
                raise RuntimeError("bulk submit reported duplicates for fresh ids")
            sample = drain(c, jobs)
            c.close()
            return len(jobs) / seconds, sample

        ratios, bulk_rates, single_rates, submit_rates = [], [], [], []
        same_headers = True
        for rep in range(self.bulk_repeats):
            first, second = specs("one"), specs("bulk")
            if rep % 2 == 0:
                single, s1 = one_by_one(first)
                rate, s2 = in_bulk(second)
            else:
                rate, s2 = in_bulk(second)
                single, s1 = one_by_one(first)
            submit_rates.append(submit_each(specs("submit")))
            same_headers &= _same_message(s1, s2, first[0].job_id, second[0].job_id)
            bulk_rates.append(rate)
            single_rates.append(single)
            ratios.append(rate / single)
            log(
                f"bulk enqueue run {rep + 1}/{self.bulk_repeats}: bulk {rate:,.0f} jobs/s, "
                f"one by one {single:,.0f} jobs/s (x{rate / single:.2f}); client.submit each "
                f"{submit_rates[-1]:,.0f} jobs/s"
            )
        if not same_headers:
            raise RuntimeError("bulk and send_task messages differ (see the bench log)")
        return {
            "value": median(ratios),
            "unit": "ratio (submit_bulk jobs/s / one-by-one send_task jobs/s)",
            "bulk_jobs_per_s": median(bulk_rates),
            "one_by_one_jobs_per_s": median(single_rates),
            "client_submit_each_jobs_per_s": median(submit_rates),
            "bulk_vs_client_submit_each": median(bulk_rates) / median(submit_rates),
            "jobs": self.bulk_n,
            "runs": [round(x, 4) for x in ratios],
            "messages_identical_but_ids": same_headers,
            "how": (
                f"{self.bulk_n} real Celery messages per run onto queue {Q_BULK!r} (default "
                "priority 5), which no worker consumes; after each timed run the bench counts "
                "them with LLEN over the queue's priority lists (must equal the jobs sent), "
                "compares the first message of each method (same headers, properties and body "
                "apart from the job id, delivery tag and reply-to), then purges the queue "
                "(DEL) and the job-id claims. Only enqueueing is timed. One "
                "by one: client.celery.send_task per job with the arguments Client._enqueue "
                "uses (no claim); bulk: producer.bulk.submit_bulk (validation and claims "
                "included); client.submit each: validation + claim + send_task per job."
            ),
        }

    # -- the whole run ----------------------------------------------------------------------

    def run(self) -> dict[str, Any]:
        started_at = datetime.now(timezone.utc)
        began = time.monotonic()
        busy_before = cpu_busy(2.0)
        load_before = loadavg()
        log(f"machine busy before start: {busy_before} of all CPUs; load {load_before}")
        self.start()
        self.warm_up()
        efficiency, overlapped, scale_out = self.throughput()
        with CpuWatch() as watch:
            batching = self.batching()
        self.other_cpu["batching"] = [watch.foreign]
        self.steal["batching"] = [watch.steal]
        with CpuWatch() as watch:
            latency = self.idle_latency()
        self.other_cpu["idle_latency"] = [watch.foreign]
        self.steal["idle_latency"] = [watch.steal]
        with CpuWatch() as watch:
            bulk = self.bulk()
        self.other_cpu["bulk_enqueue"] = [watch.foreign]
        self.steal["bulk_enqueue"] = [watch.steal]
        load_after = loadavg()
        figures = {
            "fleet_efficiency": efficiency,
            "fleet_efficiency_overlapped": overlapped,
            "batching_gain": batching,
            "scale_out": scale_out,
            "bulk_enqueue": bulk,
            "idle_latency": latency,
        }
        for name, fig in figures.items():
            goal = GOALS[name]
            fig["goal"] = goal["text"]
            fig["goal_value"] = goal["value"]
            value = fig.get("value")
            if goal["op"] is None or value is None:
                fig["met"] = None
            elif goal["op"] == ">=":
                fig["met"] = bool(value >= goal["value"])
            else:
                fig["met"] = bool(value <= goal["value"])
            fig["interval90"] = interval90(fig.get("runs") or [])
            band = fig["interval90"]
            # The goal inside the interval: the runs cannot tell met from missed.
            fig["within_noise"] = bool(band and goal["value"] and band[0] < goal["value"] < band[1])
        return {
            "schema": 1,
            "created": started_at.isoformat(timespec="seconds"),
            "mode": "quick" if self.quick else "full",
            "command": " ".join(["scripts/bench", *sys.argv[1:]]),
            "duration_s": round(time.monotonic() - began, 1),
            "machine": {
                "cpu_model": cpu_model(),
                "cores": os.cpu_count(),
                "platform": platform.platform(),
                "cpu_busy_before_start": busy_before,
                "other_processes_cpu_share": _summary(self.other_cpu),
                "steal_share": _summary(self.steal),
                "loadavg_before": load_before,
                "loadavg_after": load_after,
            },
            "versions": versions(),
            "settings": {
                "model": "medium (worker.testmodel random weights, REPO/.models/medium)",
                "size_px": self.size,
                "steps": self.steps,
                "torch_threads_efficiency": self.threads,
                "jobs_per_run": self.n,
                "repeats": self.repeats,
                "warmup_jobs_per_worker": self.warmup,
                "bulk_jobs": self.bulk_n,
                "bulk_repeats": self.bulk_repeats,
                "latency_samples": self.latency_samples,
                "batching_jobs": self.batch_jobs,
                "batching_repeats": self.batch_repeats,
                "batch_sizes": list(self.batch_sizes),
                "device": "cpu",
            },
            "figures": figures,
            "goals": {
                name: {"goal": fig["goal"], "value": fig.get("value"), "met": fig["met"]}
                for name, fig in figures.items()
            },
            "notes": self.notes,
        }

    def close(self, keep_dir: bool) -> None:
        for c in self.clients:
            with contextlib.suppress(Exception):
                c.close()
        threads = [threading.Thread(target=p.stop) for p in self.procs]
        for t in threads:
            t.start()
        for t in threads:
            t.join(60)
        if self.services is not None:
            with contextlib.suppress(Exception):
                self.services.s3.kill()  # its data is thrown away: no need for a slow stop
            with contextlib.suppress(Exception):
                self.services.stop()
        if keep_dir:
            log(f"logs kept in {self.run_dir}")
        else:
            shutil.rmtree(self.run_dir, ignore_errors=True)


def _summary(per_phase: dict[str, list[float | None]]) -> dict[str, dict[str, float | None]]:
    out: dict[str, dict[str, float | None]] = {}
    for phase, values in per_phase.items():
        known = [x for x in values if x is not None]
        out[phase] = {
            "median": median(known) if known else None,
            "max": max(known) if known else None,
        }
    return out


def _text(value: str | bytes) -> str:
    return value.decode() if isinstance(value, bytes) else value


def _same_message(a: dict, b: dict, id_a: str, id_b: str) -> bool:  # type: ignore[type-arg]
    def norm(msg: dict, job_id: str) -> dict:  # type: ignore[type-arg]
        body = json.loads(base64.b64decode(msg["body"]))
        with contextlib.suppress(LookupError, TypeError, AttributeError):
            body[1]["job"]["submitted_at"] = bool(body[1]["job"]["submitted_at"])  # a time
        msg = {**msg, "body": body}
        out = json.loads(json.dumps(msg).replace(job_id, "<id>"))
        with contextlib.suppress(LookupError, TypeError):  # kwargsrepr shows the time too
            out["headers"]["kwargsrepr"] = out["headers"]["kwargsrepr"].split("'submitted_at'")[0]
        out["properties"].pop("delivery_tag", None)
        out["properties"].pop("reply_to", None)  # per Celery app: each method has its client
        return out  # type: ignore[no-any-return]

    same = norm(a, id_a) == norm(b, id_b)
    if not same:
        log(f"messages differ:\n{json.dumps(a)[:1500]}\n{json.dumps(b)[:1500]}")
    return same


# =============================================================================================
# Report.


def _fmt(x: Any, digits: int = 3) -> str:
    if x is None:
        return "—"
    if isinstance(x, float):
        return f"{x:,.{digits}f}"
    return str(x)


def _met(fig: dict[str, Any]) -> str:
    met = fig.get("met")
    if met is None:
        return "n/a"
    text = "met" if met else "**MISSED**"
    band = fig.get("interval90")
    if band:
        text += f" (90% interval {band[0]:g}–{band[1]:g}"
        text += ", goal inside: within noise)" if fig.get("within_noise") else ")"
    return text


def explain_misses(res: dict[str, Any]) -> list[str]:
    f = res["figures"]
    out: list[str] = []
    share = res["machine"].get("other_processes_cpu_share", {}).get("throughput", {})
    other = share.get("median")
    busy_text = (
        f" Other processes on this machine used a median {100 * other:.0f}% of all CPUs during "
        "these runs, taken from the same cores as the measured work."
        if other is not None and other > 0.05
        else ""
    )
    e = f["fleet_efficiency"]
    if e["met"] is False:
        p = e["per_job_ms"]
        fixed = p["worker_store_and_png"] + p["dispatch_and_result"]
        image = p["in_process_generate"]
        extra = p["slower_generate_in_worker"]
        ceiling = image / (image + fixed) if image + fixed > 0 else 0.0
        text = (
            f"**Fleet efficiency {e['value']:.3f} (goal {e['goal']}).** The fleet does fixed "
            f"work per job that the in-process loop does not: PNG encoding with the recipe, "
            f"S3 uploads of the image and the manifest and the failure-index cleanup "
            f"({p['worker_store_and_png']:.0f} ms, uploads alone {p['worker_upload']:.0f} ms), "
            f"then the task's Celery bookkeeping (delivery count, states, progress, result, "
            f"acknowledgement) and the hand-off of the next message "
            f"({p['dispatch_and_result']:.0f} ms): {fixed:.0f} ms per job, not overlapped with "
            f"the diffusion (a worker generates, stores, then takes the next job). Against a "
            f"{image:.0f} ms image (the 128 px random-weight test model) that alone caps the "
            f"ratio near {ceiling:.3f} at equal diffusion speed; the goal leaves "
            f"{0.02 * image / 0.98:.0f} ms per job. "
            "With real models (seconds per image) the same fixed cost is well under 2%. The "
            "overlapped worker (next row) takes this work off the generation's path; batching "
            "shares it out over several images."
        )
        if extra > 0.02 * image:
            text += (
                f" On top of that the diffusion itself ran {extra:.0f} ms per image slower in "
                f"the worker ({p['worker_generate']:.0f} vs {image:.0f} ms in process). The "
                f"likely reason: with FLEET_TORCH_THREADS={e['torch_threads']} on "
                f"{res['machine']['cores']} cores, torch's OpenMP threads wait for each other "
                "at every parallel step, so whenever "
                "another process runs (the worker's Celery parent with its events and "
                "heartbeats, SeaweedFS and Redis serving the uploads and results, the client's "
                "result listener) the thread it preempts holds the other one up; the in-process "
                "loop has no such neighbours."
                if e["torch_threads"] > 1
                else f" On top of that the diffusion itself ran {extra:.0f} ms per image slower "
                f"in the worker ({p['worker_generate']:.0f} vs {image:.0f} ms in process)."
            )
        elif extra < -0.02 * image:
            text += (
                f" (The diffusion ran {-extra:.0f} ms per image faster in the worker than in "
                "process in these runs: the machine's speed drifts, see Noise.)"
            )
        text += (
            " The ratio is the median of per-run ratios; the per-job figures are medians of "
            "each quantity over the runs." + busy_text
        )
        out.append(text)
    ov = f.get("fleet_efficiency_overlapped")
    if ov and ov["met"] is False:
        p = ov["per_job_ms"]
        hidden = p["fleet_wall"] - p["worker_generate"]
        slower = p["slower_generate_in_worker"]
        out.append(
            f"**Fleet efficiency, overlapped worker {ov['value']:.3f} (goal {ov['goal']}).** "
            f"The overlap itself works: per job the fleet took {p['fleet_wall']:.0f} ms of wall "
            f"time for {p['worker_generate']:.0f} ms of diffusion ({hidden:+.0f} ms: storing "
            "and Celery's bookkeeping run while the next job generates). What is left is the "
            f"diffusion itself, {slower:+.0f} ms per image against the same call in process "
            f"({p['worker_generate']:.0f} vs {p['in_process_generate']:.0f} ms): the storing "
            "thread's Python work (botocore, PNG, JSON, Celery) holds the interpreter lock "
            "that the generating thread needs between torch operations, and on this machine "
            f"it also takes CPU from torch's {ov['torch_threads']} thread(s) on "
            f"{res['machine']['cores']} cores. On a GPU worker the CPU is free while the GPU "
            "computes, which is the case this mode is for." + busy_text
        )
    bg = f.get("batching_gain")
    if bg and bg["met"] is False:
        main = bg["by_batch_size"][str(bg["batch_size"])]
        out.append(
            f"**Batching gain {bg['value']:.2f} (goal {bg['goal']}).** The bare pipeline "
            f"itself gained x{main['bare_pipeline_gain']:.2f} from images={bg['batch_size']} "
            "in one call in the same run; the batch worker adds per job what the default "
            "worker adds (PNG, S3, Celery), and on 2 cores that work competes with torch "
            "for the CPU." + busy_text
        )
    s = f["scale_out"]
    ref = s.get("bare_reference")
    bare_text = ""
    if ref:
        bare_text = (
            f" Without the fleet, in the same runs, two bare one-thread pipeline processes "
            f"made x{ref['value']:.2f} the images/s of one bare two-thread process (each image "
            f"{ref['generate_ms']:.0f} ms when both run at once); the fleet reaches "
            f"{100 * s['fleet_share_of_bare']:.0f}% of that bare ratio."
        )
        if ref["value"] < s["goal_value"]:
            bare_text += (
                " So during this run the machine itself did not give two one-thread "
                "processes the speed-up the goal assumes (2.17x measured earlier): two "
                "computing processes slowed each other down on these two vCPUs (likely shared "
                "host resources of the VM), which no fleet setting can win back"
            )
            if s["fleet_share_of_bare"] < 0.995:
                bare_text += (
                    "; the remaining "
                    f"{100 * (1 - s['fleet_share_of_bare']):.0f}% is the fleet's own per-job "
                    "work (storing, Celery, SeaweedFS and Redis) on two cores that torch "
                    "already keeps busy."
                )
            else:
                bare_text += "."
        else:
            bare_text += (
                " The machine allowed the goal here, so the difference is the fleet's own "
                "per-job work (storing, Celery, S3 and Redis on the same two cores)."
            )
    if s["met"] is False:
        out.append(
            f"**Scale-out {s['value']:.3f} (goal {s['goal']}).** Two one-thread workers made "
            f"{s['two_workers_images_per_s']:.3f} images/s, one two-thread worker "
            f"{s['one_worker_images_per_s']:.3f}; per-job diffusion took "
            f"{s['two_workers_generate_ms']:.0f} ms in each one-thread worker vs "
            f"{s['one_worker_generate_ms']:.0f} ms with two threads. With both cores busy "
            "with torch, every other process (the workers' Celery parents, SeaweedFS, Redis, "
            "the bench) takes its CPU from the diffusion." + bare_text + busy_text
        )
    b = f["bulk_enqueue"]
    if b["met"] is False:
        out.append(
            f"**Bulk enqueue {b['value']:.2f}x (goal {b['goal']}).** Bulk "
            f"{b['bulk_jobs_per_s']:,.0f} jobs/s vs one by one {b['one_by_one_jobs_per_s']:,.0f} "
            "jobs/s. Per message the bulk path still pays validation, Celery's message "
            "building and JSON/base64 encoding in Python on one core." + busy_text
        )
    lat = f["idle_latency"]
    if lat["met"] is False:
        out.append(
            f"**Idle latency {lat['value']:.2f}x (goal {lat['goal']}).** Submit -> STARTED "
            f"{lat['fleet_submit_to_started_ms']:.1f} ms vs a trivial task's round trip "
            f"{lat['trivial_round_trip_ms']:.1f} ms; the fleet's submit validates and claims "
            "the job id (one Redis round trip) before sending." + busy_text
        )
    return out


def noise_notes(res: dict[str, Any]) -> list[str]:
    notes = []
    m = res["machine"]
    busy = m.get("cpu_busy_before_start")
    if busy is not None and busy > 0.15:
        notes.append(
            f"The machine was not idle: {100 * busy:.0f}% of all CPUs were busy before the "
            f"bench started (load average {m['loadavg_before']} before, {m['loadavg_after']} "
            "after)."
        )
    for phase, share in m.get("other_processes_cpu_share", {}).items():
        top = share.get("max")
        if top is not None and top > 0.05:
            notes.append(
                f"During the {phase.replace('_', ' ')} measurements, processes other than the "
                f"bench's own used up to {100 * top:.0f}% (median "
                f"{100 * (share.get('median') or 0):.0f}%) of all CPUs: they compete with the "
                "measured work on the same cores, so those figures are noisier than on an idle "
                "machine."
            )
    for phase, share in m.get("steal_share", {}).items():
        top = share.get("max")
        if top is not None and top > 0.02:
            notes.append(
                f"During the {phase.replace('_', ' ')} measurements the hypervisor took up to "
                f"{100 * top:.0f}% of this VM's CPU time for other guests (steal)."
            )
    bare = res["figures"]["fleet_efficiency"].get("in_process_runs_images_per_s") or []
    if len(bare) > 1 and spread(bare) > 0.05:
        notes.append(
            f"The bare in-process rate alone ranged from {min(bare):.3f} to {max(bare):.3f} "
            f"images/s between runs ({100 * spread(bare):.0f}% of its median) with no fleet "
            "involved: the speed of this machine itself drifts from one run to the next (a VM "
            "on a shared host), which is why each ratio pairs measurements taken back to back "
            "and the median over runs is reported."
        )
    for name, fig in res["figures"].items():
        if fig.get("spread", 0) > 0.10:
            notes.append(
                f"{name}: the runs disagree by {100 * fig['spread']:.0f}% (max-min over median; "
                f"runs {fig['runs']}): noisy; the median is reported."
            )
    return notes


def write_markdown(res: dict[str, Any], path: Path) -> None:
    f, m, v, s = res["figures"], res["machine"], res["versions"], res["settings"]
    e, ov, sc, b, lat, bg = (
        f["fleet_efficiency"],
        f["fleet_efficiency_overlapped"],
        f["scale_out"],
        f["bulk_enqueue"],
        f["idle_latency"],
        f["batching_gain"],
    )
    ref = bg["reference_bare_pipeline"]
    by_size = bg["by_batch_size"]
    lines = [
        "# Fleet throughput benchmark",
        "",
        f"`{res['command']}` — {res['mode']} run, {res['created']}, {res['duration_s']} s. "
        "Every figure is the median of several runs; each run measures both sides of its "
        "ratio back to back in the same process tree.",
        "",
        "## Machine",
        "",
        f"- CPU: {m['cpu_model']}, {m['cores']} cores ({m['platform']}), no GPU: all on CPU",
        f"- busy before start: {_fmt(m['cpu_busy_before_start'], 2)} of all CPUs; load average "
        f"before {m['loadavg_before']}, after {m['loadavg_after']}",
        "- share of all CPUs used by other processes (not the bench's) while measuring: "
        + ", ".join(
            f"{phase.replace('_', ' ')} median {_fmt(v.get('median'), 2)} / max "
            f"{_fmt(v.get('max'), 2)}"
            for phase, v in m.get("other_processes_cpu_share", {}).items()
        )
        + "; hypervisor steal: "
        + ", ".join(
            f"{phase.replace('_', ' ')} max {_fmt(v.get('max'), 2)}"
            for phase, v in m.get("steal_share", {}).items()
        ),
        f"- versions: torch {v['torch']}, diffusers {v['diffusers']}, transformers "
        f"{v['transformers']}, celery {v['celery']}, kombu {v['kombu']}, redis-py {v['redis']}, "
        f"Python {v['python']}",
        "",
        "## Settings",
        "",
        f"- model: {s['model']}; {s['size_px']}x{s['size_px']} px, {s['steps']} steps, "
        "default scheduler",
        f"- torch threads: FLEET_TORCH_THREADS={s['torch_threads_efficiency']} for both the "
        f"fleet worker and the in-process loop (fleet efficiency); scale-out compares 2 workers "
        "x 1 thread with 1 worker x 2 threads",
        f"- {s['jobs_per_run']} jobs queued at once per run, {s['repeats']} runs, "
        f"{s['warmup_jobs_per_worker']} warm-up job(s) per worker first; bulk enqueue "
        f"{s['bulk_jobs']:,} jobs x {s['bulk_repeats']} runs; idle latency "
        f"{s['latency_samples']} samples; batching {s['batching_jobs']} jobs x "
        f"{s['batching_repeats']} run(s) at 64 px, batch sizes {s['batch_sizes']}",
        "- services: Redis and SeaweedFS S3 started by the bench (LocalServices, loopback); "
        "default workers: `celery -A worker.app worker --pool prefork --concurrency 1 --queues "
        "<bench queue>`; overlapped worker: `--pool threads --concurrency 2`; batch workers: "
        "`FLEET_BATCH_SIZE=B ... --pool threads --concurrency 2B`",
        "",
        "## Figures",
        "",
        "| figure | value | goal | result | detail |",
        "|---|---|---|---|---|",
        f"| fleet efficiency | {e['value']:.3f} | {e['goal']} | {_met(e)} | fleet "
        f"{e['fleet_images_per_s']:.3f} img/s vs in-process {e['in_process_images_per_s']:.3f} "
        f"img/s; runs {e['runs']}; default worker (prefork) |",
        f"| fleet efficiency, overlapped worker | {ov['value']:.3f} | {ov['goal']} | {_met(ov)} "
        f"| fleet {ov['fleet_images_per_s']:.3f} img/s vs in-process "
        f"{ov['in_process_images_per_s']:.3f} img/s; runs {ov['runs']}; threads pool, 2 jobs in "
        "flight |",
        f"| batching gain | {bg['value']:.2f} | {bg['goal']} | {_met(bg)} | "
        f"{bg['jobs']} jobs at 64 px: batch worker (FLEET_BATCH_SIZE={bg['batch_size']}) "
        f"{bg['on_images_per_s']:.2f} img/s vs default worker {bg['off_images_per_s']:.2f} "
        "img/s; "
        + "; ".join(
            f"batch {k}: x{v['gain']:.2f} (bare pipeline images={k} in one call: "
            f"x{v['bare_pipeline_gain']:.2f})"
            for k, v in by_size.items()
        )
        + f"; runs {bg['runs']} |",
        f"| scale-out | {sc['value']:.3f} | {sc['goal']} | {_met(sc)} | 2 workers x 1 thread "
        f"{sc['two_workers_images_per_s']:.3f} img/s vs 1 worker x 2 threads "
        f"{sc['one_worker_images_per_s']:.3f} img/s; jobs per worker {sc['jobs_per_worker']}; "
        f"runs {sc['runs']}"
        + (
            f"; bare processes, same runs: x{sc['bare_reference']['value']:.3f}"
            if sc.get("bare_reference")
            else ""
        )
        + " |",
        f"| bulk enqueue | {b['value']:.2f} | {b['goal']} | {_met(b)} | submit_bulk "
        f"{b['bulk_jobs_per_s']:,.0f} jobs/s vs one-by-one send_task "
        f"{b['one_by_one_jobs_per_s']:,.0f} jobs/s ({b['jobs']:,} jobs; client.submit each: "
        f"{b['client_submit_each_jobs_per_s']:,.0f} jobs/s); runs {b['runs']} |",
        f"| idle latency | {lat['value']:.2f} | {lat['goal']} | {_met(lat)} | submit -> "
        f"STARTED {lat['fleet_submit_to_started_ms']:.1f} ms vs trivial task round trip "
        f"{lat['trivial_round_trip_ms']:.1f} ms (trivial submit -> STARTED "
        f"{lat['trivial_submit_to_started_ms']:.1f} ms) |",
        "",
        "Result: the goal against the median of the runs. The 90% interval is a bootstrap of "
        "that median over the runs (how far it could move in another run on this machine); "
        "'within noise' means the goal lies inside it, so these runs cannot tell met from "
        "missed.",
        "",
        "## How each figure is measured",
        "",
        "- **Fleet efficiency**: N jobs submitted at once with `Client.submit_many` to a queue "
        "served by one real `celery worker` (prefork, 1 child); the clock stops when the "
        "client has every result (Celery result over Redis pub/sub, i.e. after the PNGs and "
        "manifest are in S3). Baseline: `worker.engine.engine.Engine.generate` on the same jobs "
        "(same prompts, seeds, size, steps) in a loop in one process with the same FLEET_* "
        "settings, half of its N images right before the fleet run and half right after, so "
        "that a steady drift in the machine's speed cancels out (ABBA). Per job: fleet "
        f"{e['per_job_ms']['fleet_wall']:.0f} ms, in process "
        f"{e['per_job_ms']['in_process_wall']:.0f} ms; in the worker: diffusion "
        f"{e['per_job_ms']['worker_generate']:.0f} ms, PNG + S3 + manifest "
        f"{e['per_job_ms']['worker_store_and_png']:.0f} ms; queue + Celery + result "
        f"{e['per_job_ms']['dispatch_and_result']:.0f} ms.",
        "- **Fleet efficiency, overlapped worker**: the same, through a worker on the threads "
        "pool with two jobs in flight (`--pool threads --concurrency 2`, batch size 1): one "
        "thread owns the pipeline and generates, the other encodes and stores the job before "
        "(docs/batching.md). It runs right after or right before the default worker (turns "
        "alternate between runs), between the same two in-process halves.",
        f"- **Batching gain**: {bg['jobs']} compatible jobs (64 px, 20 steps, the same prompts "
        "and seeds each time) queued at once with `Client.submit_many`; images/s of a batch "
        "worker (`FLEET_BATCH_SIZE=B`, threads pool with 2B jobs in flight, so one batch "
        "generates while the previous one is stored) vs the default worker (batching off), "
        "each until the client has every result. The default worker runs half the jobs right "
        "before the batch workers and half right after (ABBA). Jobs by the size of the "
        "pipeline call they shared, as their results recorded it (size: jobs): "
        + "; ".join(f"B={k}: {v['jobs_by_call_size']}" for k, v in by_size.items())
        + ". Reference without the fleet: the bare pipeline's gain from `images=B` in one "
        f"call over `images=1` B times ({ref['batch1_images_per_s']:.2f} img/s at images=1).",
        "- **Scale-out**: the same N jobs through two one-thread workers sharing one queue "
        "(two halves of N/2 jobs queued at once, the first before the in-process half that "
        "precedes the fleet run, the second after the one that follows it) vs one two-thread "
        "worker (the fleet-efficiency run when threads = 2). Reference without the fleet, in "
        "the same runs: two bare one-thread pipeline processes sharing the same jobs at once "
        "vs the bare two-thread loop.",
        f"- **Bulk enqueue**: {b['how']}",
        "- **Idle latency**: with every worker idle, the bench subscribes to the job's result "
        "channel, submits with `Client.submit`, and takes the time until the worker publishes "
        "the STARTED state (task_track_started: stored and published just before the task "
        "body runs). The trivial task (`bench.noop`, defined in scripts/bench.py, run by its "
        "own prefork worker with the fleet workers' Celery settings) is timed from send_task "
        "to SUCCESS the same way, interleaved with the fleet samples. Milliseconds are "
        "medians.",
    ]
    misses = explain_misses(res)
    lines += ["", "## Goals missed", ""]
    lines += [f"- {x}" for x in misses] if misses else ["- none"]
    notes = noise_notes(res) + list(res.get("notes", []))
    lines += ["", "## Noise", ""]
    lines += [f"- {x}" for x in notes] if notes else ["- the runs agree within 10%"]
    path.write_text("\n".join(lines) + "\n", encoding="utf-8")


# =============================================================================================


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(
        prog="scripts/bench",
        description="Measure fleet efficiency, batching gain, scale-out, bulk enqueue and idle "
        "latency as "
        "ratios in one run; write results.json and results.md.",
    )
    p.add_argument("--quick", action="store_true", help="a smaller run (under 2 minutes)")
    p.add_argument("--out", type=Path, default=REPO / "bench", help="output folder (bench/)")
    p.add_argument(
        "--threads",
        type=int,
        choices=(1, 2),
        default=2,
        help="FLEET_TORCH_THREADS of both the fleet worker and the in-process loop (2)",
    )
    p.add_argument("--jobs", type=int, help="jobs per throughput run (12; quick 6)")
    p.add_argument("--repeats", type=int, help="throughput runs (7; quick 3)")
    p.add_argument("--bulk-jobs", type=int, help="jobs per bulk enqueue run (10000; quick 1000)")
    p.add_argument("--keep", action="store_true", help="keep worker logs (kept on failure)")
    p.add_argument("--role", choices=("main", "pipeline", "noop-worker"), default="main",
                   help=argparse.SUPPRESS)  # fmt: skip
    p.add_argument("--node", help=argparse.SUPPRESS)
    return p.parse_args(argv)


def _terminate(signum: int, frame: Any) -> None:
    raise KeyboardInterrupt(f"signal {signum}")


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    if args.role == "pipeline":
        return pipeline_role()
    if args.role == "noop-worker":
        return noop_worker_role(args.node)
    signal.signal(signal.SIGTERM, _terminate)
    bench = Bench(args)
    failed = True
    try:
        result = bench.run()
        failed = False
    except KeyboardInterrupt:
        log("interrupted; stopping everything")
        return 130
    except Exception:
        traceback.print_exc()
        for p in bench.procs:
            log(f"--- {p.name} log tail ---\n{p.tail(2000)}")
        return 1
    finally:
        bench.close(keep_dir=failed or args.keep)
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "results.json").write_text(json.dumps(result, indent=2) + "\n", encoding="utf-8")
    write_markdown(result, args.out / "results.md")
    log(f"wrote {args.out / 'results.json'} and {args.out / 'results.md'}")
    for name, goal in result["goals"].items():
        value = goal["value"]
        shown = f"{value:.3f}" if isinstance(value, float) else "not measured"
        state = {True: "met", False: "MISSED", None: "n/a"}[goal["met"]]
        print(f"{name:18} {shown:>14}  goal {goal['goal']:<34} {state}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
