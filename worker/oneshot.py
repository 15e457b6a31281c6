"""One-shot batch over a prompt file in several processes (accelerate, torchrun, spawn) into S3."""

from __future__ import annotations

import argparse
import logging
import os
import platform
import socket
import sys
import time
import uuid
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field, replace
from datetime import datetime, timedelta, timezone
from pathlib import Path
from typing import TYPE_CHECKING, Any

from pydantic import ValidationError

from fleet import contract
from fleet.errors import (
    ConfigurationError,
    FleetError,
    JobValidationError,
    ModelLoadError,
    StorageError,
)
from fleet.settings import WorkerSettings
from fleet.storage import ObjectStore

if TYPE_CHECKING:
    from worker.runner import JobRunner

log = logging.getLogger("worker.oneshot")

MODES = ("accelerate", "torchrun", "spawn")
EXIT_OK, EXIT_FAILED, EXIT_INVALID = 0, 1, 2
#: Errors after which the other items of a process cannot succeed either: stop that process.
FATAL_ERRORS = (ModelLoadError, ConfigurationError, StorageError)
#: The command-line option each job field comes from, for error messages.
OPTION_OF_FIELD = {
    "negative_prompt": "--negative",
    "width": "--width",
    "height": "--height",
    "steps": "--steps",
    "guidance": "--guidance",
    "seed": "--seed",
    "images": "--images-per-prompt",
    "scheduler": "--scheduler",
    "job_id": "--run-id",
    "model": "--model",
}


class BatchInputError(FleetError):
    """The prompt file or the options are unusable; nothing was generated."""


# ---------------------------------------------------------------------------------------------
# The plan: prompts, options and run identity, the same in every process.


@dataclass(frozen=True)
class Item:
    """One prompt of the file: its index among the prompts and its line number (1-based)."""

    index: int
    line: int
    prompt: str


@dataclass(frozen=True)
class Job:
    """A prompt turned into a fleet job (the JSON of docs/contract.md)."""

    item: Item
    spec: dict[str, Any]

    @property
    def job_id(self) -> str:
        return str(self.spec["job_id"])


@dataclass(frozen=True)
class Plan:
    """Everything a process needs to know about the run; picklable for ``spawn``."""

    prompt_file: str
    items: tuple[Item, ...]
    options: dict[str, Any]
    seed: str | int
    run_id: str
    #: Seed or run id picked at random here: every process must take rank 0's.
    needs_agreement: bool
    model: str | None = None
    model_name: str | None = None
    group_timeout_s: float = 86400.0
    log_level: str = "INFO"

    def jobs(self) -> list[Job]:
        return [Job(item, self.job_spec(item)) for item in self.items]

    def job_spec(self, item: Item) -> dict[str, Any]:
        return {
            **self.options,
            "job_id": self.job_id(item),
            "prompt": item.prompt,
            "seed": self.job_seed(item),
        }

    def job_id(self, item: Item) -> str:
        return f"{self.run_id}-{item.index:05d}"

    def job_seed(self, item: Item) -> int | str:
        """Item i uses seed + i (mod 2**64), whatever the process count; a bad seed stays as
        given so that validation names it."""
        text = str(self.seed).strip()
        if not (text.isascii() and text.isdigit()) or int(text) >= contract.SEED_MODULUS:
            return self.seed
        return contract.seed_for(int(text), item.index)

    def validate(self, settings: WorkerSettings) -> None:
        """Check every job against the fleet's limits before anything is generated."""
        if not self.items:
            raise BatchInputError(
                f"no prompts in {self.prompt_file} "
                "(blank lines and lines starting with '#' are skipped); nothing to generate"
            )
        if not (self.model or settings.model):
            raise BatchInputError("no model: give --model or set FLEET_MODEL")
        limits = settings.limits()
        bad: list[str] = []
        for job in self.jobs():
            try:
                contract.validate_job(job.spec, limits)
            except JobValidationError as exc:
                bad.extend(_describe_problems(job, exc))
        if bad:
            shown = bad[:10] + ([f"  ... and {len(bad) - 10} more"] if len(bad) > 10 else [])
            raise BatchInputError(
                f"invalid job(s) in {self.prompt_file}; nothing was generated:\n" + "\n".join(shown)
            )

    def settings_for(self, device: str) -> WorkerSettings:
        """This process's worker settings: FLEET_* env, pinned to the rank's device."""
        base = WorkerSettings()
        overrides: dict[str, Any] = {"device": device}
        if base.placement != "pinned":
            log.warning(
                "FLEET_PLACEMENT=%s ignored: one pinned pipeline per process", base.placement
            )
            overrides.update(placement="pinned", max_memory=None)
        if device == "cpu" and base.torch_threads is None:
            overrides["torch_threads"] = 1  # one process per core; FLEET_TORCH_THREADS overrides
        if self.model and self.model != base.model:
            overrides.update(model=self.model, model_name=self.model_name or self.model)
        elif self.model_name:
            overrides["model_name"] = self.model_name
        return WorkerSettings(**overrides)


