"""One typed settings object for the whole fleet, read from FLEET_* environment variables and .env.

The fields come in groups, one class each: where Redis is (:class:`RedisGroup`), where images go
(:class:`S3Group`), the job limits (:class:`fleet.contract.Limits`, declared once), webhooks, how
the producer waits, and what a worker serves and on which device. :class:`FleetSettings` is what
both sides share; :class:`ProducerSettings` and :class:`WorkerSettings` add their own group. Every
field keeps its flat name, so every variable is ``FLEET_<FIELD>`` (``FLEET_S3_BUCKET``), as
documented in ``.env.example`` (generated from these classes by ``scripts/gen_env_example.py``).
"""

from __future__ import annotations

from typing import Annotated, Any, Literal
from urllib.parse import urlsplit

from pydantic import AliasChoices, BaseModel, Field, SecretStr, field_validator, model_validator
from pydantic_settings import BaseSettings, NoDecode, SettingsConfigDict

from fleet.contract import DEFAULT_QUEUE, Limits


def _split_list(v: Any) -> Any:
    if isinstance(v, str):
        return tuple(item.strip() for item in v.split(",") if item.strip())
    return v


def _split_map(v: Any) -> Any:
    """Parse ``a=x,b=y`` (or a dict) into a dict."""
    if isinstance(v, str):
        out: dict[str, str] = {}
        for item in v.split(","):
            if not item.strip():
                continue
            key, sep, value = item.partition("=")
            if not sep or not key.strip() or not value.strip():
                raise ValueError(f"expected NAME=VALUE pairs separated by commas, got {item!r}")
            out[key.strip()] = value.strip()
        return out
    return v


class RedisGroup(BaseModel):
    """Redis: the Celery broker and result backend, queues and job time limits."""

    redis_url: str = Field("redis://127.0.0.1:6379/0", description="Celery broker URL (Redis).")
    result_backend_url: str | None = Field(
        None, description="Celery result backend; empty means the same Redis as redis_url."
    )
    result_expires_s: int = Field(7 * 24 * 3600, description="How long Celery keeps results.")
    queue: str = Field(DEFAULT_QUEUE, description="The default job queue.")
    model_routes: Annotated[dict[str, str], NoDecode] = Field(
        default_factory=dict, description="MODEL=QUEUE,... : jobs for MODEL go to QUEUE."
    )
    job_claim_ttl_s: int = Field(
        30 * 24 * 3600, description="How long a client-supplied job id stays reserved."
    )

    job_time_base_s: float = Field(
        300.0, description="Soft time limit of a job: this many seconds plus the next setting."
    )
    job_time_per_mpx_step_s: float = Field(
        2.0, description="Soft time limit: seconds per megapixel per step per image."
    )
    visibility_timeout_s: int = Field(
        3600, description="Redis transport visibility timeout; keep equal on all parts."
    )
    redis_check: Literal["refuse", "warn"] = Field(
        "refuse",
        description="Redis that may lose the fleet's keys (maxmemory-policy other than "
        "noeviction, or no persistence): refuse to start, or only warn.",
    )

    @property
    def backend_url(self) -> str:
        return self.result_backend_url or self.redis_url

    @field_validator("redis_url", "result_backend_url")
    @classmethod
    def _verify_tls(cls, url: str | None) -> str | None:
        """A ``rediss://`` URL checks the server's certificate unless it says otherwise: kombu
        would connect unverified, with a warning, and Celery's backend refuses the URL."""
        if url and url.startswith("rediss://") and "ssl_cert_reqs=" not in url:
            url += ("&" if "?" in url else "?") + "ssl_cert_reqs=required"
        return url


