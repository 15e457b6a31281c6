"""scripts/benchlib/realsize.py: random-weight pipelines with the real models' configs.

The real sizes are counted on the meta device (nothing allocated); the tiny stand-ins keep the
real structure, build and generate finite images on the CPU, and save into folders that
``from_pretrained`` and the worker's Engine load."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
from PIL import Image

from scripts.benchlib import realsize

M, B = 1e6, 1e9


@pytest.fixture(scope="module")
def real_params() -> dict[str, dict[str, int]]:
    return {name: realsize.model_params(name) for name in realsize.MODELS}


def test_real_sizes_counted_without_allocating(real_params: dict[str, dict[str, int]]) -> None:
    sd15, sdxl, flux = real_params["sd15"], real_params["sdxl"], real_params["flux"]
    assert 850 * M <= sd15["unet"] <= 870 * M  # 859.52 M published
    assert 83 * M <= sd15["vae"] <= 84.5 * M
    assert 122 * M <= sd15["text_encoder"] <= 124 * M  # CLIP ViT-L/14's text model
    assert 2.5 * B <= sdxl["unet"] <= 2.7 * B  # 2.567 B
    assert 690 * M <= sdxl["text_encoder_2"] <= 700 * M  # OpenCLIP bigG's text tower
    assert sdxl["text_encoder"] == sd15["text_encoder"]
    assert 11.5 * B <= flux["transformer"] <= 12.5 * B  # 11.9 B
    assert 4.6 * B <= flux["text_encoder_2"] <= 4.9 * B  # T5-XXL's encoder: 4.76 B
    assert 83 * M <= flux["vae"] <= 85 * M


def test_builders_pass_the_published_values_into_the_models() -> None:
    with realsize.building_on("meta", torch.float32):
        sd15 = realsize.construct("sd15", realsize.configs("sd15"))
        sdxl = realsize.construct("sdxl", realsize.configs("sdxl"))
        flux = realsize.construct("flux", realsize.configs("flux"))
    unet = sd15["unet"].config
    assert list(unet.block_out_channels) == [320, 640, 1280, 1280]
    assert (unet.layers_per_block, unet.cross_attention_dim, unet.attention_head_dim) == (2, 768, 8)
    assert unet.sample_size == 64
    assert list(sd15["vae"].config.block_out_channels) == [128, 256, 512, 512]
    assert (sd15["vae"].config.latent_channels, sd15["vae"].config.scaling_factor) == (4, 0.18215)
    clip = sd15["text_encoder"].config
    assert (clip.hidden_size, clip.num_hidden_layers, clip.num_attention_heads) == (768, 12, 12)
    assert (clip.intermediate_size, clip.vocab_size, clip.max_position_embeddings) == (
        3072,
        49408,
        77,
    )
    xl = sdxl["unet"].config
    assert list(xl.block_out_channels) == [320, 640, 1280]
    assert list(xl.transformer_layers_per_block) == [1, 2, 10]
    assert list(xl.attention_head_dim) == [5, 10, 20]
    assert (xl.cross_attention_dim, xl.addition_embed_type) == (2048, "text_time")
    assert (xl.projection_class_embeddings_input_dim, xl.use_linear_projection) == (2816, True)
    assert sdxl["vae"].config.scaling_factor == 0.13025
    big_g = sdxl["text_encoder_2"].config
    assert (big_g.hidden_size, big_g.num_hidden_layers, big_g.num_attention_heads) == (1280, 32, 20)
    assert (big_g.intermediate_size, big_g.projection_dim) == (5120, 1280)
    ft = flux["transformer"].config
    assert (ft.num_layers, ft.num_single_layers, ft.attention_head_dim) == (19, 38, 128)
    assert (ft.num_attention_heads, ft.joint_attention_dim, ft.pooled_projection_dim) == (
        24,
        4096,
        768,
    )
    assert (ft.guidance_embeds, list(ft.axes_dims_rope), ft.in_channels) == (True, [16, 56, 56], 64)
    fv = flux["vae"].config
    assert (fv.latent_channels, fv.scaling_factor, fv.shift_factor) == (16, 0.3611, 0.1159)
    t5 = flux["text_encoder_2"].config
    assert (t5.d_model, t5.d_ff, t5.num_layers, t5.num_heads, t5.d_kv) == (4096, 10240, 24, 64, 64)
    assert (t5.vocab_size, t5.feed_forward_proj, t5.is_gated_act) == (32128, "gated-gelu", True)
    assert (t5.pad_token_id, t5.eos_token_id) == (0, 1)
    assert next(sd15["unet"].parameters()).device.type == "meta"


def test_schedulers_are_the_published_ones() -> None:
    for name, cls, key, value in (
        ("sd15", "PNDMScheduler", "skip_prk_steps", True),
        ("sdxl", "EulerDiscreteScheduler", "timestep_spacing", "leading"),
        ("flux", "FlowMatchEulerDiscreteScheduler", "use_dynamic_shifting", True),
    ):
        scheduler = realsize.make_scheduler(name, realsize.configs(name)["scheduler"])
        assert type(scheduler).__name__ == cls
        assert scheduler.config[key] == value


@pytest.mark.parametrize("name", realsize.MODELS)
def test_tiny_keeps_the_structure(name: str) -> None:
    real, tiny = realsize.configs(name), realsize.configs(name, tiny=True)
    assert real.keys() == tiny.keys()
    denoiser = "transformer" if name == "flux" else "unet"
    for key in ("down_block_types", "up_block_types", "in_channels", "addition_embed_type"):
        assert real[denoiser].get(key) == tiny[denoiser].get(key)
    assert len(tiny["vae"]["block_out_channels"]) == len(real["vae"]["block_out_channels"])
    assert tiny["vae"]["latent_channels"] == real["vae"]["latent_channels"]
    assert tiny["vae"].get("scaling_factor") == real["vae"].get("scaling_factor")
    if name != "flux":
        levels = len(real["unet"]["block_out_channels"])
        assert len(tiny["unet"]["block_out_channels"]) == levels
    assert sum(realsize.model_params(name, tiny=True).values()) < 10 * M
    assert realsize.configs(name) == real  # the published dicts are not changed by shrinking


def generate(pipe: Any, name: str, side: int = 64, n: int = 2) -> Any:
    extra = {"max_sequence_length": realsize.TINY_T5_TOKENS} if name == "flux" else {}
    with torch.inference_mode():
        return pipe(
            prompt=["a lighthouse at dusk", "a red fox in snow"][:n],
            width=side,
            height=side,
            num_inference_steps=3,
            guidance_scale=3.5 if name == "flux" else 7.5,
            generator=[torch.Generator().manual_seed(1000 + i) for i in range(n)],
            output_type="np",
            **extra,
        ).images


@pytest.mark.parametrize("name", realsize.MODELS)
def test_tiny_builds_and_generates_finite_images_on_cpu(name: str) -> None:
    built = realsize.build(name, "cpu", torch.float32, tiny=True)
    expected = {
        "sd15": "StableDiffusionPipeline",
        "sdxl": "StableDiffusionXLPipeline",
        "flux": "FluxPipeline",
    }[name]
    assert type(built.pipe).__name__ == expected
    assert built.params == realsize.model_params(name, tiny=True)
    assert built.describe()["total_params"] == built.total_params
    for module in (getattr(built.pipe, n) for n in built.params):
        p = next(module.parameters())
        assert (p.device.type, p.dtype) == ("cpu", torch.float32)
    images = generate(built.pipe, name)
    check = realsize.finite(images)
    assert check["finite"] and check["not_constant"], check
    assert check["shape"] == [2, 64, 64, 3]
    assert not np.allclose(images[0], images[1])  # one seed and one prompt an image


def test_tiny_in_float16_stays_finite() -> None:
    """The guard the GPU runs rely on: HF-style weights keep fp16 activations finite."""
    built = realsize.build("sd15", "cpu", torch.float16, tiny=True)
    assert next(built.pipe.unet.parameters()).dtype == torch.float16
    check = realsize.finite(generate(built.pipe, "sd15", n=1))
    assert check["finite"] and check["not_constant"], check


def test_init_scales_weights_like_hf() -> None:
    layer = torch.nn.Sequential(torch.nn.Linear(512, 512), torch.nn.Conv2d(8, 8, 3))
    realsize.init(layer)
    weight = layer[0].weight.detach()
    assert abs(float(weight.std()) - realsize.INIT_STD) < 0.002
    assert float(layer[0].bias.detach().abs().max()) == 0.0
    assert float(layer[1].bias.detach().abs().max()) == 0.0
    with realsize.building_on("meta", torch.float32):
        realsize.init(torch.nn.Linear(4, 4))  # meta tensors: nothing to fill, no error


def test_building_on_restores_the_default_dtype() -> None:
    before = torch.get_default_dtype()
    with realsize.building_on("cpu", torch.bfloat16):
        assert torch.empty(1).dtype == torch.bfloat16
    assert torch.get_default_dtype() == before
    with pytest.raises(ValueError), realsize.building_on("cpu", torch.float16):
        raise ValueError("a failing build")
    assert torch.get_default_dtype() == before


def test_finite_catches_nan_and_constant_images() -> None:
    good = np.random.default_rng(0).random((1, 8, 8, 3), dtype=np.float32)
    assert realsize.finite(good)["finite"] and realsize.finite(good)["not_constant"]
    nan = good.copy()
    nan[0, 0, 0, 0] = np.nan
    assert realsize.finite(nan)["finite"] is False
    assert realsize.finite(np.zeros((1, 8, 8, 3)))["not_constant"] is False
    black = [Image.new("RGB", (8, 8))]
    assert realsize.finite(black)["not_constant"] is False
    noisy = [Image.fromarray((good[0] * 255).astype("uint8"))]
    assert realsize.finite(noisy)["not_constant"] is True
    assert realsize.finite(torch.from_numpy(good))["finite"] is True


def test_an_unknown_model_is_refused_with_the_known_names() -> None:
    with pytest.raises(ValueError, match="sd15, sdxl, flux"):
        realsize.configs("sd3")


@pytest.mark.parametrize("name", ["sd15", "flux"])
def test_save_round_trips_through_from_pretrained_and_the_engine(name: str, tmp_path: Path) -> None:
    from diffusers import DiffusionPipeline

    from fleet.contract import JobSpec
    from fleet.settings import WorkerSettings
    from worker.engine.engine import Engine

    built = realsize.build(name, "cpu", torch.float32, tiny=True)
    folder = realsize.save(built.pipe, tmp_path / name, built)
    assert (folder / realsize.MARKER_FILE).is_file()
    assert {p.parent.name for p in folder.rglob("*.safetensors")} == set(built.params)
    assert (folder / "tokenizer" / "vocab.json").is_file()  # CLIP: transformers 4.x reads it
    loaded = DiffusionPipeline.from_pretrained(
        str(folder), use_safetensors=True, local_files_only=True
    )
    assert type(loaded).__name__ == type(built.pipe).__name__
    denoiser = "transformer" if name == "flux" else "unet"
    before = getattr(built.pipe, denoiser).state_dict()
    after = getattr(loaded, denoiser).state_dict()
    assert before.keys() == after.keys()
    assert all(torch.equal(before[k], after[k]) for k in before)
    assert loaded.tokenizer("a fox")["input_ids"] == built.pipe.tokenizer("a fox")["input_ids"]
    if name == "flux":
        assert loaded.tokenizer_2.model_max_length == realsize.TINY_T5_TOKENS
    # The worker loads the folder as FLEET_MODEL=<folder> and generates from it.
    engine = Engine(WorkerSettings(_env_file=None, model=str(folder), local_files_only=True))
    engine.setup()
    guidance = 3.5 if name == "flux" else 7.5
    out = engine.generate(
        JobSpec(prompt="a fox", width=64, height=64, steps=2, seed=7, guidance=guidance)
    )
    assert len(out.images) == 1
    assert realsize.finite([Image.fromarray(np.asarray(out.images[0]))])["not_constant"]
