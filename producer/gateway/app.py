"""The HTTP gateway: `python -m producer serve` runs ``create_app`` under uvicorn.

Routes only: what each endpoint does is in ``producer.gateway.service``. Every ``/v1`` route
needs ``Authorization: Bearer <API key>``; errors come in OpenAI's shape
(``producer.gateway.errors``)."""

import base64
import json
import logging
import time
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Annotated, Any

import redis
from fastapi import Body, Depends, FastAPI, Header, Query, Request
from fastapi.exceptions import RequestValidationError
from fastapi.openapi.docs import get_swagger_ui_html
from fastapi.responses import HTMLResponse, JSONResponse, Response, StreamingResponse
from fastapi.staticfiles import StaticFiles
from prometheus_client import (
    CONTENT_TYPE_LATEST,
    REGISTRY,
    CollectorRegistry,
    Counter,
    Histogram,
    generate_latest,
)
from prometheus_client.multiprocess import MultiProcessCollector
from pydantic import ValidationError
from starlette.concurrency import run_in_threadpool
from starlette.datastructures import Headers
from starlette.exceptions import HTTPException as StarletteHTTPException
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from fleet import contract
from fleet.brokers import masked
from fleet.errors import BrokerUnavailable, FleetError, JobValidationError, StorageError
from fleet.prometheus_dir import multiprocess_mode
from fleet.settings import GatewaySettings
from producer.gateway.errors import ApiError, from_validation_errors, invalid, unauthorized
from producer.gateway.openai_api import ImagesRequest, images_response, openai_param
from producer.gateway.service import Gateway
from producer.gateway.tenants import Tenant

log = logging.getLogger("producer.gateway")
STATIC = Path(__file__).parent / "static"

REQUESTS = Counter("fleet_gateway_requests_total", "HTTP requests answered",
                   ["route", "status"])  # fmt: skip
LATENCY = Histogram("fleet_gateway_request_seconds", "Time to answer a request", ["route"],
                    buckets=(0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5,
                             10, 30, 60, 120, 300))  # fmt: skip
JOBS = Counter("fleet_gateway_jobs_total", "Jobs put in line, by tenant", ["tenant"])


def scrape_registry() -> CollectorRegistry:
    """What /metrics serves: this process's registry, or, in multiprocess mode (``serve
    --workers N``), the sum over the files every gateway process writes."""
    if not multiprocess_mode():
        return REGISTRY
    registry = CollectorRegistry()
    MultiProcessCollector(registry)
    return registry


def _bearer(authorization: str | None) -> str | None:
    if not authorization:
        return None
    scheme, _, key = authorization.partition(" ")
    return key.strip() if scheme.lower() == "bearer" and key.strip() else None


async def tenant_of(
    request: Request, authorization: Annotated[str | None, Header()] = None
) -> Tenant:
    """The tenant of the request's API key (``Authorization: Bearer <key>``); 401 without a
    valid one. The log names the key's id, never the key."""
    key = _bearer(authorization)
    if key is None:
        raise unauthorized()
    gw: Gateway = request.app.state.gateway
    found = await gw.tenants.authenticate(key)
    if found is None:
        raise unauthorized("the API key is not valid (unknown or revoked)")
    tenant, key_id = found
    request.state.who = f"tenant={tenant.name} key={key_id}"
    return tenant


Caller = Annotated[Tenant, Depends(tenant_of)]


class Observe:
    """Count, time and log every request: one log line each, naming the tenant and the key's
    id (never the key). Plain ASGI: Starlette's BaseHTTPMiddleware costs about 1.6 ms of CPU a
    request."""

    def __init__(self, app: ASGIApp) -> None:
        self.app = app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        started = time.perf_counter()
        status = 500

        async def sent(message: Message) -> None:
            nonlocal status
            if message["type"] == "http.response.start":
                status = int(message["status"])
            await send(message)

        try:
            await self.app(scope, receive, sent)
        finally:
            elapsed = time.perf_counter() - started
            path = getattr(scope.get("route"), "path", "unmatched")
            REQUESTS.labels(path, str(status)).inc()
            LATENCY.labels(path).observe(elapsed)
            who = scope.get("state", {}).get("who", "-")
            log.info("%s %s %d %.1f ms %s", scope["method"], path, status, elapsed * 1000, who)


