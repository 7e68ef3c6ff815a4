"""Unsplash in the Redis scale-out mode: several real nodes on one real Redis share one
photo pool, one rate-limit pause and one rejected key (jobservice_redis.SharedPhotoPool).

Every node is a real app on a real socket, pointed at the suite's redis-server with a
prefix of the test's own, and at a fake Unsplash on loopback. Every node tails the same
Redis stream, so one `/ws` on any node sees every resolution in the cluster. Waiting is
on events (WebSocket events, the fake's arrivals), never on sleeps.

Which node resolves a job is not up to the node it was created on: every node claims
due jobs from Redis. The tests therefore assert what holds for the cluster as a whole
and, where a node's own share matters, read that node's /metrics.
"""

from __future__ import annotations

import asyncio
import math
import secrets
import time
from collections import Counter

import pytest
import redis.asyncio as aioredis
from aiohttp import web
from conftest import AGE_TEST_ENV, AGED, FAST_ENV, create_jobs, serve_fake
from fake_unsplash import FakeUnsplash
from prometheus_client.parser import text_string_to_metric_families

import jobservice
import jobservice_redis

BATCH = jobservice.UNSPLASH_BATCH  # 30
# Sections 2 and 3 are about jobs that must have a fresh photo, so they wait out a pause
# or fail on a rejected key; by default they would resolve on time with a reused one.
NEVER_REUSE = {"PHOTO_REUSE": "never"}


class RecordingUnsplash(FakeUnsplash):
    """The shared fake, plus: when each call arrived (wall clock, comparable with a job's
    dueAt), the mode each call got, every photo handed out by id, a way to await the
    n-th call, and a gate that holds every answer until the test opens it."""

    def __init__(self, key: str):
        super().__init__(key)
        self.arrivals: list[float] = []
        self.modes: list[str] = []
        self.served: dict[str, dict] = {}
        self.batches: list[set[str]] = []  # the photo ids of each successful call
        self.gate: asyncio.Event | None = None
        self._arrived = asyncio.Event()

    def next_mode(self) -> str:
        mode = super().next_mode()
        self.modes.append(mode)
        return mode

    def photo(self, base: str) -> dict:
        photo = super().photo(base)
        self.served[photo["id"]] = photo
        self.batches[-1].add(photo["id"])
        return photo

    async def random_photos(self, request: web.Request) -> web.StreamResponse:
        self.arrivals.append(time.time())
        self.batches.append(set())
        self._arrived.set()
        if self.gate is not None:
            await self.gate.wait()
        return await super().random_photos(request)

    async def arrived(self, count: int, timeout: float = 10.0) -> None:
        """Wait until `count` calls have arrived."""
        async with asyncio.timeout(timeout):
            while len(self.arrivals) < count:
                self._arrived.clear()
                await self._arrived.wait()


@pytest.fixture
async def fake_unsplash(aiohttp_server) -> RecordingUnsplash:
    return await serve_fake(aiohttp_server, RecordingUnsplash(key=secrets.token_hex(20)))


@pytest.fixture
def prefix() -> str:
    return f"cluster-{secrets.token_hex(4)}:"


@pytest.fixture
def start_nodes(aiohttp_client, tmp_path, redis_server, fake_unsplash, prefix):
    """Start `count` nodes of one cluster (one Redis, one prefix, one fake Unsplash)."""
    started = 0

    async def start(count: int, env: dict | None = None) -> list:
        nonlocal started
        nodes = []
        for _ in range(count):
            started += 1
            settings = jobservice.load_settings(
                ["--data", str(tmp_path / f"n{started}.json")],
                {**FAST_ENV, "REDIS_URL": redis_server.url, "REDIS_PREFIX": prefix,
                 "UNSPLASH_ACCESS_KEY": fake_unsplash.key,
                 "UNSPLASH_API_URL": fake_unsplash.url, **(env or {})})
            node = await aiohttp_client(jobservice.create_app(settings))
            await node.app[jobservice.STORE].until_ready()
            nodes.append(node)
        return nodes

    return start


@pytest.fixture
async def shared(redis_server):
    """A Redis client of the test's own, to look at what the cluster keeps there."""
    client = aioredis.from_url(redis_server.url, decode_responses=True)
    yield client
    await client.aclose()


