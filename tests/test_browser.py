"""The page in a real browser (issue 4): Playwright driving Debian's Chromium against the
service as a real process (`python jobservice.py`) and the fake Unsplash as a process of
its own, which also serves the small PNGs its photos point at.

- buttons create jobs at once (optimistic, then confirmed), they count down, resolve,
  their photos load from the fake's origin, credits and the viewer are right;
- a failed job shows its error and a Retry button that brings it back;
- the server stops while jobs are pending and restarts after they fell due: the page
  reconnects by itself and shows every resolution it missed, without a reload;
- 10,000 jobs: the list is painted within a second of the `/jobs` response (best of up
  to three page loads on this shared box; every number is printed), only the first 48
  cards are built, and one resolution mutates that one row and nothing else;
- no console or page errors anywhere (the restart test allows exactly Chromium's reports
  of the connections refused while the server is down);
- screenshots at desktop and phone width under tests/artifacts/ (git-ignored).

Every test runs on this module's event loop, the one the browser was launched on, so
the service fixture is `service_process` from conftest, re-declared on that loop.
"""

from __future__ import annotations

import asyncio
import json
import re
import signal
import subprocess
import sys
import time
import uuid
from pathlib import Path
from urllib.parse import parse_qs, urlsplit

import aiohttp
import pytest
import pytest_asyncio
from conftest import ROOT, running_services
from playwright.async_api import Browser, Page, async_playwright

import jobservice

pytestmark = pytest.mark.asyncio(loop_scope="module")

CHROMIUM = "/usr/bin/chromium"
CHROMIUM_ARGS = ["--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage",
                 "--disable-background-networking", "--disable-component-update",
                 "--no-first-run", "--disable-sync"]
DESKTOP = {"width": 1280, "height": 800}
PHONE = {"width": 390, "height": 844}
ARTIFACTS = ROOT / "tests" / "artifacts"
UTM = "utm_source=jobservice&utm_medium=referral"

# The only console errors a test may allow: Chromium's own reports of a refused
# connection while the server is down (the page handles both).
REFUSED = (r"^WebSocket connection to 'ws://127\.0\.0\.1:\d+/ws\?since=\d+' failed: "
           r".*net::ERR_CONNECTION_REFUSED$",
           r"^Failed to load resource: net::ERR_CONNECTION_REFUSED$")

LIST = '[data-testid="job-list"]'


def row(job_id: str) -> str:
    return f'{LIST} > li[data-job-id="{job_id}"]'


# ---------- fixtures ----------


@pytest_asyncio.fixture(scope="module", loop_scope="module")
async def browser():
    async with async_playwright() as playwright:
        browser = await playwright.chromium.launch(executable_path=CHROMIUM,
                                                   args=CHROMIUM_ARGS)
        yield browser
        await browser.close()


class FakeUnsplashProcess:
    """`python tests/fake_unsplash.py --port 0`, steered over HTTP."""

    def __init__(self):
        self.process = subprocess.Popen(
            [sys.executable, str(ROOT / "tests" / "fake_unsplash.py"), "--port", "0"],
            stdout=subprocess.PIPE, text=True)
        line = self.process.stdout.readline()
        if not line:
            raise RuntimeError("the fake Unsplash did not start")
        self.url = f"http://127.0.0.1:{json.loads(line)['port']}"

    async def control(self, **body) -> dict:
        async with aiohttp.ClientSession() as http, \
                http.post(f"{self.url}/_control", json=body) as response:
            assert response.status == 200
            return await response.json()

    def stop(self) -> None:
        self.process.terminate()
        self.process.wait(10)


@pytest.fixture(scope="module")
def fake_process():
    fake = FakeUnsplashProcess()
    yield fake
    fake.stop()


@pytest_asyncio.fixture(loop_scope="module")
async def fake(fake_process) -> FakeUnsplashProcess:
    await fake_process.control(mode="ok")
    yield fake_process
    await fake_process.control(mode="ok")


@pytest_asyncio.fixture(loop_scope="module")
async def service_process(jobs_file):
    """conftest's `service_process`, on this module's loop (a subprocess belongs to the
    loop that started it)."""
    async with running_services(jobs_file) as start:
        yield start


