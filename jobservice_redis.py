"""jobservice's scale-out mode: any number of processes, on one machine or many, pointed
at one Redis, are one service.

Imported only when REDIS_URL or REDIS_SENTINELS is set (redis-py is the optional extra
`jobservice[redis]`). It implements the same seams as the embedded mode, so the
handlers, the event hub and Socket.IO cannot tell the two apart:

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
- the photo pool: one list for the cluster, the access key's budget one hash every
  node changes in a WATCHed transaction (so N nodes spend what one key allows), and a
  rejected key a key every node reads;
- session routing: a Socket.IO request for a session another process holds is relayed
  there (workers by a Unix socket each, nodes by NODE_URL), and an upgraded session
  moves to the process that holds its WebSocket.

A node loads the registry in short steps (the seq, the jobs a thousand at a time, then
the changes made meanwhile from the stream), so that no command holds Redis for long,
and serves /healthz ("loading") while it does. Found through Sentinel, the primary can
fail over: each node finds the new one, checks that it holds every change the node
applied, and tails on from its seq. With REDIS_MIN_REPLICAS_ACK=N a node applies (and
so acknowledges and announces) a change only once WAIT says N replicas have it.

Times come from the nodes' clocks (as in BullMQ and arq): keep them in sync (NTP).
Redis Cluster is not supported; one primary (with replicas and Sentinel, if you like) is.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import gc
import hashlib
import heapq
import hmac
import itertools
import json
import logging
import operator
import os
import random
import re
import secrets
import time
from collections import OrderedDict, deque
from pathlib import Path

import aiofiles.os
import aiohttp
import redis.asyncio as aioredis
from aiohttp import web
from redis.asyncio.retry import Retry
from redis.asyncio.sentinel import Sentinel
from redis.backoff import NoBackoff
from redis.exceptions import RedisError, WatchError

import jobservice
from jobservice import (
    EIO_MAX_PAYLOAD,
    EIO_UPGRADE_TIMEOUT,
    ENGINE,
    STORE,
    ApiError,
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
    Tombstone,
    UnsplashImages,
    _engineio_poll,
    _engineio_post,
    _engineio_refusal,
    _engineio_text,
    _without_password,
    backoff,
    engineio_probe,
    engineio_receive,
    engineio_unreadable,
    is_ascii_number,
    iso,
    job_from_text,
    json_before_seq,
    read_body,
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
LOAD_CHUNK = 1000  # jobs per HSCAN and entries per XRANGE while loading: ~1 ms of Redis each
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
        self.quota = prefix + "unsplash:quota"  # hash: the key's budget (Quota.fields)
        self.buying = prefix + "unsplash:buying"  # zset: node by end of its call (ms)
        self.rejected = prefix + "unsplash:rejected"  # set (with a TTL) by a 401
        # + node: the seq up to which a node has read the stream, written (with a TTL)
        # only so that the WAIT after it covers what was read (REDIS_MIN_REPLICAS_ACK)
        self.reading = prefix + "reading:"
        self.relay_secret = prefix + "relay:secret"  # the key that opens relay channels
        self.relay_node = prefix + "relay:node:"  # + tag: a node's NODE_URL, with a TTL

    def all(self) -> list[str]:
        return [key for key in vars(self).values()
                if key not in (self.reading, self.relay_secret, self.relay_node)]

    def for_commit(self) -> list[str]:
        """KEYS[1..8] of the COMMIT script, in its order."""
        return [self.seq, self.jobs, self.events, self.due, self.claimed, self.claims,
                self.deleted, self.forgotten]


# One change per four arguments (op, id, JSON before its seq, argument); one result each:
# its seq, 0 if there was nothing to do (deleted already), -1 if its condition failed.
# A deletion is `delete` (whatever the job is now), or `expire` and `delete-unchanged`,
# made only if the job's seq is still the argument.
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

# Changes up to ARGV[1] were applied by some node and then lost (a replica promoted
# without them, a Redis restarted without its files): hand none of those seqs out again,
# and have every client that resumes from below it reload its list (RESET).
SKIP_PAST = """
local floor = tonumber(ARGV[1])
for i = 1, 2 do
  if tonumber(redis.call('GET', KEYS[i]) or '0') < floor then
    redis.call('SET', KEYS[i], floor)
  end
end
redis.call('ZREMRANGEBYSCORE', KEYS[3], '-inf', floor)
return 0
"""

# A photo from the shared pool (older ones than ARGV[1] are dropped), if it holds one:
# {photo or '', photos left}.
TAKE_PHOTO = """
while true do
  local photo = redis.call('LPOP', KEYS[1])
  if not photo then return {'', 0} end
  if tonumber(string.match(photo, '^(%d+) ')) >= tonumber(ARGV[1]) then
    return {photo, redis.call('LLEN', KEYS[1])}
  end
