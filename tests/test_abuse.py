"""Raw abuse against a real service process, over raw sockets: malformed and oversized
requests, lying bodies, hostile JSON, a thousand WebSockets opened and dropped, bad
WebSocket frames and Socket.IO packets. After each round the process must be alive,
answer `/healthz`, accept jobs, still have every job it acknowledged (across a restart
too), and must not have grown its memory or kept sockets open.

Requests that are not valid HTTP never reach the service: aiohttp's parser refuses them
with a plain-text 400 (or 413/431) and closes the connection. That is accepted here;
a 5xx, a hang, a crash or a lost job is not.
"""

from __future__ import annotations

import asyncio
import base64
import gzip
import json
import os
import random
import re
import signal
import struct
import zlib
from urllib.parse import urlsplit

import aiohttp
from conftest import free_port

PARSER_REFUSALS = {400, 413, 431}
INTERNAL_ERROR = re.compile(r" ERROR \S+ \S+ failed$")
STATUS_LINE = re.compile(rb"^HTTP/1\.[01] (\d{3}) ", re.MULTILINE)


# --- Raw HTTP ---------------------------------------------------------------------------


def address(url: str) -> tuple[str, int]:
    parts = urlsplit(url)
    return parts.hostname, parts.port


def first_response(reply: bytes) -> tuple[int, dict[str, str], bytes] | None:
    """The first complete response in reply (status, headers, body), or None."""
    head, sep, rest = reply.partition(b"\r\n\r\n")
    if not sep:
        return None
    lines = head.decode("latin-1").split("\r\n")
    match = STATUS_LINE.match(lines[0].encode("latin-1") + b" ")
    if not match:
        return None
    headers = {}
    for line in lines[1:]:
        name, _, value = line.partition(":")
        headers[name.strip().lower()] = value.strip()
    length = int(headers.get("content-length", len(rest)))
    if len(rest) < length:
        return None
    return int(match.group(1)), headers, rest[:length]


async def exchange(url: str, data: bytes, *, timeout: float = 5.0, to_eof: bool = False,
                   half_close: bool = False) -> bytes:
    """Send raw bytes; what came back by EOF, timeout or (unless to_eof) a full response."""
    reader, writer = await asyncio.open_connection(*address(url))
    received = b""
    try:
        writer.write(data)
        await writer.drain()
        if half_close:
            writer.write_eof()
        async with asyncio.timeout(timeout):
            while chunk := await reader.read(65536):
                received += chunk
                if not to_eof and first_response(received) is not None:
                    break
    except (TimeoutError, ConnectionError):
        pass
    finally:
        writer.transport.abort()
    return received


def request(method: str, path: str, body: bytes = b"", headers: str = "") -> bytes:
    return (f"{method} {path} HTTP/1.1\r\nHost: localhost\r\nConnection: close\r\n{headers}"
            f"Content-Length: {len(body)}\r\n\r\n").encode() + body


def post_jobs(body: bytes, content_type: str = "application/json") -> bytes:
    return request("POST", "/jobs", body, f"Content-Type: {content_type}\r\n")


def chunked(path: str, chunks: list[bytes], tail: bytes = b"0\r\n\r\n") -> bytes:
    body = b"".join(b"%x\r\n%s\r\n" % (len(chunk), chunk) for chunk in chunks) + tail
    return (f"POST {path} HTTP/1.1\r\nHost: localhost\r\nConnection: close\r\n"
            "Transfer-Encoding: chunked\r\n\r\n").encode() + body


# --- The service's state ---------------------------------------------------------------


def rss_bytes(pid: int) -> int:
    with open(f"/proc/{pid}/status") as status:
        for line in status:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) * 1024
    raise AssertionError("no VmRSS")


def open_fds(pid: int) -> int:
    return len(os.listdir(f"/proc/{pid}/fd"))


async def eventually(what: str, predicate, timeout: float = 15.0):
    """Poll another process's state (it has no event to wait on) until predicate holds."""
    try:
        async with asyncio.timeout(timeout):
            while not (value := await predicate()):  # noqa: ASYNC110
                await asyncio.sleep(0.02)
    except TimeoutError:
        raise AssertionError(f"timed out waiting until {what}") from None
    return value


