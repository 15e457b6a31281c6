"""The HTTP gateway, as other services use it: the official `openai` SDK, httpx with SSE, API keys
and tenants. A real `python -m producer serve` process in front of the real worker, Redis and S3.
"""

from __future__ import annotations

import base64
import io
import json
import subprocess
import sys
from typing import Any

import httpx
import openai
import pytest
from httpx_sse import connect_sse
from PIL import Image

from tests.fleet_fixtures import REPO, wait_until
from tests.gateway_fixtures import GatewayProcess, auth, new_tenant

pytestmark = pytest.mark.integration

PNG = b"\x89PNG\r\n\x1a\n"
SMALL = {"width": 64, "height": 64, "steps": 2}
#: Keys made in this module: none may appear in the gateway's log (checked last).
KEYS: list[str] = []


@pytest.fixture(scope="module")
def acme(tenants: Any) -> tuple[str, str]:
    name, key = new_tenant(tenants, "acme")
    KEYS.append(key)
    return name, key


def sdk(gateway: GatewayProcess, key: str, **kw: Any) -> openai.OpenAI:
    return openai.OpenAI(base_url=gateway.url + "/v1", api_key=key, **kw)


def count_jobs(store: Any, tenant: str) -> int:
    """Generations, counted in storage: the manifests under the tenant's prefix."""
    keys = store.list_keys(f"tenants/{tenant}/jobs/")
    return sum(1 for k in keys if k.endswith("manifest.json"))


# -- OpenAI-compatible ---------------------------------------------------------------------------


def test_the_openai_sdk_generates_images_in_both_response_formats(
    gateway: GatewayProcess, acme: tuple[str, str], store: Any
) -> None:
    tenant, key = acme
    client = sdk(gateway, key)
    # Listed once the worker has loaded it and says it is ready.
    wait_until(lambda: "tiny" in [m.id for m in client.models.list().data], 60, "tiny listed")

    b64 = client.images.generate(model="tiny", prompt="a red fox", n=2, size="64x96",
                                 response_format="b64_json",
                                 extra_body={"steps": 2, "seed": 7,
                                             "negative_prompt": "blur"})  # fmt: skip
    assert len(b64.data) == 2
    for item in b64.data:
        png = base64.b64decode(item.b64_json or "")
        assert png[:8] == PNG
        assert Image.open(io.BytesIO(png)).size == (64, 96)

    by_url = client.images.generate(model="tiny", prompt="a red fox", size="64x64",
                                    response_format="url", extra_body={"steps": 2})  # fmt: skip
    url = by_url.data[0].url or ""
    assert f"/tenants/{tenant}/jobs/" in url  # the tenant's own prefix in S3
    got = httpx.get(url, timeout=30)
    assert got.status_code == 200 and got.content[:8] == PNG
    # The recipe the extra fields asked for is the one that ran.
    job_id = by_url.model_extra["fleet_job_id"]  # type: ignore[index]
    manifest = store.get_json(f"tenants/{tenant}/jobs/{job_id}/manifest.json")
    assert manifest["job"]["steps"] == 2 and manifest["job"]["tenant"] == tenant


def test_openai_errors_name_the_field_and_say_not_to_retry(
    gateway: GatewayProcess, acme: tuple[str, str], tenants: Any
) -> None:
    _, key = acme
    client = sdk(gateway, key, max_retries=0)
    with pytest.raises(openai.BadRequestError) as bad_size:
        client.images.generate(prompt="x", size="64by64")  # type: ignore[arg-type]
    assert bad_size.value.status_code == 400
    assert bad_size.value.body["param"] == "size"  # type: ignore[index]
    assert bad_size.value.response.headers["x-should-retry"] == "false"

    with pytest.raises(openai.BadRequestError) as typo:
        client.images.generate(prompt="x", size="64x64", extra_body={"stepz": 3})
    assert "stepz" in typo.value.message

    with pytest.raises(openai.BadRequestError) as too_many:  # the fleet's own limit, as 400
        client.images.generate(prompt="x", size="64x64", n=99)
    assert too_many.value.body["param"] == "n"  # type: ignore[index]

    with pytest.raises(openai.AuthenticationError):
        sdk(gateway, "dfk_000000000000_not-a-key").images.generate(prompt="x")

    _, narrow = new_tenant(tenants, "narrow", models=["someone-else"])
    KEYS.append(narrow)
    with pytest.raises(openai.PermissionDeniedError) as denied:
        sdk(gateway, narrow, max_retries=0).images.generate(prompt="x", model="tiny")
    assert denied.value.body["code"] == "model_not_allowed"  # type: ignore[index]


