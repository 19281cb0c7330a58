"""The serial console stream of a running machine.

vmkit owns the console: QEMU's serial chardev is one end of a socketpair whose other end
is read here. Every byte is appended to ``serial.log`` and kept in a bounded in-memory
window, so callers can wait for a line (``wait_for``) without polling a file, and any
number of listeners (the supervisor's console clients) can follow the stream and type.

Nothing here grows without limit, however much the guest prints:

* ``serial.log`` holds at most ``log_max`` bytes: when the next chunk would not fit, it is
  renamed ``serial.log.1`` (replacing the previous one) and a new ``serial.log`` starts. So
  the log keeps at least the last ``log_max`` bytes, on at most twice that much disk.
  :func:`read_log` returns both parts in order.
* A client that follows the stream gets a :class:`Backlog`: at most ``limit`` bytes wait for
  it. Output beyond that is dropped for that client alone, and once it catches up it first
  reads a notice saying how many bytes it missed (the supervisor also logs it).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import re
import socket
from collections import deque
from collections.abc import Callable
from pathlib import Path
from typing import BinaryIO

log = logging.getLogger(__name__)

DEFAULT_LOG_MAX = 8 << 20


def rotated_path(log_path: Path) -> Path:
    """Where the log's previous ``log_max`` bytes are kept (``serial.log.1``)."""
    return log_path.with_name(log_path.name + ".1")


def read_log(log_path: Path) -> bytes:
    """The whole console log: ``serial.log.1`` then ``serial.log`` (b"" if there is none).

    Safe while the log rotates: the current file is opened first, so a rotation in between
    shows up as the rotated file being the one already open (then only that one is read).
    """
    try:
        current = log_path.open("rb")
    except FileNotFoundError:
        return b""
    with current:
        try:
            older = rotated_path(log_path).open("rb")
        except FileNotFoundError:
            return current.read()
        with older:
            if os.fstat(older.fileno()).st_ino == os.fstat(current.fileno()).st_ino:
                return current.read()
            return older.read() + current.read()


class Backlog:
    """Console output waiting for one client (a listener for :meth:`SerialConsole.add_listener`).

    Holds at most ``limit`` bytes. A client that does not keep up loses what does not fit
    (never the machine's memory): :meth:`put` drops it, logs that once per episode, and the
    client's next chunk after it caught up starts with a notice of how many bytes it missed.
    """

    def __init__(self, who: str, limit: int = 1 << 20) -> None:
        self.who = who
        self.limit = limit
        self.dropped_total = 0
        self._chunks: deque[bytes] = deque()
        self._size = 0
        self._dropped = 0
        self._ready = asyncio.Event()
        self._closed = False

    @property
    def size(self) -> int:
        return self._size

    def put(self, data: bytes) -> None:
        if self._closed:
            return
        if self._dropped:
            notice = self.notice(self._dropped)
            if self._size + len(notice) + len(data) > self.limit:
                self._dropped += len(data)
                self.dropped_total += len(data)
                return
            log.warning("%s caught up: it missed %d bytes of console output", self.who, self._dropped)
            self._append(notice)
            self._dropped = 0
        if self._size + len(data) > self.limit:
            log.warning("%s reads too slowly (%d bytes waiting): dropping its console output until it "
                        "catches up", self.who, self._size)
            self._dropped = len(data)
            self.dropped_total += len(data)
            return
        self._append(data)

    @staticmethod
    def notice(dropped: int) -> bytes:
        return (f"\r\n[vmkit: {dropped} bytes of console output dropped: this client read too slowly]\r\n"
                .encode())

    def _append(self, data: bytes) -> None:
        self._chunks.append(data)
        self._size += len(data)
        self._ready.set()

    async def get(self) -> bytes | None:
        """Everything waiting (at least one byte), or None once closed."""
        while not self._chunks:
            if self._closed:
                return None
            self._ready.clear()
            await self._ready.wait()
        data = b"".join(self._chunks)
        self._chunks.clear()
        self._size = 0
        return data

    def close(self) -> None:
        self._closed = True
        self._ready.set()


class SerialConsole:
    def __init__(self, log_path: Path | None, *, window: int = 1 << 20, log_max: int = DEFAULT_LOG_MAX) -> None:
        self.log_path = log_path
        self.log_max = log_max
        self._log_size = 0
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
            self._log_size = self._log.tell()
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
            try:
                if self._log_size and self._log_size + len(data) > self.log_max:
                    self._rotate()
                self._log.write(data)
                self._log.flush()
                self._log_size += len(data)
            except OSError as exc:  # a full disk must not end the console stream itself
                log.error("cannot write %s (%s): console logging stops", self.log_path, exc)
                self._close_log()
        self._buf += data
        excess = len(self._buf) - self._window
        if excess > 0:
            del self._buf[:excess]
            self._base += excess
        for cb in list(self._listeners):
            with contextlib.suppress(Exception):
                cb(data)
        self._notify()

    def _rotate(self) -> None:
        """``serial.log`` becomes ``serial.log.1`` and starts afresh, and the name never goes missing
        for a reader: the full log is hard-linked to the rotated name first (a reader then sees one
        file under both names: :func:`read_log` reads it once), then an empty file replaces
        ``serial.log`` in one rename."""
        assert self.log_path is not None
        self._close_log()
        older = rotated_path(self.log_path)
        linked = older.with_name(f".{older.name}.tmp")
        fresh = self.log_path.with_name(f".{self.log_path.name}.new")
        for leftover in (linked, fresh):
            with contextlib.suppress(FileNotFoundError):
                leftover.unlink()
        os.link(self.log_path, linked)
        os.replace(linked, older)
        fresh.open("xb").close()
        os.replace(fresh, self.log_path)
        self._log = self.log_path.open("ab")
        self._log_size = 0

    def _close_log(self) -> None:
        if self._log is not None:
            with contextlib.suppress(OSError):
                self._log.close()
            self._log = None

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
        self._close_log()
