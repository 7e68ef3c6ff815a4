"""A hostile page or client against a real service process: a Host the service is not
known by (DNS rebinding) gets 421 on every door; CORS_ORIGINS=* never lets the session
cookie open an event stream from another origin; a token too short to be a secret stops
start-up; bytes that are not text in a token or cookie are a 401, never a traceback; the
store never follows a symbolic link named like its journal or temp file; MAX_STORED_JOBS
bounds what the store keeps.
"""

from __future__ import annotations

import asyncio
import json
import os
import re
import signal
import subprocess
import sys
from urllib.parse import urlsplit

import aiohttp
import pytest
from conftest import ROOT

import jobservice

TOKEN = "hosts-test-token-0123456789"
SIO_WS = "/socket.io/?EIO=4&transport=websocket"
SIO_POLL = "/socket.io/?EIO=4&transport=polling"
CONNECTED = '40{"sid"'  # the CONNECT's ack, ahead of any event
STATUS_LINE = re.compile(rb"HTTP/1\.1 (\d{3}) ")


async def raw(url: str, head: bytes) -> tuple[int, bytes]:
    """One request written byte for byte (a Host or header aiohttp would not send):
    (its status, the body)."""
    parts = urlsplit(url)
    reader, writer = await asyncio.open_connection(parts.hostname, parts.port)
    try:
        writer.write(head)
        async with asyncio.timeout(10):
            reply = await reader.read()
    finally:
        writer.close()
    match = STATUS_LINE.match(reply)
    assert match, reply[:200]
    return int(match.group(1)), reply.partition(b"\r\n\r\n")[2]


def port_of(service) -> int:
    return urlsplit(service.url).port


# --- Hosts ------------------------------------------------------------------------------


async def rebound_doors(service, host: str) -> dict[str, int]:
    """The status each door answers a page at http://HOST, whose name was pointed at this
    machine, with (Origin and Host both name it, as a browser sends them)."""
    origin = f"http://{host}"
    headers = {"Host": host, "Origin": origin}
    answers = {}
    async with aiohttp.ClientSession() as http:
        for method, path in (("POST", "/jobs"), ("GET", "/jobs"), ("GET", "/jobs/stats"),
                             ("DELETE", "/jobs/00000000-0000-4000-8000-000000000000"),
                             ("GET", "/"), ("GET", "/static/app.js"), ("GET", SIO_POLL)):
            async with http.request(method, service.url + path, headers=headers) as response:
                answers[f"{method} {path}"] = response.status
                if response.status == 421:
                    body = await response.json()
                    assert body["error"]["code"] == "misdirected_request", body
        for path in ("/ws", SIO_WS):
            try:
                socket = await http.ws_connect(service.url + path, headers=headers)
            except aiohttp.WSServerHandshakeError as exc:
                answers[f"WS {path}"] = exc.status
            else:
                answers[f"WS {path}"] = 101
                await socket.close()
    return answers


async def test_a_rebound_host_is_refused_421_on_every_door(service_process):
    service = await service_process()
    port = port_of(service)
    refused = await rebound_doors(service, f"evil.example:{port}")
    assert set(refused.values()) == {421}, refused
    assert any("refused a request for Host 'evil.example:" in line and "ALLOWED_HOSTS" in line
               for line in service.log), service.log
    # The names this machine is reached by are answered, on each door.
    for host in (f"localhost:{port}", f"127.0.0.1:{port}", f"[::1]:{port}", "localhost"):
        answers = await rebound_doors(service, host)
        assert 421 not in answers.values(), (host, answers)
        assert answers["POST /jobs"] == 201 and answers["WS /ws"] == 101, (host, answers)


