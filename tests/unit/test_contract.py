"""Validation rules of the job contract, each with the message a user sees."""

from __future__ import annotations

import pytest

from fleet import contract
from fleet.contract import JobSpec, Limits, validate_job
from fleet.errors import JobValidationError


def problems(data: dict, limits: Limits | None = None) -> dict[str, str]:
    with pytest.raises(JobValidationError) as info:
        validate_job(data, limits)
    return {field: msg for field, _, msg in info.value.problems}


def test_a_good_job_gets_defaults_and_an_id() -> None:
    spec = validate_job({"prompt": "a lighthouse at dusk"})
    assert spec.schema_version == contract.SCHEMA_VERSION
    assert contract.JOB_ID_PATTERN.match(spec.job_id)
    assert 0 <= spec.seed < contract.SAFE_RANDOM_SEED_LIMIT
    assert (spec.width, spec.height, spec.images, spec.scheduler) == (512, 512, 1, "default")


@pytest.mark.parametrize("side", [100, 63, 0, 4096])
def test_width_must_be_a_multiple_of_8_within_bounds(side: int) -> None:
    msgs = problems({"prompt": "x", "width": side})
    assert msgs == {"width": "must be a multiple of 8 from 64 to 2048"}


def test_height_bounds_come_from_limits() -> None:
    limits = Limits(max_side=256)
    assert problems({"prompt": "x", "height": 512}, limits) == {
        "height": "must be a multiple of 8 from 64 to 256"
    }
    assert validate_job({"prompt": "x", "height": 256}, limits).height == 256


def test_steps_guidance_images_bounds() -> None:
    msgs = problems({"prompt": "x", "steps": 0, "guidance": 31, "images": 9})
    assert msgs["steps"] == "must be from 1 to 150"
    assert msgs["guidance"] == "must be from 0.0 to 30.0"
    assert msgs["images"] == "images per prompt must be from 1 to 8"


def test_prompt_must_not_be_empty_or_too_long() -> None:
    assert problems({"prompt": "   "}) == {"prompt": "the prompt must not be empty"}
    msgs = problems({"prompt": "x" * 11}, Limits(max_prompt_chars=10))
    assert msgs == {"prompt": "the prompt has 11 characters; at most 10 are allowed"}
    assert "prompt" in problems({})


def test_seed_is_unsigned_64_bit_and_may_be_a_string() -> None:
    top = 2**64 - 1
    assert validate_job({"prompt": "x", "seed": str(top)}).seed == top
    assert validate_job({"prompt": "x", "seed": 7}).seed == 7
    assert "seed" in problems({"prompt": "x", "seed": 2**64})
    assert "seed" in problems({"prompt": "x", "seed": -1})
    assert "seed" in problems({"prompt": "x", "seed": "12abc"})
    assert "seed" in problems({"prompt": "x", "seed": True})


def test_image_seeds_wrap_modulo_2_64() -> None:
    spec = validate_job({"prompt": "x", "seed": str(2**64 - 2), "images": 3})
    assert spec.seeds() == [2**64 - 2, 2**64 - 1, 0]


def test_model_must_be_on_the_allowed_list_when_there_is_one() -> None:
    limits = Limits(allowed_models=("sd15", "sdxl"))
    assert problems({"prompt": "x", "model": "flux"}, limits) == {
        "model": "model not allowed here; allowed: sd15, sdxl"
    }
    assert validate_job({"prompt": "x", "model": "sdxl"}, limits).model == "sdxl"
    assert validate_job({"prompt": "x", "model": "anything"}).model == "anything"


def test_unknown_scheduler_and_unknown_fields_are_refused() -> None:
    msgs = problems({"prompt": "x", "scheduler": "magic", "colour": "red"})
    assert msgs["scheduler"].startswith("unknown scheduler; choose one of: default, ddim")
    assert msgs["colour"] == "unknown field; see docs/contract.md for the job schema"


@pytest.mark.parametrize("job_id", ["", "../etc", "a/b", "-x", "x" * 129, "a b"])
def test_job_ids_are_safe_key_parts(job_id: str) -> None:
    assert "job_id" in problems({"prompt": "x", "job_id": job_id})


def test_schema_version_is_checked() -> None:
    assert problems({"prompt": "x", "schema_version": 2}) == {
        "schema_version": f"this fleet speaks schema_version {contract.SCHEMA_VERSION}"
    }


def test_the_message_names_field_value_and_rule() -> None:
    with pytest.raises(JobValidationError) as info:
        validate_job({"prompt": "x", "width": 100})
    assert str(info.value) == "invalid job: width=100: must be a multiple of 8 from 64 to 2048"


def test_not_an_object() -> None:
    with pytest.raises(JobValidationError, match="must be a JSON object"):
        validate_job(["prompt"])


def test_jobspec_instance_is_revalidated_against_limits() -> None:
    spec = JobSpec(prompt="x", width=1024)
    with pytest.raises(JobValidationError, match="width=1024"):
        validate_job(spec, Limits(max_side=512))


def test_key_layout() -> None:
    assert contract.image_key("j1", 3) == "jobs/j1/image-003.png"
    assert contract.manifest_key("j1") == "jobs/j1/manifest.json"
    assert contract.image_key("j1", 0, prefix="/team-a/") == "team-a/jobs/j1/image-000.png"
    assert contract.manifest_key("j1", prefix="x") == "x/jobs/j1/manifest.json"


def test_routing_by_model() -> None:
    routes = {"flux": "fleet.balanced"}
    assert contract.queue_for("flux", routes) == "fleet.balanced"
    assert contract.queue_for("sd15", routes) == contract.DEFAULT_QUEUE
    assert contract.queue_for(None, routes, "mine") == "mine"


