"""Where the model lives: which device and dtype, and how the pipeline is loaded onto it."""

from __future__ import annotations

import logging
import os
import re
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import torch
from accelerate.hooks import ModelHook
from accelerate.utils import find_device, send_to_device

from fleet.errors import ConfigurationError, JobValidationError, ModelLoadError

if TYPE_CHECKING:
    from fleet.settings import WorkerSettings

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


_MEMORY = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*([KMGT]i?B|B)?\s*$", re.IGNORECASE)


def parse_max_memory(text: str | None, gpu_count: int) -> dict[int | str, int | str] | None:
    """Parse ``0=20GiB,1=20GiB,cpu=64GiB`` into accelerate's ``max_memory`` and check it against
    the devices present (naming a GPU that is not there would otherwise fail deep inside
    accelerate with "Cannot access accelerator device when none is available")."""
    if text is None or not text.strip():
        return None
    out: dict[int | str, int | str] = {}
    for item in text.split(","):
        if not item.strip():
            continue
        key, sep, value = item.partition("=")
        key, value = key.strip().lower(), value.strip()
        if not sep or not key or not value:
            raise ConfigurationError(
                f"FLEET_MAX_MEMORY: {item.strip()!r} is not DEVICE=SIZE (e.g. 0=20GiB,cpu=64GiB)"
            )
        if not _MEMORY.match(value):
            raise ConfigurationError(
                f"FLEET_MAX_MEMORY: {value!r} for {key} is not a size like 20GiB, 500MB or 1024"
            )
        device: int | str
        if key in ("cpu", "disk", "mps"):
            device = key
        elif key.removeprefix("cuda:").isdigit():
            device = int(key.removeprefix("cuda:"))
            if device >= gpu_count:
                seen = "no GPU is visible" if gpu_count == 0 else f"only GPUs 0-{gpu_count - 1} "
                raise ConfigurationError(
                    f"FLEET_MAX_MEMORY names GPU {device} but {seen}"
                    f"{' are visible' if gpu_count else ''} "
                    f"(CUDA_VISIBLE_DEVICES={os.environ.get('CUDA_VISIBLE_DEVICES')!r})"
                )
        else:
            raise ConfigurationError(
                f"FLEET_MAX_MEMORY: unknown device {key!r}; use GPU numbers, cpu or disk"
            )
        if device in out:
            raise ConfigurationError(f"FLEET_MAX_MEMORY names {key} twice")
        out[device] = _memory_value(value)
    if out and not any(isinstance(k, int) for k in out):
        raise ConfigurationError(
            "FLEET_MAX_MEMORY names no GPU: a device left out of max_memory is not used at all"
        )
    return out


def _memory_value(value: str) -> int | str:
    """accelerate takes an int of bytes or a size with a unit ("20GiB"); not "1024B"."""
    compact = value.replace(" ", "")
    if compact.upper().endswith("B") and compact[:-1].isdigit():
        return int(compact[:-1])
    return int(compact) if compact.isdigit() else compact


