"""FLEET_S3_PUBLIC_ENDPOINT_URL: presigned URLs signed for the endpoint clients outside the
fleet's network use (issue 14). Presigning is local, so no server is needed here; each
signature is checked by recomputing SigV4 for the host, port and path of the URL."""

from __future__ import annotations

import hashlib
import hmac
from typing import Any
from urllib.parse import parse_qsl, quote, urlsplit

import pytest
import yaml
from pydantic import ValidationError

from fleet.settings import ProducerSettings, WorkerSettings
from fleet.storage import ObjectStore
from tests.fleet_fixtures import REPO

KEY_ID, SECRET, REGION = "AKIDPUBLICTEST", "secret-of-the-test", "eu-west-3"
PRIVATE = "http://s3:8333"
OBJECT_KEY = "jobs/ab/abcdef/0 fox.png"  # a space: the path is URL-encoded, and signed so


def settings(**kw: Any) -> ProducerSettings:
    base: dict[str, Any] = {
        "s3_endpoint_url": PRIVATE,
        "s3_public_endpoint_url": None,
        "s3_access_key_id": KEY_ID,
        "s3_secret_access_key": SECRET,
        "s3_region": REGION,
        "s3_bucket": "fleet",
        "s3_addressing_style": "path",
        "s3_create_bucket": False,
    }
    return ProducerSettings(_env_file=None, **{**base, **kw})  # type: ignore[arg-type]


def sigv4_valid(url: str, secret: str = SECRET) -> bool:
    """Whether the presigned GET ``url`` carries a SigV4 signature computed for its own host
    (with port) and path: what the server recomputes from the request it receives."""
    parts = urlsplit(url)
    params = dict(parse_qsl(parts.query, keep_blank_values=True))
    signature = params.pop("X-Amz-Signature")
    assert params["X-Amz-SignedHeaders"] == "host"
    key_id, date, region, service, _ = params["X-Amz-Credential"].split("/")
    assert key_id == KEY_ID and region == REGION and service == "s3"
    query = "&".join(
        f"{quote(k, safe='-_.~')}={quote(v, safe='-_.~')}" for k, v in sorted(params.items())
    )
    canonical = "\n".join(
        ["GET", parts.path, query, f"host:{parts.netloc}", "", "host", "UNSIGNED-PAYLOAD"]
    )
    scope = f"{date}/{region}/s3/aws4_request"
    to_sign = "\n".join(["AWS4-HMAC-SHA256", params["X-Amz-Date"], scope,
                         hashlib.sha256(canonical.encode()).hexdigest()])  # fmt: skip
    key = f"AWS4{secret}".encode()
    for part in (date, region, "s3", "aws4_request"):
        key = hmac.new(key, part.encode(), hashlib.sha256).digest()
    expected = hmac.new(key, to_sign.encode(), hashlib.sha256).hexdigest()
    return hmac.compare_digest(expected, signature)


def test_presigned_url_is_signed_for_the_public_host_port_and_path() -> None:
    store = ObjectStore(settings(s3_public_endpoint_url="https://images.example.com:8443"))
    url = store.presign_get(OBJECT_KEY, expires_s=600)
    parts = urlsplit(url)
    assert (parts.scheme, parts.hostname, parts.port) == ("https", "images.example.com", 8443)
    assert parts.path == "/fleet/jobs/ab/abcdef/0%20fox.png"  # path style, as configured
    params = dict(parse_qsl(parts.query))
    assert params["X-Amz-Algorithm"] == "AWS4-HMAC-SHA256"
    assert params["X-Amz-Expires"] == "600"
    assert params["X-Amz-Signature"]
    assert sigv4_valid(url)
    assert not sigv4_valid(url, secret="another-secret")  # the check can fail
    # The host is part of what is signed: the same URL sent to the private host is invalid.
    swapped = url.replace("https://images.example.com:8443", PRIVATE, 1)
    assert swapped != url and not sigv4_valid(swapped)
    # Uploads and reads keep the private endpoint; only signing uses the public one.
    assert store.client.meta.endpoint_url == PRIVATE
    assert store.signer is not store.client
    assert store.signer.meta.endpoint_url == "https://images.example.com:8443"


def test_a_public_endpoint_with_a_path_prefix_keeps_it_in_the_signed_path() -> None:
    store = ObjectStore(settings(s3_public_endpoint_url="https://cdn.example.com/s3"))
    url = store.presign_get("a.png")
    assert url.startswith("https://cdn.example.com/s3/fleet/a.png?")
    assert sigv4_valid(url)


def test_virtual_host_addressing_is_kept_for_the_public_endpoint() -> None:
    store = ObjectStore(settings(s3_addressing_style="virtual",
                                 s3_public_endpoint_url="https://images.example.com"))  # fmt: skip
    url = store.presign_get("a.png")
    assert url.startswith("https://fleet.images.example.com/a.png?")
    assert sigv4_valid(url)


def test_without_a_public_endpoint_urls_use_the_normal_endpoint() -> None:
    store = ObjectStore(settings())
    assert store.public_endpoint_url is None
    assert store.signer is store.client
    url = store.presign_get(OBJECT_KEY)
    assert url.startswith(f"{PRIVATE}/fleet/jobs/ab/abcdef/0%20fox.png?")
    assert dict(parse_qsl(urlsplit(url).query))["X-Amz-Expires"] == "3600"
    assert sigv4_valid(url)


def test_the_setting_comes_from_the_environment_and_empty_means_unset(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setenv("FLEET_S3_PUBLIC_ENDPOINT_URL", " http://203.0.113.7:8333 ")
    assert WorkerSettings(_env_file=None).s3_public_endpoint_url == "http://203.0.113.7:8333"
    monkeypatch.setenv("FLEET_S3_PUBLIC_ENDPOINT_URL", "")  # compose passes ${…:-} empty
    assert ProducerSettings(_env_file=None).s3_public_endpoint_url is None
    monkeypatch.delenv("FLEET_S3_PUBLIC_ENDPOINT_URL")
    assert ProducerSettings(_env_file=None).s3_public_endpoint_url is None


@pytest.mark.parametrize(
    "value",
    [
        "images.example.com",  # no scheme
        "ftp://images.example.com",
        "s3://fleet",
        "http://",
        "https://:8443",
        "http://images.example.com:99999",  # port out of range
        "http://images.example.com:port",
        "https://user:pw@images.example.com",
        "https://images.example.com/?x=1",
        "https://images.example.com/#top",
    ],
)
def test_a_bad_value_is_refused_naming_the_setting(
    value: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    with pytest.raises(ValidationError, match="FLEET_S3_PUBLIC_ENDPOINT_URL"):
        settings(s3_public_endpoint_url=value)
    monkeypatch.setenv("FLEET_S3_PUBLIC_ENDPOINT_URL", value)
    with pytest.raises(ValidationError, match="FLEET_S3_PUBLIC_ENDPOINT_URL"):
        WorkerSettings(_env_file=None)


def test_compose_passes_the_setting_to_every_worker_with_an_empty_default() -> None:
    raw = yaml.safe_load((REPO / "docker-compose.yml").read_text())
    env = raw["x-worker-env"]
    assert env["FLEET_S3_PUBLIC_ENDPOINT_URL"] == "${FLEET_S3_PUBLIC_ENDPOINT_URL:-}"
    assert env["FLEET_S3_ENDPOINT_URL"] == "${WORKER_S3_ENDPOINT_URL:-http://s3:8333}"
    example = (REPO / ".env.example").read_text().splitlines()
    assert "FLEET_S3_PUBLIC_ENDPOINT_URL=" in example
