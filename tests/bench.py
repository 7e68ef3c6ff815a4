"""Benchmark jobservice against a bare aiohttp handler: `python tests/bench.py`.

Not part of the test run (pytest collects only test_*.py). Every number that depends on
how busy the machine is, is reported next to a baseline measured in the same run, and as
the median of several repeats: this is meant to run on a small, shared, noisy machine.

What it measures (see --help for the knobs):

* POST /jobs throughput and p50/p99 latency at 64 connections with 0, 10,000 and
  100,000 jobs stored, against a bare aiohttp handler (POST returns a new UUID as JSON,
  nothing stored) started by this script as the ceiling: --pairs rounds (5), in each
  the bare handler and the 10,000-job service back to back, in alternating order, on
  asyncio's loop and again on uvloop (each against the bare handler on its own loop);
  beside req/s, each process's CPU time per request, which a busy machine moves less.
  wrk -t2 -c64 with a Lua script. Then system calls per POST (strace -c -f).
* GET /jobs/{id} p99 at 1,000 and 100,000 jobs (random known ids, wrk + Lua);
  GET /jobs for 10,000 and 100,000 jobs, and its ?limit=100 pages.
* RSS per pending job after creating 100,000 jobs through POST /jobs (and, for
  comparison, after loading them from the file).
* Restart: process start to /healthz 200 with 100,000 and 1,000,000 jobs in the file.
* Fan-out: one resolution to 1,000 /ws clients (4 client processes x 250 sockets),
  time until the last one has it; the same to 1,000 Socket.IO clients on long-polling,
  and the service's RSS per idle polling session.
* Bulk changes (--only bulk): POST /jobs/retry over 50,000 (500,000) failed jobs and
  POST /jobs/delete over as many resolved ones, 100,000 (1,000,000) stored: time to the
  202 and until all are stored, and the slowest GET /healthz of another client meanwhile.
* Unsplash efficiency: API calls per resolved job for a burst of 3,000 jobs against
  tests/fake_unsplash.py.
* Under the Unsplash quota (--only quota), the fake playing a key's limit scaled 100x
  in time (an hour is 36 s): a demo key (5 calls a window) at 10 jobs/s for 3 minutes,
  and a production key (500 a window) at 1,000 jobs/s for a minute, delays 5-60 s:
  resolution lateness p99, the share of fresh photos, the calls made of those the
  windows allowed, and refused calls.
* Redis scale-out mode (REDIS_URL), on redis-servers of its own (AOF fsynced always):
  POST /jobs throughput of one node and of two nodes on one Redis as a share of the
  file mode (alternating, same run); event latency from a resolution on node A to a /ws
  client on node B; fan-out to 3,000 /ws clients over 3 nodes; Redis used_memory per
  pending job (imported, and created by POST with its stream entries) and a node's RSS
  per job of its replica; a node's start on 300,000 and 1,000,000 jobs (time to /healthz
  200, the slowest PING of another client every 5 ms and Redis's latency monitor, RSS
  per job and its peak while loading); POST with REDIS_MIN_REPLICAS_ACK=1 against 0 on
  one replica; and a failover (primary SIGKILLed under load, three sentinels): the kill
  to a 201 on every node, and how many 201s were lost. `--redis-part` picks parts.
* Session routing (--only routing): a Socket.IO POST and a long-poll answered by the
  session's own node against the same relayed through another node (p50/p99; a poll is
  timed from the POST /jobs whose event it carries); one resolution to 1,000 stock
  socket.io-client sockets (npm, default options, 4 Node processes x 250) on
  `--workers 4`, until the last has it; POST /jobs throughput of `--workers 2` against
  one process, both in Redis mode on one redis-server (alternating, same run).

Stores are pre-populated by writing a snapshot in the service's own format
({"version":1,"seq":N,"jobs":[...]}) with pending jobs due far in the future.
Results go to bench-results.json at the repo root (git-ignored) unless --out says otherwise.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import http.client
import json
import multiprocessing
import os
import platform
import shutil
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import threading
import time
import uuid
from datetime import UTC, datetime
from pathlib import Path

import aiohttp

ROOT = Path(__file__).resolve().parent.parent
SERVICE = ROOT / "jobservice.py"
FAKE_UNSPLASH = ROOT / "tests" / "fake_unsplash.py"
PY = sys.executable

# Jobs created by the throughput and memory runs must stay pending: nothing resolves
# during a measurement unless the measurement is about resolving.
LONG_DELAYS = {"JOB_DELAY_MIN": "86400", "JOB_DELAY_MAX": "172800", "JOB_DELAY_STEP": "60"}
# Settings the service reads from the environment; the caller's own values are dropped.
SERVICE_VARS = ("HOST", "PORT", "JOBS_FILE", "UNSPLASH_ACCESS_KEY", "UNSPLASH_API_URL",
                "UNSPLASH_TIMEOUT", "JOB_DELAY_MIN", "JOB_DELAY_MAX", "JOB_DELAY_STEP",
                "RETRY_BASE_DELAY", "RETRY_MAX_DELAY", "JOB_MAX_ATTEMPTS", "CORS_ORIGINS",
                "REDIS_URL", "REDIS_PREFIX", "REDIS_TIMEOUT", "JOB_LEASE",
                "UNSPLASH_QUOTA_WINDOW", "PHOTO_REUSE", "PHOTO_WAIT", "LOOP")

# On the loop argv[2] names: the handler stays stock, so each share keeps its meaning.
BARE_APP = r'''
import asyncio, json, sys, uuid
from aiohttp import web

async def create(request):
    await request.read()
    return web.Response(text=json.dumps({"id": str(uuid.uuid4())}), status=201,
                        content_type="application/json")

async def health(request):
    return web.Response(text='{"status":"ok"}', content_type="application/json")

app = web.Application()
app.router.add_post("/jobs", create)
app.router.add_get("/healthz", health)
if sys.argv[2] == "uvloop":
    import uvloop
    loop = uvloop.new_event_loop()
else:
    loop = asyncio.SelectorEventLoop()
web.run_app(app, host="127.0.0.1", port=int(sys.argv[1]), access_log=None, print=None,
            loop=loop)
'''

# wrk's done() prints one machine-readable line; latencies are in microseconds.
LUA_DONE = r'''
done = function(summary, latency, requests)
  local e = summary.errors
  io.write(string.format(
    'BENCH {"requests":%.0f,"duration_us":%.0f,"connect_errors":%.0f,"read_errors":%.0f,' ..
    '"write_errors":%.0f,"status_errors":%.0f,"timeouts":%.0f,"p50_us":%.1f,"p90_us":%.1f,' ..
    '"p99_us":%.1f,"max_us":%.1f,"mean_us":%.1f}\n',
    summary.requests, summary.duration, e.connect, e.read, e.write, e.status, e.timeout,
    latency:percentile(50), latency:percentile(90), latency:percentile(99), latency.max,
    latency.mean))
end
'''

LUA_POST = r'''
wrk.method = "POST"
wrk.body = "{}"
wrk.headers["Content-Type"] = "application/json"
''' + LUA_DONE

BENCH_TOKEN = "bench-token-0123456789abcdef"
LUA_POST_TOKEN = r'''
wrk.method = "POST"
wrk.body = "{}"
wrk.headers["Content-Type"] = "application/json"
wrk.headers["Authorization"] = "Bearer bench-token-0123456789abcdef"
''' + LUA_DONE

LUA_GET = LUA_DONE  # a fixed path, given in the URL

LUA_GET_RANDOM_ID = r'''
local ids = {}
init = function(args)
  for line in io.lines(args[1]) do
    if #line > 0 then ids[#ids + 1] = line end
  end
  local salt = tonumber(tostring({}):match("0x(%x+)") or "0", 16) or 0
  math.randomseed(os.time() + salt % 1000003)
end
request = function()
  return wrk.format("GET", "/jobs/" .. ids[math.random(#ids)])
end
''' + LUA_DONE


# --- Small helpers ------------------------------------------------------------------


def log(message: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {message}", file=sys.stderr, flush=True)


def median(values):
    return statistics.median(values) if values else None


def percentile(values, share: float):
    if not values:
        return None
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, max(0, round(share * len(ordered)) - 1))]


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def iso(ts: float) -> str:
    moment = datetime.fromtimestamp(ts, UTC)
    return moment.strftime("%Y-%m-%dT%H:%M:%S.") + f"{moment.microsecond // 1000:03d}Z"


def parse_iso(text: str) -> float:
    return datetime.fromisoformat(text.replace("Z", "+00:00")).timestamp()


def service_env(extra: dict | None = None) -> dict:
    """The caller's environment without the service's settings; asyncio's loop unless
    `extra` names another (LOOP)."""
    env = {key: value for key, value in os.environ.items() if key not in SERVICE_VARS}
    env["LOOP"] = "asyncio"
    env.update(extra or {})
    return env


def loadavg() -> list[float]:
    try:
        return [float(x) for x in Path("/proc/loadavg").read_text().split()[:3]]
    except OSError:
        return []


def request(port: int, method: str, path: str, body: bytes | None = None,
            timeout: float = 10.0):
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=timeout)
    try:
        headers = {"Content-Type": "application/json"} if body is not None else {}
        conn.request(method, path, body=body, headers=headers)
        response = conn.getresponse()
        return response.status, response.getheaders(), response.read()
    finally:
        conn.close()


class Server:
    """A server process started by this script; stopped by its own pid only."""

    running: list[Server] = []

    def __init__(self, name: str, args: list[str], env: dict, log_path: Path, port: int):
        self.name, self.port, self.log_path = name, port, log_path
        self.log_file = open(log_path, "wb")  # closed in stop()
        self.started = time.monotonic()
        self.proc = subprocess.Popen(args, cwd=ROOT, env=env, stdin=subprocess.DEVNULL,
                                     stdout=self.log_file, stderr=subprocess.STDOUT)
        Server.running.append(self)

    @property
    def pid(self) -> int:
        return self.proc.pid

    def wait_healthy(self, timeout: float = 120.0) -> float:
        """Seconds from process start until it first answers (/healthz 200)."""
        deadline = self.started + timeout
        while True:
            if self.proc.poll() is not None:
                raise RuntimeError(f"{self.name} exited with {self.proc.returncode}:\n"
                                   + self.log_path.read_text(errors="replace")[-3000:])
            if self.answers():
                return time.monotonic() - self.started
            if time.monotonic() > deadline:
                raise RuntimeError(f"{self.name} not answering after {timeout:g} s")
            time.sleep(0.005)

    def answers(self) -> bool:
        try:
            return request(self.port, "GET", "/healthz", timeout=2.0)[0] == 200
        except OSError:
            return False

    def health(self) -> dict:
        return json.loads(request(self.port, "GET", "/healthz")[2])

    def status(self, field: str) -> int:
        for line in Path(f"/proc/{self.pid}/status").read_text().splitlines():
            if line.startswith(field + ":"):
                return int(line.split()[1]) * 1024
        raise KeyError(field)

    def rss(self) -> int:
        return self.status("VmRSS")

    def cpu_seconds(self) -> float:
        """User + system CPU time of the process so far (all threads): unlike wall time,
        it hardly depends on what else the machine is doing."""
        fields = Path(f"/proc/{self.pid}/stat").read_text().rpartition(")")[2].split()
        return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")

    def stop(self, timeout: float = 60.0) -> None:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(timeout)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        self.log_file.close()
        if self in Server.running:
            Server.running.remove(self)


def start_service(workdir: Path, name: str, snapshot: Path | None = None,
                  env: dict | None = None, program: Path = SERVICE) -> Server:
    """The service (or another build's `program`) on a fresh copy of `snapshot` (or an
    empty store) in its own folder."""
    folder = workdir / f"{name}-{uuid.uuid4().hex[:8]}"
    folder.mkdir()
    data = folder / "jobs.json"
    if snapshot is not None:
        shutil.copyfile(snapshot, data)
    port = free_port()
    return Server(name, [PY, str(program), "--port", str(port), "--data", str(data)],
                  service_env(env), folder / "service.log", port)


def start_bare(workdir: Path, loop: str = "asyncio") -> Server:
    port = free_port()
    return Server(f"bare aiohttp on {loop}", [PY, "-c", BARE_APP, str(port), loop],
                  service_env(), workdir / f"bare-{port}.log", port)


def write_snapshot(path: Path, count: int) -> list[str]:
    """A jobs.json with `count` pending jobs due in 30+ days, in the service's format."""
    now = time.time()
    created, due = iso(now - 60), iso(now + 30 * 86400)
    ids = []
    for start in range(0, count, 100_000):  # UUID-shaped (version 4) ids, made in bulk
        blob = os.urandom(16 * min(100_000, count - start)).hex()
        ids += [f"{h[:8]}-{h[8:12]}-4{h[13:16]}-a{h[17:20]}-{h[20:32]}"
                for h in (blob[i:i + 32] for i in range(0, len(blob), 32))]
    with open(path, "w", encoding="utf-8") as out:
        out.write(f'{{"version":1,"seq":{count},"jobs":[\n')
        chunk = []
        for seq, job_id in enumerate(ids, start=1):
            chunk.append(
                f'{{"id":"{job_id}","status":"pending","result":null,"createdAt":"{created}",'
                f'"dueAt":"{due}","resolvedAt":null,"attempts":0,"error":null,"image":null,'
                f'"seq":{seq}}}')
            if len(chunk) == 10_000:
                out.write(",\n".join(chunk))
                out.write(",\n" if seq < count else "")
                chunk = []
        out.write(",\n".join(chunk))
        out.write("\n]}\n")
    return ids


class Snapshots:
    """Snapshot files made once per size, copied for each service start."""

    def __init__(self, workdir: Path):
        self.folder = workdir / "snapshots"
        self.folder.mkdir()
        self.files: dict[int, tuple[Path, Path]] = {}

    def get(self, count: int) -> tuple[Path | None, Path | None]:
        if count == 0:
            return None, None
        if count not in self.files:
            started = time.monotonic()
            path = self.folder / f"jobs-{count}.json"
            ids = write_snapshot(path, count)
            ids_path = self.folder / f"ids-{count}.txt"
            ids_path.write_text("\n".join(ids) + "\n")
            self.files[count] = (path, ids_path)
            log(f"wrote a snapshot of {count:,} jobs ({path.stat().st_size / 1e6:.0f} MB) "
                f"in {time.monotonic() - started:.1f} s")
        return self.files[count]


# --- wrk ----------------------------------------------------------------------------


def wrk_version() -> str:
    result = subprocess.run(["wrk", "-v"], capture_output=True, text=True)
    return (result.stdout or result.stderr).splitlines()[0].strip()


class Wrk:
    def __init__(self, workdir: Path, threads: int, connections: int):
        self.threads, self.connections = threads, connections
        self.scripts = {}
        for name, text in (("post", LUA_POST), ("post_token", LUA_POST_TOKEN),
                           ("get", LUA_GET), ("get_random_id", LUA_GET_RANDOM_ID)):
            path = workdir / f"{name}.lua"
            path.write_text(text)
            self.scripts[name] = path

    def command(self, url: str, script: str, duration: float, args=()) -> list[str]:
        return ["wrk", f"-t{self.threads}", f"-c{self.connections}",
                f"-d{max(1, round(duration))}s", "--timeout", "10s",
                "-s", str(self.scripts[script]), url, *(["--", *args] if args else [])]

    def run(self, url: str, script: str, duration: float, args=()) -> dict:
        cmd = self.command(url, script, duration, args)
        result = subprocess.run(cmd, capture_output=True, text=True, timeout=duration + 60)
        return self.parse(result.stdout, result.stderr, cmd)

    @staticmethod
    def parse(stdout: str, stderr: str, cmd) -> dict:
        for line in stdout.splitlines():
            if line.startswith("BENCH "):
                data = json.loads(line[6:])
                seconds = data["duration_us"] / 1e6
                data["rps"] = data["requests"] / seconds if seconds else 0.0
                data["p50_ms"] = data["p50_us"] / 1000
                data["p99_ms"] = data["p99_us"] / 1000
                data["max_ms"] = data["max_us"] / 1000
                data["errors"] = sum(data[key] for key in (
                    "connect_errors", "read_errors", "write_errors", "status_errors",
                    "timeouts"))
                return data
        raise RuntimeError(f"no result from {' '.join(cmd)}:\n{stdout}\n{stderr}")


def post_until(ctx, server: Server, count: int, timeout: float = 300.0) -> tuple[dict, float]:
    """POST /jobs with wrk (64 connections) until the service holds `count` jobs: (wrk's
    figures, the seconds it took)."""
    cmd = ctx.wrk.command(f"http://127.0.0.1:{server.port}/jobs", "post", timeout + 60)
    started = time.monotonic()
    wrk = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        while server.health()["jobs"] < count:
            if wrk.poll() is not None or time.monotonic() - started > timeout:
                raise RuntimeError(f"wrk stopped before {count:,} jobs were created")
            time.sleep(0.1)
    finally:
        wrk.send_signal(signal.SIGINT)  # wrk stops early and reports on SIGINT
        stdout, stderr = wrk.communicate(timeout=60)
    return Wrk.parse(stdout, stderr, cmd), time.monotonic() - started


# --- Results ------------------------------------------------------------------------


