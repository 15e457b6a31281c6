"""The fleet end to end on real parts: producer -> Redis -> Celery worker -> diffusers -> S3."""

from __future__ import annotations

import io
import json
import subprocess
import sys
import uuid
from pathlib import Path

import pytest
from PIL import Image

from fleet import contract
from fleet.contract import JobSpec
from worker.engine.recipe import read_png_recipe

pytestmark = pytest.mark.integration

TIMEOUT = 120


def small_job(**kw) -> JobSpec:  # type: ignore[no-untyped-def]
    base = {"prompt": "a red fox in the snow", "width": 64, "height": 64, "steps": 4}
    base.update(kw)
    return JobSpec(**base)


def test_cli_submit_wait_stores_images_with_recipe_and_manifest(
    worker, fleet_env, store, tmp_path: Path
) -> None:
    out = tmp_path / "out"
    proc = subprocess.run(
        [sys.executable, "-m", "producer", "submit", "a red fox", "a blue bird",
         "--width", "64", "--height", "96", "--steps", "4", "--seed", "1234",
         "--images-per-prompt", "2", "--wait", "--output", str(out), "--json",
         "--timeout", str(TIMEOUT)],
        env=fleet_env, capture_output=True, text=True, timeout=TIMEOUT + 30,
    )  # fmt: skip
    assert proc.returncode == 0, proc.stderr
    results = json.loads(proc.stdout)
    assert [r["state"] for r in results] == ["succeeded", "succeeded"]
    for r in results:
        images = r["result"]["images"]
        assert [i["seed"] for i in images] == [1234, 1235]
        assert len(r["files"]) == 2
        for image, path in zip(images, r["files"], strict=True):
            data = store.get_bytes(image["key"])
            assert data is not None and Path(path).read_bytes() == data
            assert image["url"].startswith(fleet_env["FLEET_S3_ENDPOINT_URL"])
            with Image.open(io.BytesIO(data)) as img:
                assert img.size == (64, 96)
            recipe = read_png_recipe(data)
            assert recipe["seed"] == image["seed"] and recipe["steps"] == 4
            assert recipe["model"] == "tiny"
        manifest = store.get_json(contract.manifest_key(r["job_id"]))
        assert manifest["status"] == "succeeded"
        assert manifest["seeds"] == [1234, 1235]
        assert manifest["worker"]["device"] == "cpu"
        assert manifest["worker"]["torch"] and manifest["worker"]["diffusers"]
        assert manifest["worker"]["dtype"] == "float32"
        assert {"generate_s", "upload_s", "total_s"} <= set(manifest["timings"])
    assert {r["result"]["images"][0]["key"] for r in results} == {
        contract.image_key(r["job_id"], 0) for r in results
    }


def test_cli_submit_without_wait_prints_ids_then_status_and_wait(worker, fleet_env) -> None:
    run = lambda *a: subprocess.run(  # noqa: E731
        [sys.executable, "-m", "producer", *a],
        env=fleet_env,
        capture_output=True,
        text=True,
        timeout=TIMEOUT + 30,
    )
    sub = run("submit", "a quiet lake", "--width", "64", "--height", "64", "--steps", "2")
    assert sub.returncode == 0, sub.stderr
    job_id = sub.stdout.strip()
    assert contract.JOB_ID_PATTERN.match(job_id)
    waited = run("wait", job_id, "--timeout", str(TIMEOUT))
    assert waited.returncode == 0, waited.stderr
    assert f"succeeded {job_id}" in waited.stdout
    assert f"s3://fleet/jobs/{job_id}/image-000.png" in waited.stdout
    status = run("status", job_id, "--json")
    assert json.loads(status.stdout)[0]["state"] == "succeeded"


def test_python_api_submit_status_wait(worker, client) -> None:
    handle = client.submit(small_job(images=2, seed=str(2**64 - 1)))
    st = handle.wait(timeout=TIMEOUT)
    assert st.state == "succeeded"
    assert [i.seed for i in st.result.images] == [2**64 - 1, 0]
    assert handle.status().state == "succeeded"


def test_same_seed_gives_byte_identical_images(worker, client, store) -> None:
    a = client.submit(small_job(seed=99)).wait(timeout=TIMEOUT)
    b = client.submit(small_job(seed=99)).wait(timeout=TIMEOUT)
    c = client.submit(small_job(seed=100)).wait(timeout=TIMEOUT)
    bytes_a = store.get_bytes(a.result.images[0].key)
    assert bytes_a == store.get_bytes(b.result.images[0].key)
    assert bytes_a != store.get_bytes(c.result.images[0].key)


def test_same_job_id_twice_makes_one_job(worker, client) -> None:
    job_id = f"client-{uuid.uuid4().hex[:8]}"
    first = client.submit(small_job(job_id=job_id))
    second = client.submit(small_job(job_id=job_id))
    assert not first.duplicate and second.duplicate
    assert first.wait(timeout=TIMEOUT).state == "succeeded"
    assert second.wait(timeout=TIMEOUT).state == "succeeded"
    assert (
        sum(1 for ln in worker.log().splitlines() if f"[job={job_id} " in ln and "received" in ln)
        == 1
    )


