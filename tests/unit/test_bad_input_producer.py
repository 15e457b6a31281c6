"""Bad input at the producer, generated (hypothesis, ``tests/strategies.py``) and hand-written.

Every invalid job is refused with a JobValidationError that names the mutated field, and nothing
reaches Redis: the queue stays empty and no claim ``fleet:job:<id>`` is written; every valid job
is accepted and enqueued. Checked three ways: ``validate_job`` alone (fast, more examples), the
Python API (``Client.submit_many`` against the real Redis of the ``endpoints`` fixture) and the
command line (``python -m producer submit``, its ``main`` called in-process: exit code 2 naming
the option or the field).

Examples per property: FLEET_HYPOTHESIS_EXAMPLES (default 200). The counts go to
``<pytest base temp>/bad_input.json`` (or FLEET_BAD_INPUT_REPORT) and are printed.
"""

from __future__ import annotations

import contextlib
import io
import math
import os
import uuid
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
from hypothesis import given
from hypothesis import strategies as st

from fleet import contract
from fleet.contract import Limits, validate_job
from fleet.errors import JobValidationError
from fleet.settings import ProducerSettings
from producer import cli
from producer.bulk import submit_bulk
from producer.client import MAX_DEADLINE_S, Client
from tests import strategies as S
from tests.fleet_fixtures import settings_kwargs

#: Longest error a single bad field may give (values are quoted to 80 characters).
SHORT_ERROR = 2_000


@pytest.fixture(scope="module")
def tally(tmp_path_factory: pytest.TempPathFactory) -> Iterator[dict[str, S.Tally]]:
    tallies = {
        name: S.Tally(f"producer.{name}")
        for name in ("validate_job", "api", "api_batch", "cli", "hand_written", "cli_hand_written")
    }
    yield tallies
    path = S.report_path(tmp_path_factory.getbasetemp())
    for t in tallies.values():
        if t.counts:
            t.write(path)


@pytest.fixture(scope="module")
def producer_env(endpoints) -> dict[str, str]:  # type: ignore[no-untyped-def]
    """The real services' settings and a queue of this module's own (no worker reads it)."""
    return {**endpoints.env(), "FLEET_QUEUE": f"fleet.bad-input-{uuid.uuid4().hex[:8]}"}


@pytest.fixture(scope="module")
def api(producer_env: dict[str, str]) -> Iterator[Client]:
    with Client(ProducerSettings(_env_file=None, **settings_kwargs(producer_env))) as c:
        yield c


@pytest.fixture(scope="module")
def cli_env(producer_env: dict[str, str]) -> Iterator[dict[str, str]]:
    """The CLI reads its settings from the environment: these services, this queue only."""
    with pytest.MonkeyPatch.context() as mp:
        for key in list(os.environ):
            if key.startswith("FLEET_"):
                mp.delenv(key)
        for key, value in producer_env.items():
            mp.setenv(key, value)
        yield producer_env


# -- Redis, before and after ---------------------------------------------------------------------


def queued(client: Client) -> int:
    """Messages waiting in the client's queue, every priority step."""
    return sum(int(client.redis.llen(k)) for k in contract.queue_keys(client.settings.queue))


def claims(client: Client) -> set[bytes]:
    return set(client.redis.scan_iter(match=contract.CLAIM_KEY.format(job_id="*"), count=1000))


def clean(client: Client, before: set[bytes]) -> None:
    """Take what an accepted example enqueued off Redis, so the next one starts empty."""
    client.redis.delete(*contract.queue_keys(client.settings.queue))
    new = claims(client) - before
    if new:
        client.redis.delete(*new)


def claimed(client: Client, job: Any) -> bool:
    job_id = job.get("job_id") if isinstance(job, dict) else None
    if not isinstance(job_id, str):
        return False
    key = contract.CLAIM_KEY.format(job_id=job_id).encode("utf-8", "surrogatepass")
    return bool(client.redis.exists(key))


# -- judging one job ---------------------------------------------------------------------------


