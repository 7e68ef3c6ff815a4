"""A stand-in for the Unsplash API on loopback: photos, errors, stalls, rate limits, 401s.

It plays the real API's quota too: a key may make `quota` calls per `window` seconds
(5,000 an hour, a production key, unless a test says otherwise), counted from the first
call of each window. Every answer says how many are left (X-Ratelimit-Limit and
X-Ratelimit-Remaining, no reset time, as Unsplash does), and a call past the quota is
refused with 403 "Rate Limit Exceeded".

The tests use it in-process (`FakeUnsplash().app()`) or as a process of its own
(`python tests/fake_unsplash.py --port N`), steered over HTTP with `POST /_control`.
It also serves small real PNG files, so a browser can load the photos it hands out.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import random
import struct
import time
import zlib
from collections import deque

from aiohttp import web

MODES = ("ok", "500", "stall", "hold", "badjson", "429", "403-rate", "401", "remaining0")


def png(width: int, height: int, rgb: tuple[int, int, int]) -> bytes:
    """A solid-colour PNG, built by hand so the tests need no imaging library."""

    def chunk(kind: bytes, data: bytes) -> bytes:
        return (struct.pack(">I", len(data)) + kind + data
                + struct.pack(">I", zlib.crc32(kind + data) & 0xFFFFFFFF))

    row = b"\x00" + bytes(rgb) * width
    return (b"\x89PNG\r\n\x1a\n"
            + chunk(b"IHDR", struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0))
            + chunk(b"IDAT", zlib.compress(row * height))
            + chunk(b"IEND", b""))


COLORS = [(0xE0, 0x7A, 0x5F), (0x3D, 0x40, 0x5B), (0x81, 0xB2, 0x9A), (0xF2, 0xCC, 0x8F)]


class FakeUnsplash:
    def __init__(self, key: str = "test-key"):
        self.key = key
        self.calls = 0
        self.photos_served = 0
        self.requests: list[dict] = []
        self.script: deque[str] = deque()  # modes for the next calls, then `mode`
        self.mode = "ok"
        self.chaos: dict[str, float] = {}  # mode -> probability, drawn per call
        self.stall_seconds = 30.0
        self.released = asyncio.Event()  # ends the calls that "hold" keeps waiting
        self.retry_after: str | None = "1"
        self.images = {f"{n}.png": png(64, 48, rgb) for n, rgb in enumerate(COLORS)}
        self.quota = 5000
        self.window = 3600.0
        # Oldest first: {"start" (monotonic), "calls", "at" (each call's offset in the
        # window), "refused"}.
        self.windows: list[dict] = []
        self._serial = 0

    def next_mode(self) -> str:
        if self.script:
            return self.script.popleft()
        roll = random.random()
        for mode, share in self.chaos.items():
            if roll < share:
                return mode
            roll -= share
        return self.mode

    def app(self) -> web.Application:
        app = web.Application()
        app.router.add_get("/photos/random", self.random_photos)
        app.router.add_get("/images/{name}", self.image)
        app.router.add_post("/_control", self.control)
        app.router.add_get("/_stats", self.stats)
        return app

    async def random_photos(self, request: web.Request) -> web.StreamResponse:
        self.calls += 1
        self.requests.append({"query": dict(request.query), "headers": dict(request.headers)})
        if request.headers.get("Authorization") != f"Client-ID {self.key}":
            return web.json_response({"errors": ["OAuth error: The access token is invalid"]},
                                     status=401)
        window = self.current_window()
        if window["calls"] >= self.quota:
            window["refused"] += 1
            return web.Response(status=403, text="Rate Limit Exceeded",
                                headers=self.quota_headers(0))
        window["calls"] += 1
        window["at"].append(time.monotonic() - window["start"])
        left = self.quota - window["calls"]
        mode = self.next_mode()
        if mode == "500":
            return web.json_response({"errors": ["Internal server error"]}, status=500)
        if mode == "stall":
            await asyncio.sleep(self.stall_seconds)
        if mode == "hold":  # until a test sets another mode, then answered as "ok"
            await self.released.wait()
        if mode == "badjson":
            return web.Response(text='[{"id": "broken", "urls": ', content_type="application/json")
        if mode == "429":
            return web.Response(status=429, text="Too Many Requests",
                                headers={"Retry-After": self.retry_after} if self.retry_after
                                else None)
        if mode == "403-rate":
            return web.Response(status=403, text="Rate Limit Exceeded",
                                headers={"X-Ratelimit-Remaining": "0"})
        if mode == "401":
            return web.json_response({"errors": ["OAuth error: The access token is invalid"]},
                                     status=401)
        count = min(int(request.query.get("count", "1")), 30)
        base = f"{request.scheme}://{request.host}"
        photos = [self.photo(base) for _ in range(count)]
        self.photos_served += count
        headers = self.quota_headers(0 if mode == "remaining0" else left)
        if mode == "remaining0" and self.retry_after:
            headers["Retry-After"] = self.retry_after
        return web.json_response(photos, headers=headers)

    def current_window(self) -> dict:
        now = time.monotonic()
        if not self.windows or now >= self.windows[-1]["start"] + self.window:
            self.windows.append({"start": now, "calls": 0, "at": [], "refused": 0})
        return self.windows[-1]

    def quota_headers(self, left: int) -> dict:
        return {"X-Ratelimit-Limit": str(self.quota), "X-Ratelimit-Remaining": str(left)}

    def photo(self, base: str) -> dict:
        self._serial += 1
        serial = self._serial
        image = f"{base}/images/{serial % len(COLORS)}.png"
        return {
            "id": f"fake{serial:06d}",
            "color": "#{:02x}{:02x}{:02x}".format(*COLORS[serial % len(COLORS)]),
            "description": f"Fake dish number {serial}",
            "alt_description": f"a plate of fake food {serial}",
            "urls": {
                "raw": image, "full": image,
                "regular": f"{image}?w=1080", "small": f"{image}?w=400",
                "thumb": f"{image}?w=200",
            },
            "links": {"html": f"https://unsplash.com/photos/fake{serial:06d}"},
            "user": {"name": f"Cook {serial}",
                     "links": {"html": f"https://unsplash.com/@cook{serial}"}},
        }

    async def image(self, request: web.Request) -> web.Response:
        body = self.images.get(request.match_info["name"])
        if body is None:
            raise web.HTTPNotFound()
        return web.Response(body=body, content_type="image/png")

    async def control(self, request: web.Request) -> web.Response:
        body = await request.json()
        self.mode = body.get("mode", self.mode)
        if self.mode == "hold":
            self.released.clear()
        else:
            self.released.set()
        self.chaos = body.get("chaos", self.chaos)
        self.script.extend(body.get("script", []))
        self.stall_seconds = body.get("stall_seconds", self.stall_seconds)
        self.quota = body.get("quota", self.quota)
        self.window = body.get("window", self.window)
        return await self.stats(request)

    async def stats(self, request: web.Request) -> web.Response:
        return web.json_response({"calls": self.calls, "photos": self.photos_served,
                                  "mode": self.mode, "windows": self.windows})


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, default=0)
    parser.add_argument("--key", default="test-key")
    args = parser.parse_args()

    async def serve() -> None:
        runner = web.AppRunner(FakeUnsplash(args.key).app(), access_log=None)
        await runner.setup()
        await web.TCPSite(runner, args.host, args.port).start()
        print(json.dumps({"port": runner.addresses[0][1]}), flush=True)
        await asyncio.Event().wait()

    asyncio.run(serve())


if __name__ == "__main__":
    main()
