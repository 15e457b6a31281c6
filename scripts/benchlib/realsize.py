"""Random-weight pipelines of the real models' sizes, for GPU throughput checks (no hub).

Random weights cost the same FLOPs as trained ones, so a pipeline built from a published model's
``config.json`` values (written below as literal dicts) and random weights measures what the
real model would. ``build("sd15" | "sdxl" | "flux", device, dtype)`` constructs every component
directly on ``device`` in ``dtype`` (``torch.device`` as the default device while building: the
real sizes are never initialised on the CPU first), scales the weights so that fp16 activations
stay finite (:func:`init`), and returns the diffusers pipeline with its parameter counts.
``tiny=True`` keeps the same classes and structure (block types, levels, encoders, latent
channels) with small widths and depths, so that it builds and generates on a CPU in seconds.

Tokenizers are made locally as :mod:`worker.testmodel` makes them: a byte-level CLIP vocabulary
(514 ids) and a small Unigram T5 one (192 ids), both below the real encoders' vocabulary sizes.
:func:`save` writes a folder that the fleet worker loads with ``FLEET_MODEL=<folder>``.
"""

from __future__ import annotations

import contextlib
import copy
import json
import os
import tempfile
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

MODELS: tuple[str, ...] = ("sd15", "sdxl", "flux")
MARKER_FILE = "fleet-realsize.json"
#: HF's initializer_range (CLIP, T5 and most transformers): std of Linear/Conv/Embedding weights.
INIT_STD = 0.02
#: FLUX.1-dev's tokenizer_2 (T5) model_max_length: what the pipeline reads by default.
FLUX_T5_TOKENS = 512

# ============================================================================================
# Published configs (values of the models' config.json files; class names as in diffusers).

#: runwayml/stable-diffusion-v1-5, unet/config.json (about 860 M parameters).
SD15_UNET: dict[str, Any] = {
    "act_fn": "silu",
    "attention_head_dim": 8,
    "block_out_channels": [320, 640, 1280, 1280],
    "center_input_sample": False,
    "cross_attention_dim": 768,
    "down_block_types": [
        "CrossAttnDownBlock2D",
        "CrossAttnDownBlock2D",
        "CrossAttnDownBlock2D",
        "DownBlock2D",
    ],
    "downsample_padding": 1,
    "flip_sin_to_cos": True,
    "freq_shift": 0,
    "in_channels": 4,
    "layers_per_block": 2,
    "mid_block_scale_factor": 1,
    "norm_eps": 1e-05,
    "norm_num_groups": 32,
    "out_channels": 4,
    "sample_size": 64,
    "up_block_types": [
        "UpBlock2D",
        "CrossAttnUpBlock2D",
        "CrossAttnUpBlock2D",
        "CrossAttnUpBlock2D",
    ],
}

#: runwayml/stable-diffusion-v1-5, vae/config.json (about 84 M parameters).
SD15_VAE: dict[str, Any] = {
    "act_fn": "silu",
    "block_out_channels": [128, 256, 512, 512],
    "down_block_types": ["DownEncoderBlock2D"] * 4,
    "in_channels": 3,
    "latent_channels": 4,
    "layers_per_block": 2,
    "norm_num_groups": 32,
    "out_channels": 3,
    "sample_size": 512,
    "scaling_factor": 0.18215,
    "up_block_types": ["UpDecoderBlock2D"] * 4,
}

#: openai/clip-vit-large-patch14's text model, as runwayml/stable-diffusion-v1-5's
#: text_encoder/config.json (CLIPTextModel, about 123 M parameters); also SDXL's and FLUX.1's
#: first text encoder. The token ids are the local tokenizer's (worker.testmodel).
CLIP_L_TEXT: dict[str, Any] = {
    "hidden_act": "quick_gelu",
    "hidden_size": 768,
    "initializer_factor": 1.0,
    "initializer_range": 0.02,
    "intermediate_size": 3072,
    "layer_norm_eps": 1e-05,
    "max_position_embeddings": 77,
    "num_attention_heads": 12,
    "num_hidden_layers": 12,
    "projection_dim": 768,
    "vocab_size": 49408,
}

