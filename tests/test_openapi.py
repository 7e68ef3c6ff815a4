"""`static/openapi.json`: a valid OpenAPI 3.1 document that matches the app's routes, and
that a live server conforms to, under Schemathesis and under hand-picked requests.

The live server is a real process (`python jobservice.py`) with a fake Unsplash process
beside it, so jobs resolve with Unsplash-shaped images and, once the fake rejects the key,
fail: every documented state of a job is on the wire.
"""

from __future__ import annotations

import copy
import errno
import gzip
import json
import os
import queue
import subprocess
import sys
import threading
import time
import uuid

import jsonschema_rs
import pytest
import requests
import schemathesis
from conftest import FAST_ENV, ROOT, create_jobs
from hypothesis import HealthCheck, settings
from schemathesis.core import NOT_SET
from schemathesis.specs.openapi.checks import positive_data_acceptance

import jobservice

# One worker for the module: its services (`live`, `steady`) start once (conftest.py).
pytestmark = pytest.mark.xdist_group("openapi")
DOC_PATH = ROOT / "static" / "openapi.json"
DOC = json.loads(DOC_PATH.read_text("utf-8"))
METHODS = {"get", "put", "post", "delete", "options", "head", "patch", "trace"}
# Documented and sent by no request a test can make: 503 needs a failing disk (checked
# in-process below), 101 a WebSocket handshake (checked in test_ws / test_socketio).
NOT_ON_THE_WIRE = {("POST", "/jobs", "503"), ("POST", "/jobs/{id}/retry", "503"),
                   ("GET", "/ws", "101"), ("GET", "/socket.io/", "101"),
                   ("GET", "/socket.io/", "503"),  # 10,000 polling sessions open
                   # MAX_PENDING_JOBS reached: tests/test_retention.py checks those.
                   ("POST", "/jobs", "429"), ("POST", "/jobs/{id}/retry", "429"),
                   ("DELETE", "/jobs/{id}", "503"),
                   # A bulk change under way, MAX_PENDING_JOBS: tests/test_bulk.py.
                   ("POST", "/jobs/retry", "409"), ("POST", "/jobs/delete", "409"),
                   ("POST", "/jobs/retry", "429")}
# Not fuzzed: the HTML page and the two WebSocket upgrades.
NOT_FUZZED = {"/", "/ws", "/socket.io/"}
FUZZ_KEY = "fuzz-key-0123456789"


def documented_operations(doc: dict) -> set[tuple[str, str]]:
    return {(method.upper(), path) for path, item in doc["paths"].items()
            for method in item if method in METHODS}


def routed_operations(app) -> set[tuple[str, str]]:
    """(method, path) for every route, as the document names them."""
    found = set()
    for route in app.router.routes():
        resource = route.resource
        if resource is None or route.method in ("HEAD", "OPTIONS"):
            continue
        path = resource.canonical
        if path == "/static" or path.startswith("/static/"):  # the page's files, not the API
            continue
        if path == jobservice.UNROUTED:  # what no route takes: 404 and 405
            continue
        if path in ("/socket.io", "/socket.io/"):
            path = "/socket.io/"
        # A catch-all route (Socket.IO's) answers GET and POST; others get a JSON 400.
        found.update((method, path) for method in (
            ("GET", "POST") if route.method == "*" else (route.method,)))
    return found


def component_validator(name: str) -> jsonschema_rs.Validator:
    return jsonschema_rs.validator_for(
        {"$ref": f"#/components/schemas/{name}", "components": DOC["components"]},
        validate_formats=True)


# --- The document itself ---------------------------------------------------------------


def test_document_is_valid_openapi_3_1():
    assert DOC["openapi"].startswith("3.1.")
    schema = schemathesis.openapi.from_path(DOC_PATH)
    schema.validate()  # against the OpenAPI 3.1 schema
    for name, component in DOC["components"]["schemas"].items():
        assert jsonschema_rs.meta.is_valid(component), name
    operation_ids = [item[method]["operationId"] for path, item in DOC["paths"].items()
                     for method in item if method in METHODS]
    assert len(operation_ids) == len(set(operation_ids)) == len(documented_operations(DOC))
    labels = {result.ok().label for result in schema.get_all_operations()}
    assert labels == {f"{method} {path}" for method, path in documented_operations(DOC)}


