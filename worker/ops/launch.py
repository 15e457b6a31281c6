"""One supervised Celery worker per GPU (or N CPU workers): restart with backoff, warm shutdown.

Devices come from ``nvidia-smi -L``: a GPU's index there is its place in PCI bus order, and every
worker gets ``CUDA_DEVICE_ORDER=PCI_BUS_ID`` so that CUDA inside it counts the same way (CUDA's
own default is fastest first). A GPU in MIG mode gets one worker per MIG instance, pinned by the
instance's UUID. An existing ``CUDA_VISIBLE_DEVICES`` limits the launcher to the devices it names.
A worker that keeps failing is given up alone; the others keep serving (docs/operations.md).
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from fleet.contract import DEFAULT_QUEUE

log = logging.getLogger("worker.ops.launch")


#: Every worker's CUDA counts GPUs in PCI bus order, as nvidia-smi does: index N is one GPU.
PCI_ORDER = {"CUDA_DEVICE_ORDER": "PCI_BUS_ID"}

#: Worker states in the status file.
RUNNING, RESTARTING, FAILED, STOPPED = "running", "restarting", "failed", "stopped"


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument(
        "--gpus",
        help="comma-separated GPUs to use, among those found and visible: nvidia-smi indices, "
        "GPU- or MIG- UUIDs (default: all; a GPU in MIG mode means each of its MIG instances)",
    )
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
        help="give up on a worker (its GPU) when it failed this many times in a row; the "
        "others keep serving, and the launcher exits 1 when it stops (at once when none is left)",
    )
    p.add_argument(
        "--status-file",
        metavar="PATH",
        help="keep a JSON status here: each worker's GPU, state, pid, restarts and last exit, "
        "and which GPUs were given up (rewritten at every change)",
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


@dataclass(frozen=True)
class Device:
    """What one worker is pinned to: a whole GPU, or one MIG instance of a GPU."""

    index: int  #: the GPU's nvidia-smi index (its place in PCI bus order)
    uuid: str | None = None  #: GPU-...; None when only torch counted the GPUs
    name: str | None = None
    mig: int | None = None  #: the MIG device number under its GPU ("Device  N" in nvidia-smi -L)
    mig_uuid: str | None = None  #: MIG-...
    profile: str | None = None  #: the MIG profile, e.g. 1g.20gb

    @property
    def slot_name(self) -> str:
        return f"gpu{self.index}" if self.mig is None else f"gpu{self.index}-mig{self.mig}"

    @property
    def visible(self) -> str:
        """The worker's CUDA_VISIBLE_DEVICES: the index (PCI bus order), or the MIG UUID."""
        return self.mig_uuid or str(self.index)

    def describe(self) -> str:
        gpu = f"GPU {self.index}" + (f" {self.name}" if self.name else "")
        gpu += f" {self.uuid}" if self.uuid else ""
        if self.mig is None:
            return gpu
        return f"MIG {self.profile or ''} device {self.mig} {self.mig_uuid} of {gpu}"


@dataclass(frozen=True)
class Gpu:
    """One physical GPU, as ``nvidia-smi -L`` lists it, with its MIG instances if any."""

    index: int
    uuid: str | None = None
    name: str | None = None
    migs: tuple[Device, ...] = ()

    def devices(self) -> list[Device]:
        """What workers run on: each MIG instance of a GPU in MIG mode, else the whole GPU."""
        return list(self.migs) or [Device(self.index, self.uuid, self.name)]


_GPU_LINE = re.compile(r"^GPU (\d+): (.*?) \(UUID: (GPU-[^)\s]+)\)\s*$")
_MIG_LINE = re.compile(r"^\s+MIG (\S+)\s+Device\s+(\d+): \(UUID: (MIG-[^)\s]+)\)\s*$")


def parse_gpu_list(text: str) -> list[Gpu]:
    """The GPUs and MIG instances in the output of ``nvidia-smi -L``: a ``GPU i: name (UUID:
    GPU-...)`` line per GPU, in nvidia-smi's (PCI bus) order, each followed by a ``MIG <profile>
    Device j: (UUID: MIG-...)`` line per MIG instance when the GPU is in MIG mode. Lines of
    another shape are ignored."""
    gpus: list[Gpu] = []
    for line in text.splitlines():
        if m := _GPU_LINE.match(line):
            gpus.append(Gpu(int(m[1]), m[3], m[2].strip()))
        elif (m := _MIG_LINE.match(line)) and gpus:
            gpu = gpus[-1]
            mig = Device(gpu.index, gpu.uuid, gpu.name, int(m[2]), m[3], m[1])
            gpus[-1] = Gpu(gpu.index, gpu.uuid, gpu.name, (*gpu.migs, mig))
    return gpus