def test_the_sdks_retries_and_a_repeated_idempotency_key_make_no_second_job(
    gateway: GatewayProcess, tenants: Any, store: Any
) -> None:
    tenant, key = new_tenant(tenants, "retry")
    KEYS.append(key)
    # The SDK gives up on each attempt after 0.3 s and retries twice (its default), without an
    # Idempotency-Key: each retry must find the first attempt's job.
    impatient = sdk(gateway, key, timeout=0.3, max_retries=2)
    with pytest.raises(openai.APITimeoutError):
        impatient.images.generate(prompt="slow", size="192x192", extra_body={"steps": 10})
    listed = httpx.get(gateway.url + "/v1/jobs", headers=auth(key), timeout=10).json()["data"]
    assert len(listed) == 1
    job_id = listed[0]["job_id"]
    wait_until(lambda: httpx.get(f"{gateway.url}/v1/jobs/{job_id}", headers=auth(key)).json()
               ["state"] == "succeeded", 120, "the slow job")  # fmt: skip

    client = sdk(gateway, key)
    same = [client.images.generate(prompt="same", size="64x64", extra_body={"steps": 2},
                                   extra_headers={"Idempotency-Key": "order-17"})
            for _ in range(2)]  # fmt: skip
    ids = {r.model_extra["fleet_job_id"] for r in same}  # type: ignore[index]
    assert len(ids) == 1
    assert same[0].data[0].url is not None
    assert count_jobs(store, tenant) == 2  # the slow job and the keyed one: nothing twice


# -- jobs ----------------------------------------------------------------------------------------


def test_a_job_over_http_streams_every_step_then_its_result(
    gateway: GatewayProcess, acme: tuple[str, str], store: Any
) -> None:
    tenant, key = acme
    h = {**auth(key), "Idempotency-Key": "sse-1"}
    job = {"prompt": "a lighthouse", "width": 64, "height": 64, "steps": 6}
    first = httpx.post(gateway.url + "/v1/jobs", json=job, headers=h, timeout=10)
    assert first.status_code == 202, first.text
    job_id = first.json()["job_id"]
    again = httpx.post(gateway.url + "/v1/jobs", json=job, headers=h, timeout=10)
    assert again.status_code == 200 and again.json()["job_id"] == job_id

    events: list[tuple[str, dict]] = []
    with (
        httpx.Client(timeout=60) as http,
        connect_sse(
            http, "GET", f"{gateway.url}/v1/jobs/{job_id}/events", headers=auth(key)
        ) as source,
    ):
        assert source.response.headers["content-type"].startswith("text/event-stream")
        for sse in source.iter_sse():
            events.append((sse.event, json.loads(sse.data)))
    names = [name for name, _ in events]
    assert names[-1] == "succeeded" and "started" in names
    assert names.index("started") < names.index("step")
    steps = [data["step"] for name, data in events if name == "step"]
    total = events[names.index("step")][1]["steps"]
    assert steps == list(range(1, total + 1)), steps  # one event per step, in order
    result = events[-1][1]["result"]
    assert result["images"][0]["key"] == f"tenants/{tenant}/jobs/{job_id}/image-000.png"

    other = dict(job, prompt="another prompt")
    clash = httpx.post(gateway.url + "/v1/jobs", json=other, headers=h, timeout=10)
    assert clash.status_code == 409 and clash.headers["x-should-retry"] == "false"
    assert clash.json()["error"]["param"] == "Idempotency-Key"

    status = httpx.get(f"{gateway.url}/v1/jobs/{job_id}", headers=auth(key), timeout=10).json()
    assert status["state"] == "succeeded"
    assert httpx.get(status["result"]["images"][0]["url"], timeout=10).content[:8] == PNG
    listed = httpx.get(gateway.url + "/v1/jobs", params={"state": "succeeded", "limit": 200},
                       headers=auth(key), timeout=10).json()["data"]  # fmt: skip
    assert job_id in [j["job_id"] for j in listed]
    assert all(j["state"] == "succeeded" for j in listed)

    deleted = httpx.delete(f"{gateway.url}/v1/jobs/{job_id}/images", headers=auth(key))
    assert deleted.status_code == 200 and deleted.json()["deleted"] == 2  # image + manifest
    assert store.list_keys(f"tenants/{tenant}/jobs/{job_id}/") == []


