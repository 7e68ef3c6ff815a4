"""The Redis mode's command line, run as real processes against a real redis-server:
`--workers N` (one port, supervised worker processes), `import` / `export` between a
jobs file and Redis, and the one-line refusals when Redis or redis-py is missing."""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import re
import secrets
import signal
import socket
import sys
import time
from datetime import UTC, datetime
from pathlib import Path

import aiohttp
import pytest
import redis.asyncio as aioredis
from conftest import FAST_ENV, ROOT, create_jobs, free_port, running_services
from test_socketio import closed, event, text_frame

PROGRAM = str(ROOT / "jobservice.py")
# The embedded mode, whatever the environment running the tests holds.
NO_REDIS = {"REDIS_URL": "", "REDIS_PREFIX": ""}
# Jobs made with these stay pending for the whole test, so a file can hold pending jobs
# without a race against their resolution.
SLOW = {"JOB_DELAY_MIN": "3600", "JOB_DELAY_MAX": "3600", "JOB_DELAY_STEP": "1"}
LISTENING = re.compile(r"listening on http://([^\s;]+):(\d+)")
SUPERVISING = re.compile(r"supervising (\d+) workers on http://(\S+):(\d+) \(pid (\d+)\)")


@pytest.fixture
def redis_env(redis_server) -> dict:
    """REDIS_URL and a prefix of this test's own on the suite's redis-server."""
    return {"REDIS_URL": redis_server.url, "REDIS_PREFIX": f"cli-{secrets.token_hex(4)}:"}


@pytest.fixture
async def services(tmp_path):
    """Start `python jobservice.py` processes: `await services(env, path)`; killed after."""
    async with running_services(tmp_path / "jobs.json") as start:
        yield start


async def run(command: list[str], env: dict, timeout: float = 20.0) -> tuple[int, str, str]:
    """Run a command to its end: (exit code, stdout, stderr). One that hangs fails."""
    process = await asyncio.create_subprocess_exec(
        *command, env={**os.environ, **FAST_ENV, **env},
        stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE)
    try:
        out, err = await asyncio.wait_for(process.communicate(), timeout)
    except TimeoutError:
        process.kill()
        await process.wait()
        raise AssertionError(f"{command[1:]} still ran after {timeout} s") from None
    return process.returncode, out.decode(), err.decode()


async def cli(*args: str, env: dict) -> tuple[int, str, str]:
    return await run([sys.executable, PROGRAM, *args], env)


def one_line(text: str) -> str:
    lines = text.strip().splitlines()
    assert len(lines) == 1, lines
    return lines[0]


async def listing(url: str) -> tuple[list[dict], int]:
    """GET /jobs, every job: (the jobs, X-Jobs-Seq)."""
    async with aiohttp.ClientSession() as session, session.get(f"{url}/jobs") as response:
        assert response.status == 200, await response.text()
        return await response.json(), int(response.headers["X-Jobs-Seq"])


async def redis_state(env: dict) -> dict:
    """What a prefix holds in Redis, read straight from it: jobs, due times, deletion
    records and the seq."""
    client = aioredis.Redis.from_url(env["REDIS_URL"], decode_responses=True)
    prefix = env["REDIS_PREFIX"]
    try:
        return {"jobs": await client.hgetall(prefix + "jobs"),
                "due": await client.zrange(prefix + "due", 0, -1, withscores=True),
                "deleted": await client.zrange(prefix + "deleted", 0, -1, withscores=True),
                "seq": await client.get(prefix + "seq")}
    finally:
        await client.aclose()


async def embedded_jobs_file(path: Path, services, open_events) -> tuple[list[dict], str]:
    """A jobs.json written by the embedded mode, as a real one is: resolved jobs, one of
    them deleted since (a deletion record), and pending ones; stopped with SIGTERM so the
    file is a complete snapshot. (GET /jobs as that service last answered, deleted id)."""
    first = await services(NO_REDIS, path)
    events = await open_events(first.url, "?since=0")
    async with aiohttp.ClientSession(first.url) as client:
        ids = await create_jobs(client, 3)
        done = await events.resolutions(ids)
        assert {job["status"] for job in done.values()} == {"resolved"}
        async with client.delete(f"/jobs/{ids[1]}") as response:
            assert response.status == 204
    assert await first.stop(signal.SIGTERM) == 0

    second = await services({**NO_REDIS, **SLOW}, path)
    async with aiohttp.ClientSession(second.url) as client:
        await create_jobs(client, 2)
    jobs, _ = await listing(second.url)
    assert await second.stop(signal.SIGTERM) == 0
    assert [job["status"] for job in jobs] == ["resolved", "resolved", "pending", "pending"]
    assert [tomb["id"] for tomb in read_json(path)["deleted"]] == [ids[1]]
    return jobs, ids[1]