#: runwayml/stable-diffusion-v1-5, scheduler/scheduler_config.json (PNDMScheduler).
SD15_SCHEDULER: dict[str, Any] = {
    "beta_end": 0.012,
    "beta_schedule": "scaled_linear",
    "beta_start": 0.00085,
    "clip_sample": False,
    "num_train_timesteps": 1000,
    "set_alpha_to_one": False,
    "skip_prk_steps": True,
    "steps_offset": 1,
    "trained_betas": None,
}

#: stabilityai/stable-diffusion-xl-base-1.0, unet/config.json (about 2.6 B parameters).
SDXL_UNET: dict[str, Any] = {
    "act_fn": "silu",
    "addition_embed_type": "text_time",
    "addition_embed_type_num_heads": 64,
    "addition_time_embed_dim": 256,
    "attention_head_dim": [5, 10, 20],
    "block_out_channels": [320, 640, 1280],
    "center_input_sample": False,
    "class_embed_type": None,
    "class_embeddings_concat": False,
    "conv_in_kernel": 3,
    "conv_out_kernel": 3,
    "cross_attention_dim": 2048,
    "cross_attention_norm": None,
    "down_block_types": ["DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D"],
    "downsample_padding": 1,
    "dual_cross_attention": False,
    "encoder_hid_dim": None,
    "encoder_hid_dim_type": None,
    "flip_sin_to_cos": True,
    "freq_shift": 0,
    "in_channels": 4,
    "layers_per_block": 2,
    "mid_block_only_cross_attention": None,
    "mid_block_scale_factor": 1,
    "mid_block_type": "UNetMidBlock2DCrossAttn",
    "norm_eps": 1e-05,
    "norm_num_groups": 32,
    "num_attention_heads": None,
    "num_class_embeds": None,
    "only_cross_attention": False,
    "out_channels": 4,
    "projection_class_embeddings_input_dim": 2816,
    "resnet_out_scale_factor": 1.0,
    "resnet_skip_time_act": False,
    "resnet_time_scale_shift": "default",
    "sample_size": 128,
    "time_cond_proj_dim": None,
    "time_embedding_act_fn": None,
    "time_embedding_dim": None,
    "time_embedding_type": "positional",
    "timestep_post_act": None,
    "transformer_layers_per_block": [1, 2, 10],
    "up_block_types": ["CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"],
    "upcast_attention": None,
    "use_linear_projection": True,
}

#: stabilityai/stable-diffusion-xl-base-1.0, vae/config.json (SD's VAE shape, another scale).
SDXL_VAE: dict[str, Any] = {
    "act_fn": "silu",
    "block_out_channels": [128, 256, 512, 512],
    "down_block_types": ["DownEncoderBlock2D"] * 4,
    "force_upcast": True,
    "in_channels": 3,
    "latent_channels": 4,
    "layers_per_block": 2,
    "norm_num_groups": 32,
    "out_channels": 3,
    "sample_size": 1024,
    "scaling_factor": 0.13025,
    "up_block_types": ["UpDecoderBlock2D"] * 4,
}

#: stabilityai/stable-diffusion-xl-base-1.0, text_encoder_2/config.json: OpenCLIP ViT-bigG/14's
#: text tower (CLIPTextModelWithProjection, about 695 M parameters).
CLIP_BIGG_TEXT: dict[str, Any] = {
    "hidden_act": "gelu",
    "hidden_size": 1280,
    "initializer_factor": 1.0,
    "initializer_range": 0.02,
    "intermediate_size": 5120,
    "layer_norm_eps": 1e-05,
    "max_position_embeddings": 77,
    "num_attention_heads": 20,
    "num_hidden_layers": 32,
    "projection_dim": 1280,
    "vocab_size": 49408,
}

#: stabilityai/stable-diffusion-xl-base-1.0, scheduler/scheduler_config.json.
SDXL_SCHEDULER: dict[str, Any] = {
    "beta_end": 0.012,
    "beta_schedule": "scaled_linear",
    "beta_start": 0.00085,
    "clip_sample": False,
    "interpolation_type": "linear",
    "num_train_timesteps": 1000,
    "prediction_type": "epsilon",
    "sample_max_value": 1.0,
    "set_alpha_to_one": False,
    "skip_prk_steps": True,
    "steps_offset": 1,
    "timestep_spacing": "leading",
    "trained_betas": None,
    "use_karras_sigmas": False,
}

