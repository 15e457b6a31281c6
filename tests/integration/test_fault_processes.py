"""The process part of the fault matrix: pool children and whole workers signalled, a pool child
killed by the kernel for memory, an allocation refused under an address-space limit.

Real Redis, real SeaweedFS, real `celery worker` processes; every case is counted with
tests/fault_tally.py (submitted, succeeded, failed, lost, generated twice; generations counted
in the worker's log) and must lose nothing and generate nothing twice.
"""

from __future__ import annotations

import contextlib
import os
import re
import resource
import signal
import time
import uuid
from collections.abc import Iterator
from pathlib import Path

import pytest

from fleet import contract
from fleet.contract import JobSpec
from producer.client import Client
from tests import fault_tally
from tests.fleet_fixtures import WorkerProcess, wait_until
from tests.integration.test_reliability import (
    job,
    last_received,
    pool_children,
    received,
    wait_in_pipeline,
    worker_is_ready,
)

pytestmark = pytest.mark.integration

#: Far more than the tiny model needs for 64 px, and allocated within the first second of the
#: call (measured: 1024 px, one image: +108 MB RSS, +168 MB address space within 0.5 s; eight
#: images: about eight times that). A 64 px job needs +3 MB.
BIG = {"side": 1024, "images": 8, "steps": 2}


def big_job() -> JobSpec:
    return JobSpec(prompt="too big for this host", width=BIG["side"], height=BIG["side"],
                   steps=BIG["steps"], images=BIG["images"])  # fmt: skip


def queued(client: Client, queue: str) -> int:
    return sum(int(client.redis.llen(k)) for k in contract.queue_keys(queue))


def signal_pool_child_mid_job(
    w: WorkerProcess, client: Client, seen: int, sig: signal.Signals
) -> int:
    """Wait for the next job start in the log and its first denoising step, send ``sig`` to the
    pool child running it, wait for its replacement; returns the signalled pid."""
    assert w.proc is not None
    proc = w.proc
    wait_until(lambda: received(w) > seen, 60, "a job starting")
    wait_in_pipeline(client, last_received(w))
    children = pool_children(proc.pid)
    assert len(children) == 1, children
    os.kill(children[0], sig)
    wait_until(lambda: pool_children(proc.pid) not in ([], children), 30, "a new pool child")
    return children[0]


# -- 1. the pool child: SIGTERM and SIGQUIT (SIGKILL: test_reliability) ------------------------


SIGNALS_CI = (signal.SIGTERM, signal.SIGQUIT)


@pytest.mark.parametrize(
    "signals", fault_tally.cases(ci=[SIGNALS_CI], soak_only=[SIGNALS_CI * 3]), ids=len
)
def test_a_pool_child_sent_sigterm_or_sigquit_gives_its_job_back_and_loses_nothing(
    start_worker, qclient: Client, queue: str, signals: tuple[signal.Signals, ...]
) -> None:
    """billiard installs its own handler for SIGTERM and SIGQUIT in a pool child (after
    Celery's process_initializer reset SIGTERM): it raises SystemExit in the job, reports no
    result for the unfinished job and exits with the signal's number. The parent sees the child
    gone with the job unfinished and task_reject_on_worker_lost puts the job back at once.
    The child's DEATH message makes billiard's parent send it SIGTERM (pool.py, on_death), so
    the status Celery logs is rarely the first signal's: after SIGTERM (handler reset to
    SIG_DFL) "signal 15 (SIGTERM)", after SIGQUIT "exitcode 70" (the handler fired twice:
    EX_SOFTWARE); "exitcode 15" / "exitcode 3" when the child left before the parent read the
    message. Either way: a WorkerLostError, the job again, every job succeeds once."""
    w = start_worker(f"childterm{len(signals)}", queues=queue, FLEET_MAX_DELIVERIES="10")
    ids = [h.job_id for h in qclient.submit_many([job() for _ in range(len(signals) + 1)])]
    signalled = [signal_pool_child_mid_job(w, qclient, received(w), sig) for sig in signals]
    log = w.log()  # each "exited with" line is logged before the new child starts
    exits = [re.search(rf"pid:{pid} exited with '([^']+)'", log) for pid in signalled]
    statuses = [m.group(1) if m else None for m in exits]
    fig = fault_tally.tally(f"pool child SIGTERM + SIGQUIT x{len(signals)}", qclient, ids,
                            lambda: [w.log()], signals=[s.name for s in signals],
                            exits=statuses)  # fmt: skip
    fault_tally.assert_clean(fig)
    for sig, status in zip(signals, statuses, strict=True):
        allowed = {signal.SIGTERM: ("signal 15 (SIGTERM)", "exitcode 15"),
                   signal.SIGQUIT: ("exitcode 70", "exitcode 3")}[sig]  # fmt: skip
        assert status in allowed, (sig, status, log[-3000:])
    log = w.log()
    assert log.count("WorkerLostError('Worker exited prematurely") == len(signals), log[-3000:]
    assert sum(received(w, j) for j in ids) == len(ids) + len(signals)  # each ran again
    assert w.proc.poll() is None


