"""The spool: a job's generated PNGs wait on local disk while storage is away, so a retry
stores them instead of generating them again. One folder per job id under FLEET_SPOOL_DIR."""

from __future__ import annotations

import shutil
import tempfile
from pathlib import Path

from fleet.contract import JobSpec
from fleet.settings import WorkerSettings


class Spool:
    def __init__(self, settings: WorkerSettings) -> None:
        self.root = Path(settings.spool_dir or Path(tempfile.gettempdir()) / "fleet-spool")

    def path(self, job_id: str) -> Path:
        return self.root / job_id

    def read(self, spec: JobSpec) -> list[bytes] | None:
        """The job's PNGs, if a spool of exactly this job (same recipe) holds all of them."""
        spool = self.path(spec.job_id)
        marker = spool / "job.json"
        if not marker.exists() or marker.read_text() != spec.model_dump_json():
            return None
        files = [spool / f"image-{i:03d}.png" for i in range(spec.images)]
        if not all(f.exists() for f in files):
            return None
        return [f.read_bytes() for f in files]

    def write(self, spec: JobSpec, pngs: list[bytes]) -> None:
        spool = self.path(spec.job_id)
        spool.mkdir(parents=True, exist_ok=True)
        for i, data in enumerate(pngs):
            (spool / f"image-{i:03d}.png").write_bytes(data)
        (spool / "job.json").write_text(spec.model_dump_json())

    def discard(self, job_id: str) -> None:
        shutil.rmtree(self.path(job_id), ignore_errors=True)
