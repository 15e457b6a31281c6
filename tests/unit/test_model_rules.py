"""SD3 and Flux beside SD, in-process on their tiny random-weight pipelines: built offline and
loaded the way users load them, their rules derived from the loaded pipeline, every field a
model cannot honour refused by name (each refusal next to a check that the plain pipeline would
have dropped or changed it), their own attention processors kept (pixel for pixel), and the
call made of what each pipeline accepts."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
from diffusers import DiffusionPipeline, FluxTransformer2DModel

from fleet import contract
from fleet.contract import SCHEDULERS, JobSpec, ModelRules, validate_job
from fleet.errors import JobValidationError, ModelLoadError
from fleet.settings import ProducerSettings, WorkerSettings
from producer.client import Client
from tests.fleet_fixtures import REPO, settings_kwargs
from worker.engine.engine import SCHEDULER_CLASSES, Engine
from worker.engine.placement import Placement
from worker.engine.rules import model_rules
from worker.testmodel import _make_t5_tokenizer, build_test_model

FLOW = ("sd3-tiny", "sd3-tiny-no-t5", "flux-tiny")
#: What an SD3 folder saved without its T5 encoder needs passed to load.
NO_T5 = {"text_encoder_3": None, "tokenizer_3": None}


def model_dir(size: str) -> Path:
    return build_test_model(size, REPO / ".models" / size)


def plain(size: str) -> Any:
    """The model loaded as diffusers' docs do, untouched by the fleet (its own processors)."""
    extra = NO_T5 if size == "sd3-tiny-no-t5" else {}
    pipe = DiffusionPipeline.from_pretrained(model_dir(size), use_safetensors=True, **extra)
    pipe.set_progress_bar_config(disable=True)
    return pipe


def make_engine(path: Path, name: str) -> Engine:
    e = Engine(WorkerSettings(_env_file=None, model=str(path), model_name=name,
                              local_files_only=True, torch_threads=1))  # fmt: skip
    e.setup()
    return e


@pytest.fixture(scope="module")
def engines(tiny_model: Path) -> dict[str, Engine]:
    torch.set_num_threads(1)
    out = {size: make_engine(model_dir(size), size) for size in FLOW}
    out["tiny"] = make_engine(tiny_model, "tiny")
    return out


def job(**kw: Any) -> JobSpec:
    return validate_job({"prompt": "a lighthouse at dusk", "width": 64, "height": 64,
                         "steps": 2, "seed": 5, **kw})  # fmt: skip


def pixels(image: Any) -> np.ndarray:
    return np.asarray(image.convert("RGB") if hasattr(image, "convert") else image)


def reference(pipe: Any, spec: JobSpec, **extra: Any) -> list[np.ndarray]:
    """The job on the plain pipeline: same prompt, size, steps, guidance and seeds."""
    images = pipe(
        prompt=spec.prompt, width=spec.width, height=spec.height,
        num_inference_steps=spec.steps, guidance_scale=spec.guidance,
        num_images_per_prompt=spec.images,
        generator=[torch.Generator("cpu").manual_seed(s) for s in spec.seeds()], **extra,
    ).images  # fmt: skip
    return [pixels(im) for im in images]


def sequence_length(pipe: Any) -> dict[str, int]:
    """The T5 tokenizer's declared length (SD3's tokenizer_3, Flux's tokenizer_2), if any."""
    t5 = getattr(pipe, "tokenizer_3", None) or (
        pipe.tokenizer_2 if type(pipe).__name__ == "FluxPipeline" else None
    )
    return {"max_sequence_length": t5.model_max_length} if t5 is not None else {}


def refused(engine: Engine, spec: JobSpec) -> JobValidationError:
    with pytest.raises(JobValidationError) as info:
        engine.generate(spec)
    return info.value


# -- building and loading ------------------------------------------------------------------------


def test_the_t5_tokenizer_is_saved_and_loads_as_built_and_fits_its_encoder() -> None:
    from transformers import T5EncoderModel, T5TokenizerFast  # type: ignore[attr-defined]

    folder = model_dir("flux-tiny")
    built = _make_t5_tokenizer()
    loaded = T5TokenizerFast.from_pretrained(folder / "tokenizer_2")
    prompts = ["a photo of a cat, 4k", "  spaces\tand\nlines ", "ünïcode 猫", "x" * 80]
    length = loaded.model_max_length
    a = built(prompts, padding="max_length", max_length=length, truncation=True).input_ids
    b = loaded(prompts, padding="max_length", max_length=length, truncation=True).input_ids
    assert a == b
    first = b[0]
    assert first[first.index(loaded.eos_token_id) + 1 :] == [loaded.pad_token_id] * (
        length - first.index(loaded.eos_token_id) - 1
    )
    assert loaded.unk_token_id in b[2]  # characters outside the vocabulary: <unk>, no crash
    assert loaded.decode(b[0], skip_special_tokens=True) == prompts[0]
    encoder = T5EncoderModel.from_pretrained(folder / "text_encoder_2")
    assert len(loaded) <= encoder.config.vocab_size
    # Weights only as safetensors, for every component of every new size.
    for size in FLOW:
        files = {p.suffix for p in model_dir(size).rglob("*") if p.is_file()}
        assert ".safetensors" in files and not files & {".bin", ".pt", ".ckpt"}


