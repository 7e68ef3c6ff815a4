"""Engine.IO 4 and Socket.IO 5 as their documents say, on both transports, checked against
what the protocols' published test suites (socketio/engine.io-protocol and
socketio/socket.io-protocol, test-suite/test-suite.js) expect of a server: a CONNECT is
acknowledged before any packet of its namespace, then the replay in order; every packet
is compact JSON, byte for byte as the spec's examples; a request for a session whose
heartbeat is overdue is refused as it arrives, not at the next sweep; PING_INTERVAL and
PING_TIMEOUT set that heartbeat. Then what the service answers to what it does not do:
events and acks from a client, other namespaces, binary packets, and the three places
where it differs from the reference server, as the spec allows.

The heartbeat tests stop the sweep that ends overdue sessions: its lateness is what they
are about, so with it stopped only the check on arrival can end them.
"""

from __future__ import annotations

import asyncio
import collections
import json

import aiohttp
import pytest
from conftest import create_jobs
from test_polling import eventually, handshake, poll, post, refused
from test_socketio import closed, event, text_frame

import jobservice

WEBSOCKET = "/socket.io/?EIO=4&transport=websocket"
POLLING = "/socket.io/?EIO=4&transport=polling"
TRANSPORTS = ["websocket", "polling"]
CREATED = "ON_CREATED_JOB"
SLOW = {"JOB_DELAY_MIN": "60", "JOB_DELAY_MAX": "60"}  # pending all along: one event a job
# Pings come quickly, and a client has a second to answer, even on a busy machine.
QUICK = {"PING_INTERVAL": "0.2", "PING_TIMEOUT": "1"}
PID = "a-recovery-id-of-20c"

# The spec's examples (the Engine.IO and Socket.IO READMEs, revisions 4 and 5), and the
# refusal the Socket.IO suite expects byte for byte.
SPEC_OPEN = ('0{"sid":"lv_VI97HAXpY6yYWAAAC","upgrades":["websocket"],"pingInterval":25000,'
             '"pingTimeout":5000}')
SPEC_CONNECT_ACK = '40{"sid":"wZX3oN0bSVIhsaknAAAI"}'
SPEC_EVENT = '42["hey","Jude"]'
SUITE_INVALID_NAMESPACE = '44/random,{"message":"Invalid namespace"}'


class Wire:
    """One Engine.IO session read raw, over a WebSocket or by long-polling: its packets
    one at a time, in the order the server sent them."""

    def __init__(self, client, transport: str):
        self.client, self.transport = client, transport
        self.ws: aiohttp.ClientWebSocketResponse | None = None
        self.opened = ""  # the open packet, as it was sent
        self.sid = ""
        self.unread: collections.deque[str] = collections.deque()

    @classmethod
    async def open(cls, client, transport: str) -> Wire:
        wire = cls(client, transport)
        if transport == "websocket":
            wire.ws = await client.ws_connect(WEBSOCKET)
            wire.opened = await text_frame(wire.ws)
        else:
            response = await client.get(POLLING)
            assert response.status == 200, await response.text()
            wire.opened = await response.text()
        wire.sid = json.loads(wire.opened[1:])["sid"]
        return wire

    @property
    def session(self) -> jobservice.EngineIOSession:
        return self.client.server.app[jobservice.ENGINE].sessions[self.sid]

    async def send(self, packet: str) -> int:
        """Send a packet; on polling, the POST's status (200 is "ok")."""
        if self.ws is not None:
            await self.ws.send_str(packet)
            return 200
        response = await post(self.client, self.sid, packet)
        if response.status == 200:
            assert await response.text() == "ok"
        return response.status

    async def next(self, pong: bool = True) -> str:
        """The next packet; with pong, a ping is answered and passed over."""
        while True:
            if not self.unread:
                if self.ws is not None:
                    self.unread.append(await text_frame(self.ws))
                else:
                    self.unread.extend(await poll(self.client, self.sid))
            packet = self.unread.popleft()
            if packet != "2" or not pong:
                return packet
            await self.send("3")

    async def connect(self, auth: dict | None = None) -> tuple[str, list[tuple]]:
        """CONNECT; (the first packet that came back, the events after it up to the SYNCED
        or RESET that ends the replay)."""
        await self.send("40" + json.dumps(auth or {}))
        first, replay = await self.next(), []
        while not replay or replay[-1][0] not in ("SYNCED", "RESET"):
            replay.append(event(await self.next()))
        return first, replay

    async def ended(self) -> None:
        """The server ended the session: its WebSocket closes, or its sid is unknown (a
        poll may first collect a last packet or the close)."""
        if self.ws is not None:
            await closed(self.ws)
            return
        async with asyncio.timeout(5):
            while (response := await self.client.get(f"{POLLING}&sid={self.sid}")).ok:
                assert (await response.text()).split("\x1e")[-1] in ("1", "6")
        assert await refused(response, 400, 1) == "Session ID unknown"

    async def close(self) -> None:
        if self.ws is not None:
            await self.ws.close()


