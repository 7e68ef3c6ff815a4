"""jobservice's scale-out mode: any number of processes, on one machine or many, pointed
at one Redis, are one service.

Imported only when REDIS_URL is set (redis-py is the optional extra `jobservice[redis]`).
It implements the same seams as the embedded mode, so the handlers, the event hub and
Socket.IO cannot tell the two apart:

- the store: every change is made by one Lua script that checks it, numbers it (one
  INCR for the whole cluster), stores it and appends it to a stream whose entry ids are
  the seqs. Each node keeps the whole registry in memory as a replica, fed by tailing
  that stream in order, and announces each change to its clients as it applies it:
  every node sees every change once, in seq order, so `since` and Socket.IO recovery
  work on any node, and reads never wait for Redis;
- the scheduler: pending jobs wait in a sorted set by due time. A node claims the due
  ones with a lease it renews, and resolves a job with a write that only succeeds while
  the job is still pending and still its claim. A killed node's claims lapse after
  JOB_LEASE and are claimed by another: a photo may be fetched twice, a job resolves once;
- the photo pool: one list for the cluster, and the Unsplash rate-limit pause and a
  rejected key are keys every node reads.

Times come from the nodes' clocks (as in BullMQ and arq): keep them in sync (NTP).
Redis Cluster is not supported; one Redis (with replicas, if you like) is.
"""

from __future__ import annotations

import asyncio
import heapq
import itertools
import json
import logging
import random
import time
from pathlib import Path

import aiofiles.os
import redis.asyncio as aioredis
from redis.asyncio.retry import Retry
from redis.backoff import NoBackoff
from redis.exceptions import RedisError

import jobservice
from jobservice import (
    Conflict,
    Job,
    JobStore,
    KeyRejected,
    Metrics,
    Photo,
    RateLimited,
    Scheduler,
    Settings,
    StorageError,
    StoreCorrupt,
    Tombstone,
    UnsplashImages,
    _without_password,
    iso,
    json_before_seq,
    record_from_dict,
    settle,
)

log = logging.getLogger("jobservice")

# The stream only has to carry a node over a short loss of Redis (clients replay from
# the nodes' registries, not from it): a node that falls further behind reloads.
STREAM_LENGTH = 50_000
TAIL_BLOCK_MS = 1000
TAIL_COUNT = 1000
WRITE_BATCH = 1000  # changes per script call: a script blocks Redis while it runs
CLAIM_BATCH = 100
RECLAIM_BATCH = 1000


class Keys:
    """Every key, under REDIS_PREFIX."""

    def __init__(self, prefix: str):
        self.seq = prefix + "seq"  # the last seq handed out
        self.jobs = prefix + "jobs"  # hash: id -> "<creation seq> <job JSON>"
        self.events = prefix + "events"  # stream: entry <seq>-0: r = the change, n = by whom
        self.due = prefix + "due"  # zset: pending job id by due time (ms)
        self.claimed = prefix + "claimed"  # zset: claimed job id by end of lease (ms)
        self.claims = prefix + "claims"  # hash: claimed job id -> node
        self.deleted = prefix + "deleted"  # zset: deletion record by seq
        self.forgotten = prefix + "forgotten"  # seq of the last deletion let go
        self.photos = prefix + "photos"  # list: "<bought at, ms> <[result, image]>"
        self.paused = prefix + "unsplash:paused"  # set (with a TTL) by a rate limit
        self.rejected = prefix + "unsplash:rejected"  # set (with a TTL) by a 401

    def all(self) -> list[str]:
        return list(vars(self).values())

    def for_commit(self) -> list[str]:
        """KEYS[1..8] of the COMMIT script, in its order."""
        return [self.seq, self.jobs, self.events, self.due, self.claimed, self.claims,
                self.deleted, self.forgotten]