def detect_gpus(env: Mapping[str, str] | None = None) -> list[Gpu]:
    """The GPUs of this machine, all of them (nvidia-smi ignores CUDA_VISIBLE_DEVICES): from
    ``nvidia-smi -L``, else counted by torch in a child process. The launcher itself never
    initialises CUDA."""
    env = os.environ if env is None else env
    smi = shutil.which("nvidia-smi", path=env.get("PATH"))
    if smi:
        out = subprocess.run(  # nosec B603  # nvidia-smi found on PATH, fixed arguments
            [smi, "-L"], capture_output=True, text=True, check=False, env=dict(env), timeout=60
        )
        if out.returncode == 0:
            return parse_gpu_list(out.stdout)
        log.warning("nvidia-smi -L failed (exit %d): %s", out.returncode, out.stderr.strip())
    return torch_gpus(env)


def torch_gpus(env: Mapping[str, str]) -> list[Gpu]:
    """Without nvidia-smi: the GPUs torch sees with every GPU visible, in PCI bus order (no
    UUIDs, no MIG instances), counted in a child process."""
    child = {k: v for k, v in env.items() if k != "CUDA_VISIBLE_DEVICES"} | PCI_ORDER
    code = "import torch; print(torch.cuda.device_count() if torch.cuda.is_available() else 0)"
    out = subprocess.run(  # nosec B603  # this interpreter, fixed code
        [sys.executable, "-c", code], env=child, capture_output=True, text=True, check=False,
        timeout=300,
    )  # fmt: skip
    lines = out.stdout.split()
    if out.returncode != 0 or not lines or not lines[-1].isdigit():
        return []
    return [Gpu(i) for i in range(int(lines[-1]))]


def _matches(gpus: Sequence[Gpu], entry: str) -> list[Device]:
    """The devices one entry of a CUDA_VISIBLE_DEVICES-style list names: an index, or a GPU- or
    MIG- UUID or a prefix of one (as CUDA takes them)."""
    if entry.isdigit():
        return [d for g in gpus if g.index == int(entry) for d in g.devices()]
    if entry.startswith("GPU-"):
        named = [g for g in gpus if g.uuid and g.uuid.startswith(entry)]
        return [d for g in named for d in g.devices()] if len(named) == 1 else []
    if entry.startswith("MIG-"):
        migs = [m for g in gpus for m in g.migs if m.mig_uuid and m.mig_uuid.startswith(entry)]
        return migs if len(migs) == 1 else []
    return []


def select(gpus: Sequence[Gpu], spec: str, source: str) -> list[Device]:
    """The devices a comma-separated list names, in its order; an entry that names none (or
    more than one GPU) stops the launcher with a message saying what this machine has."""
    out: list[Device] = []
    for entry in (e.strip() for e in spec.split(",")):
        if not entry:
            continue
        found = _matches(gpus, entry)
        if not found:
            have = "; ".join(d.describe() for g in gpus for d in g.devices()) or "none"
            raise SystemExit(f"launch: {source}: GPU {entry!r} not found; this machine has: {have}")
        out += [d for d in found if d not in out]
    return out


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
    device: Device | None = None
    state: str = RUNNING
    last_exit: int | None = None

    def start(self) -> None:
        self.proc = subprocess.Popen(self.argv, env=self.env)  # nosec B603  # our worker argv
        self.started_at = time.monotonic()
        self.starts += 1
        self.state = RUNNING
        log.info("started %s (pid %d, start %d)", self.name, self.proc.pid, self.starts)

    def describe(self) -> str:
        """The worker and what it runs on, for the log: which GPU, by index and UUID."""
        where = self.device.describe() if self.device is not None else "CPU"
        visible = self.env.get("CUDA_VISIBLE_DEVICES")
        return f"{self.name} ({where}, CUDA_VISIBLE_DEVICES={visible!r})"

    def facts(self) -> dict[str, Any]:
        """This worker in the status file."""
        port = self.env.get("FLEET_METRICS_PORT")
        return {
            "name": self.name,
            "node": self.argv[self.argv.index("--hostname") + 1] if "--hostname" in self.argv
            else None,
            "state": self.state,
            "pid": self.proc.pid if self.proc is not None else None,
            "starts": self.starts,
            "failures": self.failures,
            "last_exit": self.last_exit,
            "cuda_visible_devices": self.env.get("CUDA_VISIBLE_DEVICES"),
            "metrics_port": int(port) if port else None,
            "gpu": asdict(self.device) if self.device is not None else None,
        }  # fmt: skip


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