class Results:
    def __init__(self):
        self.rows: list[dict] = []
        self.raw: dict = {}

    def add(self, metric: str, value, unit: str, target: str = "", ok: bool | None = None,
            fmt: str = "{:,.1f}", **details) -> None:
        self.rows.append({"metric": metric, "value": value, "unit": unit, "target": target,
                          "pass": ok, "display": (fmt.format(value) if value is not None
                                                  else "n/a") + (f" {unit}" if unit else ""),
                          "details": details})

    def table(self) -> str:
        def verdict(row):
            return {True: "PASS", False: "FAIL"}.get(row["pass"], "info" if row["target"] == ""
                                                      else "skip")
        lines = [("metric", "value", "target", "pass/fail")]
        lines += [(row["metric"], row["display"], row["target"] or "-", verdict(row))
                  for row in self.rows]
        widths = [max(len(line[i]) for line in lines) for i in range(4)]
        out = []
        for n, line in enumerate(lines):
            out.append("  ".join(cell.ljust(widths[i]) for i, cell in enumerate(line)).rstrip())
            if n == 0:
                out.append("  ".join("-" * width for width in widths))
        return "\n".join(out)


# --- POST /jobs throughput -------------------------------------------------------------


def bench_post(ctx, results: Results) -> None:
    """Rounds of the bare handler and the service at 0, 10,000 and 100,000 jobs on
    asyncio's loop, and of the bare handler and the 10,000-job service on uvloop. Each
    bare handler and the 10,000-job service on the same loop run back to back, in
    alternating order, so each round gives one pair per loop measured under the same
    machine load; a share is taken against its round's bare run on the same loop, and
    the median over rounds is reported."""
    sizes = [0, 10_000, 100_000]
    targets = [("bare", "asyncio"), *((size, "asyncio") for size in sizes),
               ("bare", "uvloop"), (10_000, "uvloop")]
    runs: dict = {target: [] for target in targets}
    ratios: dict = {target: [] for target in targets if target[0] != "bare"}
    cpu_ratios: dict = {target: [] for target in ratios}
    for size in sizes:
        ctx.snapshots.get(size)
    for round_ in range(ctx.pairs):
        pairs = [[("bare", loop), (10_000, loop)] for loop in ("asyncio", "uvloop")]
        rest = [(0, "asyncio"), (100_000, "asyncio")]
        if round_ % 2:
            pairs, rest = [pair[::-1] for pair in pairs[::-1]], rest[::-1]
        this = {}
        for target in [*pairs[0], *pairs[1], *rest]:
            size, loop = target
            if size == "bare":
                server = start_bare(ctx.workdir, loop)
            else:
                server = start_service(ctx.workdir, f"post-{size}-{loop}",
                                       ctx.snapshots.get(size)[0], {**LONG_DELAYS, "LOOP": loop})
            try:
                server.wait_healthy()
                url = f"http://127.0.0.1:{server.port}"
                ctx.wrk.run(url + "/healthz", "get", 1)  # warm-up: connections, no jobs
                before = server.health().get("jobs") if size != "bare" else None
                cpu = server.cpu_seconds()
                run = ctx.wrk.run(url + "/jobs", "post", ctx.duration)
                # The process's CPU time (all its threads) per request: unlike req/s, it
                # hardly depends on what else the machine runs meanwhile.
                run["cpu_us"] = (server.cpu_seconds() - cpu) / max(run["requests"], 1) * 1e6
                run["jobs_before"] = before
                run["rss_after"] = server.rss()
                run["load_average"] = loadavg()
            finally:
                server.stop()
            this[target] = run
            runs[target].append(run)
            log(f"POST /jobs round {round_ + 1} {size!s:>6} on {loop:7}: {run['rps']:,.0f} "
                f"req/s, p50 {run['p50_ms']:.1f} ms, p99 {run['p99_ms']:.1f} ms, "
                f"{run['cpu_us']:.0f} us CPU a request, errors {run['errors']}; load "
                f"{run['load_average']}")
        for target in ratios:
            bare = this[("bare", target[1])]
            ratios[target].append(this[target]["rps"] / bare["rps"])
            cpu_ratios[target].append(bare["cpu_us"] / this[target]["cpu_us"])
    results.raw["post"] = {"runs": {f"{size} {loop}": value
                                    for (size, loop), value in runs.items()},
                           "ratios": {f"{size} {loop}": value
                                      for (size, loop), value in ratios.items()},
                           "cpu_ratios": {f"{size} {loop}": value
                                          for (size, loop), value in cpu_ratios.items()}}
    if shutil.which("strace"):
        traced = syscalls_per_post(ctx, ctx.snapshots.get(10_000)[0])
        results.raw["post"]["syscalls"] = traced
        per_post = traced["per_post"]
        # Per request, a call shows as ~1.0; the batch's write and fsync are shared by
        # the requests of a batch and come out well below. futex is the GIL passing
        # between the event loop and the thread that fsyncs (strace makes it pass more).
        socket_io = {"epoll_wait", "recvfrom", "sendto", "read", "write", "writev", "recvmsg",
                     "sendmsg", "epoll_ctl", "accept4", "getsockname", "getpeername",
                     "setsockopt", "ioctl", "close", "futex"}
        ours = {name: count for name, count in per_post.items()
                if name not in socket_io and name != "getpid" and count >= 0.5}
        results.add("POST /jobs @ 10,000: system calls per request (strace -c)",
                    sum(per_post.values()), "", fmt="{:.2f}", per_call=per_post)
        results.add("POST /jobs: system calls of ours per request beyond socket I/O "
                    "(getpid is asyncio's)", sum(ours.values()), "", "0", not ours,
                    fmt="{:.3f}", which=ours, getrandom=per_post.get("getrandom", 0),
                    getpid=per_post.get("getpid", 0))

    for loop in ("asyncio", "uvloop"):
        bare = runs[("bare", loop)]
        results.add(f"POST /jobs bare aiohttp handler on {loop} (ceiling)",
                    median([run["rps"] for run in bare]), "req/s", fmt="{:,.0f}",
                    repeats=[run["rps"] for run in bare])
        results.add(f"POST /jobs bare aiohttp handler on {loop}: p99 (machine noise floor)",
                    median([run["p99_ms"] for run in bare]), "ms", fmt="{:.1f}",
                    repeats=[run["p99_ms"] for run in bare])
    for target in ratios:
        size, loop = target
        rps = median([run["rps"] for run in runs[target]])
        ratio = median(ratios[target])
        p50 = median([run["p50_ms"] for run in runs[target]])
        p99 = median([run["p99_ms"] for run in runs[target]])
        errors = sum(run["errors"] for run in runs[target])
        label = f"POST /jobs @ {size:,} jobs" + (" on uvloop" if loop == "uvloop" else "")
        results.add(f"{label}: throughput", rps, "req/s", fmt="{:,.0f}",
                    repeats=[run["rps"] for run in runs[target]], errors=errors)
        share_target = {(10_000, "asyncio"): 0.85, (100_000, "asyncio"): 0.50}.get(target)
        if share_target is None:
            results.add(f"{label}: share of bare on {loop}", ratio * 100, "%", fmt="{:.1f}",
                        per_round=ratios[target])
        else:
            results.add(f"{label}: share of bare on {loop} (median of {ctx.pairs} rounds)",
                        ratio * 100, "%", f">= {share_target:.0%}", ratio >= share_target,
                        fmt="{:.1f}", per_round=ratios[target])
        results.add(f"{label}: CPU per request, the bare handler's over the service's",
                    median(cpu_ratios[target]) * 100, "%", fmt="{:.1f}",
                    per_round=cpu_ratios[target],
                    cpu_us=[run["cpu_us"] for run in runs[target]])
        results.add(f"{label}: p50", p50, "ms", fmt="{:.1f}")
        p99_target = 25 if size == 10_000 else 50
        results.add(f"{label}: p99", p99, "ms", f"< {p99_target} ms",
                    p99 < p99_target and errors == 0, fmt="{:.1f}",
                    repeats=[run["p99_ms"] for run in runs[target]], errors=errors)
    for label, target in (("service @ 10,000", 10_000), ("bare handler", "bare")):
        on = {loop: median([run["rps"] for run in runs[(target, loop)]])
              for loop in ("asyncio", "uvloop")}
        results.add(f"POST /jobs {label}: uvloop's throughput over asyncio's",
                    on["uvloop"] / on["asyncio"], "x", fmt="{:.2f}")


def syscalls_per_post(ctx, snapshot: Path | None) -> dict:
    """`strace -c -f` on the service while wrk POSTs: system calls per request, by name.
    strace slows the process a lot, so this run's throughput means nothing; the counts
    per request are what it is for."""
    server = start_service(ctx.workdir, "strace", snapshot, LONG_DELAYS)
    summary = ctx.workdir / "strace.txt"
    try:
        server.wait_healthy()
        url = f"http://127.0.0.1:{server.port}"
        ctx.wrk.run(url + "/healthz", "get", 1)
        tracer = subprocess.Popen(["strace", "-c", "-f", "-q", "-o", str(summary),
                                   "-p", str(server.pid)], stderr=subprocess.DEVNULL)
        time.sleep(1.0)  # attached to every thread
        before = server.health()["jobs"]
        ctx.wrk.run(url + "/jobs", "post", 3)
        posts = server.health()["jobs"] - before
        tracer.send_signal(signal.SIGINT)
        tracer.wait(30)
    finally:
        server.stop()
    calls = {}
    for line in summary.read_text().splitlines():
        fields = line.split()
        if len(fields) >= 5 and fields[-1].isidentifier() and fields[3].isdigit() \
                and fields[-1] != "total":
            calls[fields[-1]] = int(fields[3])
    return {"posts": posts, "per_post": {name: count / max(posts, 1)
                                         for name, count in sorted(calls.items())}}


def bench_access(ctx, results: Results) -> None:
    """POST /jobs with API_TOKEN and a CLIENT_RATE_LIMIT that is never hit, against the
    same service with neither, alternating, 10,000 jobs stored."""
    snapshot = ctx.snapshots.get(10_000)[0]
    setups = {"open": ({}, "post"),
              "token": ({"API_TOKEN": BENCH_TOKEN, "CLIENT_RATE_LIMIT": "1000000/s"},
                        "post_token")}
    runs: dict = {name: [] for name in setups}
    for repeat in range(max(ctx.repeats, 3)):
        for name in (list(setups) if repeat % 2 == 0 else list(setups)[::-1]):
            env, script = setups[name]
            server = start_service(ctx.workdir, f"access-{name}", snapshot,
                                   {**LONG_DELAYS, **env})
            try:
                server.wait_healthy()
                url = f"http://127.0.0.1:{server.port}"
                ctx.wrk.run(url + "/healthz", "get", 1)
                run = ctx.wrk.run(url + "/jobs", script, ctx.duration)
            finally:
                server.stop()
            assert run["errors"] == 0, run
            runs[name].append(run)
            log(f"POST /jobs access {name:>5}: {run['rps']:,.0f} req/s")
    ratios = [token["rps"] / plain["rps"]
              for plain, token in zip(runs["open"], runs["token"], strict=True)]
    results.raw["access"] = {"runs": runs, "ratios": ratios}
    results.add("POST /jobs with a token and a rate limit never hit, share of without",
                median(ratios) * 100, "%", ">= 90 %", median(ratios) >= 0.9, fmt="{:.0f}",
                per_repeat=ratios)


# --- Reads ----------------------------------------------------------------------------


def bench_reads(ctx, results: Results) -> None:
    snap_1k, ids_1k = ctx.snapshots.get(1_000)
    snap_10k, _ = ctx.snapshots.get(10_000)
    snap_100k, ids_100k = ctx.snapshots.get(100_000)
    servers = {
        1_000: start_service(ctx.workdir, "get-1k", snap_1k, LONG_DELAYS),
        100_000: start_service(ctx.workdir, "get-100k", snap_100k, LONG_DELAYS),
        "list": start_service(ctx.workdir, "list-10k", snap_10k, LONG_DELAYS),
    }
    ids = {1_000: ids_1k, 100_000: ids_100k}
    try:
        for server in servers.values():
            server.wait_healthy()
        # GET /jobs/{id}: the two stores alternate within each repeat.
        by_id = {1_000: [], 100_000: []}
        for size in by_id:  # warm-up, not measured
            ctx.wrk.run(f"http://127.0.0.1:{servers[size].port}/jobs", "get_random_id",
                        1, [str(ids[size])])
        for repeat in range(ctx.repeats):
            for size in by_id:
                run = ctx.wrk.run(f"http://127.0.0.1:{servers[size].port}/jobs",
                                  "get_random_id", ctx.duration, [str(ids[size])])
                by_id[size].append(run)
                log(f"GET /jobs/{{id}} repeat {repeat + 1} @ {size:>7,}: {run['rps']:,.0f} "
                    f"req/s, p99 {run['p99_ms']:.1f} ms, errors {run['errors']}")
        ratios = [big["p99_ms"] / small["p99_ms"]
                  for small, big in zip(by_id[1_000], by_id[100_000], strict=True)]
        ratio = median([run["p99_ms"] for run in by_id[100_000]]) / median(
            [run["p99_ms"] for run in by_id[1_000]])
        results.raw["get_by_id"] = {str(k): v for k, v in by_id.items()}
        for size, runs in by_id.items():
            results.add(f"GET /jobs/{{id}} @ {size:,} jobs: p99", median(
                [run["p99_ms"] for run in runs]), "ms", fmt="{:.1f}",
                rps=median([run["rps"] for run in runs]),
                repeats=[run["p99_ms"] for run in runs],
                errors=sum(run["errors"] for run in runs))
        # "Within 1.5x of each other": either may be the slower one.
        results.add("GET /jobs/{id} p99 ratio 100k / 1k", ratio, "x", "0.67x - 1.5x",
                    1 / 1.5 <= ratio <= 1.5, fmt="{:.2f}", per_repeat=ratios,
                    rss_100k_after=servers[100_000].rss())

        # GET /jobs (the whole list of 10,000) over one kept-alive connection.
        port = servers["list"].port
        conn = http.client.HTTPConnection("127.0.0.1", port, timeout=30)
        times, cold, size = [], None, 0
        for n in range(1 + max(5, ctx.repeats * 5)):
            started = time.perf_counter()
            conn.request("GET", "/jobs")
            response = conn.getresponse()
            body = response.read()
            elapsed = (time.perf_counter() - started) * 1000
            if n == 0:
                cold, size = elapsed, len(body)
                assert len(json.loads(body)) == 10_000, "the list should hold 10,000 jobs"
            else:
                times.append(elapsed)
        results.raw["list"] = {"cold_ms": cold, "warm_ms": times, "bytes": size}
        results.add("GET /jobs (10,000 jobs) median", median(times), "ms", "< 50 ms",
                    median(times) < 50, fmt="{:.1f}", first_request_ms=cold, bytes=size,
                    repeats=times)
        results.add("GET /jobs (10,000 jobs) first request", cold, "ms", fmt="{:.1f}")

        # GET /jobs, every one of 100,000 jobs, warm: what the old frontend asks for after
        # each job it creates. Also the peak RSS it costs the service.
        big = servers[100_000]
        conn100 = http.client.HTTPConnection("127.0.0.1", big.port, timeout=60)
        hwm_before, times100 = big.status("VmHWM"), []
        for n in range(1 + max(5, ctx.repeats * 3)):
            started = time.perf_counter()
            conn100.request("GET", "/jobs")
            body = conn100.getresponse().read()
            if n:
                times100.append((time.perf_counter() - started) * 1000)
            else:
                assert len(json.loads(body)) == 100_000
        conn100.close()
        results.raw["list_100k"] = {"warm_ms": times100, "bytes": len(body)}
        results.add("GET /jobs (100,000 jobs) median, warm", median(times100), "ms",
                    "< 150 ms", median(times100) < 150, fmt="{:.1f}", repeats=times100,
                    bytes=len(body),
                    peak_rss_growth_mb=(big.status("VmHWM") - hwm_before) / 2**20)

        # ?limit=100 pages: walk the whole list by its Link headers, sequentially.
        page_times, walks = [], []
        for _ in range(max(1, ctx.repeats)):
            path, pages, started_walk = "/jobs?limit=100", 0, time.perf_counter()
            while path:
                started = time.perf_counter()
                conn.request("GET", path)
                response = conn.getresponse()
                response.read()
                page_times.append((time.perf_counter() - started) * 1000)
                pages += 1
                link = response.getheader("Link") or ""
                path = link[link.index("<") + 1:link.index(">")] if "<" in link else None
            walks.append({"pages": pages, "ms": (time.perf_counter() - started_walk) * 1000})
        conn.close()
        results.raw["pages"] = {"page_ms": page_times, "walks": walks}
        results.add("GET /jobs?limit=100 page, sequential median", median(page_times), "ms",
                    fmt="{:.2f}", p99_ms=percentile(page_times, 0.99),
                    pages_per_walk=walks[0]["pages"],
                    walk_ms=median([walk["ms"] for walk in walks]))
        page_runs = []
        for _ in range(ctx.repeats):
            page_runs.append(ctx.wrk.run(f"http://127.0.0.1:{port}/jobs?limit=100", "get",
                                         ctx.duration))
        results.raw["pages"]["wrk"] = page_runs
        results.add("GET /jobs?limit=100 page @64 conns: p99",
                    median([run["p99_ms"] for run in page_runs]), "ms", fmt="{:.1f}",
                    rps=median([run["rps"] for run in page_runs]))
    finally:
        for server in servers.values():
            server.stop()