def test_a_broken_document_is_rejected():
    """The validity check above can fail."""
    broken = copy.deepcopy(DOC)
    broken["paths"]["/jobs"]["get"]["responses"] = "none"
    with pytest.raises(jsonschema_rs.ValidationError):
        schemathesis.openapi.from_dict(broken).validate()


def test_paths_and_methods_match_the_routes_exactly(jobs_file):
    settings_ = jobservice.load_settings(["--data", str(jobs_file)], FAST_ENV)
    app = jobservice.create_app(settings_)
    routed, documented = routed_operations(app), documented_operations(DOC)
    assert routed - documented == set(), "routes missing from static/openapi.json"
    assert documented - routed == set(), "documented operations the app does not route"
    # And the comparison notices a route added without documenting it.
    app.router.add_post("/jobs/{id}/cancel", jobservice.retry_job)
    assert routed_operations(app) - documented == {("POST", "/jobs/{id}/cancel")}


def test_events_are_described():
    text = DOC["paths"]["/ws"]["get"]["description"]
    for word in ("ON_CREATED_JOB", "ON_RESOLVED_JOB", "SYNCED", "RESET", "since", "1003",
                 "1009", "1001", "1013", "Origin"):
        assert word in text, word
    text = DOC["paths"]["/socket.io/"]["get"]["description"]
    for word in ("Engine.IO", "websocket", "ON_CREATED_JOB", "pid", "offset", "403"):
        assert word in text, word


async def test_the_app_serves_this_document(start_service):
    client = await start_service()
    response = await client.get("/openapi.json")
    assert response.status == 200
    assert response.content_type == "application/json"
    assert await response.json() == DOC


# --- In-process: shapes that need a fixture a process cannot give ------------------------


@pytest.mark.file_only  # the old service's jobs.json
async def test_events_catalog_images_and_old_jobs_conform(start_service, open_events, jobs_file,
                                                          tmp_path):
    job_schema, health_schema = component_validator("Job"), component_validator("Health")
    client = await start_service()  # no key: the catalog
    events = await open_events(client, "?since=0")
    ids = await create_jobs(client, 3)
    await events.resolutions(ids)
    for name, payload in events.seen:
        if name in ("ON_CREATED_JOB", "ON_RESOLVED_JOB"):
            job_schema.validate(payload)
        else:
            assert name == "SYNCED" and set(payload) == {"seq"}
    for job in await (await client.get("/jobs")).json():
        job_schema.validate(job)
        assert job["image"]["source"] == "catalog"
    health_schema.validate(await (await client.get("/healthz")).json())

    old = tmp_path / "old.json"
    old.write_text(json.dumps([
        {"id": 7, "status": "completed", "result": "https://images.unsplash.com/x",
         "createdAt": 1_700_000_000_000},
        {"id": "f", "status": "failed", "result": None, "createdAt": "2024-01-01T00:00:00Z"},
    ]))
    migrated = await start_service(path=old)
    jobs = await (await migrated.get("/jobs")).json()
    assert [job["id"] for job in jobs] == ["7", "f"]
    for job in jobs:
        job_schema.validate(job)


@pytest.mark.file_only  # a disk fault injected
async def test_storage_failure_is_the_documented_503(start_service, monkeypatch):
    client = await start_service()
    before = await create_jobs(client, 1)
    store = client.app[jobservice.STORE]
    healthy = store._append

    async def disk_full(data):
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(store, "_append", disk_full)
    error = component_validator("Error")
    response = await client.post("/jobs")
    assert response.status == 503
    assert response.content_type == "application/json"
    assert int(response.headers["Retry-After"]) >= 0
    body = await response.json()
    error.validate(body)
    assert body["error"]["code"] == "storage_unavailable"
    assert [job["id"] for job in await (await client.get("/jobs")).json()] == before
    monkeypatch.setattr(store, "_append", healthy)
    assert (await client.post("/jobs")).status == 201


