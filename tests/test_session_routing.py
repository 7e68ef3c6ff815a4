"""One service however many processes: every request of an Engine.IO session reaches the
process that holds it, with no sticky balancer. `--workers 4` (SO_REUSEPORT hands one
client's polls, POSTs and upgrade to any worker) and two nodes behind the README's nginx
configuration (plain round robin), each with stock socket.io-client sockets from npm
(tests/node/sio_many.mjs runs many in one process) with default options and on polling
alone; a worker or a node SIGKILLed under them costs no client any event. Then the relay
itself: its door opens only with the HMAC of the nodes' shared secret, an owner that is
gone is "Session ID unknown" at once, and a relayed long-poll is cut by none of the
nodes' timeouts; and nginx's pooled connections to the nodes meet no 502 under POST
load while the nodes close idle ones.

Everything runs as real processes: the service, redis-server, nginx and Node. The nodes'
timeouts are scaled down (KEEPALIVE_TIMEOUT 1.25 s against nginx's upstream 1 s, as the
README's 75 s against 60 s), so seconds show what a minute would.
"""

from __future__ import annotations

import asyncio
import hashlib
import hmac
import json
import os
import re
import shutil
import signal
import time

import aiohttp
import pytest
import redis.asyncio as aioredis
from conftest import free_port, running_services
from test_cluster_cli import LISTENING, children, redis_env, supervisors  # noqa: F401

import jobservice

CLIENTS = 50
JOBS = 5
POLLING = {"transports": ["polling"]}
# A node's timeouts, scaled down; nginx's upstream keep-alive stays under the node's.
NODE_TIMEOUTS = {"KEEPALIVE_TIMEOUT": "1.25", "HEADER_TIMEOUT": "1", "BODY_TIMEOUT": "1"}
NGINX_KEEPALIVE = "1s"


class ManyClients:
    """One `node sio_many.mjs URL COUNT`: its milestones awaited as they are printed."""

    def __init__(self, process: asyncio.subprocess.Process, count: int):
        self.process, self.count = process, count
        self.lines: list[dict] = []

    async def _next(self, kind: str, timeout: float) -> dict:
        try:
            async with asyncio.timeout(timeout):
                while True:
                    raw = await self.process.stdout.readline()
                    if not raw:
                        raise AssertionError(f"sio_many exited; lines: {self.lines}")
                    line = json.loads(raw)
                    self.lines.append(line)
                    if line["type"] == kind:
                        return line
        except TimeoutError:
            clients = await self.report()
            raise AssertionError(f"no {kind!r} within {timeout} s: {tally(clients, [])}; "
                                 f"a client: {clients[0]}") from None

    async def milestone(self, kind: str, timeout: float = 30.0) -> None:
        """Once every socket has "connected" or "upgraded" (at least once)."""
        await self._next(kind, timeout)

    async def has(self, ids: list[str], timeout: float = 30.0) -> None:
        """Once every socket has had the ON_RESOLVED_JOB of each of ids."""
        await self._send(f"wait {json.dumps(ids)}")
        await self._next("has", timeout)

    async def report(self) -> list[dict]:
        await self._send("report")
        return (await self._next("report", 10.0))["clients"]

    async def _send(self, line: str) -> None:
        self.process.stdin.write(line.encode() + b"\n")
        await self.process.stdin.drain()


@pytest.fixture
async def many_clients(node_dir):
    started: list[ManyClients] = []

    async def start(url: str, options: dict | None = None, count: int = CLIENTS):
        env = {**os.environ, "SIO_OPTIONS": json.dumps(options or {})}
        process = await asyncio.create_subprocess_exec(
            shutil.which("node"), str(node_dir / "sio_many.mjs"), url, str(count), env=env,
            stdin=asyncio.subprocess.PIPE, stdout=asyncio.subprocess.PIPE,
            limit=2 ** 24)  # a report is one line of every socket's events
        started.append(ManyClients(process, count))
        return started[-1]

    yield start
    for clients in started:
        if clients.process.returncode is None:
            clients.process.kill()
            await clients.process.wait()