def test_cancel_over_http_stops_a_running_job_and_a_queued_one_never_runs(
    gateway: GatewayProcess, acme: tuple[str, str], store: Any
) -> None:
    tenant, key = acme
    url = gateway.url + "/v1/jobs"
    running = httpx.post(url, json={"prompt": "long", "width": 256, "height": 256, "steps": 60},
                         headers=auth(key)).json()["job_id"]  # fmt: skip
    queued = httpx.post(url, json={"prompt": "behind", **SMALL}, headers=auth(key)).json()["job_id"]

    def state(job_id: str) -> dict:
        return httpx.get(f"{url}/{job_id}", headers=auth(key), timeout=10).json()

    wait_until(lambda: (state(running).get("step") or 0) >= 1, 60, "the long job to step")
    assert state(queued)["state"] == "queued"
    assert httpx.delete(f"{url}/{queued}", headers=auth(key)).status_code == 200
    assert httpx.delete(f"{url}/{running}", headers=auth(key)).status_code == 200
    assert wait_until(lambda: state(running)["state"] == "cancelled", 60, "running cancelled")
    assert wait_until(lambda: state(queued)["state"] == "cancelled", 60, "queued cancelled")
    # The queued one never generated: no image of it in storage.
    assert not [k for k in store.list_keys(f"tenants/{tenant}/jobs/{queued}/") if "image" in k]
    after = httpx.post(url, json={"prompt": "after", **SMALL}, headers=auth(key)).json()["job_id"]
    assert wait_until(lambda: state(after)["state"] == "succeeded", 60, "the worker serves on")


# -- who may do what -----------------------------------------------------------------------------


def test_keys_are_checked_revoked_at_once_and_tenants_cannot_see_each_other(
    gateway: GatewayProcess, acme: tuple[str, str], fleet_env: dict, tenants: Any
) -> None:
    _, acme_key = acme
    url = gateway.url + "/v1/jobs"
    nobody = httpx.post(url, json={"prompt": "x"})
    assert nobody.status_code == 401 and nobody.headers["www-authenticate"] == "Bearer"
    assert nobody.json()["error"]["type"] == "authentication_error"
    for bad in ("Bearer dfk_0123456789ab_wrong", "Bearer nonsense", "Basic abc"):
        assert (
            httpx.post(url, json={"prompt": "x"}, headers={"Authorization": bad}).status_code == 401
        )

    # The operator's CLI makes a key (printed once) and revokes it.
    def cli(*args: str) -> subprocess.CompletedProcess[str]:
        return subprocess.run([sys.executable, "-m", "producer", *args], cwd=REPO, env=fleet_env,
                              capture_output=True, text=True, timeout=60)  # fmt: skip

    made = cli("keys", "create", "--tenant", "beta")
    assert made.returncode == 0, made.stderr
    beta_key = made.stdout.split()[0]
    KEYS.append(beta_key)
    listed = cli("keys", "list", "--tenant", "beta")
    assert beta_key not in listed.stdout and '"tenant": "beta"' in listed.stdout
    assert tenants.redis.get(f"fleet:gw:key:{beta_key.split('_')[1]}").find(b"dfk_") == -1

    theirs = httpx.post(url, json={"prompt": "beta's", **SMALL}, headers=auth(beta_key))
    assert theirs.status_code == 202
    beta_job = theirs.json()["job_id"]
    for method, path in (("GET", ""), ("DELETE", ""), ("GET", "/events"), ("DELETE", "/images")):
        seen = httpx.request(method, f"{url}/{beta_job}{path}", headers=auth(acme_key))
        assert seen.status_code == 404, (method, path, seen.text)
        assert "beta" not in seen.text and "prompt" not in seen.text
    assert beta_job not in httpx.get(url, headers=auth(acme_key)).text

    # The operator's CLI sets the tenant's limits; the gateway applies them on the next request.
    limited = cli("tenants", "set", "beta", "--models", "someone-else", "--rate", "7")
    assert limited.returncode == 0, limited.stderr
    assert json.loads(limited.stdout)["rate_per_min"] == 7
    shown = [json.loads(line) for line in cli("tenants", "list").stdout.splitlines()]
    assert {"name": "beta", "models": ["someone-else"]}.items() <= next(
        t for t in shown if t["name"] == "beta").items()  # fmt: skip
    refused = httpx.post(url, json={"prompt": "x", **SMALL}, headers=auth(beta_key))
    assert refused.status_code == 403 and refused.json()["error"]["code"] == "model_not_allowed"
    assert cli("tenants", "set", "beta", "--models", "*").returncode == 0

    key_id = beta_key.split("_")[1]
    gone = cli("keys", "revoke", key_id)
    assert gone.returncode == 0, gone.stderr
    assert httpx.get(f"{url}/{beta_job}", headers=auth(beta_key)).status_code == 401