def recent_ms(minutes_ago: int) -> int:
    """Epoch milliseconds, whole seconds, within JOB_RETENTION (older finished jobs
    are expired at once, as they should be)."""
    return (int(time.time()) - 60 * minutes_ago) * 1000


def iso_ms(epoch_ms: int) -> str:
    return datetime.fromtimestamp(epoch_ms / 1000, UTC).strftime("%Y-%m-%dT%H:%M:%S.000Z")


def read_json(path: Path):
    return json.loads(path.read_text())


def old_service_file(path: Path, jobs: list[dict]) -> Path:
    path.write_text(json.dumps(jobs))
    return path


# --- import / export ------------------------------------------------------------------


async def test_import_gives_a_redis_node_the_same_jobs_and_a_second_import_does_nothing(
        tmp_path, redis_env, services, open_events):
    """The migration path from one process to a cluster: every job, its state and
    times, its place in the listing, the deletion record (clients replaying with
    `since` must hear of it) and the seq (no seq may be handed out twice)."""
    source = tmp_path / "jobs.json"
    jobs, deleted = await embedded_jobs_file(source, services, open_events)
    file_seq = read_json(source)["seq"]

    code, out, err = await cli("import", str(source), env=redis_env)
    assert code == 0, err
    assert "imported 4 jobs (2 pending)" in one_line(out)

    node = await services(redis_env, tmp_path / "unused.json")
    served, seq = await listing(node.url)
    assert served == jobs  # ids, statuses, results, createdAt/dueAt/resolvedAt, order
    assert seq >= file_seq
    replay = await open_events(node.url, "?since=0")
    await replay.until(lambda name, _: name == "SYNCED")
    assert ("ON_DELETED_JOB", deleted) in [(name, job.get("id")) for name, job in replay.seen]

    before = await redis_state(redis_env)
    code, out, err = await cli("import", str(source), env=redis_env)
    assert code == 0, err
    assert "nothing to do" in one_line(out)
    assert await redis_state(redis_env) == before

    # Seqs go on from the file's: a new job comes after every imported change.
    async with aiohttp.ClientSession(node.url) as client:
        [new] = await create_jobs(client, 1)
    served, _ = await listing(node.url)
    assert served[:-1] == jobs and served[-1]["id"] == new
    assert served[-1]["seq"] > file_seq


async def test_import_into_a_prefix_holding_other_jobs_needs_force(
        tmp_path, redis_env, services):
    """An import must never silently wipe a running cluster's jobs; --force is the
    deliberate way to, and then nothing of the old ones is left (not even a due time
    that a node would go and claim)."""
    created = recent_ms(10)
    first = old_service_file(tmp_path / "first.json", [
        {"id": "a1", "status": "completed", "result": "https://example.com/a1.jpg",
         "createdAt": created},
        {"id": "a2", "status": "waiting", "result": None, "createdAt": created + 1}])
    second = old_service_file(tmp_path / "second.json", [
        {"id": "b1", "status": "completed", "result": "https://example.com/b1.jpg",
         "createdAt": created + 2}])
    code, _, err = await cli("import", str(first), env=redis_env)
    assert code == 0, err
    before = await redis_state(redis_env)
    assert set(before["jobs"]) == {"a1", "a2"}

    code, out, err = await cli("import", str(second), env=redis_env)
    assert code == 1
    assert out == ""
    assert "--force" in one_line(err)
    assert await redis_state(redis_env) == before

    code, out, err = await cli("import", str(second), "--force", env=redis_env)
    assert code == 0, err
    assert "imported 1 jobs" in one_line(out)
    after = await redis_state(redis_env)
    assert set(after["jobs"]) == {"b1"}
    assert after["due"] == []  # a2's due time went with it
    node = await services(redis_env, tmp_path / "unused.json")
    served, _ = await listing(node.url)
    assert [(job["id"], job["status"]) for job in served] == [("b1", "resolved")]