# --- Against a live process -------------------------------------------------------------


class Process:
    """A child process whose output is collected; `wait_for` a line matching a predicate."""

    def __init__(self, args: list[str], env: dict | None = None):
        self.lines: list[str] = []
        self._new: queue.Queue[str] = queue.Queue()
        self.popen = subprocess.Popen(
            [sys.executable, *args], env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
            text=True, errors="replace")
        threading.Thread(target=self._read, daemon=True).start()

    def _read(self) -> None:
        for line in self.popen.stdout:
            self.lines.append(line.rstrip("\n"))
            self._new.put(line)
        self._new.put("")

    def wait_for(self, predicate, timeout: float = 20.0) -> str:
        deadline = time.monotonic() + timeout
        while True:
            try:
                line = self._new.get(timeout=max(0.0, deadline - time.monotonic()))
            except queue.Empty:
                raise AssertionError("timed out; output:\n" + "\n".join(self.lines)) from None
            if line == "":
                raise AssertionError("exited; output:\n" + "\n".join(self.lines))
            if predicate(line):
                return line

    def stop(self) -> None:
        if self.popen.poll() is None:
            self.popen.terminate()
            try:
                self.popen.wait(10)
            except subprocess.TimeoutExpired:
                self.popen.kill()
                self.popen.wait()


def listening_url(service: Process) -> str:
    """The address a service process says it listens on, once it says so."""
    line = service.wait_for(lambda text: "listening on http://" in text)
    return line.split("listening on ", 1)[1].split(";", 1)[0]


def wait_until(what, predicate, timeout: float = 15.0):
    deadline = time.monotonic() + timeout
    while True:
        value = predicate()
        if value:
            return value
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out waiting for {what}")
        time.sleep(0.02)


@pytest.fixture(scope="module")
def live(tmp_path_factory):
    """A service process with a fake Unsplash process; some jobs resolved, some failed."""
    data = tmp_path_factory.mktemp("live") / "jobs.json"
    fake = Process([str(ROOT / "tests" / "fake_unsplash.py"), "--port", "0", "--key", FUZZ_KEY])
    service = None
    try:
        fake_url = f"http://127.0.0.1:{json.loads(fake.wait_for(str.strip))['port']}"
        # Jobs that must have a fresh photo, so that a rejected key makes failed ones.
        env = {**os.environ, **FAST_ENV, "PYTHONUNBUFFERED": "1", "PHOTO_REUSE": "never",
               "UNSPLASH_ACCESS_KEY": FUZZ_KEY, "UNSPLASH_API_URL": fake_url}
        service = Process([str(ROOT / "jobservice.py"), "--port", "0", "--data", str(data)], env)
        url = listening_url(service)
        http = requests.Session()

        def settle(ids, status):
            def done():
                jobs = [http.get(f"{url}/jobs/{job_id}").json() for job_id in ids]
                return all(job["status"] == status for job in jobs)
            wait_until(f"jobs {status}", done)

        # One batch of photos, all used up, so the next jobs need a call that fails.
        batch = jobservice.UNSPLASH_BATCH
        resolved = [http.post(f"{url}/jobs").json()["id"] for _ in range(batch)]
        settle(resolved, "resolved")
        http.post(f"{fake_url}/_control", json={"mode": "401"}).raise_for_status()
        failed = [http.post(f"{url}/jobs").json()["id"] for _ in range(3)]
        settle(failed, "failed")
        yield {"url": url, "resolved": resolved, "failed": failed, "service": service}
    finally:
        if service is not None:
            service.stop()
        fake.stop()


