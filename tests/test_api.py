"""The HTTP API: status codes, bodies, headers, paging, retries, CORS and errors."""

from __future__ import annotations

import re
import uuid

from conftest import create_jobs, stored

ISO_MS_Z = re.compile(r"^\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d\.\d{3}Z$")
JOB_KEYS = {"id", "status", "result", "createdAt", "dueAt", "resolvedAt", "attempts", "error",
            "image", "seq"}


async def test_create_job_answers_201_with_id_and_location_once_on_disk(
        start_service, jobs_file, backend):
    client = await start_service()
    response = await client.post("/jobs")
    assert response.status == 201
    body = await response.json()
    assert set(body) == {"id"}
    assert uuid.UUID(body["id"]).version == 4
    assert response.headers["Location"] == f"/jobs/{body['id']}"
    jobs, _ = await stored(backend, jobs_file)
    assert body["id"] in jobs


async def test_create_job_accepts_an_empty_or_object_body(start_service):
    client = await start_service()
    assert (await client.post("/jobs", data=b"")).status == 201
    assert (await client.post("/jobs", json={})).status == 201
    assert (await client.post("/jobs", json={"note": "lunch"})).status == 201


async def test_create_job_rejects_bodies_that_are_not_json_objects(start_service):
    client = await start_service()
    for body, code in [(b"[1, 2]", "invalid_body"), (b'"text"', "invalid_body"),
                       (b"{not json", "invalid_json"), (b"\xff\xfe", "invalid_json")]:
        response = await client.post("/jobs", data=body,
                                     headers={"Content-Type": "application/json"})
        assert response.status == 400, body
        assert (await response.json())["error"]["code"] == code
    listing = await (await client.get("/jobs")).json()
    assert listing == []


async def test_create_job_rejects_bodies_over_64_kib(start_service):
    client = await start_service()
    response = await client.post("/jobs", data=b'{"pad": "' + b"x" * 70_000 + b'"}')
    assert response.status == 413
    error = (await response.json())["error"]
    assert error["code"] == "payload_too_large" and error["message"]
    assert (await client.post("/jobs", data=b'{"pad": "' + b"x" * 60_000 + b'"}')).status == 201


async def test_job_has_the_documented_shape(start_service):
    client = await start_service()
    [job_id] = await create_jobs(client, 1)
    response = await client.get(f"/jobs/{job_id}")
    assert response.status == 200
    job = await response.json()
    assert set(job) == JOB_KEYS
    assert job["status"] == "pending" and job["result"] is None and job["image"] is None
    assert job["resolvedAt"] is None and job["error"] is None and job["attempts"] == 0
    assert ISO_MS_Z.match(job["createdAt"]) and ISO_MS_Z.match(job["dueAt"])
    assert job["dueAt"] > job["createdAt"]


async def test_unknown_job_is_a_json_404(start_service):
    client = await start_service()
    response = await client.get(f"/jobs/{uuid.uuid4()}")
    assert response.status == 404
    assert response.content_type == "application/json"
    assert (await response.json())["error"]["code"] == "not_found"


async def test_listing_is_oldest_first_and_filters_by_status(start_service, open_events):
    client = await start_service()
    events = await open_events(client)
    ids = await create_jobs(client, 5)
    listing = await (await client.get("/jobs")).json()
    assert [job["id"] for job in listing] == ids
    await events.resolutions(ids[:1])
    resolved = await (await client.get("/jobs?status=resolved")).json()
    assert resolved and all(job["status"] == "resolved" for job in resolved)
    bad = await client.get("/jobs?status=done")
    assert bad.status == 400 and (await bad.json())["error"]["code"] == "invalid_parameter"


async def test_listing_carries_the_change_counter(start_service):
    client = await start_service()
    first = await client.get("/jobs")
    await create_jobs(client, 3)
    second = await client.get("/jobs")
    assert int(second.headers["X-Jobs-Seq"]) == int(first.headers["X-Jobs-Seq"]) + 3