#: black-forest-labs/FLUX.1-dev, transformer/config.json (about 11.9 B parameters).
FLUX_TRANSFORMER: dict[str, Any] = {
    "attention_head_dim": 128,
    "axes_dims_rope": [16, 56, 56],
    "guidance_embeds": True,
    "in_channels": 64,
    "joint_attention_dim": 4096,
    "num_attention_heads": 24,
    "num_layers": 19,
    "num_single_layers": 38,
    "patch_size": 1,
    "pooled_projection_dim": 768,
}

#: black-forest-labs/FLUX.1-dev, vae/config.json (16 latent channels, shift and scale).
FLUX_VAE: dict[str, Any] = {
    "act_fn": "silu",
    "block_out_channels": [128, 256, 512, 512],
    "down_block_types": ["DownEncoderBlock2D"] * 4,
    "force_upcast": True,
    "in_channels": 3,
    "latent_channels": 16,
    "latents_mean": None,
    "latents_std": None,
    "layers_per_block": 2,
    "mid_block_add_attention": True,
    "norm_num_groups": 32,
    "out_channels": 3,
    "sample_size": 1024,
    "scaling_factor": 0.3611,
    "shift_factor": 0.1159,
    "up_block_types": ["UpDecoderBlock2D"] * 4,
    "use_post_quant_conv": False,
    "use_quant_conv": False,
}

#: google/t5-v1_1-xxl, config.json, as black-forest-labs/FLUX.1-dev's text_encoder_2
#: (T5EncoderModel: the encoder half, about 4.76 B parameters).
#: Its token ids (pad 0, eos 1) are T5Config's defaults, left out here.
T5_XXL: dict[str, Any] = {
    "d_ff": 10240,
    "d_kv": 64,
    "d_model": 4096,
    "dense_act_fn": "gelu_new",
    "dropout_rate": 0.1,
    "feed_forward_proj": "gated-gelu",
    "initializer_factor": 1.0,
    "is_encoder_decoder": True,
    "is_gated_act": True,
    "layer_norm_epsilon": 1e-06,
    "num_decoder_layers": 24,
    "num_heads": 64,
    "num_layers": 24,
    "relative_attention_max_distance": 128,
    "relative_attention_num_buckets": 32,
    "tie_word_embeddings": False,
    "vocab_size": 32128,
}

#: black-forest-labs/FLUX.1-dev, scheduler/scheduler_config.json.
FLUX_SCHEDULER: dict[str, Any] = {
    "base_image_seq_len": 256,
    "base_shift": 0.5,
    "max_image_seq_len": 4096,
    "max_shift": 1.15,
    "num_train_timesteps": 1000,
    "shift": 3.0,
    "use_dynamic_shifting": True,
}

# ============================================================================================
# Tiny stand-ins: the same keys with small widths and depths (same block types and levels).

_TINY_UNET = {
    "block_out_channels": [32, 64, 64, 64],
    "layers_per_block": 1,
    "norm_num_groups": 8,
    "attention_head_dim": 2,
    "cross_attention_dim": 32,
    "sample_size": 8,
}
_TINY_VAE = {
    "block_out_channels": [8, 16, 16, 16],
    "layers_per_block": 1,
    "norm_num_groups": 4,
    "sample_size": 64,
}
_TINY_CLIP = {
    "hidden_size": 32,
    "intermediate_size": 64,
    "num_attention_heads": 2,
    "num_hidden_layers": 2,
    "projection_dim": 32,
}
_TINY_SDXL_UNET = {
    "block_out_channels": [32, 64, 64],
    "layers_per_block": 1,
    "norm_num_groups": 8,
    "attention_head_dim": [2, 4, 4],
    "transformer_layers_per_block": [1, 1, 2],
    "addition_time_embed_dim": 8,
    "addition_embed_type_num_heads": 2,
    # 6 micro-conditioning ints x 8 + text_encoder_2's 32-wide projection
    "projection_class_embeddings_input_dim": 6 * 8 + 32,
    "cross_attention_dim": 64,
    "sample_size": 8,
}
_TINY_FLUX = {
    "attention_head_dim": 16,
    "axes_dims_rope": [4, 6, 6],
    "num_attention_heads": 2,
    "num_layers": 1,
    "num_single_layers": 2,
    "joint_attention_dim": 32,
    "pooled_projection_dim": 32,
}
_TINY_T5 = {
    "d_ff": 64,
    "d_kv": 8,
    "d_model": 32,
    "num_heads": 4,
    "num_layers": 2,
    "num_decoder_layers": 2,
}
#: T5 tokens a tiny Flux reads (the real one reads FLUX_T5_TOKENS).
TINY_T5_TOKENS = 32