def judge(t: S.Tally, case: S.Case, submit: Callable[[Any], Any]) -> JobValidationError | None:
    """Run ``submit(case.job)``, count the outcome, and check it: a valid job accepted, an
    invalid one refused with a short error that names the mutated field."""
    t.add("tried")
    t.add("valid" if case.valid else "invalid")
    try:
        submit(case.job)
    except JobValidationError as exc:
        message = str(exc)
        if case.mutation is None:
            t.add("refused_valid")
            raise AssertionError(f"a valid job was refused: {message[:500]}\n{case!r}") from None
        fields = [p[0] for p in exc.problems]
        named = case.mutation.name in fields and S.names_field(message, case.mutation.name)
        t.add("refused_named" if named else "refused_unnamed")
        assert named, f"refused without naming {case.mutation.name!r}: {message[:500]}\n{case!r}"
        assert len(message) < SHORT_ERROR, f"an error of {len(message):,} characters\n{case!r}"
        return exc
    except Exception as exc:
        t.add("unexpected_errors")
        raise AssertionError(f"{type(exc).__name__}: {str(exc)[:300]}\n{case!r}") from exc
    if case.mutation is not None:
        t.add("accepted_invalid")
        raise AssertionError(f"an invalid job was accepted\n{case!r}")
    t.add("accepted")
    return None


# -- generated: validate_job, the API, the command line ---------------------------------------


@S.fleet_settings(max_examples=S.examples() * 5)
@given(case=S.cases())
def test_validate_job_refuses_each_invalid_job_naming_its_field(
    case: S.Case, tally: dict[str, S.Tally]
) -> None:
    judge(tally["validate_job"], case, validate_job)


@S.fleet_settings()
@given(case=S.cases())
def test_submit_refuses_each_invalid_job_and_enqueues_nothing(
    case: S.Case, api: Client, tally: dict[str, S.Tally]
) -> None:
    t = tally["api"]
    before = claims(api)
    assert queued(api) == 0
    try:
        judge(t, case, lambda job: api.submit_many([job]))
        if case.valid:
            assert queued(api) == 1, case
            assert len(claims(api) - before) == 1, case
        else:
            enqueued = queued(api) != 0 or claims(api) != before or claimed(api, case.job)
            t.add("enqueued_invalid" if enqueued else "nothing_enqueued")
            assert not enqueued, f"an invalid job left something in Redis\n{case!r}"
    finally:
        clean(api, before)


def _some_invalid(batch: list[S.Case]) -> bool:
    return any(not c.valid for c in batch)


@S.fleet_settings()
@given(batch=st.lists(S.cases(), min_size=2, max_size=6).filter(_some_invalid))
def test_a_batch_with_one_invalid_job_enqueues_none_of_it(
    batch: list[S.Case], api: Client, tally: dict[str, S.Tally]
) -> None:
    """submit_many validates every job before it enqueues one: the first invalid job's field is
    named and not even the valid jobs before it are enqueued."""
    t = tally["api_batch"]
    t.add("tried")
    first = next(c for c in batch if c.mutation is not None)
    assert first.mutation is not None
    before = claims(api)
    try:
        with pytest.raises(JobValidationError) as info:
            api.submit_many([c.job for c in batch])
        named = S.names_field(str(info.value), first.mutation.name)
        t.add("refused_named" if named else "refused_unnamed")
        assert named, f"{str(info.value)[:300]}\nfirst invalid: {first!r}"
        enqueued = queued(api) != 0 or claims(api) != before
        t.add("enqueued_invalid" if enqueued else "nothing_enqueued")
        assert not enqueued, batch
    finally:
        clean(api, before)


def run_cli(argv: list[str]) -> tuple[int, str, str]:
    """``python -m producer <argv>`` in this process: (exit code, stdout, stderr)."""
    out, err = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        try:
            code = cli.main(argv)
        except SystemExit as exc:  # argparse: a usage error
            code = exc.code if isinstance(exc.code, int) else 1
    return code, out.getvalue(), err.getvalue()


def judge_cli(t: S.Tally, case: S.ArgvCase, client: Client) -> None:
    t.add("tried")
    t.add("valid" if case.valid else "invalid")
    before = claims(client)
    try:
        try:
            code, out, err = run_cli(case.argv)
        except Exception as exc:
            t.add("unexpected_errors")
            raise AssertionError(f"{type(exc).__name__}: {str(exc)[:300]}\n{case!r}") from exc
        if case.valid:
            if code != cli.EXIT_OK:
                t.add("refused_valid")
            assert code == cli.EXIT_OK, f"exit {code}: {err[:500]}\n{case!r}"
            t.add("accepted")
            assert len(out.split()) == case.jobs, out
            assert queued(client) == case.jobs and len(claims(client) - before) == case.jobs
            return
        if code == cli.EXIT_OK:
            t.add("accepted_invalid")
        assert code == cli.EXIT_INVALID, f"exit {code}: {err[:500]}\n{case!r}"
        named = any(S.names_field(err, name) for name in case.names)
        t.add("refused_named" if named else "refused_unnamed")
        assert named, f"refused without naming {case.names}: {err[:500]}\n{case!r}"
        assert len(err) < SHORT_ERROR + 1_000, f"an error of {len(err):,} characters\n{case!r}"
        enqueued = queued(client) != 0 or claims(client) != before or out.strip() != ""
        t.add("enqueued_invalid" if enqueued else "nothing_enqueued")
        assert not enqueued, f"an invalid command line enqueued something\n{case!r}"
    finally:
        clean(client, before)