async def test_export_writes_a_file_the_embedded_mode_loads_and_never_overwrites_others(
        tmp_path, redis_env, services, open_events):
    """The way back from a cluster to one process (or a backup): the exported file is a
    jobs.json the embedded mode starts on with the same jobs, seq and deletion record;
    exporting again is a no-op, and another file in the way is kept unless --force."""
    source = tmp_path / "jobs.json"
    jobs, deleted = await embedded_jobs_file(source, services, open_events)
    code, _, err = await cli("import", str(source), env=redis_env)
    assert code == 0, err
    redis_node = await services(redis_env, tmp_path / "unused.json")
    served, seq = await listing(redis_node.url)

    exported = tmp_path / "out" / "exported.json"
    exported.parent.mkdir()
    code, out, err = await cli("export", str(exported), env=redis_env)
    assert code == 0, err
    assert "exported 4 jobs (2 pending)" in one_line(out)
    written = exported.read_bytes()

    code, out, err = await cli("export", str(exported), env=redis_env)
    assert code == 0, err
    assert "nothing to do" in one_line(out)
    assert exported.read_bytes() == written

    other = json.dumps([{"id": "x", "status": "completed", "result": "https://example.com/x",
                         "createdAt": 1_700_000_000_000}]).encode()
    exported.write_bytes(other)
    code, out, err = await cli("export", str(exported), env=redis_env)
    assert code == 1
    assert out == ""
    assert "--force" in one_line(err)
    assert exported.read_bytes() == other
    assert os.listdir(exported.parent) == ["exported.json"]  # no temporary file left over

    code, out, err = await cli("export", str(exported), "--force", env=redis_env)
    assert code == 0, err
    assert "exported 4 jobs" in one_line(out)
    assert exported.read_bytes() == written

    file_node = await services({**NO_REDIS, **SLOW}, exported)
    assert await listing(file_node.url) == (served, seq)
    assert served == jobs  # file -> Redis -> file: what the first service held
    replay = await open_events(file_node.url, "?since=0")
    await replay.until(lambda name, _: name == "SYNCED")
    assert ("ON_DELETED_JOB", deleted) in [(name, job.get("id")) for name, job in replay.seen]


async def test_import_reads_the_old_services_array_and_its_waiting_jobs_then_resolve(
        tmp_path, redis_env, services, open_events):
    """Users of the NestJS service move straight to the cluster: its ids (numbers too)
    are kept, its completed jobs keep their photo and creation time, finished ones are
    kept a JOB_RETENTION from the import (those of 2024 too), and what it left waiting is
    resolved by a node."""
    created = recent_ms(10)  # epoch ms, as the old service stored them
    source = old_service_file(tmp_path / "old.json", [
        {"id": "1", "status": "completed", "result": "https://example.com/1.jpg",
         "createdAt": created},
        {"id": "2", "status": "waiting", "result": None, "createdAt": created + 1000},
        {"id": 3, "status": "failed", "result": None, "createdAt": created + 2000},
        {"id": "4", "status": "completed", "result": "https://example.com/4.jpg",
         "createdAt": "2024-03-01T12:00:00.000Z"}])
    imported = time.time()
    code, out, err = await cli("import", str(source), env=redis_env)
    assert code == 0, err
    assert "imported 4 jobs (1 pending) from the old service's" in one_line(out)
    assert "the 3 finished are kept 7 days from now (JOB_RETENTION)" in one_line(out)
    assert [job_id for job_id, _ in (await redis_state(redis_env))["due"]] == ["2"]

    node = await services(redis_env, tmp_path / "unused.json")
    events = await open_events(node.url, "?since=0")
    done = await events.resolutions(["2"])
    assert done["2"]["status"] == "resolved" and done["2"]["result"]

    served, _ = await listing(node.url)
    assert [(job["id"], job["status"]) for job in served] == [
        ("1", "resolved"), ("2", "resolved"), ("3", "failed"), ("4", "resolved")]
    first = served[0]
    assert first["result"] == "https://example.com/1.jpg"
    assert first["createdAt"] == iso_ms(created)
    # The old service never said when a job finished: it did at the import, as far as
    # this service knows, and JOB_RETENTION counts from there.
    for job in (first, served[2], served[3]):
        assert datetime.fromisoformat(job["resolvedAt"]).timestamp() >= imported - 0.001, job
    assert served[3]["createdAt"] == "2024-03-01T12:00:00.000Z"
    assert served[1]["createdAt"] == iso_ms(created + 1000)
    assert served[2]["result"] is None and served[2]["error"]


