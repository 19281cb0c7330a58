"""vmkit's NBD server: asyncio, fixed newstyle handshake, several exports and clients.

Embedding::

    server = NbdServer([Export("disk", FileBackend("disk.raw"))])
    address = await server.start(unix_path=run_dir / "nbd.sock")
    ...                                   # QEMU connects to address.uri("disk")
    await server.close()

Design of the transmission phase (the hot path):

* The handshake is an ordinary coroutine on non-blocking sockets. After it, each connection is
  driven by ``loop.add_reader``/``add_writer`` callbacks on its raw socket: no transports, no
  per-request coroutines or futures.
* Requests are received with ``recv_into`` into one large per-connection buffer and parsed in
  place; a WRITE payload goes from that buffer straight to the backend (``pwritev``).
* Replies are packed into one per-connection output arena and sent with a single ``send`` per
  batch; READ data is ``preadv``-ed into the arena right behind its header, or, for file-backed
  exports and large reads, sent by ``os.sendfile`` straight from the page cache.
* Backends flagged ``inline`` (files, memory, the chunk store) are called directly on the loop.
  Calls that may block for long (FLUSH and FUA on durable backends, every call on non-inline
  backends) run in a small thread pool and reply when done (replies may come out of order, as
  the protocol allows).
* Back-pressure: when the client stops reading replies, the connection stops reading requests.
* Memory: buffers are anonymous mmaps (pages exist only once written). A WRITE's payload buffer
  grows as its data arrives, never on the strength of its header; growth beyond the fixed initial
  buffers is charged to a per-connection and a server-wide budget (``max_buffer_memory``); a
  request that would exceed it gets ENOMEM (a WRITE's payload is read and dropped first).
  Large buffers are unmapped as soon as they drain, and all of them when the connection ends.

Admission: a connection counts from accept (through its handshake) against ``max_connections``
and against ``max_connections_per_peer`` (per uid on unix sockets, via SO_PEERCRED; per IP on
TCP); a client that does not finish negotiating within ``handshake_timeout`` is dropped.

TLS: with ``tls`` (an :class:`ssl.SSLContext`, see :mod:`vmkit.nbd.tls`) the handshake offers
NBD_OPT_STARTTLS and, by default, refuses every other option until TLS is up (as qemu-nbd's
``--tls-creds`` and nbdkit's ``--tls=require``). The TLS session is bridged to the plain data
path through a socketpair, so the transmission code is the same with and without TLS.

Anything a client sends is validated before it reaches a backend; protocol violations close
that connection only; an unexpected exception is logged and closes that connection only.
"""

from __future__ import annotations

import asyncio
import collections
import concurrent.futures
import contextlib
import dataclasses
import errno
import functools
import logging
import mmap
import os
import secrets
import signal
import socket
import ssl
import stat
import struct
import threading
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any
from urllib.parse import quote

from vmkit.errors import ConfigError
from vmkit.host import paths
from vmkit.nbd import protocol as p
from vmkit.nbd.backends import Backend, Extent
from vmkit.nbd.defaults import DEFAULT_MAX_BUFFER_MEMORY as DEFAULT_MAX_BUFFER_MEMORY
from vmkit.nbd.errors import BackendError, NbdAddressInUseError, nbd_errno_for

log = logging.getLogger("vmkit.nbd")

META_CONTEXT_ID = 1  # the id we hand out for base:allocation
DEFAULT_PORT = 10809
_MAX_DISCARD = 16 * 1024 * 1024  # an option longer than this is a DoS: hard disconnect
_MAX_PENDING = 64  # deferred (threaded) requests per connection before we stop reading
_IN_INITIAL = 256 * 1024
_IN_MAX = p.MAX_PAYLOAD + 64 * 1024  # a whole maximal WRITE fits
_OUT_INITIAL = 256 * 1024
_KEEP = 8 * 1024 * 1024  # larger buffers are unmapped as soon as they drain
_PAGE = mmap.PAGESIZE
#: per connection: buffers above the initial ones plus data of requests running in threads
MAX_CONNECTION_MEMORY = 128 * 1024 * 1024
_SOCK_BUFFER = 2 * 1024 * 1024

_REQ = p.REQUEST
_REQ_UNPACK = p.REQUEST.unpack_from
_SIMPLE_PACK = p.SIMPLE_REPLY.pack_into
_SDATA_PACK = p.STRUCTURED_DATA.pack_into
_REQUEST_MAGIC = p.REQUEST_MAGIC
_SIMPLE_MAGIC = p.SIMPLE_REPLY_MAGIC
_STRUCT_MAGIC = p.STRUCTURED_REPLY_MAGIC
_CMD_READ = p.CMD_READ
_CMD_WRITE = p.CMD_WRITE
_FUA = p.CMD_FLAG_FUA


def _buffer(size: int) -> mmap.mmap:
    """A zeroed buffer whose pages only take memory once written (and go away when dropped)."""
    return mmap.mmap(-1, size)


_EMPTY = _buffer(1)


class _Disconnect(Exception):
    """Close this connection (protocol violation, peer gone); not an error of ours."""


@dataclass(frozen=True)
class Export:
    """One named export: a backend, optionally read-only, with a human description."""

    name: str
    backend: Backend
    read_only: bool = False
    description: str = ""

    def __post_init__(self) -> None:
        raw = self.name.encode()
        if len(raw) > p.MAX_STRING or "\0" in self.name:
            raise ConfigError.single("export", "names are at most 4096 bytes of UTF-8 without NUL")
        if len(self.description.encode()) > p.MAX_STRING:
            raise ConfigError.single("description", "at most 4096 bytes")

    @property
    def writable(self) -> bool:
        return not (self.read_only or self.backend.capabilities.read_only)


@dataclass(frozen=True)
class NbdAddress:
    """Where a server listens: a unix socket path, or a TCP host and port."""

    unix_path: Path | None = None
    host: str | None = None
    port: int | None = None
    tls: bool = False

    def uri(self, export: str = "") -> str:
        """The NBD URI (as QEMU, libnbd and nbdinfo take it) of one export (``nbds`` with TLS)."""
        name = quote(export, safe="")
        scheme = "nbds" if self.tls else "nbd"
        if self.unix_path is not None:
            return f"{scheme}+unix:///{name}?socket={quote(str(self.unix_path), safe='/')}"
        host = self.host or "localhost"
        if ":" in host:
            host = f"[{host}]"
        return f"{scheme}://{host}:{self.port}/{name}"

    def __str__(self) -> str:
        return str(self.unix_path) if self.unix_path is not None else f"{self.host}:{self.port}"


@dataclass
class ServerStats:
    connections_total: int = 0
    connections_active: int = 0
    connections_refused: int = 0
    buffer_bytes: int = 0  # charged to max_buffer_memory now (above the fixed initial buffers)
    peak_buffer_bytes: int = 0
    enomem_replies: int = 0
    protocol_errors: int = 0
    internal_errors: int = 0
    exports_opened: dict[str, int] = field(default_factory=dict)


def default_socket_path() -> Path:
    """Where a server listens when given no address: a private (0700) runtime directory.

    ``$VMKIT_HOME/run/nbd.sock`` when VMKIT_HOME is set, else ``$XDG_RUNTIME_DIR/vmkit/nbd.sock``,
    else ``<vmkit data dir>/run/nbd.sock``.
    """
    home = os.environ.get("VMKIT_HOME")
    runtime = os.environ.get("XDG_RUNTIME_DIR")
    if home:
        base = paths.data_dir() / "run"
    elif runtime and Path(runtime).is_dir():
        base = Path(runtime) / "vmkit"
    else:
        base = paths.data_dir() / "run"
    return base / "nbd.sock"


def _as_exports(exports: Export | Backend | Iterable[Export] | Mapping[str, Backend]) -> list[Export]:
    if isinstance(exports, Export):
        return [exports]
    if isinstance(exports, Backend):
        return [Export("", exports)]
    if isinstance(exports, Mapping):
        return [Export(name, b) for name, b in exports.items()]
    return list(exports)


