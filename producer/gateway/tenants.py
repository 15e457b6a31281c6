"""Tenants and their API keys, kept in Redis: who may call the gateway, and within which limits.

A key is ``dfk_<key id>_<secret>``. Redis keeps the key id, the tenant, and the SHA-256 of the
whole key; never the key. The id finds the record, the hash is compared in constant time. A
slow password hash (bcrypt, argon2) would cost tens of milliseconds a request for nothing: the
secret is 256 random bits, so no guessing attack on a leaked hash can succeed.
"""

from __future__ import annotations

import hashlib
import hmac
import json
import math
import secrets
import time
from typing import TYPE_CHECKING, Any

import redis
import redis.asyncio
from pydantic import BaseModel, Field

from fleet import contract
from fleet.errors import FleetError
from fleet.settings import GatewaySettings

if TYPE_CHECKING:
    from redis.commands.core import AsyncScript

KEY_PREFIX = "dfk"
TENANT_KEY = "fleet:gw:tenant:{tenant}"
TENANTS_KEY = "fleet:gw:tenants"
API_KEY_KEY = "fleet:gw:key:{key_id}"
TENANT_KEYS_KEY = "fleet:gw:tenant-keys:{tenant}"
RATE_KEY = "fleet:gw:rate:{tenant}:{minute}"


class Tenant(BaseModel):
    """What one tenant may do."""

    name: str
    #: Model names it may use; None: every model the fleet serves.
    models: list[str] | None = None
    rate_per_min: int = Field(60, ge=0, description="jobs per minute; 0: no limit")
    max_queued: int = Field(100, ge=0, description="jobs waiting at once; 0: no limit")
    #: The largest job: megapixels x steps x images; 0: no limit.
    max_job_mpx_steps: float = Field(600.0, ge=0)
    #: The highest priority its jobs may ask for (0-9); higher asks are lowered to it.
    max_priority: int = Field(contract.MAX_PRIORITY, ge=0, le=contract.MAX_PRIORITY)
    created_at: float = Field(default_factory=time.time)

    def job_size(self, spec: contract.JobSpec) -> float:
        return spec.width * spec.height / 1e6 * spec.steps * spec.images


class ApiKeyRecord(BaseModel):
    key_id: str
    tenant: str
    sha256: str
    label: str = ""
    created_at: float = Field(default_factory=time.time)

    def public(self) -> dict[str, Any]:
        """What listing shows: never the hash."""
        return {"key_id": self.key_id, "tenant": self.tenant, "label": self.label,
                "created_at": self.created_at}  # fmt: skip


def hash_key(key: str) -> str:
    return hashlib.sha256(key.encode()).hexdigest()


def parse_key(key: str) -> str | None:
    """The key id of a well-formed key, else None."""
    parts = key.split("_", 2)
    if len(parts) != 3 or parts[0] != KEY_PREFIX or len(parts[1]) != 12 or not parts[2]:
        return None
    return parts[1] if all(c in "0123456789abcdef" for c in parts[1]) else None


def check_tenant_name(name: str) -> str:
    if not contract.TENANT_PATTERN.match(name):
        raise FleetError(
            f"tenant {name!r}: names are 1-63 characters of lower-case letters, digits, '_' "
            "and '-', starting with a letter or digit"
        )
    return name


#: A key's record and its tenant's, in one round trip (each request authenticates).
_KEY_AND_TENANT = """
local raw = redis.call('GET', KEYS[1])
if not raw then return false end
local ok, record = pcall(cjson.decode, raw)
if not ok or type(record) ~= 'table' or type(record.tenant) ~= 'string' then
  return {raw, false}
end
return {raw, redis.call('GET', ARGV[1] .. record.tenant)}
"""


def _verified(key: str, key_id: str, reply: Any) -> tuple[Tenant, str] | None:
    """The tenant and key id, if ``reply`` (the key's record and its tenant's) matches ``key``."""
    if not reply:
        return None
    raw, raw_tenant = reply
    record = ApiKeyRecord.model_validate_json(raw)
    if not hmac.compare_digest(hash_key(key), record.sha256) or not raw_tenant:
        return None
    return Tenant.model_validate_json(raw_tenant), key_id


