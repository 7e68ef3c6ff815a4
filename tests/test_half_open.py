"""Socket.IO sessions that have not connected yet ("half-open"), against a real process:
a refused CONNECT ends the session with a CONNECT_ERROR in the server's own words and
holds nothing (no amplification: 25 sessions POSTing 375 KB of refused CONNECTs), a POST
of too many packets is refused, a missing token is a guess like a wrong one, a SIGHUP that
revokes a token ends the sessions opened with it on both transports, and one address
gets only its share of polling sessions and of sessions waiting for their CONNECT.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import signal

import aiohttp
import pytest
import socketio
from test_abuse import rss_bytes

import jobservice

TOKEN = "tok-0123456789abcdefghij"
OTHER = "tok-zyxwvutsrqponmlkjihg"
BEARER = {"Authorization": f"Bearer {TOKEN}"}
POLLING = "/socket.io/?EIO=4&transport=polling"
WEBSOCKET = "/socket.io/?EIO=4&transport=websocket"
MARKER = "client-bytes-never-echoed!"  # not a plain namespace name


async def handshake(http: aiohttp.ClientSession, base: str, headers=None) -> str:
    """A new polling session's URL (with its sid)."""
    async with http.get(base + POLLING, headers=headers) as response:
        body = await response.text()
        assert response.status == 200, body
    return f"{base}{POLLING}&sid={json.loads(body[1:])['sid']}"


async def post(http: aiohttp.ClientSession, url: str, body: str) -> tuple[int, str]:
    async with http.post(url, data=body.encode(),
                         headers={"Content-Type": "text/plain;charset=UTF-8"}) as response:
        return response.status, await response.text()


async def get(http: aiohttp.ClientSession, url: str) -> tuple[int, str]:
    async with http.get(url) as response:
        return response.status, await response.text()


async def refused_and_ended(http: aiohttp.ClientSession, url: str) -> str:
    """The polls after a refused CONNECT: the CONNECT_ERROR, then the close; the sid is
    gone after. The refusal's message."""
    status, refusal = await get(http, url)
    assert status == 200 and refusal.startswith("44{"), refusal
    assert await get(http, url) == (200, "1")
    status, body = await get(http, url)
    assert status == 400 and json.loads(body)["code"] == 1, body  # Session ID unknown
    return json.loads(refusal[2:])["message"]


# --- A refused CONNECT ends the session, holds nothing, echoes nothing -----------------


