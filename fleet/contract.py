"""The message contract both sides import: task and queue names, job/result schemas, S3 key layout.

Everything here is plain data and pydantic models: no Celery app, no torch. A service in another
language can follow ``docs/contract.md`` instead of importing this module.
"""

from __future__ import annotations

import hashlib
import json
import math
import re
import reprlib
import secrets
import uuid
from typing import Annotated, Any, Literal

from pydantic import (
    AfterValidator,
    BaseModel,
    ConfigDict,
    Field,
    ValidationError,
    ValidationInfo,
    field_validator,
    model_validator,
)
from pydantic_settings import NoDecode

from fleet.errors import JobValidationError

#: Version of the job and result JSON schemas below; bumped on any incompatible change.
SCHEMA_VERSION = 1
#: The Celery task name a job is sent to (``send_task(TASK_GENERATE, kwargs={"job": {...}})``).
TASK_GENERATE = "fleet.generate"
#: The queue jobs go to unless a model route says otherwise.
DEFAULT_QUEUE = "fleet"
#: Seeds are unsigned 64-bit integers; image ``i`` of a job uses ``(seed + i) % SEED_MODULUS``.
SEED_MODULUS = 2**64
#: Random seeds the producer picks stay below 2**53 so JavaScript clients read them exactly.
SAFE_RANDOM_SEED_LIMIT = 2**53
#: Schedulers a job may name; "default" keeps the one the model ships with.
SCHEDULERS: tuple[str, ...] = (
    "default",
    "ddim",
    "pndm",
    "euler",
    "euler_a",
    "dpmpp_2m",
    "lms",
    "heun",
    "unipc",
)
#: \Z, not $: "$" also matches before a final newline ("abc\n" would pass).
JOB_ID_PATTERN = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,127}\Z")
JOB_STATES = ("queued", "started", "succeeded", "failed", "cancelled", "unknown")
JobState = Literal["queued", "started", "succeeded", "failed", "cancelled", "unknown"]
#: Priorities: 0 (last) to 9 (first); jobs without one get DEFAULT_PRIORITY.
MIN_PRIORITY, MAX_PRIORITY, DEFAULT_PRIORITY = 0, 9, 5
#: Redis transport options every part of the fleet should share. kombu keeps one Redis list
#: per priority step — ``<queue>`` for step 0, ``<queue>\x06\x16<step>`` for steps 1-9 (kombu's
#: default separator, which must not change: control messages parse it); a sender's kombu picks
#: the list from the message's priority, and a message without one lands in step 0. So step 0
#: is the *default* fleet priority (5): a foreign sender that sets no priority waits in line with
#: the producer's jobs. The steps of higher priorities (6-9) are 1-4, of lower ones (4-0) 9-5;
#: workers read the steps in WORKER_READ_ORDER, first-in-first-out within a step, and serve the
#: queues they consume in turn (round robin) within a step.
PRIORITY_TRANSPORT_OPTIONS: dict[str, Any] = {
    "queue_order_strategy": "round_robin",
    "priority_steps": list(range(10)),
}
PRIORITY_SEP = "\x06\x16"


def celery_priority(priority: int) -> int:
    """The Celery/kombu priority step of a fleet priority: 5 (the default) is step 0, the step
    of a message sent without a priority; 9 is step 4 and 0 is step 5."""
    return (priority - DEFAULT_PRIORITY) % 10


#: The order in which workers read the priority steps: fleet priority 9 first, 0 last.
WORKER_READ_ORDER: list[int] = [celery_priority(p) for p in range(MAX_PRIORITY, -1, -1)]


def step_key(queue: str, step: int) -> str:
    """The Redis list of one priority step of a queue."""
    return f"{queue}{PRIORITY_SEP}{step}" if step else queue


#: kombu's Redis transport keeps each message a worker took and has not acknowledged here (a
#: hash: delivery tag -> [message, exchange, routing key]).
UNACKED_KEY = "unacked"


def queue_keys(queue: str) -> list[str]:
    """The Redis lists holding a queue's messages, in the order workers read them."""
    return [step_key(queue, step) for step in WORKER_READ_ORDER]


