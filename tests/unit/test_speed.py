"""GPU speed settings, applied to the tiny pipeline on the CPU and checked to take effect."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
from pydantic import ValidationError

from fleet.contract import validate_job
from fleet.settings import WorkerSettings
from worker.engine.engine import Engine
from worker.engine.speed import apply_speed_settings


def engine(model: Path, **kw) -> Engine:  # type: ignore[no-untyped-def]
    e = Engine(WorkerSettings(_env_file=None, model=str(model), model_name="tiny",
                              local_files_only=True, torch_threads=1, **kw))  # fmt: skip
    e.setup()
    return e


def spec():  # type: ignore[no-untyped-def]
    return validate_job({"prompt": "a fox", "width": 64, "height": 64, "steps": 3, "seed": 9})


def test_sdpa_attention_channels_last_and_vae_slicing_tiling(tiny_model: Path) -> None:
    from diffusers.models.attention_processor import AttnProcessor2_0

    e = engine(tiny_model, channels_last=True, vae_slicing=True, vae_tiling=True)
    procs = e.pipe.unet.attn_processors.values()
    assert procs and all(isinstance(p, AttnProcessor2_0) for p in procs)
    conv = e.pipe.unet.conv_in.weight
    assert conv.is_contiguous(memory_format=torch.channels_last)
    assert e.pipe.vae.use_slicing and e.pipe.vae.use_tiling
    assert e.describe()["speed"] == {"attention": "sdpa", "channels_last": True,
                                     "vae_slicing": True, "vae_tiling": True}  # fmt: skip
    assert e.generate(spec()).images[0].shape == (64, 64, 3)


def test_compile_with_the_eager_backend_warms_up_and_gives_the_same_images(
    tiny_model: Path,
) -> None:
    plain = engine(tiny_model)
    compiled = engine(tiny_model, compile=True, compile_backend="eager")
    assert type(compiled.pipe.unet).__name__ == "OptimizedModule"
    assert compiled.describe()["speed"]["compile"] == "eager"
    a = np.asarray(plain.generate(spec()).images[0])
    b = np.asarray(compiled.generate(spec()).images[0])
    assert np.abs(a.astype(int) - b.astype(int)).max() <= 1


def test_the_warm_up_compiles_every_served_shape_so_that_no_job_compiles_again(
    tiny_model: Path, caplog: pytest.LogCaptureFixture
) -> None:
    e = engine(tiny_model, compile=True, compile_backend="eager",
               warmup_shapes="64x64x1, 64x64x2")  # fmt: skip
    speed = e.describe()["speed"]
    assert speed["warmup_shapes"] == ["64x64x1", "64x64x2"]
    assert speed["graphs_after_warmup"] >= 1 and speed["compile_warmup_s"] > 0
    for images in (1, 2, 1):
        e.generate(validate_job({"prompt": "a fox", "width": 64, "height": 64, "steps": 3,
                                 "images": images}))  # fmt: skip
    assert e.describe()["speed"]["compiles_after_warmup"] == 0
    with caplog.at_level("WARNING", logger="worker.engine.engine"):
        e.generate(validate_job({"prompt": "a fox", "width": 96, "height": 64, "steps": 3}))
    assert e.describe()["speed"]["compiles_after_warmup"] >= 1  # a shape not warmed up
    assert "add 96x64x1 to FLEET_WARMUP_SHAPES" in caplog.text


def test_regional_compilation_compiles_the_repeated_blocks_in_place(tiny_model: Path) -> None:
    plain = engine(tiny_model)
    regional = engine(tiny_model, compile=True, compile_backend="eager", compile_scope="regional")
    unet = regional.pipe.unet
    assert type(unet).__name__ == "UNet2DConditionModel"  # the UNet itself is not wrapped
    blocks = [m for m in unet.modules() if type(m).__name__ == "BasicTransformerBlock"]
    assert blocks and all(getattr(b, "_compiled_call_impl", None) is not None for b in blocks)
    assert regional.describe()["speed"]["compile_scope"] == "regional"
    a = np.asarray(plain.generate(spec()).images[0])
    b = np.asarray(regional.generate(spec()).images[0])
    assert np.abs(a.astype(int) - b.astype(int)).max() <= 1


@pytest.mark.parametrize("bad", ["512x512", "512x512x0", "axbxc", "512x512x1,64"])
def test_warmup_shapes_that_are_not_width_height_images_are_refused(bad: str) -> None:
    with pytest.raises(ValidationError, match="WIDTHxHEIGHTxIMAGES"):
        WorkerSettings(_env_file=None, warmup_shapes=bad)
    assert WorkerSettings(_env_file=None, warmup_shapes="512X768x4,").warmup_calls() == [
        (512, 768, 4)
    ]


def test_tf32_is_enabled_on_cuda_only(tiny_model: Path) -> None:
    before = (torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32)
    e = engine(tiny_model)
    settings = WorkerSettings(_env_file=None, tf32=True, attention="default")
    try:
        assert "tf32" not in apply_speed_settings(e.pipe, settings, "cpu")
        assert apply_speed_settings(e.pipe, settings, "cuda:0") == {"tf32": True}
        assert torch.backends.cuda.matmul.allow_tf32 and torch.backends.cudnn.allow_tf32
    finally:
        torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32 = before