# -- 2. the whole worker: SIGQUIT (cold); SIGKILL and SIGTERM: test_reliability ----------------


def test_a_cold_shutdown_puts_the_running_and_the_queued_jobs_back_at_once(
    start_worker, qclient: Client, queue: str
) -> None:
    """SIGQUIT to the main process: Celery cancels the running, unacknowledged job (its pool
    child gets SIGTERM), and kombu restores every unacknowledged message when the channel
    closes. With the default one-hour visibility timeout, all three are back in the queue
    within seconds; a restarted worker generates each once."""
    w = start_worker("cold", queues=queue)
    running = qclient.submit(job(steps=60))
    behind = [h.job_id for h in qclient.submit_many([job(steps=2) for _ in range(2)])]
    wait_until(lambda: received(w, running.job_id), 60, "the job running")
    wait_in_pipeline(qclient, running.job_id)
    os.kill(w.proc.pid, signal.SIGQUIT)
    stopped = time.monotonic()
    rc = w.proc.wait(60)
    wait_until(lambda: queued(qclient, queue) == 3, 30, "all three back in the queue")
    back_after = time.monotonic() - stopped
    assert fault_tally.generations([w.log()])[running.job_id] == 0  # it was stopped, not run
    w.start()
    ids = [running.job_id, *behind]
    fig = fault_tally.tally("whole worker SIGQUIT (cold)", qclient, ids, lambda: [w.log()],
                            exit_code=rc, back_in_queue_s=round(back_after, 1))  # fmt: skip
    fault_tally.assert_clean(fig)
    assert back_after < 30  # not the 3,600 s visibility timeout
    assert received(w, running.job_id) == 2  # stopped once, then run once


# -- 3. the kernel's OOM killer ------------------------------------------------------------------


def own_memory_cgroup() -> Path:
    """This process's memory cgroup (cgroup v1), where a child cgroup of a test's own goes."""
    for line in Path("/proc/self/cgroup").read_text().splitlines():
        _, controllers, path = line.split(":", 2)
        if "memory" in controllers.split(","):
            return Path("/sys/fs/cgroup/memory") / path.lstrip("/")
    raise AssertionError("no memory cgroup (cgroup v1) for this process")


def oom_counter(cgroup: Path) -> int:
    fields = dict(ln.split() for ln in (cgroup / "memory.oom_control").read_text().splitlines())
    return int(fields["oom_kill"])


@contextlib.contextmanager
def memory_cgroup() -> Iterator[Path]:
    parent = own_memory_cgroup()
    cgroup = parent / f"fleet-oom-{uuid.uuid4().hex[:8]}"
    cgroup.mkdir()
    try:
        yield cgroup
    finally:
        for pid in (cgroup / "cgroup.procs").read_text().split():
            with contextlib.suppress(OSError):  # gone meanwhile
                (parent / "cgroup.procs").write_text(pid)
        cgroup.rmdir()


@pytest.mark.parametrize(
    "fault", fault_tally.cases(ci=["address-space limit"], soak_only=["oom killer"])
)
def test_a_job_too_big_for_the_hosts_memory_ends_as_documented(
    start_worker, qclient: Client, queue: str, fault: str
) -> None:
    """CI: the allocation refused (RLIMIT_AS), the job fails alone. Soak: the kernel's OOM
    killer (needs root and a cgroup v1 memory hierarchy), the job ends at the delivery cap."""
    if fault == "oom killer":
        with memory_cgroup() as cgroup:
            oom_killer_case(start_worker, qclient, queue, cgroup)
    else:
        address_space_case(start_worker, qclient, queue)


