"""Tests for worker.testmodel: random-weight pipelines that load like hub models."""

from __future__ import annotations

import json
import stat
from pathlib import Path
from typing import Any

import diffusers
import pytest
import torch

from worker.testmodel import MARKER_FILE, build_test_model, main


def _generate(pipe: Any, width: int = 64, height: int = 64, steps: int = 4) -> Any:
    gen = torch.Generator("cpu").manual_seed(1)
    return pipe(
        "a photo of a cat",
        width=width,
        height=height,
        num_inference_steps=steps,
        generator=gen,
        output_type="np",
    ).images[0]


@pytest.fixture(scope="module")
def tiny_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return build_test_model("tiny", tmp_path_factory.mktemp("models") / "tiny")


def test_tiny_loads_like_a_hub_model_and_is_deterministic(tiny_dir: Path) -> None:
    assert (tiny_dir / "model_index.json").is_file()
    marker = json.loads((tiny_dir / MARKER_FILE).read_text())
    assert marker["size"] == "tiny"
    assert set(marker["built_with"]) >= {"diffusers", "torch"}
    weights = list(tiny_dir.rglob("*.safetensors"))
    assert {p.parent.name for p in weights} == {"unet", "vae", "text_encoder"}
    for p in tiny_dir.rglob("*"):
        mode = stat.S_IMODE(p.stat().st_mode)
        assert mode == (0o755 if p.is_dir() else 0o644), (p, oct(mode))
    assert stat.S_IMODE(tiny_dir.stat().st_mode) == 0o755
    assert not [p for p in tiny_dir.parent.iterdir() if p.name.startswith(".")]  # no temp dirs

    pipe = diffusers.DiffusionPipeline.from_pretrained(tiny_dir, use_safetensors=True)
    pipe.set_progress_bar_config(disable=True)
    assert isinstance(pipe, diffusers.StableDiffusionPipeline)
    assert pipe.safety_checker is None

    first = _generate(pipe)
    assert first.shape == (64, 64, 3)
    assert (first == _generate(pipe)).all()
    assert _generate(pipe, width=96, height=64).shape == (64, 96, 3)
    image = pipe("cat", width=64, height=64, num_inference_steps=2).images[0]
    assert image.size == (64, 64)


def test_build_is_idempotent_and_weights_are_reproducible(tiny_dir: Path, tmp_path: Path) -> None:
    unet = tiny_dir / "unet" / "diffusion_pytorch_model.safetensors"
    before = unet.stat().st_mtime_ns
    assert build_test_model("tiny", tiny_dir) == tiny_dir
    assert unet.stat().st_mtime_ns == before  # complete model of that size: left alone

    again = build_test_model("tiny", tmp_path / "again")
    for p in tiny_dir.rglob("*.safetensors"):
        assert (again / p.relative_to(tiny_dir)).read_bytes() == p.read_bytes()


def test_refuses_to_replace_a_foreign_folder(tmp_path: Path) -> None:
    (tmp_path / "keep.txt").write_text("user data")
    with pytest.raises(FileExistsError):
        build_test_model("tiny", tmp_path)
    assert main(["--size", "tiny", "--out", str(tmp_path), "-v"]) == 1
    assert (tmp_path / "keep.txt").read_text() == "user data"
    with pytest.raises(ValueError):
        build_test_model("huge", tmp_path / "x")


def test_sdxl_tiny_loads_as_sdxl_and_generates(tmp_path: Path) -> None:
    out = build_test_model("sdxl-tiny", tmp_path / "sdxl")
    pipe = diffusers.DiffusionPipeline.from_pretrained(out, use_safetensors=True)
    pipe.set_progress_bar_config(disable=True)
    assert isinstance(pipe, diffusers.StableDiffusionXLPipeline)
    assert type(pipe.text_encoder).__name__ == "CLIPTextModel"
    assert type(pipe.text_encoder_2).__name__ == "CLIPTextModelWithProjection"
    assert pipe.tokenizer is not None and pipe.tokenizer_2 is not None
    first = _generate(pipe, steps=3)
    assert first.shape == (64, 64, 3)
    assert (first == _generate(pipe, steps=3)).all()