def _describe_problems(job: Job, exc: JobValidationError) -> list[str]:
    out = []
    for name, value, message in exc.problems or [("job", None, str(exc))]:
        text = repr(value)
        text = text if len(text) <= 60 else text[:57] + "..."
        where = OPTION_OF_FIELD.get(name.split(".")[0])
        hint = f" (set by {where})" if where else ""
        out.append(f"  line {job.item.line} (job {job.job_id}): {name}={text}: {message}{hint}")
    return out


def read_prompts(path: str) -> tuple[Item, ...]:
    """One prompt a line; blank lines and lines starting with '#' are skipped."""
    try:
        text = Path(path).read_text(encoding="utf-8")
    except OSError as exc:
        raise BatchInputError(f"cannot read the prompt file {path}: {exc}") from None
    items: list[Item] = []
    for number, raw in enumerate(text.splitlines(), start=1):
        prompt = raw.strip()
        if prompt and not prompt.startswith("#"):
            items.append(Item(index=len(items), line=number, prompt=prompt))
    return tuple(items)


def plan_from_args(args: argparse.Namespace) -> Plan:
    options: dict[str, Any] = {
        "negative_prompt": args.negative,
        "width": args.width,
        "height": args.height,
        "steps": args.steps,
        "guidance": args.guidance,
        "images": args.images,
        "scheduler": args.scheduler,
    }
    return Plan(
        prompt_file=args.prompts,
        items=read_prompts(args.prompts),
        options=options,
        seed=args.seed if args.seed is not None else contract.random_seed(),
        run_id=args.run_id or uuid.uuid4().hex,
        needs_agreement=args.seed is None or args.run_id is None,
        model=args.model,
        model_name=args.model_name,
        group_timeout_s=args.group_timeout,
        log_level=args.log_level,
    )


# ---------------------------------------------------------------------------------------------
# The process group: rank, world size, device, and the few collectives a run needs.


@dataclass
class Group:
    """The processes of one run. Collectives go over gloo (a side group when the default group is
    NCCL), since they carry small Python objects."""

    mode: str
    rank: int = 0
    world_size: int = 1
    local_rank: int = 0
    device: str = "cpu"
    backend: str | None = None
    state: Any = None  # accelerate.PartialState in accelerate mode
    control: Any = None  # process group for the collectives; None: the default group

    @property
    def distributed(self) -> bool:
        import torch.distributed as dist

        return self.world_size > 1 and dist.is_available() and dist.is_initialized()

    def share(self, jobs: list[Job]) -> list[Job]:
        """This process's jobs: accelerate's contiguous split, else every world_size-th job."""
        if self.state is not None:
            with self.state.split_between_processes(jobs) as mine:
                return list(mine)
        return jobs[self.rank :: self.world_size]

    def broadcast(self, obj: Any) -> Any:
        if not self.distributed:
            return obj
        import torch.distributed as dist

        box = [obj]
        dist.broadcast_object_list(box, src=0, group=self.control)
        return box[0]

    def gather(self, obj: Any) -> list[Any]:
        if not self.distributed:
            return [obj]
        import torch.distributed as dist

        out: list[Any] = [None] * self.world_size
        dist.all_gather_object(out, obj, group=self.control)
        return out

    def barrier(self) -> None:
        if self.distributed:
            import torch.distributed as dist

            dist.barrier(group=self.control)

    def close(self) -> None:
        import torch.distributed as dist

        if dist.is_available() and dist.is_initialized():
            dist.destroy_process_group()

    def finish_setup(self, timeout_s: float) -> Group:
        """Add a gloo group for the collectives when the default one is NCCL."""
        import torch.distributed as dist

        if self.distributed and dist.get_backend() != "gloo":
            self.control = dist.new_group(backend="gloo", timeout=timedelta(seconds=timeout_s))
        return self