#: Redis key a producer sets to cancel a job; workers check it before and during generation.
CANCEL_KEY = "fleet:cancel:{job_id}"
#: Redis key each worker's main process refreshes with a TTL (JSON: node, host, pid, queues).
HEARTBEAT_KEY = "fleet:heartbeat:{node}"
#: Redis key where a worker publishes whether it can take jobs (JSON: state ready, starting or
#: broken, and the reason); `python -m worker check` reads it through the heartbeat.
WORKER_STATE_KEY = "fleet:worker-state:{node}"
#: Redis key where a worker's pool child publishes its device facts (JSON).
WORKER_INFO_KEY = "fleet:worker-info:{node}"
#: Redis key that reserves a job id (value: its queue), so the same id submitted twice makes
#: one job.
CLAIM_KEY = "fleet:job:{job_id}"
#: Redis list of failures the workers could not write to S3 while it was down (JSON entries,
#: newest first). Written to S3 once storage is back; keeps the newest UNSTORED_FAILURES_MAX.
UNSTORED_FAILURES_KEY = "fleet:failures:unstored"
UNSTORED_FAILURES_MAX = 10_000
#: Redis counter of the deliveries of one attempt of a task (a retry is a new attempt).
DELIVERIES_KEY = "fleet:deliveries:{task_id}:{retries}"
#: Redis list of queue entries no worker could run (not a Celery JSON message, or a body that
#: is not a job message), newest first, with the reason; `producer failed` shows them. Keeps
#: the newest DEAD_LETTERS_MAX.
DEAD_LETTERS_KEY = "fleet:dead-letters"
DEAD_LETTERS_MAX = 1_000
#: Redis key holding when storage first failed for a task (its retry window starts then).
OUTAGE_KEY = "fleet:storage-outage:{task_id}"


def new_job_id() -> str:
    return uuid.uuid4().hex


def random_seed() -> int:
    return secrets.randbelow(SAFE_RANDOM_SEED_LIMIT)


def derived_seed(job_id: str) -> int:
    """The seed of a job sent without one: the first 8 bytes of SHA-256(job id), mod 2**53.

    The same on every delivery, every host and every Python (``hash()`` is salted per process),
    so a redelivered job makes the same images; below 2**53 so JavaScript reads it exactly."""
    digest = hashlib.sha256(job_id.encode("utf-8", "surrogatepass")).digest()
    return int.from_bytes(digest[:8], "big") % SAFE_RANDOM_SEED_LIMIT


def seed_for(seed: int, index: int) -> int:
    """The seed of image ``index`` of a job whose first seed is ``seed``."""
    return (seed + index) % SEED_MODULUS


# ---------------------------------------------------------------------------------------------
# S3 key layout: jobs/<job_id>/image-<index>.png and jobs/<job_id>/manifest.json, plus
# failures/<job_id>.json for failed jobs, under an optional prefix.


def job_prefix(job_id: str, prefix: str = "") -> str:
    return f"{_norm_prefix(prefix)}jobs/{job_id}/"


def image_key(job_id: str, index: int, prefix: str = "") -> str:
    return f"{job_prefix(job_id, prefix)}image-{index:03d}.png"


def manifest_key(job_id: str, prefix: str = "") -> str:
    return f"{job_prefix(job_id, prefix)}manifest.json"


def failure_key(job_id: str, prefix: str = "") -> str:
    """A small index entry per failed job, so failures can be listed without a full scan."""
    return f"{_norm_prefix(prefix)}failures/{job_id}.json"


def failures_prefix(prefix: str = "") -> str:
    return f"{_norm_prefix(prefix)}failures/"


def _norm_prefix(prefix: str) -> str:
    prefix = prefix.strip("/")
    return f"{prefix}/" if prefix else ""


#: A tenant's name: what the gateway's API keys belong to, and the folder of its jobs in S3.
TENANT_PATTERN = re.compile(r"^[a-z0-9][a-z0-9_-]{0,62}\Z")


def tenant_prefix(prefix: str, tenant: str | None) -> str:
    """The key prefix of a tenant's jobs: ``<prefix>/tenants/<tenant>``; a job without a
    tenant (the Celery path, trusted services) keeps the fleet's prefix."""
    if not tenant:
        return prefix
    return f"{_norm_prefix(prefix)}tenants/{tenant}"


def raw_job_prefix(prefix: str, job: Any) -> str:
    """The prefix of a job message that may not be a valid JobSpec (a failure record of it):
    its tenant's where it names a valid one, else the fleet's."""
    tenant = job.get("tenant") if isinstance(job, dict) else None
    ok = isinstance(tenant, str) and TENANT_PATTERN.match(tenant)
    return tenant_prefix(prefix, tenant if ok else None)


