"""Facts about the machine the bench runs on, and how busy others kept it (/proc)."""

from __future__ import annotations

import contextlib
import os
import platform
import time
from importlib import metadata
from pathlib import Path

PACKAGES = ("torch", "diffusers", "transformers", "celery", "kombu", "redis")


def cpu_model() -> str:
    with contextlib.suppress(OSError):
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.lower().startswith("model name"):
                return line.split(":", 1)[1].strip()
    return platform.processor() or platform.machine()


def _cpu_ticks() -> list[int]:
    """The first line of /proc/stat: user nice system idle iowait irq softirq steal ..."""
    return [int(x) for x in Path("/proc/stat").read_text().split("\n")[0].split()[1:]]


def cpu_busy(seconds: float = 1.0) -> float | None:
    """Fraction of all CPUs busy over ``seconds`` (/proc/stat), i.e. load from anyone."""

    def sample() -> tuple[int, int]:
        fields = _cpu_ticks()
        return sum(fields), fields[3] + (fields[4] if len(fields) > 4 else 0)

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
    fields = _cpu_ticks()[:8]
    idle = fields[3] + fields[4]  # idle + iowait
    steal = fields[7] if len(fields) > 7 else 0
    tick = os.sysconf("SC_CLK_TCK")
    return (sum(fields) - idle - steal) / tick, steal / tick


def _process_table() -> tuple[dict[int, list[int]], dict[int, float]]:
    """Every process's children and CPU-seconds used (/proc)."""
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
    return children, used


def process_tree(root: int) -> list[int]:
    """``root`` and every process under it."""
    children, _ = _process_table()
    found, todo = [], [root]
    while todo:
        pid = todo.pop()
        found.append(pid)
        todo += children.get(pid, [])
    return found


def _own_cpu_s() -> float:
    """CPU-seconds used by this process and everything it started (workers, Redis, S3...)."""
    children, used = _process_table()
    total, todo = 0.0, [os.getpid()]
    while todo:
        pid = todo.pop()
        total += used.get(pid, 0.0)
        todo += children.get(pid, [])
    return total


def proc_cpu_s(pid: int | None) -> float | None:
    """CPU-seconds one process has used, all its threads (None: no such process)."""
    if pid is None:
        return None
    try:
        rest = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
        return (int(rest[11]) + int(rest[12])) / os.sysconf("SC_CLK_TCK")  # utime + stime
    except (OSError, IndexError, ValueError):
        return None


class CpuWatch:
    """How much of the machine other processes (not this bench's) used during a block."""

    def __enter__(self) -> CpuWatch:
        self.foreign: float | None = None
        self.steal: float | None = None
        self._start: tuple[float, float, float, float] | None = None
        with contextlib.suppress(OSError, ValueError, IndexError):
            self._start = (time.monotonic(), *_machine_busy_s(), _own_cpu_s())
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
    for name in PACKAGES:
        try:
            out[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            out[name] = "not installed"
    return out


def facts() -> dict[str, object]:
    """What describes the machine itself (how busy it was is measured separately)."""
    return {"cpu_model": cpu_model(), "cores": os.cpu_count(), "platform": platform.platform()}
