"""OpenAI's images API, as the fleet speaks it: the request body, its mapping to a job, and the
response. The official ``openai`` SDK sends our own fields (negative_prompt, steps, ...) in
``extra_body``; they arrive as top-level fields of the same body."""

from __future__ import annotations

import re
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator

from fleet.errors import JobValidationError

_SIZE = re.compile(r"^(\d{1,5})x(\d{1,5})\Z")


class ImagesRequest(BaseModel):
    """``POST /v1/images/generations``. OpenAI's fields, then the fleet's. ``quality`` and
    ``style`` are taken and ignored (a diffusion model has no such knobs); any other field
    is refused with its name, so a typo never passes silently."""

    model_config = ConfigDict(extra="forbid")

    prompt: str
    model: str | None = Field(None, description="a model the fleet serves (GET /v1/models)")
    n: int = Field(1, description="images to make (the job's `images`)")
    size: str | None = Field("512x512", description='"WIDTHxHEIGHT", e.g. "512x512"')
    response_format: Literal["url", "b64_json"] = "url"
    user: str | None = Field(None, description="your end user's id; logged, not stored")
    quality: str | None = None
    style: str | None = None
    output_format: Literal["png"] | None = None
    # the fleet's own, through the SDK's extra_body
    negative_prompt: str | None = None
    steps: int | None = None
    guidance: float | None = None
    seed: int | str | None = None
    scheduler: str | None = None
    priority: int | None = Field(None, description="0 (last) to 9 (first), within your jobs")

    @field_validator("size")
    @classmethod
    def _size(cls, v: str | None) -> str | None:
        if v is None or v == "auto":
            return None
        if not _SIZE.match(v):
            raise ValueError('give "WIDTHxHEIGHT", e.g. "512x512"')
        return v

    def job(self) -> dict[str, Any]:
        """The fleet job this request asks for (validated by the fleet's rules next)."""
        job: dict[str, Any] = {"prompt": self.prompt, "images": self.n}
        if self.size is not None:
            w, h = (int(x) for x in self.size.split("x"))
            job.update(width=w, height=h)
        for name in ("model", "negative_prompt", "steps", "guidance", "seed", "scheduler"):
            value = getattr(self, name)
            if value is not None:
                job[name] = value
        return job


def openai_param(exc: JobValidationError) -> str | None:
    """The request field a job field came from (images is n; width and height are size)."""
    name = exc.problems[0][0] if exc.problems else None
    return {"images": "n", "width": "size", "height": "size"}.get(name or "", name)


def images_response(created: int, data: list[dict[str, Any]], job_id: str) -> dict[str, Any]:
    """OpenAI's response shape; ``fleet_job_id`` says which job made the images."""
    return {"created": created, "data": data, "fleet_job_id": job_id}
