"""`python -m producer serve | keys | tenants`: the gateway's process and its operator's
commands (parsing is in ``producer.cli``)."""

from __future__ import annotations

import argparse
import json

import redis
from pydantic import ValidationError
from rich.console import Console
from rich.markup import escape

from fleet.brokers import translating
from fleet.errors import FleetError
from fleet.prometheus_dir import multiprocess_mode, own_multiprocess_dir
from fleet.settings import GatewaySettings
from producer.gateway.tenants import TenantStore

_redis_errors = translating(lambda settings: settings.redis_url)


def run(args: argparse.Namespace, out: Console) -> int:
    settings = GatewaySettings()
    if args.command == "serve":
        return serve(args)
    return _admin(settings, args, out)


def serve(args: argparse.Namespace) -> int:
    import uvicorn

    # With several processes each records into a folder of its own (prometheus-client's
    # multiprocess mode) and /metrics, whichever process answers, serves the sum of them all.
    # Before uvicorn starts them, so that they import prometheus_client in that mode.
    if args.workers > 1 or multiprocess_mode():
        own_multiprocess_dir("fleet-gateway-")

    # access_log off: the gateway logs every request itself, with its tenant and key id.

    uvicorn.run("producer.gateway.app:create_app", factory=True, host=args.host, port=args.port,
                workers=args.workers, log_level="info", proxy_headers=False,
                access_log=False)  # fmt: skip
    return 0


@_redis_errors
def _admin(settings: GatewaySettings, args: argparse.Namespace, out: Console) -> int:
    client = redis.Redis.from_url(settings.redis_url)
    try:
        store = TenantStore(client, settings)
        if args.command == "keys":
            return _keys(store, args, out)
        return _tenants(store, args, out)
    finally:
        client.close()


def _keys(store: TenantStore, args: argparse.Namespace, out: Console) -> int:
    if args.keys_command == "create":
        key, record = store.create_key(args.tenant, args.label)
        out.print(escape(key))
        out.print(f"[dim]key id {record.key_id} for tenant {record.tenant}; this is the only "
                  "time the key is shown[/dim]", highlight=False)  # fmt: skip
        return 0
    if args.keys_command == "list":
        for rec in store.keys(args.tenant):
            out.print(json.dumps(rec.public(), sort_keys=True))
        return 0
    if args.keys_command == "revoke":
        gone = store.revoke(args.key_id)
        if gone is None:
            raise FleetError(f"no key {args.key_id}")
        out.print(f"revoked key {gone.key_id} of tenant {gone.tenant}")
        return 0
    secret = store.webhook_secret(args.tenant)
    if secret is None:
        raise FleetError("FLEET_WEBHOOK_SECRET is not set: webhook deliveries are unsigned")
    out.print(secret)
    return 0


def _tenants(store: TenantStore, args: argparse.Namespace, out: Console) -> int:
    if args.tenants_command == "list":
        for name in store.names():
            tenant = store.get(name)
            if tenant is not None:
                out.print(tenant.model_dump_json())
        return 0
    limits = ("rate_per_min", "max_queued", "max_job_mpx_steps", "max_priority")
    changes = {k: getattr(args, k) for k in limits if getattr(args, k) is not None}
    if args.models is not None:
        changes["models"] = None if args.models == "*" else [
            m.strip() for m in args.models.split(",") if m.strip()]  # fmt: skip
    try:
        tenant = store.update(args.name, **changes)
    except ValidationError as exc:
        raise FleetError(f"tenant {args.name}: {exc.errors()[0]['loc'][0]}: "
                         f"{exc.errors()[0]['msg']}") from None  # fmt: skip
    out.print(tenant.model_dump_json())
    return 0