# One change per four arguments (op, id, JSON before its seq, argument); one result each:
# its seq, 0 if there was nothing to do (deleted already), -1 if its condition failed.
# Running twice (redis-py resends a command whose reply was lost) changes nothing more.
COMMIT = """
local node, cutoff, maxlen = ARGV[1], ARGV[2], ARGV[3]
local results = {}
local function append(head)
  local seq = redis.call('INCR', KEYS[1])
  local text = head .. seq .. '}'
  redis.call('XADD', KEYS[3], 'MAXLEN', '~', maxlen, seq .. '-0', 'r', text, 'n', node)
  return seq, text
end
for i = 4, #ARGV, 4 do
  local op, id, head, arg = ARGV[i], ARGV[i + 1], ARGV[i + 2], ARGV[i + 3]
  local held = redis.call('HGET', KEYS[2], id)
  local result = -1
  if op == 'create' then
    if held then
      result = tonumber(string.match(held, '^(%d+) '))
    else
      local seq, text = append(head)
      redis.call('HSET', KEYS[2], id, seq .. ' ' .. text)
      redis.call('ZADD', KEYS[4], arg, id)
      result = seq
    end
  elseif op == 'finish' then
    if held and redis.call('HGET', KEYS[6], id) == node
        and string.find(held, '"status":"pending"', 1, true) then
      local seq, text = append(head)
      redis.call('HSET', KEYS[2], id, string.match(held, '^(%d+) ') .. ' ' .. text)
      redis.call('ZREM', KEYS[5], id)
      redis.call('HDEL', KEYS[6], id)
      result = seq
    end
  elseif op == 'retry' then
    if held and string.find(held, '"status":"failed"', 1, true) then
      local seq, text = append(head)
      redis.call('HSET', KEYS[2], id, string.match(held, '^(%d+) ') .. ' ' .. text)
      redis.call('ZADD', KEYS[4], arg, id)
      result = seq
    end
  elseif not held then
    result = 0
  elseif op == 'delete' or string.match(held, '"seq":(%d+)}$') == arg then
    redis.call('HDEL', KEYS[2], id)
    redis.call('ZREM', KEYS[4], id)
    redis.call('ZREM', KEYS[5], id)
    redis.call('HDEL', KEYS[6], id)
    local seq, text = append(head)
    redis.call('ZADD', KEYS[7], seq, text)
    result = seq
  end
  results[#results + 1] = result
end
local oldest = redis.call('ZRANGE', KEYS[7], 0, 99, 'WITHSCORES')
for j = 1, #oldest, 2 do
  local at = string.match(oldest[j], '"deletedAt":"([^"]+)"')
  if at and at > cutoff then break end
  redis.call('ZREM', KEYS[7], oldest[j])
  redis.call('SET', KEYS[8], oldest[j + 1])
end
return results
"""

# Take back the claims whose lease ran out, then claim what is due: {ids, next due,
# next end of a lease, the seq now}.
CLAIM = """
local now = tonumber(ARGV[1])
local lapsed = redis.call('ZRANGEBYSCORE', KEYS[2], '-inf', now, 'LIMIT', 0, ARGV[5])
for _, id in ipairs(lapsed) do
  redis.call('ZREM', KEYS[2], id)
  redis.call('HDEL', KEYS[3], id)
  redis.call('ZADD', KEYS[1], now, id)
end
local ids = redis.call('ZRANGEBYSCORE', KEYS[1], '-inf', now, 'LIMIT', 0, ARGV[4])
for _, id in ipairs(ids) do
  redis.call('ZREM', KEYS[1], id)
  redis.call('ZADD', KEYS[2], now + tonumber(ARGV[3]), id)
  redis.call('HSET', KEYS[3], id, ARGV[2])
end
local due = redis.call('ZRANGE', KEYS[1], 0, 0, 'WITHSCORES')
local lease = redis.call('ZRANGE', KEYS[2], 0, 0, 'WITHSCORES')
return {ids, due[2] or '', lease[2] or '', redis.call('GET', KEYS[4]) or '0'}
"""

# Extend this node's claims; the ids it no longer holds.
RENEW = """
local lost = {}
for i = 3, #ARGV do
  if redis.call('HGET', KEYS[2], ARGV[i]) == ARGV[2] then
    redis.call('ZADD', KEYS[1], 'XX', ARGV[1], ARGV[i])
  else
    lost[#lost + 1] = ARGV[i]
  end
end
return lost
"""