def test_every_documented_status_conforms_on_the_live_server(live):
    schema = schemathesis.openapi.from_path(DOC_PATH)
    url, resolved, failed = live["url"], live["resolved"], live["failed"]
    seen: set[tuple[str, str, str]] = set()
    unknown = str(uuid.uuid4())

    def check(method, path, *, status, path_parameters=None, query=None, body=None,
              headers=None, data=None, media_type="application/json"):
        operation = schema[path][method]
        kwargs = {}
        if body is not None:
            kwargs = {"body": body, "media_type": media_type}
        case = operation.Case(path_parameters=path_parameters, query=query, headers=headers,
                              **kwargs)
        extra = {"data": data} if data is not None else {}
        response = case.call_and_validate(base_url=url, **extra)
        assert response.status_code == status, (method, path, query, response.text)
        seen.add((method, path, str(status)))
        return response

    def header(response, name):
        return response.headers[name.lower()][0]

    created = check("POST", "/jobs", status=201)
    assert header(created, "Location") == f"/jobs/{created.json()['id']}"
    check("POST", "/jobs", status=201, body={})
    check("POST", "/jobs", status=201, body={"note": "lunch", "nested": {"a": [1, None]}})
    check("POST", "/jobs", status=400, body=[1, 2])
    check("POST", "/jobs", status=400, data=b"{not json",
          headers={"Content-Type": "application/json"})
    check("POST", "/jobs", status=413, body={"pad": "x" * 70_000})
    json_type = {"Content-Type": "application/json"}
    check("POST", "/jobs", status=201, data=gzip.compress(b'{"note": "lunch"}'),
          headers={**json_type, "Content-Encoding": "gzip"})
    check("POST", "/jobs", status=400, data=b"notgzip",
          headers={**json_type, "Content-Encoding": "gzip"})
    check("POST", "/jobs", status=415, data=b"{}", headers={**json_type, "Content-Encoding": "br"})

    listing = check("GET", "/jobs", status=200).json()
    assert {job["id"] for job in listing} >= set(resolved + failed)
    page = check("GET", "/jobs", status=200, query={"limit": 1})
    assert header(page, "X-Jobs-Seq").isdigit()
    assert header(page, "Link").startswith("</jobs?")
    check("GET", "/jobs", status=200, query={"limit": 2, "after": listing[0]["id"],
                                             "status": "resolved"})
    for query in ({"limit": 0}, {"limit": 1001}, {"status": "done"}, {"after": "nope"},
                  {"page": 2}):
        check("GET", "/jobs", status=400, query=query)

    job = check("GET", "/jobs/{id}", status=200, path_parameters={"id": resolved[0]}).json()
    assert job["status"] == "resolved" and job["image"]["source"] == "unsplash"
    job = check("GET", "/jobs/{id}", status=200, path_parameters={"id": failed[0]}).json()
    assert job["status"] == "failed" and job["error"]
    check("GET", "/jobs/{id}", status=404, path_parameters={"id": unknown})
    newest = check("GET", "/jobs", status=200, query={"order": "desc", "limit": 1})
    assert header(newest, "Link").startswith("</jobs?")
    check("GET", "/jobs", status=200, query={"order": "desc", "limit": 1,
                                             "before": newest.json()[0]["id"]})
    check("GET", "/jobs", status=400, query={"order": "desc", "after": listing[0]["id"]})
    found = check("GET", "/jobs/find", status=200, query={"id": failed[0][:8]}).json()
    assert [job["id"] for job in found] == [failed[0]]
    assert check("GET", "/jobs/find", status=200, query={"id": failed[0]}).json() == found
    assert check("GET", "/jobs/find", status=200, query={"id": "zz", "limit": 5}).json() == []
    for query in ({}, {"id": ""}, {"id": "x" * 201}, {"id": "a", "limit": 0},
                  {"id": "a", "limit": 101}, {"id": "a", "order": "desc"}):
        check("GET", "/jobs/find", status=400, query=query)
    # Bulk changes that match no job (the jobs above are wanted as they are below).
    for path, body in (("/jobs/retry", {"error": "an error no job has"}),
                       ("/jobs/delete", {"finishedBefore": "2000-01-01T00:00:00Z"})):
        assert check("POST", path, status=202, body=body).json()["taken"] == 0
        for bad in ({"status": "pending"}, {"finishedBefore": "soon"}, {"error": ""},
                    {"olderThan": 5}, [1]):
            check("POST", path, status=400, body=bad)
        check("POST", path, status=413, body={"error": "x" * 70_000})
        check("POST", path, status=415, data=b"{}",
              headers={"Content-Type": "application/json", "Content-Encoding": "br"})
        check("POST", path, status=403, headers={"Origin": "https://evil.example"})
    assert check("GET", "/jobs/stats", status=200).json()["total"] >= 1
    doomed = check("POST", "/jobs", status=201).json()["id"]
    check("DELETE", "/jobs/{id}", status=204, path_parameters={"id": doomed})
    check("DELETE", "/jobs/{id}", status=404, path_parameters={"id": doomed})
    assert "jobservice_jobs_created_total" in check("GET", "/metrics", status=200).text
    assert check("GET", "/session", status=200).json() == {"required": False,
                                                           "authenticated": True}
    check("POST", "/session", status=200, body={"token": "x"})
    check("POST", "/session", status=400, data=b"{oops",
          headers={"Content-Type": "application/json"})
    check("POST", "/session", status=403, body={}, headers={"Origin": "https://evil.example"})
    check("POST", "/session", status=413, body={"token": "x" * 70_000})
    check("POST", "/session", status=415, data=b"{}",
          headers={**json_type, "Content-Encoding": "zstd"})
    check("POST", "/jobs", status=403, headers={"Origin": "https://evil.example"})
    check("POST", "/jobs/{id}/retry", status=403, path_parameters={"id": failed[0]},
          headers={"Origin": "https://evil.example"})
    check("DELETE", "/jobs/{id}", status=403, path_parameters={"id": failed[0]},
          headers={"Origin": "https://evil.example"})
    check("DELETE", "/session", status=204)
    check("DELETE", "/session", status=403, headers={"Origin": "https://evil.example"})

    retried = check("POST", "/jobs/{id}/retry", status=202, path_parameters={"id": failed[1]})
    assert header(retried, "Location") == f"/jobs/{failed[1]}"
    assert retried.json()["status"] == "pending" and retried.json()["attempts"] == 0
    check("POST", "/jobs/{id}/retry", status=409, path_parameters={"id": resolved[1]})
    for status, data, coding in [(400, b"notgzip", "gzip"), (400, b"[1]", "identity"),
                                 (413, gzip.compress(b" " * 100_000), "gzip"),
                                 (415, b"{}", "foo")]:
        check("POST", "/jobs/{id}/retry", status=status, path_parameters={"id": failed[2]},
              data=data, headers={**json_type, "Content-Encoding": coding})
    check("POST", "/jobs/{id}/retry", status=404, path_parameters={"id": unknown})

    assert check("GET", "/healthz", status=200).json()["status"] == "ok"
    assert check("GET", "/openapi.json", status=200).json() == DOC
    check("GET", "/", status=200)

    # The WebSocket operations' refusals come before any upgrade, as plain HTTP.
    check("GET", "/ws", status=400, query={"since": "-1"})
    check("GET", "/ws", status=400)  # not a handshake
    check("GET", "/ws", status=403, headers={"Origin": "https://evil.example"})
    sio = {"EIO": "4", "transport": "websocket"}
    check("GET", "/socket.io/", status=400, query={**sio, "transport": "webtransport"})
    check("GET", "/socket.io/", status=400, query={**sio, "EIO": "3"})
    check("GET", "/socket.io/", status=400, query=sio)  # no Upgrade header
    check("GET", "/socket.io/", status=403, query=sio,
          headers={"Origin": "https://evil.example", "Upgrade": "websocket",
                   "Connection": "Upgrade"})

    polling = {"EIO": "4", "transport": "polling"}
    opened = check("GET", "/socket.io/", status=200, query=polling).text
    sid = json.loads(opened[1:])["sid"]
    assert check("POST", "/socket.io/", status=200, query={**polling, "sid": sid},
                 body="40", media_type="text/plain").text == "ok"
    assert check("GET", "/socket.io/", status=200, query={**polling, "sid": sid}).text
    check("POST", "/socket.io/", status=400, query={**polling, "sid": "unknown"},
          body="40", media_type="text/plain")
    check("POST", "/socket.io/", status=403, query={**polling, "sid": sid}, body="3",
          media_type="text/plain", headers={"Origin": "https://evil.example"})
    check("POST", "/socket.io/", status=413, query={**polling, "sid": sid},
          body="4" + "x" * 1_000_000, media_type="text/plain")
    for status, coding in [(400, "deflate"), (415, "br")]:
        sid = json.loads(check("GET", "/socket.io/", status=200, query=polling).text[1:])["sid"]
        check("POST", "/socket.io/", status=status, query={**polling, "sid": sid}, data=b"40",
              headers={"Content-Type": "text/plain", "Content-Encoding": coding})

    # A Host the service does not answer to (DNS rebinding) is refused on every route.
    for path, item in DOC["paths"].items():
        for method, operation in item.items():
            if method in METHODS and "421" in operation["responses"]:
                check(method.upper(), path, status=421, headers={"Host": "evil.example"},
                      path_parameters={"id": unknown} if "{id}" in path else None)

    documented = {(method.upper(), path, status) for path, item in DOC["paths"].items()
                  for method, operation in item.items() if method in METHODS
                  for status in operation["responses"]}
    # 401 and the rate limits need API_TOKEN / CLIENT_RATE_LIMIT, which this live process
    # does not set: tests/test_access.py checks those.
    untested = {op for op in documented if op[2] == "401"} | {
        ("POST", "/session", "429"), ("POST", "/session", "401"), ("POST", "/session", "204")}
    # A Redis-mode node's 503 "loading", while it loads: tests/test_cluster_start.py.
    untested |= {("GET", path, "503") for path in ("/healthz", "/jobs", "/jobs/stats",
                                                   "/jobs/{id}", "/jobs/find", "/ws")}
    untested |= {("POST", "/jobs/retry", "503"), ("POST", "/jobs/delete", "503")}
    assert documented - NOT_ON_THE_WIRE - untested - seen == set(), "documented but never seen"