async def create_jobs(http: aiohttp.ClientSession, url: str, count: int) -> list[str]:
    ids = []
    for _ in range(count):
        async with http.post(f"{url}/jobs") as response:
            assert response.status == 201, await response.text()
            ids.append((await response.json())["id"])
    return ids


async def listing(http: aiohttp.ClientSession, url: str) -> dict[str, dict]:
    async with http.get(f"{url}/jobs") as response:
        assert response.status == 200
        return {job["id"]: job for job in await response.json()}


async def assert_survived(service, service_process, acked: list[str]) -> None:
    """Alive and healthy, takes a job, has every acknowledged job, all of which resolve;
    a clean restart on the same file keeps them all."""
    assert service.process.returncode is None, "\n".join(service.log)
    async with aiohttp.ClientSession() as http:
        async with http.get(f"{service.url}/healthz") as response:
            assert response.status == 200
            assert (await response.json())["status"] == "ok"
        acked = acked + await create_jobs(http, service.url, 1)

        async def all_resolved():
            jobs = await listing(http, service.url)
            missing = set(acked) - set(jobs)
            assert not missing, f"acknowledged jobs lost: {missing}"
            return all(jobs[job_id]["status"] == "resolved" for job_id in acked) and jobs

        before = await eventually("every acknowledged job resolved", all_resolved)
    internal = [line for line in service.log if INTERNAL_ERROR.search(line)]
    assert await service.stop(signal.SIGTERM) == 0, "\n".join(service.log)
    restarted = await service_process(path=service.jobs_file)
    async with aiohttp.ClientSession() as http:
        after = await listing(http, restarted.url)
    assert {job_id: after.get(job_id) for job_id in acked} == \
        {job_id: before[job_id] for job_id in acked}
    assert internal == [], "internal errors logged:\n" + "\n".join(internal)


# --- HTTP -------------------------------------------------------------------------------

rng = random.Random(5)
NESTED_ARRAYS = b"[" * 30_000 + b"]" * 30_000  # 60,000 bytes: under the 64 KiB limit
NESTED_OBJECTS = b'{"a":' * 10_000 + b"1" + b"}" * 10_000

