"""Persistence: what is acknowledged is on disk, restarts resume, files load or refuse."""

from __future__ import annotations

import asyncio
import errno
import json
import os
import sys
import time
from datetime import datetime

import pytest
from conftest import FAST_ENV, ROOT, create_jobs

import jobservice

# The files behind the embedded mode: how they are written, torn and recovered.
pytestmark = pytest.mark.file_only

SLOW = {"JOB_DELAY_MIN": "30", "JOB_DELAY_MAX": "30"}


def read_state(jobs_file) -> dict[str, dict]:
    """Every job as the files hold it: snapshot, then journals, newest seq wins."""
    jobs = {}
    if jobs_file.exists():
        for job in json.loads(jobs_file.read_text())["jobs"]:
            jobs[job["id"]] = job
    for suffix in (".journal.old", ".journal"):
        path = jobs_file.with_name(jobs_file.name + suffix)
        if path.exists():
            for line in path.read_text().splitlines():
                if line.strip():
                    job = json.loads(line)
                    if job["id"] not in jobs or jobs[job["id"]]["seq"] < job["seq"]:
                        jobs[job["id"]] = job
    return jobs


async def test_restart_keeps_resolved_jobs_and_resumes_pending_at_their_due_time(
        start_service, open_events, jobs_file):
    client = await start_service()
    events = await open_events(client)
    done = await create_jobs(client, 3)
    resolved = await events.resolutions(done)
    await client.close()

    client = await start_service(SLOW)
    events = await open_events(client)
    waiting = await create_jobs(client, 2)
    before = {job["id"]: job for job in await (await client.get("/jobs")).json()}
    await client.close()

    client = await start_service()
    after = {job["id"]: job for job in await (await client.get("/jobs")).json()}
    assert list(after) == done + waiting
    for job_id in done:
        assert after[job_id] == resolved[job_id]
    for job_id in waiting:
        assert after[job_id]["status"] == "pending"
        assert after[job_id]["dueAt"] == before[job_id]["dueAt"]


async def test_overdue_jobs_resolve_promptly_after_a_restart(start_service, open_events,
                                                             jobs_file):
    now = time.time()
    overdue = [jobservice.Job(f"overdue-{n}", "pending", None, now - 120, now - 60, seq=n)
               for n in range(1, 5)]
    jobs_file.write_text(json.dumps(
        {"version": 1, "seq": 4, "jobs": [job.to_dict() for job in overdue]}))
    client = await start_service(SLOW)
    events = await open_events(client, "?since=0")
    started = time.monotonic()
    final = await events.resolutions([job.id for job in overdue])
    assert time.monotonic() - started < 2
    assert all(job["status"] == "resolved" for job in final.values())


async def test_sequence_numbers_continue_above_everything_handed_out(start_service):
    client = await start_service(SLOW)
    await create_jobs(client, 3)
    seq = int((await client.get("/jobs")).headers["X-Jobs-Seq"])
    await client.close()
    client = await start_service(SLOW)
    assert int((await client.get("/jobs")).headers["X-Jobs-Seq"]) == seq
    [job_id] = await create_jobs(client, 1)
    assert (await (await client.get(f"/jobs/{job_id}")).json())["seq"] == seq + 1


async def test_shutdown_folds_the_journal_into_the_snapshot(start_service, jobs_file):
    client = await start_service(SLOW)
    ids = await create_jobs(client, 3)
    await client.close()
    snapshot = json.loads(jobs_file.read_text())
    assert snapshot["version"] == 1
    assert [job["id"] for job in snapshot["jobs"]] == ids
    assert not jobs_file.with_name("jobs.json.journal").exists()


async def test_a_torn_last_journal_line_is_ignored(start_service, jobs_file):
    client = await start_service(SLOW)
    ids = await create_jobs(client, 2)
    journal = jobs_file.with_name("jobs.json.journal")
    kept = journal.read_bytes()
    await client.close()
    # As if the process died while appending a third record that was never acknowledged.
    jobs_file.unlink()
    journal.write_bytes(kept + b'{"id":"torn","status":"pen')
    client = await start_service(SLOW)
    assert [job["id"] for job in await (await client.get("/jobs")).json()] == ids


