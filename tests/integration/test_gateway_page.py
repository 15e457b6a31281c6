"""The gateway's web page (`/`) and its API reference (`/docs`) in headless Chromium, driven by
Playwright: a key and a prompt typed into the page give an image that loads, with the job's
steps shown as they come; the key never goes in a URL; and both pages work offline (Chromium
resolves no host name here, so a CDN could not load)."""

from __future__ import annotations

import os
import re
import shutil
from collections.abc import Iterator
from typing import Any
from urllib.parse import urlsplit

import pytest
from playwright.sync_api import Browser, Page, Request, expect, sync_playwright

from tests.gateway_fixtures import GatewayProcess, new_tenant

pytestmark = pytest.mark.integration

LOOPBACK = {"127.0.0.1", "localhost", "::1"}
# Chromium offline: every host name fails to resolve but the loopback ones (the rule applies to
# IP literals too, so 127.0.0.1 is excluded by name).
OFFLINE = "--host-resolver-rules=MAP * ~NOTFOUND, EXCLUDE localhost, EXCLUDE 127.0.0.1"
STEPS = 4
SIDE = 64
TIMEOUT_MS = 90_000  # the first job may wait for the session worker's model to load
# What Swagger UI shows instead of the operations when it cannot read the document.
SWAGGER_PROBLEMS = ".swagger-ui .version-pragma, .swagger-ui .errors-wrapper"

# Every text the page's state line shows, in order: the last one alone (succeeded) says nothing
# of the steps before it. Each `textContent = ...` adds a new text node, kept in the record
# even when several changes come in one batch.
STATE_RECORDER = """
window.__states = [];
document.addEventListener("DOMContentLoaded", () => {
  const el = document.getElementById("state");
  new MutationObserver((records) => {
    for (const r of records) for (const n of r.addedNodes) window.__states.push(n.textContent);
  }).observe(el, { childList: true });
});
"""


@pytest.fixture(scope="module")
def browser() -> Iterator[Browser]:
    chromium = shutil.which("chromium") or shutil.which("chromium-browser")
    assert chromium, "chromium is installed by scripts/test (Debian package chromium)"
    args = ["--disable-gpu", "--disable-background-networking", "--disable-component-update",
            "--disable-sync", "--no-first-run", "--disable-quic",
            OFFLINE]  # fmt: skip
    if os.geteuid() == 0:
        args.append("--no-sandbox")
    with sync_playwright() as p:
        b = p.chromium.launch(executable_path=chromium, headless=True, args=args)
        yield b
        b.close()


class Traffic:
    """What a page asked for: every request, those that failed, and answers of 400 or more."""

    def __init__(self, page: Page) -> None:
        self.requests: list[Request] = []
        self.failed: list[str] = []
        self.errors: list[str] = []
        page.on("request", lambda r: self.requests.append(r))
        page.on("requestfailed", lambda r: self.failed.append(f"{r.url}: {r.failure}"))
        page.on("response", lambda r: r.status >= 400 and self.errors.append(f"{r.status} {r.url}"))

    @property
    def urls(self) -> list[str]:
        return [r.url for r in self.requests]


