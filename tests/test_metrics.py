"""GET /metrics: Prometheus's text format, read back with prometheus_client's own parser,
with counts that match what the test did, and label sets that stay bounded."""

from __future__ import annotations

import pytest
from conftest import create_jobs
from prometheus_client import generate_latest
from prometheus_client.parser import text_string_to_metric_families

import jobservice


async def scrape(client) -> dict:
    """{(sample name, frozenset of labels): value}."""
    response = await client.get("/metrics")
    assert response.status == 200
    assert response.headers["Content-Type"].startswith("text/plain; version=")
    samples = {}
    for family in text_string_to_metric_families(await response.text()):
        for sample in family.samples:
            samples[(sample.name, frozenset(sample.labels.items()))] = sample.value
    return samples


def value(samples: dict, name: str, **labels) -> float:
    return samples.get((name, frozenset(labels.items())), 0.0)


async def test_counts_match_what_happened(start_service, fake_unsplash, unsplash_env,
                                          open_events):
    client = await start_service({**unsplash_env, "JOB_RETENTION": "0"})
    events = await open_events(client)
    ids = await create_jobs(client, 3)
    await events.resolutions(ids)
    assert (await client.delete(f"/jobs/{ids[0]}")).status == 204
    for job_id in ids[1:]:
        assert (await client.get(f"/jobs/{job_id}")).status == 200
    assert (await client.get("/jobs/no-such-job")).status == 404
    assert (await client.get("/no/such/path")).status == 404

    samples = await scrape(client)
    assert value(samples, "jobservice_jobs_created_total") == 3
    assert value(samples, "jobservice_jobs_resolved_total") == 3
    assert value(samples, "jobservice_jobs_failed_total") == 0
    assert value(samples, "jobservice_jobs_deleted_total", reason="deleted") == 1
    assert value(samples, "jobservice_jobs_deleted_total", reason="expired") == 0
    assert value(samples, "jobservice_jobs", status="resolved") == 2
    assert value(samples, "jobservice_jobs", status="pending") == 0
    assert value(samples, "jobservice_resolution_lateness_seconds_count") == 3
    assert value(samples, "jobservice_unsplash_requests_total", outcome="ok") == 1
    assert value(samples, "jobservice_photo_pool_size") == 27  # 30 bought, 3 used
    # Three creations, three resolutions, one deletion: batched or not, all written.
    assert 1 <= value(samples, "jobservice_journal_fsync_seconds_count") <= 7
    assert value(samples, "jobservice_journal_batch_size_sum") == 7
    assert value(samples, "jobservice_storage_ok") == 1
    assert value(samples, "jobservice_peers", protocol="websocket") == 1
    assert value(samples, "jobservice_peers", protocol="socketio_polling") == 0

    def requests(route, method, status):
        return value(samples, "jobservice_http_requests_total", route=route, method=method,
                     status=status)

    assert requests("/jobs", "POST", "201") == 3
    assert requests("/jobs/{id}", "DELETE", "204") == 1
    assert requests("/jobs/{id}", "GET", "200") == 2
    assert requests("/jobs/{id}", "GET", "404") == 1
    assert requests("unmatched", "GET", "404") == 1
    assert requests("/ws", "GET", "101") == 0  # still open: counted when it ends
    assert value(samples, "jobservice_http_request_duration_seconds_count",
                 route="/jobs") == 3
    routes = {dict(labels).get("route") for name, labels in samples
              if name.startswith("jobservice_http_")}
    assert not any(job_id in str(routes) for job_id in ids), routes  # templates, not paths


async def test_rate_limits_and_failures_are_counted(start_service, fake_unsplash, unsplash_env,
                                                    open_events):
    fake_unsplash.script.extend(["429", "500"])
    fake_unsplash.retry_after = "0.05"
    # A job that must have a fresh photo waits the rate limit out, and counts the wait.
    client = await start_service({**unsplash_env, "JOB_RETENTION": "0",
                                  "PHOTO_REUSE": "never"})
    events = await open_events(client)
    [job_id] = await create_jobs(client, 1)
    await events.resolutions([job_id])
    samples = await scrape(client)
    assert value(samples, "jobservice_unsplash_requests_total", outcome="rate_limited") == 1
    assert value(samples, "jobservice_unsplash_requests_total", outcome="error") == 1
    assert value(samples, "jobservice_unsplash_requests_total", outcome="ok") == 1
    assert value(samples, "jobservice_unsplash_rate_limited_seconds_total") > 0


async def test_expiry_and_failed_jobs_are_counted(start_service, fake_unsplash, unsplash_env,
                                                  open_events):
    fake_unsplash.mode = "401"  # and the job must have a fresh photo, so it fails
    client = await start_service({**unsplash_env, "JOB_RETENTION": "0.1",
                                  "PHOTO_REUSE": "never"})
    events = await open_events(client)
    [job_id] = await create_jobs(client, 1)
    await events.until(lambda name, job: name == "ON_DELETED_JOB" and job["id"] == job_id)
    samples = await scrape(client)
    assert value(samples, "jobservice_jobs_failed_total") == 1
    assert value(samples, "jobservice_jobs_deleted_total", reason="expired") == 1
    assert value(samples, "jobservice_unsplash_requests_total", outcome="key_rejected") == 1
    assert value(samples, "jobservice_jobs", status="failed") == 0


async def test_metrics_follow_the_cors_rules(start_service):
    client = await start_service({"CORS_ORIGINS": "https://dash.example"})
    allowed = await client.get("/metrics", headers={"Origin": "https://dash.example"})
    assert allowed.headers["Access-Control-Allow-Origin"] == "https://dash.example"
    other = await client.get("/metrics", headers={"Origin": "https://evil.example"})
    assert "Access-Control-Allow-Origin" not in other.headers


def test_request_durations_fall_in_cumulative_buckets_by_upper_bound():
    metrics = jobservice.Metrics()
    for seconds in (0.001, 0.0011, 0.02, 100.0):  # on a bound, just above one, past all
        metrics.http("/jobs", "POST", 201, seconds)
    metrics.http("/jobs", "POST", 429, 0.0005)
    samples = {}
    for family in text_string_to_metric_families(generate_latest(metrics.registry).decode()):
        for sample in family.samples:
            samples[(sample.name, frozenset(sample.labels.items()))] = sample.value

    def bucket(le):
        return value(samples, "jobservice_http_request_duration_seconds_bucket",
                     route="/jobs", le=le)

    assert [bucket(le) for le in ("0.001", "0.0025", "0.025", "60.0", "+Inf")] == \
        [2, 3, 4, 4, 5]
    assert value(samples, "jobservice_http_request_duration_seconds_count", route="/jobs") == 5
    assert value(samples, "jobservice_http_request_duration_seconds_sum", route="/jobs") == \
        pytest.approx(100.0226)
    assert value(samples, "jobservice_http_requests_total", route="/jobs", method="POST",
                 status="201") == 4
