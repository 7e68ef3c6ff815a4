"""Engine.IO v4 long-polling on /socket.io/, and its upgrade to a WebSocket: the wire read
raw (handshake, long-poll, POSTed packets, pings, close, every Engine.IO error, CORS, the
bounds), then stock clients with their default options: npm `socket.io-client` (over
polling, upgraded, and stuck on polling with a recovery) and `python-socketio`.

Every wait is on something happening; the one bounded wait that expects nothing checks
that a long-poll is held open.
"""

from __future__ import annotations

import asyncio
import collections
import gc
import json
import logging
import tracemalloc

import aiohttp
import pytest
import socketio
from conftest import create_jobs

import jobservice

POLLING = "/socket.io/?EIO=4&transport=polling"
CREATED, RESOLVED = "ON_CREATED_JOB", "ON_RESOLVED_JOB"
ALLOWED = "http://localhost:5173"


# --- The wire, raw -----------------------------------------------------------------------


async def handshake(client, headers=None) -> dict:
    response = await client.get(f"{POLLING}&t=a1", headers=headers)
    assert response.status == 200, await response.text()
    assert response.headers["Content-Type"] == "text/plain; charset=UTF-8"
    body = await response.text()
    assert body.startswith("0{"), body
    return json.loads(body[1:])


async def poll(client, sid: str) -> list[str]:
    response = await client.get(f"{POLLING}&sid={sid}")
    assert response.status == 200, await response.text()
    return (await response.text()).split("\x1e")


async def post(client, sid: str, *packets: str) -> aiohttp.ClientResponse:
    return await client.post(f"{POLLING}&sid={sid}", data="\x1e".join(packets),
                             headers={"Content-Type": "text/plain;charset=UTF-8"})


async def refused(response: aiohttp.ClientResponse, status: int, code: int) -> str:
    assert response.status == status, await response.text()
    body = await response.json()
    assert body["code"] == code, body
    return body["message"]


async def eventually(predicate, limit: float = 5.0) -> None:
    """Until a condition inside the server holds (a poll arrived, a session expired):
    it raises no event a test could await."""
    async with asyncio.timeout(limit):
        while not predicate():  # noqa: ASYNC110
            await asyncio.sleep(0.005)


def event(packet: str) -> tuple[str, dict, str]:
    assert packet.startswith("42["), packet
    name, payload, offset = json.loads(packet[2:])
    return name, payload, offset


class Poller:
    """A polling Socket.IO client made of plain requests: it answers pings and keeps
    every event it is sent."""

    def __init__(self, client, sid: str):
        self.client, self.sid = client, sid
        self.events: list[tuple[str, dict, str]] = []
        self.packets: list[str] = []
        self.unread: collections.deque[str] = collections.deque()  # polled, not looked at

    async def connect(self, auth: dict | None = None) -> dict:
        """CONNECT; the reply's payload, once the replay that follows it is in (up to its
        SYNCED or RESET). The reply comes first: until it, a client has no namespace for
        an event."""
        response = await post(self.client, self.sid, "40" + json.dumps(auth or {}))
        assert await response.text() == "ok"
        reply = await self.until(lambda packet: packet.startswith("40"))
        assert not self.events, f"before the CONNECT reply: {self.events}"
        await self.until(lambda packet: packet.startswith(('42["SYNCED"', '42["RESET"')))
        return reply

    async def until(self, predicate, limit: float = 10.0):
        async with asyncio.timeout(limit):
            while True:
                if not self.unread:
                    self.unread.extend(await poll(self.client, self.sid))
                packet = self.unread.popleft()
                self.packets.append(packet)
                if packet == "2":
                    assert await (await post(self.client, self.sid, "3")).text() == "ok"
                elif packet.startswith("42"):
                    self.events.append(event(packet))
                if predicate(packet):
                    return json.loads(packet[2:]) if packet.startswith("40") else packet

    async def resolutions(self, ids) -> dict[str, dict]:
        wanted = set(ids)

        def resolved() -> dict[str, dict]:
            return {job["id"]: job for name, job, _ in self.events
                    if name == RESOLVED and job["id"] in wanted}

        if len(resolved()) < len(wanted):
            await self.until(lambda packet: len(resolved()) == len(wanted))
        return resolved()