def remove_metrics_dir_of(pid: int, env: Mapping[str, str]) -> None:
    """A worker removes its own metrics folder when it exits; one that was killed cannot, and
    its restart makes a new one: remove the dead one's (``fleet-worker-<pid>-*``)."""
    from worker.ops.metrics import OWN_DIR_PREFIX

    parent = Path(env.get("PROMETHEUS_MULTIPROC_DIR") or tempfile.gettempdir())
    for path in parent.glob(f"{OWN_DIR_PREFIX}{pid}-*"):
        shutil.rmtree(path, ignore_errors=True)


def metrics_base_port(env: Mapping[str, str]) -> int | None:
    """FLEET_METRICS_PORT as the workers read it: from the environment, else from .env."""
    if env.get("FLEET_METRICS_PORT"):
        return int(env["FLEET_METRICS_PORT"])
    from fleet.settings import WorkerSettings

    return WorkerSettings().metrics_port


def plan(
    args: argparse.Namespace,
    gpus: Sequence[Gpu | int] | None = None,
    env: Mapping[str, str] | None = None,
) -> list[Slot]:
    """The workers to run: one per selected GPU or MIG instance, or ``--cpu N`` CPU workers.

    ``env`` is the launcher's environment (default ``os.environ``). Its CUDA_VISIBLE_DEVICES, when
    set, names the only devices to use, and ``--gpus`` picks among those. Each worker gets
    CUDA_DEVICE_ORDER=PCI_BUS_ID and its own CUDA_VISIBLE_DEVICES, and, when FLEET_METRICS_PORT is
    set, its own metrics port: FLEET_METRICS_PORT + its place in this list.
    """
    base = dict(os.environ if env is None else env)
    if getattr(args, "batch", 1) and args.batch > 1:
        base["FLEET_BATCH_SIZE"] = str(args.batch)
    slots = []
    if args.cpu:
        for i in range(args.cpu):
            cpu_env = {
                **base,
                "CUDA_VISIBLE_DEVICES": "",
                "FLEET_DEVICE": "cpu",
                "FLEET_TORCH_THREADS": base.get("FLEET_TORCH_THREADS", "1"),
            }
            slots.append(Slot(f"cpu{i}", cpu_env, worker_argv(f"cpu{i}@%h", args)))
    else:
        found = detect_gpus(base) if gpus is None else [g if isinstance(g, Gpu) else Gpu(g)
                                                         for g in gpus]  # fmt: skip
        visible = base.get("CUDA_VISIBLE_DEVICES")
        if visible is None:
            devices = [d for g in found for d in g.devices()]
        else:
            devices = select(found, visible, "CUDA_VISIBLE_DEVICES")
        if args.gpus:
            wanted = select(found, args.gpus, "--gpus")
            hidden = [d for d in wanted if d not in devices]
            if hidden:
                raise SystemExit(
                    f"launch: --gpus: {', '.join(d.describe() for d in hidden)} not among the "
                    f"devices CUDA_VISIBLE_DEVICES={visible!r} leaves visible"
                )
            devices = wanted
        if not devices:
            raise SystemExit(
                "launch: no GPU found"
                + (f" (CUDA_VISIBLE_DEVICES={visible!r})" if visible is not None else "")
                + "; use --cpu N to start CPU workers"
            )
        for d in devices:
            pinned = {**base, **PCI_ORDER, "CUDA_VISIBLE_DEVICES": d.visible}
            argv = worker_argv(f"{d.slot_name}@%h", args)
            slots.append(Slot(d.slot_name, pinned, argv, device=d))
    port = metrics_base_port(base)
    if port is not None:
        for i, slot in enumerate(slots):
            slot.env["FLEET_METRICS_PORT"] = str(port + i)
    return slots


