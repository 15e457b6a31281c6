"""The gateway's errors, in OpenAI's shape: ``{"error": {"message", "type", "param", "code"}}``.

Every answer that is not a success carries ``x-should-retry``: ``true`` only where sending the
same request again can help and cannot make a second job (the openai SDK obeys it, and by
default retries 408, 409, 429 and 5xx twice)."""

from __future__ import annotations

from typing import Any

from fastapi.responses import JSONResponse

from fleet.errors import JobValidationError


class ApiError(Exception):
    def __init__(
        self,
        status: int,
        message: str,
        type_: str = "invalid_request_error",
        param: str | None = None,
        code: str | None = None,
        retry: bool = False,
        headers: dict[str, str] | None = None,
    ) -> None:
        super().__init__(message)
        self.status = status
        self.message = message
        self.type = type_
        self.param = param
        self.code = code
        self.retry = retry
        self.headers = headers or {}

    def response(self) -> JSONResponse:
        body = {"error": {"message": self.message, "type": self.type, "param": self.param,
                          "code": self.code}}  # fmt: skip
        headers = {"x-should-retry": "true" if self.retry else "false", **self.headers}
        return JSONResponse(body, status_code=self.status, headers=headers)


def invalid(exc: JobValidationError, status: int = 400, prefix: str = "") -> ApiError:
    """A job the fleet's validation refused: the message names each field."""
    first = exc.problems[0][0] if exc.problems else None
    return ApiError(status, str(exc), param=f"{prefix}{first}" if first else None,
                    code="invalid_value")  # fmt: skip


def unauthorized(
    message: str = "a valid API key is needed: Authorization: Bearer <key>",
) -> ApiError:
    return ApiError(401, message, "authentication_error", code="invalid_api_key",
                    headers={"WWW-Authenticate": "Bearer"})  # fmt: skip


def not_found(job_id: str) -> ApiError:
    return ApiError(404, f"no job {job_id} of yours", "not_found_error", param="job_id",
                    code="job_not_found")  # fmt: skip


def from_validation_errors(errors: list[dict[str, Any]], status: int) -> ApiError:
    """FastAPI's request validation errors as one message naming each field."""
    parts, first = [], None
    for err in errors:
        loc = [str(x) for x in err.get("loc", ()) if x != "body"]
        name = ".".join(loc) or "body"
        first = first or name
        parts.append(f"{name}: {err.get('msg')}")
    return ApiError(status, "; ".join(parts) or "the request body is not valid", param=first,
                    code="invalid_value")  # fmt: skip
