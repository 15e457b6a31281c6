"""The one-shot modes (accelerate, torchrun, spawn) on 2 CPU processes with real S3."""

from __future__ import annotations

import io
import socket
import subprocess
import sys
import time
import uuid
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import pytest
from PIL import Image

from fleet import contract
from tests.fleet_fixtures import REPO
from worker.engine.recipe import read_png_recipe
from worker.oneshot import run_key

pytestmark = pytest.mark.integration

PROMPTS = ["a red fox", "a blue bird", "a green frog", "a lighthouse", "a quiet lake", "a bridge"]
#: Near 2**64, so that the seeds of the last prompts wrap around to 0, 1, 2.
SEED = 2**64 - 3
OPTIONS = ["--width", "64", "--height", "64", "--steps", "2", "--seed", str(SEED)]
TIMEOUT = 240
#: Which prompts rank 0 gets: accelerate splits in contiguous chunks, the others take every
#: world_size-th prompt.
RANK0 = {"accelerate": {0, 1, 2}, "torchrun": {0, 2, 4}, "spawn": {0, 2, 4}}


@dataclass
class BatchRun:
    mode: str
    run_id: str
    proc: subprocess.CompletedProcess[str]
    seconds: float

    def job_id(self, index: int) -> str:
        return f"{self.run_id}-{index:05d}"


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def batch_command(mode: str, nproc: int, *args: str) -> list[str]:
    """The documented command line of each mode, with the launchers of this interpreter."""
    if mode == "accelerate":  # no --mode: the default under `accelerate launch`
        return [
            sys.executable, "-m", "accelerate.commands.launch", "--multi_gpu",
            "--num_processes", str(nproc), "--num_machines", "1", "--mixed_precision", "no",
            "--dynamo_backend", "no", "--main_process_port", str(free_port()),
            "-m", "worker.oneshot", *args,
        ]  # fmt: skip
    if mode == "torchrun":
        return [
            sys.executable, "-m", "torch.distributed.run", "--standalone",
            "--nproc_per_node", str(nproc), "-m", "worker.oneshot", "--mode", "torchrun", *args,
        ]  # fmt: skip
    if mode == "spawn":
        return [
            sys.executable,
            "-m",
            "worker.oneshot",
            "--mode",
            "spawn",
            "--nproc",
            str(nproc),
            *args,
        ]
    return [sys.executable, "-m", "worker.oneshot", *args]


def run_batch(
    fleet_env: dict, mode: str, prompts: Path, run_id: str, *extra: str, nproc: int = 2
) -> BatchRun:
    started = time.monotonic()
    proc = subprocess.run(
        batch_command(mode, nproc, "--prompts", str(prompts), "--run-id", run_id, *extra),
        cwd=REPO,
        env=fleet_env,
        capture_output=True,
        text=True,
        timeout=TIMEOUT,
    )
    return BatchRun(mode, run_id, proc, time.monotonic() - started)


@pytest.fixture(scope="module")
def prompt_file(tmp_path_factory: pytest.TempPathFactory) -> Path:
    path = tmp_path_factory.mktemp("batch") / "prompts.txt"
    lines = ["# six prompts; blank lines and comments are skipped", PROMPTS[0], "", *PROMPTS[1:]]
    path.write_text("\n".join(lines) + "\n")
    return path


@pytest.fixture(scope="module")
def mode_run(fleet_env: dict, prompt_file: Path) -> Callable[[str], BatchRun]:
    """Each mode runs once over the same file and seed; the tests share the runs."""
    done: dict[str, BatchRun] = {}

    def get(mode: str) -> BatchRun:
        if mode not in done:
            run_id = f"batch-{mode}-{uuid.uuid4().hex[:8]}"
            done[mode] = run_batch(fleet_env, mode, prompt_file, run_id, *OPTIONS)
        return done[mode]

    return get


