"""A Redis-mode node loads its jobs in short steps while the others go on writing, and
ends with exactly their registry; it serves /healthz ("loading") meanwhile. A Redis that
comes back without the changes the nodes applied is noticed, and no seq is used twice.

Real service processes on a redis-server of the test's own; a proxy between one node
and Redis stalls that node's load at a point known by bytes, not by time.
"""

from __future__ import annotations

import asyncio
import json
import re
import time
from urllib.parse import urlsplit

import aiohttp
import jsonschema_rs
from conftest import ROOT, EventStream, RedisServer, ServiceProcess, free_port
from test_cluster import CREATED, RESOLVED, cluster, health, post, redis_client, watch  # noqa: F401

import jobservice
import jobservice_redis

LOADED = re.compile(r"loaded (\d+) jobs \((\d+) pending\) from Redis in [\d.]+ s, up to seq "
                    r"(\d+) \((\d+) changes made meanwhile\)")


def write_jobs_file(path, counts: dict[str, int]) -> dict[str, list[str]]:
    """A jobs.json of the service's own format: `counts` jobs of each status, pending
    ones due in a day; their ids by status."""
    now = time.time()
    jobs, ids = [], {status: [] for status in counts}
    for status, count in counts.items():
        for _ in range(count):
            job = jobservice.Job(jobservice.new_job_id(), status, None, now - 60, now + 86400)
            if status == "resolved":
                job.result, job.resolved_at = "https://images.unsplash.com/photo-1", now - 30
                job.image = {"id": "x", "thumb": job.result, "small": job.result, "alt": "food",
                             "author": None, "authorUrl": None, "pageUrl": None,
                             "color": None, "source": "catalog"}
            elif status == "failed":
                job.resolved_at, job.error = now - 30, "failed in a test"
            job.seq = len(jobs) + 1
            jobs.append(job)
            ids[status].append(job.id)
    path.write_text(f'{{"version":1,"seq":{len(jobs)},"jobs":['
                    + ",\n".join(job.json for job in jobs) + "]}")
    return ids


async def listing(http, node: ServiceProcess) -> tuple[list[dict], int]:
    async with http.get(f"{node.url}/jobs") as response:
        assert response.status == 200, await response.text()
        return await response.json(), int(response.headers["X-Jobs-Seq"])


async def test_a_node_loading_while_another_writes_ends_with_exactly_its_jobs(
        fresh_redis, cluster, watch, http, tcp_proxy, tmp_path):
    """6,000 jobs in Redis. Node B starts through a proxy that stalls once B has read
    part of the jobs; meanwhile node A deletes, retries, creates and resolves jobs.
    Released, B finishes loading with every one of those changes, and holds the same
    jobs, in the same order, at the same seq as A."""
    ids = write_jobs_file(tmp_path / "seed.json",
                          {"pending": 2000, "resolved": 2000, "failed": 2000})
    settings = jobservice.load_settings(["--data", str(tmp_path / "seed.json")],
                                        {"REDIS_URL": fresh_redis.url})
    await jobservice_redis.import_file(settings, tmp_path / "seed.json", force=False)
    (a,) = await cluster(1)
    stream = await watch(a)

    proxy = await tcp_proxy(fresh_redis.port)
    proxy.hold_after(400_000)  # bytes of HSCAN replies: about a fifth of the jobs
    port = free_port()
    b = ServiceProcess(tmp_path / "b.json", {
        "REDIS_URL": f"redis://127.0.0.1:{urlsplit(proxy.url).port}/0",
        "REDIS_TIMEOUT": "30"}, args=["--port", str(port)])
    starting = asyncio.create_task(b.start(60))
    try:
        try:
            await asyncio.wait_for(proxy.held.wait(), 20)
            doc = json.loads((ROOT / "static" / "openapi.json").read_text())
            async with http.get(f"http://127.0.0.1:{port}/healthz") as response:
                assert response.status == 503 and response.headers["Retry-After"] == "1"
                body = await response.json()
                assert body["status"] == "loading"
                jsonschema_rs.validate(doc["paths"]["/healthz"]["get"]["responses"]["503"]
                                       ["content"]["application/json"]["schema"], body)
            async with http.get(f"http://127.0.0.1:{port}/jobs") as response:
                assert response.status == 503
                body = await response.json()
                assert body["error"]["code"] == "loading"
                jsonschema_rs.validate({"$ref": "#/components/schemas/Error",
                                        "components": doc["components"]}, body)

            # Meanwhile, on A: every kind of change, to jobs B has and has not read yet.
            for job_id in ids["pending"][::10] + ids["resolved"][::10]:
                async with http.delete(f"{a.url}/jobs/{job_id}") as response:
                    assert response.status == 204
            retried = ids["failed"][::10]
            for job_id in retried:
                async with http.post(f"{a.url}/jobs/{job_id}/retry") as response:
                    assert response.status == 202
            created = [await post(http, a) for _ in range(200)]
            resolved = await stream.resolutions(retried + created, 30)
            assert all(job["status"] == "resolved" for job in resolved.values())
            assert not starting.done(), "B was ready while its load was held"
        finally:
            proxy.release()
        await starting

        jobs_a, seq_a = await listing(http, a)
        jobs_b, seq_b = await listing(http, b)
        assert seq_b == seq_a == 6000 + 400 + 2 * 200 + 2 * 200
        assert jobs_b == jobs_a, "B holds exactly A's jobs, in A's order"
        assert len(jobs_a) == 6000 - 400 + 200
        async with http.get(f"{b.url}/jobs/stats") as stats_b, \
                http.get(f"{a.url}/jobs/stats") as stats_a:
            assert await stats_b.json() == await stats_a.json()
        loaded = next(match for line in b.log if (match := LOADED.search(line)))
        assert int(loaded.group(4)) == seq_a - 6000, "the changes made while B loaded were replayed"
        # And B goes on live: a job created on A now reaches B's clients.
        events = await watch(b)
        marker = await post(http, a)
        await events.until(lambda name, job: name == RESOLVED and job["id"] == marker)
    finally:
        starting.cancel()
        if b.process is not None and b.process.returncode is None:
            b.process.kill()
            await b.process.wait()