def _use_cuda() -> bool:
    """CUDA unless none is visible or FLEET_DEVICE=cpu asks for the CPU."""
    import torch

    return torch.cuda.is_available() and WorkerSettings().device.strip().lower() != "cpu"


def join_accelerate(plan: Plan) -> Group:
    """accelerate.PartialState reads what `accelerate launch` (or torchrun) set up.

    ``cpu=True`` without CUDA: plain ``PartialState()`` on a CPU machine reports one process
    (DistributedType.NO) in every process, so each would do every prompt.
    """
    from accelerate import PartialState

    cuda = _use_cuda()
    state = PartialState(cpu=not cuda, timeout=timedelta(seconds=plan.group_timeout_s))
    local = state.local_process_index
    return Group(
        mode="accelerate",
        rank=state.process_index,
        world_size=state.num_processes,
        local_rank=local,
        device=f"cuda:{local}" if cuda else "cpu",
        backend=state.backend,
        state=state,
    ).finish_setup(plan.group_timeout_s)


def join_torchrun(plan: Plan) -> Group:
    """torch.distributed from the variables torchrun sets (RANK, WORLD_SIZE, LOCAL_RANK, ...)."""
    missing = [
        v for v in ("RANK", "WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT") if v not in os.environ
    ]
    if missing:
        raise ConfigurationError(
            f"--mode torchrun needs the variables torchrun sets ({', '.join(missing)} missing): "
            "start it with `torchrun --nproc_per_node N -m worker.oneshot --mode torchrun ...`"
        )
    rank, world = int(os.environ["RANK"]), int(os.environ["WORLD_SIZE"])
    local = int(os.environ.get("LOCAL_RANK", rank))
    return _init_torch_group("torchrun", rank, world, local, plan.group_timeout_s)


def _init_torch_group(mode: str, rank: int, world: int, local: int, timeout_s: float) -> Group:
    import torch
    import torch.distributed as dist

    cuda = _use_cuda()
    if cuda:
        if local >= torch.cuda.device_count():
            raise ConfigurationError(
                f"process {rank} has local rank {local} but only {torch.cuda.device_count()} "
                "CUDA device(s) are visible: start at most one process per GPU"
            )
        torch.cuda.set_device(local)
    backend = "nccl" if cuda else "gloo"
    dist.init_process_group(
        backend, rank=rank, world_size=world, timeout=timedelta(seconds=timeout_s)
    )
    return Group(
        mode=mode,
        rank=rank,
        world_size=world,
        local_rank=local,
        device=f"cuda:{local}" if cuda else "cpu",
        backend=backend,
    ).finish_setup(timeout_s)


def launch_spawn(plan: Plan, nproc: int) -> int:
    """torch.multiprocessing.spawn: one process per GPU (or --nproc CPU processes), join=True."""
    import torch
    import torch.multiprocessing as mp

    if _use_cuda() and nproc > torch.cuda.device_count():
        raise ConfigurationError(
            f"--nproc {nproc} but only {torch.cuda.device_count()} CUDA device(s) are visible"
        )
    os.environ.setdefault("MASTER_ADDR", "127.0.0.1")
    os.environ.setdefault("MASTER_PORT", str(_free_port()))
    codes = mp.get_context("spawn").Array("i", [EXIT_FAILED] * nproc)
    log.info("spawning %d process(es), MASTER_PORT=%s", nproc, os.environ["MASTER_PORT"])
    try:
        mp.spawn(_spawn_main, args=(nproc, plan, codes), nprocs=nproc, join=True)
    except Exception as exc:  # a process died: spawn stopped the others
        log.error("spawned processes failed: %s", exc)
        return EXIT_FAILED
    return max(codes[:])


def _spawn_main(rank: int, world: int, plan: Plan, codes: Any) -> None:
    """Entry point of each spawned process."""
    setup_logging(plan.log_level, f"rank {rank}/{world}")
    group = _init_torch_group("spawn", rank, world, rank, plan.group_timeout_s)
    codes[rank] = run_rank(group, plan)


def _free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


# ---------------------------------------------------------------------------------------------
# The work of one process.


