"""Floods against a real service process, and the bounds that hold under them: the log
(a kind of line is written once an interval, with a count of what was left out, and a
client's fault is never a traceback) and the descriptors (RLIMIT_NOFILE raised at start,
MAX_CONNECTIONS below it, a connection past it closed at once, the journal always
writable, and the service back to normal by itself when the flood ends).
"""

from __future__ import annotations

import asyncio
import gzip
import re
import shutil
import signal
import sys
from collections import Counter

import aiohttp
import pytest
from conftest import ROOT
from test_abuse import STATUS_LINE, address, eventually, exchange, request

# The service's own lines around a run: they are not what a flood wrote.
OWN_LINES = re.compile(r"listening on http://|no UNSPLASH_ACCESS_KEY|shutting down")


def written_by_the_flood(log: list[str]) -> list[str]:
    return [line for line in log if not OWN_LINES.search(line)]


def bad_requests() -> list[tuple[str, bytes]]:
    """(what, raw request) of every kind a client gets wrong: each must get a 4xx."""
    coded = "Content-Type: application/json\r\nContent-Encoding: {}\r\n"
    return [
        ("a gzip body that is not gzip",  # the curl, 500 and two tracebacks before
         request("POST", "/jobs", b"notgzip", coded.format("gzip"))),
        ("a coding not decoded", request("POST", "/jobs", b"{}", coded.format("br"))),
        ("a gzip bomb", request("POST", "/jobs", gzip.compress(b"\0" * 10_000_000, 9),
                                coded.format("gzip"))),
        ("a session body that is not deflate",
         request("POST", "/session", b"{}", coded.format("deflate"))),
        ("not JSON", request("POST", "/jobs", b"{oops", "Content-Type: application/json\r\n")),
        ("HTTP/9.9", b"GET /healthz HTTP/9.9\r\nHost: localhost\r\n\r\n"),
        ("space in a header name", b"GET /healthz HTTP/1.1\r\nHost: localhost\r\n"
                                   b"Bad Name: v\r\n\r\n"),
        ("Content-Length: abc", b"POST /jobs HTTP/1.1\r\nHost: localhost\r\n"
                                b"Content-Length: abc\r\n\r\n"),
        ("a 100 KB URL", b"GET /jobs/" + b"a" * 100_000 + b" HTTP/1.1\r\nHost: localhost\r\n\r\n"),
        ("chunk size garbage", b"POST /jobs HTTP/1.1\r\nHost: localhost\r\n"
                               b"Transfer-Encoding: chunked"
         b"\r\n\r\nZZZ\r\nabc\r\n0\r\n\r\n"),
    ]


async def test_two_hundred_bad_requests_write_a_few_lines_and_no_traceback(service_process):
    service = await service_process()
    kinds = bad_requests()
    problems = []
    for number in range(200):
        what, raw = kinds[number % len(kinds)]
        statuses = [int(code) for code in STATUS_LINE.findall(await exchange(service.url, raw))]
        if not statuses or not 400 <= statuses[0] < 500:
            problems.append(f"{what}: {statuses}")
    assert problems == [], "\n".join(problems)
    assert await service.stop(signal.SIGTERM) == 0
    written = written_by_the_flood(service.log)
    assert len(written) <= 20, "\n".join(written)
    assert not any("Traceback" in line for line in service.log), "\n".join(service.log)
    # What was left out is counted, in the line that closes its interval (here, at exit).
    left_out = sum(int(match.group(1)) for line in written
                   if (match := re.search(r" (\d+) more like this in the last ", line)))
    assert left_out >= 50, "\n".join(written)


# --- Descriptors -----------------------------------------------------------------------


def under_limit(soft: int, hard: int) -> list[str]:
    """The service's command, run with RLIMIT_NOFILE set to soft:hard (util-linux prlimit)."""
    prlimit = shutil.which("prlimit")
    if prlimit is None:
        pytest.fail("these tests need prlimit on PATH (util-linux)", pytrace=False)
    return [prlimit, f"--nofile={soft}:{hard}", sys.executable, str(ROOT / "jobservice.py")]


def open_files_limits(pid: int) -> tuple[int, int]:
    """(soft, hard) RLIMIT_NOFILE of a process, as /proc shows them."""
    with open(f"/proc/{pid}/limits") as limits:
        [line] = [line for line in limits if line.startswith("Max open files")]
    return int(line.split()[3]), int(line.split()[4])


def start_line(service) -> str:
    return next(line for line in service.log if "listening on http://" in line)


