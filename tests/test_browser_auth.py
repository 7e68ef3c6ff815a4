"""The page's login in a real browser: Playwright driving Debian's Chromium against the
service as a real process started with `API_TOKEN` (or `API_TOKENS_FILE`), and the fake
Unsplash as a process of its own (tests/test_browser.py's).

- the page asks for the token (a labelled password field, by keyboard) instead of showing
  the list, and fetches no job and opens no socket before it has a session; a wrong token
  says so; the right one logs in; the session cookie is HttpOnly and SameSite=Strict, and
  the token is kept nowhere a script could read it; a job made with the page's button
  resolves live over /ws (authenticated by the cookie); a reload asks nothing; "Log out"
  closes the socket, clears the list and shows the form, and the API says 401 again;
- a page of another origin in the same browser, after the user logged in, cannot create a
  job with the user's session (a same-site origin: the server refuses its Origin with 403;
  a cross-site one: the browser does not even send the cookie, 401), by fetch or by a form,
  and cannot read the list;
- a session that ends under an open page brings the form back: a token rotated out of
  API_TOKENS_FILE (SIGHUP) makes the next API call 401; a restart with another token makes
  the socket's reconnect fail its handshake;
- too many wrong tokens: the form shows the server's own message (429);
- without a token configured, nothing of this shows.

No console or page errors but the ones a test allows explicitly (Chromium's reports of the
401s and refusals it provokes). Every wait is on something happening; nothing sleeps.
"""

from __future__ import annotations

import asyncio
import json
import re
import signal
import time
from pathlib import Path
from urllib.parse import urlsplit

import aiohttp
import pytest
import pytest_asyncio
from aiohttp import web
from conftest import running_services
from playwright.async_api import Browser, BrowserContext, Page, expect
from test_browser import (  # browser is a fixture: one Chromium per module
    DESKTOP,
    LIST,
    REFUSED,
    FakeUnsplashProcess,
    Watched,
    browser,  # noqa: F401
    row,
    service_env,
    wait_live,
)

# One worker for every browser module (conftest.py says why).
pytestmark = [pytest.mark.asyncio(loop_scope="module"), pytest.mark.xdist_group("browser-pages")]

TOKEN = "kitchen-door-7f3a9c"
COOKIE = "jobservice_session"
WAIT_MS = 10_000

LOGIN = '[data-testid="login"]'
LOGIN_MESSAGE = '[data-testid="login-message"]'
LOGOUT = '[data-testid="logout"]'
NOT_ACCEPTED = "That token was not accepted."

# Chromium's console lines for the 401s a test provokes (the page handles them).
UNAUTHORIZED = r"^Failed to load resource: the server responded with a status of 401 "
# (a 401 with WWW-Authenticate: Bearer, which Chromium reports as an authentication failure)
WS_UNAUTHORIZED = (r"^WebSocket connection to 'ws://127\.0\.0\.1:\d+/ws\?since=\d+' failed: "
                   r"(HTTP Authentication failed; no valid credentials available"
                   r"|Error during WebSocket handshake: Unexpected response code: 401)$")
TOO_MANY = r"^Failed to load resource: the server responded with a status of 429 "
# ... and for another origin's requests that the browser or the server turned down.
CROSS_ORIGIN = (r"has been blocked by CORS policy",
                r"^Failed to load resource: net::ERR_FAILED$",
                r"^Failed to load resource: the server responded with a status of 40[13] ")

# The other origin's page: nothing but a document to run fetches and a form from.
ELSEWHERE = """<!doctype html>
<html><head><meta charset="utf-8"><title>elsewhere</title><link rel="icon" href="data:,">
</head><body><p>Another site.</p></body></html>
"""


# ---------- fixtures ----------


@pytest.fixture(scope="module")
def fake():
    """tests/fake_unsplash.py as a process: the photos of resolved jobs come from it."""
    fake = FakeUnsplashProcess()
    yield fake
    fake.stop()


@pytest_asyncio.fixture(loop_scope="module")
async def service_process(jobs_file):
    """conftest's `service_process`, on this module's loop."""
    async with running_services(jobs_file) as start:
        yield start


@pytest_asyncio.fixture(loop_scope="module")
async def new_context(browser: Browser):
    contexts: list[BrowserContext] = []

    async def new_() -> BrowserContext:
        context = await browser.new_context(viewport=DESKTOP)
        contexts.append(context)
        return context

    yield new_
    for context in contexts:
        await context.close()


