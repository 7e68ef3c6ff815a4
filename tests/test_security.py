"""Security: the Unsplash key stays inside the process; `/static` serves only what is in
`static/`; cross-origin rules per CORS_ORIGINS for HTTP and WebSockets; every response
carries the Content-Security-Policy and nosniff; errors are JSON and leak no internals.
"""

from __future__ import annotations

import asyncio
import json
import re
import secrets
import sys
from urllib.parse import urlsplit

import aiohttp
import pytest
from aiohttp import web
from conftest import ROOT, create_jobs

import jobservice

FIRST_LINE_OF_SERVICE = b'"""jobservice: jobs that resolve'
UNSPLASH_CDN = {"https://images.unsplash.com", "https://plus.unsplash.com"}


# --- Helpers ----------------------------------------------------------------------------


class Recorder:
    """Everything the service says over HTTP, as text: status lines, headers and bodies."""

    def __init__(self, url: str):
        self.url = url
        self.texts: list[str] = []
        self.http = aiohttp.ClientSession()

    async def request(self, method: str, path: str, **kwargs) -> tuple[int, object]:
        async with self.http.request(method, f"{self.url}{path}", **kwargs) as response:
            body = await response.read()
            self.texts.append(f"{response.status} {response.reason}")
            self.texts.extend(f"{name}: {value}" for name, value in response.headers.items())
            self.texts.append(body.decode("utf-8", "replace"))
            try:
                return response.status, json.loads(body)
            except ValueError:
                return response.status, body

    async def close(self) -> None:
        await self.http.close()


async def start_fake_unsplash(key: str):
    """tests/fake_unsplash.py as a process of its own; (process, base URL)."""
    process = await asyncio.create_subprocess_exec(
        sys.executable, str(ROOT / "tests" / "fake_unsplash.py"), "--port", "0", "--key", key,
        stdout=asyncio.subprocess.PIPE)
    line = await asyncio.wait_for(process.stdout.readline(), 20)
    return process, f"http://127.0.0.1:{json.loads(line)['port']}"


@pytest.fixture
async def fake_process():
    started = []

    async def start(key: str) -> str:
        process, url = await start_fake_unsplash(key)
        started.append(process)
        return url

    yield start
    for process in started:
        if process.returncode is None:
            process.kill()
            await process.wait()


async def collect(ws: aiohttp.ClientWebSocketResponse, texts: list[str], until) -> None:
    """Read text messages into texts until until(texts) holds."""
    async with asyncio.timeout(20):
        while not until(texts):
            message = await ws.receive()
            assert message.type == aiohttp.WSMsgType.TEXT, message
            texts.append(message.data)
            if message.data == "2":  # an Engine.IO ping
                await ws.send_str("3")


def finished(ids):
    """A predicate over event texts: every job in ids has resolved or failed."""
    def done(texts):
        ended = set()
        for text in texts:
            if text.startswith("42["):  # a Socket.IO EVENT packet
                text = text[2:]
            elif not text.startswith("["):
                continue
            event = json.loads(text)
            if event[0] == "ON_RESOLVED_JOB":
                ended.add(event[1]["id"])
        return set(ids) <= ended
    return done


