"""The lockfiles requirements/*.txt: current with pyproject.toml, complete, free of torch, and
what this environment runs (scripts/lockfile.py; scripts/bootstrap installs them with --no-deps).

Offline and fast: nothing is resolved or downloaded. A change to pyproject.toml's dependencies
without `scripts/lock` fails the first test; a lockfile that misses a package the project
needs fails the completeness test; a .venv that differs from its lockfile fails
test_the_installed_packages_are_the_lockfiles_pins.
"""

from __future__ import annotations

import functools
import re
import sys
from importlib import metadata
from pathlib import Path

import pytest
import tomllib
from packaging.markers import Marker
from packaging.requirements import Requirement
from packaging.specifiers import SpecifierSet
from packaging.version import Version

from scripts import lockfile
from tests.fleet_fixtures import REPO

PYPROJECT_TEXT = (REPO / "pyproject.toml").read_text()
PROJECT = tomllib.loads(PYPROJECT_TEXT)["project"]
LOCKS = {lock.name: lock for lock in lockfile.LOCKS}


def _applies(marker: str) -> bool:
    return not marker or Marker(marker).evaluate()


def _pins_here(lock: lockfile.Lock) -> dict[str, str]:
    """name -> version of the lines that apply to this interpreter and platform."""
    here: dict[str, str] = {}
    for name, version, marker in lockfile.pins(lock.path.read_text()):
        if _applies(marker):
            assert name not in here, f"{lock.path.name}: two pins of {name} apply here"
            here[name] = version
    return here


def _requirements(lock: lockfile.Lock) -> list[Requirement]:
    """What pyproject.toml asks for in the install that this lockfile is for."""
    lines = list(PROJECT["dependencies"])
    for extra in lock.extras:
        lines += PROJECT["optional-dependencies"][extra]
    return [Requirement(line) for line in lines]


def _via(lock_text: str) -> dict[str, set[str]]:
    """name -> what needs it, from uv's `# via` annotations."""
    via: dict[str, set[str]] = {}
    current = None
    for line in lock_text.splitlines():
        match = lockfile.PIN.match(line)
        if match:
            current = lockfile.canonical(match["name"])
            via.setdefault(current, set())
        elif (
            current
            and (found := re.match(r"\s+#\s+(?:via\s+)?(\S.*)$", line))
            and found.group(1) != "via"
        ):
            via[current].add(found.group(1).split()[0])
    return via


@functools.cache
def _installed_requires() -> dict[str, list[str]]:
    return {
        lockfile.canonical(dist.metadata["Name"]): dist.requires or []
        for dist in metadata.distributions()
    }


def _needed(requirements: list[Requirement]) -> dict[str, str]:
    """Every distribution these requirements need here, transitively, with one that needs it;
    read from the installed metadata, torch's own dependencies left out (torch is installed
    on its own, before the lockfile)."""
    needed: dict[str, str] = {}
    todo = [(req, "pyproject.toml") for req in requirements]
    seen: set[tuple[str, frozenset[str]]] = set()
    while todo:
        req, by = todo.pop()
        name = lockfile.canonical(req.name)
        key = (name, frozenset(req.extras))
        if key in seen:
            continue
        seen.add(key)
        needed.setdefault(name, by)
        if name in lockfile.EXCLUDED:
            continue
        for line in _installed_requires().get(name, []):
            dep = Requirement(line)
            wanted = {"", *req.extras}
            if dep.marker is None or any(dep.marker.evaluate({"extra": e}) for e in wanted):
                todo.append((dep, name))
    return needed


def test_each_lockfile_was_made_from_this_pyproject_toml() -> None:
    want = lockfile.deps_digest(PYPROJECT_TEXT)
    for lock in LOCKS.values():
        got = lockfile.recorded_digest(lock.path.read_text())
        assert got == want, (
            f"{lock.path.relative_to(REPO)} was made from other dependencies than "
            "pyproject.toml's: run scripts/lock (and commit requirements/)"
        )
    assert lockfile.stale_locks() == []


def test_the_digest_follows_the_dependencies_and_nothing_else() -> None:
    base = lockfile.deps_digest(PYPROJECT_TEXT)
    first, last = PROJECT["dependencies"][0], PROJECT["dependencies"][-1]
    assert f'"{first}",' in PYPROJECT_TEXT
    changed = {
        "a new requirement": PYPROJECT_TEXT.replace(f'"{first}",', f'"{first}", "attrs>=23",', 1),
        "a bound": PYPROJECT_TEXT.replace('"pytest>=8"', '"pytest>=9"', 1),
        "requires-python": PYPROJECT_TEXT.replace(
            f'requires-python = "{PROJECT["requires-python"]}"', 'requires-python = ">=3.12"', 1
        ),
        "a new extra": PYPROJECT_TEXT.replace(
            "[project.optional-dependencies]", '[project.optional-dependencies]\ngui = ["tk"]', 1
        ),
    }
    for what, text in changed.items():
        assert text != PYPROJECT_TEXT, what
        assert lockfile.deps_digest(text) != base, f"{what} left the digest as it was"
    same = {
        "a tool setting": PYPROJECT_TEXT.replace("line-length = 100", "line-length = 99", 1),
        "a comment": PYPROJECT_TEXT.replace("dependencies = [", "dependencies = [  # note", 1),
        "the order": PYPROJECT_TEXT.replace(f'"{last}",', "", 1).replace(
            "dependencies = [", f'dependencies = [\n    "{last}",', 1
        ),
    }
    for what, text in same.items():
        assert text != PYPROJECT_TEXT, what
        assert lockfile.deps_digest(text) == base, f"{what} changed the digest"


