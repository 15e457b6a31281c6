"""`python -m worker check|status|launch`: health check, worker status, per-GPU launcher."""

from __future__ import annotations

import argparse
import json
import socket
import sys

import redis

from fleet.brokers import broker_error
from fleet.settings import WorkerSettings
from worker.ops.gate import read_state
from worker.ops.heartbeat import alive_nodes, read_info


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m worker")
    sub = parser.add_subparsers(dest="command", required=True)
    c = sub.add_parser("check", help="exit 0 if a worker on this host has a fresh heartbeat")
    c.add_argument("--node", help="check this node name (default: any worker on this host)")
    c.add_argument("--any-host", action="store_true", help="any worker on any host")
    s = sub.add_parser("status", help="workers with a fresh heartbeat and their devices")
    s.add_argument("--json", action="store_true")
    launch = sub.add_parser("launch", help="one supervised worker per GPU (or --cpu N)")
    from worker.ops.launch import add_arguments

    add_arguments(launch)
    args = parser.parse_args(argv)
    settings = WorkerSettings()

    if args.command == "check":
        host = None if args.any_host or args.node else socket.gethostname()
        try:
            nodes = alive_nodes(settings.redis_url, host)
        except redis.RedisError as exc:
            print(f"unhealthy: {broker_error(exc, settings.redis_url) or exc}", file=sys.stderr)
            return 1
        if args.node:
            nodes = [n for n in nodes if n["node"] == args.node]
        if not nodes:
            print("unhealthy: no fresh worker heartbeat", file=sys.stderr)
            return 1
        client = redis.Redis.from_url(settings.redis_url, socket_timeout=5)
        try:  # the state as the worker published it last, fresher than its last heartbeat
            nodes = [{**n, **read_state(client, n["node"])} for n in nodes]
        finally:
            client.close()
        unable = [n for n in nodes if n.get("state") != "ready"]
        if unable:
            for n in unable:
                print(f"unhealthy: {n['node']} is {n.get('state')}: {n.get('reason')}",
                      file=sys.stderr)  # fmt: skip
            return 2 if any(n.get("state") == "broken" for n in unable) else 1
        print("healthy: " + ", ".join(n["node"] for n in nodes))
        return 0
    if args.command == "status":
        rows = []
        for beat in alive_nodes(settings.redis_url):
            info = read_info(settings.redis_url, beat["node"]) or {}
            rows.append(
                {
                    **beat,
                    "device": info.get("device"),
                    "gpu_name": info.get("gpu_name"),
                    "gpu_memory_bytes": info.get("gpu_memory_bytes"),
                    "dtype": info.get("dtype"),
                    "placement": info.get("placement"),
                    "hf_device_map": info.get("hf_device_map"),
                    "model": info.get("model_name"),
                }
            )
        if args.json:
            print(json.dumps(rows, indent=2))
        else:
            for r in rows:
                gpu = f" {r['gpu_name']}" if r.get("gpu_name") else ""
                print(
                    f"{r['node']}  queues={','.join(r['queues'])}  device={r['device']}{gpu}"
                    f"  model={r['model']}"
                    + (f"  device_map={r['hf_device_map']}" if r.get("hf_device_map") else "")
                )
        return 0
    from worker.ops.launch import run_launcher

    return run_launcher(args)


if __name__ == "__main__":
    raise SystemExit(main())
