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


def no_broker(monkeypatch: pytest.MonkeyPatch) -> None:
    """Nothing listens on this port: a command that tried to enqueue would exit EXIT_BROKER."""
    monkeypatch.setenv("FLEET_REDIS_URL", "redis://127.0.0.1:1/0")


def test_a_file_with_invalid_utf8_names_its_line_and_enqueues_nothing(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    no_broker(monkeypatch)
    f = tmp_path / "prompts.txt"
    f.write_bytes(b"a cat\n# a comment\nthe caf\xe9 at night\na dog\n")
    code = cli.main(["submit", "--file", str(f)])
    err = capsys.readouterr().err
    assert code == cli.EXIT_INVALID, err
    assert "line 3, byte 8: 0xe9 is not UTF-8" in err
    assert "save the file as UTF-8" in err and "nothing was submitted" in err
    # stdin, read as bytes, too
    monkeypatch.setattr("sys.stdin", io.TextIOWrapper(io.BytesIO(f.read_bytes())))
    assert cli.main(["submit", "--file", "-"]) == cli.EXIT_INVALID
    assert "--file='-': line 3, byte 8" in capsys.readouterr().err


def test_a_file_that_cannot_be_read_is_bad_input(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    no_broker(monkeypatch)
    code = cli.main(["submit", "--file", str(tmp_path / "missing.txt")])
    assert code == cli.EXIT_INVALID
    assert "cannot be read: No such file or directory" in capsys.readouterr().err


def test_a_megabyte_prompt_gets_a_short_error(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    no_broker(monkeypatch)
    f = tmp_path / "big.txt"
    f.write_text("a" * 1_000_000 + "\n")
    code = cli.main(["submit", "--file", str(f)])
    err = capsys.readouterr().err
    assert code == cli.EXIT_INVALID
    assert len(err) < 400, err[:400]
    assert "prompt=" in err and "(1,000,000 characters)" in err


@pytest.mark.parametrize("bad", ["\x00", "\ud800"])
@pytest.mark.parametrize("option", [None, "--negative"])
def test_nul_and_lone_surrogates_are_refused_before_anything_is_sent(
    bad: str, option: str | None, capsys: pytest.CaptureFixture[str],
    monkeypatch: pytest.MonkeyPatch,
) -> None:  # fmt: skip
    no_broker(monkeypatch)
    text = f"a [bold]fox[/bold] [/x]{bad}"  # markup-like text is shown as it is, never parsed
    argv = ["submit", "a fox", option, text] if option else ["submit", text]
    code = cli.main(argv)
    err = capsys.readouterr().err
    assert code == cli.EXIT_INVALID, err
    field = "negative_prompt" if option else "prompt"
    assert f"{field}='a [bold]fox[/bold] [/x]\\" in err
    assert "contains a NUL character" in err or "contains a lone surrogate" in err