async def test_allowed_hosts_and_cors_names_are_answered_and_star_warns(service_process):
    service = await service_process({"ALLOWED_HOSTS": "jobs.example.com, LAN-Box",
                                     "CORS_ORIGINS": "https://app.example:8443"})
    port = port_of(service)
    for host in ("jobs.example.com", f"lan-box:{port}", f"app.example:{port}",
                 "JOBS.example.com:443"):
        answers = await rebound_doors(service, host)
        assert answers["POST /jobs"] == 201 and answers["WS /ws"] == 101, (host, answers)
    assert set((await rebound_doors(service, f"evil.example:{port}")).values()) == {421}
    assert any("answering requests sent to IP addresses, app.example, jobs.example.com, "
               "lan-box, localhost" in line for line in service.log), service.log

    anything = await service_process({"ALLOWED_HOSTS": "*"})
    answers = await rebound_doors(anything, f"evil.example:{port_of(anything)}")
    assert answers["POST /jobs"] == 201, answers
    assert any("ALLOWED_HOSTS=*" in line and "DNS rebinding" in line
               for line in anything.log), anything.log


async def test_on_every_interface_addresses_are_answered_and_names_must_be_listed(
        service_process):
    service = await service_process(args=["--host", "0.0.0.0"])
    port = port_of(service)
    # A LAN user who types the machine's address is not locked out ...
    status, _ = await raw(service.url, f"POST /jobs HTTP/1.1\r\nHost: 192.0.2.7:{port}\r\n"
                          "Content-Length: 0\r\nConnection: close\r\n\r\n".encode())
    assert status == 201
    # ... and a name is refused with what to do about it, in the answer and the log.
    status, body = await raw(service.url, f"GET /jobs HTTP/1.1\r\nHost: my-box.lan:{port}\r\n"
                             "Connection: close\r\n\r\n".encode())
    assert status == 421 and b"ALLOWED_HOSTS" in body
    assert any("a request for another name gets 421: list the names clients use in "
               "ALLOWED_HOSTS" in line for line in service.log), service.log


def test_a_listening_address_that_is_a_name_is_answered(jobs_file):
    settings = jobservice.load_settings(["--data", str(jobs_file), "--host", "Kitchen.lan"], {})
    hosts = jobservice.HostCheck(settings)
    assert hosts.allows("kitchen.lan:3000") and hosts.allows("KITCHEN.LAN")
    assert not hosts.allows("pantry.lan:3000") and not hosts.allows("kitchen.lan:x")


@pytest.mark.parametrize("raw_value", ["http://jobs.example", "jobs.example:8080",
                                       "jobs.example/path", "jöbs.example"])
def test_an_allowed_host_that_is_not_a_name_stops_start_up(jobs_file, raw_value):
    with pytest.raises(jobservice.ConfigError, match="ALLOWED_HOSTS"):
        jobservice.load_settings(["--data", str(jobs_file)], {"ALLOWED_HOSTS": raw_value})


# --- CORS_ORIGINS=* and the cookie --------------------------------------------------------


async def login(http: aiohttp.ClientSession, url: str) -> str:
    async with http.post(f"{url}/session", json={"token": TOKEN}) as response:
        assert response.status == 204, await response.text()
        return response.cookies[jobservice.SESSION_COOKIE].value


async def sio_connect(http, url: str, headers: dict, auth: dict | None = None) -> str:
    """Open a Socket.IO session over a WebSocket and send CONNECT: the first packet of
    the answer (CONNECTED once the CONNECT was taken, 44 for a refusal)."""
    socket = await http.ws_connect(url + SIO_WS, headers=headers)
    try:
        assert (await socket.receive(timeout=5)).data.startswith("0{")
        await socket.send_str("40" + (json.dumps(auth) if auth else ""))
        return (await socket.receive(timeout=5)).data
    finally:
        await socket.close()


async def ws_status(http, url: str, headers: dict) -> int:
    try:
        socket = await http.ws_connect(url + "/ws", headers=headers)
    except aiohttp.WSServerHandshakeError as exc:
        return exc.status
    await socket.close()
    return 101


