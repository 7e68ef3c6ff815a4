"""Socket.IO on /socket.io/: the Engine.IO v4 / Socket.IO v5 wire format read raw, then
clients nobody here wrote: the npm `socket.io-client` (tests/node/sio_client.mjs, run by
Node) and the `python-socketio` AsyncClient, including connection state recovery after a
server restart and after a network cut.

Every wait is on something happening (a frame, a line, an event); nothing sleeps.
"""

from __future__ import annotations

import asyncio
import json
import time
from datetime import datetime
from urllib.parse import urlsplit

import aiohttp
import pytest
import socketio

import jobservice

SIO_PATH = "/socket.io/?EIO=4&transport=websocket"
CREATED, RESOLVED = "ON_CREATED_JOB", "ON_RESOLVED_JOB"
SLOW_JOBS = {"JOB_DELAY_MIN": "1", "JOB_DELAY_MAX": "1"}  # pending across a restart
UPGRADE = {"Connection": "Upgrade", "Upgrade": "websocket", "Sec-WebSocket-Version": "13",
           "Sec-WebSocket-Key": "dGhlIHNhbXBsZSBub25jZQ=="}  # a handshake, read as plain HTTP


# --- Raw Engine.IO / Socket.IO frames --------------------------------------------------


async def eio_open(client, path: str = SIO_PATH):
    """Open the WebSocket; (ws, the open packet's payload)."""
    ws = await client.ws_connect(path)
    first = await ws.receive(timeout=5)
    assert first.type == aiohttp.WSMsgType.TEXT, (first.type, first.data)
    assert first.data.startswith("0{"), first.data
    return ws, json.loads(first.data[1:])


async def text_frame(ws, limit: float = 5.0) -> str:
    message = await ws.receive(timeout=limit)
    assert message.type == aiohttp.WSMsgType.TEXT, (message.type, message.data)
    return message.data


def event(frame: str) -> tuple[str, dict, str]:
    """`42["NAME",payload,"offset"]` (main namespace, no ack id) -> (name, payload, offset)."""
    assert frame.startswith("42["), frame
    data = json.loads(frame[2:])
    assert isinstance(data, list) and len(data) == 3, frame
    name, payload, offset = data
    assert isinstance(name, str) and isinstance(payload, dict), frame
    assert isinstance(offset, str), f"the offset must be a string: {frame}"
    return name, payload, offset


async def sio_connect(ws, auth: dict | None = None):
    """Send CONNECT; (the reply's payload, the replay that follows it up to its SYNCED or
    RESET). The reply comes first: until it, a client has no namespace for an event."""
    await ws.send_str("40" if auth is None else "40" + json.dumps(auth))
    reply, replay = None, []
    while not replay or replay[-1][0] not in ("SYNCED", "RESET"):
        frame = await text_frame(ws)
        if frame == "2":  # a server ping, due from the open packet on
            await ws.send_str("3")
        elif reply is None:
            assert frame.startswith("40{"), f"before the CONNECT reply: {frame}"
            reply = json.loads(frame[2:])
        else:
            replay.append(event(frame))
    return reply, replay


async def next_event(ws, limit: float = 10.0) -> tuple[str, dict, str]:
    while True:
        frame = await text_frame(ws, limit)
        if frame == "2":  # a server ping: answer it like a client does
            await ws.send_str("3")
            continue
        return event(frame)


async def closed(ws, limit: float = 5.0) -> aiohttp.WSMessage:
    """Read until the server closes; the close message. Events on the way are fine."""
    async with asyncio.timeout(limit):
        while True:
            message = await ws.receive()
            if message.type in (aiohttp.WSMsgType.CLOSE, aiohttp.WSMsgType.CLOSING,
                                aiohttp.WSMsgType.CLOSED):
                return message
            assert message.type == aiohttp.WSMsgType.TEXT, (message.type, message.data)