def test_the_new_sizes_build_reproducibly_and_from_the_command_line(tmp_path: Path) -> None:
    from worker.testmodel import main

    for size in FLOW:
        cached = model_dir(size)
        assert main(["--size", size, "--out", str(tmp_path / size)]) == 0
        files = sorted(p.relative_to(cached) for p in cached.rglob("*") if p.is_file())
        assert files == sorted(
            p.relative_to(tmp_path / size) for p in (tmp_path / size).rglob("*") if p.is_file()
        )
        for rel in files:
            if rel.suffix == ".safetensors" or rel.parent.name.startswith("tokenizer"):
                assert (tmp_path / size / rel).read_bytes() == (cached / rel).read_bytes(), rel
    assert not (model_dir("sd3-tiny-no-t5") / "text_encoder_3").exists()
    assert (model_dir("sd3-tiny") / "text_encoder_3" / "model.safetensors").is_file()


def test_sd3_without_t5_loads_through_the_users_path_with_its_null_components() -> None:
    folder = model_dir("sd3-tiny-no-t5")
    index = json.loads((folder / "model_index.json").read_text())
    assert index["text_encoder_3"] == [None, None] and index["tokenizer_3"] == [None, None]
    with pytest.raises(ValueError, match="text_encoder_3"):  # what users met before
        DiffusionPipeline.from_pretrained(folder, use_safetensors=True)
    settings = WorkerSettings(_env_file=None, model=str(folder), local_files_only=True)
    pipe = Placement.from_settings(settings).load(settings)
    assert type(pipe).__name__ == "StableDiffusion3Pipeline"
    assert pipe.text_encoder_3 is None and pipe.tokenizer_3 is None
    broken = WorkerSettings(_env_file=None, model=str(folder / "nothing"), local_files_only=True)
    with pytest.raises(ModelLoadError, match="nothing"):
        Placement.from_settings(broken).load(broken)


# -- attention: the model's own processors -------------------------------------------------------


@pytest.mark.parametrize("size", FLOW)
def test_transformers_keep_their_attention_processors_pixel_for_pixel(
    engines: dict[str, Engine], size: str
) -> None:
    engine, own = engines[size], plain(size)
    kinds = sorted({type(p).__name__ for p in own.transformer.attn_processors.values()})
    assert engine.describe()["speed"] == {"attention": "not applied", "attention_processors": kinds}
    assert [type(p) for p in engine.pipe.transformer.attn_processors.values()] == [
        type(p) for p in own.transformer.attn_processors.values()
    ]
    for guidance in (7.5, 1.0):
        for images in (1, 2):
            spec = job(guidance=guidance, images=images, seed=40 + images)
            got = [pixels(im) for im in engine.generate(spec).images]
            expected = reference(own, spec, **sequence_length(own))
            assert len(got) == images
            for g, e in zip(got, expected, strict=True):
                assert np.array_equal(g, e), (size, guidance, images)
    # The UNet's processor is what broke them: the comparison above would see it.
    from diffusers.models.attention_processor import AttnProcessor2_0

    own.transformer.set_attn_processor(AttnProcessor2_0())
    spec = job(guidance=7.5, images=1, seed=41)
    try:
        swapped = reference(own, spec, **sequence_length(own))
    except (AttributeError, ValueError):
        return
    assert not np.array_equal(swapped[0], pixels(engine.generate(spec).images[0]))


def test_a_unet_still_gets_sdpa(engines: dict[str, Engine]) -> None:
    from diffusers.models.attention_processor import AttnProcessor2_0

    engine = engines["tiny"]
    assert engine.describe()["speed"] == {"attention": "sdpa"}
    assert all(isinstance(p, AttnProcessor2_0) for p in engine.pipe.unet.attn_processors.values())


# -- rules: refused fields, each one the plain pipeline would drop or change -------------------


