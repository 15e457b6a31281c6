"""Counting a fault case the way Celery's smoke suite does: submitted, succeeded, failed (with a
recorded reason), lost, and generated twice.

Generations are counted in the workers' logs (the runner's "generated N image(s)" line, one per
completed pipeline call), never inferred from deterministic object keys. Each case's figures are
printed and, when FLEET_FAULT_REPORT names a file, appended to it as one JSON line (scripts/soak
collects them into bench/fault_matrix.json; docs/reliability.md quotes them).
"""

from __future__ import annotations

import json
import os
import re
import time
from collections import Counter
from collections.abc import Iterable
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from fleet import contract

REPORT_ENV = "FLEET_FAULT_REPORT"
#: scripts/soak sets it: the long fault cases are collected too (never skipped: not collected).
SOAK_ENV = "FLEET_SOAK"
#: One line per completed generation (worker/runner.py).
GENERATED = re.compile(r"\[job=(\S+) [^\n]*\] generated \d+ image\(s\)")


def soak() -> bool:
    return os.environ.get(SOAK_ENV, "") not in ("", "0", "false", "no")


def cases(ci: list[Any], soak_only: list[Any]) -> list[Any]:
    """Parametrize values: ``ci`` always, ``soak_only`` as well under scripts/soak."""
    return list(ci) + (list(soak_only) if soak() else [])


def generations(logs: Iterable[str]) -> Counter[str]:
    """Completed generations per job id, over every log given (all workers of a case)."""
    return Counter(m.group(1) for log in logs for m in GENERATED.finditer(log))


@dataclass
class FaultFigures:
    case: str
    submitted: int = 0
    succeeded: int = 0
    failed: int = 0
    lost: int = 0
    generated_twice: int = 0
    #: Anything else the case measured (seconds, kernel counters, ...).
    extra: dict[str, Any] = field(default_factory=dict)

    def report(self) -> FaultFigures:
        line = json.dumps({**asdict(self), "at": time.strftime("%Y-%m-%dT%H:%M:%S")})
        print(f"fault figures: {line}")
        target = os.environ.get(REPORT_ENV)
        if target:
            path = Path(target)
            path.parent.mkdir(parents=True, exist_ok=True)
            with path.open("a") as f:
                f.write(line + "\n")
        return self


def tally(
    case: str,
    client: Any,
    job_ids: list[str],
    logs: Iterable[str] | Any,
    timeout: float = 180.0,
    expect_failed: Iterable[str] = (),
    **extra: Any,
) -> FaultFigures:
    """Wait for every job (up to ``timeout``), then count.

    A job is *lost* when it never ended, ended `succeeded` without its manifest and images in
    storage, or ended `failed` without a recorded failure (a `failures/` entry or the Redis list
    kept while storage is down). *Generated twice*: more than one completed generation in the
    logs of ``logs`` (a callable returning them is called after the wait, so it sees the end).
    """
    deadline = time.monotonic() + timeout
    pending = set(job_ids)
    states: dict[str, str] = {}
    while pending and time.monotonic() < deadline:
        for job_id in sorted(pending):
            st = client.status(job_id)
            if st.done:
                states[job_id] = st.state
                pending.discard(job_id)
        if pending:
            time.sleep(0.2)  # the poll interval, not a wait for an event
    texts = list(logs() if callable(logs) else logs)
    gens = generations(texts)
    recorded_failures = {e["job_id"] for e in client.failed(include_retried=True)}
    fig = FaultFigures(case=case, submitted=len(job_ids), extra=dict(extra))
    for job_id in job_ids:
        state = states.get(job_id)
        if state == "succeeded" and _stored(client, job_id):
            fig.succeeded += 1
        elif state == "failed" and job_id in recorded_failures:
            fig.failed += 1
        else:
            fig.lost += 1
            fig.extra.setdefault("lost_ids", []).append(f"{job_id}: {state or 'never ended'}")
    fig.generated_twice = sum(1 for j in job_ids if gens.get(j, 0) > 1)
    unexpected = sorted(set(j for j in job_ids if states.get(j) == "failed") - set(expect_failed))
    if unexpected:
        fig.extra["unexpected_failures"] = unexpected
    return fig.report()


def _stored(client: Any, job_id: str) -> bool:
    keys = set(client.store.list_keys(contract.job_prefix(job_id)))
    return contract.manifest_key(job_id) in keys and contract.image_key(job_id, 0) in keys


def assert_clean(fig: FaultFigures, succeeded: int | None = None) -> None:
    """0 lost, 0 generated twice, and (by default) every job succeeded."""
    assert fig.lost == 0, f"{fig.case}: {fig.lost} lost: {fig.extra.get('lost_ids')}"
    assert fig.generated_twice == 0, f"{fig.case}: {fig.generated_twice} generated twice"
    want = fig.submitted if succeeded is None else succeeded
    assert fig.succeeded == want, f"{fig.case}: {fig.succeeded} of {fig.submitted} succeeded"
