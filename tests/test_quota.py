"""On time under the real Unsplash quota: every job resolves when it is due, fresh photos
paced to what the key allows, photos bought before reused beyond it.

The fake Unsplash plays the real API's limits (tests/fake_unsplash.py): so many calls a
window, counted from the first call of each, `X-Ratelimit-*` on every answer and a 403
"Rate Limit Exceeded" past it. Windows and delays are shrunk through the environment,
never slept through: a demo key's 50 calls an hour becomes 5 calls per 36 s. Every node
is a real app on a real socket; in Redis mode three of them share one redis-server and
one key. Waiting is on events, never on sleeps, except where the test is the clock
itself (an outage that lasts so long).
"""

from __future__ import annotations

import asyncio
import json
import logging
import math
import secrets
import time
from collections import Counter

import pytest
from conftest import FAST_ENV, create_jobs, serve_fake
from fake_unsplash import FakeUnsplash
from prometheus_client.parser import text_string_to_metric_families

import jobservice


def parse(text: str) -> float:
    return jobservice.parse_time(text, "time")


def lateness(job: dict) -> float:
    return parse(job["resolvedAt"]) - parse(job["dueAt"])


def p99(values: list[float]) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, math.ceil(0.99 * len(ordered)) - 1)]


class RecordingUnsplash(FakeUnsplash):
    """The shared fake, plus every photo it handed out, by id."""

    def __init__(self, key: str):
        super().__init__(key)
        self.served: dict[str, dict] = {}

    def photo(self, base: str) -> dict:
        photo = super().photo(base)
        self.served[photo["id"]] = photo
        return photo


@pytest.fixture
async def fake(aiohttp_server) -> RecordingUnsplash:
    return await serve_fake(aiohttp_server, RecordingUnsplash(secrets.token_hex(20)))


@pytest.fixture
def start_nodes(request, aiohttp_client, tmp_path, fake):
    """`count` nodes of one service: one in the embedded mode (jobs.json), or several on
    a redis-server of the suite's, with a prefix of this test's own."""
    prefix = f"quota-{secrets.token_hex(4)}:"

    async def start(count: int, env: dict, redis: bool | None = None) -> list:
        mode = {}
        if count > 1 if redis is None else redis:
            server = request.getfixturevalue("redis_server")
            mode = {"REDIS_URL": server.url, "REDIS_PREFIX": prefix}
        nodes = []
        for number in range(count):
            settings = jobservice.load_settings(
                ["--data", str(tmp_path / f"jobs{number}.json")],
                {**FAST_ENV, **mode, "UNSPLASH_ACCESS_KEY": fake.key,
                 "UNSPLASH_API_URL": fake.url, **env})
            node = await aiohttp_client(jobservice.create_app(settings))
            await node.app[jobservice.STORE].until_ready()  # a Redis node loads in the background
            nodes.append(node)
        return nodes

    return start


async def create_spread(nodes: list, count: int) -> list[str]:
    """`count` jobs, the i-th on node i mod len(nodes), 50 at a time."""
    ids = []
    for start in range(0, count, 50):
        batches = await asyncio.gather(*(create_jobs(nodes[i % len(nodes)], 1)
                                         for i in range(start, min(count, start + 50))))
        ids += [batch[0] for batch in batches]
    return ids


async def final_states(events, ids, timeout: float) -> tuple[dict, Counter]:
    """Every job's final state, and how many ON_RESOLVED_JOB each one got."""
    wanted, final, announced = set(ids), {}, Counter()
    async with asyncio.timeout(timeout):
        while wanted - final.keys():
            name, job = await events.next(timeout)
            if name == "ON_RESOLVED_JOB" and job["id"] in wanted:
                announced[job["id"]] += 1
                final[job["id"]] = job
    return final, announced


async def scrape(node) -> dict:
    response = await node.get("/metrics")
    samples = {}
    for family in text_string_to_metric_families(await response.text()):
        for sample in family.samples:
            samples[(sample.name, tuple(sorted(sample.labels.items())))] = sample.value
    return samples


def photos_counted(samples: dict, source: str) -> float:
    return samples.get(("jobservice_photos_total", (("source", source),)), 0)