async def until_past(deadline: float) -> None:
    """Let the loop's clock (the server's, in this process) pass deadline."""
    await asyncio.sleep(max(0.0, deadline - asyncio.get_running_loop().time()) + 0.001)


def stop_the_sweep(client) -> None:
    client.server.app[jobservice.ENGINE].sweeper.cancel()


# --- CONNECT first ------------------------------------------------------------------------


@pytest.mark.parametrize("transport", TRANSPORTS)
@pytest.mark.parametrize("case", ["fresh", "recovering", "reset"])
async def test_the_connect_ack_comes_first_then_the_replay_in_order(
        start_service, transport, case):
    client = await start_service(SLOW)
    ids = await create_jobs(client, 3)
    seq = client.server.app[jobservice.STORE].seq
    auth = {"fresh": {}, "recovering": {"pid": PID, "offset": "0"},
            "reset": {"pid": PID, "offset": str(seq + 100)}}[case]
    wire = await Wire.open(client, transport)
    first, replay = await wire.connect(auth)
    assert first.startswith("40{"), f"{first!r} came before the CONNECT ack"
    assert (json.loads(first[2:])["pid"] == PID) == (case == "recovering")
    *missed, end = replay
    assert [(name, job["id"]) for name, job, _ in missed] == (
        [(CREATED, job_id) for job_id in ids] if case == "recovering" else [])
    assert end == ("RESET" if case == "reset" else "SYNCED", {"seq": seq}, str(seq))
    [live] = await create_jobs(client, 1)
    name, job, offset = event(await wire.next())
    assert (name, job["id"], offset) == (CREATED, live, str(seq + 1))
    await wire.close()


# --- Compact JSON, byte for byte ----------------------------------------------------------


@pytest.mark.parametrize("transport", TRANSPORTS)
async def test_packets_are_the_bytes_of_the_spec_examples(start_service, transport):
    client = await start_service(SLOW)
    wire = await Wire.open(client, transport)
    upgrades = '["websocket"]' if transport == "polling" else "[]"
    assert wire.opened == (SPEC_OPEN.replace("lv_VI97HAXpY6yYWAAAC", wire.sid)
                           .replace('["websocket"]', upgrades)
                           .replace('"pingTimeout":5000}',
                                    '"pingTimeout":20000,"maxPayload":1000000}'))
    ack, _ = await wire.connect()
    reply = json.loads(ack[2:])
    assert ack == SPEC_CONNECT_ACK.replace(
        'wZX3oN0bSVIhsaknAAAI"}', f'{reply["sid"]}","pid":"{reply["pid"]}"}}')
    [job_id] = await create_jobs(client, 1)
    packet = await wire.next()
    name, _, offset = json.loads(packet[2:])
    assert packet == SPEC_EVENT.replace('"hey","Jude"', f'"{name}",{{}},"{offset}"').replace(
        "{}", await (await client.get(f"/jobs/{job_id}")).text())
    await wire.close()

    refused_wire = await Wire.open(client, transport)
    await refused_wire.send("40/random")  # as the suite sends it, without the comma
    assert await refused_wire.next() == SUITE_INVALID_NAMESPACE
    await refused_wire.close()


@pytest.mark.parametrize(("method", "query", "body"), [
    ("GET", "?EIO=4&transport=abc", '{"code":0,"message":"Transport unknown"}'),
    ("GET", "?EIO=4&transport=polling&sid=none", '{"code":1,"message":"Session ID unknown"}'),
    ("PUT", "?EIO=4&transport=polling", '{"code":2,"message":"Bad handshake method"}'),
    ("GET", "?EIO=4&transport=websocket", '{"code":3,"message":"Bad request"}'),
    ("GET", "?EIO=abc&transport=polling", '{"code":5,"message":"Unsupported protocol version"}'),
])
async def test_engineio_errors_are_compact_json(start_service, method, query, body):
    client = await start_service()
    response = await client.request(method, f"/socket.io/{query}")
    assert (response.status, response.content_type) == (400, "application/json")
    assert await response.read() == body.encode()


# --- The heartbeat, on time ---------------------------------------------------------------