async def test_compaction_under_load_keeps_every_job(start_service, jobs_file, monkeypatch):
    monkeypatch.setattr(jobservice, "COMPACT_MIN_RECORDS", 20)
    client = await start_service(SLOW)
    ids = await create_jobs(client, 75)
    assert jobs_file.exists(), "the journal was never folded into a snapshot"
    on_disk = read_state(jobs_file)
    assert set(on_disk) == set(ids)
    await client.close()
    client = await start_service(SLOW)
    assert [job["id"] for job in await (await client.get("/jobs")).json()] == ids


async def test_old_service_file_is_carried_over(start_service, open_events, jobs_file):
    old = [
        {"id": "b0f7c2a4-4a51-4f0b-9d2f-7f4f2a0d1e01", "status": "resolved",
         "result": "https://images.unsplash.com/photo-1512621776951-a57141f2eefd",
         "createdAt": "2024-05-01T10:00:00.000Z"},
        {"id": "b0f7c2a4-4a51-4f0b-9d2f-7f4f2a0d1e02", "status": "pending", "result": None,
         "createdAt": "2024-05-01T10:00:05.000Z"},
    ]
    raw = json.dumps(old).encode()
    jobs_file.write_bytes(raw)
    client = await start_service()
    events = await open_events(client, "?since=0")
    listing = await (await client.get("/jobs")).json()
    assert [job["id"] for job in listing] == [job["id"] for job in old]
    assert listing[0]["status"] == "resolved" and listing[0]["result"] == old[0]["result"]
    assert listing[0]["createdAt"] == old[0]["createdAt"]
    final = await events.resolutions([old[1]["id"]])
    assert final[old[1]["id"]]["status"] == "resolved"
    assert jobs_file.with_name("jobs.json.old-service").read_bytes() == raw
    await client.close()  # the snapshot in our format is written in the background
    assert json.loads(jobs_file.read_text())["version"] == 1


async def run_service(jobs_file, *args, env=None):
    process = await asyncio.create_subprocess_exec(
        sys.executable, str(ROOT / "jobservice.py"), "--port", "0", "--data", str(jobs_file),
        *args, env={**os.environ, **FAST_ENV, **(env or {})},
        stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE)
    _, err = await asyncio.wait_for(process.communicate(), 20)
    return process.returncode, err.decode()


async def test_a_file_that_does_not_parse_stops_start_up_and_is_left_untouched(jobs_file):
    for content in [b'{"version":1,"seq":3,"jobs":[{"id":"x","stat', b"",
                    b'{"version":1,"jobs":[{"id":"x","status":"sleeping"}]}',
                    b'{"something": "else"}']:
        jobs_file.write_bytes(content)
        code, err = await run_service(jobs_file)
        assert code == 2, err
        assert str(jobs_file) in err
        assert len(err.strip().splitlines()) == 1, err
        assert jobs_file.read_bytes() == content
        assert not jobs_file.with_name("jobs.json.journal").exists()


async def open_store(jobs_file):
    """A store on jobs_file, loaded and writing, and the settings to make jobs with."""
    settings = jobservice.load_settings(["--data", str(jobs_file)], FAST_ENV)
    store = jobservice.JobStore(jobs_file)
    await store.load()
    await store.open(0)
    return settings, store


async def stored_ids(jobs_file) -> list[str]:
    """The ids a fresh store reads back from the files, in order."""
    reopened = jobservice.JobStore(jobs_file)
    await reopened.load()
    return list(reopened.jobs)


async def test_closing_with_changes_staged_writes_them_and_returns(jobs_file):
    settings, store = await open_store(jobs_file)
    staged = [jobservice.Job.new(settings, time.time()) for _ in range(10)]
    batches = {store.commit(job) for job in staged}
    await asyncio.wait_for(store.close(), 5)
    assert all(batch.done() and batch.exception() is None for batch in batches)

    assert await stored_ids(jobs_file) == [job.id for job in staged]


