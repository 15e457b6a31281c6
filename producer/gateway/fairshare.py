"""Fair share between tenants: a line per tenant in Redis, and a dispatcher that feeds the Celery
queue from the lines in turn.

kombu serves priority steps before queues, so one tenant's flood at a high priority would
starve everyone on the shared Celery queue. Gateway jobs therefore wait in their tenant's own
line (a sorted set: priority first, then arrival), and the dispatcher keeps at most
``FLEET_FAIR_QUEUE_DEPTH`` gateway jobs waiting in each Celery queue. When a place frees, the
tenant served longest ago sends its best job. So a job of a tenant with nothing else waiting
starts behind at most: the jobs running, the jobs workers hold reserved (one per process with
prefetch 1; two per batch-worker thread), the queue depth, and one job of each other tenant
whose turn came first. Priorities order a tenant's own jobs.

Every step is a Redis transaction (Lua), so a job the gateway acknowledged is in its line, in
the dispatcher's hand (``fleet:fair:dispatching``, swept and resent if the dispatcher died
before Celery had it), or in Celery's queue.
"""

from __future__ import annotations

import json
import logging
import threading
import time
import uuid
from dataclasses import dataclass
from typing import Any

import redis
from celery import Celery

from fleet import contract

log = logging.getLogger(__name__)

JOB_KEY = "fleet:gw:job:{job_id}"
INDEX_KEY = "fleet:gw:jobs:{tenant}"
LINE_KEY = "fleet:fair:line:{queue}:{tenant}"
TURNS_KEY = "fleet:fair:turns:{queue}"
QUEUES_KEY = "fleet:fair:queues"
WAITING_KEY = "fleet:fair:waiting:{tenant}"
DISPATCHING_KEY = "fleet:fair:dispatching"
SERVED_KEY = "fleet:fair:served"
SEQ_KEY = "fleet:fair:seq"
NOTIFY_KEY = "fleet:fair:notify"
LEADER_KEY = "fleet:fair:leader"
#: The newest jobs of a tenant that `GET /v1/jobs` lists.
INDEX_MAX = 1000
#: A job in the dispatcher's hand this long was lost by a dispatcher that died: resent.
STALE_DISPATCH_S = 30.0
#: Priority first: a line's score is (9 - priority) * PRIORITY_BAND + arrival number.
PRIORITY_BAND = 2**40

_ADD = """
local cap = tonumber(ARGV[6])
if cap > 0 and tonumber(redis.call('GET', KEYS[6]) or '0') >= cap then return {-1} end
if not redis.call('SET', KEYS[1], ARGV[1], 'NX', 'EX', ARGV[2]) then
  return {0, redis.call('GET', KEYS[1])}
end
redis.call('SET', KEYS[2], ARGV[3], 'EX', ARGV[2])
local seq = redis.call('INCR', KEYS[9])
redis.call('ZADD', KEYS[3], (9 - tonumber(ARGV[4])) * tonumber(ARGV[10]) + seq, ARGV[9])
if not redis.call('ZSCORE', KEYS[4], ARGV[5]) then
  -- a tenant new to the ring comes just before the one served last
  redis.call('ZADD', KEYS[4], tonumber(redis.call('GET', KEYS[10]) or '0') - 0.5, ARGV[5])
end
redis.call('SADD', KEYS[5], ARGV[7])
redis.call('INCR', KEYS[6])
redis.call('ZADD', KEYS[7], ARGV[8], ARGV[9])
redis.call('ZREMRANGEBYRANK', KEYS[7], 0, -1 - tonumber(ARGV[11]))
redis.call('LPUSH', KEYS[8], ARGV[7])
redis.call('LTRIM', KEYS[8], 0, 0)
return {1}
"""