async def post_jobs(client, count: int) -> list[str]:
    """Create jobs through a TestClient or an aiohttp session + base URL pair."""
    ids = []
    for _ in range(count):
        if isinstance(client, tuple):
            session, base = client
            response = await session.post(f"{base}/jobs")
        else:
            response = await client.post("/jobs")
        assert response.status == 201, await response.text()
        ids.append((await response.json())["id"])
    return ids


def jobservice_seq(client) -> int:
    return client.server.app[jobservice.STORE].seq


def no_errors_logged(caplog) -> None:
    errors = [r for r in caplog.records if r.levelno >= 40]
    assert not errors, [r.getMessage() for r in errors]


async def test_open_packet_fields_and_types(start_service):
    client = await start_service()
    ws, opened = await eio_open(client)
    assert set(opened) == {"sid", "upgrades", "pingInterval", "pingTimeout", "maxPayload"}
    assert isinstance(opened["sid"], str) and len(opened["sid"]) >= 16
    assert opened["upgrades"] == []  # a WebSocket start: no probe for an upgrade
    for key, value in (("pingInterval", 25000), ("pingTimeout", 20000),
                       ("maxPayload", 1000000)):
        assert type(opened[key]) is int and opened[key] == value, (key, opened[key])
    await ws.close()


async def test_also_served_without_the_trailing_slash(start_service):
    client = await start_service()
    ws, opened = await eio_open(client, "/socket.io?EIO=4&transport=websocket&t=17.5")
    assert opened["upgrades"] == []
    await ws.close()


@pytest.mark.parametrize("auth", [None, {}, {"token": "abc"}])
async def test_connect_reply_has_sid_and_pid_then_synced(start_service, open_events, auth):
    client = await start_service()
    watcher = await open_events(client)
    await watcher.resolutions(await post_jobs(client, 1))  # a store that is not empty, at rest
    ws, opened = await eio_open(client)
    reply, after = await sio_connect(ws, auth)
    seq = jobservice_seq(client)
    assert after == [("SYNCED", {"seq": seq}, str(seq))]
    assert set(reply) == {"sid", "pid"}
    assert all(isinstance(reply[key], str) and reply[key] for key in ("sid", "pid"))
    assert len({reply["sid"], reply["pid"], opened["sid"]}) == 3  # three different ids
    await ws.close()


async def test_events_are_framed_with_their_seq_as_offset(start_service):
    client = await start_service()
    ws, _ = await eio_open(client)
    await sio_connect(ws)
    [job_id] = await post_jobs(client, 1)

    name, job, offset = await next_event(ws)
    assert (name, job["id"], job["status"]) == (CREATED, job_id, "pending")
    assert offset == str(job["seq"])
    name, resolved, resolved_offset = await next_event(ws)
    assert (name, resolved["id"], resolved["status"]) == (RESOLVED, job_id, "resolved")
    assert resolved_offset == str(resolved["seq"]) and resolved["seq"] > job["seq"]
    assert isinstance(resolved["result"], str) and resolved["result"].startswith("http")
    await ws.close()


async def test_recovery_replays_missed_jobs_then_connects_with_same_sid_and_pid(
        start_service, open_events):
    client = await start_service()
    ws, _ = await eio_open(client)
    first, _ = await sio_connect(ws)
    [a] = await post_jobs(client, 1)
    name, job_a, offset = await next_event(ws)
    assert (name, job_a["id"]) == (CREATED, a)
    await ws.close()

    # While the client is away: two more jobs, and all three resolve.
    watcher = await open_events(client, f"?since={offset}")
    b, c = await post_jobs(client, 2)
    final = await watcher.resolutions({a, b, c})

    ws, _ = await eio_open(client)
    again, replay = await sio_connect(ws, {"pid": first["pid"], "offset": offset})
    assert again == first  # same sid and pid: socket.recovered === true in socket.io-client
    *missed, synced = replay
    assert sorted((name, job["id"]) for name, job, _ in missed) == sorted(
        (RESOLVED, job_id) for job_id in (a, b, c))
    for _, job, job_offset in missed:
        assert job == final[job["id"]]
        assert job_offset == str(job["seq"]) and int(job_offset) > int(offset)
    offsets = [int(job_offset) for _, _, job_offset in missed]
    assert offsets == sorted(offsets)
    seq = jobservice_seq(client)
    assert synced == ("SYNCED", {"seq": seq}, str(seq))
    await ws.close()


