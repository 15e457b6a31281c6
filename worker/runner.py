"""The worker loop for one job: validate, generate, store with its recipe, report."""

from __future__ import annotations

import logging
import time
from collections.abc import Callable, MutableMapping
from typing import Any

from fleet import contract
from fleet.contract import JobResult, JobSpec, validate_job
from fleet.errors import (
    DeviceOutOfMemory,
    FleetError,
    ImageFlagged,
    JobCancelled,
    JobValidationError,
    StorageError,
)
from fleet.settings import WorkerSettings
from fleet.storage import ObjectStore
from worker.engine.batcher import Batcher
from worker.engine.engine import Engine, Generated, StepCallback
from worker.engine.recipe import build_manifest, image_recipe, read_png_nsfw
from worker.policies import oom_fallback
from worker.records import raw_failure_manifest, write_failure
from worker.spool import Spool
from worker.storer import ImageOut, StoreJob, StoringChild, store_job

log = logging.getLogger(__name__)

ProgressCallback = Callable[[dict[str, Any]], None]


class JobLog(logging.LoggerAdapter):  # type: ignore[type-arg]
    """Puts the job id and task id in front of every line of the worker loop, and job id, task
    id, queue and device on the record for JSON logs (FLEET_LOG_FORMAT=json)."""

    def process(self, msg: Any, kwargs: MutableMapping[str, Any]) -> tuple[Any, Any]:
        extra = dict(self.extra or {})
        kwargs["extra"] = {**extra, **kwargs.get("extra", {})}
        return f"[job={extra.get('job_id')} task={extra.get('task_id')}] {msg}", kwargs


def log_id(job_id: object) -> str:
    """A job id as its log lines show it: itself when it is a valid id (greppable as
    ``[job=<id> ``), else quoted and bounded, so a NUL, a newline or a megabyte sent as an id
    never reaches the log as it is."""
    if isinstance(job_id, str) and contract.JOB_ID_PATTERN.match(job_id):
        return job_id
    return repr(contract.quote_value(job_id))


