"""Running it exposed: with API_TOKEN (or API_TOKENS_FILE) every door wants a token (REST,
/ws by header or cookie, Socket.IO by its auth option or the cookie on both transports,
/metrics; /healthz says only "ok"), wrong tokens are limited per address, tokens rotate on
SIGHUP and never reach the log, foreign Origins cannot change anything, and
CLIENT_RATE_LIMIT keeps one client from taking the service, behind trusted proxies too.
"""

from __future__ import annotations

import asyncio
import json
import signal
import sys
import time

import aiohttp
import pytest
from conftest import create_jobs

import jobservice

TOKEN = "tok-0123456789abcdefghij"
OTHER = "tok-zyxwvutsrqponmlkjihg"
BEARER = {"Authorization": f"Bearer {TOKEN}"}
SECURED = {"API_TOKEN": TOKEN}
SIO_WS = "/socket.io/?EIO=4&transport=websocket"
SIO_POLL = "/socket.io/?EIO=4&transport=polling"


async def unauthorized(response: aiohttp.ClientResponse) -> None:
    assert response.status == 401, await response.text()
    assert response.headers["WWW-Authenticate"].startswith("Bearer")
    body = await response.json()
    assert body["error"]["code"] == "unauthorized"
    assert TOKEN not in json.dumps(body)


async def login(client, token: str = TOKEN) -> str:
    """POST /session; the cookie's value (the client keeps it too)."""
    response = await client.post("/session", json={"token": token})
    assert response.status == 204, await response.text()
    cookie = response.cookies[jobservice.SESSION_COOKIE]
    assert cookie["httponly"] and cookie["samesite"] == "Strict" and cookie["path"] == "/"
    assert TOKEN not in cookie.value
    return cookie.value


@pytest.mark.parametrize("method,path", [
    ("GET", "/jobs"), ("POST", "/jobs"), ("GET", "/jobs/stats"), ("GET", "/jobs/x"),
    ("DELETE", "/jobs/x"), ("POST", "/jobs/x/retry"), ("GET", "/metrics"), ("GET", "/ws"),
])
async def test_every_rest_door_wants_the_token(start_service, method, path):
    client = await start_service(SECURED)
    await unauthorized(await client.request(method, path))
    await unauthorized(await client.request(method, path,
                                            headers={"Authorization": f"Bearer {OTHER}"}))
    response = await client.request(method, path, headers=BEARER)
    assert response.status not in (401, 403), await response.text()


async def test_open_doors_stay_open_and_healthz_says_little(start_service):
    client = await start_service(SECURED)
    for path in ("/", "/openapi.json", "/static/app.js", "/session"):
        assert (await client.get(path)).status == 200, path
    assert await (await client.get("/healthz")).json() == {"status": "ok"}
    full = await (await client.get("/healthz", headers=BEARER)).json()
    assert full["status"] == "ok" and "pending" in full
    assert await (await client.get("/session")).json() == {"required": True,
                                                           "authenticated": False}


async def test_without_a_token_nothing_changes(start_service):
    client = await start_service()
    assert (await client.post("/jobs")).status == 201
    assert "pending" in await (await client.get("/healthz")).json()
    assert await (await client.get("/session")).json() == {"required": False,
                                                           "authenticated": True}
    assert (await client.post("/session", json={"token": "x"})).status == 200


async def test_websocket_by_header_and_by_cookie_and_refused_before_the_upgrade(
        start_service, open_events):
    client = await start_service(SECURED)
    with pytest.raises(aiohttp.WSServerHandshakeError) as refused:
        await client.ws_connect("/ws")
    assert refused.value.status == 401
    by_header = await open_events(client, "", headers=BEARER)
    await login(client)  # the test client keeps the cookie from here on
    by_cookie = await open_events(client)
    response = await client.post("/jobs", headers=BEARER)
    ids = [(await response.json())["id"]]
    await by_header.resolutions(ids)
    await by_cookie.resolutions(ids)


