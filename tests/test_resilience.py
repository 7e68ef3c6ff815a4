"""`/ws` on a bad network and across restarts (issue 3): a client that keeps the highest
seq it saw and reconnects with `since` ends up with exactly the server's state, each
change applied once, however often its connection is cut.

- 20 clients behind a proxy that cuts every connection after 20-300 ms and refuses new
  ones in short outages, while 500 real jobs are created and resolve;
- a client that sees the server stop (1001), stays away while its jobs fall due, and
  comes back to the restarted server;
- the page's pattern: `GET /jobs` (+ `X-Jobs-Seq`), then `/ws?since=X-Jobs-Seq`, while
  jobs are created and resolved between the two calls;
- a handshake cut before the 101 (common on such a network) is not a server error.

Every wait is on something happening (an event, a seq, a close); the only sleeps are the
clients' reconnect backoff, the proxy's weather, waiting for a known `dueAt` to pass, and
polling the in-process server's request counters where nothing else can be observed.
"""

from __future__ import annotations

import asyncio
import json
import logging
import random
import socket
import struct
import time
from collections import Counter
from datetime import datetime
from urllib.parse import urlsplit

import aiohttp
import pytest
from netproxy import TcpProxy

CREATED, RESOLVED = "ON_CREATED_JOB", "ON_RESOLVED_JOB"


@pytest.fixture
async def http():
    async with aiohttp.ClientSession() as session:
        yield session


async def post_jobs(session: aiohttp.ClientSession, base: str, count: int,
                    concurrency: int = 1) -> list[str]:
    """Create `count` jobs, at most `concurrency` requests at a time; their ids."""
    gate = asyncio.Semaphore(concurrency)

    async def one() -> str:
        async with gate, session.post(f"{base}/jobs") as response:
            assert response.status == 201, await response.text()
            return (await response.json())["id"]

    return list(await asyncio.gather(*(one() for _ in range(count))))


async def listing(session: aiohttp.ClientSession, base: str) -> tuple[dict[str, dict], int]:
    """GET /jobs: (id -> job, X-Jobs-Seq)."""
    async with session.get(f"{base}/jobs") as response:
        assert response.status == 200, await response.text()
        jobs = await response.json()
        return {job["id"]: job for job in jobs}, int(response.headers["X-Jobs-Seq"])


def timestamp(iso: str) -> float:
    return datetime.fromisoformat(iso.replace("Z", "+00:00")).timestamp()


def server_errors(lines: list[str]) -> str:
    """The service log's ERROR and CRITICAL entries, each with the exception line that
    ends its traceback, counted: one line per kind; empty when there are none."""
    entries: list[list[str]] = []
    for line in lines:
        if " ERROR " in line or " CRITICAL " in line:
            entries.append([line.split(" ", 2)[-1], ""])
        elif (entries and line and not line.startswith((" ", "Traceback"))
              and not line[:4].isdigit()):
            entries[-1][1] = line
    counts = Counter(": ".join(filter(None, entry)) for entry in entries)
    return "\n".join(f"{count} x {text}" for text, count in counts.items())


