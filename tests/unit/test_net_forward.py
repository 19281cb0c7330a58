"""Userspace port forwards (what a machine on a vmkit network gets instead of QEMU's hostfwd): TCP and
UDP through the forwarder to a server standing in for the guest, on this host's loopback."""

from __future__ import annotations

import asyncio
import socket
from typing import cast

from vmkit.config import PortForward
from vmkit.host.provision import free_port
from vmkit.net.forward import Forwarder


async def _tcp_echo(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
    data = await reader.read(1024)
    writer.write(b"echo:" + data)
    await writer.drain()
    writer.close()


class _UdpEcho(asyncio.DatagramProtocol):
    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = cast(asyncio.DatagramTransport, transport)

    def datagram_received(self, data: bytes, addr: tuple[str, int]) -> None:
        self.transport.sendto(b"udp:" + data, addr)


def test_tcp_and_udp_forwards_reach_the_target_and_stop_on_close() -> None:
    async def run() -> None:
        guest_tcp, guest_udp, host_tcp, host_udp = (free_port() for _ in range(4))
        server = await asyncio.start_server(_tcp_echo, "127.0.0.1", guest_tcp)
        loop = asyncio.get_running_loop()
        udp, _ = await loop.create_datagram_endpoint(_UdpEcho, local_addr=("127.0.0.1", guest_udp))
        fwd = Forwarder("127.0.0.1")
        await fwd.add(PortForward(host_port=host_tcp, guest_port=guest_tcp))
        await fwd.add(PortForward(protocol="udp", host_port=host_udp, guest_port=guest_udp))
        for word in (b"one", b"two"):  # two clients, one after the other
            reader, writer = await asyncio.open_connection("127.0.0.1", host_tcp)
            writer.write(word)
            await writer.drain()
            assert await asyncio.wait_for(reader.read(1024), 5) == b"echo:" + word
            writer.close()
        with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
            s.setblocking(False)
            s.sendto(b"ping", ("127.0.0.1", host_udp))
            data = await asyncio.wait_for(loop.sock_recv(s, 1024), 5)
        assert data == b"udp:ping"
        await fwd.close()
        try:
            await asyncio.open_connection("127.0.0.1", host_tcp)
            raise AssertionError("the forward still listens after close()")
        except ConnectionRefusedError:
            pass
        server.close()
        udp.close()

    asyncio.run(run())


def test_a_target_that_refuses_closes_the_client() -> None:
    async def run() -> None:
        host_port, dead = free_port(), free_port()
        fwd = Forwarder("127.0.0.1")
        await fwd.add(PortForward(host_port=host_port, guest_port=dead))
        reader, writer = await asyncio.open_connection("127.0.0.1", host_port)
        assert await asyncio.wait_for(reader.read(1024), 15) == b""  # closed, not hanging
        writer.close()
        await fwd.close()

    asyncio.run(run())