@pytest.mark.parametrize("query", [
    {"limit": "\u00b2"},  # SUPERSCRIPT TWO: str.isdigit() says yes, int() says no
    {"limit": "\uff11"},  # FULLWIDTH DIGIT ONE: not an integer in the document's terms
    {"limit": "1 "}, {"limit": "+1"}, {"limit": "1.0"}, {"limit": "99999999999999999999"},
    {"status": "PENDING"}, {"status": ""}, {"after": ""},
], ids=repr)
def test_bad_list_parameters_are_a_documented_400(live, query):
    schema = schemathesis.openapi.from_path(DOC_PATH)
    case = schema["/jobs"]["GET"].Case(query=query)
    response = case.call_and_validate(base_url=live["url"])
    assert response.status_code == 400, response.text
    assert response.json()["error"]["code"] == "invalid_parameter"


@pytest.mark.parametrize("since", ["\u00b2", "\uff11", "1.5", "-1", "9" * 19, ""], ids=repr)
def test_bad_since_on_ws_is_a_documented_400(live, since):
    schema = schemathesis.openapi.from_path(DOC_PATH)
    case = schema["/ws"]["GET"].Case(query={"since": since})
    response = case.call_and_validate(base_url=live["url"])
    assert response.status_code == 400, response.text
    assert response.json()["error"]["code"] == "invalid_parameter"


