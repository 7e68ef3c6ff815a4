"""Many processes on one Redis are one service: every job resolves once, every client
hears every event once, wherever it is connected, and nothing acknowledged is lost when
a node or Redis itself is killed.

Real service processes, a real redis-server of each test's own (append-only, fsync
always), and real clients; the fake Unsplash is the only stand-in.
"""

from __future__ import annotations

import asyncio
import collections
import json
import time
from datetime import datetime
from urllib.parse import urlsplit

import aiohttp
import pytest
import redis.asyncio
from conftest import EventStream, ServiceProcess, serve_fake
from fake_unsplash import FakeUnsplash

RESOLVED, CREATED = "ON_RESOLVED_JOB", "ON_CREATED_JOB"


@pytest.fixture
async def cluster(fresh_redis, tmp_path):
    """Start nodes on the test's Redis: `await cluster(count, env)` -> the new nodes."""
    nodes: list[ServiceProcess] = []

    async def start(count: int, env: dict | None = None) -> list[ServiceProcess]:
        started = []
        for _ in range(count):
            node = ServiceProcess(tmp_path / f"node{len(nodes)}.json",
                                  {"REDIS_URL": fresh_redis.url, **(env or {})})
            nodes.append(node)
            started.append(node)
        await asyncio.gather(*(node.start() for node in started))
        return started

    yield start
    for node in nodes:
        if node.process and node.process.returncode is None:
            node.process.kill()
            await node.process.wait()


@pytest.fixture
async def redis_client(fresh_redis):
    client = redis.asyncio.Redis.from_url(fresh_redis.url, decode_responses=True)
    yield client
    await client.aclose()


@pytest.fixture
async def watch(http):
    """`await watch(node, query)`: an EventStream on the node's /ws."""

    async def open_(node: ServiceProcess, query: str = "") -> EventStream:
        return EventStream(await http.ws_connect(f"{node.url}/ws{query}"))

    return open_


async def post(http, node: ServiceProcess) -> str:
    async with http.post(f"{node.url}/jobs") as response:
        assert response.status == 201, await response.text()
        return (await response.json())["id"]


async def health(http, node: ServiceProcess) -> dict:
    async with http.get(f"{node.url}/healthz") as response:
        return await response.json()


async def resolutions_until(stream: EventStream, ids: set[str],
                            timeout: float) -> collections.Counter:
    """Read the stream until every id in ids has resolved; how often each resolution
    was heard (so that a second one, had there been one before the last, counts)."""
    heard = collections.Counter()
    async with asyncio.timeout(timeout):
        while not ids <= heard.keys():
            name, job = await stream.next(timeout)
            if name == RESOLVED:
                heard[job["id"]] += 1
    return heard


async def quiet_until(stream: EventStream, marker: str, heard: collections.Counter) -> None:
    """Go on counting resolutions until the marker job's: any duplicate sent before it
    (the stream is in seq order, and the marker resolves last) is counted too."""
    async with asyncio.timeout(20):
        while True:
            name, job = await stream.next()
            if name == RESOLVED:
                heard[job["id"]] += 1
                if job["id"] == marker:
                    return


async def test_three_nodes_are_one_service(cluster, watch, http):
    nodes = await cluster(3)
    streams = [await watch(node) for node in nodes]
    ids = []
    for number in range(90):  # round-robin over the nodes, several in flight at once
        ids.append(await post(http, nodes[number % 3]))
    wanted = set(ids)
    heard = await asyncio.gather(*(resolutions_until(stream, wanted, 30) for stream in streams))
    marker = await post(http, nodes[0])
    for stream, counts in zip(streams, heard, strict=True):
        await quiet_until(stream, marker, counts)
        assert {job_id: counts[job_id] for job_id in ids} == dict.fromkeys(ids, 1), \
            "every client hears each resolution once"

    listings, seqs = [], []
    for node in nodes:
        async with http.get(f"{node.url}/jobs") as response:
            listings.append(await response.json())
            seqs.append(int(response.headers["X-Jobs-Seq"]))
    assert listings[0] == listings[1] == listings[2], "the same jobs, in the same order"
    assert [job["id"] for job in listings[0]] == [*ids, marker]
    assert all(job["status"] == "resolved" for job in listings[0])
    # One counter: 91 creations and 91 resolutions, numbered 1..182 on every node.
    assert seqs == [182, 182, 182]
    assert len({(await health(http, node))["node"] for node in nodes}) == 3


