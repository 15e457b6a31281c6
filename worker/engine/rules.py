"""The rules of the loaded model (fleet.contract.ModelRules), derived from its pipeline: which of
the contract's schedulers fit it, the multiple its sides need, its kind of guidance, whether a
negative prompt does anything, and the text length it encodes.

Derived from what the pipeline is, never from its name: the scheduler's class and its
``compatibles``, ``vae_scale_factor``, the image processor's scale and the latent patch, the
transformer's config (``guidance_embeds``, ``pos_embed_max_size``) and the call's signature.
"""

from __future__ import annotations

import inspect
import math
from typing import Any

from fleet.contract import SCHEDULERS, Guidance, ModelRules

#: Contract scheduler names -> diffusers class names (the engine's SCHEDULER_CLASSES).
SchedulerClasses = dict[str, tuple[str, dict[str, Any]]]

#: transformers' model_max_length of a tokenizer that sets none (a huge sentinel).
_NO_LIMIT = 10**9


def call_parameters(pipe: Any) -> dict[str, inspect.Parameter]:
    return dict(inspect.signature(pipe.__call__).parameters)


def model_rules(pipe: Any, scheduler_classes: SchedulerClasses) -> ModelRules:
    """The rules of ``pipe`` (call it before torch.compile wraps the denoiser)."""
    params = call_parameters(pipe)
    guidance = guidance_kind(pipe, params)
    scheduler = pipe.scheduler
    return ModelRules(
        pipeline=type(pipe).__name__,
        schedulers=compatible_schedulers(scheduler, scheduler_classes),
        scheduler_class=type(scheduler).__name__,
        flow_matching=is_flow_matching(scheduler),
        side_multiple=side_multiple(pipe),
        max_side=max_side(pipe),
        guidance=guidance,
        # Flux takes a negative prompt only for "true CFG" (true_cfg_scale > 1), which the
        # contract does not ask for: with distilled or no guidance it would be ignored.
        negative_prompt="negative_prompt" in params and guidance == "classifier-free",
        max_sequence_length=max_sequence_length(pipe, params),
    )


def is_flow_matching(scheduler: Any) -> bool:
    config = getattr(scheduler, "config", {}) or {}
    return (
        type(scheduler).__name__.startswith("FlowMatch")
        or bool(config.get("use_flow_sigmas"))
        or config.get("prediction_type") == "flow_prediction"
    )


def compatible_schedulers(scheduler: Any, classes: SchedulerClasses) -> tuple[str, ...]:
    """The default scheduler and the contract's schedulers that the model's scheduler lists
    as compatible (its config carries over to them); only "default" for flow matching."""
    if is_flow_matching(scheduler):
        return ("default",)
    compatible = {cls.__name__ for cls in getattr(scheduler, "compatibles", [])}
    compatible.add(type(scheduler).__name__)
    return tuple(name for name in SCHEDULERS if name == "default" or classes[name][0] in compatible)


def side_multiple(pipe: Any) -> int:
    """What width and height must be multiples of: the VAE's downscale, times the latent patch
    of a transformer (SD3: ``patch_size``) or the 2x2 packing of Flux (its image processor
    rounds to ``vae_scale_factor * 2``, and the pipeline resizes other sizes with a warning)."""
    vae_scale = int(getattr(pipe, "vae_scale_factor", 8) or 8)
    multiple = vae_scale * int(getattr(pipe, "patch_size", 1) or 1)
    processor = getattr(pipe, "image_processor", None)
    processor_scale = getattr(getattr(processor, "config", None), "vae_scale_factor", None)
    if processor_scale:
        multiple = math.lcm(multiple, int(processor_scale))
    return multiple


def max_side(pipe: Any) -> int | None:
    """SD3's transformer embeds positions up to ``pos_embed_max_size`` patches a side."""
    config = getattr(getattr(pipe, "transformer", None), "config", None)
    patches = getattr(config, "pos_embed_max_size", None) if config is not None else None
    if not patches:
        return None
    vae_scale = int(getattr(pipe, "vae_scale_factor", 8) or 8)
    return int(patches) * int(getattr(config, "patch_size", 1) or 1) * vae_scale


def guidance_kind(pipe: Any, params: dict[str, inspect.Parameter]) -> Guidance:
    """distilled: the transformer embeds the guidance scale (Flux dev); none: it has the switch
    and embeds none (Flux schnell), or the call takes no guidance; else classifier-free."""
    if "guidance_scale" not in params:
        return "none"
    config = getattr(getattr(pipe, "transformer", None), "config", None)
    embeds = getattr(config, "guidance_embeds", None) if config is not None else None
    if embeds is not None:
        return "distilled" if embeds else "none"
    return "classifier-free"


def max_sequence_length(pipe: Any, params: dict[str, inspect.Parameter]) -> int | None:
    """The ``max_sequence_length`` to call with: the pipeline's default, or less when its long
    text encoder's tokenizer (T5: not a CLIP one) declares a shorter limit. None when the call
    takes no such argument."""
    param = params.get("max_sequence_length")
    if param is None:
        return None
    default = param.default if isinstance(param.default, int) else None
    limits = []
    for name, component in getattr(pipe, "components", {}).items():
        if not name.startswith("tokenizer") or component is None:
            continue
        if type(component).__name__.startswith("CLIP"):
            continue
        limit = getattr(component, "model_max_length", None)
        if isinstance(limit, int) and 0 < limit < _NO_LIMIT:
            limits.append(limit)
    candidates = [n for n in (default, *limits) if n is not None]
    return min(candidates) if candidates else None