def service_env(fake: FakeUnsplashProcess, **settings: str) -> dict:
    return {"UNSPLASH_ACCESS_KEY": "test-key", "UNSPLASH_API_URL": fake.url, **settings}


class Watched:
    """A page and everything that went wrong on it: console errors, uncaught errors."""

    def __init__(self, page: Page):
        self.page = page
        self.errors: list[str] = []
        self.navigations = 0
        page.on("console", self._console)
        page.on("pageerror", lambda error: self.errors.append(f"pageerror: {error}"))
        page.on("framenavigated",
                lambda frame: self._navigated() if frame == page.main_frame else None)

    def _console(self, message) -> None:
        # The page reports a failing ticker subscriber with console.warn: an error too.
        if message.type == "error" or (message.type == "warning"
                                       and "subscriber failed" in message.text):
            self.errors.append(message.text)

    def _navigated(self) -> None:
        self.navigations += 1

    def assert_clean(self, allowed: tuple[str, ...] = ()) -> list[str]:
        """No error but the allowed ones; returns the allowed ones that happened."""
        unexpected = [e for e in self.errors if not any(re.search(p, e) for p in allowed)]
        assert not unexpected, f"console/page errors: {unexpected}"
        return [e for e in self.errors if e not in unexpected]


@pytest_asyncio.fixture(loop_scope="module")
async def open_page(browser: Browser):
    contexts = []

    async def open_(url: str, viewport: dict = DESKTOP, instrument: str | None = None):
        context = await browser.new_context(viewport=viewport)
        contexts.append(context)
        if instrument:
            await context.add_init_script(instrument)
        watched = Watched(await context.new_page())
        await watched.page.goto(url)
        # Survives only if the page is never reloaded.
        await watched.page.evaluate("() => { window.__sameDocument = 'yes'; }")
        return watched

    yield open_
    for context in contexts:
        await context.close()


@pytest.fixture(scope="module")
def artifacts() -> Path:
    ARTIFACTS.mkdir(parents=True, exist_ok=True)
    return ARTIFACTS


# ---------- page helpers ----------


async def wait_live(page: Page, timeout: float = 10_000) -> None:
    await page.wait_for_selector('[data-testid="conn-badge"][data-state="live"]',
                                 timeout=timeout)


SUMMARY_JS = """() => {
  const rows = [...document.querySelectorAll('[data-testid="job-list"] > li')];
  const statuses = {};
  for (const li of rows) statuses[li.dataset.status] = (statuses[li.dataset.status] || 0) + 1;
  const n = (k) => Number(document.querySelector(`[data-testid="count-${k}"]`).textContent);
  return {
    statuses,
    counts: {pending: n('pending'), resolved: n('resolved'), failed: n('failed')},
    ids: rows.map((li) => li.dataset.jobId || null),
  };
}"""


async def summary(page: Page) -> dict:
    """Rows by data-status, the three counters and the row ids, read in one go."""
    return await page.evaluate(SUMMARY_JS)


def assert_counters_match(s: dict) -> None:
    for status in ("pending", "resolved", "failed"):
        assert s["counts"][status] == s["statuses"].get(status, 0), s


class HeldPosts:
    """Holds the page's `POST /jobs` requests until the block ends, so what the page shows
    before the server has even seen a request can be looked at without racing it."""

    def __init__(self, page: Page):
        self.page = page
        self.held = 0
        self._release = asyncio.Event()

    async def _handle(self, route) -> None:
        if route.request.method != "POST":
            await route.continue_()
            return
        self.held += 1
        await self._release.wait()
        await route.continue_()

    async def __aenter__(self) -> HeldPosts:
        await self.page.route("**/jobs", self._handle)
        return self

    async def __aexit__(self, *exc) -> None:
        self._release.set()
        await self.page.unroute_all(behavior="wait")


CREATING_ROWS_JS = """(n) => {
  const li = [...document.querySelectorAll('[data-testid="job-list"] > li')];
  return li.filter((x) => x.dataset.status === 'creating' && !x.dataset.jobId).length === n;
}"""


THUMB_LOADED_JS = """(id) => {
  const img = document.querySelector(`li[data-job-id="${id}"] img[data-testid="thumb"]`);
  return !!img && img.complete && img.naturalWidth > 0;
}"""