async def test_offset_above_the_servers_seq_gives_a_new_session_and_reset(start_service):
    """The store was replaced: not a recovery. A new pid (so socket.recovered is false)
    and RESET, as for `/ws?since=` above the counter."""
    client = await start_service()
    ws, _ = await eio_open(client)
    first, _ = await sio_connect(ws)
    await ws.close()

    seq = jobservice_seq(client)
    ws, _ = await eio_open(client)
    reply, after = await sio_connect(ws, {"pid": first["pid"], "offset": str(seq + 100)})
    assert after == [("RESET", {"seq": seq}, str(seq))]
    assert reply["pid"] != first["pid"], "RESET must not look like a recovered session"
    assert reply["sid"] != first["sid"]
    await ws.close()


async def test_server_pings_and_drops_a_client_that_never_pongs(start_service):
    client = await start_service({"PING_INTERVAL": "0.1", "PING_TIMEOUT": "0.3"})
    ws, opened = await eio_open(client)
    assert (opened["pingInterval"], opened["pingTimeout"]) == (100, 300)
    await sio_connect(ws)

    assert await text_frame(ws) == "2"
    await ws.send_str("3")
    assert await text_frame(ws) == "2"  # answered, so pinged again
    # ... and now never answered: dropped after pingTimeout.
    message = await closed(ws, limit=5)
    assert message.type in (aiohttp.WSMsgType.CLOSE, aiohttp.WSMsgType.CLOSED)
    # The server is fine.
    response = await client.get("/healthz")
    assert response.status == 200


@pytest.mark.parametrize("method,path", [
    ("GET", "/socket.io/?EIO=4&transport=webtransport"),
    ("GET", "/socket.io/?EIO=4&transport=flashsocket&t=Px1"),
    ("POST", "/socket.io/?EIO=4&transport=xhr&sid=abc"),
    ("GET", "/socket.io/?EIO=4"),
    ("GET", "/socket.io?EIO=4&transport="),
])
async def test_unknown_transport(start_service, method, path):
    client = await start_service()
    response = await client.request(method, path)
    assert response.status == 400
    assert response.content_type == "application/json"
    assert await response.json() == {"code": 0, "message": "Transport unknown"}


@pytest.mark.parametrize("query", ["EIO=3&transport=websocket", "transport=websocket",
                                   "EIO=5&transport=websocket"])
async def test_unsupported_protocol_version(start_service, query):
    client = await start_service()
    response = await client.get(f"/socket.io/?{query}", headers=UPGRADE)
    assert response.status == 400
    assert await response.json() == {"code": 5, "message": "Unsupported protocol version"}
    with pytest.raises(aiohttp.WSServerHandshakeError) as refused:
        await client.ws_connect(f"/socket.io/?{query}")
    assert refused.value.status == 400


async def test_handshake_method_not_get(start_service):
    """Reference engine.io `verify()`: a handshake that is not a GET is code 2 (checked
    before the Upgrade header, which gives code 3)."""
    client = await start_service()
    response = await client.post(SIO_PATH)
    assert response.status == 400
    assert await response.json() == {"code": 2, "message": "Bad handshake method"}


async def test_websocket_transport_without_upgrade_is_a_bad_request(start_service):
    client = await start_service()
    response = await client.get(SIO_PATH)
    assert response.status == 400
    assert await response.json() == {"code": 3, "message": "Bad request"}