# (name, raw request, expectation): a set of statuses the HTTP parser may answer, or
# (status, error code) for what the service must answer with a JSON error.
ABUSE = [
    ("garbage request line", b"GARBAGE\r\n\r\n", PARSER_REFUSALS),
    ("NUL bytes", b"\x00" * 64 + b"\r\n\r\n", PARSER_REFUSALS),
    ("binary noise", bytes(rng.randrange(256) for _ in range(4096)), PARSER_REFUSALS),
    ("TLS hello on the HTTP port", bytes.fromhex("16030100a5010000a10303") + b"\x00" * 160,
     PARSER_REFUSALS),
    ("HTTP/9.9", b"GET /healthz HTTP/9.9\r\nHost: localhost\r\n\r\n", PARSER_REFUSALS),
    ("100 KB URL", b"GET /jobs/" + b"a" * 100_000 + b" HTTP/1.1\r\nHost: localhost\r\n\r\n",
     PARSER_REFUSALS),
    ("10 KB method", b"A" * 10_000 + b" / HTTP/1.1\r\nHost: localhost\r\n\r\n", PARSER_REFUSALS),
    ("64 KiB header value",
     b"GET /healthz HTTP/1.1\r\nHost: localhost\r\nX-Big: " + b"a" * 65_536 + b"\r\n\r\n",
     PARSER_REFUSALS),
    ("1,000 headers", b"GET /healthz HTTP/1.1\r\nHost: localhost\r\n"
     + b"".join(b"X-%d: v\r\n" % n for n in range(1000)) + b"\r\n", PARSER_REFUSALS),
    ("header without a colon", b"GET /healthz HTTP/1.1\r\nHost: localhost\r\nNoColon\r\n\r\n",
     PARSER_REFUSALS),
    ("space in a header name", b"GET /healthz HTTP/1.1\r\nHost: localhost\r\nBad Name: v\r\n\r\n",
     PARSER_REFUSALS),
    ("folded header", b"GET /healthz HTTP/1.1\r\nHost: localhost\r\nX: a\r\n  b\r\n\r\n",
     PARSER_REFUSALS),
    ("no Host", b"GET /healthz HTTP/1.1\r\n\r\n", PARSER_REFUSALS),
    ("Content-Length: abc", b"POST /jobs HTTP/1.1\r\nHost: localhost\r\n"
                            b"Content-Length: abc\r\n\r\n",
     PARSER_REFUSALS),
    ("Content-Length: -5", b"POST /jobs HTTP/1.1\r\nHost: localhost\r\nContent-Length: -5\r\n\r\n",
     PARSER_REFUSALS),
    ("Content-Length overflow",
     b"POST /jobs HTTP/1.1\r\nHost: localhost\r\nContent-Length: 99999999999999999999999\r\n\r\n",
     PARSER_REFUSALS),
    ("two Content-Lengths",
     b"POST /jobs HTTP/1.1\r\nHost: localhost\r\nContent-Length: 2\r\nContent-Length: 3\r\n\r\n{}",
     PARSER_REFUSALS),
    ("Content-Length with chunked",
     b"POST /jobs HTTP/1.1\r\nHost: localhost\r\nContent-Length: 5\r\n"
     b"Transfer-Encoding: chunked\r\n\r\n0\r\n\r\n", PARSER_REFUSALS),
    ("chunk size garbage", b"POST /jobs HTTP/1.1\r\nHost: localhost\r\n"
                           b"Transfer-Encoding: chunked\r\n"
     b"\r\nZZZ\r\nabc\r\n0\r\n\r\n", PARSER_REFUSALS),
    ("chunk without its CRLF", b"POST /jobs HTTP/1.1\r\nHost: localhost\r\n"
                               b"Transfer-Encoding: chunked"
     b"\r\n\r\n2\r\n{}XX0\r\n\r\n", PARSER_REFUSALS),
    ("invalid UTF-8 in JSON", post_jobs(b'{"name": "\xff\xfe\xc3\x28"}'), (400, "invalid_json")),
    ("not JSON", post_jobs(b"{not json"), (400, "invalid_json")),
    ("JSON but not an object", post_jobs(b"[1, 2, 3]"), (400, "invalid_body")),
    ("JSON null", post_jobs(b"null"), (400, "invalid_body")),
    ("deeply nested arrays", post_jobs(NESTED_ARRAYS), (400, "invalid_json")),
    ("deeply nested objects", post_jobs(NESTED_OBJECTS), (400, "invalid_json")),
    ("70 KB body", post_jobs(b'{"pad": "' + b"x" * 70_000 + b'"}'), (413, "payload_too_large")),
    ("Content-Length says 10 MB",
     b"POST /jobs HTTP/1.1\r\nHost: localhost\r\nContent-Length: 10000000\r\n\r\n{}",
     (413, "payload_too_large")),
    ("128 KiB chunked", chunked("/jobs", [b" " * 65_536, b" " * 65_536]),
     (413, "payload_too_large")),
    ("body on a retry of nothing", request("POST", "/jobs/%2e%2e/retry", b"x" * 1000),
     (404, "not_found")),
    ("unknown method", request("BREW", "/jobs"), PARSER_REFUSALS | {405}),
]


