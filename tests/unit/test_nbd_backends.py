"""The NBD backends against a plain bytearray model, plus the registry."""

from __future__ import annotations

import os
import random
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from vmkit.errors import ConfigError, NotFoundError
from vmkit.nbd import protocol as p
from vmkit.nbd.backends import (
    Backend,
    Capabilities,
    ChunkStore,
    CowBackend,
    DedupBackend,
    FileBackend,
    MemoryBackend,
    create_backend,
    merge_extents,
    register_backend,
    registered_backends,
    unregister_backend,
)
from vmkit.nbd.errors import BackendError, FastZeroUnsupported, ReadOnlyError

MiB = 1 << 20
HOLE = p.STATE_HOLE | p.STATE_ZERO


def pattern(n: int, seed: int) -> bytes:
    return random.Random(seed).randbytes(n)


@pytest.fixture
def raw_file(tmp_path: Path) -> Path:
    path = tmp_path / "disk.raw"
    path.write_bytes(pattern(2 * MiB, 1))
    return path


def _file(tmp_path: Path) -> Backend:
    path = tmp_path / "model.raw"
    with open(path, "wb") as fh:
        fh.truncate(MiB + 3000)  # not a multiple of anything
    return FileBackend(path)


def _memory(tmp_path: Path) -> Backend:
    return MemoryBackend(MiB + 3000)


def _cow(tmp_path: Path) -> Backend:
    base = tmp_path / "base.raw"
    base.write_bytes(bytes(MiB + 3000))
    return CowBackend(FileBackend(base, read_only=True), cluster_size=4096)


def _dedup(tmp_path: Path) -> Backend:
    return DedupBackend(MiB + 3000, chunk_size=4096)


MAKERS: dict[str, Callable[[Path], Backend]] = {
    "file": _file,
    "memory": _memory,
    "cow": _cow,
    "dedup": _dedup,
}


