"""Runs the bench's workloads and records raw samples (no figures here: see figures.py).

``Bench(args).run()`` starts Redis and SeaweedFS S3 (fleet.localdev.LocalServices, free
loopback ports), real workers serving the random-weight `medium` model, the bare pipeline and
the trivial Celery worker (procs.py), warms them up, measures, and returns the results document
without figures: machine, versions, settings and ``samples``, each side of every ratio as
measured (seconds and counts, per-job timings from the results, CPU shares of other processes).
``close()`` stops everything, also after errors and Ctrl-C.
"""

from __future__ import annotations

import argparse
import base64
import contextlib
import functools
import json
import os
import shutil
import subprocess
import sys
import tempfile
import threading
import time
import uuid
from collections import Counter
from collections.abc import Callable, Iterator
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

from fleet import contract
from fleet.contract import JobSpec
from fleet.localdev import LocalServices
from fleet.settings import ProducerSettings
from producer.bulk import submit_bulk
from producer.client import Client

from . import REPO, log
from .figures import batching_run, throughput_row
from .gateway import GatewayPhase
from .machine import CpuWatch, cpu_busy, facts, loadavg, versions
from .procs import (
    NOOP_QUEUE,
    NOOP_TASK,
    NoopWorker,
    PipelineProc,
    Proc,
    Worker,
    make_spec,
    wait_ready,
)
from .stats import median

SCHEMA = 3  # 3: the gateway phase's samples
Q_ONE = "bench.one"  # the worker with FLEET_TORCH_THREADS=2
Q_TWO = "bench.two"  # shared by the two one-thread workers
Q_BULK = "bench.bulk"  # no consumer: counted with LLEN, then purged
Q_OVL = "bench.overlap"  # the overlapped worker: threads pool, 2 jobs in flight, batch size 1
Q_BATCH = "bench.batch{size}"  # batch workers: FLEET_BATCH_SIZE=size, 2 x size jobs in flight
BATCH_SIZES = (8, 4)  # the first is the batching-gain figure; the others (full run) for reference
BATCH_PX = 64
LATENCY_JOB = {"size": 64, "steps": 2}
#: one way to enqueue a list of jobs through a client
Enqueue = Callable[[Client, list[JobSpec]], Any]


def us(x: float) -> float:
    """Seconds as recorded: to the microsecond."""
    return round(x, 6)


def job_specs(
    n: int, size: int, steps: int, seed0: int = 1000, tag: str = "job", offset: int = 0
) -> list[JobSpec]:
    """The job set: the same prompts and seeds as the in-process loop, fresh ids."""
    run = uuid.uuid4().hex[:8]
    return [
        make_spec(i, size, steps, seed0 + i, job_id=f"bench-{tag}-{run}-{i:03d}")
        for i in range(offset, offset + n)
    ]


def wait_results(client: Client, job_ids: list[str], timeout: float) -> list[dict[str, Any]]:
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


def submit_and_wait(client: Client, specs: list[JobSpec], timeout: float) -> list[dict]:  # type: ignore[type-arg]
    return wait_results(client, [h.job_id for h in client.submit_many(specs)], timeout)


def fleet_run(client: Client, specs: list[JobSpec], timeout: float) -> dict[str, Any]:
    """Submit every job at once, wait until the client has seen every result: the seconds, and
    per job the timings its result recorded and the worker node that ran it."""
    began = time.perf_counter()
    results = submit_and_wait(client, specs, timeout)
    seconds = time.perf_counter() - began
    timings = [r.get("timings", {}) for r in results]
    part: dict[str, Any] = {
        "n": len(specs),
        "seconds": us(seconds),
        "nodes": dict(Counter(str(r.get("worker", {}).get("node")) for r in results)),
    }
    for key in ("generate_s", "upload_s", "total_s"):
        part[key] = [us(t.get(key, 0.0)) for t in timings]
    part["batch_jobs"] = [int(t.get("batch_jobs", 1)) for t in timings]
    return part


def pipeline_part(n: int, seconds: float, replies: list[dict[str, Any]]) -> dict[str, Any]:
    return {
        "n": n,
        "seconds": us(seconds),
        "per_call_s": [us(x) for r in replies for x in r["per_call_s"]],
    }


def inproc_run(pipe: PipelineProc, n: int, size: int, steps: int, offset: int) -> dict[str, Any]:
    """Engine.generate on the same jobs as job_specs(..., offset) would make, in a loop."""
    reply = pipe.generate(n, size, steps, seed0=1000, offset=offset)
    return pipeline_part(n, reply["seconds"], [reply])