async def test_malformed_and_oversized_requests_are_refused_and_harm_nothing(service_process):
    service = await service_process()
    async with aiohttp.ClientSession() as http:
        acked = await create_jobs(http, service.url, 3)
    problems = []
    for name, raw, expected in ABUSE:
        reply = await exchange(service.url, raw)
        statuses = [int(code) for code in STATUS_LINE.findall(reply)]
        parsed = first_response(reply)
        if any(status >= 500 for status in statuses):
            problems.append(f"{name}: {reply[:300]!r}")
        elif isinstance(expected, set):
            if not statuses or statuses[0] not in expected:
                problems.append(f"{name}: expected one of {sorted(expected)}, got {reply[:200]!r}")
        else:
            status, code = expected
            if parsed is None or parsed[0] != status \
                    or not parsed[1].get("content-type", "").startswith("application/json") \
                    or json.loads(parsed[2])["error"]["code"] != code:
                problems.append(f"{name}: expected {status} {code}, got {reply[:300]!r}")
    assert problems == [], "\n".join(problems)

    # A body shorter than its Content-Length, then pipelined garbage: the garbage is
    # refused; the job before it is either created (and then kept) or not acknowledged.
    reply = await exchange(service.url, b"POST /jobs HTTP/1.1\r\nHost: localhost\r\n"
                                        b"Content-Length: 2"
                           b"\r\n\r\n{}GARBAGE / HTTP/1.1\r\n\r\n", to_eof=True)
    statuses = [int(code) for code in STATUS_LINE.findall(reply)]
    assert statuses and set(statuses) <= {201, 400}, reply
    acked += [match.decode() for match in re.findall(rb'"id": "([0-9a-f-]{36})"', reply)]
    await assert_survived(service, service_process, acked)


async def test_a_client_that_hangs_up_mid_body_is_not_a_server_failure(service_process):
    """A body that lies about its length, or chunks cut short, then the client goes away:
    nothing to answer, nothing stored, and nothing for the log's ERROR lines."""
    service = await service_process()
    await exchange(service.url, b"POST /jobs HTTP/1.1\r\nHost: localhost\r\nContent-Length: 100\r\n"
                   b"\r\n" + b'{"a": 1}', half_close=True, timeout=2.0)
    await exchange(service.url, b"POST /jobs HTTP/1.1\r\nHost: localhost\r\n"
                                b"Transfer-Encoding: chunked"
                   b"\r\n\r\n10\r\n{\"a\"", half_close=True, timeout=2.0)
    await exchange(service.url, b"POST /jobs HTTP/1.1\r\nHost: localhost\r\nContent-Length: 100\r\n"
                   b"\r\n" + b'{"a": 1}', timeout=0.3)  # no half-close: just gone
    async with aiohttp.ClientSession() as http:
        assert await listing(http, service.url) == {}
    await asyncio.sleep(0.5)  # the handlers see the hang-ups within milliseconds
    await assert_survived(service, service_process, [])


# --- Coded bodies ------------------------------------------------------------------------


def coded_bodies(plain: bytes) -> tuple[list, list]:
    """(bad, good): (what, Content-Encoding, body[, status, error code]) for bodies coded
    wrongly, in codings not decoded, or too big once decoded; and for `plain`, well coded."""
    bomb = gzip.compress(b"\0" * 50_000_000, 9)  # 49 KB, under the 64 KiB limit as sent
    assert len(bomb) < 64 * 1024
    bad = [("not gzip at all", "gzip", b"notgzip", 400, "invalid_content_encoding"),
           ("gzip cut short", "gzip", gzip.compress(plain)[:-6], 400,
            "invalid_content_encoding"),
           ("gzip with junk after it", "gzip", gzip.compress(plain) + b"junk", 400,
            "invalid_content_encoding"),
           ("deflate that is gzip", "deflate", gzip.compress(plain), 400,
            "invalid_content_encoding"),
           ("a coding never heard of", "foo", plain, 415, "unsupported_content_encoding"),
           ("brotli, not decoded here", "br", plain, 415, "unsupported_content_encoding"),
           ("two codings", "gzip, gzip", gzip.compress(gzip.compress(plain)), 415,
            "unsupported_content_encoding"),
           ("a gzip bomb: 49 KB that decode to 50 MB", "gzip", bomb, 413,
            "payload_too_large")]
    good = [("gzip", "gzip", gzip.compress(plain)), ("x-gzip", "x-gzip", gzip.compress(plain)),
            ("deflate", "deflate", zlib.compress(plain)), ("identity", "identity", plain)]
    return bad, good


