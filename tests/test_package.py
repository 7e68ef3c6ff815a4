"""The package as a user gets it: `python -m build` (an sdist, then a wheel built from that
sdist), installed into a fresh venv, and its `jobservice` command run from a folder that is
not the checkout. static/ (the page, openapi.json, the photo catalog) must ship inside it.

Nothing is mocked: build isolation and the install fetch from the package index (pip's cache
is fine), so the first run of this module takes some seconds; both are done once per module.
"""

from __future__ import annotations

import asyncio
import importlib.util
import json
import os
import subprocess
import sys
import tarfile
import zipfile
from pathlib import Path

import aiohttp
import pytest
from conftest import FAST_ENV, ROOT, EventStream, ServiceProcess

# One worker for the module: the wheel is built once, in the checkout (conftest.py).
pytestmark = pytest.mark.xdist_group("package")
STATIC = ROOT / "static"
# Every file the service serves or reads; screenshot.png is only for the README.
SHIPPED = sorted(path.relative_to(STATIC).as_posix() for path in STATIC.rglob("*")
                 if path.is_file() and path.suffix != ".png")


def clean_env() -> dict[str, str]:
    """The environment minus anything that could lead Python back to the checkout."""
    env = {name: value for name, value in os.environ.items()
           if name not in {"PYTHONPATH", "PYTHONHOME", "PYTHONSTARTUP", "VIRTUAL_ENV",
                           "UNSPLASH_ACCESS_KEY", "UNSPLASH_API_URL"}}
    return {**env, "PYTHONNOUSERSITE": "1", "PYTHONUNBUFFERED": "1"}


def run(command: list[str], cwd: Path, timeout: float) -> str:
    try:
        done = subprocess.run(command, cwd=cwd, env=clean_env(), capture_output=True,
                              text=True, timeout=timeout, check=False)
    except subprocess.TimeoutExpired:
        pytest.fail(f"{' '.join(command)} took over {timeout:g} s", pytrace=False)
    assert done.returncode == 0, (
        f"{' '.join(command)} exited {done.returncode}:\n{done.stdout}\n{done.stderr}")
    return done.stdout


@pytest.fixture(scope="module")
def dist(tmp_path_factory) -> dict[str, Path]:
    """`python -m build`: the sdist, then the wheel built from the unpacked sdist."""
    if importlib.util.find_spec("build") is None:
        pytest.fail("the `build` package is missing from the test environment; install "
                    "the test extra: pip install -e '.[test]'", pytrace=False)
    out = tmp_path_factory.mktemp("dist")
    run([sys.executable, "-m", "build", "--outdir", str(out), str(ROOT)], cwd=out, timeout=90)
    [sdist] = out.glob("jobservice-*.tar.gz")
    [wheel] = out.glob("jobservice-*.whl")
    return {"sdist": sdist, "wheel": wheel}


@pytest.fixture(scope="module")
def venv(dist, tmp_path_factory) -> Path:
    """A fresh venv with the built wheel (and its dependencies) installed by pip."""
    home = tmp_path_factory.mktemp("venv").resolve()
    run([sys.executable, "-m", "venv", str(home)], cwd=home, timeout=60)
    run([str(home / "bin" / "python"), "-m", "pip", "install", "--quiet",
         "--disable-pip-version-check", str(dist["wheel"])], cwd=home, timeout=90)
    return home


def test_the_sdist_and_the_wheel_carry_static(dist):
    with tarfile.open(dist["sdist"]) as sdist:
        names = {name.split("/", 1)[1] for name in sdist.getnames() if "/" in name}
    missing = [name for name in SHIPPED if f"static/{name}" not in names]
    assert not missing, f"the sdist lacks {missing}"
    with zipfile.ZipFile(dist["wheel"]) as wheel:
        names = set(wheel.namelist())
    assert "jobservice.py" in names
    assert sorted(name.removeprefix("jobservice_static/") for name in names
                  if name.startswith("jobservice_static/")) == SHIPPED
    assert not any(name.startswith(("static/", "tests/")) for name in names), sorted(names)


async def test_the_installed_command_serves_the_page_and_resolves_jobs(venv, tmp_path):
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    python = venv / "bin" / "python"
    probe = await asyncio.create_subprocess_exec(
        str(python), "-c", "import jobservice; print(jobservice.__file__); "
        "print(jobservice.STATIC_DIR)", cwd=elsewhere, env=clean_env(),
        stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE)
    out, err = await asyncio.wait_for(probe.communicate(), 30)
    assert probe.returncode == 0, err.decode()
    module, static = (Path(line) for line in out.decode().split())
    for path in (module, static):
        assert path.is_relative_to(venv) and "site-packages" in path.parts, path
        assert not path.is_relative_to(ROOT), path
    assert static.name == "jobservice_static" and (static / "index.html").is_file()

    catalog = json.loads((STATIC / "unsplash_food_photos.json").read_text("utf-8"))
    by_url = {entry["url"]: entry for entry in catalog}
    service = ServiceProcess(tmp_path / "jobs.json", command=[str(venv / "bin" / "jobservice")],
                             cwd=elsewhere)
    service.env = {**clean_env(), **FAST_ENV}  # nothing that leads back to the checkout
    await service.start()
    try:
        assert any("catalog" in line for line in service.log), service.log
        async with aiohttp.ClientSession() as http:
            async with http.get(f"{service.url}/") as page:
                assert page.status == 200 and page.content_type == "text/html"
                assert "<title>jobservice" in await page.text()
            async with http.get(f"{service.url}/static/app.js") as script:
                assert script.status == 200
            async with http.get(f"{service.url}/openapi.json") as spec:
                assert spec.status == 200 and spec.content_type == "application/json"
                assert (await spec.json())["openapi"].startswith("3.1")

            events = EventStream(await http.ws_connect(f"{service.url}/ws"))
            async with http.post(f"{service.url}/jobs") as created:
                assert created.status == 201, await created.text()
                job_id = (await created.json())["id"]
            _, job = await events.until(
                lambda name, job: name == "ON_RESOLVED_JOB" and job["id"] == job_id)
            assert job["status"] == "resolved"
            photo = by_url.get(job["result"].split("?")[0])
            assert photo is not None, f"{job['result']} is not a catalog photo"
            assert job["image"]["source"] == "catalog" and job["image"]["id"] == photo["id"]
            async with http.get(f"{service.url}/jobs/{job_id}") as fetched:
                assert await fetched.json() == job
            await events.ws.close()
        assert await service.stop() == 0
    finally:
        if service.process.returncode is None:
            service.process.kill()
            await service.process.wait()
    assert [saved["id"] for saved in json.loads((tmp_path / "jobs.json").read_text())["jobs"]
            ] == [job_id]
    assert not (elsewhere / "jobs.json").exists()
