"""Chaos from Unsplash: errors, stalls, broken JSON and a rate-limit window at once.

At the mix the issue asks for (30% 500s, 10% stalls, 10% invalid JSON) half of all
calls fail, so 2,000 jobs need at least 67 good batches of 30 and, on average, as
many failed calls again. The bound of one call per 25 jobs therefore holds for the
calls that bought photos; the failed ones are counted and reported, not bounded.
"""

from __future__ import annotations

import asyncio
from collections import Counter

import pytest
from conftest import create_jobs, serve_fake
from fake_unsplash import FakeUnsplash

CHAOS_ENV = {
    # Jobs that must have a fresh photo: how the fresh-only path copes. With the default
    # PHOTO_REUSE they would all resolve on time anyway (tests/test_quota.py).
    "PHOTO_REUSE": "never",
    "UNSPLASH_TIMEOUT": "0.2",
    "RETRY_BASE_DELAY": "0.01",
    "RETRY_MAX_DELAY": "0.05",
    # The 403 of the rate-limit window names no time: spent for a window from then.
    "UNSPLASH_QUOTA_WINDOW": "0.2",
    # Attempts count consecutive failures of a job's own batch: at a 50% failure rate
    # ten in a row happens to one batch in a thousand, so allow more here.
    "JOB_MAX_ATTEMPTS": "30",
}


class ChaoticUnsplash(FakeUnsplash):
    """Chaos per call, with a rate-limit window (two 429s and a 403) from call 20."""

    def __init__(self):
        super().__init__()
        self.chaos = {"500": 0.3, "stall": 0.1, "badjson": 0.1}
        self.stall_seconds = 1.0
        self.retry_after = "0.2"
        self.outcomes: Counter[str] = Counter()

    def next_mode(self) -> str:
        mode = ["429", "429", "403-rate"][self.calls - 20] if 20 <= self.calls < 23 \
            else super().next_mode()
        self.outcomes[mode] += 1
        return mode


@pytest.fixture
async def chaotic_unsplash(aiohttp_server) -> ChaoticUnsplash:
    return await serve_fake(aiohttp_server, ChaoticUnsplash())


async def create_many(client, count: int) -> list[str]:
    ids = []
    for start in range(0, count, 100):
        responses = await asyncio.gather(*(client.post("/jobs")
                                           for _ in range(min(100, count - start))))
        assert all(response.status == 201 for response in responses)
        ids += [(await response.json())["id"] for response in responses]
    return ids


async def test_two_thousand_jobs_all_resolve_once_through_chaos(
        start_service, open_events, chaotic_unsplash):
    fake = chaotic_unsplash
    client = await start_service({**CHAOS_ENV, "UNSPLASH_ACCESS_KEY": fake.key,
                                  "UNSPLASH_API_URL": fake.url})
    events = await open_events(client)
    ids = await create_many(client, 2000)
    resolutions: Counter[str] = Counter()
    final = {}
    async with asyncio.timeout(120):
        while len(final) < len(ids):
            name, job = await events.next(timeout=60)
            if name == "ON_RESOLVED_JOB":
                resolutions[job["id"]] += 1
                final[job["id"]] = job
    assert set(final) == set(ids)
    assert all(job["status"] == "resolved" for job in final.values()), \
        Counter(job["error"] for job in final.values() if job["status"] != "resolved")
    assert set(resolutions.values()) == {1}, "a job was resolved twice"
    photos = [job["image"]["id"] for job in final.values()]
    assert len(set(photos)) == len(photos), "a photo served two jobs"

    good_calls = fake.outcomes["ok"]
    failed = {mode: n for mode, n in fake.outcomes.items() if mode != "ok"}
    print(f"\n{fake.calls} calls for 2000 jobs: {good_calls} bought photos, failed: {failed}")
    assert good_calls <= 2000 / 25
    assert failed["500"] and failed["stall"] and failed["badjson"] and failed["429"]
    listing = await (await client.get("/jobs?status=resolved")).json()
    assert len(listing) == 2000


async def test_when_unsplash_is_down_every_job_fails_with_a_reason_then_retries_succeed(
        start_service, open_events, fake_unsplash, unsplash_env):
    fake_unsplash.mode = "500"
    client = await start_service({**unsplash_env, "JOB_MAX_ATTEMPTS": "3",
                                  "PHOTO_REUSE": "never"})
    events = await open_events(client)
    ids = await create_jobs(client, 90)
    failed = await events.resolutions(ids)
    assert all(job["status"] == "failed" for job in failed.values())
    assert all(job["attempts"] == 3 for job in failed.values())
    assert all("HTTP 500" in job["error"] for job in failed.values())
    # A failed call counts against the batch of up to 30 jobs it was for (per job it
    # would be 270 calls); jobs falling due at different moments make a few more.
    assert fake_unsplash.calls < 90 / 3, "failed calls are made per job, not per batch"

    fake_unsplash.mode = "ok"
    for job_id in ids:
        assert (await client.post(f"/jobs/{job_id}/retry")).status == 202
    resolved = await events.resolutions(ids)
    assert all(job["status"] == "resolved" and job["result"] for job in resolved.values())