# Give this node's claims back (at shutdown), due now.
RELEASE = """
for i = 3, #ARGV do
  if redis.call('HGET', KEYS[3], ARGV[i]) == ARGV[2] then
    redis.call('ZREM', KEYS[2], ARGV[i])
    redis.call('HDEL', KEYS[3], ARGV[i])
    redis.call('ZADD', KEYS[1], ARGV[1], ARGV[i])
  end
end
return 0
"""

# A photo from the shared pool (older ones than ARGV[1] are dropped), or why not:
# {kind, value, photos left}.
TAKE_PHOTO = """
local rejected = redis.call('GET', KEYS[3])
if rejected then return {'rejected', rejected, 0} end
while true do
  local photo = redis.call('LPOP', KEYS[1])
  if not photo then break end
  if tonumber(string.match(photo, '^(%d+) ')) >= tonumber(ARGV[1]) then
    return {'photo', photo, redis.call('LLEN', KEYS[1])}
  end
end
local paused = redis.call('PTTL', KEYS[2])
if paused > 0 then return {'paused', tostring(paused), 0} end
return {'empty', '', 0}
"""


def connect(settings: Settings, blocking: bool = False) -> aioredis.Redis:
    """A client whose commands give up within REDIS_TIMEOUT. One resend on a broken
    connection (after a Redis restart, the first command meets a dead socket): every
    script is safe to run twice. The tail's client waits as long as its XREAD blocks."""
    timeout = settings.redis_timeout
    return aioredis.Redis.from_url(
        settings.redis_url, decode_responses=True, socket_connect_timeout=timeout,
        socket_timeout=timeout + (TAIL_BLOCK_MS / 1000 if blocking else 0),
        retry=Retry(NoBackoff(), 1))


def ms(seconds: float) -> int:
    return int(seconds * 1000)


