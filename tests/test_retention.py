"""Months under sustained load: finished jobs expire after JOB_RETENTION, DELETE cancels or
removes a job, both go out as ON_DELETED_JOB and are replayed exactly within the
EVENTS_REPLAY_WINDOW (RESET beyond it), MAX_PENDING_JOBS refuses new work with 429, and
the newest-first listing with its cursor. Restarts use the same jobs file.
"""

from __future__ import annotations

import asyncio
import json
import time

import aiohttp
import pytest
from conftest import create_jobs, seed, stored

import jobservice

SHORT_RETENTION = {"JOB_RETENTION": "0.3"}
SLOW = {"JOB_DELAY_MIN": "0.4", "JOB_DELAY_MAX": "0.4"}  # pending while the test acts
DELETED = "ON_DELETED_JOB"


@pytest.mark.parametrize("raw,seconds", [("7d", 604800), ("12h", 43200), ("30m", 1800),
                                         ("90", 90), ("90s", 90), ("0", 0), ("0.5", 0.5),
                                         (" 2D ", 172800)])
def test_retention_takes_seconds_or_a_unit(raw, seconds, jobs_file):
    settings = jobservice.load_settings(["--data", str(jobs_file)], {"JOB_RETENTION": raw})
    assert settings.job_retention == seconds


@pytest.mark.parametrize("name", ["JOB_RETENTION", "EVENTS_REPLAY_WINDOW"])
@pytest.mark.parametrize("raw", ["7x", "-1", "d", "1e999", "seven days"])
def test_a_bad_duration_names_the_setting(raw, name, jobs_file):
    with pytest.raises(jobservice.ConfigError, match=name):
        jobservice.load_settings(["--data", str(jobs_file)], {name: raw})


def test_defaults(jobs_file):
    settings = jobservice.load_settings(["--data", str(jobs_file)], {})
    assert (settings.job_retention, settings.events_replay_window,
            settings.max_pending_jobs) == (604800, 86400, 1_000_000)


async def test_the_start_up_log_states_the_retention(service_process):
    service = await service_process()
    assert any("finished jobs are kept 7 days (JOB_RETENTION)" in line
               for line in service.log), service.log
    await service.stop()
    forever = await service_process({"JOB_RETENTION": "0"})
    assert any("finished jobs are kept forever" in line for line in forever.log)


OLD_SERVICE_HISTORY = [  # the NestJS service's jobs.json: a bare array, kept forever
    {"id": "lunch-2024", "status": "completed", "createdAt": "2024-03-01T12:00:00.000Z",
     "result": "https://images.unsplash.com/photo-1512621776951-a57141f2eefd"},
    {"id": 2, "status": "failed", "result": None, "createdAt": 1709294400000},  # epoch ms
    {"id": "waiting-2024", "status": "waiting", "result": None,
     "createdAt": "2024-03-01T12:00:10.000Z"},
]


@pytest.mark.file_only  # the old service's jobs.json; `jobservice import`: test_cluster_cli
async def test_history_carried_over_is_kept_for_the_retention_from_the_carry_over(
        service_process, open_events, jobs_file):
    """Jobs the old service finished in 2024 are listed after the switch, for a whole
    JOB_RETENTION: it counts from the carry-over, and a restart does not start it over."""
    jobs_file.write_text(json.dumps(OLD_SERVICE_HISTORY))
    before = time.time()
    service = await service_process()  # the default JOB_RETENTION, 7 days
    assert any("the 2 finished jobs carried over are kept 7 days from now (JOB_RETENTION)"
               in line for line in service.log), service.log
    events = await open_events(service.url, "?since=0")
    # The waiting one resolves; an expiry due at start would have been written first.
    await events.resolutions(["waiting-2024"])
    assert [name for name, _ in events.seen if name == DELETED] == []
    async with aiohttp.ClientSession() as http:
        async with http.get(f"{service.url}/jobs") as response:
            jobs = {job["id"]: job for job in await response.json()}
    assert [(job_id, job["status"]) for job_id, job in jobs.items()] == [
        ("lunch-2024", "resolved"), ("2", "failed"), ("waiting-2024", "resolved")]
    for job_id, created in [("lunch-2024", "2024-03-01T12:00:00.000Z"),
                            ("2", "2024-03-01T12:00:00.000Z")]:
        assert jobs[job_id]["createdAt"] == created  # the old service's time, as it was
        # ... and resolvedAt the carry-over's, which the old service never recorded.
        assert before <= jobservice.parse_time(jobs[job_id]["resolvedAt"], "") <= time.time()
    assert await service.stop() == 0
    again = await service_process()  # from the snapshot in this service's format now
    assert not any("carried over" in line for line in again.log), again.log
    async with aiohttp.ClientSession() as http:
        async with http.get(f"{again.url}/jobs") as response:
            assert {job["id"]: job for job in await response.json()} == jobs