@dataclass
class Placement:
    """The resolved device and dtype, and facts about the device for manifests and status."""

    device: str
    dtype: torch.dtype
    mode: str = "pinned"
    offload: str = "none"
    max_memory: dict[int | str, int | str] | None = None
    info: dict[str, Any] = field(default_factory=dict)
    hf_device_map: dict[str, Any] | None = None

    @classmethod
    def from_settings(cls, settings: WorkerSettings) -> Placement:
        gpu_count = torch.cuda.device_count() if torch.cuda.is_available() else 0
        if settings.placement == "balanced":
            if gpu_count == 0:
                # diffusers would silently ignore device_map="balanced" on a CPU-only machine.
                raise ConfigurationError(
                    "FLEET_PLACEMENT=balanced spreads a model over CUDA GPUs, but none is visible "
                    f"(CUDA_VISIBLE_DEVICES={os.environ.get('CUDA_VISIBLE_DEVICES')!r}); "
                    "use FLEET_PLACEMENT=pinned on this machine"
                )
            max_memory = parse_max_memory(settings.max_memory, gpu_count)
            device = "cuda:0"
        else:
            if settings.max_memory:
                raise ConfigurationError(
                    "FLEET_MAX_MEMORY applies to FLEET_PLACEMENT=balanced only; unset it or "
                    "set FLEET_PLACEMENT=balanced"
                )
            max_memory = None
            device = resolve_device(settings.device)
        if settings.offload != "none" and gpu_count == 0:
            raise ConfigurationError(
                f"FLEET_OFFLOAD={settings.offload} moves weights between CPU and a CUDA GPU, "
                "but none is visible; use FLEET_OFFLOAD=none"
            )
        dtype = resolve_dtype(settings.dtype, device)
        return cls(
            device=device,
            dtype=dtype,
            mode=settings.placement,
            offload=settings.offload,
            max_memory=max_memory,
            info=device_info(device),
        )

    def generator_device(self, requested: str | None = None) -> str:
        """Where a job's noise is drawn: on the CPU, so that a seed gives the same initial
        latents on pinned, balanced and offloading workers (diffusers moves CPU noise to the
        device). A job may ask for ``cuda``: a recipe made by a pinned CUDA worker before
        seeding moved to the CPU, replayed; a worker without a CUDA device refuses it."""
        if requested in (None, "cpu"):
            return "cpu"
        if requested == "cuda" and self.device.startswith("cuda"):
            return self.device
        raise JobValidationError([("generator_device", requested,
            f"this worker ({self.device}) cannot draw noise on {requested!r}: the recipe's "
            "noise came from a CUDA GPU; send it to a CUDA worker, or leave generator_device "
            "out to draw it on the CPU (other pixels)")])  # fmt: skip

    @property
    def dtype_name(self) -> str:
        return str(self.dtype).removeprefix("torch.")

    def load(self, settings: WorkerSettings) -> Any:
        """Load the configured pipeline and move it to this placement's device."""
        import diffusers
        from diffusers import DiffusionPipeline

        if not settings.model:
            raise ConfigurationError(
                "FLEET_MODEL is not set: give a hub id or a local folder with a diffusers pipeline"
            )
        extra: dict[str, Any] = {}
        if self.mode == "balanced":
            extra["device_map"] = "balanced"
            if self.max_memory:
                extra["max_memory"] = self.max_memory
        token = settings.hf_token.get_secret_value() if settings.hf_token else None
        if token:
            # Every hub request of this process carries it, also those that diffusers and
            # transformers make without the token argument (huggingface_hub reads HF_TOKEN).
            os.environ.setdefault("HF_TOKEN", token)
        where: dict[str, Any] = {
            "revision": settings.model_revision,
            "local_files_only": settings.local_files_only,
            "token": token,
        }
        try:
            # A required component saved as null (SD3 without its T5 encoder: text_encoder_3 and
            # tokenizer_3 null in model_index.json) is passed as None; from_pretrained refuses
            # the folder otherwise ("expected [...] but only {...} were passed").
            index = DiffusionPipeline.load_config(settings.model, **where)
            cls = getattr(diffusers, str(index.get("_class_name")), None)
            optional = set(getattr(cls, "_optional_components", None) or ())
            nulls: dict[str, Any] = {
                name: None
                for name, value in index.items()
                if not name.startswith("_") and name not in optional
                and isinstance(value, list | tuple) and list(value) == [None, None]
            }  # fmt: skip
            pipe = DiffusionPipeline.from_pretrained(
                settings.model,
                **where,
                **dtype_kwarg(self.dtype),
                use_safetensors=True,
                **nulls,
                **extra,
            )
        except Exception as exc:
            raise ModelLoadError(
                f"cannot load model {settings.model!r} (revision {settings.model_revision!r}): "
                f"{type(exc).__name__}: {exc}"
            ) from exc
        self.place(pipe)
        if hasattr(pipe, "set_progress_bar_config"):
            pipe.set_progress_bar_config(disable=True)
        return pipe

    def place(self, pipe: Any) -> None:
        """Move a loaded pipeline where it belongs and record its device map."""
        if self.mode == "balanced":
            self.hf_device_map = dict(getattr(pipe, "hf_device_map", None) or {})
            log.info("balanced device map: %s", self.hf_device_map)
            if self.offload == "none":
                align_component_devices(pipe)
                return
            # A placed pipeline refuses offloading until its device map is undone.
            pipe.reset_device_map()
        if self.offload == "model":
            pipe.enable_model_cpu_offload(device=self.device)
        elif self.offload == "sequential":
            pipe.enable_sequential_cpu_offload(device=self.device)
        else:
            pipe.to(self.device)

    def release(self, pipe: Any) -> None:
        """Undo the placement before the pipeline is moved, offloaded or swapped."""
        if getattr(pipe, "hf_device_map", None):
            pipe.reset_device_map()
        self.hf_device_map = None

    def describe(self) -> dict[str, Any]:
        return {
            **self.info,
            "placement": self.mode,
            "offload": self.offload,
            "max_memory": {str(k): v for k, v in (self.max_memory or {}).items()} or None,
            "hf_device_map": self.hf_device_map,
            "generator_device": self.generator_device(),
        }


