"""The gateway while its Redis is away: clear 503s that say whether a retry is safe, and
serving again once Redis is back, with nothing it had accepted lost. A Redis of this module's
own (it is stopped), the session's S3, the real gateway process; no worker, so jobs wait."""

from __future__ import annotations

import threading
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest
import redis

from fleet import contract
from fleet.localdev import RedisServer
from fleet.settings import GatewaySettings
from producer.gateway.tenants import TenantStore
from tests.fleet_fixtures import settings_kwargs, wait_until
from tests.gateway_fixtures import GatewayProcess, auth, gateway_starter, new_tenant

pytestmark = pytest.mark.integration

JOB = {"prompt": "a harbour at dusk", "width": 64, "height": 64, "steps": 2}


@pytest.fixture()
def own_redis(tmp_path: Path) -> Iterator[RedisServer]:
    server = RedisServer(tmp_path / "own-redis").start()
    yield server
    server.stop()


def queued(client: redis.Redis, queue: str = contract.DEFAULT_QUEUE) -> list[bytes]:
    return [m for key in contract.queue_keys(queue) for m in client.lrange(key, 0, -1)]


def test_with_redis_away_the_gateway_answers_503_and_serves_again_once_it_is_back(
    own_redis: RedisServer, fleet_env: dict[str, str], tmp_path: Path
) -> None:
    env = {**fleet_env, "FLEET_REDIS_URL": own_redis.url, "FLEET_RESULT_BACKEND_URL": "",
           "FLEET_GATEWAY_WAIT_S": "120", "FLEET_QUEUE": contract.DEFAULT_QUEUE,
           "FLEET_FAIR_QUEUE_DEPTH": "4"}  # fmt: skip
    settings = GatewaySettings(_env_file=None, **settings_kwargs(env))
    direct = redis.Redis.from_url(own_redis.url)
    _, key = new_tenant(TenantStore(direct, settings), "down")
    started: list[GatewayProcess] = []
    gw = gateway_starter(env, tmp_path, started)("redis-down")
    try:
        first = httpx.post(gw.url + "/v1/jobs", json=JOB, headers=auth(key), timeout=30)
        assert first.status_code == 202, first.text
        first_id = first.json()["job_id"]
        wait_until(lambda: any(first_id.encode() in m for m in queued(direct)), 30,
                   "the dispatcher to hand the first job to Celery")  # fmt: skip

        # An images call waits for its job (no worker runs); Redis goes away meanwhile.
        answer: dict[str, Any] = {}

        def images() -> None:
            answer["r"] = httpx.post(gw.url + "/v1/images/generations", headers=auth(key),
                                     json={"prompt": "a lighthouse", "size": "64x64"},
                                     timeout=60)  # fmt: skip

        waiter = threading.Thread(target=images)
        waiter.start()
        wait_until(lambda: len(queued(direct)) == 2, 30, "the images call's job in the queue")
        own_redis.stop()
        waiter.join(60)
        made = answer["r"]
        # Its job is in line: the answer names it and says a retry would make a second one.
        assert made.status_code == 503, made.text
        assert made.headers["x-should-retry"] == "false"
        error = made.json()["error"]
        assert error["code"] == "queue_unavailable" and "/v1/jobs/" in error["message"]
        made_id = error["message"].split("/v1/jobs/")[1].split()[0]

        # Nothing can be added while Redis is away: a 503 a client may retry, not a 500.
        down = httpx.post(gw.url + "/v1/jobs", json=JOB, headers=auth(key), timeout=30)
        assert down.status_code == 503, down.text
        assert down.headers["x-should-retry"] == "true" and down.headers["retry-after"] == "5"
        assert down.json()["error"]["code"] == "queue_unavailable"
        assert "Redis" in down.json()["error"]["message"]
        health = httpx.get(gw.url + "/healthz", timeout=30)
        assert health.status_code == 503 and health.json()["redis"].startswith("unreachable")
        assert gw.alive()

        own_redis.start()  # same port, same data
        wait_until(lambda: httpx.get(gw.url + "/healthz", timeout=10).status_code == 200, 60,
                   "the gateway to find Redis again")  # fmt: skip
        again = httpx.post(gw.url + "/v1/jobs", json=JOB, headers=auth(key), timeout=30)
        assert again.status_code == 202, again.text
        # Both jobs accepted before the outage are still there, each once, and readable.
        back = redis.Redis.from_url(own_redis.url)
        wait_until(lambda: len(queued(back)) == 3, 30, "the third job in the queue")
        messages = queued(back)
        for job_id in (first_id, made_id):
            assert sum(job_id.encode() in m for m in messages) == 1, job_id
            st = httpx.get(f"{gw.url}/v1/jobs/{job_id}", headers=auth(key), timeout=30)
            assert st.status_code == 200 and st.json()["state"] == "queued", st.text
        back.close()
    finally:
        direct.close()
        for g in started:
            g.stop()
