"""Shared fixtures: the app in-process on a real socket, the service as a real process,
a fake Unsplash on loopback, and a reader of the event stream.

Delays and retry settings are shrunk through the environment, never slept through.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import re
import signal
import sys
from pathlib import Path

import aiohttp
import pytest

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "tests"))

from fake_unsplash import FakeUnsplash  # noqa: E402

import jobservice  # noqa: E402

# Delays of 50-200 ms and retries of 10-50 ms keep every test fast and still real.
FAST_ENV = {
    "JOB_DELAY_MIN": "0.05",
    "JOB_DELAY_MAX": "0.2",
    "JOB_DELAY_STEP": "0.05",
    "RETRY_BASE_DELAY": "0.01",
    "RETRY_MAX_DELAY": "0.05",
    "UNSPLASH_TIMEOUT": "0.5",
}


@pytest.fixture
def jobs_file(tmp_path: Path) -> Path:
    return tmp_path / "jobs.json"


async def serve_fake(aiohttp_server, fake: FakeUnsplash) -> FakeUnsplash:
    """Serve a fake Unsplash on loopback; its base URL becomes `fake.url`."""
    server = await aiohttp_server(fake.app())
    fake.url = str(server.make_url("")).rstrip("/")
    return fake


@pytest.fixture
async def fake_unsplash(aiohttp_server) -> FakeUnsplash:
    return await serve_fake(aiohttp_server, FakeUnsplash())


@pytest.fixture
def start_service(aiohttp_client, jobs_file):
    """Start the app in-process on a real socket. Calling it again after closing the
    returned client is a restart on the same jobs file."""

    async def start(env: dict | None = None, *, path: Path | None = None):
        settings = jobservice.load_settings(
            ["--data", str(path or jobs_file)], {**FAST_ENV, **(env or {})})
        return await aiohttp_client(jobservice.create_app(settings))

    return start


@pytest.fixture
def unsplash_env(fake_unsplash) -> dict:
    return {"UNSPLASH_ACCESS_KEY": fake_unsplash.key, "UNSPLASH_API_URL": fake_unsplash.url}


class EventStream:
    """The events of one `/ws` connection, awaited one by one (no sleeping)."""

    def __init__(self, ws: aiohttp.ClientWebSocketResponse):
        self.ws = ws
        self.seen: list[tuple[str, dict]] = []

    async def next(self, timeout: float = 10.0) -> tuple[str, dict]:
        message = await self.ws.receive(timeout=timeout)
        if message.type != aiohttp.WSMsgType.TEXT:
            raise AssertionError(f"expected an event, got {message.type!r} {message.data!r}")
        name, payload = json.loads(message.data)
        self.seen.append((name, payload))
        return name, payload

    async def until(self, predicate, timeout: float = 20.0) -> tuple[str, dict]:
        async with asyncio.timeout(timeout):
            while True:
                event = await self.next(timeout)
                if predicate(*event):
                    return event

    async def resolutions(self, ids, timeout: float = 20.0) -> dict[str, dict]:
        """Wait until every job in ids has resolved or failed; their final states."""
        wanted, done = set(ids), {}
        async with asyncio.timeout(timeout):
            while wanted - done.keys():
                name, job = await self.next(timeout)
                if name == "ON_RESOLVED_JOB" and job["id"] in wanted:
                    done[job["id"]] = job
        return done


@pytest.fixture
async def open_events():
    """Connect to /ws of a client (TestClient) or base URL; yields an EventStream."""
    sessions = []

    async def open_(target, query: str = "", headers=None) -> EventStream:
        if isinstance(target, str):
            session = aiohttp.ClientSession()
            sessions.append(session)
            ws = await session.ws_connect(f"{target}/ws{query}", headers=headers)
        else:
            ws = await target.ws_connect(f"/ws{query}", headers=headers)
        return EventStream(ws)

    yield open_
    for session in sessions:
        await session.close()


async def create_jobs(client, count: int) -> list[str]:
    ids = []
    for _ in range(count):
        response = await client.post("/jobs")
        assert response.status == 201, await response.text()
        ids.append((await response.json())["id"])
    return ids


class ServiceProcess:
    """The service as a real process (`python jobservice.py`), on a port it picks."""

    LISTENING = re.compile(r"listening on http://([^\s;]+):(\d+)")

    def __init__(self, jobs_file: Path, env: dict | None = None, args=(), command=None,
                 cwd: Path | None = None):
        self.command = command or [sys.executable, str(ROOT / "jobservice.py")]
        self.cwd = cwd
        self.jobs_file = jobs_file
        self.env = {**os.environ, **FAST_ENV, "PYTHONUNBUFFERED": "1", **(env or {})}
        self.args = list(args)
        self.process: asyncio.subprocess.Process | None = None
        self.log: list[str] = []
        self.url = ""
        self._reader: asyncio.Task | None = None

    async def start(self, timeout: float = 20.0) -> ServiceProcess:
        self.process = await asyncio.create_subprocess_exec(
            *self.command, "--port", "0", "--data", str(self.jobs_file), *self.args,
            cwd=self.cwd, env=self.env, stdout=asyncio.subprocess.PIPE,
            stderr=asyncio.subprocess.STDOUT)
        ready = asyncio.get_running_loop().create_future()
        self._reader = asyncio.create_task(self._read(ready))
        self.url = await asyncio.wait_for(ready, timeout)
        return self

    async def _read(self, ready: asyncio.Future) -> None:
        async for raw in self.process.stdout:
            line = raw.decode(errors="replace").rstrip()
            self.log.append(line)
            match = self.LISTENING.search(line)
            if match and not ready.done():
                ready.set_result(f"http://{match.group(1)}:{match.group(2)}")
        if not ready.done():
            ready.set_exception(RuntimeError("service exited:\n" + "\n".join(self.log)))

    async def stop(self, sig: int = signal.SIGTERM, timeout: float = 20.0) -> int:
        if self.process.returncode is None:
            self.process.send_signal(sig)
        code = await asyncio.wait_for(self.process.wait(), timeout)
        if self._reader is not None:
            await self._reader
        return code


@contextlib.asynccontextmanager
async def running_services(jobs_file: Path):
    """A starter of real service processes; every one still running is killed after."""
    started: list[ServiceProcess] = []

    async def start(env: dict | None = None, path: Path | None = None, args=()):
        service = ServiceProcess(path or jobs_file, env, args)
        started.append(service)
        return await service.start()

    try:
        yield start
    finally:
        for service in started:
            if service.process and service.process.returncode is None:
                service.process.kill()
                await service.process.wait()


@pytest.fixture
async def service_process(jobs_file):
    """Start real service processes (`await service_process(env, path, args)`)."""
    async with running_services(jobs_file) as start:
        yield start