# --- Memory ---------------------------------------------------------------------------


def bench_memory(ctx, results: Results) -> None:
    target_jobs = ctx.memory_jobs
    server = start_service(ctx.workdir, "memory", None, LONG_DELAYS)
    try:
        server.wait_healthy()
        for _ in range(200):  # let the HTTP machinery allocate what it keeps
            request(server.port, "GET", "/healthz")
        time.sleep(0.5)
        rss_empty = server.rss()
        run, created_in = post_until(ctx, server, target_jobs)
        time.sleep(3.0)  # let a compaction that is under way finish
        health = server.health()
        rss_full = server.rss()
        peak = server.status("VmHWM")
        jobs = health["jobs"]
        per_job = (rss_full - rss_empty) / jobs
        results.raw["memory_post"] = {"rss_empty": rss_empty, "rss_full": rss_full,
                                      "vm_hwm": peak, "jobs": jobs, "pending": health["pending"],
                                      "seconds": created_in, "wrk": run}
        results.add(f"RSS per pending job ({target_jobs // 1000}k created via POST)", per_job,
                    "B", "< 1024 B",
                    per_job < 1024 and health["pending"] == jobs, fmt="{:,.0f}",
                    rss_empty_mb=rss_empty / 2**20, rss_full_mb=rss_full / 2**20,
                    peak_mb=peak / 2**20, jobs=jobs)
        log(f"memory: {jobs:,} jobs created in {created_in:.1f} s ({run['rps']:,.0f} req/s, "
            f"p99 {run['p99_ms']:.1f} ms); RSS {rss_empty / 2**20:.1f} -> "
            f"{rss_full / 2**20:.1f} MiB, peak {peak / 2**20:.1f} MiB")
    finally:
        server.stop()


# --- Restart --------------------------------------------------------------------------


def bench_restart(ctx, results: Results) -> None:
    sizes = [0, 100_000] + ([1_000_000] if ctx.million else [])
    timings: dict = {size: [] for size in sizes}
    cpu: dict = {size: [] for size in sizes}
    rss: dict = {size: [] for size in sizes}
    for size in sizes:
        snapshot = ctx.snapshots.get(size)[0]
        for _ in range(ctx.repeats if size < 1_000_000 else 1):
            server = start_service(ctx.workdir, f"restart-{size}", snapshot, LONG_DELAYS)
            try:
                timings[size].append(server.wait_healthy(timeout=600))
                cpu[size].append(server.cpu_seconds())
                time.sleep(0.3)
                rss[size].append(server.rss())
                assert server.health()["jobs"] == size
            finally:
                server.stop()
            log(f"restart @ {size:>9,}: {timings[size][-1]:.2f} s to /healthz "
                f"({cpu[size][-1]:.2f} s CPU), RSS {rss[size][-1] / 2**20:.0f} MiB")
    results.raw["restart"] = {"seconds": {str(k): v for k, v in timings.items()},
                              "cpu_seconds": {str(k): v for k, v in cpu.items()},
                              "rss": {str(k): v for k, v in rss.items()}}
    results.add("Restart to /healthz @ 0 jobs (interpreter + imports)", median(timings[0]),
                "s", fmt="{:.2f}", cpu_s=median(cpu[0]))
    results.add("Restart to /healthz @ 100,000 jobs", median(timings[100_000]), "s", "< 3 s",
                median(timings[100_000]) < 3, fmt="{:.2f}", repeats=timings[100_000],
                cpu_s=median(cpu[100_000]))
    results.add("Restart @ 100,000 jobs: CPU time used by then", median(cpu[100_000]), "s",
                fmt="{:.2f}", note="less sensitive to machine load than wall time")
    if ctx.million:
        results.add("Restart to /healthz @ 1,000,000 jobs", median(timings[1_000_000]), "s",
                    "<= 7 s", median(timings[1_000_000]) <= 7, fmt="{:.2f}",
                    cpu_s=median(cpu[1_000_000]), rss_mb=median(rss[1_000_000]) / 2**20)
        _million_old_format_and_page(ctx, results)
    else:
        results.add("Restart to /healthz @ 1,000,000 jobs", None, "s", "(skipped)")
    per_job = (median(rss[100_000]) - median(rss[0])) / 100_000
    results.add("RSS per pending job (100k loaded from the file)", per_job, "B", fmt="{:,.0f}",
                rss_empty_mb=median(rss[0]) / 2**20, rss_loaded_mb=median(rss[100_000]) / 2**20)


def write_old_service_file(path: Path, count: int) -> None:
    """The NestJS service's jobs.json: a bare array of {id, status, result, createdAt},
    half completed and half waiting, created a minute ago."""
    created = iso(time.time() - 60)
    with open(path, "w", encoding="utf-8") as out:
        out.write("[")
        for n in range(count):
            job_id = str(uuid.UUID(bytes=os.urandom(16), version=4))
            entry = ({"id": job_id, "status": "completed", "createdAt": created,
                      "result": "https://images.unsplash.com/photo-1512621776951-a57141f2eefd"}
                     if n % 2 else {"id": job_id, "status": "waiting", "result": None,
                                    "createdAt": created})
            out.write(("," if n else "") + json.dumps(entry))
        out.write("]")


def _million_old_format_and_page(ctx, results: Results) -> None:
    """Start-up from the old service's file with 1,000,000 jobs, and how fast the page
    opens with 1,000,000 jobs stored (first card and totals, from navigation)."""
    old = ctx.workdir / "old-service.json"
    write_old_service_file(old, 1_000_000)
    server = start_service(ctx.workdir, "restart-old-format", old, LONG_DELAYS)
    try:
        seconds = server.wait_healthy(timeout=600)
    finally:
        server.stop()
    log(f"restart from the old service's format @ 1,000,000: {seconds:.2f} s")
    results.add("Restart to /healthz @ 1,000,000 jobs, old service's format", seconds, "s",
                "<= 7 s", seconds <= 7, fmt="{:.2f}")

    sys.path.insert(0, str(ROOT / "tests"))
    import page_timing

    server = start_service(ctx.workdir, "page-million", ctx.snapshots.get(1_000_000)[0],
                           LONG_DELAYS)
    try:
        server.wait_healthy(timeout=600)
        timing = asyncio.run(page_timing.measure(f"http://127.0.0.1:{server.port}", runs=3))
    finally:
        server.stop()
    results.raw["page_million"] = timing
    first = timing["first_card_ms"]  # medians of the runs
    log(f"page with 1,000,000 jobs: first card {first:.0f} ms")
    results.add("Page with 1,000,000 jobs: first card, from navigation", first, "ms",
                "< 1,000 ms", first < 1000, fmt="{:,.0f}", totals_ms=timing["totals_ms"])


# --- Stored jobs: what one costs however it got there, the loading peak, start-up --------
# Each row is measured on this build and, with --baseline REV, on that one too (git
# archive into the work folder), one after the other in alternating order, so that the
# timings of a pair share the machine's load. RSS per job is over an empty process of
# the same build and mode, once a GET /jobs has had every job's text made.

STORED_SIZES = (100_000, 1_000_000)


def stored_builds(ctx) -> list[tuple[str, Path]]:
    builds = [("this build", SERVICE)]
    if ctx.baseline:
        folder = ctx.workdir / f"baseline-{ctx.baseline[:12]}"
        if not folder.exists():
            folder.mkdir()
            archive = subprocess.run(["git", "-C", str(ROOT), "archive", ctx.baseline],
                                     capture_output=True, check=True).stdout
            subprocess.run(["tar", "-x", "-C", str(folder)], input=archive, check=True)
        builds.append((f"baseline {ctx.baseline[:9]}", folder / "jobservice.py"))
    return builds


def write_stored_file(path: Path, count: int, kind: str) -> None:
    """`count` jobs as this service writes them ("resolved" with the catalog's photos and
    their image objects, "failed" as the scheduler fails them), or the old service's
    file of `count` completed jobs ("old", the catalog's photos' URLs)."""
    sys.path.insert(0, str(ROOT))
    import jobservice
    photos = jobservice.CatalogImages().photos
    now = time.time()
    with open(path, "w", encoding="utf-8") as out:
        out.write("[" if kind == "old" else f'{{"version":1,"seq":{count},"jobs":[\n')
        for start in range(0, count, 10_000):
            texts = []
            for n in range(start, min(count, start + 10_000)):
                photo = photos[n % len(photos)]
                created = now - 3600 + n * 1e-3
                if kind == "old":
                    texts.append(json.dumps({"id": str(uuid.uuid4()), "status": "completed",
                                             "result": photo.result.split("?")[0],
                                             "createdAt": iso(created)}))
                    continue
                job = jobservice.Job(str(uuid.uuid4()), "pending", None, created,
                                     created + 30)
                if kind == "resolved":
                    job = job.resolved(photo.result, photo.image, created + 30.25)
                else:
                    job = job.failed("gave up after 5 attempts: Unsplash answered 503",
                                     created + 40.5)
                job.seq = n + 1
                texts.append(job.json)
            out.write(("," if start else "") + ",\n".join(texts))
        out.write("]" if kind == "old" else "\n]}\n")


def _list_all(server: Server) -> int:
    """GET /jobs, the whole list, once: every job's text is made (and kept, as kept)."""
    conn = http.client.HTTPConnection("127.0.0.1", server.port, timeout=600)
    try:
        conn.request("GET", "/jobs")
        response = conn.getresponse()
        body = response.read()
        assert response.status == 200, body[:200]
        return body.count(b'"seq":')
    finally:
        conn.close()


def _settled_rss(server: Server) -> int:
    """RSS once the service has been idle a moment (a compaction under way finishes)."""
    time.sleep(2.0)
    return server.rss()


def _empty_rss(ctx, program: Path, env: dict | None = None) -> int:
    server = start_service(ctx.workdir, "stored-empty", None, {**LONG_DELAYS, **(env or {})},
                           program)
    try:
        server.wait_healthy()
        for _ in range(200):  # the HTTP machinery's own allocations
            request(server.port, "GET", "/healthz")
        _list_all(server)
        return _settled_rss(server)
    finally:
        server.stop()


def _loaded_row(ctx, program: Path, name: str, snapshot: Path | None, count: int,
                empty: int, env: dict | None = None) -> dict:
    server = start_service(ctx.workdir, name, snapshot, {**LONG_DELAYS, **(env or {})},
                           program)
    try:
        start_s = server.wait_healthy(timeout=900)
        cpu_s = server.cpu_seconds()
        rss_started = server.rss()
        listed = _list_all(server)
        rss = _settled_rss(server)
        peak = server.status("VmHWM")  # the most it took, loading or listing
        jobs = server.health()["jobs"]
    finally:
        server.stop()
    if jobs != count or listed != count:
        raise RuntimeError(f"{name}: {jobs:,} jobs stored, {listed:,} listed, not {count:,}")
    return {"start_s": start_s, "cpu_s": cpu_s, "rss_started": rss_started, "rss": rss,
            "peak": peak, "per_job": (rss - empty) / count,
            "per_job_started": (rss_started - empty) / count, "peak_over_steady": peak / rss}


def _posted_rows(ctx, program: Path, count: int, delay: float) -> dict:
    """`count` jobs created by a POST burst (wrk, 64 connections), due `delay` s later:
    RSS per job while they are pending, then once every one resolved (catalog photos)."""
    server = start_service(ctx.workdir, "stored-post", None, {
        "JOB_DELAY_MIN": f"{delay:g}", "JOB_DELAY_MAX": f"{delay:g}", "JOB_DELAY_STEP": "1"},
        program)
    try:
        server.wait_healthy()
        for _ in range(200):
            request(server.port, "GET", "/healthz")
        _list_all(server)
        empty = _settled_rss(server)
        started = time.monotonic()
        run, created_s = post_until(ctx, server, count, 3600)
        time.sleep(1.0)  # the creations wrk left in flight are stored
        _list_all(server)
        rss_pending, health = _settled_rss(server), server.health()
        jobs = health["jobs"]
        if health["pending"] != jobs:
            raise RuntimeError(f"{jobs - health['pending']:,} jobs resolved before the "
                               f"pending row was measured ({created_s:.0f} s to create them, "
                               f"due after {delay:g} s)")
        deadline = time.monotonic() + delay + 1800
        while (health := server.health())["pending"] and time.monotonic() < deadline:
            time.sleep(1.0)
        resolved_s = time.monotonic() - started
        _list_all(server)
        rss_resolved = _settled_rss(server)
        peak = server.status("VmHWM")
    finally:
        server.stop()
    return {"jobs": jobs, "created_s": created_s, "rps": run["rps"], "errors": run["errors"],
            "resolved_s": resolved_s, "rss_empty": empty, "rss_pending": rss_pending,
            "rss_resolved": rss_resolved, "peak": peak, "left_pending": health["pending"],
            "pending_per_job": (rss_pending - empty) / jobs,
            "resolved_per_job": (rss_resolved - empty) / jobs}


def _alternate(builds: list, turn: int) -> list:
    return builds if turn % 2 == 0 else builds[::-1]


def bench_stored(ctx, results: Results) -> None:
    """RSS per stored job for every way a job gets stored, at 100,000 and 1,000,000 jobs,
    file mode and Redis node; the peak while loading; start-up times; and the POST share
    of the bare handler and GET /jobs at 100,000, this build against --baseline."""
    builds = stored_builds(ctx)
    sizes = [25_000] if ctx.quick else [size for size in STORED_SIZES
                                        if ctx.million or size < 1_000_000]
    raw = results.raw["stored"] = {"builds": [name for name, _ in builds], "rows": {},
                                   "load_average": {}}
    rows = raw["rows"]
    empty = {name: _empty_rss(ctx, program) for name, program in builds}
    raw["rss_empty"] = empty

    def add(label: str, row: str, size: int, key: str = "per_job") -> None:
        values = {name: rows[row][name][str(size)][key] for name, _ in builds
                  if str(size) in rows.get(row, {}).get(name, {})}
        this = values.get("this build")
        target = "<= 1,024 B" if key.endswith("per_job") else ""
        results.add(f"RSS per job, {label} @ {size:,}", this, "B", target,
                    this is not None and this <= 1024 if target else None, fmt="{:,.0f}",
                    **{name.replace(" ", "_"): value for name, value in values.items()})

    # Loaded at start: our file (three statuses), the old service's, and a Redis node.
    files = {}
    for size in sizes:
        for kind in ("resolved", "failed", "old"):
            path = ctx.workdir / "snapshots" / f"stored-{kind}-{size}.json"
            write_stored_file(path, size, kind)
            files[kind, size] = path
        files["pending", size] = ctx.snapshots.get(size)[0]
    turn = 0
    for size in sizes:
        for kind, label in (("resolved", "resolved, loaded from our file"),
                            ("failed", "failed, loaded from our file"),
                            ("pending", "pending, loaded from our file"),
                            ("old", "resolved, carried over from the old service's file")):
            row = f"file {kind}"
            for name, program in _alternate(builds, turn):
                raw["load_average"][f"{row} {size} {name}"] = loadavg()
                rows.setdefault(row, {}).setdefault(name, {})[str(size)] = measured = \
                    _loaded_row(ctx, program, f"stored-{kind}-{size}", files[kind, size],
                                size, empty[name])
                log(f"stored {row} @ {size:,} ({name}): {measured['per_job']:,.0f} B a job, "
                    f"start {measured['start_s']:.2f} s (CPU {measured['cpu_s']:.2f} s), "
                    f"peak {measured['peak_over_steady']:.2f} x steady")
            turn += 1
            add(label, row, size)
    _stored_redis(ctx, results, builds, sizes, files, rows, add)

    # Created by POST, then resolved, in the same process.
    delay = 120.0
    for size in sizes:
        for name, program in _alternate(builds, turn):
            rows.setdefault("post", {}).setdefault(name, {})[str(size)] = measured = \
                _posted_rows(ctx, program, size, delay)
            log(f"stored POST @ {size:,} ({name}): {measured['pending_per_job']:,.0f} B a "
                f"pending job, {measured['resolved_per_job']:,.0f} B resolved; created at "
                f"{measured['rps']:,.0f} req/s")
            # The next size is due once the whole burst is in: the slower build's rate.
            delay = max(delay, 1.5 * STORED_SIZES[-1] / max(measured["rps"], 1) + 30)
        turn += 1
        for key, label in (("pending_per_job", "created by POST (burst, 64 connections), "
                                               "pending"),
                           ("resolved_per_job", "the same once resolved (catalog photo)")):
            add(label, "post", size, key)

    big = sizes[-1]
    for row, label in (("file resolved", "file mode, our file"),
                       ("file old", "file mode, the old service's file"),
                       ("redis resolved", "Redis node")):
        values = rows[row]
        this = values["this build"][str(big)]
        others = {name.replace(" ", "_"): values[name][str(big)]["start_s"]
                  for name, _ in builds}
        limit = 10 if row.startswith("redis") else 5
        results.add(f"Start-up to /healthz 200 @ {big:,} jobs, {label}", this["start_s"], "s",
                    f"<= {limit} s", this["start_s"] <= limit, fmt="{:.2f}",
                    cpu_s=this["cpu_s"], **others)
        results.add(f"Peak RSS while loading @ {big:,} jobs, {label}: VmHWM / steady RSS",
                    this["peak_over_steady"], "x", "<= 1.5", this["peak_over_steady"] <= 1.5,
                    fmt="{:.2f}", **{name.replace(" ", "_"): values[name][str(big)]
                                     ["peak_over_steady"] for name, _ in builds})
    _stored_speed(ctx, results, builds)