def assert_absent(secret: str, where: str, texts) -> None:
    for text in texts:
        for piece in {secret, secret[: len(secret) // 2], secret[len(secret) // 2:]}:
            assert piece not in text, f"the key (or half of it) is in {where}: {text[:300]!r}"


# --- The key ----------------------------------------------------------------------------


async def test_the_key_never_appears_in_responses_events_files_or_logs(
        service_process, fake_process, jobs_file):
    key = f"KEYMARKER{secrets.token_hex(16)}"
    fake_url = await fake_process(key)
    # Jobs that must have a fresh photo, so that failures put Unsplash's words in jobs.
    service = await service_process({"UNSPLASH_ACCESS_KEY": key, "UNSPLASH_API_URL": fake_url,
                                     "JOB_MAX_ATTEMPTS": "2", "PHOTO_REUSE": "never"})
    say = Recorder(service.url)
    events, sio_events = [], []
    async with aiohttp.ClientSession() as http:
        ws = await http.ws_connect(f"{service.url}/ws?since=0")
        sio = await http.ws_connect(f"{service.url}/socket.io/?EIO=4&transport=websocket")
        await sio.send_str("40")
        try:
            # One batch of photos, all used (so the next jobs need new calls) ...
            ids = []
            for _ in range(jobservice.UNSPLASH_BATCH):
                status, body = await say.request("POST", "/jobs")
                assert status == 201
                ids.append(body["id"])
            await collect(ws, events, finished(ids))
            # ... then a 500 and bad JSON use up a job's two attempts, and a 401 rejects
            # the key for the next.
            async with http.post(f"{fake_url}/_control",
                                 json={"script": ["500", "badjson"], "mode": "401"}) as r:
                assert r.status == 200
            _, body = await say.request("POST", "/jobs")
            given_up = body["id"]
            await collect(ws, events, finished([given_up]))
            _, body = await say.request("POST", "/jobs")
            rejected = body["id"]
            await collect(ws, events, finished([rejected]))
            await say.request("POST", f"/jobs/{rejected}/retry")
            await collect(ws, events, lambda texts: sum(
                rejected in text and "ON_RESOLVED_JOB" in text for text in texts) == 2)
            await collect(sio, sio_events, finished([*ids, given_up, rejected]))
        finally:
            await ws.close()
            await sio.close()
        async with http.get(f"{fake_url}/_stats") as response:
            stats = await response.json()

    for path in ("/jobs", f"/jobs/{ids[0]}", f"/jobs/{given_up}", f"/jobs/{rejected}",
                 "/healthz", "/", "/openapi.json", "/static/app.js", "/nope"):
        await say.request("GET", path)
    await say.close()
    await service.stop()

    # The test saw what it meant to: photos from the fake, bought with the key, and
    # both failure paths.
    assert stats["calls"] >= 4 and stats["photos"] >= jobservice.UNSPLASH_BATCH
    joined = "\n".join(say.texts)
    assert '"source": "unsplash"' in joined or '"source":"unsplash"' in joined
    assert "gave up after 2 attempts" in joined and "rejected the access key" in joined
    assert any("listening on" in line for line in service.log)

    assert_absent(key, "an HTTP response", say.texts)
    assert_absent(key, "a /ws event", events)
    assert_absent(key, "a Socket.IO packet", sio_events)
    assert_absent(key, "the log", service.log)
    for path in jobs_file.parent.iterdir():
        assert_absent(key, path.name, [path.read_text("utf-8", "replace")])


async def test_a_key_echoed_by_the_api_stays_out_of_jobs_and_logs(service_process,
                                                                   aiohttp_server):
    """An API (or a proxy before it) that repeats the Authorization header in its error
    bodies and headers: the key must not travel on into a job's error or a log line."""
    key = f"ECHOMARKER{secrets.token_hex(16)}"
    calls = []

    async def photos(request: web.Request) -> web.Response:
        calls.append(request.headers.get("Authorization"))
        echo = f"bad request from {request.headers.get('Authorization')} at {request.url}"
        status = 500 if len(calls) == 1 else 401
        return web.Response(status=status, text=echo, headers={"X-Echo": echo})

    echo_app = web.Application()
    echo_app.router.add_get("/photos/random", photos)
    server = await aiohttp_server(echo_app)
    api = str(server.make_url("")).rstrip("/")
    service = await service_process({"UNSPLASH_ACCESS_KEY": key, "UNSPLASH_API_URL": api,
                                     "JOB_MAX_ATTEMPTS": "1", "PHOTO_REUSE": "never"})
    say = Recorder(service.url)
    events = []
    async with aiohttp.ClientSession() as http, http.ws_connect(f"{service.url}/ws") as ws:
        ids = []
        for _ in range(2):
            _, body = await say.request("POST", "/jobs")
            ids.append(body["id"])
            await collect(ws, events, finished([body["id"]]))
    for job_id in ids:
        status, job = await say.request("GET", f"/jobs/{job_id}")
        assert status == 200 and job["status"] == "failed", job
    await say.request("GET", "/jobs")
    await say.close()
    await service.stop()

    assert calls == [f"Client-ID {key}"] * 2
    assert_absent(key, "an HTTP response", say.texts)
    assert_absent(key, "a /ws event", events)
    assert_absent(key, "the log", service.log)


# --- Path traversal ---------------------------------------------------------------------

TRAVERSALS = [
    "/static/../jobservice.py",
    "/static/%2e%2e/jobservice.py",
    "/static/%2E%2E/jobservice.py",
    "/static/.%2e/jobservice.py",
    "/static/..%2fjobservice.py",
    "/static/..%2Fjobservice.py",
    "/static/%2e%2e%2fjobservice.py",
    "/static/%252e%252e/jobservice.py",
    "/static/..%5cjobservice.py",
    "/static/..\\jobservice.py",
    "/static/%c0%ae%c0%ae/jobservice.py",
    "/static/js/../../jobservice.py",
    "/static/js/%2e%2e/%2e%2e/jobservice.py",
    "/static/./../pyproject.toml",
    "/static/../../../../../../etc/passwd",
    "/static/%2e%2e/%2e%2e/%2e%2e/%2e%2e/etc/passwd",
    "/static//etc/passwd",
    "/static/%2fetc%2fpasswd",
    "/static/%2Fetc/passwd",
    "/static/..;/jobservice.py",
    "/static/jobservice.py%00.js",
    "/static/app.js/../../jobservice.py",
    "http://test/static/../jobservice.py",  # absolute-form request target
    "/static/",
    "/static/js/",
    "/static",
]
SECRETS_ON_DISK = [FIRST_LINE_OF_SERVICE, b"root:x:0:0", b"[build-system]"]


async def raw_get(url: str, target: str) -> bytes:
    parts = urlsplit(url)
    reader, writer = await asyncio.open_connection(parts.hostname, parts.port)
    try:
        writer.write(f"GET {target} HTTP/1.1\r\nHost: localhost\r\nConnection: close\r\n\r\n"
                     .encode())
        async with asyncio.timeout(5):
            return await reader.read()
    finally:
        writer.close()


async def test_path_traversal_under_static_never_serves_a_file_outside_it(service_process):
    service = await service_process()
    # The control: a real static file is served, so refusals below mean something.
    reply = await raw_get(service.url, "/static/app.js")
    assert reply.startswith(b"HTTP/1.1 200 ")
    assert reply.endswith((ROOT / "static" / "app.js").read_bytes())

    problems = []
    for target in TRAVERSALS:
        reply = await raw_get(service.url, target)
        head, _, body = reply.partition(b"\r\n\r\n")
        status = int(head.split(b" ", 2)[1]) if head.startswith(b"HTTP/1.1 ") else None
        leaked = [secret for secret in SECRETS_ON_DISK if secret in reply]
        if leaked:
            problems.append(f"{target}: served {leaked}")
        elif status not in (403, 404):
            problems.append(f"{target}: {head[:60]!r}")
        elif b"application/json" not in head or not body.startswith(b'{"error": '):
            kind = re.search(rb"Content-Type: ([^\r]*)", head)
            problems.append(f"{target}: {status}, not a JSON error: "
                            f"{kind and kind.group(1)!r} {body[:80]!r}")
    assert problems == [], "\n".join(problems)


# --- Cross-origin rules -----------------------------------------------------------------

ORIGINS = ["https://app.example", "http://localhost:5173", "https://evil.example", "null",
           "https://app.example.evil.example", "http://app.example", "https://APP.example",
           "https://app.example:8443"]


@pytest.mark.parametrize("cors, allowed", [
    ("", set()),
    ("https://app.example, http://localhost:5173", {"https://app.example",
                                                   "http://localhost:5173"}),
    ("*", set(ORIGINS)),
], ids=["same-origin-only", "listed", "any"])
async def test_cross_origin_rules_for_http_and_websockets(start_service, cors, allowed):
    client = await start_service({"CORS_ORIGINS": cors})
    own = f"http://{client.server.host}:{client.server.port}"
    problems = []
    for origin in ORIGINS:
        ok = origin in allowed
        response = await client.get("/jobs", headers={"Origin": origin})
        granted = response.headers.get("Access-Control-Allow-Origin")
        if granted != ((origin, "*")[cors == "*"] if ok else None):
            problems.append(f"GET /jobs from {origin}: Allow-Origin {granted!r}")
        if ok and "X-Jobs-Seq" not in response.headers.get("Access-Control-Expose-Headers", ""):
            problems.append(f"GET /jobs from {origin}: X-Jobs-Seq not exposed")
        if ok and granted != "*" and "Origin" not in response.headers.getall("Vary", []):
            problems.append(f"GET /jobs from {origin}: no Vary: Origin")

        preflight = await client.options("/jobs", headers={
            "Origin": origin, "Access-Control-Request-Method": "POST",
            "Access-Control-Request-Headers": "content-type"})
        if preflight.status != (204 if ok else 403):
            problems.append(f"preflight from {origin}: {preflight.status}")
        if not ok and (await preflight.json())["error"]["code"] != "origin_not_allowed":
            problems.append(f"preflight from {origin}: {await preflight.text()}")

        for path in ("/ws", "/socket.io/?EIO=4&transport=websocket"):
            try:
                ws = await client.ws_connect(path, headers={"Origin": origin})
            except aiohttp.WSServerHandshakeError as refused:
                if ok or refused.status != 403:
                    problems.append(f"{path} from {origin}: refused with {refused.status}")
            else:
                await ws.close()
                if not ok:
                    problems.append(f"{path} from {origin}: opened")
    for path in ("/ws", "/socket.io/?EIO=4&transport=websocket"):
        for headers in ({"Origin": own}, {}):  # the page itself, and scripts
            ws = await client.ws_connect(path, headers=headers)
            await ws.close()
    assert problems == [], "\n".join(problems)


async def test_refused_websocket_handshakes_are_json(start_service):
    client = await start_service({"CORS_ORIGINS": "https://app.example"})
    headers = {"Origin": "https://evil.example", "Upgrade": "websocket",
               "Connection": "Upgrade", "Sec-WebSocket-Key": "dGhlIHNhbXBsZSBub25jZQ==",
               "Sec-WebSocket-Version": "13"}
    response = await client.get("/ws", headers=headers)
    assert response.status == 403 and response.content_type == "application/json"
    assert (await response.json())["error"]["code"] == "origin_not_allowed"
    response = await client.get("/socket.io/?EIO=4&transport=websocket", headers=headers)
    assert response.status == 403 and response.content_type == "application/json"
    assert await response.json() == {
        "code": 4, "message": "origin https://evil.example is not allowed; add it to CORS_ORIGINS"}


# --- Content-Security-Policy and nosniff ------------------------------------------------


def policy(header: str) -> dict[str, list[str]]:
    directives = {}
    for part in header.split(";"):
        words = part.split()
        if words:
            assert words[0] not in directives, f"{words[0]} twice"
            directives[words[0]] = words[1:]
    return directives


@pytest.mark.parametrize("api_url, api_origin", [
    (None, "https://api.unsplash.com"),
    ("https://unsplash-proxy.example:8443/v1/", "https://unsplash-proxy.example:8443"),
    ("http://127.0.0.1:9999", "http://127.0.0.1:9999"),
], ids=["default", "proxy-with-path", "loopback"])
async def test_every_response_carries_the_csp_and_nosniff(start_service, api_url, api_origin):
    client = await start_service({"UNSPLASH_API_URL": api_url} if api_url else {})
    [job_id] = await create_jobs(client, 1)
    requests = [("GET", "/"), ("GET", "/static/app.js"), ("GET", "/static/style.css"),
                ("GET", "/static/favicon.svg"), ("GET", "/openapi.json"), ("GET", "/healthz"),
                ("GET", "/jobs"), ("GET", f"/jobs/{job_id}"), ("POST", "/jobs"),
                ("GET", "/nope"), ("DELETE", "/jobs"), ("GET", "/jobs?limit=0"),
                ("POST", f"/jobs/{job_id}/retry"), ("GET", "/static/../jobservice.py"),
                ("GET", "/ws")]
    expected_images = {"'self'", *UNSPLASH_CDN, api_origin}
    for method, path in requests:
        response = await client.request(method, path)
        where = f"{method} {path} ({response.status})"
        assert response.headers.get("X-Content-Type-Options") == "nosniff", where
        csp = policy(response.headers.get("Content-Security-Policy", ""))
        assert csp.get("default-src") == ["'self'"], where
        assert set(csp.get("img-src", [])) == expected_images, where
        for directive in ("default-src", "script-src", "style-src", "connect-src"):
            for source in csp.get(directive, []):
                assert source not in ("*", "'unsafe-inline'", "'unsafe-eval'", "data:"), where
        assert csp.get("frame-ancestors") == ["'none'"], where
    # The page learns the same image origins (it checks photo URLs against them).
    page = await (await client.get("/")).text()
    meta = re.search(r'<meta name="image-origins" content="([^"]*)">', page)
    assert meta and set(meta.group(1).split()) == expected_images - {"'self'"}


async def test_credentials_in_the_api_url_stay_out_of_headers_and_responses(start_service):
    """UNSPLASH_API_URL may point at an authenticating proxy: its origin goes into the
    CSP, but an origin has no user or password, and neither may reach a client."""
    client = await start_service({"UNSPLASH_API_URL": "https://user:pw-MARKER@proxy.example"})
    texts = []
    for path in ("/", "/healthz", "/jobs"):
        response = await client.get(path)
        texts.extend(f"{name}: {value}" for name, value in response.headers.items())
        texts.append(await response.text())
    csp = policy((await client.get("/")).headers["Content-Security-Policy"])
    assert "https://proxy.example" in csp["img-src"]
    assert_absent("pw-MARKER", "a response", texts)


# --- Errors -----------------------------------------------------------------------------


async def test_error_responses_are_json_and_leak_nothing(service_process):
    service = await service_process()
    say = Recorder(service.url)
    _, body = await say.request("POST", "/jobs")
    pending = body["id"]
    errors = [
        ("GET", "/nope", {}),
        ("DELETE", "/jobs", {}),
        ("PUT", f"/jobs/{pending}", {}),
        ("GET", "/jobs?limit=0", {}),
        ("GET", "/jobs?limit=%C2%B2", {}),
        ("GET", "/jobs?bogus=1", {}),
        ("GET", "/jobs?after=nope", {}),
        ("GET", "/jobs/nope", {}),
        ("POST", "/jobs/nope/retry", {}),
        ("POST", f"/jobs/{pending}/retry", {}),
        ("POST", "/jobs", {"data": b"{oops"}),
        ("POST", "/jobs", {"data": b"[" * 30_000 + b"]" * 30_000}),
        ("POST", "/jobs", {"data": b"x" * 70_000}),
        ("OPTIONS", "/jobs", {"headers": {"Origin": "https://evil.example",
                                          "Access-Control-Request-Method": "POST"}}),
        ("GET", "/ws?since=x", {}),
        ("GET", "/ws?since=%C2%B2", {}),
        ("GET", "/ws", {}),
        ("GET", "/socket.io/?EIO=4&transport=polling&sid=nope", {}),
        ("POST", "/socket.io/?EIO=4&transport=polling", {}),
        ("POST", "/socket.io/?EIO=4&transport=websocket", {}),
        ("GET", "/static/", {}),
        ("GET", "/static/nope.js", {}),
    ]
    problems = []
    for method, path, kwargs in errors:
        before = len(say.texts)
        async with say.http.request(method, f"{service.url}{path}", **kwargs) as response:
            body = await response.read()
            text = body.decode("utf-8", "replace")
            say.texts.append(text)
            where = f"{method} {path} -> {response.status}"
            if response.status < 400:
                problems.append(f"{where}: not an error")
            if response.content_type != "application/json":
                problems.append(f"{where}: {response.content_type}")
            try:
                data = json.loads(body)
            except ValueError:
                problems.append(f"{where}: not JSON: {text[:100]!r}")
                continue
            ok = (isinstance(data.get("error"), dict)
                  and set(data["error"]) == {"code", "message"}) or set(data) == {"code",
                                                                                  "message"}
            if not ok:
                problems.append(f"{where}: not an error object: {text[:100]!r}")
        for leak in ("Traceback", 'File "', ".py", "site-packages", str(ROOT), "Error:",
                     "aiohttp", "line "):
            if any(leak in text for text in say.texts[before:]):
                problems.append(f"{where}: leaks {leak!r}: {text[:200]!r}")
    await say.close()
    assert problems == [], "\n".join(problems)


async def test_a_route_added_without_the_guard_stops_start_up(aiohttp_client, jobs_file):
    """The guard (tokens, Host, CORS, security headers, JSON errors) is wrapped around each
    route's handler by add_route(), not run as a middleware: a route added straight to
    the router would be served without it, so the app refuses to start."""
    app = jobservice.create_app(jobservice.load_settings(["--data", str(jobs_file)], {}))

    async def naked(request):
        return web.Response(text="no token needed")

    app.router.add_get("/naked", naked)
    with pytest.raises(RuntimeError, match=r"(HEAD|GET) /naked is served without the guard"):
        await aiohttp_client(app)
