"""Bulk changes and finding a job (issue 26): `POST /jobs/retry` retries every failed job
(or those a filter picks), `POST /jobs/delete` deletes the finished ones (all, by status,
or finished before a time), each in one request that is answered 202 with how many it
took; every job it changes goes through the store's commit, so it is on disk, announced
live (ON_CREATED_JOB, ON_DELETED_JOB) and replayed from `since`, in both modes. Access
rules, CLIENT_RATE_LIMIT and MAX_PENDING_JOBS hold as for single requests, the work is
staged in bounded steps, and a job someone else changes first is left as they left it.
`GET /jobs/find` finds a job by its whole id or the short one a card shows.
"""

from __future__ import annotations

import asyncio
import json
import time

import pytest
from conftest import FAST_ENV, create_jobs, seed, stored
from test_abuse import eventually

import jobservice

# Retried jobs stay pending while a test looks at them.
HELD = {"RETRY_BASE_DELAY": "3600", "RETRY_MAX_DELAY": "3600", "JOB_RETENTION": "0",
        "JOB_DELAY_MIN": "3600", "JOB_DELAY_MAX": "3600"}
TOKEN = "tok-0123456789abcdefghij"


def make_jobs(counts: dict[str, int], t0: float | None = None) -> list[jobservice.Job]:
    """Jobs of each status, oldest first, one a second: failed ones with an error that
    says why, pending ones due in an hour."""
    t0 = t0 or time.time()
    jobs = []
    for status, count in counts.items():
        for _ in range(count):
            created = t0 - 10_000 + len(jobs)
            job_id = jobservice.new_job_id()
            if status == "pending":
                jobs.append(jobservice.Job(job_id, "pending", None, created, t0 + 3600))
            elif status == "failed":
                jobs.append(jobservice.Job(job_id, "failed", None, created, created + 1,
                                           created + 2, 3, "gave up after 3 attempts: "
                                           "cannot reach Unsplash: Connect call failed"))
            else:
                jobs.append(jobservice.Job(job_id, "resolved", "https://images.unsplash.com/x",
                                           created, created + 1, created + 2, 1, None,
                                           {"id": "x", "source": "catalog"}))
    return jobs


async def store_jobs(backend: dict, jobs_file, jobs: list[jobservice.Job]) -> None:
    for seq, job in enumerate(jobs, start=1):
        job.seq = seq
    jobs_file.write_text(json.dumps({"version": 1, "seq": len(jobs),
                                     "jobs": [job.to_dict() for job in jobs]}))
    await seed(backend, jobs_file)


async def stats(client) -> dict:
    return await (await client.get("/jobs/stats")).json()


async def bulk(client, path: str, body=None, status: int = 202, headers=None) -> dict:
    response = await client.post(path, json=body, headers=headers)
    assert response.status == status, await response.text()
    return await response.json()


async def noted(value):
    """A value as an awaitable, for eventually()'s predicates on in-process state."""
    return value


def store_of(client) -> jobservice.JobStore:
    return client.app[jobservice.STORE]


async def collect(events, name: str, ids: set[str], timeout: float = 20.0) -> dict[str, dict]:
    """The `name` events of every job in ids (and none twice)."""
    found: dict[str, dict] = {}
    async with asyncio.timeout(timeout):
        while found.keys() != ids:
            event, payload = await events.next(timeout)
            if event == name and payload["id"] in ids:
                assert payload["id"] not in found, f"{name} of {payload['id']} twice"
                found[payload["id"]] = payload
    return found


async def replayed(open_events, client, since: int) -> list[tuple[str, dict]]:
    """What a client that was away is sent when it comes back with `since`: up to SYNCED."""
    events = await open_events(client, f"?since={since}")
    await events.until(lambda name, _: name == "SYNCED")
    await events.ws.close()
    return events.seen[:-1]


