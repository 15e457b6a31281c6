"""Placement on CPU: device and dtype resolution, max_memory parsing, balanced/offload checks."""

from __future__ import annotations

import pytest
import torch

from fleet.errors import ConfigurationError
from fleet.settings import WorkerSettings
from worker.engine.placement import Placement, parse_max_memory, resolve_device, resolve_dtype


def test_auto_device_is_cpu_without_cuda() -> None:
    expected = "cuda:0" if torch.cuda.is_available() else "cpu"
    assert resolve_device("auto") == expected
    assert resolve_device("CPU") == "cpu"


def test_cuda_device_without_gpu_is_a_clear_error(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    with pytest.raises(ConfigurationError, match="no CUDA device is visible"):
        resolve_device("cuda:1")
    with pytest.raises(ConfigurationError, match="use auto, cpu, cuda, cuda:N or mps"):
        resolve_device("tpu")


def test_dtype_defaults() -> None:
    assert resolve_dtype("auto", "cpu") is torch.float32
    assert resolve_dtype("auto", "cuda:0") is torch.float16
    assert resolve_dtype("bfloat16", "cpu") is torch.bfloat16


def test_parse_max_memory() -> None:
    assert parse_max_memory("0=20GiB, 1=20GiB ,cpu=64GiB", gpu_count=2) == {
        0: "20GiB", 1: "20GiB", "cpu": "64GiB",
    }  # fmt: skip
    assert parse_max_memory("cuda:0=1GB", gpu_count=1) == {0: "1GB"}
    # accelerate wants bytes as an int: "1024" and "1024B" both become 1024.
    assert parse_max_memory("0=1024B,cpu=2048", gpu_count=1) == {0: 1024, "cpu": 2048}
    assert parse_max_memory("", gpu_count=1) is None
    assert parse_max_memory(None, gpu_count=0) is None


@pytest.mark.parametrize(
    ("text", "gpus", "message"),
    [
        ("0=20GiB", 0, "names GPU 0 but no GPU is visible"),
        ("0=1GiB,2=1GiB", 2, "names GPU 2 but only GPUs 0-1"),
        ("0:20GiB", 1, "is not DEVICE=SIZE"),
        ("0=lots", 1, "is not a size like 20GiB"),
        ("gpu=1GiB", 1, "unknown device 'gpu'"),
        ("0=1GiB,0=2GiB", 1, "names 0 twice"),
        ("cpu=64GiB", 1, "names no GPU"),
    ],
)
def test_max_memory_errors(text: str, gpus: int, message: str) -> None:
    with pytest.raises(ConfigurationError, match=message):
        parse_max_memory(text, gpu_count=gpus)


def test_balanced_without_gpu_is_refused_not_silently_ignored(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    settings = WorkerSettings(_env_file=None, placement="balanced", max_memory="0=1GiB")
    with pytest.raises(ConfigurationError, match=r"FLEET_PLACEMENT=balanced .* none is visible"):
        Placement.from_settings(settings)


def test_offload_without_gpu_and_max_memory_without_balanced(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    with pytest.raises(ConfigurationError, match="FLEET_OFFLOAD=model"):
        Placement.from_settings(WorkerSettings(_env_file=None, offload="model"))
    with pytest.raises(ConfigurationError, match="applies to FLEET_PLACEMENT=balanced only"):
        Placement.from_settings(WorkerSettings(_env_file=None, max_memory="0=1GiB"))


#: One placement of each kind. Balanced and offloading ones stand in on the CPU, as a pinned
#: CUDA one does (its noise is drawn before anything touches the device).
KINDS = {
    "pinned cpu": Placement("cpu", torch.float32),
    "pinned cuda": Placement("cuda:0", torch.float16),
    "balanced": Placement("cuda:0", torch.float16, mode="balanced"),
    "offload model": Placement("cpu", torch.float32, offload="model"),
    "offload sequential": Placement("cpu", torch.float32, offload="sequential"),
}


def test_every_kind_of_worker_draws_a_seeds_noise_on_the_cpu() -> None:
    for kind, placement in KINDS.items():
        assert placement.generator_device() == "cpu", kind
        assert placement.generator_device("cpu") == "cpu", kind


def test_one_seed_gives_the_same_initial_latents_on_every_kind_of_worker() -> None:
    """The latents diffusers' pipelines start from (randn_tensor, as prepare_latents calls it)
    for the generators each kind of worker makes for the same seeds."""
    from diffusers.utils.torch_utils import randn_tensor

    shape = (2, 4, 8, 8)
    latents = {
        kind: randn_tensor(
            shape,
            generator=[torch.Generator(p.generator_device()).manual_seed(s) for s in (7, 8)],
            device=torch.device("cpu"),
            dtype=torch.float32,
        )
        for kind, p in KINDS.items()
    }
    first = latents["pinned cpu"]
    assert first.std() > 0.5  # noise, not zeros
    for kind, lat in latents.items():
        assert torch.equal(lat, first), kind


def test_noise_on_cuda_is_taken_where_there_is_a_gpu_and_refused_elsewhere() -> None:
    from fleet.errors import JobValidationError

    assert KINDS["pinned cuda"].generator_device("cuda") == "cuda:0"
    assert KINDS["balanced"].generator_device("cuda") == "cuda:0"
    with pytest.raises(JobValidationError, match="generator_device") as err:
        KINDS["pinned cpu"].generator_device("cuda")
    assert "send it to a CUDA worker" in str(err.value)


def test_pinned_cpu_placement_describes_itself() -> None:
    p = Placement.from_settings(WorkerSettings(_env_file=None, device="cpu"))
    info = p.describe()
    assert info["device"] == "cpu" and info["placement"] == "pinned"
    assert info["hf_device_map"] is None and info["generator_device"] == "cpu"


def test_move_io_hooks_align_a_component_placed_elsewhere() -> None:
    """The hooks that let balanced components on different devices talk (checked on a GPU in
    scripts/gpu-check); here their wiring, with the CPU standing in for the other device."""
    from types import SimpleNamespace

    from accelerate.hooks import remove_hook_from_module

    from worker.engine.placement import MoveIO, align_component_devices

    vae = torch.nn.Sequential(torch.nn.Linear(4, 4), torch.nn.ReLU())
    text = torch.nn.Linear(4, 4, device="meta")  # as if on the pipeline's own device
    pipe = SimpleNamespace(device="meta", components={"vae": vae, "text_encoder": text})
    aligned = align_component_devices(pipe)
    assert aligned == ["vae"]
    assert isinstance(vae._hf_hook, MoveIO) and isinstance(vae[0]._hf_hook, MoveIO)
    assert not hasattr(text, "_hf_hook")
    out = vae(torch.ones(1, 4))
    assert out.device.type == "cpu" and out.shape == (1, 4)
    remove_hook_from_module(vae, recurse=True)  # what reset_device_map() does
    assert not hasattr(vae, "_hf_hook") and not hasattr(vae[0], "_hf_hook")
