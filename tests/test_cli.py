"""Running it: settings, the start-up line, signals, and both ways to start it."""

from __future__ import annotations

import asyncio
import logging
import os
import signal
import sys
from pathlib import Path

import aiohttp
import pytest
from conftest import FAST_ENV, ROOT, ServiceProcess, stored

import jobservice


@pytest.mark.parametrize(("name", "value"), [
    ("PORT", "99999"), ("PORT", "http"), ("JOB_DELAY_MIN", "abc"), ("JOB_DELAY_STEP", "0"),
    ("JOB_DELAY_MAX", "0.01"), ("RETRY_BASE_DELAY", "-1"), ("RETRY_MAX_DELAY", "nan"),
    ("JOB_MAX_ATTEMPTS", "0"), ("JOB_MAX_ATTEMPTS", "2.5"), ("UNSPLASH_TIMEOUT", "inf"),
    ("UNSPLASH_API_URL", "ftp://example.com"), ("CORS_ORIGINS", "example.com"),
    ("MAX_CONNECTIONS", "0"), ("MAX_CONNECTIONS", "many"),
    ("MAX_CONNECTIONS", "100000000"),  # more than the open-files limit leaves room for
    ("LOOP", "tokio"),
])
async def test_an_invalid_setting_stops_start_up_naming_it(name, value, tmp_path):
    env = {**os.environ, **FAST_ENV, name: value}
    process = await asyncio.create_subprocess_exec(
        sys.executable, str(ROOT / "jobservice.py"), "--data", str(tmp_path / "jobs.json"),
        env=env, stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE)
    _, err = await asyncio.wait_for(process.communicate(), 20)
    assert process.returncode == 2
    lines = err.decode().strip().splitlines()
    assert len(lines) == 1 and name in lines[0], lines
    assert not (tmp_path / "jobs.json").exists()


def test_settings_come_from_the_environment_and_flags_win():
    env = {"HOST": "0.0.0.0", "PORT": "8080", "JOBS_FILE": "/tmp/a.json",
           "JOB_DELAY_MIN": "0.5", "JOB_DELAY_MAX": "2.5", "JOB_DELAY_STEP": "0.5",
           "CORS_ORIGINS": "https://a.example, *", "UNSPLASH_API_URL": "http://127.0.0.1:9/"}
    settings = jobservice.load_settings([], env)
    assert (settings.host, settings.port, settings.jobs_file) == ("0.0.0.0", 8080,
                                                                  Path("/tmp/a.json"))
    assert settings.cors_origins == ("https://a.example", "*")
    assert settings.unsplash_api_url == "http://127.0.0.1:9"
    flagged = jobservice.load_settings(["--port", "9000", "--data", "b.json"], env)
    assert (flagged.port, flagged.jobs_file) == (9000, Path("b.json"))
    defaults = jobservice.load_settings([], {})
    assert (defaults.host, defaults.port, defaults.job_delay_max) == ("127.0.0.1", 3000, 300)


def test_delays_are_min_plus_whole_steps_never_above_max():
    settings = jobservice.load_settings([], {"JOB_DELAY_MIN": "0.5", "JOB_DELAY_MAX": "2.2",
                                             "JOB_DELAY_STEP": "0.5"})
    delays = {round(job.due_at - job.created_at, 6)
              for job in (jobservice.Job.new(settings, 1000.0) for _ in range(2000))}
    assert delays == {0.5, 1.0, 1.5, 2.0}
    defaults = jobservice.load_settings([], {})
    delays = {round(job.due_at - job.created_at, 6)
              for job in (jobservice.Job.new(defaults, 0.0) for _ in range(20000))}
    assert delays == {5.0 * k for k in range(1, 61)}


async def test_start_up_line_names_address_settings_and_source_but_never_the_key(
        service_process, fake_unsplash):
    service = await service_process({"UNSPLASH_ACCESS_KEY": "sekrit-key-123456",
                                     "UNSPLASH_API_URL": fake_unsplash.url})
    [line] = [line for line in service.log if "listening on" in line]
    assert service.url.removeprefix("http://") in line
    assert "delays 0.05-0.2 s" in line and f"Unsplash API at {fake_unsplash.url}" in line
    assert await service.stop(signal.SIGTERM) == 0
    assert not any("sekrit-key-123456" in line for line in service.log)


async def test_catalog_mode_warns_how_to_use_the_live_api(service_process):
    service = await service_process()
    assert any("UNSPLASH_ACCESS_KEY" in line and "catalog" in line for line in service.log)