_POP = """
local room = tonumber(ARGV[5])
if room > 0 then
  -- the Celery queue's priority lists (KEYS[4] on) hold `room` jobs already: none goes now
  local queued = 0
  for i = 4, #KEYS do queued = queued + redis.call('LLEN', KEYS[i]) end
  if queued >= room then
    if redis.call('ZCARD', KEYS[1]) > 0 then return {'', '', '', 'full'} end
    return false
  end
end
local tenants = redis.call('ZRANGE', KEYS[1], 0, -1)
for _, t in ipairs(tenants) do
  local line = ARGV[1] .. t
  local got = redis.call('ZPOPMIN', line)
  if #got > 0 then
    local id = got[1]
    local served = redis.call('INCR', KEYS[2])
    if redis.call('ZCARD', line) == 0 then
      redis.call('ZREM', KEYS[1], t)
    else
      redis.call('ZADD', KEYS[1], served, t)
    end
    redis.call('DECR', ARGV[3] .. t)
    redis.call('HSET', KEYS[3], id, ARGV[4])
    return {id, redis.call('GET', ARGV[2] .. id) or '', t}
  end
  redis.call('ZREM', KEYS[1], t)
end
return false
"""

_CANCEL = """
if redis.call('ZREM', KEYS[1], ARGV[1]) == 1 then
  redis.call('DECR', KEYS[2])
  return 1
end
return 0
"""

_RENEW = """
if redis.call('GET', KEYS[1]) == ARGV[1] then
  return redis.call('PEXPIRE', KEYS[1], ARGV[2])
end
return 0
"""


def _text(v: bytes | str | None) -> str | None:
    return v.decode() if isinstance(v, bytes) else v


@dataclass(frozen=True)
class LineJob:
    """What a job in a line keeps until the dispatcher sends it."""

    job_id: str
    tenant: str
    queue: str
    priority: int
    message: dict[str, Any]
    soft_time_limit: float
    time_limit: float
    expires_at: float | None

    def to_json(self) -> str:
        return json.dumps(self.__dict__, sort_keys=True)

    @classmethod
    def from_json(cls, raw: bytes | str) -> LineJob:
        return cls(**json.loads(raw))


