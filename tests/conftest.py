"""Shared fixtures: the app in-process on a real socket, the service as a real process,
a fake Unsplash on loopback, and a reader of the event stream.

Delays and retry settings are shrunk through the environment, never slept through.

The suite runs on pytest-xdist workers (the README's command has `-n 4`, pyproject.toml
`--dist loadgroup`), each test wherever a worker is free. So every test takes what it
uses for itself: free ports, its tmp_path, a Redis prefix of its own (each worker starts
its own redis_server). A module whose module-scoped fixtures are costly (a browser, a
built wheel, services that many tests share) keeps its tests on one worker, so that
they are made once: `pytestmark = pytest.mark.xdist_group("name")`. The browser modules
are in two groups ("browser" and "browser-pages"), so that at most two Chromiums load the
box at once. Nothing else needs a worker of its own; a test that would (a fixed port, a
global file) is a bug. The suite takes as long as its busiest worker, so the modules with
the longest tests run first (LONGEST_FIRST): no worker is left on one of them at the end.
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import json
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import aiohttp
import pytest

ROOT = Path(__file__).resolve().parent.parent
NODE_DIR = ROOT / "tests" / "node"
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "tests"))

from fake_unsplash import FakeUnsplash  # noqa: E402
from netproxy import TcpProxy  # noqa: E402

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

# For tests of POOL_MAX_AGE (set to AGED, in seconds): photos are bought only for a job due
# now (no buying ahead: those would age before their job fell due), and every job is due
# 0.6 s after it was made. A photo left from one job's batch is then over AGED old when
# the next job needs one, and a fresh one is taken within milliseconds of its call, well
# under AGED on however busy a box.
AGED = 0.5
AGE_TEST_ENV = {"PHOTO_REUSE": "never", "JOB_DELAY_MIN": "0.6", "JOB_DELAY_MAX": "0.6"}


@pytest.fixture
def jobs_file(tmp_path: Path) -> Path:
    return tmp_path / "jobs.json"


# --- Redis: real redis-server processes, each on a free port in a folder of its own ----


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


class RedisServer:
    """A redis-server of the test's own, as durable as the README recommends: every
    write is in the append-only file, fsynced, before it is acknowledged (unless
    `persistent` is false: then a restart starts empty). `args` are added to its own."""

    def __init__(self, folder: Path, persistent: bool = True, args=()):
        self.folder = folder
        self.port = free_port()
        self.url = f"redis://127.0.0.1:{self.port}/0"
        self.process: subprocess.Popen | None = None
        self.persistent = persistent
        self.args = list(args)

    def start(self, timeout: float = 10.0) -> RedisServer:
        binary = shutil.which("redis-server")
        if binary is None:
            pytest.fail("the Redis-mode tests need redis-server on PATH: "
                        "apt-get install -y redis-server", pytrace=False)
        self.folder.mkdir(parents=True, exist_ok=True)
        self.process = subprocess.Popen(
            [binary, "--port", str(self.port), "--bind", "127.0.0.1", "--dir", str(self.folder),
             "--appendonly", "yes" if self.persistent else "no", "--appendfsync", "always",
             "--save", "", "--protected-mode", "no", "--logfile",
             str(self.folder / "redis.log"), *self.args])
        deadline = timeout
        while deadline > 0:
            try:
                with socket.create_connection(("127.0.0.1", self.port), 0.2) as conn:
                    conn.sendall(b"PING\r\n")
                    if conn.recv(64).startswith(b"+PONG"):
                        return self
            except OSError:
                pass
            if self.process.poll() is not None:
                break
            deadline -= 0.05
            time.sleep(0.05)  # a process of its own: nothing to await but its port
        raise RuntimeError("redis-server did not start:\n"
                           + (self.folder / "redis.log").read_text(errors="replace"))

    def kill(self) -> None:
        """SIGKILL: no shutdown, no final fsync; what was acknowledged must be on disk."""
        if self.process is not None and self.process.poll() is None:
            self.process.kill()
            self.process.wait()

    def stop(self) -> None:
        if self.process is not None and self.process.poll() is None:
            self.process.terminate()
            self.process.wait(10)


class Sentinels:
    """A primary, its replicas, and sentinels (`redis-server --sentinel`) watching it as
    `master`, each on a free port in a folder of its own. The primary counts as down
    after 1 s without an answer (Redis's default is 30 s), so that a failover takes a
    few seconds; less, and a busy 2-core box makes sentinels give up on a healthy one."""

    def __init__(self, folder: Path, replicas: int = 1, sentinels: int = 3,
                 master: str = "jobs"):
        self.folder, self.master = folder, master
        # A replica's first sync starts at once, not after the default 5 s wait for more.
        quick = ["--repl-diskless-sync-delay", "0"]
        self.primary = RedisServer(folder / "primary", args=quick)
        self.replicas = [RedisServer(folder / f"replica{n}", args=quick)
                         for n in range(replicas)]
        self.ports = [free_port() for _ in range(sentinels)]
        self.processes: list[subprocess.Popen] = []

    @property
    def env(self) -> dict:
        return {"REDIS_SENTINELS": ",".join(f"127.0.0.1:{port}" for port in self.ports),
                "REDIS_SENTINEL_MASTER": self.master}

    def start(self, timeout: float = 30.0) -> Sentinels:
        import redis

        self.primary.start()
        for replica in self.replicas:
            replica.args += ["--replicaof", "127.0.0.1", str(self.primary.port)]
            replica.start()
        deadline = time.monotonic() + timeout
        for replica in self.replicas:  # in sync first: sentinels learn of them from the primary
            client = redis.Redis(port=replica.port, decode_responses=True)
            try:
                while client.info("replication")["master_link_status"] != "up":
                    if time.monotonic() > deadline:
                        raise RuntimeError(f"a replica was not in sync within {timeout} s")
                    time.sleep(0.02)
            finally:
                client.close()
        for number, port in enumerate(self.ports):
            folder = self.folder / f"sentinel{number}"
            folder.mkdir(parents=True)
            config = folder / "sentinel.conf"  # a sentinel rewrites its own config file
            config.write_text(
                f"port {port}\nbind 127.0.0.1\nprotected-mode no\ndir {folder}\n"
                f"logfile {folder / 'sentinel.log'}\n"
                f"sentinel monitor {self.master} 127.0.0.1 {self.primary.port} 2\n"
                f"sentinel down-after-milliseconds {self.master} 1000\n"
                f"sentinel failover-timeout {self.master} 2000\n")
            self.processes.append(subprocess.Popen(
                [shutil.which("redis-server"), str(config), "--sentinel"]))
        # Until every sentinel knows the replicas and the other sentinels (they meet
        # through the primary every 2 s): state in other processes, polled.
        for port in self.ports:
            client = redis.Redis(port=port, decode_responses=True, socket_timeout=1)
            try:
                while True:
                    try:
                        state = client.sentinel_master(self.master)
                        if (state["num-slaves"] >= len(self.replicas)
                                and state["num-other-sentinels"] == len(self.ports) - 1):
                            break
                    except redis.RedisError:
                        pass
                    if time.monotonic() > deadline:
                        raise RuntimeError(f"sentinel on {port} not ready within {timeout} s")
                    time.sleep(0.05)
            finally:
                client.close()
        return self

    def stop(self) -> None:
        for process in self.processes:
            if process.poll() is None:
                process.kill()
                process.wait()
        for server in (self.primary, *self.replicas):
            server.kill()


@pytest.fixture
def sentinels(tmp_path):
    """A primary, one replica and three sentinels of this test's own."""
    group = Sentinels(tmp_path / "sentinels").start()
    yield group
    group.stop()


@pytest.fixture(scope="session")
def redis_server():
    """One redis-server for the suite's Redis-mode runs; each test has a prefix of its own."""
    with tempfile.TemporaryDirectory(prefix="jobservice-redis-") as folder:
        server = RedisServer(Path(folder)).start()
        yield server
        server.stop()


@pytest.fixture
def fresh_redis(tmp_path):
    """A redis-server for this test alone (to kill, restart, or fill)."""
    server = RedisServer(tmp_path / "redis").start()
    yield server
    server.kill()


PREFIXES = itertools.count()


def pytest_generate_tests(metafunc):
    """Every test that starts the service runs in both modes: on jobs.json, and on
    Redis. A module or test marked file_only is about the embedded mode's files."""
    if "backend" in metafunc.fixturenames:
        file_only = metafunc.definition.get_closest_marker("file_only") is not None
        metafunc.parametrize("backend", ["file"] if file_only else ["file", "redis"],
                             indirect=True)


def pytest_configure(config):
    config.addinivalue_line("markers", "file_only: about jobs.json; not run on Redis")


def pytest_runtest_setup(item):
    """On an xdist worker under --dist loadgroup, a grouped test's id ends in @group, or
    its group was not kept on one worker: fail it rather than run its module apart."""
    if item.get_closest_marker("xdist_group") and "@" not in item.nodeid \
            and os.environ.get("PYTEST_XDIST_WORKER") and item.config.getvalue("loadgroup"):
        pytest.fail("pytest-xdist did not apply xdist_group: see the pytest cap in "
                    "pyproject.toml", pytrace=False)


@pytest.fixture
def backend(request) -> dict:
    """The environment that picks the mode: nothing for jobs.json, REDIS_URL and a
    prefix of this test's own for Redis."""
    if request.param == "file":
        return {}
    server = request.getfixturevalue("redis_server")
    return {"REDIS_URL": server.url, "REDIS_PREFIX": f"test{next(PREFIXES)}:"}


async def serve_fake(aiohttp_server, fake: FakeUnsplash) -> FakeUnsplash:
    """Serve a fake Unsplash on loopback; its base URL becomes `fake.url`."""
    server = await aiohttp_server(fake.app())
    fake.url = str(server.make_url("")).rstrip("/")
    return fake


@pytest.fixture
async def fake_unsplash(aiohttp_server) -> FakeUnsplash:
    return await serve_fake(aiohttp_server, FakeUnsplash())


async def stored(backend: dict, jobs_file: Path) -> tuple[dict[str, dict], set[str]]:
    """(the jobs, the ids of the deletion records) as the store holds them at rest, read
    from the store itself rather than through the service: jobs.json with its journal,
    or Redis's keys."""
    if not backend:
        jobs, deleted, *_ = jobservice.JobStore(jobs_file)._read_files()
        return {job_id: job.to_dict() for job_id, job in jobs.items()}, set(deleted)
    import redis.asyncio

    client = redis.asyncio.Redis.from_url(backend["REDIS_URL"], decode_responses=True)
    prefix = backend["REDIS_PREFIX"]
    try:
        jobs = await client.hgetall(prefix + "jobs")
        deleted = await client.zrange(prefix + "deleted", 0, -1)
    finally:
        await client.aclose()
    return ({job_id: json.loads(value.partition(" ")[2]) for job_id, value in jobs.items()},
            {json.loads(text)["id"] for text in deleted})


async def seed(backend: dict, jobs_file: Path) -> None:
    """Make a jobs file written by a test the store's content: in Redis mode, through
    `jobservice import --force`, as an operator would."""
    if backend:
        import jobservice_redis

        settings = jobservice.load_settings(["--data", str(jobs_file)], backend)
        await jobservice_redis.import_file(settings, jobs_file, force=True)


@pytest.fixture
def start_service(aiohttp_client, jobs_file, backend):
    """Start the app in-process on a real socket. Calling it again after closing the
    returned client is a restart on the same jobs file (or Redis prefix)."""

    async def start(env: dict | None = None, *, path: Path | None = None):
        settings = jobservice.load_settings(
            ["--data", str(path or jobs_file)], {**FAST_ENV, **backend, **(env or {})})
        client = await aiohttp_client(jobservice.create_app(settings),
                                      server_kwargs=jobservice.SERVER_OPTIONS)
        await client.app[jobservice.STORE].until_ready()  # a Redis-mode node loads first
        return client

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
        self.loop = (env or {}).get("LOOP")
        self.args = list(args)
        self.process: asyncio.subprocess.Process | None = None
        self.log: list[str] = []
        self.url = ""
        self._reader: asyncio.Task | None = None
        self._new_line = asyncio.Event()  # set as each line of the log is read

    async def start(self, timeout: float = 20.0) -> ServiceProcess:
        # On the test's own loop, unless the test names one.
        loop = self.loop or jobservice.loop_kind(asyncio.get_running_loop())
        self.process = await asyncio.create_subprocess_exec(
            *self.command, "--port", "0", "--data", str(self.jobs_file), *self.args,
            cwd=self.cwd, env={**self.env, "LOOP": loop}, stdout=asyncio.subprocess.PIPE,
            stderr=asyncio.subprocess.STDOUT)
        ready = asyncio.get_running_loop().create_future()
        self._reader = asyncio.create_task(self._read(ready))
        self.url = await asyncio.wait_for(ready, timeout)
        return self

    async def _read(self, ready: asyncio.Future) -> None:
        async for raw in self.process.stdout:
            line = raw.decode(errors="replace").rstrip()
            self.log.append(line)
            self._new_line.set()
            match = self.LISTENING.search(line)
            if match and not ready.done():
                ready.set_result(f"http://{match.group(1)}:{match.group(2)}")
        if not ready.done():
            ready.set_exception(RuntimeError("service exited:\n" + "\n".join(self.log)))

    async def logged(self, text: str, limit: float = 10.0) -> str:
        """The first line of the log that holds text, read already or awaited."""
        async with asyncio.timeout(limit):
            while True:
                line = next((line for line in self.log if text in line), None)
                if line is not None:
                    return line
                self._new_line.clear()
                await self._new_line.wait()

    async def stop(self, sig: int = signal.SIGTERM, timeout: float = 20.0) -> int:
        if self.process.returncode is None:
            self.process.send_signal(sig)
        code = await asyncio.wait_for(self.process.wait(), timeout)
        if self._reader is not None:
            await self._reader
        return code


@contextlib.asynccontextmanager
async def running_services(jobs_file: Path, backend: dict | None = None):
    """A starter of real service processes; every one still running is killed after."""
    started: list[ServiceProcess] = []

    async def start(env: dict | None = None, path: Path | None = None, args=(), command=None):
        service = ServiceProcess(path or jobs_file, {**(backend or {}), **(env or {})}, args,
                                 command)
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
async def service_process(jobs_file, backend):
    """Start real service processes (`await service_process(env, path, args, command)`)."""
    async with running_services(jobs_file, backend) as start:
        yield start


# --- socket.io-client from npm, run by Node --------------------------------------------


@pytest.fixture(scope="session")
def node_dir() -> Path:
    """tests/node with its node_modules: `npm ci` once if they are missing. No Node or
    npm is a failure, not a skip: these tests are the proof for stock clients."""
    node, npm = shutil.which("node"), shutil.which("npm")
    if node is None or npm is None:
        pytest.fail("tests/test_socketio.py needs Node.js (18+) and npm on PATH to run the "
                    "stock socket.io-client; install them (e.g. apt-get install nodejs npm), "
                    "then run: npm ci --prefix tests/node", pytrace=False)
    if not (NODE_DIR / "node_modules" / "socket.io-client" / "package.json").is_file():
        verb = "ci" if (NODE_DIR / "package-lock.json").is_file() else "install"
        command = [npm, verb, "--no-audit", "--no-fund"]
        try:
            result = subprocess.run(command, cwd=NODE_DIR, capture_output=True, text=True,
                                    timeout=300, check=False)
        except subprocess.TimeoutExpired:
            pytest.fail(f"`npm {verb}` in {NODE_DIR} took over 300 s", pytrace=False)
        if result.returncode != 0:
            pytest.fail(f"`npm {verb}` in {NODE_DIR} failed ({result.returncode}):\n"
                        f"{result.stdout}\n{result.stderr}", pytrace=False)
    return NODE_DIR


class NodeClient:
    """One `node sio_client.mjs URL`: its JSON lines, awaited one by one."""

    def __init__(self, process: asyncio.subprocess.Process):
        self.process = process
        self.lines: list[dict] = []
        self.stderr: list[str] = []
        self._stderr_reader = asyncio.create_task(self._read_stderr())

    async def _read_stderr(self) -> None:
        async for raw in self.process.stderr:
            self.stderr.append(raw.decode(errors="replace").rstrip())

    async def next(self, limit: float = 15.0) -> dict:
        raw = await asyncio.wait_for(self.process.stdout.readline(), limit)
        if not raw:
            code = await self.process.wait()
            await self._stderr_reader
            raise AssertionError(f"the node client exited ({code}); lines: {self.lines}; "
                                 "stderr:\n" + "\n".join(self.stderr))
        line = json.loads(raw)
        self.lines.append(line)
        return line

    async def until(self, predicate, limit: float = 20.0, since: int | None = None) -> dict:
        """The first line matching predicate: among the lines already read from index
        `since` on (if given), else the next ones."""
        if since is not None:
            for line in self.lines[since:]:
                if predicate(line):
                    return line
        try:
            async with asyncio.timeout(limit):
                while True:
                    line = await self.next(limit)
                    if predicate(line):
                        return line
        except TimeoutError:
            raise AssertionError(f"no such line within {limit} s; got {self.lines}") from None

    async def connected(self, limit: float = 20.0) -> dict:
        return await self.until(lambda line: line["type"] == "connect", limit)

    async def event(self, name: str, job_id: str, since: int = 0, limit: float = 20.0):
        """The event `name` of job `job_id`, read already (from index `since`) or next."""
        return await self.until(lambda line: line["type"] == "event" and line["name"] == name
                                and line["job"]["id"] == job_id, limit, since)

    async def send(self, command: str) -> None:
        self.process.stdin.write(command.encode() + b"\n")
        await self.process.stdin.drain()

    async def quit(self) -> int:
        if self.process.returncode is None:
            self.process.stdin.write(b"quit\n")
            await self.process.stdin.drain()
        code = await asyncio.wait_for(self.process.wait(), 10)
        await self._stderr_reader
        return code


@pytest.fixture
async def node_client(node_dir):
    started: list[NodeClient] = []

    async def start(url: str, options: dict | None = None) -> NodeClient:
        """`options` are merged into io()'s; {"transports": "default"} keeps its own."""
        env = {**os.environ, "SIO_OPTIONS": json.dumps(options or {})}
        process = await asyncio.create_subprocess_exec(
            shutil.which("node"), str(node_dir / "sio_client.mjs"), url, env=env,
            stdin=asyncio.subprocess.PIPE, stdout=asyncio.subprocess.PIPE,
            stderr=asyncio.subprocess.PIPE)
        client = NodeClient(process)
        started.append(client)
        return client

    yield start
    for client in started:
        if client.process.returncode is None:
            client.process.kill()
            await client.process.wait()


@pytest.fixture
async def http():
    async with aiohttp.ClientSession() as session:
        yield session


# --- A loopback TCP proxy: cut connections, refuse new ones ---------------------------


@pytest.fixture
async def tcp_proxy():
    proxies: list[TcpProxy] = []

    async def start(port: int) -> TcpProxy:
        proxy = TcpProxy(port)
        proxies.append(proxy)
        return await proxy.start()

    yield start
    for proxy in proxies:
        await proxy.close()


# --- nginx in front: the README's reverse-proxy configuration, on ports of the test's own ---

NGINX_CONFIG = re.compile(r"<!-- nginx-config -->\s*```nginx\n(.*?)```", re.S)


class Nginx:
    """Debian's nginx running the README's configuration: its upstream servers replaced by
    `backends`, its TLS `listen` by a free loopback port, the certificate lines dropped,
    and the upstream `keepalive_timeout` set to `keepalive_timeout`. Its prefix, pid, logs
    and temporary files are in a folder of its own."""

    def __init__(self, folder: Path, backends: list[str], keepalive_timeout: str):
        self.folder = folder
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        match = NGINX_CONFIG.search((ROOT / "README.md").read_text())
        assert match, "README.md has no nginx-config block"
        block = match.group(1)
        servers = "".join(f"    server {backend};\n" for backend in backends)
        block = re.sub(r"(upstream jobservice \{\n)    server [^\n]*\n", rf"\g<1>{servers}",
                       block)
        block = re.sub(r"keepalive_timeout \S+;", f"keepalive_timeout {keepalive_timeout};",
                       block)
        block = block.replace("listen 443 ssl;", f"listen 127.0.0.1:{self.port};")
        block = re.sub(r"\n\s*ssl_certificate(_key)? [^\n]*", "", block)
        self.config = block
        self.process: subprocess.Popen | None = None

    def start(self, timeout: float = 10.0) -> Nginx:
        binary = shutil.which("nginx") or shutil.which("nginx", path="/usr/sbin:/sbin")
        if binary is None:
            pytest.fail("the nginx tests need Debian's nginx: apt-get install -y nginx",
                        pytrace=False)
        folder = self.folder
        folder.mkdir(parents=True, exist_ok=True)
        temp = "".join(f"{kind}_temp_path {folder / kind};\n" for kind in
                       ("client_body", "proxy", "fastcgi", "uwsgi", "scgi"))
        (folder / "nginx.conf").write_text(
            ("user root;\n" if os.geteuid() == 0 else "")
            + f"daemon off;\nworker_processes 1;\npid {folder / 'nginx.pid'};\n"
            f"error_log {folder / 'error.log'} warn;\nevents {{}}\n"
            f"http {{\naccess_log {folder / 'access.log'};\n{temp}{self.config}}}\n")
        self.process = subprocess.Popen(
            [binary, "-p", str(folder), "-c", str(folder / "nginx.conf")],
            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                raise RuntimeError("nginx did not start: "
                                   + self.process.stderr.read().decode(errors="replace"))
            with contextlib.suppress(OSError), socket.create_connection(
                    ("127.0.0.1", self.port), 0.2):
                return self
            time.sleep(0.02)  # a process of its own: nothing to await but its port
        raise RuntimeError(f"nginx did not listen on {self.port} within {timeout} s")

    def statuses(self) -> list[int]:
        """The status of every request nginx answered, from its access log."""
        log = (self.folder / "access.log").read_text()
        return [int(match) for match in re.findall(r'" (\d{3}) ', log)]

    def stop(self) -> None:
        if self.process is not None and self.process.poll() is None:
            self.process.terminate()
            self.process.wait(10)


@pytest.fixture
def nginx(tmp_path):
    """Start nginx in front of backends: `nginx(["127.0.0.1:PORT", ...], "1s")`."""
    started: list[Nginx] = []

    def start(backends: list[str], keepalive_timeout: str = "60s") -> Nginx:
        server = Nginx(tmp_path / f"nginx{len(started)}", backends, keepalive_timeout)
        started.append(server)
        return server.start()

    yield start
    for server in started:
        server.stop()


# --- Event loops: what serves runs on asyncio's loop and on uvloop ----------------------
# Each async test in BOTH_LOOPS runs once on each loop (pytest-asyncio's loop factories),
# the rest on asyncio's. A service process a test starts through ServiceProcess runs on
# the test's own loop (it passes LOOP); one started otherwise gets LOOP=asyncio from the
# environment, unless the test or the caller's environment says otherwise.

import uvloop  # noqa: E402

LOOP_FACTORIES = {"asyncio": asyncio.SelectorEventLoop, "uvloop": uvloop.new_event_loop}
BOTH_LOOPS = frozenset(("test_api.py", "test_ws.py", "test_socketio.py", "test_polling.py",
                        "test_slow_clients.py"))
os.environ.setdefault("LOOP", "asyncio")


def pytest_asyncio_loop_factories(config, item):
    if item.path.name in BOTH_LOOPS:
        return LOOP_FACTORIES
    return {"asyncio": LOOP_FACTORIES["asyncio"]}


LONGEST_FIRST = ("test_browser.py", "test_browser_dashboard.py", "test_quota.py",
                 "test_cluster_cli.py", "test_chaos.py", "test_durability.py",
                 "test_package.py", "test_browser_auth.py", "test_browser_socketio.py",
                 "test_slow_clients.py", "test_peer_memory.py")


def pytest_collection_modifyitems(config, items):
    """The modules of LONGEST_FIRST first, in that order (see the module's docstring).
    And uvloop is run for what serves (connections, timeouts, WebSockets, Engine.IO),
    which the store behind it does not change: on the file backend only, not again on
    Redis (Redis on uvloop is run by test_cluster_cli's workers, which need it)."""
    items.sort(key=lambda item: LONGEST_FIRST.index(item.path.name)
               if item.path.name in LONGEST_FIRST else len(LONGEST_FIRST))
    def again_on_redis(item) -> bool:
        spec = getattr(item, "callspec", None)
        return (spec is not None and "uvloop" in spec.id.split("-")
                and spec.params.get("backend") == "redis")

    dropped = [item for item in items if again_on_redis(item)]
    if dropped:
        items[:] = [item for item in items if not again_on_redis(item)]
        config.hook.pytest_deselected(items=dropped)