async def test_the_session_cookie_and_logout(start_service):
    client = await start_service(SECURED)
    assert (await client.post("/session", json={"token": OTHER})).status == 401
    assert (await client.post("/session", json={})).status == 401
    await login(client)
    assert await (await client.get("/session")).json() == {"required": True,
                                                           "authenticated": True}
    assert (await client.get("/jobs")).status == 200
    assert (await client.delete("/session")).status == 204
    await unauthorized(await client.get("/jobs"))


async def test_a_forged_or_expired_cookie_is_refused(start_service):
    client = await start_service(SECURED)
    access = client.server.app[jobservice.ACCESS]
    expired = f"{int(time.time()) - 10}.{access._sign(TOKEN, int(time.time()) - 10)}"
    for value in (expired, f"{int(time.time()) + 999}.{'0' * 64}", "garbage", "9" * 40):
        client.session.cookie_jar.clear()
        response = await client.get("/jobs", cookies={jobservice.SESSION_COOKIE: value})
        await unauthorized(response)


async def test_a_cookie_change_needs_the_pages_own_origin(start_service):
    client = await start_service({**SECURED, "CORS_ORIGINS": "https://app.example"})
    await login(client)
    own = f"http://{client.host}:{client.port}"
    response = await client.post("/jobs")  # a cookie and no Origin: not the page
    assert response.status == 403
    response = await client.post("/jobs", headers={"Origin": "https://app.example"})
    assert response.status == 403  # even a listed origin may not ride the cookie
    assert (await client.post("/jobs", headers={"Origin": own})).status == 201
    assert (await client.get("/jobs")).status == 200  # reading needs no Origin


@pytest.mark.parametrize("secured", [False, True], ids=["no-token", "token"])
async def test_a_foreign_origin_changes_nothing(start_service, secured):
    client = await start_service(SECURED if secured else {})
    headers = {**(BEARER if secured else {}), "Origin": "https://evil.example"}
    [job_id] = await create_jobs(client, 1) if not secured else [None]
    for method, path in (("POST", "/jobs"), ("DELETE", f"/jobs/{job_id}"),
                         ("POST", "/session")):
        response = await client.request(method, path, headers=headers)
        assert response.status == 403, (method, path, await response.text())
        assert (await response.json())["error"]["code"] == "origin_not_allowed"
    stats = await (await client.get("/jobs/stats", headers=BEARER)).json()
    assert stats["total"] == (0 if secured else 1)
    plain = await client.post("/jobs", headers=BEARER)  # curl sends no Origin
    assert plain.status == 201


async def test_wrong_tokens_are_limited_per_address(start_service):
    client = await start_service(SECURED)
    wrong = {"Authorization": f"Bearer {OTHER}"}
    for _ in range(jobservice.FAILED_ATTEMPTS[0]):
        await unauthorized(await client.get("/jobs", headers=wrong))
    for headers in (wrong, BEARER):  # limited: even the right one must wait
        response = await client.get("/jobs", headers=headers)
        assert response.status == 429
        assert (await response.json())["error"]["code"] == "too_many_attempts"
        assert 1 <= int(response.headers["Retry-After"]) <= 60
    response = await client.post("/session", json={"token": TOKEN})
    assert response.status == 429
    await unauthorized(await client.get("/jobs"))  # no token at all is not a guess


async def sio_open(ws) -> None:
    opened = await ws.receive(timeout=5)
    assert opened.data.startswith("0{")


