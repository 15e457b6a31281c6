"""Redis as the fleet's parts meet it: one-line errors that name the URL and what to fix."""

from __future__ import annotations

import functools
from collections.abc import Callable
from typing import Any, TypeVar
from urllib.parse import urlsplit, urlunsplit

import redis
from kombu.exceptions import OperationalError

from fleet.errors import BrokerRefused, BrokerUnavailable, FleetError

_F = TypeVar("_F", bound=Callable[..., Any])

#: What Redis says when a client did not authenticate, or with the wrong password.
_AUTH_MARKERS = ("NOAUTH", "WRONGPASS", "invalid password", "HELLO must be called",
                 "Authentication required", "invalid username-password")  # fmt: skip


def masked(url: str) -> str:
    """The URL with its password replaced by ``***``."""
    parts = urlsplit(url)
    if parts.password is None:
        return url
    user = parts.username or ""
    host = parts.hostname or ""
    port = f":{parts.port}" if parts.port else ""
    return urlunsplit((parts.scheme, f"{user}:***@{host}{port}", parts.path, parts.query, ""))


def broker_error(exc: BaseException, url: str) -> FleetError | None:
    """The fleet error a Redis failure means, or None when it is not one."""
    chain = [exc, exc.__cause__, exc.__context__]
    text = " ".join(str(e) for e in chain if e is not None)
    is_redis = any(isinstance(e, redis.RedisError | OperationalError) for e in chain)
    if not is_redis:
        return None
    where = masked(url)
    if any(isinstance(e, redis.AuthenticationError) for e in chain) or any(
        m in text for m in _AUTH_MARKERS
    ):
        return BrokerRefused(
            f"Redis at {where} refused the password: put the right one in FLEET_REDIS_URL "
            "(redis://:PASSWORD@host:port/db) or FLEET_RESULT_BACKEND_URL"
        )
    if any(isinstance(e, redis.InvalidResponse) for e in chain):
        return BrokerUnavailable(
            f"{where} answered, but not as Redis: is the port right? (a TLS port needs "
            "rediss://, docs/security.md)"
        )
    if any(isinstance(e, redis.ConnectionError | redis.TimeoutError | OperationalError)
           for e in chain):  # fmt: skip
        return BrokerUnavailable(
            f"cannot reach Redis at {where}: {str(exc)[:200]} — is it running, and is "
            "FLEET_REDIS_URL right?"
        )
    return None


def translating(url_of: Callable[[Any], str]) -> Callable[[_F], _F]:
    """Decorate a method so that Redis failures leave it as BrokerRefused/BrokerUnavailable."""

    def wrap(fn: _F) -> _F:
        @functools.wraps(fn)
        def inner(self: Any, *args: Any, **kwargs: Any) -> Any:
            try:
                return fn(self, *args, **kwargs)
            except (redis.RedisError, OperationalError) as exc:
                translated = broker_error(exc, url_of(self))
                if translated is None:
                    raise
                raise translated from exc

        return inner  # type: ignore[return-value]

    return wrap


def redis_config_problems(client: redis.Redis) -> list[str]:
    """What in this Redis's configuration can lose the fleet's keys (empty: nothing).

    Read from INFO, which managed services answer where they refuse CONFIG: an eviction policy
    other than ``noeviction`` (``volatile-*`` drops claims and results, which carry a TTL;
    ``allkeys-*`` drops queued jobs), and neither AOF nor RDB snapshots (a restart empties it)."""
    problems = []
    memory = client.info("memory")
    policy = str(memory.get("maxmemory_policy", "noeviction"))
    if policy != "noeviction":
        drops = "queued jobs, claims and results" if policy.startswith("allkeys") else (
            "job claims, progress and results (the keys with a TTL)")  # fmt: skip
        problems.append(f"maxmemory-policy is {policy}: when memory fills, Redis drops {drops};"
                        " set maxmemory-policy noeviction")  # fmt: skip
    persistence = client.info("persistence")
    if not int(persistence.get("aof_enabled", 0)):
        try:
            save = str(client.config_get("save").get("save", ""))
        except redis.ResponseError:  # CONFIG refused (a managed service): cannot tell
            save = "unknown"
        if not save.strip():
            problems.append("persistence is off (no AOF, no RDB snapshots): a restart loses "
                            "every queued job; set appendonly yes")  # fmt: skip
    return problems


def check_redis_config(client: redis.Redis, url: str, mode: str) -> list[str]:
    """Raise BrokerMisconfigured for a Redis that can lose the fleet's keys, unless ``mode`` is
    ``warn`` (FLEET_REDIS_CHECK): then return the problems for the caller to log."""
    from fleet.errors import BrokerMisconfigured

    problems = redis_config_problems(client)
    if problems and mode != "warn":
        raise BrokerMisconfigured(
            f"Redis at {masked(url)}: "
            + "; ".join(problems)
            + " (or accept the risk with FLEET_REDIS_CHECK=warn)"
        )
    return problems