async def assert_thumb_loaded(page: Page, job_id: str, origin: str) -> dict:
    thumb = page.locator(f'{row(job_id)} img[data-testid="thumb"]')
    await thumb.scroll_into_view_if_needed()
    await page.wait_for_function(THUMB_LOADED_JS, arg=job_id, timeout=10_000)
    info = await thumb.evaluate(
        "(img) => ({src: img.getAttribute('src'), current: img.currentSrc,"
        " width: img.naturalWidth, alt: img.alt})")
    assert info["width"] > 0
    for url in (info["src"], info["current"]):
        parts = urlsplit(url)
        assert f"{parts.scheme}://{parts.netloc}" == origin, info
    return info


def assert_utm(href: str) -> None:
    assert UTM in href, href
    query = parse_qs(urlsplit(href).query)
    assert query["utm_source"] == ["jobservice"] and query["utm_medium"] == ["referral"], href


async def assert_credit(page: Page, job_id: str, image: dict) -> None:
    credit = page.locator(f'{row(job_id)} [data-testid="credit"]')
    assert await credit.text_content() == f"Photo by {image['author']} on Unsplash"
    links = await credit.locator("a").evaluate_all(
        "(as) => as.map((a) => ({text: a.textContent, href: a.href, rel: a.rel}))")
    assert [link["text"] for link in links] == [image["author"], "Unsplash"]
    for link in links:
        assert_utm(link["href"])
        assert "noopener" in link["rel"]
    assert links[0]["href"].startswith(image["authorUrl"] + "?")
    assert links[1]["href"].startswith("https://unsplash.com/?")
    page_link = await page.get_attribute(f"{row(job_id)} a.alt-link", "href")
    assert page_link.startswith(image["pageUrl"] + "?")
    assert_utm(page_link)


async def api_job(base: str, job_id: str) -> dict:
    async with aiohttp.ClientSession() as http, http.get(f"{base}/jobs/{job_id}") as response:
        assert response.status == 200
        return await response.json()


def fake_image(fake_url: str, n: int) -> tuple[str, dict]:
    """(result, image) as the service stores a photo the fake handed out."""
    png = f"{fake_url}/images/{n % 4}.png"
    colors = ["#e07a5f", "#3d405b", "#81b29a", "#f2cc8f"]
    return f"{png}?w=1080", {
        "id": f"fake{n:06d}", "thumb": f"{png}?w=200", "small": f"{png}?w=400",
        "alt": f"a plate of fake food {n}", "author": f"Cook {n}",
        "authorUrl": f"https://unsplash.com/@cook{n}",
        "pageUrl": f"https://unsplash.com/photos/fake{n:06d}",
        "color": colors[n % 4], "source": "unsplash"}


def write_snapshot(path: Path, jobs: list[jobservice.Job]) -> None:
    """The store's snapshot format, jobs in creation order."""
    for seq, job in enumerate(jobs, start=1):
        job.seq = seq
    path.write_text(json.dumps({"version": 1, "seq": len(jobs),
                                "jobs": [job.to_dict() for job in jobs]}))


RENDER_BUDGET_MS = 1000

# Test instrumentation (an init script, so the page is unchanged): marks around the
# parse of the big /jobs body, to split the render portion into its parts.
PARSE_MARKS_JS = """(() => {
  const parse = JSON.parse;
  JSON.parse = function (text, reviver) {
    const big = typeof text === 'string' && text.length > 1e6;
    if (big) performance.mark('test:jobs-parse-start');
    const value = parse.call(this, text, reviver);
    if (big) performance.mark('test:jobs-parse-end');
    return value;
  };
})();"""

RENDER_TIMING_JS = """() => {
  const at = (name) => performance.getEntriesByName(name)[0].startTime;
  const jobs = performance.getEntriesByType('resource')
    .find((e) => new URL(e.name).pathname === '/jobs');
  return {
    navigation_to_painted: at('jobservice:list-painted'),
    fetch: jobs.responseEnd - jobs.startTime,
    response_to_painted: at('jobservice:list-painted') - jobs.responseEnd,
    parse: at('test:jobs-parse-end') - at('test:jobs-parse-start'),
    build: at('jobservice:list-rendered') - at('test:jobs-parse-end'),
    first_frame: at('jobservice:list-painted') - at('jobservice:list-rendered'),
    megabytes: jobs.encodedBodySize / 1e6,
  };
}"""