async def test_import_into_a_prefix_with_history_but_no_live_job_needs_force(
        tmp_path, redis_env, services):
    """A prefix a cluster has used holds more than its live jobs: its seq and its
    deletion records (replayed to clients that come back with `since`). Every job may be
    deleted or expired and the prefix is still not empty: an import over it without
    --force would put the seq back, so seqs would be handed out a second time and a
    client resuming from one it was given would skip the jobs that reuse them."""
    # Due in a minute, the job is deleted before it resolves (a resolution takes a seq too).
    node = await services({**redis_env, "JOB_DELAY_MIN": "60", "JOB_DELAY_MAX": "60"},
                          tmp_path / "unused.json")
    async with aiohttp.ClientSession(node.url) as client:
        [job_id] = await create_jobs(client, 1)
        async with client.delete(f"/jobs/{job_id}") as response:
            assert response.status == 204
    assert await node.stop(signal.SIGTERM) == 0
    before = await redis_state(redis_env)
    assert before["jobs"] == {} and before["seq"] == "2" and len(before["deleted"]) == 1

    source = old_service_file(tmp_path / "old.json", [
        {"id": "z", "status": "completed", "result": "https://example.com/z.jpg",
         "createdAt": recent_ms(5)}])
    code, out, err = await cli("import", str(source), env=redis_env)
    after = await redis_state(redis_env)
    assert (code, after) == (1, before), f"exit {code}: {out}{err}"
    assert "--force" in one_line(err)


async def test_an_export_that_fails_leaves_no_temporary_file_behind(tmp_path, redis_env):
    """A failed export must leave the folder as it was: a stray `NAME.export` beside a
    backup is a second, unexplained copy of every job."""
    target = tmp_path / "jobs.json"
    target.mkdir()  # something that is not a jobs file, and cannot be replaced
    code, out, err = await cli("export", str(target), env=redis_env)
    assert code == 1
    assert out == ""
    assert str(target) in one_line(err)
    assert os.listdir(tmp_path) == ["jobs.json"] and target.is_dir()


@pytest.mark.parametrize("args", [["--workers", "2", "--port", "0"], ["import", "FILE"],
                                  ["export", "FILE"]], ids=["workers", "import", "export"])
async def test_without_redis_url_the_cluster_commands_stop_naming_it(args, tmp_path):
    """Workers cannot share one jobs.json, and import/export have nothing to talk to:
    say so in one line (exit 2, a usage error), and touch nothing."""
    target = old_service_file(tmp_path / "jobs.json", [])
    args = [str(target) if arg == "FILE" else arg for arg in args]
    code, out, err = await cli(*args, env={**NO_REDIS, "PORT": "0"})
    assert code == 2
    assert out == ""
    assert "REDIS_URL" in one_line(err)
    assert sorted(os.listdir(tmp_path)) == ["jobs.json"]
    assert target.read_text() == "[]"


# --- Missing pieces: redis-py, Redis itself -------------------------------------------

MISSING_REDIS_PY = ("import sys; sys.modules['redis'] = None; sys.path.insert(0, {root!r}); "
                    "import jobservice; sys.exit(jobservice.main({argv!r}))")


@pytest.mark.parametrize("args", [
    ["--redis", "URL", "--port", "0"], ["--redis", "URL", "--workers", "2", "--port", "0"],
    ["import", "FILE"], ["export", "FILE"]], ids=["serve", "workers", "import", "export"])
async def test_without_redis_py_redis_mode_says_what_to_install(args, tmp_path):
    """redis-py is an optional extra: asking for Redis without it must be one line
    naming the install, not a traceback (exit 2). Its absence is real to the process:
    `import redis` fails there, as it would if it were not installed."""
    source = old_service_file(tmp_path / "jobs.json", [])
    url = f"redis://127.0.0.1:{free_port()}/0"  # were redis-py found, this would be exit 1
    argv = [url if arg == "URL" else str(source) if arg == "FILE" else arg for arg in args]
    code, out, err = await run(
        [sys.executable, "-c", MISSING_REDIS_PY.format(root=str(ROOT), argv=argv)],
        {"REDIS_URL": url, "REDIS_PREFIX": "", "PORT": "0"})
    assert code == 2, err
    assert out == ""
    line = one_line(err)
    assert "redis-py" in line and "pip install 'jobservice[redis]'" in line
    assert sorted(os.listdir(tmp_path)) == ["jobs.json"]