@pytest.mark.parametrize("method", ["GET", "POST"])
async def test_a_request_for_a_session_that_stopped_polling_is_refused_on_arrival(
        start_service, method):
    """A polling session is due to poll within pingInterval + pingTimeout of its last
    poll (here of its handshake): until then it is served, from then on it is over."""
    client = await start_service(QUICK)
    engine = client.server.app[jobservice.ENGINE]
    sid = (await handshake(client))["sid"]
    stop_the_sweep(client)
    due = engine.sessions[sid].polled_at + engine.heartbeat
    assert (await post(client, sid, "6")).status == 200  # a noop, in time
    await until_past(due)
    async with asyncio.timeout(5):  # a poll held open would be a session still alive
        response = await client.request(method, f"{POLLING}&sid={sid}", data="6")
    assert await refused(response, 400, 1) == "Session ID unknown"
    assert sid not in engine.sessions


@pytest.mark.parametrize("transport", TRANSPORTS)
async def test_a_pong_after_ping_timeout_is_too_late(start_service, transport):
    client = await start_service(QUICK)
    wire = await Wire.open(client, transport)
    await wire.connect()
    assert await wire.next(pong=False) == "2"
    stop_the_sweep(client)
    await until_past(wire.session.pong_by)
    if transport == "polling":
        response = await post(client, wire.sid, "3")
        assert await refused(response, 400, 1) == "Session ID unknown"
    else:
        await wire.send("3")
        await wire.ended()
    assert wire.sid not in client.server.app[jobservice.ENGINE].sessions


async def test_a_ping_goes_ahead_of_a_replay_waiting_to_be_read(start_service):
    """A client reading a long replay must hear its ping in time to answer it: a ping
    queued behind the replay would end a session that reads as fast as it can. The
    events keep their order; a ping belongs to no namespace."""
    client = await start_service({**SLOW, "PING_INTERVAL": "0.1", "PING_TIMEOUT": "5"})
    await create_jobs(client, 200)
    wire = await Wire.open(client, "polling")
    assert await wire.send("40" + json.dumps({"pid": PID, "offset": "0"})) == 200
    await eventually(lambda: wire.session.pong_by is not None)  # the sweep queued a ping
    packets = await poll(client, wire.sid)
    assert packets[0] == "2" and packets[1].startswith("40{"), packets[:2]
    assert [event(packet)[0] for packet in packets[2:]] == [CREATED] * 200 + ["SYNCED"]


# --- PING_INTERVAL and PING_TIMEOUT -------------------------------------------------------


def test_the_heartbeat_settings_defaults_and_bad_values():
    settings = jobservice.load_settings([], {})
    assert (settings.ping_interval, settings.ping_timeout) == (25, 20)  # the reference's
    settings = jobservice.load_settings([], {"PING_INTERVAL": "1m", "PING_TIMEOUT": "0.2"})
    assert (settings.ping_interval, settings.ping_timeout) == (60, 0.2)
    for name, value, said in [("PING_INTERVAL", "0", "above 0"),
                              ("PING_TIMEOUT", "soon", "not a duration"),
                              ("PING_INTERVAL", "-1", "not a duration"),
                              ("PING_TIMEOUT", "0.05", "below 0.1 s"),
                              ("PING_INTERVAL", "25d", "JavaScript timer")]:
        with pytest.raises(jobservice.ConfigError, match=f"{name}.*{said}"):
            jobservice.load_settings([], {name: value})


async def test_the_heartbeat_settings_reach_the_wire_and_the_start_up_line(
        service_process, http):
    service = await service_process({"PING_INTERVAL": "0.3", "PING_TIMEOUT": "1"})
    assert any("pings every 0.3 s (PING_INTERVAL) and waits 1 s for the pong "
               "(PING_TIMEOUT)" in line for line in service.log), service.log
    ws = await http.ws_connect(service.url + WEBSOCKET)
    opened = json.loads((await text_frame(ws))[1:])
    assert (opened["pingInterval"], opened["pingTimeout"]) == (300, 1000)
    started = asyncio.get_running_loop().time()
    for _ in range(3):
        assert await text_frame(ws, limit=2) == "2"
        await ws.send_str("3")
    assert asyncio.get_running_loop().time() - started > 0.8  # one every 0.3 s
    assert await text_frame(ws, limit=2) == "2"
    await closed(ws, limit=3)  # unanswered: the session ends after pingTimeout


# --- What the service does not take --------------------------------------------------------