class Replica:
    """What a client holds: the latest state of every job it heard of, by seq.

    `apply` takes one text frame of one connection and checks the protocol on the way:
    within a connection seqs only grow (events strictly; SYNCED is at least the last
    replayed seq and below every live one), nothing at or below the `since` it asked for
    arrives, SYNCED comes once, RESET never. An event no newer than what is held is a
    duplicate, and is counted, not applied."""

    def __init__(self, name: str, jobs: dict[str, dict] | None = None, last_seq: int = 0):
        self.name = name
        self.jobs: dict[str, dict] = dict(jobs or {})
        self.last_seq = last_seq
        # Resolutions applied per job; a resolved job in a starting listing counts as one.
        self.resolutions = Counter(job_id for job_id, job in self.jobs.items()
                                   if job["status"] != "pending")
        self.duplicates: list[tuple[str, int, int]] = []  # (id, seq received, seq held)
        self.violations: list[str] = []
        self.connections = 0
        self.synced_connections = 0
        self._since = self._prev = 0
        self._synced: int | None = None

    def connected(self, since: int) -> None:
        self.connections += 1
        self._since = self._prev = since
        self._synced = None

    def apply(self, text: str) -> None:
        name, payload = json.loads(text)
        where = f"{self.name} connection {self.connections} (since={self._since})"
        if name == "SYNCED":
            seq = payload["seq"]
            if self._synced is not None:
                self.violations.append(f"{where}: a second SYNCED {seq}")
            if seq < self._prev:
                self.violations.append(f"{where}: SYNCED {seq} below a replayed seq "
                                       f"{self._prev}")
            self._synced = self._prev = seq
            self.synced_connections += 1
            self.last_seq = max(self.last_seq, seq)
            return
        if name not in (CREATED, RESOLVED):
            self.violations.append(f"{where}: unexpected {name} {payload}")
            return
        seq, job_id = payload["seq"], payload["id"]
        if seq <= self._prev:
            self.violations.append(f"{where}: {name} seq {seq} after seq {self._prev}"
                                   + (" (at or below since)" if seq <= self._since else ""))
        self._prev = max(self._prev, seq)
        if (name == CREATED) != (payload["status"] == "pending"):
            self.violations.append(f"{where}: {name} for a {payload['status']} job")
        held = self.jobs.get(job_id)
        if held is not None and seq <= held["seq"]:
            self.duplicates.append((job_id, seq, held["seq"]))
        else:
            self.jobs[job_id] = payload
            if name == RESOLVED:
                self.resolutions[job_id] += 1
        self.last_seq = max(self.last_seq, seq)

    def settled(self, count: int) -> bool:
        """Holds `count` jobs, none of them pending."""
        return len(self.jobs) == count and all(
            job["status"] != "pending" for job in self.jobs.values())

    def describe(self, count: int) -> str:
        pending = sum(job["status"] == "pending" for job in self.jobs.values())
        return (f"{self.name}: {len(self.jobs)}/{count} jobs, {pending} pending, last_seq "
                f"{self.last_seq}, {self.connections} connections")


# --- 1. A flaky network ---------------------------------------------------------------

FLAKY_JOBS = 500
FLAKY_CLIENTS = 20
FLAKY_ENV = {"JOB_DELAY_MIN": "0.1", "JOB_DELAY_MAX": "2", "JOB_DELAY_STEP": "0.1"}


class FlakyClient:
    """Connects to /ws?since=<last_seq> through the proxy, again after every cut (with a
    small random backoff), until it holds `count` settled jobs."""

    def __init__(self, name: str, url: str, count: int):
        self.url = url
        self.count = count
        self.replica = Replica(name)
        self.failed_handshakes = 0
        self.cut_before_synced = 0
        self.close_codes: Counter = Counter()

    async def run(self) -> None:
        replica, failures = self.replica, 0
        timeout = aiohttp.ClientTimeout(total=5)
        async with aiohttp.ClientSession(timeout=timeout) as session:
            while not replica.settled(self.count):
                since = replica.last_seq
                try:
                    ws = await session.ws_connect(f"{self.url}/ws?since={since}")
                except (aiohttp.ClientError, OSError, TimeoutError):
                    failures += 1
                    self.failed_handshakes += 1
                    await asyncio.sleep(random.uniform(0, min(0.2, 0.005 * 2 ** failures)))
                    continue
                failures = 0
                replica.connected(since)
                async with ws:
                    await self._read(ws)
                if not replica.settled(self.count):
                    await asyncio.sleep(random.uniform(0, 0.01))

    async def _read(self, ws: aiohttp.ClientWebSocketResponse) -> None:
        replica = self.replica
        synced_before = replica.synced_connections
        while True:
            try:
                message = await ws.receive(timeout=10)
            except TimeoutError:  # no connection outlives 300 ms behind this proxy
                replica.violations.append(f"{replica.name}: a connection silent for 10 s")
                return
            if message.type != aiohttp.WSMsgType.TEXT:
                if message.type == aiohttp.WSMsgType.CLOSE:
                    self.close_codes[message.data] += 1
                if replica.synced_connections == synced_before:
                    self.cut_before_synced += 1
                return
            replica.apply(message.data)
            if replica.settled(self.count):
                return