async def render_timing(page: Page) -> dict:
    """From the performance marks: the render portion is from the end of the /jobs
    response to the list painted (parse, build the rows, first frame)."""
    await page.wait_for_function(
        "() => performance.getEntriesByName('jobservice:list-painted').length > 0",
        timeout=15_000)
    return await page.evaluate(RENDER_TIMING_JS)


# ---------- tests ----------


async def test_create_count_down_resolve_and_view(service_process, fake, open_page, artifacts):
    service = await service_process(service_env(
        fake, JOB_DELAY_MIN="2", JOB_DELAY_MAX="4", JOB_DELAY_STEP="1"))
    desk = await open_page(service.url)
    page = desk.page
    await wait_live(page)
    assert (await summary(page))["ids"] == []

    # "New job": the row is there while the request has not reached the server.
    async with HeldPosts(page) as held:
        await page.click('[data-testid="new-job"]')
        await page.wait_for_function(CREATING_ROWS_JS, arg=1, timeout=2_000)
        assert held.held == 1
        assert await page.locator(f"{LIST} > li").count() == 1
    await page.wait_for_function(
        "() => { const li = document.querySelectorAll('[data-testid=\"job-list\"] > li');"
        " return li.length === 1 && li[0].dataset.status === 'pending'"
        " && !!li[0].dataset.jobId; }", timeout=5_000)
    first = (await summary(page))["ids"][0]

    # It counts down and its progress bar grows.
    pending_row = page.locator(row(first))
    countdown = pending_row.locator('[data-testid="countdown"]')
    progress = pending_row.locator('[data-testid="progress"]')
    before = (await countdown.text_content(), int(await progress.get_attribute("aria-valuenow")))
    assert re.fullmatch(r"\d+s", before[0]), before
    await page.wait_for_function(
        """([id, text, pct]) => {
          const li = document.querySelector(`li[data-job-id="${id}"]`);
          const c = li.querySelector('[data-testid="countdown"]').textContent;
          const p = Number(li.querySelector('[data-testid="progress"]')
            .getAttribute('aria-valuenow'));
          return c !== text && /^\\d+s$/.test(c) && parseInt(c) < parseInt(text) && p > pct;
        }""", arg=[first, *before], timeout=3_000)

    # "+10": ten rows at once, on top, then all confirmed.
    async with HeldPosts(page) as held:
        await page.click('[data-testid="new-ten"]')
        await page.wait_for_function(CREATING_ROWS_JS, arg=10, timeout=2_000)
        assert (await summary(page))["ids"] == [None] * 10 + [first]
    await page.wait_for_function(
        "() => { const li = [...document.querySelectorAll('[data-testid=\"job-list\"] > li')];"
        " return li.length === 11 && li.every((x) => x.dataset.jobId"
        " && x.dataset.status !== 'creating'); }", timeout=5_000)
    s = await summary(page)
    assert_counters_match(s)
    ids = s["ids"]
    assert len(set(ids)) == 11 and ids[-1] == first
    created = await page.evaluate(
        "(ids) => ids.map((id) => Date.parse(window.__jobservice.jobs.get(id).createdAt))", ids)
    assert created == sorted(created, reverse=True), created  # newest first

    # All resolve; counters follow.
    await page.wait_for_function(
        "() => { const li = [...document.querySelectorAll('[data-testid=\"job-list\"] > li')];"
        " return li.length === 11 && li.every((x) => x.dataset.status === 'resolved'); }",
        timeout=15_000)
    s = await summary(page)
    assert_counters_match(s)
    assert s["counts"] == {"pending": 0, "resolved": 11, "failed": 0}

    # Every photo loads, from the fake's origin, with its credit.
    for job_id in ids:
        job = await api_job(service.url, job_id)
        info = await assert_thumb_loaded(page, job_id, fake.url)
        assert info["src"] == job["image"]["small"]
        assert info["alt"] == job["image"]["alt"]
        await assert_credit(page, job_id, job["image"])

    # The viewer shows the large photo; Escape closes it and focus goes back.
    await page.evaluate("() => window.scrollTo(0, 0)")
    job = await api_job(service.url, ids[0])
    await page.click(f'{row(ids[0])} [data-action="view"]')
    await page.wait_for_selector('[data-testid="viewer"][open]', timeout=3_000)
    await page.wait_for_function(
        "() => { const i = document.querySelector('[data-testid=\"viewer-img\"]');"
        " return i.complete && i.naturalWidth > 0; }", timeout=5_000)
    assert await page.get_attribute('[data-testid="viewer-img"]', "src") == job["result"]
    assert urlsplit(job["result"]).netloc == urlsplit(fake.url).netloc
    await page.screenshot(path=artifacts / "viewer-desktop.png")
    await page.keyboard.press("Escape")
    await page.wait_for_selector('[data-testid="viewer"]:not([open])', state="attached",
                                 timeout=3_000)
    assert await page.evaluate(
        "(id) => document.activeElement === document.querySelector("
        "`li[data-job-id=\"${id}\"] [data-action=\"view\"]`)", ids[0])
    await page.screenshot(path=artifacts / "resolved-desktop.png")

    # Phone width: no sideways scrolling; a job made in the other tab shows up live.
    phone = await open_page(service.url, PHONE)
    await wait_live(phone.page)
    assert await phone.page.evaluate(
        "() => document.documentElement.scrollWidth <= window.innerWidth")
    await page.click('[data-testid="new-job"]')
    await phone.page.wait_for_function(
        "() => document.querySelectorAll('[data-testid=\"job-list\"] > li').length === 12"
        " && document.querySelector('[data-testid=\"job-list\"] > li')"
        ".dataset.status === 'pending'", timeout=5_000)
    for job_id in ids[:2]:
        await phone.page.wait_for_function(THUMB_LOADED_JS, arg=job_id, timeout=5_000)
    await phone.page.screenshot(path=artifacts / "phone.png")

    assert desk.navigations == 1 and phone.navigations == 1
    desk.assert_clean()
    phone.assert_clean()