def _stored_redis(ctx, results, builds, sizes, files, rows, add) -> None:
    if shutil.which("redis-server") is None:
        log("stored: no redis-server, the Redis rows are not measured")
        return
    ctx.redis_problems = getattr(ctx, "redis_problems", [])
    for size in sizes:
        with redis_cluster(ctx, f"stored-redis-{size}", 0) as (redis, _, _prefix):
            prefixes = {}
            for kind in ("resolved", "old"):
                prefixes[kind] = f"bench-{uuid.uuid4().hex[:8]}:"
                _import(ctx, redis, prefixes[kind], files[kind, size])
            while any(redis.client.info("persistence")[key] for key in (
                    "aof_rewrite_in_progress", "aof_rewrite_scheduled")):
                time.sleep(0.2)
            for turn, name_program in enumerate(builds):
                name, program = name_program
                env = {"REDIS_URL": redis.url}
                empty = _empty_rss(ctx, program, {
                    **env, "REDIS_PREFIX": f"bench-{uuid.uuid4().hex[:8]}:"})
                for kind, label in (("resolved", "resolved, loaded by a Redis node"),
                                    ("old", "carried over from the old service's file, "
                                            "loaded by a Redis node")):
                    row = f"redis {kind}"
                    rows.setdefault(row, {}).setdefault(name, {})[str(size)] = measured = \
                        _loaded_row(ctx, program, f"stored-redis-{kind}-{size}", None, size,
                                    empty, {**env, "REDIS_PREFIX": prefixes[kind]})
                    log(f"stored {row} @ {size:,} ({name}): {measured['per_job']:,.0f} B a "
                        f"job, start {measured['start_s']:.2f} s, peak "
                        f"{measured['peak_over_steady']:.2f} x steady")
                    if turn == len(builds) - 1:
                        add(label, row, size)


def _stored_speed(ctx, results, builds) -> None:
    """POST at 10,000 stored jobs as a share of the bare handler, and GET /jobs of 100,000
    pending and of 100,000 resolved jobs, each build in turn, in alternating order."""
    snapshot = ctx.snapshots.get(10_000)[0]
    lists = {"pending": ctx.snapshots.get(100_000)[0],
             "resolved": ctx.workdir / "snapshots" / "stored-resolved-100000.json"}
    if not lists["resolved"].exists():
        write_stored_file(lists["resolved"], 100_000, "resolved")
    shares = {name: [] for name, _ in builds}
    lists_ms = {(name, kind): [] for name, _ in builds for kind in lists}
    for round_ in range(ctx.pairs):
        order = [("bare", None), *_alternate(builds, round_)]
        if round_ % 2:
            order = order[::-1]
        rps = {}
        for name, program in order:
            server = start_bare(ctx.workdir) if program is None else start_service(
                ctx.workdir, "stored-post-share", snapshot, LONG_DELAYS, program)
            try:
                server.wait_healthy()
                url = f"http://127.0.0.1:{server.port}"
                ctx.wrk.run(url + "/healthz", "get", 1)
                rps[name] = ctx.wrk.run(url + "/jobs", "post", ctx.duration)["rps"]
            finally:
                server.stop()
        for name, _ in builds:
            shares[name].append(rps[name] / rps["bare"])
        log(f"stored POST round {round_ + 1}: " + ", ".join(
            f"{name} {value:,.0f} req/s" for name, value in rps.items()))
    for kind, snapshot_100k in lists.items():
        servers = {name: start_service(ctx.workdir, f"stored-list-{kind}", snapshot_100k,
                                       LONG_DELAYS, program) for name, program in builds}
        try:
            for server in servers.values():
                server.wait_healthy(timeout=300)
            conns = {name: http.client.HTTPConnection("127.0.0.1", server.port, timeout=60)
                     for name, server in servers.items()}
            for n in range(1 + max(5, ctx.repeats * 3)):
                for name, _ in _alternate(builds, n):
                    started = time.perf_counter()
                    conns[name].request("GET", "/jobs")
                    conns[name].getresponse().read()
                    if n:  # the first makes the texts
                        lists_ms[name, kind].append((time.perf_counter() - started) * 1000)
            for conn in conns.values():
                conn.close()
        finally:
            for server in servers.values():
                server.stop()
    for name, _ in builds:
        log(f"stored speed ({name}): POST share {median(shares[name]):.1%}, GET /jobs "
            + ", ".join(f"{kind} {median(lists_ms[name, kind]):.1f} ms" for kind in lists))
    this = "this build"
    results.add("POST /jobs @ 10,000: share of bare (stored-jobs section)",
                median(shares[this]) * 100, "%", fmt="{:.1f}", per_round=shares[this],
                **{name.replace(" ", "_"): median(shares[name]) * 100 for name, _ in builds})
    for kind in lists:
        results.add(f"GET /jobs, 100,000 {kind} jobs, warm (stored-jobs section)",
                    median(lists_ms[this, kind]), "ms", fmt="{:.1f}",
                    repeats=lists_ms[this, kind],
                    **{name.replace(" ", "_"): median(lists_ms[name, kind])
                       for name, _ in builds})


# --- Soak: months at a steady rate, in ten minutes ---------------------------------------


def _soak_load(port: int, rate: int, seconds: float, out) -> None:
    asyncio.run(_soak_load_async(port, rate, seconds, out))


