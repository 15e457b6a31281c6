"""The wheel users install holds every package, and the worker image copies what it needs."""

from __future__ import annotations

import re
import shutil
import subprocess
import sys
import zipfile
from pathlib import Path

from scripts import lockfile
from tests.fleet_fixtures import REPO

PACKAGES = ("fleet", "producer", "worker")


def _source_modules() -> set[str]:
    return {
        str(p.relative_to(REPO))
        for pkg in PACKAGES
        for p in (REPO / pkg).rglob("*.py")
        if "__pycache__" not in p.parts
    }


def test_the_wheel_holds_every_module_and_imports_without_the_checkout(tmp_path: Path) -> None:
    # Built from a copy of the sources, so no build/ or egg-info left in the checkout can fill in
    # a package the packaging configuration misses.
    src = tmp_path / "src"
    for name in ("pyproject.toml", "README.md"):
        src.mkdir(exist_ok=True)
        shutil.copy(REPO / name, src / name)
    for pkg in PACKAGES:
        shutil.copytree(REPO / pkg, src / pkg, ignore=shutil.ignore_patterns("__pycache__"))
    subprocess.run(
        [sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "-q",
         "-w", str(tmp_path / "dist"), str(src)],
        check=True, cwd=tmp_path,
    )  # fmt: skip
    (wheel,) = (tmp_path / "dist").glob("diffusion_fleet-*.whl")
    names = set(zipfile.ZipFile(wheel).namelist())
    missing = _source_modules() - names
    assert not missing, f"not in the wheel: {sorted(missing)}"
    assert {f"{pkg}/__init__.py" for pkg in PACKAGES} <= names
    assert {"worker/engine/__init__.py", "worker/ops/__init__.py"} <= names

    # Imported from the unpacked wheel, not from this checkout (the editable install).
    site = tmp_path / "site"
    zipfile.ZipFile(wheel).extractall(site)
    code = (
        "import sys; sys.path.insert(0, sys.argv[1]);"
        "import fleet.settings, fleet.celeryconf, producer.cli, worker.app, worker.tasks;"
        "import worker.runner, worker.oneshot, worker.engine.engine, worker.ops.launch;"
        "mods = [fleet.settings, producer.cli, worker.tasks, worker.engine.engine];"
        "bad = [m.__name__ for m in mods if not m.__file__.startswith(sys.argv[1])];"
        "sys.exit(f'imported from elsewhere: {bad}' if bad else 0)"
    )
    run = subprocess.run([sys.executable, "-c", code, str(site)], cwd=tmp_path,
                         capture_output=True, text=True, check=False)  # fmt: skip
    assert run.returncode == 0, run.stderr[-2000:]


def test_the_worker_image_copies_the_core_and_the_worker_only() -> None:
    dockerfile = (REPO / "docker" / "worker.Dockerfile").read_text()
    copied = set(re.findall(r"^COPY (\w+) \./\1$", dockerfile, re.M))
    assert copied == {"fleet", "worker"}
    # What the image imports at build time resolves inside those two packages (the layers
    # contract keeps worker/ off producer/; this is the image's own check).
    assert 'python -c "import worker.app, worker.tasks, worker.runtime"' in dockerfile
    ignored = (REPO / ".dockerignore").read_text().split()
    assert "fleet/localdev.py" in ignored  # a development tool, not part of the image


def _dockerfile_instructions() -> list[tuple[str, str]]:
    """(instruction, arguments) of each line of the worker image, continuations joined."""
    text = (REPO / "docker" / "worker.Dockerfile").read_text().replace("\\\n", " ")
    found = []
    for line in text.splitlines():
        line = line.strip()
        if line and not line.startswith("#"):
            keyword, _, rest = line.partition(" ")
            found.append((keyword.upper(), " ".join(rest.split())))
    return found


def test_the_worker_image_installs_torch_then_the_lockfile_then_the_project_without_deps() -> None:
    # The image runs what CI tests: torch pinned, then the worker lockfile's exact pins, then the
    # project; no step in between resolves a dependency of its own.
    lock = lockfile.lock_for_extras("worker")
    lock_path = str(lock.path.relative_to(REPO))
    steps = _dockerfile_instructions()
    installs = [
        (i, part.strip())
        for i, (keyword, args) in enumerate(steps)
        if keyword == "RUN"
        for part in args.split("&&")
        if "pip install" in part
    ]
    assert len(installs) == 3, installs
    (torch_at, torch), (lock_at, locked), (own_at, own) = installs
    assert torch.endswith('"$TORCH_SPEC"') and "--no-deps" not in torch and " -r " not in torch
    # Pinned, and by default the torch that scripts/bootstrap installs for CI.
    (image_torch,) = [
        a.partition("=")[2] for _, a in steps[:torch_at] if a.startswith("TORCH_SPEC=")
    ]
    bootstrap = (REPO / "scripts" / "bootstrap").read_text()
    ci_torch = re.search(r"\$\{FLEET_TORCH_SPEC:-([^}]+)\}", bootstrap)
    assert ci_torch and image_torch == ci_torch.group(1)
    assert re.fullmatch(r"torch==\d+\.\d+\.\d+", image_torch)
    assert locked == f"pip install --no-deps -r {lock_path}"
    assert own == "pip install --no-deps ."
    assert torch_at < lock_at < own_at
    # The pins go in before the sources, so a code change does not reinstall them.
    lock_copy = steps.index(("COPY", f"{lock_path} ./requirements/"))
    assert lock_copy < lock_at < steps.index(("COPY", "fleet ./fleet")) < own_at
    # And then the three together: torch's requirements, the pins, the project's.
    assert "pip check" in steps[own_at][1].split("&&", 1)[1]
    assert lock.extras == ("worker",)
    assert not any(
        name.startswith(lockfile.FORBIDDEN_PREFIXES)
        for name, _, _ in lockfile.pins(lock.path.read_text())
    )