async def test_clients_behind_a_flaky_network_end_with_every_job_applied_once(
        service_process, http):
    service = await service_process(FLAKY_ENV)
    proxy = await TcpProxy(urlsplit(service.url).port, lifetime=(0.02, 0.3)).start()
    proxy.start_outages(every=(0.2, 0.8), length=(0.02, 0.15))
    clients = [FlakyClient(f"client {n}", proxy.url, FLAKY_JOBS)
               for n in range(FLAKY_CLIENTS)]
    direct = Replica("a client on a perfect network")  # tells when the server is done

    async def follow_directly() -> None:
        async with http.ws_connect(f"{service.url}/ws?since=0") as ws:
            direct.connected(0)
            while not direct.settled(FLAKY_JOBS):
                message = await ws.receive(timeout=10)
                assert message.type == aiohttp.WSMsgType.TEXT, message
                direct.apply(message.data)

    started = time.monotonic()
    tasks = [asyncio.create_task(client.run()) for client in clients]
    phase = "the jobs to resolve"
    try:
        async with asyncio.timeout(60):
            # Straight to the service, not through the proxy: the jobs must all exist.
            ids = await post_jobs(http, service.url, FLAKY_JOBS, concurrency=20)
            await follow_directly()
        phase = "the clients to catch up once every job had resolved"
        async with asyncio.timeout(25):
            await asyncio.gather(*tasks)
    except TimeoutError:
        pytest.fail(f"timed out waiting for {phase}:\n" + "\n".join(
            replica.describe(FLAKY_JOBS) + "".join(
                f"\n  {problem}" for problem in replica.violations[:3])
            for replica in [direct] + [client.replica for client in clients]),
            pytrace=False)
    finally:
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
        await proxy.close()
    elapsed = time.monotonic() - started

    final, seq = await listing(http, service.url)
    assert set(final) == set(ids) and len(ids) == FLAKY_JOBS
    assert all(job["status"] != "pending" for job in final.values())
    assert seq == max(job["seq"] for job in final.values())
    for replica in [direct] + [client.replica for client in clients]:
        assert not replica.violations, replica.violations[:10]
        assert not replica.duplicates, (
            f"{replica.name} was sent {len(replica.duplicates)} events it already had "
            f"(id, seq, held): {replica.duplicates[:5]}")
        assert replica.jobs == final, f"{replica.name} differs from GET /jobs"
        assert replica.resolutions == dict.fromkeys(final, 1), (
            f"{replica.name}: resolutions applied other than once: "
            f"{ {i: n for i, n in replica.resolutions.items() if n != 1} }")
        assert replica.last_seq == seq
    stats = (f"{proxy.cuts} cuts, {proxy.refused} refused, {proxy.accepted} relayed, "
             f"{proxy.outages} outages, "
             f"{sum(c.cut_before_synced for c in clients)} cut before SYNCED, "
             f"{sum(c.failed_handshakes for c in clients)} failed handshakes, "
             f"{sum(c.replica.connections for c in clients)} sessions, "
             f"close codes {sum((c.close_codes for c in clients), Counter())}, "
             f"{elapsed:.1f} s")
    assert proxy.cuts >= 100, f"the network was not flaky enough: {stats}"
    assert proxy.refused >= 1 and proxy.outages >= 1, stats
    assert sum(c.replica.connections for c in clients) >= 100 + FLAKY_CLIENTS, stats
    assert all(client.replica.connections >= 2 for client in clients), stats

    assert await service.stop() == 0
    errors = server_errors(service.log)
    assert not errors, errors