@pytest_asyncio.fixture(scope="module", loop_scope="module")
async def elsewhere():
    """Another origin: a tiny page served by an aiohttp server of its own, on its own port
    of 127.0.0.1 (same site as the service, another origin); as http://localhost:<port>
    the same server is another site too."""

    async def page(_request: web.Request) -> web.Response:
        return web.Response(text=ELSEWHERE, content_type="text/html")

    app = web.Application()
    app.router.add_get("/", page)
    runner = web.AppRunner(app)
    await runner.setup()
    site = web.TCPSite(runner, "127.0.0.1", 0)
    await site.start()
    yield runner.addresses[0][1]
    await runner.cleanup()


# ---------- helpers ----------


async def open_watched(context: BrowserContext, url: str | None = None) -> Watched:
    watched = Watched(await context.new_page())
    if url:
        await watched.page.goto(url)
    return watched


def record(page: Page) -> dict:
    """Every request to /session, every 401 answer, and every WebSocket the page opens,
    with its frames."""
    seen: dict = {"session": [], "401": [], "sockets": [], "frames": []}

    def on_request(request) -> None:
        if urlsplit(request.url).path == "/session":
            seen["session"].append(request.method)

    def on_response(response) -> None:
        if response.status == 401:
            seen["401"].append(f"{response.request.method} {urlsplit(response.url).path}")

    def on_socket(ws) -> None:
        seen["sockets"].append(ws)
        ws.on("framereceived", lambda payload: seen["frames"].append(payload))

    page.on("request", on_request)
    page.on("response", on_response)
    page.on("websocket", on_socket)
    return seen


async def wait_login_form(page: Page, message: str | None = None) -> None:
    """The form is showing instead of the board (with `message`, if given), the cursor in
    its token field."""
    await page.wait_for_selector(LOGIN, state="visible", timeout=WAIT_MS)
    if message is not None:
        await expect(page.locator(LOGIN_MESSAGE)).to_have_text(message, timeout=WAIT_MS)
    for hidden in ("#board", LIST, '[data-testid="new-job"]', '[data-testid="conn-badge"]',
                   LOGOUT):
        assert not await page.locator(hidden).is_visible(), hidden
    await page.wait_for_function(
        "() => document.activeElement === document.querySelector('[data-testid=\"login-token\"]')",
        timeout=WAIT_MS)


async def log_in(page: Page, token: str) -> None:
    """Types the token into the form, as a person would, and sends it with Enter."""
    field = page.get_by_label("Access token")
    await field.fill(token)
    await field.press("Enter")


async def api_total(base: str, token: str) -> int:
    async with aiohttp.ClientSession() as http, http.get(
            f"{base}/jobs/stats", headers={"Authorization": f"Bearer {token}"}) as response:
        assert response.status == 200, await response.text()
        return (await response.json())["total"]


async def api_create(base: str, token: str) -> str:
    async with aiohttp.ClientSession() as http, http.post(
            f"{base}/jobs", headers={"Authorization": f"Bearer {token}"}) as response:
        assert response.status == 201, await response.text()
        return (await response.json())["id"]


async def jobs_requests(base: str, token: str) -> dict[tuple[str, str], float]:
    """The server's own count of requests to `/jobs`, by (method, status), from /metrics."""
    async with aiohttp.ClientSession() as http, http.get(
            f"{base}/metrics", headers={"Authorization": f"Bearer {token}"}) as response:
        assert response.status == 200, await response.text()
        text = await response.text()
    counts = {}
    for line in text.splitlines():
        if not line.startswith("jobservice_http_requests_total{"):
            continue
        labels = dict(re.findall(r'(\w+)="([^"]*)"', line.split("}", 1)[0]))
        if labels.get("route") == "/jobs":
            counts[labels["method"], labels["status"]] = float(line.rsplit(" ", 1)[1])
    return counts


def grown(before: dict, after: dict) -> dict:
    return {key: after[key] - before.get(key, 0) for key in after if after[key] != before.get(key)}