@S.fleet_settings()
@given(case=S.argv_cases())
def test_the_cli_refuses_each_invalid_command_line_with_exit_2(
    case: S.ArgvCase, cli_env: dict[str, str], api: Client, tally: dict[str, S.Tally]
) -> None:
    judge_cli(tally["cli"], case, api)


# -- hand-written --------------------------------------------------------------------------------

NOT_SERVED = {name for name, m in S.HAND_WRITTEN if m.kind == "not-served"}


@pytest.mark.parametrize(("name", "mutation"), S.HAND_WRITTEN, ids=[n for n, _ in S.HAND_WRITTEN])
def test_hand_written_bad_jobs_are_refused_naming_the_field(
    name: str, mutation: S.Mutation, api: Client, tally: dict[str, S.Tally]
) -> None:
    case = S.Case(mutation.apply(S.BASE_JOB), mutation)
    t = tally["hand_written"]
    before = claims(api)
    try:
        if name in NOT_SERVED:
            # Any model is allowed where FLEET_ALLOWED_MODELS is empty; with a list, it is not.
            assert validate_job(case.job).model == mutation.value
            limits = Limits(allowed_models=(S.SERVED_MODEL,))
            judge(t, case, lambda job: validate_job(job, limits))
            return
        judge(t, case, lambda job: api.submit_many([job]))
        assert queued(api) == 0 and claims(api) == before and not claimed(api, case.job)
        t.add("nothing_enqueued")
    finally:
        clean(api, before)


def test_hand_written_jobs_that_are_valid_after_all(api: Client) -> None:
    """What the contract allows that can look wrong: integral floats, a seed as a string with
    spaces, control characters in a prompt, a 2,000-character prompt, the largest seed."""
    for change in ({"width": 64.0}, {"seed": " 12 "}, {"seed": 2**64 - 1}, {"guidance": 0},
                   {"prompt": "\x01\x7f\u200b fox"}, {"prompt": "a" * 2000}, {"model": None},
                   {"negative_prompt": ""}, {"seed": "18446744073709551615"}):  # fmt: skip
        validate_job({**S.BASE_JOB, **change})


#: (id, extra argv, what the error must name): the hand-written cases as command lines.
CLI_CASES: list[tuple[str, list[str], str]] = [
    ("width-0", ["--width", "0"], "width"),
    ("width-negative", ["--width=-64"], "width"),
    ("width-odd", ["--width", "65"], "width"),
    ("width-100000", ["--width", "100000"], "width"),
    ("width-string", ["--width", "wide"], "--width"),
    ("width-float", ["--width", "512.5"], "--width"),
    ("steps-0", ["--steps", "0"], "steps"),
    ("steps-negative", ["--steps=-1"], "steps"),
    ("steps-1e9", ["--steps", "1000000000"], "steps"),
    ("guidance-nan", ["--guidance", "nan"], "guidance"),
    ("guidance-inf", ["--guidance", "inf"], "guidance"),
    ("guidance--1e308", ["--guidance=-1e308"], "guidance"),
    ("seed--1", ["--seed=-1"], "seed"),
    ("seed-2**64", ["--seed", str(2**64)], "seed"),
    ("seed-1.5", ["--seed", "1.5"], "seed"),
    ("seed-12abc", ["--seed", "12abc"], "seed"),
    ("images-0", ["--images-per-prompt", "0"], "images"),
    ("images-10000", ["--images-per-prompt", "10000"], "images"),
    ("scheduler-unknown", ["--scheduler", "warp-drive"], "scheduler"),
    ("negative-1mb", ["--negative", "n" * S.MEGABYTE], "negative_prompt"),
    ("model-blank", ["--model", " "], "model"),
    ("priority-10", ["--priority", "10"], "priority"),
    ("priority-string", ["--priority", "high"], "--priority"),
    ("job-id-newline", ["--job-id", "abc\n"], "job_id"),
    ("unknown-option", ["--size", "64"], "--size"),
]
CLI_PROMPTS: list[tuple[str, list[str], str]] = [
    ("prompt-empty", [""], "prompt"),
    ("prompt-whitespace", [" \t "], "prompt"),
    ("prompt-1mb", ["a" * S.MEGABYTE], "prompt"),
    ("prompt-nul", ["a fox\x00"], "prompt"),
    ("prompt-lone-surrogate", ["a fox\udcff"], "prompt"),  # undecodable bytes in argv
    ("prompt-none", [], "prompt"),
    ("one-bad-of-three", ["a fox", "", "a cat"], "prompt"),
]