class RunStore(ObjectStore):
    """The fleet's object store; manifests written through it get this run's fields.

    JobRunner writes each manifest with ``put_json``; stamping them here adds the rank without
    copying JobRunner's logic. ``written`` lists the manifests this process wrote, so a job whose
    manifest it did not write was already complete (a resumed run).
    """

    def __init__(self, settings: WorkerSettings) -> None:
        super().__init__(settings)
        self.prefix = settings.s3_prefix
        self.stamps: dict[str, dict[str, Any]] = {}
        self.written: set[str] = set()

    def put_json(self, key: str, obj: Any) -> None:
        job_id = self._manifest_of(key, obj)
        super().put_json(key, {**obj, **self.stamps.get(job_id, {})} if job_id else obj)
        if job_id:
            self.written.add(job_id)

    def put_json_if(self, key: str, obj: Any, etag: str | None) -> bool:
        """Failure manifests are written conditionally (worker.records.write_failure)."""
        job_id = self._manifest_of(key, obj)
        stamped = {**obj, **self.stamps.get(job_id, {})} if job_id else obj
        written = super().put_json_if(key, stamped, etag)
        if job_id and written:
            self.written.add(job_id)
        return written

    def _manifest_of(self, key: str, obj: Any) -> str | None:
        """The job id when ``key`` is that job's manifest."""
        job_id = obj.get("job_id") if isinstance(obj, dict) else None
        if isinstance(job_id, str) and key == contract.manifest_key(job_id, self.prefix):
            return job_id
        return None


@dataclass
class RankReport:
    """What one process did: written to S3 as runs/<run_id>/summary-rank<r>.json."""

    run_id: str
    mode: str
    rank: int
    world_size: int
    device: str
    host: str
    prompt_file: str
    #: Jobs of this process that are complete in S3 (generated now or already done).
    job_ids: list[str] = field(default_factory=list)
    generated: list[str] = field(default_factory=list)
    skipped: list[str] = field(default_factory=list)
    failed: dict[str, str] = field(default_factory=dict)
    not_run: list[str] = field(default_factory=list)
    images: int = 0
    started_at: str = ""
    finished_at: str = ""
    elapsed_s: float = 0.0
    summary_key: str | None = None
    summary_error: str | None = None

    @property
    def ok(self) -> bool:
        return not self.failed and not self.not_run and self.summary_error is None


def run_rank(group: Group, plan: Plan) -> int:
    """Agree on the run, do this process's share, report; the exit code of this process."""
    set_rank_label(f"rank {group.rank}/{group.world_size}")
    try:
        if plan.needs_agreement:
            run_id, seed = group.broadcast((plan.run_id, plan.seed))
            plan = replace(plan, run_id=run_id, seed=seed, needs_agreement=False)
        mine = group.share(plan.jobs())
        log.info(
            "%s mode, device %s, backend %s: %d of %d job(s), run %s",
            group.mode, group.device, group.backend, len(mine), len(plan.items), plan.run_id,
        )  # fmt: skip
        settings = plan.settings_for(group.device)
        store = RunStore(settings)
        report = work(group, plan, mine, settings, store)
        reports = [RankReport(**r) for r in group.gather(asdict(report))]
        if group.rank == 0:
            finish_run(plan, group, reports, store)
        group.barrier()  # nobody exits (a launcher would stop the others) before rank 0 is done
    finally:
        group.close()
    return EXIT_OK if report.ok else EXIT_FAILED


def work(
    group: Group, plan: Plan, mine: list[Job], settings: WorkerSettings, store: RunStore
) -> RankReport:
    """Run this process's jobs through the fleet's JobRunner, then write its summary."""
    from worker.engine.engine import Engine
    from worker.runner import JobRunner

    started = time.perf_counter()
    report = RankReport(
        run_id=plan.run_id,
        mode=group.mode,
        rank=group.rank,
        world_size=group.world_size,
        device=group.device,
        host=platform.node(),
        prompt_file=plan.prompt_file,
        started_at=_now(),
    )
    runner = JobRunner(settings, Engine(settings), store)
    for n, job in enumerate(mine, start=1):
        store.stamps[job.job_id] = {
            "mode": group.mode,
            "rank": group.rank,
            "world_size": group.world_size,
            "run_id": plan.run_id,
            "prompt_file": plan.prompt_file,
            "prompt_line": job.item.line,
        }
        where = f"[{n}/{len(mine)}] job {job.job_id} (line {job.item.line})"
        item_started = time.perf_counter()
        try:
            result = _run_with_retries(runner, job, settings)
        except FATAL_ERRORS as exc:
            log.error("%s failed: %s; stopping this process", where, exc)
            report.failed[job.job_id] = f"{type(exc).__name__}: {exc}"
            report.not_run = [j.job_id for j in mine[n:]]
            break
        except Exception as exc:
            unexpected = not isinstance(exc, FleetError)
            log.error("%s failed: %s: %s", where, type(exc).__name__, exc, exc_info=unexpected)
            report.failed[job.job_id] = f"{type(exc).__name__}: {exc}"
            continue
        images = len(result.get("images", []))
        report.job_ids.append(job.job_id)
        report.images += images
        if job.job_id in store.written:
            report.generated.append(job.job_id)
            elapsed = time.perf_counter() - item_started
            log.info("%s done: %d image(s) in %.2f s", where, images, elapsed)
        else:
            report.skipped.append(job.job_id)
            log.info("%s already complete in S3; skipped", where)
    report.finished_at = _now()
    report.elapsed_s = round(time.perf_counter() - started, 3)
    key = run_key(plan.run_id, f"summary-rank{group.rank}.json", settings.s3_prefix)
    try:
        store.put_json(key, asdict(report))
        report.summary_key = key
    except StorageError as exc:
        log.error("could not write %s: %s", key, exc)
        report.summary_error = str(exc)
    return report