async def test_socketio_over_websocket_by_auth_token_or_cookie(start_service):
    client = await start_service(SECURED)
    for connect, said in (("40", "token"), ("40" + json.dumps({"token": OTHER}), "wrong")):
        ws = await client.ws_connect(SIO_WS)  # no 401 at the upgrade: the token comes later
        await sio_open(ws)
        await ws.send_str(connect)
        refusal = (await ws.receive(timeout=5)).data
        assert refusal.startswith("44{") and said in json.loads(refusal[2:])["message"]
        assert (await ws.receive(timeout=5)).type == aiohttp.WSMsgType.CLOSE  # and it ends
    ws = await client.ws_connect(SIO_WS)
    await sio_open(ws)
    await ws.send_str("40" + json.dumps({"token": TOKEN}))
    frames = [(await ws.receive(timeout=5)).data for _ in range(2)]
    assert frames[0].startswith('40{"sid"') and frames[1].startswith('42["SYNCED"')
    await ws.close()

    await login(client)
    ws = await client.ws_connect(SIO_WS)  # the page's cookie is enough
    await sio_open(ws)
    await ws.send_str("40")
    assert (await ws.receive(timeout=5)).data.startswith('40{"sid"')
    await ws.close()


async def test_socketio_over_polling_by_auth_token(start_service):
    client = await start_service(SECURED)

    async def session_url() -> str:
        opened = await (await client.get(SIO_POLL)).text()
        return f"{SIO_POLL}&sid={json.loads(opened[1:])['sid']}"

    url = await session_url()
    assert await (await client.post(url, data="40")).text() == "ok"
    refusal = await (await client.get(url)).text()
    assert refusal.startswith("44{") and "unauthorized" in refusal
    assert await (await client.get(url)).text() == "1"  # the close, on the poll after
    url = await session_url()
    assert await (await client.post(url, data="40" + json.dumps({"token": TOKEN}))).text() \
        == "ok"
    packets = (await (await client.get(url)).text()).split("\x1e")
    assert packets[0].startswith('40{"sid"') and packets[1].startswith('42["SYNCED"')


@pytest.mark.parametrize("transports", [["websocket"], ["polling"]])
async def test_node_client_with_the_auth_option(service_process, node_client, transports):
    service = await service_process(SECURED)
    refused = await node_client(service.url, {"transports": transports})
    error = await refused.until(lambda line: line["type"] == "connect_error")
    assert "unauthorized" in error["message"]
    await refused.quit()
    node = await node_client(service.url, {"transports": transports,
                                           "auth": {"token": TOKEN}})
    hello = await node.connected()
    assert hello["transport"] == transports[0]
    async with aiohttp.ClientSession(headers=BEARER) as http:
        async with http.post(f"{service.url}/jobs") as response:
            job_id = (await response.json())["id"]
    await node.event("ON_RESOLVED_JOB", job_id)
    assert await node.quit() == 0


async def test_tokens_rotate_on_sighup_and_never_reach_the_log(service_process, tmp_path):
    tokens = tmp_path / "tokens"
    tokens.write_text(f"# the team's tokens\n{TOKEN}\n\n")
    key = "unsplash-key-that-must-not-leak"
    service = await service_process({"API_TOKENS_FILE": str(tokens),
                                     "UNSPLASH_ACCESS_KEY": key,
                                     "UNSPLASH_API_URL": "http://127.0.0.1:9"})
    async with aiohttp.ClientSession() as http:
        async def status(token: str) -> int:
            async with http.get(f"{service.url}/jobs",
                                headers={"Authorization": f"Bearer {token}"}) as response:
                return response.status

        async with http.post(f"{service.url}/session", json={"token": TOKEN}) as response:
            assert response.status == 204
        assert (await status(TOKEN), await status(OTHER)) == (200, 401)
        events = await http.ws_connect(f"{service.url}/ws",
                                       headers={"Authorization": f"Bearer {TOKEN}"})
        sio = await http.ws_connect(f"{service.url}{SIO_WS}")
        await sio_open(sio)
        await sio.send_str("40" + json.dumps({"token": TOKEN}))
        assert (await sio.receive(timeout=5)).data.startswith('40{"sid"')
        async def closed(socket) -> int:
            while (await socket.receive()).type not in (aiohttp.WSMsgType.CLOSE,
                                                         aiohttp.WSMsgType.CLOSED):
                pass
            return socket.close_code

        # Read both from now on: a close frame that is not answered is cut off later.
        closing = asyncio.gather(closed(events), closed(sio))
        tokens.write_text(f"{OTHER}\n")
        service.process.send_signal(signal.SIGHUP)
        await service.logged("reloaded 1 access tokens")
        assert (await status(TOKEN), await status(OTHER)) == (401, 200)
        # Sockets that came in with the old token are closed: policy violation.
        assert await asyncio.wait_for(closing, 5) == [1008, 1008]
        async with http.get(f"{service.url}/jobs") as response:
            assert response.status == 401  # its cookie was signed with the old token
        tokens.write_text("")  # an empty file would open every door: refused
        service.process.send_signal(signal.SIGHUP)
        await service.logged("tokens not reloaded")
        assert await status(OTHER) == 200
    assert await service.stop() == 0
    log = "\n".join(service.log)
    for secret in (TOKEN, OTHER, key):
        assert secret not in log