# Schemathesis, over every JSON operation, deterministic and bounded. The schema is the
# file in the repo (loaded at import, before any server runs; the test above checks that
# the server serves exactly this file), and every case goes to the live process.
fuzz_schema = schemathesis.openapi.from_path(DOC_PATH).exclude(
    path=sorted(NOT_FUZZED))


def excluded_checks(case) -> list:
    # A generated cursor names no job (or goes with the other order), a generated time
    # is no time (month 13): the document says that is a 400.
    cursor = case.query and ("after" in case.query or "before" in case.query)
    when = isinstance(case.body, dict) and ({"finishedBefore", "finishedAfter"} & set(case.body))
    return [positive_data_acceptance] if cursor or when else []


def coded(body: bytes) -> list[tuple[str, bytes]]:
    """(Content-Encoding, what is sent) for a body: well coded, cut short, not coded as
    it says, and in codings the service does not decode."""
    packed = gzip.compress(body)
    return [("gzip", packed), ("gzip", packed[:-5]), ("deflate", body), ("br", body),
            ("gzip, deflate", packed)]


@fuzz_schema.parametrize()
@settings(max_examples=40, derandomize=True, database=None, deadline=None,
          suppress_health_check=list(HealthCheck))
def test_schemathesis_finds_no_5xx_and_no_nonconforming_response(case, live):
    response = case.call_and_validate(base_url=live["url"], excluded_checks=excluded_checks(case))
    assert response.status_code < 500
    if case.media_type != "application/json":
        return
    # The same body again, coded with Content-Encoding: well, badly, or in a coding the
    # service does not decode. Each answer conforms: a 400 or 415 is documented.
    body = b"" if case.body is NOT_SET else case.body if isinstance(case.body, bytes) \
        else json.dumps(case.body).encode()
    for coding, data in coded(body):
        variant = case.operation.Case(
            path_parameters=case.path_parameters, query=case.query,
            headers={**(case.headers or {}), "Content-Type": "application/json",
                     "Content-Encoding": coding})
        response = variant.call_and_validate(
            base_url=live["url"], data=data,
            excluded_checks=[*excluded_checks(case), positive_data_acceptance])
        assert response.status_code < 500