async def test_handshake_offers_the_upgrade(start_service):
    client = await start_service()
    opened = await handshake(client)
    assert set(opened) == {"sid", "upgrades", "pingInterval", "pingTimeout", "maxPayload"}
    assert opened["upgrades"] == ["websocket"]
    assert (opened["pingInterval"], opened["pingTimeout"], opened["maxPayload"]) == (
        25000, 20000, 1000000)
    assert len(opened["sid"]) >= 16
    assert (await handshake(client))["sid"] != opened["sid"]


async def test_connect_then_events_with_their_offsets_in_one_body_each(start_service):
    client = await start_service()
    sid = (await handshake(client))["sid"]
    poller = Poller(client, sid)
    reply = await poller.connect()
    assert set(reply) == {"sid", "pid"}
    seq = client.server.app[jobservice.STORE].seq
    assert poller.events == [("SYNCED", {"seq": seq}, str(seq))]  # after the reply

    ids = await create_jobs(client, 3)
    final = await poller.resolutions(ids)
    assert sorted((name, job["id"]) for name, job, _ in poller.events[1:]) == sorted(
        [(CREATED, i) for i in ids] + [(RESOLVED, i) for i in ids])
    for name, job, offset in poller.events[1:]:
        assert offset == str(job["seq"])
        if name == RESOLVED:
            assert job == final[job["id"]] and job["status"] == "resolved"


async def test_several_packets_in_one_post(start_service):
    client = await start_service()
    sid = (await handshake(client))["sid"]
    poller = Poller(client, sid)
    await poller.connect()
    response = await post(client, sid, "6", '42["hello","world"]', "3", "2")
    assert response.status == 200 and await response.text() == "ok"
    [job_id] = await create_jobs(client, 1)
    await poller.resolutions([job_id])


async def test_a_long_poll_is_held_until_there_is_something_to_send(start_service):
    client = await start_service()
    sid = (await handshake(client))["sid"]
    poller = Poller(client, sid)
    await poller.connect()
    waiting = asyncio.create_task(poll(client, sid))
    done, _ = await asyncio.wait([waiting], timeout=0.3)
    assert not done, f"a poll with nothing to send was answered: {waiting.result()}"
    [job_id] = await create_jobs(client, 1)
    [packet] = await asyncio.wait_for(waiting, 5)
    name, job, _ = event(packet)
    assert (name, job["id"]) == (CREATED, job_id)


async def test_recovery_over_polling_replays_what_was_missed(start_service, open_events):
    client = await start_service()
    first = Poller(client, (await handshake(client))["sid"])
    reply = await first.connect()
    [a] = await create_jobs(client, 1)
    await first.until(lambda packet: packet.startswith("42") and CREATED in packet)
    offset = first.events[-1][2]
    assert await (await post(client, first.sid, "1")).text() == "ok"

    watcher = await open_events(client, f"?since={offset}")
    b, c = await create_jobs(client, 2)
    final = await watcher.resolutions({a, b, c})

    again = Poller(client, (await handshake(client))["sid"])
    assert await again.connect({"pid": reply["pid"], "offset": offset}) == reply
    *missed, synced = again.events
    assert sorted(job["id"] for _, job, _ in missed) == sorted([a, b, c])
    assert all(name == RESOLVED and job == final[job["id"]] for name, job, _ in missed)
    assert synced[0] == "SYNCED"


@pytest.mark.parametrize("method", ["POST", "PUT"])
async def test_a_handshake_that_is_not_a_get(start_service, method):
    client = await start_service()
    response = await client.request(method, POLLING)
    assert await refused(response, 400, 2) == "Bad handshake method"


@pytest.mark.parametrize("method", ["GET", "POST"])
async def test_an_unknown_sid(start_service, method):
    client = await start_service()
    response = await client.request(method, f"{POLLING}&sid=nosuchsession")
    assert await refused(response, 400, 1) == "Session ID unknown"


@pytest.mark.parametrize("eio", ["3", "5", ""])
async def test_an_engineio_version_other_than_4(start_service, eio):
    client = await start_service()
    response = await client.get(f"/socket.io/?EIO={eio}&transport=polling")
    assert await refused(response, 400, 5) == "Unsupported protocol version"
    sid = (await handshake(client))["sid"]
    response = await client.get(f"/socket.io/?EIO={eio}&transport=polling&sid={sid}")
    await refused(response, 400, 5)