class RedisJobStore(JobStore):
    """The registry as a replica of Redis. commit() is the same promise as in the
    embedded mode: its future resolves once the change is stored (Redis acknowledged
    it) and applied here, announced to this node's clients, in seq order."""

    def __init__(self, settings: Settings, metrics: Metrics, node: str):
        super().__init__(Path(settings.jobs_file), settings.events_replay_window, metrics)
        self.settings = settings
        self.node = node
        self.keys = Keys(settings.redis_prefix)
        self.redis = connect(settings)
        self._tail_client = connect(settings, blocking=True)
        self._commit = self.redis.register_script(COMMIT)
        self._claim = self.redis.register_script(CLAIM)
        self._renew = self.redis.register_script(RENEW)
        self._release = self.redis.register_script(RELEASE)
        self._pending_writes: list[tuple[Job | Tombstone, str, str, asyncio.Future]] = []
        self._waiters: list[tuple[int, int, asyncio.Future]] = []  # heap by seq
        self._tiebreak = itertools.count()
        self._mine: dict[int, Job | Tombstone] = {}  # written here, not yet tailed
        self._own_seqs: set[int] = set()
        self._tail: asyncio.Task | None = None
        self._tail_fault: Exception | None = None

    def describe(self) -> str:
        return (f"Redis at {_without_password(self.settings.redis_url)} "
                f"(prefix {self.settings.redis_prefix!r})")

    # Loading: one consistent snapshot (a MULTI), then the stream from its seq on.

    async def load(self) -> int:
        try:
            snapshot = await self._read_snapshot()
        except (RedisError, OSError) as exc:
            raise StorageError(f"cannot reach Redis at "
                               f"{_without_password(self.settings.redis_url)}: {exc}") from None
        self._install(*snapshot)
        return 0

    async def _read_snapshot(self):
        keys = self.keys
        async with self.redis.pipeline(transaction=True) as pipe:
            pipe.get(keys.seq)
            pipe.hgetall(keys.jobs)
            pipe.zrange(keys.deleted, 0, -1)
            pipe.get(keys.forgotten)
            seq, stored, deleted, forgotten = await pipe.execute()
        return int(seq or 0), stored, deleted, int(forgotten or 0)

    def _install(self, seq: int, stored: dict, deleted: list, forgotten: int) -> None:
        jobs, created = [], {}
        for job_id, value in stored.items():
            cseq, _, text = value.partition(" ")
            try:
                job = Job.from_dict(json.loads(text))
            except ValueError as exc:
                raise StoreCorrupt(f"job {job_id} in Redis: {exc}") from None
            job._json = text
            created[job.id] = int(cseq)
            jobs.append(job)
        jobs.sort(key=lambda job: job.seq)
        self.jobs = {job.id: job for job in jobs}
        self.counts = dict.fromkeys(self.counts, 0)
        for job in jobs:
            self.counts[job.status] += 1
        self.order = sorted(self.jobs, key=created.__getitem__)
        self.position = {job_id: index for index, job_id in enumerate(self.order)}
        self.order_base = self._order_live_from = self._order_dead = 0
        tombstones = []
        for text in deleted:
            tomb = Tombstone.from_dict(json.loads(text))
            tomb._json = text
            tombstones.append(tomb)
        self.tombstones.clear()
        self.tombstones.extend(sorted(tombstones, key=lambda tomb: tomb.seq))
        self.forgotten = forgotten
        self.forget_old_tombstones()
        self.seq = seq

    async def open(self, replayed: int) -> None:
        self._loop = asyncio.get_running_loop()
        self._tail = asyncio.create_task(self._follow(), name="redis tail")
        self._writer = asyncio.create_task(self._write_batches(), name="redis writer")

    # Writing

    def commit(self, record: Job | Tombstone) -> asyncio.Future:
        if self._closing:
            raise StorageError("the service is shutting down")
        held = self.jobs.get(record.id)
        if isinstance(record, Tombstone):
            op = "delete" if record.reason == "deleted" else "expire"
            arg = str(held.seq) if held is not None else ""
        elif record.status == "pending":
            op, arg = ("create" if held is None else "retry"), str(ms(record.due_at))
        else:
            op, arg = "finish", ""
        future = self._loop.create_future()
        self._pending_writes.append((record, op, arg, future))
        self.in_flight.add(record.id)
        self._wakeup.set()
        return future

    async def _write_batches(self) -> None:
        while True:
            if not self._pending_writes:
                if self._closing:
                    return
                self._wakeup.clear()
                await self._wakeup.wait()
                continue
            batch = self._pending_writes[:WRITE_BATCH]
            del self._pending_writes[:WRITE_BATCH]
            cutoff = iso(time.time() - self.replay_window)
            args = [self.node, cutoff, STREAM_LENGTH]
            for record, op, arg, _ in batch:
                record.seq = 0
                record._json = None
                args += (op, record.id, json_before_seq(record), arg)
            started = time.perf_counter()
            try:
                async with asyncio.timeout(self.settings.redis_timeout):
                    results = await self._commit(keys=self.keys.for_commit(), args=args)
            except (RedisError, OSError, TimeoutError) as exc:
                # It may still have been written (the reply was lost): then it arrives
                # through the stream like any change, though its client was told 503.
                self._note_fault(exc)
                refusal = StorageError(f"jobs cannot be stored right now: "
                                       f"Redis: {exc or 'timed out'}")
                for record, _, _, future in batch:
                    self.in_flight.discard(record.id)
                    settle(future, refusal)
                continue
            self.metrics.fsync.observe(time.perf_counter() - started)
            self.metrics.batch_size.observe(len(batch))
            self._recovered()
            for (record, _, _, future), seq in zip(batch, results, strict=True):
                if seq > 0:
                    record.seq = seq
                    record._json = None
                    if seq > self.seq:
                        self._mine[seq] = record
                    heapq.heappush(self._waiters, (seq, next(self._tiebreak), future))
                    continue
                self.in_flight.discard(record.id)
                settle(future, None if seq == 0 else
                       Conflict("the job changed on another node first"))
            self._settle()

    def _note_fault(self, exc: Exception) -> None:
        if self.fault is None:
            log.error("cannot reach Redis at %s: %s; new jobs are refused (503) and "
                      "resolutions wait until it answers again",
                      _without_password(self.settings.redis_url), exc or "timed out")
        self.fault = OSError(str(exc) or "timed out")

    def _recovered(self) -> None:
        if self.fault is not None and self._tail_fault is None:
            log.warning("Redis answers again")
            self.fault = None

    def _settle(self) -> None:
        waiters = self._waiters
        while waiters and waiters[0][0] <= self.seq:
            settle(heapq.heappop(waiters)[2])

    async def applied(self, seq: int) -> None:
        """Wait until this replica has applied the change numbered seq."""
        if seq > self.seq:
            future = asyncio.get_running_loop().create_future()
            heapq.heappush(self._waiters, (seq, next(self._tiebreak), future))
            await future

    # The tail: the stream, in order, from the seq this replica has.

    async def _follow(self) -> None:
        failures = 0
        while not self._closing:
            try:
                answer = await self._tail_client.xread(
                    {self.keys.events: f"{self.seq}-0"}, count=TAIL_COUNT, block=TAIL_BLOCK_MS)
            except (RedisError, OSError) as exc:
                self._tail_fault = exc
                self._note_fault(exc)
                failures += 1
                await asyncio.sleep(min(1.0, 0.02 * 2 ** failures) * random.uniform(0.5, 1))
                continue
            if self._tail_fault is not None:
                self._tail_fault = None
                self._recovered()
            failures = 0
            if answer:
                await self._take(answer[0][1])

    async def _take(self, entries: list) -> None:
        records, expected = [], self.seq + 1
        for entry_id, fields in entries:
            seq = int(entry_id.partition("-")[0])
            if seq != expected:  # trimmed away while this node was cut off
                self._apply(records)
                await self._reload(seq)
                return
            expected += 1
            record = self._mine.pop(seq, None)
            if record is None:  # not written here, or tailed before its reply was read
                text = fields["r"]
                record = record_from_dict(json.loads(text))
                record._json = text
            if fields.get("n") == self.node:
                self._own_seqs.add(seq)
            records.append(record)
        self._apply(records)
        self._settle()

    def _announce(self, record: Job | Tombstone, authored: bool) -> None:
        own = record.seq in self._own_seqs
        if own:
            self._own_seqs.discard(record.seq)
        super()._announce(record, own)

    async def _reload(self, seq: int) -> None:
        log.error("this node fell behind Redis's event stream (it needed seq %d, the "
                  "oldest kept is %d): reloading every job; its clients reconnect",
                  self.seq + 1, seq)
        while True:
            try:
                snapshot = await self._read_snapshot()
                break
            except (RedisError, OSError) as exc:
                self._note_fault(exc)
                await asyncio.sleep(1.0)
        self._mine.clear()
        self._own_seqs.clear()
        self.in_flight.clear()
        self._install(*snapshot)
        self._settle()
        for listener in self.replaced:
            listener()

    # Claims, for the scheduler

    async def _call(self, script, keys: list[str], args: list):
        try:
            async with asyncio.timeout(self.settings.redis_timeout):
                return await script(keys=keys, args=args)
        except (RedisError, OSError, TimeoutError) as exc:
            self._note_fault(exc)
            raise StorageError(f"Redis: {exc or 'timed out'}") from None

    async def claim(self, limit: int) -> tuple[list[str], float | None, float | None, int]:
        """(the due job ids claimed for this node, when the next job is due, when the
        next claim lapses, the seq they are known by)."""
        keys = self.keys
        ids, due, lapse, seq = await self._call(
            self._claim, [keys.due, keys.claimed, keys.claims, keys.seq],
            [ms(time.time()), self.node, ms(self.settings.job_lease), limit, RECLAIM_BATCH])
        return (ids, float(due) / 1000 if due else None, float(lapse) / 1000 if lapse else None,
                int(seq))

    async def renew(self, ids: list[str]) -> list[str]:
        """Extend this node's claims on ids; those it no longer holds."""
        keys = self.keys
        return await self._call(self._renew, [keys.claimed, keys.claims],
                                [ms(time.time() + self.settings.job_lease), self.node, *ids])

    async def release(self, ids: list[str]) -> None:
        keys = self.keys
        await self._call(self._release, [keys.due, keys.claimed, keys.claims],
                         [ms(time.time()), self.node, *ids])

    async def close(self) -> None:
        self._closing = True
        self._wakeup.set()
        if self._writer is not None:
            await self._writer
        if self._tail is not None:
            # redis-py can swallow a cancellation that lands while it connects: the
            # tail also ends by itself, within one block, once it sees _closing.
            self._tail.cancel()
            await asyncio.wait((self._tail,), timeout=TAIL_BLOCK_MS / 1000
                               + self.settings.redis_timeout)
        await self.redis.aclose()
        await self._tail_client.aclose()


