"""One root error type for diffusion-fleet; each subclass declares its disposition.

The disposition says what a failure means, and the worker's retry policy
(``worker.policies.RETRY_RULES``) reads it instead of deciding case by case:

- ``job``: this job is bad or cannot be done here; it fails alone, the worker goes on.
- ``worker``: this worker is broken (its model cannot load, its device is gone); the job is not
  to blame.
- ``transient``: try again later (storage or a webhook receiver briefly away); retried with
  backoff within a bounded window.
"""

from __future__ import annotations

from typing import Literal

Disposition = Literal["job", "worker", "transient"]
DISPOSITIONS: tuple[Disposition, ...] = ("job", "worker", "transient")


class FleetError(Exception):
    """Root of every error the fleet raises on purpose."""

    disposition: Disposition = "job"

    @property
    def retryable(self) -> bool:
        """Whether running the same job again later can succeed."""
        return self.disposition == "transient"


class ConfigurationError(FleetError):
    """A setting is missing or wrong; fix the environment and restart."""

    disposition = "worker"


class JobValidationError(FleetError, ValueError):
    """A job breaks a rule of the contract; it is refused and never retried.

    ``problems`` lists ``(field, value, message)`` triples so callers can show each one.
    """

    def __init__(self, problems: list[tuple[str, object, str]] | str) -> None:
        if isinstance(problems, str):
            # Rebuilt from a serialized exception (Celery sends only the message back).
            self.problems: list[tuple[str, object, str]] = []
            super().__init__(problems)
            return
        self.problems = problems
        super().__init__(self.format(problems))

    @staticmethod
    def format(problems: list[tuple[str, object, str]]) -> str:
        lines = [f"{field}={value!r}: {message}" for field, value, message in problems]
        return "invalid job: " + "; ".join(lines)


class DuplicateJobError(FleetError):
    """A job id was submitted again with another recipe; the message names what differs."""


class StorageError(FleetError):
    """The S3-compatible store failed; retrying later can help."""

    disposition = "transient"


class StorageRefused(FleetError):
    """The store answered, and refused: wrong credentials, a missing bucket, a denied action or
    a skewed clock. Retrying does not help; this worker cannot store anything until it is
    fixed, so it takes no job (the message says what to fix)."""

    disposition = "worker"


class BrokerUnavailable(FleetError):
    """Redis cannot be reached (down, wrong host or port); trying again later can help."""

    disposition = "transient"


class BrokerRefused(FleetError):
    """Redis refuses this client (no password, or a wrong one): fix FLEET_REDIS_URL."""

    disposition = "worker"


class StorageUnavailable(FleetError):
    """Storage stayed unreachable longer than the worker's retry window; the job failed."""


class ModelLoadError(FleetError):
    """The worker could not load its model (wrong id, missing files, no network to the hub)."""

    disposition = "worker"


class GenerationError(FleetError):
    """The pipeline failed while generating a job's images."""


class HostOutOfMemory(GenerationError):
    """The host (CPU RAM, the container's memory limit or the process's address-space limit)
    could not give this pipeline call the memory it asked for; the worker's self-test still
    passes. A job error: it fails alone, the message says to ask for a smaller size or fewer
    images, or to give the worker more memory; the worker goes on with the next job."""


class PipelineBroken(FleetError):
    """The pipeline or its device fails even on the worker's own self-test (a CUDA error that
    persists, a model whose parts do not fit): no job can succeed here, so the worker stops
    taking jobs and the job goes back to the queue for a healthy worker."""

    disposition = "worker"


class SchemaTooNew(FleetError):
    """The job speaks a newer ``schema_version`` than this worker (a fleet mid-upgrade): the
    message goes back to its queue for a worker that knows it."""


class BrokerMisconfigured(FleetError):
    """Redis is set up to lose the fleet's keys: an eviction policy other than ``noeviction``,
    or no persistence. Fix the Redis configuration, or accept it with FLEET_REDIS_CHECK=warn."""

    disposition = "worker"


class TooManyDeliveries(FleetError):
    """The job was delivered more times than allowed: its worker died each time it ran it."""


class JobExpired(FleetError):
    """The job was not started before its deadline (``producer submit --deadline``)."""


class ImageFlagged(FleetError):
    """The pipeline's safety checker flagged an image and FLEET_SAFETY_POLICY=fail."""


class JobTimedOut(FleetError):
    """The job ran past its soft time limit and was stopped."""


class DeviceOutOfMemory(FleetError):
    """The device ran out of memory for this pipeline call (CUDA OOM).

    A job error: it is too big for this worker; the OOM policy may send it to a bigger one."""


class JobCancelled(FleetError):
    """The job was cancelled (``producer cancel``); raised inside the worker to stop it."""


class WebhookError(FleetError):
    """The webhook receiver did not answer 2xx; the delivery is retried with backoff."""

    disposition = "transient"


class WebhookRefused(FleetError):
    """The webhook delivery is refused and not retried: the host has a private address, or the
    receiver answered a redirect (never followed); the same URL would fail again."""


class JobFailed(FleetError):
    """Raised by ``JobHandle.wait(raise_on_failure=True)`` when a job ended as a failure."""

    def __init__(self, job_id: str, reason: str) -> None:
        self.job_id = job_id
        self.reason = reason
        super().__init__(f"job {job_id} failed: {reason}")
