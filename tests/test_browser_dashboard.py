"""The dashboard people expect (issue 26), in a real browser: Playwright driving Debian's
Chromium against the service as a real process, at desktop (1280x800) and phone (390x844)
sizes, by mouse and by keyboard, with axe-core (from npm) run in the page on every new view.

- "Retry all failed": one click and one confirmation that says how many retry 300 failed
  jobs; "Delete finished" (by keyboard, on the phone) deletes the finished ones the same
  way. Every page open sees it live, and one that was away (its network cut by a proxy)
  gets it by replay, without reloading its list; in both modes (jobs.json and Redis);
- a job found by its short id among 3,000 (it is not among the cards loaded: the server
  finds it), its details opened by the search (keyboard), by a card's id link (keyboard)
  and by a URL (`#job=ID`): the whole id and a copy button, created / due / resolved with
  relative times and how long it took, the attempts, the exact error, the photo with its
  credit and link; "100 of 3,000 jobs" with the list;
- cards say errors in plain words with correct plurals, and use the API's word for each
  state, as the tiles (the one filter control) do;
- the live connection comes back at once when the tab is shown again (the reconnect after
  a restart, within 2 s of the server's return, is in tests/test_browser.py).

No console or page errors but the ones a test allows; no fixed sleeps.
"""

from __future__ import annotations

import asyncio
import json
import re
import time
from urllib.parse import urlsplit

import pytest
import pytest_asyncio
from conftest import NODE_DIR, running_services, seed
from netproxy import TcpProxy
from playwright.async_api import Page
from test_browser import (  # browser is a fixture: one Chromium per module
    LIST,
    PHONE,
    RECORD_TRIES_JS,
    assert_utm,
    browser,  # noqa: F401
    fake,  # noqa: F401
    fake_image,
    fake_process,  # noqa: F401
    open_page,  # noqa: F401
    row,
    service_env,
    summary,
    wait_counts,
    wait_live,
)

import jobservice

# One worker for every browser module (conftest.py says why).
pytestmark = [pytest.mark.asyncio(loop_scope="module"), pytest.mark.xdist_group("browser-pages")]

AXE = NODE_DIR / "node_modules" / "axe-core" / "axe.min.js"
HELD = {"RETRY_BASE_DELAY": "3600", "RETRY_MAX_DELAY": "3600", "JOB_RETENTION": "0"}
DETAIL = '[data-testid="detail"]'
# Chromium's reports of what a page behind a cut network tried (the page handles them):
# its reconnects, and the session check after each (GET /session).
CUT_OFF = (r"^WebSocket connection to .* failed: ",
           r"^Failed to load resource: net::ERR_(CONNECTION_RESET|CONNECTION_CLOSED"
           r"|EMPTY_RESPONSE|SOCKET_NOT_CONNECTED)$")
RAW_ERROR = ("gave up after 1 attempts: cannot reach Unsplash: Cannot connect to host "
             "127.0.0.1:9 ssl:default [Connect call failed ('127.0.0.1', 9)]")


@pytest_asyncio.fixture(loop_scope="module")
async def service(jobs_file):
    """Service processes on jobs.json, on this module's loop."""
    async with running_services(jobs_file) as start:
        yield start


@pytest_asyncio.fixture(loop_scope="module")
async def mode_service(jobs_file, backend):
    """Service processes in the test's mode (jobs.json, or Redis with a prefix of its own)."""
    async with running_services(jobs_file, backend) as start:
        yield start


async def axe_violations(page: Page) -> list[dict]:
    """axe-core's violations on the page as it is now (none is the bar)."""
    if not AXE.is_file():
        pytest.fail(f"{AXE} is missing: run npm ci --prefix tests/node", pytrace=False)
    if not await page.evaluate("() => typeof window.axe === 'object'"):
        await page.evaluate(AXE.read_text("utf-8"))
    return await page.evaluate("""async () => (await axe.run(document,
        {resultTypes: ['violations']})).violations.map((v) => ({id: v.id,
        nodes: v.nodes.slice(0, 3).map((n) => n.target.join(' '))}))""")


