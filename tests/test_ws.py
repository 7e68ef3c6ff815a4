"""`/ws`: event envelopes, origin rules, replay with `since`, and slow consumers."""

from __future__ import annotations

import asyncio
import base64
import os
import socket

import aiohttp
import pytest
from conftest import create_jobs

import jobservice

SLOW = {"JOB_DELAY_MIN": "30", "JOB_DELAY_MAX": "30"}


async def test_created_and_resolved_events_carry_the_full_job(start_service, open_events):
    client = await start_service()
    events = await open_events(client)
    [job_id] = await create_jobs(client, 1)
    name, created = await events.next()
    assert name == "ON_CREATED_JOB"
    assert created["id"] == job_id and created["status"] == "pending"
    name, resolved = await events.next()
    assert name == "ON_RESOLVED_JOB"
    assert resolved["status"] == "resolved" and resolved["result"].startswith("https://")
    assert resolved["seq"] > created["seq"]
    assert resolved == await (await client.get(f"/jobs/{job_id}")).json()


async def test_every_connected_client_gets_every_event(start_service, open_events):
    client = await start_service(SLOW)
    streams = [await open_events(client) for _ in range(5)]
    ids = await create_jobs(client, 3)
    for stream in streams:
        got = [(await stream.next())[1]["id"] for _ in ids]
        assert got == ids


async def test_foreign_origins_are_refused_before_the_upgrade(start_service, open_events):
    client = await start_service()
    with pytest.raises(aiohttp.WSServerHandshakeError) as refused:
        await open_events(client, headers={"Origin": "https://evil.example"})
    assert refused.value.status == 403
    own = f"http://{client.server.host}:{client.server.port}"
    await open_events(client, headers={"Origin": own})
    await open_events(client)  # scripts send no Origin at all


async def test_origins_listed_in_cors_origins_may_connect(start_service, open_events):
    client = await start_service({"CORS_ORIGINS": "https://app.example"})
    await open_events(client, headers={"Origin": "https://app.example"})
    with pytest.raises(aiohttp.WSServerHandshakeError):
        await open_events(client, headers={"Origin": "https://other.example"})


async def test_malformed_since_is_a_400_before_the_upgrade(start_service):
    client = await start_service()
    for since in ["abc", "-1", "1.5", "9" * 40]:
        response = await client.get(f"/ws?since={since}")
        assert response.status == 400, since
        assert (await response.json())["error"]["code"] == "invalid_parameter"


async def test_since_replays_what_changed_then_synced_then_live(start_service, open_events):
    client = await start_service(SLOW)
    ids = await create_jobs(client, 4)
    listing = await client.get("/jobs")
    seq = int(listing.headers["X-Jobs-Seq"])
    more = await create_jobs(client, 2)

    events = await open_events(client, f"?since={seq}")
    replay = [await events.next() for _ in more]
    assert [job["id"] for _, job in replay] == more
    assert all(name == "ON_CREATED_JOB" for name, _ in replay)
    assert await events.next() == ("SYNCED", {"seq": seq + 2})
    [live] = await create_jobs(client, 1)
    name, job = await events.next()
    assert (name, job["id"], job["seq"]) == ("ON_CREATED_JOB", live, seq + 3)

    everything = await open_events(client, "?since=0")
    names_ids = [await everything.next() for _ in ids + more + [live]]
    assert [job["id"] for _, job in names_ids] == ids + more + [live]
    assert (await everything.next())[0] == "SYNCED"


async def test_replay_and_live_events_have_no_gap_and_no_duplicate(start_service, open_events):
    client = await start_service({"JOB_DELAY_MIN": "0.05", "JOB_DELAY_MAX": "0.5",
                                  "JOB_DELAY_STEP": "0.01"})
    ids = await create_jobs(client, 150)
    # Connect while they resolve: part arrives as replay, the rest as live events.
    events = await open_events(client, "?since=0")
    states, last_seq = {}, 0
    async with asyncio.timeout(20):
        while sum(job["status"] == "resolved" for job in states.values()) < len(ids):
            name, payload = await events.next()
            if name == "SYNCED":
                assert payload["seq"] >= last_seq
                continue
            assert payload["seq"] > last_seq, "an event came twice or out of order"
            last_seq = payload["seq"]
            states[payload["id"]] = payload
    assert set(states) == set(ids)