async def create_round_robin(nodes: list, count: int) -> list[str]:
    """`count` jobs, the i-th on node i mod len(nodes), all posted at once."""
    batches = await asyncio.gather(*(create_jobs(nodes[i % len(nodes)], 1)
                                     for i in range(count)))
    return [ids[0] for ids in batches]


async def scrape(client) -> dict[str, float]:
    """This node's /metrics: {sample name: value} for the unlabelled samples, plus
    "name{outcome}" for jobservice_unsplash_requests_total."""
    response = await client.get("/metrics")
    assert response.status == 200
    samples = {}
    for family in text_string_to_metric_families(await response.text()):
        for sample in family.samples:
            label = sample.labels.get("outcome")
            samples[f"{sample.name}{{{label}}}" if label else sample.name] = sample.value
    return samples


def due_at(job: dict) -> float:
    return jobservice.parse_time(job["dueAt"], "dueAt")


def resolved_at(job: dict) -> float:
    return jobservice.parse_time(job["resolvedAt"], "resolvedAt")


def assert_resolved_with_distinct_photos(jobs: list[dict], fake: RecordingUnsplash) -> None:
    assert [job["status"] for job in jobs] == ["resolved"] * len(jobs), \
        [(job["status"], job["error"]) for job in jobs if job["status"] != "resolved"]
    assert all(job["attempts"] == 1 for job in jobs), [job["attempts"] for job in jobs]
    photo_ids = [job["image"]["id"] for job in jobs]
    assert len(set(photo_ids)) == len(jobs), "a photo was handed to more than one job"
    assert set(photo_ids) <= fake.served.keys()
    assert all(job["result"] == fake.served[job["image"]["id"]]["urls"]["regular"]
               for job in jobs)


# --- 1. One batch of 30 serves every node ---------------------------------------------


@pytest.mark.parametrize("node_count", [2, 3])
async def test_sixty_jobs_across_nodes_cost_about_one_call_per_thirty(
        start_nodes, fake_unsplash, open_events, shared, prefix, node_count):
    """60 jobs, created round-robin on every node and all due within ~0.3 s.

    The bound: a node calls Unsplash only when it finds the shared pool empty, and every
    photo a call buys goes to that pool (one to the job it was for). When a node starts
    a call, each finished call's 30 photos have all gone to distinct jobs, and this call
    is for a job still waiting, so fewer than 60 jobs were served: at most one call had
    finished. Without a cluster-wide lock, every other node may be in a call of its own
    at that moment (it found the pool empty at the same time). So at most
    ceil(60 / 30) - 1 + (nodes - 1) + 1 = ceil(60 / 30) + nodes - 1 calls; and since
    nothing bought is wasted, what was bought and not used is in Redis, to the photo."""
    # Every job waits for a fresh photo: on a busy box, one past the default 2 s would
    # take a reused one from the catalog.
    nodes = await start_nodes(node_count, {"PHOTO_WAIT": "10"})
    events = await open_events(nodes[0])
    ids = await create_round_robin(nodes, 60)
    done = await events.resolutions(ids, timeout=12)
    jobs = [done[job_id] for job_id in ids]

    assert_resolved_with_distinct_photos(jobs, fake_unsplash)
    bound = math.ceil(60 / BATCH) + node_count - 1
    assert 2 <= fake_unsplash.calls <= bound, \
        f"{fake_unsplash.calls} Unsplash calls for 60 jobs on {node_count} nodes"
    assert all(r["query"].get("count") == str(BATCH) for r in fake_unsplash.requests)
    # Nothing wasted: every photo bought either went to a job or waits in the shared pool.
    left = await shared.llen(jobservice_redis.Keys(prefix).photos)
    assert fake_unsplash.photos_served == BATCH * fake_unsplash.calls
    assert left == fake_unsplash.photos_served - 60, \
        f"{fake_unsplash.photos_served} bought, 60 used, {left} left in the shared pool"
    # Each node's calls, by its own count, add up to the fake's.
    per_node = [await scrape(node) for node in nodes]
    assert sum(m.get("jobservice_unsplash_requests_total{ok}", 0) for m in per_node) \
        == fake_unsplash.calls
    assert sum(m.get("jobservice_jobs_resolved_total", 0) for m in per_node) == 60