class S3Group(BaseModel):
    """The S3-compatible store the images, manifests and failure records go to."""

    s3_endpoint_url: str | None = Field(None, description="Empty means AWS S3.")
    s3_public_endpoint_url: str | None = Field(
        None,
        description="Presigned GET URLs are signed for this endpoint (one clients outside the "
        "fleet's network can reach, e.g. https://images.example.com); it must reach the same "
        "bucket. Used for signing only. Empty: sign for FLEET_S3_ENDPOINT_URL.",
    )
    s3_region: str = "us-east-1"
    s3_access_key_id: SecretStr | None = None
    s3_secret_access_key: SecretStr | None = None
    s3_bucket: str = "fleet"
    s3_prefix: str = Field("", description="Key prefix inside the bucket.")
    s3_create_bucket: bool = Field(False, description="Create the bucket at start if missing.")
    s3_addressing_style: Literal["path", "virtual", "auto"] = "path"
    s3_max_attempts: int = Field(5, description="boto3 'standard' retry mode attempts.")
    presign_expiry_s: int = Field(3600, description="Lifetime of presigned GET URLs.")

    @field_validator("s3_public_endpoint_url")
    @classmethod
    def _public_endpoint(cls, url: str | None) -> str | None:
        """An http(s) URL with a host: botocore signs for its host (SigV4 covers the Host
        header), so a bare name or another scheme would give URLs no client can open."""
        if url is None or not url.strip():
            return None
        url = url.strip()
        parts = urlsplit(url)
        try:
            host, _ = parts.hostname, parts.port  # .port raises on a port out of range
        except ValueError:
            host = None
        if parts.scheme not in ("http", "https") or not host:
            raise ValueError(
                f"FLEET_S3_PUBLIC_ENDPOINT_URL={url!r} is not an http(s) URL with a host "
                "(e.g. https://images.example.com or http://203.0.113.7:8333)"
            )
        if parts.query or parts.fragment or parts.username is not None:
            raise ValueError(
                f"FLEET_S3_PUBLIC_ENDPOINT_URL={url!r}: give scheme, host, port and path only "
                "(no user, query or fragment)"
            )
        return url


class WebhookGroup(BaseModel):
    """Webhook deliveries (the address check is ``webhook_allow_private`` in the limits)."""

    webhook_secret: SecretStr | None = Field(
        None,
        description="Shared secret of the webhook signature (HMAC-SHA256 of timestamp and body).",
    )
    webhook_max_retries: int = Field(8, description="Delivery attempts after the first.")
    webhook_timeout_s: float = Field(10.0, description="Timeout of one webhook POST.")


class ProducerGroup(BaseModel):
    """How the producer's ``wait`` polls."""

    poll_interval_s: float = Field(0.1, description="How often wait/--wait polls job states.")
    wait_timeout_s: float | None = Field(None, description="Give up waiting after this long.")


class GatewayGroup(BaseModel):
    """The HTTP gateway (`python -m producer serve`): its limits, its waits, its fair share."""

    gateway_wait_s: float = Field(
        300.0,
        description="POST /v1/images/generations waits this long for the images (under 600 s, "
        "the openai SDK's timeout); then 504 with the job id to follow.",
    )
    gateway_max_body_bytes: int = Field(
        1_048_576, description="Request bodies over this size are refused with 413 (chunked too)."
    )
    #: NoDecode: "a,b" is split in this module, not read as JSON.
    gateway_cors_origins: Annotated[tuple[str, ...], NoDecode] = Field(
        (), description="Comma-separated origins allowed by CORS; empty: CORS off."
    )
    gateway_idempotency_ttl_s: int = Field(
        86_400, description="How long an Idempotency-Key or an SDK retry finds its first job."
    )
    fair_queue_depth: int = Field(
        1,
        description="Gateway jobs the fair dispatcher lets wait in a Celery queue at once "
        "(beyond those workers hold); tenants take turns for the next place.",
    )
    tenant_rate_per_min: int = Field(60, description="Default jobs per minute of a new tenant.")
    tenant_max_queued: int = Field(100, description="Default cap on a new tenant's queued jobs.")
    tenant_max_job_mpx_steps: float = Field(
        600.0,
        description="Default largest job of a new tenant: megapixels x steps x images "
        "(512x512, 30 steps, 8 images is about 63).",
    )

    @field_validator("gateway_wait_s")
    @classmethod
    def _under_sdk_timeout(cls, v: float) -> float:
        if not 0 < v < 600:
            raise ValueError(
                "FLEET_GATEWAY_WAIT_S must be above 0 and under 600 (the SDK's timeout)"
            )
        return v


Dtype = Literal["auto", "float16", "bfloat16", "float32"]
PlacementMode = Literal["pinned", "balanced"]
SafetyPolicy = Literal["flag", "drop", "fail"]
OffloadMode = Literal["none", "model", "sequential"]


def parse_warmup_shapes(text: str) -> list[tuple[int, int, int]]:
    """``512x512x1,512x512x4`` as [(width, height, images per call), ...]; ValueError naming
    the part that is not WIDTHxHEIGHTxIMAGES with positive numbers."""
    shapes: list[tuple[int, int, int]] = []
    for part in (p.strip() for p in text.split(",")):
        if not part:
            continue
        fields = part.lower().split("x")
        if len(fields) != 3 or not all(f.strip().isdigit() and int(f) > 0 for f in fields):
            raise ValueError(
                f"FLEET_WARMUP_SHAPES: {part!r} is not WIDTHxHEIGHTxIMAGES (e.g. 512x512x4)"
            )
        w, h, n = (int(f) for f in fields)
        shapes.append((w, h, n))
    return shapes


