"""`jobservice systemd-unit`: the unit it prints is one systemd takes as it is
(`systemd-analyze verify`), sandboxed to an exposure of 2.0 or less
(`systemd-analyze security --offline=yes`), and the service starts under the open-files
limit the unit gives it, with the MAX_CONNECTIONS it sets. Debian's systemd package has
systemd-analyze; no running systemd is needed."""

from __future__ import annotations

import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
from conftest import ROOT
from test_limits import start_line, under_limit

VARIANTS = {
    "one-process": [],
    "workers-on-a-local-redis": ["--workers", "4", "--redis", "redis://127.0.0.1:6379/0"],
    "node-of-a-remote-redis": ["--redis", "redis://redis.internal:6379/0"],
}


def systemd_analyze() -> str:
    binary = shutil.which("systemd-analyze")
    if binary is None:
        pytest.fail("these tests need systemd-analyze: apt-get install -y systemd",
                    pytrace=False)
    return binary


def unit(folder: Path, args: list[str]) -> tuple[Path, str]:
    """The unit printed for args, written where systemd-analyze reads it."""
    result = subprocess.run([sys.executable, str(ROOT / "jobservice.py"), "systemd-unit",
                             *args], capture_output=True, text=True, timeout=30, check=False)
    assert result.returncode == 0, result.stderr
    path = folder / "jobservice.service"
    path.write_text(result.stdout)
    return path, result.stdout


def directives(text: str) -> dict[str, list[str]]:
    found: dict[str, list[str]] = {}
    for line in text.splitlines():
        if "=" in line and not line.startswith("#"):
            name, _, value = line.partition("=")
            found.setdefault(name, []).append(value)
    return found


@pytest.mark.parametrize("args", VARIANTS.values(), ids=VARIANTS.keys())
def test_the_unit_verifies_clean_and_is_exposed_at_most_2(tmp_path, args):
    path, text = unit(tmp_path, args)
    verify = subprocess.run([systemd_analyze(), "verify", str(path)], capture_output=True,
                            text=True, timeout=60, check=False)
    assert (verify.returncode, verify.stdout + verify.stderr) == (0, ""), text
    security = subprocess.run([systemd_analyze(), "security", "--offline=yes", str(path)],
                              capture_output=True, text=True, timeout=60, check=False)
    found = re.search(r"Overall exposure level for jobservice\.service: ([\d.]+)",
                      security.stdout)
    assert found, security.stdout + security.stderr
    assert float(found.group(1)) <= 2.0, security.stdout

    unit_of = directives(text)
    assert unit_of["DynamicUser"] == ["yes"] and unit_of["StateDirectory"] == ["jobservice"]
    assert " --data %S/jobservice/jobs.json" in unit_of["ExecStart"][0]
    assert unit_of["ExecReload"] == ["/bin/kill -s HUP $MAINPID"]
    assert unit_of["KillSignal"] == ["SIGTERM"]
    assert float(unit_of["TimeoutStopSec"][0]) > 30  # a supervisor waits 30 s per worker
    redis = [value for value in unit_of.get("Environment", []) if value.startswith("REDIS_URL")]
    if "--redis" in args:
        assert redis == [f"REDIS_URL={args[args.index('--redis') + 1]}"]
    local = "127.0.0.1" in " ".join(args)
    assert ("Wants" in unit_of and "redis-server.service" in unit_of["Wants"][0]) == local
    assert ("redis-server.service" in unit_of["After"][0]) == local
    assert ("--workers 4" in unit_of["ExecStart"][0]) == ("--workers" in args)


@pytest.mark.parametrize("from_unit", [True, False], ids=["set", "derived"])
async def test_the_limit_of_the_unit_is_the_one_its_max_connections_needs(
        tmp_path, service_process, from_unit):
    """Under the unit's LimitNOFILE=, the service keeps the MAX_CONNECTIONS the unit sets,
    and derives the same number from the limit alone: two descriptors a connection (one
    for a file being sent), and 64 kept for its own."""
    _, text = unit(tmp_path, ["--max-connections", "300"])
    unit_of = directives(text)
    limit = int(unit_of["LimitNOFILE"][0])
    env = dict(value.split("=", 1) for value in unit_of["Environment"]) if from_unit else {}
    assert env.get("MAX_CONNECTIONS", "300") == "300"
    service = await service_process(env, command=under_limit(limit, limit))
    assert f"at most 300 connections (MAX_CONNECTIONS) of {limit} open files" \
        in start_line(service)
    assert await service.stop() == 0


def test_workers_without_redis_is_refused():
    result = subprocess.run([sys.executable, str(ROOT / "jobservice.py"), "systemd-unit",
                             "--workers", "2"], capture_output=True, text=True, timeout=30,
                            check=False)
    assert result.returncode == 2 and "--workers needs --redis" in result.stderr
    assert result.stdout == ""