@pytest.mark.parametrize("size", FLOW)
def test_flow_matching_models_take_only_the_default_scheduler(
    engines: dict[str, Engine], size: str
) -> None:
    engine = engines[size]
    assert engine.rules is not None and engine.rules.flow_matching
    assert engine.rules.scheduler_class == type(engine.pipe.scheduler).__name__
    for name in SCHEDULERS[1:]:
        error = refused(engine, job(scheduler=name))
        assert [p[0] for p in error.problems] == ["scheduler"], error
        assert "flow matching" in str(error) and str(error).endswith("choose one of: default")
        with pytest.raises(JobValidationError, match="scheduler"):
            engine.scheduler_for(name)
    assert engine.generate(job(scheduler="default")).images[0].shape == (64, 64, 3)


def test_sd_keeps_every_contract_scheduler(engines: dict[str, Engine]) -> None:
    rules = engines["tiny"].rules
    assert rules is not None and rules.schedulers == SCHEDULERS and not rules.flow_matching
    assert rules.negative_prompt and rules.guidance == "classifier-free"
    assert rules.max_sequence_length is None


def test_flux_refuses_sizes_it_would_resize_naming_width_height_and_the_multiple(
    engines: dict[str, Engine],
) -> None:
    engine, own = engines["flux-tiny"], plain("flux-tiny")
    multiple = own.vae_scale_factor * 2
    off = 4 * multiple + 8  # a multiple of the contract's 8, not of the model's
    # The harm: the plain pipeline makes another size than asked, with only a log warning.
    resized = reference(own, job(width=off, height=64), **sequence_length(own))
    assert resized[0].shape[:2] != (64, off)
    error = refused(engine, job(width=off, height=off + multiple))
    assert [p[0] for p in error.problems] == ["width", "height"]
    assert f"multiple of {multiple}" in str(error) and "resize" in str(error)
    image = engine.generate(job(width=multiple * 5, height=multiple * 4)).images[0]
    assert image.shape == (multiple * 4, multiple * 5, 3)


def test_sd3_names_the_side_its_own_checks_refuse_and_the_end_of_its_embedding(
    engines: dict[str, Engine],
) -> None:
    engine, own = engines["sd3-tiny"], plain("sd3-tiny")
    multiple = own.vae_scale_factor * own.patch_size
    off = 4 * multiple + 8
    with pytest.raises(ValueError, match="divisible"):  # the pipeline's words: no field named
        reference(own, job(width=off), **sequence_length(own))
    error = refused(engine, job(width=off))
    assert error.problems[0][:2] == ("width", off)
    top = own.transformer.config.pos_embed_max_size * multiple
    with pytest.raises(ValueError, match="pos_embed_max_size"):
        reference(own, job(width=top + multiple), **sequence_length(own))
    error = refused(engine, job(width=top + multiple))
    assert error.problems[0][0] == "width" and f"at most {top}" in str(error)
    assert engine.generate(job(width=multiple * 5)).images[0].shape == (64, multiple * 5, 3)


def test_flux_refuses_a_negative_prompt_it_would_ignore_and_sd3_honours_it(
    engines: dict[str, Engine],
) -> None:
    own = plain("flux-tiny")
    spec = job(negative_prompt="blurry")
    ignored = reference(own, spec, negative_prompt="blurry", **sequence_length(own))
    assert np.array_equal(ignored[0], reference(own, spec, **sequence_length(own))[0])
    error = refused(engines["flux-tiny"], spec)
    assert [p[0] for p in error.problems] == ["negative_prompt"]
    assert "distilled" in str(error) and "leave negative_prompt empty" in str(error)
    sd3 = engines["sd3-tiny"]
    with_negative = pixels(sd3.generate(spec).images[0])
    assert not np.array_equal(with_negative, pixels(sd3.generate(job()).images[0]))


def test_flux_guidance_is_distilled_and_a_guidance_free_flux_refuses_one(
    engines: dict[str, Engine],
) -> None:
    engine = engines["flux-tiny"]
    assert engine.rules is not None and engine.rules.guidance == "distilled"
    kwargs = engine.batch_kwargs([job(guidance=3.5)])
    assert kwargs["guidance_scale"] == 3.5 and "true_cfg_scale" not in kwargs
    assert "negative_prompt" not in kwargs
    a, b = (pixels(engine.generate(job(guidance=g)).images[0]) for g in (1.0, 7.5))
    assert not np.array_equal(a, b)  # the embedded guidance changes the image
    # A Flux whose transformer embeds no guidance (like FLUX.1-schnell) ignores it.
    schnell = plain("flux-tiny")
    config = dict(schnell.transformer.config, guidance_embeds=False)
    schnell.transformer = FluxTransformer2DModel.from_config(config)
    one, many = (reference(schnell, job(guidance=g), **sequence_length(schnell)) for g in (1, 7.5))
    assert np.array_equal(one[0], many[0])
    rules = model_rules(schnell, SCHEDULER_CLASSES)
    assert rules.guidance == "none"
    assert [p[0] for p in rules.problems(job(guidance=7.5))] == ["guidance"]
    assert rules.problems(job(guidance=1.0)) == rules.problems(job(guidance=0.0)) == []


