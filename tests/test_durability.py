"""Durability: SIGKILL at random moments, disk faults, and no event before its change is durable.

Crash rounds (a real `python jobservice.py` process): 32 clients create jobs as fast as they
can while one `/ws` client records every resolution it is sent; the process is killed with
SIGKILL 0.2-1.5 s into the round and restarted on the same file. A second run of half as
many rounds (`during-start-up-compaction`, from a journal of 10,000 jobs) kills under load
0.2-0.5 s in, then kills the restarted service again 0-5 ms after it renamed its journal
to `.journal.old` to fold it into a new snapshot. After every round the files parse, every
job whose 201 arrived is there, and every resolution a client saw is there as it was seen;
every job left pending by a kill resolves after the restart (a listing, then
`/ws?since=<its X-Jobs-Seq>`), and at the end every job is resolved. The service runs with
COMPACT_MIN_RECORDS lowered to 200 (a module constant, set by starting it through
`python -c`), so that the journal is also rotated and folded during the rounds.

    CRASH_ROUNDS=100 .venv/bin/python -m pytest tests/test_durability.py -k crash_rounds -q

runs more rounds (default 10 under load, and half as many of the start-up kind);
CRASH_SEED=N replays the kill moments of a failed run (the seed is in every failure
message).

Disk faults (the app in-process, so `caplog` sees the "jobservice" logger), simulated two ways:

- For real, where the test may mount (root with CAP_SYS_ADMIN; the container these tests
  were written in allows it): the jobs file lives on a small tmpfs the test mounts. ENOSPC:
  the test fills the tmpfs with a filler file, and deletes it to recover. Read-only:
  `mount -o remount,ro`, then back to `rw`. Linux refuses to remount read-only while a file
  is open for writing (EBUSY), so that variant restarts the service first (which closes the
  journal) and the fault is met when the store opens its journal. Where mounting is not
  permitted (not root, or a CI container without CAP_SYS_ADMIN) these variants are skipped,
  saying why, and the injected ones still run.
- Injected, always: `os.fsync` (which `JobStore._append` calls, through
  `aiofiles.os.wrap(os.fsync)`, after writing each batch to the journal) raises
  OSError(ENOSPC / EIO / EROFS) for files under the test's data directory. EIO has no
  unprivileged real simulation (it would take a device-mapper error target), and an
  fsync that fails after the write succeeded is the harder case: the refused bytes are in
  the file and must not come back. Neither `os.write` nor the raw file's `write` is
  patched: aiofiles writes through `FileIO.write`, a C method that calls write(2) directly.
"""

from __future__ import annotations

import asyncio
import errno
import json
import logging
import os
import random
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time
from functools import cache
from pathlib import Path

import aiohttp
import pytest
from conftest import ROOT, ServiceProcess

import jobservice

# The files behind the embedded mode: how they are written, torn and recovered.
pytestmark = pytest.mark.file_only

CRASH_ROUNDS = int(os.environ.get("CRASH_ROUNDS", "10"))
CRASH_CLIENTS = 32
SLOW = {"JOB_DELAY_MIN": "60", "JOB_DELAY_MAX": "60"}
# Jobs created just before a fault come due while it lasts: after it began (the fault and
# the first refusals took a second on a busy box), before the test ends it.
DUE_SOON = {"JOB_DELAY_MIN": "2", "JOB_DELAY_MAX": "2"}


# --- Reading the files as a restart would, independently of the service ------------------


