"""Storing a job's images: PNG encoding, uploads and the manifest, in this process or in a
storing child.

On a threads pool the worker process has one Python thread launching GPU kernels and others
encoding PNGs and uploading them; they share one interpreter lock, so the host-side work of one
job slows the generation of the next. ``FLEET_STORE_PROCESS=child`` moves that work into a
child process of its own (``python -m worker.storer``), fed through a socket pair with the
images as uint8 arrays. The job still reports success only once the child says its images and
its manifest are in storage.

A child that dies (killed, out of memory) takes no job with it: the parent still holds the
request, starts a new child and sends it again (the keys are the same, the manifest goes last,
so a half-finished upload is simply written over). After a second death the parent stores the
job itself. ``store_job`` is the one function both places run, so the bytes are the same.

No torch here: the child imports only storage, PIL and numpy.
"""

from __future__ import annotations

import itertools
import logging
import os
import signal
import socket
import subprocess
import sys
import threading
import time
from concurrent.futures import Future
from concurrent.futures import TimeoutError as FutureTimeout
from dataclasses import dataclass, field
from multiprocessing.connection import Connection
from pathlib import Path
from typing import Any

from fleet import errors
from fleet.errors import FleetError, StorageError
from fleet.settings import WorkerSettings
from fleet.storage import ObjectStore
from worker.engine.recipe import png_bytes
from worker.records import clear_failure

log = logging.getLogger(__name__)

#: The folder that holds the `worker` package, for the child's imports.
ROOT = str(Path(__file__).resolve().parents[1])
#: How many times a request is sent to a storing child before the parent stores it itself.
CHILD_TRIES = 2


@dataclass
class ImageOut:
    """One image of a job on its way to storage: the pipeline's pixels (an HxWxC uint8 array)
    or, when it comes back from the spool, its PNG already made."""

    recipe: dict[str, Any]
    nsfw: bool | None
    pixels: Any = None
    png: bytes | None = None

    def encoded(self) -> bytes:
        """The PNG (made from the pixels on first use, then kept)."""
        if self.png is None:
            self.png = png_bytes(self.pixels, self.recipe, nsfw=self.nsfw)
        return self.png


@dataclass
class StoreJob:
    """What storing one job takes: its images by key (dropped ones left out), the manifest to
    write last, and whether to clear an old failure record."""

    job_id: str
    images: list[tuple[str, ImageOut]]
    manifest_key: str
    manifest: dict[str, Any]
    #: The prefix whose failure index this job leaves, or None to skip that delete.
    clear_prefix: str | None = None
    #: Seconds the job had run when storing began (for timings.total_s).
    elapsed_s: float = 0.0
    timings: dict[str, float] = field(default_factory=dict)


def store_job(store: ObjectStore, job: StoreJob) -> dict[str, float]:
    """Encode, upload the images, then the manifest (its presence marks the job complete).
    Returns the storing timings, also written into the manifest and its result."""
    began = time.perf_counter()
    encode_s = 0.0
    for key, image in job.images:
        t = time.perf_counter()
        data = image.encoded()
        encode_s += time.perf_counter() - t
        store.put_bytes(key, data, "image/png")
    upload_s = time.perf_counter() - began - encode_s
    timings = {"encode_s": encode_s, "upload_s": upload_s,
               "total_s": job.elapsed_s + time.perf_counter() - began}  # fmt: skip
    manifest = job.manifest
    manifest["timings"] = {**manifest.get("timings", {}), **timings}
    if isinstance(manifest.get("result"), dict):
        result = manifest["result"]
        result["timings"] = {**(result.get("timings") or {}), **timings}
    store.put_json(job.manifest_key, manifest)
    if job.clear_prefix is not None:
        clear_failure(store, job.clear_prefix, job.job_id)
    return timings


class ChildDied(Exception):
    """The storing child went away before it answered."""


