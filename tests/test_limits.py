"""Floods against a real service process, and the bounds that hold under them: the log
(a kind of line is written once an interval, with a count of what was left out, and a
client's fault is never a traceback) and the descriptors (RLIMIT_NOFILE raised at start,
MAX_CONNECTIONS below it, a connection past it closed at once, the journal always
writable, and the service back to normal by itself when the flood ends).
"""

from __future__ import annotations

import gzip
import re
import signal

from test_abuse import STATUS_LINE, exchange, request

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
        ("HTTP/9.9", b"GET /healthz HTTP/9.9\r\nHost: test\r\n\r\n"),
        ("space in a header name", b"GET /healthz HTTP/1.1\r\nHost: t\r\nBad Name: v\r\n\r\n"),
        ("Content-Length: abc", b"POST /jobs HTTP/1.1\r\nHost: t\r\nContent-Length: abc\r\n\r\n"),
        ("a 100 KB URL", b"GET /jobs/" + b"a" * 100_000 + b" HTTP/1.1\r\nHost: t\r\n\r\n"),
        ("chunk size garbage", b"POST /jobs HTTP/1.1\r\nHost: t\r\nTransfer-Encoding: chunked"
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
