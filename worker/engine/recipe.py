"""What makes an image reproducible: the PNG text chunk and the job manifest."""

from __future__ import annotations

import io
import json
from datetime import datetime, timezone
from typing import Any

from PIL import Image
from PIL.PngImagePlugin import PngInfo

from fleet.contract import SCHEMA_VERSION, JobSpec

#: The PNG tEXt key that holds the recipe as JSON.
PNG_RECIPE_KEY = "fleet:recipe"
#: The PNG tEXt key with the safety checker's verdict ({"nsfw": true}), when there is one.
PNG_SAFETY_KEY = "fleet:safety"


def image_recipe(
    spec: JobSpec, seed: int, model: str, revision: str | None, dtype: str | None = None
) -> dict:
    """Deterministic fields only (no job id, host or time): the same recipe gives the same bytes.
    ``dtype`` is the worker's (float16, bfloat16, float32): other pixels in another."""
    recipe = spec.recipe(model, revision)
    recipe["seed"] = seed
    if dtype is not None:
        recipe["dtype"] = dtype
    return recipe


def png_bytes(image: Any, recipe: dict[str, Any], nsfw: bool | None = None) -> bytes:
    """Encode ``image`` (a PIL image, or the engine's HxWxC uint8 array) as PNG with the recipe
    in a text chunk (no timestamps, so bytes repeat), and the safety checker's verdict in
    another when the pipeline has a checker."""
    if not isinstance(image, Image.Image):
        image = pil_image(image)
    info = PngInfo()
    info.add_text(PNG_RECIPE_KEY, json.dumps(recipe, sort_keys=True, ensure_ascii=False))
    if nsfw is not None:
        info.add_text(PNG_SAFETY_KEY, json.dumps({"nsfw": nsfw}))
    buf = io.BytesIO()
    image.save(buf, format="PNG", pnginfo=info)
    return buf.getvalue()


def pil_image(pixels: Any) -> Image.Image:
    """An HxWxC uint8 array as a PIL image, as diffusers' ``numpy_to_pil`` makes it (one
    channel: mode L)."""
    if pixels.ndim == 3 and pixels.shape[-1] == 1:
        return Image.fromarray(pixels[..., 0], mode="L")
    return Image.fromarray(pixels)


def read_png_recipe(data: bytes) -> dict[str, Any]:
    """The recipe stored in a PNG made by the fleet."""
    with Image.open(io.BytesIO(data)) as img:
        text = img.text.get(PNG_RECIPE_KEY)  # type: ignore[attr-defined]
    if text is None:
        raise ValueError("this PNG carries no diffusion-fleet recipe")
    return dict(json.loads(text))


def read_png_nsfw(data: bytes) -> bool | None:
    """The safety checker's verdict stored in a PNG made by the fleet (None: no checker)."""
    with Image.open(io.BytesIO(data)) as img:
        text = img.text.get(PNG_SAFETY_KEY)  # type: ignore[attr-defined]
    return bool(json.loads(text)["nsfw"]) if text is not None else None


def build_manifest(
    spec: JobSpec,
    *,
    status: str,
    images: list[dict[str, Any]],
    worker: dict[str, Any],
    timings: dict[str, float],
    error: str | None = None,
    error_type: str | None = None,
) -> dict[str, Any]:
    """One JSON document per job: the full recipe plus where, how and how fast it ran."""
    return {
        "schema_version": SCHEMA_VERSION,
        "job_id": spec.job_id,
        "status": status,
        "job": spec.model_dump(mode="json"),
        "prompt": spec.prompt,
        "negative_prompt": spec.negative_prompt,
        "seeds": spec.seeds(),
        "width": spec.width,
        "height": spec.height,
        "steps": spec.steps,
        "guidance": spec.guidance,
        "scheduler": spec.scheduler,
        "generator_device": spec.generator_device or "cpu",
        "dtype": worker.get("dtype"),
        "model": worker.get("model_name") or spec.model,
        "model_source": worker.get("model"),
        "revision": worker.get("revision"),
        "images": images,
        "worker": worker,
        "timings": timings,
        "error": error,
        "error_type": error_type,
        # What a replay must match to give byte-identical PNGs (`producer replay`).
        "replay": {
            "must_match": [
                "device_type",
                "dtype",
                "torch_threads",
                "batch (images per job)",
                "torch",
                "diffusers",
                "model revision",
            ],
            "device_type": worker.get("device_type"),
            "generator_device": spec.generator_device or "cpu",
            "torch_threads": worker.get("torch_threads"),
            "batch": spec.images,
        },
        "finished_at": datetime.now(timezone.utc).isoformat(),
    }