async def test_foreign_browser_origin_is_forbidden(start_service):
    client = await start_service()
    with pytest.raises(aiohttp.WSServerHandshakeError) as refused:
        await client.ws_connect(SIO_PATH, headers={"Origin": "https://evil.example"})
    assert refused.value.status == 403
    response = await client.get(SIO_PATH, headers={**UPGRADE, "Origin": "https://evil.example"})
    assert response.status == 403
    assert await response.json() == {
        "code": 4,
        "message": "origin https://evil.example is not allowed; add it to CORS_ORIGINS"}
    # The page's own origin is fine.
    ws, _ = await eio_open(client)
    await ws.close()
    own = f"http://{client.host}:{client.port}"
    ws = await client.ws_connect(SIO_PATH, headers={"Origin": own})
    assert (await text_frame(ws)).startswith("0{")
    await ws.close()


@pytest.mark.parametrize("packet", ["40not json", "40[1,2]", '40"text"'])
async def test_bad_connect_payload_is_refused_and_closed(start_service, packet):
    client = await start_service()
    ws, _ = await eio_open(client)
    await ws.send_str(packet)
    frame = await text_frame(ws)
    assert frame.startswith("44{"), frame
    assert isinstance(json.loads(frame[2:])["message"], str)
    await closed(ws)


@pytest.mark.parametrize(("connect", "refusal"), [
    ('40/admin,{"token":"t"}', '44/admin,{"message":"Invalid namespace"}'),
    ('40/admin<script>,{"token":"t"}', '44{"message":"Invalid namespace"}'),
    ("40/" + "a" * 64 + ",", '44{"message":"Invalid namespace"}'),
])
async def test_connect_to_another_namespace_is_refused_and_ends_the_session(
        start_service, connect, refusal):
    """Only `/` is served. A stock client hears a refusal only in the namespace it asked
    for, so a plain name (up to 63 characters) is addressed; anything else a client sent
    is never sent back. As every refused CONNECT, it ends the session."""
    client = await start_service()
    ws, _ = await eio_open(client)
    await ws.send_str(connect)
    assert await text_frame(ws) == refusal
    await closed(ws)


@pytest.mark.parametrize("packet", ["6", "5", "2", '42["hello","world"]'])
async def test_stray_client_packets_are_ignored(start_service, packet):
    """Reference engine.io ignores a noop (6) or upgrade (5) on an open socket; a client
    ping or event has nobody to answer it here. The connection stays up."""
    client = await start_service()
    ws, _ = await eio_open(client)
    await sio_connect(ws)
    await ws.send_str(packet)
    [job_id] = await post_jobs(client, 1)
    name, job, _ = await next_event(ws)
    assert (name, job["id"]) == (CREATED, job_id)
    await ws.close()


@pytest.mark.parametrize("connected", [False, True], ids=["before-connect", "after-connect"])
async def test_binary_frame_closes_the_connection(start_service, caplog, connected):
    client = await start_service()
    ws, _ = await eio_open(client)
    if connected:
        await sio_connect(ws)
    await ws.send_bytes(b"\x04binary")
    message = await closed(ws)
    if connected:
        assert ws.close_code == 1003, message
    response = await client.get("/healthz")
    assert response.status == 200
    no_errors_logged(caplog)


@pytest.mark.parametrize("connected", [False, True], ids=["before-connect", "after-connect"])
async def test_unknown_packet_closes_without_harming_the_server(
        start_service, caplog, connected):
    client = await start_service()
    ws, _ = await eio_open(client)
    if connected:
        await sio_connect(ws)
    await ws.send_str("9zz")
    await closed(ws)

    # The next client is served as usual, events and all.
    ws, _ = await eio_open(client)
    reply, after = await sio_connect(ws)
    assert after[-1][0] == "SYNCED" and "pid" in reply
    [job_id] = await post_jobs(client, 1)
    name, job, _ = await next_event(ws)
    assert (name, job["id"]) == (CREATED, job_id)
    await ws.close()
    no_errors_logged(caplog)


def timestamp(iso: str) -> float:
    return datetime.fromisoformat(iso.replace("Z", "+00:00")).timestamp()


def job_events(lines: list[dict], ids) -> list[tuple[str, str]]:
    return [(line["name"], line["job"]["id"]) for line in lines
            if line["type"] == "event" and line["name"] in (CREATED, RESOLVED)
            and line["job"]["id"] in ids]