async def test_coded_bodies_are_decoded_or_refused_on_every_route(service_process):
    """Every route that reads a body decodes gzip and deflate, answers a body that does not
    decode with 400, a coding it does not decode with 415, and a bomb with 413 (the limit
    holds for the decoded size); Engine.IO in its own error form. Nothing is logged."""
    # No Unsplash there and no reuse: each job fails at its first attempt, for /retry.
    dead = free_port()
    service = await service_process({"UNSPLASH_ACCESS_KEY": "key", "JOB_MAX_ATTEMPTS": "1",
                                     "PHOTO_REUSE": "never",
                                     "UNSPLASH_API_URL": f"http://127.0.0.1:{dead}"})
    url, problems = service.url, []
    async with aiohttp.ClientSession() as http:
        failed = await create_jobs(http, url, 4)

        async def all_failed():
            jobs = await listing(http, url)
            return all(jobs[job_id]["status"] == "failed" for job_id in failed)

        await eventually("the jobs failed", all_failed)
        logged = len(service.log)  # from here on, only the bodies

        async def polling_session() -> str:
            async with http.get(f"{url}/socket.io/?EIO=4&transport=polling") as response:
                return json.loads((await response.text())[1:])["sid"]

        async def send(route: str, coding: str, body: bytes):
            target = route
            if route == "/socket.io/":
                target = f"/socket.io/?EIO=4&transport=polling&sid={await polling_session()}"
            async with http.post(f"{url}{target}", data=body,
                                 headers={"Content-Encoding": coding,
                                          "Content-Type": "application/json"}) as response:
                return response.status, response.content_type, await response.read()

        # A bad body leaves a failed job as it is; each good retry takes one of its own.
        for route, plain, success in [("/jobs", b'{"note": "lunch"}', 201),
                                      ("/session", b'{"token": ""}', 200),
                                      ("/socket.io/", b"40", 200),
                                      ("/jobs/{id}/retry", b"{}", 202)]:
            bad, good = coded_bodies(plain)
            for what, coding, body, status, code in bad:
                got, content_type, reply = await send(route.format(id=failed[0]), coding, body)
                error = json.loads(reply) if content_type == "application/json" else None
                if route == "/socket.io/":  # Engine.IO's own form: {"code", "message"}
                    wanted = error is not None and error.get("code") == 3 and error["message"]
                else:
                    wanted = error is not None and error["error"]["code"] == code
                if got != status or not wanted:
                    problems.append(f"{route}, {what}: expected {status} {code}, got {got} "
                                    f"{reply[:200]!r}")
            for job_id, (what, coding, body) in zip(failed, good, strict=True):
                got, _, reply = await send(route.format(id=job_id), coding, body)
                if got != success or (route == "/socket.io/" and reply != b"ok"):
                    problems.append(f"{route}, {what}: expected {success}, got {got} "
                                    f"{reply[:200]!r}")
        async with http.get(f"{url}/healthz") as response:
            assert response.status == 200
    assert problems == [], "\n".join(problems)
    assert service.log[logged:] == [], "\n".join(service.log[logged:])


# --- WebSockets -------------------------------------------------------------------------


def frame(opcode: int, payload: bytes, *, fin: bool = True, mask: bool = True, rsv: int = 0,
          length: int | None = None) -> bytes:
    """One WebSocket frame as a client sends it (masked unless told otherwise)."""
    size = len(payload) if length is None else length
    first = (0x80 if fin else 0) | rsv | opcode
    bit = 0x80 if mask else 0
    if size < 126:
        head = bytes([first, bit | size])
    elif size < 65_536:
        head = bytes([first, bit | 126]) + struct.pack(">H", size)
    else:
        head = bytes([first, bit | 127]) + struct.pack(">Q", size)
    if not mask:
        return head + payload
    key = os.urandom(4)
    return head + key + bytes(byte ^ key[i % 4] for i, byte in enumerate(payload))


async def ws_handshake(url: str, path: str = "/ws"):
    reader, writer = await asyncio.open_connection(*address(url))
    key = base64.b64encode(os.urandom(16)).decode()
    writer.write(f"GET {path} HTTP/1.1\r\nHost: localhost\r\nUpgrade: websocket\r\n"
                 f"Connection: Upgrade\r\nSec-WebSocket-Key: {key}\r\n"
                 "Sec-WebSocket-Version: 13\r\n\r\n".encode())
    head = await reader.readuntil(b"\r\n\r\n")
    assert head.startswith(b"HTTP/1.1 101 "), head
    return reader, writer


