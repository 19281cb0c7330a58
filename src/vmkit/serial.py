"""The serial console stream of a running machine.

vmkit owns the console: QEMU's serial chardev is one end of a socketpair whose other end
is read here. Every byte is appended to ``serial.log`` and kept in a bounded in-memory
window, so callers can wait for a line (``wait_for``) without polling a file, and any
number of listeners (the supervisor's console clients) can follow the stream and type.
"""

from __future__ import annotations

import asyncio
import contextlib
import re
import socket
from collections.abc import Callable
from pathlib import Path
from typing import BinaryIO


class SerialConsole:
    def __init__(self, log_path: Path | None, *, window: int = 1 << 20) -> None:
        self.log_path = log_path
        self._window = window
        self._buf = bytearray()
        self._base = 0  # absolute offset of _buf[0]
        self._sock: socket.socket | None = None
        self._log: BinaryIO | None = None
        self._reader: asyncio.Task[None] | None = None
        self._changed = asyncio.Event()
        self._eof = False
        self._listeners: list[Callable[[bytes], None]] = []

    # -- stream ---------------------------------------------------------------------------------
    def attach(self, sock: socket.socket) -> None:
        sock.setblocking(False)
        self._sock = sock
        self._eof = False
        if self.log_path is not None:
            self._log = self.log_path.open("ab")
        self._reader = asyncio.create_task(self._read_loop(), name="vmkit-serial")

    async def _read_loop(self) -> None:
        assert self._sock is not None
        loop = asyncio.get_running_loop()
        try:
            while True:
                try:
                    data = await loop.sock_recv(self._sock, 65536)
                except OSError:
                    break
                if not data:
                    break
                self._feed(data)
        finally:
            self._eof = True
            self._notify()

    def _feed(self, data: bytes) -> None:
        if self._log is not None:
            self._log.write(data)
            self._log.flush()
        self._buf += data
        excess = len(self._buf) - self._window
        if excess > 0:
            del self._buf[:excess]
            self._base += excess
        for cb in list(self._listeners):
            with contextlib.suppress(Exception):
                cb(data)
        self._notify()

    def _notify(self) -> None:
        self._changed.set()
        self._changed = asyncio.Event()

    @property
    def offset(self) -> int:
        """Bytes received so far (an absolute position for ``wait_for(since=...)``)."""
        return self._base + len(self._buf)

    def text(self, since: int = 0) -> str:
        start = max(0, since - self._base)
        return self._buf[start:].decode("utf-8", errors="replace")

    def tail_text(self, lines: int = 15) -> str:
        return "\n".join(self.text().replace("\r", "").splitlines()[-lines:])

    async def wait_for(self, marker: str, since: int = 0) -> int:
        """Wait until a console line equal to ``marker`` appears at or after ``since``.

        Returns the absolute offset just past the marker line. Raises EOFError when the
        stream ends first.
        """
        pattern = re.compile(rb"(?:^|\n)" + re.escape(marker.encode()) + rb"\r?\n")
        while True:
            start = max(0, since - self._base)
            m = pattern.search(self._buf, start)
            if m:
                return self._base + m.end()
            if self._eof:
                raise EOFError(f"the console closed before {marker!r} appeared")
            await self._changed.wait()

    async def wait_for_regex(self, regex: str, since: int = 0) -> re.Match[str]:
        """Wait until ``regex`` matches the console text after ``since`` (multiline mode)."""
        pattern = re.compile(regex, re.MULTILINE)
        while True:
            m = pattern.search(self.text(since).replace("\r", ""))
            if m:
                return m
            if self._eof:
                raise EOFError(f"the console closed before /{regex}/ matched")
            await self._changed.wait()

    async def changed(self) -> None:
        """Wait for the next chunk of output (or the end of the stream)."""
        if self._eof:
            raise EOFError("the console is closed")
        await self._changed.wait()

    def add_listener(self, callback: Callable[[bytes], None]) -> Callable[[], None]:
        self._listeners.append(callback)
        return lambda: self._listeners.remove(callback) if callback in self._listeners else None

    async def write(self, data: bytes) -> None:
        """Type into the console."""
        if self._sock is None or self._eof:
            raise EOFError("the console is not connected")
        await asyncio.get_running_loop().sock_sendall(self._sock, data)

    async def drain(self, timeout: float = 2.0) -> None:
        """Wait (briefly) for the reader to consume what QEMU wrote before it exited."""
        if self._reader is not None:
            with contextlib.suppress(TimeoutError, asyncio.CancelledError):
                await asyncio.wait_for(asyncio.shield(self._reader), timeout)

    def close(self) -> None:
        if self._reader is not None and not self._reader.done():
            self._reader.cancel()
        if self._sock is not None:
            self._sock.close()
            self._sock = None
        if self._log is not None:
            self._log.close()
            self._log = None