async def test_a_caller_that_gives_up_on_its_change_takes_nothing_from_its_batch(jobs_file):
    settings, store = await open_store(jobs_file)
    jobs = [jobservice.Job.new(settings, time.time()) for _ in range(3)]
    promises = [store.commit(job) for job in jobs]
    promises[0].cancel()  # as when a request handler is cancelled while it waits
    await asyncio.wait_for(asyncio.gather(*promises[1:]), 5)
    # The cancelled caller only stopped listening: its change is as stored as the others.
    assert [store.get(job.id) for job in jobs] == jobs
    await store.close()
    assert await stored_ids(jobs_file) == [job.id for job in jobs]


async def test_a_failed_batch_refuses_every_caller_still_listening(jobs_file, monkeypatch):
    settings, store = await open_store(jobs_file)
    await store.commit(jobservice.Job.new(settings, time.time()))  # the journal is open

    def refuse(fd):
        raise OSError(errno.EIO, "injected")

    monkeypatch.setattr(os, "fsync", refuse)
    jobs = [jobservice.Job.new(settings, time.time()) for _ in range(3)]
    promises = [store.commit(job) for job in jobs]
    promises[0].cancel()
    outcomes = await asyncio.wait_for(asyncio.gather(*promises[1:], return_exceptions=True), 5)
    assert all(isinstance(outcome, jobservice.StorageError) for outcome in outcomes)
    assert all(store.get(job.id) is None for job in jobs) and not store.in_flight
    monkeypatch.undo()
    await store.close()
    assert len(await stored_ids(jobs_file)) == 1, "a refused change came back from the journal"


@pytest.mark.parametrize("job", [
    jobservice.Job("0b7f5a36-1d39-4f3e-9c1e-2f8d1c6a7b21", "pending", None, 1764633600.0005,
                   1764633899.9999995),
    jobservice.Job('old "id" \\ é\u2028\x01', "resolved", "https://images.unsplash.com/p?a=\"é\"",
                   0.0, 5.25, 7.1234565, 3, None,
                   {"id": "x", "alt": "Café\n", "color": None, "size": [1, 2.5], "ok": True}, 42),
    jobservice.Job("j", "failed", None, 1e9, 1e9 + 5, 1e9 + 5.9995, 2, "gave up: \"429\"\t",
                   None, 7),
], ids=["pending", "resolved, odd text", "failed"])
def test_a_jobs_json_is_exactly_what_json_dumps_writes(job):
    # Written by hand for speed; the journal, the API and events all carry this text.
    assert job.json == json.dumps(job.to_dict(), ensure_ascii=False, separators=(",", ":"))
    assert jobservice.Job.from_dict(json.loads(job.json)).json == job.json


@pytest.mark.parametrize("field", ["attempts", "seq"])
def test_a_stored_job_with_a_boolean_count_is_refused(field):
    entry = json.loads(jobservice.Job("j", "pending", None, 0.0, 5.0).json)
    entry[field] = True
    with pytest.raises(ValueError, match="whole numbers"):
        jobservice.Job.from_dict(entry)


def test_stored_times_read_back_exactly_and_odd_ones_are_refused():
    # Our own format takes a fast path; it must agree with datetime to the last bit.
    for n in range(20_000):
        text = jobservice.iso(1764633600 + n * 0.0371)
        assert jobservice.parse_time(text, "t") == datetime.fromisoformat(text).timestamp()
    assert jobservice.parse_time("2026-11-28T23:17:42+00:00", "t") == 1795907862.0
    assert jobservice.parse_time(1795907862624, "t") == 1795907862.624  # epoch ms, old clients
    assert jobservice.parse_time(None, "t") is None
    for odd in ("2026-11-28T23:17:42.\uff16\uff12\uff14Z",  # fullwidth digits
                "2026-11-28T23:17:42.62xZ",
                "2026-13-28T23:17:42.624Z", True, [], ""):
        with pytest.raises(ValueError, match="is not a time"):
            jobservice.parse_time(odd, "t")
