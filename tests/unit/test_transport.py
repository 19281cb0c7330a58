"""The supervisor client's blocking calls (vmkit.api.transport: ``call`` and ``lines`` on http.client),
against a real aiohttp server on a unix socket, as the supervisor serves its API."""

from __future__ import annotations

import asyncio
import json
import os
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
from aiohttp import web

from vmkit.api import speccheck
from vmkit.api.transport import SupervisorClient, SupervisorGone
from vmkit.errors import StateError, VmTimeoutError, error_fields

REPO = Path(__file__).resolve().parents[2]


class Server:
    """An aiohttp app on a unix socket, run in a thread; ``hung_up`` is set when a streaming
    client goes away mid-stream, ``release`` lets a stream send its second line."""

    def __init__(self, socket_path: Path) -> None:
        self.socket_path = socket_path
        self.release = threading.Event()
        self.hung_up = threading.Event()
        self.seen: list[object] = []
        self.loop = asyncio.new_event_loop()
        self.ready = threading.Event()
        self.thread = threading.Thread(target=self._run, daemon=True)
        self.thread.start()
        assert self.ready.wait(10)

    def _run(self) -> None:
        asyncio.set_event_loop(self.loop)
        app = web.Application()
        app.router.add_get("/v1/ok", self.ok)
        app.router.add_post("/v1/echo", self.echo)
        app.router.add_get("/v1/refused", self.refused)
        app.router.add_get("/v1/slow", self.slow)
        app.router.add_post("/v1/lines", self.lines)
        self.runner = web.AppRunner(app)
        self.loop.run_until_complete(self.runner.setup())
        self.loop.run_until_complete(web.UnixSite(self.runner, str(self.socket_path)).start())
        self.ready.set()
        self.loop.run_forever()

    async def ok(self, request: web.Request) -> web.Response:
        self.seen.append(request.headers.get("Host"))
        return web.json_response({"state": "running"})

    async def echo(self, request: web.Request) -> web.Response:
        body = await request.json()
        self.seen.append(body)
        return web.json_response({"got": body})

    async def refused(self, request: web.Request) -> web.Response:
        exc = StateError("pause web", "stopped", ["running"])
        return web.json_response({"error": error_fields(exc)}, status=409)

    async def slow(self, request: web.Request) -> web.Response:
        await asyncio.sleep(1.5)
        return web.json_response({})

    async def lines(self, request: web.Request) -> web.StreamResponse:
        resp = web.StreamResponse(headers={"Content-Type": "application/x-ndjson"})
        await resp.prepare(request)
        await resp.write(b'{"progress": 1}\n\n')
        await asyncio.get_running_loop().run_in_executor(None, self.release.wait, 10)
        try:
            for i in range(2, int(request.query.get("n", "500"))):
                await resp.write(json.dumps({"progress": i}).encode() + b"\n")
                await asyncio.sleep(0.02)
        except (ConnectionResetError, ConnectionError):
            self.hung_up.set()
            raise
        await resp.write(b'{"result": "done"}\n')
        return resp

    def close(self) -> None:
        asyncio.run_coroutine_threadsafe(self.runner.cleanup(), self.loop).result(10)
        self.loop.call_soon_threadsafe(self.loop.stop)
        self.thread.join(10)


@pytest.fixture
def server(monkeypatch: pytest.MonkeyPatch) -> Iterator[Server]:
    monkeypatch.delenv(speccheck.ENV, raising=False)  # these routes are the test's, not the API's
    with tempfile.TemporaryDirectory(prefix="vmkt-", dir="/tmp") as d:  # a short path: unix sockets
        srv = Server(Path(d) / "api.sock")
        try:
            yield srv
        finally:
            srv.close()


def test_call_answers_json_and_sends_the_body(server: Server) -> None:
    api = SupervisorClient(server.socket_path, timeout=10)
    assert api.call("GET", "/v1/ok") == {"state": "running"}
    assert api.call("POST", "/v1/echo", {"a": [1, "b"]}) == {"got": {"a": [1, "b"]}}
    assert server.seen == ["vmkit", {"a": [1, "b"]}]


def test_call_raises_the_supervisors_error_as_its_own_class(server: Server) -> None:
    with pytest.raises(StateError) as caught:
        SupervisorClient(server.socket_path).call("GET", "/v1/refused")
    assert "pause web" in caught.value.message and "stopped" in caught.value.message


def test_call_past_its_time_limit_times_out_and_a_missing_supervisor_is_gone(server: Server) -> None:
    t0 = time.monotonic()
    with pytest.raises(VmTimeoutError, match="GET /v1/slow"):
        SupervisorClient(server.socket_path).call("GET", "/v1/slow", timeout=0.3)
    assert time.monotonic() - t0 < 1.2  # the handler answers after 1.5 s
    with pytest.raises(SupervisorGone, match="does not answer"):
        SupervisorClient(server.socket_path.with_name("none.sock")).call("GET", "/v1/ok")


def test_lines_come_as_sent_and_leaving_early_hangs_up(server: Server) -> None:
    api = SupervisorClient(server.socket_path, timeout=30)
    stream = api.lines("POST", "/v1/lines", {})
    assert next(stream) == {"progress": 1}  # before the server was let go on: not buffered to the end
    server.release.set()
    assert next(stream) == {"progress": 2}
    stream.close()  # the caller leaves the loop (e.g. Ctrl-C): the connection is closed
    assert server.hung_up.wait(10)


def test_lines_to_the_end(server: Server) -> None:
    server.release.set()
    got = list(SupervisorClient(server.socket_path, timeout=30).lines("POST", "/v1/lines?n=6", {}))
    assert got == [{"progress": i} for i in range(1, 6)] + [{"result": "done"}]


def test_blocking_calls_do_not_import_aiohttp(server: Server) -> None:
    """What makes a command that only calls its supervisor start quickly (benchmarks/cli_bench.py)."""
    script = ("import sys\nfrom vmkit.api import SupervisorClient\n"
              f"assert SupervisorClient({str(server.socket_path)!r}).call('GET', '/v1/ok') == {{'state': 'running'}}\n"
              "print(sorted(m for m in sys.modules if m.split('.')[0] == 'aiohttp'))")
    out = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=60, check=True,
                         env={**os.environ, "PYTHONPATH": str(REPO / "src")})
    assert out.stdout.strip() == "[]", out.stderr