def assert_photos_honest(jobs: list[dict], fake: RecordingUnsplash) -> tuple[list, list]:
    """A fresh photo is one the fake sold, to one job; a reused one is marked, and is one
    the fake sold before (never the catalog's, once something was bought)."""
    fresh = [job for job in jobs if not job["image"]["reused"]]
    reused = [job for job in jobs if job["image"]["reused"]]
    fresh_ids = [job["image"]["id"] for job in fresh]
    assert len(set(fresh_ids)) == len(fresh_ids), "a fresh photo went to two jobs"
    for job in jobs:
        image = job["image"]
        photo = fake.served.get(image["id"])
        assert photo is not None, f"{image} is not a photo Unsplash sold"
        assert image["source"] == "unsplash" and job["result"] == photo["urls"]["regular"]
        assert image["author"] == photo["user"]["name"]  # the credit stays the photographer's
    assert all(job["attempts"] == 1 for job in fresh)
    return fresh, reused


# --- 1. A scaled demo key: 600 jobs on time, the budget spread over its windows -------


@pytest.mark.parametrize("node_count", [1, 3], ids=["one-process", "three-redis-nodes"])
async def test_600_jobs_under_a_scaled_demo_key_resolve_on_time(
        start_nodes, fake, open_events, node_count):
    """5 calls per 36 s (a demo key's 50 an hour, scaled) and 600 jobs due over 5-60 s:
    about 11 jobs a second, against 150 photos per window. Every job resolves on time;
    the windows' calls are made, spread over each window rather than burned at once;
    no window sees more than one refused call; the jobs past the budget are marked
    reused and show photos bought before. In Redis mode the three nodes share one key."""
    fake.quota, fake.window = 5, 36.0
    nodes = await start_nodes(node_count, {
        "UNSPLASH_QUOTA_WINDOW": "36", "JOB_DELAY_MIN": "5", "JOB_DELAY_MAX": "60",
        "JOB_DELAY_STEP": "0.05"})
    events = await open_events(nodes[0])
    ids = await create_spread(nodes, 600)
    final, announced = await final_states(events, ids, timeout=120)
    jobs = [final[job_id] for job_id in ids]

    assert set(announced.values()) == {1}, "a job was resolved twice"
    assert all(job["status"] == "resolved" for job in jobs)
    late = [lateness(job) for job in jobs]
    assert p99(late) < 1.0, f"lateness p99 {p99(late):.3f} s, max {max(late):.3f} s"
    fresh, reused = assert_photos_honest(jobs, fake)

    windows = fake.windows
    first_call = time.time() - (time.monotonic() - windows[0]["start"])  # the fake's clock
    last_due = max(parse(job["dueAt"]) for job in jobs)
    allowed = fake.quota * math.ceil((last_due - first_call) / fake.window)
    made = sum(window["calls"] for window in windows)
    print(f"\n{node_count} node(s): lateness p99 {p99(late) * 1000:.0f} ms, max "
          f"{max(late) * 1000:.0f} ms; {len(fresh)} fresh, {len(reused)} reused; "
          f"{made} of {allowed} calls; windows {windows}")
    assert made >= 0.6 * allowed, f"{made} calls made of the {allowed} the windows allowed"
    assert all(window["refused"] <= 1 for window in windows), windows
    assert len(fresh) <= 30 * made and reused
    # Spread, not burned: the first window (demand all through it) made its last call
    # past its middle, not in its first seconds.
    assert windows[0]["calls"] == fake.quota and windows[0]["at"][-1] >= fake.window / 2, \
        windows[0]

    counted = [await scrape(node) for node in nodes]
    assert sum(photos_counted(m, "fresh") for m in counted) == len(fresh)
    assert sum(photos_counted(m, "reused") for m in counted) == len(reused)
    assert all(m[("jobservice_unsplash_quota_limit", ())] == 5 for m in counted)
    health = await (await nodes[0].get("/healthz")).json()
    assert health["photos"]["limit"] == 5 and 0 <= health["photos"]["remaining"] <= 5
    assert health["photos"]["source"] == "unsplash" and health["photos"]["reuse"] == "fallback"


# --- 2. Unsplash down: jobs on time with reuse, fresh again once it is back -----------


