"""The compact form of a stored job: what a job keeps of itself, shared images, the
stream reader, and that nothing an API field says is lost however a job was stored."""

from __future__ import annotations

import json
import time

import pytest

import jobservice
import jobservice_redis

pytestmark = pytest.mark.file_only

T0 = 1764633600.125  # 2025-12-02T00:00:00.125Z

CATALOG = jobservice.CatalogImages()


def unsplash_image(photo: str, reused: bool) -> dict:
    return {"id": photo, "thumb": f"https://images.unsplash.com/{photo}?w=200",
            "small": f"https://images.unsplash.com/{photo}?w=400", "alt": "a bowl of salad",
            "author": "Anna Pelzer", "authorUrl": "https://unsplash.com/@anna",
            "pageUrl": f"https://unsplash.com/photos/{photo}", "color": "#d9c0a6",
            "source": "unsplash", "reused": reused}


def every_kind() -> list[jobservice.Job]:
    """A job of each status and shape: catalog, fresh and reused photos, failed, odd text."""
    def pending_job(n: int) -> jobservice.Job:
        return jobservice.Job(f"0b7f5a36-1d39-4f3e-9c1e-2f8d1c6a7b2{n}", "pending", None,
                              T0, T0 + 45.5, seq=3)

    pending = pending_job(1)
    photo = CATALOG.photos[0]
    fresh_url = "https://images.unsplash.com/photo-kcA?ixid=M3w&w=1080"
    jobs = [
        pending,
        pending_job(2).resolved(photo.result, photo.image, T0 + 46.001),
        jobservice.Job("a1", "resolved", fresh_url, T0, T0 + 5, T0 + 5.25, 2, None,
                       unsplash_image("kcA", False), 17),
        jobservice.Job("a2", "resolved", fresh_url, T0, T0 + 5, T0 + 6.5, 1, None,
                       unsplash_image("kcA", True), 18),
        pending_job(3).failed("gave up after 5 attempts: Unsplash answered 500", T0 + 99.999),
        jobservice.Job("a3", "pending", None, T0, T0 + 5, None, 4, None, None, 19),
        # Text JSON must escape, an id with quotes, an image with nested values and
        # numbers: kept whole, read by json, and still exact.
        jobservice.Job('old "id" \\ é\u2028\x01', "resolved", 'https://x/p?a="é"', 0.0, 5.25,
                       7.1234565, 3, None, {"id": "x", "alt": "Café\n", "size": [1, 2.5],
                                            "ok": True, "seq": {"n": 1}}, 42),
        jobservice.Job("a4", "failed", None, 1e9, 1e9 + 5, 1e9 + 5.9995, 2,
                       'gave up: "429"\t', None, 7),
        # The last day of February, and a 31st: dates the reader checks.
        jobservice.Job("a5", "resolved", fresh_url, 1772236800.0, 1772236800.5,
                       1772236801.0, 1, None, unsplash_image("feb", False), 20),
        jobservice.Job("a6", "pending", None, 1767139200.0, 1767225599.999, seq=21),
    ]
    for seq, job in enumerate(jobs[1:5], start=8):
        if not job.seq:
            job.seq = seq
    return jobs


def fields(job: jobservice.Job) -> dict:
    """Every attribute a job has, as the API and the scheduler see it."""
    return {**json.loads(job.json), "created_at": job.created_at, "due_at": job.due_at,
            "resolved_at": job.resolved_at, "result": job.result, "error": job.error,
            "image": job.image, "attempts": job.attempts}


@pytest.mark.parametrize("job", every_kind(), ids=lambda job: f"{job.id[:8]}-{job.status}")
def test_every_field_reads_back_the_same_however_it_is_read(job):
    text = job.json
    assert text == json.dumps(job.to_dict(), ensure_ascii=False, separators=(",", ":"))
    expected = fields(jobservice.Job.from_dict(json.loads(text)))
    fast = jobservice.job_from_text(text, 0, {})
    readers = {"from_dict": jobservice.Job.from_dict(json.loads(text)),
               "redis": jobservice_redis.parse_record(text),
               "redis, loading": jobservice_redis.parse_record(text, {})}
    if fast is not None:
        assert fast[1] == len(text)
        readers["from text"] = fast[0]
    for how, read in readers.items():
        assert read.json == text, how
        assert fields(read) == expected, how
    if "\\" not in text and "seq" not in str(job.image):
        assert fast is not None, "a job as the service writes it takes the fast path"


def test_a_job_read_from_its_text_keeps_its_times_when_it_changes():
    for job in every_kind()[:6]:
        read, _ = jobservice.job_from_text(job.json, 0, {})
        read.count_attempt()  # forgets the kept text; the times it held must stay
        assert read.attempts == job.attempts + 1
        assert (read.created_at, read.due_at, read.resolved_at) == \
            (round(job.created_at, 3), round(job.due_at, 3),
             None if job.resolved_at is None else round(job.resolved_at, 3))
        resolved = read.resolved("https://x/y", {"id": "y"}, T0)
        assert resolved.created_at == round(job.created_at, 3)


