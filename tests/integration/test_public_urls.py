"""FLEET_S3_PUBLIC_ENDPOINT_URL on the real SeaweedFS (issue 14): the producer hands out URLs
signed for the public name of the store, and they open; a URL signed for the private name with
its host edited is refused, so the setting cannot be a string replace."""

from __future__ import annotations

import urllib.error
import urllib.request
from collections.abc import Iterator
from urllib.parse import urlsplit

import pytest

from fleet.contract import JobSpec
from fleet.settings import ProducerSettings
from producer.client import Client
from tests.fleet_fixtures import settings_kwargs

pytestmark = pytest.mark.integration

TIMEOUT = 120


def public_name(private: str) -> str:
    """The same server by another name: ``http://127.0.0.1:PORT`` -> ``http://localhost:PORT``."""
    parts = urlsplit(private)
    assert parts.hostname == "127.0.0.1", private
    return private.replace("//127.0.0.1:", "//localhost:", 1)


def fetch(url: str) -> tuple[int, bytes]:
    try:
        with urllib.request.urlopen(url, timeout=10) as resp:
            return resp.status, resp.read()
    except urllib.error.HTTPError as exc:
        return exc.code, exc.read()


@pytest.fixture()
def public_client(fleet_env: dict) -> Iterator[Client]:
    """A producer client like the ``client`` fixture's, presigning for the public name."""
    settings = ProducerSettings(
        _env_file=None,
        **{**settings_kwargs(fleet_env),
           "s3_public_endpoint_url": public_name(fleet_env["FLEET_S3_ENDPOINT_URL"])},
    )  # fmt: skip
    with Client(settings) as c:
        yield c


def test_status_hands_out_urls_for_the_public_endpoint_that_open(
    worker, client, public_client, store, fleet_env
) -> None:
    private = fleet_env["FLEET_S3_ENDPOINT_URL"]
    public = public_name(private)
    handle = client.submit(JobSpec(prompt="a lantern", width=64, height=64, steps=1, seed=7))
    done = handle.wait(timeout=TIMEOUT)
    assert done.state == "succeeded", done
    st = public_client.status(handle.job_id)
    assert st.state == "succeeded" and st.result is not None
    (image,) = st.result.images
    assert image.url is not None and image.url.startswith(f"{public}/")
    stored = store.get_bytes(image.key)
    assert stored is not None and stored.startswith(b"\x89PNG")
    status, body = fetch(image.url)
    assert status == 200, body[:300]
    assert body.startswith(b"\x89PNG") and body == stored
    # The private client's URL for the same image points at the private name, and opens too.
    private_st = client.status(handle.job_id)
    assert private_st.result is not None
    (private_image,) = private_st.result.images
    assert private_image.url is not None and private_image.url.startswith(f"{private}/")
    assert fetch(private_image.url) == (200, stored)


def test_a_private_url_with_its_host_replaced_is_refused(store, fleet_env) -> None:
    """SigV4 signs the Host header: the server recomputes the signature for the host it was
    asked by, so editing the host of a signed URL breaks it (403)."""
    private = fleet_env["FLEET_S3_ENDPOINT_URL"]
    key = "tests/public-urls/probe.png"
    data = b"\x89PNG\r\n\x1a\n not really an image"
    store.put_bytes(key, data, "image/png")
    try:
        url = store.presign_get(key)
        assert url.startswith(f"{private}/")
        assert fetch(url) == (200, data)  # the URL as signed opens
        replaced = url.replace(private, public_name(private), 1)
        assert replaced != url
        status, body = fetch(replaced)
        assert status == 403, (status, body[:300])
        assert b"SignatureDoesNotMatch" in body
    finally:
        store.delete(key)
