"""Long prompts: CLIP reads 77 tokens and the contract allows 2,000 characters. The result and
the manifest say whether the prompt was cut, with the token counts, on a real worker."""

from __future__ import annotations

import pytest

from fleet import contract
from fleet.contract import JobSpec
from producer.client import Client

pytestmark = pytest.mark.integration

WORDS = ("a", "quiet", "harbour", "at", "dawn", "with", "fishing", "boats", "gulls", "and", "mist")
LONG = " ".join(WORDS[i % len(WORDS)] for i in range(300))  # 300 words, 1,300+ characters
SHORT = "a lighthouse in the fog"  # 5 words


def test_a_long_prompt_is_recorded_as_cut_and_a_short_one_as_whole(
    worker, client: Client, store
) -> None:  # type: ignore[no-untyped-def]
    assert len(LONG.split()) == 300 and len(SHORT.split()) == 5
    long, short = client.submit_many(
        [JobSpec(prompt=p, width=64, height=64, steps=2) for p in (LONG, SHORT)]
    )
    st_long, st_short = client.wait([long.job_id, short.job_id], timeout=120)
    assert st_long.result is not None and st_short.result is not None
    for st, cut in ((st_long, True), (st_short, False)):
        assert st.state == "succeeded", st
        tokens = st.result.prompt_tokens
        assert st.result.prompt_truncated is cut and tokens is not None
        clip = tokens["tokenizers"]["tokenizer"]
        assert clip["class"].startswith("CLIPTokenizer") and clip["limit"] == 77
        assert clip["truncated"] is cut and (clip["prompt"] > 77) is cut
        manifest = store.get_json(contract.manifest_key(st.job_id))
        assert manifest["prompt_truncated"] is cut and manifest["prompt_tokens"] == tokens
        assert manifest["result"]["prompt_tokens"] == tokens
    # Every word is a token or more, with the start and end tokens: the count is the prompt's.
    assert st_long.result.prompt_tokens["tokenizers"]["tokenizer"]["prompt"] >= 302
    assert "the prompt is longer than a text encoder reads" in worker.log()
