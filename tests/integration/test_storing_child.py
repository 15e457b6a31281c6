"""The storing child (FLEET_STORE_PROCESS=child, worker/storer.py) of a real threads-pool worker:
its PNGs are the bytes the pipeline's PIL images give, and killing it in the middle of an upload
loses and duplicates nothing.

The worker talks to its own SeaweedFS through :class:`tests.fault_proxies.StorageProxy`, which
holds S3's answers back on cue: the child is then certainly in the middle of an upload (the
request went out, the answer has not come) when the test kills it.
"""

from __future__ import annotations

import os
import re
import signal
import uuid
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

from fleet import contract
from fleet.contract import JobSpec
from fleet.localdev import LocalServices
from fleet.settings import ProducerSettings, WorkerSettings
from producer.client import Client
from tests.conftest import own_fleet_env
from tests.fault_proxies import StorageProxy
from tests.fault_tally import assert_clean, tally
from tests.fleet_fixtures import WorkerProcess, settings_kwargs, wait_until
from worker.engine.recipe import png_bytes, read_png_recipe

STARTED = re.compile(r"storing child started \(pid (\d+)\)")


@dataclass
class ChildFleet:
    proxy: StorageProxy
    worker: WorkerProcess
    client: Client

    def child_pids(self) -> list[int]:
        """Every storing child this worker started, in order (from its log)."""
        return [int(p) for p in STARTED.findall(self.worker.log())]


@pytest.fixture(scope="module")
def fleet(tmp_path_factory: pytest.TempPathFactory, tiny_model: Path) -> Iterator[ChildFleet]:
    base = tmp_path_factory.mktemp("storing-child")
    services = LocalServices(base / "own-services")
    ep = services.start()
    proxy = StorageProxy(ep.s3_endpoint_url).start()
    endpoints = {**ep.env(), "FLEET_S3_ENDPOINT_URL": proxy.url}
    env = own_fleet_env(endpoints, tiny_model, FLEET_STORE_PROCESS="child",
                        FLEET_SPOOL_DIR=str(base / "spool"), FLEET_S3_MAX_ATTEMPTS="2",
                        FLEET_STORAGE_RETRY_BACKOFF_MAX_S="2",
                        FLEET_STORAGE_RETRY_WINDOW_S="20")  # fmt: skip
    w = WorkerProcess(f"storer-{uuid.uuid4().hex[:4]}@localhost", env, base / "w.log",
                      pool="threads", concurrency=2)  # fmt: skip
    try:
        w.start()
        with Client(ProducerSettings(_env_file=None, **settings_kwargs(ep.env()))) as c:
            yield ChildFleet(proxy, w, c)
    finally:
        w.stop()
        proxy.stop()
        services.stop()


def test_the_storing_childs_pngs_are_the_bytes_the_pipelines_pil_images_give(
    fleet: ChildFleet, tiny_model: Path
) -> None:
    """The child encodes the uint8 pixels the engine takes from the pipeline's tensors; the
    PNG must be byte for byte the one the pipeline's own PIL images (output_type="pil", the way
    before) encode to, with the same recipe."""
    import torch

    from worker.engine.engine import Engine

    spec = JobSpec(prompt="a lighthouse at dusk", width=64, height=96, steps=3, seed=77, images=2)
    handle = fleet.client.submit(spec)
    st = handle.wait(timeout=120)
    assert st.state == "succeeded", st
    assert st.result is not None and len(st.result.images) == 2
    manifest = fleet.client.store.get_json(contract.manifest_key(handle.job_id))
    assert manifest is not None and manifest["worker"]["store_process"] == "child"
    pids = fleet.child_pids()
    assert pids, "the worker stored without a storing child"
    assert "PNG encoding" in fleet.worker.log()

    settings = WorkerSettings(_env_file=None, model=str(tiny_model), model_name="tiny",
                              device="cpu", torch_threads=1, local_files_only=True)  # fmt: skip
    engine = Engine(settings)
    engine.setup()
    kwargs = engine.batch_kwargs([spec])
    kwargs["output_type"] = "pil"
    with torch.inference_mode():
        pil_images = engine.pipe(**kwargs).images
    for record, image in zip(st.result.images, pil_images, strict=True):
        stored = fleet.client.store.get_bytes(record.key)
        assert stored is not None
        assert stored == png_bytes(image, read_png_recipe(stored)), record.key


