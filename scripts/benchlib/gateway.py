"""The gateway phase: `POST /v1/jobs` through a real `python -m producer serve` process against the
direct `Client.submit`, in the same run, on the bench's own Redis and S3, with the same jobs.

``GatewayPhase(bench).run()`` starts the gateway on a free loopback port (FLEET_QUEUE=bench.one,
one model route), makes a tenant with every limit off and a key for it through TenantStore,
measures, cleans up and stops the gateway. Samples (figures.py computes the figures):

- acceptance: per run, N jobs through each side, the order alternating between runs, with no
  worker consuming their queue (the jobs name the model ``bench-accept``, which both sides
  route to a queue of their own that nobody reads). Direct: one Client calling ``submit`` one
  job after another (the bulk-enqueue phase's "client.submit each"). Gateway: one asyncio
  httpx client keeping C requests in flight. A 202 means the job is in its tenant's line in
  Redis (the dispatcher moves at most FLEET_FAIR_QUEUE_DEPTH of them on to the Celery queue);
  a direct submit returns once Celery's message is in the queue. Per side: seconds, each
  call's or request's latency, CPU seconds of the bench process, the gateway process and
  Redis. After each run every job is counted where it must be, then deleted.
- submit -> STARTED: one job at a time (64 px, 2 steps) on the idle two-thread worker
  (queue bench.one), direct and HTTP in turns, alternating which goes first; each from the
  call to the STARTED state the worker publishes (task_track_started, the idle-latency
  phase's measure), as a listener thread receives it; the next job is sent once the worker
  has acknowledged the last one.
"""

from __future__ import annotations

import asyncio
import json
import os
import threading
import time
import uuid
from collections.abc import Callable
from typing import TYPE_CHECKING, Any

import httpx

from fleet import contract
from fleet.settings import GatewaySettings
from producer.client import Client
from producer.gateway import fairshare
from producer.gateway.tenants import TenantStore

from . import log
from .machine import proc_cpu_s, process_tree
from .procs import PROMPTS, GatewayProc
from .stats import median

if TYPE_CHECKING:
    from .measure import Bench

ACCEPT_MODEL = "bench-accept"  # a model name routed to a queue no worker reads
Q_ACCEPT = {"direct": "bench.accept.direct", "http": "bench.accept.gateway"}
TENANT = "bench"
ACCEPT_JOB = {"size": 64, "steps": 2}  # the bulk-enqueue phase's job shape
STARTED_JOB = {"size": 64, "steps": 1}  # as small as a job goes: STARTED comes before any step
#: the worker counts as idle once its processes used no CPU for this long (10 ms clock ticks)
QUIET_S = 0.05
FINAL = ("SUCCESS", "FAILURE", "REVOKED")


def us(x: float) -> float:
    return round(x, 6)


def _text(value: str | bytes) -> str:
    return value.decode() if isinstance(value, bytes) else value


def poll(check: Callable[[], bool], timeout: float, what: str, every: float = 0.002) -> None:
    """Read a state until ``check`` holds; TimeoutError naming ``what`` after ``timeout``."""
    deadline = time.monotonic() + timeout
    while not check():
        if time.monotonic() > deadline:
            raise TimeoutError(f"{what}: not after {timeout:.0f} s")
        time.sleep(every)


def shape(job: dict[str, int]) -> str:
    return f"{job['size']}x{job['size']}, {job['steps']} step{'s' if job['steps'] != 1 else ''}"


def job_body(i: int, size: int, steps: int, seed: int, **extra: Any) -> dict[str, Any]:
    """Job ``i`` as a JSON body: the same for both sides (the direct client gets a copy)."""
    return {"prompt": PROMPTS[i % len(PROMPTS)], "width": size, "height": size, "steps": steps,
            "seed": seed, **extra}  # fmt: skip