def test_bad_job_fails_alone_with_a_clear_error_and_worker_goes_on(worker, client, store) -> None:
    # Sent past the producer's validation, as a careless service would.
    bad_id = f"bad-{uuid.uuid4().hex[:8]}"
    bad = small_job(job_id=bad_id).model_dump(mode="json") | {"width": 100}
    client.celery.send_task(
        contract.TASK_GENERATE, kwargs={"job": bad}, queue="fleet", task_id=bad_id
    )
    wrong_model = client.submit(small_job(model="some-other-model"))
    good = client.submit(small_job())
    st = client.wait([bad_id], timeout=TIMEOUT)[0]
    assert st.state == "failed"
    assert "width=100: must be a multiple of 8 from 64 to 2048" in st.result.error
    assert store.get_json(contract.manifest_key(bad_id))["status"] == "failed"
    wm = wrong_model.wait(timeout=TIMEOUT)
    assert wm.state == "failed" and "this worker serves 'tiny'" in wm.result.error
    # The failure is recorded durably in storage, not only in Celery's expiring results.
    manifest = store.get_json(contract.manifest_key(wrong_model.job_id))
    assert manifest["status"] == "failed" and "serves 'tiny'" in manifest["error"]
    assert good.wait(timeout=TIMEOUT).state == "succeeded"
    assert worker.proc.poll() is None


def test_status_falls_back_to_the_manifest_when_results_expired(worker, client) -> None:
    from celery.result import AsyncResult

    handle = client.submit(small_job())
    assert handle.wait(timeout=TIMEOUT).state == "succeeded"
    AsyncResult(handle.job_id, app=client.celery).forget()  # as if the result had expired
    assert AsyncResult(handle.job_id, app=client.celery).state == "PENDING"
    st = client.status(handle.job_id)
    assert st.state == "succeeded"
    assert st.result.images[0].url  # a fresh presigned URL
    assert client.status("never-submitted-123").state == "unknown"


def test_validation_at_the_producer_enqueues_nothing(worker, client) -> None:
    from fleet.errors import JobValidationError

    depth = client.redis.llen("fleet")
    with pytest.raises(JobValidationError, match="steps=0"):
        client.submit_many([small_job(), {"prompt": "x", "steps": 0}])
    assert client.redis.llen("fleet") == depth


def test_replay_gives_byte_identical_images(worker, client, store, fleet_env, tmp_path) -> None:
    original = client.submit(small_job(images=2, seed=4242, scheduler="dpmpp_2m")).wait(
        timeout=TIMEOUT
    )
    mkey = original.result.manifest_key
    manifest = store.get_json(mkey)
    assert manifest["replay"]["batch"] == 2 and manifest["replay"]["device_type"] == "cpu"
    proc = subprocess.run(
        [sys.executable, "-m", "producer", "replay", mkey, "--wait", "--json"],
        env=fleet_env, capture_output=True, text=True, timeout=TIMEOUT,
    )  # fmt: skip
    assert proc.returncode == 0, proc.stderr
    replayed = json.loads(proc.stdout)[0]
    assert replayed["job_id"] != original.job_id
    for a, b in zip(original.result.images, replayed["result"]["images"], strict=True):
        assert store.get_bytes(a.key) == store.get_bytes(b["key"])
    # From a local copy of the manifest, one image alone, with its own seed.
    local = tmp_path / "manifest.json"
    local.write_text(json.dumps(manifest))
    one = client.replay(str(local), index=1).wait(timeout=TIMEOUT)
    assert [i.seed for i in one.result.images] == [4243]


def test_presigned_urls_are_neither_logged_nor_stored_but_made_when_read(
    worker, client, store
) -> None:
    """A presigned URL lets anyone holding it fetch the image for an hour: the worker's log,
    the Celery result in Redis and the manifest in S3 keep keys only; status presigns at read,
    so each read gets a URL that works now."""
    import urllib.request

    import redis
    from celery.result import AsyncResult

    handle = client.submit(small_job(prompt="no bearer links in the logs"))
    assert handle.wait(timeout=TIMEOUT).state == "succeeded"
    raw = redis.Redis.from_url(client.settings.backend_url).get(f"celery-task-meta-{handle.job_id}")
    manifest = store.get_json(contract.manifest_key(handle.job_id))
    for where, text in (("the Celery result", raw.decode()), ("the manifest", json.dumps(manifest)),
                        ("the worker's log", worker.log())):  # fmt: skip
        assert "X-Amz-Signature" not in text and "Signature=" not in text, where
    assert AsyncResult(handle.job_id, app=client.celery).result["images"][0]["url"] is None
    # Redis keeps the job's JSON once (in the queue while it waits), not again in its result.
    assert "no bearer links in the logs" not in raw.decode() and "kwargs" not in json.loads(raw)
    url = client.status(handle.job_id).result.images[0].url
    assert url and "X-Amz-Signature" in url
    with urllib.request.urlopen(url, timeout=30) as resp:
        assert resp.read() == store.get_bytes(manifest["images"][0]["key"])