def test_tenant_limits_answer_429_with_retry_after_and_403_for_what_is_not_allowed(
    gateway: GatewayProcess, tenants: Any
) -> None:
    url = gateway.url + "/v1/jobs"
    _, slow = new_tenant(tenants, "rate", rate_per_min=2)
    _, small = new_tenant(tenants, "small", max_job_mpx_steps=0.05)
    KEYS.extend([slow, small])
    answers = [httpx.post(url, json={"prompt": "x", **SMALL}, headers=auth(slow))
               for _ in range(3)]  # fmt: skip
    assert [a.status_code for a in answers[:2]] == [202, 202]
    limited = answers[2]
    assert limited.status_code == 429 and limited.json()["error"]["code"] == "rate_limit_exceeded"
    assert 1 <= int(limited.headers["retry-after"]) <= 60
    assert limited.headers["x-should-retry"] == "true"

    too_big = httpx.post(url, json={"prompt": "x", "width": 512, "height": 512, "steps": 30},
                         headers=auth(small))  # fmt: skip
    assert too_big.status_code == 403 and too_big.json()["error"]["code"] == "job_too_large"
    assert "megapixel-steps" in too_big.json()["error"]["message"]
    assert httpx.post(url, json={"prompt": "x", **SMALL}, headers=auth(small)).status_code == 202


def test_oversized_and_malformed_bodies_are_refused_and_the_gateway_serves_on(
    gateway: GatewayProcess, acme: tuple[str, str]
) -> None:
    _, key = acme
    url = gateway.url + "/v1/jobs"
    huge = json.dumps({"prompt": "x" * 2_000_000}).encode()
    sized = httpx.post(url, content=huge, headers={**auth(key), "Content-Type": "application/json"})
    assert sized.status_code == 413 and sized.json()["error"]["code"] == "request_too_large"

    def chunks() -> Any:
        for _ in range(40):
            yield b" " * 65536

    chunked = httpx.post(url, content=chunks(), headers={**auth(key),
                         "Content-Type": "application/json"})  # fmt: skip
    assert chunked.request.headers.get("transfer-encoding") == "chunked"
    assert chunked.status_code == 413

    broken = httpx.post(url, content=b'{"prompt": "x",', headers={**auth(key),
                        "Content-Type": "application/json"})  # fmt: skip
    assert broken.status_code == 422 and "JSON" in broken.json()["error"]["message"]
    wrong = httpx.post(url, json={"prompt": "x", "width": "wide"}, headers=auth(key))
    assert wrong.status_code == 422 and wrong.json()["error"]["param"] == "width"
    assert "width" in wrong.json()["error"]["message"]
    named = httpx.post(url, json={"prompt": "x", "tenant": "someone"}, headers=auth(key))
    assert named.status_code == 422 and named.json()["error"]["param"] == "tenant"

    assert gateway.alive()
    assert httpx.get(gateway.url + "/healthz").json() == {"status": "ok", "redis": "ok", "s3": "ok"}
    assert (
        httpx.post(url, json={"prompt": "still here", **SMALL}, headers=auth(key)).status_code
        == 202
    )


def test_metrics_docs_and_health_answer(gateway: GatewayProcess) -> None:
    # CORS is off unless configured: a browser on another origin gets no permission.
    asked = {"Origin": "https://elsewhere.example", "Access-Control-Request-Method": "POST"}
    preflight = httpx.options(gateway.url + "/v1/jobs", headers=asked)
    assert "access-control-allow-origin" not in preflight.headers
    metrics = httpx.get(gateway.url + "/metrics").text
    assert "fleet_gateway_requests_total" in metrics
    schema = httpx.get(gateway.url + "/openapi.json").json()
    assert {"/v1/images/generations", "/v1/jobs", "/v1/jobs/{job_id}/events"} <= set(
        schema["paths"]
    )


def test_no_api_key_nor_the_s3_secret_is_in_the_gateways_log(
    gateway: GatewayProcess, fleet_env: dict
) -> None:
    """Last in the module: every key above went through this gateway."""
    log = gateway.log()
    assert "tenant=acme" in log and " key=" in log  # the log names tenants and key ids
    secret = fleet_env["FLEET_S3_SECRET_ACCESS_KEY"]
    assert KEYS and secret
    for value in [*KEYS, secret]:
        assert value not in log
    for key in KEYS:  # nor a key's secret part alone (dfk_<id>_<secret>; "_" may be in it)
        assert key.split("_", 2)[2] not in log
    assert "Bearer " not in log