class WorkerGroup(BaseModel):
    """What a worker serves, on which device, and how it runs jobs."""

    model: str | None = Field(
        None, description="Hub id or local folder of the diffusers pipeline this worker serves."
    )
    model_name: str | None = Field(
        None, description="The name jobs use for this model; defaults to FLEET_MODEL."
    )
    model_revision: str | None = Field(None, description="Hub revision; pin a commit to reproduce.")
    local_files_only: bool = Field(False, description="Never contact the model hub.")
    safety_policy: SafetyPolicy = Field(
        "flag",
        description="When the model's safety checker flags an image: flag (store the blacked-out "
        "image, flagged), drop (store none, list it as dropped) or fail (fail the job).",
    )
    hf_token: SecretStr | None = Field(
        None,
        validation_alias=AliasChoices("FLEET_HF_TOKEN", "HF_TOKEN"),
        description="Hugging Face hub token for gated or private models (HF_TOKEN also works, "
        "from the environment or .env); masked everywhere.",
    )
    dtype: Dtype = Field("auto", description="auto: float16 on CUDA, float32 on CPU.")
    device: str = Field("auto", description="auto, cpu, cuda, cuda:N or mps.")
    placement: PlacementMode = Field(
        "pinned",
        description="pinned: the whole pipeline on one device; balanced: device_map='balanced' "
        "over every visible GPU.",
    )
    max_memory: str | None = Field(
        None, description="Balanced only: per-device caps, e.g. 0=20GiB,1=20GiB,cpu=64GiB."
    )
    offload: OffloadMode = Field(
        "none",
        description="CPU offload on CUDA: model (enable_model_cpu_offload, moderate cost) or "
        "sequential (enable_sequential_cpu_offload, fits almost anything, very slow).",
    )
    torch_threads: int | None = Field(None, description="torch.set_num_threads in the worker.")
    warmup: bool = Field(True, description="Load the pipeline in the pool child at start.")
    node_label: str | None = Field(None, description="Shown in manifests; defaults to host name.")
    spool_dir: str | None = Field(
        None, description="Local folder for generated PNGs until they are stored; default: tmp."
    )
    storage_retry_window_s: float = Field(
        900.0,
        description="While S3 is unreachable a job is retried with backoff for this long, its "
        "images kept in the spool; then it fails with the reason.",
    )
    storage_retry_backoff_max_s: int = Field(60, description="Cap of one backoff delay.")
    unacked_restore_interval_s: int = Field(
        10, description="Redis transport: seconds between sweeps for unacknowledged jobs."
    )
    unacked_restore_throttle: int = Field(
        10, description="Redis transport: sweep on every Nth interval only (1: every interval)."
    )
    max_deliveries: int = Field(
        3, description="A job delivered this many times (its worker died each time) fails."
    )
    drain_timeout_s: float = Field(
        540.0,
        description="On SIGTERM the running job may finish for this long; then it goes back "
        "to its queue at once (a cold shutdown) for another worker. Keep it under the "
        "orchestrator's grace period (compose: stop_grace_period minus 60 s).",
    )
    unknown_schema_tries: int = Field(
        10, description="A job of a newer schema_version is passed on this many times, then fails."
    )
    attention: Literal["sdpa", "default"] = Field(
        "sdpa", description="sdpa: PyTorch scaled_dot_product_attention (AttnProcessor2_0)."
    )
    channels_last: bool = Field(False, description="UNet and VAE in channels_last layout.")
    compile: bool = Field(
        False, description="torch.compile the UNet/transformer, warmed up when the model loads."
    )
    compile_backend: str = Field("inductor", description="torch.compile backend.")
    compile_scope: Literal["full", "regional"] = Field(
        "full",
        description="full: torch.compile the whole UNet/transformer; regional: only its repeated "
        "blocks (diffusers' compile_repeated_blocks): a cold compile of minutes instead of many, "
        "about the same speed-up (Flux, SDXL-size UNets).",
    )
    compile_mode: str | None = Field(
        None,
        description="torch.compile mode (max-autotune, reduce-overhead, ...); empty: the default.",
    )
    warmup_shapes: str = Field(
        "",
        description="With FLEET_COMPILE: the calls to compile for before the first job, as "
        "WIDTHxHEIGHTxIMAGES (images per pipeline call: a batch worker's batch size times a "
        "job's images), comma-separated, e.g. 512x512x1,512x512x4,768x768x1. Empty: one small "
        "call. A job of another shape compiles when it comes (logged as a warning).",
    )

    @field_validator("warmup_shapes")
    @classmethod
    def _check_warmup_shapes(cls, value: str) -> str:
        parse_warmup_shapes(value)
        return value

    def warmup_calls(self) -> list[tuple[int, int, int]]:
        """FLEET_WARMUP_SHAPES as (width, height, images per call)."""
        return parse_warmup_shapes(self.warmup_shapes)

    vae_slicing: bool = Field(False, description="Decode a batch one image at a time.")
    vae_tiling: bool = Field(False, description="Decode large images in tiles (less memory).")
    tf32: bool = Field(True, description="Allow TF32 matmuls on CUDA (Ampere and newer).")
    oom_fallback_queue: str | None = Field(
        None,
        description="After a CUDA out-of-memory at one image per call, send the job to this "
        "queue (e.g. fleet.balanced, served by a balanced or offloading worker).",
    )
    batch_size: int = Field(
        1,
        description="Jobs generated together in one pipeline call (1: no batching). Run the "
        "worker with --pool threads --concurrency BATCH_SIZE; see docs/batching.md.",
    )
    batch_wait_s: float = Field(
        0.0, description="How long a job may wait for compatible company (0: never waits)."
    )
    store_process: Literal["auto", "child", "inline"] = Field(
        "auto",
        description="Where a job's PNGs are encoded and uploaded: child, a storing process of "
        "the worker's own (the GIL of the process launching GPU kernels stays free); inline, "
        "in the worker process; auto, child on a threads pool (batch and overlapped workers, "
        "several jobs in flight) and inline on prefork (one job at a time: nothing to overlap).",
    )
    log_format: Literal["text", "json"] = Field(
        "text", description="json: one JSON object a line with job id, task id, queue, device."
    )
    metrics_port: int | None = Field(
        None, description="Serve Prometheus metrics on this port (main process); empty: off."
    )
    heartbeat_interval_s: float = Field(10.0, description="How often the heartbeat is refreshed.")
    heartbeat_ttl_s: int = Field(30, description="A worker whose heartbeat is older is unhealthy.")
    progress_interval_s: float = Field(0.5, description="Least time between progress updates.")
    cancel_check_interval_s: float = Field(
        0.2, description="Least time between checks for `producer cancel` while generating."
    )

    @property
    def served_model(self) -> str | None:
        return self.model_name or self.model