async def wait_until(predicate, what: str, timeout: float = WAIT_MS / 1000) -> None:
    """Polls a condition outside the browser (a line in the service's log) until it holds."""
    deadline = time.monotonic() + timeout
    while not predicate():
        if time.monotonic() > deadline:
            raise AssertionError(f"waited {timeout} s for {what}")
        await asyncio.sleep(0.02)


FETCH_JS = """async ([url, method]) => {
  try {
    const response = await fetch(url, {method, credentials: 'include'});
    return {status: response.status, body: await response.text()};
  } catch (error) {
    return {error: String(error)};
  }
}"""


# ---------- tests ----------


async def test_logs_in_once_works_live_and_logs_out(service_process, fake, new_context):
    service = await service_process(service_env(fake, API_TOKEN=TOKEN))
    context = await new_context()
    watched = await open_watched(context)
    page = watched.page
    seen = record(page)
    await page.goto(service.url)

    # The form, not the list: nothing about jobs is fetched and no socket opens.
    await wait_login_form(page, "")
    field = page.get_by_label("Access token")
    assert await field.get_attribute("type") == "password"
    assert await page.get_by_role("button", name="Log in").is_visible()
    assert await page.get_by_role("heading", name="Log in").is_visible()
    assert seen["session"] == ["GET"]
    assert watched.api == [] and seen["sockets"] == []

    # A wrong token, by keyboard: the form says so, the field is emptied, focus stays.
    await page.keyboard.type("not-the-token")
    await page.keyboard.press("Enter")
    await expect(page.locator(LOGIN_MESSAGE)).to_have_text(NOT_ACCEPTED, timeout=WAIT_MS)
    assert await field.input_value() == ""
    assert await field.get_attribute("aria-invalid") == "true"
    await wait_login_form(page)
    assert watched.api == [] and seen["sockets"] == []

    # The right one: the page starts as it always did.
    await field.fill(TOKEN)
    await page.get_by_role("button", name="Log in").click()
    await wait_live(page)
    assert not await page.locator(LOGIN).is_visible()
    assert await page.get_by_role("button", name="Log out").is_visible()
    assert await field.input_value() == ""
    assert seen["session"] == ["GET", "POST", "POST"]
    assert watched.api[:2] in (["GET /jobs?order=desc&limit=100", "GET /jobs/stats"],
                               ["GET /jobs/stats", "GET /jobs?order=desc&limit=100"])

    # The session is an HttpOnly, SameSite=Strict cookie; the token is nowhere.
    cookies = {cookie["name"]: cookie for cookie in await context.cookies()}
    assert COOKIE in cookies, cookies
    cookie = cookies[COOKIE]
    assert cookie["httpOnly"] is True and cookie["sameSite"] == "Strict", cookie
    assert cookie["path"] == "/" and TOKEN not in cookie["value"], cookie
    kept = await page.evaluate(
        "() => JSON.stringify([document.cookie, {...localStorage}, {...sessionStorage},"
        " location.href, [...document.querySelectorAll('input')].map((i) => i.value)])")
    assert COOKIE not in kept and TOKEN not in kept, kept

    # Live: a job made with the button resolves, and the news came over /ws.
    await page.click('[data-testid="new-job"]')
    await page.wait_for_function(
        "() => { const li = document.querySelector('[data-testid=\"job-list\"] > li');"
        " return li && li.dataset.jobId && li.dataset.status === 'resolved'; }",
        timeout=WAIT_MS)
    job_id = await page.get_attribute(f"{LIST} > li", "data-job-id")
    events = [json.loads(frame) for frame in seen["frames"] if isinstance(frame, str)]
    assert any(event[0] == "ON_RESOLVED_JOB" and event[1]["id"] == job_id
               for event in events), events
    assert f"GET /jobs/{job_id}" not in watched.api  # not a REST fallback
    assert await api_total(service.url, TOKEN) == 1

    # A reload asks nothing: the cookie is the session.
    await page.reload()
    await wait_live(page)
    assert not await page.locator(LOGIN).is_visible()
    await page.wait_for_selector(f'{row(job_id)}[data-status="resolved"]', timeout=WAIT_MS)
    assert seen["session"].count("POST") == 2

    # Log out: the socket closes, the list goes, the form is back; the API says 401.
    socket = seen["sockets"][-1]
    assert not socket.is_closed()
    await page.get_by_role("button", name="Log out").click()
    await wait_login_form(page, "")
    assert await page.locator(f"{LIST} > li").count() == 0
    if not socket.is_closed():
        await socket.wait_for_event("close", timeout=WAIT_MS)
    assert seen["session"][-1] == "DELETE"
    assert COOKIE not in {cookie["name"] for cookie in await context.cookies()}
    answer = await page.evaluate(FETCH_JS, ["/jobs", "GET"])
    assert answer["status"] == 401, answer
    assert json.loads(answer["body"])["error"]["code"] == "unauthorized"
    assert watched.navigations == 2  # the first load and the reload, nothing else
    allowed = watched.assert_clean((UNAUTHORIZED,))
    assert len(allowed) == 2, allowed  # the wrong token and the fetch after logging out