def test_no_lockfile_holds_torch_its_cuda_libraries_or_what_only_torch_needs() -> None:
    for lock in LOCKS.values():
        text = lock.path.read_text()
        names = {name for name, _, _ in lockfile.pins(text)}
        assert names, lock.path.name
        banned = {n for n in names if n.startswith(lockfile.FORBIDDEN_PREFIXES)}
        assert not banned, f"{lock.path.name} pins {sorted(banned)}"
        # Left out of the resolution, torch is nobody's reason to be in the file: a package
        # torch needs is there only because something else needs it too.
        for name, sources in _via(text).items():
            assert sources, f"{lock.path.name}: no annotation for {name}"
            assert not any(s.startswith(lockfile.FORBIDDEN_PREFIXES) for s in sources), (
                f"{lock.path.name}: {name} is there via {sorted(sources)}"
            )


def test_every_requirement_of_pyproject_is_pinned_within_its_bounds() -> None:
    for lock in LOCKS.values():
        pinned: dict[str, list[str]] = {}
        for name, version, _ in lockfile.pins(lock.path.read_text()):
            pinned.setdefault(name, []).append(version)
        for req in _requirements(lock):
            name = lockfile.canonical(req.name)
            if name in lockfile.EXCLUDED:
                assert name not in pinned
                continue
            assert name in pinned, f"{lock.path.name} does not pin {req}"
            for version in pinned[name]:
                assert SpecifierSet(str(req.specifier)).contains(version, prereleases=True), (
                    f"{lock.path.name}: {name}=={version} is outside pyproject's {req}"
                )


def test_each_lockfile_holds_everything_its_install_needs() -> None:
    # Installed with --no-deps, a missing package would only show at import time.
    for lock in LOCKS.values():
        here = _pins_here(lock)
        needed = _needed(_requirements(lock))
        torch_only = lockfile.torch_closure() - set(needed)
        missing = {
            name: by
            for name, by in needed.items()
            if name not in here and name not in lockfile.EXCLUDED and name not in torch_only
        }
        assert not missing, f"{lock.path.name} lacks (package: needed by) {missing}"
        unused = set(here) - set(needed)
        assert not unused, f"{lock.path.name} pins what its install does not need: {unused}"


def test_the_three_lockfiles_give_a_package_the_same_version() -> None:
    dev = LOCKS["dev"]
    everywhere = {(n, v) for n, v, _ in lockfile.pins(dev.path.read_text())}
    for lock in LOCKS.values():
        for name, version, _ in lockfile.pins(lock.path.read_text()):
            assert (name, version) in everywhere, f"{lock.path.name}: {name}=={version} not in dev"
        # The smaller installs are parts of the development one, as pyproject's extras are.
        assert set(_pins_here(lock).items()) <= set(_pins_here(dev).items())
    assert set(LOCKS["producer"].extras) < set(LOCKS["worker"].extras) < set(dev.extras)


def test_the_installed_packages_are_the_lockfiles_pins() -> None:
    # scripts/bootstrap records what it installed; CI and users install the same way.
    stamp = Path(sys.prefix) / ".fleet-installed"
    assert stamp.is_file(), f"{sys.prefix} was not made by scripts/bootstrap"
    # "<digest> <FLEET_TORCH_SPEC> <FLEET_EXTRAS>"
    head, _, extras = stamp.read_text().rstrip("\n").rpartition(" ")
    torch_spec = head.partition(" ")[2]
    lock = lockfile.lock_for_extras(extras)
    installed = {
        lockfile.canonical(dist.metadata["Name"]): dist.version for dist in metadata.distributions()
    }
    wrong = {
        name: (version, installed.get(name))
        for name, version in _pins_here(lock).items()
        if installed.get(name) != version
    }
    assert not wrong, (
        f"(locked, installed) differ from {lock.path.name}: {wrong}: "
        f"rm {stamp} and run scripts/bootstrap"
    )
    own = lockfile.canonical(PROJECT["name"])
    assert installed[own] == PROJECT["version"]
    extra = set(installed) - set(_pins_here(lock)) - lockfile.torch_closure() - {own, "pip"}
    assert not extra, f"installed, and not in {lock.path.name} nor needed by torch: {extra}"
    if "worker" in lock.extras:
        torch = Requirement(torch_spec)
        assert torch.name == "torch"
        assert torch.specifier.contains(Version(installed["torch"]), prereleases=True)


@pytest.mark.parametrize(
    ("extras", "name"),
    [
        ("worker,local,dev", "dev"),
        ("dev, worker,local", "dev"),
        ("worker", "worker"),
        ("", "producer"),
    ],
)
def test_bootstrap_finds_the_lockfile_of_its_extras(extras: str, name: str) -> None:
    assert lockfile.lock_for_extras(extras).name == name


def test_bootstrap_refuses_extras_that_have_no_lockfile() -> None:
    # FLEET_EXTRAS=worker,dev would otherwise install a lockfile made for another set.
    with pytest.raises(SystemExit, match="no lockfile for the extras 'worker,dev'"):
        lockfile.lock_for_extras("worker,dev")