async def test_failed_job_shows_error_and_retries(service_process, fake, open_page, artifacts):
    await fake.control(mode="500")
    service = await service_process(service_env(
        fake, JOB_DELAY_MIN="0.3", JOB_DELAY_MAX="0.3", JOB_MAX_ATTEMPTS="2",
        RETRY_BASE_DELAY="0.01", RETRY_MAX_DELAY="0.05"))
    watched = await open_page(service.url)
    page = watched.page
    await wait_live(page)

    await page.click('[data-testid="new-job"]')
    await page.wait_for_selector(f'{LIST} > li[data-job-id][data-status="failed"]',
                                 timeout=10_000)
    job_id = (await summary(page))["ids"][0]
    failed = page.locator(row(job_id))
    error = await failed.locator('[data-testid="error"]').text_content()
    assert "gave up after 2 attempts" in error and "HTTP 500" in error, error
    assert error == (await api_job(service.url, job_id))["error"]
    retry = failed.locator('[data-testid="retry"]')
    assert await retry.is_visible() and await retry.text_content() == "Retry"
    s = await summary(page)
    assert_counters_match(s)
    assert s["counts"] == {"pending": 0, "resolved": 0, "failed": 1}
    # Told to screen readers too, with the reason: one job is never just counted.
    await page.wait_for_function(
        "(id) => document.querySelector('[data-testid=\"announcer\"]').textContent"
        ".includes(`Job ${id.slice(0, 8)} failed: gave up after 2`)", arg=job_id, timeout=5_000)
    await page.screenshot(path=artifacts / "failed-desktop.png")

    # Every status the row goes through from here on.
    await page.evaluate(
        """(id) => {
          const li = document.querySelector(`li[data-job-id="${id}"]`);
          window.__statuses = [];
          new MutationObserver((records) => {
            for (const r of records) window.__statuses.push([r.oldValue, li.dataset.status]);
          }).observe(li, {attributes: true, attributeFilter: ['data-status'],
                          attributeOldValue: true});
        }""", job_id)
    await fake.control(mode="ok")
    await retry.click()
    await page.wait_for_selector(f'{row(job_id)}[data-status="resolved"]', timeout=10_000)
    transitions = [old for old, _ in await page.evaluate("() => window.__statuses")]
    assert transitions == ["failed", "pending"], transitions  # failed -> pending -> resolved
    await assert_thumb_loaded(page, job_id, fake.url)
    s = await summary(page)
    assert_counters_match(s)
    assert s["counts"] == {"pending": 0, "resolved": 1, "failed": 0}
    assert await page.locator(f'{row(job_id)} [data-testid="error"]').count() == 0
    await page.wait_for_function(
        "(id) => /is ready/.test("
        "document.querySelector('[data-testid=\"announcer\"]').textContent)",
        arg=job_id, timeout=5_000)

    assert watched.navigations == 1
    watched.assert_clean()