async def test_since_above_the_counter_asks_for_a_reset(start_service, open_events):
    client = await start_service(SLOW)
    await create_jobs(client, 2)
    events = await open_events(client, "?since=999")
    assert await events.next() == ("RESET", {"seq": 2})
    [job_id] = await create_jobs(client, 1)
    assert (await events.next())[1]["id"] == job_id


async def test_binary_and_oversized_frames_close_the_socket(start_service, open_events):
    client = await start_service()
    events = await open_events(client)
    await events.ws.send_bytes(b"\x00\x01")
    closing = await events.ws.receive(timeout=5)
    assert closing.type == aiohttp.WSMsgType.CLOSE and closing.data == 1003

    events = await open_events(client)
    await events.ws.send_str("x" * (jobservice.WS_MAX_MESSAGE + 1))
    closing = await events.ws.receive(timeout=5)
    assert closing.type == aiohttp.WSMsgType.CLOSE and closing.data == 1009
    assert (await client.get("/healthz")).status == 200


def open_stalled_socket(host: str, port: int) -> socket.socket:
    """A WebSocket client that completes the handshake and then never reads, with a
    tiny receive buffer so the kernel cannot absorb the backlog on its behalf."""
    sock = socket.socket()
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
    sock.connect((host, port))
    key = base64.b64encode(os.urandom(16)).decode()
    sock.sendall((f"GET /ws HTTP/1.1\r\nHost: {host}:{port}\r\nUpgrade: websocket\r\n"
                  f"Connection: Upgrade\r\nSec-WebSocket-Key: {key}\r\n"
                  "Sec-WebSocket-Version: 13\r\n\r\n").encode())
    head = b""
    while b"\r\n\r\n" not in head:
        head += sock.recv(1)
    assert head.startswith(b"HTTP/1.1 101"), head
    return sock


async def test_a_client_that_stops_reading_is_dropped_and_delays_no_one(
        start_service, open_events, monkeypatch):
    monkeypatch.setattr(jobservice, "PEER_BACKLOG_BYTES", 64 * 1024)
    client = await start_service(SLOW)
    hub = client.app[jobservice.HUB]
    reader = await open_events(client)
    stalled = await asyncio.to_thread(open_stalled_socket, client.server.host,
                                      client.server.port)
    try:
        async with asyncio.timeout(5):
            # The server offers no event for a peer joining or leaving: poll for it.
            while len(hub.peers) < 2:  # noqa: ASYNC110
                await asyncio.sleep(0.01)
        stalled_peer = next(peer for peer in hub.peers
                            if peer.transport.get_extra_info("peername") == stalled.getsockname())
        # A slow link: without this the kernel would absorb megabytes before our bound.
        server_socket = stalled_peer.transport.get_extra_info("socket")
        server_socket.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, 4096)
        sent = 0
        async with asyncio.timeout(60):
            while not stalled_peer.closing:
                ids = await asyncio.gather(*(client.post("/jobs") for _ in range(50)))
                assert all(response.status == 201 for response in ids)
                sent += 50
                # The reader keeps up the whole time: everything sent so far arrives.
                for _ in range(50):
                    await reader.next(timeout=5)
                assert stalled_peer.queued_bytes <= jobservice.PEER_BACKLOG_BYTES
        assert stalled_peer.queued_bytes == 0
        assert sent <= 5000, "the stalled peer was kept long past its bound"
        async with asyncio.timeout(10):
            while stalled_peer in hub.peers:  # noqa: ASYNC110
                await asyncio.sleep(0.05)
    finally:
        stalled.close()
    assert (await client.get("/healthz")).status == 200


async def test_shutdown_closes_sockets_with_1001(start_service, open_events):
    client = await start_service()
    events = await open_events(client)
    await client.server.close()
    closing = await events.ws.receive(timeout=5)
    assert closing.type == aiohttp.WSMsgType.CLOSE and closing.data == 1001