@pytest.mark.file_only
async def test_carried_over_history_expires_a_retention_after_the_carry_over(
        service_process, open_events, jobs_file):
    jobs_file.write_text(json.dumps(OLD_SERVICE_HISTORY[:2]))
    before = time.time()
    service = await service_process({"JOB_RETENTION": "1"})
    assert any("the 2 finished jobs carried over are kept 1 second from now" in line
               for line in service.log), service.log
    events = await open_events(service.url, "?since=0")
    await events.until(lambda name, _: name == "SYNCED")
    kept = {job["id"]: job["resolvedAt"] for name, job in events.seen if name != "SYNCED"}
    assert set(kept) == {"lunch-2024", "2"}  # not expired at once
    gone = {}
    while len(gone) < 2:
        _, record = await events.until(lambda name, _: name == DELETED)
        gone[record["id"]] = record
    for job_id, record in gone.items():  # a retention after the carry-over, not 2024's
        carried_over = jobservice.parse_time(kept[job_id], "")
        assert record["reason"] == "expired" and carried_over >= before
        assert jobservice.parse_time(record["deletedAt"], "") - carried_over >= 1.0, record


async def test_finished_jobs_expire_with_an_event_and_stay_gone(
        start_service, open_events, jobs_file, backend):
    client = await start_service(SHORT_RETENTION)
    events = await open_events(client)
    ids = await create_jobs(client, 3)
    await events.resolutions(ids)  # pending ones never expire: they resolved first
    gone = {}
    while len(gone) < 3:
        name, payload = await events.next()
        if name == DELETED:
            gone[payload["id"]] = payload
    assert set(gone) == set(ids)
    for job_id, payload in gone.items():
        assert payload["reason"] == "expired" and isinstance(payload["seq"], int)
        assert (await client.get(f"/jobs/{job_id}")).status == 404
    assert await (await client.get("/jobs")).json() == []
    await client.close()

    jobs, deleted = await stored(backend, jobs_file)
    assert jobs == {} and deleted == set(ids)
    again = await start_service(SHORT_RETENTION)
    for job_id in ids:
        assert (await again.get(f"/jobs/{job_id}")).status == 404
    assert (await (await again.get("/jobs/stats")).json())["total"] == 0


async def test_retention_zero_keeps_jobs(start_service, open_events):
    client = await start_service({"JOB_RETENTION": "0"})
    events = await open_events(client)
    [job_id] = await create_jobs(client, 1)
    await events.resolutions([job_id])
    [marker] = await create_jobs(client, 1)  # a later change: nothing expired before it
    await events.resolutions([marker])
    assert DELETED not in [name for name, _ in events.seen]
    assert (await client.get(f"/jobs/{job_id}")).status == 200


def write_snapshot(path, jobs: list[jobservice.Job]) -> None:
    for seq, job in enumerate(jobs, start=1):
        job.seq = seq
    path.write_text(json.dumps({"version": 1, "seq": len(jobs),
                                "jobs": [job.to_dict() for job in jobs]}))


async def test_what_fell_due_while_down_expires_at_start(
        start_service, open_events, jobs_file, backend):
    now = time.time()
    old = [jobservice.Job(f"old-{n}", "resolved", "https://images.unsplash.com/x", now - 9e5,
                          now - 9e5, now - 8e5, 1) for n in range(3)]
    recent = jobservice.Job("recent", "failed", None, now - 100, now - 90, now - 80, 1, "no")
    pending = jobservice.Job("waiting", "pending", None, now - 9e5, now + 3600)
    write_snapshot(jobs_file, [*old, recent, pending])
    await seed(backend, jobs_file)

    client = await start_service({"JOB_RETENTION": "7d"})
    events = await open_events(client, "?since=0")
    expired = set()
    while len(expired) < 3:
        name, payload = await events.next()
        if name == DELETED:
            assert payload["reason"] == "expired"
            expired.add(payload["id"])
    assert expired == {job.id for job in old}
    stats = await (await client.get("/jobs/stats")).json()
    assert (stats["total"], stats["pending"], stats["failed"]) == (2, 1, 1)
    await client.close()
    again = await start_service({"JOB_RETENTION": "7d"})
    assert [job["id"] for job in await (await again.get("/jobs")).json()] == [
        "recent", "waiting"]