class NbdServer:
    """An NBD server for several exports and several clients at once.

    ``default_export`` is what the empty export name selects; if None and there is exactly
    one export, that one. ``io_threads`` is the size of the pool for blocking calls.
    ``sendfile_min``: reads of at least this many bytes from file-backed exports are sent
    with ``sendfile`` (0 disables it).

    Limits: ``max_connections`` in all, ``max_connections_per_peer`` from one uid (unix
    sockets) or one IP address (TCP; 0: no per-peer limit), ``handshake_timeout`` seconds to
    finish negotiating, ``max_buffer_memory`` bytes of request/reply buffers beyond the small
    fixed ones, server-wide (each connection also at most MAX_CONNECTION_MEMORY).
    ``tls``: a server-side SSLContext to offer NBD_OPT_STARTTLS with; ``tls_required``
    (default) refuses every other option before TLS.
    """

    def __init__(
        self,
        exports: Export | Backend | Iterable[Export] | Mapping[str, Backend] = (),
        *,
        default_export: str | None = None,
        handshake_timeout: float | None = 10.0,
        io_threads: int = 4,
        sendfile_min: int = 128 * 1024,
        max_connections: int = 512,
        max_connections_per_peer: int = 64,
        max_buffer_memory: int = DEFAULT_MAX_BUFFER_MEMORY,
        tls: ssl.SSLContext | None = None,
        tls_required: bool = True,
    ) -> None:
        if max_connections < 1 or max_connections_per_peer < 0:
            raise ConfigError.single("max_connections", "must be at least 1 (per peer: 0 for no limit)")
        if max_buffer_memory < 0:
            raise ConfigError.single("max_buffer_memory", "must not be negative")
        self._exports: dict[str, Export] = {}
        for export in _as_exports(exports):
            self.add_export(export)
        self.default_export = default_export
        self.handshake_timeout = handshake_timeout
        self.sendfile_min = sendfile_min if sendfile_min > 0 else 1 << 62
        self.max_connections = max_connections
        self.max_connections_per_peer = max_connections_per_peer
        self.max_buffer_memory = max_buffer_memory
        self.tls = tls
        self.tls_required = tls is not None and tls_required
        self._active = 0  # admitted connections, counted from accept
        self._per_peer: dict[object, int] = {}
        self._io_threads = max(1, io_threads)
        self._executor: concurrent.futures.ThreadPoolExecutor | None = None
        self._listener: socket.socket | None = None
        self._unix_path: Path | None = None
        self._accept_task: asyncio.Task[None] | None = None
        self._tasks: set[asyncio.Task[None]] = set()
        self._conns: set[_Connection] = set()
        self._closing = False
        self.address: NbdAddress | None = None
        self.stats = ServerStats()

    # --- exports --------------------------------------------------------------------------
    @property
    def exports(self) -> Mapping[str, Export]:
        return dict(self._exports)

    def add_export(self, export: Export) -> None:
        """Add an export; new connections can use it at once."""
        if export.name in self._exports:
            raise ConfigError.single("export", f"an export named {export.name!r} already exists")
        self._exports[export.name] = export

    def remove_export(self, name: str) -> Export:
        """Stop offering an export (connections already using it keep it)."""
        return self._exports.pop(name)

    def lookup(self, name: str) -> Export | None:
        export = self._exports.get(name)
        if export is None and name == "":
            if self.default_export is not None:
                export = self._exports.get(self.default_export)
            elif len(self._exports) == 1:
                export = next(iter(self._exports.values()))
        return export

    # --- lifecycle ------------------------------------------------------------------------
    async def start(
        self,
        *,
        unix_path: str | os.PathLike[str] | None = None,
        host: str | None = None,
        port: int | None = None,
        sock: socket.socket | None = None,
        backlog: int = 128,
        unix_mode: int = 0o600,
    ) -> NbdAddress:
        """Listen on a unix socket, a TCP address (port 0: any free port) or a given socket.

        With no address at all: the unix socket :func:`default_socket_path`. A unix socket is
        created with ``unix_mode`` (default 0600: only this user and root may connect).
        Returns the bound address. Connections are served in the background until close().
        """
        if self._listener is not None:
            raise ConfigError.single("server", "already started")
        given = sum(x is not None for x in (unix_path, sock)) + (host is not None or port is not None)
        if given > 1:
            raise ConfigError.single("address", "give exactly one of a unix socket path, a TCP port, or a socket")
        if given == 0:
            unix_path = default_socket_path()
            paths.ensure_private_dir(unix_path.parent)
        if sock is not None:
            lsock = sock
            if lsock.family == socket.AF_UNIX:
                name = lsock.getsockname()
                addr = NbdAddress(unix_path=Path(name) if name else None)
            else:
                h, prt = lsock.getsockname()[:2]
                addr = NbdAddress(host=h, port=prt)
        elif unix_path is not None:
            path = Path(unix_path)
            lsock = _bind_unix(path, unix_mode)
            self._unix_path = path
            addr = NbdAddress(unix_path=path)
        else:
            lsock = _bind_tcp(host or "127.0.0.1", DEFAULT_PORT if port is None else port)
            h, prt = lsock.getsockname()[:2]
            addr = NbdAddress(host=h, port=prt)
        if self.tls is not None:
            addr = dataclasses.replace(addr, tls=True)
        lsock.setblocking(False)
        if not lsock.getsockopt(socket.SOL_SOCKET, socket.SO_ACCEPTCONN):
            lsock.listen(backlog)
        self._listener = lsock
        self.address = addr
        self._accept_task = asyncio.get_running_loop().create_task(self._accept_loop(lsock))
        log.info("NBD server listening on %s (exports: %s)", addr, ", ".join(map(repr, self._exports)))
        return addr

    async def serve_forever(self) -> None:
        """Wait until the server is closed."""
        if self._accept_task is None:
            raise ConfigError.single("server", "start() it first")
        with contextlib.suppress(asyncio.CancelledError):
            await asyncio.shield(self._accept_task)

    async def __aenter__(self) -> NbdServer:
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.close()

    async def close(self, timeout: float = 5.0) -> None:
        """Stop listening, let connections finish their in-flight requests, then drop them."""
        if self._closing:
            return
        self._closing = True
        if self._accept_task is not None:
            self._accept_task.cancel()
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await self._accept_task
        if self._listener is not None:
            self._listener.close()
        if self._unix_path is not None:
            with contextlib.suppress(OSError):
                self._unix_path.unlink()
        for conn in list(self._conns):
            conn.shutdown()
        tasks = list(self._tasks)
        if tasks:
            _done, still = await asyncio.wait(tasks, timeout=timeout)
            for task in still:
                task.cancel()
            if still:
                await asyncio.wait(still, timeout=1.0)
        if self._executor is not None:
            # after close() returns, no backend call is running or will run
            await asyncio.to_thread(self._executor.shutdown, True, cancel_futures=True)
            self._executor = None
        log.info("NBD server on %s closed", self.address)

    @property
    def executor(self) -> concurrent.futures.ThreadPoolExecutor:
        if self._executor is None:
            self._executor = concurrent.futures.ThreadPoolExecutor(
                max_workers=self._io_threads, thread_name_prefix="vmkit-nbd-io"
            )
        return self._executor

    @property
    def connection_count(self) -> int:
        """Connections admitted and not yet closed (including those still negotiating)."""
        return self._active

    async def _accept_loop(self, lsock: socket.socket) -> None:
        loop = asyncio.get_running_loop()
        # sock_accept returns at once while connections are queued: the limits below are checked
        # and the connection counted before the next accept, so a burst cannot overshoot them
        while True:
            try:
                conn, _ = await loop.sock_accept(lsock)
            except asyncio.CancelledError:
                raise
            except OSError as exc:
                if exc.errno in (errno.EBADF, errno.EINVAL):
                    return  # listener closed
                log.warning("NBD accept failed: %s", exc)
                await asyncio.sleep(0.1)
                continue
            # admitted (and counted) here, before the next accept: the limits are exact
            key = _peer_key(conn)
            if not self._admit(key):
                conn.close()
                continue
            task = loop.create_task(self._serve(conn, key))
            self._tasks.add(task)
            task.add_done_callback(self._tasks.discard)

    def _admit(self, key: object) -> bool:
        """Count a new connection in, or refuse it (the server or this peer is at its limit)."""
        if self._closing:
            return False
        why = None
        if self._active >= self.max_connections:
            why = f"the server has {self._active} connections (max_connections)"
        elif (
            key is not None
            and self.max_connections_per_peer
            and self._per_peer.get(key, 0) >= self.max_connections_per_peer
        ):
            why = f"peer {_key_name(key)} has {self.max_connections_per_peer} (max_connections_per_peer)"
        if why is not None:
            self.stats.connections_refused += 1
            refused = self.stats.connections_refused
            if refused & (refused - 1) == 0:  # 1, 2, 4, 8...: no log flood under attack
                log.warning("NBD: refusing a connection: %s (%d refused so far)", why, refused)
            return False
        self._active += 1
        if key is not None:
            self._per_peer[key] = self._per_peer.get(key, 0) + 1
        self.stats.connections_total += 1
        self.stats.connections_active = self._active
        return True

    def _release(self, key: object) -> None:
        self._active -= 1
        self.stats.connections_active = self._active
        if key is not None:
            left = self._per_peer[key] - 1
            if left:
                self._per_peer[key] = left
            else:
                del self._per_peer[key]

    async def handle_connection(self, sock: socket.socket) -> None:
        """Serve one already-connected socket (e.g. one end of a socketpair) until it ends.

        Counts against ``max_connections`` (not the per-peer limit: the caller chose this peer).
        Never raises for anything the peer does.
        """
        if not self._admit(None):
            sock.close()
            return
        await self._serve(sock, None)

    async def _serve(self, sock: socket.socket, key: object) -> None:
        try:
            conn = _Connection(self, sock)
        except BaseException:
            self._release(key)
            sock.close()
            raise
        self._conns.add(conn)
        try:
            await conn.run()
        finally:
            self._conns.discard(conn)
            self._release(key)