class StateListener:
    """Every state Celery's Redis backend publishes (on each result key's channel), timestamped
    by a thread of its own as it arrives, by job id: a state published while the submitting
    call is still running is timed when it came, not when that call returned."""

    def __init__(self, client: Client) -> None:
        self.prefix = _text(client.celery.backend.get_key_for_task("x"))[:-1]
        self.pubsub = client.redis.pubsub()
        self.seen: dict[str, dict[str, float]] = {}
        self.cond = threading.Condition()
        self.stop = threading.Event()
        self.thread = threading.Thread(target=self._run, name="bench-states", daemon=True)

    def __enter__(self) -> StateListener:
        self.pubsub.psubscribe(self.prefix + "*")
        deadline = time.monotonic() + 5
        while True:  # subscribed before anything is sent
            msg = self.pubsub.get_message(timeout=1.0)
            if msg and msg["type"] == "psubscribe":
                break
            if time.monotonic() > deadline:
                raise TimeoutError("no pub/sub subscription confirmation")
        self.thread.start()
        return self

    def _run(self) -> None:
        while not self.stop.is_set():
            msg = self.pubsub.get_message(timeout=0.2)
            now = time.perf_counter()
            if not msg or msg["type"] != "pmessage":
                continue
            job_id = _text(msg["channel"]).removeprefix(self.prefix)
            status = json.loads(msg["data"]).get("status")
            with self.cond:
                self.seen.setdefault(job_id, {}).setdefault(status, now)
                self.cond.notify_all()

    def wait(self, job_id: str, timeout: float) -> dict[str, float]:
        """The job's states with the time each first came, once it has ended."""
        with self.cond:
            if not self.cond.wait_for(lambda: any(s in self.seen.get(job_id, {}) for s in FINAL),
                                      timeout):  # fmt: skip
                raise TimeoutError(f"job {job_id}: no result after {timeout:.0f} s")
            return dict(self.seen[job_id])

    def __exit__(self, *_: object) -> None:
        self.stop.set()
        self.thread.join(5)
        self.pubsub.close()