class FairLines:
    """The tenants' lines in Redis: add, pop in turn, cancel, count places."""

    def __init__(self, redis_client: redis.Redis, claim_ttl_s: int) -> None:
        self.redis = redis_client
        self.claim_ttl_s = claim_ttl_s
        self._add = redis_client.register_script(_ADD)
        self._pop = redis_client.register_script(_POP)
        self._cancel = redis_client.register_script(_CANCEL)

    def add(self, job: LineJob, claim_value: str, max_queued: int) -> tuple[int, str | None]:
        """Claim the id and put the job in its tenant's line, at once. (1, None): added;
        (0, prior claim): the id was taken before, nothing added; (-1, None): the tenant has
        ``max_queued`` jobs waiting already."""
        t, q, jid = job.tenant, job.queue, job.job_id
        keys = [contract.CLAIM_KEY.format(job_id=jid), JOB_KEY.format(job_id=jid),
                LINE_KEY.format(queue=q, tenant=t), TURNS_KEY.format(queue=q), QUEUES_KEY,
                WAITING_KEY.format(tenant=t), INDEX_KEY.format(tenant=t), NOTIFY_KEY, SEQ_KEY,
                SERVED_KEY]  # fmt: skip
        args = [claim_value, self.claim_ttl_s, job.to_json(), job.priority, t, max_queued, q,
                time.time(), jid, PRIORITY_BAND, INDEX_MAX]  # fmt: skip
        reply = self._add(keys=keys, args=args)
        return int(reply[0]), _text(reply[1]) if len(reply) > 1 else None

    def pop(self, queue: str) -> LineJob | None:
        """The next job for ``queue``: the best of the tenant served longest ago; it is held in
        the dispatching hash until ``sent``."""
        return self.take(queue, 0)[0]

    def take(self, queue: str, room: int) -> tuple[LineJob | None, bool]:
        """``pop``, but with ``room`` > 0 none while the Celery queue holds ``room`` jobs
        already, checked in the same script: a job goes in one round trip. (job, False), or
        (None, whether jobs wait behind a full queue)."""
        keys = [TURNS_KEY.format(queue=queue), SERVED_KEY, DISPATCHING_KEY]
        if room > 0:
            keys += contract.queue_keys(queue)
        reply = self._pop(
            keys=keys,
            args=[
                LINE_KEY.format(queue=queue, tenant=""),
                JOB_KEY.format(job_id=""),
                WAITING_KEY.format(tenant=""),
                time.time(),
                room,
            ],
        )
        if not reply:
            return None, False
        if len(reply) > 3:
            return None, True
        job_id, raw, tenant = (_text(x) or "" for x in reply)
        if not raw:  # its record expired (after the claim TTL): nothing left to send
            log.error("job %s of tenant %s has no record left; dropped", job_id, tenant)
            self.redis.hdel(DISPATCHING_KEY, job_id)
            return None, False
        return LineJob.from_json(raw), False

    def sent(self, job_id: str) -> None:
        self.redis.hdel(DISPATCHING_KEY, job_id)

    def cancel(self, job: LineJob) -> bool:
        """Take a job out of its line; False when it has left the line already."""
        keys = [LINE_KEY.format(queue=job.queue, tenant=job.tenant),
                WAITING_KEY.format(tenant=job.tenant)]  # fmt: skip
        return bool(self._cancel(keys=keys, args=[job.job_id]))

    def record(self, job_id: str) -> LineJob | None:
        raw = self.redis.get(JOB_KEY.format(job_id=job_id))
        return LineJob.from_json(raw) if raw else None

    def queues(self) -> list[str]:
        return sorted(_text(q) or "" for q in self.redis.smembers(QUEUES_KEY))

    def waiting(self, tenant: str) -> int:
        return int(self.redis.get(WAITING_KEY.format(tenant=tenant)) or 0)

    def place(self, job: LineJob) -> int | None:
        """How many jobs start before this one, if it is in its line (None when it is not):
        those in the Celery queue and in the dispatcher's hand, its own line's jobs before
        it, and from each other tenant as many as its turns give them first."""
        line = LINE_KEY.format(queue=job.queue, tenant=job.tenant)
        rank = self.redis.zrank(line, job.job_id)
        if rank is None:
            return None
        ring = [_text(t) or "" for t in self.redis.zrange(TURNS_KEY.format(queue=job.queue), 0, -1)]
        with self.redis.pipeline(transaction=False) as pipe:
            for key in contract.queue_keys(job.queue):
                pipe.llen(key)
            pipe.hlen(DISPATCHING_KEY)
            for t in ring:
                pipe.zcard(LINE_KEY.format(queue=job.queue, tenant=t))
            counts = [int(n) for n in pipe.execute()]
        steps = len(contract.queue_keys(job.queue))
        ahead = sum(counts[: steps + 1]) + int(rank)
        before = True
        for t, n in zip(ring, counts[steps + 1 :], strict=True):
            if t == job.tenant:
                before = False
                continue
            ahead += min(n, int(rank) + 1 if before else int(rank))
        return ahead

    def depth(self, queue: str) -> int:
        with self.redis.pipeline(transaction=False) as pipe:
            for key in contract.queue_keys(queue):
                pipe.llen(key)
            return sum(int(n) for n in pipe.execute())