async def test_three_hundred_failed_jobs_retried_by_one_request(
        start_service, open_events, jobs_file, backend):
    jobs = make_jobs({"resolved": 20, "failed": 300, "pending": 5})
    await store_jobs(backend, jobs_file, jobs)
    failed = {job.id for job in jobs if job.status == "failed"}
    client = await start_service(HELD)
    live = await open_events(client)
    before = await stats(client)
    assert (before["failed"], before["pending"]) == (300, 5)

    answer = await bulk(client, "/jobs/retry")
    assert answer == {"taken": 300, "seq": before["seq"]}
    # Watched live: each job once, pending again with its attempts reset, seq above.
    seen = await collect(live, "ON_CREATED_JOB", failed)
    assert {job["status"] for job in seen.values()} == {"pending"}
    assert {job["attempts"] for job in seen.values()} == {0}
    assert min(job["seq"] for job in seen.values()) > answer["seq"]
    after = await stats(client)
    assert (after["failed"], after["pending"], after["resolved"]) == (0, 305, 20)
    # Away meanwhile: the replay brings each retried job, in its new state, once.
    events = await replayed(open_events, client, answer["seq"])
    assert [name for name, _ in events] == ["ON_CREATED_JOB"] * 300
    assert {job["id"]: job["status"] for _, job in events} == dict.fromkeys(failed, "pending")
    # On disk (the journal, or Redis) before it was announced.
    at_rest, _ = await stored(backend, jobs_file)
    assert {at_rest[job_id]["status"] for job_id in failed} == {"pending"}
    # Nothing left to take: 202, none taken.
    assert (await bulk(client, "/jobs/retry"))["taken"] == 0


async def test_finished_jobs_deleted_by_status_by_age_then_all(
        start_service, open_events, jobs_file, backend):
    t0 = time.time()
    jobs = make_jobs({"resolved": 40, "failed": 10, "pending": 5}, t0)
    await store_jobs(backend, jobs_file, jobs)
    client = await start_service(HELD)
    live = await open_events(client)
    resolved = [job for job in jobs if job.status == "resolved"]
    old = {job.id for job in resolved[:15]}  # finished before the 16th resolved one
    cutoff = jobservice.iso(resolved[15].resolved_at)

    answer = await bulk(client, "/jobs/delete", {"status": "resolved", "finishedBefore": cutoff})
    assert answer["taken"] == 15
    gone = await collect(live, "ON_DELETED_JOB", old)
    assert {info["reason"] for info in gone.values()} == {"deleted"}
    assert (await stats(client))["resolved"] == 25
    # Epoch milliseconds work as well; a filter by error text matches none of these.
    assert (await bulk(client, "/jobs/delete", {"finishedAfter": t0 * 1000}))["taken"] == 0
    assert (await bulk(client, "/jobs/delete", {"error": "HTTP 418"}))["taken"] == 0

    finished = {job.id for job in jobs if job.status != "pending"} - old
    answer = await bulk(client, "/jobs/delete", {})
    assert answer["taken"] == 35
    await collect(live, "ON_DELETED_JOB", finished)
    after = await stats(client)
    assert (after["total"], after["pending"], after["resolved"], after["failed"]) == (5, 5, 0, 0)
    events = await replayed(open_events, client, answer["seq"])
    assert sorted(info["id"] for _, info in events) == sorted(finished)
    assert {name for name, _ in events} == {"ON_DELETED_JOB"}
    at_rest, deleted = await stored(backend, jobs_file)
    assert set(at_rest) == {job.id for job in jobs if job.status == "pending"}
    assert deleted >= finished | old
    for job_id in list(finished)[:3]:
        assert (await client.get(f"/jobs/{job_id}")).status == 404


async def test_a_retry_filter_picks_by_error_and_time(start_service, open_events, jobs_file,
                                                     backend):
    jobs = make_jobs({"failed": 6})
    jobs[0].error = "gave up after 10 attempts: Unsplash answered HTTP 500"
    jobs[1].error = jobs[0].error
    await store_jobs(backend, jobs_file, jobs)
    client = await start_service(HELD)
    live = await open_events(client)
    ids = [job.id for job in jobs]
    assert (await bulk(client, "/jobs/retry", {"error": "http 500"}))["taken"] == 2
    await collect(live, "ON_CREATED_JOB", set(ids[:2]))
    later = jobservice.iso(jobs[4].resolved_at)
    assert (await bulk(client, "/jobs/retry", {"finishedAfter": later}))["taken"] == 2
    await collect(live, "ON_CREATED_JOB", set(ids[4:]))
    assert (await bulk(client, "/jobs/retry", {"status": "failed"}))["taken"] == 2
    await collect(live, "ON_CREATED_JOB", set(ids[2:4]))
    assert (await stats(client))["pending"] == 6


