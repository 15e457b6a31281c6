"""Shared fixtures: the real services (Redis, SeaweedFS S3), the tiny model and real workers."""

from __future__ import annotations

import os
import uuid
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from tests.fleet_fixtures import REPO, WorkerProcess, settings_kwargs

#: The gateway's fixtures (start_gateway, gateway, tenants) live beside the workers'.
pytest_plugins = ["tests.gateway_fixtures"]


@pytest.fixture(scope="session")
def endpoints(tmp_path_factory: pytest.TempPathFactory):  # type: ignore[no-untyped-def]
    from fleet.localdev import local_services

    with local_services(workdir=tmp_path_factory.mktemp("services")) as ep:
        yield ep


@pytest.fixture(scope="session")
def tiny_model() -> Path:
    from worker.testmodel import build_test_model

    return build_test_model("tiny", REPO / ".models" / "tiny")


@pytest.fixture(scope="session")
def fleet_env(endpoints, tiny_model: Path, tmp_path_factory: pytest.TempPathFactory) -> dict:  # type: ignore[no-untyped-def]
    env = {k: v for k, v in os.environ.items() if not k.startswith("FLEET_")}
    env.update(endpoints.env())
    env.update(
        FLEET_MODEL=str(tiny_model),
        FLEET_MODEL_NAME="tiny",
        FLEET_DEVICE="cpu",
        FLEET_TORCH_THREADS="1",
        FLEET_LOCAL_FILES_ONLY="true",
        FLEET_SPOOL_DIR=str(tmp_path_factory.mktemp("spool")),
        HF_HUB_OFFLINE="1",
        PYTHONUNBUFFERED="1",
    )
    return env


@pytest.fixture(scope="session")
def all_workers() -> Iterator[list[WorkerProcess]]:
    """Every worker the tests started; the session ends by stopping those still running."""
    started: list[WorkerProcess] = []
    yield started
    for w in started:  # all at once: each warm shutdown takes seconds
        w.signal_stop()
    for w in started:
        w.stop()


def worker_starter(
    fleet_env: dict, logs: Path, started: list[WorkerProcess], mine: list[WorkerProcess]
) -> Callable[..., WorkerProcess]:
    def start(
        name: str, queues: str = "fleet", pool: str = "prefork", concurrency: int = 1, **env: str
    ) -> WorkerProcess:
        node = f"{name}-{uuid.uuid4().hex[:6]}@localhost"
        w = WorkerProcess(node, {**fleet_env, **env}, logs / f"{name}.log", queues=queues,
                          pool=pool, concurrency=concurrency)  # fmt: skip
        started.append(w)
        mine.append(w)
        return w.start()

    return start


def signalled_at_end(
    fleet_env: dict, tmp_path_factory: pytest.TempPathFactory, all_workers: list[WorkerProcess]
) -> Iterator[Callable[..., WorkerProcess]]:
    """A worker starter whose workers get the warm-shutdown signal when its fixture ends (an
    idle worker left running takes CPU from the tests after it: heartbeats, restore sweeps);
    they are waited for when the session ends."""
    mine: list[WorkerProcess] = []
    yield worker_starter(fleet_env, tmp_path_factory.mktemp("worker-logs"), all_workers, mine)
    for w in mine:
        w.signal_stop()


@pytest.fixture()
def start_worker(
    fleet_env: dict, tmp_path_factory: pytest.TempPathFactory, all_workers: list[WorkerProcess]
) -> Iterator[Callable[..., WorkerProcess]]:
    """Starts real workers for one test, signalled when the test ends."""
    yield from signalled_at_end(fleet_env, tmp_path_factory, all_workers)


@pytest.fixture(scope="module")
def module_workers(
    fleet_env: dict, tmp_path_factory: pytest.TempPathFactory, all_workers: list[WorkerProcess]
) -> Iterator[Callable[..., WorkerProcess]]:
    """``start_worker`` for a module's shared workers: signalled when the module ends."""
    yield from signalled_at_end(fleet_env, tmp_path_factory, all_workers)


@pytest.fixture(scope="session")
def session_workers(
    fleet_env: dict, tmp_path_factory: pytest.TempPathFactory, all_workers: list[WorkerProcess]
) -> Callable[..., WorkerProcess]:
    """``start_worker`` for the session's shared workers, stopped when the session ends."""
    return worker_starter(fleet_env, tmp_path_factory.mktemp("worker-logs"), all_workers, [])


@pytest.fixture(scope="session")
def worker(session_workers: Callable[..., WorkerProcess]) -> WorkerProcess:
    """The shared worker on the default queue, serving the tiny model."""
    return session_workers("main")


@pytest.fixture()
def client(fleet_env: dict) -> Iterator:  # type: ignore[type-arg]
    from fleet.settings import ProducerSettings
    from producer.client import Client

    with Client(ProducerSettings(_env_file=None, **settings_kwargs(fleet_env))) as c:
        yield c


@pytest.fixture()
def store(fleet_env: dict):  # type: ignore[no-untyped-def]
    from fleet.settings import ProducerSettings
    from fleet.storage import ObjectStore

    return ObjectStore(ProducerSettings(_env_file=None, **settings_kwargs(fleet_env)))


@pytest.fixture()
def queue() -> str:
    """A queue of this test's own, so workers of other tests never take its jobs."""
    return f"fleet.t-{uuid.uuid4().hex[:8]}"


@pytest.fixture()
def qclient(fleet_env: dict, queue: str) -> Iterator:  # type: ignore[type-arg]
    """A producer client that sends to ``queue``."""
    from fleet.settings import ProducerSettings
    from producer.client import Client

    settings = ProducerSettings(_env_file=None, **settings_kwargs(fleet_env))
    settings.queue = queue
    with Client(settings) as c:
        yield c


def own_fleet_env(endpoints_env: dict[str, str], tiny_model: Path, **extra: str) -> dict:
    """Environment for a worker on services of a test's own (fault tests kill them)."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("FLEET_")}
    env.update(endpoints_env, FLEET_MODEL=str(tiny_model), FLEET_MODEL_NAME="tiny",
               FLEET_DEVICE="cpu", FLEET_TORCH_THREADS="1", FLEET_LOCAL_FILES_ONLY="true",
               HF_HUB_OFFLINE="1", **extra)  # fmt: skip
    return env