class RedisScheduler(Scheduler):
    """Every node keeps the heaps as wake-up times; the jobs it resolves are the ones
    it claims in Redis. Its claims are renewed every third of JOB_LEASE; it wakes for
    the next lapse of anyone's claim too, which is how a dead node's jobs are found."""

    store: RedisJobStore

    def __init__(self, store: RedisJobStore, images, settings: Settings):
        super().__init__(store, images, settings)
        self._claimed: set[str] = set()
        self._claim_wanted = True  # at start: whatever fell due while no node ran
        self._failures = 0
        self._renewer: asyncio.Task | None = None
        self._stopping = False

    def start(self) -> None:
        super().start()
        self._renewer = asyncio.create_task(self._renew_claims(), name="claim renewer")
        self._wakeup.set()

    async def stop(self) -> None:
        self._stopping = True
        if self._timer is not None:
            self._timer.cancel()
        tasks = [task for task in (self._renewer, self._task) if task is not None]
        for task in tasks:
            task.cancel()
        if tasks:  # not awaited outright: see RedisJobStore.close
            await asyncio.wait(tasks, timeout=self.settings.redis_timeout + 1)
        if self._claimed:  # handed back, so that another node need not wait a lease
            try:
                await self.store.release(sorted(self._claimed))
            except StorageError:
                pass

    def _on_commit(self, record: Job | Tombstone) -> None:
        if record.status != "pending":
            self._claimed.discard(record.id)
        super()._on_commit(record)

    def _release(self, now: float) -> bool:
        while self._heap and self._heap[0][0] <= now:
            heapq.heappop(self._heap)
        self._claim_wanted = True
        return True

    def _next_ready(self) -> Job | None:
        store, claimed = self.store, self._claimed
        while self._ready:
            job_id = self._ready[0]
            job = store.get(job_id)
            if job is not None and job.status == "pending" and job_id in claimed \
                    and job_id not in store.in_flight:
                return job
            self._ready.popleft()
        return None

    async def _refill(self) -> bool:
        if not self._claim_wanted or self._stopping:
            return False
        self._claim_wanted = False
        try:
            ids, due, lapse, seq = await self.store.claim(CLAIM_BATCH)
        except StorageError:
            self._claim_wanted = True
            self._failures += 1
            await asyncio.sleep(self._backoff(self._failures))
            return True
        self._failures = 0
        if ids:
            await self.store.applied(seq)  # the replica knows every job it claimed
            self._claimed.update(ids)
            self._ready.extend(ids)
            self._claim_wanted = len(ids) == CLAIM_BATCH
        for when in (due, lapse):
            if when is not None:
                self._wake_at(when)
        return bool(ids)

    def _retry_later(self, job_id: str) -> None:
        asyncio.get_running_loop().call_later(
            self.settings.retry_base_delay, self._requeue, job_id)

    def _requeue(self, job_id: str) -> None:
        if job_id in self._claimed:
            self._ready.append(job_id)
            self._wakeup.set()

    async def _renew_claims(self) -> None:
        while True:
            await asyncio.sleep(self.settings.job_lease / 3)
            if not self._claimed:
                continue
            try:
                lost = await self.store.renew(sorted(self._claimed))
            except StorageError:
                continue  # if the lease lapses meanwhile, the final write is refused
            for job_id in lost:
                self._claimed.discard(job_id)