async def close_code(reader: asyncio.StreamReader, timeout: float = 5.0) -> int | str:
    """Read frames until the server's close frame: its code, or what happened instead."""
    try:
        async with asyncio.timeout(timeout):
            while True:
                head = await reader.readexactly(2)
                size = head[1] & 0x7F
                if size == 126:
                    size = struct.unpack(">H", await reader.readexactly(2))[0]
                elif size == 127:
                    size = struct.unpack(">Q", await reader.readexactly(8))[0]
                payload = await reader.readexactly(size)
                if head[0] & 0x0F == 0x8:
                    return struct.unpack(">H", payload[:2])[0] if len(payload) >= 2 else 1005
    except TimeoutError:
        return "no close frame (still open)"
    except (asyncio.IncompleteReadError, ConnectionError) as exc:
        return f"dropped without a close frame ({type(exc).__name__})"


async def one_socket(url: str, kind: int) -> None:
    if kind == 0:  # a clean close
        reader, writer = await ws_handshake(url, "/ws?since=0")
        writer.write(frame(0x8, struct.pack(">H", 1000)))
        await close_code(reader)
        writer.close()
    elif kind == 1:  # open, then the TCP connection simply vanishes
        _, writer = await ws_handshake(url)
        writer.transport.abort()
    elif kind == 2:  # half a handshake, then gone
        _, writer = await asyncio.open_connection(*address(url))
        writer.write(b"GET /ws HTTP/1.1\r\nHost: localhost\r\nUpgrade: websocket\r\n")
        await writer.drain()
        writer.transport.abort()
    else:  # Socket.IO: open packet received, never a CONNECT
        reader, writer = await ws_handshake(url, "/socket.io/?EIO=4&transport=websocket")
        await reader.readexactly(2)
        writer.transport.abort()


async def test_a_thousand_websockets_opened_and_dropped_leak_nothing(service_process):
    service = await service_process()
    pid = service.process.pid
    async with aiohttp.ClientSession() as http:
        acked = await create_jobs(http, service.url, 5)
    # Warm up first, so what is measured is growth, not the first allocations.
    await asyncio.gather(*(one_socket(service.url, n % 4) for n in range(100)))
    await asyncio.sleep(0.3)
    fds, rss = open_fds(pid), rss_bytes(pid)

    for batch in range(10):
        await asyncio.gather(*(one_socket(service.url, (batch + n) % 4) for n in range(100)))

    async def settled():
        return open_fds(pid) <= fds + 5

    await eventually("the 1,000 dropped sockets are closed", settled, timeout=10.0)
    grown = rss_bytes(pid) - rss
    assert grown < 50 * 1024 * 1024, f"RSS grew by {grown / 1e6:.1f} MB"

    # Live events still reach a new client.
    async with aiohttp.ClientSession() as http:
        async with http.ws_connect(f"{service.url}/ws") as ws:
            [job_id] = await create_jobs(http, service.url, 1)
            name, job = json.loads((await ws.receive(timeout=5)).data)
            assert (name, job["id"]) == ("ON_CREATED_JOB", job_id)
    await assert_survived(service, service_process, [*acked, job_id])


BAD_FRAMES = [
    ("binary frame", frame(0x2, b"\x00\x01binary"), {1003}),
    ("70 KB text message", frame(0x1, b"x" * 70_000), {1009}),
    ("a 1 TB length, no payload", frame(0x1, b"", length=2**40), {1009}),
    ("64 KiB + 1 in fragments", frame(0x1, b"x" * 40_000, fin=False)
     + frame(0x0, b"y" * 25_537), {1009}),
    ("invalid UTF-8 text", frame(0x1, b"\xff\xfe\xfd"), {1007}),
    ("reserved bits set", frame(0x1, b"hi", rsv=0x40), {1002}),
    ("unknown opcode", frame(0x3, b"hi"), {1002}),
    ("continuation with nothing to continue", frame(0x0, b"hi"), {1002}),
    ("ping over 125 bytes", frame(0x9, b"p" * 200), {1002}),
]


