"""Build small random-weight diffusers pipelines on disk for tests and benchmarks (no hub)."""

from __future__ import annotations

import argparse
import json
import logging
import os
import shutil
import sys
import tempfile
from collections.abc import Sequence
from pathlib import Path
from typing import Any

log = logging.getLogger(__name__)

SIZES: tuple[str, ...] = ("tiny", "medium", "sdxl-tiny", "sd3-tiny", "sd3-tiny-no-t5", "flux-tiny")
MARKER_FILE = "fleet-testmodel.json"
MODEL_INDEX = "model_index.json"

BOS_TOKEN = "<|startoftext|>"  # nosec B105  # CLIP's special token, not a password
EOS_TOKEN = "<|endoftext|>"  # nosec B105  # CLIP's special token, not a password
MODEL_MAX_LENGTH = 77


# --------------------------------------------------------------------------- tokenizer


def _bytes_to_unicode() -> dict[int, str]:
    """CLIP/GPT-2 reversible byte -> printable unicode character mapping."""
    bs = (
        list(range(ord("!"), ord("~") + 1))
        + list(range(ord("¡"), ord("¬") + 1))
        + list(range(ord("®"), ord("ÿ") + 1))
    )
    cs = bs[:]
    n = 0
    for b in range(256):
        if b not in bs:
            bs.append(b)
            cs.append(256 + n)
            n += 1
    return dict(zip(bs, [chr(c) for c in cs], strict=True))


def _byte_vocab() -> dict[str, int]:
    """256 byte characters, the same 256 with the end-of-word suffix, then BOS and EOS."""
    chars = list(_bytes_to_unicode().values())
    vocab: dict[str, int] = {}
    for c in chars:
        vocab[c] = len(vocab)
    for c in chars:
        vocab[c + "</w>"] = len(vocab)
    vocab[BOS_TOKEN] = len(vocab)
    vocab[EOS_TOKEN] = len(vocab)
    return vocab


VOCAB: dict[str, int] = _byte_vocab()
VOCAB_SIZE = len(VOCAB)  # 514
BOS_ID = VOCAB[BOS_TOKEN]  # 512
EOS_ID = VOCAB[EOS_TOKEN]  # 513


def _write_vocab_files(folder: Path) -> None:
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "vocab.json").write_text(json.dumps(VOCAB, ensure_ascii=False), encoding="utf-8")
    # No merges: every word is tokenised byte by byte, which is all a test model needs.
    (folder / "merges.txt").write_text("#version: 0.2\n", encoding="utf-8")


def _make_tokenizer(workdir: Path) -> Any:
    from transformers import CLIPTokenizer

    src = workdir / "_vocab"
    _write_vocab_files(src)
    tok = CLIPTokenizer.from_pretrained(  # nosec B615  # the local folder written above
        str(src),
        model_max_length=MODEL_MAX_LENGTH,
        pad_token=EOS_TOKEN,
    )
    shutil.rmtree(src)
    return tok


# --------------------------------------------------------------------------- T5 tokenizer

T5_PAD, T5_EOS, T5_UNK = "<pad>", "</s>", "<unk>"  # nosec B105  # T5's special tokens
#: Tokens the tiny T5 encoder reads (real FLUX.1 / SD3 read 512 / 256): keeps the models fast.
T5_MAX_LENGTH = 32
#: SentencePiece's word-start mark.
WORD_START = "\u2581"
#: Word-start and inner pieces of every printable ASCII character; anything else is <unk>.
_T5_CHARS = [chr(c) for c in range(ord("!"), ord("~") + 1)]
T5_VOCAB: list[tuple[str, float]] = [
    (T5_PAD, 0.0), (T5_EOS, 0.0), (T5_UNK, 0.0), (WORD_START, -2.0),
    *((WORD_START + c, -3.0) for c in _T5_CHARS),
    *((c, -4.0) for c in _T5_CHARS),
]  # fmt: skip