@pytest.mark.parametrize("mode", ["accelerate", "torchrun", "spawn"])
def test_mode_generates_every_prompt_once_split_over_both_ranks(
    mode: str, mode_run: Callable[[str], BatchRun], store
) -> None:
    run = mode_run(mode)
    out = run.proc.stdout + run.proc.stderr
    assert run.proc.returncode == 0, out[-4000:]
    assert f"run {run.run_id} ({mode}, 2 process(es)): 6/6 job(s) succeeded" in run.proc.stdout

    ranks: dict[int, set[int]] = {0: set(), 1: set()}
    for i, prompt in enumerate(PROMPTS):
        job_id = run.job_id(i)
        manifest = store.get_json(contract.manifest_key(job_id))
        assert manifest is not None, f"no manifest for {job_id}"
        assert manifest["status"] == "succeeded"
        assert (manifest["mode"], manifest["run_id"], manifest["world_size"]) == (
            mode,
            run.run_id,
            2,
        )
        assert manifest["prompt"] == prompt
        seed = (SEED + i) % 2**64
        assert manifest["seeds"] == [seed]
        assert manifest["result"]["job_id"] == job_id
        assert manifest["worker"]["device"] == "cpu"
        ranks[manifest["rank"]].add(i)
        [image] = manifest["result"]["images"]
        assert image["key"] == contract.image_key(job_id, 0) and image["seed"] == seed
        data = store.get_bytes(image["key"])
        assert data is not None
        assert read_png_recipe(data)["seed"] == seed
        with Image.open(io.BytesIO(data)) as img:
            assert img.size == (64, 64)
        # One manifest and one image per job, nothing else under it.
        assert sorted(store.list_keys(contract.job_prefix(job_id))) == [
            contract.image_key(job_id, 0),
            contract.manifest_key(job_id),
        ]
        # Generated exactly once: one "done" line in the logs of all processes.
        assert out.count(f"job {job_id} (line ") == 1
        assert out.count(f"[job={job_id} ") >= 2  # JobRunner's own lines: received, stored

    # Both ranks worked, each on its share, and no prompt was done twice.
    assert ranks[0] == RANK0[mode] and ranks[1] == set(range(6)) - RANK0[mode]
    summaries = [store.get_json(run_key(run.run_id, f"summary-rank{r}.json")) for r in (0, 1)]
    done = [set(s["job_ids"]) for s in summaries]
    assert done[0] | done[1] == {run.job_id(i) for i in range(6)}
    assert not done[0] & done[1]
    for r, summary in enumerate(summaries):
        assert summary["rank"] == r and summary["world_size"] == 2 and summary["mode"] == mode
        assert done[r] == {run.job_id(i) for i in ranks[r]}
        assert summary["generated"] == summary["job_ids"] and not summary["failed"]
    combined = store.get_json(run_key(run.run_id, "summary.json"))
    assert combined["succeeded"] == combined["generated"] == 6 and not combined["failed"]
    print(f"\n{mode}: 2 processes, 6 prompts in {run.seconds:.1f} s")


def test_same_seed_gives_the_same_bytes_in_every_mode(
    mode_run: Callable[[str], BatchRun], store
) -> None:
    runs = [mode_run(mode) for mode in ("accelerate", "torchrun", "spawn")]
    assert all(r.proc.returncode == 0 for r in runs), [r.proc.stderr[-2000:] for r in runs]
    for i in range(len(PROMPTS)):
        images = [store.get_bytes(contract.image_key(r.job_id(i), 0)) for r in runs]
        assert images[0] is not None
        # accelerate made prompt 1 on rank 0, torchrun and spawn on rank 1: same bytes anyway.
        assert images[0] == images[1] == images[2], f"prompt {i} differs between modes"


def test_rerun_with_the_same_run_id_resumes_with_any_process_count(
    mode_run: Callable[[str], BatchRun], fleet_env: dict, prompt_file: Path, store
) -> None:
    first = mode_run("spawn")
    assert first.proc.returncode == 0, first.proc.stderr[-3000:]
    before = [store.get_json(contract.manifest_key(first.job_id(i))) for i in range(6)]
    again = run_batch(fleet_env, "spawn", prompt_file, first.run_id, *OPTIONS, nproc=1)
    assert again.proc.returncode == 0, again.proc.stderr[-3000:]
    assert "6/6 job(s) succeeded (0 generated, 6 already done)" in again.proc.stdout
    after = [store.get_json(contract.manifest_key(first.job_id(i))) for i in range(6)]
    assert after == before  # nothing generated or rewritten; ranks of the first run kept
    summary = store.get_json(run_key(first.run_id, "summary-rank0.json"))
    assert summary["world_size"] == 1 and summary["generated"] == []
    assert summary["skipped"] == [first.job_id(i) for i in range(6)]


@pytest.mark.parametrize("mode", ["plain", "torchrun"])
def test_bad_option_fails_before_generating_anything(
    mode: str, fleet_env: dict, prompt_file: Path, store
) -> None:
    run_id = f"bad-{uuid.uuid4().hex[:8]}"
    bad = ["--width", "100", "--height", "64", "--steps", "2"]
    run = run_batch(fleet_env, mode, prompt_file, run_id, *bad)
    assert run.proc.returncode != 0
    err = run.proc.stderr
    assert f"line 2 (job {run_id}-00000): width=100: must be a multiple of 8" in err
    assert "(set by --width)" in err and "nothing was generated" in err
    assert err.count("width=100") == 6  # once per prompt, printed by one process only
    assert store.list_keys(f"jobs/{run_id}-") == []
    assert store.list_keys(f"runs/{run_id}/") == []


def test_failed_items_make_the_run_exit_non_zero(
    fleet_env: dict, prompt_file: Path, tmp_path: Path, store
) -> None:
    run_id = f"fail-{uuid.uuid4().hex[:8]}"
    missing = str(tmp_path / "no-such-model")
    run = run_batch(fleet_env, "spawn", prompt_file, run_id, *OPTIONS, "--model", missing)
    assert run.proc.returncode == 1, run.proc.stderr[-3000:]
    assert "0/6 job(s) succeeded" in run.proc.stdout and "FAILED" in run.proc.stdout
    for rank, first in ((0, 0), (1, 1)):  # each rank fails its first job, skips the rest
        manifest = store.get_json(contract.manifest_key(f"{run_id}-{first:05d}"))
        assert manifest["status"] == "failed" and manifest["error_type"] == "ModelLoadError"
        assert manifest["rank"] == rank and manifest["mode"] == "spawn"
        summary = store.get_json(run_key(run_id, f"summary-rank{rank}.json"))
        assert list(summary["failed"]) == [f"{run_id}-{first:05d}"]
        assert summary["not_run"] == [f"{run_id}-{i:05d}" for i in (first + 2, first + 4)]