def test_the_t5_sequence_length_comes_from_the_pipeline(engines: dict[str, Engine]) -> None:
    for size in FLOW:
        engine = engines[size]
        declared = sequence_length(engine.pipe).get("max_sequence_length")
        import inspect

        default = inspect.signature(engine.pipe.__call__).parameters["max_sequence_length"].default
        expected = min(default, declared) if declared else default
        assert engine.batch_kwargs([job()])["max_sequence_length"] == expected, size
    assert "max_sequence_length" not in engines["tiny"].batch_kwargs([job()])


def test_warm_up_and_self_test_sizes_keep_the_rules(engines: dict[str, Engine]) -> None:
    for engine in engines.values():
        engine.self_test()  # raises if its own image broke the model's rules
        side = engine._probe_side()
        assert engine.rules is not None and side % engine.rules.side_multiple == 0


# -- the rules as data: what workers publish and producers read ---------------------------------


def test_rules_name_each_field_and_survive_json() -> None:
    rules = ModelRules(pipeline="FluxPipeline", schedulers=("default",),
                       scheduler_class="FlowMatchEulerDiscreteScheduler", flow_matching=True,
                       side_multiple=16, guidance="distilled", negative_prompt=False)  # fmt: skip
    spec = JobSpec(prompt="p", scheduler="ddim", width=72, height=88, negative_prompt="n" * 200)
    problems = rules.problems(spec)
    assert [p[0] for p in problems] == ["scheduler", "width", "height", "negative_prompt"]
    assert "e.g. 64 or 80" in problems[1][2] and "e.g. 80 or 96" in problems[2][2]
    assert len(repr(problems[3][1])) < 120  # a long negative prompt is quoted short
    with pytest.raises(JobValidationError, match=r"^invalid job: scheduler='ddim': "):
        rules.check(spec)
    text = json.dumps(rules.model_dump(mode="json"))
    again = ModelRules.model_validate({**json.loads(text), "a_later_rule": 1})
    assert again == rules
    assert ModelRules(pipeline="X").problems(spec) == []  # the defaults refuse nothing


def test_the_producer_refuses_by_the_rules_of_the_ready_workers_of_the_jobs_queue(
    engines: dict[str, Engine], endpoints: Any
) -> None:
    """The worker's own publishing (heartbeat, state, info) into the real Redis; the producer
    reads the rules of the workers consuming the job's queue, ready ones only."""
    import uuid

    import redis

    from worker.ops import gate
    from worker.ops.heartbeat import Heartbeat, publish_info

    env = endpoints.env()
    queue, other = (f"fleet.rules-{uuid.uuid4().hex[:8]}" for _ in range(2))
    node = f"rules-{uuid.uuid4().hex[:6]}@localhost"
    beat = Heartbeat(env["FLEET_REDIS_URL"], node, [queue], interval_s=10, ttl_s=30,
                     status=lambda: {"state": "ready"})  # fmt: skip
    r = redis.Redis.from_url(env["FLEET_REDIS_URL"])

    def client(on: str) -> Client:
        settings = ProducerSettings(_env_file=None, **settings_kwargs(env))
        settings.queue = on
        return Client(settings)

    bad = {"prompt": "p", "width": 64, "height": 64, "scheduler": "ddim"}
    try:
        beat.beat()
        publish_info(r, node, engines["flux-tiny"].describe())
        gate.publish_state(r, node, gate.STARTING, "loading the model")
        with client(queue) as c:  # still loading: its info may be its last model's
            assert c.validate(bad).scheduler == "ddim"
        gate.publish_state(r, node, gate.READY)
        with client(queue) as c:
            with pytest.raises(JobValidationError) as info:
                c.validate(bad)
            assert [p[0] for p in info.value.problems] == ["scheduler"]
            assert "FluxPipeline" in str(info.value)
            assert c.validate({**bad, "model": "another-model"}).model == "another-model"
            assert c.model_rules(queue, "flux-tiny") == [engines["flux-tiny"].rules]
            assert c.validate({**bad, "scheduler": "default"}).scheduler == "default"
        with client(other) as c:  # no worker of that queue published rules
            assert c.validate(bad).scheduler == "ddim"
        for key in contract.queue_keys(queue):
            assert r.llen(key) == 0  # validating enqueues nothing
    finally:
        beat.stop()
        r.delete(contract.WORKER_INFO_KEY.format(node=node),
                 contract.WORKER_STATE_KEY.format(node=node))  # fmt: skip
        r.close()