def align_component_devices(pipe: Any) -> list[str]:
    """Let components placed on different devices hand tensors to each other.

    With ``device_map="balanced"`` diffusers puts whole components on devices but moves no
    tensors between them: a component that spilled to the CPU (or to another GPU) then receives
    inputs on the pipeline's device and fails ("Input type (torch.cuda.HalfTensor) and weight
    type (torch.HalfTensor) should be the same", seen on an H100 with diffusers 0.42.1). A small
    accelerate hook on the component and its direct children (``vae.decode`` bypasses the
    component's own forward) moves inputs to the component's device and outputs back. It is
    not added where accelerate already dispatches a component; ``reset_device_map()`` removes it.
    """
    from accelerate.hooks import add_hook_to_module

    main = torch.device(pipe.device)
    aligned: list[str] = []
    for name, component in pipe.components.items():
        if not isinstance(component, torch.nn.Module) or hasattr(component, "_hf_hook"):
            continue  # accelerate already dispatches a component it split or offloaded
        param = next(component.parameters(), None)
        if param is None or param.device.type == "meta" or param.device == main:
            continue
        for module in (component, *component.children()):
            add_hook_to_module(module, MoveIO(param.device), append=True)
        aligned.append(name)
    if aligned:
        log.info("components off the pipeline device %s, aligned with hooks: %s", main, aligned)
    return aligned


class MoveIO(ModelHook):  # type: ignore[misc]
    """Moves a module's inputs to ``device`` and its outputs back to where the inputs were."""

    def __init__(self, device: torch.device) -> None:
        self.device = device
        self.input_device: torch.device | None = None

    def pre_forward(self, module: Any, *args: Any, **kwargs: Any) -> tuple[Any, Any]:
        self.input_device = find_device([args, kwargs])
        return send_to_device(args, self.device), send_to_device(kwargs, self.device)

    def post_forward(self, module: Any, output: Any) -> Any:
        if self.input_device is None or self.input_device == self.device:
            return output
        return send_to_device(output, self.input_device)


def dtype_kwarg(dtype: torch.dtype) -> dict[str, torch.dtype]:
    """``dtype=`` on diffusers that deprecated ``torch_dtype=`` (0.36+), else ``torch_dtype=``."""
    from diffusers.utils import deprecation_utils

    if hasattr(deprecation_utils, "_TORCH_DTYPE_DEPRECATION_MESSAGE"):
        return {"dtype": dtype}
    return {"torch_dtype": dtype}


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