@pytest.fixture(scope="module")
def steady(tmp_path_factory):
    """A service whose jobs stay pending for an hour, a few of them made up front: the
    same request gets the same answer whenever it comes. A stateful run needs that.
    Which links it can follow depends on earlier answers (a retry's 202 or 409), and
    Hypothesis calls the run inconsistent if a job resolved in between changes them."""
    data = tmp_path_factory.mktemp("steady") / "jobs.json"
    env = {**os.environ, "PYTHONUNBUFFERED": "1", "JOB_DELAY_MIN": "3600",
           "JOB_DELAY_MAX": "3600"}
    service = Process([str(ROOT / "jobservice.py"), "--port", "0", "--data", str(data)], env)
    try:
        url = listening_url(service)
        for _ in range(3):
            requests.post(f"{url}/jobs", timeout=10).raise_for_status()
        yield {"url": url, "service": service}
    finally:
        service.stop()


def test_schemathesis_follows_links_from_created_jobs(steady):
    """Stateful: ids from `POST /jobs` 201s and from listings feed `GET /jobs/{id}` and
    the retry. Without the DELETEs: a random deletion changes what the next run of the
    same example finds (the DELETEs are fuzzed above)."""
    seen = []

    class Workflow(fuzz_schema.exclude(method="DELETE").as_state_machine()):
        def get_call_kwargs(self, case):
            return {"base_url": steady["url"]}

        def validate_response(self, response, case, additional_checks=None, **kwargs):
            seen.append((case.method, case.operation.path, response.status_code))
            case.validate_response(response, excluded_checks=excluded_checks(case),
                                   transport_kwargs=kwargs)

    Workflow.run(settings=settings(max_examples=25, stateful_step_count=6, derandomize=True,
                                   database=None, deadline=None,
                                   suppress_health_check=list(HealthCheck)))
    assert ("GET", "/jobs/{id}", 200) in seen
    assert ("POST", "/jobs/{id}/retry", 409) in seen  # a pending job is not retried
    service: Process = steady["service"]
    assert service.popen.poll() is None, "the service exited"
    assert "Traceback" not in "\n".join(service.lines)


def test_the_live_process_logged_no_internal_error(live):
    """Runs last: anything any request above got past the handlers shows up here."""
    service: Process = live["service"]
    assert service.popen.poll() is None, "the service exited"
    log = "\n".join(service.lines)
    assert "Traceback" not in log, log
    assert FUZZ_KEY not in log