async def test_a_public_address_without_a_token_is_warned_about(service_process):
    service = await service_process(args=["--host", "0.0.0.0"])
    assert any("listening on 0.0.0.0 with no API_TOKEN: anyone who can reach this port can "
               "create and delete jobs" in line for line in service.log), service.log


@pytest.mark.parametrize("name,raw", [("CLIENT_RATE_LIMIT", "10"), ("CLIENT_RATE_LIMIT", "x/s"),
                                      ("CLIENT_RATE_LIMIT", "0/s"),
                                      ("CLIENT_RATE_LIMIT", "5/fortnight"),
                                      ("TRUSTED_PROXIES", "10.0.0.0/33"),
                                      ("TRUSTED_PROXIES", "proxy.local"),
                                      ("API_TOKENS_FILE", "/nonexistent/tokens")])
def test_bad_access_settings_name_themselves(jobs_file, name, raw):
    with pytest.raises(jobservice.ConfigError, match=name):
        jobservice.load_settings(["--data", str(jobs_file)], {name: raw})


def test_an_empty_tokens_file_stops_start_up(jobs_file, tmp_path):
    empty = tmp_path / "tokens"
    empty.write_text("# nobody yet\n\n")
    with pytest.raises(jobservice.ConfigError, match="holds no token"):
        jobservice.load_settings(["--data", str(jobs_file)], {"API_TOKENS_FILE": str(empty)})


@pytest.mark.parametrize("raw,limit", [("10/s", (10, 1.0)), ("600/min", (600, 60.0)),
                                       ("5000/hour", (5000, 3600.0))])
def test_rates(jobs_file, raw, limit):
    settings = jobservice.load_settings(["--data", str(jobs_file)], {"CLIENT_RATE_LIMIT": raw})
    assert settings.client_rate_limit == limit


# --- Per-client rate limits -------------------------------------------------------------


async def test_job_creation_is_limited_per_client(start_service):
    client = await start_service({"CLIENT_RATE_LIMIT": "3/min"})
    for remaining in (2, 1, 0):
        response = await client.post("/jobs")
        assert response.status == 201
        assert response.headers["RateLimit-Limit"] == "3"
        assert response.headers["RateLimit-Remaining"] == str(remaining)
    response = await client.post("/jobs")
    assert response.status == 429
    assert (await response.json())["error"]["code"] == "rate_limited"
    assert 1 <= int(response.headers["Retry-After"]) <= 20
    assert response.headers["RateLimit-Remaining"] == "0"
    assert 0 < int(response.headers["RateLimit-Reset"]) <= 60
    assert len(await (await client.get("/jobs")).json()) == 3  # nothing stored
    # A spoofed X-Forwarded-For from an untrusted peer changes nothing.
    response = await client.post("/jobs", headers={"X-Forwarded-For": "203.0.113.9"})
    assert response.status == 429