class GatewayPhase:
    """``queue``: the idle two-thread worker's queue (the gateway's FLEET_QUEUE), where both
    sides' submit -> STARTED jobs go."""

    def __init__(self, bench: Bench, queue: str) -> None:
        self.bench = bench
        self.queue = queue
        quick = bench.quick
        args = bench.args
        self.concurrency = args.gateway_concurrency or 8
        self.jobs = args.gateway_jobs or (100 if quick else 500)
        self.repeats = 2 if quick else 5
        self.warm = 2 * self.concurrency
        self.samples = 5 if quick else 30
        self.gw: GatewayProc | None = None

    def settings(self) -> dict[str, Any]:
        return {
            "gateway_jobs_per_run": self.jobs,
            "gateway_repeats": self.repeats,
            "gateway_concurrency": self.concurrency,
            "gateway_latency_samples": self.samples,
        }

    # -- set-up ---------------------------------------------------------------------------------

    def start(self) -> None:
        env = {k: v for k, v in os.environ.items() if not k.startswith("FLEET_")}
        env.update(self.bench.endpoints_env)
        env.update(FLEET_QUEUE=self.queue, FLEET_MODEL_ROUTES=f"{ACCEPT_MODEL}={Q_ACCEPT['http']}",
                   PYTHONUNBUFFERED="1")  # fmt: skip
        began = time.monotonic()
        self.gw = GatewayProc(env, self.bench.run_dir)
        self.bench.launch(self.gw)
        self.gw.wait_ready(60)
        self.start_s = time.monotonic() - began
        self.redis = self.bench.c_one.redis
        services = self.bench.services
        self.redis_pid = services.redis.pid if services is not None else None
        kwargs = {k.removeprefix("FLEET_").lower(): v for k, v in self.bench.endpoints_env.items()}
        store = TenantStore(self.redis, GatewaySettings(_env_file=None, **kwargs))
        self.key, _ = store.create_key(TENANT, "scripts/bench")
        store.update(TENANT, rate_per_min=0, max_queued=0, max_job_mpx_steps=0)
        self.headers = {"Authorization": f"Bearer {self.key}"}
        routes = {ACCEPT_MODEL: Q_ACCEPT["direct"]}
        self.direct = self.bench.client(self.queue, model_routes=routes)
        log(f"gateway up on {self.gw.url} in {self.start_s:.1f} s; tenant {TENANT!r}, limits off")

    def cpu(self) -> dict[str, float | None]:
        assert self.gw is not None and self.gw.proc is not None
        return {"bench": time.process_time(), "gateway": proc_cpu_s(self.gw.proc.pid),
                "redis": proc_cpu_s(self.redis_pid)}  # fmt: skip

    def cpu_since(self, before: dict[str, float | None]) -> dict[str, float | None]:
        after = self.cpu()
        return {k: (None if before[k] is None or after[k] is None else
                    round(after[k] - before[k], 4))  # type: ignore[operator]
                for k in before}  # fmt: skip

    # -- acceptance -----------------------------------------------------------------------------

    def bodies(self, n: int, seed0: int) -> list[dict[str, Any]]:
        return [job_body(i, ACCEPT_JOB["size"], ACCEPT_JOB["steps"], seed0 + i, model=ACCEPT_MODEL)
                for i in range(n)]  # fmt: skip

    def submit_direct(self, bodies: list[dict[str, Any]]) -> dict[str, Any]:
        """Client.submit one job after another (each a fresh copy of its body)."""
        per_call, ids = [], []
        cpu = self.cpu()
        began = time.perf_counter()
        for body in bodies:
            t = time.perf_counter()
            handle = self.direct.submit(dict(body))
            per_call.append(time.perf_counter() - t)
            ids.append(handle.job_id)
        seconds = time.perf_counter() - began
        used = self.cpu_since(cpu)
        self.clear_direct(ids)
        return {"n": len(bodies), "seconds": us(seconds), "per_call_s": [us(x) for x in per_call],
                "cpu_s": used}  # fmt: skip

    async def post_all(
        self, http: httpx.AsyncClient, bodies: list[dict[str, Any]]
    ) -> dict[str, Any]:
        """POST every body, ``concurrency`` requests in flight at a time."""
        n = len(bodies)
        per_call = [0.0] * n
        ids: list[str] = [""] * n
        todo = iter(enumerate(bodies))

        async def sender() -> None:
            for i, body in todo:
                t = time.perf_counter()
                r = await http.post("/v1/jobs", json=body)
                per_call[i] = time.perf_counter() - t
                if r.status_code != 202:
                    raise RuntimeError(f"POST /v1/jobs answered {r.status_code}: {r.text[:500]}")
                ids[i] = r.json()["job_id"]

        cpu = self.cpu()
        began = time.perf_counter()
        await asyncio.gather(*(sender() for _ in range(self.concurrency)))
        seconds = time.perf_counter() - began
        used = self.cpu_since(cpu)
        self.clear_line(ids)
        return {"n": n, "seconds": us(seconds), "per_call_s": [us(x) for x in per_call],
                "cpu_s": used}  # fmt: skip

    async def acceptance_runs(self) -> list[dict[str, Any]]:
        assert self.gw is not None
        c = self.concurrency
        limits = httpx.Limits(max_connections=c, max_keepalive_connections=c)
        async with httpx.AsyncClient(base_url=self.gw.url, headers=self.headers, limits=limits,
                                     timeout=60) as http:  # fmt: skip
            await self.post_all(http, self.bodies(self.warm, 0))  # not timed: connections, paths
            self.submit_direct(self.bodies(self.warm, 0))
            runs = []
            for rep in range(self.repeats):
                bodies = self.bodies(self.jobs, 1000 * (rep + 1))
                run: dict[str, Any] = {}
                for side in ("direct", "http") if rep % 2 == 0 else ("http", "direct"):
                    if side == "direct":
                        run[side] = self.submit_direct(bodies)
                    else:
                        run[side] = await self.post_all(http, bodies)
                runs.append(run)
                d, h = (run[s]["n"] / run[s]["seconds"] for s in ("direct", "http"))
                log(
                    f"gateway acceptance run {rep + 1}/{self.repeats}: POST /v1/jobs {h:,.0f} "
                    f"jobs/s ({c} in flight) vs Client.submit {d:,.0f} jobs/s (x{h / d:.2f})"
                )
        return runs

    def clear_direct(self, ids: list[str]) -> None:
        """Check that every job is in its Celery queue, then delete them and their claims."""
        keys = contract.queue_keys(Q_ACCEPT["direct"])
        count = sum(int(self.redis.llen(k)) for k in keys)
        if count != len(ids):
            raise RuntimeError(f"{count} messages in {Q_ACCEPT['direct']}, expected {len(ids)}")
        self.redis.delete(*keys)
        self.forget(ids, records=False)

    def clear_line(self, ids: list[str]) -> None:
        """Check that every job the gateway accepted is in the tenant's line, the dispatcher's
        hand or the Celery queue; then delete them all (the line first, in one transaction with
        the count, so that the dispatcher sends none of them after)."""
        queue = Q_ACCEPT["http"]
        line = fairshare.LINE_KEY.format(queue=queue, tenant=TENANT)
        keys = contract.queue_keys(queue)
        with self.redis.pipeline(transaction=True) as pipe:
            pipe.zcard(line)
            for k in keys:
                pipe.llen(k)
            pipe.hlen(fairshare.DISPATCHING_KEY)
            pipe.delete(line)
            pipe.zrem(fairshare.TURNS_KEY.format(queue=queue), TENANT)
            pipe.delete(fairshare.WAITING_KEY.format(tenant=TENANT))
            got = pipe.execute()
        in_line, queued, in_hand = got[0], sum(got[1 : 1 + len(keys)]), got[1 + len(keys)]
        if in_line + queued + in_hand != len(ids) or len(set(ids)) != len(ids):
            raise RuntimeError(f"gateway jobs: {in_line} in line, {queued} in {queue}, {in_hand} "
                               f"being dispatched; {len(set(ids))} accepted")  # fmt: skip
        # a job the dispatcher took before the transaction reaches Celery's queue, then leaves
        # its hand: wait for that, then empty the queue
        poll(lambda: not self.redis.hlen(fairshare.DISPATCHING_KEY), 30, "dispatcher's hand empty")
        self.redis.delete(*keys)
        self.forget(ids, records=True)

    def forget(self, ids: list[str], records: bool) -> None:
        with self.redis.pipeline(transaction=False) as pipe:
            for job_id in ids:
                pipe.delete(contract.CLAIM_KEY.format(job_id=job_id))
                if records:
                    pipe.delete(fairshare.JOB_KEY.format(job_id=job_id))
            if records:
                pipe.delete(fairshare.INDEX_KEY.format(tenant=TENANT))
            pipe.execute()

    # -- submit -> STARTED ----------------------------------------------------------------------

    def idle(self) -> None:
        """Wait until the worker acknowledged its last job, nothing waits for it, and its
        processes have used no CPU for QUIET_S (torch's threads can spin on after a job)."""
        keys = contract.queue_keys(self.queue)

        def acked() -> bool:
            with self.redis.pipeline(transaction=False) as pipe:
                pipe.hlen("unacked")  # kombu's Redis transport: messages delivered, not acked
                for k in keys:
                    pipe.llen(k)
                return not any(pipe.execute())

        poll(acked, 60, "the worker's last job acknowledged")
        assert self.bench.w_one.proc is not None
        pids = process_tree(self.bench.w_one.proc.pid)
        last: list[Any] = [None, time.monotonic()]

        def quiet() -> bool:
            used = [proc_cpu_s(pid) for pid in pids]
            now = time.monotonic()
            if used != last[0]:
                last[:] = [used, now]
            return now - last[1] >= QUIET_S

        poll(quiet, 60, "the worker's processes quiet", every=0.01)

    def started(self) -> dict[str, Any]:
        assert self.gw is not None
        got: dict[str, list[float]] = {
            f"{side}_{what}_s": [] for side in ("direct", "http")
            for what in ("call", "started", "done")
        }  # fmt: skip
        run = uuid.uuid4().hex[:8]
        with (
            StateListener(self.bench.c_one) as states,
            httpx.Client(base_url=self.gw.url, headers=self.headers, timeout=60) as http,
        ):

            def via_http(body: dict[str, Any], _: str) -> str:
                r = http.post("/v1/jobs", json=body)
                if r.status_code != 202:
                    raise RuntimeError(f"POST /v1/jobs answered {r.status_code}: {r.text[:500]}")
                return str(r.json()["job_id"])

            def direct(body: dict[str, Any], job_id: str) -> str:
                return self.bench.c_one.submit({**body, "job_id": job_id}).job_id

            sides: dict[str, Callable[[dict[str, Any], str], str]] = {
                "direct": direct, "http": via_http
            }  # fmt: skip
            for n in range(-1, self.samples):  # -1: a first pair, not recorded
                order = ("direct", "http") if n % 2 == 0 else ("http", "direct")
                for side in order:
                    body = job_body(n, STARTED_JOB["size"], STARTED_JOB["steps"], 70 + n)
                    self.idle()
                    began = time.perf_counter()
                    job_id = sides[side](body, f"bench-gwlat-{run}-{n + 1:03d}")
                    call = time.perf_counter() - began
                    seen = states.wait(job_id, 120)
                    if "SUCCESS" not in seen or "STARTED" not in seen:
                        raise RuntimeError(f"job {job_id} ({side}): states {sorted(seen)}")
                    if n >= 0:
                        got[f"{side}_call_s"].append(us(call))
                        got[f"{side}_started_s"].append(us(seen["STARTED"] - began))
                        got[f"{side}_done_s"].append(us(seen["SUCCESS"] - began))
        log(
            f"gateway submit -> started: POST {1000 * median(got['http_started_s']):.1f} ms, "
            f"Client.submit {1000 * median(got['direct_started_s']):.1f} ms (medians of "
            f"{self.samples} each)"
        )
        return got

    # -- the phase ------------------------------------------------------------------------------

    def run(self) -> dict[str, Any]:
        self.start()
        try:
            runs = asyncio.run(self.acceptance_runs())
            self.redis.srem(fairshare.QUEUES_KEY, Q_ACCEPT["http"])  # nothing left to dispatch
            started = self.started()
        finally:
            if self.gw is not None:
                self.gw.stop()
        return {
            "acceptance": {
                "jobs_per_run": self.jobs,
                "concurrency": self.concurrency,
                "warmup_jobs": self.warm,
                "runs": runs,
                "job": f"{shape(ACCEPT_JOB)}, model {ACCEPT_MODEL!r}",
            },
            "started": {
                **started,
                "job": f"{shape(STARTED_JOB)}, medium model, on the idle 2-thread worker",
            },
            "gateway_start_s": round(self.start_s, 2),
            "fair_queue_depth": GatewaySettings.model_fields["fair_queue_depth"].default,
        }
