"""The image behaviour of the real app against a fake Unsplash on loopback.

Every test drives the service through HTTP and `/ws` only; the network code is never
mocked. Waiting is always on events (`EventStream.resolutions`), never on sleeps.
Sections 3 to 6 are about a job that must have a fresh photo (PHOTO_REUSE=never): its
attempts, its failure, the pauses it waits out. What a due job does by default when no
fresh photo can come in time is in tests/test_quota.py.
"""

from __future__ import annotations

import asyncio
import itertools
import json
import logging
import secrets
import time

import pytest
from aiohttp import web
from conftest import AGE_TEST_ENV, AGED, FAST_ENV, create_jobs, free_port, serve_fake
from fake_unsplash import FakeUnsplash

import jobservice

IMAGE_KEYS = {"id", "thumb", "small", "alt", "author", "authorUrl", "pageUrl", "color",
              "source", "reused"}
NEVER_REUSE = {"PHOTO_REUSE": "never"}


class RecordingUnsplash(FakeUnsplash):
    """The shared fake, plus what these tests need to see: when each call arrived (wall
    clock, comparable with the jobs' dueAt), its method and path, the mode each call got,
    and every photo handed out by id. One extra mode, "echo-key@N", answers 500 with a
    body that repeats the caller's access key starting at character N."""

    def __init__(self, key: str):
        super().__init__(key)
        self.arrivals: list[float] = []
        self.targets: list[tuple[str, str]] = []
        self.modes: list[str] = []
        self.served: dict[str, dict] = {}

    def next_mode(self) -> str:
        mode = super().next_mode()
        self.modes.append(mode)
        return mode

    def photo(self, base: str) -> dict:
        photo = super().photo(base)
        self.served[photo["id"]] = photo
        return photo

    async def random_photos(self, request: web.Request) -> web.StreamResponse:
        self.arrivals.append(time.time())
        self.targets.append((request.method, request.path))
        if self.script and self.script[0].startswith("echo-key@"):
            offset = int(self.script.popleft().split("@", 1)[1])
            self.calls += 1
            self.requests.append({"query": dict(request.query),
                                  "headers": dict(request.headers)})
            auth = request.headers.get("Authorization", "")
            key = auth.removeprefix("Client-ID ")
            return web.Response(status=500, text="x" * offset + key + " was not expected here")
        return await super().random_photos(request)


@pytest.fixture
async def fake_unsplash(aiohttp_server) -> RecordingUnsplash:
    """Overrides conftest's fixture (so `unsplash_env` uses it too) with a recording fake
    whose key is random, so a leak of it cannot be a coincidence."""
    return await serve_fake(aiohttp_server, RecordingUnsplash(key=secrets.token_hex(20)))


async def run_jobs(client, events, count: int, *, concurrently: bool = False) -> list[dict]:
    """Create jobs and wait for their final states (resolved or failed), in creation order."""
    if concurrently:
        ids = await asyncio.gather(*(create_jobs(client, 1) for _ in range(count)))
        ids = [job_ids[0] for job_ids in ids]
    else:
        ids = await create_jobs(client, count)
    done = await events.resolutions(ids)
    return [done[job_id] for job_id in ids]


def due_at(job: dict) -> float:
    return jobservice.parse_time(job["dueAt"], "dueAt")


# --- 1. The request and the resolved job ---------------------------------------------


