"""The old React frontend's Socket.IO pattern, unchanged, in a real browser: a page served
from another origin (as Vite's dev server at :5173 would serve it) loads socket.io-client's
browser bundle from npm and calls `io(serviceUrl)` with its default options, so it starts on
Engine.IO long-polling (cross-origin XHR, hence CORS) and upgrades to a WebSocket.

- default options: every ON_CREATED_JOB and ON_RESOLVED_JOB arrives exactly once, with its
  offset argument; the connection opened on polling and ended on the websocket transport;
- `window.WebSocket` deleted before any script runs: long-polling alone still delivers every
  event exactly once, and the transport stays "polling";
- the page's origin not in CORS_ORIGINS: the browser refuses the handshake and the page
  gets connect_error, never connect;
- no console or page errors (the refused case allows only Chromium's CORS reports);
- the same page against `--workers 4` (Redis mode): the kernel hands its polls, POSTs and
  upgrade to any of four processes, and it sees no failed request or WebSocket.

The service is a real process (`python jobservice.py`); the other origin is an aiohttp
server in this process. Every wait is on the page (`wait_for_function`); nothing sleeps.
"""

from __future__ import annotations

import re
import secrets

import aiohttp
import pytest
import pytest_asyncio
from aiohttp import web
from conftest import create_jobs, running_services
from playwright.async_api import Browser, Page
from playwright.async_api import TimeoutError as PlaywrightTimeout
from test_browser import browser  # noqa: F401 (a fixture: one Chromium per module)
from test_cluster_cli import LISTENING, running_supervisors

# One worker for every browser module (conftest.py says why).
pytestmark = [pytest.mark.asyncio(loop_scope="module"), pytest.mark.xdist_group("browser")]

WAIT_MS = 10_000
JOBS = 6

# The frontend as it was: `io(url)`, listeners for the job events, nothing else. The test
# reads what happened from window.sio.
PAGE = """<!doctype html>
<html><head><meta charset="utf-8"><title>old frontend</title><link rel="icon" href="data:,">
<script src="/socket.io.min.js"></script></head>
<body><script>
const sio = window.sio = {
  connects: 0, connectErrors: [], disconnects: [], upgrades: [], firstTransport: null,
  transport: null, created: [], resolved: [], offsets: [],
};
const socket = window.socket = io(new URLSearchParams(location.search).get("service"));
socket.io.on("open", () => {
  const engine = socket.io.engine;
  sio.firstTransport = sio.transport = engine.transport.name;
  engine.on("upgrade", (transport) => {
    sio.upgrades.push(transport.name);
    sio.transport = socket.io.engine.transport.name;
  });
});
socket.on("connect", () => { sio.connects += 1; });
socket.on("connect_error", (error) => sio.connectErrors.push(String(error.message)));
socket.on("disconnect", (reason) => sio.disconnects.push(reason));
const record = (list) => (job, offset) => {
  list.push({id: job.id, status: job.status, seq: job.seq, offset});
  sio.offsets.push(offset);
};
socket.on("ON_CREATED_JOB", record(sio.created));
socket.on("ON_RESOLVED_JOB", record(sio.resolved));
</script></body></html>
"""

# Chromium's reports of a cross-origin XHR the server did not allow.
CORS_REFUSED = (r"^Access to XMLHttpRequest at 'http://127\.0\.0\.1:\d+/socket\.io/\?EIO=4"
                r"&transport=polling.*' from origin 'http://127\.0\.0\.1:\d+' has been blocked "
                r"by CORS policy",
                r"^Failed to load resource: net::ERR_FAILED$")


# ---------- fixtures ----------


@pytest_asyncio.fixture(scope="module", loop_scope="module")
async def frontend(node_dir):
    """The other origin: the page and the npm bundle (conftest's `node_dir` runs `npm ci`
    once if needed), on its own port of 127.0.0.1."""
    bundle = node_dir / "node_modules" / "socket.io-client" / "dist" / "socket.io.min.js"
    assert bundle.is_file(), bundle

    async def page(_request: web.Request) -> web.Response:
        return web.Response(text=PAGE, content_type="text/html")

    async def script(_request: web.Request) -> web.FileResponse:
        return web.FileResponse(bundle, headers={"Content-Type": "text/javascript"})

    app = web.Application()
    app.router.add_get("/", page)
    app.router.add_get("/socket.io.min.js", script)
    runner = web.AppRunner(app)
    await runner.setup()
    site = web.TCPSite(runner, "127.0.0.1", 0)
    await site.start()
    yield f"http://127.0.0.1:{runner.addresses[0][1]}"
    await runner.cleanup()


@pytest_asyncio.fixture(loop_scope="module")
async def service_process(jobs_file):
    """conftest's `service_process`, on this module's loop."""
    async with running_services(jobs_file) as start:
        yield start


