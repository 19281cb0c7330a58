"""Real NBD clients against vmkit's server: qemu-img, qemu-io (QEMU's NBD block driver), libnbd's
nbdinfo and nbdcopy, and ``python -m vmkit.nbd serve`` as a process.

Needs the Debian packages qemu-utils (qemu-img, qemu-io) and libnbd-bin (nbdinfo, nbdcopy).
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import threading
from collections.abc import Iterator
from pathlib import Path

import pytest

from vmkit.nbd import (
    ChunkStore,
    CowBackend,
    DedupBackend,
    Export,
    FileBackend,
    MemoryBackend,
    NbdAddress,
    NbdServer,
)

pytestmark = [
    pytest.mark.integration,
    pytest.mark.skipif(
        any(shutil.which(t) is None for t in ("qemu-img", "qemu-io", "nbdinfo", "nbdcopy")),
        reason="needs qemu-utils and libnbd-bin",
    ),
]

MiB = 1 << 20
SIZE = 16 * MiB
ROOT = Path(__file__).resolve().parents[2]


def run(*argv: str, check: bool = True, timeout: float = 60) -> subprocess.CompletedProcess[str]:
    res = subprocess.run(argv, capture_output=True, text=True, timeout=timeout, check=False)
    if check and res.returncode != 0:
        raise AssertionError(f"{' '.join(argv)} exited {res.returncode}:\n{res.stdout}\n{res.stderr}")
    return res


def sha(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


class ThreadedServer:
    """An NbdServer on its own event loop thread, so blocking subprocess clients can use it."""

    def __init__(self, exports: list[Export], sock: Path) -> None:
        self.loop = asyncio.new_event_loop()
        self.thread = threading.Thread(target=self.loop.run_forever, name="nbd-test-server", daemon=True)
        self.thread.start()
        self.server = NbdServer(exports, default_export="mem")
        self.address: NbdAddress = self.call(self.server.start(unix_path=sock))

    def call(self, coro):  # type: ignore[no-untyped-def]
        return asyncio.run_coroutine_threadsafe(coro, self.loop).result(30)

    def uri(self, export: str) -> str:
        return self.address.uri(export)

    def stop(self) -> None:
        try:
            self.call(self.server.close())
        finally:
            self.loop.call_soon_threadsafe(self.loop.stop)
            self.thread.join(10)
            self.loop.close()


@pytest.fixture
def image(tmp_path: Path) -> Path:
    path = tmp_path / "disk.raw"
    block = os.urandom(MiB)
    with open(path, "wb") as fh:
        for i in range(SIZE // MiB):
            fh.write(block[i:] + block[:i])
    return path


@pytest.fixture
def srv(sockdir: Path, image: Path, tmp_path: Path) -> Iterator[ThreadedServer]:
    base = tmp_path / "base.raw"
    shutil.copyfile(image, base)
    backends = {
        "disk": FileBackend(image),
        "mem": MemoryBackend(SIZE),
        "ro": FileBackend(base, read_only=True),
        "dedup": DedupBackend(SIZE, store=ChunkStore(4096)),
        "cow": CowBackend(FileBackend(base, read_only=True)),
    }
    exports = [Export(name, b, read_only=name == "ro") for name, b in backends.items()]
    server = ThreadedServer(exports, sockdir / "nbd.sock")
    yield server
    server.stop()
    for b in backends.values():
        b.close()
    assert server.server.stats.internal_errors == 0


def test_qemu_img_info(srv: ThreadedServer) -> None:
    info = json.loads(run("qemu-img", "info", "--output=json", srv.uri("disk")).stdout)
    assert info["virtual-size"] == SIZE
    assert info["format"] == "raw"


def test_qemu_img_convert_in_and_out(srv: ThreadedServer, image: Path, tmp_path: Path) -> None:
    # into the RAM export (8 parallel coroutines, out of order), then back out to qcow2
    run("qemu-img", "convert", "-n", "-W", "-m", "8", "-f", "raw", "-O", "raw", str(image), srv.uri("mem"))
    out = tmp_path / "out.qcow2"
    run("qemu-img", "convert", "-f", "raw", "-O", "qcow2", srv.uri("mem"), str(out))
    run("qemu-img", "compare", "-f", "raw", "-F", "qcow2", str(image), str(out))
    # and the file export itself
    raw = tmp_path / "out.raw"
    run("qemu-img", "convert", "-f", "raw", "-O", "raw", srv.uri("disk"), str(raw))
    assert sha(raw) == sha(image)


def test_qemu_io_patterns(srv: ThreadedServer) -> None:
    cmds = [
        "write -P 0xaa 0 1M",
        "write -f -P 0xbb 1M 64k",  # FUA
        "read -P 0xaa 0 1M",
        "read -P 0xbb 1M 64k",
        "write -z 512k 64k",  # WRITE_ZEROES
        "read -P 0 512k 64k",
        "read -P 0xaa 576k 448k",
        "discard 2M 1M",  # TRIM
        "flush",
        "aio_write -P 0x11 4M 256k",
        "aio_write -P 0x22 5M 256k",
        "aio_flush",
        "readv -P 0x11 4M 128k 128k",
        "read -P 0x22 5M 256k",
        "write -P 0x33 15M 1M",
        "read -P 0x33 15M 1M",
        "write -P 0x44 3 5",  # unaligned
        "read -P 0x44 3 5",
    ]
    argv = ["qemu-io", "-f", "raw"]
    for c in cmds:
        argv += ["-c", c]
    res = run(*argv, srv.uri("mem"))
    assert "failed" not in res.stdout.lower() + res.stderr.lower(), res.stdout + res.stderr
    assert res.stdout.count("read ") >= 8


def test_qemu_io_read_only_export(srv: ThreadedServer) -> None:
    ok = run("qemu-io", "-r", "-f", "raw", "-c", "read 0 64k", srv.uri("ro"))
    assert "read 65536/65536" in ok.stdout
    bad = run("qemu-io", "-f", "raw", "-c", "write 0 64k", srv.uri("ro"), check=False)
    assert bad.returncode != 0 or "failed" in (bad.stdout + bad.stderr).lower()


def test_nbdinfo_json_and_list(srv: ThreadedServer) -> None:
    info = json.loads(run("nbdinfo", "--json", srv.uri("mem")).stdout)
    (export,) = info["exports"]
    assert export["export-size"] == SIZE
    assert export["can_multi_conn"] is True
    assert export["can_fua"] is True and export["can_trim"] is True and export["can_zero"] is True
    assert export["is_read_only"] is False
    assert "base:allocation" in export["contexts"]
    assert info["protocol"] == "newstyle-fixed" and info["TLS"] is False
    ro = json.loads(run("nbdinfo", "--json", srv.uri("ro")).stdout)["exports"][0]
    assert ro["is_read_only"] is True
    listing = json.loads(run("nbdinfo", "--list", "--json", srv.uri("")).stdout)
    assert [e["export-name"] for e in listing["exports"]] == ["disk", "mem", "ro", "dedup", "cow"]


def test_nbdinfo_map_shows_holes_and_data(srv: ThreadedServer) -> None:
    run("qemu-io", "-f", "raw", "-c", "write -P 1 1M 1M", "-c", "write -P 2 8M 64k", srv.uri("mem"))
    lines = [line.split() for line in run("nbdinfo", "--map", srv.uri("mem")).stdout.splitlines()]
    assert lines == [
        ["0", str(MiB), "3", "hole,zero"],
        [str(MiB), str(MiB), "0", "data"],
        [str(2 * MiB), str(6 * MiB), "3", "hole,zero"],
        [str(8 * MiB), str(64 * 1024), "0", "data"],
        [str(8 * MiB + 64 * 1024), str(SIZE - 8 * MiB - 64 * 1024), "3", "hole,zero"],
    ]
    totals = run("nbdinfo", "--map", "--totals", srv.uri("dedup")).stdout
    assert "100.0%" in totals and "hole,zero" in totals


def test_nbdcopy_both_ways_with_multi_conn(srv: ThreadedServer, image: Path, tmp_path: Path) -> None:
    run("nbdcopy", "--connections=4", "--requests=16", str(image), srv.uri("mem"))
    out = tmp_path / "copy.raw"
    run("nbdcopy", "--connections=4", srv.uri("mem"), str(out))
    assert sha(out) == sha(image)
    run("nbdcopy", srv.uri("disk"), "null:")


def test_dedup_export_reports_the_saving(srv: ThreadedServer, tmp_path: Path) -> None:
    # a file of one repeated 64 KiB block plus zeroes: stored once, zeroes not at all
    src = tmp_path / "repetitive.raw"
    block = os.urandom(64 * 1024)
    src.write_bytes(block * 64 + bytes(4 * MiB))
    run("nbdcopy", str(src), srv.uri("dedup"))
    out = tmp_path / "back.raw"
    run("qemu-img", "convert", "-f", "raw", "-O", "raw", srv.uri("dedup"), str(out))
    assert out.read_bytes()[: len(block) * 64 + 4 * MiB] == src.read_bytes()
    stats = srv.server.exports["dedup"].backend.stats()
    assert stats["store_stored_bytes"] == 64 * 1024  # 16 distinct 4 KiB chunks
    assert stats["export_mapped_bytes"] == 4 * MiB
    assert stats["store_ratio"] == 64.0


def test_cow_export_never_changes_its_base(srv: ThreadedServer, tmp_path: Path) -> None:
    base = tmp_path / "base.raw"
    before = sha(base)
    run("qemu-io", "-f", "raw", "-c", "write -P 0x5a 100 1M", "-c", "read -P 0x5a 100 1M", srv.uri("cow"))
    assert sha(base) == before


def test_parallel_clients_and_a_hostile_one(srv: ThreadedServer, tmp_path: Path) -> None:
    procs = [
        subprocess.Popen(
            ["qemu-io", "-f", "raw", "-c", f"write -P {i + 1} {i * 2}M 2M", "-c", f"read -P {i + 1} {i * 2}M 2M",
             srv.uri("mem")],
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
        )
        for i in range(4)
    ]  # fmt: skip
    # meanwhile, a client that talks garbage and one that vanishes mid-request
    assert srv.address.unix_path is not None
    for junk in (b"\x00" * 100, b"NBDMAGIC" * 50):
        with socket.socket(socket.AF_UNIX) as s:
            s.connect(str(srv.address.unix_path))
            s.recv(18)
            s.sendall(junk)
    for p in procs:
        out, _ = p.communicate(timeout=60)
        assert p.returncode == 0, out
        assert b"failed" not in out.lower(), out
    out = tmp_path / "all.raw"
    run("nbdcopy", srv.uri("mem"), str(out))
    data = out.read_bytes()
    for i in range(4):
        assert data[i * 2 * MiB : (i + 1) * 2 * MiB] == bytes([i + 1]) * 2 * MiB


@contextlib.contextmanager
def cli_server(*args: str) -> Iterator[tuple[subprocess.Popen[str], str]]:
    env = dict(os.environ, PYTHONPATH=str(ROOT / "src"))
    proc = subprocess.Popen(
        [sys.executable, "-m", "vmkit.nbd", "serve", *args],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        env=env,
    )
    try:
        assert proc.stdout is not None
        uri = proc.stdout.readline().strip()
        assert uri.startswith("nbd"), proc.stderr.read() if proc.stderr else ""
        yield proc, uri
    finally:
        if proc.poll() is None:
            proc.send_signal(signal.SIGTERM)
            try:
                proc.wait(10)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()


def test_cli_serve_process(image: Path, sockdir: Path) -> None:
    sock = sockdir / "cli.sock"
    with cli_server(str(image), "--socket", str(sock), "--export", "x", "--read-only") as (proc, uri):
        assert uri == f"nbd+unix:///x?socket={sock}"
        info = json.loads(run("nbdinfo", "--json", uri).stdout)["exports"][0]
        assert info["export-size"] == SIZE and info["is_read_only"] is True
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(10) == 0
        assert proc.stderr is not None and "serving" in proc.stderr.read()
    assert not sock.exists()


def test_cli_serve_memory_over_tcp(sockdir: Path) -> None:
    with cli_server("--memory", "4M", "--port", "0") as (proc, uri):
        assert uri.startswith("nbd://127.0.0.1:")
        run("qemu-io", "-f", "raw", "-c", "write -P 7 0 4M", "-c", "read -P 7 0 4M", uri)
        proc.send_signal(signal.SIGINT)
        assert proc.wait(10) == 0


def test_cli_cow_backend_keeps_the_file(image: Path, sockdir: Path) -> None:
    before = sha(image)
    with cli_server(str(image), "--backend", "cow", "--socket", str(sockdir / "c.sock")) as (_, uri):
        run("qemu-io", "-f", "raw", "-c", "write -P 9 0 1M", "-c", "read -P 9 0 1M", uri)
    assert sha(image) == before


def test_cli_default_is_a_private_unix_socket(sockdir: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    home = sockdir / "home"
    monkeypatch.setenv("VMKIT_HOME", str(home))
    with cli_server("--memory", "4M") as (proc, uri):
        sock = home / "run" / "nbd.sock"
        assert uri == f"nbd+unix:///?socket={sock}"
        assert (sock.stat().st_mode & 0o777) == 0o600
        run("qemu-io", "-f", "raw", "-c", "write -P 7 0 1M", "-c", "read -P 7 0 1M", uri)
        # another local user cannot connect
        res = subprocess.run(["nbdinfo", uri], user="nobody", capture_output=True, text=True, timeout=30, check=False)
        assert res.returncode != 0 and "denied" in res.stderr.lower(), res.stderr
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(10) == 0
        assert proc.stderr is not None and "warning" not in proc.stderr.read()


@pytest.fixture(scope="module")
def tls_creds() -> Iterator[Path]:
    path = Path(tempfile.mkdtemp(prefix="nbd-tls-", dir="/tmp")) / "creds"
    res = run(sys.executable, "-m", "vmkit.nbd", "tls-creds", str(path))
    assert "server-cert.pem" in res.stdout
    yield path
    shutil.rmtree(path.parent, ignore_errors=True)


def _qemu_tls(creds: Path, port: int) -> list[str]:
    return [
        "--object", f"tls-creds-x509,id=tls0,dir={creds},endpoint=client",
        "--image-opts", f"driver=nbd,server.type=inet,server.host=localhost,server.port={port},tls-creds=tls0",
    ]  # fmt: skip


@pytest.mark.parametrize("verify_peer", [False, True])
def test_tls_with_qemu_and_libnbd(tls_creds: Path, verify_peer: bool) -> None:
    args = ["--memory", "8M", "--port", "0", "--tls-dir", str(tls_creds)]
    with cli_server(*args, *(["--tls-verify-peer"] if verify_peer else [])) as (proc, uri):
        assert uri.startswith("nbds://127.0.0.1:")
        port = int(uri.rsplit(":", 1)[1].split("/")[0])
        info = run("qemu-img", "info", "--output=json", *_qemu_tls(tls_creds, port))
        assert json.loads(info.stdout)["virtual-size"] == 8 * MiB
        io = run("qemu-io", *_qemu_tls(tls_creds, port), "-c", "write -P 0x5a 0 2M", "-c", "read -P 0x5a 0 2M")
        assert "failed" not in (io.stdout + io.stderr).lower(), io.stdout + io.stderr
        nbds = f"nbds://localhost:{port}/?tls-certificates={tls_creds}"
        data = json.loads(run("nbdinfo", "--json", nbds).stdout)
        assert data["TLS"] is True and data["exports"][0]["export-size"] == 8 * MiB
        # a plain client is refused: TLS is required
        plain = run("qemu-img", "info", f"nbd://localhost:{port}/", check=False)
        assert plain.returncode != 0 and "TLS" in plain.stderr, plain.stderr
        plain = run("nbdinfo", f"nbd://localhost:{port}/", check=False)
        assert plain.returncode != 0
        if verify_peer:  # a client without a certificate is refused too
            bare = tls_creds.parent / "bare"
            bare.mkdir(exist_ok=True)
            shutil.copy(tls_creds / "ca-cert.pem", bare)
            res = run("qemu-img", "info", *_qemu_tls(bare, port), check=False)
            assert res.returncode != 0, res.stdout
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(10) == 0
        assert proc.stderr is not None and "warning" not in proc.stderr.read()


def test_plain_tcp_warns(sockdir: Path) -> None:
    with cli_server("--memory", "1M", "--port", "0") as (proc, _uri):
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(10) == 0
        assert proc.stderr is not None
        assert "warning: plain TCP" in proc.stderr.read()