def tenant_webhook_secret(secret: str, tenant: str) -> str:
    """The webhook signing secret of one tenant: HMAC-SHA256 of its name under the fleet's
    FLEET_WEBHOOK_SECRET. Each tenant gets its own (``producer keys secret``), so one tenant
    cannot sign callbacks that another would accept; workers derive it, nothing is stored."""
    import hmac

    return hmac.new(secret.encode(), f"fleet-tenant:{tenant}".encode(), "sha256").hexdigest()


# ---------------------------------------------------------------------------------------------
# Webhook targets: refused in private ranges (server-side request forgery) unless allowed.

#: Task and queue of webhook deliveries (a light queue, so no job waits behind them).
TASK_WEBHOOK = "fleet.webhook"
WEBHOOK_QUEUE = "fleet.webhooks"
#: Header with ``sha256=<hex HMAC-SHA256 of "<X-Fleet-Timestamp>." + the raw body, keyed with
#: the shared secret>`` (docs/webhooks.md).
WEBHOOK_SIGNATURE_HEADER = "X-Fleet-Signature"


def check_webhook_url(url: str, allow_private: bool = False) -> None:
    """Raise ValueError unless ``url`` is http(s) with a host whose every address is public."""
    import ipaddress
    import socket
    from urllib.parse import urlsplit

    parts = urlsplit(url)
    if parts.scheme not in ("http", "https") or not parts.hostname:
        raise ValueError("must be an http:// or https:// URL with a host")
    if allow_private:
        return
    try:
        infos = socket.getaddrinfo(parts.hostname, parts.port or 443, proto=socket.IPPROTO_TCP)
    except OSError as exc:
        raise ValueError(f"cannot resolve {parts.hostname}: {exc}") from None
    for info in infos:
        addr = ipaddress.ip_address(info[4][0])
        if not addr.is_global:
            raise ValueError(
                f"{parts.hostname} resolves to {addr}, a private, loopback or reserved address; "
                "allow it with FLEET_WEBHOOK_ALLOW_PRIVATE=true"
            )


# ---------------------------------------------------------------------------------------------
# Limits: the configurable bounds a job is checked against, on both sides.


class Limits(BaseModel):
    """Job limits, checked by the producer and again by the worker.

    Declared once, here: the settings inherit these fields (``FLEET_MAX_SIDE``, ...)."""

    model_config = ConfigDict(frozen=True)

    min_side: int = Field(64, description="Smallest width or height of an image, in pixels.")
    max_side: int = Field(2048, description="Largest width or height of an image, in pixels.")
    min_steps: int = Field(1, description="Fewest denoising steps a job may ask for.")
    max_steps: int = Field(150, description="Most denoising steps a job may ask for.")
    min_guidance: float = Field(0.0, description="Lowest guidance scale.")
    max_guidance: float = Field(30.0, description="Highest guidance scale.")
    max_images: int = Field(8, description="Most images per prompt.")
    max_prompt_chars: int = Field(2000, description="Longest prompt (and negative prompt).")
    #: NoDecode: the settings read "a,b" as a list (split in fleet.settings), not as JSON.
    allowed_models: Annotated[tuple[str, ...], NoDecode] = Field(
        (), description="Comma-separated; empty allows any model."
    )
    webhook_allow_private: bool = Field(
        False, description="Allow webhook targets in private/loopback ranges (SSRF guard off)."
    )

    @classmethod
    def of(cls, settings: Any) -> Limits:
        """The limits part of a settings object (which inherits these fields)."""
        return cls.model_validate({name: getattr(settings, name) for name in cls.model_fields})


def _limits(info: ValidationInfo) -> Limits:
    ctx = info.context or {}
    limits = ctx.get("limits")
    return limits if isinstance(limits, Limits) else Limits()


# ---------------------------------------------------------------------------------------------
# Quoting: an error message shows a value, never a megabyte of it.

#: Most characters of a value an error message quotes; longer ones show their start and length.
QUOTE_CHARS = 80
#: Most problems one JobValidationError lists (a job with 100,000 unknown keys has as many).
MAX_PROBLEMS = 20
#: Longest webhook URL, and longest host name in it (the DNS limit).
MAX_WEBHOOK_CHARS, MAX_HOST_CHARS = 2048, 253

_SHORT_REPR = reprlib.Repr()
_SHORT_REPR.maxstring = _SHORT_REPR.maxother = _SHORT_REPR.maxlong = QUOTE_CHARS
_SHORT_REPR.maxlevel = 2


class Quoted:
    """Stands in for a value too long to quote whole: its repr is what a message shows."""

    def __init__(self, text: str) -> None:
        self.text = text

    def __repr__(self) -> str:
        return self.text

    __str__ = __repr__