@pytest_asyncio.fixture(loop_scope="module")
async def open_page(browser: Browser, frontend: str):
    contexts = []

    async def open_(service_url: str, init_script: str | None = None):
        context = await browser.new_context()
        contexts.append(context)
        if init_script:
            await context.add_init_script(init_script)
        page = await context.new_page()
        errors: list[str] = []
        page.on("console", lambda m: errors.append(m.text) if m.type == "error" else None)
        page.on("pageerror", lambda error: errors.append(f"pageerror: {error}"))
        response = await page.goto(f"{frontend}/?service={service_url}")
        assert response.ok
        return page, errors

    yield open_
    for context in contexts:
        await context.close()


async def wait_for(page: Page, errors: list[str], expression: str, arg=None) -> None:
    """page.wait_for_function, failing with what the page saw and logged."""
    try:
        await page.wait_for_function(expression, arg=arg, timeout=WAIT_MS)
    except PlaywrightTimeout:
        raise AssertionError(f"waited {WAIT_MS} ms for {expression} ({arg}); the page saw "
                             f"{await state(page)}; console: {errors}") from None


async def state(page: Page) -> dict:
    """What the page recorded, and the transport the engine is on right now."""
    return await page.evaluate(
        "() => ({...window.sio, engineTransport: window.socket.io.engine?.transport.name})")


async def wait_resolved(page: Page, errors: list[str], ids: list[str]) -> None:
    await wait_for(page, errors,
                   "ids => ids.every(id => window.sio.resolved.some(r => r.id === id))", ids)


# ---------- tests ----------


@pytest_asyncio.fixture(loop_scope="module")
async def supervisors(tmp_path):
    """test_cluster_cli's `supervisors`, on this module's loop."""
    async with running_supervisors(tmp_path) as start:
        yield start


@pytest.mark.parametrize("websocket", [True, False], ids=["default", "no-websocket"])
async def test_old_frontend_cross_origin_receives_every_event_once(
        service_process, frontend, open_page, websocket):
    service = await service_process({"CORS_ORIGINS": frontend})
    await receives_every_event_once(service.url, open_page, websocket)


async def test_old_frontend_against_four_workers_receives_every_event_once(
        supervisors, redis_server, frontend, open_page):
    supervisor = await supervisors({"REDIS_URL": redis_server.url, "CORS_ORIGINS": frontend,
                                    "REDIS_PREFIX": f"browser-{secrets.token_hex(4)}:"},
                                   workers=4)
    await supervisor.matches(LISTENING, 4)
    await receives_every_event_once(supervisor.url, open_page, True)


async def receives_every_event_once(service_url: str, open_page, websocket: bool) -> None:
    page, errors = await open_page(service_url,
                                   None if websocket else "delete window.WebSocket")
    assert await page.evaluate("typeof window.WebSocket") == (
        "function" if websocket else "undefined")
    await wait_for(page, errors, "() => window.sio.connects === 1")

    async with aiohttp.ClientSession(base_url=service_url) as http:
        # Posted at once, while the transport may still be polling or upgrading.
        ids = await create_jobs(http, JOBS)
        await wait_resolved(page, errors, ids)
        expected = "websocket" if websocket else "polling"
        await wait_for(page, errors, "name => window.sio.transport === name", expected)
        # A last job, after the upgrade (if any): a duplicate of an earlier event, sent on the
        # upgrade, would arrive before this job's events.
        last = await create_jobs(http, 1)
        await wait_resolved(page, errors, last)
        ids += last

    seen = await state(page)
    resolved = [r["id"] for r in seen["resolved"]]
    created = [c["id"] for c in seen["created"]]
    assert sorted(resolved) == sorted(ids), seen["resolved"]  # each exactly once, no other
    assert sorted(created) == sorted(ids), seen["created"]
    assert {r["status"] for r in seen["resolved"]} == {"resolved"}, seen["resolved"]
    for event in seen["resolved"] + seen["created"]:
        assert event["offset"] == str(event["seq"]), event  # the trailing offset argument
    offsets = [int(offset) for offset in seen["offsets"]]
    assert offsets == sorted(set(offsets)), offsets  # in order across the upgrade
    assert seen["firstTransport"] == "polling"  # default options start on long-polling
    assert seen["transport"] == seen["engineTransport"] == expected
    assert seen["upgrades"] == (["websocket"] if websocket else [])
    assert seen["connects"] == 1 and seen["connectErrors"] == [], seen
    assert seen["disconnects"] == [], seen
    assert errors == [], f"console/page errors: {errors}"


async def test_old_frontend_from_an_origin_not_allowed_never_connects(
        service_process, frontend, open_page):
    service = await service_process({"CORS_ORIGINS": "http://localhost:5173"})
    page, errors = await open_page(service.url)
    await wait_for(page, errors, "() => window.sio.connectErrors.length > 0")
    seen = await state(page)
    assert seen["connectErrors"][0] == "xhr poll error", seen
    assert seen["connects"] == 0 and seen["firstTransport"] is None, seen
    assert errors, "Chromium reports the refused cross-origin request"
    unexpected = [e for e in errors if not any(re.search(p, e) for p in CORS_REFUSED)]
    assert not unexpected, f"console/page errors: {unexpected}"
