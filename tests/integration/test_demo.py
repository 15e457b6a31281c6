"""`./scripts/demo`, the README's first command, runs to the end and leaves nothing running."""

from __future__ import annotations

import os
import re
import signal
import subprocess
import time
from pathlib import Path

import pytest

from tests.fleet_fixtures import REPO

pytestmark = pytest.mark.integration


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
    time.sleep(0.5)
    assert not demo_processes(str(tmp_path)), "the demo left processes running"


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