async def test_request_shape_and_resolved_image(start_service, fake_unsplash, unsplash_env,
                                                open_events):
    client = await start_service(unsplash_env)
    events = await open_events(client)
    [job] = await run_jobs(client, events, 1)

    assert fake_unsplash.calls == 1
    assert fake_unsplash.targets == [("GET", "/photos/random")]
    request = fake_unsplash.requests[0]
    assert request["query"] == {"query": "food", "count": "30"}
    assert request["headers"].get("Authorization") == f"Client-ID {fake_unsplash.key}"
    assert request["headers"].get("Accept-Version") == "v1"

    assert job["status"] == "resolved", job
    assert job["error"] is None
    assert job["attempts"] == 1
    image = job["image"]
    assert isinstance(image, dict) and IMAGE_KEYS <= image.keys(), image
    photo = fake_unsplash.served.get(image["id"])
    assert photo is not None, f"image id {image['id']!r} is not a photo the fake served"
    assert job["result"] == photo["urls"]["regular"]
    assert image == {**image,
                     "id": photo["id"],
                     "thumb": photo["urls"]["thumb"],
                     "small": photo["urls"]["small"],
                     "alt": photo["alt_description"],
                     "author": photo["user"]["name"],
                     "authorUrl": photo["user"]["links"]["html"],
                     "pageUrl": photo["links"]["html"],
                     "color": photo["color"],
                     "source": "unsplash"}

    # The stored job is the one announced.
    response = await client.get(f"/jobs/{job['id']}")
    assert response.status == 200
    stored = await response.json()
    assert stored["result"] == job["result"] and stored["image"] == image


# --- 2. Batching ---------------------------------------------------------------------


async def test_sixty_jobs_cost_two_calls_and_each_photo_serves_one_job(
        start_service, fake_unsplash, unsplash_env, open_events):
    """60 jobs need exactly 2 calls: each call buys 30 photos, the pool is refilled only
    when it is empty, and nothing in it expires within the test. A third call would
    only be excusable if photos were thrown away (e.g. expired or lost on a failed
    write), which nothing here provokes, so the bound is 2, not 3."""
    client = await start_service(unsplash_env)
    events = await open_events(client)
    jobs = await run_jobs(client, events, 60)

    assert [job["status"] for job in jobs] == ["resolved"] * 60
    assert fake_unsplash.calls == 2, f"{fake_unsplash.calls} API calls for 60 jobs"
    assert all(r["query"].get("count") == "30" for r in fake_unsplash.requests)
    photo_ids = [job["image"]["id"] for job in jobs]
    assert len(set(photo_ids)) == 60, "a photo was handed to more than one job"
    assert set(photo_ids) <= fake_unsplash.served.keys()
    results = [job["result"] for job in jobs]
    assert all(job["result"] == fake_unsplash.served[job["image"]["id"]]["urls"]["regular"]
               for job in jobs), results


# --- 3. Transient failures are retried and counted ----------------------------------


async def test_500_then_bad_json_then_ok_resolves_on_third_attempt(
        start_service, fake_unsplash, unsplash_env, open_events):
    fake_unsplash.script.extend(["500", "badjson"])
    client = await start_service({**unsplash_env, **NEVER_REUSE})
    events = await open_events(client)
    [job] = await run_jobs(client, events, 1)

    assert fake_unsplash.modes == ["500", "badjson", "ok"]
    assert fake_unsplash.calls == 3
    assert job["status"] == "resolved", job
    assert job["attempts"] == 3
    assert job["error"] is None
    assert job["image"]["id"] in fake_unsplash.served


async def test_stall_beyond_timeout_counts_as_a_failed_attempt(
        start_service, fake_unsplash, unsplash_env, open_events):
    timeout = float(FAST_ENV["UNSPLASH_TIMEOUT"])
    fake_unsplash.stall_seconds = timeout + 0.3
    fake_unsplash.script.append("stall")
    client = await start_service({**unsplash_env, **NEVER_REUSE})
    events = await open_events(client)
    [job] = await run_jobs(client, events, 1)

    assert fake_unsplash.calls == 2
    assert fake_unsplash.modes == ["stall", "ok"]
    # The service gave up on the stalled call after its timeout, not after the stall.
    gap = fake_unsplash.arrivals[1] - fake_unsplash.arrivals[0]
    assert timeout - 0.02 <= gap < fake_unsplash.stall_seconds, gap
    assert job["status"] == "resolved", job
    assert job["attempts"] == 2


# --- 4. Permanent failure, then a manual retry --------------------------------------


