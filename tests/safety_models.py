"""Tiny SD pipelines with a random-weight StableDiffusionSafetyChecker, for the safety tests.

The checker flags an image when the cosine between the image's embedding and one of its
concept embeddings exceeds that concept's threshold (``concept_embeds_weights``). Cosines lie
in [-1, 1], so thresholds of -2 flag every image and +2 none, whatever the random weights.
The pipelines are the tiny test model plus the checker and its CLIP image processor, saved with
safetensors and loaded by the worker through ``from_pretrained`` like any SD 1.5 model.
"""

from __future__ import annotations

import json
import shutil
import tempfile
from pathlib import Path

from tests.fleet_fixtures import REPO

THRESHOLDS = {"flags-all": -2.0, "flags-none": 2.0}
MARKER = "fleet-safety-model.json"


def build_safety_model(tiny_model: Path, verdict: str) -> Path:
    """``.models/tiny-safety-<verdict>``: the tiny pipeline with a checker that flags every
    image (``flags-all``) or none (``flags-none``); built once, then reused."""
    import torch
    from diffusers import StableDiffusionPipeline
    from diffusers.pipelines.stable_diffusion.safety_checker import StableDiffusionSafetyChecker
    from transformers import CLIPConfig, CLIPImageProcessor

    out = REPO / ".models" / f"tiny-safety-{verdict}"
    marker = {"verdict": verdict, "threshold": THRESHOLDS[verdict], "from": str(tiny_model)}
    if (out / MARKER).is_file() and json.loads((out / MARKER).read_text()) == marker:
        return out
    torch.manual_seed(0)
    config = CLIPConfig(
        text_config={"hidden_size": 32, "intermediate_size": 37, "num_attention_heads": 4,
                     "num_hidden_layers": 1, "vocab_size": 1000},
        vision_config={"hidden_size": 32, "intermediate_size": 37, "num_attention_heads": 4,
                       "num_hidden_layers": 1, "image_size": 32, "patch_size": 8},
        projection_dim=16,
    )  # fmt: skip
    checker = StableDiffusionSafetyChecker(config).eval()
    with torch.no_grad():
        checker.concept_embeds_weights.fill_(THRESHOLDS[verdict])
        checker.special_care_embeds_weights.fill_(THRESHOLDS[verdict])
    processor = CLIPImageProcessor(
        size={"shortest_edge": 32}, crop_size={"height": 32, "width": 32}
    )
    pipe = StableDiffusionPipeline.from_pretrained(str(tiny_model), local_files_only=True)
    pipe.register_modules(safety_checker=checker, feature_extractor=processor)
    pipe.register_to_config(requires_safety_checker=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.tmp-", dir=out.parent))
    try:
        pipe.save_pretrained(str(tmp), safe_serialization=True)
        (tmp / MARKER).write_text(json.dumps(marker))
        shutil.rmtree(out, ignore_errors=True)
        tmp.rename(out)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return out
