"""The lockfiles: written by `scripts/lock`, read by scripts/bootstrap, the worker image and tests.

    scripts/lock                        # after a change to pyproject.toml's dependencies
    scripts/lock --upgrade              # also move every pin to the newest allowed release
    scripts/lock --upgrade-package rich # ... or only this one (repeatable)
    scripts/lock check                  # exit 1 with a message when a lockfile is stale

One lockfile per install, resolved by `uv pip compile` for CPython >= 3.11 on any platform
(environment markers say which line applies where):

    requirements/dev.txt       the base install + worker, local, dev extras: bootstrap and CI
    requirements/worker.txt    the base install + worker extra: docker/worker.Dockerfile
    requirements/producer.txt  the base install: a service that only submits jobs

dev.txt is resolved first; the other two are resolved under it as constraints, so a package has
the same version in all three and what CI tests is what the image and the producer run.

torch is left out of the resolution (uv's --excludes), so nothing of it is in any lockfile: not
torch, not its CUDA libraries (nvidia-*, triton), not what only torch pulls in (sympy,
networkx, ...). Which torch build is right depends on the host; scripts/bootstrap and the image
install FLEET_TORCH_SPEC / TORCH_SPEC first, with its own dependencies, then a lockfile with
--no-deps, then the project with --no-deps, and `pip check` proves the three fit together.

Each lockfile's header records `# pyproject-deps-sha256: ...`, the digest of pyproject.toml's
dependency sections and of the recipe below; tests/unit/test_lockfile.py and scripts/bootstrap
refuse a lockfile whose digest is not the current one.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import re
import shutil
import subprocess
import sys
import tempfile
from dataclasses import dataclass
from importlib import metadata
from pathlib import Path

import tomllib

REPO = Path(__file__).resolve().parents[1]
PYPROJECT = REPO / "pyproject.toml"
LOCK_DIR = REPO / "requirements"
DIGEST_KEY = "# pyproject-deps-sha256:"
# The oldest Python the lockfiles serve: the dev extra's import-linter needs 3.11.
PYTHON = "3.11"
# Left out of the resolution, with everything only they pull in.
EXCLUDED = ("torch",)
# Never in a lockfile: torch's CUDA libraries (nvidia-*, cuda-*) and compiler (triton) come with
# the torch build.
FORBIDDEN_PREFIXES = ("torch", "nvidia-", "triton", "cuda-")
PIN = re.compile(r"(?P<name>[A-Za-z0-9][A-Za-z0-9._-]*)==(?P<version>[A-Za-z0-9.+!_-]+)")
NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]*")


@dataclass(frozen=True)
class Lock:
    name: str
    extras: tuple[str, ...]
    use: str

    @property
    def path(self) -> Path:
        return LOCK_DIR / f"{self.name}.txt"


# The first is resolved first; the others under it as constraints.
LOCKS = (
    Lock("dev", ("worker", "local", "dev"), "scripts/bootstrap and CI"),
    Lock("worker", ("worker",), "docker/worker.Dockerfile"),
    Lock("producer", (), "a service that only submits jobs"),
)


def lock_for_extras(extras: str) -> Lock:
    """The lockfile of a comma-separated extras list (scripts/bootstrap's FLEET_EXTRAS)."""
    wanted = sorted(e.strip() for e in extras.split(",") if e.strip())
    for lock in LOCKS:
        if sorted(lock.extras) == wanted:
            return lock
    known = ", ".join(repr(",".join(lock.extras)) for lock in LOCKS)
    raise SystemExit(f"no lockfile for the extras {extras!r}: use one of {known} (scripts/lock)")


def deps_digest(pyproject_text: str) -> str:
    """sha256 of what the lockfiles are made from: pyproject's dependency sections and the recipe.

    Parsed TOML, lists sorted: comments, layout and the order of requirements do not count; a
    requirement, an extra, requires-python or the recipe (LOCKS, PYTHON, EXCLUDED) does.
    """
    project = tomllib.loads(pyproject_text).get("project", {})
    optional = project.get("optional-dependencies", {})
    recipe = {
        "requires-python": project.get("requires-python"),
        "dependencies": sorted(project.get("dependencies", [])),
        "optional-dependencies": {k: sorted(v) for k, v in sorted(optional.items())},
        "locks": [[lock.name, list(lock.extras)] for lock in LOCKS],
        "python": PYTHON,
        "excluded": list(EXCLUDED),
    }
    blob = json.dumps(recipe, sort_keys=True, separators=(",", ":")).encode()
    return hashlib.sha256(blob).hexdigest()


def recorded_digest(lock_text: str) -> str | None:
    for line in lock_text.splitlines():
        if line.startswith(DIGEST_KEY):
            return line.removeprefix(DIGEST_KEY).split()[0]
    return None


def canonical(name: str) -> str:
    """A distribution name as PEP 503 compares them."""
    return re.sub(r"[-_.]+", "-", name).lower()


def pins(lock_text: str) -> list[tuple[str, str, str]]:
    """(canonical name, version, environment marker or "") of each `name==version` line."""
    found = []
    for raw in lock_text.splitlines():
        line = raw.split("#", 1)[0].strip()
        if not line:
            continue
        requirement, _, marker = line.partition(";")
        match = PIN.fullmatch(requirement.strip())
        if not match:
            raise ValueError(f"not a pin: {raw!r}")
        found.append((canonical(match["name"]), match["version"], marker.strip()))
    return found


def torch_closure() -> set[str]:
    """torch and every installed distribution it needs, transitively (its extras left out).

    Markers are not evaluated: a requirement that applies elsewhere only keeps a package in,
    it never takes one out.
    """
    seen: set[str] = set()
    todo = ["torch"]
    while todo:
        name = todo.pop()
        if name in seen:
            continue
        try:
            requires = metadata.requires(name) or []
        except metadata.PackageNotFoundError:
            continue
        seen.add(name)
        for requirement in requires:
            if "extra ==" in requirement.partition(";")[2]:
                continue
            match = NAME.match(requirement)
            if match:
                todo.append(canonical(match.group(0)))
    return seen


def leftovers(previous_lock: Path, current_lock: Path) -> list[str]:
    """What an earlier lockfile installed that the current one no longer has (nor torch needs)."""
    before = {name for name, _, _ in pins(previous_lock.read_text())}
    now = {name for name, _, _ in pins(current_lock.read_text())}
    return sorted(before - now - torch_closure())


def stale_locks() -> list[str]:
    """One line for each lockfile missing or made from another pyproject.toml."""
    want = deps_digest(PYPROJECT.read_text())
    problems = []
    for lock in LOCKS:
        if not lock.path.exists():
            problems.append(f"{lock.path.relative_to(REPO)} is missing")
        elif recorded_digest(lock.path.read_text()) != want:
            problems.append(
                f"{lock.path.relative_to(REPO)} was not made from this pyproject.toml's "
                "dependencies"
            )
    return problems


def find_uv() -> str:
    """uv from the project's .venv (pinned in requirements/dev.txt), else from the PATH."""
    venv = Path(os.environ.get("FLEET_VENV", REPO / ".venv"))
    if not venv.is_absolute():
        venv = REPO / venv
    for candidate in (venv / "bin" / "uv", shutil.which("uv")):
        if candidate and Path(candidate).is_file():
            return str(candidate)
    pinned = [v for n, v, _ in pins(LOCKS[0].path.read_text()) if n == "uv"] or [""]
    raise SystemExit(
        "scripts/lock needs uv: run scripts/bootstrap (uv is in the dev extra), or, when the "
        f"lockfiles are too stale for it, put uv on the PATH: pip install uv=={pinned[0]}"
    )


def header(lock: Lock, digest: str) -> str:
    extras = ",".join(lock.extras) or "none"
    return (
        f"{DIGEST_KEY} {digest}\n"
        f"# For {lock.use}: the base install + extras: {extras}; CPython >= {PYTHON}.\n"
        "# Without torch and what only torch pulls in (nvidia-*, triton, sympy...): install\n"
        "# the pinned torch build first, then this file with --no-deps (scripts/lockfile.py).\n"
    )


def write_locks(upgrade: bool, upgrade_packages: list[str]) -> None:
    uv = find_uv()
    digest = deps_digest(PYPROJECT.read_text())
    LOCK_DIR.mkdir(exist_ok=True)
    with tempfile.TemporaryDirectory() as tmp:
        excludes = Path(tmp) / "excludes.txt"
        excludes.write_text("".join(f"{name}\n" for name in EXCLUDED))
        first = LOCKS[0]
        for lock in LOCKS:
            argv = [
                uv, "pip", "compile", str(PYPROJECT.relative_to(REPO)),
                "--no-config", "--quiet", "--universal", "--python-version", PYTHON,
                "--excludes", str(excludes), "--custom-compile-command", "scripts/lock",
                "-o", str(lock.path.relative_to(REPO)),
            ]  # fmt: skip
            for extra in lock.extras:
                argv += ["--extra", extra]
            if lock is first:
                argv += ["--upgrade"] if upgrade else []
                for package in upgrade_packages:
                    argv += ["--upgrade-package", package]
            else:
                argv += ["-c", str(first.path.relative_to(REPO))]
            # uv takes the versions already in the output file as its preferences, so an
            # unchanged pyproject.toml gives unchanged pins.
            subprocess.run(argv, check=True, cwd=REPO)  # nosec B603  # uv, argument list, no shell
            text = lock.path.read_text()
            lines = text.splitlines(keepends=True)
            # uv's two lines ("autogenerated by uv via ...", "scripts/lock") stay on top.
            kept = [line for line in lines[2:] if not line.startswith("# ")]
            lock.path.write_text("".join([*lines[:2], header(lock, digest), *kept]))
            print(f"lock: wrote {lock.path.relative_to(REPO)}", file=sys.stderr)
    problems = stale_locks()
    if problems:
        raise SystemExit("lock: " + "; ".join(problems))


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="scripts/lock", description=__doc__.split("\n\n")[0])
    parser.add_argument(
        "command", nargs="?", choices=["write", "check", "path", "leftovers"], default="write",
        help="write (default): regenerate the lockfiles; check: are they current; "
        "path EXTRAS: the lockfile of those extras; leftovers OLD NEW: names to uninstall",
    )  # fmt: skip
    parser.add_argument("args", nargs="*", help=argparse.SUPPRESS)
    parser.add_argument("--upgrade", action="store_true", help="newest allowed release of all")
    parser.add_argument("--upgrade-package", action="append", default=[], metavar="NAME")
    args = parser.parse_args(argv)
    if args.command == "path":
        (extras,) = args.args or [""]
        print(lock_for_extras(extras).path.relative_to(REPO))
        return 0
    if args.command == "leftovers":
        old, new = (Path(a) for a in args.args)
        print(" ".join(leftovers(old, new)))
        return 0
    if args.command == "check":
        problems = stale_locks()
        for problem in problems:
            print(f"lock: {problem}: run scripts/lock", file=sys.stderr)
        return 1 if problems else 0
    write_locks(args.upgrade, args.upgrade_package)
    return 0


if __name__ == "__main__":
    sys.exit(main())