@pytest.mark.parametrize(("name", "extra", "named"), CLI_CASES, ids=[c[0] for c in CLI_CASES])
def test_hand_written_bad_options_exit_2_naming_them(
    name: str, extra: list[str], named: str, cli_env: dict, api: Client, tally: dict
) -> None:
    case = S.ArgvCase(["submit", *extra, "--", "a fox"], (named,), name)
    judge_cli(tally["cli_hand_written"], case, api)


@pytest.mark.parametrize(("name", "prompts", "named"), CLI_PROMPTS, ids=[c[0] for c in CLI_PROMPTS])
def test_hand_written_bad_prompts_exit_2_naming_them(
    name: str, prompts: list[str], named: str, cli_env: dict, api: Client, tally: dict
) -> None:
    case = S.ArgvCase(["submit", "--", *prompts], (named,), name)
    judge_cli(tally["cli_hand_written"], case, api)


def test_a_prompt_file_that_is_not_utf8_exits_2_naming_it(
    tmp_path: Path, cli_env: dict, api: Client, tally: dict
) -> None:
    bad = tmp_path / "prompts.txt"
    bad.write_bytes(b"a fox\n\xff\xfe a cat\n")
    case = S.ArgvCase(["submit", "--file", str(bad)], ("--file",), "file-not-utf8")
    judge_cli(tally["cli_hand_written"], case, api)


# -- deadlines -----------------------------------------------------------------------------------

#: Deadlines the producer refuses (none finite above 0 and at most MAX_DEADLINE_S): each once
#: reached Celery unchecked (NaN, infinities and 1e308 a traceback out of send_task, -1 and 0 a
#: job expired unrun).
BAD_DEADLINES = ["nan", "inf", "-inf", "1e308", "-1", "0", str(MAX_DEADLINE_S + 1)]


@pytest.mark.parametrize("deadline", BAD_DEADLINES)
def test_a_bad_deadline_exits_2_naming_it(deadline: str, cli_env: dict, api: Client) -> None:
    before = claims(api)
    try:
        code, out, err = run_cli(["submit", f"--deadline={deadline}", "--", "a fox"])
        assert code == cli.EXIT_INVALID and "deadline" in err, err[:300]
        assert queued(api) == 0 and claims(api) == before and out.strip() == ""
    finally:
        clean(api, before)


@pytest.mark.parametrize(
    "deadline", [math.nan, math.inf, -math.inf, 1e308, -1, 0, MAX_DEADLINE_S + 0.5, True, "60"]
)
@pytest.mark.parametrize("how", ["submit", "bulk"])
def test_a_bad_deadline_is_a_validation_error(deadline: Any, how: str, api: Client) -> None:
    before = claims(api)
    try:
        with pytest.raises(JobValidationError, match="deadline") as info:
            if how == "submit":
                api.submit({"prompt": "a fox"}, deadline_s=deadline)
            else:
                submit_bulk(api, [{"prompt": "a fox"}, {"prompt": "a cat"}], deadline_s=deadline)
        assert [p[0] for p in info.value.problems] == ["deadline"]
        assert queued(api) == 0 and claims(api) == before
    finally:
        clean(api, before)


@pytest.mark.parametrize("deadline", [0.5, 60, MAX_DEADLINE_S])
def test_a_deadline_in_range_is_enqueued(deadline: float, api: Client) -> None:
    before = claims(api)
    try:
        api.submit({"prompt": "a fox"}, deadline_s=deadline)
        assert queued(api) == 1 and len(claims(api) - before) == 1
    finally:
        clean(api, before)