@pytest.mark.file_only  # the body is read before the store is touched, in both modes
@pytest.mark.parametrize("path,body", [
    ("/jobs/retry", {"status": "resolved"}), ("/jobs/retry", {"status": "pending"}),
    ("/jobs/delete", {"status": "pending"}), ("/jobs/delete", {"finishedBefore": "soon"}),
    ("/jobs/delete", {"finishedBefore": True}), ("/jobs/delete", {"finishedAfter": [1]}),
    ("/jobs/retry", {"error": ""}), ("/jobs/retry", {"error": "x" * 201}),
    ("/jobs/retry", {"error": 5}), ("/jobs/delete", {"olderThan": "7d"}), ("/jobs/retry", [1]),
], ids=repr)
async def test_a_bad_filter_is_a_400_and_takes_nothing(start_service, jobs_file, path, body):
    await store_jobs({}, jobs_file, make_jobs({"resolved": 2, "failed": 2}))
    client = await start_service(HELD)
    error = await bulk(client, path, body, status=400)
    assert error["error"]["code"] == "invalid_body"
    assert (await stats(client))["total"] == 4 and (await stats(client))["pending"] == 0


async def test_access_rules_hold_for_bulk_changes(start_service, jobs_file, backend):
    await store_jobs(backend, jobs_file, make_jobs({"resolved": 3, "failed": 3}))
    client = await start_service({**HELD, "API_TOKEN": TOKEN})
    for path in ("/jobs/retry", "/jobs/delete", "/jobs/find?id=a"):
        method = client.get if path.startswith("/jobs/find") else client.post
        assert (await method(path)).status == 401
    bearer = {"Authorization": f"Bearer {TOKEN}"}
    foreign = {**bearer, "Origin": "https://evil.example"}
    await bulk(client, "/jobs/retry", status=403, headers=foreign)
    await bulk(client, "/jobs/delete", status=403, headers=foreign)
    # The page's session cookie works only with the page's own Origin (CSRF).
    assert (await client.post("/session", json={"token": TOKEN})).status == 204
    await bulk(client, "/jobs/delete", status=403)  # the cookie, and no Origin
    assert (await stats(client))["total"] == 6
    own = {"Origin": f"http://{client.host}:{client.port}"}
    assert (await bulk(client, "/jobs/retry", headers=own))["taken"] == 3
    assert (await bulk(client, "/jobs/delete", headers=bearer))["taken"] == 3


async def test_rate_limit_and_max_pending_jobs_hold(start_service, open_events, jobs_file,
                                                    backend):
    jobs = make_jobs({"failed": 10, "pending": 2})
    await store_jobs(backend, jobs_file, jobs)
    client = await start_service({**HELD, "MAX_PENDING_JOBS": "7",
                                  "CLIENT_RATE_LIMIT": "2/min"})
    live = await open_events(client)
    response = await client.post("/jobs/retry")
    assert response.status == 202
    assert response.headers["RateLimit-Limit"] == "2"
    assert (await response.json())["taken"] == 5  # the room MAX_PENDING_JOBS leaves
    await collect(live, "ON_CREATED_JOB", {job.id for job in jobs[:5]})  # oldest first
    refused = await bulk(client, "/jobs/retry", status=429)
    assert refused["error"]["code"] == "too_many_pending_jobs"
    assert (await stats(client))["failed"] == 5
    # One request, one token of CLIENT_RATE_LIMIT, as a single retry: the 429 above took
    # none; a deletion takes none either; the next retry is the second token.
    await bulk(client, "/jobs/delete", {"status": "failed"})
    client2 = await start_service({**HELD, "CLIENT_RATE_LIMIT": "1/min"}, path=jobs_file)
    assert (await client2.post("/jobs/retry")).status == 202
    limited = await bulk(client2, "/jobs/retry", status=429)
    assert limited["error"]["code"] == "rate_limited"


