"""Client for the supervisor's HTTP API on the instance's unix socket.

Errors come back as the same exception families the supervisor raised (by exit code), so a
caller catches :class:`~vmkit.errors.StateError` whether it used the library directly or
went through a supervisor.

The blocking calls (:meth:`SupervisorClient.call`, :meth:`SupervisorClient.lines`) use the standard
library's ``http.client`` on the socket: a command that makes a few calls starts no event loop and
does not import aiohttp (``benchmarks/cli_bench.py`` times such commands). The coroutines (streams,
transfers, the console's WebSocket, everything ``vmkit.aio`` does) use aiohttp, imported on their
first use.
"""

from __future__ import annotations

import http.client
import json
import socket
import time
from collections.abc import AsyncIterator, Callable, Generator
from pathlib import Path
from typing import TYPE_CHECKING, Any, TypeVar

from vmkit.api import speccheck
from vmkit.errors import VmkitError, VmTimeoutError, error_from_fields

if TYPE_CHECKING:
    import asyncio

    import aiohttp

_T = TypeVar("_T")


class SupervisorGone(VmkitError):
    """The supervisor does not answer (it is not running, or it exited mid-request)."""


def _gone(socket_path: Path, exc: BaseException) -> SupervisorGone:
    return SupervisorGone(f"the supervisor at {socket_path} does not answer: {exc}",
                          hint="see `vmkit list`; the VM may have just stopped")


def _raise_from(body: dict[str, Any]) -> None:
    raise error_from_fields(body.get("error") or {})


def _timed_out(method: str, path: str) -> VmTimeoutError:
    return VmTimeoutError(f"the supervisor did not answer {method} {path} in time")


def _check_answer(method: str, path: str, status: int, data: Any) -> None:
    """The answer checked against the API document (in the tests), and an error answer raised."""
    if speccheck.enabled():
        speccheck.check(method, path, status=status, response=data)
    if status >= 400:
        _raise_from(data)


class _UnixConnection(http.client.HTTPConnection):
    """``http.client`` on a unix socket (the ``Host`` header says ``vmkit``, as aiohttp's requests do)."""

    def __init__(self, socket_path: Path, timeout: float | None) -> None:
        super().__init__("vmkit", timeout=timeout)
        self.socket_path = socket_path

    def connect(self) -> None:
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        try:
            sock.settimeout(self.timeout)
            sock.connect(str(self.socket_path))
        except BaseException:
            sock.close()
            raise
        self.sock = sock