async def assert_accessible(page: Page, what: str) -> None:
    violations = await axe_violations(page)
    assert violations == [], f"axe on {what}: {violations}"


def store(jobs_file, jobs: list[jobservice.Job]) -> None:
    for seq, job in enumerate(jobs, start=1):
        job.seq = seq
    jobs_file.write_text(json.dumps({"version": 1, "seq": len(jobs),
                                     "jobs": [job.to_dict() for job in jobs]}))


def make(status: str, n: int, fake_url: str, t0: float, error: str = RAW_ERROR,
         attempts: int = 1) -> jobservice.Job:
    """The n-th job (oldest first, a second apart), finished 45 s after it was made."""
    created = t0 - 20_000 + n
    job_id = jobservice.new_job_id()
    if status == "pending":
        return jobservice.Job(job_id, "pending", None, created, t0 + 3600)
    if status == "failed":
        return jobservice.Job(job_id, "failed", None, created, created + 40, created + 45,
                              attempts, error)
    result, image = fake_image(fake_url, n)
    return jobservice.Job(job_id, "resolved", result, created, created + 40, created + 45, 1,
                          None, image)


async def counts(page: Page) -> dict:
    return (await summary(page))["counts"]


async def test_retry_all_failed_then_delete_finished_for_everyone_watching(
        mode_service, fake, open_page, jobs_file, backend):
    t0 = time.time()
    plan = ["resolved"] * 40 + ["failed"] * 300 + ["pending"] * 3
    jobs = [make(status, n, fake.url, t0) for n, status in enumerate(plan)]
    store(jobs_file, jobs)
    await seed(backend, jobs_file)
    server = await mode_service(service_env(fake, **HELD))
    port = urlsplit(server.url).port
    proxy = await TcpProxy(port).start()  # the way in of a page that will be away
    try:
        desk = await open_page(server.url)
        phone = await open_page(server.url, PHONE)
        away = await open_page(proxy.url)
        for watched in (desk, phone, away):
            await wait_live(watched.page)
            await wait_counts(watched.page, {"total": 343, "failed": 300, "pending": 3},
                              timeout=10_000)

        # The away page loses its network: a dead link, then nothing gets through.
        proxy.close_gate()
        proxy.cut()
        await away.page.wait_for_selector('[data-testid="conn-badge"]:not([data-state="live"])')
        listed_before = [u for u in away.api if u.startswith("GET /jobs?")]

        # One click, and a confirmation that says how many.
        page = desk.page
        await page.click('[data-testid="retry-all"]')
        confirm = page.locator('[data-testid="bulk-confirm"]')
        await confirm.wait_for()
        assert await confirm.locator(".confirm-text").text_content() == \
            "Retry all 300 failed jobs?"
        go = page.locator('[data-testid="bulk-go"]')
        assert await go.text_content() == "Retry 300"
        assert await page.evaluate("() => document.activeElement.dataset.testid") == "bulk-keep"
        await assert_accessible(page, "the bulk confirmation, desktop")
        await go.click()
        await page.wait_for_selector(
            '[data-testid="bulk-message"]:text("Retrying 300 failed jobs.")')
        await confirm.wait_for(state="hidden")
        for watched in (desk, phone):  # live, on every page open
            await wait_counts(watched.page, {"failed": 0, "pending": 303, "resolved": 40},
                              timeout=15_000)
            await watched.page.wait_for_function(
                "() => !document.querySelector('li[data-status=\"failed\"]')"
                " && document.querySelectorAll('li[data-status=\"pending\"]').length >= 100")

        # Delete finished, by keyboard on the phone: Escape keeps; Enter on Confirm goes.
        page = phone.page
        await page.focus('[data-testid="delete-finished"]')
        await page.keyboard.press("Enter")
        text = page.locator('[data-testid="bulk-confirm"] .confirm-text')
        await text.wait_for()
        assert await text.text_content() == \
            "Delete all 40 finished jobs (40 resolved, 0 failed) for good?"
        await assert_accessible(page, "the bulk confirmation, phone")
        await page.keyboard.press("Escape")
        await text.wait_for(state="hidden")
        assert await page.evaluate("() => document.activeElement.dataset.testid") == \
            "delete-finished"
        await page.keyboard.press("Enter")
        await text.wait_for()
        await page.keyboard.press("Shift+Tab")
        assert await page.evaluate("() => document.activeElement.dataset.testid") == "bulk-go"
        await page.keyboard.press("Enter")
        await page.wait_for_selector(
            '[data-testid="bulk-message"]:text("Deleting 40 finished jobs.")')
        assert await page.evaluate("() => document.activeElement.dataset.testid") == \
            "delete-finished"
        for watched in (desk, phone):
            await wait_counts(watched.page, {"total": 303, "resolved": 0, "failed": 0},
                              timeout=15_000)
            await watched.page.wait_for_function(
                "() => !document.querySelector('li[data-status=\"resolved\"]')")
        assert await page.evaluate(
            "() => document.documentElement.scrollWidth <= window.innerWidth")

        # Back on the network: replayed from where it stopped, its list not fetched again.
        proxy.open_gate()
        await wait_live(away.page, timeout=10_000)
        await wait_counts(away.page, {"total": 303, "pending": 303, "resolved": 0,
                                      "failed": 0}, timeout=10_000)
        await away.page.wait_for_function(
            "() => !document.querySelector('li[data-status=\"resolved\"],"
            " li[data-status=\"failed\"]') && document.querySelectorAll("
            "'li[data-status=\"pending\"]').length >= 100")
        assert [u for u in away.api if u.startswith("GET /jobs?")] == listed_before
        assert await away.page.evaluate("() => window.__sameDocument") == "yes"
        for watched in (desk, phone):
            watched.assert_clean()
        away.assert_clean(CUT_OFF)
    finally:
        await proxy.close()


