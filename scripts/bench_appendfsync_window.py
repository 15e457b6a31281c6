"""What a Redis SIGKILL takes of the acknowledged jobs, with `appendfsync everysec` and `always`.

    .venv/bin/python scripts/bench_appendfsync_window.py [--trials 5] [--out FILE]

One of the two bounds the fault matrix claims instead of "0 lost" (docs/reliability.md): with
`everysec` (the compose and local default) Redis fsyncs its AOF once a second, so a SIGKILL (or a
power loss: the same for the page cache) can take the writes of up to the last second or so.
Each trial: a producer sends jobs as fast as it can (the fleet's `send_task` path, one
acknowledged LPUSH each) for a while, then Redis is SIGKILLed while the producer still sends; it
restarts from its AOF and the jobs still queued are counted against those the producer had been
told were sent. The window is the time from the oldest lost acknowledgement to the kill.

What this can and cannot measure: Redis writes an acknowledged command to its AOF (a `write`
into the kernel's page cache) before it replies, so a SIGKILL of the redis-server process alone
should lose nothing with either setting; that is what the trials check. What `everysec` leaves
open is a crash of the host (or its disk) before the next fsync: up to about 1 s of writes, 2 s
when an fsync is slow (Redis's persistence docs). A host crash cannot be caused on this machine,
so the doc quotes that bound beside the process-kill figure measured here.
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import threading
import time
import uuid
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from fleet import contract  # noqa: E402
from fleet.celeryconf import make_celery  # noqa: E402
from fleet.contract import JobSpec  # noqa: E402
from fleet.localdev import RedisServer  # noqa: E402
from fleet.settings import ProducerSettings  # noqa: E402

QUEUE = "fsync"


def trial(workdir: Path, fsync: str, send_s: float) -> dict[str, float | int | str]:
    server = RedisServer(workdir / f"{fsync}-{uuid.uuid4().hex[:6]}").start()
    try:
        server.client().config_set("appendfsync", fsync)
        app = make_celery("bench-fsync", ProducerSettings(_env_file=None, redis_url=server.url))
        job = {**JobSpec(prompt="a fox", width=64, height=64).model_dump(mode="json")}
        acked: list[tuple[str, float]] = []
        stop = threading.Event()

        def send() -> None:
            while not stop.is_set():
                task_id = uuid.uuid4().hex
                try:
                    app.send_task(contract.TASK_GENERATE, kwargs={"job": job}, queue=QUEUE,
                                  task_id=task_id, retry=False)  # fmt: skip
                except Exception:  # Redis is gone: the trial is over
                    return
                acked.append((task_id, time.monotonic()))

        sender = threading.Thread(target=send, daemon=True)
        sender.start()
        time.sleep(send_s)  # the producer sends for this long before the kill (the case itself)
        killed_at = time.monotonic()
        server.kill()
        stop.set()
        sender.join(10)
        app.close()
        server.start()
        client = server.client()
        present: set[str] = set()
        for key in contract.queue_keys(QUEUE):
            for raw in client.lrange(key, 0, -1):
                present.add(json.loads(raw)["headers"]["id"])
        before_kill = [(t, at) for t, at in acked if at <= killed_at]
        lost = [(t, at) for t, at in before_kill if t not in present]
        window_ms = max((killed_at - at) * 1000 for _, at in lost) if lost else 0.0
        return {"fsync": fsync, "acknowledged": len(before_kill), "lost": len(lost),
                "window_ms": round(window_ms, 1)}  # fmt: skip
    finally:
        server.stop()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--trials", type=int, default=5)
    parser.add_argument("--send-s", type=float, default=3.0)
    parser.add_argument("--out", type=Path, default=Path("bench/appendfsync_window.json"))
    args = parser.parse_args()
    workdir = Path(tempfile.mkdtemp(prefix="bench-fsync-"))
    trials = [trial(workdir, fsync, args.send_s) for _ in range(args.trials)
              for fsync in ("everysec", "always")]  # fmt: skip
    summary = {
        fsync: {
            "trials": sum(1 for t in trials if t["fsync"] == fsync),
            "acknowledged": sum(int(t["acknowledged"]) for t in trials if t["fsync"] == fsync),
            "lost": sum(int(t["lost"]) for t in trials if t["fsync"] == fsync),
            "max_window_ms": max(float(t["window_ms"]) for t in trials if t["fsync"] == fsync),
        }
        for fsync in ("everysec", "always")
    }
    report = {"send_s": args.send_s, "summary": summary, "trials": trials,
              "kill": "SIGKILL of redis-server while the producer sends",
              "measured_at": time.strftime("%Y-%m-%dT%H:%M:%SZ")}  # fmt: skip
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(report, indent=2) + "\n")
    print(json.dumps(summary, indent=2))


if __name__ == "__main__":
    main()