async def ask_and_hold(url: str, held: list, path: str = "/jobs", method: str = "POST") -> str:
    """One connection that asks once and stays open: the status it got, or "closed" if the
    service closed it unanswered, or "no answer"."""
    try:
        reader, writer = await asyncio.open_connection(*address(url))
    except OSError as exc:
        return f"cannot connect ({exc.__class__.__name__})"
    held.append(writer)
    writer.write(f"{method} {path} HTTP/1.1\r\nHost: localhost\r\nContent-Length: 0\r\n\r\n"
                 .encode())
    try:
        async with asyncio.timeout(5):
            head = await reader.readuntil(b"\r\n\r\n")
    except (asyncio.IncompleteReadError, ConnectionError):
        return "closed"
    except TimeoutError:
        return "no answer"
    return head.split()[1].decode()


async def metric(http: aiohttp.ClientSession, url: str, sample: str) -> float:
    async with http.get(f"{url}/metrics") as response:
        text = await response.text()
    for line in text.splitlines():
        if line.startswith(sample + " "):
            return float(line.split()[-1])
    return 0.0


REFUSED = 'jobservice_connections_refused_total{reason="max_connections"}'


async def test_a_flood_of_600_connections_at_256_descriptors_is_shut_out_and_passes(
        service_process):
    """Past MAX_CONNECTIONS (by default half of what 256 descriptors leave after 64 kept:
    96), a connection is closed at once and counted; the clients already connected carry
    on, a job is still written to the journal (fsynced), nothing else is logged but a line
    or two, and when the flood ends the service takes new connections by itself."""
    # One address is the whole flood here: its own cap (a quarter by default) is lifted.
    service = await service_process({"MAX_CONNECTIONS_PER_ADDRESS": "96"},
                                    command=under_limit(256, 256))
    assert "at most 96 connections (MAX_CONNECTIONS) of 256 open files" in start_line(service)
    url, held = service.url, []
    # Two clients connected before the flood: a keep-alive HTTP connection, and /ws.
    async with aiohttp.ClientSession(connector=aiohttp.TCPConnector(limit=1)) as http, \
            aiohttp.ClientSession() as watcher:
        async with http.get(f"{url}/healthz") as response:
            assert response.status == 200
            await response.read()  # read whole, the connection goes back to the pool
        ws = await watcher.ws_connect(f"{url}/ws")
        try:
            answers = Counter(await asyncio.gather(*(ask_and_hold(url, held)
                                                     for _ in range(600))))
            assert answers == {"201": 94, "closed": 506}, answers
            # Still full: a new connection is closed unanswered ...
            assert await ask_and_hold(url, held, "/healthz", "GET") == "closed"
            # ... and the established ones are served: a job is stored and announced.
            async with http.post(f"{url}/jobs") as response:
                assert response.status == 201, await response.text()
                job_id = (await response.json())["id"]
            async with asyncio.timeout(10):
                while True:
                    name, job = (await ws.receive_json())
                    if (name, job["id"]) == ("ON_CREATED_JOB", job_id):
                        break
            assert await metric(http, url, "jobservice_connections") == 96
            assert await metric(http, url, REFUSED) == 507
        finally:
            for writer in held:
                writer.transport.abort()
            await ws.close()

    async def served():
        return await ask_and_hold(url, [], "/healthz", "GET") == "200"

    await eventually("a new connection is served once the flood is over", served)
    async with aiohttp.ClientSession() as http:
        async with http.get(f"{url}/jobs/stats") as response:
            assert (await response.json())["total"] == 95  # every 201 is kept
    assert await service.stop(signal.SIGTERM) == 0
    written = written_by_the_flood(service.log)
    assert len(written) <= 50, "\n".join(written)
    assert not any("Traceback" in line or "cannot" in line for line in written), \
        "\n".join(written)


async def test_the_open_files_limit_is_raised_and_max_connections_holds(service_process):
    service = await service_process({"MAX_CONNECTIONS": "3", "MAX_CONNECTIONS_PER_ADDRESS": "3"},
                                    command=under_limit(256, 1024))
    assert open_files_limits(service.process.pid) == (1024, 1024)  # soft raised to hard
    assert "at most 3 connections (MAX_CONNECTIONS) of 1024 open files" in start_line(service)
    url, held = service.url, []
    try:
        assert [await ask_and_hold(url, held, "/healthz", "GET") for _ in range(4)] == \
            ["200", "200", "200", "closed"]
        held.pop(0).transport.abort()  # one leaves: room for one more

        async def served():
            return await ask_and_hold(url, held, "/healthz", "GET") == "200"

        await eventually("the place left is taken", served)
    finally:
        for writer in held:
            writer.transport.abort()
    assert await service.stop(signal.SIGTERM) == 0
