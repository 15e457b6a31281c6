"""SD3 and Flux through real workers: tiny random-weight pipelines saved with safetensors and
loaded from a local folder (FLEET_MODEL) as users load them, served by a worker with the
default settings and by a batch worker; their images equal, pixel for pixel, the same pipeline
loaded in-process with its own attention processors (same seeds); and a field the model cannot
honour is refused by name, by the producer before anything is enqueued (it read the rules the
workers published) and by the worker for a job sent past the producer, which fails alone."""

from __future__ import annotations

import io
import json
import uuid
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import Any

import numpy as np
import pytest
import redis
import torch
from diffusers import DiffusionPipeline
from PIL import Image

from fleet import contract
from fleet.contract import JobSpec
from fleet.errors import JobValidationError
from fleet.settings import ProducerSettings
from producer.client import Client
from tests.fleet_fixtures import REPO, WorkerProcess, settings_kwargs, wait_until
from worker.testmodel import build_test_model

pytestmark = pytest.mark.integration

TIMEOUT = 120
BATCH = {"FLEET_BATCH_SIZE": "4", "FLEET_BATCH_WAIT_S": "0.5"}
#: (model, worker kind) served by this module's workers. SD3 twice: with its T5 encoder as it
#: ships, and saved without it (text_encoder_3=None), the folder from_pretrained used to refuse.
WORKERS = [("sd3-tiny", "default"), ("sd3-tiny", "batch"), ("sd3-tiny-no-t5", "default"),
           ("flux-tiny", "default"), ("flux-tiny", "batch")]  # fmt: skip
#: Jobs each model cannot honour: (field named, job fields); each is valid by the contract.
BAD = {
    "sd3": [("scheduler", {"scheduler": "euler"}), ("width", {"width": 72})],
    "flux": [("scheduler", {"scheduler": "ddim"}), ("negative_prompt", {"negative_prompt": "x"}),
             ("height", {"height": 72})],
}  # fmt: skip


@dataclass
class Served:
    """One worker of this module, the client sending to its queue, and its model in-process."""

    model: str
    worker: WorkerProcess
    queue: str
    client: Client
    plain: Any  # the pipeline loaded in-process without the fleet

    @property
    def family(self) -> str:
        return self.model.split("-")[0]


def plain_pipeline(model: str) -> Any:
    extra = {"text_encoder_3": None, "tokenizer_3": None} if model.endswith("no-t5") else {}
    pipe = DiffusionPipeline.from_pretrained(REPO / ".models" / model, use_safetensors=True,
                                             **extra)  # fmt: skip
    pipe.set_progress_bar_config(disable=True)
    return pipe


@pytest.fixture(scope="module")
def served(
    module_workers: Callable[..., WorkerProcess], fleet_env: dict
) -> Iterator[dict[tuple, Served]]:
    for model in {m for m, _ in WORKERS}:
        build_test_model(model, REPO / ".models" / model)
    queues = {key: f"fleet.flow-{key[0]}-{key[1]}-{uuid.uuid4().hex[:6]}" for key in WORKERS}

    def start(key: tuple[str, str]) -> WorkerProcess:
        model, kind = key
        path = str(REPO / ".models" / model)
        if kind == "batch":
            return module_workers(f"{model}-batch", queues=queues[key], pool="threads",
                                  concurrency=4, FLEET_MODEL=path, FLEET_MODEL_NAME=model,
                                  **BATCH)  # fmt: skip
        return module_workers(model, queues=queues[key], FLEET_MODEL=path, FLEET_MODEL_NAME=model)

    with ThreadPoolExecutor(len(WORKERS)) as pool:  # each start waits for its worker's ping
        workers = dict(zip(WORKERS, pool.map(start, WORKERS), strict=True))
    r = redis.Redis.from_url(fleet_env["FLEET_REDIS_URL"])

    def ready_with_rules(w: WorkerProcess) -> bool:
        state = r.get(contract.WORKER_STATE_KEY.format(node=w.node))
        info = r.get(contract.WORKER_INFO_KEY.format(node=w.node))
        return bool(state and json.loads(state)["state"] == "ready" and info
                    and json.loads(info).get("rules"))  # fmt: skip

    for w in workers.values():
        wait_until(lambda w=w: ready_with_rules(w), 120, f"{w.node} ready:\n{w.log()[-3000:]}")
    r.close()
    torch.set_num_threads(1)  # as the workers (FLEET_TORCH_THREADS=1): the same pixels
    plains = {model: plain_pipeline(model) for model in {m for m, _ in WORKERS}}
    out = {}
    for key, w in workers.items():
        settings = ProducerSettings(_env_file=None, **settings_kwargs(fleet_env))
        settings.queue = queues[key]
        out[key] = Served(key[0], w, queues[key], Client(settings), plains[key[0]])
    yield out
    for s in out.values():
        s.client.close()


def workers_of(*kinds: str) -> list[Any]:
    return [pytest.param(key, id=f"{key[0]}-{key[1]}") for key in WORKERS if key[1] in kinds]


def job(**kw: Any) -> JobSpec:
    return JobSpec(**{"prompt": "a lighthouse at dusk", "width": 64, "height": 64, "steps": 3,
                      **kw})  # fmt: skip


def stored_pixels(store: Any, key: str) -> np.ndarray:
    with Image.open(io.BytesIO(store.get_bytes(key))) as image:
        return np.asarray(image.convert("RGB"))


