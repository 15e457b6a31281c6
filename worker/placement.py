"""Where the model lives: which device and dtype, and how the pipeline is loaded onto it."""

from __future__ import annotations

import logging
import os
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import torch

from producer.errors import ConfigurationError, ModelLoadError

if TYPE_CHECKING:
    from worker.settings import WorkerSettings

log = logging.getLogger(__name__)

_DTYPES = {"float16": torch.float16, "bfloat16": torch.bfloat16, "float32": torch.float32}


def resolve_device(setting: str) -> str:
    """The torch device for this worker. ``auto``: the first visible CUDA device, else the CPU.

    CUDA_VISIBLE_DEVICES pinning is honoured by torch itself: a worker pinned to GPU 3 sees it as
    cuda:0.
    """
    setting = setting.strip().lower()
    if setting == "auto":
        return "cuda:0" if torch.cuda.is_available() else "cpu"
    if setting.startswith("cuda"):
        if not torch.cuda.is_available():
            raise ConfigurationError(
                f"FLEET_DEVICE={setting} but no CUDA device is visible "
                f"(CUDA_VISIBLE_DEVICES={os.environ.get('CUDA_VISIBLE_DEVICES')!r}); "
                "use FLEET_DEVICE=cpu or auto"
            )
        index = int(setting.partition(":")[2] or 0)
        if index >= torch.cuda.device_count():
            raise ConfigurationError(
                f"FLEET_DEVICE={setting} but only {torch.cuda.device_count()} CUDA device(s) "
                "are visible"
            )
        return f"cuda:{index}"
    if setting == "mps":
        if not torch.backends.mps.is_available():
            raise ConfigurationError("FLEET_DEVICE=mps but MPS is not available")
        return "mps"
    if setting == "cpu":
        return "cpu"
    raise ConfigurationError(f"FLEET_DEVICE={setting!r}: use auto, cpu, cuda, cuda:N or mps")


def resolve_dtype(setting: str, device: str) -> torch.dtype:
    """``auto``: float16 on CUDA, float32 elsewhere (half precision on CPU is slow)."""
    if setting == "auto":
        return torch.float16 if device.startswith("cuda") else torch.float32
    try:
        return _DTYPES[setting]
    except KeyError:
        raise ConfigurationError(
            f"FLEET_DTYPE={setting!r}: use auto, {', '.join(_DTYPES)}"
        ) from None


@dataclass
class Placement:
    """The resolved device and dtype, and facts about the device for manifests and status."""

    device: str
    dtype: torch.dtype
    info: dict[str, Any] = field(default_factory=dict)

    @classmethod
    def from_settings(cls, settings: WorkerSettings) -> Placement:
        device = resolve_device(settings.device)
        dtype = resolve_dtype(settings.dtype, device)
        return cls(device=device, dtype=dtype, info=device_info(device))

    @property
    def dtype_name(self) -> str:
        return str(self.dtype).removeprefix("torch.")

    def load(self, settings: WorkerSettings) -> Any:
        """Load the configured pipeline and move it to this placement's device."""
        from diffusers import DiffusionPipeline

        if not settings.model:
            raise ConfigurationError(
                "FLEET_MODEL is not set: give a hub id or a local folder with a diffusers pipeline"
            )
        try:
            pipe = DiffusionPipeline.from_pretrained(
                settings.model,
                revision=settings.model_revision,
                torch_dtype=self.dtype,
                use_safetensors=True,
                local_files_only=settings.local_files_only,
            )
        except Exception as exc:
            raise ModelLoadError(
                f"cannot load model {settings.model!r} (revision {settings.model_revision!r}): "
                f"{type(exc).__name__}: {exc}"
            ) from exc
        pipe.to(self.device)
        if hasattr(pipe, "set_progress_bar_config"):
            pipe.set_progress_bar_config(disable=True)
        return pipe


def device_info(device: str) -> dict[str, Any]:
    """Device type, name and memory, as recorded in manifests."""
    info: dict[str, Any] = {"device": device, "device_type": device.split(":")[0]}
    if device.startswith("cuda"):
        index = int(device.partition(":")[2] or 0)
        props = torch.cuda.get_device_properties(index)
        info.update(
            gpu_name=props.name,
            gpu_memory_bytes=int(props.total_memory),
            cuda_visible_devices=os.environ.get("CUDA_VISIBLE_DEVICES"),
            cuda_version=torch.version.cuda,
        )
    else:
        info["torch_threads"] = torch.get_num_threads()
    return info