class BodyLimit:
    """Refuse request bodies over ``max_bytes`` with 413, before they are parsed: at once by
    their Content-Length, and while reading for chunked bodies (which have none)."""

    def __init__(self, app: ASGIApp, max_bytes: int) -> None:
        self.app = app
        self.max_bytes = max_bytes

    def too_large(self) -> ApiError:
        return ApiError(413, f"the request body is over {self.max_bytes:,} bytes "
                        "(FLEET_GATEWAY_MAX_BODY_BYTES)", code="request_too_large")  # fmt: skip

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        length = Headers(scope=scope).get("content-length")
        if length is not None and (not length.isdigit() or int(length) > self.max_bytes):
            await self.too_large().response()(scope, receive, send)
            return
        if length is not None:
            await self.app(scope, receive, send)
            return
        # Chunked: read it here, at most max_bytes, then hand it on.
        chunks: list[bytes] = []
        seen = 0
        more = True
        while more:
            message = await receive()
            if message["type"] != "http.request":
                await self.app(scope, receive, send)  # a disconnect: let the app see it
                return
            chunks.append(message.get("body", b""))
            seen += len(chunks[-1])
            if seen > self.max_bytes:
                await self.too_large().response()(scope, receive, send)
                return
            more = message.get("more_body", False)
        body = b"".join(chunks)
        sent = False

        async def replay() -> Message:
            nonlocal sent
            if not sent:
                sent = True
                return {"type": "http.request", "body": body, "more_body": False}
            return await receive()

        await self.app(scope, replay, send)