def quote_value(value: object) -> object:
    """``value`` as an error message may show it (``f"{field}={value!r}"``): itself when its
    repr is short, else a :class:`Quoted` with its first QUOTE_CHARS characters and its size,
    e.g. ``'aaaa…' (1,000,000 characters)``."""
    if isinstance(value, str):
        if len(value) <= QUOTE_CHARS:
            return value
        return Quoted(f"{value[:QUOTE_CHARS] + '…'!r} ({len(value):,} characters)")
    if value is None or isinstance(value, bool | float):
        return value
    if isinstance(value, int):
        if value.bit_length() <= 4 * QUOTE_CHARS:  # under about 96 digits
            return value
        return Quoted(f"<an integer of {value.bit_length():,} bits>")
    text = _SHORT_REPR.repr(value)
    if isinstance(value, list | tuple | dict | set | bytes | bytearray):
        unit = "byte" if isinstance(value, bytes | bytearray) else "item"
        text += f" ({len(value):,} {unit}{'' if len(value) == 1 else 's'})"
    return Quoted(text)


def quote_name(name: str) -> str:
    """A field name (or an unknown key, which can be of any length) as a message shows it,
    control characters escaped as repr escapes them (an unknown key holding a newline must not
    start a line of its own in a log)."""
    if not name.isprintable():
        name = repr(name)[1:-1]
    if len(name) <= QUOTE_CHARS:
        return name
    return f"{name[:QUOTE_CHARS]}… ({len(name):,} characters)"


_SURROGATE = re.compile("[\ud800-\udfff]")


def _plain_text(value: str) -> str:
    """Refuse what no model or store takes as text: NUL characters, and lone surrogates (not
    Unicode text, so not encodable as UTF-8; the tokenizer fails on them)."""
    nul = value.find("\x00")
    if nul >= 0:
        raise ValueError(f"contains a NUL character (\\x00) at character {nul + 1}; remove it")
    bad = _SURROGATE.search(value)
    if bad is not None:
        raise ValueError(
            f"contains a lone surrogate ({bad.group()!r}) at character {bad.start() + 1}, "
            "which is not Unicode text; send the text as valid UTF-8 (a surrogate often "
            "comes from decoding bytes with errors='surrogateescape')"
        )
    return value


#: A string field of a job: no NUL characters, no lone surrogates.
Text = Annotated[str, AfterValidator(_plain_text)]


# ---------------------------------------------------------------------------------------------
# The job.


