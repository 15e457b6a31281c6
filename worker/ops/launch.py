"""One supervised Celery worker per GPU (or N CPU workers): restart with backoff, warm shutdown."""

from __future__ import annotations

import argparse
import logging
import os
import shutil
import signal
import subprocess
import sys
import time
from dataclasses import dataclass, field
from typing import Any

from fleet.contract import DEFAULT_QUEUE

log = logging.getLogger("worker.ops.launch")


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--gpus", help="comma-separated GPU indices to use (default: all found)")
    p.add_argument("--cpu", type=int, metavar="N", help="start N CPU workers, 1 torch thread each")
    p.add_argument("--queues", default=os.environ.get("FLEET_QUEUE", DEFAULT_QUEUE))
    p.add_argument(
        "--batch",
        type=int,
        default=int(os.environ.get("FLEET_BATCH_SIZE", "1")),
        help="batch workers: up to N compatible jobs per pipeline call "
        "(threads pool with 2N jobs in flight; see docs/batching.md)",
    )
    p.add_argument("--overlap", action="store_true",
                   help="overlapped workers: threads pool with two jobs in flight, one "
                   "generating while the other is stored (no Celery time limits there; "
                   "docs/batching.md)")  # fmt: skip
    p.add_argument("--loglevel", default="INFO")
    p.add_argument(
        "--max-restarts",
        type=int,
        default=5,
        help="give up (exit 1) when a worker failed this many times in a row",
    )
    p.add_argument("--backoff-base", type=float, default=1.0, help="first restart delay, s")
    p.add_argument("--backoff-max", type=float, default=60.0, help="longest restart delay, s")
    p.add_argument(
        "--stable-s",
        type=float,
        default=60.0,
        help="a worker that ran this long before failing starts a fresh count",
    )
    p.add_argument(
        "--grace",
        type=float,
        default=600.0,
        help="on SIGTERM/SIGINT, wait this long for running jobs, then kill",
    )
    p.add_argument(
        "celery_args",
        nargs=argparse.REMAINDER,
        help="after --: extra arguments for each `celery worker`",
    )


def detect_gpus() -> list[int]:
    """GPU indices, from nvidia-smi (no CUDA initialised in the launcher), else from torch."""
    smi = shutil.which("nvidia-smi")
    if smi:
        out = subprocess.run(  # nosec B603  # nvidia-smi found on PATH, fixed arguments
            [smi, "--query-gpu=index", "--format=csv,noheader"],
            capture_output=True,
            text=True,
            check=False,
        )
        if out.returncode == 0:
            return [int(x) for x in out.stdout.split() if x.strip().isdigit()]
    try:
        import torch

        return list(range(torch.cuda.device_count())) if torch.cuda.is_available() else []
    except ImportError:
        return []


@dataclass
class Slot:
    """One supervised worker process."""

    name: str
    env: dict[str, str]
    argv: list[str]
    proc: subprocess.Popen[bytes] | None = None
    failures: int = 0
    started_at: float = 0.0
    next_start: float = 0.0
    starts: int = field(default=0)

    def start(self) -> None:
        self.proc = subprocess.Popen(self.argv, env=self.env)  # nosec B603  # our worker argv
        self.started_at = time.monotonic()
        self.starts += 1
        log.info("started %s (pid %d, start %d)", self.name, self.proc.pid, self.starts)


def worker_argv(node: str, args: argparse.Namespace) -> list[str]:
    """The documented worker command. Batch and overlapped workers use the threads pool with
    twice the batch size in flight: one batch generates while the one before is stored."""
    extra = [a for a in (args.celery_args or []) if a != "--"]
    batch = max(1, getattr(args, "batch", 1) or 1)
    threaded = batch > 1 or getattr(args, "overlap", False)
    pool, concurrency = ("threads", 2 * batch) if threaded else ("prefork", 1)
    return [
        sys.executable, "-m", "celery", "-A", "worker.app", "worker",
        "--pool", pool, "--concurrency", str(concurrency), "--queues", args.queues,
        "--hostname", node, "--loglevel", args.loglevel,
        "--without-gossip", "--without-mingle", *extra,
    ]  # fmt: skip