@pytest.mark.parametrize("outage", ["500", "stall"])
async def test_unsplash_down_then_back(start_nodes, fake, open_events, caplog, outage):
    """Jobs fall due over 1-16 s; Unsplash fails every call (HTTP 500, or does not
    answer in time) from 1 s to 11 s. The photos bought ahead carry the first seconds,
    then due jobs resolve on time with reused photos, and once Unsplash is back fresh
    ones resume by themselves. The log says so once each way, not once per call."""
    caplog.set_level(logging.INFO, logger="jobservice")
    photo_wait = 0.25
    fake.stall_seconds = 5.0
    [node] = await start_nodes(1, {
        "JOB_DELAY_MIN": "1", "JOB_DELAY_MAX": "16", "JOB_DELAY_STEP": "0.05",
        "RETRY_BASE_DELAY": "0.05", "RETRY_MAX_DELAY": "0.5", "UNSPLASH_TIMEOUT": "0.3",
        "PHOTO_WAIT": str(photo_wait)})
    events = await open_events(node)
    started = time.time()
    ids = await create_spread([node], 300)
    await asyncio.sleep(max(0.0, started + 1 - time.time()))  # the test's own clock
    fake.mode = outage
    await asyncio.sleep(5)
    during = (await (await node.get("/healthz")).json())["photos"]
    await asyncio.sleep(max(0.0, started + 11 - time.time()))
    fake.mode = "ok"
    back_at = time.time()
    final, announced = await final_states(events, ids, timeout=40)
    after = (await (await node.get("/healthz")).json())["photos"]
    jobs = [final[job_id] for job_id in ids]

    assert set(announced.values()) == {1}
    assert all(job["status"] == "resolved" and job["error"] is None for job in jobs)
    late = [lateness(job) for job in jobs]
    assert p99(late) < 1.0 and max(late) < photo_wait + 0.5, \
        f"lateness p99 {p99(late):.3f} s, max {max(late):.3f} s"
    _, reused = assert_photos_honest(jobs, fake)
    due = {job["id"]: parse(job["dueAt"]) for job in jobs}
    # Beyond what was bought ahead (5 s), the outage's jobs were served by reuse...
    assert any(started + 7 < due[job["id"]] < back_at for job in reused), \
        "no job during the outage got a reused photo"
    assert all(due[job["id"]] > started + 1 for job in reused)
    # ...and every job due a moment after Unsplash came back got a fresh one.
    late_fresh = [job for job in jobs if due[job["id"]] > back_at + 1.5]
    assert late_fresh and all(not job["image"]["reused"] for job in late_fresh)

    assert during["state"] == "unavailable", during
    assert ("500" in during["error"]) if outage == "500" else ("0.3 s" in during["error"])
    assert after["state"] == "ok" and after["error"] is None, after
    lines = [record.getMessage() for record in caplog.records]
    assert sum("no fresh photos for now" in line for line in lines) == 1, lines
    assert sum("fresh photos resume" in line for line in lines) == 1, lines


# --- 3. A key that is spent when the service starts ------------------------------------


async def test_a_spent_key_costs_one_refused_call_per_window(start_nodes, fake, open_events):
    """Another program spent the key's window before this one started. The first call
    is refused (403); with nothing bought yet the catalog stands in, marked reused; no
    other call is made until a window from then has passed, and then fresh photos come."""
    fake.quota, fake.window = 3, 2.0
    fake.windows.append({"start": time.monotonic(), "calls": 3, "at": [0, 0, 0],
                         "refused": 0})
    [node] = await start_nodes(1, {"UNSPLASH_QUOTA_WINDOW": "2", "JOB_DELAY_MIN": "0.1",
                                   "JOB_DELAY_MAX": "3", "JOB_DELAY_STEP": "0.1"})
    events = await open_events(node)
    ids = await create_spread([node], 60)
    final, _ = await final_states(events, ids, timeout=20)
    jobs = [final[job_id] for job_id in ids]

    assert fake.windows[0]["refused"] == 1, fake.windows
    assert all(window["refused"] <= 1 for window in fake.windows), fake.windows
    catalog = [job for job in jobs if job["image"]["source"] == "catalog"]
    assert catalog and all(job["image"]["reused"] for job in catalog)
    assert all(job["result"].startswith("https://images.unsplash.com/") for job in catalog)
    bought = [job for job in jobs if job["image"]["source"] == "unsplash"]
    assert bought, "no fresh photo once the window had turned"
    assert max(lateness(job) for job in jobs) < 1.0
    samples = await scrape(node)
    assert photos_counted(samples, "catalog") == len(catalog)
    assert samples[("jobservice_unsplash_requests_total", (("outcome", "rate_limited"),))] \
        == 1


