"""What a client that does not read can make the service hold, against a real process:
event clients that ask for a long replay and never read it (on /ws, and as Socket.IO
long-polling sessions recovering from an old offset), one that keeps sending frames so
that no heartbeat ever ends it, and a slow reader of the whole job list.

Memory is the service process's RSS growth, with margins: the replay of 5,000 jobs is
about 4 MB of frames per client, which each client held in full before it was read
from the store as the client drained.
"""

from __future__ import annotations

import asyncio
import json
import os
import re
import socket

import aiohttp
from conftest import create_jobs
from test_abuse import address, eventually, rss_bytes

import jobservice

JOBS = 5_000
MB = 1024 * 1024


async def metric(http: aiohttp.ClientSession, url: str, name: str) -> float:
    async with http.get(f"{url}/metrics") as response:
        text = await response.text()
    match = re.search(rf"^{re.escape(name)} (\S+)$", text, re.MULTILINE)
    return float(match.group(1)) if match else 0.0


async def connected(http, url: str, count: int, protocol: str):
    async def enough():
        return await metric(http, url, f'jobservice_peers{{protocol="{protocol}"}}') >= count
    await eventually(f"{count} {protocol} peers are attached", enough, timeout=30)


async def with_finished_jobs(http: aiohttp.ClientSession, url: str, count: int = JOBS):
    """`count` jobs, created 100 at a time, all resolved (so nothing changes after)."""
    async def create():
        async with http.post(f"{url}/jobs") as response:
            assert response.status == 201, await response.text()
    for _ in range(count // 100):
        await asyncio.gather(*(create() for _ in range(100)))

    await all_resolved(http, url)


async def all_resolved(http: aiohttp.ClientSession, url: str) -> int:
    """How many jobs there are, once none is pending."""
    async def resolved():
        async with http.get(f"{url}/jobs/stats") as response:
            stats = await response.json()
        return stats["pending"] == 0 and stats["total"]
    return await eventually("every job resolved", resolved, timeout=120)


async def settled_rss(pid: int) -> int:
    """The most the process held over a second: what its writers queue takes a moment."""
    highest = 0
    for _ in range(10):
        highest = max(highest, rss_bytes(pid))
        await asyncio.sleep(0.1)
    return highest


async def open_slow(url: str) -> tuple[asyncio.StreamReader, asyncio.StreamWriter]:
    """A connection with a small receive window: it reads nothing unless told to."""
    sock = socket.socket()
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
    sock.setblocking(False)
    await asyncio.get_running_loop().sock_connect(sock, address(url))
    return await asyncio.open_connection(sock=sock, limit=4096)


async def stalled_websocket(url: str, path: str) -> asyncio.StreamWriter:
    reader, writer = await open_slow(url)
    writer.write(f"GET {path} HTTP/1.1\r\nHost: localhost\r\nUpgrade: websocket\r\n"
                 "Connection: Upgrade\r\nSec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\n"
                 "Sec-WebSocket-Version: 13\r\n\r\n".encode())
    head = await reader.readuntil(b"\r\n\r\n")
    assert head.startswith(b"HTTP/1.1 101 "), head
    return writer


def text_frame(payload: bytes) -> bytes:
    """A masked text frame, as a client sends it."""
    key = os.urandom(4)
    return (bytes([0x81, 0x80 | len(payload)]) + key
            + bytes(byte ^ key[i % 4] for i, byte in enumerate(payload)))


async def recovering_session(http: aiohttp.ClientSession, url: str) -> str:
    """A long-polling session that recovers from offset 0, then never polls again."""
    async with http.get(f"{url}/socket.io/?EIO=4&transport=polling") as response:
        sid = json.loads((await response.text())[1:])["sid"]
    auth = json.dumps({"pid": os.urandom(12).hex(), "offset": "0"})
    async with http.post(f"{url}/socket.io/?EIO=4&transport=polling&sid={sid}",
                         data=f"40{auth}") as response:
        assert response.status == 200, await response.text()
    return sid


async def test_websockets_that_replay_everything_and_never_read_hold_little(service_process):
    service = await service_process()
    pid = service.process.pid
    async with aiohttp.ClientSession() as http:
        await with_finished_jobs(http, service.url)
        before = await settled_rss(pid)
        sockets = [await stalled_websocket(service.url, "/ws?since=0") for _ in range(30)]
        await connected(http, service.url, 30, "websocket")
        grown = await settled_rss(pid) - before
        print(f"30 non-reading /ws?since=0 over {JOBS} jobs: RSS +{grown / MB:.1f} MB")
        # 3-10 MB measured (a batch of frames and the transport's buffer each); a copy of
        # the replay each was +26 MB here, as loopback's kernel buffers take in the rest.
        assert grown < 20 * MB, f"30 stalled replays held {grown / MB:.0f} MB"
        for writer in sockets:
            writer.transport.abort()


async def test_polling_sessions_that_recover_from_an_old_offset_hold_little(service_process):
    service = await service_process()
    pid = service.process.pid
    async with aiohttp.ClientSession() as http:
        await with_finished_jobs(http, service.url)
        before = await settled_rss(pid)
        for _ in range(60):
            await recovering_session(http, service.url)
        await connected(http, service.url, 60, "socketio_polling")
        grown = await settled_rss(pid) - before
        print(f"60 recovering polling sessions over {JOBS} jobs: RSS +{grown / MB:.1f} MB")
        assert grown < 25 * MB, f"60 unread replays held {grown / MB:.0f} MB"


async def test_a_peer_that_sends_but_never_reads_is_dropped_at_the_drain_deadline(
        service_process):
    service = await service_process({"PEER_DRAIN_TIMEOUT": "2"})
    async with aiohttp.ClientSession() as http:
        await with_finished_jobs(http, service.url)
        writer = await stalled_websocket(service.url, "/ws?since=0")
        sid = await recovering_session(http, service.url)
        await connected(http, service.url, 1, "websocket")
        await connected(http, service.url, 1, "socketio_polling")

        async def keep_talking():
            """What keeps a heartbeat from ever ending them: frames, and pongs; and new
            jobs, for more events than the kernel's socket buffers take in."""
            while True:
                writer.write(text_frame(b"x"))
                for _ in range(20):
                    async with http.post(f"{service.url}/jobs") as response:
                        assert response.status == 201
                async with http.post(f"{service.url}/socket.io/?EIO=4&transport=polling"
                                     f"&sid={sid}", data="3") as response:
                    if response.status != 200:
                        return
                await asyncio.sleep(0.5)

        talking = asyncio.create_task(keep_talking())
        try:
            async def both_dropped():
                dropped = await metric(
                    http, service.url, 'jobservice_peers_dropped_total{reason="drain_timeout"}')
                return dropped == 2
            await eventually("both peers are dropped for not draining", both_dropped, 60)
            for protocol in ("websocket", "socketio_polling"):
                assert await metric(http, service.url,
                                    f'jobservice_peers{{protocol="{protocol}"}}') == 0
            await asyncio.wait_for(talking, 10)  # the session is gone: its POSTs are refused
        finally:
            talking.cancel()
            writer.transport.abort()

        # A client that reads is not dropped, however long its replay took.
        total = await all_resolved(http, service.url)
        async with http.ws_connect(f"{service.url}/ws?since=0") as ws:
            names = []
            while not names or names[-1] != "SYNCED":
                names.append(json.loads((await ws.receive(timeout=10)).data)[0])
            assert len(names) == total + 1
            await asyncio.sleep(3)  # past the deadline, with nothing queued
            async with http.post(f"{service.url}/jobs") as response:
                assert response.status == 201
            assert json.loads((await ws.receive(timeout=10)).data)[0] == "ON_CREATED_JOB"


async def test_a_slow_reader_of_the_job_list_is_cut_off(service_process):
    service = await service_process({"RESPONSE_WRITE_TIMEOUT": "1"})
    async with aiohttp.ClientSession() as http:
        await with_finished_jobs(http, service.url)
        async with http.get(f"{service.url}/jobs") as response:
            whole = len(await response.read())
    reader, writer = await open_slow(service.url)
    # Connection: close, so that a server that sends it all ends the connection too.
    writer.write(b"GET /jobs HTTP/1.1\r\nHost: localhost\r\nConnection: close\r\n\r\n")
    await asyncio.sleep(4)  # a client that reads nothing for a while: the point of the test
    received = b""
    try:
        async with asyncio.timeout(30):
            while chunk := await reader.read(65536):
                received += chunk
    except ConnectionResetError:
        pass
    writer.close()
    assert received.startswith(b"HTTP/1.1 200 ")
    assert not received.endswith(b"]\r\n0\r\n\r\n"), "the whole list was sent"
    assert len(received) < whole


async def test_past_the_total_bound_the_peers_furthest_behind_are_dropped(service_process):
    service = await service_process({"PEERS_MAX_QUEUED_BYTES": str(8 * MB)})
    polling = f"{service.url}/socket.io/?EIO=4&transport=polling"
    async with aiohttp.ClientSession() as http:
        async def session() -> str:
            """A session on the live stream that never polls: its events wait for it."""
            async with http.get(polling) as response:
                sid = json.loads((await response.text())[1:])["sid"]
            async with http.post(f"{polling}&sid={sid}", data="40") as response:
                assert response.status == 200
            return sid

        async def alive(sid: str) -> bool:
            async with http.post(f"{polling}&sid={sid}", data="3") as response:
                return response.status == 200

        sessions = []
        for _ in range(10):  # each joins later than the one before: less to hold
            sessions.append(await session())
            await with_finished_jobs(http, service.url, 200)

        async def oldest_shed():
            """How many were dropped, once they are the oldest ones (the sweep sheds
            each second, so a count read between two sweeps may still grow)."""
            dropped = int(await metric(
                http, service.url, 'jobservice_peers_dropped_total{reason="too_far_behind"}'))
            states = [await alive(sid) for sid in sessions]
            return dropped and states == [False] * dropped + [True] * (len(sessions) - dropped)
        await eventually("the sessions furthest behind are dropped, and only those",
                         oldest_shed, timeout=30)
        assert await alive(sessions[-1])


async def test_a_replay_read_while_jobs_change_and_go_is_exact(start_service, monkeypatch):
    """The replay is read from the store batch by batch, and jobs resolve, are deleted
    and are created between the batches: still every job once, in seq order, up to
    SYNCED, then the live events, and together they are the store's state."""
    monkeypatch.setattr(jobservice, "REPLAY_BATCH", 7)
    monkeypatch.setattr(jobservice, "REPLAY_READ_MAX", 20)
    client = await start_service()
    store, hub = client.app[jobservice.STORE], client.app[jobservice.HUB]

    async def settled():
        async def resolved():
            return (await (await client.get("/jobs/stats")).json())["pending"] == 0
        await eventually("every job resolved", resolved, timeout=30)

    first = await create_jobs(client, 200)
    await settled()
    for job_id in first[::20]:  # deleted before: their deletions are in the replay
        assert (await client.delete(f"/jobs/{job_id}")).status == 204
    await create_jobs(client, 50)  # pending at attach: they resolve during the replay
    peer = jobservice.Peer(jobservice.NativeFrames)
    hub.attach(peer, 0)
    frames = [peer.next_frame() for _ in range(60)]
    by_seq = list(store.jobs)
    for job_id in by_seq[20:50] + by_seq[120:150]:  # half replayed already, half not
        assert (await client.delete(f"/jobs/{job_id}")).status == 204
    await create_jobs(client, 20)
    await settled()
    while (text := peer.next_frame()) is not None:
        frames.append(text)
    hub.detach(peer)

    events = [json.loads(text) for text in frames]
    synced = next(i for i, (name, _) in enumerate(events) if name == "SYNCED")
    replay, live = events[:synced], events[synced + 1:]
    mark = events[synced][1]["seq"]
    replayed = [payload["seq"] for _, payload in replay]
    assert replayed == sorted(set(replayed)) and replayed[-1] <= mark
    assert len({payload["id"] for _, payload in replay}) == len(replay)
    assert {payload["id"] for name, payload in replay if name == "ON_DELETED_JOB"} == set(
        first[::20])
    lived = [payload["seq"] for _, payload in live]
    assert lived == sorted(set(lived)) and lived[0] > mark
    state = {}
    for name, payload in replay + live:
        if name == "ON_DELETED_JOB":
            state.pop(payload["id"], None)
        else:
            state[payload["id"]] = payload["status"]
    listed = await (await client.get("/jobs")).json()
    assert state == {job["id"]: job["status"] for job in listed}
    assert len(state) == 200


async def test_a_replay_whose_deletions_age_out_before_it_is_read_is_ended(start_service):
    """Deletions left to replay that are forgotten meanwhile would be a gap: the peer is
    closed instead, and its reconnection with `since` gets RESET."""
    client = await start_service()
    store, hub = client.app[jobservice.STORE], client.app[jobservice.HUB]
    ids = await create_jobs(client, 5)
    for job_id in ids:
        assert (await client.delete(f"/jobs/{job_id}")).status == 204
    peer = jobservice.Peer(jobservice.NativeFrames)
    hub.attach(peer, 0)
    store.replay_window = 0  # as if the window passed while the peer read nothing
    store.forget_old_tombstones()
    assert peer.next_frame() is None
    assert peer.closing and peer.drop_reason == "too_far_behind"
    hub.detach(peer)