async def _soak_load_async(port, rate, seconds, out):
    """POST /jobs at a steady `rate` per second (each on time, not as fast as possible);
    per minute, the latencies and the errors."""
    url = f"http://127.0.0.1:{port}/jobs"
    minutes: dict[int, dict] = {}
    started = time.monotonic()
    connector = aiohttp.TCPConnector(limit=256)
    async with aiohttp.ClientSession(connector=connector) as session:

        async def post(minute: int) -> None:
            entry = minutes.setdefault(minute, {"latencies": [], "errors": 0})
            sent = time.monotonic()
            try:
                async with session.post(url) as response:
                    await response.read()
                    ok = response.status == 201
            except (aiohttp.ClientError, TimeoutError):
                ok = False
            entry["latencies"].append(time.monotonic() - sent)
            entry["errors"] += not ok

        tasks = set()
        n = 0
        while (elapsed := time.monotonic() - started) < seconds:
            due = started + n / rate
            if due > time.monotonic():
                await asyncio.sleep(due - time.monotonic())
            task = asyncio.create_task(post(int(elapsed // 60)))
            tasks.add(task)
            task.add_done_callback(tasks.discard)
            n += 1
        await asyncio.gather(*tasks)
    out.put({minute: {"count": len(v["latencies"]), "errors": v["errors"],
                      "p99_ms": percentile(v["latencies"], 0.99) * 1000}
             for minute, v in minutes.items()})


def _histogram_p99(samples: dict, name: str) -> float | None:
    """The upper bound of the bucket holding the 99th percentile, from cumulative
    Prometheus bucket counts."""
    buckets = sorted((float(le), count) for (metric, le), count in samples.items()
                     if metric == name)
    total = buckets[-1][1] if buckets else 0
    if not total:
        return None
    return next(le for le, count in buckets if count >= 0.99 * total)


def _lateness_buckets(port: int) -> dict:
    from prometheus_client.parser import text_string_to_metric_families
    text = request(port, "GET", "/metrics")[2].decode()
    samples = {}
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            if sample.name == "jobservice_resolution_lateness_seconds_bucket":
                samples[(sample.name, sample.labels["le"])] = sample.value
    return samples


def _bytes_on_disk(folder: Path) -> int:
    total = 0
    for path in folder.glob("jobs.json*"):
        with contextlib.suppress(FileNotFoundError):  # rotated or renamed meanwhile
            total += path.stat().st_size
    return total


def bench_soak(ctx, results: Results) -> None:
    """10 minutes at 1,000 jobs/s with JOB_RETENTION=60 and delays of 5-10 s: RSS, file
    sizes (each minute's mean and peak), POST p99 and resolution lateness p99 each minute.
    After the first two minutes the means must be flat (within 10 %) and peak RSS must
    not grow (the later half's highest within 10 % of the earlier half's). The files'
    peak is a one-second sample that may or may not catch a fold into the snapshot, which
    holds the old snapshot, the new one and the folded journal for a moment: about twice
    the resting size, so it must stay under 2.5 times the mean. POST p99 must stay under
    25 ms every minute: a spread in per cent of a few milliseconds measures the scheduler
    of two shared cores, not the service."""
    rate, minutes = ctx.soak_rate, ctx.soak_minutes
    server = start_service(ctx.workdir, "soak", None, {
        "JOB_RETENTION": "60", "JOB_DELAY_MIN": "5", "JOB_DELAY_MAX": "10",
        "JOB_DELAY_STEP": "1", "EVENTS_REPLAY_WINDOW": "60"})
    mp = multiprocessing.get_context("fork")
    out = mp.Queue()
    rows = []
    try:
        server.wait_healthy()
        folder = Path(server.log_path).parent
        load = mp.Process(target=_soak_load, args=(server.port, rate, minutes * 60, out),
                          daemon=True)
        load.start()
        previous = _lateness_buckets(server.port)
        for minute in range(minutes):
            # The journal grows until it is folded into the snapshot (every ~20 s
            # here), so sizes are a sawtooth: each minute reports its mean and its peak.
            rss, files = [], []
            end = time.monotonic() + 60
            while time.monotonic() < end:
                time.sleep(1)
                rss.append(server.rss())
                files.append(_bytes_on_disk(folder))
            current = _lateness_buckets(server.port)
            delta = {key: current[key] - previous.get(key, 0) for key in current}
            previous = current
            health = server.health()
            row = {"minute": minute + 1, "rss_mb": statistics.mean(rss) / 2**20,
                   "rss_peak_mb": max(rss) / 2**20, "files_mb": statistics.mean(files) / 2**20,
                   "files_peak_mb": max(files) / 2**20, "jobs": health["jobs"],
                   "lateness_p99_ms": (_histogram_p99(
                       delta, "jobservice_resolution_lateness_seconds_bucket") or 0) * 1000}
            rows.append(row)
            log(f"soak minute {row['minute']}: RSS {row['rss_mb']:.0f} MiB (peak "
                f"{row['rss_peak_mb']:.0f}), files {row['files_mb']:.1f} MiB (peak "
                f"{row['files_peak_mb']:.1f}), {row['jobs']:,} jobs kept, lateness p99 <= "
                f"{row['lateness_p99_ms']:.0f} ms")
        load.join(120)
        per_minute = out.get(timeout=60)
    finally:
        server.stop()
    for row in rows:
        stats = per_minute.get(row["minute"] - 1, {})
        row.update(posts=stats.get("count", 0), errors=stats.get("errors", 0),
                   post_p99_ms=stats.get("p99_ms"))
    results.raw["soak"] = rows
    steady = rows[2:] or rows  # a short run has no steady part: judge all of it

    def flat(key: str) -> float:
        values = [row[key] for row in steady]
        return (max(values) - min(values)) / max(min(values), 1e-9)

    def growth(key: str) -> float:
        half = max(1, len(steady) // 2)
        earlier, later = steady[:half], steady[half:] or steady
        return max(row[key] for row in later) / max(row[key] for row in earlier) - 1

    errors = sum(row["errors"] for row in rows)
    lateness = max(row["lateness_p99_ms"] for row in steady)
    for key, label in (("rss_mb", "mean RSS"), ("files_mb", "mean file sizes")):
        results.add(f"Soak {minutes} min at {rate:,} jobs/s: {label} spread after minute 2",
                    flat(key) * 100, "%", "within 10 %", flat(key) <= 0.10, fmt="{:.1f}",
                    per_minute=[round(row[key], 1) for row in rows])
    results.add(f"Soak {minutes} min: peak RSS growth, later half of the steady minutes "
                "against the earlier", growth("rss_peak_mb") * 100, "%", "<= 10 %",
                growth("rss_peak_mb") <= 0.10, fmt="{:+.1f}",
                per_minute=[round(row["rss_peak_mb"], 1) for row in rows])
    fold = max(row["files_peak_mb"] for row in steady) / statistics.mean(
        row["files_mb"] for row in steady)
    results.add(f"Soak {minutes} min: highest file sizes after minute 2, times their mean",
                fold, "x", "< 2.5x", fold < 2.5, fmt="{:.2f}",
                per_minute=[round(row["files_peak_mb"], 1) for row in rows])
    post_p99 = max(row["post_p99_ms"] for row in steady)
    results.add(f"Soak {minutes} min: POST p99, the worst minute after minute 2", post_p99,
                "ms", "< 25 ms", post_p99 < 25, fmt="{:.1f}",
                per_minute=[round(row["post_p99_ms"], 1) for row in rows])
    results.add(f"Soak {minutes} min: errors", errors, "", "0", errors == 0, fmt="{:,.0f}",
                posts=sum(row["posts"] for row in rows))
    results.add(f"Soak {minutes} min: resolution lateness p99 (bucket bound)", lateness, "ms",
                "< 100 ms", lateness < 100, fmt="{:.0f}")


# --- Fan-out ----------------------------------------------------------------------------


def _fanout_client(transport: str, port: int, sockets: int, expected: int, ready, results,
                   timeout: float):
    reader = _ws_clients if transport == "ws" else _polling_clients
    asyncio.run(reader(port, sockets, expected, ready, results, timeout))


def _by_job(received: list[tuple[float, dict]]) -> dict:
    by_job: dict = {}
    for when, job in received:
        by_job.setdefault(job["id"], {"resolvedAt": job["resolvedAt"], "times": []})
        by_job[job["id"]]["times"].append(when)
    return by_job


async def _ws_clients(port, sockets, expected, ready, out, timeout):
    received: list[tuple[float, dict]] = []
    connector = aiohttp.TCPConnector(limit=0)
    async with aiohttp.ClientSession(connector=connector) as session:
        peers = []
        for start in range(0, sockets, 50):
            peers += await asyncio.gather(*(
                session.ws_connect(f"http://127.0.0.1:{port}/ws", autoping=True,
                                   max_msg_size=0)
                for _ in range(start, min(sockets, start + 50))))
        ready.put(len(peers))

        async def read(ws):
            seen = 0
            while seen < expected:
                message = await ws.receive()
                now = time.time()
                if message.type != aiohttp.WSMsgType.TEXT:
                    return
                if message.data.startswith('["ON_RESOLVED_JOB"'):
                    received.append((now, json.loads(message.data)[1]))
                    seen += 1

        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(asyncio.gather(*(read(ws) for ws in peers)), timeout)
        for ws in peers:
            await ws.close()
    out.put(_by_job(received))


async def _polling_clients(port, sockets, expected, ready, out, timeout):
    """Socket.IO clients stuck on long-polling, as plain HTTP: a handshake, a CONNECT,
    then one GET after another (answering pings), each on its own connection."""
    received: list[tuple[float, dict]] = []
    url = f"http://127.0.0.1:{port}/socket.io/?EIO=4&transport=polling"
    connector = aiohttp.TCPConnector(limit=0)
    async with aiohttp.ClientSession(connector=connector) as session:

        async def open_session() -> str:
            async with session.get(url) as response:
                sid = json.loads((await response.text())[1:])["sid"]
            async with session.post(f"{url}&sid={sid}", data="40") as response:
                assert await response.text() == "ok"
            return sid

        sids = []
        for start in range(0, sockets, 50):
            sids += await asyncio.gather(*(open_session()
                                           for _ in range(start, min(sockets, start + 50))))
        ready.put(len(sids))

        async def read(sid):
            seen = 0
            while seen < expected:
                async with session.get(f"{url}&sid={sid}") as response:
                    body = await response.text()
                now = time.time()
                for packet in body.split("\x1e"):
                    if packet == "2":
                        async with session.post(f"{url}&sid={sid}", data="3") as response:
                            await response.read()
                    elif packet.startswith('42["ON_RESOLVED_JOB"'):
                        received.append((now, json.loads(packet[2:])[1]))
                        seen += 1
                    elif packet == "1" or response.status != 200:
                        return

        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(asyncio.gather(*(read(sid) for sid in sids)), timeout)
    out.put(_by_job(received))


def _fanout(ctx, transport: str, clients: int, per_client: int) -> dict:
    """One resolution at a time to clients * per_client clients of `transport` ("ws" or
    "polling"), each in its own process group of clients; per job, when each client had it.
    Also the service's RSS before the clients came and once they were all connected."""
    resolutions = ctx.resolutions
    delay = 0.3
    server = start_service(ctx.workdir, f"fanout-{transport}", None, {
        "JOB_DELAY_MIN": str(delay), "JOB_DELAY_MAX": str(delay), "JOB_DELAY_STEP": "0.1"})
    mp = multiprocessing.get_context("fork")
    ready, out = mp.Queue(), mp.Queue()
    procs = []
    try:
        server.wait_healthy()
        rss_before = server.rss()
        wait_for = resolutions * 1.5 + 60
        procs = [mp.Process(target=_fanout_client, daemon=True,
                            args=(transport, server.port, per_client, resolutions, ready, out,
                                  wait_for))
                 for _ in range(clients)]
        for proc in procs:
            proc.start()
        connected = sum(ready.get(timeout=120) for _ in procs)
        time.sleep(1.0)
        rss_connected = server.rss()
        log(f"fan-out: {connected} {transport} clients connected")
        for _ in range(resolutions):
            status, _, _ = request(server.port, "POST", "/jobs", b"{}")
            assert status == 201, status
            time.sleep(delay + 0.7)  # one resolution at a time
        merged: dict = {}
        for _ in procs:
            for job_id, data in out.get(timeout=wait_for + 30).items():
                entry = merged.setdefault(job_id, {"resolvedAt": data["resolvedAt"],
                                                   "times": []})
                entry["times"].extend(data["times"])
        for proc in procs:
            proc.join(10)
    finally:
        for proc in procs:
            if proc.is_alive():
                proc.kill()
        server.stop()
    lasts, medians, firsts, counts = [], [], [], []
    for entry in merged.values():
        resolved_at = parse_iso(entry["resolvedAt"])
        lasts.append((max(entry["times"]) - resolved_at) * 1000)
        firsts.append((min(entry["times"]) - resolved_at) * 1000)
        medians.append((median(entry["times"]) - resolved_at) * 1000)
        counts.append(len(entry["times"]))
    complete = (len(lasts) == resolutions and all(count == connected for count in counts)
                and connected == clients * per_client)
    return {"clients": connected, "last_ms": lasts, "median_ms": medians, "first_ms": firsts,
            "received": counts, "complete": complete, "rss_before": rss_before,
            "rss_connected": rss_connected}


def _fanout_row(results: Results, label: str, run: dict, target_ms: float) -> None:
    lasts = run["last_ms"]
    results.add(f"Fan-out to {run['clients']:,} {label}: last receiver", median(lasts), "ms",
                f"< {target_ms:g} ms", bool(lasts) and median(lasts) < target_ms
                and run["complete"], fmt="{:.1f}", resolutions=len(lasts),
                worst_ms=max(lasts) if lasts else None,
                first_receiver_ms=median(run["first_ms"]),
                median_receiver_ms=median(run["median_ms"]),
                every_client_got_every_event=run["complete"])


def bench_fanout(ctx, results: Results) -> None:
    run = _fanout(ctx, "ws", clients=4, per_client=250)
    results.raw["fanout"] = run
    _fanout_row(results, "/ws clients", run, 100)


def bench_polling(ctx, results: Results) -> None:
    run = _fanout(ctx, "polling", clients=4, per_client=250)
    results.raw["polling"] = run
    _fanout_row(results, "Socket.IO polling clients", run, 250)
    per_session = (run["rss_connected"] - run["rss_before"]) / max(run["clients"], 1)
    results.add("RSS per idle polling session (connected, one long-poll waiting)",
                per_session / 1024, "KB", "", None, fmt="{:.1f}", clients=run["clients"],
                rss_before=run["rss_before"], rss_connected=run["rss_connected"])


# --- Unsplash efficiency -------------------------------------------------------------


async def _burst(port: int, count: int, concurrency: int = 32) -> list[int]:
    connector = aiohttp.TCPConnector(limit=concurrency)
    async with aiohttp.ClientSession(connector=connector) as session:
        async def one():
            async with session.post(f"http://127.0.0.1:{port}/jobs", data=b"{}",
                                    headers={"Content-Type": "application/json"}) as response:
                await response.read()
                return response.status
        return await asyncio.gather(*(one() for _ in range(count)))


def bench_unsplash(ctx, results: Results) -> None:
    count = 3_000
    fake_log = open(ctx.workdir / "fake-unsplash.log", "wb")
    fake = subprocess.Popen([PY, str(FAKE_UNSPLASH), "--port", "0"], cwd=ROOT,
                            stdout=subprocess.PIPE, stderr=fake_log, text=True)
    server = None
    try:
        fake_port = json.loads(fake.stdout.readline())["port"]
        server = start_service(ctx.workdir, "unsplash", None, {
            "UNSPLASH_ACCESS_KEY": "test-key",
            "UNSPLASH_API_URL": f"http://127.0.0.1:{fake_port}",
            "JOB_DELAY_MIN": "0.5", "JOB_DELAY_MAX": "3", "JOB_DELAY_STEP": "0.05",
            "RETRY_BASE_DELAY": "0.05", "RETRY_MAX_DELAY": "0.5", "UNSPLASH_TIMEOUT": "2"})
        server.wait_healthy()
        started = time.monotonic()
        statuses = asyncio.run(_burst(server.port, count))
        burst_seconds = time.monotonic() - started
        assert statuses.count(201) == count, f"not every POST was accepted: {set(statuses)}"
        deadline = time.monotonic() + 120
        while True:
            health = server.health()
            if health["pending"] == 0 or time.monotonic() > deadline:
                break
            time.sleep(0.1)
        all_done = time.monotonic() - started
        calls = json.loads(request(fake_port, "GET", "/_stats")[2])["calls"]
    finally:
        if server is not None:
            server.stop()
        fake.terminate()
        fake.wait(10)
        fake_log.close()
    resolved = health["resolved"]
    per_job = calls / resolved if resolved else float("inf")
    results.raw["unsplash"] = {"calls": calls, "health": health, "burst_s": burst_seconds,
                               "all_resolved_s": all_done}
    results.add(f"Unsplash API calls per resolved job ({count:,}-job burst)", per_job,
                "calls/job", "<= 0.04 (1 per 25)", per_job <= 0.04 and resolved == count,
                fmt="{:.4f}", calls=calls, resolved=resolved, failed=health["failed"],
                ideal=1 / 30, burst_s=burst_seconds, all_resolved_s=all_done)


def _quota_run(ctx, label: str, quota: int, rate: int, seconds: int) -> dict:
    """Jobs at `rate` a second for `seconds`, against a fake key allowed `quota` calls
    per 36 s window; once every job has resolved, what they resolved with."""
    window = 36
    fake_log = open(ctx.workdir / f"fake-{label}.log", "wb")
    fake = subprocess.Popen([PY, str(FAKE_UNSPLASH), "--port", "0"], cwd=ROOT,
                            stdout=subprocess.PIPE, stderr=fake_log, text=True)
    server = None
    mp = multiprocessing.get_context("fork")
    out = mp.Queue()
    try:
        fake_port = json.loads(fake.stdout.readline())["port"]
        request(fake_port, "POST", "/_control",
                json.dumps({"quota": quota, "window": window}).encode())
        server = start_service(ctx.workdir, label, None, {
            "UNSPLASH_ACCESS_KEY": "test-key",
            "UNSPLASH_API_URL": f"http://127.0.0.1:{fake_port}",
            "UNSPLASH_QUOTA_WINDOW": str(window), "JOB_DELAY_MIN": "5",
            "JOB_DELAY_MAX": "60", "JOB_DELAY_STEP": "0.05", "JOB_RETENTION": "0"})
        server.wait_healthy()
        load = mp.Process(target=_soak_load, args=(server.port, rate, seconds, out),
                          daemon=True)
        load.start()
        load.join(seconds + 120)
        posted = out.get(timeout=60)
        deadline = time.monotonic() + 180
        while server.health()["pending"] and time.monotonic() < deadline:
            time.sleep(1)
        jobs = json.loads(request(server.port, "GET", "/jobs?status=resolved")[2])
        windows = json.loads(request(fake_port, "GET", "/_stats")[2])["windows"]
    finally:
        if server is not None:
            server.stop()
        fake.terminate()
        fake.wait(10)
        fake_log.close()
    late = [parse_iso(job["resolvedAt"]) - parse_iso(job["dueAt"]) for job in jobs]
    fresh = sum(not (job["image"] or {}).get("reused") for job in jobs)
    made = sum(window["calls"] for window in windows)
    span = max(parse_iso(job["dueAt"]) for job in jobs) - min(
        parse_iso(job["createdAt"]) for job in jobs)
    allowed = quota * max(1, -(-int(span) // window))
    return {"jobs": len(jobs), "posted": sum(m["count"] for m in posted.values()),
            "errors": sum(m["errors"] for m in posted.values()),
            "lateness_p99_ms": percentile(late, 0.99) * 1000, "lateness_max_ms": max(late) * 1000,
            "fresh_share": fresh / len(jobs), "calls": made, "allowed": allowed,
            "refused": sum(window["refused"] for window in windows),
            "refused_most_in_a_window": max(window["refused"] for window in windows)}


def bench_quota(ctx, results: Results) -> None:
    """On time under the key's quota, at two scaled keys. The fresh share is bounded by
    what the key sells (30 photos a call): 150 a window against 360 jobs for the demo
    key, 15,000 against 36,000 for the production key."""
    runs = {"demo": _quota_run(ctx, "quota-demo", 5, 10, 60 if ctx.quick else 180),
            "production": _quota_run(ctx, "quota-production", 500, 1000,
                                     20 if ctx.quick else 60)}
    results.raw["quota"] = runs
    for name, run in runs.items():
        log(f"quota, {name} key: {run}")
        key = f"{name} key ({'5' if name == 'demo' else '500'} calls per 36 s)"
        results.add(f"Under a scaled {key}: resolution lateness p99", run["lateness_p99_ms"],
                    "ms", "< 1,000 ms", run["lateness_p99_ms"] < 1000, fmt="{:.0f}",
                    max_ms=run["lateness_max_ms"], jobs=run["jobs"], errors=run["errors"])
        results.add("… fresh photos, share of jobs", run["fresh_share"] * 100, "%", "",
                    None, fmt="{:.1f}")
        results.add("… calls made of those the windows allowed", run["calls"] / run["allowed"]
                    * 100, "%", ">= 60 %", run["calls"] >= 0.6 * run["allowed"],
                    fmt="{:.0f}", calls=run["calls"], allowed=run["allowed"])
        results.add("… refused calls (most in one window)", run["refused"], "",
                    "<= 1 a window", run["refused_most_in_a_window"] <= 1, fmt="{:,.0f}")


# --- Redis scale-out mode ----------------------------------------------------------------


class RedisServer(Server):
    """A redis-server of this script's own on a free port, its files in the work folder:
    the append-only file fsynced on every write (as durable as the file mode's fsync per
    batch), no RDB snapshots. Stopped by its own pid, like the services."""

    def __init__(self, workdir: Path, name: str = "redis", args=()):
        port = free_port()
        folder = workdir / f"{name}-{port}"
        folder.mkdir()
        super().__init__(name, ["redis-server", "--port", str(port), "--bind", "127.0.0.1",
                                "--dir", str(folder), "--appendonly", "yes",
                                "--appendfsync", "always", "--save", "", *args],
                         dict(os.environ), folder / "redis.log", port)
        self.url = f"redis://127.0.0.1:{port}/0"
        self.client = None

    def answers(self) -> bool:
        import redis as redis_py
        client = redis_py.Redis(host="127.0.0.1", port=self.port, decode_responses=True,
                                socket_timeout=30)
        try:
            client.ping()
        except redis_py.RedisError:
            client.close()
            return False
        self.client = client
        return True

    def memory(self) -> dict:
        return self.client.info("memory")

    def stop(self, timeout: float = 60.0) -> None:
        if self.client is not None:
            self.client.close()
        super().stop(timeout)


def start_redis_node(ctx, redis: RedisServer, prefix: str, name: str,
                     env: dict | None = None) -> Server:
    """The service in Redis mode (its --data file is not used), pending jobs far off."""
    return start_service(ctx.workdir, name, None, {
        **LONG_DELAYS, "REDIS_URL": redis.url, "REDIS_PREFIX": prefix, **(env or {})})


def _log_problems(server: Server) -> list[str]:
    """Error lines and tracebacks in a stopped service's log, and an unclean exit."""
    problems = []
    with contextlib.suppress(OSError):
        for line in server.log_path.read_text(errors="replace").splitlines():
            if any(word in line for word in ("ERROR", "CRITICAL", "Traceback", "Error:")):
                problems.append(line.strip()[:300])
    if server.proc.returncode not in (0, None):
        problems.append(f"exit status {server.proc.returncode}")
    return problems


@contextlib.contextmanager
def redis_cluster(ctx, name: str, count: int, env: dict | None = None):
    """A fresh redis-server and `count` Redis-mode nodes on it, under one new prefix;
    the nodes are stopped first, then Redis, and their logs searched for errors."""
    redis = RedisServer(ctx.workdir, f"{name}-redis")
    nodes: list[Server] = []
    try:
        redis.wait_healthy()
        prefix = f"bench-{uuid.uuid4().hex[:8]}:"
        nodes = [start_redis_node(ctx, redis, prefix, f"{name}-{n}", env)
                 for n in range(count)]
        for node in nodes:
            node.wait_healthy()
        yield redis, nodes, prefix
    finally:
        for node in nodes:
            node.stop()
            for line in _log_problems(node):
                ctx.redis_problems.append(f"{node.name}: {line}")
                log(f"{node.name} log: {line}")
        redis.stop()
        for line in _log_problems(redis):
            ctx.redis_problems.append(f"{redis.name}: {line}")


def _wait_converged(redis: RedisServer, prefix: str, nodes: list[Server],
                    timeout: float = 10.0) -> tuple[int, list[int]]:
    """The jobs in Redis and each node's job count, once every replica holds them all (or
    the timeout passed). Redis is read again each time: the POSTs wrk left in flight when
    it stopped are still being stored for a moment."""
    deadline = time.monotonic() + timeout
    while True:
        stored = redis.client.hlen(prefix + "jobs")
        counts = [node.health()["jobs"] for node in nodes]
        if all(count == stored for count in counts) or time.monotonic() > deadline:
            return stored, counts
        time.sleep(0.1)


def _redis_post_run(ctx, target: str, half: Wrk) -> dict:
    """One POST /jobs run: "file" (embedded mode, empty store), "redis" (one node on a
    fresh Redis) or "redis x2" (two nodes on one fresh Redis, a wrk -t1 -c32 on each at
    once: the same 2 threads and 64 connections as the others)."""
    if target == "file":
        server = start_service(ctx.workdir, "redis-base-file", None, LONG_DELAYS)
        try:
            server.wait_healthy()
            url = f"http://127.0.0.1:{server.port}"
            ctx.wrk.run(url + "/healthz", "get", 1)
            cpu = server.cpu_seconds()
            run = ctx.wrk.run(url + "/jobs", "post", ctx.duration)
            run["service_cpu_s"] = server.cpu_seconds() - cpu
        finally:
            server.stop()
        return run
    count = 1 if target == "redis" else 2
    with redis_cluster(ctx, f"redis-post{count}", count) as (redis, nodes, prefix):
        urls = [f"http://127.0.0.1:{node.port}" for node in nodes]
        for url in urls:
            ctx.wrk.run(url + "/healthz", "get", 1)
        cpu_nodes = [node.cpu_seconds() for node in nodes]
        cpu_redis = redis.cpu_seconds()
        if count == 1:
            run = ctx.wrk.run(urls[0] + "/jobs", "post", ctx.duration)
            parts = [run]
        else:
            cmds = [half.command(url + "/jobs", "post", ctx.duration) for url in urls]
            procs = [subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                                      text=True) for cmd in cmds]
            parts = []
            for proc, cmd in zip(procs, cmds, strict=True):
                stdout, stderr = proc.communicate(timeout=ctx.duration + 60)
                parts.append(Wrk.parse(stdout, stderr, cmd))
            run = {"rps": sum(part["rps"] for part in parts),
                   "requests": sum(part["requests"] for part in parts),
                   "errors": sum(part["errors"] for part in parts),
                   "p50_ms": max(part["p50_ms"] for part in parts),
                   "p99_ms": max(part["p99_ms"] for part in parts),
                   "per_node": parts}
        run["service_cpu_s"] = [node.cpu_seconds() - before
                                for node, before in zip(nodes, cpu_nodes, strict=True)]
        run["redis_cpu_s"] = redis.cpu_seconds() - cpu_redis
        run["jobs_in_redis"], run["jobs_per_replica"] = _wait_converged(redis, prefix, nodes)
        run["redis_rss_mb"] = redis.rss() / 2**20
    return run


def _redis_throughput(ctx, results: Results) -> None:
    targets = ["file", "redis", "redis x2"]
    half = Wrk(ctx.workdir, threads=1, connections=32)
    runs: dict = {target: [] for target in targets}
    ratios: dict = {"redis": [], "redis x2": []}
    for repeat in range(ctx.repeats):
        order = targets[repeat % len(targets):] + targets[:repeat % len(targets)]
        this = {}
        for target in order:
            run = _redis_post_run(ctx, target, half)
            this[target] = run
            runs[target].append(run)
            log(f"POST /jobs repeat {repeat + 1} {target:>8}: {run['rps']:,.0f} req/s, p50 "
                f"{run['p50_ms']:.1f} ms, p99 {run['p99_ms']:.1f} ms, errors {run['errors']}"
                + (f", {run['jobs_in_redis']:,} jobs in Redis, replicas hold "
                   f"{run['jobs_per_replica']}" if target != "file" else ""))
        for target in ratios:
            ratios[target].append(this[target]["rps"] / this["file"]["rps"])
    results.raw["redis"]["post"] = {"runs": runs, "ratios": ratios}

    def replicas_agree(target):
        return all(all(count == run["jobs_in_redis"] for count in run["jobs_per_replica"])
                   for run in runs[target])

    file_rps = median([run["rps"] for run in runs["file"]])
    file_p99 = median([run["p99_ms"] for run in runs["file"]])
    results.add("POST /jobs file mode, empty store (baseline of the Redis rows)", file_rps,
                "req/s", fmt="{:,.0f}", repeats=[run["rps"] for run in runs["file"]],
                p99_ms=file_p99, errors=sum(run["errors"] for run in runs["file"]))
    one = runs["redis"]
    errors = sum(run["errors"] for run in one)
    ratio = median(ratios["redis"])
    results.add("POST /jobs Redis mode, 1 node: throughput", median([r["rps"] for r in one]),
                "req/s", fmt="{:,.0f}", repeats=[run["rps"] for run in one], errors=errors,
                redis_cpu_s=[run["redis_cpu_s"] for run in one],
                node_cpu_s=[run["service_cpu_s"][0] for run in one])
    results.add("POST /jobs Redis mode, 1 node: share of file mode", ratio * 100, "%",
                ">= 50 %", ratio >= 0.5 and errors == 0, fmt="{:.0f}",
                per_repeat=ratios["redis"], errors=errors,
                replicas_hold_every_job=replicas_agree("redis"))
    results.add("POST /jobs Redis mode, 1 node: p99", median([r["p99_ms"] for r in one]), "ms",
                fmt="{:.1f}", repeats=[run["p99_ms"] for run in one],
                p50_ms=median([run["p50_ms"] for run in one]), file_mode_p99_ms=file_p99)
    two = runs["redis x2"]
    errors2 = sum(run["errors"] for run in two)
    ratio2 = median(ratios["redis x2"])
    results.add("POST /jobs Redis mode, 2 nodes on one Redis: summed throughput, share of "
                "file mode", ratio2 * 100, "%", fmt="{:.0f}", per_repeat=ratios["redis x2"],
                summed_rps=median([run["rps"] for run in two]), errors=errors2,
                p99_ms_worse_node=median([run["p99_ms"] for run in two]),
                replicas_hold_every_job=replicas_agree("redis x2"),
                note=f"{os.cpu_count()} CPUs: the 2 nodes, redis-server and 2 wrk -t1 -c32 "
                     "share them, so this measures contention on one box, not scale-out "
                     "across machines")


def _redis_event_latency(ctx, results: Results) -> None:
    """Two nodes on one Redis; a /ws client on node B; jobs created on node A, due in
    1 s; per ON_RESOLVED_JOB received on B, receive time - resolvedAt (the resolving
    node's clock: this machine's too; resolvedAt is cut to the ms, so up to +1 ms)."""
    count, spread = (60, 2.0) if ctx.quick else (300, 4.0)
    mp = multiprocessing.get_context("fork")
    ready, out = mp.Queue(), mp.Queue()
    env = {"JOB_DELAY_MIN": "1", "JOB_DELAY_MAX": "1", "JOB_DELAY_STEP": "1"}
    proc = None
    with redis_cluster(ctx, "redis-latency", 2, env) as (redis, (node_a, node_b), prefix):
        try:
            names = {node_a.health()["node"]: "A", node_b.health()["node"]: "B"}
            wait_for = spread + 30
            proc = mp.Process(target=_fanout_client, daemon=True,
                              args=("ws", node_b.port, 1, count, ready, out, wait_for))
            proc.start()
            ready.get(timeout=60)
            time.sleep(0.5)
            statuses = []
            started = time.monotonic()
            for n in range(count):
                due = started + n * spread / count
                if due > time.monotonic():
                    time.sleep(due - time.monotonic())
                statuses.append(request(node_a.port, "POST", "/jobs", b"{}")[0])
            by_job = out.get(timeout=wait_for + 30)
            proc.join(10)
            resolver = {}
            for _, fields in redis.client.xrange(prefix + "events", "-", "+"):
                job = json.loads(fields["r"])
                if job.get("status") in ("resolved", "failed"):
                    resolver[job["id"]] = names.get(fields.get("n"), fields.get("n"))
        finally:
            if proc is not None and proc.is_alive():
                proc.kill()
    latencies = {"A": [], "B": [], "?": []}
    for job_id, entry in by_job.items():
        ms = (min(entry["times"]) - parse_iso(entry["resolvedAt"])) * 1000
        latencies[resolver.get(job_id, "?")].append(ms)
    every = [ms for values in latencies.values() for ms in values]
    cross = latencies["A"]
    results.raw["redis"]["event_latency"] = {"latencies_ms": latencies,
                                             "statuses": statuses, "received": len(by_job)}
    headline = cross if len(cross) >= 10 else every
    which = ("resolved on node A (the other node)" if headline is cross
             else "all events (too few resolved on A)")
    created = statuses.count(201)
    complete = len(by_job) == count == created
    log(f"event latency: {len(by_job)}/{count} received on B; resolved on A "
        f"{len(cross)}, on B {len(latencies['B'])}; p50 {median(headline) or 0:.1f} ms, "
        f"p99 {percentile(headline, 0.99) or 0:.1f} ms ({which})")
    details = {"events": which, "received": len(by_job), "created": created,
               "resolved_on_a": len(cross), "resolved_on_b": len(latencies["B"]),
               "all_p50_ms": median(every), "all_p99_ms": percentile(every, 0.99),
               "same_node_p50_ms": median(latencies["B"]),
               "same_node_p99_ms": percentile(latencies["B"], 0.99),
               "max_ms": max(headline) if headline else None}
    label = f"Event latency, resolution on node A to a /ws client on node B ({count} jobs)"
    results.add(f"{label}: p50", median(headline), "ms", fmt="{:.1f}")
    p99 = percentile(headline, 0.99)
    results.add(f"{label}: p99", p99, "ms", "< 50 ms", p99 is not None and p99 < 50
                and complete, fmt="{:.1f}", every_event_received=complete, **details)


def _redis_fanout(ctx, nodes_count: int, clients: int, per_client: int) -> dict:
    """_fanout over `nodes_count` Redis-mode nodes: `clients` processes of `per_client`
    /ws sockets on each; each job is created on the first node. Per job, when each
    socket had it, by node."""
    resolutions, delay = ctx.resolutions, 0.3
    env = {"JOB_DELAY_MIN": str(delay), "JOB_DELAY_MAX": str(delay), "JOB_DELAY_STEP": "0.1"}
    mp = multiprocessing.get_context("fork")
    ready = mp.Queue()
    procs = []
    merged: dict = {}
    with redis_cluster(ctx, "redis-fanout", nodes_count, env) as (_, nodes, _prefix):
        outs = [mp.Queue() for _ in nodes]
        try:
            wait_for = resolutions * 1.5 + 60
            procs = [mp.Process(target=_fanout_client, daemon=True,
                                args=("ws", node.port, per_client, resolutions, ready, out,
                                      wait_for))
                     for node, out in zip(nodes, outs, strict=True) for _ in range(clients)]
            for proc in procs:
                proc.start()
            connected = sum(ready.get(timeout=180) for _ in procs)
            time.sleep(1.0)
            log(f"fan-out: {connected} /ws clients connected to {nodes_count} Redis-mode nodes")
            for _ in range(resolutions):
                status, _, _ = request(nodes[0].port, "POST", "/jobs", b"{}")
                assert status == 201, status
                time.sleep(delay + 0.7)  # one resolution at a time
            for index, out in enumerate(outs):
                for _ in range(clients):
                    for job_id, data in out.get(timeout=wait_for + 30).items():
                        entry = merged.setdefault(job_id, {"resolvedAt": data["resolvedAt"],
                                                           "times": {}})
                        entry["times"].setdefault(index, []).extend(data["times"])
            for proc in procs:
                proc.join(10)
        finally:
            for proc in procs:
                if proc.is_alive():
                    proc.kill()
    lasts, counts, by_node = [], [], {index: [] for index in range(nodes_count)}
    for entry in merged.values():
        resolved_at = parse_iso(entry["resolvedAt"])
        times = [when for values in entry["times"].values() for when in values]
        lasts.append((max(times) - resolved_at) * 1000)
        counts.append(len(times))
        for index, values in entry["times"].items():
            by_node[index].append((max(values) - resolved_at) * 1000)
    complete = (len(lasts) == resolutions and all(count == connected for count in counts)
                and connected == nodes_count * clients * per_client)
    return {"clients": connected, "last_ms": lasts, "received": counts,
            "complete": complete, "last_ms_by_node": by_node}


def _redis_fanout_rows(ctx, results: Results) -> None:
    nodes_count, clients, per_client = (3, 1, 100) if ctx.quick else (3, 4, 250)
    run = _redis_fanout(ctx, nodes_count, clients, per_client)
    results.raw["redis"]["fanout"] = run
    baseline = results.raw.get("fanout")  # the fanout section, when it ran before this one
    if baseline is None or ctx.quick:
        baseline = _fanout(ctx, "ws", clients=clients, per_client=per_client)
        results.raw["redis"]["fanout_single_node"] = baseline
    lasts, base = run["last_ms"], baseline["last_ms"]
    per_node = {f"node{index}{' (job created here)' if index == 0 else ''}_median_ms":
                median(values) for index, values in run["last_ms_by_node"].items()}
    results.add(f"Fan-out to {run['clients']:,} /ws clients on {nodes_count} Redis-mode nodes "
                "(one Redis): last receiver", median(lasts), "ms", fmt="{:.1f}",
                resolutions=len(lasts), worst_ms=max(lasts) if lasts else None,
                every_client_got_every_event=run["complete"], **per_node,
                single_node_file_mode_clients=baseline["clients"],
                single_node_file_mode_last_ms=median(base),
                single_node_file_mode_worst_ms=max(base) if base else None,
                note=f"{os.cpu_count()} CPUs shared by {nodes_count} nodes, redis-server and "
                     f"{nodes_count * clients} client processes")


def _redis_memory(ctx, results: Results) -> None:
    """Redis's used_memory per pending job: N jobs imported from a snapshot (the jobs
    hash and the due set) and N created by POST /jobs (the same, plus the stream, which
    is trimmed to ~STREAM_LENGTH entries); and the RSS per job of a node's replica."""
    jobs_wanted = ctx.memory_jobs
    snapshot = ctx.snapshots.get(jobs_wanted)[0]
    raw = results.raw["redis"]["memory"] = {}
    with redis_cluster(ctx, "redis-memory", 0) as (redis, _, _prefix):
        # An empty node first: its RSS is the base of the per-job RSS figures.
        post_prefix = f"bench-{uuid.uuid4().hex[:8]}:"
        node = start_redis_node(ctx, redis, post_prefix, "redis-memory-post")
        loaded = None
        try:
            node.wait_healthy()
            for _ in range(200):
                request(node.port, "GET", "/healthz")
            time.sleep(0.5)
            rss_empty = node.rss()

            # Import: the jobs hash and the due set only.
            before = redis.memory()
            import_prefix = f"bench-{uuid.uuid4().hex[:8]}:"
            started = time.monotonic()
            done = subprocess.run([PY, str(SERVICE), "import", str(snapshot)], cwd=ROOT,
                                  env=service_env({"REDIS_URL": redis.url,
                                                   "REDIS_PREFIX": import_prefix}),
                                  capture_output=True, text=True, timeout=600)
            import_s = time.monotonic() - started
            if done.returncode != 0:
                raise RuntimeError(f"import failed ({done.returncode}): {done.stderr[-2000:]}")
            log(f"import: {done.stdout.strip()} ({import_s:.1f} s)")
            time.sleep(0.5)
            after = redis.memory()
            imported = redis.client.hlen(import_prefix + "jobs")
            keys_import = {key: redis.client.memory_usage(import_prefix + key, samples=0)
                           for key in ("jobs", "due")}
            loaded = start_redis_node(ctx, redis, import_prefix, "redis-memory-loaded")
            load_s = loaded.wait_healthy(timeout=300)
            time.sleep(0.5)
            rss_loaded, loaded_jobs = loaded.rss(), loaded.health()["jobs"]
            loaded.stop()
            per_import = (after["used_memory"] - before["used_memory"]) / max(imported, 1)
            raw["import"] = {"jobs": imported, "seconds": import_s, "before": before,
                             "after": after, "keys": keys_import, "node_start_s": load_s,
                             "rss_empty": rss_empty, "rss_loaded": rss_loaded}
            results.add(f"Redis used_memory per pending job ({imported:,} imported: hash + "
                        "due set)", per_import, "B", fmt="{:,.0f}",
                        dataset_per_job=(after["used_memory_dataset"]
                                         - before["used_memory_dataset"]) / max(imported, 1),
                        key_bytes_per_job={key: value / max(imported, 1)
                                           for key, value in keys_import.items()
                                           if value is not None},
                        import_s=import_s)
            results.add(f"Redis-mode node RSS per pending job (replica of {loaded_jobs:,} "
                        "jobs loaded from Redis)", (rss_loaded - rss_empty) / max(loaded_jobs, 1),
                        "B", fmt="{:,.0f}", rss_empty_mb=rss_empty / 2**20,
                        rss_loaded_mb=rss_loaded / 2**20, start_to_healthz_s=load_s)

            # POST /jobs: plus one stream entry each, until the stream is trimmed.
            before = redis.memory()
            run, created_s = post_until(ctx, node, jobs_wanted)
            posted, (node_jobs,) = _wait_converged(redis, post_prefix, [node])
            time.sleep(2.0)
            after = redis.memory()
            stream = redis.client.xlen(post_prefix + "events")
            keys_post = {key: redis.client.memory_usage(post_prefix + key, samples=0)
                         for key in ("jobs", "due", "events")}
            rss_full = node.rss()
        finally:
            for server in (node, loaded):
                if server is not None:
                    server.stop()
                    for line in _log_problems(server):
                        ctx.redis_problems.append(f"{server.name}: {line}")
                        log(f"{server.name} log: {line}")
    per_post = (after["used_memory"] - before["used_memory"]) / max(posted, 1)
    raw["post"] = {"jobs": posted, "stream_entries": stream, "seconds": created_s,
                   "before": before, "after": after, "keys": keys_post, "wrk": run,
                   "rss_full": rss_full}
    log(f"Redis memory: {posted:,} jobs POSTed in {created_s:.1f} s ({run['rps']:,.0f} req/s, "
        f"errors {run['errors']}), stream {stream:,} entries; used_memory "
        f"{before['used_memory'] / 2**20:.1f} -> {after['used_memory'] / 2**20:.1f} MiB")
    stream_bytes = keys_post.get("events")
    results.add(f"Redis used_memory per pending job ({posted:,} created via POST: hash + due "
                f"set + {stream:,} stream entries)", per_post, "B", fmt="{:,.0f}",
                dataset_per_job=(after["used_memory_dataset"]
                                 - before["used_memory_dataset"]) / max(posted, 1),
                key_bytes_per_job={key: value / max(posted, 1)
                                   for key, value in keys_post.items() if value is not None},
                stream_bytes_per_entry=stream_bytes / stream if stream and stream_bytes
                else None, stream_length_cap="~50,000 (STREAM_LENGTH)",
                wrk_rps=run["rps"], wrk_errors=run["errors"])
    results.add(f"Redis-mode node RSS per pending job ({node_jobs:,} created via POST)",
                (rss_full - rss_empty) / max(node_jobs, 1), "B", fmt="{:,.0f}",
                rss_empty_mb=rss_empty / 2**20, rss_full_mb=rss_full / 2**20)


def _ping_loop(port: int, stop, out) -> None:
    """In a process of its own: PING Redis every 5 ms until told to stop; the slowest
    answer, and how many there were."""
    import redis as redis_py
    client = redis_py.Redis(host="127.0.0.1", port=port, socket_timeout=60)
    slowest, count = 0.0, 0
    while not stop.is_set():
        started = time.perf_counter()
        client.ping()
        took = time.perf_counter() - started
        slowest, count = max(slowest, took), count + 1
        time.sleep(max(0.0, 0.005 - took))
    client.close()
    out.put((slowest, count))


def _import(ctx, redis: RedisServer, prefix: str, snapshot: Path) -> None:
    done = subprocess.run([PY, str(SERVICE), "import", str(snapshot)], cwd=ROOT,
                          env=service_env({"REDIS_URL": redis.url, "REDIS_PREFIX": prefix}),
                          capture_output=True, text=True, timeout=1800)
    if done.returncode != 0:
        raise RuntimeError(f"import failed ({done.returncode}): {done.stderr[-2000:]}")


def _redis_start(ctx, results: Results) -> None:
    """A node's start on a Redis that holds N pending jobs (imported): process start to
    /healthz 200, the slowest PING another client saw meanwhile (one every 5 ms), the
    node's peak RSS while loading (VmHWM) and its RSS per job after, against an empty
    node's RSS."""
    sizes = [25_000] if ctx.quick else [300_000] + ([1_000_000] if ctx.million else [])
    raw = results.raw["redis"]["start"] = {}
    mp = multiprocessing.get_context("fork")
    for size in sizes:
        snapshot = ctx.snapshots.get(size)[0]
        with redis_cluster(ctx, f"redis-start-{size}", 0) as (redis, _, _prefix):
            empty = start_redis_node(ctx, redis, f"bench-{uuid.uuid4().hex[:8]}:", "redis-empty")
            try:
                empty.wait_healthy()
                time.sleep(0.5)
                rss_empty = empty.rss()
            finally:
                empty.stop()
            prefix = f"bench-{uuid.uuid4().hex[:8]}:"
            started = time.monotonic()
            _import(ctx, redis, prefix, snapshot)
            log(f"redis start: imported {size:,} jobs in {time.monotonic() - started:.1f} s")
            while any(redis.client.info("persistence")[key] for key in (  # the AOF rewrite
                    "aof_rewrite_in_progress", "aof_rewrite_scheduled")):  # after the import
                time.sleep(0.2)
            redis.client.config_set("latency-monitor-threshold", 1)  # ms: Redis's own view
            redis.client.execute_command("LATENCY", "RESET")
            stop, out = mp.Event(), mp.Queue()
            pinger = mp.Process(target=_ping_loop, args=(redis.port, stop, out), daemon=True)
            pinger.start()
            time.sleep(0.5)
            node = start_redis_node(ctx, redis, prefix, f"redis-start-{size}-node")
            try:
                ready_s = node.wait_healthy(timeout=600)
                time.sleep(0.5)
                stop.set()
                slowest, pings = out.get(timeout=60)
                pinger.join(10)
                rss, peak, jobs = node.rss(), node.status("VmHWM"), node.health()["jobs"]
                # [event, when, latest ms, max ms]: "command" is a command that ran long
                events = {event: worst for event, _, _, worst in
                          redis.client.execute_command("LATENCY", "LATEST")}
            finally:
                node.stop()
                if pinger.is_alive():
                    pinger.kill()
        per_job = (rss - rss_empty) / max(jobs, 1)
        peak_share = (peak - rss_empty) / max(rss - rss_empty, 1)
        raw[size] = {"ready_s": ready_s, "slowest_ping_ms": slowest * 1000, "pings": pings,
                     "redis_latency_events_max_ms": events,
                     "rss": rss, "rss_peak": peak, "rss_empty": rss_empty, "jobs": jobs}
        log(f"redis start @ {size:,}: ready in {ready_s:.2f} s, slowest PING "
            f"{slowest * 1000:.1f} ms of {pings:,} (Redis's latency monitor: {events}), "
            f"RSS {rss / 2**20:.0f} MiB "
            f"({per_job:,.0f} B a job), peak {peak / 2**20:.0f} MiB")
        big = size >= 300_000
        results.add(f"Redis-mode node start to /healthz 200 @ {size:,} jobs", ready_s, "s",
                    "< 5 s" if size == 300_000 else "", ready_s < 5 if size == 300_000
                    else None, fmt="{:.2f}", jobs_loaded=jobs)
        results.add(f"Redis-mode node start @ {size:,} jobs: slowest PING of another client "
                    "(every 5 ms)", slowest * 1000, "ms", "< 50 ms" if big else "",
                    slowest < 0.05 if big else None, fmt="{:.1f}", pings=pings,
                    redis_slowest_command_ms=events.get("command", 0),
                    note="Redis's latency monitor (threshold 1 ms) counts the server's own "
                         "stalls; the PING time also holds the client's waits for a CPU")
        results.add(f"Redis-mode node start @ {size:,} jobs: RSS per job after", per_job, "B",
                    "<= 1.5 KB" if big else "", per_job <= 1536 if big else None,
                    fmt="{:,.0f}", rss_mb=rss / 2**20, rss_empty_mb=rss_empty / 2**20)
        results.add(f"Redis-mode node start @ {size:,} jobs: peak RSS while loading, over "
                    "the registry's", peak_share, "x", "<= 1.5x", peak_share <= 1.5,
                    fmt="{:.2f}", peak_mb=peak / 2**20)


def _replica_of(ctx, primary: RedisServer, name: str) -> RedisServer:
    """A replica of `primary` (the same AOF settings), once it is in sync."""
    replica = RedisServer(ctx.workdir, name, ["--replicaof", "127.0.0.1", str(primary.port)])
    replica.wait_healthy()
    while replica.client.info("replication")["master_link_status"] != "up":
        time.sleep(0.02)
    return replica


def _redis_replicas(ctx, results: Results) -> None:
    """POST /jobs on one node whose Redis has one replica, REDIS_MIN_REPLICAS_ACK=1 (a
    WAIT after each read of the stream) against 0, alternating, in the same run."""
    runs: dict = {"0": [], "1": []}
    for repeat in range(ctx.repeats):
        for ack in ("0", "1") if repeat % 2 == 0 else ("1", "0"):
            redis = RedisServer(ctx.workdir, f"replicas-{ack}-primary",
                                ["--repl-diskless-sync-delay", "0"])
            replica = node = None
            try:
                redis.wait_healthy()
                replica = _replica_of(ctx, redis, f"replicas-{ack}-replica")
                node = start_redis_node(ctx, redis, "bench:", f"replicas-{ack}-node",
                                        {"REDIS_MIN_REPLICAS_ACK": ack})
                node.wait_healthy()
                url = f"http://127.0.0.1:{node.port}"
                ctx.wrk.run(url + "/healthz", "get", 1)
                run = ctx.wrk.run(url + "/jobs", "post", ctx.duration)
            finally:
                for server in (node, replica, redis):
                    if server is not None:
                        server.stop()
                if node is not None:
                    ctx.redis_problems.extend(f"{node.name}: {line}"
                                              for line in _log_problems(node))
            runs[ack].append(run)
            log(f"POST /jobs, one replica, REDIS_MIN_REPLICAS_ACK={ack}: {run['rps']:,.0f} "
                f"req/s, p99 {run['p99_ms']:.1f} ms, errors {run['errors']}")
    ratios = [one["rps"] / zero["rps"] for zero, one in zip(runs["0"], runs["1"], strict=True)]
    results.raw["redis"]["replicas"] = {"runs": runs, "ratios": ratios}
    results.add("POST /jobs Redis mode, 1 node, one replica: REDIS_MIN_REPLICAS_ACK=1, share "
                "of =0", median(ratios) * 100, "%", fmt="{:.0f}", per_repeat=ratios,
                rps_ack0=median([run["rps"] for run in runs["0"]]),
                rps_ack1=median([run["rps"] for run in runs["1"]]),
                p99_ms_ack0=median([run["p99_ms"] for run in runs["0"]]),
                p99_ms_ack1=median([run["p99_ms"] for run in runs["1"]]),
                errors=sum(run["errors"] for runs_ in runs.values() for run in runs_))


def _sentinel_conf(folder: Path, port: int, primary: int) -> Path:
    config = folder / "sentinel.conf"
    config.write_text(f"port {port}\nbind 127.0.0.1\nprotected-mode no\ndir {folder}\n"
                      f"sentinel monitor jobs 127.0.0.1 {primary} 2\n"
                      "sentinel down-after-milliseconds jobs 1000\n"
                      "sentinel failover-timeout jobs 2000\n")
    return config


def _redis_failover(ctx, results: Results) -> None:
    """A primary, a replica, three sentinels (down after 1 s) and two nodes with
    REDIS_MIN_REPLICAS_ACK=1 under POST load (a client per node, back to back): the
    primary is SIGKILLed and comes back as the new primary's replica once Sentinel has
    switched. Failover time: the kill to the first 201 on every node; 201s lost."""
    import redis as redis_py
    primary = RedisServer(ctx.workdir, "failover-primary", ["--repl-diskless-sync-delay", "0"])
    servers: list[Server] = [primary]
    try:
        primary.wait_healthy()
        replica = _replica_of(ctx, primary, "failover-replica")
        replica.client.config_set("repl-diskless-sync-delay", 0)
        servers.append(replica)
        ports = [free_port() for _ in range(3)]
        for port in ports:
            folder = ctx.workdir / f"sentinel-{port}"
            folder.mkdir()
            servers.append(Server(f"sentinel-{port}", [
                "redis-server", str(_sentinel_conf(folder, port, primary.port)), "--sentinel"],
                dict(os.environ), folder / "sentinel.log", port))
        watcher = redis_py.Redis(port=ports[0], decode_responses=True, socket_timeout=30)
        while True:  # every sentinel knows the others and the replica: polled, like health
            states = [redis_py.Redis(port=port, decode_responses=True).sentinel_master("jobs")
                      for port in ports]
            if all(state["num-other-sentinels"] == 2 and state["num-slaves"] == 1
                   for state in states):
                break
            time.sleep(0.1)
        env = {"REDIS_SENTINELS": ",".join(f"127.0.0.1:{port}" for port in ports),
               "REDIS_SENTINEL_MASTER": "jobs", "REDIS_MIN_REPLICAS_ACK": "1",
               "REDIS_TIMEOUT": "1"}
        nodes = [start_service(ctx.workdir, f"failover-node{n}", None, {**LONG_DELAYS, **env})
                 for n in range(2)]
        servers.extend(nodes)
        for node in nodes:
            node.wait_healthy()
        switched = watcher.pubsub()
        switched.subscribe("+switch-master")
        switched.get_message(timeout=5)
        acknowledged: list[str] = []
        first_after: dict[int, float] = {}
        stop, killed = [False], [0.0]

        def load(node: Server) -> None:
            while not stop[0]:
                status, _, body = request(node.port, "POST", "/jobs", b"{}")
                if status == 201:
                    acknowledged.append(json.loads(body)["id"])
                    if killed[0] and node.port not in first_after:
                        first_after[node.port] = time.monotonic()
        threads = [threading.Thread(target=load, args=(node,)) for node in nodes]
        for thread in threads:
            thread.start()
        time.sleep(2.0)  # load running
        primary.proc.kill()
        primary.proc.wait()
        killed[0] = time.monotonic()
        while (message := switched.get_message(timeout=30)) is None:
            pass
        switch_s = time.monotonic() - killed[0]
        _, _, _, host, port = message["data"].split()
        back = RedisServer(ctx.workdir, "failover-old-primary", [
            "--replicaof", host, port, "--repl-diskless-sync-delay", "0"])
        servers.append(back)
        deadline = time.monotonic() + 60
        while len(first_after) < len(nodes) and time.monotonic() < deadline:
            time.sleep(0.05)
        stop[0] = True
        for thread in threads:
            thread.join(30)
        failover_s = max(first_after.values()) - killed[0] if len(first_after) == len(nodes) \
            else None
        new_primary = redis_py.Redis(port=int(port), decode_responses=True)
        stored = set(new_primary.hkeys("jobservice:jobs"))
        lost = len(set(acknowledged) - stored)
        switched.close()
        watcher.close()
        new_primary.close()
    finally:
        for server in reversed(servers):
            server.stop()
    results.raw["redis"]["failover"] = {"switch_s": switch_s, "failover_s": failover_s,
                                        "acknowledged": len(acknowledged), "lost": lost}
    log(f"failover: Sentinel switched after {switch_s:.2f} s; every node's POST answered 201 "
        f"again after {failover_s} s; {len(acknowledged):,} acknowledged, {lost} lost")
    results.add("Failover (primary SIGKILLed under POST load, REDIS_MIN_REPLICAS_ACK=1): the "
                "kill to a 201 on every node", failover_s, "s", "< 15 s, 0 lost",
                failover_s is not None and failover_s < 15 and lost == 0, fmt="{:.2f}",
                sentinel_switch_s=switch_s, acknowledged=len(acknowledged), lost=lost,
                note="down-after-milliseconds 1000; the dead primary comes back as the new "
                     "one's replica right after the switch")


# --- Session routing ----------------------------------------------------------------


def _relay_nodes(ctx, redis: RedisServer, prefix: str) -> list[Server]:
    nodes = [start_redis_node(ctx, redis, prefix, f"relay-{n}",
                              {"NODE_URL": f"http://127.0.0.1:{free_port()}"})
             for n in range(2)]
    for node in nodes:
        node.wait_healthy()
    return nodes


async def _relay_timings(owner: int, other: int, rounds: int) -> dict:
    """Per round, in alternating order: a POST of a pong to a session of `owner`, sent to
    `owner` and through `other`; and a long-poll of each of two sessions of `owner`, one
    held on `owner` and one through `other`, timed from a POST /jobs until it carries
    that job's ON_CREATED_JOB."""
    io = "/socket.io/?EIO=4&transport=polling"
    timings: dict[str, list[float]] = {"post direct": [], "post relayed": [],
                                       "poll direct": [], "poll relayed": []}
    async with aiohttp.ClientSession(connector=aiohttp.TCPConnector(limit=0)) as http:

        async def session() -> str:
            async with http.get(f"http://127.0.0.1:{owner}{io}") as response:
                sid = json.loads((await response.text())[1:])["sid"]
            async with http.post(f"http://127.0.0.1:{owner}{io}&sid={sid}",
                                 data="40") as response:
                assert await response.text() == "ok"
            body = ""
            while "SYNCED" not in body:
                async with http.get(f"http://127.0.0.1:{owner}{io}&sid={sid}") as response:
                    body = await response.text()
            return sid

        polled = {"direct": (owner, await session()), "relayed": (other, await session())}
        pong = polled["direct"][1]

        async def poll(port: int, sid: str, job: asyncio.Future, started: list
                       ) -> float | None:
            """Milliseconds to the job's event; None if a ping came first (answered)."""
            pinged = False
            while True:
                async with http.get(f"http://127.0.0.1:{port}{io}&sid={sid}") as response:
                    body = await response.text()
                done = time.perf_counter()
                if "2" in body.split("\x1e"):
                    pinged = True
                    async with http.post(f"http://127.0.0.1:{port}{io}&sid={sid}",
                                         data="3") as response:
                        assert await response.text() == "ok"
                if (await job) in body:
                    return None if pinged else (done - started[0]) * 1000

        for n in range(rounds):
            order = ("direct", "relayed") if n % 2 else ("relayed", "direct")
            for way in order:
                port = owner if way == "direct" else other
                started = time.perf_counter()
                async with http.post(f"http://127.0.0.1:{port}{io}&sid={pong}",
                                     data="3") as response:
                    assert await response.text() == "ok"
                timings[f"post {way}"].append((time.perf_counter() - started) * 1000)
            job, started = asyncio.get_running_loop().create_future(), [0.0]
            polls = {way: asyncio.ensure_future(poll(port, sid, job, started))
                     for way, (port, sid) in polled.items()}
            await asyncio.sleep(0.02)  # both polls held before the job is made
            started[0] = time.perf_counter()
            async with http.post(f"http://127.0.0.1:{owner}/jobs") as response:
                job.set_result((await response.json())["id"])
            took = {way: await task for way, task in polls.items()}
            if None not in took.values():  # a round a ping fell in is not counted
                for way, ms in took.items():
                    timings[f"poll {way}"].append(ms)
    return timings


def _relay_cost(ctx, results: Results) -> None:
    redis = RedisServer(ctx.workdir, "relay-redis")
    nodes = []
    try:
        redis.wait_healthy()
        nodes = _relay_nodes(ctx, redis, f"bench-{uuid.uuid4().hex[:8]}:")
        rounds = 200 if ctx.quick else 1000
        timings = asyncio.run(_relay_timings(nodes[0].port, nodes[1].port, rounds))
    finally:
        for node in nodes:
            node.stop()
        redis.stop()
    results.raw["routing"] = {"relay_ms": timings}
    for kind in ("post", "poll"):
        direct, relayed = timings[f"{kind} direct"], timings[f"{kind} relayed"]
        what = ("A Socket.IO POST (a pong)" if kind == "post" else
                "A long-poll, POST /jobs to its event")
        results.add(f"{what}, relayed through another node: p50 / p99", median(relayed), "ms",
                    "", None, fmt="{:.2f}", p99_ms=percentile(relayed, 0.99),
                    direct_p50_ms=median(direct), direct_p99_ms=percentile(direct, 0.99),
                    rounds=len(relayed))
        log(f"routing: {kind} direct p50 {median(direct):.2f} p99 "
            f"{percentile(direct, 0.99):.2f} ms; relayed p50 {median(relayed):.2f} p99 "
            f"{percentile(relayed, 0.99):.2f} ms ({len(relayed)} rounds)")


def _supervisor(ctx, redis: RedisServer, prefix: str, workers: int, env=None) -> Server:
    """`--workers N` in Redis mode, once every worker answers /healthz."""
    folder = ctx.workdir / f"workers{workers}-{uuid.uuid4().hex[:8]}"
    folder.mkdir()
    port = free_port()
    server = Server(f"workers-{workers}", [PY, str(SERVICE), "--workers", str(workers),
                                           "--port", str(port), "--data",
                                           str(folder / "jobs.json")],
                    service_env({**LONG_DELAYS, "REDIS_URL": redis.url, "REDIS_PREFIX": prefix,
                                 **(env or {})}), folder / "service.log", port)
    server.wait_healthy()
    nodes: set[str] = set()
    deadline = time.monotonic() + 120
    while len(nodes) < workers and time.monotonic() < deadline:
        with contextlib.suppress(OSError, ValueError, KeyError):
            nodes.add(server.health()["node"])  # a new connection each time
    return server


def _workers_fanout(ctx, results: Results) -> None:
    node = shutil.which("node")
    client = ROOT / "tests" / "node" / "sio_many.mjs"
    if node is None or not (ROOT / "tests" / "node" / "node_modules").is_dir():
        results.add("Fan-out on --workers 4: not measured (npm ci --prefix tests/node)", None, "")
        return
    redis = RedisServer(ctx.workdir, "fanout-workers-redis")
    supervisor, groups = None, []
    try:
        redis.wait_healthy()
        supervisor = _supervisor(ctx, redis, f"bench-{uuid.uuid4().hex[:8]}:", 4,
                                 {"JOB_DELAY_MIN": "0.3", "JOB_DELAY_MAX": "0.3",
                                  "JOB_DELAY_STEP": "0.1"})
        url = f"http://127.0.0.1:{supervisor.port}"
        groups = [subprocess.Popen([node, str(client), url, "250"], stdin=subprocess.PIPE,
                                   stdout=subprocess.PIPE, text=True, env=dict(os.environ))
                  for _ in range(4)]

        def expect(group, kind: str) -> dict:
            while True:
                line = json.loads(group.stdout.readline())
                if line["type"] == kind:
                    return line

        for kind in ("connected", "upgraded"):
            for group in groups:
                expect(group, kind)
        log("routing: 1,000 socket.io-client sockets connected and upgraded on --workers 4")
        ids = []
        for _ in range(ctx.resolutions):
            ids.append(json.loads(request(supervisor.port, "POST", "/jobs", b"{}")[2])["id"])
            for group in groups:
                group.stdin.write(f"wait {json.dumps(ids[-1:])}\n")
                group.stdin.flush()
            for group in groups:
                expect(group, "has")
        clients = []
        for group in groups:
            group.stdin.write("report\n")
            group.stdin.flush()
            clients += expect(group, "report")["clients"]
        resolved_at = {job_id: parse_iso(json.loads(request(
            supervisor.port, "GET", f"/jobs/{job_id}")[2])["resolvedAt"]) for job_id in ids}
    finally:
        for group in groups:
            if group.poll() is None:
                group.kill()
                group.wait()
        if supervisor is not None:
            supervisor.stop()
        redis.stop()
    lasts = [(max(client["at"][job_id] for client in clients) / 1000 - resolved_at[job_id])
             * 1000 for job_id in ids]
    complete = all(len(client["at"]) == len(ids) for client in clients)
    results.raw.setdefault("routing", {})["workers_fanout"] = {"last_ms": lasts,
                                                               "clients": len(clients)}
    results.add(f"Fan-out to {len(clients):,} socket.io-client sockets (default options) on "
                "--workers 4: last receiver", median(lasts), "ms", "", None, fmt="{:.1f}",
                resolutions=len(lasts), worst_ms=max(lasts), every_client_got_every_event=complete,
                upgraded=sum(client["upgrades"] > 0 for client in clients))
    log(f"routing: fan-out to {len(clients)} sockets on 4 workers, last receiver median "
        f"{median(lasts):.1f} ms (worst {max(lasts):.1f})")


def _workers_throughput(ctx, results: Results) -> None:
    """POST /jobs of --workers 2 against one process, both Redis mode, alternating."""
    redis = RedisServer(ctx.workdir, "throughput-workers-redis")
    runs: dict[str, list[float]] = {"one process": [], "--workers 2": []}
    try:
        redis.wait_healthy()
        for n in range(ctx.repeats):
            order = ("one process", "--workers 2") if n % 2 == 0 else ("--workers 2",
                                                                       "one process")
            for setup in order:
                prefix = f"bench-{uuid.uuid4().hex[:8]}:"
                server = (start_redis_node(ctx, redis, prefix, "throughput-one")
                          if setup == "one process" else _supervisor(ctx, redis, prefix, 2))
                try:
                    server.wait_healthy()
                    url = f"http://127.0.0.1:{server.port}"
                    ctx.wrk.run(url + "/healthz", "get", 1)
                    runs[setup].append(ctx.wrk.run(url + "/jobs", "post", ctx.duration)["rps"])
                finally:
                    server.stop()
    finally:
        redis.stop()
    one, two = median(runs["one process"]), median(runs["--workers 2"])
    results.raw.setdefault("routing", {})["throughput"] = runs
    results.add("POST /jobs, --workers 2 against one process (Redis mode, one redis-server)",
                two / one * 100, "%", "", None, fmt="{:.0f}", workers2_rps=two, one_rps=one,
                rounds=len(runs["one process"]))
    log(f"routing: POST /jobs one process {one:,.0f} req/s, --workers 2 {two:,.0f} req/s")


def bench_routing(ctx, results: Results) -> None:
    """What it costs that any process serves any request of any session."""
    for part in (_relay_cost, _workers_fanout, _workers_throughput):
        part(ctx, results)


def bench_redis(ctx, results: Results) -> None:
    """The Redis scale-out mode (REDIS_URL), each part on its own fresh redis-server."""
    missing = None
    if shutil.which("redis-server") is None:
        missing = "redis-server is not on PATH"
    else:
        try:
            import redis  # noqa: F401  (the service's own dependency in this mode)
        except ImportError:
            missing = "redis-py is not installed in this Python"
    if missing:
        log(f"redis: not measured: {missing}")
        results.add(f"Redis mode: not measured ({missing})", None, "")
        return
    version = subprocess.run(["redis-server", "--version"], capture_output=True,
                             text=True).stdout.strip()
    log(f"redis: {version}")
    ctx.redis_problems = []
    results.raw["redis"] = {"version": version, "problems": ctx.redis_problems}
    failed = []
    parts = (_redis_throughput, _redis_event_latency, _redis_fanout_rows, _redis_memory,
             _redis_start, _redis_replicas, _redis_failover)
    for part in ctx.redis_parts or parts:
        try:
            part(ctx, results)
        except Exception as exc:  # the other parts still run
            failed.append(f"{part.__name__}: {exc!r}")
            log(f"redis: {part.__name__} failed: {exc!r}")
            results.add(f"[redis] {part.__name__} did not complete", None, "", "runs", False)
    if ctx.redis_problems:
        results.add("Redis mode: error lines in the nodes' logs", len(ctx.redis_problems), "",
                    "0", False, fmt="{:,}", first=ctx.redis_problems[:10])
    if failed:
        raise RuntimeError("; ".join(failed))


# --- Bulk changes --------------------------------------------------------------------


def _finished_snapshot(path: Path, count: int) -> None:
    """A jobs.json of `count` finished jobs: every other one failed, the rest resolved."""
    now = time.time()
    created, due, done = iso(now - 600), iso(now - 590), iso(now - 580)
    image = json.dumps({"id": "x", "thumb": None, "small": None, "alt": "Food photo",
                        "author": None, "authorUrl": None, "pageUrl": None, "color": None,
                        "source": "catalog"}, separators=(",", ":"))
    with open(path, "w", encoding="utf-8") as out:
        out.write(f'{{"version":1,"seq":{count},"jobs":[\n')
        for seq in range(1, count + 1):
            job_id = str(uuid.uuid4())
            if seq % 2:
                tail = ('"status":"failed","result":null,'
                        f'"createdAt":"{created}","dueAt":"{due}","resolvedAt":"{done}",'
                        '"attempts":10,"error":"gave up after 10 attempts: Unsplash '
                        'answered HTTP 500","image":null')
            else:
                tail = ('"status":"resolved","result":"https://images.unsplash.com/x",'
                        f'"createdAt":"{created}","dueAt":"{due}","resolvedAt":"{done}",'
                        f'"attempts":1,"error":null,"image":{image}')
            out.write(f'{{"id":"{job_id}",{tail},"seq":{seq}}}'
                      + (",\n" if seq < count else "\n"))
        out.write("]}\n")


def _http_probe(port: int, stop, out) -> None:
    """In a process of its own: GET /healthz every 5 ms until told to stop; the slowest
    answer, and how many there were."""
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=60)
    slowest, count = 0.0, 0
    while not stop.is_set():
        started = time.perf_counter()
        conn.request("GET", "/healthz")
        conn.getresponse().read()
        took = time.perf_counter() - started
        slowest, count = max(slowest, took), count + 1
        time.sleep(max(0.0, 0.005 - took))
    conn.close()
    out.put((slowest, count))


def _bulk_run(port: int, kind: str, left: str) -> tuple[float, float, int]:
    """POST /jobs/<kind>: (seconds to the 202, seconds until no job is `left`, taken)."""
    started = time.monotonic()
    status, _, body = request(port, "POST", f"/jobs/{kind}", b"{}", timeout=120)
    answered = time.monotonic() - started
    assert status == 202, body
    while json.loads(request(port, "GET", "/jobs/stats")[2])[left]:
        time.sleep(0.02)
    return answered, time.monotonic() - started, json.loads(body)["taken"]


def bench_bulk(ctx, results: Results) -> None:
    """POST /jobs/retry over N/2 failed jobs, then POST /jobs/delete over the N/2
    resolved ones, N jobs stored: the time to the 202, the time until every change is
    stored (GET /jobs/stats), and the slowest GET /healthz of another client (one every
    5 ms) meanwhile, against the slowest one at rest in the same run."""
    sizes = [20_000] if ctx.quick else [100_000] + ([1_000_000] if ctx.million else [])
    mp = multiprocessing.get_context("fork")
    raw = results.raw["bulk"] = {}
    held = {**LONG_DELAYS, "RETRY_BASE_DELAY": "86400", "RETRY_MAX_DELAY": "86400",
            "JOB_RETENTION": "0"}

    def probed(port: int, action) -> tuple[float, int, object]:
        stop, out = mp.Event(), mp.Queue()
        probe = mp.Process(target=_http_probe, args=(port, stop, out), daemon=True)
        probe.start()
        try:
            time.sleep(0.2)
            value = action()
            stop.set()
            slowest, count = out.get(timeout=60)
        finally:
            probe.join(10)
            if probe.is_alive():
                probe.kill()
        return slowest, count, value

    for size in sizes:
        snapshot = ctx.workdir / f"finished-{size}.json"
        _finished_snapshot(snapshot, size)
        server = start_service(ctx.workdir, f"bulk-{size}", snapshot, held)
        try:
            server.wait_healthy(timeout=600)
            rest, _, _ = probed(server.port, lambda: time.sleep(1.0))
            row = {"rest_slowest_ms": rest * 1000}
            for kind, left in (("retry", "failed"), ("delete", "resolved")):
                slowest, count, (answered, done, taken) = probed(
                    server.port, lambda port=server.port, kind=kind, left=left:
                    _bulk_run(port, kind, left))
                row[kind] = {"taken": taken, "answered_s": answered, "done_s": done,
                             "slowest_ms": slowest * 1000, "probes": count}
                log(f"bulk {kind} @ {size:,} jobs: {taken:,} taken, 202 in {answered:.2f} s, "
                    f"all stored in {done:.2f} s; slowest GET /healthz meanwhile "
                    f"{slowest * 1000:.1f} ms of {count:,} (at rest {rest * 1000:.1f} ms)")
                results.add(f"Bulk {kind} of {taken:,} jobs ({size:,} stored): until all "
                            "are stored", done, "s", fmt="{:.2f}", answered_s=answered)
                results.add(f"Bulk {kind} ({size:,} stored): slowest GET /healthz of "
                            "another client meanwhile (every 5 ms)", slowest * 1000, "ms",
                            fmt="{:.1f}", at_rest_ms=rest * 1000, probes=count)
            raw[size] = row
        finally:
            server.stop()


# --- Main ---------------------------------------------------------------------------


SECTIONS = {"post": bench_post, "access": bench_access, "reads": bench_reads,
            "memory": bench_memory, "restart": bench_restart, "fanout": bench_fanout,
            "polling": bench_polling, "unsplash": bench_unsplash, "quota": bench_quota,
            "redis": bench_redis, "routing": bench_routing, "soak": bench_soak,
            "bulk": bench_bulk, "stored": bench_stored}
# soak and quota take minutes of wall clock each: --only soak, --only quota; bulk, with
# its million jobs, --only bulk; stored, with its millions and a baseline, --only stored
DEFAULT_SECTIONS = [name for name in SECTIONS if name not in ("soak", "quota", "bulk",
                                                              "stored")]
REDIS_PARTS = ["throughput", "event_latency", "fanout_rows", "memory", "start", "replicas",
               "failover"]


class Context:
    pass


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=ROOT / "bench-results.json",
                        help="where to write the JSON results (default: bench-results.json)")
    parser.add_argument("--quick", action="store_true",
                        help="smoke run: 1 s per wrk run, 1 repeat, no 1,000,000-job restart, "
                             "25,000 jobs for the memory test")
    parser.add_argument("--duration", type=float, default=5.0,
                        help="seconds per wrk run (default 5)")
    parser.add_argument("--repeats", type=int, default=3, help="repeats per measurement")
    parser.add_argument("--pairs", type=int, default=5,
                        help="rounds of the POST comparison with the bare handler (default 5)")
    parser.add_argument("--resolutions", type=int, default=7,
                        help="resolutions timed in the fan-out test (default 7)")
    parser.add_argument("--no-million", dest="million", action="store_false",
                        help="skip the restart with 1,000,000 jobs")
    parser.add_argument("--only", action="append", choices=sorted(SECTIONS),
                        help="run only these sections (repeatable)")
    parser.add_argument("--keep", action="store_true", help="keep the work folder and logs")
    parser.add_argument("--redis-part", action="append", choices=REDIS_PARTS,
                        help="of the redis section, run only these parts (repeatable)")
    parser.add_argument("--baseline", metavar="REV",
                        help="--only stored: measure the build at this git revision too "
                             "(e.g. 477400f), alternating with this one")
    parser.add_argument("--soak-minutes", type=int, default=10,
                        help="length of the soak run (--only soak; default 10)")
    parser.add_argument("--soak-rate", type=int, default=1000,
                        help="jobs per second in the soak run (default 1,000)")
    args = parser.parse_args(argv)

    if shutil.which("wrk") is None:
        parser.error("wrk is not installed (apt-get install wrk)")
    ctx = Context()
    ctx.duration, ctx.repeats, ctx.resolutions = args.duration, args.repeats, args.resolutions
    ctx.pairs = args.pairs
    ctx.million, ctx.memory_jobs = args.million, 100_000
    ctx.redis_parts = [globals()[f"_redis_{name}"] for name in args.redis_part or ()]
    ctx.soak_minutes, ctx.soak_rate = args.soak_minutes, args.soak_rate
    ctx.baseline = args.baseline
    if args.quick:
        ctx.duration, ctx.repeats, ctx.resolutions, ctx.million = 1.0, 1, 3, False
        ctx.pairs = 1
        ctx.memory_jobs = 25_000
    ctx.quick = args.quick
    ctx.workdir = Path(tempfile.mkdtemp(prefix="jobservice-bench-"))
    ctx.snapshots = Snapshots(ctx.workdir)
    ctx.wrk = Wrk(ctx.workdir, threads=2, connections=64)
    generator = (f"{wrk_version()} -t2 -c64 -d{ctx.duration:g}s with Lua scripts (POST, GET "
                 "by random id, percentiles from done()); Python http.client for sequential "
                 "list/page timings; 4 processes x 250 aiohttp WebSocket clients for fan-out; "
                 "an aiohttp client with 32 connections for the Unsplash burst")
    started = time.monotonic()
    load_before = loadavg()
    log(f"load generator: {generator}")
    log(f"work folder {ctx.workdir}; {ctx.repeats} repeats of {ctx.duration:g} s; "
        f"load average {load_before}")
    results = Results()
    failures = []
    try:
        for name in args.only or DEFAULT_SECTIONS:
            log(f"--- {name}")
            try:
                SECTIONS[name](ctx, results)
            except Exception as exc:  # report the rest even if one section breaks
                failures.append(f"{name}: {exc!r}")
                log(f"section {name} failed: {exc!r}")
                results.add(f"[{name}] did not complete", None, "", "runs", False)
    finally:
        for server in list(Server.running):
            server.stop()
        if not args.keep:
            shutil.rmtree(ctx.workdir, ignore_errors=True)

    report = {
        "date": datetime.now(UTC).isoformat(timespec="seconds"),
        "load_generator": generator,
        "machine": {"cpus": os.cpu_count(), "python": platform.python_version(),
                    "platform": platform.platform(), "load_average_before": load_before,
                    "load_average_after": loadavg()},
        "settings": {"duration_s": ctx.duration, "repeats": ctx.repeats, "threads": 2,
                     "connections": 64, "quick": args.quick},
        "elapsed_s": time.monotonic() - started,
        "results": [{key: value for key, value in row.items() if key != "display"}
                    for row in results.rows],
        "errors": failures,
        "raw": results.raw,
    }
    args.out.write_text(json.dumps(report, indent=2, default=str) + "\n")
    print(f"\njobservice benchmark, {report['date']}, {os.cpu_count()} CPUs, "
          f"load average {load_before} before / {report['machine']['load_average_after']} "
          f"after, {report['elapsed_s']:.0f} s")
    print(f"load generator: {generator}")
    print(f"medians of {ctx.repeats} repeat(s); shares are against the bare aiohttp handler "
          "measured in this run\n")
    print(results.table())
    print(f"\nresults written to {args.out}")
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main())