def read_files(jobs_file: Path) -> dict[str, dict]:
    """Every job the snapshot and journals hold, newest seq winning; fails the test if a
    file does not parse. Only a journal's last line may be torn (a write that a kill cut
    short, so never acknowledged): every line that ends in a newline must be a job."""
    jobs: dict[str, dict] = {}
    if jobs_file.exists():
        snapshot = json.loads(jobs_file.read_bytes())
        assert snapshot["version"] == 1 and isinstance(snapshot["seq"], int), snapshot
        for job in snapshot["jobs"]:
            assert job["seq"] <= snapshot["seq"], job
            jobs[job["id"]] = job
    for suffix in (".journal.old", ".journal"):
        path = jobs_file.with_name(jobs_file.name + suffix)
        if not path.exists():
            continue
        # What follows the last newline is a torn last write, if any: never acknowledged.
        lines = path.read_bytes().split(b"\n")[:-1]
        for number, line in enumerate(lines, start=1):
            try:
                job = json.loads(line)
            except ValueError as exc:
                raise AssertionError(f"{path.name} line {number} is not a job: {exc}: "
                                     f"{line[:120]!r}") from None
            if job["id"] not in jobs or jobs[job["id"]]["seq"] < job["seq"]:
                jobs[job["id"]] = job
    return jobs


# --- Watching events ---------------------------------------------------------------------



def fd_under(fd: int, directory) -> bool:
    """Whether an open file descriptor is a file in (or is) the test's directory."""
    try:
        target = os.readlink(f"/proc/self/fd/{fd}")
    except OSError:
        return False
    return target == str(directory) or target.startswith(f"{directory}/")

class Watcher:
    """Reads every frame of one `/ws` connection in the background, so that a test can both
    assert that nothing arrived and wait until something does."""

    def __init__(self, ws: aiohttp.ClientWebSocketResponse):
        self.ws = ws
        self.events: list[tuple[str, dict]] = []
        self.arrived: list[float] = []  # time.monotonic() of each event
        self._by_name: dict[str, dict[str, dict]] = {}
        self._changed = asyncio.Event()
        self.task = asyncio.get_running_loop().create_task(self._read())

    async def _read(self) -> None:
        async for message in self.ws:
            if message.type == aiohttp.WSMsgType.TEXT:
                name, payload = json.loads(message.data)
                self.events.append((name, payload))
                self.arrived.append(time.monotonic())
                if isinstance(payload, dict) and "id" in payload:
                    self._by_name.setdefault(name, {})[payload["id"]] = payload
                self._changed.set()
        self._changed.set()

    def named(self, name: str) -> dict[str, dict]:
        """The latest payload of each job that came with this event name."""
        return self._by_name.get(name, {})

    def arrival(self, name: str, job_id: str) -> float:
        return next(at for (event, job), at in zip(self.events, self.arrived, strict=True)
                    if event == name and job["id"] == job_id)

    async def wait(self, predicate, timeout: float = 10.0) -> None:
        async with asyncio.timeout(timeout):
            while not predicate():
                if self.task.done():
                    raise AssertionError(f"the event stream ended; got {self.events!r}")
                self._changed.clear()
                await self._changed.wait()

    async def resolutions(self, ids, timeout: float = 20.0) -> dict[str, dict]:
        wanted = set(ids)

        def done() -> bool:
            wanted.difference_update(self.named("ON_RESOLVED_JOB").keys() & wanted)
            return not wanted

        await self.wait(done, timeout)
        return {job_id: self.named("ON_RESOLVED_JOB")[job_id] for job_id in ids}

    async def close(self) -> None:
        await self.ws.close()
        await self.task


# --- 1. Crash rounds ---------------------------------------------------------------------


async def run_until_killed(service: ServiceProcess, kill_after: float):
    """32 clients create jobs and one watches events until the service is SIGKILLed.
    Returns the ids whose 201 arrived, the resolutions seen, and any other answers."""
    acknowledged: list[str] = []
    unexpected: list[str] = []
    async with aiohttp.ClientSession(connector=aiohttp.TCPConnector(limit=0),
                                     timeout=aiohttp.ClientTimeout(total=30)) as session:
        watcher = Watcher(await session.ws_connect(f"{service.url}/ws", heartbeat=None))

        async def create() -> None:
            while True:
                try:
                    async with session.post(f"{service.url}/jobs") as response:
                        body = await response.read()
                        if response.status != 201:
                            unexpected.append(f"{response.status} {body[:200]!r}")
                            continue
                except (aiohttp.ClientError, OSError, TimeoutError):
                    return  # killed: an answer that did not arrive acknowledges nothing
                acknowledged.append(json.loads(body)["id"])

        clients = [asyncio.create_task(create()) for _ in range(CRASH_CLIENTS)]
        await asyncio.sleep(kill_after)
        code = await service.stop(signal.SIGKILL)
        assert code == -signal.SIGKILL, service.log[-20:]
        async with asyncio.timeout(30):
            await asyncio.gather(*clients)
            await watcher.task
    return acknowledged, watcher.named("ON_RESOLVED_JOB"), unexpected


