"""`producer gallery`: a self-contained page that loads every image in headless Chromium, with
each image's recipe, and a contact sheet."""

from __future__ import annotations

import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
from PIL import Image

from fleet.contract import JobSpec

pytestmark = pytest.mark.integration

CHROMIUM_FLAGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-background-networking",
                  "--disable-component-update", "--disable-sync", "--no-first-run",
                  "--disable-quic"]  # fmt: skip


def test_gallery_page_loads_every_image_in_chromium(worker, client, fleet_env, tmp_path: Path):
    handles = client.submit_many(
        [JobSpec(prompt=f"gallery {i}", width=64, height=96, steps=2, images=2, seed=10 * i)
         for i in range(3)]
    )  # fmt: skip
    ids = [h.job_id for h in handles]
    assert {s.state for s in client.wait(ids, timeout=120)} == {"succeeded"}
    out = tmp_path / "gallery"
    proc = subprocess.run([sys.executable, "-m", "producer", "gallery", *ids, "--output", str(out)],
                          env=fleet_env, capture_output=True, text=True)  # fmt: skip
    assert proc.returncode == 0, proc.stderr
    page = (out / "index.html").read_text()
    assert "http" not in re.sub(r"<!doctype html>|<html[^>]*>", "", page).split("<script>")[0]
    assert page.count("<img ") == 6 and "gallery 2" in page and "seed" in page
    with Image.open(out / "contact-sheet.png") as sheet:
        assert sheet.size == (4 * 256, 2 * 256)

    chromium = shutil.which("chromium") or shutil.which("chromium-browser")
    assert chromium, "chromium is installed by scripts/test (Debian package chromium)"
    profile = tmp_path / "profile"
    dom = subprocess.run(
        [chromium, *CHROMIUM_FLAGS, f"--user-data-dir={profile}", "--virtual-time-budget=5000",
         "--dump-dom", (out / "index.html").as_uri()],
        capture_output=True, text=True, timeout=120,
    ).stdout  # fmt: skip
    assert 'data-total="6"' in dom and 'data-loaded="6"' in dom, dom[-500:]
    shot = tmp_path / "shot.png"
    subprocess.run([chromium, *CHROMIUM_FLAGS, f"--user-data-dir={profile}",
                    f"--screenshot={shot}", "--window-size=1200,900",
                    (out / "index.html").as_uri()], capture_output=True, timeout=120)  # fmt: skip
    assert shot.exists() and shot.stat().st_size > 0
