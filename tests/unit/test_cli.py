"""Command-line argument handling of `python -m producer` (no services needed)."""

from __future__ import annotations

import io
from pathlib import Path

import pytest

from fleet.errors import JobValidationError
from producer import cli


def parse(*argv: str):
    return cli.build_parser().parse_args(list(argv))


def test_one_job_per_prompt_with_shared_options() -> None:
    args = parse(
        "submit",
        "a cat",
        "a dog",
        "--width",
        "64",
        "--height",
        "96",
        "--steps",
        "4",
        "--seed",
        "18446744073709551615",
        "--images-per-prompt",
        "2",
        "--scheduler",
        "euler",
        "--negative",
        "blurry",
        "--model",
        "tiny",
    )
    jobs = cli.jobs_from_args(args)
    assert [j["prompt"] for j in jobs] == ["a cat", "a dog"]
    assert all(j["width"] == 64 and j["height"] == 96 and j["images"] == 2 for j in jobs)
    assert jobs[0]["seed"] == "18446744073709551615"  # kept exact as text
    assert jobs[0]["negative_prompt"] == "blurry" and jobs[0]["model"] == "tiny"
    assert "job_id" not in jobs[0]


def test_prompts_from_file_and_stdin(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    f = tmp_path / "prompts.txt"
    f.write_text("# comment\nfirst\n\n  second  \n")
    assert [j["prompt"] for j in cli.jobs_from_args(parse("submit", "zero", "--file", str(f)))] == [
        "zero",
        "first",
        "second",
    ]
    monkeypatch.setattr("sys.stdin", io.StringIO("from stdin\n"))
    assert cli.jobs_from_args(parse("submit", "--file", "-"))[0]["prompt"] == "from stdin"


def test_no_prompt_and_job_id_rules() -> None:
    with pytest.raises(JobValidationError, match="give at least one PROMPT"):
        cli.jobs_from_args(parse("submit"))
    with pytest.raises(JobValidationError, match="--job-id needs exactly one prompt"):
        cli.jobs_from_args(parse("submit", "a", "b", "--job-id", "x"))
    assert cli.jobs_from_args(parse("submit", "a", "--job-id", "x"))[0]["job_id"] == "x"


def test_invalid_job_exits_2_with_the_reason_and_needs_no_services(
    capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    # Nothing listens on this port: validation must fail before any connection is made.
    monkeypatch.setenv("FLEET_REDIS_URL", "redis://127.0.0.1:1/0")
    code = cli.main(["submit", "a cat", "--width", "100"])
    assert code == cli.EXIT_INVALID
    assert "width=100: must be a multiple of 8 from 64 to 2048" in capsys.readouterr().err


def test_submit_options_for_priority_and_deadline() -> None:
    args = parse("submit", "a", "--priority", "9", "--deadline", "30")
    assert args.priority == 9 and args.deadline == 30.0
    assert parse("submit", "a").priority == 5


def test_wait_options() -> None:
    args = parse("wait", "a", "b", "--output", "out", "--timeout", "5", "--json")
    assert args.job_ids == ["a", "b"] and args.output == Path("out") and args.timeout == 5.0
