"""The PNG text chunk and the manifest: what makes an image reproducible."""

from __future__ import annotations

from PIL import Image

from fleet.contract import validate_job
from worker.engine.recipe import build_manifest, image_recipe, png_bytes, read_png_recipe


def test_png_carries_the_recipe_and_repeats_byte_for_byte() -> None:
    spec = validate_job({"prompt": "a red fox", "seed": 42, "width": 64, "height": 64})
    img = Image.new("RGB", (64, 64), (200, 30, 10))
    recipe = image_recipe(spec, 42, "tiny", None)
    first = png_bytes(img, recipe)
    assert read_png_recipe(first) == {**spec.recipe("tiny", None), "seed": 42}
    # Another job with the same recipe gives identical bytes: no ids, hosts or times inside.
    other = validate_job({"prompt": "a red fox", "seed": 42, "width": 64, "height": 64})
    assert other.job_id != spec.job_id
    assert png_bytes(img, image_recipe(other, 42, "tiny", None)) == first


def test_manifest_has_the_full_recipe_and_provenance() -> None:
    spec = validate_job({"prompt": "p", "negative_prompt": "n", "seed": 9, "images": 2})
    worker = {
        "model_name": "tiny",
        "model": "/m",
        "revision": "r1",
        "device": "cpu",
        "torch": "2.x",
        "diffusers": "0.x",
        "dtype": "float32",
        "host": "h",
    }
    m = build_manifest(
        spec, status="succeeded", images=[{"key": "k"}], worker=worker, timings={"generate_s": 1.0}
    )
    assert m["prompt"] == "p" and m["negative_prompt"] == "n"
    assert m["seeds"] == [9, 10]
    assert m["model"] == "tiny" and m["revision"] == "r1" and m["model_source"] == "/m"
    assert m["worker"]["device"] == "cpu" and m["worker"]["dtype"] == "float32"
    assert m["job"]["scheduler"] == "default"
    assert m["status"] == "succeeded" and m["error"] is None