async def test_cors_star_never_lets_the_cookie_open_an_event_stream(service_process):
    service = await service_process({"API_TOKEN": TOKEN, "CORS_ORIGINS": "*"})
    other_port = f"http://127.0.0.1:{port_of(service) + 1}"  # a page on another port
    async with aiohttp.ClientSession(cookie_jar=aiohttp.DummyCookieJar()) as http:
        cookie = {"Cookie": f"{jobservice.SESSION_COOKIE}={await login(http, service.url)}"}
        foreign = {**cookie, "Origin": other_port}
        assert await ws_status(http, service.url, foreign) == 401
        refusal = await sio_connect(http, service.url, foreign)
        assert refusal.startswith("44{") and "unauthorized" in refusal, refusal
        # On long-polling too, a session opens, but the cookie does not stand for a token.
        async with http.get(service.url + SIO_POLL, headers=foreign) as response:
            sid = json.loads((await response.text())[1:])["sid"]
        polled = f"{service.url}{SIO_POLL}&sid={sid}"
        async with http.post(polled, data="40", headers=foreign) as response:
            assert await response.text() == "ok"
        async with http.get(polled, headers=foreign) as response:
            refusal = await response.text()
        assert refusal.startswith("44{") and "unauthorized" in refusal, refusal

        # The page's own origin still opens both with the cookie ...
        own = {**cookie, "Origin": service.url}
        assert await ws_status(http, service.url, own) == 101
        assert (await sio_connect(http, service.url, own)).startswith(CONNECTED)
        # ... and any origin CORS_ORIGINS lets in does with the token itself.
        bearer = {"Authorization": f"Bearer {TOKEN}", "Origin": other_port}
        assert await ws_status(http, service.url, bearer) == 101
        assert (await sio_connect(http, service.url, {"Origin": other_port},
                                  {"token": TOKEN})).startswith(CONNECTED)


async def test_an_origin_listed_by_name_may_use_the_cookie(service_process):
    app = "http://localhost:5173"
    service = await service_process({"API_TOKEN": TOKEN, "CORS_ORIGINS": app})
    async with aiohttp.ClientSession(cookie_jar=aiohttp.DummyCookieJar()) as http:
        cookie = {"Cookie": f"{jobservice.SESSION_COOKIE}={await login(http, service.url)}"}
        assert await ws_status(http, service.url, {**cookie, "Origin": app}) == 101
        assert (await sio_connect(http, service.url, {**cookie, "Origin": app})
                ).startswith(CONNECTED)


# --- Secrets -----------------------------------------------------------------------------


def start_up(env: dict, jobs_file) -> tuple[int, str]:
    """Run the service until it stops by itself: (its exit code, what it wrote)."""
    result = subprocess.run([sys.executable, str(ROOT / "jobservice.py"), "--port", "0",
                             "--data", str(jobs_file)], env={**os.environ, **env},
                            capture_output=True, text=True, timeout=30, check=False)
    return result.returncode, result.stdout + result.stderr


@pytest.mark.parametrize("variable", ["API_TOKEN", "API_TOKENS_FILE"])
def test_a_short_token_stops_start_up_with_how_to_make_one(jobs_file, tmp_path, variable):
    if variable == "API_TOKEN":
        env, where = {"API_TOKEN": "a"}, "API_TOKEN is 1 character long"
    else:
        tokens = tmp_path / "tokens"
        tokens.write_text(f"# the team\n{TOKEN}\nshort-token\n")
        env, where = {"API_TOKENS_FILE": str(tokens)}, "the token on line 3 of API_TOKENS_FILE"
    code, output = start_up(env, jobs_file)
    assert code == 2, output
    assert output.count("\n") == 1 and where in output, output
    assert ("at least 16, or it can be guessed: make one with python3 -c 'import secrets; "
            "print(secrets.token_urlsafe(32))'") in output, output
    assert "short-token" not in output  # a token, even a bad one, is never written out
    assert not jobs_file.exists()