def _make_t5_tokenizer() -> Any:
    """A T5TokenizerFast over a hand-made Unigram vocabulary (no training, no download).

    The backend is built exactly as T5TokenizerFast rebuilds it when loading tokenizer.json
    (Unigram without byte fallback, whitespace split then Metaspace, "</s>" appended), so the
    saved tokenizer tokenizes the same after from_pretrained."""
    from tokenizers import Tokenizer, decoders, pre_tokenizers, processors
    from tokenizers.models import Unigram
    from transformers import T5TokenizerFast  # type: ignore[attr-defined]  # lazily exported

    backend = Tokenizer(Unigram(T5_VOCAB, unk_id=2, byte_fallback=False))
    backend.pre_tokenizer = pre_tokenizers.Sequence([
        pre_tokenizers.WhitespaceSplit(),
        pre_tokenizers.Metaspace(replacement=WORD_START, prepend_scheme="always", split=True),
    ])  # fmt: skip
    backend.decoder = decoders.Metaspace(
        replacement=WORD_START, prepend_scheme="always", split=True
    )
    backend.post_processor = processors.TemplateProcessing(
        single=["$A", T5_EOS], pair=["$A", T5_EOS, "$B", T5_EOS], special_tokens=[(T5_EOS, 1)]
    )
    return T5TokenizerFast(
        vocab=T5_VOCAB,
        tokenizer_object=backend,
        extra_ids=0,
        model_max_length=T5_MAX_LENGTH,
        eos_token=T5_EOS,
        unk_token=T5_UNK,
        pad_token=T5_PAD,
    )


# --------------------------------------------------------------------------- components


def _text_config(hidden: int, layers: int, heads: int, ffn: int, projection_dim: int) -> Any:
    from transformers import CLIPTextConfig

    return CLIPTextConfig(
        vocab_size=VOCAB_SIZE,
        hidden_size=hidden,
        intermediate_size=ffn,
        num_hidden_layers=layers,
        num_attention_heads=heads,
        max_position_embeddings=MODEL_MAX_LENGTH,
        hidden_act="quick_gelu",
        layer_norm_eps=1e-5,
        projection_dim=projection_dim,
        bos_token_id=BOS_ID,
        eos_token_id=EOS_ID,
        pad_token_id=EOS_ID,
    )


def _sd_scheduler() -> Any:
    from diffusers import PNDMScheduler

    # Same settings as runwayml/stable-diffusion-v1-5's scheduler_config.json.
    return PNDMScheduler(
        beta_start=0.00085,
        beta_end=0.012,
        beta_schedule="scaled_linear",
        num_train_timesteps=1000,
        set_alpha_to_one=False,
        skip_prk_steps=True,
        steps_offset=1,
    )


