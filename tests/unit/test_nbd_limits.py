"""Resource limits of vmkit's NBD server against hostile clients (audit issue 17).

* memory: a WRITE header alone must not make the server allocate its payload, the memory that
  clients make the server hold is capped server-wide, and it is returned when they leave;
* connection slots: counted from accept (exactly), per peer (uid on unix sockets, IP on TCP),
  and freed by the handshake timeout, so one peer cannot lock everyone else out.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import os
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from vmkit.nbd import Capabilities, Export, MemoryBackend, NbdClient, NbdReplyError, NbdServer
from vmkit.nbd import protocol as p

MiB = 1 << 20
ROOT = Path(__file__).resolve().parents[2]


# --- helpers: blocking raw clients (the server may be another process) -------------------------
def recv_exact(s: socket.socket, n: int) -> bytes:
    buf = b""
    while len(buf) < n:
        chunk = s.recv(n - len(buf))
        if not chunk:
            raise ConnectionError("server closed the connection")
        buf += chunk
    return buf


def handshaken(path: Path) -> socket.socket:
    """A raw client in the transmission phase of the default export (EXPORT_NAME, no zeroes)."""
    s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    s.settimeout(10)
    s.connect(str(path))
    recv_exact(s, 18)
    s.sendall(p.CLIENT_FLAGS.pack(p.FLAG_C_FIXED_NEWSTYLE | p.FLAG_C_NO_ZEROES))
    s.sendall(p.option_request(p.OPT_EXPORT_NAME, b""))
    recv_exact(s, 10)
    return s


def rss_mib(pid: int) -> float:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    raise AssertionError("no VmRSS")


def settle_rss(pid: int, seconds: float = 1.0) -> float:
    time.sleep(seconds)
    return rss_mib(pid)


@contextlib.contextmanager
def server_process(sock: Path, *extra: str) -> Iterator[subprocess.Popen[bytes]]:
    env = dict(os.environ, PYTHONPATH=str(ROOT / "src"))
    proc = subprocess.Popen(
        [sys.executable, "-m", "vmkit.nbd", "serve", "--memory", "1G", "--socket", str(sock), *extra],
        stdout=subprocess.PIPE,
        stderr=subprocess.DEVNULL,
        env=env,
    )
    try:
        assert proc.stdout is not None
        assert proc.stdout.readline().startswith(b"nbd+unix://")
        yield proc
    finally:
        proc.terminate()
        try:
            proc.wait(10)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
        if proc.stdout is not None:
            proc.stdout.close()


# --- memory ----------------------------------------------------------------------------------
def test_write_headers_without_data_do_not_grow_the_server(sockdir: Path) -> None:
    """16 clients each announce a 32 MiB WRITE and stall: the server must not allocate it."""
    sock = sockdir / "s"
    with server_process(sock) as proc:
        warm = handshaken(sock)  # one connection's fixed buffers are part of the baseline
        warm.close()
        before = settle_rss(proc.pid, 0.5)
        clients = [handshaken(sock) for _ in range(16)]
        for c in clients:
            c.sendall(p.request(p.CMD_WRITE, 0, p.MAX_PAYLOAD, cookie=1))
        held = settle_rss(proc.pid)
        assert held - before < 48, f"{held - before:.0f} MiB held for 16 stalled WRITE headers"
        for c in clients:
            c.close()
        after = settle_rss(proc.pid)
        assert after - before < 16, f"{after - before:.0f} MiB not returned after the clients left"


def test_memory_held_for_stalled_writes_is_capped_and_returned(sockdir: Path) -> None:
    """Clients that send most of a 32 MiB WRITE and stall make the server hold at most its cap."""
    sock = sockdir / "s"
    with server_process(sock, "--max-buffer-memory", "64M") as proc:
        before = settle_rss(proc.pid, 0.5)
        clients = [handshaken(sock) for _ in range(8)]
        chunk = bytes(MiB)
        for c in clients:
            c.sendall(p.request(p.CMD_WRITE, 0, p.MAX_PAYLOAD, cookie=7))
            for _ in range(24):
                c.sendall(chunk)
        held = settle_rss(proc.pid)
        assert held - before < 64 + 24, f"{held - before:.0f} MiB held (cap 64 MiB)"
        # the clients over the cap are answered ENOMEM once they send the rest; the others succeed
        for c in clients:
            for _ in range(8):
                c.sendall(chunk)
        errors = []
        for c in clients:
            magic, error, cookie = p.SIMPLE_REPLY.unpack(recv_exact(c, 16))
            assert magic == p.SIMPLE_REPLY_MAGIC and cookie == 7
            errors.append(error)
        assert set(errors) <= {0, p.ENOMEM} and p.ENOMEM in errors and 0 in errors, errors
        for c in clients:
            c.close()
        after = settle_rss(proc.pid)
        assert after - before < 16, f"{after - before:.0f} MiB not returned after the clients left"


async def test_buffer_budget_refuses_with_enomem_and_recovers(sockdir: Path) -> None:
    mem = MemoryBackend(64 * MiB)
    server = NbdServer(Export("", mem), max_buffer_memory=8 * MiB)
    await server.start(unix_path=sockdir / "s")
    try:
        # a stalled client holds the budget with 6 MiB of an 8 MiB write
        reader, writer = await asyncio.open_unix_connection(str(sockdir / "s"))
        await reader.readexactly(18)
        writer.write(p.CLIENT_FLAGS.pack(3) + p.option_request(p.OPT_EXPORT_NAME, b""))
        await reader.readexactly(10)
        writer.write(p.request(p.CMD_WRITE, 0, 8 * MiB, cookie=1) + b"x" * (6 * MiB))
        await writer.drain()
        for _ in range(100):
            if server.stats.buffer_bytes >= 4 * MiB:
                break
            await asyncio.sleep(0.02)
        assert 4 * MiB <= server.stats.buffer_bytes <= 8 * MiB
        async with await NbdClient.connect(unix_path=sockdir / "s", structured=False) as c:
            with pytest.raises(Exception, match=r"ENOMEM|memory"):
                await c.write(MiB * 16, b"y" * (4 * MiB))
            await c.write(0, b"small writes still work")  # the connection survived
            assert await c.read(0, 5) == b"small"
            assert mem.read(16 * MiB, 1) == b"\0"  # the refused write wrote nothing
            writer.close()  # the hog leaves: its memory is released
            for _ in range(100):
                if server.stats.buffer_bytes < 4 * MiB:
                    break
                await asyncio.sleep(0.02)
            await c.write(MiB * 16, b"y" * (4 * MiB))
            assert mem.read(16 * MiB, 4) == b"yyyy"
        for _ in range(100):
            if server.stats.buffer_bytes == 0:
                break
            await asyncio.sleep(0.02)
        assert server.stats.buffer_bytes == 0
        assert server.stats.peak_buffer_bytes <= 8 * MiB
    finally:
        await server.close()


# --- connection slots --------------------------------------------------------------------------
async def test_connections_are_counted_from_accept(sockdir: Path) -> None:
    """Connections queued before the server runs are admitted up to the limit, not past it."""
    server = NbdServer(Export("", MemoryBackend(MiB)), max_connections=8, max_connections_per_peer=0)
    await server.start(unix_path=sockdir / "s")
    try:
        socks = []
        for _ in range(40):  # all connect (into the backlog) before the server accepts any
            s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
            s.connect(str(sockdir / "s"))
            s.setblocking(False)
            socks.append(s)
        greeted = 0
        loop = asyncio.get_running_loop()
        for s in socks:
            try:
                async with asyncio.timeout(5):
                    data = await loop.sock_recv(s, 18)
            except (ConnectionError, TimeoutError):
                data = b""
            greeted += len(data) > 0
        assert greeted == 8
        assert server.connection_count == 8
        assert server.stats.connections_refused == 32
        for s in socks:
            s.close()
    finally:
        await server.close()


async def _idle_client(loop: asyncio.AbstractEventLoop, s: socket.socket) -> bool:
    """True if the server greeted this connection (and did not close it at once)."""
    try:
        async with asyncio.timeout(5):
            data = await loop.sock_recv(s, 18)
    except (ConnectionError, TimeoutError):
        return False
    return len(data) == 18


async def test_one_ip_cannot_take_every_slot(sockdir: Path) -> None:
    server = NbdServer(Export("", MemoryBackend(MiB)), max_connections=16, max_connections_per_peer=4)
    address = await server.start(host="127.0.0.1", port=0)
    loop = asyncio.get_running_loop()
    hogs: list[socket.socket] = []
    try:
        for _ in range(10):
            s = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
            s.setblocking(False)
            await loop.sock_connect(s, ("127.0.0.1", address.port))
            hogs.append(s)
        greeted = [await _idle_client(loop, s) for s in hogs]
        assert sum(greeted) == 4
        other = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        other.bind(("127.0.0.2", 0))  # another peer (loopback) still gets in
        other.setblocking(False)
        await loop.sock_connect(other, ("127.0.0.1", address.port))
        async with await NbdClient.connect(sock=other) as c:
            await c.write(0, b"ok")
            assert await c.read(0, 2) == b"ok"
    finally:
        for s in hogs:
            s.close()
        await server.close()


async def test_one_uid_cannot_take_every_slot_and_idle_handshakes_time_out(sockdir: Path) -> None:
    if os.geteuid() != 0:
        pytest.skip("needs root to connect as another uid")
    server = NbdServer(
        Export("", MemoryBackend(MiB)), max_connections=16, max_connections_per_peer=4, handshake_timeout=1.0
    )
    path = sockdir / "s"
    sockdir.chmod(0o755)
    await server.start(unix_path=path, unix_mode=0o666)
    loop = asyncio.get_running_loop()
    hogs: list[socket.socket] = []
    try:
        for _ in range(6):
            s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
            s.setblocking(False)
            await loop.sock_connect(s, str(path))
            hogs.append(s)
        greeted = [await _idle_client(loop, s) for s in hogs]
        assert sum(greeted) == 4  # root's share, never negotiating
        # another uid is let in meanwhile
        script = (
            "import socket,sys; s=socket.socket(socket.AF_UNIX); s.settimeout(5); s.connect(sys.argv[1]);"
            "d=s.recv(18); print(len(d))"
        )
        res = await asyncio.to_thread(
            subprocess.run,
            ["/usr/bin/python3", "-c", script, str(path)],
            user="nobody",
            capture_output=True,
            text=True,
            timeout=20,
        )
        assert res.stdout.strip() == "18", res.stderr
        # the idle root clients are dropped by the handshake timeout; root can connect again
        await asyncio.sleep(1.5)
        assert server.connection_count == 0
        async with await NbdClient.connect(unix_path=path) as c:
            await c.write(0, b"back")
    finally:
        for s in hogs:
            s.close()
        await server.close()


class ThreadedMemory(MemoryBackend):
    """A RAM disk the server must call from its I/O threads (as for slow, blocking backends)."""

    @property
    def capabilities(self) -> Capabilities:
        return dataclasses.replace(super().capabilities, inline=False)


async def test_requests_to_threaded_backends_are_charged_too(sockdir: Path) -> None:
    server = NbdServer(Export("", ThreadedMemory(8 * MiB)), max_buffer_memory=MiB)
    await server.start(unix_path=sockdir / "s")
    try:
        async with await NbdClient.connect(unix_path=sockdir / "s") as c:
            with pytest.raises(NbdReplyError, match=r"ENOMEM|memory"):
                await c.read(0, 2 * MiB)  # more than the whole budget
            await c.write(0, b"z" * (128 * 1024))
            assert await c.read(0, 128 * 1024) == b"z" * (128 * 1024)
        assert server.stats.enomem_replies == 1
        for _ in range(100):
            if server.stats.buffer_bytes == 0:
                break
            await asyncio.sleep(0.02)
        assert server.stats.buffer_bytes == 0
    finally:
        await server.close()


class PartlyFileBacked(MemoryBackend):
    """Says it has file extents (so large reads try sendfile) but never covers a whole read."""

    def file_extents(self, offset: int, length: int) -> list[tuple[int, int, int]] | None:
        return []


async def test_a_large_read_that_cannot_use_sendfile_respects_the_budget(sockdir: Path) -> None:
    mem = PartlyFileBacked(8 * MiB)
    mem.write(0, b"q" * (2 * MiB))
    server = NbdServer(Export("", mem), max_buffer_memory=MiB, sendfile_min=4096)
    await server.start(unix_path=sockdir / "s")
    try:
        async with await NbdClient.connect(unix_path=sockdir / "s") as c:
            with pytest.raises(NbdReplyError, match=r"ENOMEM|memory"):
                await c.read(0, 2 * MiB)
            assert await c.read(0, 512 * 1024) == b"q" * (512 * 1024)  # the stream is intact
        assert server.stats.peak_buffer_bytes <= MiB
    finally:
        await server.close()