async def test_a_short_token_in_a_reloaded_file_keeps_the_old_ones(service_process, tmp_path):
    tokens = tmp_path / "tokens"
    tokens.write_text(f"{TOKEN}\n")
    service = await service_process({"API_TOKENS_FILE": str(tokens)})
    tokens.write_text("tiny\n")
    service.process.send_signal(signal.SIGHUP)
    async with asyncio.timeout(10):
        while not any("tokens not reloaded" in line for line in service.log):  # noqa: ASYNC110
            await asyncio.sleep(0.02)
    assert any("the token on line 1 of API_TOKENS_FILE" in line and "at least 16" in line
               for line in service.log), service.log
    async with aiohttp.ClientSession() as http:
        for token, expected in ((TOKEN, 200), ("tiny", 401)):
            async with http.get(f"{service.url}/jobs",
                                headers={"Authorization": f"Bearer {token}"}) as response:
                assert response.status == expected


async def test_bytes_that_are_not_text_in_a_token_or_cookie_are_a_401(service_process):
    service = await service_process({"API_TOKEN": TOKEN})
    host = f"Host: localhost:{port_of(service)}\r\n".encode()
    far = b"99999999999"  # a cookie that has not expired: its signature is what is read
    for name, header in (("a Bearer token that is not UTF-8", b"Authorization: Bearer \xff\xfe"),
                         ("a Bearer token in Latin-1", b"Authorization: Bearer caf\xe9-token"),
                         ("a cookie signature that is not ASCII",
                          b"Cookie: jobservice_session=" + far + b".\xc3\xa9" + b"0" * 62),
                         ("a cookie that is not UTF-8",
                          b"Cookie: jobservice_session=" + far + b".\xff" + b"0" * 63)):
        # Two refusals each: ten a minute from one address are allowed before a 429.
        for target in (b"GET /jobs", b"GET /ws", b"GET /session"):
            status, body = await raw(service.url, target + b" HTTP/1.1\r\n" + host + header
                                     + b"\r\nContent-Length: 0\r\nConnection: close\r\n\r\n")
            expected = 200 if target == b"GET /session" else 401
            assert status == expected, (name, target, status, body)
            if status == 200:
                assert json.loads(body)["authenticated"] is False
        status, body = await raw(service.url, b"GET " + SIO_POLL.encode() + b" HTTP/1.1\r\n"
                                 + host + header + b"\r\nConnection: close\r\n\r\n")
        assert status == 200 and body.startswith(b"0{"), (name, status, body)
    # JSON can name a character that is not one either: a lone surrogate, as a token.
    async with aiohttp.ClientSession() as http:
        async with http.post(f"{service.url}/session",
                             data=b'{"token": "\\ud800-0123456789abcdef"}',
                             headers={"Content-Type": "application/json"}) as response:
            assert response.status == 401, await response.text()
    assert not [line for line in service.log if "Traceback" in line or "failed" in line], \
        service.log


# --- The store's files -----------------------------------------------------------------


@pytest.mark.file_only
async def test_a_symlink_named_like_the_journal_is_not_followed(service_process, jobs_file,
                                                                tmp_path):
    precious = tmp_path / "precious.txt"
    precious.write_text("someone else's file\n")
    journal = jobs_file.with_name(jobs_file.name + ".journal")
    service = await service_process()
    journal.symlink_to(precious)  # before the first write opens the journal
    async with aiohttp.ClientSession() as http:
        async with http.post(f"{service.url}/jobs") as response:
            assert response.status == 503, await response.text()
            assert (await response.json())["error"]["code"] == "storage_unavailable"
        line = await service.logged("a symbolic link, which the service does not follow")
        assert str(journal) in line, service.log
        journal.unlink()
        async with http.post(f"{service.url}/jobs") as response:
            assert response.status == 201, await response.text()
    assert await service.stop() == 0
    assert precious.read_text() == "someone else's file\n"

    # At start, a journal that is a link is refused too, saying so, and nothing is touched.
    journal.symlink_to(precious)
    code, output = start_up({}, jobs_file)
    assert code == 2 and "a symbolic link" in output and str(journal) in output, output
    assert precious.read_text() == "someone else's file\n" and journal.is_symlink()