def _shrunk(config: dict[str, Any], tiny: dict[str, Any] | None) -> dict[str, Any]:
    out = copy.deepcopy(config)
    if tiny:
        out.update(copy.deepcopy(tiny))
    return out


def configs(name: str, tiny: bool = False) -> dict[str, dict[str, Any]]:
    """The config dict of each model component of ``name`` (``tiny``: the small stand-in's)."""
    t = tiny
    if name == "sd15":
        return {
            "unet": _shrunk(SD15_UNET, _TINY_UNET if t else None),
            "vae": _shrunk(SD15_VAE, _TINY_VAE if t else None),
            "text_encoder": _shrunk(CLIP_L_TEXT, _TINY_CLIP if t else None),
            "scheduler": _shrunk(SD15_SCHEDULER, None),
        }
    if name == "sdxl":
        return {
            "unet": _shrunk(SDXL_UNET, _TINY_SDXL_UNET if t else None),
            "vae": _shrunk(SDXL_VAE, _TINY_VAE if t else None),
            "text_encoder": _shrunk(CLIP_L_TEXT, _TINY_CLIP if t else None),
            "text_encoder_2": _shrunk(CLIP_BIGG_TEXT, _TINY_CLIP if t else None),
            "scheduler": _shrunk(SDXL_SCHEDULER, None),
        }
    if name == "flux":
        return {
            "transformer": _shrunk(FLUX_TRANSFORMER, _TINY_FLUX if t else None),
            "vae": _shrunk(FLUX_VAE, _TINY_VAE if t else None),
            "text_encoder": _shrunk(CLIP_L_TEXT, _TINY_CLIP if t else None),
            "text_encoder_2": _shrunk(T5_XXL, _TINY_T5 if t else None),
            "scheduler": _shrunk(FLUX_SCHEDULER, None),
        }
    raise ValueError(f"unknown model {name!r}; expected one of {', '.join(MODELS)}")


# ============================================================================================
# Building.


@dataclass
class Built:
    """A random-weight pipeline and what it is."""

    name: str
    pipe: Any
    tiny: bool
    device: str
    dtype: str
    params: dict[str, int] = field(default_factory=dict)
    build_s: float = 0.0

    @property
    def total_params(self) -> int:
        return sum(self.params.values())

    def describe(self) -> dict[str, Any]:
        return {
            "model": self.name,
            "tiny": self.tiny,
            "device": self.device,
            "dtype": self.dtype,
            "pipeline": type(self.pipe).__name__,
            "params": self.params,
            "total_params": self.total_params,
            "build_s": round(self.build_s, 2),
        }


@contextlib.contextmanager
def building_on(device: str, dtype: Any) -> Iterator[None]:
    """``device`` as torch's default device and ``dtype`` as its default dtype, for the time of
    a construction: parameters are made there, in that type (no CPU init, no float32 copy)."""
    import torch

    previous = torch.get_default_dtype()
    torch.set_default_dtype(dtype)
    try:
        with torch.device(device):
            yield
    finally:
        torch.set_default_dtype(previous)


def init(module: Any, std: float = INIT_STD) -> Any:
    """HF-style weights that keep fp16 activations finite: Linear, Conv and Embedding weights
    from N(0, ``std``), their biases zero; norms keep weight 1 and bias 0. (PyTorch's default
    Kaiming-uniform init of every layer, with random weights through 30 denoising steps and
    guidance 7.5, can grow latents past float16's range.) Returns ``module``."""
    import torch
    from torch import nn

    with torch.no_grad():
        for sub in module.modules():
            if isinstance(sub, nn.Linear | nn.Conv1d | nn.Conv2d | nn.Embedding):
                if sub.weight.device.type != "meta":
                    sub.weight.normal_(0.0, std)
                bias = getattr(sub, "bias", None)
                if bias is not None and bias.device.type != "meta":
                    bias.zero_()
    return module