async def test_find_a_job_among_3000_and_open_its_details_by_keyboard_and_url(
        service, fake, open_page, jobs_file):
    t0 = time.time()
    jobs = [make("resolved" if n % 10 else "failed", n, fake.url, t0,
                 "gave up after 3 attempts: Unsplash answered HTTP 500", 3)
            for n in range(2996)]
    # The newest four, on top: errors of each kind, and a pending job.
    jobs.append(make("failed", 2996, fake.url, t0, RAW_ERROR, 1))
    jobs.append(make("failed", 2997, fake.url, t0, "Unsplash rejected the access key (HTTP "
                     "401); set a valid UNSPLASH_ACCESS_KEY and retry the job", 0))
    jobs.append(make("failed", 2998, fake.url, t0, "gave up after 10 attempts: Unsplash "
                     "did not answer within 10 s", 10))
    jobs.append(make("pending", 2999, fake.url, t0))
    store(jobs_file, jobs)
    server = await service(service_env(fake, **HELD))
    desk = await open_page(server.url, clipboard=True)
    page = desk.page
    await wait_live(page)
    await wait_counts(page, {"total": 3000})
    await page.wait_for_function(
        "() => document.querySelector('[data-testid=\"list-count\"]').textContent"
        " === '100 of 3,000 jobs'")

    # One word per state: the cards say what the API and the tiles say; errors are plain.
    newest = [job.id for job in reversed(jobs)][:4]
    pills = [await page.text_content(f"{row(job_id)} .pill") for job_id in newest]
    assert pills == ["Pending", "Failed", "Failed", "Failed"], pills
    resolved_pill = await page.text_content(f'{LIST} > li[data-status="resolved"] .pill')
    assert resolved_pill == "Resolved"
    tiles = await page.eval_on_selector_all(".stat .stat-label", "(els) => els.map((e) =>"
                                            " e.textContent)")
    assert tiles == ["all", "pending", "resolved", "failed"]
    errors = [await page.text_content(f'{row(job_id)} [data-testid="error"]')
              for job_id in newest[1:]]
    assert errors == ["Unsplash didn\u2019t answer in time. Gave up after 10 attempts.",
                      "Unsplash refused the access key.",
                      "Couldn\u2019t reach Unsplash. Gave up after 1 attempt."], errors
    assert await page.locator("select").count() == 0  # the tiles are the one filter
    await page.click(".stat-failed")
    await page.wait_for_function(
        "() => document.querySelector('[data-testid=\"list-count\"]').textContent"
        " === '100 of 303 failed jobs'")
    assert await page.get_attribute(".stat-failed", "aria-pressed") == "true"
    await page.click(".stat-failed")  # pressed again: everything
    await page.wait_for_function(
        "() => document.querySelector('[data-testid=\"list-count\"]').textContent"
        " === '100 of 3,000 jobs'")
    await assert_accessible(page, "the list, desktop")

    # Found by its short id, by keyboard: it is far below the cards loaded.
    wanted = jobs[1234]
    assert not await page.evaluate("(id) => window.__jobservice.jobs.has(id)", wanted.id)
    await page.focus('[data-testid="find-input"]')
    await page.keyboard.type(wanted.id[:8].upper())
    await page.keyboard.press("Enter")
    dialog = page.locator(f"{DETAIL}[open]")
    await dialog.wait_for()
    await page.wait_for_function(
        "(id) => document.querySelector('[data-testid=\"detail-id\"]')?.textContent === id",
        arg=wanted.id)
    assert urlsplit(page.url).fragment == f"job={wanted.id}"
    assert await page.text_content("#detail-title") == f"Job {wanted.id[:8]} Resolved"
    facts = await page.eval_on_selector_all(
        f"{DETAIL} .detail-facts > *", "(els) => els.map((e) => e.textContent)")
    pairs = dict(zip(facts[::2], facts[1::2], strict=True))
    assert pairs["Status"] == "Resolved" and pairs["Took"] == "45 seconds", pairs
    assert pairs["Attempts"] == "1 call to Unsplash", pairs
    for label in ("Created", "Was due", "Resolved"):
        assert re.search(r"\(\d+ hours? ago\)$", pairs[label]), pairs[label]
    credit = page.locator(f'{DETAIL} [data-testid="credit"]')
    assert await credit.text_content() == f"Photo by {wanted.image['author']} on Unsplash"
    page_link = await page.get_attribute(f"{DETAIL} a.alt-link", "href")
    assert page_link.startswith(wanted.image["pageUrl"] + "?")
    assert_utm(page_link)
    await page.wait_for_function(
        "() => { const i = document.querySelector('.detail-img');"
        " return i && i.complete && i.naturalWidth > 0; }")
    await page.click('[data-testid="copy-id"]')
    await page.wait_for_selector(f'{DETAIL} .copy-note:text("Copied.")')
    assert await page.evaluate("() => navigator.clipboard.readText()") == wanted.id
    await assert_accessible(page, "a job's details, desktop")
    await page.keyboard.press("Escape")
    await dialog.wait_for(state="hidden")
    assert urlsplit(page.url).fragment == ""
    assert await page.evaluate("() => document.activeElement.dataset.testid") == "find-input"

    # A short id several jobs share: a list of them; an id no job has: said so.
    await page.fill('[data-testid="find-input"]', "a")
    await page.click('[data-testid="find-submit"]')
    results = page.locator('[data-testid="find-results"] .find-list a')
    await results.first.wait_for()
    assert await results.count() == 10
    await page.fill('[data-testid="find-input"]', "zzzz")
    await page.keyboard.press("Enter")
    await page.wait_for_selector(
        '[data-testid="find-results"]:text("No job has an id that starts with “zzzz”.")')

    # From a card, by keyboard: its id link opens the details; Escape goes back to it.
    link = page.locator(f'{row(newest[3])} [data-testid="job-link"]')
    await link.focus()
    await page.keyboard.press("Enter")
    await page.wait_for_function(
        "(id) => document.querySelector('[data-testid=\"detail-id\"]')?.textContent === id",
        arg=newest[3])
    assert await page.text_content(f'{DETAIL} [data-testid="detail-error"]') == RAW_ERROR
    assert "Couldn\u2019t reach Unsplash. Gave up after 1 attempt." in \
        await page.text_content(f"{DETAIL} .detail-error")
    await page.keyboard.press("Escape")
    await dialog.wait_for(state="hidden")
    assert await page.evaluate(
        "(id) => document.activeElement === document.querySelector("
        "`li[data-job-id=\"${id}\"] [data-testid=\"job-link\"]`)", newest[3])

    # By URL, on a phone: a failed job far down the list, opened as the page loads.
    far = jobs[50]
    phone = await open_page(f"{server.url}/#job={far.id}", PHONE)
    await phone.page.wait_for_function(
        "(id) => document.querySelector('[data-testid=\"detail\"][open]"
        " [data-testid=\"detail-id\"]')?.textContent === id", arg=far.id)
    assert await phone.page.text_content(f'{DETAIL} [data-testid="detail-error"]') == far.error
    assert await phone.page.text_content(f'{DETAIL} [data-testid="detail-attempts"]') == \
        "3 calls to Unsplash"
    assert await phone.page.evaluate(
        "() => document.documentElement.scrollWidth <= window.innerWidth"
        " && document.querySelector('[data-testid=\"detail\"]').scrollWidth"
        " <= document.querySelector('[data-testid=\"detail\"]').clientWidth")
    await assert_accessible(phone.page, "a job's details, phone")
    await phone.page.click('[data-action="close-detail"]')
    await phone.page.wait_for_selector(f"{DETAIL}:not([open])", state="attached")
    await assert_accessible(phone.page, "the list, phone")
    desk.assert_clean()
    phone.assert_clean()