def assert_offsets_are_seqs(lines: list[dict]) -> None:
    for line in lines:
        if line["type"] == "event":
            assert line["offset"] == str(line["job"]["seq"]), line
            assert len(line["args"]) == 2, line  # the payload, then the offset


def ends_replay(line: dict) -> bool:
    return line["type"] == "event" and line["name"] in ("SYNCED", "RESET")


async def connect_and_replay(node, since: int = 0) -> tuple[dict, list[dict]]:
    """The next `connect` from node.lines[since] on, and the events from it up to the
    SYNCED or RESET that ends the replay. The CONNECT reply comes first, so no event comes
    before `connect` (socket.io-client would hold one that did and hand it over first)."""
    hello = await node.until(lambda line: line["type"] == "connect", since=since)
    at = next(index for index, line in enumerate(node.lines) if line is hello)
    early = [line for line in node.lines[since:at] if line["type"] == "event"]
    assert not early, f"events before connect: {early}"
    end = await node.until(ends_replay, since=at)
    events = [line for line in node.lines[at:] if line["type"] == "event"]
    return hello, events[:next(i for i, line in enumerate(events) if line is end) + 1]


@pytest.mark.parametrize("transports", [["websocket"], "default"])
async def test_node_client_for_another_namespace_hears_why(service_process, node_client,
                                                           transports):
    """A stock `io(url + "/admin")` is told in its own namespace, as a connect_error,
    rather than left reconnecting in silence."""
    service = await service_process()
    node = await node_client(f"{service.url}/admin", {"transports": transports})
    refused = await node.until(lambda line: line["type"] in ("connect", "connect_error"))
    assert refused == {"type": "connect_error", "message": "Invalid namespace", "data": None}
    assert await node.quit() == 0


async def test_node_client_receives_created_and_resolved(service_process, node_client, http):
    service = await service_process()
    node = await node_client(service.url)
    hello, replay = await connect_and_replay(node)
    assert hello["recovered"] is False and isinstance(hello["id"], str)
    assert [line["name"] for line in replay] == ["SYNCED"]

    ids = await post_jobs((http, service.url), 2)
    for job_id in ids:
        created = await node.event(CREATED, job_id)
        assert created["job"]["status"] == "pending"
    for job_id in ids:
        resolved = await node.event(RESOLVED, job_id)
        assert resolved["job"]["status"] == "resolved"
        async with http.get(f"{service.url}/jobs/{job_id}") as response:
            assert await response.json() == resolved["job"]
    assert_offsets_are_seqs(node.lines)
    assert sorted(job_events(node.lines, ids)) == sorted(
        [(CREATED, i) for i in ids] + [(RESOLVED, i) for i in ids])
    assert await node.quit() == 0


async def test_node_client_recovers_missed_resolutions_across_restart(
        service_process, node_client, http):
    """Jobs pending when the server stops resolve after it restarts (same port, same
    file); the client reconnects by itself, is recovered, and gets each once."""
    service = await service_process(SLOW_JOBS)
    port = urlsplit(service.url).port
    node = await node_client(service.url)
    hello = await node.connected()

    ids = await post_jobs((http, service.url), 3)
    for job_id in ids:
        await node.event(CREATED, job_id)
    assert await service.stop() == 0
    stopped_at = time.time()
    gone = await node.until(lambda line: line["type"] == "disconnect")
    assert gone["reason"] == "transport close"
    assert all(name == CREATED for name, _ in job_events(node.lines, ids)), \
        "a job resolved before the stop (machine too slow for a 1 s delay?)"
    away = len(node.lines)

    restarted = await service_process(SLOW_JOBS, args=["--port", str(port)])
    assert restarted.url == service.url  # a later --port wins over the fixture's --port 0
    back = await node.connected()
    assert back == {"type": "connect", "recovered": True, "id": hello["id"],
                    "transport": "websocket"}
    for job_id in ids:
        resolved = await node.event(RESOLVED, job_id)
        assert timestamp(resolved["job"]["resolvedAt"]) >= stopped_at - 0.01
    [marker] = await post_jobs((http, restarted.url), 1)
    await node.event(CREATED, marker)

    after = node.lines[away:]
    assert sorted(job_events(after, ids)) == sorted((RESOLVED, i) for i in ids), after
    assert_offsets_are_seqs(node.lines)
    assert await node.quit() == 0