@pytest.mark.parametrize("transport", TRANSPORTS)
async def test_well_formed_events_and_acks_from_a_client_are_ignored(
        start_service, transport):
    """Nothing here listens to a client: an event is dropped (an ack id gets no ack), and
    so is an ack, or leaving a namespace it is not in, as the reference server drops what
    no handler takes."""
    client = await start_service(SLOW)
    wire = await Wire.open(client, transport)
    await wire.connect()
    for packet in ['42["hello","world"]', '42[1,"numbered"]', '4217["with-ack",{}]',
                   '42/elsewhere,["hello"]', "4317[]", '43/elsewhere,5["x"]', "41/elsewhere,",
                   "41/elsewhere"]:
        assert await wire.send(packet) == 200
    [job_id] = await create_jobs(client, 1)
    name, job, _ = event(await wire.next())
    assert (name, job["id"]) == (CREATED, job_id)
    await wire.close()


@pytest.mark.parametrize("transport", TRANSPORTS)
@pytest.mark.parametrize("packet", [
    "42{}", '42abc["message",1]', "42[]", '42["connect"]', "42[true]", "42", '42["x"',
    "43{}", '43abc[1]', "43", '451-["x",{"_placeholder":true,"num":0}]', "461-17[]",
    "40/custom<1>,", "40", "41/custom,{}"])
async def test_a_malformed_or_unsupported_packet_ends_the_session(
        start_service, transport, packet):
    """Malformed ones as the reference parser refuses them (the suite's "invalid format"
    cases among them), binary events and acks, which this service takes none of, and
    CONNECTs and DISCONNECTs no stock client sends once connected."""
    client = await start_service()
    wire = await Wire.open(client, transport)
    await wire.connect()
    assert await wire.send(packet) == (200 if transport == "websocket" else 400)
    await wire.ended()
    if transport == "websocket":
        assert wire.ws.close_code == 1002


@pytest.mark.parametrize("transport", TRANSPORTS)
async def test_another_namespace_is_refused_and_the_main_one_goes_on(
        start_service, transport):
    """socket.io-client's Manager multiplexes `io(url)` and `io(url + "/admin")` over one
    connection: the second is refused in its own namespace, the first keeps its events."""
    client = await start_service(SLOW)
    wire = await Wire.open(client, transport)
    await wire.connect()
    await wire.send("40/admin,")
    assert await wire.next() == '44/admin,{"message":"Invalid namespace"}'
    [job_id] = await create_jobs(client, 1)
    name, job, _ = event(await wire.next())
    assert (name, job["id"]) == (CREATED, job_id)
    await wire.close()


async def test_a_binary_frame_ends_the_session(start_service):
    client = await start_service()
    wire = await Wire.open(client, "websocket")
    await wire.connect()
    await wire.ws.send_bytes(bytes([1, 2, 3, 4]))
    await wire.ended()
    assert wire.ws.close_code == 1003


# The three behaviours that differ from the reference server, as the spec allows.


@pytest.mark.parametrize("transport", TRANSPORTS)
async def test_leaving_the_main_namespace_ends_the_session(start_service, transport):
    """The reference keeps the Engine.IO session after `41`; the spec says it MAY be
    kept if the client is in another namespace, and only / is served here."""
    client = await start_service()
    wire = await Wire.open(client, transport)
    await wire.connect()
    await wire.send("41")
    await wire.ended()


async def test_a_poll_during_the_upgrade_gets_a_noop_and_one_after_it_400(start_service):
    """The spec says a client MUST stop polling before it upgrades. A poll that comes
    while the upgrade is under way is answered with a noop, as the suite expects after
    `3probe`; once `5` is taken, polling with that sid is a bad request."""
    client = await start_service()
    sid = (await handshake(client))["sid"]
    ws = await client.ws_connect(f"{WEBSOCKET}&sid={sid}")
    await ws.send_str("2probe")
    assert await poll(client, sid) == ["6"]
    assert await text_frame(ws) == "3probe"
    await ws.send_str("5")
    engine = client.server.app[jobservice.ENGINE]
    await eventually(lambda: not engine.sessions[sid].polling)  # the upgrade is taken
    await refused(await client.get(f"{POLLING}&sid={sid}"), 400, 3)
    await ws.close()


async def test_a_second_websocket_for_an_upgraded_sid_is_refused(start_service):
    """The reference accepts it and closes it; both ignore it, and a 400 costs less."""
    client = await start_service()
    sid = (await handshake(client))["sid"]
    ws = await client.ws_connect(f"{WEBSOCKET}&sid={sid}")
    await ws.send_str("2probe")
    assert await text_frame(ws) == "3probe"
    await ws.send_str("5")
    with pytest.raises(aiohttp.WSServerHandshakeError) as second:
        await client.ws_connect(f"{WEBSOCKET}&sid={sid}")
    assert second.value.status == 400
    await ws.send_str("40")
    assert (await text_frame(ws)).startswith("40{")  # the first one is still served
    await ws.close()