class Dispatcher:
    """Feeds the Celery queues from the tenants' lines. Every gateway process runs one; a lock
    in Redis lets one of them dispatch at a time (the others wait to take over)."""

    def __init__(self, lines: FairLines, celery: Celery, depth: int, poll_s: float = 0.05):
        self.lines = lines
        self.redis = lines.redis
        self.celery = celery
        self.depth = max(1, depth)
        self.poll_s = poll_s
        self.token = uuid.uuid4().hex
        self._renew = self.redis.register_script(_RENEW)
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self._swept = 0.0
        self._renewed = 0.0
        self.leader = False
        #: The last round left jobs waiting behind a full queue.
        self.full = False

    def start(self) -> None:
        self._thread = threading.Thread(target=self._run, name="fair-dispatcher", daemon=True)
        self._thread.start()

    def stop(self) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout=5)
        if self.leader:
            self.redis.eval(
                "if redis.call('GET', KEYS[1]) == ARGV[1] then redis.call('DEL', KEYS[1]) end",
                1, LEADER_KEY, self.token,
            )  # fmt: skip

    def _run(self) -> None:
        away = False
        woken = ""
        while not self._stop.is_set():
            try:
                sent = self.tick(first=woken)
                woken = ""
            except redis.RedisError as exc:
                if not away:  # once an outage, not once a second
                    log.warning("fair dispatcher: Redis away (%s); trying every second", exc)
                away = True
                self._stop.wait(1.0)
                continue
            except Exception:
                log.exception("fair dispatcher: unexpected error; trying again")
                self._stop.wait(1.0)
                continue
            if away:
                log.info("fair dispatcher: Redis is back")
                away = False
            if self.full or not self.leader:  # look for a freed place (or the lock) soon;
                # only the dispatching process takes the wake-ups of new jobs
                self._stop.wait(self.poll_s)
            elif not sent:
                try:  # woken at once by a new job (its queue's name), else look again soon
                    got = self.redis.blpop([NOTIFY_KEY], timeout=self.poll_s)
                    woken = _text(got[1]) or "" if got else ""
                except redis.RedisError:
                    self._stop.wait(self.poll_s)

    def _lead(self) -> bool:
        """Whether this process dispatches: it holds the lock (5 s, renewed after a third of
        that), or takes it when free."""
        ttl_ms = 5000
        now = time.monotonic()
        if self.leader and now - self._renewed < ttl_ms / 3000:
            return True
        if self.leader and self._renew(keys=[LEADER_KEY], args=[self.token, ttl_ms]):
            self._renewed = now
            return True
        self.leader = bool(self.redis.set(LEADER_KEY, self.token, nx=True, px=ttl_ms))
        self._renewed = now
        if self.leader:
            log.info("fair dispatcher: this process dispatches now")
        return self.leader

    def tick(self, first: str = "") -> int:
        """One round: for each queue with waiting gateway jobs, fill its free places in turn;
        ``first``, the queue a new job woke the dispatcher for, before anything else. Returns
        how many jobs were sent."""
        if not self._lead():
            return 0
        sent = self.fill(first) if first else 0
        now = time.monotonic()
        if now - self._swept > STALE_DISPATCH_S / 3:
            self._swept = now
            self.sweep()
        self.full = False
        for queue in self.lines.queues():
            sent += self.fill(queue)
        return sent

    def fill(self, queue: str) -> int:
        """Send ``queue``'s next jobs while its Celery queue has room; how many went. Each pop
        checks the room in the same script, so a job goes in one round trip."""
        sent = 0
        while sent < self.depth:
            job, full = self.lines.take(queue, self.depth)
            if job is None:
                self.full = self.full or full
                break
            self.send(job)
            sent += 1
        return sent

    def send(self, job: LineJob) -> None:
        expires = None
        if job.expires_at is not None:  # Celery expires it; the worker records the expiry
            expires = max(job.expires_at - time.time(), 0.001)
        self.celery.send_task(
            contract.TASK_GENERATE,
            kwargs={"job": job.message},
            queue=job.queue,
            task_id=job.job_id,
            soft_time_limit=job.soft_time_limit,
            time_limit=job.time_limit,
            expires=expires,
            priority=contract.celery_priority(job.priority),
        )
        self.lines.sent(job.job_id)
        log.info("dispatched job %s of tenant %s to %s", job.job_id, job.tenant, job.queue)

    def sweep(self) -> None:
        """Resend jobs a dispatcher took from a line and never handed to Celery (it died in
        between): those in the hand for STALE_DISPATCH_S whose id Celery has not seen."""
        for raw_id, raw_at in self.redis.hgetall(DISPATCHING_KEY).items():
            job_id, at = _text(raw_id) or "", float(_text(raw_at) or 0)
            if time.time() - at < STALE_DISPATCH_S:
                continue
            job = self.lines.record(job_id)
            meta = self.redis.exists(f"celery-task-meta-{job_id}")
            if job is None or meta or self._queued(job):
                self.lines.sent(job_id)
                continue
            log.warning("job %s was taken from its line and not sent; sending it now", job_id)
            self.send(job)

    def _queued(self, job: LineJob) -> bool:
        needle = f'"id": "{job.job_id}"'.encode()
        for key in contract.queue_keys(job.queue):
            for raw in self.redis.lrange(key, 0, 999):
                if needle in raw:
                    return True
        return any(needle in raw for raw in self.redis.hvals(contract.UNACKED_KEY))