def _run_with_retries(runner: JobRunner, job: Job, settings: WorkerSettings) -> dict[str, Any]:
    """JobRunner.run, retried with backoff while S3 fails, for FLEET_STORAGE_RETRY_WINDOW_S as
    the fleet's task does (the spool keeps the generated PNGs meanwhile)."""
    attempt, first_failure = 0, None
    while True:
        try:
            return runner.run(job.spec, task_id=f"batch-{job.job_id}")
        except StorageError as exc:
            now = time.monotonic()
            first_failure = now if first_failure is None else first_failure
            if now - first_failure > settings.storage_retry_window_s:
                raise
            attempt += 1
            delay = min(2.0**attempt, float(settings.storage_retry_backoff_max_s))
            log.warning(
                "job %s: storage failed (%s); retry %d in %.0f s", job.job_id, exc, attempt, delay
            )
            time.sleep(delay)


def finish_run(plan: Plan, group: Group, reports: list[RankReport], store: RunStore) -> None:
    """Rank 0: the combined summary, printed and written to runs/<run_id>/summary.json."""
    failed = {k: v for r in reports for k, v in r.failed.items()}
    summary: dict[str, Any] = {
        "run_id": plan.run_id,
        "mode": group.mode,
        "world_size": group.world_size,
        "prompt_file": plan.prompt_file,
        "jobs": len(plan.items),
        "succeeded": sum(len(r.job_ids) for r in reports),
        "generated": sum(len(r.generated) for r in reports),
        "skipped": sum(len(r.skipped) for r in reports),
        "failed": failed,
        "not_run": [j for r in reports for j in r.not_run],
        "images": sum(r.images for r in reports),
        "ranks": [asdict(r) for r in reports],
        "finished_at": _now(),
    }
    key = run_key(plan.run_id, "summary.json", store.prefix)
    try:
        store.put_json(key, summary)
    except StorageError as exc:
        log.error("could not write %s: %s", key, exc)
    lines = [
        f"run {plan.run_id} ({group.mode}, {group.world_size} process(es)): "
        f"{summary['succeeded']}/{summary['jobs']} job(s) succeeded "
        f"({summary['generated']} generated, {summary['skipped']} already done), "
        f"{len(failed)} failed, {len(summary['not_run'])} not run; {summary['images']} image(s)"
    ]
    for r in reports:
        lines.append(
            f"  rank {r.rank} on {r.device} ({r.host}): {len(r.job_ids)} done "
            f"({len(r.generated)} generated, {len(r.skipped)} skipped), {len(r.failed)} failed "
            f"in {r.elapsed_s:.1f} s"
        )
    lines += [f"  FAILED {job_id}: {error}" for job_id, error in failed.items()]
    lines.append(f"  summary: {store.uri(key)}")
    print("\n".join(lines), flush=True)


def run_key(run_id: str, name: str, prefix: str = "") -> str:
    """runs/<run_id>/<name> under the fleet's key prefix (beside jobs/)."""
    prefix = prefix.strip("/")
    return f"{prefix + '/' if prefix else ''}runs/{run_id}/{name}"


def _now() -> str:
    return datetime.now(timezone.utc).isoformat()


# ---------------------------------------------------------------------------------------------
# Command line and logging.


class _RankFilter(logging.Filter):
    label = "main"

    def filter(self, record: logging.LogRecord) -> bool:
        record.rank = _RankFilter.label
        return True