async def test_another_origin_cannot_use_the_session(service_process, fake, new_context,
                                                     elsewhere):
    service = await service_process(service_env(fake, API_TOKEN=TOKEN))
    context = await new_context()
    own = await open_watched(context, service.url)
    await wait_login_form(own.page)
    await log_in(own.page, TOKEN)
    await wait_live(own.page)
    job_id = await api_create(service.url, TOKEN)
    await own.page.wait_for_selector(row(job_id), timeout=WAIT_MS)  # the cookie works
    before = await api_total(service.url, TOKEN)

    # 127.0.0.1 on another port is another origin of the same site: the browser sends
    # the SameSite=Strict cookie along (so the GET is answered, though the page may not
    # read it), and the server refuses the foreign Origin of the POSTs. localhost is
    # another site: the browser sends no cookie at all, and every request is a 401.
    cases = {
        f"http://127.0.0.1:{elsewhere}/": {("POST", "403"): 2, ("GET", "200"): 1},
        f"http://localhost:{elsewhere}/": {("POST", "401"): 2, ("GET", "401"): 1},
    }
    for origin, expected in cases.items():
        other = await open_watched(context, origin)
        counted = await jobs_requests(service.url, TOKEN)

        # A "simple" POST (no preflight): sent, refused before anything changes.
        post = await other.page.evaluate(FETCH_JS, [f"{service.url}/jobs", "POST"])
        assert "error" in post or post["status"] in (401, 403), (origin, post)
        # A GET with credentials: whatever the server says, the page cannot read it.
        read = await other.page.evaluate(FETCH_JS, [f"{service.url}/jobs", "GET"])
        assert "error" in read or read["status"] == 401, (origin, read)
        assert job_id not in json.dumps(read)

        # A plain HTML form posted to the service (the classic cross-site request). The
        # browser then shows the service's answer, and asks it for a /favicon.ico it has not.
        await other.page.route("**/favicon.ico", lambda route: route.fulfill(status=204))
        async with other.page.expect_navigation() as navigation:
            await other.page.evaluate(
                """(action) => {
                  const form = document.createElement('form');
                  form.method = 'post';
                  form.action = action;
                  document.body.append(form);
                  form.submit();
                }""", f"{service.url}/jobs")
        response = await navigation.value
        code = json.loads(await response.text())["error"]["code"]
        assert (response.status, code) in ((403, "origin_not_allowed"), (401, "unauthorized"))
        # What the server itself saw and answered (nothing else asked for /jobs meanwhile).
        assert grown(counted, await jobs_requests(service.url, TOKEN)) == expected, origin
        other.assert_clean(CROSS_ORIGIN)
        await other.page.close()

    assert await api_total(service.url, TOKEN) == before
    # The user's own page is still logged in and live.
    assert await own.page.evaluate("() => window.__jobservice.connection") == "live"
    own.assert_clean()