def bare_pair_run(
    pipes: list[PipelineProc], n: int, size: int, steps: int, offset: int
) -> dict[str, Any]:
    """The same jobs shared by two bare pipeline processes running at once."""
    first = n // 2
    began = time.perf_counter()
    pipes[0].loop(first, size, steps, seed0=1000, offset=offset)
    pipes[1].loop(n - first, size, steps, seed0=1000, offset=offset + first)
    replies = [p.receive(600) for p in pipes]
    return pipeline_part(n, time.perf_counter() - began, replies)


def pubsub_timing(
    redis_client: Any, key: str, submit: Callable[[], Any], timeout: float
) -> dict[str, float | None]:
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
                started = us(now - began)
            if status in ("SUCCESS", "FAILURE", "REVOKED"):
                if status != "SUCCESS":
                    raise RuntimeError(f"{key} ended {status}")
                done = us(now - began)
        return {"started_s": started, "done_s": done}
    finally:
        ps.close()


def _text(value: str | bytes) -> str:
    return value.decode() if isinstance(value, bytes) else value


def same_message(a: dict, b: dict, id_a: str, id_b: str) -> bool:  # type: ignore[type-arg]
    """The first message of two enqueue methods, equal apart from the job id, the time sent,
    the delivery tag and the reply-to (per Celery app: each method has its own client)."""

    def norm(msg: dict, job_id: str) -> dict:  # type: ignore[type-arg]
        body = json.loads(base64.b64decode(msg["body"]))
        with contextlib.suppress(LookupError, TypeError, AttributeError):
            body[1]["job"]["submitted_at"] = bool(body[1]["job"]["submitted_at"])  # a time
        msg = {**msg, "body": body}
        out = json.loads(json.dumps(msg).replace(job_id, "<id>"))
        with contextlib.suppress(LookupError, TypeError):  # kwargsrepr shows the time too
            out["headers"]["kwargsrepr"] = out["headers"]["kwargsrepr"].split("'submitted_at'")[0]
        out["properties"].pop("delivery_tag", None)
        out["properties"].pop("reply_to", None)
        return out  # type: ignore[no-any-return]

    same = norm(a, id_a) == norm(b, id_b)
    if not same:
        log(f"messages differ:\n{json.dumps(a)[:1500]}\n{json.dumps(b)[:1500]}")
    return same