def oom_killer_case(start_worker, qclient: Client, queue: str, memory_cgroup: Path) -> None:  # type: ignore[no-untyped-def]
    """The worker's main process and its warm pool child go into a memory cgroup of their own
    once warm. Every pool child Celery forks later is born in the cgroup, so no child has to be
    caught and moved (a watcher would race the redelivered job to the new child). This kernel
    (6.18) no longer moves charges (move_charge_at_immigrate accepts only 0): what the two
    already use stays charged where it was, and the cgroup is charged what they allocate from
    now on. The limit is the child's anonymous memory (what a fresh child allocates again to
    load the model) + 160 MB: a fresh child and a 64 px job fit, the big job does not. The
    kernel's OOM killer ends the child (SIGKILL) at each delivery; after FLEET_MAX_DELIVERIES
    the job is a recorded TooManyDeliveries failure, and the next small job succeeds on a fresh
    child, in the cgroup too."""
    w = start_worker("oom", queues=queue, FLEET_MAX_DELIVERIES="2")
    wait_until(lambda: worker_is_ready(w), 90, "the worker warm")
    [child] = pool_children(w.proc.pid)
    anon = int(Path(f"/proc/{child}/status").read_text().split("RssAnon:")[1].split()[0]) * 1024
    for pid in (w.proc.pid, child):
        (memory_cgroup / "cgroup.procs").write_text(str(pid))
    idle = int((memory_cgroup / "memory.usage_in_bytes").read_text())
    limit = idle + anon + 160 * 2**20
    (memory_cgroup / "memory.limit_in_bytes").write_text(str(limit))
    warm = qclient.submit(job(steps=2))  # fits: the limit is only the big job's
    assert warm.wait(timeout=60).state == "succeeded"
    kills_before = oom_counter(memory_cgroup)
    big = qclient.submit(big_job())
    st = big.wait(timeout=180)
    kills = oom_counter(memory_cgroup) - kills_before
    after = qclient.submit(job(steps=2))
    fig = fault_tally.tally("pool child OOM-killed (memory cgroup)", qclient,
                            [warm.job_id, big.job_id, after.job_id], lambda: [w.log()],
                            expect_failed=[big.job_id], oom_kill=kills,
                            failcnt=int((memory_cgroup / "memory.failcnt").read_text()),
                            child_anon_mb=anon >> 20, limit_mb=limit >> 20,
                            usage_after_mb=int((memory_cgroup / "memory.usage_in_bytes")
                                               .read_text()) >> 20)  # fmt: skip
    fault_tally.assert_clean(fig, succeeded=2)
    assert fig.failed == 1 and "unexpected_failures" not in fig.extra
    assert st.result is not None
    assert st.state == "failed" and "delivered 3 times and its worker died each time" in (
        st.result.error or "")  # fmt: skip
    entries = {e["job_id"]: e for e in qclient.failed()}
    assert entries[big.job_id]["error_type"] == "TooManyDeliveries"
    assert kills == 2, f"the OOM killer ended {kills} pool children, not the 2 deliveries"
    log = w.log()
    assert log.count("signal 9 (SIGKILL)") >= 2, log[-3000:]
    assert received(w, big.job_id) == 2
    assert w.proc.poll() is None  # the main process, in the same cgroup, was spared
    new_children = pool_children(w.proc.pid)
    assert new_children and new_children != [child]
    assert str(new_children[0]) in (memory_cgroup / "cgroup.procs").read_text().split()


# -- 4. an address-space limit (RLIMIT_AS) on the pool child -------------------------------------


def address_space_case(start_worker, qclient: Client, queue: str) -> None:  # type: ignore[no-untyped-def]
    """`prlimit --as` on the warm pool child, 160 MB above its address space: torch's CPU
    allocator cannot get the big job's memory ("DefaultCPUAllocator: can't allocate memory"),
    the worker's self-test still passes, so the job fails alone as HostOutOfMemory with what to
    change; the same child then serves the next job."""
    w = start_worker("rlimit", queues=queue)
    wait_until(lambda: worker_is_ready(w), 90, "the worker warm")
    [child] = pool_children(w.proc.pid)
    status = Path(f"/proc/{child}/status").read_text()
    vm = int(status.split("VmSize:")[1].split()[0]) * 1024
    limit = vm + 160 * 2**20
    resource.prlimit(child, resource.RLIMIT_AS, (limit, resource.RLIM_INFINITY))
    big = qclient.submit(big_job())
    st = big.wait(timeout=120)
    after = qclient.submit(job(steps=2))
    fig = fault_tally.tally("pool child under RLIMIT_AS", qclient, [big.job_id, after.job_id],
                            lambda: [w.log()], expect_failed=[big.job_id],
                            vm_mb=vm >> 20, rlimit_as_mb=limit >> 20)  # fmt: skip
    fault_tally.assert_clean(fig, succeeded=1)
    assert fig.failed == 1 and "unexpected_failures" not in fig.extra
    assert st.result is not None
    assert st.result.error_type == "HostOutOfMemory", st.result.error
    error = st.result.error or ""
    assert f"out of host memory generating {BIG['images']} image(s)" in error
    assert "fewer images per prompt" in error and "more memory" in error
    assert {e["job_id"]: e for e in qclient.failed()}[big.job_id]["error_type"] == (
        "HostOutOfMemory")  # fmt: skip
    assert pool_children(w.proc.pid) == [child]  # no child died, none was replaced
    assert worker_is_ready(w)  # the gate stayed open: not the worker's fault