# The journal is folded into a new snapshot once it holds max(COMPACT_MIN_RECORDS, jobs)
# records. At the default (10,000) a round would never get there, so the crash rounds run
# the service with a small one: kills then also land in rotations and compactions.
CRASH_COMPACT_MIN_RECORDS = 200


class CompactingService(ServiceProcess):
    """`python jobservice.py` as ServiceProcess runs it, with COMPACT_MIN_RECORDS lowered."""

    starting: asyncio.Task | None = None

    async def start(self, timeout: float = 20.0) -> ServiceProcess:
        code = ("import sys, jobservice; "
                f"jobservice.COMPACT_MIN_RECORDS = {CRASH_COMPACT_MIN_RECORDS}; "
                "sys.exit(jobservice.main())")
        self.process = await asyncio.create_subprocess_exec(
            sys.executable, "-c", code, "--port", "0", "--data", str(self.jobs_file),
            *self.args, env={**self.env, "PYTHONPATH": str(ROOT)},
            stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.STDOUT)
        ready = asyncio.get_running_loop().create_future()
        self._reader = asyncio.create_task(self._read(ready))
        self.url = await asyncio.wait_for(ready, timeout)
        return self


@pytest.fixture
async def compacting_service(jobs_file):
    started: list[CompactingService] = []

    async def start(wait: bool = True) -> CompactingService:
        """Started and listening; or, with wait=False, just spawned (`.starting` is the
        task that ends once it listens, or raises if it exits first)."""
        service = CompactingService(jobs_file)
        started.append(service)
        if wait:
            return await service.start()
        service.starting = asyncio.create_task(service.start())
        return service

    yield start
    for service in started:
        if service.process and service.process.returncode is None:
            service.process.kill()
            await service.process.wait()


async def listing(url: str) -> tuple[dict[str, dict], int]:
    async with aiohttp.ClientSession() as session, session.get(f"{url}/jobs") as response:
        assert response.status == 200
        jobs = await response.json()
        seq = int(response.headers["X-Jobs-Seq"])
    by_id = {job["id"]: job for job in jobs}
    assert len(by_id) == len(jobs), "a job is listed twice"
    return by_id, seq


async def wait_resolved(url: str, ids, timeout: float = 30.0) -> dict[str, dict]:
    """The final state of each job in ids, waiting until each has resolved or failed: a
    listing, then `/ws?since=<its seq>` for the jobs still pending in it."""
    async with aiohttp.ClientSession() as session:
        async with session.get(f"{url}/jobs") as response:
            jobs = {job["id"]: job for job in await response.json()}
            seq = int(response.headers["X-Jobs-Seq"])
        final = {job_id: jobs[job_id] for job_id in ids if jobs[job_id]["status"] != "pending"}
        waiting = [job_id for job_id in ids if job_id not in final]
        watcher = Watcher(await session.ws_connect(f"{url}/ws?since={seq}"))
        try:
            final.update(await watcher.resolutions(waiting, timeout))
        finally:
            await watcher.close()
    return final


def seed_resolved_jobs(jobs_file: Path, count: int) -> None:
    """A journal of resolved jobs, as a crash leaves it, for the first start to fold."""
    now = time.time()
    with jobs_file.with_name(jobs_file.name + ".journal").open("w") as journal:
        for seq in range(1, count + 1):
            job = jobservice.Job(f"seeded-{seq}", "resolved", "https://images.unsplash.com/x",
                                 now - 60, now - 30, now - 30, 1, None, None, seq)
            journal.write(job.json + "\n")