async def test_node_client_replay_of_what_resolved_while_it_was_away(
        service_process, node_client, tcp_proxy, open_events, http):
    """The same through a proxy that keeps the client out until the missed jobs have
    resolved on the restarted server: they must come as the replay, right after `connect`."""
    service = await service_process(SLOW_JOBS)
    port = urlsplit(service.url).port
    proxy = await tcp_proxy(port)
    node = await node_client(proxy.url)
    hello = await node.connected()

    ids = await post_jobs((http, service.url), 3)
    for job_id in ids:
        created = await node.event(CREATED, job_id)
    last_offset = created["offset"]
    proxy.close_gate()
    assert await service.stop() == 0
    await node.until(lambda line: line["type"] == "disconnect")
    away = len(node.lines)

    restarted = await service_process(SLOW_JOBS, args=["--port", str(port)])
    assert restarted.url == service.url
    watcher = await open_events(restarted.url, f"?since={last_offset}")
    final = await watcher.resolutions(ids)
    proxy.open_gate()

    back, replay = await connect_and_replay(node, away)
    assert back == {"type": "connect", "recovered": True, "id": hello["id"],
                    "transport": "websocket"}
    assert [line["name"] for line in replay] == [RESOLVED] * 3 + ["SYNCED"], replay
    assert {line["job"]["id"]: line["job"] for line in replay[:3]} == final
    [marker] = await post_jobs((http, restarted.url), 1)
    await node.event(CREATED, marker)
    assert sorted(job_events(node.lines[away:], ids)) == sorted((RESOLVED, i) for i in ids)
    assert_offsets_are_seqs(node.lines)
    assert await node.quit() == 0


@pytest.mark.file_only  # the jobs file replaced
async def test_node_client_is_not_recovered_when_the_store_was_replaced(
        service_process, node_client, http, tmp_path):
    """Restarted on an empty jobs file: the client's offset is above the counter, so it
    gets RESET and a fresh session (`recovered === false`, a new id), not a recovery."""
    service = await service_process()
    port = urlsplit(service.url).port
    node = await node_client(service.url)
    hello = await node.connected()
    [job_id] = await post_jobs((http, service.url), 1)
    await node.event(RESOLVED, job_id)
    assert await service.stop() == 0
    await node.until(lambda line: line["type"] == "disconnect")
    away = len(node.lines)

    await service_process(path=tmp_path / "replaced.json", args=["--port", str(port)])
    back, replay = await connect_and_replay(node, away)
    events = [(line["name"], line["job"], line["offset"]) for line in replay]
    assert events == [("RESET", {"seq": 0}, "0")]
    assert back["recovered"] is False, "RESET, yet socket.recovered === true"
    assert back["id"] != hello["id"]
    assert await node.quit() == 0


# --- python-socketio AsyncClient -------------------------------------------------------


async def until(queue: asyncio.Queue, predicate, seen: list, limit: float = 20.0):
    try:
        async with asyncio.timeout(limit):
            while True:
                item = await queue.get()
                seen.append(item)
                if predicate(item):
                    return item
    except TimeoutError:
        raise AssertionError(f"nothing matched within {limit} s; saw {seen}") from None


def base_url(client) -> str:
    return f"http://{client.host}:{client.port}"