class JobSpec(BaseModel):
    """One prompt and its images: the unit the fleet queues, generates, stores and reports."""

    model_config = ConfigDict(extra="forbid")

    schema_version: int = SCHEMA_VERSION
    job_id: Text = Field(default_factory=new_job_id)
    prompt: Text
    negative_prompt: Text = ""
    width: int = 512
    height: int = 512
    steps: int = 30
    guidance: float = 7.5
    #: Left out: derived from the job id (derived_seed), so every delivery uses the same one.
    seed: int = 0
    images: int = 1
    #: None: the model the worker serves by default.
    model: Text | None = None
    scheduler: Text = "default"
    #: http(s) URL that receives the result JSON when the job ends (signed, see docs/webhooks.md).
    webhook: Text | None = None
    #: Unix time the producer enqueued the job (for queue-wait metrics); not part of the recipe.
    submitted_at: float | None = None
    #: Where the seeds' noise is drawn. None or "cpu": on the CPU, the same initial latents on
    #: every kind of worker (pinned, balanced, offloading). "cuda": on the worker's GPU, as
    #: pinned CUDA workers drew it before seeding moved to the CPU (replays of their recipes).
    generator_device: Literal["cpu", "cuda"] | None = None
    #: The gateway tenant that sent the job (set by the gateway from the caller's API key, never
    #: by the caller): its images and manifest go under ``tenants/<tenant>/`` and its webhooks
    #: are signed with the tenant's own secret. None: a trusted service on the Celery path.
    tenant: Text | None = None

    @model_validator(mode="before")
    @classmethod
    def _identity(cls, data: Any) -> Any:
        """A job without an id gets a new one; a job without a seed, the one its id derives."""
        if isinstance(data, dict) and ("job_id" not in data or "seed" not in data):
            data = dict(data)
            data.setdefault("job_id", new_job_id())
            if "seed" not in data and isinstance(data["job_id"], str):
                data["seed"] = derived_seed(data["job_id"])
        return data

    @field_validator("schema_version", "width", "height", "steps", "images", "guidance",
                     "submitted_at", mode="before")  # fmt: skip
    @classmethod
    def _json_number(cls, v: Any) -> Any:
        """A number field takes a number: not a boolean (pydantic reads true as 1) nor a
        string ("512"); only the seed may come as a decimal string."""
        if isinstance(v, bool):
            raise ValueError("must be a number, not a boolean")
        if isinstance(v, str | bytes | bytearray):
            raise ValueError("must be a number, not a string")
        return v

    @field_validator("schema_version")
    @classmethod
    def _schema(cls, v: int) -> int:
        if v != SCHEMA_VERSION:
            raise ValueError(f"this fleet speaks schema_version {SCHEMA_VERSION}")
        return v

    @field_validator("job_id")
    @classmethod
    def _job_id(cls, v: str) -> str:
        if not JOB_ID_PATTERN.match(v):
            raise ValueError(
                "job ids are 1-128 characters of letters, digits, '.', '_' and '-', "
                "starting with a letter or digit"
            )
        return v

    @field_validator("tenant")
    @classmethod
    def _tenant(cls, v: str | None) -> str | None:
        if v is not None and not TENANT_PATTERN.match(v):
            raise ValueError(
                "tenant names are 1-63 characters of lower-case letters, digits, '_' and '-', "
                "starting with a letter or digit"
            )
        return v

    @field_validator("prompt")
    @classmethod
    def _prompt(cls, v: str, info: ValidationInfo) -> str:
        limit = _limits(info).max_prompt_chars
        if not v.strip():
            raise ValueError("the prompt must not be empty")
        if len(v) > limit:
            raise ValueError(f"the prompt has {len(v):,} characters; at most {limit:,} are allowed")
        return v

    @field_validator("negative_prompt")
    @classmethod
    def _negative(cls, v: str, info: ValidationInfo) -> str:
        limit = _limits(info).max_prompt_chars
        if len(v) > limit:
            raise ValueError(f"it has {len(v):,} characters; at most {limit:,} are allowed")
        return v

    @field_validator("width", "height")
    @classmethod
    def _side(cls, v: int, info: ValidationInfo) -> int:
        lim = _limits(info)
        if v % 8 or not lim.min_side <= v <= lim.max_side:
            raise ValueError(f"must be a multiple of 8 from {lim.min_side} to {lim.max_side}")
        return v

    @field_validator("steps")
    @classmethod
    def _steps(cls, v: int, info: ValidationInfo) -> int:
        lim = _limits(info)
        if not lim.min_steps <= v <= lim.max_steps:
            raise ValueError(f"must be from {lim.min_steps} to {lim.max_steps}")
        return v

    @field_validator("guidance")
    @classmethod
    def _guidance(cls, v: float, info: ValidationInfo) -> float:
        lim = _limits(info)
        if not lim.min_guidance <= v <= lim.max_guidance:
            raise ValueError(f"must be from {lim.min_guidance} to {lim.max_guidance}")
        return v

    @field_validator("seed", mode="before")
    @classmethod
    def _seed(cls, v: Any) -> Any:
        # JSON clients lose precision above 2**53, so a seed may come as a decimal string.
        if isinstance(v, bool):
            raise ValueError("must be an integer, not a boolean")
        if isinstance(v, str):
            text = v.strip()
            if not (text.isascii() and text.isdigit()):  # "١٢" and "²" are digits to Python
                raise ValueError("must be an unsigned 64-bit integer (digits 0-9 only)")
            v = int(text)
        return v

    @field_validator("seed")
    @classmethod
    def _seed_range(cls, v: int) -> int:
        # After the conversion: -1.0 (or a decimal) becomes the integer -1 only then.
        if not 0 <= v < SEED_MODULUS:
            raise ValueError(f"must be an unsigned 64-bit integer, 0 to {SEED_MODULUS - 1}")
        return v

    @field_validator("images")
    @classmethod
    def _images(cls, v: int, info: ValidationInfo) -> int:
        limit = _limits(info).max_images
        if not 1 <= v <= limit:
            raise ValueError(f"images per prompt must be from 1 to {limit}")
        return v

    @field_validator("model")
    @classmethod
    def _model(cls, v: str | None, info: ValidationInfo) -> str | None:
        allowed = _limits(info).allowed_models
        if v is not None:
            if not v.strip():
                raise ValueError("must not be empty (leave it out for the worker's default model)")
            if allowed and v not in allowed:
                raise ValueError(f"model not allowed here; allowed: {', '.join(allowed)}")
        return v

    @field_validator("scheduler")
    @classmethod
    def _scheduler(cls, v: str) -> str:
        if v not in SCHEDULERS:
            raise ValueError(f"unknown scheduler; choose one of: {', '.join(SCHEDULERS)}")
        return v

    @field_validator("webhook")
    @classmethod
    def _webhook(cls, v: str | None, info: ValidationInfo) -> str | None:
        if v is None:
            return v
        _check_webhook_size(v)
        # Without limits (a JobSpec built in Python) only the form is checked; the address
        # check runs in validate_job, which the producer and the worker always call.
        allow = _limits(info).webhook_allow_private if info.context else True
        check_webhook_url(v, allow_private=allow)
        return v

    @field_validator("submitted_at")
    @classmethod
    def _submitted_at(cls, v: float | None) -> float | None:
        if v is not None and not math.isfinite(v):
            raise ValueError("must be a finite Unix time in seconds")
        return v

    def seeds(self) -> list[int]:
        return [seed_for(self.seed, i) for i in range(self.images)]

    def recipe(self, model: str, revision: str | None) -> dict[str, Any]:
        """The deterministic fields that make an image reproducible (PNG text chunk)."""
        return {
            "prompt": self.prompt,
            "negative_prompt": self.negative_prompt,
            "width": self.width,
            "height": self.height,
            "steps": self.steps,
            "guidance": self.guidance,
            "scheduler": self.scheduler,
            "model": model,
            "revision": revision,
            "generator_device": self.generator_device or "cpu",
        }