def count_params(module: Any) -> int:
    return int(sum(p.numel() for p in module.parameters()))


def _clip_config(values: dict[str, Any]) -> Any:
    from transformers import CLIPTextConfig

    from worker.testmodel import BOS_ID, EOS_ID

    # The local byte-level tokenizer's special ids (the real vocabulary's are 49406/49407).
    return CLIPTextConfig(**values, bos_token_id=BOS_ID, eos_token_id=EOS_ID, pad_token_id=EOS_ID)


def construct(name: str, cfg: dict[str, dict[str, Any]]) -> dict[str, Any]:
    """The model components of ``name``, constructed under the current default device/dtype."""
    from diffusers import AutoencoderKL, FluxTransformer2DModel, UNet2DConditionModel
    from transformers import (  # type: ignore[attr-defined]  # lazily exported
        CLIPTextModel,
        CLIPTextModelWithProjection,
        T5Config,
        T5EncoderModel,
    )

    out: dict[str, Any] = {
        "vae": AutoencoderKL.from_config(cfg["vae"]),
        "text_encoder": CLIPTextModel(_clip_config(cfg["text_encoder"])),
    }
    if name == "flux":
        out["transformer"] = FluxTransformer2DModel.from_config(cfg["transformer"])
        out["text_encoder_2"] = T5EncoderModel(T5Config(**cfg["text_encoder_2"]))
    else:
        out["unet"] = UNet2DConditionModel.from_config(cfg["unet"])
    if name == "sdxl":
        out["text_encoder_2"] = CLIPTextModelWithProjection(_clip_config(cfg["text_encoder_2"]))
    return out


def make_scheduler(name: str, cfg: dict[str, Any]) -> Any:
    import diffusers

    cls = {
        "sd15": "PNDMScheduler",
        "sdxl": "EulerDiscreteScheduler",
        "flux": "FlowMatchEulerDiscreteScheduler",
    }[name]
    return getattr(diffusers, cls).from_config(cfg)


def _tokenizers(name: str, tiny: bool) -> dict[str, Any]:
    from worker.testmodel import _make_t5_tokenizer, _make_tokenizer

    with tempfile.TemporaryDirectory(prefix="fleet-realsize-tok-") as tmp:
        clip = _make_tokenizer(Path(tmp))
    if name == "sd15":
        return {"tokenizer": clip}
    if name == "sdxl":
        return {"tokenizer": clip, "tokenizer_2": clip}
    t5 = _make_t5_tokenizer()
    t5.model_max_length = TINY_T5_TOKENS if tiny else FLUX_T5_TOKENS
    return {"tokenizer": clip, "tokenizer_2": t5}


def _pipeline(name: str, parts: dict[str, Any]) -> Any:
    if name == "sd15":
        from diffusers import StableDiffusionPipeline

        return StableDiffusionPipeline(
            **parts,
            safety_checker=None,
            feature_extractor=None,
            image_encoder=None,
            requires_safety_checker=False,
        )
    if name == "sdxl":
        from diffusers import StableDiffusionXLPipeline

        return StableDiffusionXLPipeline(
            **parts,
            image_encoder=None,
            feature_extractor=None,
            force_zeros_for_empty_prompt=True,
            add_watermarker=False,
        )
    from diffusers import FluxPipeline

    return FluxPipeline(**parts, image_encoder=None, feature_extractor=None)


def _place(module: Any, device: str, dtype: Any) -> Any:
    """``module`` on ``device`` in ``dtype``: a no-op for what was built there (diffusers
    warns at every ``.to(dtype)``), a cast of whatever a constructor made otherwise."""
    import torch

    tensors = [*module.parameters(), *module.buffers()]
    wrong_type = any(t.is_floating_point() and t.dtype != dtype for t in tensors)
    wrong_device = any(t.device.type != torch.device(device).type for t in tensors)
    if wrong_type:
        module.to(dtype=dtype)
    if wrong_device:
        module.to(device=device)
    return module


def model_params(name: str, tiny: bool = False) -> dict[str, int]:
    """Parameters of each model component of ``name``, counted on the meta device: nothing is
    allocated, so the real sizes can be counted on any machine."""
    import torch

    with building_on("meta", torch.float32):
        models = construct(name, configs(name, tiny))
    return {k: count_params(m) for k, m in models.items()}