async def test_reconnects_after_restart_and_shows_missed_resolutions(
        service_process, fake, open_page, artifacts):
    # Due 2 s after creation: down just long enough for them to fall due, so the page's
    # backoff is still short when the server is back.
    env = service_env(fake, JOB_DELAY_MIN="2", JOB_DELAY_MAX="2")
    service = await service_process(env)
    port = urlsplit(service.url).port
    watched = await open_page(service.url)
    page = watched.page
    await wait_live(page)

    await page.click('[data-testid="new-ten"]')
    await page.wait_for_function(
        "() => { const li = [...document.querySelectorAll('[data-testid=\"job-list\"] > li')];"
        " return li.length === 10 && li.every((x) => x.dataset.jobId"
        " && x.dataset.status === 'pending'); }", timeout=5_000)
    ids = (await summary(page))["ids"]
    due = await page.evaluate(
        "(ids) => ids.map((id) => Date.parse(window.__jobservice.jobs.get(id).dueAt) / 1000)",
        ids)
    await page.evaluate(
        "(ids) => { window.__rowsBefore = ids.map((id) => window.__jobservice.rows.get(id)); }",
        ids)

    stopped_at = time.time()
    assert min(due) > stopped_at + 0.3, "the jobs must fall due while the server is down"
    assert await service.stop(signal.SIGTERM) == 0
    await page.wait_for_selector('[data-testid="conn-badge"][data-state="reconnecting"]',
                                 timeout=5_000)
    await page.wait_for_selector('[data-action="reconnect"]', state="visible", timeout=5_000)
    label = await page.text_content('[data-testid="conn-badge"] .conn-label')
    assert re.fullmatch(r"Reconnecting in \d+s|Connecting…", label), label

    # While down, a job past due says "fetching".
    await asyncio.sleep(max(0.0, max(due) + 0.1 - time.time()))
    await page.wait_for_selector(f'{row(ids[0])}[data-phase="fetching"]', timeout=3_000)
    assert await page.text_content(f'{row(ids[0])} [data-testid="countdown"]') == "fetching…"
    await page.screenshot(path=artifacts / "reconnecting-desktop.png")

    restarted = await service_process(env, args=["--port", str(port)])
    restarted_at = time.time()
    assert restarted.url == service.url
    await wait_live(page, timeout=35_000)  # by itself: nobody clicks "Retry now"
    reconnect_seconds = time.time() - restarted_at
    await page.wait_for_function(
        "(ids) => ids.every((id) => document.querySelector(`li[data-job-id=\"${id}\"]`)"
        ".dataset.status === 'resolved')", arg=ids, timeout=10_000)
    print(f"\nreconnected {reconnect_seconds:.2f} s after the restart; "
          f"server down {restarted_at - stopped_at:.2f} s")

    # Each was resolved by the restarted server, i.e. while the page was not connected.
    for job_id in ids:
        job = await api_job(restarted.url, job_id)
        assert job["status"] == "resolved"
        assert jobservice.parse_time(job["resolvedAt"], "resolvedAt") >= stopped_at
    s = await summary(page)
    assert_counters_match(s)
    assert s["counts"] == {"pending": 0, "resolved": 10, "failed": 0}
    for job_id in ids[:3]:
        await assert_thumb_loaded(page, job_id, fake.url)

    # Same document, same row elements: patched in place, never reloaded.
    assert watched.navigations == 1
    assert await page.evaluate("() => window.__sameDocument") == "yes"
    assert await page.evaluate(
        "(ids) => ids.every((id, i) => window.__jobservice.rows.get(id) === window.__rowsBefore[i]"
        " && window.__rowsBefore[i].isConnected)", ids)
    allowed = watched.assert_clean(REFUSED)
    print(f"allowed console errors while down: {len(allowed)}")