async def test_one_batch_serves_thirty_jobs_one_at_a_time_on_alternating_nodes(
        start_nodes, fake_unsplash, open_events, shared, prefix):
    """30 jobs, each created (on node 0, 1, 0, 1, ...) once the one before resolved: the
    first costs the only call; the other 29 come from its leftovers in Redis, whichever
    node resolves them."""
    nodes = await start_nodes(2)
    events = await open_events(nodes[1])
    jobs = []
    for number in range(30):
        [job_id] = await create_jobs(nodes[number % 2], 1)
        jobs.append((await events.resolutions([job_id], timeout=5))[job_id])
        assert fake_unsplash.calls == 1, f"job {number + 1} cost call {fake_unsplash.calls}"

    assert_resolved_with_distinct_photos(jobs, fake_unsplash)
    assert {job["image"]["id"] for job in jobs} == fake_unsplash.batches[0]
    assert await shared.llen(jobservice_redis.Keys(prefix).photos) == 0
    per_node = [await scrape(node) for node in nodes]
    assert sum(m.get("jobservice_jobs_resolved_total", 0) for m in per_node) == 30


async def test_leftovers_serve_a_node_that_bought_none(start_nodes, fake_unsplash,
                                                       open_events, shared, prefix):
    """The node that bought the first batch leaves the cluster; the other one serves the
    next 29 jobs from the leftovers in Redis without a call of its own."""
    nodes = await start_nodes(2)
    events = await open_events(nodes[1])
    [first] = await create_jobs(nodes[0], 1)
    await events.resolutions([first], timeout=5)
    bought = [(await scrape(node)).get("jobservice_unsplash_requests_total{ok}", 0)
              for node in nodes]
    assert sorted(bought) == [0, 1], bought
    buyer, other = (nodes[0], nodes[1]) if bought[0] else (nodes[1], nodes[0])
    if other is not nodes[1]:
        events = await open_events(other)
    await buyer.close()

    ids = await create_jobs(other, BATCH - 1)
    done = await events.resolutions(ids, timeout=10)
    jobs = [done[job_id] for job_id in ids]

    assert_resolved_with_distinct_photos(jobs, fake_unsplash)
    assert fake_unsplash.calls == 1
    assert {job["image"]["id"] for job in jobs} < fake_unsplash.batches[0]
    metrics = await scrape(other)
    assert metrics.get("jobservice_unsplash_requests_total{ok}", 0) == 0
    assert metrics["jobservice_jobs_resolved_total"] == BATCH - 1
    assert await shared.llen(jobservice_redis.Keys(prefix).photos) == 0


# --- 2. A rate-limit pause is shared ---------------------------------------------------


async def test_a_429_on_one_node_pauses_every_node(start_nodes, fake_unsplash, open_events):
    """The node whose call got 429 (Retry-After: 1) sleeps through the pause, so the
    jobs that fall due meanwhile are claimed by the other node: it must wait for the
    pause it reads from Redis, not call Unsplash itself."""
    pause = 1.0
    fake_unsplash.retry_after = "1"
    fake_unsplash.script.append("429")
    nodes = await start_nodes(2, NEVER_REUSE)
    events = await open_events(nodes[0])
    [first] = await create_jobs(nodes[0], 1)
    await fake_unsplash.arrived(1)
    ids = [first, *await create_round_robin(nodes, 6)]
    done = await events.resolutions(ids, timeout=10)
    jobs = [done[job_id] for job_id in ids]

    limited_at = fake_unsplash.arrivals[0]
    # The test shows something only if the later jobs fell due well within the pause.
    assert max(map(due_at, jobs)) < limited_at + pause - 0.3, "jobs created too slowly"
    assert_resolved_with_distinct_photos(jobs, fake_unsplash)  # and no attempt counted
    assert fake_unsplash.modes[0] == "429"
    later = [arrival - limited_at for arrival in fake_unsplash.arrivals[1:]]
    assert later, "no call after the 429"
    assert min(later) >= pause - 0.01, f"a call {min(later):.3f} s into a {pause} s pause"
    # Once it ends, each node may find the pool empty at the same moment: one call each.
    assert fake_unsplash.calls <= 1 + len(nodes)
    assert all(resolved_at(job) >= limited_at + pause - 0.01 for job in jobs)
    # Both nodes waited: the one that got the 429, and the one that only read about it.
    waited = [(await scrape(node)).get("jobservice_unsplash_rate_limited_seconds_total", 0)
              for node in nodes]
    assert all(seconds > 0 for seconds in waited), waited