class GatedUnsplash(FakeUnsplash):
    """The shared fake, answering no call until `opened` is set."""

    def __init__(self):
        super().__init__()
        self.opened = asyncio.Event()

    async def random_photos(self, request):
        await self.opened.wait()
        return await super().random_photos(request)


async def test_a_killed_node_s_claims_are_resolved_once_by_the_others(
        cluster, watch, http, redis_client, aiohttp_server):
    """500 jobs over two nodes; node A is SIGKILLed while it holds claims. Its jobs are
    taken over after the lease, and every job resolves exactly once. Unsplash answers no
    call until A is dead, and the jobs wait for fresh photos (PHOTO_REUSE=never), so A
    cannot resolve what it claimed between the look at its claims and the kill."""
    fake = GatedUnsplash()
    await serve_fake(aiohttp_server, fake)
    lease = 2.0
    env = {"JOB_LEASE": str(lease), "JOB_DELAY_MIN": "0.5", "JOB_DELAY_MAX": "1.5",
           "JOB_DELAY_STEP": "0.5", "UNSPLASH_ACCESS_KEY": fake.key,
           "UNSPLASH_API_URL": fake.url, "UNSPLASH_TIMEOUT": "5", "PHOTO_REUSE": "never"}
    a, b = await cluster(2, env)
    node_a = (await health(http, a))["node"]
    stream = await watch(b)
    ids = [await post(http, (a, b)[number % 2]) for number in range(500)]

    async with asyncio.timeout(10):  # until A holds claims it has not resolved (a state
        # in another process, read from Redis: there is nothing to await but a poll)
        while node_a not in await redis_client.hvals("jobservice:claims"):  # noqa: ASYNC110
            await asyncio.sleep(0.01)
    a.process.kill()
    await a.process.wait()
    killed_at = time.time()
    held = [job_id for job_id, owner in (await redis_client.hgetall("jobservice:claims")).items()
            if owner == node_a]
    fake.opened.set()

    heard = await resolutions_until(stream, set(ids), 30)
    marker = await post(http, b)
    await quiet_until(stream, marker, heard)
    assert {job_id: heard[job_id] for job_id in ids} == dict.fromkeys(ids, 1)
    assert held, "A held no claim when it was killed: the test showed nothing"
    assert await redis_client.hlen("jobservice:claims") == 0
    async with http.get(f"{b.url}/jobs") as response:
        jobs = {job["id"]: job for job in await response.json()}
    assert all(jobs[job_id]["status"] == "resolved" for job_id in ids)
    # What A held resolved once its lease ran out, not much later: counted from the kill,
    # so that however long A took to claim on a busy box, it is not counted here.
    latest = max(jobs[job_id]["resolvedAt"] for job_id in held)
    finished = datetime.fromisoformat(latest).timestamp()
    assert finished - killed_at < lease + 1.5 + 5, latest
    # The event log in Redis holds one resolution per job: exactly once, at the source.
    entries = await redis_client.xrange("jobservice:events")
    resolved = collections.Counter(json.loads(fields["r"])["id"] for _, fields in entries
                                   if '"status":"resolved"' in fields["r"])
    assert set(resolved.values()) == {1} and len(resolved) == 501


async def test_a_client_moves_to_another_node_with_since(cluster, watch, http):
    a, b = await cluster(2)
    first = await watch(a)
    ids = [await post(http, a) for _ in range(3)]
    await first.resolutions(ids)
    last_seq = first.seen[-1][1]["seq"]
    await first.ws.close()

    observer = await watch(b)
    missed = [await post(http, node) for node in (a, b, a, b)]
    await observer.resolutions(missed)
    moved = await watch(b, f"?since={last_seq}")
    replay = []
    while True:
        name, payload = await moved.next()
        if name == "SYNCED":
            break
        replay.append((name, payload["id"], payload["seq"]))
    # Each job that changed since is sent once, in its latest state, in seq order.
    assert sorted(replay, key=lambda item: item[2]) == replay
    assert sorted(job_id for _, job_id, _ in replay) == sorted(missed)
    assert all(name == RESOLVED for name, _, _ in replay)
    assert payload["seq"] == max(seq for _, _, seq in replay)