@pytest.mark.parametrize("body", ["9", "b4AQID", "40/admin\x1e42[", "\xff"])
async def test_a_bad_packet_is_a_bad_request_and_ends_the_session(start_service, body):
    client = await start_service()
    sid = (await handshake(client))["sid"]
    await post(client, sid, "40")
    if body == "\xff":
        response = await client.post(f"{POLLING}&sid={sid}", data=b"40\xff")
    else:
        response = await post(client, sid, body)
    assert await refused(response, 400, 3) == "Bad request"
    await refused(await client.get(f"{POLLING}&sid={sid}"), 400, 1)


async def waiting_poll(client) -> tuple[str, asyncio.Task]:
    """A connected session and a long-poll of it that the server is holding."""
    sid = (await handshake(client))["sid"]
    await Poller(client, sid).connect()
    task = asyncio.create_task(poll(client, sid))
    await eventually(lambda: client.server.app[jobservice.ENGINE].sessions[sid].polled)
    return sid, task


async def test_a_second_concurrent_poll_ends_the_session(start_service):
    client = await start_service()
    sid, first = await waiting_poll(client)
    await refused(await client.get(f"{POLLING}&sid={sid}"), 400, 3)
    assert await asyncio.wait_for(first, 5) == ["1"]  # the session closed under it
    await refused(await client.get(f"{POLLING}&sid={sid}"), 400, 1)


async def test_a_body_over_max_payload_gets_413_and_ends_the_session(start_service):
    client = await start_service()
    sid = (await handshake(client))["sid"]
    response = await post(client, sid, "4" + "x" * 1_000_000)
    assert response.status == 413
    assert (await response.json())["code"] == 3
    await refused(await client.get(f"{POLLING}&sid={sid}"), 400, 1)


async def test_the_client_closes_and_a_waiting_poll_gets_a_noop(start_service):
    client = await start_service()
    sid, waiting = await waiting_poll(client)
    assert await (await post(client, sid, "1")).text() == "ok"
    assert await asyncio.wait_for(waiting, 5) == ["6"]
    await refused(await client.get(f"{POLLING}&sid={sid}"), 400, 1)
    assert sid not in client.server.app[jobservice.ENGINE].sessions


QUICK_PINGS = {"PING_INTERVAL": "0.1", "PING_TIMEOUT": "0.2"}


async def test_server_pings_and_ends_a_session_that_does_not_pong(start_service):
    client = await start_service(QUICK_PINGS)
    opened = await handshake(client)
    assert (opened["pingInterval"], opened["pingTimeout"]) == (100, 200)
    sid = opened["sid"]
    poller = Poller(client, sid)
    await poller.connect()
    for _ in range(3):  # answered (by Poller.until), so pinged again
        await poller.until(lambda packet: packet == "2")
    assert await poll(client, sid) == ["2"]  # not answered this time...
    assert await poll(client, sid) == ["1"]  # ... so closed after pingTimeout
    await refused(await client.get(f"{POLLING}&sid={sid}"), 400, 1)


async def test_a_session_that_stops_polling_expires(start_service):
    """Nothing waits on the session, so only the sweep can end it: within
    pingInterval + pingTimeout (plus a sweep period), with no task of its own."""
    client = await start_service(QUICK_PINGS)
    engine = client.server.app[jobservice.ENGINE]
    sid = (await handshake(client))["sid"]
    await post(client, sid, "40")
    tasks_before = len(asyncio.all_tasks())
    assert sid in engine.sessions
    await eventually(lambda: sid not in engine.sessions, 2)
    assert len(asyncio.all_tasks()) <= tasks_before
    await refused(await client.get(f"{POLLING}&sid={sid}"), 400, 1)