async def test_remaining_zero_pauses_every_node_but_not_the_pool(start_nodes, fake_unsplash,
                                                                 open_events):
    """A successful call with X-Ratelimit-Remaining: 0 (Retry-After: 3) was the last
    one allowed: its 29 leftovers still serve jobs on every node at once, but the 31st
    job after it waits until the pause is over, whichever node claims it. (3 s: long
    enough that the jobs are all made within it on a busy box.)"""
    pause = 3.0
    fake_unsplash.retry_after = "3"
    fake_unsplash.script.append("remaining0")
    nodes = await start_nodes(2, NEVER_REUSE)
    events = await open_events(nodes[0])
    [first] = await create_jobs(nodes[1], 1)
    await events.resolutions([first], timeout=5)
    ids = await create_round_robin(nodes, BATCH + 1)
    done = await events.resolutions(ids, timeout=15)
    jobs = [done[job_id] for job_id in ids]

    limited_at = fake_unsplash.arrivals[0]
    assert max(map(due_at, jobs)) < limited_at + pause - 0.3, "jobs created too slowly"
    assert_resolved_with_distinct_photos(jobs, fake_unsplash)
    assert fake_unsplash.modes[0] == "remaining0"
    later = [arrival - limited_at for arrival in fake_unsplash.arrivals[1:]]
    assert later, "31 jobs after a batch of 30 and no second call"
    assert min(later) >= pause - 0.01, f"a call {min(later):.3f} s into a {pause} s pause"
    assert fake_unsplash.calls <= 1 + len(nodes)
    # The pause stops calls, not the pool: the leftovers were handed out during it.
    early = sum(resolved_at(job) < limited_at + pause for job in jobs)
    assert early == BATCH - 1, f"{early} of the 29 pooled photos were used during the pause"


# --- 3. A rejected key fails the waiting jobs once, cluster-wide ----------------------


async def test_401_fails_every_nodes_jobs_once_and_is_shared_for_retry_max_delay(
        start_nodes, fake_unsplash, open_events):
    """Unsplash answers 401. Every node's jobs fail with the key named in the error, each
    with one ON_RESOLVED_JOB as seen on either node. The rejection is kept in Redis for
    RETRY_MAX_DELAY (1 s here, so it outlasts the burst): only a call already under way
    on another node when the first 401 came back may reach Unsplash (at most one per
    node). After RETRY_MAX_DELAY the key is tried again, with one call."""
    shared_for = 1.0
    fake_unsplash.mode = "401"
    nodes = await start_nodes(2, {**NEVER_REUSE, "RETRY_MAX_DELAY": str(shared_for)})
    streams = [await open_events(node) for node in nodes]
    ids = await create_round_robin(nodes, 20)
    for stream in streams:
        done = await stream.resolutions(ids, timeout=10)
        for job_id in ids:
            job = done[job_id]
            assert job["status"] == "failed", job
            assert "key" in job["error"].lower() and "rejected" in job["error"].lower(), job
            assert job["result"] is None and job["image"] is None
    rejected_calls = fake_unsplash.calls
    assert 1 <= rejected_calls <= len(nodes), f"{rejected_calls} calls with a rejected key"
    assert set(fake_unsplash.modes) == {"401"}
    first_401 = fake_unsplash.arrivals[0]

    # The key works again (say, it was fixed): a job retried until it resolves must not
    # reach Unsplash before the shared rejection is over, and then costs one call.
    fake_unsplash.mode = "ok"
    target, failed_again = ids[0], 0
    async with asyncio.timeout(shared_for + 5):
        while True:
            response = await nodes[0].post(f"/jobs/{target}/retry")
            assert response.status == 202, await response.text()
            _, job = await streams[0].until(
                lambda name, job: name == "ON_RESOLVED_JOB" and job["id"] == target)
            if job["status"] == "resolved":
                break
            assert "rejected" in job["error"].lower(), job
            failed_again += 1
    assert fake_unsplash.calls == rejected_calls + 1
    assert fake_unsplash.arrivals[-1] >= first_401 + shared_for - 0.01

    # The other node's stream has every event up to that resolution (events arrive in
    # seq order); each job of the burst failed exactly once on both streams.
    await streams[1].until(lambda name, job: name == "ON_RESOLVED_JOB"
                           and job["id"] == target and job["status"] == "resolved")
    for stream in streams:
        counts = Counter(job["id"] for name, job in stream.seen if name == "ON_RESOLVED_JOB")
        assert all(counts[job_id] == 1 for job_id in ids[1:]), \
            {job_id: counts[job_id] for job_id in ids[1:] if counts[job_id] != 1}
    # Each failure was written by one node only: the nodes' own counts add up.
    failed = [(await scrape(node)).get("jobservice_jobs_failed_total", 0) for node in nodes]
    assert sum(failed) == len(ids) + failed_again, failed


