"""Batching compatible jobs into one pipeline call, with each job keeping its own outcome.

A batch worker runs Celery's threads pool (`--pool threads --concurrency B`): each job's task
thread validates its job, hands it to the one Batcher of the process and waits; the Batcher's
thread groups jobs that can share a call (same model, size, steps, guidance, scheduler, images
per job), up to B, runs them together, and hands each thread its own images. Encoding and upload
then happen in the task threads while the next batch generates. See docs/batching.md.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field

from fleet.contract import JobSpec
from fleet.errors import JobCancelled, JobTimedOut, PipelineBroken
from worker.engine.engine import Engine, Generated, StepCallback

log = logging.getLogger(__name__)


def batch_key(spec: JobSpec) -> tuple[object, ...]:
    """Jobs with equal keys can share one pipeline call."""
    return (spec.model, spec.width, spec.height, spec.steps, spec.guidance, spec.scheduler,
            spec.images, spec.generator_device or "cpu")  # fmt: skip


@dataclass
class _Item:
    spec: JobSpec
    on_step: StepCallback | None
    done: threading.Event = field(default_factory=threading.Event)
    result: Generated | None = None
    error: BaseException | None = None
    cancelled: bool = False


class Batcher:
    """Collects compatible jobs from many threads and generates them together."""

    def __init__(self, engine: Engine, max_batch: int, max_wait_s: float = 0.0) -> None:
        self.engine = engine
        self.max_batch = max(1, max_batch)
        self.max_wait_s = max(0.0, max_wait_s)
        self._queue: list[_Item] = []
        self._cv = threading.Condition()
        self._thread: threading.Thread | None = None
        #: Why no job can run here any more: a pipeline call that never returned.
        self.hung: str | None = None

    def generate(
        self, spec: JobSpec, on_step: StepCallback | None = None, timeout_s: float | None = None
    ) -> Generated:
        """Generate one job, possibly together with others; blocks until its images are ready,
        for ``timeout_s`` at most (the job's time limit: Celery's limits do not reach a threads
        pool). Past it the job fails as timed out, and, the pipeline call still hanging, every
        later job is refused as the worker's failure (PipelineBroken: back to its queue).

        ``on_step`` may raise JobCancelled: the job then leaves the batch (the others go on),
        and the pipeline is interrupted only when every job in the batch is cancelled.
        """
        if self.hung is not None:
            raise PipelineBroken(self.hung)
        item = _Item(spec, on_step)
        with self._cv:
            if self._thread is None:
                self._thread = threading.Thread(target=self._loop, name="fleet-batcher",
                                                daemon=True)  # fmt: skip
                self._thread.start()
            self._queue.append(item)
            self._cv.notify_all()
        if not item.done.wait(timeout_s):
            self.hung = (f"a pipeline call has hung for over {timeout_s:.0f} s (job "
                         f"{spec.job_id}): restart the worker")  # fmt: skip
            log.error("%s", self.hung)
            raise JobTimedOut(f"stopped after {timeout_s:.0f} s: its batch's pipeline call did "
                              "not return within the job's time limit")  # fmt: skip
        if item.error is not None:
            raise item.error
        assert item.result is not None
        return item.result

    # -- the batching thread ----------------------------------------------------------------

    def take_batch(self) -> list[_Item]:
        """The oldest waiting job and the compatible ones waiting with it (or arriving within
        ``max_wait_s``; zero by default, so a lone job never waits for company)."""
        with self._cv:
            while not self._queue:
                self._cv.wait()
            first = self._queue.pop(0)
            key = batch_key(first.spec)
            batch = [first]
            deadline = time.monotonic() + self.max_wait_s
            while True:
                for item in [i for i in self._queue if batch_key(i.spec) == key]:
                    if len(batch) >= self.max_batch:
                        break
                    self._queue.remove(item)
                    batch.append(item)
                remaining = deadline - time.monotonic()
                if len(batch) >= self.max_batch or remaining <= 0:
                    return batch
                self._cv.wait(remaining)

    def _loop(self) -> None:
        while True:
            batch = self.take_batch()
            try:
                self.run(batch)
            except BaseException as exc:  # never leave a task thread waiting forever
                for item in batch:
                    if not item.done.is_set():
                        item.error = exc
                        item.done.set()

    def run(self, batch: list[_Item]) -> None:
        if len(batch) > 1:
            log.info("batch of %d: %s", len(batch), ", ".join(i.spec.job_id for i in batch))

        def on_step(step: int, total: int) -> None:
            for item in batch:
                if item.cancelled or item.on_step is None:
                    continue
                try:
                    item.on_step(step, total)
                except JobCancelled:
                    item.cancelled = True
            if all(item.cancelled for item in batch):
                raise JobCancelled(f"every job in the batch was cancelled, at step {step}/{total}")

        try:
            results = self.engine.generate_batch([i.spec for i in batch], on_step)
        except JobCancelled as exc:
            for item in batch:
                item.error = JobCancelled(str(exc))
        except Exception as exc:
            if len(batch) == 1:
                batch[0].error = exc
            else:
                # One job may have broken the call: run each alone so only it fails.
                log.warning("batch of %d failed (%s); running its jobs one by one", len(batch), exc)
                for item in batch:
                    try:
                        item.result = self.engine.generate(item.spec, item.on_step)
                    except Exception as single_exc:
                        item.error = single_exc
        else:
            recipes = [{"job_id": i.spec.job_id, "seeds": i.spec.seeds()} for i in batch]
            for item, result in zip(batch, results, strict=True):
                if item.cancelled:
                    item.error = JobCancelled("cancelled while generating in a batch")
                    continue
                result.batch = recipes
                item.result = result
        finally:
            for item in batch:
                item.done.set()


BatchGenerate = Callable[[JobSpec, StepCallback | None], Generated]