async def test_deleting_a_pending_job_cancels_it_even_across_a_restart(
        start_service, open_events, fake_unsplash, unsplash_env):
    env = {**unsplash_env, **SLOW, "JOB_RETENTION": "0"}
    client = await start_service(env)
    events = await open_events(client)
    [doomed] = await create_jobs(client, 1)
    response = await client.delete(f"/jobs/{doomed}")
    assert response.status == 204 and await response.read() == b""
    _, payload = await events.until(lambda name, payload: name == DELETED)
    assert payload["id"] == doomed and payload["reason"] == "deleted"
    assert (await client.get(f"/jobs/{doomed}")).status == 404
    assert (await client.delete(f"/jobs/{doomed}")).status == 404

    [later] = await create_jobs(client, 1)  # due after the cancelled one would have been
    await events.resolutions([later])
    assert fake_unsplash.photos_served == 30 and fake_unsplash.calls == 1
    assert [p["id"] for n, p in events.seen if n == "ON_RESOLVED_JOB"] == [later]
    await client.close()

    again = await start_service(env)
    events = await open_events(again, "?since=0")
    assert (await again.get(f"/jobs/{doomed}")).status == 404
    [marker] = await create_jobs(again, 1)
    await events.resolutions([marker])
    assert doomed not in [p["id"] for n, p in events.seen if n == "ON_RESOLVED_JOB"]


async def test_deleting_a_finished_job(start_service, open_events):
    client = await start_service({"JOB_RETENTION": "0"})
    events = await open_events(client)
    [job_id] = await create_jobs(client, 1)
    await events.resolutions([job_id])
    assert (await client.delete(f"/jobs/{job_id}")).status == 204
    _, payload = await events.until(lambda name, payload: name == DELETED)
    assert (payload["id"], payload["reason"]) == (job_id, "deleted")
    assert (await client.get(f"/jobs/{job_id}")).status == 404
    stats = await (await client.get("/jobs/stats")).json()
    assert stats == {"total": 0, "pending": 0, "resolved": 0, "failed": 0,
                     "seq": payload["seq"]}


@pytest.mark.parametrize("job_id", ["6f1c1c5e-0000-4000-8000-000000000000", "nope", "%00"])
async def test_deleting_an_unknown_or_malformed_id_is_404(start_service, job_id):
    client = await start_service()
    response = await client.delete(f"/jobs/{job_id}")
    assert response.status == 404
    assert (await response.json())["error"]["code"] == "not_found"


async def test_replay_across_deletions_then_reset_beyond_the_window(
        start_service, open_events):
    window = 0.3
    env = {**SLOW, "JOB_RETENTION": "0", "EVENTS_REPLAY_WINDOW": str(window)}
    client = await start_service(env)
    kept, gone, also_gone = await create_jobs(client, 3)
    since = client.server.app[jobservice.STORE].seq
    for job_id in (gone, also_gone):
        assert (await client.delete(f"/jobs/{job_id}")).status == 204

    events = await open_events(client, f"?since={since}")
    replay = [await events.next() for _ in range(3)]
    seq = client.server.app[jobservice.STORE].seq
    assert replay == [
        (DELETED, {"id": gone, "seq": since + 1, "reason": "deleted",
                   "deletedAt": replay[0][1]["deletedAt"]}),
        (DELETED, {"id": also_gone, "seq": since + 2, "reason": "deleted",
                   "deletedAt": replay[1][1]["deletedAt"]}),
        ("SYNCED", {"seq": seq})]
    await events.resolutions([kept])  # live after SYNCED, once

    await asyncio.sleep(window * 1.5)  # the passage of time is what is under test
    late = await open_events(client, f"?since={since}")
    assert await late.next() == ("RESET", {"seq": client.server.app[jobservice.STORE].seq})
    current = await open_events(client, f"?since={client.server.app[jobservice.STORE].seq}")
    assert (await current.next())[0] == "SYNCED"  # a since inside the window is still fine
    await client.close()

    again = await start_service(env)  # what was let go stays let go
    late = await open_events(again, f"?since={since}")
    assert (await late.next())[0] == "RESET"