async def test_bad_frames_on_ws_close_with_the_right_code(service_process):
    service = await service_process()
    async with aiohttp.ClientSession() as http:
        acked = await create_jobs(http, service.url, 2)
    problems = []
    for name, data, codes in BAD_FRAMES:
        reader, writer = await ws_handshake(service.url)
        writer.write(data)
        code = await close_code(reader)
        if code not in codes:
            problems.append(f"{name}: expected {sorted(codes)}, got {code}")
        writer.transport.abort()
    assert problems == [], "\n".join(problems)

    # An unmasked client frame breaks RFC 6455; aiohttp lets it pass. Either way the
    # socket must not take the service down.
    reader, writer = await ws_handshake(service.url)
    writer.write(frame(0x1, b"unmasked", mask=False))
    assert await close_code(reader, timeout=0.5) in (1002, "no close frame (still open)")
    writer.transport.abort()
    await assert_survived(service, service_process, acked)


async def sio_connect(http: aiohttp.ClientSession, url: str):
    ws = await http.ws_connect(f"{url}/socket.io/?EIO=4&transport=websocket")
    opened = await ws.receive(timeout=5)
    assert opened.type == aiohttp.WSMsgType.TEXT and opened.data.startswith("0{"), opened
    return ws


async def sio_close_code(ws) -> int | str:
    """The code of the server's close frame. Not ws.close_code: when the server has closed
    the connection too, the client's own close reply fails and sets that to 1006."""
    async with asyncio.timeout(5):
        while True:
            message = await ws.receive()
            if message.type == aiohttp.WSMsgType.CLOSE:
                return message.data
            if message.type == aiohttp.WSMsgType.CLOSED:
                return f"closed without a close frame ({ws.close_code})"
            if message.type == aiohttp.WSMsgType.ERROR:
                return f"protocol error: {message.data!r}"


async def test_socketio_abuse_is_refused_per_packet(service_process):
    service = await service_process()
    problems = []
    async with aiohttp.ClientSession() as http:
        acked = await create_jobs(http, service.url, 2)
        for name, packets, code in [
            ("unknown packet type", ["40", "7"], 1002),
            ("unknown packet with payload", ["40", "9" + "x" * 1000], 1002),
            ("binary packet", ["40", b"\x04binary"], 1003),
            ("1 MB message", ["40", "42" + json.dumps(["x", "y" * 1_000_000])], 1009),
            ("garbage instead of CONNECT", ["hello"], 1002),
            ("CONNECT with broken JSON", ["40{"], 1002),
        ]:
            ws = await sio_connect(http, service.url)
            for number, packet in enumerate(packets, 1):
                try:
                    if isinstance(packet, bytes):
                        await ws.send_bytes(packet)
                    else:
                        await ws.send_str(packet)
                except ConnectionError:
                    # The server may refuse a frame from its header and close before the
                    # client has sent all of it (1 MB): that send fails, and the close
                    # frame sent before it is still there to read.
                    if number != len(packets):
                        raise
            got = await sio_close_code(ws)
            if got != code:
                problems.append(f"{name}: expected {code}, got {got}")
            await ws.close()

        # A recovery offset that str.isdigit() accepts and int() does not: a fresh session.
        for offset in ("\u00b2", "\uff11" * 3, "1" * 19, "-1"):
            ws = await sio_connect(http, service.url)
            await ws.send_str("40" + json.dumps({"pid": "p" * 20, "offset": offset}))
            replies = []
            async with asyncio.timeout(5):
                while not any(reply.startswith("40{") for reply in replies):
                    message = await ws.receive()
                    if message.type != aiohttp.WSMsgType.TEXT:
                        problems.append(f"offset {offset!r}: {message.type.name} "
                                        f"{message.data!r} instead of a CONNECT reply")
                        break
                    replies.append(message.data)
            await ws.close()
    assert problems == [], "\n".join(problems)
    await assert_survived(service, service_process, acked)
