"""NBD over TLS (NBD_OPT_STARTTLS) with vmkit's server and client, and the credentials helper.

Real clients (qemu-img, qemu-io, nbdinfo) are in tests/integration/test_nbd_clients.py.
"""

from __future__ import annotations

import asyncio
import shutil
import ssl
import stat
import tempfile
from collections.abc import AsyncIterator, Iterator
from pathlib import Path

import pytest

from vmkit.errors import ConfigError, NotFoundError
from vmkit.nbd import Export, MemoryBackend, NbdClient, NbdReplyError, NbdServer
from vmkit.nbd import protocol as p
from vmkit.nbd import tls as nbd_tls
from vmkit.nbd.errors import NbdProtocolError

MiB = 1 << 20


@pytest.fixture(scope="module")
def creds() -> Iterator[Path]:
    path = Path(tempfile.mkdtemp(prefix="nbd-tls-", dir="/tmp")) / "creds"
    nbd_tls.generate_credentials(path)
    yield path
    shutil.rmtree(path.parent, ignore_errors=True)


@pytest.fixture
async def tls_server(creds: Path) -> AsyncIterator[tuple[NbdServer, int]]:
    server = NbdServer(Export("disk", MemoryBackend(4 * MiB)), tls=nbd_tls.server_context(creds))
    address = await server.start(host="127.0.0.1", port=0)
    assert address.tls and address.uri("disk") == f"nbds://127.0.0.1:{address.port}/disk"
    assert address.port is not None
    yield server, address.port
    await server.close()
    assert server.stats.internal_errors == 0


def test_credentials_layout_and_modes(creds: Path) -> None:
    names = sorted(f.name for f in creds.iterdir())
    assert names == ["ca-cert.pem", "client-cert.pem", "client-key.pem", "server-cert.pem", "server-key.pem"]
    assert stat.S_IMODE(creds.stat().st_mode) == 0o700
    for key in ("server-key.pem", "client-key.pem"):
        assert stat.S_IMODE((creds / key).stat().st_mode) == 0o600
    with pytest.raises(ConfigError, match="already has"):
        nbd_tls.generate_credentials(creds)  # never overwritten
    with pytest.raises(NotFoundError, match=r"server-cert\.pem"):
        nbd_tls.server_context(creds.parent)


async def test_tls_read_write(tls_server: tuple[NbdServer, int], creds: Path) -> None:
    server, port = tls_server
    ctx = nbd_tls.client_context(creds)
    async with await NbdClient.connect(host="127.0.0.1", port=port, export="disk", tls=ctx) as c:
        data = bytes(range(256)) * 4096  # 1 MiB through the TLS bridge, both ways
        await c.write(4096, data)
        assert await c.read(4096, len(data)) == data
        assert c.structured  # negotiated inside TLS
        assert await c.block_status(0, MiB)
    for _ in range(100):
        if server.connection_count == 0:
            break
        await asyncio.sleep(0.02)
    assert server.connection_count == 0


async def test_tls_required_refuses_everything_before_starttls(tls_server: tuple[NbdServer, int]) -> None:
    _server, port = tls_server
    c = await NbdClient.open(host="127.0.0.1", port=port)
    for opt, data in (
        (p.OPT_LIST, b""),
        (p.OPT_STRUCTURED_REPLY, b""),
        (p.OPT_INFO, p.info_request_data("disk")),
        (p.OPT_GO, p.info_request_data("disk")),
    ):
        replies = await c.option(opt, data)
        assert replies[-1].kind == p.REP_ERR_TLS_REQD, p.OPT_NAMES[opt]
    with pytest.raises(NbdReplyError, match="ERR_INVALID"):
        c._check(p.OPT_STARTTLS, await c.option(p.OPT_STARTTLS, b"x"))
    c.close()
    # EXPORT_NAME cannot be answered with an error: the connection is dropped
    c = await NbdClient.open(host="127.0.0.1", port=port)
    with pytest.raises(Exception):  # noqa: B017 - closed connection, whichever way it shows
        await c.export_name("disk")
    c.close()


async def test_wrong_ca_and_verify_peer(creds: Path, sockdir: Path) -> None:
    other = sockdir / "other"
    nbd_tls.generate_credentials(other)
    server = NbdServer(MemoryBackend(MiB), tls=nbd_tls.server_context(creds, verify_peer=True))
    address = await server.start(unix_path=sockdir / "s")
    try:
        with pytest.raises(ssl.SSLError):  # the server's certificate is not from the client's CA
            await NbdClient.connect(unix_path=address.unix_path, tls=nbd_tls.client_context(other))
        no_cert = nbd_tls.client_context(creds)
        bare = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
        bare.load_verify_locations(creds / "ca-cert.pem")
        with pytest.raises((ssl.SSLError, ConnectionError, NbdProtocolError)):
            c = await NbdClient.connect(unix_path=address.unix_path, tls=bare)
            await c.read(0, 1)  # TLS 1.3: a missing client certificate shows at the first read
        async with await NbdClient.connect(unix_path=address.unix_path, tls=no_cert) as c:
            await c.write(0, b"verified")
            assert await c.read(0, 8) == b"verified"
    finally:
        await server.close()


async def test_starttls_without_tls_configured_is_unsupported(sockdir: Path, creds: Path) -> None:
    async with NbdServer(MemoryBackend(MiB)) as server:
        address = await server.start(unix_path=sockdir / "s")
        with pytest.raises(NbdReplyError, match="ERR_UNSUP"):
            await NbdClient.connect(unix_path=address.unix_path, tls=nbd_tls.client_context(creds))


async def test_a_client_that_never_finishes_tls_is_dropped(creds: Path, sockdir: Path) -> None:
    server = NbdServer(MemoryBackend(MiB), tls=nbd_tls.server_context(creds), handshake_timeout=0.5)
    address = await server.start(unix_path=sockdir / "s")
    try:
        c = await NbdClient.open(unix_path=address.unix_path)
        c._check(p.OPT_STARTTLS, await c.option(p.OPT_STARTTLS))  # ...and then no ClientHello
        assert server.connection_count == 1
        await asyncio.sleep(1.0)
        assert server.connection_count == 0
        c.close()
    finally:
        await server.close()