class SupervisorClient:
    def __init__(self, socket_path: Path, timeout: float = 60.0) -> None:
        self.socket_path = socket_path
        self.timeout = timeout

    def _session(self, timeout: float | None = None) -> aiohttp.ClientSession:
        import aiohttp

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
        import aiohttp

        try:
            async with self._session(timeout) as s, s.request(method, f"http://vmkit{path}", **send) as r:
                data: Any = await r.json(content_type=None)
        except TimeoutError as exc:
            raise _timed_out(method, path) from exc
        except (aiohttp.ClientError, FileNotFoundError, ConnectionError) as exc:
            raise _gone(self.socket_path, exc) from exc
        _check_answer(method, path, r.status, data)
        return data

    def call(self, method: str, path: str, body: dict[str, Any] | None = None,
             timeout: float | None = None) -> Any:
        """:meth:`request`, blocking (no event loop: not to be called from a coroutine)."""
        if speccheck.enabled():
            speccheck.check(method, path, request=body)
        with self._exchange(method, path, body, timeout) as ex:
            raw = ex.read()
        data: Any = json.loads(raw) if raw.strip() else None  # as aiohttp's json() of an empty body
        _check_answer(method, path, ex.status, data)
        return data

    def lines(self, method: str, path: str, body: dict[str, Any] | None = None,
              timeout: float | None = None) -> Generator[dict[str, Any], None, None]:
        """:meth:`stream`, blocking: the answer's JSON lines as they come. Leaving the loop early
        closes the connection (the supervisor sees its client gone)."""
        check = speccheck.enabled()
        if check:
            speccheck.check(method, path, request=body)
        with self._exchange(method, path, body, timeout) as ex:
            if ex.status >= 400:
                _check_answer(method, path, ex.status, json.loads(ex.read()))
            while line := ex.readline():
                if line.strip():
                    item = json.loads(line)
                    if check:
                        speccheck.check(method, path, status=ex.status, response=item, media="application/x-ndjson")
                    yield item

    def _exchange(self, method: str, path: str, body: dict[str, Any] | None, timeout: float | None) -> _Exchange:
        return _Exchange(self.socket_path, method, path, body, self.timeout if timeout is None else timeout)

    async def stream(self, method: str, path: str, body: dict[str, Any] | None = None,
                     timeout: float | None = None) -> AsyncIterator[dict[str, Any]]:
        """A request whose answer is newline-delimited JSON (e.g. progress, then a result)."""
        import aiohttp

        check = speccheck.enabled()
        if check:
            speccheck.check(method, path, request=body)
        try:
            async with self._session(timeout) as s, s.request(method, f"http://vmkit{path}", json=body) as r:
                if r.status >= 400:
                    _check_answer(method, path, r.status, await r.json(content_type=None))
                async for line in r.content:
                    if line.strip():
                        item = json.loads(line)
                        if check:
                            speccheck.check(method, path, status=r.status, response=item,
                                            media="application/x-ndjson")
                        yield item
        except TimeoutError as exc:
            raise _timed_out(method, path) from exc
        except (aiohttp.ClientError, FileNotFoundError, ConnectionError) as exc:
            raise _gone(self.socket_path, exc) from exc

    async def download(self, path: str, params: dict[str, str], timeout: float | None = None) -> AsyncIterator[bytes]:
        """``GET`` a binary stream (e.g. ``/v1/files``), piece by piece.

        A stream that ends early (the supervisor failed mid-way) raises instead of ending short."""
        import aiohttp

        total = 0
        try:
            async with self._session(timeout) as s, s.get(f"http://vmkit{path}", params=params) as r:
                if r.status >= 400:
                    _check_answer("GET", path, r.status, await r.json(content_type=None))
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
        import asyncio

        import aiohttp

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


class _Exchange:
    """One blocking request on its own connection: sent on ``with``, the connection closed after.
    Its reads raise vmkit's errors: :class:`VmTimeoutError` past the request's time limit (``timeout``
    seconds in all, as aiohttp's ``total``; 0: none), :class:`SupervisorGone` if the supervisor is not
    there or hangs up."""

    def __init__(self, socket_path: Path, method: str, path: str, body: dict[str, Any] | None,
                 timeout: float) -> None:
        self.socket_path, self.method, self.path, self.body = socket_path, method, path, body
        self.until = time.monotonic() + timeout if timeout else None
        self.conn = _UnixConnection(socket_path, self._left())
        self.status = 0
        self.response: http.client.HTTPResponse | None = None

    def _left(self) -> float | None:
        if self.until is None:
            return None
        left = self.until - time.monotonic()
        if left <= 0:
            raise self._failed(TimeoutError())
        return left

    def _failed(self, exc: BaseException) -> VmkitError:
        if isinstance(exc, TimeoutError):
            return _timed_out(self.method, self.path)
        return _gone(self.socket_path, exc)

    def _wait(self, step: Callable[[], _T]) -> _T:
        try:
            if self.conn.sock is not None:
                self.conn.sock.settimeout(self._left())
            return step()
        except (http.client.HTTPException, OSError) as exc:  # OSError: what aiohttp's connector errors wrap
            raise self._failed(exc) from exc

    def __enter__(self) -> _Exchange:
        headers = {"Content-Type": "application/json"} if self.body is not None else {}
        data = json.dumps(self.body).encode() if self.body is not None else None
        try:
            self._wait(lambda: self.conn.request(self.method, self.path, body=data, headers=headers))
            self.response = self._wait(self.conn.getresponse)
        except BaseException:
            self.conn.close()
            raise
        self.status = self.response.status
        return self

    def read(self) -> bytes:
        assert self.response is not None
        return self._wait(self.response.read)

    def readline(self) -> bytes:
        assert self.response is not None
        return self._wait(self.response.readline)

    def __exit__(self, *exc: object) -> None:
        self.conn.close()