class Bench:
    def __init__(self, args: argparse.Namespace) -> None:
        self.args = args
        self.quick = args.quick
        self.threads = args.threads
        self.n = args.jobs or (6 if self.quick else 12)
        self.repeats = args.repeats or (3 if self.quick else 7)
        self.warmup = 1 if self.quick else 2
        self.size, self.steps = 128, args.steps or 20
        self.bulk_n = args.bulk_jobs or (1000 if self.quick else 10_000)
        self.bulk_repeats = 3
        self.latency_samples = 5 if self.quick else 9
        self.batch_repeats = 1 if self.quick else 3
        self.batch_jobs = args.batch_jobs or (
            16 if self.quick else 64
        )  # compatible jobs queued at once, 64 px
        self.batch_sizes = BATCH_SIZES[:1] if self.quick else BATCH_SIZES
        self.gateway = GatewayPhase(self, Q_ONE)
        self.run_dir = Path(tempfile.mkdtemp(prefix="fleet-bench-"))
        self.procs: list[Proc] = []
        self.clients: list[Client] = []
        self.services: LocalServices | None = None
        self.endpoints_env: dict[str, str] = {}
        self.notes: list[str] = []
        #: per phase: the shares of all CPUs that other processes ("other") and the
        #: hypervisor's other guests ("steal") took while it was measured, one per block
        self.cpu_share: dict[str, dict[str, list[float | None]]] = {}

    def settings(self) -> dict[str, Any]:
        return {
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
            **self.gateway.settings(),
            "device": "cpu",
        }

    @contextlib.contextmanager
    def watched(self, phase: str) -> Iterator[None]:
        """Record how much of the machine others used while the block ran."""
        watch = CpuWatch()
        with watch:
            yield
        share = self.cpu_share.setdefault(phase, {"other": [], "steal": []})
        share["other"].append(watch.foreign)
        share["steal"].append(watch.steal)

    # -- set-up -----------------------------------------------------------------------------

    def model_dir(self) -> Path:
        out = REPO / ".models" / "medium"
        proc = subprocess.run(  # nosec B603  # this Python, fixed arguments
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
        env.update(self.endpoints_env)
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

    def client(self, queue: str, **extra: Any) -> Client:
        kwargs: dict[str, Any] = {
            k.removeprefix("FLEET_").lower(): v for k, v in self.endpoints_env.items()
        }
        kwargs.update(queue=queue, **extra)
        c = Client(ProducerSettings(_env_file=None, **kwargs))
        self.clients.append(c)
        return c

    def launch(self, proc: Proc) -> Proc:
        self.procs.append(proc)
        if isinstance(proc, PipelineProc):
            return proc.start_pipe()
        return proc.start()

    def start(self) -> None:
        log(f"run directory {self.run_dir}")
        model = self.model_dir()
        self.services = LocalServices()
        self.endpoints_env = self.services.start().env()
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
        workers: list[Proc] = [self.w_one, self.w_b1, self.w_b2, self.noop, self.w_ovl,
                               *self.w_batch.values()]  # fmt: skip
        for p in workers:
            self.launch(p)
        self.pipe = PipelineProc(env_t, self.run_dir)
        self.launch(self.pipe)
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
                self.launch(p)
                p.send(op="setup")
            for p in self.bare:
                p.receive(300)

    def warm_up(self) -> None:
        """Warm-up jobs on every worker and the bare pipeline (not timed), never more torch
        threads at once than cores: two-thread OpenMP teams sharing 2 cores spin at their
        barriers and slow down many times over (a first job took 60 s instead of 1 s)."""

        def on_workers(*clients: Client) -> None:
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
            submit_and_wait(c, job_specs(size, BATCH_PX, self.steps, seed0=1, tag="warm"), 600)
        self.pipe.generate(self.warmup, self.size, self.steps, seed0=1)
        if self.bare:
            bare_pair_run(self.bare, 2 * self.warmup, self.size, self.steps, 0)
        # the batching reference runs at 64 px with batches of 1 and up: warm those shapes too
        for images in (1, *self.batch_sizes):
            self.pipe.generate(1, BATCH_PX, self.steps, seed0=1, images=images)
        log(f"warm-up done in {time.monotonic() - began:.1f} s")

    # -- workloads --------------------------------------------------------------------------

    def throughput(self) -> dict[str, Any]:
        """Per run, each side of a ratio is measured around the other (ABBA): the in-process
        loop runs half its N images before the fleet run and half after, and the two-worker
        run likewise around those, so a steady drift in machine speed cancels out. Samples:
        per run, the parts measured under each name ("inproc", "fleet", "overlap", "two",
        and "bare2" with --threads 2 or "one2" with --threads 1)."""
        runs: list[dict[str, list[dict[str, Any]]]] = []
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
        # the two fleet-efficiency workers take turns being nearer the first in-process half
        fleet_at = next(i for i, step in enumerate(plan) if step[0] == "fleet")
        for rep in range(self.repeats):
            parts: dict[str, list[dict[str, Any]]] = {}
            order = list(plan)
            if rep % 2:
                order[fleet_at], order[fleet_at + 1] = order[fleet_at + 1], order[fleet_at]
            for what, offset, n in order:
                with self.watched("throughput"):
                    if what == "inproc":
                        part = inproc_run(self.pipe, n, self.size, self.steps, offset)
                    elif what == "bare2":
                        part = bare_pair_run(self.bare, n, self.size, self.steps, offset)
                    else:
                        specs = job_specs(n, self.size, self.steps, tag=what, offset=offset)
                        part = fleet_run(clients[what], specs, timeout)
                parts.setdefault(what, []).append(part)
            runs.append(parts)
            row = throughput_row(parts)
            rate = {what: row[what]["images_per_s"] for what in ("inproc", "fleet", "overlap")}
            log(
                f"run {rep + 1}/{self.repeats}: in-process {rate['inproc']:.3f} img/s, fleet "
                f"{rate['fleet']:.3f} img/s (x{row['efficiency']:.3f}), overlapped "
                f"{rate['overlap']:.3f} img/s (x{row['overlap_efficiency']:.3f}), two workers "
                f"{row['two']['images_per_s']:.3f} img/s (x{row['scale_out']:.3f} of one "
                "2-thread worker"
                + (f"; bare processes x{row['bare_scale']:.3f})" if "bare_scale" in row else ")")
            )
        return {"runs": runs}

    def batching(self) -> dict[str, Any]:
        """N compatible jobs (64 px) queued at once: each batch worker vs the default worker
        (batching off), measured as off-half, batch workers, off-half (ABBA); plus the bare
        pipeline's own gain from images=B in one call, as a reference. Samples: per run the
        two default-worker halves ("off") and each batch worker's run ("on", by batch size);
        per bare repeat, images=1 calls ("one") and images=B calls ("by_size")."""
        n, size, steps = self.batch_jobs, BATCH_PX, self.steps
        h1 = n // 2
        timeout = 60 + 5 * n
        runs = []
        for rep in range(self.batch_repeats):
            first = fleet_run(self.c_one, job_specs(n, size, steps, tag="boff")[:h1], timeout)
            sizes = list(self.batch_sizes) if rep % 2 == 0 else list(reversed(self.batch_sizes))
            on = {}
            for b in sizes:
                on[str(b)] = fleet_run(self.c_batch[b], job_specs(n, size, steps, tag=f"b{b}"),
                                       timeout)  # fmt: skip
            second = fleet_run(self.c_one, job_specs(n, size, steps, tag="boff", offset=h1),
                               timeout)  # fmt: skip
            runs.append({"off": [first, second], "on": on})
            got = batching_run(runs[-1])
            log(
                f"batching run {rep + 1}/{self.batch_repeats}: off {got['off']:.2f} img/s; "
                + ", ".join(
                    f"batch {b} {got['rates'][str(b)]:.2f} img/s (x{got['gains'][str(b)]:.2f})"
                    for b in self.batch_sizes
                )
            )
        bare = []
        big = max(self.batch_sizes)
        for _ in range(self.batch_repeats):
            one = self.pipe.generate(big, size, steps, seed0=5)
            by_size = {}
            for b in self.batch_sizes:
                many = self.pipe.generate(big // b, size, steps, seed0=5, images=b)
                by_size[str(b)] = {"n": (big // b) * b, "seconds": us(many["seconds"])}
            bare.append({"one": {"n": big, "seconds": us(one["seconds"])}, "by_size": by_size})
        return {"size_px": size, "runs": runs, "bare": bare}

    def idle_latency(self) -> dict[str, Any]:
        """Samples: submit -> STARTED and -> SUCCESS of a fleet job on the idle fleet, and of
        the trivial task, interleaved."""
        r = self.c_one.redis
        backend = self.c_one.celery.backend
        got: dict[str, list[Any]] = {
            f"{who}_{when}_s": [] for who in ("fleet", "trivial") for when in ("started", "done")
        }

        def record(who: str, t: dict[str, float | None]) -> None:
            got[f"{who}_started_s"].append(t["started_s"])
            got[f"{who}_done_s"].append(t["done_s"])

        for i in range(self.latency_samples):
            time.sleep(0.5)  # the fleet is idle: nothing queued, every worker waiting
            spec = job_specs(1, LATENCY_JOB["size"], LATENCY_JOB["steps"], 50 + i, "latency")[0]
            key = _text(backend.get_key_for_task(spec.job_id))
            record("fleet", pubsub_timing(r, key, functools.partial(self.c_one.submit, spec), 120))
            time.sleep(0.5)
            task_id = f"bench-noop-{uuid.uuid4().hex}"
            key = _text(backend.get_key_for_task(task_id))

            def send(task_id: str = task_id) -> None:
                self.c_one.celery.send_task(NOOP_TASK, queue=NOOP_QUEUE, task_id=task_id)

            record("trivial", pubsub_timing(r, key, send, 60))
        if any(x is None for key, xs in got.items() for x in xs if "started" in key):
            raise RuntimeError("a STARTED state was not published (task_track_started off?)")
        log(
            f"idle latency: submit -> started {1000 * median(got['fleet_started_s']):.1f} ms, "
            f"trivial task round trip {1000 * median(got['trivial_done_s']):.1f} ms"
        )
        return {
            **got,
            "job": f"{LATENCY_JOB['size']}x{LATENCY_JOB['size']}, {LATENCY_JOB['steps']} steps, "
            "medium model, on the idle 2-thread worker",
        }

    # -- bulk enqueue -----------------------------------------------------------------------

    def _drain(self, c: Client, jobs: list[JobSpec]) -> dict[str, Any]:
        """Check that every message is queued, take the first one sent, purge them all."""
        keys = contract.queue_keys(Q_BULK)  # one Redis list per priority step
        count = sum(int(c.redis.llen(k)) for k in keys)
        if count != len(jobs):
            raise RuntimeError(f"{count} messages in {Q_BULK}, expected {len(jobs)}")
        first = next(k for k in keys if c.redis.llen(k))
        sample: dict[str, Any] = json.loads(c.redis.lindex(first, -1) or "")  # the first sent
        c.redis.delete(*keys)
        with c.redis.pipeline(transaction=False) as pipe:
            for s in jobs:
                pipe.delete(contract.CLAIM_KEY.format(job_id=s.job_id))
            pipe.execute()
        return sample

    def _timed_enqueue(self, tag: str, send: Enqueue) -> tuple[float, dict[str, Any], JobSpec, Any]:
        """Fresh jobs enqueued by ``send`` through a fresh client (send_task subscribes each
        task's result channel): seconds, the first message, the first job, what send returned."""
        jobs = job_specs(self.bulk_n, 64, 2, seed0=0, tag=tag)
        c = self.client(Q_BULK)
        try:
            began = time.perf_counter()
            sent = send(c, jobs)
            seconds = time.perf_counter() - began
            return us(seconds), self._drain(c, jobs), jobs[0], sent
        finally:
            c.close()

    @staticmethod
    def _send_each(c: Client, jobs: list[JobSpec]) -> None:
        """client.celery.send_task per job, with the arguments Client._enqueue uses."""
        settings = c.settings
        stamp = "submitted_at" in JobSpec.model_fields  # what Client._enqueue sends
        for s in jobs:
            soft, hard = contract.time_limits(
                s, settings.job_time_base_s, settings.job_time_per_mpx_step_s
            )
            payload = getattr(contract, "job_payload", None)  # what Client._enqueue sends
            job = payload(s) if payload else s.model_dump(mode="json")
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

    @staticmethod
    def _submit_each(c: Client, jobs: list[JobSpec]) -> None:
        for s in jobs:
            c.submit(s)

    def bulk(self) -> dict[str, Any]:
        """Samples: seconds per run to enqueue the same number of fresh jobs in bulk, one by one
        with send_task, and with client.submit each; the one-by-one and bulk runs alternate."""
        got: dict[str, list[float]] = {"bulk_s": [], "one_by_one_s": [], "submit_each_s": []}
        same_headers = True
        for rep in range(self.bulk_repeats):
            methods: list[tuple[str, Enqueue]] = [("one", self._send_each), ("bulk", submit_bulk)]
            timed = {
                tag: self._timed_enqueue(tag, send)
                for tag, send in (methods if rep % 2 == 0 else methods[::-1])
            }
            handles = timed["bulk"][3]
            if any(h.duplicate for h in handles) or len(handles) != self.bulk_n:
                raise RuntimeError("bulk submit reported duplicates for fresh ids")
            each = self._timed_enqueue("submit", self._submit_each)
            (single, s1, j1, _), (in_bulk, s2, j2, _) = timed["one"], timed["bulk"]
            same_headers &= same_message(s1, s2, j1.job_id, j2.job_id)
            got["bulk_s"].append(in_bulk)
            got["one_by_one_s"].append(single)
            got["submit_each_s"].append(each[0])
            log(
                f"bulk enqueue run {rep + 1}/{self.bulk_repeats}: bulk "
                f"{self.bulk_n / in_bulk:,.0f} jobs/s, one by one {self.bulk_n / single:,.0f} "
                f"jobs/s (x{single / in_bulk:.2f}); client.submit each "
                f"{self.bulk_n / each[0]:,.0f} jobs/s"
            )
        if not same_headers:
            raise RuntimeError("bulk and send_task messages differ (see the bench log)")
        return {"jobs": self.bulk_n, "queue": Q_BULK, **got, "messages_identical_but_ids": True}

    # -- the whole run ----------------------------------------------------------------------

    def run(self) -> dict[str, Any]:
        """The results document without figures (figures.compute adds them)."""
        started_at = datetime.now(timezone.utc)
        began = time.monotonic()
        busy_before = cpu_busy(2.0)
        load_before = loadavg()
        log(f"machine busy before start: {busy_before} of all CPUs; load {load_before}")
        self.start()
        self.warm_up()
        samples: dict[str, Any] = {"throughput": self.throughput()}
        for phase, measure in (("batching", self.batching), ("idle_latency", self.idle_latency),
                               ("bulk_enqueue", self.bulk),
                               ("gateway", self.gateway.run)):  # fmt: skip
            with self.watched(phase):
                samples[phase] = measure()
        samples["pipeline_torch_threads"] = self.pipeline_threads
        samples["cpu_share"] = self.cpu_share
        return {
            "schema": SCHEMA,
            "created": started_at.isoformat(timespec="seconds"),
            "mode": "quick" if self.quick else "full",
            "command": " ".join(["scripts/bench", *sys.argv[1:]]),
            "duration_s": round(time.monotonic() - began, 1),
            "machine": {
                **facts(),
                "cpu_busy_before_start": busy_before,
                "loadavg_before": load_before,
                "loadavg_after": loadavg(),
            },
            "versions": versions(),
            "settings": self.settings(),
            "samples": samples,
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
                self.services.stop()
        if keep_dir:
            log(f"logs kept in {self.run_dir}")
        else:
            shutil.rmtree(self.run_dir, ignore_errors=True)
