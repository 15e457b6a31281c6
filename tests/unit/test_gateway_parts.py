"""The gateway's pure parts: API keys, idempotent ids, the OpenAI request mapping, tenant
prefixes and webhook secrets, the error shape."""

from __future__ import annotations

import json

import pytest
from pydantic import ValidationError

from fleet import contract
from fleet.contract import JobSpec
from fleet.errors import JobValidationError
from producer.gateway.errors import ApiError
from producer.gateway.openai_api import ImagesRequest, openai_param
from producer.gateway.service import idempotent_job_id
from producer.gateway.tenants import Tenant, hash_key, parse_key


def test_a_key_is_found_by_its_id_and_kept_only_as_a_sha256():
    key = "dfk_0123456789ab_c2VjcmV0LXBhcnQtb2YtdGhlLWtleQ"
    assert parse_key(key) == "0123456789ab"
    assert hash_key(key) == hash_key(key) and len(hash_key(key)) == 64
    assert key not in hash_key(key) and hash_key(key) != hash_key(key + "x")
    for bad in ("", "dfk_0123456789ab_", "dfk_0123456789AB_x", "dfk_123_x", "sk-abc",
                "xyz_0123456789ab_secret", "dfk_0123456789zz_secret"):  # fmt: skip
        assert parse_key(bad) is None, bad


def test_an_idempotency_key_makes_one_valid_job_id_per_tenant():
    a1, a2 = idempotent_job_id("acme", "order-1"), idempotent_job_id("acme", "order-1")
    b = idempotent_job_id("beta", "order-1")
    assert a1 == a2 and a1 != b and a1 != idempotent_job_id("acme", "order-2")
    assert contract.JOB_ID_PATTERN.match(a1)
    # a separator: tenant "a" with key "b\0c" is not tenant "a\0b" with key "c"
    assert idempotent_job_id("ab", "c") != idempotent_job_id("a", "bc")


def test_the_openai_body_maps_to_a_fleet_job():
    req = ImagesRequest.model_validate({"prompt": "a fox", "n": 3, "size": "640x384",
                                        "model": "tiny", "steps": 12, "seed": "42",
                                        "negative_prompt": "blur", "quality": "hd"})  # fmt: skip
    assert req.job() == {"prompt": "a fox", "images": 3, "width": 640, "height": 384,
                         "model": "tiny", "steps": 12, "seed": "42",
                         "negative_prompt": "blur"}  # fmt: skip
    assert ImagesRequest.model_validate({"prompt": "x", "size": "auto"}).job() == {
        "prompt": "x", "images": 1}  # fmt: skip
    assert ImagesRequest.model_validate({"prompt": "x"}).job()["width"] == 512
    for bad in ({"prompt": "x", "size": "64by64"}, {"prompt": "x", "stepz": 3},
                {"prompt": "x", "response_format": "jpeg"}, {"n": 1}):  # fmt: skip
        with pytest.raises(ValidationError):
            ImagesRequest.model_validate(bad)


def test_a_fleet_field_is_named_as_the_openai_field_it_came_from():
    for field, param in (("images", "n"), ("width", "size"), ("height", "size"),
                         ("steps", "steps")):  # fmt: skip
        assert openai_param(JobValidationError([(field, 1, "bad")])) == param


def test_a_tenants_objects_live_under_its_own_prefix():
    assert contract.tenant_prefix("", None) == ""
    assert contract.tenant_prefix("fleet/", "acme") == "fleet/tenants/acme"
    key = contract.manifest_key("j1", contract.tenant_prefix("", "acme"))
    assert key == "tenants/acme/jobs/j1/manifest.json"
    assert contract.raw_job_prefix("p", {"tenant": "acme"}) == "p/tenants/acme"
    # a message naming no usable tenant keeps the fleet's prefix (never a path of its choosing)
    for job in ({"tenant": "../other"}, {"tenant": 5}, "not a dict", {}):
        assert contract.raw_job_prefix("p", job) == "p"


def test_each_tenant_signs_webhooks_with_its_own_secret():
    a = contract.tenant_webhook_secret("master", "acme")
    assert a == contract.tenant_webhook_secret("master", "acme")
    assert a not in {contract.tenant_webhook_secret("master", "beta"),
                     contract.tenant_webhook_secret("other", "acme"), "master"}  # fmt: skip


def test_a_job_names_a_valid_tenant_and_older_workers_never_see_an_unset_one():
    assert JobSpec(prompt="x", tenant="acme-1").tenant == "acme-1"
    for bad in ("Acme", "", "-x", "a/b", "x" * 64):
        with pytest.raises(ValidationError):
            JobSpec(prompt="x", tenant=bad)
    assert "tenant" not in contract.job_payload(JobSpec(prompt="x"))
    assert contract.job_payload(JobSpec(prompt="x", tenant="acme"))["tenant"] == "acme"


def test_a_tenants_job_size_is_megapixels_times_steps_times_images():
    t = Tenant(name="acme")
    assert t.job_size(JobSpec(prompt="x", width=1000, height=1000, steps=30, images=2)) == 60.0


def test_errors_have_openais_shape_and_say_whether_to_retry():
    r = ApiError(429, "slow down", "rate_limit_error", code="rate_limit_exceeded", retry=True,
                 headers={"Retry-After": "7"}).response()  # fmt: skip
    assert r.status_code == 429 and r.headers["x-should-retry"] == "true"
    assert r.headers["retry-after"] == "7"
    assert json.loads(bytes(r.body)) == {"error": {"message": "slow down",
        "type": "rate_limit_error", "param": None, "code": "rate_limit_exceeded"}}  # fmt: skip
    assert ApiError(409, "no").response().headers["x-should-retry"] == "false"


def test_cors_answers_only_the_configured_origins():
    """FLEET_GATEWAY_CORS_ORIGINS turns CORS on for those origins (the app, no services: the
    preflight is answered by the middleware before any route; off is tested on the real
    gateway in tests/integration/test_gateway.py)."""
    from starlette.testclient import TestClient

    from fleet.settings import GatewaySettings
    from producer.gateway.app import create_app

    app = create_app(GatewaySettings(_env_file=None,
                                     gateway_cors_origins="https://app.example"))  # fmt: skip
    client = TestClient(app)  # not entered: no lifespan, so no dispatcher and no Redis

    def preflight(origin: str) -> dict:
        return dict(client.options("/v1/jobs", headers={
            "Origin": origin, "Access-Control-Request-Method": "POST",
            "Access-Control-Request-Headers": "authorization"}).headers)  # fmt: skip

    assert preflight("https://app.example")["access-control-allow-origin"] == "https://app.example"
    assert "access-control-allow-origin" not in preflight("https://elsewhere.example")