@pytest.mark.parametrize(("mode", "cause"), [
    ("500", "500"),
    ("badjson", "json"),
    ("stall", "0.5 s"),
])
async def test_permanent_failure_fails_after_max_attempts_then_retry_resolves(
        start_service, fake_unsplash, unsplash_env, open_events, mode, cause):
    fake_unsplash.mode = mode
    fake_unsplash.stall_seconds = 0.8
    client = await start_service({**unsplash_env, **NEVER_REUSE, "JOB_MAX_ATTEMPTS": "3"})
    events = await open_events(client)
    [job] = await run_jobs(client, events, 1)

    assert job["status"] == "failed", job
    assert job["attempts"] == 3
    assert fake_unsplash.calls == 3
    error = job["error"]
    assert isinstance(error, str) and len(error) > 20 and error[0].isalpha(), error
    assert "Traceback" not in error
    assert "unsplash" in error.lower() and cause in error.lower(), error
    assert job["result"] is None and job["image"] is None

    fake_unsplash.mode = "ok"
    response = await client.post(f"/jobs/{job['id']}/retry")
    assert response.status == 202, await response.text()
    retried = await response.json()
    assert retried["status"] == "pending" and retried["attempts"] == 0
    done = await events.resolutions([job["id"]])
    job = done[job["id"]]
    assert job["status"] == "resolved", job
    assert job["attempts"] == 1
    assert job["error"] is None
    assert fake_unsplash.calls == 4
    assert job["result"] == fake_unsplash.served[job["image"]["id"]]["urls"]["regular"]


async def test_unreachable_unsplash_is_not_taken_for_a_spent_key(
        start_service, fake_unsplash, open_events, caplog):
    """A first call that gets no answer at all (nothing listens) tells nothing of the key's
    budget: the jobs after it make their own attempts and fail for the real reason, and
    nothing says the key's calls are used up."""
    caplog.set_level(logging.INFO, logger="jobservice")
    client = await start_service({**NEVER_REUSE, "UNSPLASH_ACCESS_KEY": fake_unsplash.key,
                                  "UNSPLASH_API_URL": f"http://127.0.0.1:{free_port()}",
                                  "JOB_MAX_ATTEMPTS": "1"})
    events = await open_events(client)
    jobs = await run_jobs(client, events, 3)

    for job in jobs:
        assert job["status"] == "failed", job
        assert "cannot reach unsplash" in job["error"].lower(), job["error"]
    said = [record.getMessage() for record in caplog.records]
    assert any("no fresh photos" in line for line in said), said
    assert not any("used up" in line for line in said), said


# --- 5. Rate limits cost no attempts -------------------------------------------------


async def test_rate_limits_pause_without_costing_attempts(
        start_service, fake_unsplash, unsplash_env, open_events):
    fake_unsplash.retry_after = "0.05"
    fake_unsplash.script.extend(["429", "429", "403-rate"])
    # The 403 names no time: the key is spent until the window turns, a window from now.
    client = await start_service({**unsplash_env, **NEVER_REUSE,
                                  "UNSPLASH_QUOTA_WINDOW": "0.05"})
    events = await open_events(client)
    [job] = await run_jobs(client, events, 1)

    assert fake_unsplash.modes == ["429", "429", "403-rate", "ok"]
    assert job["status"] == "resolved", job
    assert job["attempts"] == 1, "a rate limit was counted as a failed attempt"
    assert job["error"] is None
    # Each limit was honoured: no call came sooner than the pause it asked for.
    arrivals = fake_unsplash.arrivals
    gaps = [later - earlier for earlier, later in itertools.pairwise(arrivals)]
    assert all(gap >= 0.05 - 0.01 for gap in gaps), gaps