@pytest.mark.parametrize("command", ["serve", "import", "export"])
async def test_an_unreachable_redis_stops_start_up_with_one_line_naming_it(command, tmp_path):
    """A wrong REDIS_URL must fail fast and plainly (exit 1), not hang, and must not fall
    back to a jobs file, which would split the service's state in two."""
    port = free_port()  # bound and let go: nothing listens there
    source = old_service_file(tmp_path / "old.json", [
        {"id": "1", "status": "waiting", "result": None, "createdAt": 1_700_000_000_000}])
    args = {"serve": ["--port", "0", "--data", str(tmp_path / "jobs.json")],
            "import": ["import", str(source)],
            "export": ["export", str(tmp_path / "jobs.json")]}[command]
    code, out, err = await cli(
        *args, env={"REDIS_URL": f"redis://127.0.0.1:{port}/0", "REDIS_PREFIX": ""})
    assert code == 1
    assert out == ""
    line = one_line(err)
    assert "Redis" in line and f"127.0.0.1:{port}" in line
    assert sorted(os.listdir(tmp_path)) == ["old.json"]  # no jobs.json, no temporary file


# --- --workers N: one supervisor, N workers on one port -------------------------------


def process_state(pid: int) -> tuple[str, int] | None:
    """(state, parent pid) of a process from /proc; None once it is gone."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except (FileNotFoundError, ProcessLookupError):
        return None
    state, parent = stat[stat.rindex(")") + 2:].split()[:2]
    return state, int(parent)


def alive(pid: int) -> bool:
    state = process_state(pid)
    return state is not None and state[0] not in ("Z", "X")


async def exits(pids: set[int], timeout: float = 15.0) -> None:
    """Wait until every one of pids has exited, though they are not our children: a
    pidfd turns readable when its process exits (its output closes a moment before)."""
    loop = asyncio.get_running_loop()
    fds, waits = [], []
    try:
        for pid in pids:
            with contextlib.suppress(ProcessLookupError):  # gone already
                fds.append(os.pidfd_open(pid))
        for fd in fds:
            done = loop.create_future()
            loop.add_reader(fd, lambda done=done: done.done() or done.set_result(None))
            waits.append(done)
        await asyncio.wait_for(asyncio.gather(*waits), timeout)
    finally:
        for fd in fds:
            loop.remove_reader(fd)
            os.close(fd)


def children(pid: int) -> set[int]:
    """The live child processes of pid."""
    found = set()
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            state = process_state(int(entry.name))
            if state is not None and state[1] == pid and state[0] not in ("Z", "X"):
                found.add(int(entry.name))
    return found


def pid_of(node: str) -> int:
    """A node id is HOSTNAME-PID-HEX (the hostname may hold dashes itself)."""
    return int(node.rsplit("-", 2)[1])


class Supervisor:
    """`python jobservice.py --workers N`, and every line it and its workers log (they
    share its stdout and stderr): lines are awaited as they come, never slept for."""

    def __init__(self, env: dict, data: Path, workers: int = 2, port: int = 0):
        self.command = [sys.executable, PROGRAM, "--workers", str(workers), "--port",
                        str(port), "--data", str(data)]
        self.env = {**os.environ, **FAST_ENV, "PYTHONUNBUFFERED": "1", **env}
        self.lines: list[str] = []
        self.ended = False
        self.url = ""
        self.process: asyncio.subprocess.Process | None = None
        self._changed = asyncio.Condition()
        self._reader: asyncio.Task | None = None

    async def start(self, ready: bool = True) -> Supervisor:
        """Start it; with ready, wait for its start-up line."""
        self.process = await asyncio.create_subprocess_exec(
            *self.command, env=self.env, stdout=asyncio.subprocess.PIPE,
            stderr=asyncio.subprocess.STDOUT)
        self._reader = asyncio.create_task(self._read())
        if not ready:
            return self
        [match] = await self.matches(SUPERVISING, 1)
        assert int(match[4]) == self.process.pid
        self.url = f"http://{match[2]}:{match[3]}"
        return self

    async def _read(self) -> None:
        async for raw in self.process.stdout:
            async with self._changed:
                self.lines.append(raw.decode(errors="replace").rstrip())
                self._changed.notify_all()
        async with self._changed:
            self.ended = True
            self._changed.notify_all()

    async def matches(self, pattern: re.Pattern, count: int, timeout: float = 15.0):
        """The first `count` lines of the log that match pattern, once there are."""
        def found():
            return [match for line in self.lines if (match := pattern.search(line))]

        try:
            async with asyncio.timeout(timeout), self._changed:
                await self._changed.wait_for(lambda: len(found()) >= count or self.ended)
        except TimeoutError:
            pass
        result = found()
        assert len(result) >= count, (f"{len(result)} of {count} lines like "
                                      f"{pattern.pattern!r}; log:\n" + "\n".join(self.lines))
        return result[:count]

    async def output_closed(self, timeout: float = 15.0) -> None:
        """Once no process holds the output any more: the supervisor and every worker
        have exited."""
        await asyncio.wait_for(asyncio.shield(self._reader), timeout)


@pytest.fixture
async def supervisors(tmp_path):
    async with running_supervisors(tmp_path) as start:
        yield start


@contextlib.asynccontextmanager
async def running_supervisors(tmp_path: Path):
    """A starter of supervisors; each is stopped after, and any worker left killed."""
    started: list[Supervisor] = []

    async def start(env: dict, workers: int = 2, port: int = 0, ready=True) -> Supervisor:
        supervisor = Supervisor(env, tmp_path / f"jobs{len(started)}.json", workers, port)
        started.append(supervisor)
        return await supervisor.start(ready)

    try:
        yield start
    finally:
        await _stop_supervisors(started)


async def _stop_supervisors(started: list[Supervisor]) -> None:
    for supervisor in started:  # by pid, gracefully first: its workers go with it
        process = supervisor.process
        if process is None or process.returncode is not None:
            continue
        workers = children(process.pid)
        process.terminate()
        try:
            await asyncio.wait_for(process.wait(), 20)
        except TimeoutError:
            process.kill()
            await process.wait()
        for pid in workers:
            if alive(pid):
                os.kill(pid, signal.SIGKILL)


async def ask_nodes(url: str, enough, attempts: int = 200) -> dict[str, dict]:
    """GET /healthz, on a new connection each time (the kernel hands each connection to
    one of the workers on the port), until enough(seen); seen is node id -> its latest
    /healthz. Polling, bounded: a worker is another process, with nothing to await."""
    seen: dict[str, dict] = {}
    connector = aiohttp.TCPConnector(force_close=True)
    async with aiohttp.ClientSession(connector=connector) as session:
        for _ in range(attempts):
            async with session.get(f"{url}/healthz") as response:
                assert response.status == 200, await response.text()
                health = await response.json()
            seen[health["node"]] = health
            if enough(seen):
                return seen
    raise AssertionError(f"not enough after {attempts} requests: {seen}")


async def answers(url: str, count: int) -> list[str]:
    """The node ids answering count GET /healthz, each on a new connection; every one
    must answer."""
    connector = aiohttp.TCPConnector(force_close=True)
    nodes = []
    async with aiohttp.ClientSession(connector=connector) as session:
        for _ in range(count):
            async with session.get(f"{url}/healthz") as response:
                assert response.status == 200, await response.text()
                nodes.append((await response.json())["node"])
    return nodes


async def test_two_workers_serve_one_port_and_share_jobs_through_redis(
        redis_env, supervisors, open_events):
    """The point of --workers: more than one core behind one address. Both workers must
    take connections on the supervisor's port, and be one service: jobs made through any
    connection resolve, and every worker knows it."""
    supervisor = await supervisors(redis_env)
    listening = await supervisor.matches(LISTENING, 2)
    assert {f"http://{match[1]}:{match[2]}" for match in listening} == {supervisor.url}

    seen = await ask_nodes(supervisor.url, lambda seen: len(seen) == 2)
    assert {pid_of(node) for node in seen} == children(supervisor.process.pid)

    events = await open_events(supervisor.url, "?since=0")
    connector = aiohttp.TCPConnector(force_close=True)  # spread over both workers
    async with aiohttp.ClientSession(supervisor.url, connector=connector) as client:
        ids = await create_jobs(client, 6)
    done = await events.resolutions(ids)
    assert {job["status"] for job in done.values()} == {"resolved"}
    await ask_nodes(supervisor.url, lambda seen: len(seen) == 2 and all(
        health["resolved"] == 6 and health["pending"] == 0 for health in seen.values()))


async def test_the_heartbeat_settings_and_the_connect_order_hold_on_every_worker(
        redis_env, supervisors, http):
    """PING_INTERVAL and PING_TIMEOUT reach each worker, as every setting does, and on
    whichever worker the kernel hands a connection to, the CONNECT is acked before the
    replay and the heartbeat keeps its time. WebSocket clients only: long-polling across
    workers needs each session's requests brought to its worker."""
    supervisor = await supervisors({**redis_env, **SLOW, "PING_INTERVAL": "0.3",
                                    "PING_TIMEOUT": "1"})
    await supervisor.matches(re.compile(r"pings every 0\.3 s \(PING_INTERVAL\) and waits "
                                        r"1 s for the pong"), 2)
    url = supervisor.url.replace("http", "ws") + "/socket.io/?EIO=4&transport=websocket"

    async def packet(ws) -> str:
        """The next packet but pings, which are answered."""
        while (text := await text_frame(ws)) == "2":
            await ws.send_str("3")
        return text

    async def connect(auth: dict) -> tuple[aiohttp.ClientWebSocketResponse, dict, list]:
        """A new connection (any worker), CONNECT; (it, the ack, the replay's events)."""
        ws = await http.ws_connect(url)
        opened = json.loads((await text_frame(ws))[1:])
        assert (opened["pingInterval"], opened["pingTimeout"]) == (300, 1000)
        await ws.send_str("40" + json.dumps(auth))
        ack = await packet(ws)
        assert ack.startswith("40{"), f"{ack!r} came before the CONNECT ack"
        replay = [event(await packet(ws))]
        while replay[-1][0] != "SYNCED":
            replay.append(event(await packet(ws)))
        return ws, json.loads(ack[2:]), replay

    clients = [await connect({}) for _ in range(6)]  # spread over both, by the kernel
    async with aiohttp.ClientSession(supervisor.url) as client:
        ids = await create_jobs(client, 3)
    for ws, _, _ in clients:
        seen = [event(await packet(ws))[1]["id"] for _ in ids]
        assert sorted(seen) == sorted(ids)
        await ws.send_str("1")
        await ws.close()
    _, reply, _ = clients[0]
    for _ in range(3):  # a recovery from before the jobs, on whichever worker
        ws, again, replay = await connect({"pid": reply["pid"], "offset": "0"})
        assert again == reply  # recovered: the same sid and pid
        assert [job["id"] for _, job, _ in replay[:-1]] == ids
        assert await text_frame(ws, limit=2) == "2"
        await closed(ws, limit=3)  # not answered: ended after pingTimeout