@pytest.fixture(params=sorted(MAKERS))
def model_backend(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[Backend]:
    backend = MAKERS[request.param](tmp_path)
    yield backend
    backend.close()


def check_extents(backend: Backend, model: bytearray, offset: int, length: int) -> None:
    """Block status never claims 'zero' for bytes that are not zero, and covers the range."""
    extents = backend.block_status(offset, length)
    assert extents, "at least one extent"
    pos = offset
    for ext_len, flags in extents:
        assert ext_len > 0
        end = min(pos + ext_len, offset + length)
        if flags & p.STATE_ZERO:
            assert model[pos:end] == bytes(end - pos), f"extent at {pos} claims zeroes"
        pos += ext_len
        if pos >= offset + length:
            break


def test_backends_match_a_bytearray_model(model_backend: Backend) -> None:
    """Random unaligned writes and zeroes: every read matches the model exactly."""
    backend = model_backend
    size = backend.size
    model = bytearray(size)
    rng = random.Random(42)
    for step in range(300):
        op = rng.random()
        offset = rng.randrange(size)
        length = min(rng.choice([1, 511, 512, 4096, 5000, 65536, 70000]), size - offset)
        if op < 0.55:
            data = rng.randbytes(length) if rng.random() < 0.8 else bytes(length)
            backend.write(offset, data)
            model[offset : offset + length] = data
        elif op < 0.75:
            backend.zero(offset, length, may_trim=rng.random() < 0.5)
            model[offset : offset + length] = bytes(length)
        else:
            got = backend.read(offset, length)
            assert got == bytes(model[offset : offset + length]), f"step {step}: read at {offset}+{length}"
        if step % 25 == 0:
            check_extents(backend, model, 0, size)
    assert backend.read(0, size) == bytes(model)
    check_extents(backend, model, 0, size)
    check_extents(backend, model, size - 1, 1)


def test_read_into_fills_a_view(model_backend: Backend) -> None:
    model_backend.write(100, b"hello")
    buf = bytearray(10)
    model_backend.read_into(98, memoryview(buf)[2:9])
    assert bytes(buf) == b"\0\0\0\0hello\0"


def test_file_backend_basics(raw_file: Path) -> None:
    with FileBackend(raw_file) as b:
        assert b.size == 2 * MiB
        caps = b.capabilities
        assert caps.trim and caps.zero and caps.block_status and caps.multi_conn and caps.inline
        assert not caps.volatile
        assert b.read(10, 20) == pattern(2 * MiB, 1)[10:30]
        b.write(4096, b"x" * 100, fua=True)
        b.flush()
        assert raw_file.read_bytes()[4096:4196] == b"x" * 100
        assert b.file_extents(5, 10) == ((b.fd, 5, 10),)
        b.cache(0, 4096)


def test_file_backend_trim_and_zero_make_holes(raw_file: Path) -> None:
    with FileBackend(raw_file) as b:
        assert b.block_status(0, 2 * MiB) == [(2 * MiB, 0)]
        b.trim(MiB, 256 * 1024)  # trim: a hint; here it punches a hole
        b.zero(0, 64 * 1024)  # may_trim: hole
        b.zero(64 * 1024, 64 * 1024, may_trim=False)  # no hole, but zeroes
        assert b.read(0, 128 * 1024) == bytes(128 * 1024)
        extents = b.block_status(0, 2 * MiB)
        assert sum(n for n, _ in extents) == 2 * MiB
        assert extents[0] == (64 * 1024, HOLE)
        assert (256 * 1024, HOLE) in extents
        assert os.path.getsize(raw_file) == 2 * MiB  # KEEP_SIZE
        b.zero(0, 4096, fast=True)  # fallocate is fast: allowed


def test_file_backend_read_only(raw_file: Path) -> None:
    with FileBackend(raw_file, read_only=True) as b:
        assert b.capabilities.read_only
        with pytest.raises(ReadOnlyError):
            b.write(0, b"x")
        with pytest.raises(ReadOnlyError):
            b.zero(0, 1)
        with pytest.raises(ReadOnlyError):
            b.trim(0, 1)


def test_file_backend_errors(tmp_path: Path) -> None:
    with pytest.raises(NotFoundError):
        FileBackend(tmp_path / "missing")
    with pytest.raises(ConfigError):
        FileBackend(tmp_path)
    with pytest.raises(ConfigError):
        FileBackend()


def test_memory_backend_is_sparse() -> None:
    with MemoryBackend(64 * MiB) as b:
        assert b.stats()["allocated_bytes"] == 0
        assert b.block_status(0, 64 * MiB) == [(64 * MiB, HOLE)]
        b.write(MiB, b"\1" * 4096)
        assert 0 < b.stats()["allocated_bytes"] <= 64 * 1024
        assert b.block_status(0, 2 * MiB) == [(MiB, HOLE), (4096, 0), (MiB - 4096, HOLE)]
        b.trim(MiB, 4096)
        assert b.read(MiB, 4096) == bytes(4096)
        assert b.capabilities.volatile
    with pytest.raises(ConfigError):
        MemoryBackend(-1)


def test_cow_never_writes_the_base(raw_file: Path) -> None:
    original = raw_file.read_bytes()
    with CowBackend(FileBackend(raw_file, read_only=True), cluster_size=64 * 1024) as cow:
        cow.write(100, b"A" * 10)  # partial cluster: copy-up
        cow.write(64 * 1024, b"B" * 64 * 1024)  # a whole cluster
        cow.zero(300_000, 200_000)
        assert cow.read(90, 30) == original[90:100] + b"A" * 10 + original[110:120]
        assert cow.read(64 * 1024, 64 * 1024) == b"B" * 64 * 1024
        assert cow.read(300_000, 200_000) == bytes(200_000)
        assert cow.stats()["clusters_in_overlay"] >= 2
        # file extents cover base and overlay runs
        extents = cow.file_extents(0, 256 * 1024)
        assert extents is not None and sum(n for _, _, n in extents) == 256 * 1024
        # trim drops whole clusters from the overlay: the base shows through again
        cow.trim(64 * 1024, 64 * 1024)
        assert cow.read(64 * 1024, 64 * 1024) == original[64 * 1024 : 128 * 1024]
    assert raw_file.read_bytes() == original


def test_cow_rejects_bad_configuration(raw_file: Path) -> None:
    with FileBackend(raw_file, read_only=True) as base:
        with pytest.raises(ConfigError):
            CowBackend(base, cluster_size=1000, close_base=False)
        with pytest.raises(ConfigError):
            CowBackend(base, overlay=MemoryBackend(10), close_base=False)


def test_dedup_stores_identical_blocks_once() -> None:
    store = ChunkStore(4096)
    a = DedupBackend(4 * MiB, store=store)
    b = DedupBackend(4 * MiB, store=store)
    block = pattern(4096, 7)
    for i in range(100):
        a.write(i * 4096, block)
    b.write(0, block)
    b.write(8192, pattern(4096, 8))
    a.write(MiB, bytes(64 * 1024))  # zeroes are never stored
    s = store.stats()
    assert s.referenced_chunks == 102
    assert s.unique_chunks == 2
    assert s.stored_bytes == 8192
    assert s.saved_bytes == 100 * 4096
    assert s.ratio == pytest.approx(51.0)
    assert a.stats()["export_mapped_bytes"] == 100 * 4096
    assert a.read(99 * 4096, 4096) == block
    assert a.block_status(0, 2 * MiB) == [(100 * 4096, 0), (2 * MiB - 100 * 4096, HOLE)]
    # overwriting and trimming drop references; the last reference frees the chunk
    a.trim(0, 100 * 4096)
    assert store.stats().unique_chunks == 2  # b still maps both
    b.close()
    assert store.stats().unique_chunks == 0
    a.close()


def test_dedup_partial_writes_rehash() -> None:
    d = DedupBackend(10_000, chunk_size=4096)  # last chunk partial
    d.write(4000, b"xy" * 100)  # straddles two chunks
    assert d.read(3990, 220) == bytes(10) + b"xy" * 100 + bytes(10)
    d.write(8192, b"z" * (10_000 - 8192))  # the whole partial last chunk
    d.zero(8192, 10_000 - 8192)
    assert d.read(8192, 10_000 - 8192) == bytes(10_000 - 8192)
    assert d.store.stats().unique_chunks == 2


def test_dedup_from_file(raw_file: Path) -> None:
    data = raw_file.read_bytes()
    with DedupBackend.from_file(raw_file) as d:
        assert d.size == len(data)
        assert d.read(0, len(data)) == data
    with pytest.raises(ConfigError):
        ChunkStore(1000)


def test_default_zero_and_block_status() -> None:
    class Plain(Backend):
        def __init__(self) -> None:
            self.buf = bytearray(10_000)

        @property
        def size(self) -> int:
            return len(self.buf)

        @property
        def capabilities(self) -> Capabilities:
            return Capabilities()

        def read_into(self, offset: int, buf: memoryview) -> None:
            buf[:] = self.buf[offset : offset + len(buf)]

        def write(self, offset: int, data: bytes | bytearray | memoryview, *, fua: bool = False) -> None:
            self.buf[offset : offset + len(data)] = data

    b = Plain()
    b.write(0, b"\xff" * 10_000)
    b.zero(10, 20)
    assert b.read(0, 40) == b"\xff" * 10 + bytes(20) + b"\xff" * 10
    with pytest.raises(FastZeroUnsupported):
        b.zero(0, 1, fast=True)
    assert b.block_status(0, 100) == [(100, 0)]
    assert b.file_extents(0, 1) is None


def test_merge_extents() -> None:
    assert merge_extents([(1, 0), (2, 0), (0, 3), (4, 3), (5, 0)]) == [(3, 0), (4, 3), (5, 0)]


def test_registry(tmp_path: Path, raw_file: Path) -> None:
    assert {"file", "memory", "cow", "dedup"} <= set(registered_backends())
    with create_backend("memory", size=MiB) as m:
        assert m.size == MiB
    with create_backend("file", path=raw_file, read_only=True) as f:
        assert f.capabilities.read_only
    with create_backend("cow", path=raw_file) as c:
        c.write(0, b"x")
    with create_backend("dedup", path=raw_file) as d:
        assert d.size == 2 * MiB
    with create_backend("dedup", size=MiB) as d2:
        assert d2.size == MiB
    with pytest.raises(NotFoundError):
        create_backend("nope")
    with pytest.raises(ConfigError):
        create_backend("memory")
    with pytest.raises(ConfigError):
        create_backend("memory", size=1, path=raw_file)
    with pytest.raises(ConfigError):
        create_backend("file", size=1, path=raw_file)
    with pytest.raises(ConfigError):
        create_backend("file")

    register_backend("test-zero", lambda **kw: MemoryBackend(kw["size"]))
    try:
        assert "test-zero" in registered_backends()
        with pytest.raises(ConfigError):
            register_backend("test-zero", lambda **kw: MemoryBackend(1))
        with create_backend("test-zero", size=4096) as z:
            assert z.read(0, 4096) == bytes(4096)
    finally:
        unregister_backend("test-zero")
    with pytest.raises(ConfigError):
        register_backend("bad name!", lambda **kw: MemoryBackend(1))


def test_backend_error_carries_nbd_errno() -> None:
    err = BackendError(p.ENOSPC, "full")
    assert err.nbd_errno == p.ENOSPC
    assert ReadOnlyError().nbd_errno == p.EPERM
    assert FastZeroUnsupported().nbd_errno == p.ENOTSUP
