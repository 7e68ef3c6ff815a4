"""Redis found through Sentinel: when the primary dies, the nodes find the promoted
replica by themselves, keep their registries and their clients, and lose nothing that
was acknowledged with REDIS_MIN_REPLICAS_ACK=1.

A real primary, replica and three sentinels (`redis-server --sentinel`) of the test's
own, three real service processes, real /ws clients.
"""

from __future__ import annotations

import asyncio
import collections
import json
import signal
import time

import aiohttp
import pytest
import redis.asyncio
from conftest import Sentinels, ServiceProcess
from test_cluster import CREATED, RESOLVED, health, post, quiet_until, watch  # noqa: F401
from test_cluster_start import listing

import jobservice


async def test_a_primary_killed_under_load_fails_over_and_loses_nothing_acknowledged(
        sentinels, watch, http, tmp_path):
    """POSTs go on over three nodes while the primary is SIGKILLed. Sentinel promotes
    the replica; the dead server comes back as the new primary's replica (a replacement
    machine would). Every 201 is a job that every node holds and that resolves once, every
    node's /ws client hears each resolution once, no node restarts, and POSTs are
    refused (503) only during the switch."""
    env = {**sentinels.env, "REDIS_MIN_REPLICAS_ACK": "1", "REDIS_TIMEOUT": "2"}
    nodes = [ServiceProcess(tmp_path / f"node{n}.json", env) for n in range(3)]
    try:
        await asyncio.gather(*(node.start() for node in nodes))
        pids = [node.process.pid for node in nodes]
        streams = [await watch(node) for node in nodes]
        sentinel = redis.asyncio.Redis(port=sentinels.ports[0], decode_responses=True)
        switched = sentinel.pubsub()
        await switched.subscribe("+switch-master")
        await switched.get_message(timeout=5)  # the subscription's own confirmation

        acknowledged, refused = [], collections.Counter()
        killed_at, back_at = 0.0, {}
        before, after = asyncio.Event(), asyncio.Event()

        async def load(node: ServiceProcess) -> None:
            while not after.is_set():
                try:
                    async with http.post(f"{node.url}/jobs") as response:
                        body = await response.json()
                except aiohttp.ClientError as exc:  # the service must never drop a request
                    raise AssertionError(f"{node.url}: {exc!r}") from None
                if response.status == 201:
                    acknowledged.append(body["id"])
                    if len(acknowledged) >= 300:
                        before.set()
                    if killed_at and node.url not in back_at:
                        back_at[node.url] = time.monotonic()
                        if len(back_at) == len(nodes):
                            after.set()
                else:
                    assert response.status == 503, body
                    assert killed_at, f"refused before the primary died: {body}"
                    refused[body["error"]["code"]] += 1

        async def chaos() -> None:
            nonlocal killed_at
            await before.wait()
            sentinels.primary.kill()
            killed_at = time.monotonic()
            async with asyncio.timeout(15):
                while (message := await switched.get_message(timeout=15)) is None:
                    pass
            _, _, _, host, port = message["data"].split()
            assert int(port) == sentinels.replicas[0].port
            # The dead server comes back, as a replica of the new primary: the nodes
            # need one replica to confirm each change (REDIS_MIN_REPLICAS_ACK=1).
            sentinels.primary.args += ["--replicaof", host, port]
            sentinels.primary.start()

        await asyncio.wait_for(asyncio.gather(*(load(node) for node in nodes), chaos()), 60)
        failover_s = max(back_at.values()) - killed_at
        assert failover_s < 15, failover_s
        assert refused and set(refused) == {"storage_unavailable"}, refused

        wanted = set(acknowledged)
        heard = [collections.Counter() for _ in streams]
        async with asyncio.timeout(30):
            for stream, counts in zip(streams, heard, strict=True):
                while not wanted <= counts.keys():
                    name, job = await stream.next()
                    if name == RESOLVED:
                        counts[job["id"]] += 1
        # The restarted server may still be catching up as a replica: until it confirms
        # within REDIS_TIMEOUT, a change is refused (503), as it should be.
        async with asyncio.timeout(30):
            while True:
                async with http.post(f"{nodes[0].url}/jobs") as response:
                    body = await response.json()
                if response.status == 201:
                    marker = body["id"]
                    break
                assert body["error"]["code"] == "storage_unavailable", body
                await asyncio.sleep(0.1)
        for stream, counts in zip(streams, heard, strict=True):
            await quiet_until(stream, marker, counts)
            assert {job_id: counts[job_id] for job_id in wanted} == dict.fromkeys(wanted, 1), \
                "every client hears each acknowledged job resolve, once"

        listings = [await listing(http, node) for node in nodes]
        assert listings[0] == listings[1] == listings[2], "one registry on every node"
        jobs = {job["id"]: job for job in listings[0][0]}
        assert wanted <= jobs.keys(), f"{len(wanted - jobs.keys())} acknowledged jobs lost"
        assert all(jobs[job_id]["status"] == "resolved" for job_id in wanted)
        for node, pid in zip(nodes, pids, strict=True):
            assert node.process.returncode is None and node.process.pid == pid
            assert (await health(http, node))["storage"] == "ok"

        # At the source: the new primary holds every acknowledged job, resolved once.
        primary = redis.asyncio.Redis(port=sentinels.replicas[0].port, decode_responses=True)
        try:
            stored = await primary.hgetall("jobservice:jobs")
            entries = await primary.xrange("jobservice:events")
        finally:
            await primary.aclose()
        assert wanted <= stored.keys()
        resolutions = collections.Counter(json.loads(fields["r"])["id"] for _, fields in entries
                                          if '"status":"resolved"' in fields["r"])
        assert set(resolutions.values()) == {1}
        await switched.aclose()
        await sentinel.aclose()
    finally:
        for node in nodes:
            if node.process and node.process.returncode is None:
                node.process.kill()
                await node.process.wait()


