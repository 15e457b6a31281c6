"""Settings shared by the whole fleet, and the producer's own; read from FLEET_* env and .env."""

from __future__ import annotations

from typing import Annotated, Any, Literal

from pydantic import Field, SecretStr, field_validator
from pydantic_settings import BaseSettings, NoDecode, SettingsConfigDict

from producer.contract import DEFAULT_QUEUE, Limits


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


class FleetSettings(BaseSettings):
    """What both the producer and the workers need: where Redis and S3 are, and the job limits."""

    model_config = SettingsConfigDict(
        env_prefix="FLEET_",
        env_file=".env",
        env_ignore_empty=True,
        extra="ignore",
        validate_default=True,
    )

    # --- Redis / Celery
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

    # --- S3-compatible storage
    s3_endpoint_url: str | None = Field(None, description="Empty means AWS S3.")
    s3_region: str = "us-east-1"
    s3_access_key_id: SecretStr | None = None
    s3_secret_access_key: SecretStr | None = None
    s3_bucket: str = "fleet"
    s3_prefix: str = Field("", description="Key prefix inside the bucket.")
    s3_create_bucket: bool = Field(False, description="Create the bucket at start if missing.")
    s3_addressing_style: Literal["path", "virtual", "auto"] = "path"
    s3_max_attempts: int = Field(5, description="boto3 'standard' retry mode attempts.")
    presign_expiry_s: int = Field(3600, description="Lifetime of presigned GET URLs.")

    # --- Job limits (checked by the producer and again by the worker)
    min_side: int = 64
    max_side: int = 2048
    min_steps: int = 1
    max_steps: int = 150
    min_guidance: float = 0.0
    max_guidance: float = 30.0
    max_images: int = 8
    max_prompt_chars: int = 2000
    allowed_models: Annotated[tuple[str, ...], NoDecode] = Field(
        default=(), description="Comma-separated; empty allows any model."
    )

    # --- Webhooks
    webhook_secret: SecretStr | None = Field(
        None, description="Shared secret for the HMAC-SHA256 signature of webhook bodies."
    )
    webhook_allow_private: bool = Field(
        False, description="Allow webhook targets in private/loopback ranges (SSRF guard off)."
    )
    webhook_max_retries: int = Field(8, description="Delivery attempts after the first.")
    webhook_timeout_s: float = Field(10.0, description="Timeout of one webhook POST.")

    _split_allowed = field_validator("allowed_models", mode="before")(_split_list)
    _split_routes = field_validator("model_routes", mode="before")(_split_map)

    @property
    def backend_url(self) -> str:
        return self.result_backend_url or self.redis_url

    def limits(self) -> Limits:
        return Limits(
            min_side=self.min_side,
            max_side=self.max_side,
            min_steps=self.min_steps,
            max_steps=self.max_steps,
            min_guidance=self.min_guidance,
            max_guidance=self.max_guidance,
            max_images=self.max_images,
            max_prompt_chars=self.max_prompt_chars,
            allowed_models=self.allowed_models,
            webhook_allow_private=self.webhook_allow_private,
        )


class ProducerSettings(FleetSettings):
    """The producer's settings: the shared ones plus how it waits."""

    poll_interval_s: float = Field(0.1, description="How often wait/--wait polls job states.")
    wait_timeout_s: float | None = Field(None, description="Give up waiting after this long.")