def _check_webhook_size(url: str) -> None:
    """Bound a webhook URL and its host before they are parsed, resolved or quoted."""
    if len(url) > MAX_WEBHOOK_CHARS:
        raise ValueError(
            f"the URL has {len(url):,} characters; at most {MAX_WEBHOOK_CHARS:,} are allowed"
        )
    from urllib.parse import urlsplit

    host = urlsplit(url).hostname or ""
    if len(host) > MAX_HOST_CHARS:
        raise ValueError(
            f"the host has {len(host):,} characters; at most {MAX_HOST_CHARS} are allowed"
        )


def validate_job(data: Any, limits: Limits | None = None) -> JobSpec:
    """Validate a job (a dict from JSON or a JobSpec) against ``limits``.

    Raises JobValidationError naming each bad field, its value (at most QUOTE_CHARS characters
    of it, and its length) and what is allowed; it chains no pydantic error (whose text and
    ``errors()`` hold whole inputs).
    """
    if isinstance(data, JobSpec):
        data = data.model_dump()
    if not isinstance(data, dict):
        raise JobValidationError(
            [("job", quote_value(data), "must be a JSON object (see docs/contract.md)")]
        )
    try:
        return JobSpec.model_validate(data, context={"limits": limits or Limits()})
    except ValidationError as exc:
        problems = job_problems(exc)
    raise JobValidationError(problems)  # outside the except: no pydantic error as its context


def job_problems(exc: ValidationError) -> list[tuple[str, object, str]]:
    """``(field, value, message)`` of each error of a job, values and names quoted short, at
    most MAX_PROBLEMS of them (then one saying how many there are)."""
    errors = exc.errors(include_url=False, include_context=False)
    problems: list[tuple[str, object, str]] = []
    for err in errors[:MAX_PROBLEMS]:
        field = quote_name(".".join(str(p) for p in err["loc"]) or "job")
        msg = str(err["msg"]).removeprefix("Value error, ")
        if err["type"] == "extra_forbidden":
            msg = "unknown field; see docs/contract.md for the job schema"
        value = None if err["type"] == "missing" else quote_value(err.get("input"))
        problems.append((field, value, msg))
    if len(errors) > MAX_PROBLEMS:
        more = f"only the first {MAX_PROBLEMS} are listed; fix those and try again"
        problems.append(("job", Quoted(f"{len(errors):,} problems"), more))
    return problems


def time_limits(spec: JobSpec, base_s: float, per_mpx_step_s: float) -> tuple[float, float]:
    """(soft, hard) time limits for a job, scaled by its size, steps and image count.

    The soft limit stops a stuck generation with a recorded failure; the hard limit, a bit later,
    replaces a hung pool child.
    """
    work = spec.width * spec.height / 1e6 * spec.steps * spec.images
    soft = base_s + per_mpx_step_s * work
    return soft, soft * 1.5 + 30


