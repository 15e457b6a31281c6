"""The spool: a job's generated PNGs wait on local disk while storage is away, so a retry
stores them instead of generating them again. One folder per job id under FLEET_SPOOL_DIR.

A spool folder that cannot be written (the disk full, a read-only file system, a folder the
worker may not write) does not fail the job nor lose its images: they are kept in this process's
memory for the job's retries instead (bounded by :data:`MEMORY_MAX_BYTES`, the oldest dropped
first), with a warning that says what to fix. A retry runs in the same process with the fleet's
prefork worker (one pool child) and with threads pools; one that runs elsewhere generates again.
"""

from __future__ import annotations

import logging
import shutil
import tempfile
import threading
from collections import OrderedDict
from pathlib import Path

from fleet.contract import JobSpec
from fleet.settings import WorkerSettings

log = logging.getLogger(__name__)

#: PNGs kept in memory when the spool folder cannot be written, all jobs of the process together.
MEMORY_MAX_BYTES = 256 * 2**20

#: job id -> (the job's recipe as JSON, its PNGs); shared by every Spool of the process (the
#: runner writes, the policies discard with a Spool of their own).
_memory: OrderedDict[str, tuple[str, list[bytes]]] = OrderedDict()
_memory_lock = threading.Lock()


class Spool:
    def __init__(self, settings: WorkerSettings) -> None:
        self.root = Path(settings.spool_dir or Path(tempfile.gettempdir()) / "fleet-spool")

    def path(self, job_id: str) -> Path:
        return self.root / job_id

    def read(self, spec: JobSpec) -> list[bytes] | None:
        """The job's PNGs, if the spool (memory or disk) holds all of exactly this job's (same
        recipe). A spool that cannot be read is no spool: the job is generated again."""
        recipe = spec.model_dump_json()
        with _memory_lock:
            kept = _memory.get(spec.job_id)
        if kept is not None and kept[0] == recipe and len(kept[1]) == spec.images:
            return list(kept[1])
        spool = self.path(spec.job_id)
        marker = spool / "job.json"
        try:
            if not marker.exists() or marker.read_text() != recipe:
                return None
            files = [spool / f"image-{i:03d}.png" for i in range(spec.images)]
            if not all(f.exists() for f in files):
                return None
            return [f.read_bytes() for f in files]
        except OSError as exc:
            log.warning("[job=%s] cannot read its spool %s (%s); generating it again",
                        spec.job_id, spool, exc)  # fmt: skip
            return None

    def write(self, spec: JobSpec, pngs: list[bytes]) -> str:
        """Keep the job's PNGs for its retries: on disk, else in memory. Returns where ("disk",
        "memory", or "nowhere" when they do not fit in memory either)."""
        spool = self.path(spec.job_id)
        try:
            spool.mkdir(parents=True, exist_ok=True)
            for i, data in enumerate(pngs):
                (spool / f"image-{i:03d}.png").write_bytes(data)
            (spool / "job.json").write_text(spec.model_dump_json())  # last: marks it complete
            return "disk"
        except OSError as exc:
            shutil.rmtree(spool, ignore_errors=True)  # what a full disk took of it, back
            return self._keep_in_memory(spec, pngs, exc)

    def _keep_in_memory(self, spec: JobSpec, pngs: list[bytes], exc: OSError) -> str:
        size = sum(len(p) for p in pngs)
        why = f"spool dir {self.root} cannot be written ({exc.strerror or exc})"
        fix = "free space on it or set FLEET_SPOOL_DIR to a writable folder"
        if size > MEMORY_MAX_BYTES:
            log.error("[job=%s] %s, and its %d PNG(s) (%d KiB) exceed the %d MiB kept in "
                      "memory: its retry generates them again; %s", spec.job_id, why, len(pngs),
                      size // 1024, MEMORY_MAX_BYTES // 2**20, fix)  # fmt: skip
            return "nowhere"
        with _memory_lock:
            _memory.pop(spec.job_id, None)
            _memory[spec.job_id] = (spec.model_dump_json(), list(pngs))
            dropped = []
            while sum(len(p) for _, ps in _memory.values() for p in ps) > MEMORY_MAX_BYTES:
                dropped.append(_memory.popitem(last=False)[0])
        log.warning("[job=%s] %s: keeping its %d PNG(s) (%d KiB) in memory for its retries; %s",
                    spec.job_id, why, len(pngs), size // 1024, fix)  # fmt: skip
        if dropped:
            log.warning("memory spool full (%d MiB): dropped the PNGs of %s, whose retries "
                        "generate them again", MEMORY_MAX_BYTES // 2**20, dropped)  # fmt: skip
        return "memory"

    def discard(self, job_id: str) -> None:
        with _memory_lock:
            _memory.pop(job_id, None)
        shutil.rmtree(self.path(job_id), ignore_errors=True)