class StoringChild:
    """The parent's side: one storing child, started on first use, shared by the process's
    task threads (requests are numbered; a reader thread hands each reply to its caller)."""

    def __init__(self, settings: WorkerSettings, store: ObjectStore) -> None:
        self.settings = settings
        #: For the last resort: storing in this process when children keep dying.
        self.store = store
        self._lock = threading.Lock()
        self._ids = itertools.count(1)
        self._pending: dict[int, Future[dict[str, Any]]] = {}
        self._proc: subprocess.Popen[bytes] | None = None
        self._conn: Connection | None = None
        self.starts = 0

    @property
    def pid(self) -> int | None:
        return self._proc.pid if self._proc is not None else None

    def _ensure(self) -> Connection:
        """The live child's connection (starting a child when there is none); under _lock."""
        if self._conn is not None and self._proc is not None and self._proc.poll() is None:
            return self._conn
        self._drop_child()
        ours, theirs = socket.socketpair()
        env = os.environ.copy()  # the same FLEET_* and AWS_* as this worker; `worker` importable
        env["PYTHONPATH"] = os.pathsep.join(p for p in (ROOT, env.get("PYTHONPATH")) if p)
        proc = subprocess.Popen(  # nosec B603  # this interpreter, our own module, fixed argv
            [sys.executable, "-m", "worker.storer", str(theirs.fileno())],
            pass_fds=(theirs.fileno(),), stdin=subprocess.DEVNULL, env=env,
        )  # fmt: skip
        theirs.close()
        conn = Connection(ours.detach())
        conn.send({"settings": self.settings, "verified": self.store.verified})
        self._proc, self._conn = proc, conn
        self.starts += 1
        threading.Thread(target=self._read, args=(conn,), name="storer-replies",
                         daemon=True).start()  # fmt: skip
        log.info("storing child started (pid %d)", proc.pid)
        return conn

    def _read(self, conn: Connection) -> None:
        while True:
            try:
                reply = conn.recv()
            except (EOFError, OSError):
                break
            fut = self._pending.pop(reply["id"], None)
            if fut is not None:
                fut.set_result(reply)
        with self._lock:
            if self._conn is conn:
                self._drop_child()

    def _drop_child(self) -> None:
        """Forget the current child; every request it had fails with ChildDied (under _lock)."""
        if self._conn is not None:
            self._conn.close()
        if self._proc is not None and self._proc.poll() is None:
            self._proc.kill()
        if self._proc is not None:
            self._proc.wait()
        self._proc = self._conn = None
        pending, self._pending = self._pending, {}
        for fut in pending.values():
            fut.set_exception(ChildDied("the storing child exited"))

    def store_job(self, job: StoreJob, timeout_s: float) -> dict[str, float]:
        """Store ``job`` through the child; raises what storing raised there (StorageError,
        StorageRefused, ...). A child that dies is replaced and the job sent again; after
        CHILD_TRIES deaths this process stores it."""
        for attempt in range(1, CHILD_TRIES + 1):
            fut: Future[dict[str, Any]] = Future()
            with self._lock:
                request_id = next(self._ids)
                self._pending[request_id] = fut
                try:
                    self._ensure().send({"id": request_id, "job": job})
                except (OSError, ValueError) as exc:
                    self._pending.pop(request_id, None)
                    self._drop_child()
                    fut.set_exception(ChildDied(f"could not send to the storing child: {exc}"))
            try:
                reply = fut.result(timeout=timeout_s)
            except ChildDied as exc:
                log.warning("[job=%s] %s while storing it (try %d of %d); sending it again",
                            job.job_id, exc, attempt, CHILD_TRIES)  # fmt: skip
                continue
            except FutureTimeout:
                with self._lock:
                    self._pending.pop(request_id, None)
                    self._drop_child()  # a child stuck this long is not trusted again
                raise StorageError(
                    f"the storing child did not store job {job.job_id} in {timeout_s:.0f} s"
                ) from None
            if reply["ok"]:
                return dict(reply["timings"])
            raise _error(reply)
        log.error("[job=%s] the storing child died %d times; storing it in this process",
                  job.job_id, CHILD_TRIES)  # fmt: skip
        return store_job(self.store, job)

    def close(self) -> None:
        with self._lock:
            self._drop_child()


def _error(reply: dict[str, Any]) -> FleetError:
    """The error the child met, as the same class (a FleetError subclass), else StorageError."""
    cls = getattr(errors, str(reply.get("error_type")), None)
    message = str(reply.get("message"))
    if isinstance(cls, type) and issubclass(cls, FleetError):
        try:
            return cls(message)
        except TypeError:
            pass
    return StorageError(message)


def serve(conn: Connection) -> None:
    """The child: store each job it is sent, answer, until the parent closes the socket."""
    hello = conn.recv()
    settings: WorkerSettings = hello["settings"]
    store = ObjectStore(settings, create_bucket=False)
    store.verified = bool(hello.get("verified"))
    while True:
        try:
            request = conn.recv()
        except (EOFError, OSError):
            return  # the parent is gone
        job: StoreJob = request["job"]
        try:
            reply = {"id": request["id"], "ok": True, "timings": store_job(store, job)}
        except Exception as exc:  # answered, never raised: one job's failure is its own
            reply = {"id": request["id"], "ok": False, "error_type": type(exc).__name__,
                     "message": str(exc)}  # fmt: skip
        try:
            conn.send(reply)
        except OSError:
            return  # the parent is gone


def main() -> None:
    # A stop signal to the worker's process group (docker stop, Ctrl-C, killpg) must not end
    # the child while the worker drains: it stores what it is sent until the worker exits and
    # its socket closes.
    signal.signal(signal.SIGTERM, signal.SIG_IGN)
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s storer: %(message)s")
    serve(Connection(int(sys.argv[1])))


if __name__ == "__main__":
    main()