_CONFIG = SettingsConfigDict(
    env_prefix="FLEET_",
    env_file=".env",
    env_ignore_empty=True,
    extra="ignore",
    validate_default=True,
    frozen=False,
)


class FleetSettings(BaseSettings, RedisGroup, S3Group, Limits, WebhookGroup):
    """What both the producer and the workers need: Redis, S3, the job limits, webhooks."""

    model_config = _CONFIG

    _split_allowed = field_validator("allowed_models", mode="before")(_split_list)
    _split_routes = field_validator("model_routes", mode="before")(_split_map)

    def limits(self) -> Limits:
        return Limits.of(self)


class ProducerSettings(FleetSettings, ProducerGroup):
    """The producer's settings: the shared ones plus how it waits."""

    model_config = _CONFIG


class WorkerSettings(FleetSettings, WorkerGroup):
    """Everything a worker process reads at start. See .env.example for each variable."""

    model_config = _CONFIG

    @model_validator(mode="after")
    def _agree(self) -> WorkerSettings:
        """Settings that depend on each other are checked against each other at start."""
        problems = []
        if self.heartbeat_ttl_s <= self.heartbeat_interval_s:
            problems.append(
                f"FLEET_HEARTBEAT_TTL_S={self.heartbeat_ttl_s} must exceed "
                f"FLEET_HEARTBEAT_INTERVAL_S={self.heartbeat_interval_s:g}, or a live worker "
                "reads as dead between beats"
            )
        if self.visibility_timeout_s < 4:
            problems.append(
                f"FLEET_VISIBILITY_TIMEOUT_S={self.visibility_timeout_s} must be at least 4: "
                "held jobs' leases are refreshed every quarter of it"
            )
        if self.storage_retry_backoff_max_s > self.storage_retry_window_s > 0:
            problems.append(
                f"FLEET_STORAGE_RETRY_BACKOFF_MAX_S={self.storage_retry_backoff_max_s} is longer "
                f"than FLEET_STORAGE_RETRY_WINDOW_S={self.storage_retry_window_s:g}"
            )
        if problems:
            raise ValueError("; ".join(problems))
        return self


class GatewaySettings(ProducerSettings, GatewayGroup):
    """The HTTP gateway's settings: the producer's plus its own."""

    model_config = _CONFIG

    _split_origins = field_validator("gateway_cors_origins", mode="before")(_split_list)


#: The groups in the order .env.example lists them.
GROUPS: tuple[type[BaseModel], ...] = (
    RedisGroup, S3Group, Limits, WebhookGroup, ProducerGroup, GatewayGroup, WorkerGroup
)  # fmt: skip