def tally(clients: list[dict], ids: list[str]) -> dict:
    """What the issue's table counts, over every socket: those that connected, that
    upgraded, connect_errors, and events of ids missed or had twice."""
    return {"connected": sum(client["connects"] > 0 for client in clients),
            "upgraded": sum(client["upgrades"] > 0 for client in clients),
            "connect_error": sum(len(client["connectErrors"]) for client in clients),
            "missed": sum(len(set(ids) - set(client["resolved"])) for client in clients),
            "twice": sum(len(client["resolved"]) - len(set(client["resolved"]))
                         for client in clients)}


async def post_jobs(url: str, count: int = JOBS) -> list[str]:
    """count new jobs, on a connection of their own (none kept from before a kill)."""
    async with aiohttp.ClientSession(url) as http:
        ids = []
        for _ in range(count):
            async with http.post("/jobs") as response:
                assert response.status == 201, await response.text()
                ids.append((await response.json())["id"])
        return ids


async def served(default: ManyClients, polling: ManyClients, url: str) -> list[str]:
    """Both groups connected (the default one upgraded too), then JOBS jobs every socket
    must get: the issue's measure, asserted. The job ids."""
    await asyncio.gather(default.milestone("connected"), polling.milestone("connected"))
    await default.milestone("upgraded")
    ids = await post_jobs(url)
    await asyncio.gather(default.has(ids), polling.has(ids))
    expected = {"connected": CLIENTS, "connect_error": 0, "missed": 0, "twice": 0}
    assert tally(await default.report(), ids) == {**expected, "upgraded": CLIENTS}
    assert tally(await polling.report(), ids) == {**expected, "upgraded": 0}
    return ids


async def every_event_once(groups: list[ManyClients], ids: list[str]) -> None:
    await asyncio.gather(*(group.has(ids) for group in groups))
    for group in groups:
        counts = tally(await group.report(), ids)
        assert counts["missed"] == counts["twice"] == 0, counts


# --- --workers 4 --------------------------------------------------------------------


async def test_fifty_stock_clients_on_four_workers_and_a_killed_worker(
        redis_env, supervisors, many_clients):
    """Fifty `io(url)` sockets with default options and fifty on polling alone: every
    one connects (and upgrades) with no connect_error and gets every event once, though
    the kernel spreads their requests over four workers. A worker SIGKILLed under them
    (and started again by the supervisor) ends its sessions like dropped connections:
    its clients reconnect through the others and recover exactly what they missed.
    The workers share a NODE_URL too (as on one machine of several): a channel another
    node opens there reaches the worker it names, whichever worker the kernel gave it to."""
    relay_port = free_port()
    env = {**redis_env, "NODE_URL": f"http://127.0.0.1:{relay_port}"}
    supervisor = await supervisors(env, workers=4)
    await supervisor.matches(LISTENING, 4)
    await channels_reach_their_worker(supervisor.url, env)
    default = await many_clients(supervisor.url)
    polling = await many_clients(supervisor.url, POLLING)
    ids = await served(default, polling, supervisor.url)

    victim = min(children(supervisor.process.pid))
    os.kill(victim, signal.SIGKILL)
    await supervisor.matches(re.compile(rf"\(pid {victim}\) exited with -9"), 1)
    ids += await post_jobs(supervisor.url)
    await supervisor.matches(LISTENING, 5)  # its replacement serves beside the others
    ids += await post_jobs(supervisor.url)
    await every_event_once([default, polling], ids)


async def channels_reach_their_worker(url: str, env: dict) -> None:
    """Sessions of two workers; for each, channels opened on the workers' shared relay
    port (each on a connection of its own, so the kernel picks a worker each time) that
    carry a packet for it: the worker holding it takes it ("ok"), wherever it landed."""
    io = "/socket.io/?EIO=4&transport=polling"
    sids: dict[str, str] = {}
    connector = aiohttp.TCPConnector(force_close=True)
    async with aiohttp.ClientSession(connector=connector) as http:
        while len(sids) < 2:
            async with http.get(url + io) as response:
                sid = json.loads((await response.text())[1:])["sid"]
                sids.setdefault(sid[:6], sid)
        secret = await shared_secret(env)
        for tag, sid in sids.items():
            for number in range(8):  # each lands on its owner with a chance of 1 in 4
                async with http.ws_connect(f"{env['NODE_URL']}/relay/{tag}", headers={
                        "X-Jobservice-Relay": opening(secret, tag, int(time.time()))}) as ws:
                    await ws.send_bytes(json.dumps({"op": "post", "sid": sid, "n": number})
                                        .encode() + b"\n2")  # a client's ping
                    head, _, body = (await ws.receive_bytes()).partition(b"\n")
                    assert (json.loads(head)["status"], body) == (200, b"ok"), (head, body)