@pytest.mark.file_only  # Engine.IO is the same in both modes; one RSS figure is enough
async def test_refused_connects_hold_no_memory(service_process):
    """25 sessions each POST 375 KB of refused CONNECTs, at once: as many bare `40`
    packets as fit (refused unread: too many packets), then on another session 375 KB of
    fewer, larger ones (the first refusal ends the session; the rest is not read). Before,
    each refusal was queued and the session stayed open: +371 MB."""
    service = await service_process({"API_TOKEN": TOKEN})
    base, pid = service.url, service.process.pid
    bare = "\x1e".join(["40"] * (375_000 // 3))
    big = "\x1e".join(["40" + json.dumps({"token": "x" * 740})] * 500)
    assert len(big) >= 375_000
    async with aiohttp.ClientSession() as http:
        await handshake(http, base)  # warm up what every request uses
        before = rss_bytes(pid)

        async def attack(body: str) -> tuple[str, tuple[int, str]]:
            url = await handshake(http, base)
            return url, await post(http, url, body)

        attacks = await asyncio.gather(*(attack(body) for body in [bare, big] * 25))
        grown = rss_bytes(pid) - before
        print(f"RSS growth after 25 x 2 x 375 KB of refused CONNECTs: {grown / 2**20:.1f} MiB")
        assert grown < 30 * 2**20, f"the service grew {grown / 2**20:.1f} MiB"
        for url, answer in attacks[::2]:  # refused unread, and the session is over
            assert answer == (400, '{"code":3,"message":"more than 1000 packets in one '
                                   'payload"}')
            assert (await get(http, url))[0] == 400
        for url, answer in attacks[1::2]:  # the first refusal ended it
            assert answer == (200, "ok")
            assert await refused_and_ended(http, url) in (
                "unauthorized: the token is wrong", "too many wrong tokens; wait a minute")


async def test_a_refusal_never_echoes_what_the_client_sent(service_process):
    service = await service_process({"API_TOKEN": TOKEN})
    async with aiohttp.ClientSession() as http:
        for connect in (f"40/{MARKER},", f"40/{MARKER}," + json.dumps({"token": TOKEN}),
                        "40" + json.dumps({"token": MARKER})):
            url = await handshake(http, service.url)
            assert await post(http, url, connect) == (200, "ok")
            body = (await get(http, url))[1]
            assert MARKER not in body and body.startswith("44{"), body
        async with http.ws_connect(service.url + WEBSOCKET) as ws:
            assert (await ws.receive(timeout=5)).data.startswith("0{")
            await ws.send_str(f"40/{MARKER},")
            refusal = await ws.receive(timeout=5)
            assert refusal.data == '44{"message":"Invalid namespace"}'
            # What follows a refusal is not read, nor answered. (Frames the server leaves
            # unread make its close a reset, which can cut off the close frame.)
            with contextlib.suppress(ConnectionResetError):
                for _ in range(3):
                    await ws.send_str(f"40/{MARKER},")
            closing = await ws.receive(timeout=5)
            assert closing.type in (aiohttp.WSMsgType.CLOSE, aiohttp.WSMsgType.CLOSED), \
                (closing.type, closing.data)


async def test_a_post_of_too_many_packets_is_refused_and_ends_the_session(service_process):
    service = await service_process()
    async with aiohttp.ClientSession() as http:
        url = await handshake(http, service.url)
        assert await post(http, url, "\x1e".join(["6"] * 1000)) == (200, "ok")
        status, body = await post(http, url, "\x1e".join(["6"] * 1001))
        assert status == 400 and json.loads(body)["code"] == 3, body
        assert (await get(http, url))[0] == 400


async def test_a_missing_token_counts_as_a_wrong_guess(service_process):
    """Opening a session costs no token, so a CONNECT without one is a guess: ten a
    minute from an address, then every door waits, even for the right token."""
    service = await service_process({"API_TOKEN": TOKEN})
    async with aiohttp.ClientSession() as http:
        for _ in range(jobservice.FAILED_ATTEMPTS[0]):
            url = await handshake(http, service.url)
            assert await post(http, url, "40") == (200, "ok")
            assert "unauthorized" in await refused_and_ended(http, url)
        url = await handshake(http, service.url)
        assert await post(http, url, "40" + json.dumps({"token": TOKEN})) == (200, "ok")
        assert "too many wrong tokens" in await refused_and_ended(http, url)
        async with http.get(service.url + "/jobs", headers=BEARER) as response:
            assert response.status == 429


@pytest.mark.parametrize("transports", [["websocket"], ["polling"]])
async def test_stock_clients_see_the_refusal_as_connect_error(
        service_process, node_client, transports):
    service = await service_process({"API_TOKEN": TOKEN})
    node = await node_client(service.url, {"transports": transports,
                                           "auth": {"token": OTHER}})
    error = await node.until(lambda line: line["type"] == "connect_error")
    assert error["message"] == "unauthorized: the token is wrong"
    await node.quit()

    sio = socketio.AsyncClient(reconnection=False, handle_sigint=False)
    errors: asyncio.Queue = asyncio.Queue()
    sio.on("connect_error", errors.put_nowait)
    with pytest.raises(socketio.exceptions.ConnectionError):
        await sio.connect(service.url, transports=transports, auth={"token": OTHER},
                          wait_timeout=10)
    assert (await asyncio.wait_for(errors.get(), 10))["message"] == \
        "unauthorized: the token is wrong"
    await sio.disconnect()


# --- Rotation ---------------------------------------------------------------------------


async def test_rotation_ends_sessions_opened_with_a_revoked_token(service_process, tmp_path):
    """Sessions opened with a token (Bearer header, or the page's cookie) and not yet
    connected: after a SIGHUP that revokes it, none of them can CONNECT, on polling or on
    a WebSocket, and each hears why. A session opened with a token still valid can."""
    tokens = tmp_path / "tokens"
    tokens.write_text(f"{TOKEN}\n{OTHER}\n")
    service = await service_process({"API_TOKENS_FILE": str(tokens)})
    base = service.url
    page_cookies = aiohttp.CookieJar(unsafe=True)  # the page's cookie, for an IP address
    async with aiohttp.ClientSession() as http, \
            aiohttp.ClientSession(cookie_jar=page_cookies) as page:
        async with page.post(f"{base}/session", json={"token": TOKEN}) as response:
            assert response.status == 204
        polled = [await handshake(http, base, BEARER), await handshake(page, base)]
        sockets = [await http.ws_connect(base + WEBSOCKET, headers=BEARER),
                   await page.ws_connect(base + WEBSOCKET)]
        for ws in sockets:
            assert (await ws.receive(timeout=5)).data.startswith("0{")
        kept = await handshake(http, base, {"Authorization": f"Bearer {OTHER}"})

        tokens.write_text(f"{OTHER}\n")
        service.process.send_signal(signal.SIGHUP)
        await service.logged("reloaded 1 access tokens")

        for url in polled:
            status, body = await post(http, url, "40")
            if status == 200:  # in before the sweep forgot it: the refusal is polled
                assert "revoked" in await refused_and_ended(http, url)
            else:
                assert status == 400 and json.loads(body)["code"] == 1, body
        for ws in sockets:  # refused at the rotation, before any CONNECT
            frames = []
            async with asyncio.timeout(5):
                while (message := await ws.receive()).type == aiohttp.WSMsgType.TEXT:
                    frames.append(message.data)
            assert frames == ['44{"message":"unauthorized: the access token was revoked"}']
            assert (message.type, message.data) == (aiohttp.WSMsgType.CLOSE, 1008)
        assert await post(http, kept, "40") == (200, "ok")
        status, body = await get(http, kept)
        assert status == 200 and '40{"sid"' in body, body


async def test_a_connect_checks_the_handshake_token_is_still_valid(start_service, tmp_path):
    """The handshake's token is checked again at the CONNECT, whatever closed or did not
    close the session meanwhile: here the tokens are reloaded with no revocation sweep."""
    tokens = tmp_path / "tokens"
    tokens.write_text(f"{TOKEN}\n")
    client = await start_service({"API_TOKENS_FILE": str(tokens)})
    opened = await (await client.get(POLLING, headers=BEARER)).text()
    url = f"{POLLING}&sid={json.loads(opened[1:])['sid']}"
    tokens.write_text(f"{OTHER}\n")
    client.server.app[jobservice.ACCESS].reload()
    assert await (await client.post(url, data="40")).text() == "ok"
    refusal = await (await client.get(url)).text()
    assert "unauthorized" in json.loads(refusal[2:])["message"]
    assert await (await client.get(url)).text() == "1"


# --- One address's share ------------------------------------------------------------------


def other_address() -> aiohttp.ClientSession:
    """A client on another loopback address (127.0.0.2) than the tests' own."""
    return aiohttp.ClientSession(connector=aiohttp.TCPConnector(local_addr=("127.0.0.2", 0)))


async def test_one_address_gets_only_its_share_of_polling_sessions(service_process):
    service = await service_process({"POLLING_SESSIONS_PER_ADDRESS": "5"})
    base = service.url
    async with aiohttp.ClientSession() as http, other_address() as other:
        for _ in range(5):
            assert await post(http, await handshake(http, base), "40") == (200, "ok")
        async with http.get(base + POLLING) as response:
            assert response.status == 503 and int(response.headers["Retry-After"]) >= 1
            assert (await response.json())["code"] == 3
        url = await handshake(other, base)
        assert await post(other, url, "40") == (200, "ok")
        status, body = await get(other, url)
        assert status == 200 and '40{"sid"' in body, body


async def test_a_handshake_flood_pushes_out_only_its_own_sessions(service_process):
    service = await service_process({"HALF_OPEN_SESSIONS_PER_ADDRESS": "20"})
    base = service.url
    async with aiohttp.ClientSession() as http, other_address() as other:
        waiting = await handshake(other, base)
        flood = [await handshake(http, base) for _ in range(200)]
        for url in flood[:-20]:
            assert (await post(http, url, "40"))[0] == 400  # pushed out by its own
        assert await post(http, flood[-1], "40") == (200, "ok")
        assert await post(other, waiting, "40") == (200, "ok")
        status, body = await get(other, waiting)
        assert status == 200 and '40{"sid"' in body, body


def test_bad_per_address_settings_name_themselves(jobs_file):
    for name in ("POLLING_SESSIONS_PER_ADDRESS", "HALF_OPEN_SESSIONS_PER_ADDRESS"):
        for raw in ("0", "x", "1.5"):
            with pytest.raises(jobservice.ConfigError, match=name):
                jobservice.load_settings(["--data", str(jobs_file)], {name: raw})


# --- A polling session must poll --------------------------------------------------------


async def test_blind_pongs_do_not_keep_a_session_that_never_polls(start_service):
    """A client that POSTs a pong on time but never polls for its pings is dropped within
    pingInterval + pingTimeout, like one that stops answering."""
    client = await start_service({"PING_INTERVAL": "0.2", "PING_TIMEOUT": "0.3"})
    engine = client.server.app[jobservice.ENGINE]
    opened = await (await client.get(POLLING)).text()
    sid = json.loads(opened[1:])["sid"]
    url = f"{POLLING}&sid={sid}"
    assert await (await client.post(url, data="40")).text() == "ok"
    async with asyncio.timeout(5):
        while sid in engine.sessions:
            response = await client.post(url, data="3")
            if response.status != 200:
                break
            await asyncio.sleep(0.05)  # the pace of the blind pongs, not a synchronisation
    assert sid not in engine.sessions
    assert (await client.get(url)).status == 400