#: The fields that make two jobs the same job: one id, one recipe.
RECIPE_FIELDS = ("prompt", "negative_prompt", "width", "height", "steps", "guidance", "seed",
                 "images", "model", "scheduler", "generator_device")  # fmt: skip

#: Fields added to schema 1 after its first release: left out of a message while unset, so a
#: worker from before them (which refuses unknown fields) still takes the job.
LATER_FIELDS = ("generator_device", "tenant")


def recorded_job(manifest: dict[str, Any]) -> dict[str, Any]:
    """A manifest's job as it ran, to submit again (``producer replay``, ``retry``). A manifest
    from before ``generator_device`` drew its noise where its worker seeded then: on the GPU
    of a pinned CUDA worker without offloading, else on the CPU."""
    job = dict(manifest.get("job") or {})
    if job and "generator_device" not in job:
        replay, worker = manifest.get("replay"), manifest.get("worker")
        replay = replay if isinstance(replay, dict) else {}
        worker = worker if isinstance(worker, dict) else {}
        seeded = replay.get("generator_device") or worker.get("generator_device")
        if seeded is None:
            pinned_gpu = (
                str(worker.get("device", "")).startswith("cuda")
                and worker.get("placement", "pinned") == "pinned"
                and worker.get("offload", "none") == "none"
            )
            seeded = "cuda" if pinned_gpu else "cpu"
        job["generator_device"] = "cuda" if str(seeded).startswith("cuda") else "cpu"
    return job


def job_payload(spec: JobSpec) -> dict[str, Any]:
    """The job as a message carries it (JSON), without the later fields that are unset."""
    data = spec.model_dump(mode="json")
    for name in LATER_FIELDS:
        if data.get(name) is None:
            data.pop(name, None)
    return data


def claim_value(queue: str, spec: JobSpec) -> str:
    """What the claim of a job id holds: its queue and its recipe (to tell a resubmission of
    the same job from another job under the same id)."""
    return json.dumps({"queue": queue, "job": spec.model_dump(mode="json", include=set(
        RECIPE_FIELDS))}, sort_keys=True)  # fmt: skip


def parse_claim(raw: bytes | str | None) -> tuple[str | None, dict[str, Any] | None]:
    """(queue, recipe) of a claim; a bare queue name (older claims) has no recipe."""
    if raw is None:
        return None, None
    text = raw.decode() if isinstance(raw, bytes) else raw
    try:
        value = json.loads(text)
    except ValueError:
        return text, None
    if not isinstance(value, dict):
        return text, None
    job = value.get("job")
    return value.get("queue"), job if isinstance(job, dict) else None


def recipe_differences(before: dict[str, Any], spec: JobSpec) -> list[str]:
    """The recipe fields in which ``spec`` differs from a recipe claimed before."""
    now = spec.model_dump(mode="json", include=set(RECIPE_FIELDS))
    return [f"{k}: {before.get(k)!r} then, {now[k]!r} now" for k in RECIPE_FIELDS
            if before.get(k) != now[k]]  # fmt: skip


def queue_for(model: str | None, routes: dict[str, str], default: str = DEFAULT_QUEUE) -> str:
    """The queue a job for ``model`` goes to: its route if one is configured, else ``default``."""
    if model is not None and model in routes:
        return routes[model]
    return default


# ---------------------------------------------------------------------------------------------
# Model rules: what a worker's model can honour. The worker derives them from its loaded
# pipeline (worker.engine.rules) and publishes them in its info (WORKER_INFO_KEY, "rules");
# the producer refuses a job that breaks them before enqueueing it, the worker again before
# generating. A field the model cannot honour is refused, naming it; never dropped or changed.

Guidance = Literal["classifier-free", "distilled", "none"]