@pytest.mark.file_only  # the journal's writes are held back to line up the race
async def test_single_changes_that_race_a_bulk_change_stand(start_service, open_events,
                                                             jobs_file, monkeypatch):
    """While a bulk retry waits for its first step to be stored, the next bulk requests
    wait their turn (and see what it did), one too many gets 409; one job it took is
    deleted and another retried by single requests: the
    bulk change leaves both as those made them (no job comes back, none is retried twice),
    and the POST made meanwhile is stored with the first steps, not after the last."""
    jobs = make_jobs({"failed": 2000})
    await store_jobs({}, jobs_file, jobs)
    client = await start_service(HELD)
    store = client.app[jobservice.STORE]
    live = await open_events(client)
    written, gate = [], asyncio.Event()
    append = store._append

    async def held_append(data: bytes) -> None:
        await gate.wait()
        written.append(data.count(b"\n"))
        await append(data)

    monkeypatch.setattr(store, "_append", held_append)
    assert (await bulk(client, "/jobs/retry"))["taken"] == 2000
    bulk_app = client.app[jobservice.BULK]
    queued = [asyncio.create_task(client.post("/jobs/retry"))
              for _ in range(jobservice.BULK_QUEUE)]
    await eventually("the bulk requests wait",
                     lambda: noted(bulk_app.waiting == jobservice.BULK_QUEUE))
    busy = await client.post("/jobs/delete")
    assert busy.status == 409 and busy.headers["Retry-After"] == "1"
    assert (await busy.json())["error"]["code"] == "bulk_in_progress"
    deleted, retried = jobs[1500].id, jobs[1700].id
    changes = [asyncio.create_task(client.delete(f"/jobs/{deleted}")),
               asyncio.create_task(client.post(f"/jobs/{retried}/retry")),
               asyncio.create_task(client.post("/jobs"))]
    await eventually("the single changes are staged",
                     lambda: noted(len(store.in_flight) == jobservice.BULK_STEP + 3))
    gate.set()
    delete, retry, create = [await change for change in changes]
    assert (delete.status, retry.status, create.status) == (204, 202, 201)
    new_id = (await create.json())["id"]
    others = {job.id for job in jobs} - {deleted, retried}
    await collect(live, "ON_CREATED_JOB", others | {retried, new_id})
    assert not [payload for name, payload in live.seen
                if payload.get("id") == deleted and name != "ON_DELETED_JOB"]
    assert (await client.get(f"/jobs/{deleted}")).status == 404
    assert (await stats(client))["pending"] == 2000  # 1,999 retried, and the new one
    # Their turns came after it: nothing was left failed to take.
    for waited in queued:
        response = await waited
        assert response.status == 202 and (await response.json())["taken"] == 0
    # Stored in steps of at most BULK_STEP (and the three single changes beside them).
    assert max(written) <= jobservice.BULK_STEP + 3, written
    assert sum(written) == 1998 + 3
    journal = [json.loads(line)["id"] for line in jobs_file.with_name(
        jobs_file.name + ".journal").read_text().splitlines()]
    assert journal.index(new_id) < 2 * jobservice.BULK_STEP


async def test_a_node_leaves_a_job_another_node_changed(redis_server, aiohttp_client,
                                                        jobs_file):
    """Redis mode, two nodes: the script refuses a bulk deletion of a job whose seq moved
    on in Redis (another node retried it), even when this node has not heard yet."""
    prefix = f"bulk{time.monotonic_ns()}:"
    env = {**FAST_ENV, **HELD, "REDIS_URL": redis_server.url, "REDIS_PREFIX": prefix}
    settings = jobservice.load_settings(["--data", str(jobs_file)], env)
    jobs = make_jobs({"failed": 2})
    await store_jobs(env, jobs_file, jobs)
    nodes = []
    for _ in range(2):
        client = await aiohttp_client(jobservice.create_app(settings),
                                      server_kwargs=jobservice.SERVER_OPTIONS)
        await client.app[jobservice.STORE].until_ready()
        nodes.append(client)
    first, second = nodes
    store = first.app[jobservice.STORE]
    seen = store.get(jobs[0].id)
    assert (await second.post(f"/jobs/{jobs[0].id}/retry")).status == 202
    with pytest.raises(jobservice.Conflict):  # what the script says, whatever this node knows
        await store._queue(jobservice.Tombstone(seen.id, "deleted", time.time()),
                           "delete-unchanged", str(seen.seq))
    await eventually("this node hears of the retry",
                     lambda: noted(store.get(jobs[0].id).seq != seen.seq))
    with pytest.raises(jobservice.Conflict):  # known here: refused before Redis is asked
        store.commit_unless_changed(jobservice.Tombstone(seen.id, "deleted", time.time()),
                                    seen.seq)
    # The bulk deletion takes the failed job and leaves the retried one pending.
    assert (await bulk(first, "/jobs/delete"))["taken"] == 1
    await eventually("the other node hears of the deletion",
                     lambda: noted(store_of(second).counts["failed"] == 0))
    assert (await (await second.get(f"/jobs/{jobs[0].id}")).json())["status"] == "pending"


