"""Property-based run of the supervisor's API (Schemathesis, from the committed OpenAPI document)
against a live supervisor of a micro guest: no 5xx, every response as the document says, bad
input refused with 4xx, and the machine still running afterwards.

Operations that end the machine or stream forever (stop, request-stop, save, console, events) are
left out; the hostile-input suite covers them by hand. So is set_balloon: a valid target the guest
cannot reach makes it wait out its timeout (up to minutes); tests/integration/test_memory.py covers it. And
set_limits: a valid cpu_max of 1 % or a memory_high of a few bytes would starve the shared guest for the rest of
the run; test_supervisor_api_fuzz.py sends it hostile bodies and tests/integration/test_cgroups_live.py the rest.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import socket
import threading
from collections.abc import Iterator
from pathlib import Path

import pytest
import schemathesis
from hypothesis import HealthCheck, settings
from schemathesis import checks
from schemathesis.config import SchemathesisConfig

from conftest import image_cache_dir, pid_alive, vmkit
from vmkit.host.images.store import Image

pytestmark = [pytest.mark.integration]

DOC = Path(__file__).resolve().parents[2] / "docs" / "openapi.json"
RELAYED: list[int] = []  # one entry per connection the fuzzer made
LEFT_OUT = ["stop", "request_stop", "save", "console", "events", "revert_snapshot", "set_balloon", "set_limits"]


def _forward(unix_path: Path) -> tuple[str, asyncio.AbstractEventLoop]:
    """A loopback TCP port relaying to the supervisor's unix socket (requests speaks TCP)."""
    loop = asyncio.new_event_loop()
    ready = threading.Event()
    port: list[int] = []

    async def pipe(r: asyncio.StreamReader, w: asyncio.StreamWriter) -> None:
        with contextlib.suppress(ConnectionError):
            while data := await r.read(65536):
                w.write(data)
                await w.drain()
        w.close()

    async def handle(r: asyncio.StreamReader, w: asyncio.StreamWriter) -> None:
        RELAYED.append(1)
        ur, uw = await asyncio.open_unix_connection(str(unix_path))
        await asyncio.gather(pipe(r, uw), pipe(ur, w))

    async def main() -> None:
        server = await asyncio.start_server(handle, "127.0.0.1", 0)
        port.append(server.sockets[0].getsockname()[1])
        ready.set()
        async with server:
            with contextlib.suppress(asyncio.CancelledError):
                await server.serve_forever()

    def run() -> None:
        with contextlib.suppress(RuntimeError):  # stopped at the end of the module
            loop.run_until_complete(main())

    threading.Thread(target=run, daemon=True).start()
    ready.wait(10)
    return f"http://127.0.0.1:{port[0]}", loop


@pytest.fixture(scope="module")
def live(micro_image: Image, tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[str, Path]]:
    home = tmp_path_factory.mktemp("api-home")
    env = {"VMKIT_HOME": str(home), "VMKIT_IMAGE_CACHE": str(image_cache_dir())}
    old = {k: os.environ.get(k) for k in env}
    os.environ.update(env)
    try:
        vmkit("create", "fuzz", "--image", "micro", "--memory", "128M")
        vmkit("start", "fuzz")
        inst = home / "instances" / "fuzz"
        url, loop = _forward(inst / "api.sock")
        yield url, inst
        loop.call_soon_threadsafe(loop.stop)
        vmkit("stop", "--force", "fuzz", check=False)
    finally:
        for k, v in old.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v


# A body over the supervisor's size limit is refused with 413 before it is parsed: as much a refusal
# of bad input as a 400 (Schemathesis's default list of refusals leaves 413 out).
REFUSALS = ["400", "401", "403", "404", "406", "413", "422", "428", "5xx"]
CONFIG = SchemathesisConfig.from_dict({"checks": {"negative_data_rejection": {"expected-statuses": REFUSALS}}})
schema = schemathesis.openapi.from_path(DOC, config=CONFIG).exclude(operation_id=LEFT_OUT)


@schema.parametrize()
@settings(max_examples=40, deadline=None, suppress_health_check=list(HealthCheck))
def test_api_answers_as_documented(case: schemathesis.Case, live: tuple[str, Path]) -> None:
    url, _ = live
    case.call_and_validate(base_url=url, timeout=60, checks=[
        checks.not_a_server_error, checks.status_code_conformance, checks.content_type_conformance,
        checks.response_schema_conformance, checks.negative_data_rejection])


def test_machine_survived_the_run(live: tuple[str, Path]) -> None:
    _, inst = live
    assert len(RELAYED) >= 100, f"the fuzzer made only {len(RELAYED)} requests"
    state = json.loads((inst / "state.json").read_text())
    assert state["state"] in ("running", "paused"), state
    assert state["qemu_pid"] and pid_alive(state["qemu_pid"])
    with socket.socket(socket.AF_UNIX) as s:
        s.connect(str(inst / "api.sock"))
