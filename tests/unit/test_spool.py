"""The spool keeps a job's PNGs for its retries: on disk, else (a folder that cannot be written)
in the process's memory, bounded; a spool of another recipe or a partial one is no spool."""

from __future__ import annotations

import logging
from collections.abc import Iterator
from pathlib import Path

import pytest

from fleet.contract import JobSpec
from fleet.settings import WorkerSettings
from worker import spool as spool_module
from worker.spool import Spool


@pytest.fixture(autouse=True)
def empty_memory() -> Iterator[None]:
    spool_module._memory.clear()
    yield
    spool_module._memory.clear()


def spec(images: int = 2, prompt: str = "a harbour") -> JobSpec:
    return JobSpec(prompt=prompt, width=64, height=64, steps=2, images=images)


def spool_in(folder: Path) -> Spool:
    return Spool(WorkerSettings(_env_file=None, spool_dir=str(folder)))


def unwritable(folder: Path) -> Path:
    """A spool root whose parent is a file: mkdir fails with ENOTDIR, for root too."""
    (folder / "a-file").write_bytes(b"")
    return folder / "a-file" / "spool"


def test_a_writable_spool_keeps_the_pngs_on_disk_for_exactly_that_recipe(tmp_path: Path) -> None:
    s, job = spool_in(tmp_path), spec()
    assert s.write(job, [b"one", b"two"]) == "disk"
    assert sorted(p.name for p in (tmp_path / job.job_id).iterdir()) == [
        "image-000.png", "image-001.png", "job.json",
    ]  # fmt: skip
    assert s.read(job) == [b"one", b"two"]
    assert s.read(job.model_copy(update={"prompt": "another"})) is None
    (tmp_path / job.job_id / "image-001.png").unlink()
    assert s.read(job) is None  # partial: generated again
    s.discard(job.job_id)
    assert not (tmp_path / job.job_id).exists()


def test_a_spool_that_cannot_be_written_keeps_the_pngs_in_memory_and_says_what_to_fix(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    s, job = spool_in(unwritable(tmp_path)), spec()
    with caplog.at_level(logging.WARNING, logger="worker.spool"):
        assert s.write(job, [b"one", b"two"]) == "memory"
    assert "cannot be written" in caplog.text and "set FLEET_SPOOL_DIR" in caplog.text
    assert f"[job={job.job_id}]" in caplog.text
    # Another Spool of the process (the policies make their own) sees and discards it.
    other = spool_in(unwritable(tmp_path))
    assert other.read(job) == [b"one", b"two"]
    assert other.read(job.model_copy(update={"steps": 3})) is None
    other.discard(job.job_id)
    assert s.read(job) is None


def test_a_full_disk_leaves_no_partial_spool_behind(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    s, job = spool_in(tmp_path), spec()
    real = Path.write_bytes

    def full_after_one(self: Path, data: bytes) -> int:  # ENOSPC on the second image
        if self.name == "image-001.png":
            raise OSError(28, "No space left on device")
        return real(self, data)

    monkeypatch.setattr(Path, "write_bytes", full_after_one)
    assert s.write(job, [b"one", b"two"]) == "memory"
    assert not (tmp_path / job.job_id).exists()  # the first image's space given back
    assert s.read(job) == [b"one", b"two"]


def test_memory_is_bounded_oldest_dropped_first_and_too_big_is_not_kept(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(spool_module, "MEMORY_MAX_BYTES", 10)
    s = spool_in(unwritable(tmp_path))
    first, second, big = spec(1, "first"), spec(1, "second"), spec(1, "big")
    assert s.write(first, [b"x" * 6]) == "memory"
    assert s.write(second, [b"y" * 6]) == "memory"  # 12 > 10: the first goes
    assert s.read(first) is None and s.read(second) == [b"y" * 6]
    assert s.write(big, [b"z" * 11]) == "nowhere"
    assert s.read(big) is None and s.read(second) == [b"y" * 6]


def test_a_spool_that_cannot_be_read_is_no_spool(tmp_path: Path) -> None:
    s, job = spool_in(tmp_path), spec(1)
    assert s.write(job, [b"one"]) == "disk"
    image = tmp_path / job.job_id / "image-000.png"
    image.unlink()
    image.mkdir()  # reading it fails (IsADirectoryError), for root too
    assert s.read(job) is None