async def test_a_late_poll_is_refused_as_it_arrives_on_either_worker(redis_env, supervisors):
    """A polling session that has not polled within PING_INTERVAL + PING_TIMEOUT is over
    when its next request comes, on whichever worker the kernel hands the connection:
    its own, or the other, which relays it there. At these values the sweep runs once a
    second, so most requests just past the deadline would come before it."""
    supervisor = await supervisors({**redis_env, "PING_INTERVAL": "4", "PING_TIMEOUT": "4"})
    await supervisor.matches(LISTENING, 2)
    polling = f"{supervisor.url}/socket.io/?EIO=4&transport=polling"
    connector = aiohttp.TCPConnector(force_close=True)  # a new connection, any worker, each
    async with aiohttp.ClientSession(connector=connector) as http:
        async def noop(sid: str) -> tuple[int, str]:
            async with http.post(f"{polling}&sid={sid}", data="6") as response:
                return response.status, await response.text()

        sids = []
        for _ in range(8):
            async with http.get(polling) as response:
                sids.append(json.loads((await response.text())[1:])["sid"])
        opened = time.monotonic()  # after the last handshake: every session is due by +8 s
        assert [await noop(sid) for sid in sids] == [(200, "ok")] * 8  # in time, relayed too
        await asyncio.sleep(opened + 8.05 - time.monotonic())  # the deadline: no event
        assert [await noop(sid) for sid in sids] == [
            (400, '{"code":1,"message":"Session ID unknown"}')] * 8