# --- 2. A server restart ----------------------------------------------------------------

# Each job is due 1 s or 60 s after it is created: the 1 s ones fall due while the
# server is down, the 60 s ones stay pending throughout.
RESTART_ENV = {"JOB_DELAY_MIN": "1", "JOB_DELAY_MAX": "60", "JOB_DELAY_STEP": "59"}


async def next_text(ws: aiohttp.ClientWebSocketResponse, limit: float = 10.0):
    message = await ws.receive(timeout=limit)
    assert message.type == aiohttp.WSMsgType.TEXT, (message.type, message.data)
    return json.loads(message.data)


async def follow(ws: aiohttp.ClientWebSocketResponse, replica: Replica, until,
                 limit: float = 20.0) -> list:
    """Apply frames to replica until `until(name, payload)`; the frames read."""
    frames = []
    async with asyncio.timeout(limit):
        while not frames or not until(*frames[-1]):
            frames.append(await next_text(ws))
            replica.apply(json.dumps(frames[-1]))
            assert not replica.violations, replica.violations
    return frames


def is_short(job: dict) -> bool:
    return timestamp(job["dueAt"]) - timestamp(job["createdAt"]) < 30


async def test_a_client_gets_exactly_what_resolved_while_the_server_was_down(
        service_process, http):
    service = await service_process(RESTART_ENV)
    port = urlsplit(service.url).port
    ws = await http.ws_connect(f"{service.url}/ws?since=0")
    replica = Replica("client")
    replica.connected(0)
    assert await follow(ws, replica, lambda name, _: True) == [["SYNCED", {"seq": 0}]]

    async def create() -> dict:
        [job_id] = await post_jobs(http, service.url, 1)
        [(name, job)] = await follow(ws, replica, lambda name, job: True)
        assert (name, job["id"]) == (CREATED, job_id)
        return job

    # One job resolves before the stop: the client has it and must not get it again.
    long: list[str] = []
    while not is_short(job := await create()):
        long.append(job["id"])
    before = job["id"]
    await follow(ws, replica, lambda name, job: name == RESOLVED and job["id"] == before)
    # At least two jobs of each kind, pending when the server stops.
    short: list[str] = []
    for _ in range(60):
        if len(short) >= 2 and len(long) >= 2:
            break
        job = await create()
        (short if is_short(job) else long).append(job["id"])
    assert len(short) >= 2 and len(long) >= 2, (short, long)
    last_seq = replica.last_seq

    assert await service.stop() == 0
    stopped_at = time.time()
    closing = await ws.receive(timeout=5)
    assert closing.type == aiohttp.WSMsgType.CLOSE and closing.data == 1001, closing
    await ws.close()
    assert all(replica.jobs[job_id]["status"] == "pending" for job_id in short + long), \
        "a job resolved before the stop (machine too slow for a 1 s delay?)"
    dues = [timestamp(replica.jobs[job_id]["dueAt"]) for job_id in short]
    assert min(dues) > stopped_at, "a short job fell due before the server had stopped"
    due = max(dues)
    with pytest.raises(aiohttp.ClientConnectionError):  # it really is down
        await http.ws_connect(f"{service.url}/ws?since={last_seq}")
    await asyncio.sleep(max(0.0, due - time.time()) + 0.05)  # they fall due while it is down

    restarted = await service_process(RESTART_ENV, args=["--port", str(port)])
    assert restarted.url == service.url
    # Wait (on events) until the overdue jobs have resolved, so that they reach the
    # client as its replay; this watcher is not the client under test.
    async with http.ws_connect(f"{restarted.url}/ws?since={last_seq}") as watcher:
        final = await resolutions(watcher, short)

    ws = await http.ws_connect(f"{restarted.url}/ws?since={last_seq}")
    replica.connected(last_seq)
    *missed, (_, synced) = await follow(ws, replica, lambda name, _: name == "SYNCED")
    assert [name for name, _ in missed] == [RESOLVED] * len(short), missed
    assert sorted(job["id"] for _, job in missed) == sorted(short), \
        "the replay must be exactly the jobs that resolved while the client was away"
    for _, job in missed:
        assert job == final[job["id"]]
        assert job["seq"] > last_seq  # the counter went on from where it was
        assert timestamp(job["resolvedAt"]) >= stopped_at
    seqs = [job["seq"] for _, job in missed]
    assert seqs == sorted(seqs)
    after, counter = await listing(http, restarted.url)
    assert synced["seq"] == counter == max(seqs)

    [live] = await post_jobs(http, restarted.url, 1)
    [(name, job)] = await follow(ws, replica, lambda name, job: True)
    assert (name, job["id"], job["seq"]) == (CREATED, live, counter + 1)
    await ws.close()

    after[live] = job
    assert not replica.violations, replica.violations
    assert not replica.duplicates, replica.duplicates
    assert replica.jobs == after
    assert replica.resolutions == dict.fromkeys([before, *short], 1)
    assert all(after[job_id]["status"] == "pending" for job_id in long)
    errors = server_errors(service.log + restarted.log)
    assert not errors, errors