async def test_a_session_that_ends_brings_the_form_back(service_process, fake, new_context,
                                                        tmp_path: Path):
    tokens = tmp_path / "tokens"
    tokens.write_text("first-token-1111\n")
    service = await service_process(service_env(fake, API_TOKENS_FILE=str(tokens)))
    port = urlsplit(service.url).port
    context = await new_context()
    watched = await open_watched(context)
    page = watched.page
    seen = record(page)
    await page.goto(service.url)
    await wait_login_form(page)
    await log_in(page, "first-token-1111")
    await wait_live(page)

    # The cookie is gone (expired, say) while the socket it opened stays: the page's next
    # call gets 401, and the form comes back saying why.
    await context.clear_cookies()
    await page.click('[data-testid="new-job"]')
    await wait_login_form(page, "Your session has ended. Log in again to go on.")
    assert seen["401"] == ["POST /jobs"], seen["401"]
    assert await page.locator(f"{LIST} > li").count() == 0
    await log_in(page, "first-token-1111")
    await wait_live(page)

    # The token is rotated out of the file: at the SIGHUP the server closes the sockets
    # that came in with it, the page's next handshake is refused, the session door says
    # so, and the form comes back by itself: no call of the page's was turned down.
    tokens.write_text("second-token-2222\n")
    service.process.send_signal(signal.SIGHUP)
    await wait_login_form(page, "Your session has ended. Log in again to go on.")
    assert seen["401"] == ["POST /jobs"], seen["401"]
    assert await api_total(service.url, "second-token-2222") == 0

    await log_in(page, "second-token-2222")
    await wait_live(page)
    job_id = await api_create(service.url, "second-token-2222")
    await page.wait_for_selector(f'{row(job_id)}[data-status="resolved"]', timeout=WAIT_MS)

    # A restart with another token: the socket closes and cannot open again (refused while
    # the server is down, then a 401 handshake); after each failure the page asks the
    # session door, and once it says "not authenticated" the form comes back. No API call
    # was turned down: the socket's failures alone bring it.
    assert await service.stop(signal.SIGTERM) == 0
    restarted = await service_process(service_env(fake, API_TOKEN="third-token-3333"),
                                      args=["--port", str(port)])
    assert restarted.url == service.url
    await wait_login_form(page, "Your session has ended. Log in again to go on.")
    assert seen["401"] == ["POST /jobs"], seen["401"]
    await log_in(page, "third-token-3333")
    await wait_live(page)
    await page.wait_for_selector(f'{row(job_id)}[data-status="resolved"]', timeout=WAIT_MS)

    # (whether a handshake got its 401 before the session door said so is a race)
    allowed = watched.assert_clean((UNAUTHORIZED, WS_UNAUTHORIZED, *REFUSED))
    handshakes = sum(bool(re.search(WS_UNAUTHORIZED, error)) for error in allowed)
    print(f"\nallowed console errors: {len(allowed)}, of them 401 handshakes: {handshakes}")
    assert watched.navigations == 1


async def test_too_many_wrong_tokens_show_the_servers_message(service_process, new_context):
    service = await service_process({"API_TOKEN": TOKEN})
    context = await new_context()
    watched = await open_watched(context, service.url)
    page = watched.page
    await wait_login_form(page)
    for attempt in range(11):
        await log_in(page, f"guess-{attempt}")
        await page.wait_for_function(
            "() => document.querySelector('[data-testid=\"login-message\"]').textContent"
            " && !document.querySelector('[data-testid=\"login-form\"]')"
            ".hasAttribute('aria-busy')", timeout=WAIT_MS)
        message = await page.text_content(LOGIN_MESSAGE)
        if attempt < 10:
            assert message == NOT_ACCEPTED, (attempt, message)
    assert re.fullmatch(r"too many wrong tokens; wait\. Try again in \d+ s\.", message), message
    # Even the right token waits now: the limit is the address's.
    await log_in(page, TOKEN)
    await expect(page.locator(LOGIN_MESSAGE)).to_have_text(re.compile("too many wrong tokens"),
                                                           timeout=WAIT_MS)
    assert watched.api == []
    watched.assert_clean((UNAUTHORIZED, TOO_MANY))


async def test_without_a_token_nothing_changes(service_process, fake, new_context):
    service = await service_process(service_env(fake))
    context = await new_context()
    watched = await open_watched(context)
    seen = record(watched.page)
    await watched.page.goto(service.url)
    page = watched.page
    await wait_live(page)
    assert seen["session"] == ["GET"]
    for hidden in (LOGIN, LOGOUT):
        assert not await page.locator(hidden).is_visible(), hidden
    assert await page.locator('[data-testid="new-job"]').is_visible()
    await page.click('[data-testid="new-job"]')
    await page.wait_for_function(
        "() => document.querySelector('[data-testid=\"job-list\"] > li')?.dataset.status"
        " === 'resolved'", timeout=WAIT_MS)
    assert await page.evaluate("() => window.__jobservice.session") == {
        "required": False, "active": True}
    watched.assert_clean()
