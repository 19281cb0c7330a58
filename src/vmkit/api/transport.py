"""Client for the supervisor's HTTP API on the instance's unix socket.

Errors come back as the same exception families the supervisor raised (by exit code), so a
caller catches :class:`~vmkit.errors.StateError` whether it used the library directly or
went through a supervisor.
"""

from __future__ import annotations

import asyncio
import json
from collections.abc import AsyncIterator, Callable
from pathlib import Path
from typing import Any

import aiohttp

from vmkit.api import speccheck
from vmkit.errors import VmkitError, VmTimeoutError, error_from_fields


class SupervisorGone(VmkitError):
    """The supervisor does not answer (it is not running, or it exited mid-request)."""


def _gone(socket_path: Path, exc: BaseException) -> SupervisorGone:
    return SupervisorGone(f"the supervisor at {socket_path} does not answer: {exc}",
                          hint="see `vmkit list`; the VM may have just stopped")


def _raise_from(body: dict[str, Any]) -> None:
    raise error_from_fields(body.get("error") or {})


class SupervisorClient:
    def __init__(self, socket_path: Path, timeout: float = 60.0) -> None:
        self.socket_path = socket_path
        self.timeout = timeout

    def _session(self, timeout: float | None = None) -> aiohttp.ClientSession:
        conn = aiohttp.UnixConnector(path=str(self.socket_path))
        t = aiohttp.ClientTimeout(total=timeout if timeout is not None else self.timeout)
        return aiohttp.ClientSession(connector=conn, timeout=t)

    async def request(self, method: str, path: str, body: dict[str, Any] | None = None,
                      timeout: float | None = None) -> Any:
        """One call with a JSON body (or none) and a JSON answer; failures as vmkit's errors."""
        if speccheck.enabled():
            speccheck.check(method, path, request=body)
        return await self._json_answer(method, path, timeout, json=body)

    async def _json_answer(self, method: str, path: str, timeout: float | None, **send: Any) -> Any:
        try:
            async with self._session(timeout) as s, s.request(method, f"http://vmkit{path}", **send) as r:
                data: Any = await r.json(content_type=None)
        except TimeoutError as exc:
            raise VmTimeoutError(f"the supervisor did not answer {method} {path} in time") from exc
        except (aiohttp.ClientError, FileNotFoundError, ConnectionError) as exc:
            raise _gone(self.socket_path, exc) from exc
        if speccheck.enabled():
            speccheck.check(method, path, status=r.status, response=data)
        if r.status >= 400:
            _raise_from(data)
        return data

    def call(self, method: str, path: str, body: dict[str, Any] | None = None,
             timeout: float | None = None) -> Any:
        return asyncio.run(self.request(method, path, body, timeout))

    async def stream(self, method: str, path: str, body: dict[str, Any] | None = None,
                     timeout: float | None = None) -> AsyncIterator[dict[str, Any]]:
        """A request whose answer is newline-delimited JSON (e.g. progress, then a result)."""
        check = speccheck.enabled()
        if check:
            speccheck.check(method, path, request=body)
        try:
            async with self._session(timeout) as s, s.request(method, f"http://vmkit{path}", json=body) as r:
                if r.status >= 400:
                    data = await r.json(content_type=None)
                    if check:
                        speccheck.check(method, path, status=r.status, response=data)
                    _raise_from(data)
                async for line in r.content:
                    if line.strip():
                        item = json.loads(line)
                        if check:
                            speccheck.check(method, path, status=r.status, response=item,
                                            media="application/x-ndjson")
                        yield item
        except TimeoutError as exc:
            raise VmTimeoutError(f"the supervisor did not answer {method} {path} in time") from exc
        except (aiohttp.ClientError, FileNotFoundError, ConnectionError) as exc:
            raise _gone(self.socket_path, exc) from exc

    async def download(self, path: str, params: dict[str, str], timeout: float | None = None) -> AsyncIterator[bytes]:
        """``GET`` a binary stream (e.g. ``/v1/files``), piece by piece.

        A stream that ends early (the supervisor failed mid-way) raises instead of ending short."""
        total = 0
        try:
            async with self._session(timeout) as s, s.get(f"http://vmkit{path}", params=params) as r:
                if r.status >= 400:
                    data = await r.json(content_type=None)
                    if speccheck.enabled():
                        speccheck.check("GET", path, status=r.status, response=data)
                    _raise_from(data)
                async for piece in r.content.iter_chunked(1 << 20):
                    total += len(piece)
                    yield piece
        except TimeoutError as exc:
            raise VmTimeoutError(f"the supervisor did not finish GET {path} in time") from exc
        except aiohttp.ClientPayloadError as exc:
            raise VmkitError(f"the transfer from the supervisor ended early after {total} bytes: {exc}",
                             hint="see the machine's supervisor.log") from exc
        except (aiohttp.ClientError, FileNotFoundError, ConnectionError) as exc:
            raise _gone(self.socket_path, exc) from exc

    async def upload(self, path: str, params: dict[str, str], source: AsyncIterator[bytes],
                     timeout: float | None = None) -> Any:
        """``PUT`` a binary stream (e.g. ``/v1/files``); returns the JSON answer."""
        return await self._json_answer("PUT", path, timeout, params=params, data=source,
                                       headers={"Content-Type": "application/octet-stream"})

    async def events(self) -> AsyncIterator[dict[str, Any]]:
        check = speccheck.enabled()
        async with self._session(timeout=0) as s, s.get("http://vmkit/v1/events") as r:
            async for line in r.content:
                if line.strip():
                    item = json.loads(line)
                    if check:
                        speccheck.check("GET", "/v1/events", status=r.status, response=item,
                                        media="application/x-ndjson")
                    yield item

    async def console(self, on_output: Callable[[bytes], None], input_queue: asyncio.Queue[bytes | None],
                      on_connected: Callable[[], None] | None = None) -> None:
        """Bridge the serial console: output to ``on_output``; bytes from ``input_queue`` to the guest.

        ``on_connected`` runs once the stream is subscribed (no output after that is missed).
        """
        async with self._session(timeout=0) as s, s.ws_connect("http://vmkit/v1/console") as ws:
            if on_connected is not None:
                on_connected()

            async def send() -> None:
                while (data := await input_queue.get()) is not None:
                    await ws.send_bytes(data)
                await ws.close()

            sender = asyncio.create_task(send())
            try:
                async for msg in ws:
                    if msg.type == aiohttp.WSMsgType.BINARY:
                        on_output(msg.data)
                    elif msg.type in (aiohttp.WSMsgType.CLOSE, aiohttp.WSMsgType.ERROR):
                        break
            finally:
                sender.cancel()
