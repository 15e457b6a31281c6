"""A folder of its own for prometheus-client's multiprocess mode, shared by the worker (its pool
children record, its main process serves) and the gateway (uvicorn's worker processes record, any
one of them serves the sum).

prometheus-client picks multiprocess mode when it is imported with PROMETHEUS_MULTIPROC_DIR set,
so the folder is made and the variable set before that import, in the process whose children
record. Several fleet processes of one host may be given the same PROMETHEUS_MULTIPROC_DIR: each
makes its own folder inside it and serves only its own processes' files.
"""

from __future__ import annotations

import atexit
import os
import shutil
import tempfile

MULTIPROC_ENV = "PROMETHEUS_MULTIPROC_DIR"
#: Set to the folder a process made for itself; the children it starts inherit both variables.
OWN_DIR_ENV = "FLEET_METRICS_OWN_DIR"


def own_multiprocess_dir(prefix: str) -> str:
    """Make a fresh folder (``<prefix><pid>-*``) for this process and its children, point
    PROMETHEUS_MULTIPROC_DIR at it, and remove it when this process exits.

    It is made inside PROMETHEUS_MULTIPROC_DIR when that is set, else in the temporary
    directory. Nothing else is ever deleted. A process that inherited such a folder (a child of
    the process that made it) keeps it.
    """
    parent = os.environ.get(MULTIPROC_ENV)
    if parent and os.environ.get(OWN_DIR_ENV) == parent and os.path.isdir(parent):
        return parent
    if parent:
        os.makedirs(parent, exist_ok=True)
    path = tempfile.mkdtemp(prefix=f"{prefix}{os.getpid()}-", dir=parent or None)
    os.environ[MULTIPROC_ENV] = path
    os.environ[OWN_DIR_ENV] = path
    atexit.register(_remove_own_dir, path, os.getpid())
    return path


def _remove_own_dir(path: str, owner: int) -> None:
    if os.getpid() == owner:  # not in a forked child that runs atexit handlers
        shutil.rmtree(path, ignore_errors=True)


def multiprocess_mode() -> bool:
    """Whether this process records into a multiprocess folder (so a scrape must sum them)."""
    return bool(os.environ.get(MULTIPROC_ENV))