async def test_each_token_has_its_own_bucket(start_service, tmp_path):
    tokens = tmp_path / "tokens"
    tokens.write_text(f"{TOKEN}\n{OTHER}\n")
    client = await start_service({"API_TOKENS_FILE": str(tokens), "CLIENT_RATE_LIMIT": "1/min"})
    assert (await client.post("/jobs", headers=BEARER)).status == 201
    assert (await client.post("/jobs", headers=BEARER)).status == 429
    other = {"Authorization": f"Bearer {OTHER}"}
    assert (await client.post("/jobs", headers=other)).status == 201


async def test_behind_a_trusted_proxy_the_forwarded_address_counts(start_service):
    client = await start_service({"CLIENT_RATE_LIMIT": "1/min",
                                  "TRUSTED_PROXIES": "127.0.0.0/8, ::1"})
    for address in ("198.51.100.1", "198.51.100.2"):
        headers = {"X-Forwarded-For": f"{address}, 127.0.0.1"}
        assert (await client.post("/jobs", headers=headers)).status == 201
        assert (await client.post("/jobs", headers=headers)).status == 429
    # A client cannot prepend its way out: the nearest untrusted hop is the client.
    spoofed = {"X-Forwarded-For": "10.9.9.9, 198.51.100.1"}
    assert (await client.post("/jobs", headers=spoofed)).status == 429


async def test_a_proxy_that_is_not_trusted_is_the_client(start_service):
    client = await start_service({"CLIENT_RATE_LIMIT": "1/min", "TRUSTED_PROXIES": "10.0.0.0/8"})
    assert (await client.post("/jobs", headers={"X-Forwarded-For": "198.51.100.1"})).status \
        == 201
    assert (await client.post("/jobs", headers={"X-Forwarded-For": "198.51.100.2"})).status \
        == 429


def test_a_flood_of_client_addresses_keeps_memory_bounded():
    """100,000 addresses at a time, four times over: the buckets stop at their cap, and
    past the first rounds (the dict settles at its size) the table does not grow."""
    limiter = jobservice.RateLimiter(10, 1.0)
    now = 1000.0
    sizes = []
    for flood in range(4):
        for n in range(100_000):
            limiter.take(f"{flood}.{n >> 16 & 255}.{n >> 8 & 255}.{n & 255}", now)
        sizes.append(sys.getsizeof(limiter.buckets))
        assert len(limiter.buckets) == limiter.max_clients == 100_000
    assert sizes[3] == sizes[2] == sizes[1], sizes
    assert sizes[3] < 16 * 1024 * 1024, sizes
    # Buckets that filled up again are let go as soon as anyone else comes.
    limiter.take("203.0.113.1", now + 5.0)
    assert len(limiter.buckets) == 1


def test_the_bucket_refills_at_its_rate():
    limiter = jobservice.RateLimiter(2, 1.0)
    assert [limiter.take("a", 0.0)[0] for _ in range(3)] == [True, True, False]
    assert limiter.take("a", 0.5)[0] is True  # one token back after half a second
    assert limiter.take("a", 0.5)[0] is False


def test_a_tokens_bucket_is_named_by_a_digest_and_follows_rotations(jobs_file, tmp_path):
    tokens = tmp_path / "tokens"
    tokens.write_text(f"{TOKEN}\n{OTHER}\n")
    settings = jobservice.load_settings(["--data", str(jobs_file)],
                                        {"API_TOKENS_FILE": str(tokens)})
    access = jobservice.Access(settings)
    first, other = access.bucket(TOKEN), access.bucket(OTHER)
    assert first != other and access.bucket(TOKEN) == first
    assert TOKEN not in first and OTHER not in other
    tokens.write_text(f"{OTHER}\n")
    access.reload()
    # A request let in just before the rotation keeps its bucket; the kept token too.
    assert access.bucket(TOKEN) == first and access.bucket(OTHER) == other