@pytest.mark.parametrize("loop", ["asyncio", "uvloop"])
async def test_workers_run_on_the_loop_their_supervisor_was_given(loop, redis_env,
                                                                  supervisors):
    """--loop (LOOP) is the supervisor's choice for every worker it starts, and each
    worker serves on it."""
    supervisor = await supervisors({**redis_env, "LOOP": loop})
    [line] = [line for line in supervisor.lines if SUPERVISING.search(line)]
    assert f"event loop {loop}" in line, line
    await supervisor.matches(LISTENING, 2)
    workers = [line for line in supervisor.lines if LISTENING.search(line)]
    assert all(f"event loop {loop}" in line and "(--loop " in line for line in workers), \
        workers
    async with aiohttp.ClientSession(supervisor.url) as client:
        assert len(await create_jobs(client, 2)) == 2


async def test_a_killed_worker_is_replaced_and_the_port_keeps_answering(
        redis_env, supervisors):
    """A worker that crashes must cost neither the port nor capacity for good: the
    others keep taking connections meanwhile, and a new worker takes its place."""
    supervisor = await supervisors(redis_env)
    await supervisor.matches(LISTENING, 2)
    seen = await ask_nodes(supervisor.url, lambda seen: len(seen) == 2)
    victim, survivor = sorted(seen)
    os.kill(pid_of(victim), signal.SIGKILL)
    await supervisor.matches(re.compile(
        rf"worker \d+ \(pid {pid_of(victim)}\) exited with -9; starting another"), 1)

    # Until its replacement is up, the survivor takes every connection: none is lost.
    assert victim not in await answers(supervisor.url, 20)

    await supervisor.matches(LISTENING, 3)  # the replacement is listening
    replaced = await ask_nodes(supervisor.url, lambda now: bool(now.keys() - seen.keys()))
    [new] = replaced.keys() - seen.keys()
    assert not alive(pid_of(victim))
    assert children(supervisor.process.pid) == {pid_of(survivor), pid_of(new)}