def _peer_key(sock: socket.socket) -> object:
    """Who is on the other end, for the per-peer limit: ("uid", n) or ("ip", address)."""
    try:
        if sock.family == socket.AF_UNIX:
            creds = sock.getsockopt(socket.SOL_SOCKET, socket.SO_PEERCRED, struct.calcsize("3i"))
            _pid, uid, _gid = struct.unpack("3i", creds)
            return ("uid", uid)
        return ("ip", sock.getpeername()[0])
    except OSError:
        return ("unknown", 0)


def _key_name(key: object) -> str:
    return " ".join(map(str, key)) if isinstance(key, tuple) else str(key)


def _bind_unix(path: Path, mode: int = 0o600) -> socket.socket:
    if path.exists() or path.is_symlink():
        if not stat.S_ISSOCK(path.lstat().st_mode):
            raise NbdAddressInUseError(f"{path} exists and is not a socket", hint="choose another path")
        probe = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        try:
            probe.connect(str(path))
        except (ConnectionRefusedError, FileNotFoundError):
            path.unlink(missing_ok=True)  # stale socket of a dead server
        else:
            raise NbdAddressInUseError(f"another server is listening on {path}", hint="stop it or choose another path")
        finally:
            probe.close()
    path.parent.mkdir(parents=True, exist_ok=True)
    # bind under a short temporary name, set the mode, then rename: the socket is never
    # reachable with a wider mode than asked for
    tmp = path.with_name(f".{secrets.token_hex(3)}")
    s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    try:
        s.bind(str(tmp))
        try:
            os.chmod(tmp, mode)
            os.rename(tmp, path)
        except OSError:
            tmp.unlink(missing_ok=True)
            raise
    except OSError as exc:
        s.close()
        raise NbdAddressInUseError(f"cannot bind {path}: {exc.strerror or exc}") from exc
    return s


def _bind_tcp(host: str, port: int) -> socket.socket:
    try:
        infos = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM, flags=socket.AI_PASSIVE)
    except socket.gaierror as exc:
        raise ConfigError.single("host", f"cannot resolve {host!r}: {exc}") from exc
    family, kind, proto, _, sockaddr = infos[0]
    s = socket.socket(family, kind, proto)
    s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    try:
        s.bind(sockaddr)
    except OSError as exc:
        s.close()
        if exc.errno == errno.EADDRINUSE:
            raise NbdAddressInUseError(
                f"TCP port {port} on {host} is in use", hint="choose another --port (0 picks a free one)"
            ) from exc
        raise ConfigError.single("address", f"cannot bind {host}:{port}: {exc.strerror}") from exc
    return s