end
"""


def connect(settings: Settings, blocking: bool = False) -> aioredis.Redis:
    """A client whose commands give up within REDIS_TIMEOUT. One resend on a broken
    connection (after a Redis restart, the first command meets a dead socket): every
    script is safe to run twice. The tail's client waits as long as its XREAD blocks,
    and resends nothing: it must see each lost connection, to check what it finds after.
    Through Sentinel, each new connection goes to the primary the sentinels name."""
    timeout = settings.redis_timeout
    options = {"decode_responses": True, "socket_connect_timeout": timeout,
               "socket_timeout": timeout + (TAIL_BLOCK_MS / 1000 if blocking else 0),
               "retry": Retry(NoBackoff(), 0 if blocking else 1)}
    if settings.redis_sentinels:
        sentinel = Sentinel(settings.redis_sentinels, sentinel_kwargs={
            "socket_timeout": timeout, "socket_connect_timeout": timeout})
        return sentinel.master_for(settings.redis_sentinel_master, **options)
    return aioredis.Redis.from_url(settings.redis_url, **options)


async def disconnect(client: aioredis.Redis) -> None:
    await client.aclose()
    sentinel = getattr(client.connection_pool, "sentinel_manager", None)
    if sentinel is not None:
        await sentinel.aclose()


def where(settings: Settings) -> str:
    if settings.redis_sentinels:
        return (f"the primary {settings.redis_sentinel_master!r} of the sentinels at "
                + ", ".join(f"{host}:{port}" for host, port in settings.redis_sentinels))
    return _without_password(settings.redis_url)


def parse_record(text: str, images: dict | None = None) -> Job | Tombstone:
    """A record as Redis holds it, as the nodes write it (job_from_text), or else read
    by json. `images`: the Images met so far, while loading."""
    found = job_from_text(text, 0, images)
    if found is not None and found[1] == len(text):
        return found[0]
    record = record_from_dict(json.loads(text))
    if type(record) is not Job or record.image is None:
        record._json = text  # the whole text is what such a record keeps anyway
    return record


# While loading, a job's _ord is the seq of its creation.
_creation = operator.attrgetter("_ord")


def ms(seconds: float) -> int:
    return int(seconds * 1000)


class ReplicasBehind(RedisError):
    """WAIT did not count REDIS_MIN_REPLICAS_ACK replicas within REDIS_TIMEOUT."""


class RedisJobStore(JobStore):
    """The registry as a replica of Redis. commit() is the same promise as in the
    embedded mode: its future resolves once the change is stored (Redis acknowledged
    it, and WAIT counted REDIS_MIN_REPLICAS_ACK replicas) and applied here, announced to
    this node's clients, in seq order."""

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
        self._skip_past = self.redis.register_script(SKIP_PAST)
        self._pending_writes: list[tuple[Job | Tombstone, str, str, asyncio.Future]] = []
        self._waiters: list[tuple[int, int, asyncio.Future]] = []  # applied(), heap by seq
        self._tiebreak = itertools.count()
        # Written here, by seq, with the future of its commit: kept once it is applied
        self._mine: dict[int, tuple[Job | Tombstone, asyncio.Future]] = {}
        self._own_seqs: set[int] = set()
        self._tail: asyncio.Task | None = None
        self._tail_fault: Exception | None = None
        self._loaded = asyncio.Event()
        self._last_text: str | None = None  # the change numbered self.seq, if known
        self._applied: dict[int, Job | Tombstone] = {}  # of _mine, just applied as written

    def describe(self) -> str:
        return f"Redis at {where(self.settings)} (prefix {self.settings.redis_prefix!r})"

    @property
    def ready(self) -> bool:
        return self._loaded.is_set()

    async def until_ready(self) -> None:
        await self._loaded.wait()

    # Loading, in steps that each hold Redis for about a millisecond: the seq, then the
    # jobs (HSCAN) and the deletion records in chunks, then the changes made meanwhile,
    # from the stream. HSCAN returns every job that exists throughout, maybe twice, and
    # each change made after the seq was read is in the stream; a record only replaces
    # an older one, so what comes out is exact. If the stream was trimmed past that seq
    # meanwhile, it starts over.

    async def load(self) -> int:
        """Only whether Redis answers: the jobs are loaded by the tail, before it tails."""
        try:
            await self.redis.get(self.keys.seq)
        except (RedisError, OSError) as exc:
            raise StorageError(f"cannot reach Redis at {where(self.settings)}: "
                               f"{exc}") from None
        return 0

    async def load_all(self) -> int:
        """Load every job; how many changes were made while it did."""
        # Collecting while a million long-lived objects are made only walks them again
        # and again; what loading throws away has no cycles.
        gc.disable()
        try:
            while (loaded := await self._read_all()) is None:
                log.warning("Redis's event stream moved past the seq this node began "
                            "loading at; loading again")
        finally:
            gc.enable()
        replayed = self._install(*loaded)
        gc.freeze()  # long-lived: keep them out of every later full collection
        self._loaded.set()
        return replayed

    async def _read_all(self):
        keys, redis = self.keys, self.redis
        async with redis.pipeline(transaction=False) as pipe:
            pipe.get(keys.seq)
            pipe.get(keys.forgotten)
            seq, forgotten = await pipe.execute()
        start, forgotten = int(seq or 0), int(forgotten or 0)
        # Each job's place in the order is the seq of its creation until _install.
        jobs: dict[str, Job] = {}
        images: dict = {}
        cursor = 0
        while True:
            cursor, chunk = await redis.hscan(keys.jobs, cursor, count=LOAD_CHUNK)
            for job_id, value in chunk.items():
                space = value.find(" ")  # "<creation seq> <job>", read in place
                found = job_from_text(value, space + 1, images)
                if found is not None and found[1] == len(value):
                    job = found[0]
                else:
                    job = self._parse(value[space + 1:], f"job {job_id}", images)
                    if job is None:
                        continue
                held = jobs.get(job.id)
                if held is None or held.seq < job.seq:
                    job._ord = int(value[:space])
                    jobs[job.id] = job
            if not cursor:
                break
        deleted: dict[int, Tombstone] = {}
        low = forgotten
        while True:
            page = await redis.zrangebyscore(keys.deleted, f"({low}", "+inf", start=0,
                                             num=LOAD_CHUNK, withscores=True)
            for text, score in page:
                tomb = self._parse(text, "a deletion record")
                if tomb is not None:
                    deleted[tomb.seq] = tomb
                low = int(score)
            if len(page) < LOAD_CHUNK:
                break
        last, text = start, None
        while True:
            entries = await redis.xrange(keys.events, f"{last + 1}-0", "+", count=LOAD_CHUNK)
            for entry_id, fields in entries:
                seq = int(entry_id.partition("-")[0])
                if seq != last + 1:
                    return None  # trimmed away (or skipped past) since the seq was read
                last, text = seq, fields["r"]
                record = self._parse(text, f"change {seq}", images)
                if record is None:
                    continue
                held = jobs.get(record.id)
                if isinstance(record, Tombstone):
                    deleted[seq] = record
                    if held is not None and held.seq < seq:
                        del jobs[record.id]
                elif held is None or held.seq < seq:
                    record._ord = seq if held is None else held._ord
                    jobs[record.id] = record
            if len(entries) < LOAD_CHUNK:
                return last, jobs, deleted, forgotten, text, last - start

    @staticmethod
    def _parse(text: str, what: str, images: dict | None = None) -> Job | Tombstone | None:
        try:
            return parse_record(text, images)
        except ValueError as exc:  # written by no version of this service: left alone
            log.error("%s in Redis is unreadable, skipped: %s", what, exc)
            return None

    def _install(self, seq: int, jobs: dict, deleted: dict, forgotten: int,
                 last_text: str | None, replayed: int) -> int:
        order = sorted(jobs.values(), key=_creation)
        jobs.clear()
        self.install(order)
        self.tombstones = deque(sorted((tomb for tomb in deleted.values()
                                        if tomb.seq > forgotten), key=lambda tomb: tomb.seq))
        self.forgotten = forgotten
        self.forget_old_tombstones()
        self.seq, self._last_text = seq, last_text
        return replayed

    async def open(self, replayed: int) -> None:
        self._loop = asyncio.get_running_loop()
        self._tail = asyncio.create_task(self._follow(), name="redis tail")
        self._writer = asyncio.create_task(self._write_batches(), name="redis writer")

    # Writing

    def commit(self, record: Job | Tombstone) -> asyncio.Future:
        held = self.jobs.get(record.id)
        if isinstance(record, Tombstone):
            op = "delete" if record.reason == "deleted" else "expire"
            arg = str(held.seq) if held is not None else ""
        elif record.status == "pending":
            op, arg = ("create" if held is None else "retry"), str(ms(record.due_at))
        else:
            op, arg = "finish", ""
        return self._queue(record, op, arg)

    def commit_unless_changed(self, record: Job | Tombstone, seq: int) -> asyncio.Future:
        """As in one process, and checked again by the script: a deletion is made only if
        the job is still at `seq` in Redis, a retry only if it is still failed there, so
        a change another node made first stands (the commit raises Conflict)."""
        held = self.jobs.get(record.id)
        if held is None or held.seq != seq or record.id in self.in_flight:
            raise Conflict("the job changed first")
        if isinstance(record, Tombstone):
            return self._queue(record, "delete-unchanged", str(seq))
        return self.commit(record)

    def _queue(self, record: Job | Tombstone, op: str, arg: str) -> asyncio.Future:
        if self._closing:
            raise StorageError("the service is shutting down")
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
                    self._mine[seq] = (record, future)
                    continue
                self.in_flight.discard(record.id)
                settle(future, None if seq == 0 else
                       Conflict("the job changed on another node first"))
            self._settle()

    def _note_fault(self, exc: Exception) -> None:
        if self.fault is None:
            log.error("cannot reach Redis at %s: %s; new jobs are refused (503) and "
                      "resolutions wait until it answers again", where(self.settings),
                      exc or "timed out")
        self.fault = OSError(str(exc) or "timed out")

    def _recovered(self) -> None:
        if self.fault is not None and self._tail_fault is None:
            log.warning("Redis answers again")
            self.fault = None

    def _settle(self) -> None:
        """Keep the promises of the changes this replica has now applied: a commit's only
        if the change applied under its seq is the one it wrote (a failover can give its
        seq to another change); a 503 otherwise, as for a write whose reply was lost."""
        waiters = self._waiters
        while waiters and waiters[0][0] <= self.seq:
            settle(heapq.heappop(waiters)[2])
        done = []
        for seq in self._mine:  # in the order written, which is seq order (but for a
            if seq > self.seq:  # failover's lost seqs, which hold the rest up a moment)
                break
            done.append(seq)
        for seq in done:
            record, future = self._mine.pop(seq)
            held = self.jobs.get(record.id)
            if record is not self._applied.pop(seq, None) and (
                    held is not None if isinstance(record, Tombstone)
                    else held is None or held.seq < seq):
                self.in_flight.discard(record.id)
                settle(future, StorageError("the change may not have been stored (Redis "
                                            "failed over or was replaced meanwhile)"))
            else:
                settle(future)
        self._applied.clear()

    async def applied(self, seq: int) -> None:
        """Wait until this replica has applied the change numbered seq."""
        if seq > self.seq:
            future = asyncio.get_running_loop().create_future()
            heapq.heappush(self._waiters, (seq, next(self._tiebreak), future))
            await future

    # The tail: the stream, in order, from the seq this replica has. After a lost
    # connection it checks first that the Redis it reaches holds this replica's history.

    async def _follow(self) -> None:
        failures = 0
        while not self._closing:
            try:
                if not self.ready:
                    started = time.monotonic()
                    replayed = await self.load_all()
                    log.info("loaded %d jobs (%d pending) from Redis in %.2f s, up to seq %d "
                             "(%d changes made meanwhile)", len(self.jobs),
                             self.counts["pending"], time.monotonic() - started, self.seq,
                             replayed)
                    self._settle()
                    for listener in self.replaced:
                        listener()
                    if self._tail_fault is not None:  # what it loaded is this Redis's own
                        self._tail_fault = None
                        self._recovered()
                    continue
                if self._tail_fault is not None and not await self._history_kept():
                    await self._skip_lost_changes()
                    continue
                answer = await self._tail_client.xread(
                    {self.keys.events: f"{self.seq}-0"}, count=TAIL_COUNT, block=TAIL_BLOCK_MS)
                if answer and self.settings.redis_min_replicas_ack:
                    await self._confirm(answer[0][1])
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
                self._take(answer[0][1])

    async def _confirm(self, entries: list) -> None:
        """REDIS_MIN_REPLICAS_ACK=N: return once N replicas hold what was just read, so
        that no client hears of a change a failover could take back. WAIT counts this
        connection's own writes, hence one first. Not confirmed within REDIS_TIMEOUT: this
        node's writers of those changes get 503, and they are read again next time."""
        needed, timeout = self.settings.redis_min_replicas_ack, self.settings.redis_timeout
        last = int(entries[-1][0].partition("-")[0])
        async with self._tail_client.pipeline(transaction=False) as pipe:
            pipe.set(self.keys.reading + self.node, last, px=ms(max(60.0, timeout)))
            pipe.execute_command("WAIT", needed, ms(timeout))
            _, confirmed = await pipe.execute()
        if confirmed >= needed:
            return
        refusal = StorageError(f"only {confirmed} of REDIS_MIN_REPLICAS_ACK={needed} "
                               f"replicas confirmed the change within {timeout:g} s; it "
                               "may still be stored")
        for seq, (record, future) in self._mine.items():
            if seq <= last and not future.done():
                self.in_flight.discard(record.id)
                settle(future, refusal)
        raise ReplicasBehind(refusal)

    async def _history_kept(self) -> bool:
        """Whether the Redis the tail reaches now (the same, one restarted on its files, or
        a replica that Sentinel promoted) holds every change this replica applied."""
        if not self.seq:
            return True
        keys = self.keys
        async with self._tail_client.pipeline(transaction=False) as pipe:
            pipe.get(keys.seq)
            pipe.xrange(keys.events, f"{self.seq}-0", f"{self.seq}-0")
            pipe.xrange(keys.events, "-", "+", count=1)
            seq, here, first = await pipe.execute()
        if int(seq or 0) < self.seq:
            return False
        if self._last_text is None:  # loaded, and nothing applied since: the seq says all
            return True
        if here:
            return here[0][1]["r"] == self._last_text
        # Not there: trimmed (the tail finds the gap and reloads), or never written here
        # (trimming keeps thousands of entries: an empty stream lost them too).
        return bool(first) and int(first[0][0].partition("-")[0]) > self.seq

    async def _skip_lost_changes(self) -> None:
        log.error("Redis at %s lacks changes this node applied (up to seq %d): a replica "
                  "promoted before it had them, or a Redis that lost its files. Those seqs "
                  "are not used again; this node reloads, and its clients reload their "
                  "lists (RESET)", where(self.settings), self.seq)
        await self._skip_past(keys=[self.keys.seq, self.keys.forgotten, self.keys.deleted],
                              args=[self.seq + 1])
        self._unload()

    def _take(self, entries: list) -> None:
        records, expected = [], self.seq + 1
        for entry_id, fields in entries:
            seq = int(entry_id.partition("-")[0])
            if seq != expected:  # trimmed away while this node was cut off
                log.error("this node fell behind Redis's event stream (it needed seq %d, "
                          "the next kept is %d): reloading every job; its clients "
                          "reconnect", expected, seq)
                self._unload()
                return
            expected += 1
            text = fields["r"]
            mine = self._mine.get(seq)
            if mine is not None and mine[0].json == text:
                record = self._applied[seq] = mine[0]  # written here: no need to parse it
            else:
                record = parse_record(text)
            if fields.get("n") == self.node:
                self._own_seqs.add(seq)
            records.append(record)
        self._last_text = text
        self._apply(records)
        self._settle()

    def _announce(self, record: Job | Tombstone, authored: bool) -> None:
        own = record.seq in self._own_seqs
        if own:
            self._own_seqs.discard(record.seq)
        super()._announce(record, own)

    def _unload(self) -> None:
        """Let the registry go, for the tail to load it again: meanwhile (a few seconds
        at a million jobs) this node's job routes answer 503 and /healthz "loading"."""
        self._loaded.clear()
        self._own_seqs.clear()
        self._applied.clear()
        self.jobs, self.order, self.dead = {}, [], {}
        self.counts = dict.fromkeys(self.counts, 0)
        self.tombstones.clear()
        self.seq = 0

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
        await disconnect(self.redis)
        await disconnect(self._tail_client)


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
        await self.images.stop()

    def _on_commit(self, record: Job | Tombstone) -> None:
        if record.status != "pending":
            self._claimed.discard(record.id)
        super()._on_commit(record)

    def index(self) -> None:
        super().index()
        # After a reload the claims this node holds are still its own to resolve.
        self._ready.extend(self._claimed)
        self._wakeup.set()

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
        await self.store.until_ready()  # no claim while loading: it could not be resolved
        self._claim_wanted = False
        try:
            ids, due, lapse, seq = await self.store.claim(CLAIM_BATCH)
        except StorageError:
            self._claim_wanted = True
            self._failures += 1
            await asyncio.sleep(backoff(self.settings, self._failures))
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
    The access key's budget is one hash, read and written back by each node in a
    WATCHed transaction through the same Quota as in one process, so three nodes pace
    their calls as one and spend no more than one key allows. A rejected key is a key
    too: one node's 401 is every node's, for RETRY_MAX_DELAY."""

    def __init__(self, session, settings: Settings, metrics: Metrics, store: RedisJobStore):
        super().__init__(session, settings, metrics)
        self.keys = store.keys
        self.redis = store.redis
        self.node = store.node
        self._take_script = self.redis.register_script(TAKE_PHOTO)
        self._shared_size = 0
        self._buying_elsewhere = False  # as the last reservation found

    def describe(self) -> str:
        return super().describe() + ", photos shared through Redis"

    @property
    def pool_size(self) -> int:
        return len(self._pool) + self._shared_size

    def _out_of_reach(self) -> RateLimited:
        return RateLimited(self._settings.redis_timeout,
                           "the shared photo pool (Redis) is out of reach")

    async def _pooled(self) -> Photo | None:
        photo = await super()._pooled()  # put back here (its job did not store)
        if photo is not None:
            return photo
        try:
            async with asyncio.timeout(self._settings.redis_timeout):
                value, self._shared_size = await self._take_script(
                    keys=[self.keys.photos], args=[ms(time.time() - jobservice.POOL_MAX_AGE)])
        except (RedisError, OSError, TimeoutError):
            if not self._settings.photo_reuse:
                raise self._out_of_reach() from None
            return None
        if not value:
            return None
        return _shared_photo(value)

    async def _bought_elsewhere(self, deadline: float) -> Photo | None:
        """While another node's call is under way, its photos are awaited (BLPOP) until
        the job's deadline, as a call of this node's own would be."""
        timeout = self._settings.redis_timeout / 2  # a blocked read within the client's
        while self._buying_elsewhere and (left := deadline - time.time()) > 0:
            try:
                answer = await self.redis.blpop([self.keys.photos], min(left, timeout))
            except (RedisError, OSError, TimeoutError):
                return None
            if answer is not None:
                photo = _shared_photo(answer[1])
                if time.monotonic() - photo.fetched_at <= jobservice.POOL_MAX_AGE:
                    return photo
        return None

    async def _stock(self, photos: list[Photo]) -> None:
        wall, now = ms(time.time()), time.monotonic()
        try:
            async with asyncio.timeout(self._settings.redis_timeout):
                await self.redis.rpush(self.keys.photos, *(
                    f"{wall - ms(now - photo.fetched_at)} {json.dumps([photo.result, photo.image])}"
                    for photo in photos))
        except (RedisError, OSError, TimeoutError):
            self._pool.extend(photos)  # kept here rather than wasted

    async def _reserve(self, wanted: int | None, urgent: bool) -> float:
        keys, timeout = self.keys, self._settings.unsplash_timeout

        async def reserve(pipe) -> float:
            self.quota.load(await pipe.hgetall(keys.quota))
            now = time.time()
            buying = await pipe.zcount(keys.buying, ms(now), "+inf")
            self._buying_elsewhere = buying > 0
            # Photos in the pool or on their way from another node's call serve the jobs
            # about to fall due as well as this node's would.
            if wanted is not None and wanted <= pooled + buying * self.batch_size:
                return jobservice.BUYER_TICK
            wait = self.quota.reserve(now, not urgent, timeout)
            if not wait:  # the call is in `buying` at once: others wait for its photos
                pipe.multi()
                pipe.hset(keys.quota, mapping=self.quota.fields())
                pipe.zadd(keys.buying, {self.node: ms(now + timeout)})
                await pipe.execute()
            return wait

        try:
            async with asyncio.timeout(self._settings.redis_timeout):
                async with self.redis.pipeline(transaction=False) as pipe:
                    pipe.get(keys.rejected)
                    pipe.pttl(keys.rejected)
                    pipe.llen(keys.photos)
                    rejected, rejected_ms, pooled = await pipe.execute()
                if rejected:
                    if urgent:
                        raise KeyRejected(rejected)
                    self._trouble(rejected, key_rejected=True)
                    return max(rejected_ms, 1) / 1000
                return await self._watched(reserve)
        except (RedisError, OSError, TimeoutError):
            if urgent:
                raise self._out_of_reach() from None
            return self._settings.redis_timeout

    async def _settle_quota(self, headers, refused: bool) -> None:
        async def write(pipe) -> None:
            self.quota.load(await pipe.hgetall(self.keys.quota))
            self.quota.settle(time.time(), headers, refused)
            pipe.multi()
            pipe.hset(self.keys.quota, mapping=self.quota.fields())
            await pipe.execute()

        try:
            async with asyncio.timeout(self._settings.redis_timeout):
                await self._watched(write)
        except (RedisError, OSError, TimeoutError):
            self.quota.settle(time.time(), headers, refused)  # this node knows, at least

    async def _watched(self, body):
        """body(pipe) with the cluster's budget WATCHed: its reads see one state, and its
        transaction fails, to be run again, if another node changed the budget first."""
        async with self.redis.pipeline(transaction=True) as pipe:
            while True:
                try:
                    await pipe.watch(self.keys.quota, self.keys.buying)
                    return await body(pipe)
                except WatchError:
                    continue

    async def _buy(self) -> list[Photo]:
        try:
            return await super()._buy()
        except KeyRejected as exc:
            await self._share(self.keys.rejected, str(exc), self._settings.retry_max_delay)
            raise
        finally:
            try:
                async with asyncio.timeout(self._settings.redis_timeout):
                    await self.redis.zrem(self.keys.buying, self.node)
            except (RedisError, OSError, TimeoutError):
                pass  # it lapses by itself

    async def _share(self, key: str, value: str, seconds: float) -> None:
        try:
            async with asyncio.timeout(self._settings.redis_timeout):
                await self.redis.set(key, value, px=max(1, ms(seconds)))
        except (RedisError, OSError, TimeoutError):
            pass  # this node knows anyway; the others find out for themselves


def _shared_photo(value: str) -> Photo:
    """A photo from the shared list; its age goes with it, as it is no younger."""
    bought, _, text = value.partition(" ")
    result, image = json.loads(text)
    return Photo(result, image, time.monotonic() - max(0.0, time.time() - int(bought) / 1000))


# import / export


# --- Session routing ----------------------------------------------------------------
# A long-polling session lives in the process that made it, yet --workers (SO_REUSEPORT)
# and a round-robin balancer hand its polls, POSTs and upgrade to any process. So each
# sid starts with its process's tag, and a process that gets a request for another's
# sid relays it there, over a channel: one WebSocket per pair of processes, opened on
# first use, that carries any number of requests at once, so a held poll costs no
# connection of its own and no keep-alive or read timeout applies to it. Workers reach
# each other by a Unix socket each, in the supervisor's private runtime directory (mode
# 0700); nodes by NODE_URL, a port of their own that each registers in Redis with a TTL.
# A channel opens only with an HMAC of a secret the nodes share through Redis; what comes
# on it was checked (Host, Origin, the transport) where it came in, and is served where it
# lands, never relayed on, but for one hop from a machine's relay port to the worker
# there that owns the sid. On its WebSocket upgrade the session moves to the process
# that holds the WebSocket (EngineIO.hand_over, EngineIO.adopt): only polling is ever
# relayed. An owner that is gone is Engine.IO's "Session ID unknown" at once: the client
# opens a new session anywhere and recovers what it missed from the shared stream.

RELAY_TAG = re.compile(r"[A-Za-z0-9_-]{6}")  # the start of every sid this process makes
RELAY_HEADER = "X-Jobservice-Relay"  # "<from tag> <unix time> <HMAC>", opening a channel
RELAY_CLOCK_SKEW = 60.0  # how old (or how far ahead) an opening's time may be
RELAY_HEARTBEAT = 10.0  # a channel to a machine that vanished is closed within 1.5x this
RELAY_CONNECT_TIMEOUT = 2.0
RELAY_MAX_MESSAGE = 4 * EIO_MAX_PAYLOAD  # a POST or a poll's answer, and a few headers
RELAY_GONE_MEMORY = 1024  # owners found gone, answered at once (tags are never reused)


class OwnerGone(Exception):
    """The process that holds a session cannot be reached: the session is gone with it."""


def _pack(head: dict, body: bytes = b"") -> bytes:
    return json.dumps(head, separators=(",", ":")).encode() + b"\n" + body


def _unpack(data: bytes) -> tuple[dict, bytes]:
    end = data.index(b"\n")
    return json.loads(data[:end]), data[end + 1:]


class Channel:
    """The calling end of a channel: requests go out numbered, answers come back by number."""

    def __init__(self, ws: aiohttp.ClientWebSocketResponse, session: aiohttp.ClientSession,
                 own_session: bool, closed):
        self.ws, self.session, self.own_session = ws, session, own_session
        self.calls: dict[int, asyncio.Future] = {}
        self.numbers = itertools.count()
        self.reader = asyncio.get_running_loop().create_task(self._read(closed))

    async def call(self, head: dict, body: bytes = b"") -> tuple[dict, bytes]:
        number = next(self.numbers)
        answer = self.calls[number] = asyncio.get_running_loop().create_future()
        try:
            if self.ws.closed:
                raise OwnerGone
            await self.ws.send_bytes(_pack({**head, "n": number}, body))
            return await answer
        except (ConnectionError, RuntimeError):
            raise OwnerGone from None
        finally:
            self.calls.pop(number, None)

    async def _read(self, closed) -> None:
        try:
            async for message in self.ws:
                if message.type != aiohttp.WSMsgType.BINARY:
                    break
                head, body = _unpack(message.data)
                answer = self.calls.get(head["n"])
                if answer is not None and not answer.done():
                    answer.set_result((head, body))
        finally:
            closed(self)
            for answer in self.calls.values():
                if not answer.done():
                    answer.set_exception(OwnerGone())
            await self.ws.close()
            if self.own_session:
                await self.session.close()

    async def close(self) -> None:
        await self.ws.close()
        await self.reader


class Relay:
    """This process's door for the others' relayed requests, and its channels to theirs."""

    def __init__(self, app: web.Application):
        self.app = app
        self.settings: Settings = app[jobservice.SETTINGS]
        self.engine = app[ENGINE]
        self.store: RedisJobStore = app[STORE]
        self.keys = self.store.keys
        self.engine.relay = self
        self.tag = self.engine.tag = secrets.token_urlsafe(6)[:6]
        runtime = self.settings.runtime_dir
        self.socket_path = runtime / f"{self.tag}.sock" if runtime else None
        self.secret = b""
        self.channels: dict[str, Channel] = {}
        self.opening: dict[str, asyncio.Future] = {}
        self.gone: OrderedDict[str, None] = OrderedDict()
        self.http: aiohttp.ClientSession | None = None
        self.runner: web.AppRunner | None = None
        self.renewer: asyncio.Task | None = None
        self.served: set[web.WebSocketResponse] = set()  # channels from the others
        self.closed = False

    async def start(self) -> None:
        redis, keys = self.store.redis, self.keys
        await redis.set(keys.relay_secret, secrets.token_hex(32), nx=True)
        self.secret = (await redis.get(keys.relay_secret)).encode()
        self.http = aiohttp.ClientSession(timeout=self._timeout())
        settings = self.settings
        if self.socket_path is None and not settings.node_url:
            return  # it relays to the others, but none can relay to it
        door = web.Application(client_max_size=RELAY_MAX_MESSAGE)
        door.router.add_get("/relay/{tag:[A-Za-z0-9_-]{6}}", self._door)
        self.runner = web.AppRunner(door, access_log=None, handle_signals=False,
                                    shutdown_timeout=1.0)
        await self.runner.setup()
        if self.socket_path is not None:
            await web.UnixSite(self.runner, str(self.socket_path)).start()
        if settings.node_url:
            port = int(settings.node_url.rsplit(":", 1)[1])
            await web.TCPSite(self.runner, settings.host or None, port,
                              reuse_port=bool(settings.supervisor)).start()
            await self._register()
            self.renewer = asyncio.get_running_loop().create_task(self._renew())

    async def close(self) -> None:
        """At shutdown, once this process's own sessions are closed: a poll relayed from
        here still waiting is answered with a noop (the client polls again elsewhere),
        one relayed to here is given up without taking anything."""
        if self.closed:
            return
        self.closed = True
        if self.renewer is not None:
            self.renewer.cancel()
            try:
                await self.store.redis.delete(self.keys.relay_node + self.tag)
            except (RedisError, OSError):
                pass  # its TTL ends it
        if self.socket_path is not None:
            self.socket_path.unlink(missing_ok=True)
            if os.getppid() != self.settings.supervisor:  # its supervisor was killed
                with contextlib.suppress(OSError):
                    self.socket_path.parent.rmdir()
        for channel in list(self.channels.values()):
            await channel.close()
        for ws in list(self.served):
            await ws.close()
        if self.runner is not None:
            await self.runner.cleanup()
        if self.http is not None:
            await self.http.close()

    @staticmethod
    def _timeout() -> aiohttp.ClientTimeout:
        return aiohttp.ClientTimeout(total=None, sock_connect=RELAY_CONNECT_TIMEOUT)

    async def _register(self) -> None:
        await self.store.redis.set(self.keys.relay_node + self.tag, self.settings.node_url,
                                   px=ms(self.settings.job_lease))

    async def _renew(self) -> None:
        while True:
            await asyncio.sleep(self.settings.job_lease / 3)
            try:
                await self._register()
            except (RedisError, OSError) as exc:
                log.warning("could not renew this node's relay address in Redis: %s", exc)

    # The opening of a channel: "<from> <time> <HMAC of both tags and the time>".

    def _signature(self, to: str, at: str) -> str:
        return hmac.new(self.secret, f"relay {to} {at}".encode(), hashlib.sha256).hexdigest()

    def _opening(self, to: str) -> str:
        at = str(int(time.time()))
        return f"{self.tag} {at} {self._signature(to, at)}"

    def _signed(self, request: web.Request, to: str) -> bool:
        _, at, signature = [*request.headers.get(RELAY_HEADER, "").split(" "), "", ""][:3]
        return (is_ascii_number(at) and len(at) < 12
                and abs(time.time() - int(at)) <= RELAY_CLOCK_SKEW
                and hmac.compare_digest(self._signature(to, at).encode(),
                                        signature.encode(errors="surrogateescape")))

    # The relaying end.

    def owner(self, sid: str) -> str | None:
        """The tag of the process that holds sid, if another process does."""
        tag = sid[:6]
        return tag if tag != self.tag and RELAY_TAG.fullmatch(tag) else None

    async def forward(self, request: web.Request, tag: str, transport: str
                      ) -> web.StreamResponse:
        """A request for a session of the process `tag`, answered there."""
        sid = request.query["sid"]
        try:
            channel = await self._channel(tag)
            if transport == "websocket":
                return await self._upgrade(request, channel, sid)
            head, body = {"sid": sid}, b""
            if request.method == "GET":
                head["op"] = "poll"
            elif request.method == "POST":
                head["op"] = "post"
                try:
                    body = await read_body(request, EIO_MAX_PAYLOAD)
                except ApiError as exc:  # the owner ends the session, as for its own
                    head["unreadable"] = [exc.status, exc.code, exc.message]
            else:
                return _engineio_refusal(400, 3, "Bad request")
            answer, body = await channel.call(head, body)
        except OwnerGone:
            if self.closed and request.method == "GET":
                return _engineio_text("6")
            return _engineio_refusal(400, 1, "Session ID unknown")
        return web.Response(status=answer["status"], body=body,
                            headers=answer["headers"])

    async def _upgrade(self, request: web.Request, channel: Channel, sid: str
                       ) -> web.StreamResponse:
        """The upgrade of another process's session: probed here, then handed over."""
        answer, body = await channel.call({"op": "upgrade", "sid": sid})
        if answer["status"] != 200:
            return web.Response(status=answer["status"], body=body,
                                headers=answer["headers"])
        ws = web.WebSocketResponse(max_msg_size=EIO_MAX_PAYLOAD)
        session, probed = None, []
        try:
            await ws.prepare(request)
            if await engineio_probe(ws, lambda: probed.append(asyncio.ensure_future(
                    channel.call({"op": "probed", "sid": sid})))):
                await probed[0]
                answer, body = await channel.call({"op": "handover", "sid": sid})
                if answer["status"] == 200:
                    state = json.loads(body)
                    async with asyncio.timeout(EIO_UPGRADE_TIMEOUT):
                        await self.store.applied(state["seq"])
                    session = self.engine.adopt(state, ws, request.transport)
        except (OwnerGone, TimeoutError):
            pass
        finally:
            for call in probed:
                call.cancel()
                await asyncio.gather(call, return_exceptions=True)
            if session is None:
                await self._abort(channel, sid)
        if session is None:
            await ws.close()
            return ws
        return await engineio_receive(ws, session)

    @staticmethod
    async def _abort(channel: Channel, sid: str) -> None:
        try:
            await channel.call({"op": "abort", "sid": sid})
        except OwnerGone:
            pass  # and the upgrade with it

    async def _channel(self, tag: str) -> Channel:
        channel = self.channels.get(tag)
        if channel is not None:
            return channel
        if tag in self.gone or self.closed:
            raise OwnerGone
        opening = self.opening.get(tag)
        if opening is None:
            opening = self.opening[tag] = asyncio.ensure_future(self._open(tag))
            opening.add_done_callback(lambda done: (self.opening.pop(tag, None),
                                                    done.cancelled() or done.exception()))
        return await asyncio.shield(opening)

    async def _open(self, tag: str) -> Channel:
        runtime = self.settings.runtime_dir
        path = runtime / f"{tag}.sock" if runtime else None
        if path is not None and path.exists():  # a worker beside this one
            session, own = aiohttp.ClientSession(
                connector=aiohttp.UnixConnector(path=str(path)), timeout=self._timeout()), True
            url = f"http://relay/relay/{tag}"
        else:
            try:
                address = await self.store.redis.get(self.keys.relay_node + tag)
            except (RedisError, OSError):
                raise OwnerGone from None  # not known to be gone: asked again next time
            if address is None:
                raise self._gone(tag)
            session, own, url = self.http, False, f"{address}/relay/{tag}"
        try:
            ws = await session.ws_connect(
                url, headers={RELAY_HEADER: self._opening(tag)}, heartbeat=RELAY_HEARTBEAT,
                max_msg_size=RELAY_MAX_MESSAGE, compress=0)  # deflate would cost each message
        except (aiohttp.ClientError, OSError, TimeoutError):
            if own:
                await session.close()
            raise self._gone(tag) from None
        channel = self.channels[tag] = Channel(
            ws, session, own, lambda closed: self.channels.get(tag) is closed
            and self.channels.pop(tag))
        return channel

    def _gone(self, tag: str) -> OwnerGone:
        self.gone[tag] = None
        while len(self.gone) > RELAY_GONE_MEMORY:
            self.gone.popitem(last=False)
        return OwnerGone()

    # The serving end: a channel from another process, and the requests on it.

    async def _door(self, request: web.Request) -> web.StreamResponse:
        to = request.match_info["tag"]
        if not self._signed(request, to):
            return web.Response(status=403)
        if to != self.tag:
            return await self._pass_on(request, to)
        ws = web.WebSocketResponse(heartbeat=RELAY_HEARTBEAT, max_msg_size=RELAY_MAX_MESSAGE)
        await ws.prepare(request)
        upgrading: set[str] = set()  # the sessions this channel's process is upgrading
        polls: set[asyncio.Task] = set()
        self.served.add(ws)
        try:
            async for message in ws:
                if message.type != aiohttp.WSMsgType.BINARY:
                    break
                head, body = _unpack(message.data)
                if head["op"] == "poll":  # held: answered when it has something
                    poll = asyncio.get_running_loop().create_task(self._poll(ws, head))
                    polls.add(poll)
                    poll.add_done_callback(polls.discard)
                else:
                    await self._answer(ws, head, await self._serve(head, body, upgrading))
        except ConnectionError:
            pass
        finally:
            self.served.discard(ws)
            for poll in polls:
                poll.cancel()
            for sid in upgrading:
                self._stop_upgrading(sid)
        return ws

    def _session(self, sid: str):
        """(the polling session sid, or None; the refusal if None). One whose heartbeat
        is overdue ends now, as for a request that came to this process itself."""
        session = self.engine.session(sid)
        if session is None:
            return None, _engineio_refusal(400, 1, "Session ID unknown")
        if not session.polling:
            return None, _engineio_refusal(400, 3, "Bad request")  # upgraded
        return session, None

    async def _poll(self, ws: web.WebSocketResponse, head: dict) -> None:
        session, refusal = self._session(head["sid"])
        await self._answer(ws, head, refusal or await _engineio_poll(session))

    async def _serve(self, head: dict, body: bytes, upgrading: set[str]) -> web.Response:
        op, sid = head["op"], head["sid"]
        session, refusal = self._session(sid)
        if refusal is not None:
            return refusal
        if op == "post":
            if "unreadable" in head:
                return engineio_unreadable(session, ApiError(*head["unreadable"]))
            return await _engineio_post(None, session, body)
        if op == "upgrade":
            if session.upgrading:
                return _engineio_refusal(400, 3, "Bad request")
            session.upgrading = True
            upgrading.add(sid)
        elif sid not in upgrading:
            return _engineio_refusal(400, 3, "Bad request")
        elif op == "probed":
            session.probed = True
            session.wakeup.set()  # a poll waiting now is answered with a noop
        elif op == "abort":
            upgrading.discard(sid)
            self._stop_upgrading(sid)
        elif op == "handover":
            upgrading.discard(sid)
            if session.closing:
                self._stop_upgrading(sid)
                return _engineio_refusal(400, 3, "Bad request")
            return web.json_response(self.engine.hand_over(session))
        return web.Response()

    def _stop_upgrading(self, sid: str) -> None:
        session = self.engine.sessions.get(sid)
        if session is not None and session.polling:
            session.upgrading = session.probed = False

    @staticmethod
    async def _answer(ws: web.WebSocketResponse, head: dict, response: web.Response) -> None:
        headers = [(name, value) for name, value in response.headers.items()
                   if name != "Content-Length"]
        try:
            await ws.send_bytes(_pack({"n": head["n"], "status": response.status,
                                       "headers": headers}, response.body or b""))
        except (ConnectionError, RuntimeError):
            pass  # the channel is gone, and what it carried with it

    async def _pass_on(self, request: web.Request, to: str) -> web.StreamResponse:
        """A channel that came to this machine's relay port for another worker here: piped
        to its socket, once (one that came by a socket is never passed on)."""
        runtime = self.settings.runtime_dir
        path = runtime / f"{to}.sock" if runtime else None
        if path is None or isinstance(request.transport.get_extra_info("sockname"), str) \
                or not path.exists():
            return web.Response(status=404)
        async with aiohttp.ClientSession(connector=aiohttp.UnixConnector(path=str(path)),
                                         timeout=self._timeout()) as session:
            try:
                inner = await session.ws_connect(
                    f"http://relay/relay/{to}", headers={RELAY_HEADER: request.headers[
                        RELAY_HEADER]}, heartbeat=RELAY_HEARTBEAT,
                    max_msg_size=RELAY_MAX_MESSAGE, compress=0)
            except (aiohttp.ClientError, OSError, TimeoutError):
                return web.Response(status=404)
            outer = web.WebSocketResponse(heartbeat=RELAY_HEARTBEAT,
                                          max_msg_size=RELAY_MAX_MESSAGE)
            await outer.prepare(request)

            async def pipe(source, sink) -> None:
                try:
                    async for message in source:
                        if message.type != aiohttp.WSMsgType.BINARY:
                            break
                        await sink.send_bytes(message.data)
                finally:
                    await sink.close()

            await asyncio.gather(pipe(outer, inner), pipe(inner, outer),
                                 return_exceptions=True)
        return outer


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
    # One transaction of every job: at a million, minutes of sending, before any node runs.
    client = connect(dataclasses.replace(settings, redis_timeout=max(600, settings.redis_timeout)))
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
        await disconnect(client)
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
        await source.load_all()
    except RedisError as exc:
        raise StorageError(f"Redis: {exc}") from None
    finally:
        await disconnect(source.redis)
        await disconnect(source._tail_client)
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
