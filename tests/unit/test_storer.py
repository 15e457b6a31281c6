"""worker.storer's one storing function and the engine's uint8 pixels (no services: the real
child against real S3 is tests/integration/test_storing_child.py)."""

from __future__ import annotations

from typing import Any

import numpy as np
import pytest
import torch
from diffusers.image_processor import VaeImageProcessor

from fleet.errors import StorageError, StorageRefused
from worker.engine.engine import uint8_images
from worker.engine.recipe import png_bytes, read_png_nsfw, read_png_recipe
from worker.storer import ImageOut, StoreJob, _error, store_job


class RecordingStore:
    """Narrow stand-in for ObjectStore: records the order of calls."""

    def __init__(self) -> None:
        self.calls: list[tuple[str, str]] = []
        self.objects: dict[str, Any] = {}

    def put_bytes(self, key: str, data: bytes, content_type: str) -> None:
        self.calls.append(("put", key))
        self.objects[key] = data

    def put_json(self, key: str, obj: Any) -> None:
        self.calls.append(("put", key))
        self.objects[key] = obj

    def delete(self, key: str) -> None:
        self.calls.append(("delete", key))


def pixels(seed: int, h: int = 24, w: int = 16) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, 256, (h, w, 3), dtype=np.uint8)


def test_images_go_first_the_manifest_last_then_the_failure_entry_leaves() -> None:
    store = RecordingStore()
    images = [("p/a/0.png", ImageOut({"seed": 1}, None, pixels=pixels(1))),
              ("p/a/1.png", ImageOut({"seed": 2}, True, pixels=pixels(2)))]  # fmt: skip
    manifest = {"timings": {"generate_s": 1.5}, "result": {"timings": {"generate_s": 1.5}}}
    job = StoreJob("a", images, "p/a/manifest.json", manifest, clear_prefix="p", elapsed_s=2.0)
    timings = store_job(store, job)  # type: ignore[arg-type]
    assert [c[1] for c in store.calls[:3]] == ["p/a/0.png", "p/a/1.png", "p/a/manifest.json"]
    assert store.calls[3][0] == "delete" and "a" in store.calls[3][1]
    assert set(timings) == {"encode_s", "upload_s", "total_s"}
    assert timings["total_s"] >= 2.0
    stored = store.objects["p/a/manifest.json"]
    for where in (stored["timings"], stored["result"]["timings"]):
        assert where["generate_s"] == 1.5 and where["upload_s"] == timings["upload_s"]
    png = store.objects["p/a/1.png"]
    assert read_png_recipe(png) == {"seed": 2} and read_png_nsfw(png) is True
    assert png == png_bytes(pixels(2), {"seed": 2}, nsfw=True)


def test_a_job_not_asked_to_clear_deletes_nothing() -> None:
    store = RecordingStore()
    job = StoreJob("b", [("k/0.png", ImageOut({}, None, png=b"\x89PNG-from-spool"))], "k/m", {})
    store_job(store, job)  # type: ignore[arg-type]
    assert store.objects["k/0.png"] == b"\x89PNG-from-spool"  # a spooled PNG is sent as it is
    assert [c[0] for c in store.calls] == ["put", "put"]


ERRORS = [("StorageRefused", StorageRefused), ("StorageError", StorageError),
          ("KeyError", StorageError), ("JobFailed", StorageError)]  # fmt: skip


@pytest.mark.parametrize(("name", "cls"), ERRORS)
def test_the_childs_errors_come_back_as_their_own_class(name: str, cls: type) -> None:
    err = _error({"error_type": name, "message": "bucket said no"})
    assert type(err) is cls and "bucket said no" in str(err)


def test_uint8_pixels_are_the_ones_numpy_to_pil_gives_from_tensors_arrays_and_images() -> None:
    gen = torch.Generator().manual_seed(3)
    batch = torch.rand((2, 3, 20, 12), generator=gen)
    batch[0, 0, 0, 0] = 0.5 / 255  # a value that rounds half to even
    expected = [np.asarray(im) for im in VaeImageProcessor.numpy_to_pil(
        VaeImageProcessor.pt_to_numpy(batch))]  # fmt: skip
    from_tensor = uint8_images(batch)
    from_numpy = uint8_images(VaeImageProcessor.pt_to_numpy(batch))
    from_pil = uint8_images(VaeImageProcessor.numpy_to_pil(VaeImageProcessor.pt_to_numpy(batch)))
    for got in (from_tensor, from_numpy, from_pil):
        assert len(got) == 2
        for a, b in zip(got, expected, strict=True):
            assert a.dtype == np.uint8 and a.shape == (20, 12, 3)
            assert np.array_equal(a, b)
    half = batch.half()  # a float16 pipeline's output, as on CUDA
    before = VaeImageProcessor.numpy_to_pil(VaeImageProcessor.pt_to_numpy(half))
    for a, b in zip(uint8_images(half), before, strict=True):
        assert np.array_equal(a, np.asarray(b))