def create_app(settings: GatewaySettings | None = None) -> FastAPI:
    settings = settings or GatewaySettings()
    if not logging.getLogger().handlers:  # uvicorn configures its own loggers only
        logging.basicConfig(format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    logging.getLogger("producer").setLevel(logging.INFO)
    gw = Gateway(settings)

    @asynccontextmanager
    async def lifespan(_: FastAPI) -> AsyncIterator[None]:
        await gw.start_async()
        log.info("gateway ready (Redis %s, bucket %s)", masked(settings.redis_url),
                 settings.s3_bucket)  # fmt: skip
        try:
            yield
        finally:
            await gw.close_async()

    app = FastAPI(
        title="diffusion-fleet gateway",
        version="1",
        description="Text-to-image jobs over HTTP: OpenAI-compatible images, jobs with live "
        "progress, API keys and tenants. Send `Authorization: Bearer <API key>`.",
        docs_url=None,
        redoc_url=None,
        lifespan=lifespan,
    )
    # The Swagger UI that swagger-ui-bundle ships (4.x) renders OpenAPI 3.0 only; the schema
    # uses nothing of 3.1.
    app.openapi_version = "3.0.3"
    app.state.gateway = gw
    if settings.gateway_cors_origins:
        from fastapi.middleware.cors import CORSMiddleware

        app.add_middleware(CORSMiddleware, allow_origins=list(settings.gateway_cors_origins),
                           allow_methods=["GET", "POST", "DELETE"],
                           allow_headers=["Authorization", "Content-Type",
                                          "Idempotency-Key"])  # fmt: skip
    app.add_middleware(BodyLimit, max_bytes=settings.gateway_max_body_bytes)
    # Swagger UI's own files first: the /static mount would catch /static/swagger/... too.
    from swagger_ui_bundle import swagger_ui_path

    app.mount("/static/swagger", StaticFiles(directory=swagger_ui_path), name="swagger")
    app.mount("/static", StaticFiles(directory=STATIC), name="static")

    # -- errors ---------------------------------------------------------------------------------

    @app.exception_handler(ApiError)
    async def _api_error(_: Request, exc: ApiError) -> JSONResponse:
        return exc.response()

    @app.exception_handler(RequestValidationError)
    async def _bad_request(request: Request, exc: RequestValidationError) -> JSONResponse:
        status = 400 if request.url.path.startswith("/v1/images") else 422
        return from_validation_errors(list(exc.errors()), status).response()

    @app.exception_handler(JobValidationError)
    async def _bad_job(request: Request, exc: JobValidationError) -> JSONResponse:
        if request.url.path.startswith("/v1/images"):
            return ApiError(400, str(exc), param=openai_param(exc), code="invalid_value").response()
        return invalid(exc, 422).response()

    @app.exception_handler(StarletteHTTPException)
    async def _http(_: Request, exc: StarletteHTTPException) -> JSONResponse:
        message = str(exc.detail)
        if exc.status_code == 413:
            message = (f"the request body is over {settings.gateway_max_body_bytes:,} bytes "
                       "(FLEET_GATEWAY_MAX_BODY_BYTES)")  # fmt: skip
        kind = "invalid_request_error" if exc.status_code < 500 else "server_error"
        return ApiError(
            exc.status_code,
            message,
            kind,
            code="request_too_large" if exc.status_code == 413 else None,
        ).response()

    @app.exception_handler(BrokerUnavailable)
    @app.exception_handler(redis.RedisError)
    async def _queue_away(_: Request, exc: Exception) -> JSONResponse:
        # Keys, tenants and lines live in Redis too: with it away nothing was added, so a
        # retry is safe (the SDK retries 503 and reads Retry-After).
        why = str(exc) if isinstance(exc, BrokerUnavailable) else f"Redis: {type(exc).__name__}"
        return ApiError(503, f"the queue is unreachable ({why})", "server_error",
                        code="queue_unavailable", retry=True,
                        headers={"Retry-After": "5"}).response()  # fmt: skip

    @app.exception_handler(StorageError)
    async def _storage(_: Request, exc: StorageError) -> JSONResponse:
        return ApiError(503, f"storage is unreachable: {exc}", "server_error",
                        code="storage_unavailable", retry=False).response()  # fmt: skip

    @app.exception_handler(FleetError)
    async def _fleet(_: Request, exc: FleetError) -> JSONResponse:
        return ApiError(500, str(exc), "server_error", code="fleet_error").response()

    # every request: counted, timed, logged (the key's id only, never the key)
    app.add_middleware(Observe)

    # -- pages and operations -------------------------------------------------------------------

    @app.get("/", include_in_schema=False)
    async def page() -> HTMLResponse:
        return HTMLResponse((STATIC / "index.html").read_text())

    @app.get("/docs", include_in_schema=False)
    async def docs() -> HTMLResponse:
        return get_swagger_ui_html(
            openapi_url="/openapi.json", title="diffusion-fleet gateway",
            swagger_js_url="/static/swagger/swagger-ui-bundle.js",
            swagger_css_url="/static/swagger/swagger-ui.css",
            swagger_favicon_url="/static/favicon.svg",
        )  # fmt: skip

    @app.get("/healthz", tags=["operations"])
    async def healthz() -> JSONResponse:
        """Whether Redis and S3 answer: 200 when both do, else 503."""
        checks = await run_in_threadpool(gw.health)
        ok = all(v == "ok" for v in checks.values())
        return JSONResponse({"status": "ok" if ok else "unavailable", **checks},
                            status_code=200 if ok else 503)  # fmt: skip

    @app.get("/metrics", tags=["operations"])
    async def metrics() -> Response:
        """Prometheus metrics of the gateway: with ``--workers N``, of all its processes."""
        return Response(generate_latest(scrape_registry()), media_type=CONTENT_TYPE_LATEST)

    # -- OpenAI-compatible ----------------------------------------------------------------------

    @app.get("/v1/models", tags=["openai"])
    async def models(tenant: Caller) -> dict[str, Any]:
        """The models the fleet serves now that this tenant may use (OpenAI's list shape)."""
        names = await run_in_threadpool(gw.models, tenant)
        now = int(time.time())
        return {"object": "list", "data": [
            {"id": n, "object": "model", "created": now, "owned_by": "diffusion-fleet"}
            for n in names]}  # fmt: skip

    @app.post("/v1/images/generations", tags=["openai"])
    async def generate(
        request: Request,
        body: ImagesRequest,
        tenant: Caller,
        idempotency_key: Annotated[str | None, Header()] = None,
        x_stainless_retry_count: Annotated[str | None, Header()] = None,
    ) -> JSONResponse:
        """Make images and wait for them (up to FLEET_GATEWAY_WAIT_S), as OpenAI's images API.
        A retry by the SDK (x-stainless-retry-count above 0) or with the same Idempotency-Key
        waits for the first attempt's job; it never makes a second one."""
        raw = await request.body()
        job_id = None
        retried = (x_stainless_retry_count or "0") not in ("", "0")
        if idempotency_key is None and retried:
            job_id = await run_in_threadpool(gw.first_attempt, tenant, raw)
        remember = False
        if job_id is None:
            remember = idempotency_key is None
            status, made = await run_in_threadpool(
                gw.submit, tenant, body.job(), body.priority or contract.DEFAULT_PRIORITY,
                None, idempotency_key,
            )  # fmt: skip
            job_id = status.job_id
            if made:
                JOBS.labels(tenant.name).inc()
        if body.user:
            log.info("tenant %s: job %s for user %s", tenant.name, job_id, body.user)
        try:
            if remember:
                await run_in_threadpool(gw.remember_attempt, tenant, raw, job_id)
            st = await gw.wait(tenant, job_id, settings.gateway_wait_s)
        except (redis.RedisError, BrokerUnavailable) as exc:
            # The job is in line: a retry would make a second one.
            raise ApiError(503, f"job {job_id} is in line, but the queue became unreachable "
                           f"while waiting for it ({type(exc).__name__}); follow it at "
                           f"/v1/jobs/{job_id}", "server_error", code="queue_unavailable",
                           retry=False) from None  # fmt: skip
        if not st.done:
            raise ApiError(504, f"job {job_id} is still {st.state} after "
                           f"{settings.gateway_wait_s:g} s; follow it at /v1/jobs/{job_id}",
                           "server_error", code="timeout", retry=False)  # fmt: skip
        if st.state != "succeeded" or st.result is None:
            error = st.result.error if st.result else None
            kind = st.result.error_type if st.result else None
            raise ApiError(500 if st.state == "failed" else 409,
                           f"job {job_id} {st.state}: {error or 'no reason recorded'}",
                           "server_error", code=kind or st.state, retry=False)  # fmt: skip
        data: list[dict[str, Any]] = []
        for image in st.result.images:
            if body.response_format == "b64_json":
                png = await run_in_threadpool(gw.client.store.get_bytes, image.key)
                data.append({"b64_json": base64.b64encode(png or b"").decode(),
                             "revised_prompt": None})  # fmt: skip
            else:
                data.append({"url": image.url, "revised_prompt": None})
        return JSONResponse(images_response(int(time.time()), data, job_id))

    # -- jobs -----------------------------------------------------------------------------------

    @app.post("/v1/jobs", status_code=202, tags=["jobs"])
    async def submit(
        tenant: Caller,
        job: Annotated[dict[str, Any], Body(description="a job of docs/contract.md (no job_id)")],
        priority: Annotated[int, Query(ge=0, le=9)] = contract.DEFAULT_PRIORITY,
        deadline_s: Annotated[float | None, Query(gt=0)] = None,
        idempotency_key: Annotated[str | None, Header()] = None,
    ) -> JSONResponse:
        """Put a job in line and answer at once (202) with its id and state. With an
        Idempotency-Key the same key gives the same job (200), never a second one."""
        status, made = await run_in_threadpool(
            gw.submit, tenant, job, priority, deadline_s, idempotency_key
        )
        if made:
            JOBS.labels(tenant.name).inc()
        return JSONResponse(json.loads(status.model_dump_json()), status_code=202 if made else 200)

    @app.get("/v1/jobs", tags=["jobs"])
    async def jobs(
        tenant: Caller,
        state: Annotated[contract.JobState | None, Query()] = None,
        limit: Annotated[int, Query(ge=1, le=200)] = 20,
    ) -> dict[str, Any]:
        """Your newest jobs, newest first (only those in ``state`` when given)."""
        found = await run_in_threadpool(gw.jobs, tenant, state, limit)
        return {"object": "list", "data": [json.loads(s.model_dump_json()) for s in found]}

    @app.get("/v1/jobs/{job_id}", tags=["jobs"])
    async def job_status(tenant: Caller, job_id: str) -> JSONResponse:
        """State, place in line, result, and freshly presigned image URLs."""
        st = await run_in_threadpool(gw.status, tenant, job_id)
        return JSONResponse(json.loads(st.model_dump_json()))

    @app.delete("/v1/jobs/{job_id}", tags=["jobs"])
    async def cancel(tenant: Caller, job_id: str) -> JSONResponse:
        """Cancel: a queued job never runs, a running one stops at its next step."""
        st = await run_in_threadpool(gw.cancel, tenant, job_id)
        return JSONResponse(json.loads(st.model_dump_json()))

    @app.delete("/v1/jobs/{job_id}/images", tags=["jobs"])
    async def delete_images(tenant: Caller, job_id: str) -> dict[str, Any]:
        """Delete a finished job's images and manifest from storage."""
        n = await run_in_threadpool(gw.delete_images, tenant, job_id)
        return {"job_id": job_id, "deleted": n}

    @app.get("/v1/jobs/{job_id}/events", tags=["jobs"])
    async def events(tenant: Caller, job_id: str) -> StreamingResponse:
        """Server-Sent Events: queued (jobs ahead), started, step (one per step), then
        succeeded, failed or cancelled; the stream ends after the last."""
        await run_in_threadpool(gw.owned, tenant, job_id)  # 404 before the stream starts

        async def stream() -> AsyncIterator[str]:
            async for name, data in gw.events(tenant, job_id):
                yield f"event: {name}\ndata: {json.dumps(data)}\n\n"

        return StreamingResponse(stream(), media_type="text/event-stream",
                                 headers={"Cache-Control": "no-store"})  # fmt: skip

    @app.exception_handler(ValidationError)
    async def _pydantic(_: Request, exc: ValidationError) -> JSONResponse:
        return from_validation_errors([dict(e) for e in exc.errors()], 422).response()

    return app