def _sd_components(size: str, workdir: Path) -> dict[str, Any]:
    import torch
    from diffusers import AutoencoderKL, UNet2DConditionModel
    from transformers import CLIPTextModel

    if size == "tiny":
        # VAE downscale 2 (64x64 image -> 32x32 latents), two UNet levels.
        vae_kw: dict[str, Any] = dict(
            block_out_channels=(8, 8), layers_per_block=1, norm_num_groups=4, sample_size=64
        )
        unet_kw: dict[str, Any] = dict(
            block_out_channels=(8, 12),
            layers_per_block=1,
            norm_num_groups=4,
            attention_head_dim=2,
            down_block_types=("DownBlock2D", "CrossAttnDownBlock2D"),
            up_block_types=("CrossAttnUpBlock2D", "UpBlock2D"),
            sample_size=32,
        )
        text = _text_config(hidden=16, layers=2, heads=2, ffn=32, projection_dim=16)
    elif size == "medium":
        # SD-shaped: VAE downscale 8 (128x128 -> 16x16 latents), three UNet levels.
        vae_kw = dict(
            block_out_channels=(16, 32, 32, 32),
            layers_per_block=1,
            norm_num_groups=8,
            sample_size=128,
        )
        unet_kw = dict(
            block_out_channels=(32, 64, 64),
            layers_per_block=1,
            norm_num_groups=8,
            attention_head_dim=4,
            down_block_types=("CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "DownBlock2D"),
            up_block_types=("UpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D"),
            sample_size=16,
        )
        text = _text_config(hidden=64, layers=2, heads=4, ffn=128, projection_dim=64)
    else:  # pragma: no cover - guarded by the caller
        raise ValueError(size)
    n_vae = len(vae_kw["block_out_channels"])

    torch.manual_seed(0)
    unet = UNet2DConditionModel(
        in_channels=4, out_channels=4, cross_attention_dim=text.hidden_size, **unet_kw
    )
    torch.manual_seed(0)
    vae = AutoencoderKL(
        in_channels=3,
        out_channels=3,
        latent_channels=4,
        down_block_types=("DownEncoderBlock2D",) * n_vae,
        up_block_types=("UpDecoderBlock2D",) * n_vae,
        **vae_kw,
    )
    torch.manual_seed(0)
    text_encoder = CLIPTextModel(text)
    return {
        "unet": unet,
        "vae": vae,
        "text_encoder": text_encoder,
        "tokenizer": _make_tokenizer(workdir),
        "scheduler": _sd_scheduler(),
        "safety_checker": None,
        "feature_extractor": None,
        "image_encoder": None,
        "requires_safety_checker": False,
    }


def _sdxl_components(workdir: Path) -> dict[str, Any]:
    """Modelled on diffusers' tests/pipelines/stable_diffusion_xl get_dummy_components()."""
    import torch
    from diffusers import AutoencoderKL, EulerDiscreteScheduler, UNet2DConditionModel
    from transformers import CLIPTextModel, CLIPTextModelWithProjection

    hidden = 16
    proj = 16
    time_dim = 8
    text = _text_config(hidden=hidden, layers=2, heads=2, ffn=32, projection_dim=proj)

    torch.manual_seed(0)
    unet = UNet2DConditionModel(
        block_out_channels=(8, 16),
        layers_per_block=1,
        norm_num_groups=4,
        sample_size=32,
        in_channels=4,
        out_channels=4,
        down_block_types=("DownBlock2D", "CrossAttnDownBlock2D"),
        up_block_types=("CrossAttnUpBlock2D", "UpBlock2D"),
        attention_head_dim=(2, 4),
        use_linear_projection=True,
        addition_embed_type="text_time",
        addition_time_embed_dim=time_dim,
        transformer_layers_per_block=(1, 2),
        # 6 micro-conditioning ints (orig size, crop, target size) + pooled text_encoder_2.
        projection_class_embeddings_input_dim=6 * time_dim + proj,
        cross_attention_dim=2 * hidden,  # concat of both encoders' penultimate states
    )
    torch.manual_seed(0)
    vae = AutoencoderKL(
        block_out_channels=(8, 16),
        layers_per_block=1,
        norm_num_groups=4,
        in_channels=3,
        out_channels=3,
        down_block_types=("DownEncoderBlock2D",) * 2,
        up_block_types=("UpDecoderBlock2D",) * 2,
        latent_channels=4,
        sample_size=64,
    )
    torch.manual_seed(0)
    text_encoder = CLIPTextModel(text)
    torch.manual_seed(0)
    text_encoder_2 = CLIPTextModelWithProjection(text)
    # Same settings as stabilityai/stable-diffusion-xl-base-1.0's scheduler_config.json.
    scheduler = EulerDiscreteScheduler(
        beta_start=0.00085,
        beta_end=0.012,
        beta_schedule="scaled_linear",
        num_train_timesteps=1000,
        steps_offset=1,
        timestep_spacing="leading",
        interpolation_type="linear",
        prediction_type="epsilon",
    )
    tokenizer = _make_tokenizer(workdir)
    return {
        "unet": unet,
        "vae": vae,
        "text_encoder": text_encoder,
        "text_encoder_2": text_encoder_2,
        "tokenizer": tokenizer,
        "tokenizer_2": tokenizer,
        "scheduler": scheduler,
        "image_encoder": None,
        "feature_extractor": None,
        "force_zeros_for_empty_prompt": True,
        "add_watermarker": False,
    }


def _t5_encoder(d_model: int) -> Any:
    import torch
    from transformers import T5Config, T5EncoderModel

    torch.manual_seed(0)
    return T5EncoderModel(
        T5Config(
            vocab_size=len(T5_VOCAB),
            d_model=d_model,
            d_kv=8,
            d_ff=2 * d_model,
            num_layers=2,
            num_heads=d_model // 8,
            relative_attention_num_buckets=8,
            relative_attention_max_distance=T5_MAX_LENGTH,
            pad_token_id=0,
            eos_token_id=1,
        )
    )


def _flow_vae(latent_channels: int) -> Any:
    """Four levels like the real SD3/Flux VAEs (downscale 8: a 64x64 image is 8x8 latents), with
    their latent shift and scale, in 8 channels."""
    import torch
    from diffusers import AutoencoderKL

    torch.manual_seed(0)
    return AutoencoderKL(
        in_channels=3,
        out_channels=3,
        latent_channels=latent_channels,
        block_out_channels=(8, 8, 8, 8),
        layers_per_block=1,
        norm_num_groups=4,
        down_block_types=("DownEncoderBlock2D",) * 4,
        up_block_types=("UpDecoderBlock2D",) * 4,
        sample_size=64,
        use_quant_conv=False,
        use_post_quant_conv=False,
        shift_factor=0.0609,
        scaling_factor=1.5035,
    )


def _sd3_components(workdir: Path, t5: bool) -> dict[str, Any]:
    """Modelled on diffusers' tests/pipelines/stable_diffusion_3 get_dummy_components(): two
    CLIP encoders with projection, optionally T5, a flow-matching scheduler. SD3 works without
    its T5 encoder (text_encoder_3=None: zero embeddings in its place)."""
    import torch
    from diffusers import FlowMatchEulerDiscreteScheduler, SD3Transformer2DModel
    from transformers import CLIPTextModelWithProjection

    hidden = 16
    text = _text_config(hidden=hidden, layers=2, heads=2, ffn=32, projection_dim=hidden)
    joint = 2 * hidden  # both CLIP encoders' hidden states side by side, or T5's d_model
    torch.manual_seed(0)
    transformer = SD3Transformer2DModel(
        sample_size=8,
        patch_size=2,
        in_channels=4,
        out_channels=4,
        num_layers=1,
        attention_head_dim=8,
        num_attention_heads=2,
        joint_attention_dim=joint,
        caption_projection_dim=16,  # heads x head dim
        pooled_projection_dim=2 * hidden,  # both CLIP encoders' pooled projections
        pos_embed_max_size=32,  # 32 patches of 2 latents of 8 pixels: up to 512 pixels a side
    )
    torch.manual_seed(0)
    text_encoder = CLIPTextModelWithProjection(text)
    torch.manual_seed(1)
    text_encoder_2 = CLIPTextModelWithProjection(text)
    tokenizer = _make_tokenizer(workdir)
    return {
        "transformer": transformer,
        # Same settings as stabilityai/stable-diffusion-3-medium-diffusers' scheduler.
        "scheduler": FlowMatchEulerDiscreteScheduler(num_train_timesteps=1000, shift=3.0),
        "vae": _flow_vae(4),
        "text_encoder": text_encoder,
        "tokenizer": tokenizer,
        "text_encoder_2": text_encoder_2,
        "tokenizer_2": tokenizer,
        "text_encoder_3": _t5_encoder(joint) if t5 else None,
        "tokenizer_3": _make_t5_tokenizer() if t5 else None,
        "image_encoder": None,
        "feature_extractor": None,
    }


def _flux_components(workdir: Path) -> dict[str, Any]:
    """Modelled on diffusers' tests/pipelines/flux get_dummy_components(): CLIP (pooled) and T5
    (sequence) text encoders, a transformer with embedded (distilled) guidance like FLUX.1-dev,
    latents packed 2x2 (sizes in multiples of 16 with the 8x VAE)."""
    import torch
    from diffusers import FlowMatchEulerDiscreteScheduler, FluxTransformer2DModel
    from transformers import CLIPTextModel

    hidden = 16
    text = _text_config(hidden=hidden, layers=2, heads=2, ffn=32, projection_dim=hidden)
    torch.manual_seed(0)
    transformer = FluxTransformer2DModel(
        patch_size=1,
        in_channels=16,  # 4 latent channels, packed 2x2
        num_layers=1,
        num_single_layers=1,
        attention_head_dim=8,
        num_attention_heads=2,
        joint_attention_dim=32,  # T5's d_model
        pooled_projection_dim=hidden,  # CLIP's pooled output
        guidance_embeds=True,
        axes_dims_rope=(2, 2, 4),  # sums to the head dim
    )
    torch.manual_seed(0)
    text_encoder = CLIPTextModel(text)
    # Same settings as black-forest-labs/FLUX.1-dev's scheduler.
    scheduler = FlowMatchEulerDiscreteScheduler(
        num_train_timesteps=1000,
        shift=3.0,
        use_dynamic_shifting=True,
        base_shift=0.5,
        max_shift=1.15,
        base_image_seq_len=256,
        max_image_seq_len=4096,
    )
    return {
        "transformer": transformer,
        "scheduler": scheduler,
        "vae": _flow_vae(4),
        "text_encoder": text_encoder,
        "tokenizer": _make_tokenizer(workdir),
        "text_encoder_2": _t5_encoder(32),
        "tokenizer_2": _make_t5_tokenizer(),
        "image_encoder": None,
        "feature_extractor": None,
    }


def _build_pipeline(size: str, workdir: Path) -> Any:
    if size in ("sd3-tiny", "sd3-tiny-no-t5"):
        from diffusers import StableDiffusion3Pipeline

        return StableDiffusion3Pipeline(**_sd3_components(workdir, t5=size == "sd3-tiny"))
    if size == "flux-tiny":
        from diffusers import FluxPipeline

        return FluxPipeline(**_flux_components(workdir))
    if size == "sdxl-tiny":
        from diffusers import StableDiffusionXLPipeline

        return StableDiffusionXLPipeline(**_sdxl_components(workdir))
    from diffusers import StableDiffusionPipeline

    return StableDiffusionPipeline(**_sd_components(size, workdir))


# --------------------------------------------------------------------------- on-disk handling


def read_marker(path: Path) -> dict[str, Any] | None:
    """Return the parsed fleet-testmodel.json of a model folder, or None if absent/invalid."""
    try:
        data = json.loads((path / MARKER_FILE).read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None
    return data if isinstance(data, dict) else None


def is_complete(path: Path, size: str) -> bool:
    """True if `path` holds a finished test model of `size`."""
    marker = read_marker(path)
    return marker is not None and marker.get("size") == size and (path / MODEL_INDEX).is_file()


def _make_readable(root: Path) -> None:
    """safetensors/tempfile create 0600/0700 entries: open them up to 0644/0755."""
    os.chmod(root, 0o755)  # nosec B103  # random test weights, readable by a container's user
    for dirpath, dirnames, filenames in os.walk(root):
        for d in dirnames:
            folder = os.path.join(dirpath, d)
            os.chmod(folder, 0o755)  # nosec B103  # as above
        for f in filenames:
            os.chmod(os.path.join(dirpath, f), 0o644)


#: The CLIP tokenizers of each size (the others' are SD's one); T5 ones are found by their class.
_CLIP_TOKENIZERS = {
    "sdxl-tiny": ("tokenizer", "tokenizer_2"),
    "sd3-tiny": ("tokenizer", "tokenizer_2"),
    "sd3-tiny-no-t5": ("tokenizer", "tokenizer_2"),
}


def _finish_tokenizers(tmp: Path, size: str) -> None:
    clip = _CLIP_TOKENIZERS.get(size, ("tokenizer",))
    t5 = [p.parent.name for p in tmp.glob("tokenizer*/tokenizer_config.json")
          if p.parent.name not in clip]  # fmt: skip
    for name in (*clip, *t5):
        if name in clip:
            # transformers 5 saves only tokenizer.json; add vocab.json/merges.txt so that the
            # slow CLIPTokenizer of transformers 4.x can load the folder too.
            _write_vocab_files(tmp / name)
        # transformers 5 also records from_pretrained()'s own loading flags; drop them.
        cfg_path = tmp / name / "tokenizer_config.json"
        cfg = json.loads(cfg_path.read_text(encoding="utf-8"))
        for key in ("is_local", "local_files_only"):
            cfg.pop(key, None)
        cfg_path.write_text(json.dumps(cfg, indent=2, ensure_ascii=False) + "\n", encoding="utf-8")


def _versions() -> dict[str, str]:
    import diffusers
    import torch
    import transformers

    return {
        "diffusers": diffusers.__version__,
        "torch": torch.__version__,
        "transformers": transformers.__version__,
    }


def _install(tmp: Path, out: Path, size: str, force: bool) -> bool:
    """Move the finished `tmp` to `out`. Returns False if a concurrent build won the race."""
    if out.exists() or out.is_symlink():
        if not force and is_complete(out, size):
            return False
        old = Path(tempfile.mkdtemp(prefix=f".{out.name}.old-", dir=out.parent))
        old.rmdir()
        os.rename(out, old)
        try:
            os.rename(tmp, out)
        except OSError:
            os.rename(old, out)
            raise
        shutil.rmtree(old, ignore_errors=True)
    else:
        os.rename(tmp, out)
    return True


def build_test_model(size: str, out: Path, force: bool = False) -> Path:
    """Build a random-weight pipeline of `size` into `out` and return `out`.

    Does nothing if `out` already holds a complete test model of that size, unless `force`.
    Refuses (FileExistsError) to replace a non-empty folder that is not a fleet test model,
    unless `force`. Builds into a temporary sibling folder that is renamed at the end.
    """
    if size not in SIZES:
        raise ValueError(f"unknown size {size!r}; expected one of {', '.join(SIZES)}")
    out = Path(out).absolute()
    if not force and is_complete(out, size):
        log.info("test model %r already present at %s", size, out)
        return out
    if not force and out.is_dir() and read_marker(out) is None and any(out.iterdir()):
        raise FileExistsError(f"{out} exists and is not a fleet test model; use --force")
    if out.exists() and not out.is_dir():
        raise FileExistsError(f"{out} exists and is not a directory")

    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.tmp-", dir=out.parent))
    try:
        log.info("building %r test model in %s", size, tmp)
        pipe = _build_pipeline(size, tmp)
        pipe.save_pretrained(str(tmp), safe_serialization=True)
        _finish_tokenizers(tmp, size)
        marker = {"size": size, "built_with": _versions()}
        (tmp / MARKER_FILE).write_text(json.dumps(marker, indent=2) + "\n", encoding="utf-8")
        _make_readable(tmp)
        if _install(tmp, out, size, force):
            log.info("wrote %r test model to %s", size, out)
        else:
            log.info("test model %r was completed concurrently at %s", size, out)
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)
    return out


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m worker.testmodel",
        description="Build a small random-weight diffusers pipeline (no downloads).",
    )
    parser.add_argument("--size", choices=SIZES, default="tiny")
    parser.add_argument("--out", type=Path, required=True, help="destination folder")
    parser.add_argument("--force", action="store_true", help="rebuild even if present")
    parser.add_argument("-v", "--verbose", action="store_true")
    args = parser.parse_args(argv)
    logging.basicConfig(
        level=logging.INFO if args.verbose else logging.WARNING,
        format="%(levelname)s %(name)s: %(message)s",
    )
    if not args.verbose:
        # Library progress bars ("Writing model shards") would clutter the one-line output.
        import diffusers.utils.logging as dlog
        import transformers.utils.logging as tlog

        dlog.disable_progress_bar()
        tlog.disable_progress_bar()
    try:
        path = build_test_model(args.size, args.out, force=args.force)
    except (FileExistsError, OSError) as exc:
        log.error("%s", exc)
        return 1
    print(path)
    return 0


if __name__ == "__main__":
    sys.exit(main())