async def test_a_session_too_far_behind_is_closed_and_recovers(start_service, monkeypatch):
    """The jobs stay pending, so the only events are their ten creations: the first
    session cannot hold them, and the recovered one is replayed them within the same
    bound, a few at a time as it polls."""
    monkeypatch.setattr(jobservice, "PEER_BACKLOG_BYTES", 1500)
    client = await start_service({"JOB_DELAY_MIN": "60", "JOB_DELAY_MAX": "60"})
    sid = (await handshake(client))["sid"]
    reply = await Poller(client, sid).connect()
    ids = await create_jobs(client, 10)  # ten ~250-byte events, none taken
    # Gone: the client's next poll fails, and it reconnects with its pid and offset.
    await refused(await client.get(f"{POLLING}&sid={sid}"), 400, 1)

    again = Poller(client, (await handshake(client))["sid"])
    offset = str(client.server.app[jobservice.STORE].jobs[ids[0]].seq - 1)
    assert await again.connect({"pid": reply["pid"], "offset": offset}) == reply
    replayed = [(name, job["id"]) for name, job, _ in again.events if name != "SYNCED"]
    assert replayed == [(CREATED, job_id) for job_id in ids]


# --- Upgrade to a WebSocket -----------------------------------------------------------------


async def test_upgrade_releases_the_poll_then_events_come_over_the_websocket(start_service):
    client = await start_service()
    sid = (await handshake(client))["sid"]
    poller = Poller(client, sid)
    await poller.connect()
    waiting = asyncio.create_task(poll(client, sid))

    ws = await client.ws_connect(f"/socket.io/?EIO=4&transport=websocket&sid={sid}")
    await ws.send_str("2probe")
    assert (await ws.receive(timeout=5)).data == "3probe"
    assert await asyncio.wait_for(waiting, 5) == ["6"]  # the paused poll is released
    [before] = await create_jobs(client, 1)  # while the client pauses polling
    await ws.send_str("5")

    name, job, _ = event((await ws.receive(timeout=5)).data)
    assert (name, job["id"]) == (CREATED, before)
    [after] = await create_jobs(client, 1)
    seen = {before: [], after: []}
    while len(seen[before]) < 1 or len(seen[after]) < 2:
        frame = (await ws.receive(timeout=5)).data
        if frame == "2":
            continue
        name, job, _ = event(frame)
        seen[job["id"]].append(name)
    assert seen == {before: [RESOLVED], after: [CREATED, RESOLVED]}

    # Upgraded: polling with that sid is a transport mismatch, and so is a second socket.
    await refused(await client.get(f"{POLLING}&sid={sid}"), 400, 3)
    with pytest.raises(aiohttp.WSServerHandshakeError) as second:
        await client.ws_connect(f"/socket.io/?EIO=4&transport=websocket&sid={sid}")
    assert second.value.status == 400
    await ws.close()


async def test_a_failed_probe_leaves_the_session_on_polling(start_service):
    client = await start_service()
    sid = (await handshake(client))["sid"]
    poller = Poller(client, sid)
    await poller.connect()
    ws = await client.ws_connect(f"/socket.io/?EIO=4&transport=websocket&sid={sid}")
    await ws.send_str("2nonsense")
    assert (await ws.receive(timeout=5)).type in (aiohttp.WSMsgType.CLOSE,
                                                  aiohttp.WSMsgType.CLOSED)
    [job_id] = await create_jobs(client, 1)
    await poller.resolutions([job_id])


# --- CORS and the bounds -----------------------------------------------------------------


async def test_cors_for_a_listed_origin_allows_credentials(start_service):
    client = await start_service({"CORS_ORIGINS": ALLOWED})
    preflight = await client.options(POLLING, headers={
        "Origin": ALLOWED, "Access-Control-Request-Method": "POST",
        "Access-Control-Request-Headers": "content-type"})
    assert preflight.status == 204
    assert preflight.headers["Access-Control-Allow-Origin"] == ALLOWED
    assert preflight.headers["Access-Control-Allow-Credentials"] == "true"
    assert "POST" in preflight.headers["Access-Control-Allow-Methods"]

    response = await client.get(POLLING, headers={"Origin": ALLOWED})
    assert response.status == 200
    assert response.headers["Access-Control-Allow-Origin"] == ALLOWED
    assert response.headers["Access-Control-Allow-Credentials"] == "true"
    sid = json.loads((await response.text())[1:])["sid"]
    response = await client.post(f"{POLLING}&sid={sid}", data="40",
                                 headers={"Origin": ALLOWED})
    assert response.headers["Access-Control-Allow-Origin"] == ALLOWED


