"""One root error type for diffusion-fleet, with subclasses that say whether a retry can help."""

from __future__ import annotations


class FleetError(Exception):
    """Root of every error the fleet raises on purpose."""

    #: Whether running the same job again can succeed (dramatiq's idea of retryable errors).
    retryable: bool = False


class ConfigurationError(FleetError):
    """A setting is missing or wrong; fix the environment and restart."""


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
    """A job id was reused for a different job."""


class StorageError(FleetError):
    """The S3-compatible store failed; retrying later can help."""

    retryable = True


class StorageUnavailable(FleetError):
    """Storage stayed unreachable longer than the worker's retry window; the job failed."""


class ModelLoadError(FleetError):
    """The worker could not load its model (wrong id, missing files, no network to the hub)."""


class GenerationError(FleetError):
    """The pipeline failed while generating a job's images."""


class TooManyDeliveries(FleetError):
    """The job was delivered more times than allowed: its worker died each time it ran it."""


class JobTimedOut(FleetError):
    """The job ran past its soft time limit and was stopped."""


class DeviceOutOfMemory(FleetError):
    """The device ran out of memory for this pipeline call (CUDA OOM)."""


class JobCancelled(FleetError):
    """The job was cancelled (``producer cancel``); raised inside the worker to stop it."""


class JobFailed(FleetError):
    """Raised by ``JobHandle.wait(raise_on_failure=True)`` when a job ended as a failure."""

    def __init__(self, job_id: str, reason: str) -> None:
        self.job_id = job_id
        self.reason = reason
        super().__init__(f"job {job_id} failed: {reason}")