async def test_the_connection_comes_back_at_once_when_the_tab_is_shown_again(
        service, fake, open_page, jobs_file):
    """The server is away: each time the page waits between two tries, the tab shown
    again makes it try at once, in the same turn of its event loop."""
    server = await service(service_env(fake))
    port = urlsplit(server.url).port
    proxy = await TcpProxy(port).start()
    try:
        watched = await open_page(proxy.url)
        page = watched.page
        await wait_live(page)
        await page.evaluate(RECORD_TRIES_JS)
        closed = asyncio.Event()
        page.on("websocket", lambda ws: ws.on("close", lambda _: closed.set()))
        proxy.close_gate()
        proxy.cut()
        rounds = []
        while len([made for made in rounds if made is not None]) < 4:
            closed.clear()
            await closed.wait()  # a try has just failed: the next is 250-1000 ms away
            # None when the page's own timer made the next try first (on a busy box the
            # test may come late): that round shows nothing either way.
            rounds.append(await page.evaluate("""() => {
              const last = window.__tries.at(-1);
              if (last && last.socket.readyState === WebSocket.CONNECTING) return null;
              const before = window.__tries.length;
              document.dispatchEvent(new Event('visibilitychange'));
              return window.__tries.length - before;
            }"""))
            assert len(rounds) < 30, rounds
        print(f"\ntries made by the tab shown again, per round: {rounds}")
        assert all(made == 1 for made in rounds if made is not None), rounds
        proxy.open_gate()
        await wait_live(page, timeout=5_000)
        watched.assert_clean(CUT_OFF)
    finally:
        await proxy.close()