class ModelRules(BaseModel):
    """The rules of one model (plain data: the producer reads them from Redis as JSON)."""

    model_config = ConfigDict(frozen=True, extra="ignore")

    pipeline: str
    #: The contract's scheduler names this model takes ("default" always).
    schedulers: tuple[str, ...] = SCHEDULERS
    scheduler_class: str | None = None
    #: A flow-matching model (SD3, Flux): the contract's DDPM-family schedulers do not fit it.
    flow_matching: bool = False
    #: Width and height must be multiples of this (the VAE's downscale times the latent patch).
    side_multiple: int = 8
    #: The largest width or height the model's position embedding covers; None: no such bound.
    max_side: int | None = None
    #: classifier-free: ``guidance`` weighs a negative (or empty) prompt against the prompt;
    #: distilled: it is an input of the model (Flux); none: the model takes no guidance.
    guidance: Guidance = "classifier-free"
    #: Whether a negative prompt changes the images (classifier-free guidance only).
    negative_prompt: bool = True
    #: Text tokens the worker encodes (the pipeline's ``max_sequence_length``); informative.
    max_sequence_length: int | None = None

    def problems(self, spec: JobSpec) -> list[tuple[str, object, str]]:
        """``(field, value, message)`` for each field of ``spec`` this model cannot honour."""
        out: list[tuple[str, object, str]] = []
        if spec.scheduler not in self.schedulers:
            why = (
                f"{self.pipeline} denoises by flow matching ({self.scheduler_class}); the "
                "contract's other schedulers are for noise-prediction models"
                if self.flow_matching
                else f"{self.pipeline}'s scheduler {self.scheduler_class} cannot be swapped for it"
            )
            out.append(("scheduler", spec.scheduler,
                        f"{why}: choose one of: {', '.join(self.schedulers)}"))  # fmt: skip
        m = self.side_multiple
        for name in ("width", "height"):
            value = getattr(spec, name)
            if value % m:
                lower = value - value % m
                hint = f"e.g. {lower} or {lower + m}" if lower else f"e.g. {m}"
                out.append((name, value, f"{self.pipeline} needs a multiple of {m} ({hint}); "
                                         "it would resize the image otherwise"))  # fmt: skip
            elif self.max_side is not None and value > self.max_side:
                out.append((name, value, f"{self.pipeline} takes at most {self.max_side} (its "
                                         "position embedding ends there)"))  # fmt: skip
        if spec.negative_prompt and not self.negative_prompt:
            kind = "distilled (an input of the model)" if self.guidance == "distilled" else "none"
            out.append(("negative_prompt", quote_value(spec.negative_prompt),
                        f"{self.pipeline} would ignore it: its guidance is {kind}, not "
                        "classifier-free; leave negative_prompt empty"))  # fmt: skip
        if self.guidance == "none" and spec.guidance > 1:
            out.append(("guidance", spec.guidance,
                        f"{self.pipeline} takes no guidance (its model embeds none), so it would "
                        "ignore it: send guidance 0 or 1"))  # fmt: skip
        return out

    def check(self, spec: JobSpec) -> None:
        """Raise JobValidationError naming each field of ``spec`` this model cannot honour."""
        problems = self.problems(spec)
        if problems:
            raise JobValidationError(problems)


# ---------------------------------------------------------------------------------------------
# The result.


class ImageRecord(BaseModel):
    index: int
    key: str
    seed: int
    width: int
    height: int
    url: str | None = None
    #: Whether the pipeline's safety checker flagged the image (it is then black); None when
    #: the pipeline has no checker.
    nsfw: bool | None = None


class JobResult(BaseModel):
    """What a finished job returns (Celery result) and what its manifest records."""

    model_config = ConfigDict(extra="allow")

    schema_version: int = SCHEMA_VERSION
    job_id: str
    status: Literal["succeeded", "failed", "cancelled"]
    #: True when the job came without a seed and used the one its id derives (derived_seed).
    seed_derived: bool | None = None
    bucket: str | None = None
    images: list[ImageRecord] = Field(default_factory=list)
    manifest_key: str | None = None
    error: str | None = None
    error_type: str | None = None
    timings: dict[str, float] = Field(default_factory=dict)
    worker: dict[str, Any] = Field(default_factory=dict)
    #: Whether a text encoder read less than the whole prompt (CLIP reads 77 tokens), and the
    #: token counts per tokenizer: ``{"truncated": bool, "tokenizers": {name: {...}}}``.
    prompt_truncated: bool | None = None
    prompt_tokens: dict[str, Any] | None = None
    #: With a safety checker: its policy and the images it flagged
    #: (``{"checker": class, "policy": "flag"|"drop", "flagged": [i], "dropped": [i]}``).
    safety: dict[str, Any] | None = None


class JobStatus(BaseModel):
    """What ``status`` reports: the state, and the result once there is one."""

    job_id: str
    state: JobState
    result: JobResult | None = None
    detail: str | None = None
    #: Denoising progress while running (from the worker's PROGRESS updates).
    step: int | None = None
    steps: int | None = None
    #: While queued: jobs a worker takes before this one (None: not counted, e.g. deep queue).
    ahead: int | None = None

    @property
    def done(self) -> bool:
        return self.state in ("succeeded", "failed", "cancelled")
