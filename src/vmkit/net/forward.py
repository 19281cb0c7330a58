"""Host port forwards to a machine on a vmkit network, in userspace (the supervisor runs them).

A machine without QEMU's user-mode NIC has no ``hostfwd``; the supervisor listens on the host
address and port instead and connects each client to the guest's address on its network (TCP), or
relays datagrams (UDP, one socket towards the guest per client). This also works for
``127.0.0.1``, which an nftables DNAT could not reach without ``route_localnet``.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import socket
from collections.abc import Coroutine
from typing import Any, cast

from vmkit.config import PortForward

log = logging.getLogger("vmkit.net.forward")
UDP_IDLE = 120.0
"""A UDP client's relay socket is closed after this long without traffic."""


class Forwarder:
    """Every forward of one machine; :meth:`close` ends them all."""

    def __init__(self, guest_address: str) -> None:
        self.guest = guest_address
        self._servers: dict[tuple[str, int], asyncio.AbstractServer | _UdpRelay] = {}
        self._conns: set[asyncio.Task[None]] = set()

    async def add(self, fwd: PortForward) -> None:
        key = (fwd.protocol, fwd.host_port)
        if key in self._servers:
            return
        if fwd.protocol == "tcp":
            server = await asyncio.start_server(
                lambda r, w: self._track(self._pipe_tcp(r, w, fwd.guest_port)), fwd.host_addr, fwd.host_port,
                reuse_address=True)
            self._servers[key] = server
        else:
            relay = _UdpRelay(self.guest, fwd.guest_port)
            loop = asyncio.get_running_loop()
            await loop.create_datagram_endpoint(lambda: relay, local_addr=(fwd.host_addr, fwd.host_port))
            self._servers[key] = relay

    def _track(self, coro: Coroutine[Any, Any, None]) -> None:
        task = asyncio.ensure_future(coro)
        self._conns.add(task)
        task.add_done_callback(self._conns.discard)

    async def _pipe_tcp(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter, port: int) -> None:
        try:
            g_reader, g_writer = await asyncio.wait_for(asyncio.open_connection(self.guest, port), 10)
        except (OSError, TimeoutError) as exc:
            log.info("forward to %s:%d failed: %s", self.guest, port, exc)
            writer.close()
            return

        async def pump(src: asyncio.StreamReader, dst: asyncio.StreamWriter) -> None:
            try:
                while data := await src.read(65536):
                    dst.write(data)
                    await dst.drain()
                if dst.can_write_eof():
                    dst.write_eof()
            except (OSError, ConnectionError):
                dst.close()

        try:
            await asyncio.gather(pump(reader, g_writer), pump(g_reader, writer))
        finally:
            for w in (writer, g_writer):
                w.close()

    async def close(self) -> None:
        for server in self._servers.values():
            server.close()
        self._servers.clear()
        for task in list(self._conns):
            task.cancel()
        for task in list(self._conns):
            with contextlib.suppress(BaseException):
                await task


class _UdpRelay(asyncio.DatagramProtocol):
    def __init__(self, guest: str, port: int) -> None:
        self.target = (guest, port)
        self.transport: asyncio.DatagramTransport | None = None
        self.clients: dict[tuple[str, int], tuple[socket.socket, asyncio.TimerHandle]] = {}

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = cast(asyncio.DatagramTransport, transport)  # the selector's is not a subclass

    def datagram_received(self, data: bytes, addr: tuple[str, int]) -> None:
        loop = asyncio.get_running_loop()
        entry = self.clients.get(addr)
        if entry is None:
            sock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
            sock.setblocking(False)
            sock.connect(self.target)
            loop.add_reader(sock.fileno(), self._answer, sock, addr)
        else:
            sock, timer = entry
            timer.cancel()
        self.clients[addr] = (sock, loop.call_later(UDP_IDLE, self._drop, addr))
        with contextlib.suppress(OSError):
            sock.send(data)

    def _answer(self, sock: socket.socket, addr: tuple[str, int]) -> None:
        with contextlib.suppress(OSError):
            data = sock.recv(65536)
            if self.transport is not None:
                self.transport.sendto(data, addr)

    def _drop(self, addr: tuple[str, int]) -> None:
        entry = self.clients.pop(addr, None)
        if entry is not None:
            with contextlib.suppress(Exception):
                asyncio.get_running_loop().remove_reader(entry[0].fileno())
            entry[0].close()

    def close(self) -> None:
        for addr in list(self.clients):
            self._drop(addr)
        if self.transport is not None:
            self.transport.close()