class Supervisor:
    """Keeps every slot running; restarts crashed workers with exponential backoff. A worker
    that keeps failing is given up alone (its GPU is named in the log and the status file);
    the others keep serving. Exit status: 0 when stopped with every worker serving, 1 when any
    was given up (at once when none is left)."""

    def __init__(self, slots: list[Slot], args: argparse.Namespace) -> None:
        self.slots = slots
        self.args = args
        self.stopping = False
        self.status_file = getattr(args, "status_file", None)

    def request_stop(self, signum: int, _frame: Any = None) -> None:
        if not self.stopping:
            log.info("signal %d: warm shutdown of %d worker(s)", signum, len(self.slots))
        self.stopping = True

    @property
    def given_up(self) -> list[Slot]:
        return [s for s in self.slots if s.state == FAILED]

    def run(self) -> int:
        for slot in self.slots:
            slot.start()
        self.write_status("running")
        while not self.stopping and len(self.given_up) < len(self.slots):
            if self.tick(time.monotonic()):
                self.write_status("degraded" if self.given_up else "running")
            time.sleep(0.2)
        self.write_status("stopping")
        self.shutdown()
        for slot in self.slots:
            if slot.state != FAILED:
                slot.state = STOPPED
        code = 1 if self.given_up else 0
        if self.given_up:
            gone = "; ".join(s.describe() for s in self.given_up)
            log.error("exit %d: gave up on %s", code, gone)
        self.write_status("stopped", exit_code=code)
        return code

    def tick(self, now: float) -> bool:
        """Start the workers whose restart delay is over, note the ones that exited; True when
        anything changed."""
        changed = False
        for slot in self.slots:
            if slot.state == FAILED:
                continue
            if slot.proc is None:
                if now >= slot.next_start:
                    slot.start()
                    changed = True
                continue
            code = slot.proc.poll()
            if code is None or self.stopping:
                continue
            changed = True
            ran = now - slot.started_at
            slot.failures = 1 if ran >= self.args.stable_s else slot.failures + 1
            remove_metrics_dir_of(slot.proc.pid, slot.env)
            slot.proc = None
            slot.last_exit = code
            if slot.failures > self.args.max_restarts:
                slot.state = FAILED
                serving = [s.name for s in self.slots if s.state != FAILED]
                log.error(
                    "%s failed %d times in a row (last exit %s); giving up on it; %s",
                    slot.describe(),
                    slot.failures,
                    code,
                    f"still serving: {', '.join(serving)}" if serving else "no worker left",
                )
                continue
            delay = min(self.args.backoff_base * 2 ** (slot.failures - 1), self.args.backoff_max)
            slot.next_start = now + delay
            slot.state = RESTARTING
            log.warning(
                "%s exited with %s after %.1f s; restart %d in %.1f s",
                slot.name,
                code,
                ran,
                slot.failures,
                delay,
            )
        return changed

    def write_status(self, state: str, exit_code: int | None = None) -> None:
        """The status file (when asked for): replaced whole, so a reader never sees half."""
        if not self.status_file:
            return
        status = {
            "state": state,
            "exit_code": exit_code,
            "launcher_pid": os.getpid(),
            "host": socket.gethostname(),
            "updated_at": time.time(),
            "given_up": [s.name for s in self.given_up],
            "workers": [s.facts() for s in self.slots],
        }
        path = Path(self.status_file)
        try:
            path.parent.mkdir(parents=True, exist_ok=True)
            tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
            tmp.write_text(json.dumps(status, indent=2) + "\n")
            os.replace(tmp, path)
        except OSError as exc:
            log.warning("cannot write the status file %s: %s", path, exc)

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
    slots = plan(args)
    for slot in slots:
        port = slot.env.get("FLEET_METRICS_PORT")
        log.info("%s%s", slot.describe(), f", metrics on :{port}" if port else "")
    sup = Supervisor(slots, args)
    signal.signal(signal.SIGTERM, sup.request_stop)
    signal.signal(signal.SIGINT, sup.request_stop)
    return sup.run()