async def test_paging_walks_every_job_once_with_link_headers(start_service):
    client = await start_service({"JOB_DELAY_MIN": "60", "JOB_DELAY_MAX": "60"})
    ids = await create_jobs(client, 7)
    seen, url = [], "/jobs?limit=3"
    while url:
        response = await client.get(url)
        assert response.status == 200
        page = await response.json()
        assert len(page) <= 3
        seen += [job["id"] for job in page]
        link = response.headers.get("Link")
        url = re.match(r'<([^>]+)>; rel="next"', link).group(1) if link else None
    assert seen == ids


async def test_paging_rejects_bad_values(start_service):
    client = await start_service()
    await create_jobs(client, 1)
    for query in ["limit=0", "limit=-1", "limit=abc", "limit=100000", f"after={uuid.uuid4()}",
                  "colour=red"]:
        response = await client.get(f"/jobs?{query}")
        assert response.status == 400, query
        assert (await response.json())["error"]["message"]


async def test_retry_rules(start_service, open_events, fake_unsplash, unsplash_env):
    fake_unsplash.mode = "500"  # and the job must have a fresh photo, so it fails
    client = await start_service({**unsplash_env, "JOB_MAX_ATTEMPTS": "2",
                                  "PHOTO_REUSE": "never"})
    events = await open_events(client)
    [job_id] = await create_jobs(client, 1)
    conflict = await client.post(f"/jobs/{job_id}/retry")
    assert conflict.status == 409 and (await conflict.json())["error"]["code"] == "not_failed"
    failed = (await events.resolutions([job_id]))[job_id]
    assert failed["status"] == "failed" and failed["error"]

    fake_unsplash.mode = "ok"
    retried = await client.post(f"/jobs/{job_id}/retry")
    assert retried.status == 202
    body = await retried.json()
    assert body["status"] == "pending" and body["attempts"] == 0 and body["error"] is None
    resolved = (await events.resolutions([job_id]))[job_id]
    assert resolved["status"] == "resolved" and resolved["result"]
    assert (await client.post(f"/jobs/{uuid.uuid4()}/retry")).status == 404


async def test_unknown_paths_and_methods_are_json_errors(start_service):
    client = await start_service()
    missing = await client.get("/nothing/here")
    assert missing.status == 404 and (await missing.json())["error"]["code"] == "not_found"
    wrong = await client.delete("/jobs")
    assert wrong.status == 405
    assert set(wrong.headers["Allow"].split(",")) >= {"GET", "POST"}
    assert (await wrong.json())["error"]["code"] == "method_not_allowed"


async def test_health_reports_ok_and_counts(start_service):
    client = await start_service()
    await create_jobs(client, 2)
    response = await client.get("/healthz")
    assert response.status == 200
    health = await response.json()
    assert health["status"] == "ok" and health["jobs"] == 2 and health["storage"] == "ok"


async def test_cors_is_same_origin_unless_configured(start_service):
    client = await start_service()
    response = await client.get("/jobs", headers={"Origin": "https://elsewhere.example"})
    assert "Access-Control-Allow-Origin" not in response.headers
    preflight = await client.options("/jobs", headers={
        "Origin": "https://elsewhere.example", "Access-Control-Request-Method": "POST"})
    assert preflight.status == 403


async def test_cors_allows_listed_origins_with_preflight(start_service):
    client = await start_service({"CORS_ORIGINS": "https://app.example, http://localhost:5173"})
    preflight = await client.options("/jobs", headers={
        "Origin": "https://app.example", "Access-Control-Request-Method": "POST",
        "Access-Control-Request-Headers": "content-type"})
    assert preflight.status == 204
    assert preflight.headers["Access-Control-Allow-Origin"] == "https://app.example"
    assert "POST" in preflight.headers["Access-Control-Allow-Methods"]
    response = await client.post("/jobs", headers={"Origin": "https://app.example"})
    assert response.headers["Access-Control-Allow-Origin"] == "https://app.example"
    assert "Location" in response.headers["Access-Control-Expose-Headers"]
    other = await client.get("/jobs", headers={"Origin": "https://evil.example"})
    assert "Access-Control-Allow-Origin" not in other.headers


async def test_cors_wildcard(start_service):
    client = await start_service({"CORS_ORIGINS": "*"})
    response = await client.get("/jobs", headers={"Origin": "https://any.example"})
    assert response.headers["Access-Control-Allow-Origin"] == "*"