class SharedPhotoPool(UnsplashImages):
    """Unsplash photos bought in batches of 30 for the whole cluster: one list in Redis.
    A rate-limit pause and a rejected key are keys too, so one node's 429 pauses all,
    and one node's 401 fails every node's waiting jobs, once each."""

    def __init__(self, session, settings: Settings, metrics: Metrics, store: RedisJobStore):
        super().__init__(session, settings, metrics)
        self.keys = store.keys
        self.redis = store.redis
        self._take_script = self.redis.register_script(TAKE_PHOTO)
        self._shared_size = 0

    def describe(self) -> str:
        return super().describe() + ", photos shared through Redis"

    @property
    def pool_size(self) -> int:
        return len(self._pool) + self._shared_size

    async def take(self) -> Photo:
        now = time.monotonic()  # put back here (its job did not store), or not shareable
        while self._pool and now - self._pool[0].fetched_at > jobservice.POOL_MAX_AGE:
            self._pool.popleft()
        if self._pool:
            return self._pool.popleft()
        keys, timeout = self.keys, self._settings.redis_timeout
        try:
            async with asyncio.timeout(timeout):
                kind, value, self._shared_size = await self._take_script(
                    keys=[keys.photos, keys.paused, keys.rejected],
                    args=[ms(time.time() - jobservice.POOL_MAX_AGE)])
        except (RedisError, OSError, TimeoutError):
            raise RateLimited(timeout, "the shared photo pool (Redis) is out of reach") from None
        if kind == "photo":  # its age goes with it: put back, it is no younger
            bought, _, text = value.partition(" ")
            result, image = json.loads(text)
            age = max(0.0, time.time() - int(bought) / 1000)
            return Photo(result, image, time.monotonic() - age)
        if kind == "rejected":
            raise KeyRejected(value)
        if kind == "paused":
            raise RateLimited(int(value) / 1000)
        if now < self._paused_until:  # this node's own pause, if sharing it failed
            raise RateLimited(self._paused_until - now)
        try:
            photos = await self._buy()
        except RateLimited as exc:
            await self._share(keys.paused, "1", exc.retry_after)
            raise
        except KeyRejected as exc:
            await self._share(keys.rejected, str(exc), self._settings.retry_max_delay)
            raise
        if self._paused_until > time.monotonic():  # that was the last call allowed for now
            await self._share(keys.paused, "1", self._paused_until - time.monotonic())
        if len(photos) > 1:
            bought = ms(time.time())
            try:
                async with asyncio.timeout(timeout):
                    await self.redis.rpush(keys.photos, *(
                        f"{bought} {json.dumps([photo.result, photo.image])}"
                        for photo in photos[1:]))
            except (RedisError, OSError, TimeoutError):
                self._pool.extend(photos[1:])  # kept here rather than wasted
        return photos[0]

    async def _share(self, key: str, value: str, seconds: float) -> None:
        try:
            async with asyncio.timeout(self._settings.redis_timeout):
                await self.redis.set(key, value, px=max(1, ms(seconds)))
        except (RedisError, OSError, TimeoutError):
            pass  # this node pauses anyway; the others find out for themselves