def test_a_storing_child_killed_mid_upload_loses_and_duplicates_nothing(fleet: ChildFleet) -> None:
    """SIGKILL the child while S3 holds its upload's answer: the worker starts another child,
    sends it the same job, and every job ends stored once, generated once."""
    jobs = [JobSpec(prompt=f"a harbour, take {i}", width=64, height=64, steps=2) for i in range(3)]
    start = fleet.proxy.snapshot()
    fleet.proxy.delay(3.0)  # every answer held 3 s: an upload in flight for that long
    ids: list[str] = []
    try:
        ids = [h.job_id for h in fleet.client.submit_many(jobs)]
        wait_until(lambda: fleet.proxy.snapshot().delayed > start.delayed, 60,
                   "an upload of the storing child waiting for S3's answer")  # fmt: skip
        started = fleet.child_pids()
        victim = started[-1]
        os.kill(victim, signal.SIGKILL)
        wait_until(lambda: len(fleet.child_pids()) > len(started), 30, "a new storing child")
    finally:
        fleet.proxy.clear()
    fig = tally("storing-child-sigkill", fleet.client, ids, lambda: [fleet.worker.log()],
                timeout=120, killed_pid=victim)  # fmt: skip
    assert_clean(fig)
    log = fleet.worker.log()
    assert "while storing it (try 1 of 2); sending it again" in log
    assert fleet.child_pids()[-1] != victim
    for job_id in ids:
        manifest = fleet.client.store.get_json(contract.manifest_key(job_id))
        assert manifest is not None and manifest["status"] == "succeeded"
        assert manifest["result"]["timings"]["upload_s"] >= 0
        png = fleet.client.store.get_bytes(contract.image_key(job_id, 0))
        assert png is not None and read_png_recipe(png)["prompt"].startswith("a harbour")
    # The worker keeps serving through its new child.
    after = fleet.client.submit(JobSpec(prompt="after the kill", width=64, height=64, steps=2))
    assert after.wait(timeout=60).state == "succeeded"


def test_s3_answering_slowdown_to_the_child_is_retried_from_the_spool(fleet: ChildFleet) -> None:
    """The child's StorageError crosses back as one: the task retries with backoff, the PNGs
    kept in the spool meanwhile, and the retry stores them without generating again."""
    before = fleet.proxy.snapshot()
    fleet.proxy.slowdown(for_s=5.0)  # 503 SlowDown for 5 s: both of boto3's attempts fail
    try:
        ids = [h.job_id for h in fleet.client.submit_many(
            [JobSpec(prompt=f"a quay in the rain, {i}", width=64, height=64, steps=2)
             for i in range(2)])]  # fmt: skip
        fig = tally("storing-child-slowdown", fleet.client, ids, lambda: [fleet.worker.log()],
                    timeout=120)  # fmt: skip
    finally:
        fleet.proxy.clear()
    assert_clean(fig)
    assert fleet.proxy.snapshot().slowed_down > before.slowed_down
    log = fleet.worker.log()
    retried = [j for j in ids if any(f"[job={j}" in ln and "storage unavailable" in ln
                                     for ln in log.splitlines())]  # fmt: skip
    assert retried, "no job met the SlowDown: the case tested nothing"
    for job_id in retried:
        assert any(f"[job={job_id} " in ln and "reusing 1 image(s) generated before storage "
                   "failed" in ln for ln in log.splitlines()), job_id  # fmt: skip