async def test_a_socketio_client_of_a_dead_node_is_recovered_on_another(
        cluster, node_client, tcp_proxy, http):
    """A stock socket.io-client behind a proxy to node A; A is SIGKILLed and the proxy
    now leads to node B. The client reconnects by itself with its pid and offset, is
    recovered by B, and gets what it missed, once."""
    slow = {"JOB_DELAY_MIN": "1", "JOB_DELAY_MAX": "1"}
    a, b = await cluster(2, slow)
    proxy = await tcp_proxy(urlsplit(a.url).port)
    client = await node_client(proxy.url)
    hello = await client.connected()
    ids = [await post(http, a) for _ in range(3)]
    for job_id in ids:
        await client.event(CREATED, job_id)
    proxy.close_gate()
    a.process.kill()
    await a.process.wait()
    await client.until(lambda line: line["type"] == "disconnect")
    away = len(client.lines)
    proxy.target = ("127.0.0.1", urlsplit(b.url).port)
    proxy.open_gate()

    back = await client.connected(30)
    assert back["recovered"] is True and back["id"] == hello["id"]
    for job_id in ids:
        await client.event(RESOLVED, job_id, since=away, limit=30)
    marker = await post(http, b)
    await client.event(CREATED, marker, since=away)
    after = [(line["name"], line["job"]["id"]) for line in client.lines[away:]
             if line["type"] == "event" and "id" in (line["job"] or {})]
    assert sorted(pair for pair in after if pair[1] in ids) == sorted(
        (RESOLVED, job_id) for job_id in ids)
    assert await client.quit() == 0


async def test_redis_killed_under_load_loses_nothing_acknowledged(
        cluster, fresh_redis, watch, http):
    """POSTs run on while redis-server is SIGKILLed and restarted on its files: every
    201 is a job that exists afterwards and resolves; during the outage POSTs get 503
    within REDIS_TIMEOUT; the nodes carry on without a restart."""
    timeout = 1.0
    a, b = await cluster(2, {"REDIS_TIMEOUT": str(timeout)})
    acknowledged, refused, slowest_refusal = [], 0, 0.0
    phase = {"before": 200, "during": 10, "after": 200}  # what each stage waits for
    counts = dict.fromkeys(phase, 0)
    reached = {stage: asyncio.Event() for stage in phase}
    stage = "before"

    async def load(node: ServiceProcess) -> None:
        nonlocal refused, slowest_refusal
        while not reached["after"].is_set():
            started = time.monotonic()
            try:
                async with http.post(f"{node.url}/jobs") as response:
                    body = await response.json()
            except aiohttp.ClientError as exc:  # the service must never drop a request
                raise AssertionError(f"{node.url}: {exc!r}") from None
            if response.status == 201:
                acknowledged.append(body["id"])
                counted = stage != "during"
            else:
                assert response.status == 503, body
                assert body["error"]["code"] == "storage_unavailable"
                refused += 1
                slowest_refusal = max(slowest_refusal, time.monotonic() - started)
                counted = stage == "during"
            if counted:
                counts[stage] += 1
                if counts[stage] >= phase[stage]:
                    reached[stage].set()

    async def chaos() -> None:
        nonlocal stage
        await reached["before"].wait()
        fresh_redis.kill()
        stage = "during"
        await reached["during"].wait()
        assert (await health(http, a))["storage"] == "failing"
        fresh_redis.start()
        stage = "after"

    stream = await watch(b)
    await asyncio.gather(load(a), load(b), chaos())
    assert refused >= 10 and slowest_refusal < 2 * timeout + 0.5, slowest_refusal

    heard = await resolutions_until(stream, set(acknowledged), 60)
    assert set(acknowledged) <= heard.keys()
    async with http.get(f"{a.url}/jobs") as response:
        jobs = {job["id"]: job for job in await response.json()}
    assert set(acknowledged) <= jobs.keys(), "an acknowledged job was lost"
    assert (await health(http, a))["storage"] == "ok"