# ---------------------------------------------------------------------------------------------
class _Connection:
    """One client: the handshake coroutine, then callback-driven transmission."""

    # transmission buffers (set by _start_transmission)
    ibuf: mmap.mmap
    imv: memoryview
    obuf: mmap.mmap
    omv: memoryview

    def __init__(self, server: NbdServer, sock: socket.socket) -> None:
        self.server = server
        self.sock = sock
        self.loop = asyncio.get_running_loop()
        self.fd = sock.fileno()
        self.peer = _peer_name(sock)
        self.structured = False
        self.no_zeroes = False
        self.meta_export: str | None = None  # export the meta contexts were set for
        self.meta_selected = False
        self.export: Export | None = None
        self._closed = False
        self._done: asyncio.Future[None] | None = None
        self._stopping = False
        self._task: asyncio.Task[None] | None = None
        self.charged = 0  # bytes of this connection in server.stats.buffer_bytes
        self.tls_active = False
        self._bridge: _TlsBridge | None = None

    # --- lifecycle ------------------------------------------------------------------------
    async def run(self) -> None:
        sock = self.sock
        self._task = asyncio.current_task()
        try:
            sock.setblocking(False)
            if sock.family in (socket.AF_INET, socket.AF_INET6):
                sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            with contextlib.suppress(OSError):
                sock.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, _SOCK_BUFFER)
            timeout = self.server.handshake_timeout
            async with asyncio.timeout(timeout):
                export = await self._handshake()
            if export is None:
                return
            self.export = export
            opened = self.server.stats.exports_opened
            opened[export.name] = opened.get(export.name, 0) + 1
            log.debug("NBD %s: transmission on export %r", self.peer, export.name)
            self._start_transmission(export)
            assert self._done is not None
            await self._done
        except _Disconnect as exc:
            self.server.stats.protocol_errors += 1
            log.debug("NBD %s: disconnecting: %s", self.peer, exc)
        except TimeoutError:
            log.debug("NBD %s: handshake timed out", self.peer)
        except (ConnectionError, BrokenPipeError):
            log.debug("NBD %s: connection lost", self.peer)
        except OSError as exc:
            log.debug("NBD %s: socket error: %s", self.peer, exc)
        except asyncio.CancelledError:
            raise
        except Exception:
            self.server.stats.internal_errors += 1
            log.exception("NBD %s: internal error; closing this connection", self.peer)
        finally:
            self._close()

    def shutdown(self) -> None:
        """Server shutdown: finish in-flight requests, then close (handshakes just close)."""
        self._stopping = True
        if self._done is None:  # negotiating: stop the handshake coroutine (it closes the socket)
            if self._task is not None:
                self._task.cancel()
            else:
                self._close()
        else:
            self._set_reading(False)
            self._eof = True
            self._maybe_finish()

    def _close(self) -> None:
        if self._closed:
            return
        self._closed = True
        if self._done is not None:
            with contextlib.suppress(Exception):
                self.loop.remove_reader(self.fd)
                self.loop.remove_writer(self.fd)
            if not self._done.done():
                self._done.set_result(None)
            # drop the buffers now (they are unmapped once the last view of them is gone)
            self.imv.release()
            self.omv.release()
            self.ibuf = self.obuf = _EMPTY
            self.late.clear()
            self.fsegs.clear()
        self._charge(-self.charged)
        with contextlib.suppress(OSError):
            self.sock.close()
        if self._bridge is not None:
            self._bridge.close()

    # --- memory budget ----------------------------------------------------------------------
    def _charge(self, n: int) -> bool:
        """Account ``n`` more bytes (negative: fewer) to this connection; False if over a limit."""
        stats = self.server.stats
        if n > 0 and (
            stats.buffer_bytes + n > self.server.max_buffer_memory or self.charged + n > MAX_CONNECTION_MEMORY
        ):
            return False
        self.charged += n
        stats.buffer_bytes += n
        if stats.buffer_bytes > stats.peak_buffer_bytes:
            stats.peak_buffer_bytes = stats.buffer_bytes
        return True

    # --- handshake ------------------------------------------------------------------------
    async def _recv_exact(self, n: int) -> bytes:
        if n == 0:
            return b""
        buf = bytearray(n)
        view = memoryview(buf)
        got = 0
        while got < n:
            k = await self.loop.sock_recv_into(self.sock, view[got:])
            if k == 0:
                raise _Disconnect("client closed the connection during the handshake")
            got += k
        return bytes(buf)

    async def _send(self, data: bytes) -> None:
        await self.loop.sock_sendall(self.sock, data)

    async def _reply(self, opt: int, rep: int, data: bytes | str = b"") -> None:
        raw = data.encode()[: p.MAX_STRING] if isinstance(data, str) else data
        await self._send(p.option_reply(opt, rep, raw))

    async def _discard(self, n: int) -> None:
        buf = bytearray(min(n, 1 << 16))
        view = memoryview(buf)
        while n:
            k = await self.loop.sock_recv_into(self.sock, view[: min(n, len(buf))])
            if k == 0:
                raise _Disconnect("client closed the connection during the handshake")
            n -= k

    async def _handshake(self) -> Export | None:
        await self._send(p.GREETING.pack(p.NBDMAGIC, p.IHAVEOPT, p.FLAG_FIXED_NEWSTYLE | p.FLAG_NO_ZEROES))
        (cflags,) = p.CLIENT_FLAGS.unpack(await self._recv_exact(4))
        if cflags & ~p.CLIENT_FLAGS_KNOWN:
            raise _Disconnect(f"unknown client flags {cflags:#x}")
        self.no_zeroes = bool(cflags & p.FLAG_C_NO_ZEROES)
        while True:
            magic, opt, length = p.OPTION_HEADER.unpack(await self._recv_exact(p.OPTION_HEADER.size))
            if magic != p.IHAVEOPT:
                raise _Disconnect(f"bad option magic {magic:#x}")
            if length > p.MAX_OPTION_DATA:
                if opt == p.OPT_EXPORT_NAME or length > _MAX_DISCARD:
                    raise _Disconnect(f"option {opt} with {length} bytes of data")
                await self._discard(length)
                await self._reply(opt, p.REP_ERR_TOO_BIG, "option data too long")
                continue
            data = await self._recv_exact(length)
            if self._stopping and opt != p.OPT_ABORT:
                await self._reply(opt, p.REP_ERR_SHUTDOWN, "server is shutting down")
                continue
            result = await self._option(opt, data)
            if result is not None:
                return result if isinstance(result, Export) else None

    async def _option(self, opt: int, data: bytes) -> Export | bool | None:
        """Handle one option; an Export means 'enter transmission', False means 'close'."""
        if self.server.tls is not None and not self.tls_active:
            if opt == p.OPT_STARTTLS:
                await self._opt_starttls(data)
                return None
            if self.server.tls_required and opt != p.OPT_ABORT:
                if opt == p.OPT_EXPORT_NAME:  # cannot be answered with an error
                    raise _Disconnect("EXPORT_NAME before STARTTLS, and TLS is required")
                await self._reply(opt, p.REP_ERR_TLS_REQD, "TLS is required: negotiate NBD_OPT_STARTTLS first")
                return None
        if opt == p.OPT_GO or opt == p.OPT_INFO:
            return await self._opt_info_go(opt, data)
        if opt == p.OPT_EXPORT_NAME:
            return await self._opt_export_name(data)
        if opt == p.OPT_STRUCTURED_REPLY:
            if data:
                await self._reply(opt, p.REP_ERR_INVALID, "STRUCTURED_REPLY takes no data")
            else:
                self.structured = True
                await self._reply(opt, p.REP_ACK)
            return None
        if opt == p.OPT_LIST_META_CONTEXT or opt == p.OPT_SET_META_CONTEXT:
            await self._opt_meta_context(opt, data)
            return None
        if opt == p.OPT_LIST:
            if data:
                await self._reply(opt, p.REP_ERR_INVALID, "LIST takes no data")
                return None
            for export in self.server.exports.values():
                name = export.name.encode()
                await self._reply(opt, p.REP_SERVER, p.U32.pack(len(name)) + name + export.description.encode())
            await self._reply(opt, p.REP_ACK)
            return None
        if opt == p.OPT_ABORT:
            with contextlib.suppress(OSError):
                await self._reply(opt, p.REP_ACK)
            return False
        if opt == p.OPT_STARTTLS:
            if self.tls_active:
                await self._reply(opt, p.REP_ERR_INVALID, "TLS is already active")
            else:
                await self._reply(opt, p.REP_ERR_UNSUP, "TLS is not configured on this server")
            return None
        await self._reply(opt, p.REP_ERR_UNSUP, f"option {opt} is not supported")
        return None

    async def _opt_starttls(self, data: bytes) -> None:
        if data:
            await self._reply(p.OPT_STARTTLS, p.REP_ERR_INVALID, "STARTTLS takes no data")
            return
        assert self.server.tls is not None
        await self._reply(p.OPT_STARTTLS, p.REP_ACK)
        self._bridge = await _TlsBridge.start(self.loop, self.sock, self.server.tls)
        self.sock = self._bridge.inner
        self.fd = self.sock.fileno()
        with contextlib.suppress(OSError):
            self.sock.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, _SOCK_BUFFER)
        self.tls_active = True
        # what was negotiated in the clear does not carry over into TLS (NBD protocol)
        self.structured = False
        self.meta_export = None
        self.meta_selected = False
        log.debug("NBD %s: TLS established (%s)", self.peer, self._bridge.version)

    async def _opt_export_name(self, data: bytes) -> Export:
        try:
            name = data.decode()
        except UnicodeDecodeError:
            raise _Disconnect("export name is not UTF-8") from None
        export = self.server.lookup(name)
        if export is None:
            raise _Disconnect(f"no export named {name!r} (EXPORT_NAME cannot return an error)")
        self._check_meta(export)
        flags = self._transmission_flags(export)
        msg = p.EXPORT_NAME_REPLY.pack(export.backend.size, flags)
        if not self.no_zeroes:
            msg += bytes(p.EXPORT_NAME_ZEROES)
        await self._send(msg)
        return export

    async def _opt_info_go(self, opt: int, data: bytes) -> Export | None:
        n = len(data)
        if n < 6:
            await self._reply(opt, p.REP_ERR_INVALID, "option data too short")
            return None
        (namelen,) = p.U32.unpack_from(data, 0)
        if namelen > n - 6:
            await self._reply(opt, p.REP_ERR_INVALID, "export name length exceeds the option")
            return None
        (nreq,) = p.U16.unpack_from(data, 4 + namelen)
        if n != 4 + namelen + 2 + 2 * nreq:
            await self._reply(opt, p.REP_ERR_INVALID, "option length does not match its contents")
            return None
        requests = struct.unpack_from(f">{nreq}H", data, 6 + namelen)
        try:
            name = data[4 : 4 + namelen].decode()
        except UnicodeDecodeError:
            await self._reply(opt, p.REP_ERR_INVALID, "export name is not UTF-8")
            return None
        export = self.server.lookup(name)
        if export is None:
            await self._reply(opt, p.REP_ERR_UNKNOWN, f"no export named {name!r}")
            return None
        backend = export.backend
        caps = backend.capabilities
        flags = self._transmission_flags(export)
        await self._reply(opt, p.REP_INFO, p.INFO_EXPORT_PAYLOAD.pack(p.INFO_EXPORT, backend.size, flags))
        if p.INFO_NAME in requests:
            await self._reply(opt, p.REP_INFO, p.U16.pack(p.INFO_NAME) + export.name.encode())
        if p.INFO_DESCRIPTION in requests and export.description:
            await self._reply(opt, p.REP_INFO, p.U16.pack(p.INFO_DESCRIPTION) + export.description.encode())
        min_block = caps.min_block
        preferred = max(caps.preferred_block, min_block, 512)
        await self._reply(
            opt,
            p.REP_INFO,
            p.INFO_BLOCK_SIZE_PAYLOAD.pack(p.INFO_BLOCK_SIZE, min_block, preferred, p.MAX_PAYLOAD),
        )
        await self._reply(opt, p.REP_ACK)
        if opt == p.OPT_GO:
            self._check_meta(export)
            return export
        return None

    def _check_meta(self, export: Export) -> None:
        if self.meta_export != export.name:
            self.meta_selected = False

    async def _opt_meta_context(self, opt: int, data: bytes) -> None:
        setting = opt == p.OPT_SET_META_CONTEXT
        if setting:
            self.meta_selected = False
            self.meta_export = None
        if not self.structured:
            await self._reply(opt, p.REP_ERR_INVALID, "negotiate structured replies first")
            return
        parsed = _parse_meta_request(data)
        if parsed is None:
            await self._reply(opt, p.REP_ERR_INVALID, "malformed meta context request")
            return
        name, queries = parsed
        export = self.server.lookup(name)
        if export is None:
            await self._reply(opt, p.REP_ERR_UNKNOWN, f"no export named {name!r}")
            return
        available = export.backend.capabilities.block_status
        if any(":" not in q for q in queries):
            await self._reply(opt, p.REP_ERR_INVALID, "a query must start with a namespace and a colon")
            return
        base = p.META_BASE_ALLOCATION
        if setting:
            chosen = available and base in queries
            if chosen:
                await self._reply(opt, p.REP_META_CONTEXT, p.U32.pack(META_CONTEXT_ID) + base.encode())
            await self._reply(opt, p.REP_ACK)
            self.meta_selected = chosen
            self.meta_export = export.name
            return
        if available and (not queries or any(q in ("base:", base) for q in queries)):
            await self._reply(opt, p.REP_META_CONTEXT, p.U32.pack(0) + base.encode())
        await self._reply(opt, p.REP_ACK)

    def _transmission_flags(self, export: Export) -> int:
        caps = export.backend.capabilities
        flags = p.FLAG_HAS_FLAGS | p.FLAG_SEND_FLUSH | p.FLAG_SEND_FUA | p.FLAG_SEND_CACHE
        if not export.writable:
            flags |= p.FLAG_READ_ONLY
        else:
            if caps.trim:
                flags |= p.FLAG_SEND_TRIM
            if caps.zero:
                flags |= p.FLAG_SEND_WRITE_ZEROES
                if caps.fast_zero:
                    flags |= p.FLAG_SEND_FAST_ZERO
        if self.structured:
            flags |= p.FLAG_SEND_DF
        if caps.multi_conn:
            flags |= p.FLAG_CAN_MULTI_CONN
        if caps.rotational:
            flags |= p.FLAG_ROTATIONAL
        return flags

    # --- transmission: state --------------------------------------------------------------
    def _start_transmission(self, export: Export) -> None:
        backend = export.backend
        caps = backend.capabilities
        self.backend = backend
        self.size = backend.size
        self.writable = export.writable
        self.inline = caps.inline
        self.volatile = caps.volatile
        self.min_block = caps.min_block
        self.flags = self._transmission_flags(export)
        self.has_block_status = self.meta_selected and caps.block_status
        self.sendfile_min = self.server.sendfile_min
        self.sendfile_ok = backend.file_extents(0, min(self.size, 1)) is not None
        fua = p.CMD_FLAG_FUA
        self.read_flags = fua | (p.CMD_FLAG_DF if self.structured else 0)
        self.zero_flags = fua | p.CMD_FLAG_NO_HOLE
        if self.flags & p.FLAG_SEND_FAST_ZERO:
            self.zero_flags |= p.CMD_FLAG_FAST_ZERO
        # input: one buffer, requests parsed in place
        self.ibuf = _buffer(_IN_INITIAL)
        self.imv = memoryview(self.ibuf)
        self.istart = 0
        self.iend = 0
        self.skip = 0  # payload bytes still to drop (a WRITE refused for lack of memory)
        self.skip_cookie = 0
        # output: one arena of packed replies, plus sendfile segments and late replies
        self.obuf = _buffer(_OUT_INITIAL)
        self.omv = memoryview(self.obuf)
        self.opos = 0
        self.osent = 0
        self.fsegs: collections.deque[list[int]] = collections.deque()
        self.late: collections.deque[memoryview] = collections.deque()
        self.pending = 0
        self.blocked = False
        self._eof = False
        self._disc = False
        self._reading = False
        self._writing = False
        self._done = self.loop.create_future()
        self._set_reading(True)

    def _set_reading(self, on: bool) -> None:
        if on == self._reading or self._closed:
            return
        self._reading = on
        if on:
            self.loop.add_reader(self.fd, self._on_readable)
        else:
            self.loop.remove_reader(self.fd)

    def _set_writing(self, on: bool) -> None:
        if on == self._writing or self._closed:
            return
        self._writing = on
        if on:
            self.loop.add_writer(self.fd, self._on_writable)
        else:
            self.loop.remove_writer(self.fd)

    def _fatal(self, why: str) -> None:
        self.server.stats.protocol_errors += 1
        log.debug("NBD %s: disconnecting: %s", self.peer, why)
        self._close()

    def _bug(self) -> None:
        self.server.stats.internal_errors += 1
        log.exception("NBD %s: internal error; closing this connection", self.peer)
        self._close()

    # --- transmission: input ----------------------------------------------------------------
    def _on_readable(self) -> None:
        try:
            if self.iend == len(self.ibuf):  # never hand recv an empty buffer (0 means EOF)
                if self.istart == 0 and len(self.ibuf) >= _IN_MAX:
                    self._fatal("input buffer full")  # cannot happen: requests are bounded
                    return
                self._grow_input()
            try:
                n = self.sock.recv_into(self.imv[self.iend :])
            except (BlockingIOError, InterruptedError):
                return
            except OSError as exc:
                self._fatal(f"receive failed: {exc}")
                return
            if n == 0:
                self._eof = True
                self._set_reading(False)
            else:
                self.iend += n
                if self.skip:
                    self._skip_input()
            self._process()
        except Exception:
            self._bug()

    def _process(self) -> None:
        """Serve every complete request in the input buffer (unless output is backed up)."""
        while not self._closed:
            self._process_batch()
            if not self._flush():
                return  # waiting for the socket: _on_writable carries on
            if not self.blocked or self.pending >= _MAX_PENDING:
                break
            # the output drained while we were blocked: carry on with the buffered requests
            self.blocked = False
            if not self._eof and not self._disc:
                self._set_reading(True)
        self._maybe_finish()

    def _process_batch(self) -> None:
        buf = self.ibuf
        pos = self.istart
        end = self.iend
        unpack = _REQ_UNPACK
        while not self.blocked and not self._disc:
            avail = end - pos
            if avail < 28:
                break
            magic, flags, cmd, cookie, offset, length = unpack(buf, pos)
            if magic != _REQUEST_MAGIC:
                self._fatal(f"bad request magic {magic:#x}")
                return
            if cmd == _CMD_WRITE:
                if length > p.MAX_PAYLOAD:
                    self._fatal(f"WRITE of {length} bytes exceeds the {p.MAX_PAYLOAD} byte limit")
                    return
                total = 28 + length
                if avail < total:
                    break  # the buffer grows as the payload arrives (_grow_input), not before
            else:
                total = 28
            # room for the reply (inline READ data goes into the arena)
            if (
                cmd == _CMD_READ
                and length <= p.MAX_PAYLOAD
                and offset + length <= self.size
                and (length < self.sendfile_min or not self.sendfile_ok)
            ):
                need = 28 + length
            else:
                need = 4096 + 64
            if self.late or len(self.obuf) - self.opos < need:
                if not self._make_room(need):
                    self.blocked = True
                    self._set_reading(False)
                    break
                if len(self.obuf) - self.opos < need:  # no memory for this reply
                    pos += total
                    self.istart = pos
                    self._enomem(cookie, f"{p.CMD_NAMES.get(cmd, cmd)} of {length} bytes")
                    continue
            pos += total
            self.istart = pos
            if cmd == _CMD_READ:
                self._cmd_read(flags, cookie, offset, length)
            elif cmd == _CMD_WRITE:
                self._cmd_write(flags, cookie, offset, length, pos - length)
            else:
                self._cmd_other(cmd, flags, cookie, offset, length)
            if self._closed:
                return
            if self.pending >= _MAX_PENDING:
                self.blocked = True
                self._set_reading(False)
        self.istart = pos
        if pos == self.iend:
            self.istart = self.iend = 0
            if len(self.ibuf) > _KEEP:
                self._replace_input(_IN_INITIAL)
        elif len(self.ibuf) - self.iend < (len(self.ibuf) >> 2):
            self._compact_input()

    def _compact_input(self) -> None:
        n = self.iend - self.istart
        if self.istart:
            self.imv[:n] = self.imv[self.istart : self.iend]  # memoryview copy handles overlap
            self.istart = 0
            self.iend = n

    def _grow_input(self) -> None:
        """The input buffer is full: make room by compacting it, or grow it for a large WRITE.

        Growth only happens here, once the buffer is full of data that has arrived, so memory
        follows what the client actually sent, not what its headers announce (up to 4x the
        pending WRITE, as pipelined writes then rarely need moving). Without budget for the
        growth the WRITE is refused: its payload is dropped as it arrives, then ENOMEM.
        """
        size = len(self.ibuf)
        unparsed = self.iend - self.istart
        want = 0  # size of the WRITE waiting for its payload at istart, if any
        cookie = 0
        if unparsed >= 28:
            _magic, _flags, cmd, cookie, _offset, length = _REQ_UNPACK(self.ibuf, self.istart)
            if cmd == _CMD_WRITE:
                want = 28 + length
            elif not self.istart:  # cannot happen: anything else is served or blocks reading
                raise AssertionError(f"input buffer full with a complete request ({cmd})")
        if self.istart and (4 * want <= size or unparsed <= size >> 2):
            self._compact_input()  # cheap, or the buffer is big enough
            return
        new = min(_IN_MAX, 2 * size)
        if new > size and self._charge(new - size):
            self._replace_input(new, charged=True)
            return
        if self.istart:
            self._compact_input()
            return
        self.skip = want - self.iend
        self.skip_cookie = cookie
        self.istart = self.iend = 0

    def _replace_input(self, size: int, *, charged: bool = False) -> None:
        """A new input buffer of ``size`` bytes holding the unparsed input (growth is charged)."""
        n = self.iend - self.istart
        new = _buffer(size)
        new[:n] = self.imv[self.istart : self.iend]
        old = len(self.ibuf)
        self.imv.release()
        self.ibuf = new
        self.imv = memoryview(new)
        self.istart = 0
        self.iend = n
        if not charged:
            self._charge(size - old)  # a shrink: always succeeds

    def _skip_input(self) -> None:
        """Drop payload of a WRITE refused for lack of memory; answer it once all has come."""
        n = min(self.skip, self.iend - self.istart)
        self.istart += n
        self.skip -= n
        if self.istart == self.iend:
            self.istart = self.iend = 0
        if not self.skip:
            self._enomem(self.skip_cookie, "WRITE payload")

    def _enomem(self, cookie: int, what: str) -> None:
        self.server.stats.enomem_replies += 1
        log.debug("NBD %s: no buffer memory for a %s", self.peer, what)
        self._error(cookie, p.ENOMEM, f"the server is out of buffer memory for a {what} (max_buffer_memory)")

    # --- transmission: output ---------------------------------------------------------------
    def _make_room(self, need: int) -> bool:
        """True if the arena has ``need`` free bytes (after sending / growing if possible)."""
        if not self._flush():
            return False
        if len(self.obuf) - self.opos >= need:
            return True
        # drained, so opos == 0 and the arena may be replaced (if the budget allows: else the
        # caller finds it still too small)
        size = -(-max(need, 2 * len(self.obuf)) // _PAGE) * _PAGE
        if self._charge(size - len(self.obuf)):
            self._replace_output(size)
        return True

    def _replace_output(self, size: int) -> None:
        """A new (empty) reply arena; the caller has charged a growth, a shrink is charged here."""
        old = len(self.obuf)
        self.omv.release()
        self.obuf = _buffer(size)
        self.omv = memoryview(self.obuf)
        if size < old:
            self._charge(size - old)

    def _emit(self, data: bytes) -> None:
        """Queue one complete reply (for the cold paths)."""
        n = len(data)
        if not self.late and len(self.obuf) - self.opos >= n:
            self.obuf[self.opos : self.opos + n] = data
            self.opos += n
        else:
            self.late.append(memoryview(data))

    def _flush(self) -> bool:
        """Send what is queued; True when everything went out. Registers for writability."""
        if self._closed:
            return False
        sock = self.sock
        try:
            while True:
                fsegs = self.fsegs
                limit = fsegs[0][0] if fsegs else self.opos
                if self.osent < limit:
                    n = sock.send(self.omv[self.osent : limit])
                    self.osent += n
                    if self.osent < limit:
                        break
                elif fsegs:
                    seg = fsegs[0]
                    n = os.sendfile(self.fd, seg[1], seg[2], seg[3])
                    if n == 0:
                        self._fatal("export file shrank under a read (sendfile hit end of file)")
                        return False
                    if n < seg[3]:
                        seg[2] += n
                        seg[3] -= n
                        break
                    fsegs.popleft()
                elif self.late:
                    data = self.late[0]
                    n = sock.send(data)
                    if n < len(data):
                        self.late[0] = data[n:]
                        break
                    self.late.popleft()
                else:
                    self.opos = self.osent = 0
                    self._set_writing(False)
                    if len(self.obuf) > _KEEP:
                        self._replace_output(_OUT_INITIAL)
                    return True
        except (BlockingIOError, InterruptedError):
            pass
        except OSError as exc:
            self._fatal(f"send failed: {exc}")
            return False
        self._set_writing(True)
        return False

    def _on_writable(self) -> None:
        try:
            if self._flush() and self.blocked:
                self._unblock()
            else:
                self._maybe_finish()
        except Exception:
            self._bug()

    def _unblock(self) -> None:
        if self.pending >= _MAX_PENDING:
            return
        self.blocked = False
        if not self._eof and not self._disc:
            self._set_reading(True)
        self._process()

    def _maybe_finish(self) -> None:
        if (
            (self._eof or self._disc)
            and not self.blocked
            and self.pending == 0
            and not self._closed
            and self.opos == self.osent == 0
            and not self.late
        ):
            self._close()

    # --- replies ----------------------------------------------------------------------------
    def _ok(self, cookie: int) -> None:
        # a simple reply is allowed for any successful non-READ command, even when structured
        _SIMPLE_PACK(self.obuf, self.opos, _SIMPLE_MAGIC, 0, cookie)
        self.opos += 16

    def _error(self, cookie: int, error: int, message: str) -> None:
        if self.structured:
            self._emit(p.structured_error(cookie, error, message))
        else:
            self._emit(p.SIMPLE_REPLY.pack(_SIMPLE_MAGIC, error, cookie))

    def _error_from(self, cookie: int, exc: BaseException, what: str) -> None:
        if isinstance(exc, BackendError | OSError):
            log.debug("NBD %s: %s failed: %s", self.peer, what, exc)
            message = exc.message if isinstance(exc, BackendError) else (exc.strerror or str(exc))
        else:  # a bug in a backend: say so loudly, answer EIO, keep serving
            self.server.stats.internal_errors += 1
            log.error("NBD %s: %s failed unexpectedly", self.peer, what, exc_info=exc)
            message = type(exc).__name__
        self._error(cookie, nbd_errno_for(exc), f"{what} failed: {message}")

    def _read_reply(self, cookie: int, offset: int, data: bytes | memoryview) -> None:
        n = len(data)
        if self.structured:
            if n == 0:
                hdr = p.STRUCTURED_REPLY.pack(_STRUCT_MAGIC, p.REPLY_FLAG_DONE, p.REPLY_TYPE_NONE, cookie, 0)
            else:
                hdr = p.STRUCTURED_DATA.pack(
                    _STRUCT_MAGIC, p.REPLY_FLAG_DONE, p.REPLY_TYPE_OFFSET_DATA, cookie, n + 8, offset
                )
        else:
            hdr = p.SIMPLE_REPLY.pack(_SIMPLE_MAGIC, 0, cookie)
        self._emit(hdr + bytes(data))

    # --- commands ---------------------------------------------------------------------------
    def _cmd_read(self, flags: int, cookie: int, offset: int, length: int) -> None:
        if flags & ~self.read_flags:
            self._error(cookie, p.EINVAL, f"unsupported READ flags {flags:#x}")
            return
        if length > p.MAX_PAYLOAD:
            self._error(cookie, p.EINVAL, f"READ of {length} bytes exceeds the {p.MAX_PAYLOAD} byte limit")
            return
        if offset + length > self.size:
            self._error(cookie, p.EINVAL, "read beyond the end of the export")
            return
        if offset % self.min_block or length % self.min_block:
            self._error(cookie, p.EINVAL, "read not aligned to the minimum block size")
            return
        if length == 0:
            self._read_reply(cookie, offset, b"")
            return
        if not self.inline:
            if not self._charge(length):
                self._enomem(cookie, f"READ of {length} bytes")
                return
            self._defer(cookie, "READ", self.backend.read, offset, length, kind=_CMD_READ, arg=offset, mem=length)
            return
        obuf = self.obuf
        opos = self.opos
        hdr = 28 if self.structured else 16
        if length >= self.sendfile_min:
            try:
                extents = self.backend.file_extents(offset, length)
            except Exception as exc:
                self._error_from(cookie, exc, "READ")
                return
            if extents is not None and sum(e[2] for e in extents) == length and all(e[2] > 0 for e in extents):
                if self.structured:
                    _SDATA_PACK(
                        obuf, opos, _STRUCT_MAGIC, p.REPLY_FLAG_DONE, p.REPLY_TYPE_OFFSET_DATA,
                        cookie, length + 8, offset,
                    )  # fmt: skip
                else:
                    _SIMPLE_PACK(obuf, opos, _SIMPLE_MAGIC, 0, cookie)
                opos += hdr
                self.opos = opos
                for fd, off, n in extents:
                    self.fsegs.append([opos, fd, off, n])
                return
            if len(obuf) - opos < hdr + length:
                if not self._make_room(hdr + length):
                    # replies still queued: this one goes behind them (one at most, as the
                    # queue blocks reading further requests)
                    self._read_reply_late(cookie, offset, length)
                    return
                if len(self.obuf) - self.opos < hdr + length:
                    self._enomem(cookie, f"READ of {length} bytes")
                    return
            obuf = self.obuf
            opos = self.opos
        try:
            self.backend.read_into(offset, self.omv[opos + hdr : opos + hdr + length])
        except Exception as exc:
            self._error_from(cookie, exc, "READ")
            return
        if self.structured:
            _SDATA_PACK(
                obuf, opos, _STRUCT_MAGIC, p.REPLY_FLAG_DONE, p.REPLY_TYPE_OFFSET_DATA,
                cookie, length + 8, offset,
            )  # fmt: skip
        else:
            _SIMPLE_PACK(obuf, opos, _SIMPLE_MAGIC, 0, cookie)
        self.opos = opos + hdr + length

    def _read_reply_late(self, cookie: int, offset: int, length: int) -> None:
        try:
            data = self.backend.read(offset, length)
        except Exception as exc:
            self._error_from(cookie, exc, "READ")
            return
        self._read_reply(cookie, offset, data)

    def _cmd_write(self, flags: int, cookie: int, offset: int, length: int, dpos: int) -> None:
        if flags & ~_FUA:
            self._error(cookie, p.EINVAL, f"unsupported WRITE flags {flags:#x}")
            return
        if not self.writable:
            self._error(cookie, p.EPERM, "the export is read-only")
            return
        if offset + length > self.size:
            self._error(cookie, p.ENOSPC, "write beyond the end of the export")
            return
        if offset % self.min_block or length % self.min_block:
            self._error(cookie, p.EINVAL, "write not aligned to the minimum block size")
            return
        fua = bool(flags & _FUA)
        if not self.inline:
            if not self._charge(length):
                self._enomem(cookie, f"WRITE of {length} bytes")
                return
            data = bytes(self.imv[dpos : dpos + length])  # the input buffer is reused meanwhile
            self._defer(cookie, "WRITE", functools.partial(self.backend.write, fua=fua), offset, data, mem=length)
            return
        try:
            self.backend.write(offset, self.imv[dpos : dpos + length])
        except Exception as exc:
            self._error_from(cookie, exc, "WRITE")
            return
        self._done_maybe_durable(cookie, "WRITE", fua)

    def _done_maybe_durable(self, cookie: int, name: str, fua: bool) -> None:
        """Reply to a completed inline write; with FUA, only after a flush (run in a thread)."""
        if fua and not self.volatile:
            self._defer(cookie, name, self.backend.flush)
        else:
            self._ok(cookie)

    def _cmd_other(self, cmd: int, flags: int, cookie: int, offset: int, length: int) -> None:
        name = p.CMD_NAMES.get(cmd, str(cmd))
        if cmd == p.CMD_DISC:
            self._disc = True
            self._set_reading(False)
            return
        if cmd == p.CMD_FLUSH:
            if flags & ~_FUA:
                self._error(cookie, p.EINVAL, f"unsupported FLUSH flags {flags:#x}")
            elif self.volatile:
                self._ok(cookie)
            else:
                self._defer(cookie, name, self.backend.flush)
            return
        if cmd == p.CMD_BLOCK_STATUS:
            self._cmd_block_status(flags, cookie, offset, length)
            return
        if cmd not in (p.CMD_TRIM, p.CMD_WRITE_ZEROES, p.CMD_CACHE):
            self._error(cookie, p.EINVAL, f"unknown command {cmd}")
            return
        allowed = self.zero_flags if cmd == p.CMD_WRITE_ZEROES else _FUA
        if flags & ~allowed:
            self._error(cookie, p.EINVAL, f"unsupported {name} flags {flags:#x}")
            return
        if offset + length > self.size:
            error = p.ENOSPC if cmd == p.CMD_WRITE_ZEROES else p.EINVAL
            self._error(cookie, error, f"{name} beyond the end of the export")
            return
        if offset % self.min_block or length % self.min_block:
            self._error(cookie, p.EINVAL, f"{name} not aligned to the minimum block size")
            return
        fua = bool(flags & _FUA)
        call: Callable[[], object]
        if cmd == p.CMD_CACHE:
            call = functools.partial(self.backend.cache, offset, length)
        elif not self.writable:
            self._error(cookie, p.EPERM, "the export is read-only")
            return
        elif cmd == p.CMD_TRIM:
            if not self.flags & p.FLAG_SEND_TRIM:
                self._error(cookie, p.EINVAL, "TRIM is not supported by this export")
                return
            call = functools.partial(self.backend.trim, offset, length, fua=fua and not self.inline)
        else:
            if not self.flags & p.FLAG_SEND_WRITE_ZEROES:
                self._error(cookie, p.EINVAL, "WRITE_ZEROES is not supported by this export")
                return
            call = functools.partial(
                self.backend.zero,
                offset,
                length,
                may_trim=not flags & p.CMD_FLAG_NO_HOLE,
                fast=bool(flags & p.CMD_FLAG_FAST_ZERO),
                fua=fua and not self.inline,
            )
        if length == 0:
            self._ok(cookie)
        elif not self.inline:
            self._defer(cookie, name, call)
        else:
            try:
                call()
            except Exception as exc:
                self._error_from(cookie, exc, name)
                return
            self._done_maybe_durable(cookie, name, fua and cmd != p.CMD_CACHE)

    def _cmd_block_status(self, flags: int, cookie: int, offset: int, length: int) -> None:
        if not self.has_block_status:
            self._error(cookie, p.EINVAL, "no metadata context was negotiated")
            return
        if flags & ~(_FUA | p.CMD_FLAG_REQ_ONE):
            self._error(cookie, p.EINVAL, f"unsupported BLOCK_STATUS flags {flags:#x}")
            return
        if length == 0 or offset + length > self.size:
            self._error(cookie, p.EINVAL, "block status range is empty or beyond the end of the export")
            return
        req_one = bool(flags & p.CMD_FLAG_REQ_ONE)
        if not self.inline:
            self._defer(
                cookie, "BLOCK_STATUS", self.backend.block_status, offset, length,
                kind=p.CMD_BLOCK_STATUS, arg=length, req_one=req_one,
            )  # fmt: skip
            return
        try:
            extents = self.backend.block_status(offset, length)
        except Exception as exc:
            self._error_from(cookie, exc, "BLOCK_STATUS")
            return
        self._block_status_reply(cookie, length, extents, req_one)

    def _block_status_reply(self, cookie: int, length: int, extents: Sequence[Extent], req_one: bool) -> None:
        words: list[int] = []
        total = 0
        for ext_len, state in extents:
            ext_len = min(ext_len, length - total)
            if ext_len <= 0:
                break
            words += (ext_len, state & 0xFFFFFFFF)
            total += ext_len
            if req_one or len(words) >= 2 * (1 << 20):
                break
        if not words:
            self._error(cookie, p.EIO, "the backend reported no extents")
            return
        payload = p.U32.pack(META_CONTEXT_ID) + struct.pack(f">{len(words)}I", *words)
        hdr = p.STRUCTURED_REPLY.pack(_STRUCT_MAGIC, p.REPLY_FLAG_DONE, p.REPLY_TYPE_BLOCK_STATUS, cookie, len(payload))
        self._emit(hdr + payload)

    # --- deferred (threaded) requests -------------------------------------------------------
    def _defer(
        self,
        cookie: int,
        what: str,
        fn: Callable[..., Any],
        *args: Any,
        kind: int = -1,
        arg: int = 0,
        req_one: bool = False,
        mem: int = 0,
    ) -> None:
        """Run ``fn(*args)`` in the I/O threads; reply when it is done.

        ``kind``/``arg`` say how to turn the result into a reply: READ (arg: offset),
        BLOCK_STATUS (arg: requested length), anything else: a plain success. ``mem``: bytes
        charged for this request (its data), released when it is done.
        """
        self.pending += 1
        fut = self.loop.run_in_executor(self.server.executor, fn, *args)
        fut.add_done_callback(functools.partial(self._deferred_done, cookie, what, kind, arg, req_one, mem))

    def _deferred_done(
        self, cookie: int, what: str, kind: int, arg: int, req_one: bool, mem: int, fut: asyncio.Future[Any]
    ) -> None:
        self.pending -= 1
        if self._closed:
            return  # _close released everything charged
        self._charge(-mem)
        try:
            if fut.cancelled():
                self._error(cookie, p.ESHUTDOWN, "the server is shutting down")
            elif (exc := fut.exception()) is not None:
                self._error_from(cookie, exc, what)
            elif kind == _CMD_READ:
                self._read_reply(cookie, arg, fut.result())
            elif kind == p.CMD_BLOCK_STATUS:
                self._block_status_reply(cookie, arg, fut.result(), req_one)
            else:
                self._emit(p.SIMPLE_REPLY.pack(_SIMPLE_MAGIC, 0, cookie))
            if self._flush() and self.blocked:
                self._unblock()
            else:
                self._maybe_finish()
        except Exception:
            self._bug()


class _Pump(asyncio.Protocol):
    """One side of a :class:`_TlsBridge`: what its transport receives goes to the other side."""

    def __init__(self) -> None:
        self.transport: asyncio.Transport | None = None
        self.other: _Pump | None = None

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        assert isinstance(transport, asyncio.Transport)
        self.transport = transport

    def _peer(self) -> asyncio.Transport | None:
        return self.other.transport if self.other is not None else None

    def data_received(self, data: bytes) -> None:
        peer = self._peer()
        if peer is not None and not peer.is_closing():
            peer.write(data)

    def eof_received(self) -> bool | None:
        peer = self._peer()
        if peer is not None and not peer.is_closing():
            if peer.can_write_eof():
                peer.write_eof()
            else:
                peer.close()
        # a plain socket stays open for the other direction; TLS cannot be half-closed
        return True if self.transport is not None and self.transport.can_write_eof() else None

    def connection_lost(self, exc: Exception | None) -> None:
        peer = self._peer()
        if peer is not None and not peer.is_closing():
            peer.close()

    def pause_writing(self) -> None:
        if self.other is not None and self.other.transport is not None:
            self.other.transport.pause_reading()

    def resume_writing(self) -> None:
        if self.other is not None and self.other.transport is not None:
            self.other.transport.resume_reading()


class _TlsBridge:
    """A server-side TLS session on a client socket, relayed to one end of a socketpair.

    The connection then serves ``inner`` exactly like a plain socket (same fast path, and
    sendfile still works: into the socketpair). Flow control is passed through both ways.
    """

    def __init__(self, loop: asyncio.AbstractEventLoop, outer: _Pump, plain: _Pump, inner: socket.socket) -> None:
        self.loop = loop
        self.outer = outer
        self.plain = plain
        self.inner = inner

    @classmethod
    async def start(cls, loop: asyncio.AbstractEventLoop, raw: socket.socket, ctx: ssl.SSLContext) -> _TlsBridge:
        mine, inner = socket.socketpair()
        outer, plain = _Pump(), _Pump()
        outer.other, plain.other = plain, outer
        transport: asyncio.Transport | None = None
        try:
            await loop.connect_accepted_socket(lambda: plain, mine)
            raw_transport, _ = await loop.connect_accepted_socket(lambda: outer, raw)
            assert isinstance(raw_transport, asyncio.Transport)
            transport = raw_transport
            # start_tls pauses reading first: the ClientHello goes to TLS, never to ``plain``
            tls = await loop.start_tls(transport, outer, ctx, server_side=True)
            if tls is None:
                raise ConnectionError("the connection closed during the TLS handshake")
        except BaseException:
            if transport is not None:
                transport.abort()
            if plain.transport is not None:
                plain.transport.abort()
            mine.close()
            inner.close()
            raise
        outer.transport = tls
        inner.setblocking(False)
        return cls(loop, outer, plain, inner)

    @property
    def version(self) -> str:
        obj = self.outer.transport.get_extra_info("ssl_object") if self.outer.transport else None
        return str(obj.version()) if obj is not None else "?"

    def close(self) -> None:
        """Close both sides (TLS with close_notify, aborted if the peer does not read it in 5 s)."""
        if self.plain.transport is not None:
            self.plain.transport.close()
        tls = self.outer.transport
        if tls is not None and not tls.is_closing():
            tls.close()
            self.loop.call_later(5.0, tls.abort)


def _parse_meta_request(data: bytes) -> tuple[str, list[str]] | None:
    try:
        n = len(data)
        (namelen,) = p.U32.unpack_from(data, 0)
        pos = 4 + namelen
        if pos + 4 > n or namelen > p.MAX_STRING:
            return None
        name = data[4:pos].decode()
        (count,) = p.U32.unpack_from(data, pos)
        pos += 4
        queries = []
        for _ in range(count):
            if pos + 4 > n:
                return None
            (qlen,) = p.U32.unpack_from(data, pos)
            pos += 4
            if qlen > p.MAX_STRING or pos + qlen > n:
                return None
            queries.append(data[pos : pos + qlen].decode())
            pos += qlen
        if pos != n:
            return None
        return name, queries
    except (struct.error, UnicodeDecodeError):
        return None


def _peer_name(sock: socket.socket) -> str:
    try:
        peer = sock.getpeername()
    except OSError:
        return "?"
    if isinstance(peer, tuple):
        return f"{peer[0]}:{peer[1]}"
    return f"unix:{sock.fileno()}"


# --- top level ---------------------------------------------------------------------------------
async def serve_async(
    exports: Export | Backend | Iterable[Export] | Mapping[str, Backend],
    *,
    unix_path: str | os.PathLike[str] | None = None,
    host: str | None = None,
    port: int | None = None,
    on_ready: Callable[[NbdAddress], None] | None = None,
    stop: asyncio.Event | None = None,
    **options: Any,
) -> None:
    """Serve until ``stop`` is set (or SIGINT/SIGTERM in the main thread), then close."""
    server = NbdServer(exports, **options)
    stop = stop or asyncio.Event()
    loop = asyncio.get_running_loop()
    handled: list[signal.Signals] = []
    if threading.current_thread() is threading.main_thread():
        for sig in (signal.SIGINT, signal.SIGTERM):
            with contextlib.suppress(NotImplementedError, RuntimeError):
                loop.add_signal_handler(sig, stop.set)
                handled.append(sig)
    try:
        address = await server.start(unix_path=unix_path, host=host, port=port)
        if on_ready is not None:
            on_ready(address)
        await stop.wait()
    finally:
        for sig in handled:
            loop.remove_signal_handler(sig)
        await server.close()


def serve(
    exports: Export | Backend | Iterable[Export] | Mapping[str, Backend],
    *,
    unix_path: str | os.PathLike[str] | None = None,
    host: str | None = None,
    port: int | None = None,
    on_ready: Callable[[NbdAddress], None] | None = None,
    use_uvloop: bool = False,
    **options: Any,
) -> None:
    """Blocking: serve ``exports`` until SIGINT/SIGTERM (optionally on uvloop, if installed)."""
    coro = serve_async(exports, unix_path=unix_path, host=host, port=port, on_ready=on_ready, **options)
    loop_factory = _uvloop_factory() if use_uvloop else None
    if use_uvloop and loop_factory is None:
        raise ConfigError.single("use_uvloop", "uvloop is not installed")
    with asyncio.Runner(loop_factory=loop_factory) as runner:
        runner.run(coro)


def _uvloop_factory() -> Callable[[], asyncio.AbstractEventLoop] | None:
    try:
        import uvloop  # type: ignore[import-not-found,unused-ignore]
    except ImportError:
        return None
    factory: Callable[[], asyncio.AbstractEventLoop] = uvloop.new_event_loop
    return factory