class TenantStore:
    """Tenants, keys and rate counters in Redis."""

    def __init__(self, redis_client: redis.Redis, settings: GatewaySettings) -> None:
        self.redis = redis_client
        self.settings = settings
        self._async: AsyncScript | None = None

    # -- tenants --------------------------------------------------------------------------------

    def default_tenant(self, name: str) -> Tenant:
        s = self.settings
        return Tenant(name=name, rate_per_min=s.tenant_rate_per_min,
                      max_queued=s.tenant_max_queued,
                      max_job_mpx_steps=s.tenant_max_job_mpx_steps)  # fmt: skip

    def get(self, name: str) -> Tenant | None:
        raw = self.redis.get(TENANT_KEY.format(tenant=name))
        return Tenant.model_validate_json(raw) if raw else None

    def put(self, tenant: Tenant) -> Tenant:
        check_tenant_name(tenant.name)
        with self.redis.pipeline() as pipe:
            pipe.set(TENANT_KEY.format(tenant=tenant.name), tenant.model_dump_json())
            pipe.sadd(TENANTS_KEY, tenant.name)
            pipe.execute()
        return tenant

    def update(self, name: str, **changes: Any) -> Tenant:
        """Set some of a tenant's limits (creating it with the defaults first if needed)."""
        current = self.get(check_tenant_name(name)) or self.default_tenant(name)
        return self.put(Tenant.model_validate({**current.model_dump(), **changes}))

    def names(self) -> list[str]:
        return sorted(m.decode() if isinstance(m, bytes) else m
                      for m in self.redis.smembers(TENANTS_KEY))  # fmt: skip

    # -- keys -----------------------------------------------------------------------------------

    def create_key(self, tenant: str, label: str = "") -> tuple[str, ApiKeyRecord]:
        """A new key for ``tenant`` (created with the default limits if new): the key, shown
        once, and its record. Only the record is kept."""
        if self.get(check_tenant_name(tenant)) is None:
            self.put(self.default_tenant(tenant))
        key_id = secrets.token_hex(6)
        key = f"{KEY_PREFIX}_{key_id}_{secrets.token_urlsafe(32)}"
        record = ApiKeyRecord(key_id=key_id, tenant=tenant, sha256=hash_key(key), label=label)
        with self.redis.pipeline() as pipe:
            pipe.set(API_KEY_KEY.format(key_id=key_id), record.model_dump_json())
            pipe.sadd(TENANT_KEYS_KEY.format(tenant=tenant), key_id)
            pipe.execute()
        return key, record

    def keys(self, tenant: str | None = None) -> list[ApiKeyRecord]:
        tenants = [tenant] if tenant else self.names()
        found: list[ApiKeyRecord] = []
        for name in tenants:
            for key_id in sorted(self.redis.smembers(TENANT_KEYS_KEY.format(tenant=name))):
                kid = key_id.decode() if isinstance(key_id, bytes) else key_id
                raw = self.redis.get(API_KEY_KEY.format(key_id=kid))
                if raw:
                    found.append(ApiKeyRecord.model_validate_json(raw))
        return found

    def revoke(self, key_id: str) -> ApiKeyRecord | None:
        """Delete a key's record: the next request with it is refused (nothing is cached)."""
        raw = self.redis.get(API_KEY_KEY.format(key_id=key_id))
        if not raw:
            return None
        record = ApiKeyRecord.model_validate_json(raw)
        with self.redis.pipeline() as pipe:
            pipe.delete(API_KEY_KEY.format(key_id=key_id))
            pipe.srem(TENANT_KEYS_KEY.format(tenant=record.tenant), key_id)
            pipe.execute()
        return record

    async def authenticate(self, key: str) -> tuple[Tenant, str] | None:
        """The tenant and key id of a valid key, else None (unknown, revoked or malformed). On
        the event loop, with the asyncio client ``use_async`` gave: one Redis round trip and no
        thread-pool hop before the request's own work."""
        if self._async is None:
            raise RuntimeError("TenantStore.use_async was not called")
        key_id = parse_key(key)
        if key_id is None:
            return None
        reply = await self._async(
            keys=[API_KEY_KEY.format(key_id=key_id)], args=[TENANT_KEY.format(tenant="")]
        )
        return _verified(key, key_id, reply)

    def use_async(self, client: redis.asyncio.Redis | None) -> None:
        """The asyncio Redis client of the running event loop (None: drop it)."""
        self._async = client.register_script(_KEY_AND_TENANT) if client is not None else None

    def webhook_secret(self, tenant: str) -> str | None:
        """The secret the tenant's webhook deliveries are signed with (None: no
        FLEET_WEBHOOK_SECRET, deliveries unsigned)."""
        if self.settings.webhook_secret is None:
            return None
        return contract.tenant_webhook_secret(
            self.settings.webhook_secret.get_secret_value(), check_tenant_name(tenant)
        )

    # -- rate -----------------------------------------------------------------------------------

    def take_rate(self, tenant: Tenant, jobs: int = 1, now: float | None = None) -> float | None:
        """Count ``jobs`` against the tenant's jobs per minute (a window per clock minute, in
        Redis so that every gateway process shares it). None when allowed; else the seconds
        until the next window (nothing counted)."""
        if tenant.rate_per_min <= 0:
            return None
        now = time.time() if now is None else now
        minute = int(now // 60)
        key = RATE_KEY.format(tenant=tenant.name, minute=minute)
        with self.redis.pipeline() as pipe:
            pipe.incrby(key, jobs)
            pipe.expire(key, 120)
            count = int(pipe.execute()[0])
        if count <= tenant.rate_per_min:
            return None
        self.redis.decrby(key, jobs)
        return max(1.0, math.ceil((minute + 1) * 60 - now))

    def refund_rate(self, tenant: Tenant, jobs: int = 1, now: float | None = None) -> None:
        """Give back what ``take_rate`` counted for jobs that were not made after all (the
        tenant's line was full, or the id was known: a retry)."""
        if tenant.rate_per_min <= 0:
            return
        minute = int((time.time() if now is None else now) // 60)
        self.redis.decrby(RATE_KEY.format(tenant=tenant.name, minute=minute), jobs)


def record_json(record: ApiKeyRecord) -> str:
    return json.dumps(record.public(), sort_keys=True)