async def test_sigterm_to_the_supervisor_stops_every_worker_and_exits_0(
        redis_env, supervisors):
    """Stopping the service (systemd, docker stop) signals the supervisor only: it must
    stop its workers gracefully, wait for them, and report success."""
    supervisor = await supervisors(redis_env)
    await supervisor.matches(LISTENING, 2)
    workers = children(supervisor.process.pid)
    assert len(workers) == 2

    supervisor.process.send_signal(signal.SIGTERM)
    assert await asyncio.wait_for(supervisor.process.wait(), 20) == 0
    await supervisor.output_closed()
    assert not any(alive(pid) for pid in workers)
    assert sum("shutting down" in line for line in supervisor.lines) == 2
    assert "all workers stopped" in supervisor.lines[-1]


async def test_workers_stop_by_themselves_when_the_supervisor_is_killed(
        redis_env, supervisors):
    """A supervisor killed outright (SIGKILL, the OOM killer) cannot stop its workers;
    they must notice and stop, or they would hold the port against the next start."""
    supervisor = await supervisors(redis_env)
    await supervisor.matches(LISTENING, 2)
    workers = children(supervisor.process.pid)
    assert len(workers) == 2

    supervisor.process.kill()
    await asyncio.wait_for(supervisor.process.wait(), 15)  # it may wait for the workers' output
    await exits(workers)
    await supervisor.output_closed()  # every line they wrote, read
    assert sum("the supervisor is gone; stopping" in line for line in supervisor.lines) == 2
    assert not any(alive(pid) for pid in workers)


async def test_workers_on_a_port_in_use_is_a_one_line_error(redis_env):
    """As without --workers: a port someone else holds is a plain one-line error
    naming it (exit 1), not a traceback."""
    with socket.socket() as held:
        held.bind(("127.0.0.1", 0))
        held.listen()
        port = held.getsockname()[1]
        code, out, err = await cli("--workers", "2", "--port", str(port), env=redis_env)
    assert code == 1
    assert out == ""
    line = one_line(err)
    assert "cannot listen on" in line and f"127.0.0.1:{port}" in line


async def test_a_second_supervisor_cannot_join_a_port_another_one_serves(
        redis_env, supervisors):
    """SO_REUSEPORT is for this supervisor's own workers. Another `--workers` started on
    the same port (a second deployment, a stale one, another REDIS_PREFIX) must be
    refused as a port in use, or the kernel splits the clients between two services
    that do not share jobs: a job just created is then a 404 on the next connection."""
    first = await supervisors(redis_env, workers=1)
    await first.matches(LISTENING, 1)
    [own] = await ask_nodes(first.url, lambda seen: len(seen) == 1)
    port = int(first.url.rsplit(":", 1)[1])

    other = {**redis_env, "REDIS_PREFIX": redis_env["REDIS_PREFIX"] + "other:"}
    second = await supervisors(other, workers=1, port=port, ready=False)
    exited = asyncio.ensure_future(second.process.wait())
    serving = asyncio.ensure_future(second.matches(LISTENING, 1))
    await asyncio.wait((exited, serving), timeout=15, return_when=asyncio.FIRST_COMPLETED)
    for task in (exited, serving):
        task.cancel()
    if serving.done() and not serving.cancelled() and serving.exception() is None:
        nodes = set(await answers(first.url, 20))
        raise AssertionError(f"a second supervisor serves on port {port} too; nodes "
                             f"answering there: {sorted(nodes)} (the first's is {own})")
    assert await asyncio.wait_for(second.process.wait(), 15) == 1
    await second.output_closed()
    assert any("cannot listen on" in line and f":{port}" in line for line in second.lines)
    assert not any("Traceback" in line for line in second.lines), second.lines
    assert set(await answers(first.url, 20)) == {own}