@pytest.mark.parametrize("text", [
    '{"id":"j","status":"pending","result":null,"createdAt":"2026-02-30T00:00:00.000Z",'
    '"dueAt":"2026-03-01T00:00:00.000Z","resolvedAt":null,"attempts":0,"error":null,'
    '"image":null,"seq":1}',
    '{"id":"j","status":"pending","result":null,"createdAt":"2026-02-28 00:00:00.000Z",'
    '"dueAt":"2026-03-01T00:00:00.000Z","resolvedAt":null,"attempts":0,"error":null,'
    '"image":null,"seq":1}',
    '{"id":"j\x01","status":"pending","result":null,"createdAt":"2026-02-28T00:00:00.000Z",'
    '"dueAt":"2026-03-01T00:00:00.000Z","resolvedAt":null,"attempts":0,"error":null,'
    '"image":null,"seq":1}',
    '{"id":"j","status":"resolved","result":"u","createdAt":"2026-02-28T00:00:00.000Z",'
    '"dueAt":"2026-03-01T00:00:00.000Z","resolvedAt":null,"attempts":0,"error":null,'
    '"image":{"alt":"},\\"seq\\":3}","seq":1}',
], ids=["no such day", "not our time", "a control character", "a brace in the image"])
def test_what_the_fast_reader_cannot_vouch_for_is_left_to_json(text):
    assert jobservice.job_from_text(text, 0, {}) is None


def test_jobs_sharing_a_photo_share_one_image_and_keep_their_own_flags():
    fresh_url = "https://images.unsplash.com/photo-kcA?w=1080"
    jobs = [jobservice.Job(f"j{n}", "resolved", fresh_url, T0, T0, T0, 1, None,
                           unsplash_image("kcA", n % 2 == 1), n) for n in range(6)]
    assert len({id(job.image) for job in jobs}) == 2
    assert [job.image["reused"] for job in jobs] == [False, True] * 3
    assert [json.loads(job.json)["image"]["reused"] for job in jobs] == [False, True] * 3
    assert jobs[0].result is jobs[1].result  # the URL is shared too
    # Equal values of other types are other images: 1 is not true, nor 1.0 1.
    odd = [jobservice.Job(f"k{n}", "resolved", "u", T0, T0, T0, 1, None, {"reused": value}, 1)
           for n, value in enumerate((True, 1, 1.0, True))]
    assert [json.loads(job.json)["image"]["reused"] for job in odd] == [True, 1, 1.0, True]
    assert odd[0].image is odd[3].image and len({id(job.image) for job in odd}) == 3
    # The same image with another URL is another image.
    other = jobservice.Job("o", "resolved", "https://other", T0, T0, T0, 1, None,
                           unsplash_image("kcA", False), 1)
    assert other.image is not jobs[0].image and json.loads(other.json)["result"] == \
        "https://other"


def test_a_shared_image_cannot_be_changed_in_place():
    job = jobservice.Job("j", "resolved", "u", T0, T0, T0, 1, None, {"id": "x"}, 1)
    for change in (lambda image: image.update(id="y"), lambda image: image.pop("id"),
                   lambda image: image.__setitem__("id", "y"), lambda image: image.clear()):
        with pytest.raises(TypeError):
            change(job.image)
    assert json.loads(job.json)["image"] == {"id": "x"}
    reused = {**job.image, "reused": True}  # a copy is a plain dict, free to change
    assert jobservice.Job("k", "resolved", "u", T0, T0, T0, 1, None, reused, 2).image == \
        {"id": "x", "reused": True}


def test_an_image_no_job_holds_is_let_go():
    image = jobservice.Job("j", "resolved", "u-gone", T0, T0, T0, 1, None, {"id": "gone"}, 1) \
        .image
    key_count = len(jobservice._images)
    del image
    assert len(jobservice._images) == key_count - 1


def snapshot_text(jobs, separator: str = ",\n") -> str:
    return ('{"version":1,"seq":99,"forgotten":0,"deleted":[],"jobs":[\n'
            + separator.join(job.json for job in jobs) + "\n]}\n")


