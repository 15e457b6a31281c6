"""`./scripts/demo`, the README's first command, runs to the end and leaves nothing running; it
also makes an image through the HTTP gateway and prints calls for it (curl, the openai SDK) that
work against it."""

from __future__ import annotations

import io
import json
import os
import re
import shlex
import signal
import subprocess
import sys
import textwrap
import time
from dataclasses import dataclass
from pathlib import Path

import httpx
import pytest
from PIL import Image

from tests.fleet_fixtures import REPO

pytestmark = pytest.mark.integration

KEY = r"dfk_[0-9a-f]{12}_[A-Za-z0-9_-]+"


def demo_processes(marker: str) -> set[int]:
    """Pids of live processes started by this demo run (their environment carries ``marker``)."""
    pids = set()
    for proc in Path("/proc").iterdir():
        if not proc.name.isdigit():
            continue
        try:
            environ = (proc / "environ").read_bytes()
            state = (proc / "stat").read_text().rsplit(")", 1)[1].split()[0]
        except OSError:
            continue
        if marker.encode() in environ and state != "Z":
            pids.add(int(proc.name))
    return pids


def demo_env(tmp_path: Path) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("FLEET_")}
    env["FLEET_DEMO_OUTPUT"] = str(tmp_path / "demo")
    return env


@dataclass
class PrintedCalls:
    """The gateway calls the demo printed: the curl argv and the openai SDK snippet."""

    curl: list[str]
    python: str
    port: int
    key: str


def printed_calls(stdout: str) -> PrintedCalls:
    """The demo's closing block, checked: a curl call and a Python snippet for the same gateway
    (its loopback port) and the same API key, the one printed for tenant demo."""
    (key,) = re.findall(rf"^API key of tenant demo: ({KEY})$", stdout, re.M)
    curl_block = re.search(r"^curl:\n((?:  .*\n)+)", stdout, re.M)
    assert curl_block, stdout[-3000:]
    argv = shlex.split(curl_block.group(1).replace("\\\n", " "))
    assert argv[:2] == ["curl", "-sS"], argv
    url = re.fullmatch(r"http://127\.0\.0\.1:(\d+)/v1/images/generations", argv[2])
    assert url, argv
    assert argv[3:7] == [
        "-H",
        f"Authorization: Bearer {key}",
        "-H",
        "Content-Type: application/json",
    ]
    assert argv[7] == "-d" and len(argv) == 9, argv
    body = json.loads(argv[8])
    assert body == {"prompt": "a lighthouse on a cliff at dusk", "size": "128x128", "steps": 8,
                    "response_format": "url"}  # fmt: skip
    py_block = re.search(r"^Python, with the openai SDK.*\n((?:(?:  .*)?\n)+)", stdout + "\n", re.M)
    assert py_block, stdout[-3000:]
    python = textwrap.dedent(py_block.group(1)).strip() + "\n"
    compile(python, "printed snippet", "exec")  # valid Python as printed
    port = int(url.group(1))
    assert f'base_url="http://127.0.0.1:{port}/v1"' in python
    assert f'api_key="{key}"' in python
    assert 'size="128x128"' in python and 'extra_body={"steps": 8}' in python
    assert "from openai import OpenAI" in python and "images.generate(" in python
    return PrintedCalls(argv, python, port, key)


def fetch_png(url: str) -> tuple[int, int]:
    answer = httpx.get(url, timeout=30)
    assert answer.status_code == 200, answer.text[:500]
    with Image.open(io.BytesIO(answer.content)) as img:
        assert img.format == "PNG"
        return img.size