async def kill_during_start_up(compacting_service, jobs_file: Path, rng) -> None:
    """Start the service and SIGKILL it 0-5 ms after it renamed its journal to
    `.journal.old` to fold it into a new snapshot, before it even listens."""
    rotated = jobs_file.with_name(jobs_file.name + ".journal.old")
    service = await compacting_service(wait=False)
    async with asyncio.timeout(20):  # polled: nothing announces another process's rename
        while service.process is None or not (  # noqa: ASYNC110
                rotated.exists() or service.starting.done()):
            await asyncio.sleep(0.001)
    await asyncio.sleep(rng.uniform(0, 0.005))
    service.process.kill()
    # Reaped before stop() looks: a second signal to a dead child would reap it behind
    # asyncio's back (Popen.send_signal polls first), and its code would read 255.
    assert await service.process.wait() == -signal.SIGKILL
    try:
        await service.starting
    except RuntimeError:
        pass  # killed before it listened
    await service.stop(signal.SIGKILL)


@pytest.mark.parametrize("mode", ["under-load", "during-start-up-compaction"])
async def test_crash_rounds_sigkill_loses_nothing_acknowledged_or_announced(
        compacting_service, jobs_file, mode):
    seed = int(os.environ.get("CRASH_SEED") or random.randrange(2**32))
    rng = random.Random(seed)
    acknowledged: dict[str, int] = {}  # id -> round
    announced: dict[str, dict] = {}  # ON_RESOLVED_JOB payloads a client saw
    left_pending = mid_compaction = 0
    if mode == "during-start-up-compaction":
        seed_resolved_jobs(jobs_file, 10_000)  # so that folding it takes a while
    service = await compacting_service()
    rounds = CRASH_ROUNDS if mode == "under-load" else max(1, CRASH_ROUNDS // 2)
    for round_ in range(1, rounds + 1):
        if mode == "under-load":
            kill_after = rng.uniform(0.2, 1.5)
            acked, resolved, unexpected = await run_until_killed(service, kill_after)
        else:
            kill_after = rng.uniform(0.2, 0.5)
            acked, resolved, unexpected = await run_until_killed(service, kill_after)
            await kill_during_start_up(compacting_service, jobs_file, rng)
        where = f"{mode} round {round_} (killed {kill_after:.2f} s in; CRASH_SEED={seed})"
        assert not unexpected, f"{where}: answers other than 201: {unexpected[:5]}"
        assert len(set(acked)) == len(acked), f"{where}: an id was handed out twice"
        acknowledged.update(dict.fromkeys(acked, round_))
        announced.update(resolved)

        on_disk = read_files(jobs_file)
        mid_compaction += jobs_file.with_name(jobs_file.name + ".journal.old").exists()
        lost = [job_id for job_id in acknowledged if job_id not in on_disk]
        assert not lost, f"{where}: {len(lost)} acknowledged jobs are not in the files"
        pending = [job_id for job_id, job in on_disk.items() if job["status"] == "pending"]
        left_pending += len(pending)

        service = await compacting_service()
        jobs, _ = await listing(service.url)
        lost = [(job_id, r) for job_id, r in acknowledged.items() if job_id not in jobs]
        assert not lost, f"{where}: acknowledged jobs (id, round) missing after restart: " \
                         f"{lost[:5]} of {len(lost)}"
        undone = {job_id: (seen, jobs.get(job_id)) for job_id, seen in announced.items()
                  if jobs.get(job_id) != seen}
        assert not undone, f"{where}: resolutions a client saw, then and after the " \
                           f"restart: {list(undone.values())[:3]}"
        assert all(job["status"] == "resolved" for job in announced.values())
        final = await wait_resolved(service.url, pending)
        assert {job["status"] for job in final.values()} <= {"resolved"}, where

    assert acknowledged, "no job was ever acknowledged; nothing was tested"
    if mode == "under-load":
        assert announced and left_pending, "the kills found nothing to lose"
    jobs, _ = await listing(service.url)
    await wait_resolved(service.url, jobs)
    jobs, _ = await listing(service.url)
    assert acknowledged.keys() <= jobs.keys()
    assert {job["status"] for job in jobs.values()} == {"resolved"}
    assert await service.stop() == 0
    print(f"{rounds} crash rounds {mode} (CRASH_SEED={seed}): {len(acknowledged)} jobs "
          f"acknowledged, {len(announced)} resolutions seen by a client, {left_pending} "
          f"jobs pending at a kill, {mid_compaction} kills during a compaction")


async def test_a_torn_write_left_by_a_crash_does_not_swallow_the_next_record(
        start_service, jobs_file):
    """A kill during the first write to a fresh journal leaves only a torn line in it. The
    next record appended must not be glued onto that fragment, or it is unreadable and an
    acknowledged job is lost at the next crash."""
    journal = jobs_file.with_name(jobs_file.name + ".journal")
    journal.write_bytes(b'{"id":"torn-by-a-kill","status":"pen')
    client = await start_service(SLOW)
    response = await client.post("/jobs")
    assert response.status == 201
    job_id = (await response.json())["id"]
    # Read the files as a restart after a SIGKILL right now would (no shutdown to fold them).
    jobs, *_ = jobservice.JobStore(jobs_file)._read_files()
    assert job_id in jobs, f"acknowledged, then unreadable: {journal.read_bytes()[:160]!r}"
    assert job_id in read_files(jobs_file)


# --- 2. Disk faults ----------------------------------------------------------------------


def run(*command: str) -> subprocess.CompletedProcess:
    return subprocess.run(command, capture_output=True, text=True, timeout=30, check=False)


@cache
def mount_refused() -> str | None:
    """Why this process cannot mount a tmpfs, or None if it can."""
    if os.geteuid() != 0 or not shutil.which("mount"):
        return "mounting a tmpfs needs root and mount(8)"
    with tempfile.TemporaryDirectory() as probe:
        done = run("mount", "-t", "tmpfs", "-o", "size=64k", "jobservice-probe", probe)
        if done.returncode != 0:
            return f"mount -t tmpfs was refused: {done.stderr.strip()}"
        run("umount", probe)
    return None


class Disk:
    """Where the jobs file lives, and a fault to switch on and off.

    `tmpfs`: a 4 MiB tmpfs mounted for the test; ENOSPC by filling it, EROFS by remounting
    it read-only. `injected`: a plain directory, and os.fsync failing for files in it."""

    def __init__(self, directory: Path, code: int, how: str, monkeypatch):
        self.directory = directory
        self.code = code
        self.how = how
        self.active = False
        self.injected = 0  # fsync calls refused
        self._filler = directory / "filler"
        if how == "tmpfs":
            directory.mkdir()
            done = run("mount", "-t", "tmpfs", "-o", "size=4m,mode=0755", "jobservice-test",
                       str(directory))
            assert done.returncode == 0, done.stderr
        else:
            directory.mkdir()
            real_fsync = os.fsync

            def fsync(fd):
                if self.active and self.ours(fd):
                    self.injected += 1
                    raise OSError(self.code, os.strerror(self.code))
                return real_fsync(fd)

            monkeypatch.setattr(os, "fsync", fsync)

    def ours(self, fd: int) -> bool:
        return fd_under(fd, self.directory)

    @property
    def jobs_file(self) -> Path:
        return self.directory / "jobs.json"

    def break_(self) -> None:
        if self.how == "injected":
            self.active = True
        elif self.code == errno.ENOSPC:
            with open(self._filler, "wb", buffering=0) as out:
                chunk = 1 << 16
                while True:
                    try:
                        out.write(b"\0" * chunk)
                    except OSError as exc:
                        assert exc.errno == errno.ENOSPC, exc
                        if chunk == 1:
                            break
                        chunk = max(1, chunk // 16)
        else:
            done = run("mount", "-o", "remount,ro", str(self.directory))
            assert done.returncode == 0, (
                f"cannot remount read-only (does the service hold a file open for writing "
                f"while idle?): {done.stderr.strip()}")

    def repair(self) -> None:
        if self.how == "injected":
            self.active = False
        elif self.code == errno.ENOSPC:
            self._filler.unlink()
        else:
            done = run("mount", "-o", "remount,rw", str(self.directory))
            assert done.returncode == 0, done.stderr

    def unmount(self) -> None:
        if self.how == "tmpfs":
            if run("umount", str(self.directory)).returncode != 0:
                run("umount", "-l", str(self.directory))


FAULTS = [
    pytest.param((errno.ENOSPC, "tmpfs"), id="ENOSPC-full-tmpfs"),
    pytest.param((errno.EROFS, "tmpfs"), id="EROFS-tmpfs-remounted-read-only"),
    pytest.param((errno.ENOSPC, "injected"), id="ENOSPC-injected"),
    pytest.param((errno.EIO, "injected"), id="EIO-injected"),
    pytest.param((errno.EROFS, "injected"), id="EROFS-injected"),
]
REAL_ENOSPC, REAL_EROFS, INJECTED_ENOSPC, INJECTED_EIO, INJECTED_EROFS = FAULTS


@pytest.fixture
def disk(request, tmp_path, monkeypatch):
    code, how = request.param
    if how == "tmpfs" and (why := mount_refused()):
        pytest.skip(f"real {errno.errorcode[code]} not simulated: {why}; the injected "
                    f"variant covers it")
    disk = Disk(tmp_path / "disk", code, how, monkeypatch)
    yield disk
    disk.unmount()


@pytest.fixture
def created(monkeypatch) -> list[str]:
    """The id of every job the service made, acknowledged or not, in order."""
    ids: list[str] = []
    new = jobservice.Job.new

    def recording_new(settings, now):
        job = new(settings, now)
        ids.append(job.id)
        return job

    monkeypatch.setattr(jobservice.Job, "new", staticmethod(recording_new))
    return ids


async def post_job(client, created: list[str]) -> tuple[int, dict, str]:
    """POST /jobs; its status, its body, and the id the service gave the job it made."""
    before = len(created)
    response = await client.post("/jobs")
    assert response.content_type == "application/json"
    body = await response.json()
    assert len(created) == before + 1
    return response.status, body, created[before]


async def post_acknowledged(client, created: list[str], count: int) -> list[str]:
    """POST /jobs count times while the disk works: every one must be a 201."""
    acknowledged = []
    for _ in range(count):
        status, body, job_id = await post_job(client, created)
        assert status == 201, body
        acknowledged.append(job_id)
    return acknowledged


def assert_refused(status: int, body: dict) -> None:
    assert status == 503, body
    assert body["error"]["code"] == "storage_unavailable", body
    assert isinstance(body["error"]["message"], str) and body["error"]["message"]


def warnings_from(caplog, start: int) -> list[logging.LogRecord]:
    return [record for record in caplog.records[start:]
            if record.name == "jobservice" and record.levelno >= logging.WARNING]


@pytest.mark.parametrize("disk", FAULTS, indirect=True)
async def test_disk_fault_refuses_new_jobs_keeps_reads_holds_resolutions_and_recovers(
        disk, start_service, open_events, created, caplog):
    caplog.set_level(logging.INFO, logger="jobservice")
    path = disk.jobs_file
    client = await start_service(DUE_SOON, path=path)
    acknowledged = await post_acknowledged(client, created, 5)
    if disk.how == "tmpfs" and disk.code == errno.EROFS:
        await client.close()  # closes the journal, or the kernel cannot remount read-only
        client = await start_service(DUE_SOON, path=path)
    watcher = Watcher((await open_events(client)).ws)

    logged = len(caplog.records)
    await asyncio.to_thread(disk.break_)
    refused = []
    # A filled tmpfs may still take a record or two in the journal's last page.
    for _ in range(64):
        status, body, job_id = await post_job(client, created)
        if status != 201:
            assert_refused(status, body)
            refused.append(job_id)
            break
        acknowledged.append(job_id)
    assert refused, "writing never failed; the fault was not simulated"
    failing_since = time.time()

    # While it fails: every POST is refused, reads work, due jobs stay pending.
    for _ in range(20):
        status, body, job_id = await post_job(client, created)
        assert_refused(status, body)
        refused.append(job_id)
    jobs = {job["id"]: job for job in await (await client.get("/jobs")).json()}
    assert list(jobs) == acknowledged
    due = max(jobservice.parse_time(job["dueAt"], "dueAt") for job in jobs.values())
    assert min(jobservice.parse_time(job["dueAt"], "dueAt") for job in jobs.values()) \
        > failing_since, "a job came due before the fault began; the test proves nothing"
    await asyncio.sleep(due + 0.5 - time.time())  # every job is overdue and was tried
    for job_id in acknowledged:
        response = await client.get(f"/jobs/{job_id}")
        assert response.status == 200
        assert (await response.json())["status"] == "pending"
    for job_id in refused[:3]:
        assert (await client.get(f"/jobs/{job_id}")).status == 404
    assert (await client.get("/jobs?status=pending")).status == 200
    assert (await client.get("/healthz")).status == 200
    assert not watcher.named("ON_RESOLVED_JOB"), "a resolution was announced while failing"
    assert not set(watcher.named("ON_CREATED_JOB")) & set(refused)
    if disk.how == "injected":
        assert disk.injected > len(refused), "resolutions were not even attempted"
    faults = warnings_from(caplog, logged)
    assert len(faults) == 1, [record.getMessage() for record in faults]
    assert faults[0].levelno == logging.ERROR
    assert os.strerror(disk.code) in faults[0].getMessage()

    # Writing works again: no restart, the next POST is stored, pending jobs resolve.
    logged = len(caplog.records)
    await asyncio.to_thread(disk.repair)
    status, body, job_id = await post_job(client, created)
    assert status == 201, body
    acknowledged.append(job_id)
    final = await watcher.resolutions(acknowledged[:-1], timeout=10)
    assert {job["status"] for job in final.values()} == {"resolved"}
    recovered = warnings_from(caplog, logged)
    assert [record.getMessage() for record in recovered] == [
        f"storage works again: {path}"]
    jobs = {job["id"]: job for job in await (await client.get("/jobs")).json()}
    assert list(jobs) == acknowledged
    for job_id in refused:
        assert (await client.get(f"/jobs/{job_id}")).status == 404
    assert not set(watcher.named("ON_CREATED_JOB")) & set(refused)
    on_disk = read_files(path)
    assert set(acknowledged) <= on_disk.keys() and not set(refused) & on_disk.keys()
    await watcher.close()
    await client.close()

    client = await start_service(DUE_SOON, path=path)
    events = Watcher((await open_events(client, "?since=0")).ws)
    jobs = {job["id"]: job for job in await (await client.get("/jobs")).json()}
    assert list(jobs) == acknowledged
    await events.resolutions(acknowledged, timeout=10)
    await events.close()
    await client.close()
    assert not set(refused) & read_files(path).keys()


@pytest.mark.parametrize("disk", [REAL_ENOSPC, INJECTED_EIO], indirect=True)
async def test_jobs_refused_during_a_fault_do_not_come_back_after_a_restart_during_it(
        disk, start_service, created):
    """The service stops (or dies) before writing ever works again. What it refused with a
    503 must not exist after the restart: a write that failed may have left the refused
    records in the journal, and they must not be read back as jobs."""
    path = disk.jobs_file
    client = await start_service(SLOW, path=path)
    acknowledged = await post_acknowledged(client, created, 3)
    await asyncio.to_thread(disk.break_)
    refused = []
    for _ in range(64):
        status, body, job_id = await post_job(client, created)
        if status == 201:
            assert not refused, "a POST succeeded after one was refused"
            acknowledged.append(job_id)
        else:
            assert_refused(status, body)
            refused.append(job_id)
            if len(refused) == 5:
                break
    assert refused, "writing never failed; the fault was not simulated"
    await client.close()  # shuts down while writing still fails
    await asyncio.to_thread(disk.repair)

    client = await start_service(SLOW, path=path)
    jobs = {job["id"]: job for job in await (await client.get("/jobs")).json()}
    assert set(acknowledged) <= jobs.keys()
    back = [job_id for job_id in refused if job_id in jobs]
    assert not back, f"refused with 503, then there after a restart: {back}"
    await client.close()


# --- 3. Nothing is announced or acknowledged before it is durable ------------------------


class FsyncGate:
    """Holds every fsync of the service's files, in the thread that makes it, until opened.
    A threading.Event, not an asyncio one: an fsync made on the event loop would block the
    loop, and with it the test, which then fails on its own timeout instead of hanging."""

    def __init__(self, directory: Path, monkeypatch):
        self.directory = str(directory)
        self.entered = threading.Event()
        self.released = threading.Event()
        self.closed = False
        self.on_loop_thread = False
        self.returned: list[float] = []  # time.monotonic() after each held fsync
        self.loop_thread = threading.get_ident()
        real_fsync = os.fsync

        def fsync(fd):
            held = self.closed and self._ours(fd)
            if held:
                if threading.get_ident() == self.loop_thread:
                    self.on_loop_thread = True
                self.entered.set()
                self.released.wait(timeout=10)
            real_fsync(fd)
            if held:
                self.returned.append(time.monotonic())

        monkeypatch.setattr(os, "fsync", fsync)

    def _ours(self, fd: int) -> bool:
        return fd_under(fd, self.directory)

    def close(self) -> None:
        self.entered.clear()
        self.released.clear()
        self.returned.clear()
        self.closed = True

    def open(self) -> None:
        self.closed = False
        self.released.set()

    async def wait_entered(self) -> None:
        assert await asyncio.to_thread(self.entered.wait, 10), "no fsync was made"
        assert not self.on_loop_thread, "fsync ran on the event loop's thread"


async def test_no_event_and_no_201_before_the_change_is_fsynced(
        start_service, open_events, jobs_file, created, monkeypatch):
    gate = FsyncGate(jobs_file.parent, monkeypatch)
    client = await start_service({"JOB_DELAY_MIN": "0.8", "JOB_DELAY_MAX": "0.8"})
    watcher = Watcher((await open_events(client)).ws)
    # A first job opens the journal (and syncs its directory), so that below the one fsync
    # each change waits for is the fsync of its own journal record.
    status, body, first = await post_job(client, created)
    assert status == 201, body
    await watcher.resolutions([first])

    # Creation: while its fsync is held the POST hangs and nobody hears of the job.
    gate.close()
    posting = asyncio.create_task(client.post("/jobs"))
    await gate.wait_entered()
    job_id = created[-1]
    await asyncio.sleep(0.3)
    assert not posting.done(), "201 sent before the job was fsynced"
    assert job_id not in watcher.named("ON_CREATED_JOB"), "announced before it was fsynced"
    assert (await client.get(f"/jobs/{job_id}")).status == 404, "visible before fsynced"
    gate.open()
    response = await posting
    answered = time.monotonic()
    assert response.status == 201
    assert (await response.json())["id"] == job_id
    await watcher.wait(lambda: job_id in watcher.named("ON_CREATED_JOB"))
    [synced] = gate.returned
    assert answered >= synced
    assert watcher.arrival("ON_CREATED_JOB", job_id) >= synced

    # Resolution (due 0.8 s after creation): held at its fsync, neither announced nor visible.
    gate.close()
    await gate.wait_entered()
    await asyncio.sleep(0.3)
    assert job_id not in watcher.named("ON_RESOLVED_JOB"), "resolution announced before fsync"
    assert (await (await client.get(f"/jobs/{job_id}")).json())["status"] == "pending"
    gate.open()
    [resolved] = (await watcher.resolutions([job_id])).values()
    [synced] = gate.returned
    assert resolved["status"] == "resolved"
    assert watcher.arrival("ON_RESOLVED_JOB", job_id) >= synced
    assert (await (await client.get(f"/jobs/{job_id}")).json()) == resolved
    await watcher.close()