def plan(args: argparse.Namespace, gpus: list[int] | None = None) -> list[Slot]:
    """The workers to run: one per selected GPU, or ``--cpu N`` CPU workers."""
    base = dict(os.environ)
    if getattr(args, "batch", 1) and args.batch > 1:
        base["FLEET_BATCH_SIZE"] = str(args.batch)
    if args.cpu:
        slots = []
        for i in range(args.cpu):
            env = {
                **base,
                "CUDA_VISIBLE_DEVICES": "",
                "FLEET_DEVICE": "cpu",
                "FLEET_TORCH_THREADS": base.get("FLEET_TORCH_THREADS", "1"),
            }
            slots.append(Slot(f"cpu{i}", env, worker_argv(f"cpu{i}@%h", args)))
        return slots
    found = detect_gpus() if gpus is None else gpus
    if args.gpus:
        wanted = [int(x) for x in args.gpus.split(",") if x.strip()]
        missing = sorted(set(wanted) - set(found))
        if missing:
            raise SystemExit(f"launch: GPU(s) {missing} not found; this machine has {found}")
        found = wanted
    if not found:
        raise SystemExit("launch: no GPU found; use --cpu N to start CPU workers")
    return [
        Slot(f"gpu{i}", {**base, "CUDA_VISIBLE_DEVICES": str(i)}, worker_argv(f"gpu{i}@%h", args))
        for i in found
    ]


class Supervisor:
    """Keeps every slot running; restarts crashed workers with exponential backoff."""

    def __init__(self, slots: list[Slot], args: argparse.Namespace) -> None:
        self.slots = slots
        self.args = args
        self.stopping = False

    def request_stop(self, signum: int, _frame: Any = None) -> None:
        if not self.stopping:
            log.info("signal %d: warm shutdown of %d worker(s)", signum, len(self.slots))
        self.stopping = True

    def run(self) -> int:
        for slot in self.slots:
            slot.start()
        while not self.stopping:
            now = time.monotonic()
            for slot in self.slots:
                if slot.proc is None:
                    if now >= slot.next_start:
                        slot.start()
                    continue
                code = slot.proc.poll()
                if code is None or self.stopping:
                    continue
                ran = now - slot.started_at
                slot.failures = 1 if ran >= self.args.stable_s else slot.failures + 1
                slot.proc = None
                if slot.failures > self.args.max_restarts:
                    log.error(
                        "%s failed %d times in a row (last exit %s); giving up",
                        slot.name,
                        slot.failures,
                        code,
                    )
                    self.shutdown()
                    return 1
                delay = min(
                    self.args.backoff_base * 2 ** (slot.failures - 1), self.args.backoff_max
                )
                slot.next_start = now + delay
                log.warning(
                    "%s exited with %s after %.1f s; restart %d in %.1f s",
                    slot.name,
                    code,
                    ran,
                    slot.failures,
                    delay,
                )
            time.sleep(0.2)
        self.shutdown()
        return 0

    def shutdown(self) -> None:
        """Warm shutdown: SIGTERM lets each worker finish its job; kill after the grace time."""
        live = [s.proc for s in self.slots if s.proc is not None and s.proc.poll() is None]
        for proc in live:
            proc.send_signal(signal.SIGTERM)
        deadline = time.monotonic() + self.args.grace
        for proc in live:
            try:
                proc.wait(max(0.0, deadline - time.monotonic()))
            except subprocess.TimeoutExpired:
                log.error(
                    "pid %d still running after %.0f s; killing it", proc.pid, self.args.grace
                )
                proc.kill()
                proc.wait()


def run_launcher(args: argparse.Namespace) -> int:
    logging.basicConfig(
        level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s"
    )
    sup = Supervisor(plan(args), args)
    signal.signal(signal.SIGTERM, sup.request_stop)
    signal.signal(signal.SIGINT, sup.request_stop)
    return sup.run()