async def test_remaining_zero_pauses_before_the_next_call(
        start_service, fake_unsplash, unsplash_env, open_events):
    """31 jobs, all due within ~0.2 s: the first call (X-Ratelimit-Remaining: 0,
    Retry-After: 0.6) feeds 30 of them; the 31st must wait out the pause."""
    pause = 0.6
    fake_unsplash.retry_after = str(pause)
    fake_unsplash.script.append("remaining0")
    client = await start_service({**unsplash_env, **NEVER_REUSE})
    events = await open_events(client)
    jobs = await run_jobs(client, events, 31, concurrently=True)

    assert fake_unsplash.calls == 2
    assert fake_unsplash.modes == ["remaining0", "ok"]
    first, second = fake_unsplash.arrivals
    # The test only shows something if the 31st job was due well before the pause ended.
    assert max(map(due_at, jobs)) < first + pause - 0.1, "jobs created too slowly"
    assert second - first >= pause - 0.02, f"second call {second - first:.3f} s after first"
    assert all(job["status"] == "resolved" for job in jobs)
    assert all(job["attempts"] == 1 for job in jobs), [job["attempts"] for job in jobs]
    assert len({job["image"]["id"] for job in jobs}) == 31


# --- 6. A rejected key ---------------------------------------------------------------


def assert_key_absent(key: str, texts: list[str]) -> None:
    """Neither the key nor any 10-character piece of it is in any of the texts."""
    blob = "\n".join(texts)
    assert key not in blob, "the access key leaked"
    pieces = [key[i:i + 10] for i in range(len(key) - 9)]
    leaked = [piece for piece in pieces if piece in blob]
    assert not leaked, f"part of the access key leaked: {leaked[0]!r}"


async def everything_the_service_says(client, events, job_ids) -> list[str]:
    texts = []
    paths = ["/", "/jobs", "/healthz", *(f"/jobs/{job_id}" for job_id in job_ids)]
    for path in paths:
        response = await client.get(path)
        texts.append(await response.text())
        texts.extend(f"{name}: {value}" for name, value in response.headers.items())
    texts.extend(json.dumps(event, ensure_ascii=False) for event in events.seen)
    return texts


def log_texts(caplog) -> list[str]:
    texts = [caplog.text]
    for record in caplog.records:
        texts.append(record.getMessage())
        texts.append(repr(record.args))
        if record.exc_info and record.exc_info[1] is not None:
            texts.append(repr(record.exc_info[1]))
    return texts


async def test_401_fails_waiting_jobs_at_once_and_never_leaks_the_key(
        start_service, fake_unsplash, unsplash_env, open_events, caplog):
    """A 429 (Retry-After 0.5) first makes every job due and waiting at the same time;
    then one call gets 401 and must fail all of them, with no further call."""
    caplog.set_level(logging.DEBUG, logger="jobservice")
    caplog.set_level(logging.DEBUG, logger="aiohttp")
    fake_unsplash.retry_after = "0.5"
    fake_unsplash.script.extend(["429", "401"])
    client = await start_service({**unsplash_env, **NEVER_REUSE})
    events = await open_events(client)
    jobs = await run_jobs(client, events, 5, concurrently=True)

    assert fake_unsplash.modes == ["429", "401"], "the rejected key was tried again"
    assert fake_unsplash.calls == 2
    for job in jobs:
        assert job["status"] == "failed", job
        error = job["error"].lower()
        assert "key" in error and "rejected" in error, job["error"]
        assert job["result"] is None and job["image"] is None

    texts = await everything_the_service_says(client, events, [job["id"] for job in jobs])
    assert any(record.name.startswith("aiohttp") for record in caplog.records), \
        "caplog captured nothing: the log check would be vacuous"
    assert_key_absent(fake_unsplash.key, texts + log_texts(caplog))


async def test_wrong_key_fails_the_job_with_one_call(start_service, fake_unsplash,
                                                     unsplash_env, open_events, caplog):
    caplog.set_level(logging.DEBUG, logger="jobservice")
    caplog.set_level(logging.DEBUG, logger="aiohttp")
    wrong_key = secrets.token_hex(20)
    client = await start_service({**unsplash_env, **NEVER_REUSE,
                                  "UNSPLASH_ACCESS_KEY": wrong_key})
    events = await open_events(client)
    [job] = await run_jobs(client, events, 1)

    assert fake_unsplash.calls == 1
    assert fake_unsplash.requests[0]["headers"]["Authorization"] == f"Client-ID {wrong_key}"
    assert job["status"] == "failed", job
    assert "rejected" in job["error"].lower() and "key" in job["error"].lower()
    texts = await everything_the_service_says(client, events, [job["id"]])
    assert_key_absent(wrong_key, texts + log_texts(caplog))


