"""What each text encoder of a pipeline reads of a prompt: CLIP 77 tokens, T5 the
max_sequence_length the worker calls with (SD, SD3, Flux tiny pipelines, in-process)."""

from __future__ import annotations

import pytest

from fleet.contract import validate_job
from fleet.settings import WorkerSettings
from tests.fleet_fixtures import REPO
from worker.engine.engine import Engine
from worker.testmodel import build_test_model

LONG = " ".join(["harbour"] * 120)


@pytest.mark.parametrize(("size", "tokenizers"), [
    ("tiny", {"tokenizer"}),
    ("sd3-tiny", {"tokenizer", "tokenizer_2", "tokenizer_3"}),
    ("flux-tiny", {"tokenizer", "tokenizer_2"}),
])  # fmt: skip
def test_every_tokenizer_counts_the_prompt_against_what_its_encoder_reads(
    size: str, tokenizers: set[str]
) -> None:
    model = build_test_model(size, REPO / ".models" / size)
    engine = Engine(WorkerSettings(_env_file=None, model=str(model), local_files_only=True,
                                   torch_threads=1))  # fmt: skip
    long = engine.prompt_tokens(validate_job({"prompt": LONG, "negative_prompt": "blur"}))
    short = engine.prompt_tokens(validate_job({"prompt": "a harbour"}))
    assert set(long["tokenizers"]) == tokenizers == set(short["tokenizers"])
    assert long["truncated"] is True and short["truncated"] is False
    for name, counted in long["tokenizers"].items():
        t5 = counted["class"].startswith("T5")
        assert counted["limit"] == (engine.rules.max_sequence_length if t5 else 77), name  # type: ignore[union-attr]
        assert counted["prompt"] > counted["limit"] and counted["truncated"] is True
        assert 0 < counted["negative_prompt"] < counted["limit"]
        assert "negative_prompt" not in short["tokenizers"][name]
        assert short["tokenizers"][name]["prompt"] <= counted["limit"]