async def test_a_wildcard_allows_any_origin_without_credentials(start_service):
    client = await start_service({"CORS_ORIGINS": "*"})
    response = await client.get(POLLING, headers={"Origin": "https://any.example"})
    assert response.status == 200
    assert response.headers["Access-Control-Allow-Origin"] == "*"
    assert "Access-Control-Allow-Credentials" not in response.headers


async def test_a_refused_origin_is_told_what_to_set_and_logged_once(start_service, caplog):
    client = await start_service({"CORS_ORIGINS": "https://other.example"})
    engine = client.server.app[jobservice.ENGINE]
    caplog.set_level(logging.WARNING, "jobservice")
    for _ in range(3):
        response = await client.get(POLLING, headers={"Origin": ALLOWED})
        assert await refused(response, 403, 4) == (
            f"origin {ALLOWED} is not allowed; add it to CORS_ORIGINS")
    preflight = await client.options(POLLING, headers={
        "Origin": ALLOWED, "Access-Control-Request-Method": "POST"})
    assert preflight.status == 403
    assert "Access-Control-Allow-Origin" not in preflight.headers
    assert not engine.sessions  # nothing was opened for it
    warnings = [r.getMessage() for r in caplog.records if ALLOWED in r.getMessage()]
    assert len(warnings) == 1 and "CORS_ORIGINS" in warnings[0], warnings
    # A packet POSTed from that origin into a session changes nothing either.
    sid = (await handshake(client))["sid"]
    response = await client.post(f"{POLLING}&sid={sid}", data="1",
                                 headers={"Origin": ALLOWED})
    await refused(response, 403, 4)
    assert sid in engine.sessions


async def test_a_flood_of_abandoned_handshakes_stays_bounded(start_service, http, monkeypatch):
    """Handshakes that never come back: the registry stops at the cap, and what the
    service holds for them (every allocation made under jobservice.py) stops growing.
    (A cap of 300 rather than 1,000 only to keep the traced run short.)"""
    monkeypatch.setattr(jobservice, "EIO_MAX_HALF_OPEN", 300)
    client = await start_service({"HALF_OPEN_SESSIONS_PER_ADDRESS": "300"})  # all from one
    engine = client.server.app[jobservice.ENGINE]
    cap = jobservice.EIO_MAX_HALF_OPEN
    url = f"http://{client.host}:{client.port}{POLLING}"

    async def flood(count: int) -> int:
        for _ in range(count):
            async with http.get(url) as response:
                assert (await response.text()).startswith("0{")
        gc.collect()
        snapshot = tracemalloc.take_snapshot().filter_traces(
            [tracemalloc.Filter(True, jobservice.__file__, all_frames=True)])
        return sum(trace.size for trace in snapshot.traces)

    tracemalloc.start(12)
    try:
        at_cap = await flood(cap)
        past_cap = await flood(2 * cap)
    finally:
        tracemalloc.stop()
    assert len(engine.sessions) == len(engine.half_open) == cap
    live = sum(isinstance(o, jobservice.EngineIOSession) and o.engine is engine
               for o in gc.get_objects())  # this service's: an earlier test's may linger
    assert live == cap
    assert past_cap - at_cap < 32 * 1024, (at_cap, past_cap)
    # The newest handshakes are the ones kept, and real clients are served as usual.
    sid = (await handshake(client))["sid"]
    poller = Poller(client, sid)
    await poller.connect()
    [job_id] = await create_jobs(client, 1)
    await poller.resolutions([job_id])


async def test_connected_polling_sessions_have_a_cap(start_service, monkeypatch):
    monkeypatch.setattr(jobservice, "EIO_MAX_POLLING_SESSIONS", 5)
    client = await start_service()
    for _ in range(5):
        await post(client, (await handshake(client))["sid"], "40")
    response = await client.get(POLLING)
    assert response.status == 503 and response.headers["Retry-After"]
    assert (await response.json())["code"] == 3
    # One waiting for its CONNECT gives way to a new handshake.
    monkeypatch.setattr(jobservice, "EIO_MAX_POLLING_SESSIONS", 6)
    waiting = (await handshake(client))["sid"]
    newest = (await handshake(client))["sid"]
    engine = client.server.app[jobservice.ENGINE]
    assert waiting not in engine.sessions and newest in engine.sessions