# --- two nodes behind round-robin nginx ------------------------------------------------


@pytest.fixture
async def cluster(redis_env, tmp_path, nginx):
    """Two nodes on one Redis, each with NODE_URL, behind the README's nginx; the nodes,
    the nginx and the environment, as a dict."""
    env = {**redis_env, **NODE_TIMEOUTS, "TRUSTED_PROXIES": "127.0.0.1"}
    async with running_services(tmp_path / "jobs.json") as start:
        nodes = [await start({**env, "NODE_URL": f"http://127.0.0.1:{free_port()}"})
                 for _ in range(2)]
        proxy = nginx([node.url.removeprefix("http://") for node in nodes], NGINX_KEEPALIVE)
        yield {"nodes": nodes, "nginx": proxy, "env": env}


async def test_fifty_stock_clients_through_round_robin_nginx_and_a_killed_node(
        cluster, many_clients):
    """The same fifty and fifty through nginx over two nodes: as on one process. Then one
    node is SIGKILLed under them: no client misses an event, or gets one twice; and a
    request for one of its sessions, through the other node, is "Session ID unknown" at
    once (its address is still in Redis until its lease ends: the relay finds it dead)."""
    proxy, (first, second) = cluster["nginx"], cluster["nodes"]
    default = await many_clients(proxy.url)
    polling = await many_clients(proxy.url, POLLING)
    ids = await served(default, polling, proxy.url)
    io = "/socket.io/?EIO=4&transport=polling"
    async with aiohttp.ClientSession() as http:
        async with http.get(first.url + io) as response:
            orphan = json.loads((await response.text())[1:])["sid"]

    first.process.kill()
    await first.process.wait()
    async with aiohttp.ClientSession() as http:
        started = time.monotonic()
        async with http.get(f"{second.url}{io}&sid={orphan}") as response:
            assert (response.status, await response.json()) == (
                400, {"code": 1, "message": "Session ID unknown"})
        assert time.monotonic() - started < 1.0
    ids += await post_jobs(second.url)  # not through nginx, which may still try the dead one
    await every_event_once([default, polling], ids)


async def test_the_relay_opens_to_peers_only_and_no_timeout_cuts_a_relayed_poll(cluster):
    """A session made on one node, polled through the other: its CONNECT and its
    long-poll are relayed to the owner. The held poll outlasts every timeout the nodes
    apply to connections (two raw connections are closed by them meanwhile) and is
    answered with the next event. The relay's door opens only with a fresh HMAC of the
    shared secret, and only on its own port; a sid whose owner is gone is Engine.IO's
    "Session ID unknown" at once. Then nginx's pooled connections to the nodes, under
    POST load, never meet a 502 while the nodes close idle ones."""
    owner, other = cluster["nodes"]
    io = "/socket.io/?EIO=4&transport=polling"
    async with aiohttp.ClientSession() as http:
        async with http.get(owner.url + io) as response:
            sid = json.loads((await response.text())[1:])["sid"]
        tag = sid[:6]
        relayed = f"{other.url}{io}&sid={sid}"
        async with http.post(relayed, data="40") as response:
            assert (response.status, await response.text()) == (200, "ok")
        received = ""
        while "SYNCED" not in received:
            async with http.get(relayed) as response:
                assert response.status == 200
                received += await response.text()
        assert received.startswith('40{"sid"') or '\x1e40{"sid"' in received, received

        held = asyncio.ensure_future(http.get(relayed))
        await asyncio.gather(closed_by(other.url), closed_by(owner.url))  # > 1 s each
        assert not held.done()
        [job] = await post_jobs(owner.url, 1)
        async with asyncio.timeout(10):
            response = await held
        assert response.status == 200
        assert f'42["ON_CREATED_JOB",{{"id":"{job}"' in (await response.text())

        for unknown in ("zzzzzz" + sid[6:], tag + "-not-a-session"):
            started = time.monotonic()
            async with http.get(f"{other.url}{io}&sid={unknown}") as response:
                assert response.status == 400
                assert await response.json() == {"code": 1, "message": "Session ID unknown"}
            assert time.monotonic() - started < 1.0

        door = owner.env["NODE_URL"] + f"/relay/{tag}"
        secret = await shared_secret(cluster["env"])
        now = int(time.time())
        for header in (None, f"x {now} {'0' * 64}", opening(secret, tag, now - 120),
                       opening(secret, "zzzzzz", now)):
            headers = {"X-Jobservice-Relay": header} if header else {}
            with pytest.raises(aiohttp.WSServerHandshakeError) as refused:
                await http.ws_connect(door, headers=headers)
            assert refused.value.status == 403
        async with http.ws_connect(door, headers={
                "X-Jobservice-Relay": opening(secret, tag, now)}) as ws:
            assert not ws.closed
        async with http.get(f"{owner.url}/relay/{tag}") as response:
            assert response.status == 404  # not on the clients' port

    await post_load(cluster["nginx"].url, 5.0)
    assert 502 not in cluster["nginx"].statuses()