async def test_a_redis_back_without_the_changes_is_noticed_and_no_seq_is_used_twice(
        tmp_path, http, watch):
    """Redis without persistence is killed and restarted empty under two nodes that
    applied 40 changes. Each notices that it lacks what it applied, starts Redis's seq
    after its own, reloads (an empty registry now) and closes its sockets (1012); a
    client back with its seq is told to reload (RESET). New jobs are seen by both nodes,
    numbered after every seq used before."""
    redis = RedisServer(tmp_path / "redis", persistent=False).start()
    nodes: list[ServiceProcess] = []
    try:
        for name in ("a", "b"):
            nodes.append(await ServiceProcess(tmp_path / f"{name}.json", {
                "REDIS_URL": redis.url, "REDIS_TIMEOUT": "1"}).start())
        streams = [await watch(node) for node in nodes]
        ids = [await post(http, nodes[n % 2]) for n in range(20)]
        for stream in streams:
            await stream.resolutions(ids)
        assert [(await listing(http, node))[1] for node in nodes] == [40, 40]

        redis.kill()
        redis.start()
        for stream in streams:  # each node's own reload ends its sockets
            async with asyncio.timeout(20):
                while (message := await stream.ws.receive()).type == aiohttp.WSMsgType.TEXT:
                    pass
            # The frame's code, not ws.close_code: that turns 1006 when the node's side is
            # gone before the client's own close frame is written (a busy box's race).
            assert (message.type, message.data) == (aiohttp.WSMsgType.CLOSE, 1012), message
        for node in nodes:
            back = EventStream(await http.ws_connect(f"{node.url}/ws?since=40"))
            name, payload = await back.next()
            assert name == "RESET" and payload["seq"] >= 41, (name, payload)
            body = await health(http, node)
            assert body.get("jobs") == 0 and body["seq"] >= 41, (body, node.log[-8:])
            assert any("lacks changes this node applied" in line for line in node.log)
        fresh = await post(http, nodes[0])
        await back.until(lambda name, job: name == CREATED and job["id"] == fresh)
        jobs, _ = await listing(http, nodes[1])
        assert [job["id"] for job in jobs] == [fresh] and jobs[0]["seq"] > 41
    finally:
        for node in nodes:
            if node.process.returncode is None:
                node.process.kill()
                await node.process.wait()
        redis.kill()