async def resolutions(ws: aiohttp.ClientWebSocketResponse, ids, limit: float = 20.0):
    """Read until every job in ids has resolved; their final states."""
    wanted, done = set(ids), {}
    async with asyncio.timeout(limit):
        while wanted - done.keys():
            name, job = await next_text(ws)
            assert name != "RESET", f"RESET {job}: the counter went back after a restart"
            if name == RESOLVED and job["id"] in wanted:
                done[job["id"]] = job
    return done


# --- 3. The page's pattern: a listing, then `since` -------------------------------------

PAGE_ENV = {"JOB_DELAY_MIN": "0.02", "JOB_DELAY_MAX": "0.4", "JOB_DELAY_STEP": "0.02"}
ROUNDS, PER_ROUND, PAGES = 40, 8, 12


class Watcher:
    """A /ws reader that tells waiters how far the server's seq has come, and which
    kinds of change it saw above a seq."""

    def __init__(self, ws: aiohttp.ClientWebSocketResponse):
        self.ws = ws
        self.seq = 0
        self.changes: list[tuple[int, str]] = []
        self.condition = asyncio.Condition()
        self.task = asyncio.create_task(self._read())

    async def _read(self) -> None:
        async for message in self.ws:
            name, payload = json.loads(message.data)
            async with self.condition:
                self.seq = max(self.seq, payload["seq"])
                if name != "SYNCED":
                    self.changes.append((payload["seq"], name))
                self.condition.notify_all()

    async def reached(self, seq: int, limit: float = 10.0) -> None:
        async with asyncio.timeout(limit), self.condition:
            await self.condition.wait_for(lambda: self.seq >= seq)

    def kinds_between(self, low: int, high: int) -> set[str]:
        return {name for seq, name in self.changes if low < seq <= high}


