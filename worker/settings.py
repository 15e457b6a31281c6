"""Worker settings: the shared fleet settings plus the model, device and pool, from FLEET_* env."""

from __future__ import annotations

from typing import Literal

from pydantic import Field

from producer.settings import FleetSettings

Dtype = Literal["auto", "float16", "bfloat16", "float32"]
PlacementMode = Literal["pinned", "balanced"]
OffloadMode = Literal["none", "model", "sequential"]


class WorkerSettings(FleetSettings):
    """Everything a worker process reads at start. See .env.example for each variable."""

    model: str | None = Field(
        None, description="Hub id or local folder of the diffusers pipeline this worker serves."
    )
    model_name: str | None = Field(
        None, description="The name jobs use for this model; defaults to FLEET_MODEL."
    )
    model_revision: str | None = Field(None, description="Hub revision; pin a commit to reproduce.")
    local_files_only: bool = Field(False, description="Never contact the model hub.")
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
    attention: Literal["sdpa", "default"] = Field(
        "sdpa", description="sdpa: PyTorch scaled_dot_product_attention (AttnProcessor2_0)."
    )
    channels_last: bool = Field(False, description="UNet and VAE in channels_last layout.")
    compile: bool = Field(
        False, description="torch.compile the UNet/transformer, warmed up when the model loads."
    )
    compile_backend: str = Field("inductor", description="torch.compile backend.")
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