async def test_find_a_job_by_its_short_or_whole_id_among_3000(start_service, jobs_file,
                                                               backend):
    jobs = make_jobs({"resolved": 2000, "failed": 500, "pending": 500})
    await store_jobs(backend, jobs_file, jobs)
    client = await start_service(HELD)
    wanted = jobs[1234]

    async def find(query: str, status: int = 200):
        response = await client.get(f"/jobs/find?{query}")
        assert response.status == status, await response.text()
        return await response.json()

    assert [job["id"] for job in await find(f"id={wanted.id[:8]}")] == [wanted.id]
    [job] = await find(f"id={wanted.id}")
    assert job == json.loads(wanted.json) | {"seq": job["seq"]}
    assert await find("id=not-an-id") == []
    # A short prefix matches many: the first `limit`, oldest first.
    many = await find("id=a&limit=5")
    expected = [job.id for job in jobs if job.id.startswith("a")][:5]
    assert [job["id"] for job in many] == expected
    for query in ("", "id=", f"id={'x' * 201}", "id=a&limit=0", "id=a&limit=101",
                  "id=a&status=failed"):
        assert (await find(query, 400))["error"]["code"] == "invalid_parameter"
    # A job made after the start is found too.
    [made] = await create_jobs(client, 1)
    assert [job["id"] for job in await find(f"id={made[:8]}")] == [made]


@pytest.mark.file_only  # the store's walk, as the bulk changes and find use it
async def test_a_walk_meets_every_job_that_lives_throughout(start_service, jobs_file):
    jobs = make_jobs({"resolved": 5000})
    await store_jobs({}, jobs_file, jobs)
    client = await start_service(HELD)
    store = client.app[jobservice.STORE]
    met, cursor = [], None
    doomed = [job.id for job in jobs[:3000]]
    while True:
        found, cursor = store.walk(cursor, 700)
        assert len(found) <= 700
        met += [job.id for job in found]
        if cursor is None:
            break
        if doomed:  # deletions at the front between steps: the order is cut, not the walk
            for job_id in doomed[:1500]:
                await store.commit(jobservice.Tombstone(job_id, "deleted", time.time()))
            doomed = doomed[1500:]
    survivors = [job.id for job in jobs[3000:]]
    assert [job_id for job_id in met if job_id in set(survivors)] == survivors
    assert len(met) == len(set(met))
    # Once the order is rebuilt (most of it dead, behind a live job), an old cursor says so.
    _, cursor = store.walk(None, 10)
    for job_id in survivors[200:]:
        await store.commit(jobservice.Tombstone(job_id, "deleted", time.time()))
    with pytest.raises(KeyError):
        store.walk(cursor, 10)


async def test_jobs_that_gave_up_say_attempt_or_attempts_and_come_back_by_one_retry(
        start_service, open_events, fake_unsplash, unsplash_env):
    fake_unsplash.mode = "500"  # and a job must have a fresh photo, so they fail
    client = await start_service({**unsplash_env, "JOB_MAX_ATTEMPTS": "1",
                                  "PHOTO_REUSE": "never"})
    events = await open_events(client)
    ids = await create_jobs(client, 3)
    failed = await events.resolutions(ids)
    for job in failed.values():
        assert job["status"] == "failed"
        assert job["error"].startswith("gave up after 1 attempt: Unsplash answered HTTP 500")
    fake_unsplash.mode = "ok"
    assert (await bulk(client, "/jobs/retry", {"error": "HTTP 500"}))["taken"] == 3
    resolved = await events.resolutions(ids)
    assert {job["status"] for job in resolved.values()} == {"resolved"}