def test_page_makes_an_image_with_live_steps_keeping_the_key_out_of_urls(
    browser: Browser, gateway: GatewayProcess, tenants: Any
) -> None:
    _, key = new_tenant(tenants)
    context = browser.new_context()
    try:
        page = context.new_page()
        traffic = Traffic(page)
        page.add_init_script(STATE_RECORDER)
        page.goto(gateway.url + "/")
        page.fill("#key", key)
        page.fill("#prompt", "a lighthouse at dusk, from the page test")
        page.fill("#size", f"{SIDE}x{SIDE}")
        page.fill("#steps", str(STEPS))
        page.fill("#n", "1")
        page.click("#go")

        # An image, or the page's error line: whichever comes first ends the wait.
        page.wait_for_function(
            "() => document.querySelector('#images img')"
            " || document.getElementById('error').textContent",
            timeout=TIMEOUT_MS,
        )
        expect(page.locator("#error")).to_have_text("")
        img = page.locator("#images img")
        expect(img).to_have_count(1)
        expect(page.locator("#state")).to_have_text(re.compile(r"^job \S+: succeeded$"))
        expect(page.locator("#go")).to_be_enabled()
        # Loaded, not broken: a broken image is complete too, with naturalWidth 0.
        page.wait_for_function(
            "() => document.querySelector('#images img').complete", timeout=TIMEOUT_MS
        )
        size = page.evaluate(
            "() => { const i = document.querySelector('#images img');"
            " return [i.naturalWidth, i.naturalHeight]; }"
        )
        assert size == [SIDE, SIDE]
        src = img.get_attribute("src") or ""
        assert src in traffic.urls

        # The steps went by: the state line said each one, in order, up to the step count the
        # events reported (the tiny model's PNDM scheduler runs one more timestep than the job's
        # steps, and reports it), and the bar ended full at that count.
        states = page.evaluate("() => window.__states")
        seen = [tuple(map(int, m.groups())) for s in states
                if (m := re.search(r": step (\d+)/(\d+)$", s))]  # fmt: skip
        assert seen, states
        totals = {total for _, total in seen}
        assert len(totals) == 1, states
        (total,) = totals
        assert STEPS <= total <= STEPS + 1, states
        assert [n for n, _ in seen] == list(range(1, total + 1)), states
        bar = page.evaluate("() => { const b = document.getElementById('bar');"
                            " return [b.max, b.value, b.hidden]; }")  # fmt: skip
        assert bar == [total, total, False]
        assert re.search(r": queued|: started", " ".join(states)), states

        # The key went in the Authorization header of the API calls, and in no URL.
        api = [r for r in traffic.requests if urlsplit(r.url).path.startswith("/v1/")]
        assert {(r.method, urlsplit(r.url).path.rsplit("/", 1)[-1]) for r in api} >= {
            ("POST", "jobs"), ("GET", "events")}  # fmt: skip
        for r in api:
            assert r.all_headers().get("authorization") == f"Bearer {key}", r.url
        assert not [u for u in traffic.urls if key in u or key.split("_", 2)[-1] in u]
        # Offline: the page, its API calls and the image all came from loopback.
        assert {urlsplit(u).hostname for u in traffic.urls} <= LOOPBACK, traffic.urls
        # Chromium reports a `Cache-Control: no-store` stream with an Authorization header,
        # read through a reader to its end, as ERR_ABORTED: not a failure (the page got the
        # stream's last event, succeeded, above).
        failed = [f for f in traffic.failed if not re.search(r"/events: net::ERR_ABORTED$", f)]
        assert not failed and not traffic.errors, (failed, traffic.errors)
    finally:
        context.close()


def test_docs_render_offline_from_the_gateway_alone(
    browser: Browser, gateway: GatewayProcess
) -> None:
    context = browser.new_context()
    try:
        page = context.new_page()
        traffic = Traffic(page)
        page.goto(gateway.url + "/docs")  # returns once loaded: Swagger UI's script and style
        assert not traffic.failed and not traffic.errors, (traffic.failed, traffic.errors)
        # Then Swagger UI renders the operations, or says why it cannot (a version it does not
        # read, a document it could not fetch): whichever comes first ends the wait.
        page.locator(f".swagger-ui .opblock, {SWAGGER_PROBLEMS}").first.wait_for(timeout=30_000)
        problems = page.locator(SWAGGER_PROBLEMS)
        assert problems.count() == 0, problems.all_inner_texts()
        operation = page.locator('.swagger-ui .opblock-post [data-path="/v1/images/generations"]')
        expect(operation).to_be_visible()
        expect(page.locator('.swagger-ui [data-path="/v1/jobs/{job_id}/events"]')).to_be_visible()
        expect(page.locator(".swagger-ui .info .title")).to_contain_text("diffusion-fleet gateway")
        page.wait_for_load_state("networkidle")

        # Every request went to the gateway itself: the page, Swagger UI's script and style,
        # the icon and the OpenAPI document; none to a CDN.
        origin = gateway.url + "/"
        assert all(u.startswith(origin) for u in traffic.urls), traffic.urls
        paths = {urlsplit(u).path for u in traffic.urls}
        assert {"/docs", "/openapi.json", "/static/swagger/swagger-ui-bundle.js",
                "/static/swagger/swagger-ui.css"} <= paths, paths  # fmt: skip
        assert not traffic.failed and not traffic.errors, (traffic.failed, traffic.errors)
    finally:
        context.close()
