"""vmkit's NBD server in-process, driven by vmkit's small client and by raw bytes."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import socket
import stat
import struct
import threading
import time
from collections.abc import AsyncIterator
from pathlib import Path

import pytest

from vmkit.errors import ConfigError
from vmkit.nbd import (
    Backend,
    Capabilities,
    Export,
    FileBackend,
    MemoryBackend,
    NbdAddress,
    NbdAddressInUseError,
    NbdClient,
    NbdReplyError,
    NbdServer,
)
from vmkit.nbd import protocol as p
from vmkit.nbd.errors import NbdProtocolError

MiB = 1 << 20


class Env:
    def __init__(self, server: NbdServer, address: NbdAddress, mem: MemoryBackend, path: Path) -> None:
        self.server = server
        self.address = address
        self.mem = mem
        self.path = path

    async def client(self, export: str = "mem", **kw: object) -> NbdClient:
        return await NbdClient.connect(unix_path=self.path, export=export, **kw)  # type: ignore[arg-type]

    async def raw(self) -> tuple[asyncio.StreamReader, asyncio.StreamWriter]:
        return await asyncio.open_unix_connection(str(self.path))


@pytest.fixture
async def env(sockdir: Path, tmp_path: Path) -> AsyncIterator[Env]:
    mem = MemoryBackend(8 * MiB)
    image = tmp_path / "disk.raw"
    image.write_bytes(bytes(range(256)) * 4096)  # 1 MiB
    ro = MemoryBackend(MiB)
    ro.write(0, b"read-only data")
    server = NbdServer(
        [
            Export("mem", mem, description="RAM disk"),
            Export("ro", ro, read_only=True),
            Export("file", FileBackend(image)),
        ],
        default_export="mem",
        handshake_timeout=5,
    )
    path = sockdir / "nbd.sock"
    address = await server.start(unix_path=path)
    yield Env(server, address, mem, path)
    await server.close()
    for export in server.exports.values():
        export.backend.close()
    assert server.stats.internal_errors == 0


# --- raw-protocol helpers ---------------------------------------------------------------------
async def greet(reader: asyncio.StreamReader, writer: asyncio.StreamWriter, cflags: int = 3) -> int:
    magic, opt, flags = p.GREETING.unpack(await reader.readexactly(18))
    assert (magic, opt) == (p.NBDMAGIC, p.IHAVEOPT)
    writer.write(p.CLIENT_FLAGS.pack(cflags))
    return int(flags)


async def option(
    reader: asyncio.StreamReader, writer: asyncio.StreamWriter, opt: int, data: bytes = b""
) -> list[tuple[int, bytes]]:
    writer.write(p.option_request(opt, data))
    out = []
    while True:
        magic, ropt, kind, length = p.OPTION_REPLY.unpack(await reader.readexactly(20))
        assert magic == p.OPT_REPLY_MAGIC and ropt == opt
        out.append((kind, await reader.readexactly(length)))
        if kind == p.REP_ACK or p.rep_is_error(kind):
            return out


async def go(reader: asyncio.StreamReader, writer: asyncio.StreamWriter, name: str = "mem") -> None:
    await greet(reader, writer)
    replies = await option(reader, writer, p.OPT_GO, p.info_request_data(name))
    assert replies[-1][0] == p.REP_ACK


async def closed(reader: asyncio.StreamReader, timeout: float = 5.0) -> bool:
    """True if the server closed the connection (EOF) within ``timeout``."""
    try:
        async with asyncio.timeout(timeout):
            while await reader.read(65536):
                pass
    except (ConnectionError, TimeoutError):
        return False
    return True


async def simple_reply(reader: asyncio.StreamReader) -> tuple[int, int]:
    magic, error, cookie = p.SIMPLE_REPLY.unpack(await reader.readexactly(16))
    assert magic == p.SIMPLE_REPLY_MAGIC
    return error, cookie


# --- handshake -------------------------------------------------------------------------------
async def test_greeting_advertises_fixed_newstyle_and_no_zeroes(env: Env) -> None:
    reader, writer = await env.raw()
    flags = await greet(reader, writer)
    assert flags == p.FLAG_FIXED_NEWSTYLE | p.FLAG_NO_ZEROES
    writer.close()


async def test_info_reports_size_flags_and_block_sizes(env: Env) -> None:
    c = await NbdClient.open(unix_path=env.path)
    info = await c.info("mem")
    assert info.size == 8 * MiB
    assert info.description == "RAM disk"
    assert info.block_sizes == (1, 4096, p.MAX_PAYLOAD)
    f = info.flags
    for flag in (p.FLAG_HAS_FLAGS, p.FLAG_SEND_FLUSH, p.FLAG_SEND_FUA, p.FLAG_SEND_TRIM):
        assert f & flag
    assert f & p.FLAG_SEND_WRITE_ZEROES and f & p.FLAG_SEND_FAST_ZERO and f & p.FLAG_CAN_MULTI_CONN
    assert not f & p.FLAG_READ_ONLY
    assert not f & p.FLAG_SEND_DF  # structured replies not negotiated yet
    ro = await c.info("ro")
    assert ro.read_only and not ro.flags & (p.FLAG_SEND_TRIM | p.FLAG_SEND_WRITE_ZEROES)
    default = await c.info("")
    assert (default.name, default.size) == ("mem", 8 * MiB)  # INFO_NAME gives the canonical name
    with pytest.raises(NbdReplyError) as exc:
        await c.info("nope")
    assert exc.value.reply == p.REP_ERR_UNKNOWN
    await c.abort()


async def test_list_exports(env: Env) -> None:
    c = await NbdClient.open(unix_path=env.path)
    assert await c.list_exports() == ["mem", "ro", "file"]
    await c.abort()


async def test_export_name_with_and_without_zeroes(env: Env) -> None:
    for cflags, trailer in ((p.FLAG_C_FIXED_NEWSTYLE, 124), (3, 0)):
        reader, writer = await env.raw()
        await greet(reader, writer, cflags)
        writer.write(p.option_request(p.OPT_EXPORT_NAME, b"file"))
        size, flags = p.EXPORT_NAME_REPLY.unpack(await reader.readexactly(10))
        assert size == MiB and flags & p.FLAG_HAS_FLAGS
        assert await reader.readexactly(trailer) == bytes(trailer)
        writer.write(p.request(p.CMD_READ, 256, 4, cookie=9))
        assert await simple_reply(reader) == (0, 9)
        assert await reader.readexactly(4) == bytes([0, 1, 2, 3])
        writer.write(p.request(p.CMD_DISC))
        assert await closed(reader)


async def test_export_name_of_unknown_export_closes(env: Env) -> None:
    reader, writer = await env.raw()
    await greet(reader, writer)
    writer.write(p.option_request(p.OPT_EXPORT_NAME, b"nope"))
    assert await closed(reader)


async def test_unknown_options_get_err_unsup_and_negotiation_continues(env: Env) -> None:
    reader, writer = await env.raw()
    await greet(reader, writer)
    for opt in (p.OPT_STARTTLS, p.OPT_PEEK_EXPORT, p.OPT_EXTENDED_HEADERS, 99, 0xFFFFFFFF):
        replies = await option(reader, writer, opt, b"some data" if opt == 99 else b"")
        assert replies == [(p.REP_ERR_UNSUP, replies[0][1])]
    # options with data they must not have
    for opt in (p.OPT_LIST, p.OPT_STRUCTURED_REPLY):
        assert (await option(reader, writer, opt, b"x"))[-1][0] == p.REP_ERR_INVALID
    # malformed INFO / GO
    for data in (b"", b"\0\0\0\x10abc\0\0", p.info_request_data("mem") + b"extra", b"\0\0\0\2\xff\xfe\0\0"):
        assert (await option(reader, writer, p.OPT_GO, data))[-1][0] == p.REP_ERR_INVALID
    # oversized option data is drained and refused
    writer.write(p.OPTION_HEADER.pack(p.IHAVEOPT, 99, p.MAX_OPTION_DATA + 1) + bytes(p.MAX_OPTION_DATA + 1))
    _, _, kind, length = p.OPTION_REPLY.unpack(await reader.readexactly(20))
    assert kind == p.REP_ERR_TOO_BIG
    await reader.readexactly(length)
    # still alive: GO works
    replies = await option(reader, writer, p.OPT_GO, p.info_request_data("mem"))
    assert replies[-1][0] == p.REP_ACK
    writer.close()


async def test_abort_is_acknowledged(env: Env) -> None:
    reader, writer = await env.raw()
    await greet(reader, writer)
    assert await option(reader, writer, p.OPT_ABORT) == [(p.REP_ACK, b"")]
    assert await closed(reader)


async def test_bad_option_magic_and_unknown_client_flags_close(env: Env) -> None:
    reader, writer = await env.raw()
    await greet(reader, writer)
    writer.write(struct.pack(">QII", 0x1234, p.OPT_LIST, 0))
    assert await closed(reader)
    reader, writer = await env.raw()
    await greet(reader, writer, cflags=0x80)
    assert await closed(reader)


async def test_meta_contexts(env: Env) -> None:
    c = await NbdClient.open(unix_path=env.path)
    # before structured replies: invalid
    with pytest.raises(NbdReplyError) as exc:
        await c.set_meta_context("mem", (p.META_BASE_ALLOCATION,))
    assert exc.value.reply == p.REP_ERR_INVALID
    await c.start_structured_replies()
    assert await c.list_meta_contexts("mem") == [p.META_BASE_ALLOCATION]
    assert await c.list_meta_contexts("mem", ("base:",)) == [p.META_BASE_ALLOCATION]
    assert await c.list_meta_contexts("mem", ("qemu:dirty-bitmap:x",)) == []
    with pytest.raises(NbdReplyError):
        await c.list_meta_contexts("mem", ("nocolon",))
    with pytest.raises(NbdReplyError) as exc:
        await c.set_meta_context("nope", (p.META_BASE_ALLOCATION,))
    assert exc.value.reply == p.REP_ERR_UNKNOWN
    assert await c.set_meta_context("mem", ("base:", "x-foo:bar")) == {}
    contexts = await c.set_meta_context("mem", (p.META_BASE_ALLOCATION,))
    assert list(contexts.values()) == [p.META_BASE_ALLOCATION]
    info = await c.go("mem")
    assert info.flags & p.FLAG_SEND_DF
    await c.write(MiB, b"x" * 4096)
    assert await c.block_status(0, 4 * MiB) == [(MiB, 3), (4096, 0), (3 * MiB - 4096, 3)]
    assert await c.block_status(0, 4 * MiB, req_one=True) == [(MiB, 3)]
    assert await c.block_status(MiB + 100, 10) == [(10, 0)]
    await c.disconnect()


async def test_block_status_needs_a_context_for_the_same_export(env: Env) -> None:
    c = await NbdClient.open(unix_path=env.path)
    await c.start_structured_replies()
    await c.set_meta_context("file", (p.META_BASE_ALLOCATION,))
    await c.go("mem")  # contexts were set for another export
    with pytest.raises(NbdReplyError) as exc:
        await c.block_status(0, 4096)
    assert exc.value.nbd_errno == p.EINVAL
    await c.disconnect()


# --- transmission ----------------------------------------------------------------------------
@pytest.mark.parametrize("structured", [False, True])
async def test_read_write_flush_trim_zero(env: Env, structured: bool) -> None:
    async with await env.client(structured=structured) as c:
        data = bytes(range(256)) * 64
        await c.write(12345, data)
        await c.write(7 * MiB + 600_000, data, fua=True)
        await c.flush()
        assert await c.read(12345, len(data)) == data
        assert await c.read(12345 + 10, 10) == data[10:20]
        assert await c.read(0, 0) == b""
        big = bytes([7]) * (3 * MiB)  # bigger than the server's initial buffers
        await c.write(4 * MiB, big)
        assert await c.read(4 * MiB, 3 * MiB) == big
        await c.zero(12345, 100)
        assert await c.read(12345, 200) == bytes(100) + data[100:200]
        await c.zero(0, MiB, no_hole=True)
        await c.zero(MiB, MiB, fast=True)
        await c.trim(4 * MiB, MiB)
        await c.cache(0, MiB)
    assert env.mem.read(7 * MiB + 600_000, len(data)) == data


async def test_file_export_uses_sendfile_for_large_reads(env: Env) -> None:
    async with await env.client("file") as c:
        expect = bytes(range(256)) * 4096
        assert await c.read(0, MiB) == expect  # above sendfile_min
        assert await c.read(1000, 300_000) == expect[1000:301_000]
        await c.write(0, b"\xff" * 200_000)
        assert await c.read(0, 200_001) == b"\xff" * 200_000 + expect[200_000:200_001]


async def test_errors_are_replies_and_the_connection_survives(env: Env) -> None:
    async with await env.client() as c:
        size = 8 * MiB
        cases = [
            (p.CMD_READ, size - 10, 11, 0, p.EINVAL),
            (p.CMD_READ, 2**64 - 1, 1, 0, p.EINVAL),
            (p.CMD_READ, 0, p.MAX_PAYLOAD + 1, 0, p.EINVAL),
            (p.CMD_READ, 0, 10, 1 << 7, p.EINVAL),  # unknown flag
            (p.CMD_TRIM, size, 1, 0, p.EINVAL),
            (p.CMD_WRITE_ZEROES, size - 1, 2, 0, p.ENOSPC),
            (p.CMD_WRITE_ZEROES, 0, 1, p.CMD_FLAG_REQ_ONE, p.EINVAL),
            (p.CMD_BLOCK_STATUS, 0, 0, 0, p.EINVAL),
            (p.CMD_BLOCK_STATUS, size, 1, 0, p.EINVAL),
            (p.CMD_CACHE, size, 1, 0, p.EINVAL),
            (p.CMD_FLUSH, 0, 0, p.CMD_FLAG_DF, p.EINVAL),
            (p.CMD_RESIZE, 0, 0, 0, p.EINVAL),
            (42, 0, 0, 0, p.EINVAL),
            (0xFFFF, 1, 1, 0xFFFF, p.EINVAL),
        ]
        for cmd, offset, length, flags, expected in cases:
            reply = await c.request(cmd, offset, length, flags=flags)
            assert reply.error == expected, (cmd, offset, length, flags)
            assert reply.message
        # a write past the end: its payload is consumed, the error is ENOSPC
        reply = await c.request(p.CMD_WRITE, size - 2, 4, b"abcd")
        assert reply.error == p.ENOSPC
        assert await c.read(size - 4, 4) == bytes(4)
        await c.write(size - 4, b"last")
        assert await c.read(size - 4, 4) == b"last"


async def test_read_only_export_refuses_writes(env: Env) -> None:
    async with await env.client("ro") as c:
        assert c.export is not None and c.export.read_only
        assert await c.read(0, 14) == b"read-only data"
        for cmd, data in ((p.CMD_WRITE, b"xx"), (p.CMD_TRIM, b""), (p.CMD_WRITE_ZEROES, b"")):
            reply = await c.request(cmd, 0, 2, data)
            assert reply.error == p.EPERM
        await c.flush()
        assert await c.read(0, 14) == b"read-only data"


async def test_bad_request_magic_closes_only_that_connection(env: Env) -> None:
    good = await env.client()
    reader, writer = await env.raw()
    await go(reader, writer)
    writer.write(struct.pack(">IHHQQI", 0xDEADBEEF, 0, 0, 1, 0, 10))
    assert await closed(reader)
    await good.write(0, b"still fine")
    assert await good.read(0, 10) == b"still fine"
    await good.disconnect()


async def test_oversize_write_closes_without_writing(env: Env) -> None:
    reader, writer = await env.raw()
    await go(reader, writer)
    writer.write(p.request(p.CMD_WRITE, 0, p.MAX_PAYLOAD + 1) + b"\xff" * 4096)
    assert await closed(reader)
    assert env.mem.read(0, 4096) == bytes(4096)


async def test_disconnect_mid_request_writes_nothing(env: Env) -> None:
    for cut in (5, 27, 28, 28 + 1000):
        reader, writer = await env.raw()
        await go(reader, writer)
        msg = p.request(p.CMD_WRITE, 0, 4096, cookie=1) + b"\xee" * 4096
        writer.write(msg[:cut])
        await writer.drain()
        writer.close()
        await writer.wait_closed()
    await asyncio.sleep(0.05)
    assert env.mem.read(0, 4096) == bytes(4096)
    assert env.server.connection_count == 0


async def test_pipelined_requests_in_one_send(env: Env) -> None:
    reader, writer = await env.raw()
    await go(reader, writer)
    batch = b"".join(
        p.request(p.CMD_WRITE, i * 512, 512, cookie=100 + i) + bytes([i]) * 512 for i in range(50)
    ) + b"".join(p.request(p.CMD_READ, i * 512, 512, cookie=200 + i) for i in range(50))
    writer.write(batch + p.request(p.CMD_DISC))
    for i in range(50):
        assert await simple_reply(reader) == (0, 100 + i)
    for i in range(50):
        assert await simple_reply(reader) == (0, 200 + i)
        assert await reader.readexactly(512) == bytes([i]) * 512
    assert await closed(reader)


async def test_backpressure_when_the_client_does_not_read(env: Env) -> None:
    """A client pipelines 64 MiB of reads without reading: the server stops reading, then resumes."""
    reader, writer = await env.raw()
    await go(reader, writer)
    n = 64
    writer.write(b"".join(p.request(p.CMD_READ, 0, MiB, cookie=i) for i in range(n)))
    await writer.drain()
    await asyncio.sleep(0.2)
    for i in range(n):
        assert await simple_reply(reader) == (0, i)
        await reader.readexactly(MiB)
    writer.write(p.request(p.CMD_DISC))
    assert await closed(reader)


async def test_several_clients_share_one_export(env: Env) -> None:
    clients = [await env.client() for _ in range(4)]
    assert all(c.export is not None and c.export.multi_conn for c in clients)

    async def work(i: int, c: NbdClient) -> None:
        for j in range(20):
            await c.write((i * 20 + j) * 4096, bytes([i + 1]) * 4096)

    await asyncio.gather(*(work(i, c) for i, c in enumerate(clients)))
    await clients[0].flush()
    for i in range(4):
        assert await clients[(i + 1) % 4].read(i * 20 * 4096, 4096) == bytes([i + 1]) * 4096
    for c in clients:
        await c.disconnect()


async def test_handshake_timeout(sockdir: Path) -> None:
    server = NbdServer([Export("", MemoryBackend(4096))], handshake_timeout=0.2)
    await server.start(unix_path=sockdir / "s")
    reader, _writer = await asyncio.open_unix_connection(str(sockdir / "s"))
    await reader.readexactly(18)
    assert await closed(reader, timeout=3)
    await server.close()


async def test_close_with_connected_clients(sockdir: Path) -> None:
    server = NbdServer(MemoryBackend(MiB))
    await server.start(unix_path=sockdir / "s")
    c = await NbdClient.connect(unix_path=sockdir / "s")
    half = await NbdClient.open(unix_path=sockdir / "s")  # still negotiating
    await c.write(0, b"x")
    started = time.monotonic()
    await server.close()
    assert time.monotonic() - started < 3
    assert not (sockdir / "s").exists()
    with pytest.raises((NbdProtocolError, ConnectionError)):
        await c.read(0, 1)
    with pytest.raises((NbdProtocolError, ConnectionError)):
        await half.list_exports()


async def test_tcp_listener(sockdir: Path) -> None:
    async with NbdServer(MemoryBackend(MiB)) as server:
        address = await server.start(host="127.0.0.1", port=0)
        assert address.port and address.uri("a b") == f"nbd://127.0.0.1:{address.port}/a%20b"
        c = await NbdClient.connect(host="127.0.0.1", port=address.port)
        await c.write(0, b"tcp")
        assert await c.read(0, 3) == b"tcp"
        await c.disconnect()


async def test_handle_connection_on_a_socketpair() -> None:
    server = NbdServer(MemoryBackend(MiB))
    mine, theirs = socket.socketpair()
    task = asyncio.create_task(server.handle_connection(theirs))
    reader, writer = await asyncio.open_connection(sock=mine)
    await go(reader, writer, "")
    writer.write(p.request(p.CMD_WRITE, 0, 3, cookie=1) + b"abc" + p.request(p.CMD_READ, 0, 3, cookie=2))
    assert await simple_reply(reader) == (0, 1)
    assert await simple_reply(reader) == (0, 2)
    assert await reader.readexactly(3) == b"abc"
    writer.write(p.request(p.CMD_DISC))
    await asyncio.wait_for(task, 5)
    writer.close()
    await server.close()


async def test_address_in_use_and_stale_socket(sockdir: Path) -> None:
    path = sockdir / "s"
    stale = socket.socket(socket.AF_UNIX)
    stale.bind(str(path))
    stale.close()  # a socket file nobody listens on: replaced
    first = NbdServer(MemoryBackend(4096))
    await first.start(unix_path=path)
    second = NbdServer(MemoryBackend(4096))
    with pytest.raises(NbdAddressInUseError):
        await second.start(unix_path=path)
    (sockdir / "plain").write_text("x")
    with pytest.raises(NbdAddressInUseError):
        await second.start(unix_path=sockdir / "plain")
    with pytest.raises(ConfigError):
        await second.start(unix_path=sockdir / "x", port=0)
    await first.close()


async def test_unix_sockets_are_private_and_the_default_address_is_one(
    sockdir: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("VMKIT_HOME", str(sockdir / "home"))
    async with NbdServer(MemoryBackend(4096)) as server:
        address = await server.start()  # no address: a unix socket in vmkit's private run dir
        assert address.unix_path == sockdir / "home" / "run" / "nbd.sock"
        assert stat.S_IMODE(address.unix_path.stat().st_mode) == 0o600
        assert stat.S_IMODE(address.unix_path.parent.stat().st_mode) == 0o700
        async with await NbdClient.connect(unix_path=address.unix_path) as c:
            await c.write(0, b"x")
    assert not address.unix_path.exists()
    async with NbdServer(MemoryBackend(4096)) as server:
        address = await server.start(unix_path=sockdir / "shared", unix_mode=0o660)
        assert stat.S_IMODE((sockdir / "shared").stat().st_mode) == 0o660
    assert sorted(p.name for p in sockdir.iterdir()) == ["home"]  # no temporary names left


async def test_export_management() -> None:
    server = NbdServer()
    mem = MemoryBackend(4096)
    server.add_export(Export("a", mem))
    with pytest.raises(ConfigError):
        server.add_export(Export("a", mem))
    with pytest.raises(ConfigError):
        Export("x\0y", mem)
    assert server.lookup("") is not None  # a single export is the default
    server.add_export(Export("b", mem))
    assert server.lookup("") is None
    assert server.remove_export("a").name == "a"
    assert list(server.exports) == ["b"]


class SlowBackend(Backend):
    """A non-inline backend (called from threads) that fails on request."""

    def __init__(self) -> None:
        self.mem = bytearray(MiB)
        self.lock = threading.Lock()

    @property
    def size(self) -> int:
        return len(self.mem)

    @property
    def capabilities(self) -> Capabilities:
        return Capabilities(inline=False, block_status=True, trim=True)

    def read_into(self, offset: int, buf: memoryview) -> None:
        if offset == 13:
            raise OSError(28, "disk full (simulated)")
        time.sleep(0.01 if offset == 0 else 0)
        with self.lock:
            buf[:] = self.mem[offset : offset + len(buf)]

    def write(self, offset: int, data: bytes | bytearray | memoryview, *, fua: bool = False) -> None:
        with self.lock:
            self.mem[offset : offset + len(data)] = data

    def block_status(self, offset: int, length: int) -> list[tuple[int, int]]:
        return [(length, 0)]


async def test_threaded_backend_replies_out_of_order(sockdir: Path) -> None:
    server = NbdServer(Export("", SlowBackend()))
    await server.start(unix_path=sockdir / "s")
    reader, writer = await asyncio.open_unix_connection(str(sockdir / "s"))
    await go(reader, writer, "")
    writer.write(p.request(p.CMD_WRITE, 0, 4, cookie=1) + b"slow")
    assert await simple_reply(reader) == (0, 1)
    writer.write(p.request(p.CMD_READ, 0, 4, cookie=2) + p.request(p.CMD_READ, 1, 3, cookie=3))
    first = await simple_reply(reader)
    assert first == (0, 3)  # the fast read overtakes the slow one
    assert await reader.readexactly(3) == b"low"
    assert await simple_reply(reader) == (0, 2)
    assert await reader.readexactly(4) == b"slow"
    writer.write(p.request(p.CMD_READ, 13, 1, cookie=4))
    assert await simple_reply(reader) == (p.ENOSPC, 4)
    writer.write(p.request(p.CMD_FLUSH, cookie=5) + p.request(p.CMD_DISC))
    assert await simple_reply(reader) == (0, 5)
    assert await closed(reader)
    await server.close()


class BuggyBackend(MemoryBackend):
    def read_into(self, offset: int, buf: memoryview) -> None:
        if offset == 512:
            raise ZeroDivisionError("a bug")
        super().read_into(offset, buf)


async def test_a_backend_bug_is_an_eio_reply_and_logged(sockdir: Path, caplog: pytest.LogCaptureFixture) -> None:
    server = NbdServer(BuggyBackend(MiB))
    await server.start(unix_path=sockdir / "s")
    async with await NbdClient.connect(unix_path=sockdir / "s") as c:
        with caplog.at_level(logging.ERROR, logger="vmkit.nbd"):
            reply = await c.request(p.CMD_READ, 512, 10)
        assert reply.error == p.EIO
        assert await c.read(0, 10) == bytes(10)
    assert server.stats.internal_errors == 1
    assert any("unexpectedly" in r.message for r in caplog.records)
    await server.close()


async def test_serve_forever_returns_after_close(sockdir: Path) -> None:
    server = NbdServer(MemoryBackend(4096))
    await server.start(unix_path=sockdir / "s")
    waiter = asyncio.create_task(server.serve_forever())
    await asyncio.sleep(0)
    await server.close()
    await asyncio.wait_for(waiter, 2)
    with contextlib.suppress(Exception):
        await server.close()  # idempotent


def _sync_client_reads(path: Path, structured: bool, expect: bytes, count: int, depth: int) -> int:
    """A blocking client in another thread: ``depth`` 1 MiB reads in flight, ``count`` in all."""
    s = socket.socket(socket.AF_UNIX)
    s.settimeout(10)
    s.connect(str(path))
    f = s.makefile("rb")

    def opt(code: int, data: bytes = b"") -> None:
        s.sendall(p.option_request(code, data))
        while True:
            _, _, kind, length = p.OPTION_REPLY.unpack(f.read(20))
            f.read(length)
            if kind == p.REP_ACK:
                return
            assert not p.rep_is_error(kind)

    f.read(18)
    s.sendall(p.CLIENT_FLAGS.pack(3))
    if structured:
        opt(p.OPT_STRUCTURED_REPLY)
    opt(p.OPT_GO, p.info_request_data(""))
    offsets = [(i * 7919 * 4096) % (len(expect) - MiB) for i in range(count)]
    sent = done = 0
    while done < count:
        while sent < count and sent - done < depth:
            s.sendall(p.request(p.CMD_READ, offsets[sent], MiB, cookie=sent))
            sent += 1
        hdr = f.read(28 if structured else 16)
        cookie = struct.unpack_from(">Q", hdr, 8)[0]
        data = f.read(MiB)
        assert data == expect[offsets[cookie] : offsets[cookie] + MiB], cookie
        done += 1
    s.sendall(p.request(p.CMD_DISC))
    s.close()
    return done


@pytest.mark.parametrize("sendfile_min", [0, 4096])
@pytest.mark.parametrize("structured", [False, True])
async def test_pipelined_large_reads_from_a_thread(sockdir: Path, sendfile_min: int, structured: bool) -> None:
    """Replies bigger than the output arena, with the client reading concurrently (back-pressure)."""
    mem = MemoryBackend(8 * MiB)
    expect = bytes(range(251)) * (8 * MiB // 251) + bytes(8 * MiB % 251)
    mem.write(0, expect)
    server = NbdServer(mem, sendfile_min=sendfile_min)
    await server.start(unix_path=sockdir / "s")
    done = await asyncio.wait_for(asyncio.to_thread(_sync_client_reads, sockdir / "s", structured, expect, 400, 8), 60)
    assert done == 400
    await server.close()
    mem.close()


async def test_serve_async_until_stopped(sockdir: Path) -> None:
    from vmkit.nbd import serve_async

    stop = asyncio.Event()
    ready: list[NbdAddress] = []
    mem = MemoryBackend(MiB)
    task = asyncio.create_task(serve_async(Export("m", mem), unix_path=sockdir / "s", on_ready=ready.append, stop=stop))
    while not ready:
        await asyncio.sleep(0.01)
    assert ready[0].uri("m") == f"nbd+unix:///m?socket={sockdir / 's'}"
    async with await NbdClient.connect(unix_path=sockdir / "s", export="m") as c:
        await c.write(0, b"hi")
    stop.set()
    await asyncio.wait_for(task, 5)
    assert not (sockdir / "s").exists()
    assert mem.read(0, 2) == b"hi"
    mem.close()


class CountingFile(FileBackend):
    flushes = 0

    def flush(self) -> None:
        type(self).flushes += 1
        super().flush()


async def test_fua_and_flush_reach_durable_backends_only(sockdir: Path, tmp_path: Path) -> None:
    image = tmp_path / "d.raw"
    image.write_bytes(bytes(MiB))
    durable = CountingFile(image)
    server = NbdServer([Export("file", durable), Export("mem", MemoryBackend(MiB))])
    await server.start(unix_path=sockdir / "s")
    async with await NbdClient.connect(unix_path=sockdir / "s", export="file") as c:
        await c.write(0, b"a")
        assert CountingFile.flushes == 0
        await c.write(0, b"b", fua=True)  # replied only after a flush
        assert CountingFile.flushes == 1
        assert (await c.request(p.CMD_WRITE_ZEROES, 0, 10, flags=p.CMD_FLAG_FUA)).error == 0
        assert (await c.request(p.CMD_TRIM, 4096, 4096, flags=p.CMD_FLAG_FUA)).error == 0
        assert CountingFile.flushes == 3
        await c.flush()
        assert CountingFile.flushes == 4
    async with await NbdClient.connect(unix_path=sockdir / "s", export="mem") as c:
        await c.write(0, b"x", fua=True)
        await c.flush()
    assert CountingFile.flushes == 4  # the RAM disk is volatile: nothing to flush
    await server.close()
    durable.close()