async def test_a_change_no_replica_confirms_is_refused_and_appears_once_one_does(
        tmp_path, watch, http):
    """REDIS_MIN_REPLICAS_ACK=1 and the only replica stopped (SIGSTOP): a POST gets 503
    within about REDIS_TIMEOUT, and no client hears of the job. The script did store it,
    so once the replica answers again it appears, on every node, and resolves, as a job
    whose 201 was lost would."""
    group = Sentinels(tmp_path / "redis", replicas=1, sentinels=0).start()
    # The default: a healthy replica's WAIT took over 0.5 s once on a busy box.
    timeout = 2.0
    env = {"REDIS_URL": group.primary.url, "REDIS_MIN_REPLICAS_ACK": "1",
           "REDIS_TIMEOUT": str(timeout)}
    nodes = [ServiceProcess(tmp_path / f"node{n}.json", env) for n in range(2)]
    try:
        await asyncio.gather(*(node.start() for node in nodes))
        a, b = nodes
        streams = [await watch(node) for node in nodes]
        stream = streams[1]
        first = await post(http, a)
        for each in streams:
            await each.resolutions([first])

        replica = group.replicas[0].process
        replica.send_signal(signal.SIGSTOP)
        try:
            started = time.monotonic()
            async with http.post(f"{a.url}/jobs") as response:
                body = await response.json()
            assert response.status == 503, body
            assert "replicas confirmed" in body["error"]["message"]
            assert time.monotonic() - started < 3 * timeout + 1
            assert [job["id"] for job in (await listing(http, b))[0]] == [first]
        finally:
            replica.send_signal(signal.SIGCONT)
        _, job = await stream.until(lambda name, job: name == CREATED)
        assert job["id"] != first and job["status"] == "pending"
        for each in streams:
            await each.resolutions([job["id"]])
        for node in nodes:
            assert [item["id"] for item in (await listing(http, node))[0]] == [first, job["id"]]
        assert (await health(http, a))["storage"] == "ok"
    finally:
        for node in nodes:
            if node.process and node.process.returncode is None:
                node.process.kill()
                await node.process.wait()
        group.stop()


def test_sentinel_settings_are_checked():
    def error(env: dict) -> str:
        with pytest.raises(jobservice.ConfigError) as caught:
            jobservice.load_settings([], env)
        return str(caught.value)

    assert "REDIS_SENTINELS" in error({"REDIS_SENTINELS": "localhost",
                                       "REDIS_SENTINEL_MASTER": "jobs"})
    assert "go together" in error({"REDIS_SENTINELS": "10.0.0.5:26379"})
    assert "set one of them" in error({"REDIS_SENTINELS": "10.0.0.5:26379",
                                       "REDIS_SENTINEL_MASTER": "jobs",
                                       "REDIS_URL": "redis://10.0.0.6/0"})
    assert "REDIS_MIN_REPLICAS_ACK" in error({"REDIS_MIN_REPLICAS_ACK": "one"})
    settings = jobservice.load_settings([], {"REDIS_SENTINELS": "10.0.0.5:26379,[::1]:26380",
                                             "REDIS_SENTINEL_MASTER": "jobs"})
    assert settings.redis and settings.redis_sentinels == (("10.0.0.5", 26379),
                                                           ("::1", 26380))
