"""The batcher's own rules, with a stand-in engine (the real pipeline path is covered by
tests/integration/test_batching.py): grouping, one bad job failing alone, cancellation."""

from __future__ import annotations

import threading
import time
from typing import Any

import pytest

from fleet.contract import JobSpec, validate_job
from fleet.errors import JobCancelled
from worker.engine.batcher import Batcher
from worker.engine.engine import Generated


class StandInEngine:
    """Fails any call holding a job whose prompt is 'boom'; records the calls it got."""

    def __init__(self, delay_s: float = 0.0) -> None:
        self.calls: list[list[str]] = []
        self.delay_s = delay_s

    def generate_batch(self, specs: list[JobSpec], on_step: Any = None) -> list[Generated]:
        self.calls.append([s.job_id for s in specs])
        for step in (1, 2, 3):
            time.sleep(self.delay_s)
            if on_step is not None:
                on_step(step, 3)
        if any(s.prompt == "boom" for s in specs):
            raise RuntimeError("this call broke")
        return [
            Generated(images=[s.job_id], seeds=s.seeds(), timings={"generate_s": 0.0})  # type: ignore[list-item]
            for s in specs
        ]

    def generate(self, spec: JobSpec, on_step: Any = None) -> Generated:
        return self.generate_batch([spec], on_step)[0]


def job(job_id: str, prompt: str = "a fox", width: int = 64) -> JobSpec:
    return validate_job({"job_id": job_id, "prompt": prompt, "width": width, "height": 64})


def run_together(batcher: Batcher, specs: list[JobSpec], on_step: Any = None) -> dict[str, Any]:
    """Queue every job before the batcher's thread starts, so they meet in one batch."""
    outcomes: dict[str, Any] = {}
    batcher._thread = threading.current_thread()  # keeps generate() from starting the loop

    def one(spec: JobSpec) -> None:
        try:
            outcomes[spec.job_id] = batcher.generate(spec, on_step(spec) if on_step else None)
        except Exception as exc:
            outcomes[spec.job_id] = exc

    threads = [threading.Thread(target=one, args=(s,)) for s in specs]
    for t in threads:
        t.start()
    deadline = time.monotonic() + 5
    while len(batcher._queue) < len(specs):
        assert time.monotonic() < deadline
        time.sleep(0.005)
    threading.Thread(target=batcher._loop, daemon=True).start()
    for t in threads:
        t.join(10)
    return outcomes


def test_one_bad_job_fails_alone_and_the_others_get_their_own_images() -> None:
    engine = StandInEngine()
    batcher = Batcher(engine, max_batch=4)  # type: ignore[arg-type]
    specs = [job("a"), job("b", prompt="boom"), job("c")]
    out = run_together(batcher, specs)
    assert sorted(engine.calls[0]) == ["a", "b", "c"]  # one call first, then each job alone
    assert sorted(engine.calls[1:]) == [["a"], ["b"], ["c"]]
    assert isinstance(out["b"], RuntimeError)
    assert out["a"].images == ["a"] and out["c"].images == ["c"]
    assert out["a"].batch == [] and out["c"].batch == []  # recorded as generated alone


def test_only_compatible_jobs_share_a_call_and_batches_are_capped() -> None:
    engine = StandInEngine()
    batcher = Batcher(engine, max_batch=2)  # type: ignore[arg-type]
    out = run_together(batcher, [job("a"), job("b", width=128), job("c"), job("d")])
    assert all(not isinstance(v, Exception) for v in out.values())
    assert ["b"] in engine.calls  # the only 128 px job: alone
    together = next(c for c in engine.calls if len(c) == 2)
    assert set(together) < {"a", "c", "d"}  # two of the three compatible jobs, capped at 2
    assert sorted(j for c in engine.calls for j in c) == ["a", "b", "c", "d"]  # each once
    assert sorted(r["job_id"] for r in out[together[0]].batch) == sorted(together)


def test_a_cancelled_job_leaves_its_batch_and_the_others_finish() -> None:
    engine = StandInEngine(delay_s=0.01)
    batcher = Batcher(engine, max_batch=4)  # type: ignore[arg-type]

    def on_step(spec: JobSpec) -> Any:
        def report(step: int, total: int) -> None:
            if spec.job_id == "b" and step >= 2:
                raise JobCancelled(f"cancelled at step {step}/{total}")

        return report

    out = run_together(batcher, [job("a"), job("b"), job("c")], on_step)
    assert [sorted(c) for c in engine.calls] == [["a", "b", "c"]]  # the others went on
    assert isinstance(out["b"], JobCancelled)
    assert out["a"].images == ["a"] and out["c"].images == ["c"]


def test_a_lone_job_does_not_wait_for_company() -> None:
    batcher = Batcher(StandInEngine(), max_batch=8)  # type: ignore[arg-type]
    began = time.monotonic()
    assert batcher.generate(job("alone")).images == ["alone"]
    assert time.monotonic() - began < 1.0  # FLEET_BATCH_WAIT_S is 0 by default


@pytest.mark.parametrize("wait_s", [0.3])
def test_a_configured_wait_lets_a_late_job_join(wait_s: float) -> None:
    engine = StandInEngine()
    batcher = Batcher(engine, max_batch=2, max_wait_s=wait_s)  # type: ignore[arg-type]
    out: dict[str, Any] = {}
    first = threading.Thread(target=lambda: out.setdefault("a", batcher.generate(job("a"))))
    first.start()
    time.sleep(wait_s / 3)
    out["b"] = batcher.generate(job("b"))
    first.join(5)
    assert engine.calls == [["a", "b"]]


def test_a_hung_pipeline_call_fails_its_job_at_the_time_limit_then_refuses_the_rest() -> None:
    """Celery's time limits do not reach a threads pool: the batcher's wait is bounded by the
    job's time limit; once a call hung, later jobs go back to their queue (PipelineBroken, the
    worker's failure) instead of each waiting out its own limit."""
    from fleet.errors import JobTimedOut, PipelineBroken

    release = threading.Event()

    class HungEngine(StandInEngine):
        def generate_batch(self, specs: list[JobSpec], on_step: Any = None) -> list[Generated]:
            release.wait(30)
            return super().generate_batch(specs, on_step)

    batcher = Batcher(HungEngine(), max_batch=2)  # type: ignore[arg-type]
    try:
        with pytest.raises(JobTimedOut, match="did not return within the job's time limit"):
            batcher.generate(job("hung"), timeout_s=0.3)
        with pytest.raises(PipelineBroken, match="has hung") as refused:
            batcher.generate(job("next"), timeout_s=0.3)
        assert refused.value.disposition == "worker"
    finally:
        release.set()