async def test_ten_thousand_jobs_render_fast_and_one_resolution_patches_one_row(
        service_process, fake, open_page, artifacts, jobs_file):
    count, due_in = 10_000, 10.0
    t0 = time.time()
    jobs = []
    for i in range(count):
        created = t0 - (count - i) * 5
        if i == count - 1:  # the newest, on top: due a few seconds from now
            jobs.append(jobservice.Job(f"job-{i:05d}", "pending", None, t0 - 1, t0 + due_in))
        elif i < count - 500 and i % 97 == 0:  # far down the list, due tomorrow
            jobs.append(jobservice.Job(f"job-{i:05d}", "pending", None, created, t0 + 86400))
        elif i < count - 500 and i % 211 == 5:
            jobs.append(jobservice.Job(f"job-{i:05d}", "failed", None, created, created + 5,
                                       created + 6, 10, "gave up after 10 attempts: "
                                       "Unsplash answered HTTP 500"))
        else:
            result, image = fake_image(fake.url, i)
            jobs.append(jobservice.Job(f"job-{i:05d}", "resolved", result, created,
                                       created + 5, created + 5, 1, None, image))
    write_snapshot(jobs_file, jobs)
    special = jobs[-1].id
    expected = {status: sum(job.status == status for job in jobs)
                for status in ("pending", "resolved", "failed")}

    service = await service_process(service_env(fake))
    watched = await open_page(service.url, instrument=PARSE_MARKS_JS)
    page = watched.page
    loads = [await render_timing(page)]

    # Every job has its <li>; only the first window of 48 cards is shown and built.
    dom = await page.evaluate(
        """() => {
          const li = [...document.querySelectorAll('[data-testid="job-list"] > li')];
          return {rows: li.length, withId: li.filter((x) => x.dataset.jobId).length,
                  shown: li.filter((x) => !x.hidden).length,
                  built: li.filter((x) => x.childElementCount > 0).length,
                  pendingShown: li.filter((x) => !x.hidden && x.dataset.status === 'pending')
                    .map((x) => x.dataset.jobId)};
        }""")
    assert dom["rows"] == dom["withId"] == count, dom
    assert dom["shown"] == dom["built"] == 48, dom
    assert dom["pendingShown"] == [special], dom  # no other ticking row on screen
    s = await summary(page)
    assert s["counts"] == expected, s
    await wait_live(page)
    for job_id in (jobs[-2].id, jobs[-3].id):
        await page.wait_for_function(THUMB_LOADED_JS, arg=job_id, timeout=5_000)
    assert await page.get_attribute(row(special), "data-status") == "pending", \
        "the job resolved before the observer was in place; raise due_in"

    # Every mutation under the list from here on, with the row it happened in.
    await page.evaluate(
        """(id) => {
          const list = document.querySelector('[data-testid="job-list"]');
          window.__row = window.__jobservice.rows.get(id);
          window.__mutations = [];
          window.__resolvedAt = -1;
          new MutationObserver((records) => {
            for (const r of records) {
              const node = r.target.nodeType === 1 ? r.target : r.target.parentElement;
              const li = node.closest('li[data-job-id]');
              window.__mutations.push({row: li ? li.dataset.jobId : null, type: r.type,
                                       attr: r.attributeName});
              if (r.attributeName === 'data-status' && li && li.dataset.status === 'resolved'
                  && window.__resolvedAt < 0) window.__resolvedAt = window.__mutations.length - 1;
            }
          }).observe(list, {subtree: true, childList: true, attributes: true,
                            characterData: true});
        }""", special)
    await page.wait_for_selector(f'{row(special)}[data-status="resolved"]',
                                 timeout=(due_in + 10) * 1000)
    await assert_thumb_loaded(page, special, fake.url)
    await page.wait_for_timeout(1_200)  # a whole ticker second more: nothing else moves
    mutations = await page.evaluate("() => window.__mutations")
    at = await page.evaluate("() => window.__resolvedAt")
    outside = [m for m in mutations if m["row"] != special]
    print(f"\n{len(mutations)} mutations under the list while watching, "
          f"{len(mutations) - at} from the resolution on, all in row {special}")
    assert not outside, outside
    assert at >= 0 and len(mutations) - at <= 10, mutations
    assert await page.evaluate(
        "(id) => window.__jobservice.rows.get(id) === window.__row && window.__row.isConnected",
        special)
    s = await summary(page)
    expected["pending"] -= 1
    expected["resolved"] += 1
    assert s["counts"] == expected, s
    await page.screenshot(path=artifacts / "ten-thousand-desktop.png")

    # Scrolling to the end grows the window.
    await page.evaluate("() => window.scrollTo(0, document.body.scrollHeight)")
    await page.wait_for_function(
        "() => [...document.querySelectorAll('[data-testid=\"job-list\"] > li')]"
        ".filter((x) => !x.hidden).length > 48", timeout=5_000)
    watched.assert_clean()

    # First render: on this shared two-core box other processes steal whole time slices,
    # so when the first load is over budget up to two more fresh loads (own context, own
    # cache) are measured, and the best one counts.
    while min(load["response_to_painted"] for load in loads) >= RENDER_BUDGET_MS \
            and len(loads) < 3:
        again = await open_page(service.url, instrument=PARSE_MARKS_JS)
        loads.append(await render_timing(again.page))
        again.assert_clean()
        await again.page.context.close()
    print(f"10,000 jobs ({loads[0]['megabytes']:.1f} MB), ms per page load: " + "; ".join(
        ", ".join(f"{k} {v:.0f}" for k, v in load.items() if k != "megabytes")
        for load in loads))
    assert min(load["response_to_painted"] for load in loads) < RENDER_BUDGET_MS, loads