@pytest.mark.file_only
async def test_a_symlink_named_like_the_snapshots_temp_file_is_not_followed(
        service_process, jobs_file, tmp_path):
    precious = tmp_path / "precious.txt"
    precious.write_text("someone else's file\n")
    temp = jobs_file.with_name(jobs_file.name + ".tmp")
    temp.symlink_to(precious)
    service = await service_process()
    async with aiohttp.ClientSession() as http:
        async with http.post(f"{service.url}/jobs") as response:
            assert response.status == 201
            job_id = (await response.json())["id"]
    assert await service.stop() == 0  # the snapshot at shutdown is where the temp is written
    assert precious.read_text() == "someone else's file\n"
    assert temp.is_symlink()
    assert any("cannot write the snapshot" in line and "a symbolic link" in line
               and str(temp) in line for line in service.log), service.log
    # The journal kept the job: with the link gone, it is there after a restart.
    temp.unlink()
    restarted = await service_process()
    async with aiohttp.ClientSession() as http:
        async with http.get(f"{restarted.url}/jobs/{job_id}") as response:
            assert response.status == 200


# --- Stored jobs -------------------------------------------------------------------------


async def test_max_stored_jobs_refuses_new_jobs_past_it(service_process):
    service = await service_process({"MAX_STORED_JOBS": "3", "JOB_DELAY_MIN": "0",
                                     "JOB_DELAY_MAX": "0"})
    assert any("at most 3 stored (MAX_STORED_JOBS)" in line for line in service.log)
    async with aiohttp.ClientSession() as http:
        ids = []
        for _ in range(3):
            async with http.post(f"{service.url}/jobs") as response:
                assert response.status == 201, await response.text()
                ids.append((await response.json())["id"])
        # Resolved jobs count as much as pending ones: it is the store that is bounded.
        async with asyncio.timeout(20):
            while True:
                async with http.get(f"{service.url}/jobs/stats") as response:
                    if (await response.json()).get("pending") == 0:
                        break
                await asyncio.sleep(0.05)
        async with http.post(f"{service.url}/jobs") as response:
            assert response.status == 503, await response.text()
            assert (await response.json())["error"]["code"] == "too_many_stored_jobs"
            retry_after = int(response.headers["Retry-After"])
            # The earliest finished job expires after JOB_RETENTION (7 days): capped at an hour.
            assert retry_after == 3600
        async with http.delete(f"{service.url}/jobs/{ids[0]}") as response:
            assert response.status in (200, 204)
        async with asyncio.timeout(10):
            while True:  # a Redis-mode node counts its registry, which a deletion reaches
                async with http.post(f"{service.url}/jobs") as response:
                    if response.status == 201:
                        break
                    assert response.status == 503
                await asyncio.sleep(0.05)


async def test_a_full_store_still_takes_retries(service_process):
    """A retry stores no new job: MAX_STORED_JOBS does not refuse it."""
    service = await service_process({
        "MAX_STORED_JOBS": "1", "JOB_MAX_ATTEMPTS": "1", "PHOTO_REUSE": "never",
        "UNSPLASH_ACCESS_KEY": "key", "UNSPLASH_API_URL": "http://127.0.0.1:9"})  # refused
    async with aiohttp.ClientSession() as http:
        async with http.post(f"{service.url}/jobs") as response:
            job_id = (await response.json())["id"]
        async with asyncio.timeout(20):
            while True:
                async with http.get(f"{service.url}/jobs/{job_id}") as response:
                    if (await response.json())["status"] == "failed":
                        break
                await asyncio.sleep(0.05)
        async with http.post(f"{service.url}/jobs") as response:
            assert response.status == 503
        async with http.post(f"{service.url}/jobs/{job_id}/retry") as response:
            assert response.status == 202, await response.text()


@pytest.mark.parametrize("raw_value", ["-1", "lots", "1.5"])
def test_a_bad_max_stored_jobs_stops_start_up(jobs_file, raw_value):
    with pytest.raises(jobservice.ConfigError, match="MAX_STORED_JOBS"):
        jobservice.load_settings(["--data", str(jobs_file)], {"MAX_STORED_JOBS": raw_value})