async def test_listing_then_since_loses_and_duplicates_nothing_under_churn(
        start_service):
    client = await start_service(PAGE_ENV)
    watcher = Watcher(await client.ws_connect("/ws?since=0"))
    ids: list[str] = []
    pages: list[asyncio.Task] = []
    gaps: list[tuple[int, int, set[str]]] = []

    async def page(number: int) -> Replica:
        # Load the list, as the page does...
        response = await client.get("/jobs")
        assert response.status == 200
        seq = int(response.headers["X-Jobs-Seq"])
        jobs = {job["id"]: job for job in await response.json()}
        replica = Replica(f"page {number}", jobs, seq)
        above = {job_id: job["seq"] for job_id, job in jobs.items() if job["seq"] > seq}
        assert not above, f"{replica.name}: the listing at X-Jobs-Seq {seq} has {above}"
        # ... let jobs be created and resolved in between ...
        await watcher.reached(seq + 10)
        # ... then follow from the listing's seq.
        async with client.ws_connect(f"/ws?since={seq}") as ws:
            gaps.append((number, seq, watcher.kinds_between(seq, watcher.seq)))
            replica.connected(seq)
            while not replica.settled(ROUNDS * PER_ROUND):
                try:
                    # Jobs resolve within 0.4 s of their creation: 5 s of silence is a loss.
                    message = await ws.receive(timeout=5)
                except TimeoutError:
                    pending = sorted(i for i, job in replica.jobs.items()
                                     if job["status"] == "pending")
                    pytest.fail(f"{replica.describe(ROUNDS * PER_ROUND)}; never heard the "
                                f"end of {pending[:5]}", pytrace=False)
                assert message.type == aiohttp.WSMsgType.TEXT, (replica.name, message)
                replica.apply(message.data)
        return replica

    async with asyncio.timeout(60):
        for round_ in range(ROUNDS):
            if round_ % 3 == 0 and len(pages) < PAGES:
                pages.append(asyncio.create_task(page(len(pages))))
            responses = await asyncio.gather(*(client.post("/jobs") for _ in range(PER_ROUND)))
            for response in responses:
                assert response.status == 201
                ids.append((await response.json())["id"])
            await watcher.reached(len(ids))  # each creation takes one seq, resolutions more
        replicas = await asyncio.gather(*pages)
    watcher.task.cancel()

    response = await client.get("/jobs")
    final = {job["id"]: job for job in await response.json()}
    assert set(final) == set(ids)
    for replica in replicas:
        assert not replica.violations, replica.violations[:10]
        assert not replica.duplicates, (
            f"{replica.name}: {len(replica.duplicates)} events it already had "
            f"(id, seq, held): {replica.duplicates[:5]}")
        assert replica.jobs == final, f"{replica.name} differs from GET /jobs"
        assert replica.resolutions == dict.fromkeys(final, 1), replica.name
    # The scenario really happened: creations and resolutions fell between the calls.
    both = [number for number, _, kinds in gaps if kinds == {CREATED, RESOLVED}]
    assert len(both) >= PAGES // 2, gaps


# --- 4. A connection cut during the handshake -------------------------------------------

HANDSHAKE = ("GET {path} HTTP/1.1\r\nHost: 127.0.0.1\r\nUpgrade: websocket\r\n"
             "Connection: Upgrade\r\nSec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\n"
             "Sec-WebSocket-Version: 13\r\n\r\n")


@pytest.mark.parametrize("path", ["/ws?since=0", "/socket.io/?EIO=4&transport=websocket"])
async def test_a_client_cut_during_the_handshake_is_no_error(start_service, caplog, path):
    """On a flaky network many handshakes never complete: the client is gone before the
    101 is written. That is not a server error, and must not be logged as one."""
    client = await start_service()
    server = client.server.runner.server
    request = HANDSHAKE.format(path=path).encode()
    for reset in [False, True] * 5:  # closed after the request: with a FIN, or a RST
        with socket.socket() as sock:
            sock.connect((client.server.host, client.server.port))
            if reset:
                sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
            sock.sendall(request)
    async with asyncio.timeout(5):
        # Nothing is sent to anyone when such a request ends: wait for the server's count.
        while server.requests_count < 10 or server.connections:  # noqa: ASYNC110
            await asyncio.sleep(0.01)
    errors = [f"{record.name}: {record.getMessage()}: {record.exc_info and record.exc_info[1]!r}"
              for record in caplog.records if record.levelno >= logging.ERROR]
    assert not errors, errors
    ws = await client.ws_connect("/ws?since=0")  # and the next client is served
    assert (await ws.receive(timeout=5)).data == '["SYNCED",{"seq":0}]'
    await ws.close()