def reference(pipe: Any, specs: list[JobSpec]) -> list[np.ndarray]:
    """Jobs that shared one pipeline call, on the plain pipeline: their prompts together, one
    generator per image, each at its own seed; the call's other arguments as the pipeline's
    own defaults, except the T5 length its tokenizer declares (the worker passes it too)."""
    first = specs[0]
    t5 = getattr(pipe, "tokenizer_3", None) or (
        pipe.tokenizer_2 if type(pipe).__name__ == "FluxPipeline" else None
    )
    extra = {"max_sequence_length": t5.model_max_length} if t5 is not None else {}
    images = pipe(
        prompt=first.prompt if len(specs) == 1 else [s.prompt for s in specs],
        width=first.width, height=first.height, num_inference_steps=first.steps,
        guidance_scale=first.guidance, num_images_per_prompt=first.images,
        generator=[torch.Generator("cpu").manual_seed(seed) for s in specs for seed in s.seeds()],
        **extra,
    ).images  # fmt: skip
    return [np.asarray(im.convert("RGB")) for im in images]


def check_worker_facts(manifest: dict[str, Any], s: Served) -> None:
    worker = manifest["worker"]
    assert worker["pipeline"] == type(s.plain).__name__
    kinds = sorted({type(p).__name__ for p in s.plain.transformer.attn_processors.values()})
    assert worker["speed"]["attention"] == "not applied"  # FLEET_ATTENTION=sdpa: UNets only
    assert worker["speed"]["attention_processors"] == kinds
    assert worker["rules"]["flow_matching"] and worker["rules"]["schedulers"] == ["default"]


@pytest.mark.parametrize("key", workers_of("default"))
def test_the_default_worker_makes_the_plain_pipelines_pixels(
    served: dict[tuple, Served], key: tuple[str, str], store: Any
) -> None:
    s = served[key]
    specs = [job(guidance=g, images=n, seed=1000 + 10 * n + int(g)) for g in (7.5, 1.0)
             for n in (1, 2)]  # fmt: skip
    handles = s.client.submit_many(specs)
    statuses = s.client.wait([h.job_id for h in handles], timeout=TIMEOUT)
    assert [st.state for st in statuses] == ["succeeded"] * 4, [st.result for st in statuses]
    for spec, st in zip(specs, statuses, strict=True):
        assert st.result is not None and [i.seed for i in st.result.images] == spec.seeds()
        expected = reference(s.plain, [spec])
        for image, pixels in zip(st.result.images, expected, strict=True):
            assert np.array_equal(stored_pixels(store, image.key), pixels), (spec, image.index)
        manifest = store.get_json(contract.manifest_key(spec.job_id))
        check_worker_facts(manifest, s)
        assert manifest["worker"]["batch"]["jobs"] == 1


@pytest.mark.parametrize("key", workers_of("batch"))
def test_the_batch_worker_shares_calls_and_makes_the_plain_pipelines_pixels(
    served: dict[tuple, Served], key: tuple[str, str], store: Any
) -> None:
    s = served[key]
    specs = [job(prompt=f"a lighthouse, take {t}", guidance=g, images=n, seed=2000 + 100 * t + n)
             for g in (7.5, 1.0) for n in (1, 2) for t in range(2)]  # fmt: skip
    handles = s.client.submit_many(specs)
    statuses = s.client.wait([h.job_id for h in handles], timeout=TIMEOUT)
    assert [st.state for st in statuses] == ["succeeded"] * len(specs)
    by_id = {spec.job_id: spec for spec in specs}
    batches = set()
    for spec in specs:
        manifest = store.get_json(contract.manifest_key(spec.job_id))
        check_worker_facts(manifest, s)
        batches.add(tuple(r["job_id"] for r in manifest["worker"]["batch"]["recipes"]))
    assert max(len(b) for b in batches) >= 2, batches  # jobs really shared pipeline calls
    for ids in batches:
        members = [by_id[i] for i in ids]
        expected = iter(reference(s.plain, members))
        for spec in members:
            for index in range(spec.images):
                key_ = contract.image_key(spec.job_id, index)
                assert np.array_equal(stored_pixels(store, key_), next(expected)), (ids, index)


@pytest.mark.parametrize("key", workers_of("default", "batch"))
def test_a_field_the_model_cannot_honour_is_refused_by_name_before_and_after_the_queue(
    served: dict[tuple, Served], key: tuple[str, str], fleet_env: dict
) -> None:
    s = served[key]
    r = redis.Redis.from_url(fleet_env["FLEET_REDIS_URL"])
    try:
        for field, fields in BAD[s.family]:
            bad = job(**fields)
            # The producer knows the rules of the model this queue's workers serve.
            with pytest.raises(JobValidationError) as refused:
                s.client.submit(bad)
            assert [p[0] for p in refused.value.problems] == [field], refused.value
            assert type(s.plain).__name__ in str(refused.value)
            assert not r.exists(contract.CLAIM_KEY.format(job_id=bad.job_id))
            assert sum(r.llen(k) for k in contract.queue_keys(s.queue)) == 0
        # Sent past the producer: the worker refuses each by name, alone, and goes on.
        sent = [job(**fields) for _, fields in BAD[s.family]]
        good = job(seed=77)
        for spec in [*sent, good]:
            s.client.celery.send_task(contract.TASK_GENERATE, queue=s.queue, task_id=spec.job_id,
                                      kwargs={"job": contract.job_payload(spec)})  # fmt: skip
        statuses = s.client.wait([spec.job_id for spec in [*sent, good]], timeout=TIMEOUT)
        for (field, fields), st in zip(BAD[s.family], statuses, strict=False):
            assert st.state == "failed" and st.result is not None, st
            assert st.result.error_type == "JobValidationError", st.result
            value = next(iter(fields.values()))
            assert f"{field}={value!r}" in (st.result.error or ""), st.result.error
        assert statuses[-1].state == "succeeded", statuses[-1]
        assert s.worker.proc is not None and s.worker.proc.poll() is None
    finally:
        r.close()