@pytest.mark.parametrize("reuse", ["never", "fallback"])
@pytest.mark.parametrize("offset", [10, 180], ids=["key-inside-excerpt", "key-across-cut"])
async def test_key_echoed_in_an_error_body_is_not_passed_on(
        start_service, fake_unsplash, unsplash_env, open_events, caplog, offset, reuse):
    """An error body (say, from a proxy) that repeats the key must not carry it, or a
    piece of it, into the job's error, or (when the job resolves with a reused photo
    instead) into /healthz's word on why there are no fresh photos. At offset 180 the
    40-character key straddles character 200 of the body."""
    caplog.set_level(logging.DEBUG, logger="jobservice")
    caplog.set_level(logging.DEBUG, logger="aiohttp")
    fake_unsplash.script.append(f"echo-key@{offset}")
    client = await start_service({**unsplash_env, "PHOTO_REUSE": reuse,
                                  "JOB_MAX_ATTEMPTS": "1", "RETRY_BASE_DELAY": "60",
                                  "RETRY_MAX_DELAY": "60"})
    events = await open_events(client)
    [job] = await run_jobs(client, events, 1)

    assert fake_unsplash.calls == 1
    if reuse == "never":
        assert job["status"] == "failed", job
        assert "500" in job["error"], job["error"]
    else:
        assert job["status"] == "resolved" and job["image"]["reused"], job
        health = await (await client.get("/healthz")).json()
        assert "500" in health["photos"]["error"], health
    texts = await everything_the_service_says(client, events, [job["id"]])
    assert_key_absent(fake_unsplash.key, texts + log_texts(caplog))


# --- 7. No key: the catalog ----------------------------------------------------------


async def test_without_a_key_photos_come_from_the_catalog(start_service, fake_unsplash,
                                                          open_events):
    client = await start_service({"UNSPLASH_API_URL": fake_unsplash.url})
    events = await open_events(client)
    jobs = await run_jobs(client, events, 3)

    assert fake_unsplash.calls == 0 and fake_unsplash.arrivals == []
    for job in jobs:
        assert job["status"] == "resolved", job
        assert job["result"].startswith("https://images.unsplash.com/"), job["result"]
        image = job["image"]
        assert IMAGE_KEYS <= image.keys(), image
        assert image["source"] == "catalog"
        assert image["id"] and image["alt"]
        assert image["thumb"].startswith("https://images.unsplash.com/")
        assert image["small"].startswith("https://images.unsplash.com/")


# --- 8. The pool's age limit ---------------------------------------------------------


@pytest.mark.parametrize(("max_age", "calls"), [(None, 1), (AGED, 2)],
                         ids=["fresh-pool-reused", "stale-pool-refetched"])
async def test_pool_never_hands_out_a_stale_photo(start_service, fake_unsplash, unsplash_env,
                                                  open_events, monkeypatch, max_age, calls):
    """With the default limit the second job takes the first batch's leftovers; with a
    limit of 0.5 s the leftovers are too old (the second job is due 0.6 s later), so the
    second job must cost a new call and get a photo from the new batch."""
    if max_age is not None:
        monkeypatch.setattr(jobservice, "POOL_MAX_AGE", max_age)
    client = await start_service({**unsplash_env, **AGE_TEST_ENV})
    events = await open_events(client)
    [first] = await run_jobs(client, events, 1)
    first_batch = set(fake_unsplash.served)
    [second] = await run_jobs(client, events, 1)

    assert first["status"] == second["status"] == "resolved"
    assert fake_unsplash.calls == calls
    if calls == 1:
        assert second["image"]["id"] in first_batch - {first["image"]["id"]}
    else:
        assert second["image"]["id"] not in first_batch, "a stale pooled photo was used"
        assert second["image"]["id"] in fake_unsplash.served