@pytest.mark.parametrize("chunk", [7, 64, 1 << 20])
@pytest.mark.parametrize("layout", ["ours", "spaced", "keys reordered"])
def test_a_snapshot_loads_exactly_whatever_its_layout_and_chunks(tmp_path, monkeypatch,
                                                                 chunk, layout):
    """Read a few bytes at a time (every item, separator and number is cut somewhere),
    laid out as written here, by another JSON writer, or with the members reordered."""
    monkeypatch.setattr(jobservice, "READ_CHUNK", chunk)
    monkeypatch.setattr(jobservice, "READ_AHEAD", min(chunk, 1 << 16))
    jobs = every_kind()
    if layout == "ours":
        text = snapshot_text(jobs)
    elif layout == "spaced":
        text = json.dumps({"version": 1, "seq": 99, "jobs": [job.to_dict() for job in jobs]},
                          indent=2)
    else:
        text = json.dumps({"jobs": [job.to_dict() for job in jobs], "deleted": None,
                           "seq": 99, "version": 1})
    path = tmp_path / "jobs.json"
    path.write_text(text, encoding="utf-8")
    order, deleted, seq, *_ = jobservice.JobStore(path)._read()
    assert seq == 99 and not deleted
    assert [job.json for job in order] == [job.json for job in jobs]
    assert [fields(job) for job in order] == \
        [fields(jobservice.Job.from_dict(json.loads(job.json))) for job in jobs]


async def test_a_loaded_registry_serves_every_field_and_pages_as_written(tmp_path):
    jobs = every_kind()
    path = tmp_path / "jobs.json"
    path.write_text(snapshot_text(jobs), encoding="utf-8")
    store = jobservice.JobStore(path)
    await store.load()
    page, _ = store.listing()
    assert [job.json for job in page] == [job.json for job in jobs]
    assert list(store.jobs) == [job.id for job in sorted(jobs, key=lambda job: job.seq)]
    second, last = store.listing(limit=2, cursor=jobs[0].id)
    assert [job.id for job in second] == [jobs[1].id, jobs[2].id] and last == jobs[2].id
    assert store.get(jobs[3].id).json == jobs[3].json


async def test_jobs_carried_over_from_the_old_service_keep_what_it_said(tmp_path):
    url = "https://images.unsplash.com/photo-1512621776951-a57141f2eefd"
    old = [{"id": f"old-{n}", "status": status, "result": url if status == "completed" else None,
            "createdAt": "2024-05-01T10:00:00.000Z"}
           for n, status in enumerate(["completed", "waiting", "failed", "completed", "active"])]
    old.append({"id": 7, "status": "delayed", "createdAt": 1714557600000})
    path = tmp_path / "jobs.json"
    path.write_text(json.dumps(old))
    before = time.time()
    store = jobservice.JobStore(path)
    await store.load()
    page = [json.loads(job.json) for job in store.listing()[0]]
    assert [job["id"] for job in page] == [f"old-{n}" for n in range(5)] + ["7"]
    assert [job["status"] for job in page] == \
        ["resolved", "pending", "failed", "resolved", "pending", "pending"]
    assert page[0]["result"] == url and page[0]["image"]["thumb"] == url
    assert page[0]["image"]["source"] == "unsplash" and "reused" not in page[0]["image"]
    assert page[0]["createdAt"] == "2024-05-01T10:00:00.000Z"
    assert page[2]["error"] == "failed in the old service"
    assert page[5]["createdAt"] == "2024-05-01T10:00:00.000Z"
    assert store.get("old-0").image is store.get("old-3").image
    assert all(before <= job.resolved_at <= time.time()
               for job in store.jobs.values() if job.status != "pending")
    # Written in our format, it reads back the same.
    await store.write_snapshot()
    again = jobservice.JobStore(path)
    await again.load()
    assert [job.json for job in again.listing()[0]] == [job.json for job in store.listing()[0]]


async def test_changes_and_deletions_keep_the_order_and_the_cursors(tmp_path):
    path = tmp_path / "jobs.json"
    jobs = [jobservice.Job(f"j{n}", "pending", None, T0 + n, T0 + 60, seq=n + 1)
            for n in range(10)]
    path.write_text(snapshot_text(jobs))
    store = jobservice.JobStore(path)
    await store.load()
    await store.open(0)
    photo = CATALOG.photos[1]
    await store.commit(store.get("j3").resolved(photo.result, photo.image, T0 + 61))
    await store.commit(jobservice.Tombstone("j5", "deleted", time.time()))
    page, _ = store.listing()
    assert [job.id for job in page] == ["j0", "j1", "j2", "j3", "j4", "j6", "j7", "j8", "j9"]
    assert store.get("j3").status == "resolved" and store.get("j3").image is photo.image
    after_deleted, _ = store.listing(limit=2, cursor="j5")  # a cursor naming a deleted job
    assert [job.id for job in after_deleted] == ["j6", "j7"]
    newest, _ = store.listing(limit=3, newest_first=True, cursor="j7")
    assert [job.id for job in newest] == ["j6", "j4", "j3"]
    assert [job.id for job in store.listing(status="resolved")[0]] == ["j3"]
    await store.close()
    again = jobservice.JobStore(path)
    await again.load()
    assert [job.json for job in again.listing()[0]] == [job.json for job in page]
