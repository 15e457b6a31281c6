"""GPU speed settings applied to a loaded pipeline: attention processor, channels_last,
torch.compile of the denoiser (with a warm-up), VAE slicing/tiling, TF32."""

from __future__ import annotations

import logging
from typing import TYPE_CHECKING, Any

import torch

from fleet.errors import ConfigurationError

if TYPE_CHECKING:
    from fleet.settings import WorkerSettings

log = logging.getLogger(__name__)


def denoiser(pipe: Any) -> Any:
    """The pipeline's denoising network: ``unet`` (SD, SDXL) or ``transformer`` (SD3, Flux)."""
    return getattr(pipe, "unet", None) or getattr(pipe, "transformer", None)


def apply_speed_settings(pipe: Any, settings: WorkerSettings, device: str) -> dict[str, Any]:
    """Apply the speed settings; returns what was applied (recorded in manifests)."""
    applied: dict[str, Any] = {}
    net = denoiser(pipe)
    if settings.attention == "sdpa" and net is not None:
        applied.update(_sdpa_attention(pipe, net))
    if settings.channels_last:
        for name in ("unet", "vae"):
            module = getattr(pipe, name, None)
            if module is not None:
                module.to(memory_format=torch.channels_last)
        applied["channels_last"] = True
    vae = getattr(pipe, "vae", None)
    if settings.vae_slicing and vae is not None and hasattr(vae, "enable_slicing"):
        vae.enable_slicing()
        applied["vae_slicing"] = True
    if settings.vae_tiling and vae is not None and hasattr(vae, "enable_tiling"):
        vae.enable_tiling()
        applied["vae_tiling"] = True
    if device.startswith("cuda") and settings.tf32:
        torch.backends.cuda.matmul.allow_tf32 = True
        torch.backends.cudnn.allow_tf32 = True
        applied["tf32"] = True
    if settings.compile:
        if net is None:
            raise ConfigurationError("FLEET_COMPILE: this pipeline has no unet or transformer")
        options: dict[str, Any] = {"backend": settings.compile_backend}
        if settings.compile_mode:
            options["mode"] = settings.compile_mode
        if settings.compile_scope == "regional":
            try:  # diffusers' regional compilation: each repeated block, compiled in place
                net.compile_repeated_blocks(fullgraph=True, **options)
            except (AttributeError, ValueError) as exc:
                raise ConfigurationError(
                    f"FLEET_COMPILE_SCOPE=regional: {type(net).__name__} has no repeated blocks "
                    f"to compile ({exc}); use FLEET_COMPILE_SCOPE=full"
                ) from exc
        else:
            compiled = torch.compile(net, **options)
            if hasattr(pipe, "unet") and pipe.unet is not None:
                pipe.unet = compiled
            else:
                pipe.transformer = compiled
        applied["compile"] = settings.compile_backend
        applied["compile_scope"] = settings.compile_scope
        if settings.compile_mode:
            applied["compile_mode"] = settings.compile_mode
    return applied


def compiled_graphs() -> int:
    """Graphs torch.compile has compiled in this process so far (a recompile adds one)."""
    from torch._dynamo.utils import counters

    return int(counters["stats"]["unique_graphs"])


def _sdpa_attention(pipe: Any, net: Any) -> dict[str, Any]:
    """FLEET_ATTENTION=sdpa: PyTorch's scaled_dot_product_attention (AttnProcessor2_0) in a
    UNet's attention layers. Only a UNet's: AttnProcessor2_0 is the UNet's processor, and a
    transformer's own processors (SD3's JointAttnProcessor2_0, Flux's FluxAttnProcessor) do what
    it cannot (joint text-image attention, rotary embeddings); they call SDPA already on
    torch >= 2. Swapping them in makes Flux fail and SD3 generate other images."""
    kept = sorted({type(p).__name__ for p in getattr(net, "attn_processors", {}).values()})
    is_unet = net is getattr(pipe, "unet", None)
    if not is_unet or not hasattr(net, "set_attn_processor"):
        log.info("FLEET_ATTENTION=sdpa applies to UNets; %s keeps its attention processors "
                 "(%s)", type(net).__name__, ", ".join(kept) or "none")  # fmt: skip
        return {"attention": "not applied", "attention_processors": kept}
    from diffusers.models.attention_processor import AttnProcessor2_0

    try:
        net.set_attn_processor(AttnProcessor2_0())
    except (ValueError, TypeError) as exc:  # e.g. a UNet with processors of its own kind
        log.info("keeping the model's attention processors: %s", exc)
        return {"attention": "not applied", "attention_processors": kept}
    return {"attention": "sdpa"}
