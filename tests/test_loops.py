"""The service on any asyncio event loop: the CLI run by a host that set uvloop's event
loop policy, and by --loop; a uvloop asked for and not installed; workers on their
supervisor's loop. Each serves HTTP, /ws and Socket.IO (polling, then the upgrade)."""

from __future__ import annotations

import asyncio
import json
import os
import sys

import aiohttp
import pytest
import socketio
import uvloop
from conftest import FAST_ENV, ROOT

pytestmark = pytest.mark.file_only  # the loop is all that differs

# A host that installs uvloop as the event loop policy, then runs the service as a
# script (as a launcher, or a platform that sets the policy for every process, does).
HOST_WITH_UVLOOP_POLICY = (
    "import asyncio, runpy, sys, uvloop; "
    "asyncio.set_event_loop_policy(uvloop.EventLoopPolicy()); "
    "sys.argv[0] = sys.argv[1]; del sys.argv[1]; "
    "runpy.run_path(sys.argv[0], run_name='__main__')")


async def answers_every_kind_of_client(url: str) -> None:
    """A 201 for a POST, its ON_CREATED_JOB on /ws and to a Socket.IO client that began
    on long-polling and upgraded to a WebSocket."""
    sio = socketio.AsyncClient(reconnection=False, handle_sigint=False)
    created: asyncio.Queue = asyncio.Queue()
    sio.on("ON_CREATED_JOB", lambda job, offset: created.put_nowait(job["id"]))
    async with aiohttp.ClientSession() as http, http.ws_connect(f"{url}/ws") as ws:
        await sio.connect(url, transports=["polling", "websocket"])  # upgrades within
        try:
            assert sio.transport() == "websocket"
            async with http.post(f"{url}/jobs") as response:
                assert response.status == 201, await response.text()
                job_id = (await response.json())["id"]
            async with asyncio.timeout(10):
                while True:
                    name, job = json.loads((await ws.receive()).data)
                    if name == "ON_CREATED_JOB" and job["id"] == job_id:
                        break
                assert await created.get() == job_id
        finally:
            await sio.disconnect()


@pytest.mark.parametrize(("host", "env", "args", "expected"), [
    (True, {"LOOP": "auto"}, (), "event loop uvloop 0.23.0 (the host's event loop policy)"),
    (False, {}, ("--loop", "uvloop"), "event loop uvloop 0.23.0 (--loop uvloop)"),
    (False, {"LOOP": "asyncio"}, (), "event loop asyncio (--loop asyncio)"),
], ids=["the-host-s-uvloop-policy", "option-uvloop", "env-asyncio"])
async def test_the_cli_serves_every_client_on_the_loop_chosen(host, env, args, expected,
                                                               service_process):
    command = [sys.executable, "-c", HOST_WITH_UVLOOP_POLICY, str(ROOT / "jobservice.py")] \
        if host else None
    service = await service_process(env, args=args, command=command)
    [line] = [line for line in service.log if "listening on" in line]
    assert expected.replace("0.23.0", uvloop.__version__) in line, line
    await answers_every_kind_of_client(service.url)
    assert await service.stop() == 0


async def test_uvloop_asked_for_and_not_installed_is_a_one_line_error(tmp_path):
    without_uvloop = ("import runpy, sys; sys.modules['uvloop'] = None; "
                      "sys.argv[0] = sys.argv[1]; del sys.argv[1]; "
                      "runpy.run_path(sys.argv[0], run_name='__main__')")
    for args, env in [(["--loop", "uvloop"], {}), ([], {"LOOP": "uvloop"})]:
        process = await asyncio.create_subprocess_exec(
            sys.executable, "-c", without_uvloop, str(ROOT / "jobservice.py"), *args,
            "--port", "0", "--data", str(tmp_path / "jobs.json"),
            env={**os.environ, **FAST_ENV, **env}, stdout=asyncio.subprocess.PIPE,
            stderr=asyncio.subprocess.PIPE)
        out, err = await asyncio.wait_for(process.communicate(), 20)
        assert process.returncode == 2
        lines = err.decode().strip().splitlines()
        assert len(lines) == 1 and "pip install 'jobservice[uvloop]'" in lines[0], lines
        assert not out and not (tmp_path / "jobs.json").exists()