async def closed_by(url: str) -> None:
    """Open a raw connection that sends nothing, and wait until the node closes it (its
    HEADER_TIMEOUT, seen by its once-a-second sweep)."""
    host, port = url.removeprefix("http://").rsplit(":", 1)
    reader, writer = await asyncio.open_connection(host, int(port))
    try:
        async with asyncio.timeout(10):
            assert await reader.read() == b""
    finally:
        writer.close()


async def shared_secret(env: dict) -> bytes:
    client = aioredis.Redis.from_url(env["REDIS_URL"])
    try:
        return await client.get(env["REDIS_PREFIX"] + "relay:secret")
    finally:
        await client.aclose()


def opening(secret: bytes, tag: str, at: int) -> str:
    """The X-Jobservice-Relay header a peer opens a channel to `tag` with."""
    signature = hmac.new(secret, f"relay {tag} {at}".encode(), hashlib.sha256).hexdigest()
    return f"peer00 {at} {signature}"


async def post_load(url: str, seconds: float) -> None:
    """POST /jobs through nginx for `seconds`: bursts over 32 connections, each followed
    by one connection's worth for 0.5-2 s, so that nginx's pooled connections to the
    nodes keep going idle past its keep-alive timeout and are taken up again. Every
    answer must be a 201."""
    statuses: dict[int, int] = {}
    async with aiohttp.ClientSession(url) as http:
        async def one() -> None:
            async with http.post("/jobs") as response:
                await response.read()
                statuses[response.status] = statuses.get(response.status, 0) + 1

        loop = asyncio.get_running_loop()
        end = loop.time() + seconds
        bursts = 0
        while loop.time() < end:
            await asyncio.gather(*(one() for _ in range(32)))
            trickle = loop.time() + (0.5, 1.25, 2.0)[bursts % 3]
            bursts += 1
            while loop.time() < trickle:
                await one()
    assert set(statuses) == {201}, statuses


@pytest.mark.parametrize(("value", "message"), [
    ("http://10.0.0.5", "is not http://HOST:PORT"),
    ("https://10.0.0.5:3001", "is not http://HOST:PORT"),
    ("http://10.0.0.5:3001/relay", "is not http://HOST:PORT"),
    ("http://10.0.0.5:3000", "port 3000 is PORT's"),
])
def test_a_node_url_that_cannot_be_a_relay_port_stops_start_up(value, message):
    with pytest.raises(jobservice.ConfigError, match=message):
        jobservice.load_settings([], {"REDIS_URL": "redis://127.0.0.1:6379/0",
                                      "NODE_URL": value})
    with pytest.raises(jobservice.ConfigError, match="for nodes sharing one Redis"):
        jobservice.load_settings([], {"NODE_URL": "http://10.0.0.5:3001"})