def test_recipe_holds_only_deterministic_fields() -> None:
    spec = validate_job({"prompt": "x", "seed": 5})
    recipe = spec.recipe("m", "abc")
    assert set(recipe) == {
        "prompt",
        "negative_prompt",
        "width",
        "height",
        "steps",
        "guidance",
        "scheduler",
        "model",
        "revision",
        "generator_device",
    }


def test_webhook_targets_in_private_ranges_are_refused_unless_allowed() -> None:
    msgs = problems({"prompt": "x", "webhook": "http://127.0.0.1:8080/hook"})
    assert "private, loopback or reserved" in msgs["webhook"]
    assert "10.0.0.5" in problems({"prompt": "x", "webhook": "https://10.0.0.5/h"})["webhook"]
    assert "http:// or https://" in problems({"prompt": "x", "webhook": "ftp://a/b"})["webhook"]
    allowed = Limits(webhook_allow_private=True)
    assert validate_job({"prompt": "x", "webhook": "http://127.0.0.1/h"}, allowed).webhook


def test_a_job_without_a_seed_derives_it_from_its_id_the_same_everywhere() -> None:
    import hashlib
    import subprocess
    import sys

    job = validate_job({"prompt": "a fox", "job_id": "job-42"})
    expected = int.from_bytes(hashlib.sha256(b"job-42").digest()[:8], "big") % 2**53
    assert job.seed == contract.derived_seed("job-42") == expected
    # Another process (another hash() salt) derives the same seed.
    code = "from fleet.contract import derived_seed; print(derived_seed('job-42'))"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert int(out.stdout) == expected
    assert validate_job({"prompt": "a fox", "job_id": "job-42", "seed": 7}).seed == 7
    assert contract.derived_seed("job-43") != expected
    fresh = JobSpec(prompt="no id")
    assert fresh.seed == contract.derived_seed(fresh.job_id) < 2**53


MEGABYTE_PROMPT = "a" * 1_000_000


@pytest.mark.parametrize("field", ["prompt", "negative_prompt"])
def test_an_error_quotes_the_start_of_a_long_value_and_its_length(field: str) -> None:
    job = {"prompt": "x", field: MEGABYTE_PROMPT}
    with pytest.raises(JobValidationError) as info:
        validate_job(job)
    text = str(info.value)
    assert len(text) < 400, text[:400]
    assert f"{field}='{'a' * contract.QUOTE_CHARS}…' (1,000,000 characters)" in text
    assert "at most 2,000 are allowed" in text
    # What the error keeps besides its message is bounded too: no pydantic error chained or
    # as its context (its text and errors() hold the whole input), short problem values.
    assert info.value.__cause__ is None and info.value.__context__ is None
    assert all(len(repr(value)) < 200 for _, value, _ in info.value.problems)


def test_oversized_names_values_and_problem_counts_are_bounded() -> None:
    cases = [
        {"prompt": "x", "k" * 1_000_000: 1},  # an unknown key a megabyte long
        {"prompt": "x", **{f"key{i}": i for i in range(10_000)}},  # ten thousand unknown keys
        {"prompt": ["a"] * 1_000_000},  # not a string, and big
        {"prompt": "x", "seed": 10**4000},
        {"prompt": "x", "webhook": "https://" + "h" * 1_000_000 + "/hook"},
    ]
    for job in cases:
        with pytest.raises(JobValidationError) as info:
            validate_job(job)
        assert len(str(info.value)) < 2_000, str(info.value)[:300]
    with pytest.raises(JobValidationError) as info:
        validate_job(MEGABYTE_PROMPT)  # not even an object
    assert "(1,000,000 characters): must be a JSON object" in str(info.value)
    assert len(str(info.value)) < 400


def test_many_problems_end_with_how_many_there_are() -> None:
    msgs = problems({"prompt": "x", **{f"key{i}": i for i in range(100)}})
    assert len(msgs) == contract.MAX_PROBLEMS + 1
    assert (
        msgs["job"] == f"only the first {contract.MAX_PROBLEMS} are listed; fix those and try again"
    )


def test_a_short_value_is_quoted_whole() -> None:
    assert contract.quote_value("a cat") == "a cat"
    assert contract.quote_value(100) == 100
    assert repr(contract.quote_value("b" * 81)) == f"'{'b' * 80}…' (81 characters)"


@pytest.mark.parametrize("field", ["prompt", "negative_prompt", "model", "webhook"])
@pytest.mark.parametrize(
    ("bad", "what"), [("\x00", "a NUL character"), ("\ud800", "a lone surrogate")]
)
def test_nul_characters_and_lone_surrogates_are_refused_naming_the_field(
    field: str, bad: str, what: str
) -> None:
    value = f"https://example.com/{bad}" if field == "webhook" else f"a fox{bad} in snow"
    allow = Limits(webhook_allow_private=True)
    msgs = problems({"prompt": "x", field: value}, allow)
    assert list(msgs) == [field]
    assert msgs[field].startswith(f"contains {what} (")
    at = value.index(bad) + 1
    assert f"at character {at}" in msgs[field]
    with pytest.raises(JobValidationError) as info:
        validate_job({"prompt": "x", field: value}, allow)
    str(info.value).encode("utf-8")  # the message itself is printable UTF-8 (escaped)
    assert bad not in str(info.value)
    # Text beyond the basic plane is fine: only what is not Unicode text is refused.
    fine = value.replace(bad, "🦊 漢字")
    assert getattr(validate_job({"prompt": "x", field: fine}, allow), field) == fine