async def test_readme_screenshot(service_process, fake, open_page, artifacts, jobs_file):
    """A desktop and a phone screenshot with pending jobs counting down among resolved
    ones; tests/artifacts/readme-screenshot.png is the one for the README."""
    t0 = time.time()
    # (status, seconds ago it was created, seconds from now it is due), oldest first.
    plan = [("resolved", 900, -800), ("resolved", 840, -700), ("resolved", 700, -600),
            ("resolved", 620, -560), ("resolved", 500, -420), ("resolved", 360, -300),
            ("pending", 240, 170), ("resolved", 200, -100), ("resolved", 150, -60),
            ("pending", 90, 40), ("resolved", 60, -20), ("pending", 20, 250)]
    jobs = []
    for n, (status, ago, due) in enumerate(plan):
        if status == "pending":
            jobs.append(jobservice.Job(str(uuid.uuid4()), "pending", None, t0 - ago, t0 + due))
        else:
            result, image = fake_image(fake.url, n + 1)
            jobs.append(jobservice.Job(str(uuid.uuid4()), "resolved", result, t0 - ago,
                                       t0 + due, t0 + due, 1, None, image))
    write_snapshot(jobs_file, jobs)
    service = await service_process(service_env(fake))

    shots = {}
    for name, viewport in (("readme-screenshot.png", DESKTOP), ("readme-phone.png", PHONE)):
        watched = await open_page(service.url, viewport)
        page = watched.page
        await wait_live(page)
        on_screen = await page.evaluate(
            """() => [...document.querySelectorAll('li[data-status="resolved"]')]
                 .filter((li) => li.getBoundingClientRect().top < window.innerHeight)
                 .map((li) => li.dataset.jobId)""")
        for job_id in on_screen:
            await page.wait_for_function(THUMB_LOADED_JS, arg=job_id, timeout=5_000)
        await page.wait_for_function(
            "() => [...document.querySelectorAll('[data-testid=\"countdown\"]')]"
            ".every((c) => /^(\\d+s|\\d+:\\d\\d)$/.test(c.textContent))", timeout=3_000)
        await page.screenshot(path=artifacts / name)
        shots[name] = artifacts / name
        watched.assert_clean()
    print(f"\nREADME screenshot: {shots['readme-screenshot.png']}")
