"""The fleet's secrets, in one place: what tests/integration/test_security.py looks for.

Each entry says what the secret is, how the test obtains its value (from the environment the
fleet's parts run with; for a secret the test makes up, the variable it sets and a fresh value)
and where it must never appear. The secrets test runs a fleet that succeeds and fails in every
way it can (a bad job, a job for a model nobody serves, a worker the storage refuses, a wrong
Redis password, Redis away), collects every text it leaves behind and looks for every form of
every value listed here.

A feature that brings a new secret (API keys of the HTTP gateway, ...) adds one entry here. An
entry that obtains no value fails the test (it would pass without looking): a secret the test
does not set yet needs a ``provide``, or the fixture in test_security.py sets it.

Not secrets, and so not here: the S3 access key id (every presigned URL carries it, by design
of SigV4), bucket and host names, and presigned URLs themselves (short-lived, one object each;
docs/security.md).
"""

from __future__ import annotations

import secrets
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from enum import Enum
from urllib.parse import quote, unquote, urlsplit


class Artifact(str, Enum):
    """The kinds of text the fleet leaves behind, as the secrets test collects them."""

    LOGS = "worker logs (text and JSON lines, DEBUG) and the CLI's own log lines"
    CLI_OUTPUT = "CLI standard output (status --json, stats, failed, worker status --json)"
    ERRORS = "error messages (CLI standard error, worker check, Python API exceptions)"
    S3 = "every object in the bucket (manifests, failure records, images)"
    REDIS = "every Redis value (celery-task-meta-*, claims, queues, heartbeats, states)"
    WEBHOOKS = "webhook requests received (headers and bodies)"


EVERYWHERE = frozenset(Artifact)

#: How the test obtains a secret's values from the fleet's environment (empty: not set).
Obtain = Callable[[Mapping[str, str]], list[str]]


@dataclass(frozen=True)
class Secret:
    name: str
    #: The values in this run, read from the environment the producer and workers run with.
    obtain: Obtain
    #: Where it must never appear.
    never_in: frozenset[Artifact] = EVERYWHERE
    #: For a secret the test makes up: the variable to set and a fresh value for it.
    provide: tuple[str, Callable[[], str]] | None = None

    @staticmethod
    def forms(value: str) -> set[str]:
        """The spellings to look for: as it is, and percent-encoded (in a URL)."""
        return {value, quote(value, safe="")}


def from_env(*names: str) -> Obtain:
    return lambda env: [env[n] for n in names if env.get(n)]


def url_password(*names: str) -> Obtain:
    """The password in the URLs in these variables (``redis://:PASSWORD@host:port/db``)."""

    def obtain(env: Mapping[str, str]) -> list[str]:
        found = []
        for name in names:
            password = urlsplit(env.get(name) or "").password
            if password:
                found.append(unquote(password))
        return found

    return obtain


def _fresh(prefix: str) -> Callable[[], str]:
    return lambda: prefix + secrets.token_urlsafe(24)


SECRETS: tuple[Secret, ...] = (
    Secret("S3 secret access key", from_env("FLEET_S3_SECRET_ACCESS_KEY")),
    Secret("Redis password", url_password("FLEET_REDIS_URL", "FLEET_RESULT_BACKEND_URL")),
    Secret(
        "webhook signing secret",
        from_env("FLEET_WEBHOOK_SECRET"),
        provide=("FLEET_WEBHOOK_SECRET", _fresh("whsec-")),
    ),
    # The worker reads HF_TOKEN (or FLEET_HF_TOKEN) as a setting and hands it to
    # from_pretrained for gated models (docs/operations.md).
    Secret(
        "model hub token",
        from_env("HF_TOKEN", "FLEET_HF_TOKEN"),
        provide=("HF_TOKEN", _fresh("hf_")),
    ),
    # The HTTP gateway's API keys are made by `producer keys create`, which prints a key once
    # (that output alone is not searched); the test's fixture keeps the key it made, and a
    # second one it revoked, in GATEWAY_API_KEYS (space-separated). Their secret parts are
    # looked for too: a log that dropped the `dfk_<id>_` head would still leak the key.
    Secret("gateway API key", lambda env: _api_keys(env.get("GATEWAY_API_KEYS", ""))),
)


def _api_keys(text: str) -> list[str]:
    keys = text.split()
    return keys + [k.split("_", 2)[2] for k in keys if k.count("_") >= 2]  # dfk_<id>_<secret>


def provided() -> dict[str, str]:
    """Fresh values for the secrets the test makes up, by variable."""
    return {s.provide[0]: s.provide[1]() for s in SECRETS if s.provide is not None}