# import / export


class Refused(Exception):
    """The target holds other jobs, and --force was not given."""


async def import_file(settings: Settings, path: Path, force: bool) -> str:
    if not await aiofiles.os.path.isfile(path):
        raise Refused(f"{path} does not exist")
    jobs, deleted, seq, forgotten, _, migrated = await asyncio.get_running_loop() \
        .run_in_executor(None, JobStore(path)._read_files)
    jobs = list(jobs.values())  # in creation order
    for number, job in enumerate(jobs, 1):
        if job.seq == 0:  # the old service's jobs carry none
            job.seq, job._json = number, None
    seq = max([seq, len(jobs), *(job.seq for job in jobs),
               *(tomb.seq for tomb in deleted.values())])
    keys = Keys(settings.redis_prefix)
    client = connect(settings)
    try:
        stored = await client.hgetall(keys.jobs)
        history = int(await client.get(keys.seq) or 0)
        if stored or history:
            ours = {job.id: job.seq for job in jobs}
            theirs = {}
            for job_id, value in stored.items():
                match = value.rsplit('"seq":', 1)
                theirs[job_id] = int(match[1].rstrip("}")) if len(match) == 2 else -1
            if theirs == ours:
                return f"Redis already holds the {len(jobs)} jobs of {path}; nothing to do"
            if not force:  # even with no job left, its seqs were handed out: not reusable
                raise Refused(f"Redis (prefix {settings.redis_prefix!r}) already holds "
                              f"{len(stored)} other jobs and changes up to seq {history}; "
                              "use --force to replace them")
        seq = max(seq, history)  # --force never hands out a seq a second time
        async with client.pipeline(transaction=True) as pipe:
            pipe.delete(*keys.all())
            for start in range(0, len(jobs), 10_000):
                chunk = jobs[start:start + 10_000]
                pipe.hset(keys.jobs, mapping={
                    job.id: f"{number} {job.json}"
                    for number, job in enumerate(chunk, start + 1)})
                due = {job.id: ms(job.due_at) for job in chunk if job.status == "pending"}
                if due:
                    pipe.zadd(keys.due, due)
            if deleted:
                pipe.zadd(keys.deleted, {tomb.json: tomb.seq for tomb in deleted.values()})
            pipe.set(keys.seq, seq)
            pipe.set(keys.forgotten, forgotten)
            await pipe.execute()
    except RedisError as exc:
        raise StorageError(f"Redis: {exc}") from None
    finally:
        await client.aclose()
    kind = "the old service's" if migrated else "a"
    pending = sum(job.status == "pending" for job in jobs)
    return (f"imported {len(jobs)} jobs ({pending} pending) from {kind} jobs file {path} "
            f"into Redis (prefix {settings.redis_prefix!r}); seq is {seq}"
            + _retention_note(settings, jobs, migrated))