async def test_a_job_that_must_be_fresh_waits_for_the_window(start_nodes, fake, open_events):
    """PHOTO_REUSE=never: past the key's budget a due job waits for the window to turn,
    with one call then, never a refused call per job."""
    fake.quota, fake.window = 1, 1.0
    [node] = await start_nodes(1, {"PHOTO_REUSE": "never", "UNSPLASH_QUOTA_WINDOW": "1"})
    events = await open_events(node)
    ids = await create_spread([node], 45)  # 30 from the window's one call, 15 wait
    final, _ = await final_states(events, ids, timeout=10)
    jobs = [final[job_id] for job_id in ids]

    assert all(job["status"] == "resolved" and not job["image"]["reused"] for job in jobs)
    assert [window["calls"] for window in fake.windows] == [1, 1], fake.windows
    assert sum(window["refused"] for window in fake.windows) == 0, fake.windows
    waited = sorted(lateness(job) for job in jobs)
    assert waited[-1] >= 0.5, "no job waited for the window to turn"


# --- 4. A rejected key: on time, and said where a person looks --------------------------


async def test_a_rejected_key_is_reported_and_jobs_stay_on_time(start_nodes, fake,
                                                                open_events, caplog):
    """The key works for one call, then is revoked (401). Jobs keep resolving on time
    with the photos bought before; /healthz and the log say the key was rejected (once,
    not once per call), and the key is tried again at most once per RETRY_MAX_DELAY."""
    caplog.set_level(logging.INFO, logger="jobservice")
    retry_max = 0.5
    [node] = await start_nodes(1, {"RETRY_MAX_DELAY": str(retry_max)})
    events = await open_events(node)
    first = await create_spread([node], 30)  # the one call's 30 photos, all used
    await final_states(events, first, timeout=5)
    assert (await (await node.get("/healthz")).json())["photos"]["pool"] == 0
    fake.mode = "401"
    calls_before = fake.calls
    started = time.time()
    ids = await create_spread([node], 40)
    await asyncio.sleep(1.2)  # the test's own clock: what happens while the key is bad
    final, _ = await final_states(events, ids, timeout=10)
    health = (await (await node.get("/healthz")).json())["photos"]
    jobs = [final[job_id] for job_id in ids]

    assert all(job["status"] == "resolved" and job["image"]["reused"] for job in jobs)
    assert max(lateness(job) for job in jobs) < 1.0
    assert health["state"] == "key_rejected" and "rejected" in health["error"], health
    tried = fake.calls - calls_before
    assert 1 <= tried <= 1 + math.ceil((time.time() - started) / retry_max), tried
    errors = [r.getMessage() for r in caplog.records if r.levelno >= logging.ERROR]
    assert len(errors) == 1 and "rejected the access key" in errors[0], errors


# --- 5. What was bought survives a restart ---------------------------------------------


@pytest.mark.parametrize("redis", [False, True], ids=["file", "redis"])
async def test_photos_bought_before_a_restart_are_reused_after_it(start_nodes, fake,
                                                                  open_events, redis):
    """The reuse set starts from the jobs kept (in Redis mode, once the node has loaded
    them): after a restart with Unsplash down, new jobs get the photos the earlier jobs
    were sold, not the catalog's."""
    [node] = await start_nodes(1, {}, redis)
    events = await open_events(node)
    ids = await create_spread([node], 30)
    await final_states(events, ids, timeout=5)
    sold = set(fake.served)
    await node.close()

    fake.mode = "500"
    [node] = await start_nodes(1, {}, redis)
    events = await open_events(node)
    ids = await create_spread([node], 20)
    final, _ = await final_states(events, ids, timeout=5)
    jobs = list(final.values())
    assert all(job["image"]["reused"] and job["image"]["id"] in sold for job in jobs), \
        [job["image"] for job in jobs]


async def test_jobs_that_fell_due_while_down_get_fresh_photos(start_nodes, fake, open_events,
                                                              tmp_path):
    """Jobs overdue when the service starts wait for a fresh photo as long as a job due
    then would (PHOTO_WAIT), rather than taking reused ones because their grace ran out
    while nothing was running."""
    now = time.time()
    overdue = [jobservice.Job(f"overdue-{n}", "pending", None, now - 120, now - 60, seq=n)
               for n in range(1, 11)]
    (tmp_path / "jobs0.json").write_text(json.dumps(
        {"version": 1, "seq": len(overdue), "jobs": [job.to_dict() for job in overdue]}))
    [node] = await start_nodes(1, {}, redis=False)
    events = await open_events(node, "?since=0")
    final = await events.resolutions([job.id for job in overdue])
    jobs = list(final.values())
    fresh, reused = assert_photos_honest(jobs, fake)
    assert reused == [] and len(fresh) == len(overdue)
    assert fake.calls == 1