def set_rank_label(label: str) -> None:
    _RankFilter.label = label


def setup_logging(level: str, label: str) -> None:
    set_rank_label(label)
    handler = logging.StreamHandler(sys.stderr)
    handler.addFilter(_RankFilter())
    handler.setFormatter(
        logging.Formatter("%(asctime)s [%(rank)s] %(levelname)s %(name)s: %(message)s")
    )
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(level.upper())
    for noisy in ("botocore", "boto3", "urllib3", "s3transfer"):
        logging.getLogger(noisy).setLevel(logging.WARNING)


def _env_rank() -> int | None:
    value = os.environ.get("RANK")
    return int(value) if value and value.isdigit() else None


def default_mode() -> str:
    """accelerate under `accelerate launch` (and by default), torchrun under plain torchrun."""
    if any(k.startswith("ACCELERATE_") for k in os.environ):
        return "accelerate"
    if "TORCHELASTIC_RUN_ID" in os.environ:
        return "torchrun"
    return "accelerate"


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="python -m worker.oneshot",
        description="Generate one job per prompt of a file in several processes, one per GPU, "
        "into the fleet's S3 layout (jobs/<run_id>-<i>/...). See docs/one-shot.md.",
    )
    p.add_argument(
        "--prompts",
        required=True,
        metavar="FILE",
        help="one prompt a line; blank lines and lines starting with '#' are skipped",
    )
    p.add_argument(
        "--mode",
        choices=MODES,
        help="accelerate (default; under `accelerate launch`), torchrun (under "
        "torchrun) or spawn (torch.multiprocessing.spawn of --nproc processes)",
    )
    p.add_argument(
        "--nproc", type=int, help="spawn only: processes to start (default: visible GPUs, else 1)"
    )
    p.add_argument(
        "--run-id",
        help="job ids are RUN_ID-<i>; the same id resumes a run (default: a new uuid hex)",
    )
    p.add_argument("--negative", default="", help="negative prompt for every job")
    p.add_argument("--width", type=int, default=512)
    p.add_argument("--height", type=int, default=512)
    p.add_argument("--steps", type=int, default=30)
    p.add_argument("--guidance", type=float, default=7.5)
    p.add_argument(
        "--seed",
        help="unsigned 64-bit base seed: prompt i uses seed+i "
        "(image j of it seed+i+j); default random",
    )
    p.add_argument("--images-per-prompt", type=int, default=1, dest="images")
    p.add_argument(
        "--scheduler", default="default", help=f"one of: {', '.join(contract.SCHEDULERS)}"
    )
    p.add_argument("--model", help="hub id or local folder (default: FLEET_MODEL)")
    p.add_argument(
        "--model-name",
        help="the model's name in recipes and manifests "
        "(default: FLEET_MODEL_NAME, or --model when given)",
    )
    p.add_argument(
        "--group-timeout",
        type=float,
        default=86400.0,
        metavar="SECONDS",
        help="how long a process waits for the others (default: 1 day)",
    )
    p.add_argument("--log-level", default="INFO", help="INFO: one line per job and process")
    return p  # fmt: skip


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    rank = _env_rank()
    setup_logging(args.log_level, "main" if rank is None else f"rank {rank}")
    mode = args.mode or default_mode()
    try:
        if args.nproc is not None and mode != "spawn":
            raise BatchInputError(
                "--nproc is for --mode spawn; under a launcher give its process count "
                "(accelerate launch --num_processes N, torchrun --nproc_per_node N)"
            )
        if args.nproc is not None and args.nproc < 1:
            raise BatchInputError("--nproc must be at least 1")
        plan = plan_from_args(args)
        plan.validate(WorkerSettings())
    except (FleetError, ValidationError) as exc:
        if rank in (None, 0):  # every process of a launcher checks; one says why
            print(f"error: {exc}", file=sys.stderr, flush=True)
        else:
            # A launcher stops every process once one exits: give rank 0 the time to say why.
            time.sleep(3.0)
        return EXIT_INVALID
    try:
        if mode == "spawn":
            return launch_spawn(plan, args.nproc or _default_nproc())
        group = join_accelerate(plan) if mode == "accelerate" else join_torchrun(plan)
    except ConfigurationError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return EXIT_INVALID
    return run_rank(group, plan)


def _default_nproc() -> int:
    import torch

    return torch.cuda.device_count() if _use_cuda() else 1


if __name__ == "__main__":
    sys.exit(main())