async def test_socketio_recovery_beyond_the_window_is_a_reset(start_service):
    window = 0.2
    client = await start_service({**SLOW, "EVENTS_REPLAY_WINDOW": str(window)})
    store = client.server.app[jobservice.STORE]
    [job_id] = await create_jobs(client, 1)
    offset = str(store.seq)
    assert (await client.delete(f"/jobs/{job_id}")).status == 204
    await asyncio.sleep(window * 1.5)  # the window passes
    ws = await client.ws_connect("/socket.io/?EIO=4&transport=websocket")
    await ws.receive(timeout=5)  # the open packet
    await ws.send_str("40" + json.dumps({"pid": "abcdefghijklmnopqrstu", "offset": offset}))
    frames = [(await ws.receive(timeout=5)).data for _ in range(2)]
    assert json.loads(frames[0][2:])["pid"] != "abcdefghijklmnopqrstu"  # not recovered
    assert frames[1] == f'42["RESET",{{"seq":{store.seq}}},"{store.seq}"]'
    await ws.close()


async def test_max_pending_jobs_refuses_with_429_and_stores_nothing(start_service):
    client = await start_service({"MAX_PENDING_JOBS": "2", "JOB_DELAY_MIN": "60",
                                  "JOB_DELAY_MAX": "60"})
    await create_jobs(client, 2)
    response = await client.post("/jobs")
    assert response.status == 429
    body = await response.json()
    assert body["error"]["code"] == "too_many_pending_jobs"
    assert "MAX_PENDING_JOBS" in body["error"]["message"]
    assert 1 <= int(response.headers["Retry-After"]) <= 60
    assert len(await (await client.get("/jobs")).json()) == 2
    health = await (await client.get("/healthz")).json()
    assert (health["maxPendingJobs"], health["pendingFill"], health["pending"]) == (2, 1.0, 2)


async def test_a_retry_obeys_the_cap(start_service, fake_unsplash, unsplash_env, open_events):
    fake_unsplash.mode = "401"  # jobs that must have a fresh photo fail at once
    client = await start_service({**unsplash_env, "MAX_PENDING_JOBS": "1",
                                  "PHOTO_REUSE": "never"})
    events = await open_events(client)
    [failed] = await create_jobs(client, 1)
    assert (await events.resolutions([failed]))[failed]["status"] == "failed"
    fake_unsplash.mode = "stall"
    [_] = await create_jobs(client, 1)  # pending, and the cap is reached
    response = await client.post(f"/jobs/{failed}/retry")
    assert response.status == 429 and response.headers["Retry-After"]
    assert (await (await client.get(f"/jobs/{failed}")).json())["status"] == "failed"


async def test_newest_first_pages_with_a_cursor(start_service):
    client = await start_service({**SLOW, "JOB_RETENTION": "0"})
    ids = await create_jobs(client, 5)
    response = await client.get("/jobs?order=desc&limit=2")
    assert [job["id"] for job in await response.json()] == ids[:2:-1][:2]
    assert response.headers["Link"] == (
        f'</jobs?limit=2&before={ids[3]}&order=desc>; rel="next"')
    # A cursor whose job was deleted in the meantime still works.
    assert (await client.delete(f"/jobs/{ids[3]}")).status == 204
    response = await client.get(f"/jobs?order=desc&limit=2&before={ids[3]}")
    assert [job["id"] for job in await response.json()] == [ids[2], ids[1]]
    response = await client.get(f"/jobs?order=desc&limit=2&before={ids[1]}")
    assert [job["id"] for job in await response.json()] == [ids[0]]
    assert "Link" not in response.headers
    response = await client.get("/jobs?order=desc&status=pending&limit=1")
    assert response.headers["Link"].startswith("</jobs?limit=1&before=")
    assert "status=pending" in response.headers["Link"]
    for bad in ("order=up", "order=desc&after=x", "before=x", "order=desc&before=nope"):
        response = await client.get(f"/jobs?{bad}")
        assert response.status == 400, bad
        assert (await response.json())["error"]["code"] == "invalid_parameter"


async def test_expiring_many_jobs_keeps_paging_right(start_service, open_events):
    """The ids of expired jobs are cut from the front of the order; the pages stay right."""
    client = await start_service({"JOB_RETENTION": "0.2"})
    store = client.server.app[jobservice.STORE]
    events = await open_events(client)
    ids = await create_jobs(client, 40)
    expired = set()
    while len(expired) < 40:
        name, payload = await events.next()
        if name == DELETED:
            expired.add(payload["id"])
    assert not store.dead and not store.order  # nothing held for them
    fresh = await create_jobs(client, 3)
    response = await client.get("/jobs?order=desc&limit=2")
    assert [job["id"] for job in await response.json()] == fresh[:0:-1]
    assert set(ids).isdisjoint(store.dead)
