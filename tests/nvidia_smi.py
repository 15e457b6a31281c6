"""A stub ``nvidia-smi`` for GPU discovery on machines without a GPU.

It prints, byte for byte, what the real ``nvidia-smi -L`` printed on a real host (the files and
their sources: ``tests/fixtures/nvidia-smi/SOURCES.md``); any other arguments exit 2, so a
launcher that ran another command would fail its test.
"""

from __future__ import annotations

import os
import stat
from pathlib import Path

from tests.fleet_fixtures import REPO

FIXTURES = REPO / "tests" / "fixtures" / "nvidia-smi"

#: `nvidia-smi -L` of four A100-SXM4-80GB, GPU 0 in MIG mode with four 1g.20gb instances
#: (influxdata/telegraf#5812).
A100X4_MIG_ON_GPU0 = FIXTURES / "a100x4-mig-on-gpu0.L.txt"
#: `nvidia-smi -L` of one A100-SXM4-80GB with seven 1g.10gb MIG instances
#: (DataDog/datadog-agent#33120).
A100_MIG7 = FIXTURES / "a100-mig7.L.txt"


def install(bin_dir: Path, listing: Path) -> Path:
    """Write an executable ``nvidia-smi`` into ``bin_dir`` that answers ``-L`` with ``listing``."""
    bin_dir.mkdir(parents=True, exist_ok=True)
    stub = bin_dir / "nvidia-smi"
    stub.write_text(
        "#!/bin/sh\n"
        f"# Stub: prints what nvidia-smi -L printed on a real host ({listing.name}).\n"
        'case "$*" in\n'
        f"  -L|--list-gpus) exec cat '{listing}' ;;\n"
        '  *) echo "stub nvidia-smi: not a command the launcher runs: $*" >&2; exit 2 ;;\n'
        "esac\n"
    )
    stub.chmod(stub.stat().st_mode | stat.S_IXUSR | stat.S_IXGRP | stat.S_IXOTH)
    return bin_dir


def path_with_stub(bin_dir: Path, listing: Path, path: str | None = None) -> str:
    """A PATH with the stub first."""
    rest = path if path is not None else os.environ["PATH"]
    return f"{install(bin_dir, listing)}{os.pathsep}{rest}"