# --- Stock clients with their default options ----------------------------------------------


async def test_node_client_with_default_options_polls_then_upgrades(
        service_process, node_client, http):
    service = await service_process()
    node = await node_client(service.url, {"transports": "default"})
    opened = await node.until(lambda line: line["type"] == "open")
    assert opened["transport"] == "polling"
    assert (await node.connected())["recovered"] is False
    # The upgrade races the answer to CONNECT: either may be printed first.
    upgrade = await node.until(lambda line: line["type"] == "upgrade", since=0)
    assert upgrade["transport"] == "websocket"

    ids = await create_jobs_over(http, service.url, 3)
    for job_id in ids:
        await node.event(RESOLVED, job_id)
    [marker] = await create_jobs_over(http, service.url, 1)
    await node.event(CREATED, marker)
    events = [(line["name"], line["job"]["id"]) for line in node.lines
              if line["type"] == "event" and line["name"] in (CREATED, RESOLVED)
              and line["job"]["id"] in ids]
    assert sorted(events) == sorted([(CREATED, i) for i in ids] + [(RESOLVED, i) for i in ids])
    assert await node.quit() == 0


async def test_node_client_on_polling_only_recovers_after_the_engine_closes(
        service_process, node_client, tcp_proxy, open_events, http):
    service = await service_process({"JOB_DELAY_MIN": "1", "JOB_DELAY_MAX": "1"})
    proxy = await tcp_proxy(int(service.url.rsplit(":", 1)[1]))
    node = await node_client(proxy.url, {"transports": ["polling"]})
    hello = await node.connected()
    assert hello["transport"] == "polling"
    [a] = await create_jobs_over(http, service.url, 1)
    created = await node.event(CREATED, a)

    proxy.close_gate()  # the client stays away until what it missed has happened
    await node.send("cut")
    assert (await node.until(lambda line: line["type"] == "disconnect"))["reason"] == \
        "forced close"
    away = len(node.lines)
    watcher = await open_events(service.url, f"?since={created['offset']}")
    b, c = await create_jobs_over(http, service.url, 2)
    final = await watcher.resolutions({a, b, c})
    proxy.open_gate()

    back = await node.connected()
    assert back == {"type": "connect", "recovered": True, "id": hello["id"],
                    "transport": "polling"}
    [marker] = await create_jobs_over(http, service.url, 1)
    await node.event(CREATED, marker)
    after = [line for line in node.lines[away:] if line["type"] == "event"
             and line["name"] in (CREATED, RESOLVED) and line["job"]["id"] in final]
    assert sorted(line["job"]["id"] for line in after) == sorted(final)
    assert all(line["name"] == RESOLVED and line["job"] == final[line["job"]["id"]]
               and line["offset"] == str(line["job"]["seq"]) for line in after)
    assert await node.quit() == 0


async def create_jobs_over(http: aiohttp.ClientSession, base: str, count: int) -> list[str]:
    ids = []
    for _ in range(count):
        async with http.post(f"{base}/jobs") as response:
            assert response.status == 201, await response.text()
            ids.append((await response.json())["id"])
    return ids


async def test_python_client_with_default_transports(start_service):
    client = await start_service()
    sio = socketio.AsyncClient(reconnection=False, handle_sigint=False)
    received: asyncio.Queue = asyncio.Queue()

    @sio.on("*")
    async def any_event(name, *args):
        received.put_nowait((name, args))

    await sio.connect(f"http://{client.host}:{client.port}")
    try:
        assert sio.transport() == "websocket"  # upgraded from polling
        [job_id] = await create_jobs(client, 1)
        seen = []
        async with asyncio.timeout(10):
            while (RESOLVED, job_id) not in seen:
                name, args = await received.get()
                if name in (CREATED, RESOLVED):
                    assert args[1] == str(args[0]["seq"])
                    seen.append((name, args[0]["id"]))
        assert seen == [(CREATED, job_id), (RESOLVED, job_id)]
    finally:
        await sio.disconnect()