async def test_python_client_receives_created_and_resolved(start_service):
    client = await start_service()
    sio = socketio.AsyncClient(reconnection=False, handle_sigint=False)
    received: asyncio.Queue = asyncio.Queue()
    seen: list = []

    # Handlers take *args: every event carries its offset as a trailing argument.
    @sio.on(CREATED)
    async def on_created(*args):
        received.put_nowait((CREATED, args))

    @sio.on(RESOLVED)
    async def on_resolved(*args):
        received.put_nowait((RESOLVED, args))

    await sio.connect(base_url(client), transports=["websocket"])
    try:
        assert sio.transport() == "websocket"
        [job_id] = await post_jobs(client, 1)
        for name in (CREATED, RESOLVED):
            _, args = await until(received, lambda item, name=name: item[0] == name
                                  and item[1][0]["id"] == job_id, seen)
            job, offset = args
            assert offset == str(job["seq"])
        assert [item[0] for item in seen] == [CREATED, RESOLVED]
    finally:
        await sio.disconnect()


class RecoveringClient(socketio.AsyncClient):
    """The /tmp/sio-spec.md §4.2 workaround: python-socketio 5.18 has no connection state
    recovery and drops the CONNECT reply's pid, so keep it (private hook, 5.18.x)."""

    pid: str | None = None

    async def _handle_connect(self, namespace, data):
        self.pid = (data or {}).get("pid")
        await super()._handle_connect(namespace, data)


async def test_python_client_recovers_missed_events_after_a_network_cut(
        start_service, tcp_proxy, open_events):
    client = await start_service(SLOW_JOBS)  # job A is still pending at the cut
    proxy = await tcp_proxy(client.port)
    sio = RecoveringClient(reconnection_delay=0.05, reconnection_delay_max=0.2,
                           randomization_factor=0, handle_sigint=False)
    log: asyncio.Queue = asyncio.Queue()
    seen: list = []
    last = {"offset": None}
    auths: list[dict] = []

    @sio.on("*")
    async def any_event(name, *args):
        if args and isinstance(args[-1], str):
            last["offset"] = args[-1]
        log.put_nowait(("event", name, args))

    @sio.event
    async def connect():
        log.put_nowait(("connect", sio.get_sid(), sio.pid))

    @sio.event
    async def disconnect(reason):
        log.put_nowait(("disconnect", reason))

    def auth():  # evaluated again on every reconnect
        value = {"pid": sio.pid, "offset": last["offset"]} if sio.pid and last["offset"] else {}
        auths.append(value)
        return value

    def job_event(name, job_id):
        return lambda item: item[:2] == ("event", name) and item[2][0]["id"] == job_id

    await sio.connect(proxy.url, transports=["websocket"], auth=auth)
    try:
        _, sid, pid = await until(log, lambda item: item[0] == "connect", seen)
        assert sid and pid and auths == [{}]
        [a] = await post_jobs(client, 1)
        _, _, (job_a, offset) = await until(log, job_event(CREATED, a), seen)
        assert offset == str(job_a["seq"]) == last["offset"]

        proxy.close_gate()
        proxy.cut()
        _, reason = await until(log, lambda item: item[0] == "disconnect", seen)
        assert reason == sio.reason.TRANSPORT_ERROR  # python reconnects only after this
        away = len(seen)
        watcher = await open_events(client, f"?since={offset}")
        b, c = await post_jobs(client, 2)
        final = await watcher.resolutions({a, b, c})
        proxy.open_gate()

        back = await until(log, lambda item: item[0] == "connect", seen)
        assert back == ("connect", sid, pid)  # recovered: same sid, same pid
        assert auths[-1] == {"pid": pid, "offset": offset}
        [marker] = await post_jobs(client, 1)
        await until(log, job_event(CREATED, marker), seen)

        missed = [(item[1], item[2][0]["id"]) for item in seen[away:]
                  if item[0] == "event" and item[1] in (CREATED, RESOLVED)
                  and item[2][0]["id"] in (a, b, c)]
        assert sorted(missed) == sorted((RESOLVED, job_id) for job_id in (a, b, c))
        for item in seen[away:]:
            if item[0] == "event" and item[1] == RESOLVED:
                job, job_offset = item[2]
                assert job == final[job["id"]] and job_offset == str(job["seq"])
    finally:
        await sio.disconnect()
