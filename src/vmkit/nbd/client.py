"""A small asyncio NBD client: health checks, tests, and scripts that poke at an export.

It speaks the fixed newstyle handshake (GO, or EXPORT_NAME when asked), structured replies and
the ``base:allocation`` meta context, one request at a time. It is not meant to be fast; QEMU
and libnbd are the real clients.

    async with await NbdClient.connect(unix_path="nbd.sock", export="disk") as c:
        data = await c.read(0, 4096)
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import socket
import ssl
import struct
from dataclasses import dataclass, field

from vmkit.nbd import protocol as p
from vmkit.nbd.errors import NbdProtocolError, NbdReplyError


@dataclass(frozen=True)
class ExportInfo:
    name: str
    size: int
    flags: int
    description: str = ""
    block_sizes: tuple[int, int, int] | None = None

    @property
    def read_only(self) -> bool:
        return bool(self.flags & p.FLAG_READ_ONLY)

    @property
    def multi_conn(self) -> bool:
        return bool(self.flags & p.FLAG_CAN_MULTI_CONN)


@dataclass
class OptionReply:
    kind: int
    data: bytes

    @property
    def is_error(self) -> bool:
        return p.rep_is_error(self.kind)


@dataclass
class Reply:
    """The full answer to one request: error (0 = success), READ data, block status extents."""

    error: int = 0
    message: str = ""
    data: bytearray = field(default_factory=bytearray)
    extents: list[tuple[int, int]] = field(default_factory=list)
    chunks: int = 0


class NbdClient:
    def __init__(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self._r = reader
        self._w = writer
        self.server_flags = 0
        self.structured = False
        self.contexts: dict[int, str] = {}
        self.export: ExportInfo | None = None
        self._cookie = 0
        self._no_zeroes = False

    # --- connecting -----------------------------------------------------------------------
    @classmethod
    async def open(
        cls,
        *,
        unix_path: str | os.PathLike[str] | None = None,
        host: str | None = None,
        port: int | None = None,
        sock: socket.socket | None = None,
        no_zeroes: bool = True,
        tls: ssl.SSLContext | None = None,
        server_hostname: str | None = None,
    ) -> NbdClient:
        """Connect (or use a connected ``sock``) and do the greeting; then options or :meth:`go`.

        With ``tls`` (e.g. :func:`vmkit.nbd.tls.client_context`), upgrade with NBD_OPT_STARTTLS
        first; the certificate must match ``server_hostname`` (default: ``host``, else localhost).
        """
        if sock is not None:
            reader, writer = await asyncio.open_connection(sock=sock)
        elif unix_path is not None:
            reader, writer = await asyncio.open_unix_connection(os.fspath(unix_path))
        else:
            reader, writer = await asyncio.open_connection(host or "localhost", port or 10809)
        client = cls(reader, writer)
        try:
            await client._greet(no_zeroes)
            if tls is not None:
                await client.start_tls(tls, server_hostname or host or "localhost")
        except BaseException:
            writer.close()
            raise
        return client

    @classmethod
    async def connect(
        cls,
        *,
        unix_path: str | os.PathLike[str] | None = None,
        host: str | None = None,
        port: int | None = None,
        sock: socket.socket | None = None,
        export: str = "",
        structured: bool = True,
        meta_contexts: tuple[str, ...] = (p.META_BASE_ALLOCATION,),
        use_go: bool = True,
        tls: ssl.SSLContext | None = None,
        server_hostname: str | None = None,
    ) -> NbdClient:
        """Connect, negotiate, and enter transmission on ``export``."""
        client = await cls.open(
            unix_path=unix_path, host=host, port=port, sock=sock, tls=tls, server_hostname=server_hostname
        )
        try:
            if structured:
                await client.start_structured_replies()
                if meta_contexts:
                    await client.set_meta_context(export, meta_contexts)
            if use_go:
                await client.go(export)
            else:
                await client.export_name(export)
        except BaseException:
            client.close()
            raise
        return client

    async def _greet(self, no_zeroes: bool) -> None:
        magic, opt_magic, flags = p.GREETING.unpack(await self._recv(p.GREETING.size))
        if magic != p.NBDMAGIC or opt_magic != p.IHAVEOPT:
            raise NbdProtocolError("not a fixed newstyle NBD server")
        self.server_flags = flags
        cflags = p.FLAG_C_FIXED_NEWSTYLE
        if no_zeroes and flags & p.FLAG_NO_ZEROES:
            cflags |= p.FLAG_C_NO_ZEROES
        self._w.write(p.CLIENT_FLAGS.pack(cflags))
        self._no_zeroes = bool(cflags & p.FLAG_C_NO_ZEROES)

    async def _recv(self, n: int) -> bytes:
        try:
            return await self._r.readexactly(n)
        except asyncio.IncompleteReadError as exc:
            raise NbdProtocolError("the server closed the connection") from exc

    # --- options --------------------------------------------------------------------------
    async def option(self, opt: int, data: bytes = b"") -> list[OptionReply]:
        """Send one option; return every reply up to and including the final one."""
        self._w.write(p.option_request(opt, data))
        await self._w.drain()
        replies: list[OptionReply] = []
        while True:
            magic, ropt, kind, length = p.OPTION_REPLY.unpack(await self._recv(p.OPTION_REPLY.size))
            if magic != p.OPT_REPLY_MAGIC or ropt != opt:
                raise NbdProtocolError(f"bad option reply (magic {magic:#x}, option {ropt})")
            reply = OptionReply(kind, await self._recv(length))
            replies.append(reply)
            if kind == p.REP_ACK or reply.is_error:
                return replies

    @staticmethod
    def _check(opt: int, replies: list[OptionReply]) -> None:
        last = replies[-1]
        if last.is_error:
            name = p.REP_NAMES.get(last.kind, hex(last.kind))
            text = last.data.decode(errors="replace")
            raise NbdReplyError(
                f"option {p.OPT_NAMES.get(opt, opt)} failed: {name}{': ' + text if text else ''}",
                reply=last.kind,
            )

    async def start_tls(self, ctx: ssl.SSLContext, server_hostname: str | None = "localhost") -> None:
        """NBD_OPT_STARTTLS, then the TLS handshake on this connection."""
        replies = await self.option(p.OPT_STARTTLS)
        self._check(p.OPT_STARTTLS, replies)
        await self._w.start_tls(ctx, server_hostname=server_hostname if ctx.check_hostname else None)

    async def start_structured_replies(self) -> None:
        replies = await self.option(p.OPT_STRUCTURED_REPLY)
        self._check(p.OPT_STRUCTURED_REPLY, replies)
        self.structured = True

    async def list_exports(self) -> list[str]:
        replies = await self.option(p.OPT_LIST)
        self._check(p.OPT_LIST, replies)
        names = []
        for r in replies[:-1]:
            (n,) = p.U32.unpack_from(r.data, 0)
            names.append(r.data[4 : 4 + n].decode())
        return names

    async def set_meta_context(self, export: str, queries: tuple[str, ...]) -> dict[int, str]:
        replies = await self.option(p.OPT_SET_META_CONTEXT, p.meta_context_data(export, queries))
        self._check(p.OPT_SET_META_CONTEXT, replies)
        self.contexts = {p.U32.unpack_from(r.data, 0)[0]: r.data[4:].decode() for r in replies[:-1]}
        return self.contexts

    async def list_meta_contexts(self, export: str, queries: tuple[str, ...] = ()) -> list[str]:
        replies = await self.option(p.OPT_LIST_META_CONTEXT, p.meta_context_data(export, queries))
        self._check(p.OPT_LIST_META_CONTEXT, replies)
        return [r.data[4:].decode() for r in replies[:-1]]

    async def info(self, export: str = "", *, go: bool = False) -> ExportInfo:
        """NBD_OPT_INFO (or GO, which enters transmission)."""
        opt = p.OPT_GO if go else p.OPT_INFO
        requests = (p.INFO_NAME, p.INFO_DESCRIPTION, p.INFO_BLOCK_SIZE)
        replies = await self.option(opt, p.info_request_data(export, requests))
        self._check(opt, replies)
        size = flags = -1
        name, description, sizes = export, "", None
        for r in replies[:-1]:
            if r.kind != p.REP_INFO or len(r.data) < 2:
                continue
            (kind,) = p.U16.unpack_from(r.data, 0)
            if kind == p.INFO_EXPORT:
                _, size, flags = p.INFO_EXPORT_PAYLOAD.unpack(r.data)
            elif kind == p.INFO_NAME:
                name = r.data[2:].decode()
            elif kind == p.INFO_DESCRIPTION:
                description = r.data[2:].decode()
            elif kind == p.INFO_BLOCK_SIZE:
                _, a, b, c = p.INFO_BLOCK_SIZE_PAYLOAD.unpack(r.data)
                sizes = (a, b, c)
        if size < 0:
            raise NbdProtocolError("the server acknowledged INFO/GO without NBD_INFO_EXPORT")
        return ExportInfo(name, size, flags, description, sizes)

    async def go(self, export: str = "") -> ExportInfo:
        self.export = await self.info(export, go=True)
        return self.export

    async def export_name(self, export: str = "") -> ExportInfo:
        self._w.write(p.option_request(p.OPT_EXPORT_NAME, export.encode()))
        await self._w.drain()
        size, flags = p.EXPORT_NAME_REPLY.unpack(await self._recv(p.EXPORT_NAME_REPLY.size))
        if not self._no_zeroes:
            await self._recv(p.EXPORT_NAME_ZEROES)
        self.export = ExportInfo(export, size, flags)
        return self.export

    async def abort(self) -> None:
        with contextlib.suppress(NbdProtocolError, ConnectionError):
            await self.option(p.OPT_ABORT)
        self.close()

    # --- transmission ---------------------------------------------------------------------
    async def request(self, cmd: int, offset: int = 0, length: int = 0, data: bytes = b"", *, flags: int = 0) -> Reply:
        """Send one request and read its whole reply (no exception for error replies)."""
        self._cookie += 1
        cookie = self._cookie
        self._w.write(p.request(cmd, offset, length, cookie=cookie, flags=flags) + data)
        await self._w.drain()
        return await self._read_reply(cookie, cmd, offset, length)

    async def _read_reply(self, cookie: int, cmd: int, offset: int, length: int) -> Reply:
        reply = Reply()
        (magic,) = p.U32.unpack(await self._recv(4))
        if magic == p.SIMPLE_REPLY_MAGIC:
            error, rcookie = struct.unpack(">IQ", await self._recv(12))
            if rcookie != cookie:
                raise NbdProtocolError(f"reply for cookie {rcookie}, expected {cookie}")
            reply.error = error
            if cmd == p.CMD_READ and not error:
                reply.data = bytearray(await self._recv(length))
            return reply
        if magic != p.STRUCTURED_REPLY_MAGIC:
            raise NbdProtocolError(f"bad reply magic {magic:#x}")
        if cmd == p.CMD_READ:
            reply.data = bytearray(length)
        while True:
            rflags, kind, rcookie, plen = struct.unpack(">HHQI", await self._recv(16))
            payload = await self._recv(plen)
            if rcookie != cookie:
                raise NbdProtocolError(f"reply for cookie {rcookie}, expected {cookie}")
            reply.chunks += 1
            if p.reply_type_is_error(kind):
                error, mlen = struct.unpack_from(">IH", payload, 0)
                reply.error = error
                reply.message = payload[6 : 6 + mlen].decode(errors="replace")
            elif kind == p.REPLY_TYPE_OFFSET_DATA:
                (off,) = p.U64.unpack_from(payload, 0)
                chunk = payload[8:]
                rel = off - offset
                if rel < 0 or rel + len(chunk) > length:
                    raise NbdProtocolError("data chunk outside the request")
                reply.data[rel : rel + len(chunk)] = chunk
            elif kind == p.REPLY_TYPE_OFFSET_HOLE:
                off, hole = struct.unpack(">QI", payload)
                rel = off - offset
                if rel < 0 or rel + hole > length:
                    raise NbdProtocolError("hole chunk outside the request")
                reply.data[rel : rel + hole] = bytes(hole)
            elif kind == p.REPLY_TYPE_BLOCK_STATUS:
                words = struct.unpack(f">{(plen - 4) // 4}I", payload[4:])
                reply.extents += list(zip(words[::2], words[1::2], strict=True))
            elif kind != p.REPLY_TYPE_NONE:
                raise NbdProtocolError(f"unknown reply chunk type {kind}")
            if rflags & p.REPLY_FLAG_DONE:
                return reply
            # loop: read the next chunk's magic
            (magic,) = p.U32.unpack(await self._recv(4))
            if magic != p.STRUCTURED_REPLY_MAGIC:
                raise NbdProtocolError(f"bad reply magic {magic:#x}")

    @staticmethod
    def _raise(what: str, reply: Reply) -> None:
        if reply.error:
            name = p.ERROR_NAMES.get(reply.error, str(reply.error))
            raise NbdReplyError(
                f"{what} failed: {name}{': ' + reply.message if reply.message else ''}",
                nbd_errno=reply.error,
            )

    async def read(self, offset: int, length: int, *, flags: int = 0) -> bytes:
        reply = await self.request(p.CMD_READ, offset, length, flags=flags)
        self._raise("READ", reply)
        return bytes(reply.data)

    async def write(self, offset: int, data: bytes, *, fua: bool = False) -> None:
        reply = await self.request(p.CMD_WRITE, offset, len(data), data, flags=p.CMD_FLAG_FUA if fua else 0)
        self._raise("WRITE", reply)

    async def flush(self) -> None:
        self._raise("FLUSH", await self.request(p.CMD_FLUSH))

    async def trim(self, offset: int, length: int) -> None:
        self._raise("TRIM", await self.request(p.CMD_TRIM, offset, length))

    async def cache(self, offset: int, length: int) -> None:
        self._raise("CACHE", await self.request(p.CMD_CACHE, offset, length))

    async def zero(self, offset: int, length: int, *, no_hole: bool = False, fast: bool = False) -> None:
        flags = (p.CMD_FLAG_NO_HOLE if no_hole else 0) | (p.CMD_FLAG_FAST_ZERO if fast else 0)
        self._raise("WRITE_ZEROES", await self.request(p.CMD_WRITE_ZEROES, offset, length, flags=flags))

    async def block_status(self, offset: int, length: int, *, req_one: bool = False) -> list[tuple[int, int]]:
        flags = p.CMD_FLAG_REQ_ONE if req_one else 0
        reply = await self.request(p.CMD_BLOCK_STATUS, offset, length, flags=flags)
        self._raise("BLOCK_STATUS", reply)
        return reply.extents

    async def disconnect(self) -> None:
        with contextlib.suppress(ConnectionError):
            self._w.write(p.request(p.CMD_DISC))
            await self._w.drain()
        self.close()

    def close(self) -> None:
        self._w.close()

    async def wait_closed(self) -> None:
        with contextlib.suppress(ConnectionError):
            await self._w.wait_closed()

    async def __aenter__(self) -> NbdClient:
        return self

    async def __aexit__(self, *exc: object) -> None:
        if not self._w.is_closing():
            await self.disconnect()
        await self.wait_closed()
