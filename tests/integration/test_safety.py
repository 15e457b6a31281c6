"""The safety checker of SD 1.5-family models: its verdict per image reaches the result, the
manifest and the PNG, and FLEET_SAFETY_POLICY decides what a flagged image becomes.

Real `celery worker` processes serve tiny pipelines with a random StableDiffusionSafetyChecker
whose thresholds flag every image or none (tests/safety_models.py); the drop and fail policies
run the same pipeline through the worker's job runner in-process, against the real S3 server.
"""

from __future__ import annotations

import io
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from fleet import contract
from fleet.contract import JobSpec, validate_job
from fleet.errors import ImageFlagged
from fleet.settings import WorkerSettings
from producer.client import Client
from tests.fleet_fixtures import settings_kwargs
from tests.safety_models import build_safety_model
from worker.engine.recipe import read_png_nsfw
from worker.webhooks import with_fresh_urls

pytestmark = pytest.mark.integration


def job(**kw) -> JobSpec:  # type: ignore[no-untyped-def]
    return JobSpec(prompt="a lighthouse at dusk", width=64, height=64, steps=2, images=2, **kw)


def pixels(data: bytes) -> np.ndarray:
    with Image.open(io.BytesIO(data)) as img:
        return np.asarray(img.convert("RGB"))


@pytest.mark.parametrize("verdict", ["flags-all", "flags-none"])
def test_the_checkers_verdict_is_recorded_per_image_in_result_manifest_and_png(
    start_worker, qclient: Client, queue: str, store, tiny_model: Path, verdict: str
) -> None:
    """The default policy (flag): every image is stored, a flagged one black and flagged."""
    model = build_safety_model(tiny_model, verdict)
    start_worker(f"safety-{verdict}", queues=queue, FLEET_MODEL=str(model))
    st = qclient.submit(job()).wait(timeout=120)
    assert st.state == "succeeded" and st.result is not None, st
    flagged = verdict == "flags-all"
    assert [img.nsfw for img in st.result.images] == [flagged, flagged]
    assert st.result.safety == {"checker": "StableDiffusionSafetyChecker", "policy": "flag",
                                "flagged": [0, 1] if flagged else [], "dropped": []}  # fmt: skip
    manifest = store.get_json(contract.manifest_key(st.job_id))
    assert [img["nsfw"] for img in manifest["images"]] == [flagged, flagged]
    assert manifest["safety"] == st.result.safety
    for record in st.result.images:
        data = store.get_bytes(record.key)
        assert read_png_nsfw(data) is flagged
        assert bool(pixels(data).max() == 0) == flagged  # the checker blacked it out, or not
    # What a webhook sends: the stored result with fresh URLs, the flags kept.
    hook = with_fresh_urls(st.result.model_dump(mode="json"), lambda key: f"https://x/{key}")
    assert [img["nsfw"] for img in hook["images"]] == [flagged, flagged]


def test_a_model_without_a_checker_records_no_verdict(worker, client: Client) -> None:  # type: ignore[no-untyped-def]
    st = client.submit(job()).wait(timeout=120)
    assert st.state == "succeeded" and st.result is not None
    assert st.result.safety is None and [i.nsfw for i in st.result.images] == [None, None]


@pytest.fixture(scope="module")
def flagging_runner(tiny_model: Path, fleet_env: dict):  # type: ignore[no-untyped-def]
    """The worker's job runner on the flag-everything pipeline, storing in the real S3."""
    from fleet.storage import ObjectStore
    from worker.engine.engine import Engine
    from worker.runner import JobRunner

    model = build_safety_model(tiny_model, "flags-all")
    kwargs = {**settings_kwargs(fleet_env), "model": str(model), "torch_threads": 1}
    settings = WorkerSettings(_env_file=None, **kwargs)
    engine = Engine(settings)
    engine.setup()
    return JobRunner(settings, engine, ObjectStore(settings))


def test_the_drop_policy_stores_no_flagged_image_and_lists_it(flagging_runner, store) -> None:  # type: ignore[no-untyped-def]
    flagging_runner.settings.safety_policy = "drop"
    spec = validate_job(job().model_dump())
    result = contract.JobResult.model_validate(flagging_runner.run(spec.model_dump()))
    assert result.status == "succeeded" and result.images == []
    assert result.safety is not None and result.safety["dropped"] == [0, 1]
    assert store.list_keys(contract.job_prefix(spec.job_id)) == [
        contract.manifest_key(spec.job_id)
    ]  # no image object
    assert store.get_json(contract.manifest_key(spec.job_id))["safety"]["dropped"] == [0, 1]


def test_the_fail_policy_fails_the_job_saying_why(flagging_runner, store) -> None:  # type: ignore[no-untyped-def]
    flagging_runner.settings.safety_policy = "fail"
    spec = validate_job(job().model_dump())
    with pytest.raises(ImageFlagged, match=r"flagged image\(s\) \[0, 1\] of 2") as err:
        flagging_runner.run(spec.model_dump())
    assert "FLEET_SAFETY_POLICY is fail" in str(err.value)
    manifest = store.get_json(contract.manifest_key(spec.job_id))
    assert manifest["status"] == "failed" and manifest["error_type"] == "ImageFlagged"
    assert store.list_keys(contract.job_prefix(spec.job_id)) == [contract.manifest_key(spec.job_id)]