# --- 4. The age limit holds for the shared pool ----------------------------------------


async def test_stale_photos_in_the_shared_pool_are_never_handed_out(
        start_nodes, fake_unsplash, open_events, shared, prefix, monkeypatch):
    """POOL_MAX_AGE 0.5 s: a batch's 29 leftovers in Redis are stale by the time the next
    job (created on the other node, due 0.6 s later) needs a photo; it must cost a new
    call and get a photo of the new batch, and the stale ones must not linger."""
    monkeypatch.setattr(jobservice, "POOL_MAX_AGE", AGED)
    nodes = await start_nodes(2, AGE_TEST_ENV)
    events = await open_events(nodes[0])
    [first] = await create_jobs(nodes[0], 1)
    await events.resolutions([first], timeout=5)
    photos_key = jobservice_redis.Keys(prefix).photos
    assert await shared.llen(photos_key) == BATCH - 1  # the leftovers are shared

    [second] = await create_jobs(nodes[1], 1)
    job = (await events.resolutions([second], timeout=5))[second]

    assert job["status"] == "resolved", job
    assert fake_unsplash.calls == 2
    assert job["image"]["id"] in fake_unsplash.batches[1], "a stale pooled photo was used"
    left = await shared.lrange(photos_key, 0, -1)
    assert len(left) == BATCH - 1
    assert not any(f'"{photo_id}"' in entry for entry in left
                   for photo_id in fake_unsplash.batches[0]), "stale photos kept in Redis"


async def test_a_photo_put_back_is_not_handed_out_once_stale(
        start_nodes, fake_unsplash, open_events, monkeypatch):
    """A job deleted while its photo was being bought gives the photo back to its node
    (SharedPhotoPool.put_back, a pool of the node's own). POOL_MAX_AGE still applies to
    it: the next job, due 0.6 s later, must not get that photo (POOL_MAX_AGE 0.5 s)."""
    monkeypatch.setattr(jobservice, "POOL_MAX_AGE", AGED)
    fake_unsplash.gate = asyncio.Event()
    # The held call must outlast the DELETE on a busy box: timed out, it would be a retry.
    [node] = await start_nodes(1, {**AGE_TEST_ENV, "UNSPLASH_TIMEOUT": "10"})
    events = await open_events(node)
    [doomed] = await create_jobs(node, 1)
    await fake_unsplash.arrived(1)
    response = await node.delete(f"/jobs/{doomed}")
    assert response.status == 204
    fake_unsplash.gate.set()

    [job_id] = await create_jobs(node, 1)
    job = (await events.resolutions([job_id], timeout=5))[job_id]

    assert job["status"] == "resolved", job
    assert job["image"]["id"] not in fake_unsplash.batches[0], \
        f"a photo bought {resolved_at(job) - fake_unsplash.arrivals[0]:.3f} s earlier " \
        "was handed out with POOL_MAX_AGE 0.5 s"
    assert fake_unsplash.calls == 2