def _retention_note(settings: Settings, jobs: list[Job], migrated: bool) -> str:
    """How long the finished jobs imported will be kept. The old service's are taken as
    finished at the import (it never said when), so their JOB_RETENTION starts now."""
    finished = [job for job in jobs if job.status != "pending"]
    retention = settings.job_retention
    if not finished:
        return ""
    if not retention:
        return f"; the {len(finished)} finished are kept forever (JOB_RETENTION=0)"
    kept = jobservice.describe_duration(retention)
    if migrated:
        return f"; the {len(finished)} finished are kept {kept} from now (JOB_RETENTION)"
    cutoff = time.time() - retention
    past = sum((job.resolved_at or job.created_at) <= cutoff for job in finished)
    return (f"; the {len(finished)} finished are kept {kept} after they finished "
            f"(JOB_RETENTION)" + (f", so {past} of them expire as soon as a node starts"
                                  if past else ""))


async def export_file(settings: Settings, path: Path, force: bool) -> str:
    source = RedisJobStore(settings, Metrics(), "export")
    try:
        await source.load()
    finally:
        await source.redis.aclose()
        await source._tail_client.aclose()
    temp = path.with_name(path.name + ".export")
    target = JobStore(temp)
    target.jobs, target.order = source.jobs, source.order
    target.seq, target.forgotten, target.tombstones = source.seq, source.forgotten, \
        source.tombstones
    await target.write_snapshot()
    if not await asyncio.get_running_loop().run_in_executor(None, _put, temp, path, force):
        return f"{path} already holds the {len(source.jobs)} jobs in Redis; nothing to do"
    return (f"exported {len(source.jobs)} jobs ({source.counts['pending']} pending) from "
            f"Redis (prefix {settings.redis_prefix!r}) to {path}; seq is {source.seq}")



def _put(written: Path, path: Path, force: bool) -> bool:
    """Move the file written into place, unless the same is there (False); Refused if
    something else is, without force."""
    try:
        if path.exists():
            if path.read_bytes() == written.read_bytes():
                written.unlink()
                return False
            if not force:
                raise Refused(f"{path} exists and holds other jobs; use --force to replace it")
        written.replace(path)
        return True
    except BaseException:
        written.unlink(missing_ok=True)
        raise