def test_demo_prints_stored_images_and_stops_everything(tmp_path: Path) -> None:
    proc = subprocess.run(
        [str(REPO / "scripts" / "demo")], cwd=tmp_path, env=demo_env(tmp_path),
        capture_output=True, text=True, timeout=600,
    )  # fmt: skip
    assert proc.returncode == 0, proc.stdout + proc.stderr
    keys = re.findall(r"s3://fleet/(jobs/\S+/image-000\.png)", proc.stdout)
    assert len(keys) == 3
    assert proc.stdout.count("url: http://127.0.0.1:") == 3
    files = sorted((tmp_path / "demo").glob("*.png"))
    assert len(files) == 3 and all(f.stat().st_size > 0 for f in files)
    # The gateway made one more image with the very curl call printed (data[0].url) for the
    # demo tenant, stored in the demo's S3 (the same endpoint as the images above).
    s3 = re.findall(r"url: (http://127\.0\.0\.1:\d+)/fleet/jobs/", proc.stdout)
    (image,) = re.findall(r"^gateway image: (\S+)$", proc.stdout, re.M)
    assert re.fullmatch(re.escape(s3[0]) + r"/fleet/tenants/demo/jobs/\w+/image-000\.png\?\S+",
                        image), image  # fmt: skip
    calls = printed_calls(proc.stdout)
    assert f"http://127.0.0.1:{calls.port}/docs" in proc.stdout
    time.sleep(0.5)
    assert not demo_processes(str(tmp_path)), "the demo left processes running"


def test_demo_serve_keeps_the_gateway_up_for_the_printed_calls(tmp_path: Path) -> None:
    """FLEET_DEMO_SERVE=1: after its images the demo keeps running; the curl call and the openai
    SDK snippet it printed, run as printed, each give an image; Ctrl-C stops it all."""
    err = (tmp_path / "stderr").open("w")
    proc = subprocess.Popen(
        [str(REPO / "scripts" / "demo"), "a red fox in fresh snow"], cwd=tmp_path,
        env={**demo_env(tmp_path), "FLEET_DEMO_SERVE": "1"}, stdout=subprocess.PIPE, stderr=err,
        text=True, start_new_session=True,
    )  # fmt: skip
    assert proc.stdout is not None
    try:
        seen = []
        for line in proc.stdout:
            seen.append(line)
            if line.strip() == "print(image.data[0].url)":
                break
        out = "".join(seen)
        assert proc.poll() is None, out + (tmp_path / "stderr").read_text()[-3000:]
        calls = printed_calls(out)

        curl = subprocess.run(calls.curl, capture_output=True, text=True, timeout=300)
        assert curl.returncode == 0, curl.stderr
        answer = json.loads(curl.stdout)
        assert fetch_png(answer["data"][0]["url"]) == (128, 128)

        sdk = subprocess.run([sys.executable, "-c", calls.python], capture_output=True, text=True,
                             timeout=300, env=demo_env(tmp_path))  # fmt: skip
        assert sdk.returncode == 0, sdk.stderr[-3000:]
        (url,) = sdk.stdout.split()
        assert url != answer["data"][0]["url"]  # a job of its own
        assert fetch_png(url) == (128, 128)
        assert proc.poll() is None  # still serving

        os.killpg(proc.pid, signal.SIGINT)  # what Ctrl-C does in a terminal
        proc.wait(timeout=60)
        assert proc.returncode != 0
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait(30)
        err.close()
    deadline = time.monotonic() + 15
    while time.monotonic() < deadline and demo_processes(str(tmp_path)):
        time.sleep(0.2)
    assert not demo_processes(str(tmp_path)), "Ctrl-C left processes running"


def test_demo_stops_everything_on_ctrl_c(tmp_path: Path) -> None:
    proc = subprocess.Popen(
        [str(REPO / "scripts" / "demo")], cwd=tmp_path, env=demo_env(tmp_path),
        stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, start_new_session=True,
    )  # fmt: skip
    assert proc.stdout is not None
    for line in proc.stdout:
        if "waiting for worker" in line:
            break
    started = demo_processes(str(tmp_path))
    assert len(started) >= 4  # the scripts, Redis, SeaweedFS and the worker
    os.killpg(proc.pid, signal.SIGINT)  # what Ctrl-C does in a terminal
    proc.wait(timeout=60)
    assert proc.returncode != 0
    assert "s3://" not in "".join(proc.stdout)
    deadline = time.monotonic() + 15
    while time.monotonic() < deadline and demo_processes(str(tmp_path)):
        time.sleep(0.2)
    assert not demo_processes(str(tmp_path)), "Ctrl-C left processes running"