@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGINT])
async def test_a_signal_closes_sockets_with_1001_finishes_writing_and_exits_0(
        service_process, jobs_file, backend, sig):
    service = await service_process({"JOB_DELAY_MIN": "60", "JOB_DELAY_MAX": "60"})
    async with aiohttp.ClientSession() as session:
        ws = await session.ws_connect(f"{service.url}/ws")
        created = await session.post(f"{service.url}/jobs")
        job_id = (await created.json())["id"]
        await ws.receive(timeout=5)
        assert await service.stop(sig) == 0
        closing = await ws.receive(timeout=5)
        assert closing.type == aiohttp.WSMsgType.CLOSE and closing.data == 1001
    jobs, _ = await stored(backend, jobs_file)
    assert list(jobs) == [job_id]


async def test_the_console_script_starts_the_service(tmp_path):
    script = Path(sys.executable).with_name("jobservice")
    assert script.exists(), "install the package (pip install -e .) to get the jobservice command"
    service = await ServiceProcess(tmp_path / "jobs.json", command=[str(script)]).start()
    try:
        async with aiohttp.ClientSession() as session, \
                session.get(f"{service.url}/healthz") as health:
            assert health.status == 200
    finally:
        assert await service.stop() == 0


async def test_a_port_in_use_is_a_clear_error(service_process, tmp_path):
    running = await service_process()
    port = running.url.rsplit(":", 1)[1]
    process = await asyncio.create_subprocess_exec(
        sys.executable, str(ROOT / "jobservice.py"), "--port", port,
        "--data", str(tmp_path / "other.json"), env={**os.environ, **FAST_ENV},
        stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE)
    _, err = await asyncio.wait_for(process.communicate(), 20)
    assert process.returncode == 1
    assert f"cannot listen on 127.0.0.1:{port}" in err.decode()


async def test_the_default_cap_says_at_start_what_it_will_cost(tmp_path):
    service = ServiceProcess(tmp_path / "jobs.json")
    service.env.pop("MAX_STORED_JOBS", None)
    await service.start()
    assert await service.stop() == 0
    [note] = [line for line in service.log if "MAX_STORED_JOBS, by default" in line]
    assert "1,000,000 stored jobs (MAX_STORED_JOBS, by default) will take about 0.8 GiB" \
        in note
    chosen = ServiceProcess(tmp_path / "jobs.json", {"MAX_STORED_JOBS": "1000"})
    await chosen.start()
    assert await chosen.stop() == 0
    assert not any("by default" in line for line in chosen.log)


def test_a_default_cap_beyond_the_memory_is_warned_of_with_one_that_fits():
    gib = 2**30
    level, text = jobservice.stored_jobs_note(1_000_000, 1, 24 * gib, "physical memory")
    assert level == logging.INFO and "0.8 GiB, of the 24.0 GiB of physical memory" in text
    level, text = jobservice.stored_jobs_note(1_000_000, 1, gib, "its cgroup's memory limit")
    assert level == logging.WARNING
    assert "more than 3/4 of the 1.0 GiB of its cgroup's memory limit" in text
    fits = int(text.split("MAX_STORED_JOBS to ")[1].split()[0].replace(",", ""))
    assert jobservice.stored_jobs_note(fits, 1, gib, "")[0] == logging.INFO
    assert jobservice.stored_jobs_note(fits + 10_000, 1, gib, "")[0] == logging.WARNING
    level, text = jobservice.stored_jobs_note(1_000_000, 3, 3 * gib, "physical memory")
    assert level == logging.WARNING and "3 workers, each with every job" in text


@pytest.mark.parametrize(("cgroup", "files", "expected"), [
    ("0::/service.slice/app\n", {"service.slice/memory.max": "1073741824\n",
                                 "service.slice/app/memory.max": "max\n"}, 1 << 30),
    ("0::/\n", {"memory.max": "536870912\n"}, 1 << 29),  # in a container: its own root
    ("0::/app\n", {"app/memory.max": "max\n"}, None),
    ("4:memory:/docker/abc\n1:cpu:/\n", {"memory/docker/abc/memory.limit_in_bytes":
                                         "805306368\n"}, 768 << 20),
    ("4:memory:/x\n", {"memory/memory.limit_in_bytes": "9223372036854771712\n"}, None),
], ids=["v2, a parent's", "v2, the root", "v2, none", "v1", "v1, none"])
def test_the_memory_a_process_may_have_is_its_cgroups_limit_or_the_machines(
        tmp_path, cgroup, files, expected):
    proc = tmp_path / "cgroup"
    proc.write_text(cgroup)
    for name, text in files.items():
        path = tmp_path / "sys" / name
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(text)
    physical = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    limit, source = jobservice.memory_limit(proc, tmp_path / "sys")
    if expected is None:
        assert (limit, source) == (physical, "the machine's physical memory")
    else:
        assert (limit, source) == (expected, "its cgroup's memory limit")