class JobRunner:
    """Runs jobs on one warm engine and stores their images under the contract's key layout."""

    def __init__(
        self,
        settings: WorkerSettings,
        engine: Engine,
        store: ObjectStore,
        batcher: Batcher | None = None,
        gives_back: bool = False,
        storer: StoringChild | None = None,
    ) -> None:
        self.settings = settings
        self.engine = engine
        self.store = store
        #: With a batcher (batch workers), jobs from many task threads share pipeline calls.
        self.batcher = batcher
        self.spool = Spool(settings)
        #: A queue worker gives a job back on a worker error (it is not the job's failure);
        #: a one-shot run has no queue to give it back to, so it records the failure.
        self.gives_back = gives_back
        #: With a storing child (FLEET_STORE_PROCESS), PNG encoding and uploads happen there.
        self.storer = storer

    def run(
        self,
        job: Any,
        task_id: str | None = None,
        on_progress: ProgressCallback | None = None,
        node: str | None = None,
        is_cancelled: Callable[[], bool] | None = None,
        queue: str | None = None,
        first_attempt: bool = False,
    ) -> dict[str, Any]:
        """Run one job and return its JobResult as JSON-ready dict. Raises FleetError on failure.

        ``first_attempt``: the task knows this is the job's first delivery of its first attempt
        (delivery counter in Redis), so nothing can be stored for it yet and no failure entry can
        exist: the S3 lookup before and the failure-index cleanup after are skipped."""
        job_id = job.get("job_id") if isinstance(job, dict) else None
        device = self.engine.placement.device if self.engine.placement else self.settings.device
        shown = log_id(job_id)
        jlog = JobLog(log, {"job_id": shown, "task_id": task_id, "queue": queue, "device": device})
        started = time.perf_counter()
        # Its id first: with a usable id, a job that already succeeded is returned as it is,
        # whatever else the message says now (success beats failure).
        if isinstance(job_id, str) and contract.JOB_ID_PATTERN.match(job_id) and not first_attempt:
            done = self._already_done(job_id, contract.raw_job_prefix(self.settings.s3_prefix, job))
            if done is not None:
                jlog.info("already complete in storage; not generating again")
                return done
        try:
            spec = validate_job(job, self.settings.limits())
        except JobValidationError as exc:
            self.record_invalid(job_id, job, exc, jlog)
            raise
        jlog.info(
            "received: %d image(s) %dx%d, %d steps",
            spec.images,
            spec.width,
            spec.height,
            spec.steps,
        )
        try:
            self._check_model(spec)
        except JobValidationError as exc:
            self.record_failure(spec, exc, jlog)
            raise

        if is_cancelled is not None and is_cancelled():
            return self.record_cancelled(spec, jlog, "cancelled before it started")
        seed_derived = isinstance(job, dict) and "seed" not in job

        try:
            images, worker_info, timings = self._generate(spec, jlog, on_progress, is_cancelled)
            if node:
                worker_info["node"] = node  # the Celery node name, e.g. gpu0@host
            try:
                result = self._store(
                    spec, images, worker_info, timings, started, jlog,
                    clear=not first_attempt, seed_derived=seed_derived,
                )  # fmt: skip
            except StorageError:
                # Retried by the task with backoff; the spool keeps the images meanwhile, so
                # they are not generated again (written only now: the usual path skips disk).
                self.spool.write(spec, [image.encoded() for image in images])
                raise
        except JobCancelled as exc:
            self.engine.release_memory()
            return self.record_cancelled(spec, jlog, f"cancelled while generating: {exc}")
        except DeviceOutOfMemory as exc:
            if oom_fallback(self.settings, queue) is not None:
                jlog.warning("%s; sending it to %s", exc, self.settings.oom_fallback_queue)
                raise  # the task reroutes it: not a failure yet
            self.record_failure(spec, exc, jlog)
            raise
        except FleetError as exc:
            if exc.disposition == "worker" and self.gives_back:
                raise  # not the job's failure: it goes back to its queue (worker.policies)
            self.record_failure(spec, exc, jlog)
            raise

        self.spool.discard(spec.job_id)
        return result

    # -- steps -----------------------------------------------------------------------------------

    def _check_model(self, spec: JobSpec) -> None:
        served = self.settings.served_model
        if spec.model is not None and spec.model != served:
            raise JobValidationError(
                [
                    (
                        "model",
                        contract.quote_value(spec.model),
                        f"this worker serves {served!r}; route that model to a "
                        "queue whose workers serve it (FLEET_MODEL_ROUTES)",
                    )
                ]
            )

    def prefix(self, spec: JobSpec) -> str:
        """Where the job's objects go: the fleet's prefix, under ``tenants/<tenant>`` for a
        gateway tenant's job."""
        return contract.tenant_prefix(self.settings.s3_prefix, spec.tenant)

    def _already_done(self, job_id: str, prefix: str) -> dict[str, Any] | None:
        try:
            manifest = self.store.get_json(contract.manifest_key(job_id, prefix))
        except StorageError as exc:
            # Cannot tell while S3 is down: generate into the spool; the upload will retry.
            log.warning("[job=%s] cannot check for a stored result: %s", job_id, exc)
            return None
        if not manifest or manifest.get("status") != "succeeded":
            return None
        result = JobResult.model_validate(manifest["result"])
        return result.model_dump(mode="json")

    def _generate(
        self,
        spec: JobSpec,
        jlog: JobLog,
        on_progress: ProgressCallback | None,
        is_cancelled: Callable[[], bool] | None = None,
    ) -> tuple[list[ImageOut], dict[str, Any], dict[str, float]]:
        """The job's images (pixels with their recipes; PNGs when they come from the spool),
        what generated them, and the timings."""
        cached = self.spool.read(spec)
        self.engine.setup()
        worker_info = self.engine.describe()
        worker_info["store_process"] = "child" if self.storer is not None else "inline"
        if cached is not None:
            jlog.info("reusing %d image(s) generated before storage failed", len(cached))
            reused = [ImageOut(recipe={}, nsfw=read_png_nsfw(data), png=data) for data in cached]
            return reused, worker_info, {"generate_s": 0.0, "reused_from_spool": 1.0}

        step_cb = self._step_reporter(spec, on_progress, is_cancelled)
        queue_wait = time.time() - spec.submitted_at if spec.submitted_at else None
        if self.batcher is not None:
            _, hard = contract.time_limits(
                spec, self.settings.job_time_base_s, self.settings.job_time_per_mpx_step_s
            )
            generated = self.batcher.generate(spec, step_cb, timeout_s=hard)
        else:
            generated = self.generate_shrinking(spec, step_cb, jlog)
        worker_info["batch"] = {
            "jobs": len(generated.batch) or 1,
            "recipes": generated.batch or [{"job_id": spec.job_id, "seeds": spec.seeds()}],
            "torch_threads": worker_info.get("torch_threads"),
        }
        model = self.settings.served_model or ""
        revision, dtype = self.settings.model_revision, worker_info.get("dtype")
        no_checker: list[bool | None] = [None] * len(generated.images)
        flags = generated.nsfw if generated.nsfw is not None else no_checker
        images = [
            ImageOut(image_recipe(spec, seed, model, revision, dtype), flag, pixels=pixels)
            for pixels, seed, flag in zip(generated.images, generated.seeds, flags, strict=True)
        ]
        jlog.info("generated %d image(s) in %.2f s", len(images), generated.timings["generate_s"])
        timings = dict(generated.timings)
        if queue_wait is not None:
            timings["queue_wait_s"] = max(0.0, queue_wait)
        return images, worker_info, timings

    def generate_shrinking(
        self, spec: JobSpec, step_cb: StepCallback | None, jlog: JobLog
    ) -> Generated:
        """Generate a job; on a device out-of-memory, again with fewer images per pipeline call
        (halving down to one). Still out of memory at one image: DeviceOutOfMemory is raised
        for the task to reroute or fail the job (bounded: no retry loop on this worker)."""
        per_call = spec.images
        while True:
            try:
                return self._generate_in_calls(spec, per_call, step_cb)
            except DeviceOutOfMemory as exc:
                if per_call == 1:
                    raise
                per_call = max(1, per_call // 2)
                jlog.warning("%s; again with %d image(s) per call", exc, per_call)

    def _generate_in_calls(
        self, spec: JobSpec, per_call: int, step_cb: StepCallback | None
    ) -> Generated:
        if per_call >= spec.images:
            return self.engine.generate(spec, on_step=step_cb)
        images: list[Any] = []
        nsfw: list[bool] | None = None
        timings: dict[str, float] = {"generate_s": 0.0}
        for start in range(0, spec.images, per_call):
            part = spec.model_copy(update={
                "seed": contract.seed_for(spec.seed, start),
                "images": min(per_call, spec.images - start),
            })  # fmt: skip
            out = self.engine.generate(part, on_step=step_cb)
            images += out.images
            if out.nsfw is not None:
                nsfw = (nsfw or []) + out.nsfw
            timings["generate_s"] += out.timings["generate_s"]
        timings["per_image_s"] = timings["generate_s"] / spec.images
        timings["images_per_call"] = float(per_call)
        return Generated(images=images, seeds=spec.seeds(), timings=timings, nsfw=nsfw)

    def _store(
        self,
        spec: JobSpec,
        images: list[ImageOut],
        worker_info: dict[str, Any],
        timings: dict[str, float],
        started: float,
        jlog: JobLog,
        clear: bool = True,
        seed_derived: bool = False,
    ) -> dict[str, Any]:
        """Store the images, then the manifest (here, or in the storing child); the result."""
        prefix = self.prefix(spec)
        flags = [image.nsfw for image in images]  # the checker's verdicts (kept in the PNGs)
        safety = self._safety(flags, jlog)
        dropped = set(safety["dropped"]) if safety else set()
        records: list[contract.ImageRecord] = []
        uploads: list[tuple[str, ImageOut]] = []
        for index, (image, seed) in enumerate(zip(images, spec.seeds(), strict=True)):
            if index in dropped:
                continue
            key = contract.image_key(spec.job_id, index, prefix)
            uploads.append((key, image))
            records.append(
                contract.ImageRecord(
                    index=index,
                    key=key,
                    seed=seed,
                    width=spec.width,
                    height=spec.height,
                    nsfw=flags[index],
                )
            )
        tokens = self.engine.prompt_tokens(spec)
        if tokens["truncated"]:
            jlog.warning("the prompt is longer than a text encoder reads; it was cut: %s",
                         _cut_summary(tokens))  # fmt: skip
        mkey = contract.manifest_key(spec.job_id, prefix)
        result = JobResult(
            job_id=spec.job_id,
            status="succeeded",
            seed_derived=seed_derived,
            bucket=self.store.bucket,
            images=records,
            manifest_key=mkey,
            timings=timings,
            worker=_worker_summary(worker_info),
            prompt_truncated=tokens["truncated"],
            prompt_tokens=tokens,
            safety=safety,
        )
        manifest = build_manifest(
            spec,
            status="succeeded",
            images=[r.model_dump() for r in records],
            worker=worker_info,
            timings=timings,
        )
        manifest.update(prompt_truncated=tokens["truncated"], prompt_tokens=tokens, safety=safety)
        manifest["result"] = result.model_dump(mode="json")
        # The manifest goes last: its presence with status "succeeded" marks the job complete.
        # A job that failed before and now succeeded leaves the failure index (clear).
        job = StoreJob(job_id=spec.job_id, images=uploads, manifest_key=mkey, manifest=manifest,
                       clear_prefix=prefix if clear else None,
                       elapsed_s=time.perf_counter() - started)  # fmt: skip
        if self.storer is not None:
            _, hard = contract.time_limits(
                spec, self.settings.job_time_base_s, self.settings.job_time_per_mpx_step_s
            )
            stored = self.storer.store_job(job, timeout_s=hard)
        else:
            stored = store_job(self.store, job)
        jlog.info("stored %d image(s) and %s in %.2f s (PNG encoding %.2f s)", len(records),
                  mkey, stored["upload_s"], stored["encode_s"])  # fmt: skip
        # Keys only: a presigned URL is a bearer credential, and results are logged ("Task ...
        # succeeded") and kept for days. Clients presign when they read (status, wait, webhook).
        out = result.model_dump(mode="json")
        out["timings"] = {**out["timings"], **stored}
        return out

    def _safety(self, flags: list[bool | None], jlog: JobLog) -> dict[str, Any] | None:
        """What the safety checker said and what FLEET_SAFETY_POLICY does with it: flag keeps
        the (blacked-out) images, drop stores none of them, fail raises ImageFlagged."""
        if not self.engine.has_safety_checker and all(f is None for f in flags):
            return None
        flagged = [i for i, f in enumerate(flags) if f]
        policy = self.settings.safety_policy
        if flagged:
            jlog.warning("the safety checker flagged image(s) %s of %d (it blacks them out); "
                         "FLEET_SAFETY_POLICY=%s", flagged, len(flags), policy)  # fmt: skip
        if flagged and policy == "fail":
            raise ImageFlagged(
                f"the model's safety checker flagged image(s) {flagged} of {len(flags)} and this "
                "worker's FLEET_SAFETY_POLICY is fail: try another prompt or seed (the checker "
                "is the operator's choice: docs/operations.md, 'The safety checker')"
            )
        checker = type(getattr(self.engine.pipe, "safety_checker", None)).__name__
        dropped = flagged if policy == "drop" else []
        return {"checker": checker, "policy": policy, "flagged": flagged, "dropped": dropped}

    def record_failure(self, spec: JobSpec, exc: BaseException, jlog: JobLog) -> None:
        """Write a failure manifest so the failure outlives Celery's expiring results."""
        try:
            worker_info = self.engine.describe()
        except Exception:
            worker_info = {}
        result = JobResult(
            job_id=spec.job_id,
            status="failed",
            bucket=self.store.bucket,
            manifest_key=contract.manifest_key(spec.job_id, self.prefix(spec)),
            error=str(exc),
            error_type=type(exc).__name__,
            worker=_worker_summary(worker_info),
        )
        manifest = build_manifest(
            spec,
            status="failed",
            images=[],
            worker=worker_info,
            timings={},
            error=str(exc),
            error_type=type(exc).__name__,
        )
        manifest["result"] = result.model_dump(mode="json")
        if write_failure(self.store, self.prefix(spec), manifest):
            jlog.error("failed: %s (recorded in %s)", exc, result.manifest_key)

    def record_cancelled(self, spec: JobSpec, jlog: JobLog, reason: str) -> dict[str, Any]:
        """Record a cancelled job (not a failure): its manifest says so, no images are kept."""
        result = JobResult(
            job_id=spec.job_id,
            status="cancelled",
            bucket=self.store.bucket,
            manifest_key=contract.manifest_key(spec.job_id, self.prefix(spec)),
            error=reason,
            error_type="JobCancelled",
        )
        manifest = build_manifest(
            spec, status="cancelled", images=[], worker={}, timings={},
            error=reason, error_type="JobCancelled",
        )  # fmt: skip
        manifest["result"] = result.model_dump(mode="json")
        try:
            self.store.put_json(contract.manifest_key(spec.job_id, self.prefix(spec)),
                                manifest)  # fmt: skip
        except StorageError as exc:
            jlog.error("cancelled, but the record could not be stored: %s", exc)
        self.spool.discard(spec.job_id)
        jlog.info("%s", reason)
        return result.model_dump(mode="json")

    def record_invalid(self, job_id: Any, job: Any, exc: FleetError, jlog: JobLog) -> None:
        """Record a refused job under its id, when the id itself is usable as a key."""
        if not isinstance(job_id, str) or not contract.JOB_ID_PATTERN.match(job_id):
            jlog.error("refused, and not recorded in storage (no usable job_id): %s", exc)
            return
        prefix = contract.raw_job_prefix(self.settings.s3_prefix, job)
        manifest = raw_failure_manifest(
            job_id, job, str(exc), type(exc).__name__, self.store.bucket, prefix
        )
        if write_failure(self.store, prefix, manifest):
            jlog.error("refused: %s (recorded)", exc)

    def _step_reporter(
        self,
        spec: JobSpec,
        on_progress: ProgressCallback | None,
        is_cancelled: Callable[[], bool] | None = None,
    ) -> StepCallback | None:
        if on_progress is None and is_cancelled is None:
            return None
        interval = self.settings.progress_interval_s
        check_every = self.settings.cancel_check_interval_s
        last = checked = 0.0

        def report(step: int, total: int) -> None:
            # Both are Redis round trips: at most one of each per interval, not one per step.
            nonlocal last, checked
            now = time.monotonic()
            if is_cancelled is not None and now - checked >= check_every:
                checked = now
                if is_cancelled():
                    raise JobCancelled(f"cancelled at step {step}/{total}")
            if on_progress is None:
                return
            if now - last >= interval:
                last = now
                on_progress(
                    {"job_id": spec.job_id, "step": step, "steps": total, "images": spec.images}
                )

        return report


def _cut_summary(tokens: dict[str, Any]) -> str:
    return "; ".join(
        f"{name} ({t['class']}) reads {t['limit']} of the prompt's {t.get('prompt', 0)} tokens"
        for name, t in tokens["tokenizers"].items()
        if t["truncated"]
    )


def _worker_summary(info: dict[str, Any]) -> dict[str, Any]:
    keys = (
        "host",
        "node",
        "device",
        "device_type",
        "gpu_name",
        "dtype",
        "model_name",
        "pipeline",
        "torch",
        "diffusers",
        "torch_threads",
    )
    return {k: info[k] for k in keys if k in info}