def build(
    name: str, device: str = "cpu", dtype: Any = None, tiny: bool = False, seed: int = 0
) -> Built:
    """The random-weight pipeline of ``name``, built on ``device`` in ``dtype`` (default
    float32), weights from :func:`init`; with its parameter counts per component."""
    import torch

    dtype = dtype or torch.float32
    started = time.perf_counter()
    cfg = configs(name, tiny)
    torch.manual_seed(seed)
    with building_on(device, dtype):
        models = construct(name, cfg)
        for module in models.values():
            init(module)
    for module in models.values():
        _place(module, device, dtype).eval()
    pipe = _pipeline(
        name,
        {**models, **_tokenizers(name, tiny), "scheduler": make_scheduler(name, cfg["scheduler"])},
    )
    if hasattr(pipe, "set_progress_bar_config"):
        pipe.set_progress_bar_config(disable=True)
    if device != "meta" and str(device).startswith("cuda"):
        torch.cuda.synchronize()
    return Built(
        name=name,
        pipe=pipe,
        tiny=tiny,
        device=str(device),
        dtype=str(dtype).removeprefix("torch."),
        params={k: count_params(m) for k, m in models.items()},
        build_s=time.perf_counter() - started,
    )


# ============================================================================================
# Checks and saving.


def finite(images: Any) -> dict[str, Any]:
    """Whether images are usable figures: every value finite and not all one value (random
    weights can give NaN, which becomes a black image, and a constant image encodes to a tiny
    PNG fast). Takes what a pipeline returns: PIL images, a numpy array or a torch tensor."""
    import numpy as np

    if isinstance(images, list) and images and hasattr(images[0], "mode"):
        arr = np.stack([np.asarray(im.convert("RGB"), dtype=np.float32) / 255.0 for im in images])
    elif hasattr(images, "detach"):
        arr = images.detach().float().cpu().numpy()
    else:
        arr = np.asarray(images, dtype=np.float32)
    ok = np.isfinite(arr)
    values = arr[ok]
    std = float(values.std()) if values.size else 0.0
    return {
        "finite": bool(ok.all()),
        "not_constant": std > 1e-4,
        "std": round(std, 5),
        "mean": round(float(values.mean()), 5) if values.size else None,
        "shape": list(arr.shape),
    }


def _finish_tokenizers(folder: Path, clip_names: tuple[str, ...]) -> None:
    """As worker.testmodel does: vocab.json/merges.txt beside the CLIP tokenizers (transformers
    4.x's slow CLIPTokenizer reads them), and no from_pretrained loading flags in the configs."""
    from worker.testmodel import _write_vocab_files

    for cfg_path in folder.glob("tokenizer*/tokenizer_config.json"):
        if cfg_path.parent.name in clip_names:
            _write_vocab_files(cfg_path.parent)
        cfg = json.loads(cfg_path.read_text(encoding="utf-8"))
        for key in ("is_local", "local_files_only"):
            cfg.pop(key, None)
        cfg_path.write_text(json.dumps(cfg, indent=2, ensure_ascii=False) + "\n", encoding="utf-8")


def save(pipe: Any, folder: Path | str, built: Built | None = None) -> Path:
    """Write ``pipe`` with safetensors into ``folder`` (the worker loads it with
    ``FLEET_MODEL=<folder>``, ``from_pretrained`` with ``use_safetensors=True``); a marker
    file says what it is. Returns the folder."""
    folder = Path(folder).absolute()
    folder.mkdir(parents=True, exist_ok=True)
    pipe.save_pretrained(str(folder), safe_serialization=True)
    clip = tuple(
        n
        for n in ("tokenizer", "tokenizer_2")
        if type(getattr(pipe, n, None)).__name__.startswith("CLIP")
    )
    _finish_tokenizers(folder, clip)
    marker = built.describe() if built is not None else {"pipeline": type(pipe).__name__}
    (folder / MARKER_FILE).write_text(json.dumps(marker, indent=2) + "\n", encoding="utf-8")
    for dirpath, _, filenames in os.walk(folder):  # safetensors writes 0600 files
        for name in filenames:
            os.chmod(os.path.join(dirpath, name), 0o644)
    return folder
