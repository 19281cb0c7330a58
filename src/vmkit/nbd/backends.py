"""Storage behind an NBD export: the :class:`Backend` interface, the built-in backends, a registry.

A backend is a byte range of fixed :attr:`~Backend.size` with synchronous operations (read into a
caller's buffer, write, flush, trim, zero, block status) and a :class:`Capabilities` record that
says which of them it really supports and how the server may call it. The server validates every
offset and length before calling a backend, so backends may assume ``0 <= offset`` and
``offset + length <= size``.

Built-ins (also reachable by name through the registry, see :func:`create_backend`):

``file``    a raw file or block device (``pread``/``pwrite``, ``fallocate`` for trim and zero,
            ``SEEK_DATA``/``SEEK_HOLE`` for block status, ``sendfile`` for zero-copy reads);
``memory``  a sparse RAM disk on a ``memfd`` (same code as ``file``, so it gets the same tricks);
``cow``     a copy-on-write overlay on a read-only base: the base is never written;
``dedup``   a content-addressed chunk store: identical blocks are stored once, all-zero blocks
            not at all, and :meth:`ChunkStore.stats` reports the saving. Several exports may
            share one store (two VM disks made from one image share their common blocks).

Register your own with :func:`register_backend`.
"""

from __future__ import annotations

import abc
import contextlib
import ctypes
import ctypes.util
import errno
import hashlib
import os
import stat
import threading
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from vmkit.errors import ConfigError, NotFoundError
from vmkit.nbd import protocol as p
from vmkit.nbd.errors import BackendError, FastZeroUnsupported, ReadOnlyError

BytesLike = bytes | bytearray | memoryview
#: one block-status extent: (length, NBD_STATE_* flags)
Extent = tuple[int, int]
#: one piece of an export that lives in a file: (fd, file offset, length)
FileExtent = tuple[int, int, int]

HOLE_ZERO = p.STATE_HOLE | p.STATE_ZERO
MAX_EXTENTS = 1 << 16  # block status replies are cut after this many descriptors


@dataclass(frozen=True)
class Capabilities:
    """What a backend supports; the server turns this into NBD transmission flags.

    ``inline``: every call is cheap and does not block for long (page-cache file I/O, memory), so
    the server calls it directly on the event loop; only :meth:`~Backend.flush` (for FLUSH, and
    after a FUA write) runs in a worker thread, possibly while other calls run on the loop.
    Backends that block (network, slow devices) set it to False and are called from worker
    threads for everything; they must then be thread-safe.
    ``volatile``: nothing survives the process anyway (memory), so FLUSH and FUA are no-ops and
    the server answers them at once.
    ``multi_conn``: all connections see one shared state and a flush on one covers writes done
    through any other (advertised as NBD_FLAG_CAN_MULTI_CONN).
    """

    read_only: bool = False
    volatile: bool = False
    trim: bool = False
    zero: bool = True
    fast_zero: bool = False
    block_status: bool = False
    cache: bool = False
    multi_conn: bool = True
    inline: bool = True
    rotational: bool = False
    min_block: int = 1
    preferred_block: int = 4096


class Backend(abc.ABC):
    """The small interface every NBD backend implements.

    Only :attr:`size`, :attr:`capabilities`, :meth:`read_into` and (unless read-only)
    :meth:`write` are required; the rest have safe defaults.
    """

    @property
    @abc.abstractmethod
    def size(self) -> int:
        """Export size in bytes."""

    @property
    @abc.abstractmethod
    def capabilities(self) -> Capabilities: ...

    @abc.abstractmethod
    def read_into(self, offset: int, buf: memoryview) -> None:
        """Fill ``buf`` completely with the bytes at ``offset``."""

    def read(self, offset: int, length: int) -> bytes:
        buf = bytearray(length)
        self.read_into(offset, memoryview(buf))
        return bytes(buf)

    def write(self, offset: int, data: BytesLike, *, fua: bool = False) -> None:
        """Write all of ``data`` at ``offset``; with ``fua`` it is durable on return."""
        raise ReadOnlyError()

    def flush(self) -> None:
        """Make every completed write durable."""
        return None  # optional: nothing to do by default

    def trim(self, offset: int, length: int, *, fua: bool = False) -> None:
        """A hint that the range is no longer needed (its contents become unspecified)."""
        return None  # optional: nothing to do by default

    def zero(self, offset: int, length: int, *, may_trim: bool = True, fast: bool = False, fua: bool = False) -> None:
        """Make the range read as zeroes; ``fast`` means fail with ENOTSUP unless it is cheap."""
        if fast:
            raise FastZeroUnsupported()
        chunk = min(length, 1 << 20)
        zeroes = bytes(chunk)
        end = offset + length
        while offset < end:
            n = min(chunk, end - offset)
            self.write(offset, memoryview(zeroes)[:n])
            offset += n
        if fua:
            self.flush()

    def block_status(self, offset: int, length: int) -> Sequence[Extent]:
        """Extents from ``offset`` (``base:allocation`` flags); may cover less or a bit more."""
        return [(length, 0)]

    def file_extents(self, offset: int, length: int) -> Sequence[FileExtent] | None:
        """Where the range lives in files, for zero-copy ``sendfile``; None if not file-backed.

        The server only uses these between other calls on the event loop, so the descriptors
        need stay valid only until the backend is closed.
        """
        return None

    def cache(self, offset: int, length: int) -> None:
        """A hint that the range will be read soon."""
        return None  # optional: nothing to do by default

    def stats(self) -> dict[str, int | float]:
        """Numbers worth showing to a user (bytes stored, saving, ...)."""
        return {}

    def close(self) -> None:
        """Release resources; the backend is not used afterwards."""
        return None  # optional: nothing to do by default

    def __enter__(self) -> Backend:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def merge_extents(extents: Sequence[Extent]) -> list[Extent]:
    """Join neighbouring extents with equal flags."""
    out: list[Extent] = []
    for length, flags in extents:
        if length <= 0:
            continue
        if out and out[-1][1] == flags:
            out[-1] = (out[-1][0] + length, flags)
        else:
            out.append((length, flags))
    return out


# --- fallocate ---------------------------------------------------------------------------------
FALLOC_FL_KEEP_SIZE = 0x01
FALLOC_FL_PUNCH_HOLE = 0x02
FALLOC_FL_ZERO_RANGE = 0x10

_libc: Any = None
_libc_lock = threading.Lock()


def _fallocate(fd: int, mode: int, offset: int, length: int) -> None:
    """fallocate(2) with a mode (Python only exposes posix_fallocate)."""
    global _libc
    if _libc is None:
        with _libc_lock:
            if _libc is None:
                lib = ctypes.CDLL(ctypes.util.find_library("c") or None, use_errno=True)
                fn = lib.fallocate64
                fn.argtypes = [ctypes.c_int, ctypes.c_int, ctypes.c_int64, ctypes.c_int64]
                fn.restype = ctypes.c_int
                _libc = fn
    if _libc(fd, mode, offset, length) != 0:
        err = ctypes.get_errno()
        raise OSError(err, os.strerror(err))


_NO_FALLOCATE = (errno.EOPNOTSUPP, errno.ENOSYS, errno.EINVAL, errno.ENODEV)


# --- file -----------------------------------------------------------------------------------------
class FileBackend(Backend):
    """A raw file or block device, opened once and shared by all connections.

    Reads use ``preadv`` into the server's buffers, or ``sendfile`` straight from the page cache
    (see :meth:`file_extents`); trim punches holes, zero uses ``FALLOC_FL_ZERO_RANGE`` or
    hole punching, block status uses ``SEEK_DATA``/``SEEK_HOLE``.
    """

    def __init__(
        self,
        path: str | os.PathLike[str] | None = None,
        *,
        read_only: bool = False,
        fd: int | None = None,
        size: int | None = None,
        close_fd: bool = True,
    ) -> None:
        if (path is None) == (fd is None):
            raise ConfigError.single("backend", "give exactly one of a path or a file descriptor")
        self.path = Path(path) if path is not None else None
        self._read_only = read_only
        if fd is None:
            assert self.path is not None
            flags = (os.O_RDONLY if read_only else os.O_RDWR) | os.O_CLOEXEC
            try:
                fd = os.open(self.path, flags)
            except FileNotFoundError:
                raise NotFoundError("file", str(self.path), hint="give an existing file or device") from None
            except IsADirectoryError:
                raise ConfigError.single("file", f"{self.path} is a directory, not a file") from None
            except PermissionError:
                if read_only:
                    raise ConfigError.single("file", f"{self.path}: permission denied") from None
                raise ConfigError.single("file", f"{self.path} is not writable (serve it with --read-only?)") from None
            close_fd = True
        self._fd = fd
        self._close_fd = close_fd
        st = os.fstat(fd)
        self._regular = stat.S_ISREG(st.st_mode)
        if size is None:
            size = st.st_size if self._regular else os.lseek(fd, 0, os.SEEK_END)
        self._size = size
        self._seek_data = self._regular
        self._punch = self._regular
        self._zero_range = self._regular
        self._closed = False

    @property
    def fd(self) -> int:
        return self._fd

    @property
    def size(self) -> int:
        return self._size

    @property
    def capabilities(self) -> Capabilities:
        return Capabilities(
            read_only=self._read_only,
            trim=self._regular,
            zero=True,
            fast_zero=self._regular,
            block_status=True,
            cache=True,
            multi_conn=True,
            inline=True,
        )

    def read_into(self, offset: int, buf: memoryview) -> None:
        fd = self._fd
        n = os.preadv(fd, (buf,), offset)
        total = len(buf)
        while n < total:  # short read: retry; past the end of the file reads as zeroes
            got = os.preadv(fd, (buf[n:],), offset + n)
            if got <= 0:
                buf[n:] = bytes(total - n)
                return
            n += got

    def write(self, offset: int, data: BytesLike, *, fua: bool = False) -> None:
        if self._read_only:
            raise ReadOnlyError()
        fd = self._fd
        view = data if isinstance(data, memoryview) else memoryview(data)
        flags = os.RWF_DSYNC if fua else 0
        try:
            n = os.pwritev(fd, (view,), offset, flags)
        except OSError as exc:
            if not fua or exc.errno not in (errno.EOPNOTSUPP, errno.EINVAL):
                raise
            flags = 0
            n = os.pwritev(fd, (view,), offset)
            os.fdatasync(fd)
        total = len(view)
        while n < total:
            n += os.pwritev(fd, (view[n:],), offset + n, flags)

    def flush(self) -> None:
        os.fdatasync(self._fd)

    def trim(self, offset: int, length: int, *, fua: bool = False) -> None:
        if self._read_only:
            raise ReadOnlyError()
        if not self._punch or length == 0:
            return
        try:
            _fallocate(self._fd, FALLOC_FL_PUNCH_HOLE | FALLOC_FL_KEEP_SIZE, offset, length)
        except OSError as exc:
            if exc.errno not in _NO_FALLOCATE:
                raise
            self._punch = False
            return
        if fua:
            os.fdatasync(self._fd)

    def zero(self, offset: int, length: int, *, may_trim: bool = True, fast: bool = False, fua: bool = False) -> None:
        if self._read_only:
            raise ReadOnlyError()
        if length == 0:
            return
        done = False
        fd = self._fd
        if may_trim and self._punch:
            done = self._try_fallocate(FALLOC_FL_PUNCH_HOLE | FALLOC_FL_KEEP_SIZE, offset, length, "_punch")
        if not done and self._zero_range:
            done = self._try_fallocate(FALLOC_FL_ZERO_RANGE | FALLOC_FL_KEEP_SIZE, offset, length, "_zero_range")
        if not done and self._punch:  # tmpfs/memfd: punch, then allocate (no hole left behind)
            done = self._try_fallocate(FALLOC_FL_PUNCH_HOLE | FALLOC_FL_KEEP_SIZE, offset, length, "_punch")
            if done and not may_trim:
                with contextlib.suppress(OSError):
                    _fallocate(fd, FALLOC_FL_KEEP_SIZE, offset, length)
        if not done:
            super().zero(offset, length, may_trim=may_trim, fast=fast, fua=False)
        if fua:
            os.fdatasync(fd)

    def _try_fallocate(self, mode: int, offset: int, length: int, switch: str) -> bool:
        try:
            _fallocate(self._fd, mode, offset, length)
        except OSError as exc:
            if exc.errno not in _NO_FALLOCATE:
                raise
            setattr(self, switch, False)
            return False
        return True

    def block_status(self, offset: int, length: int) -> Sequence[Extent]:
        if not self._seek_data:
            return [(length, 0)]
        fd = self._fd
        end = offset + length
        pos = offset
        out: list[Extent] = []
        try:
            while pos < end and len(out) < MAX_EXTENTS:
                try:
                    data = os.lseek(fd, pos, os.SEEK_DATA)
                except OSError as exc:
                    if exc.errno != errno.ENXIO:
                        raise
                    data = max(end, self._size)  # no data after pos: a hole to the end
                if data > pos:
                    stop = min(data, end)
                    out.append((stop - pos, HOLE_ZERO))
                    pos = stop
                    continue
                hole = os.lseek(fd, pos, os.SEEK_HOLE)
                stop = min(hole, end) if hole > pos else end
                out.append((stop - pos, 0))
                pos = stop
        except OSError as exc:
            if exc.errno not in (errno.EINVAL, errno.EOPNOTSUPP):
                raise
            self._seek_data = False
            return [(length, 0)]
        return out

    def file_extents(self, offset: int, length: int) -> Sequence[FileExtent] | None:
        return ((self._fd, offset, length),)

    def cache(self, offset: int, length: int) -> None:
        with contextlib.suppress(OSError):
            os.posix_fadvise(self._fd, offset, length, os.POSIX_FADV_WILLNEED)

    def close(self) -> None:
        if not self._closed:
            self._closed = True
            if self._close_fd:
                os.close(self._fd)


class MemoryBackend(FileBackend):
    """A sparse RAM disk: a ``memfd`` of ``size`` bytes; untouched ranges cost nothing.

    Being a file, it gets sendfile reads, hole punching and SEEK_HOLE block status for free.
    """

    def __init__(self, size: int, *, name: str = "vmkit-nbd-memory") -> None:
        if size < 0:
            raise ConfigError.single("size", "must not be negative")
        fd = os.memfd_create(name, os.MFD_CLOEXEC)
        try:
            os.ftruncate(fd, size)
        except BaseException:
            os.close(fd)
            raise
        super().__init__(fd=fd, size=size, close_fd=True)

    @property
    def capabilities(self) -> Capabilities:
        return Capabilities(volatile=True, trim=True, zero=True, fast_zero=True, block_status=True, multi_conn=True)

    def flush(self) -> None:
        """Nothing to make durable."""

    def stats(self) -> dict[str, int | float]:
        return {"allocated_bytes": os.fstat(self._fd).st_blocks * 512}


# --- copy-on-write -------------------------------------------------------------------------------
class CowBackend(Backend):
    """A writable copy-on-write view of a read-only ``base``; writes land in ``overlay``.

    The export is divided into clusters; a bitmap says which clusters live in the overlay. A
    write to part of a cluster not yet copied first copies that cluster up from the base. The
    base is only ever read. The overlay defaults to a sparse :class:`MemoryBackend`, so the
    changes vanish when the backend is closed (like QEMU's ``snapshot=on``).
    """

    def __init__(
        self,
        base: Backend,
        *,
        overlay: Backend | None = None,
        cluster_size: int = 64 * 1024,
        close_base: bool = True,
    ) -> None:
        if cluster_size < 512 or cluster_size & (cluster_size - 1):
            raise ConfigError.single("cluster_size", "must be a power of two of at least 512")
        self._base = base
        self._overlay = overlay if overlay is not None else MemoryBackend(base.size, name="vmkit-nbd-cow")
        if self._overlay.size < base.size:
            raise ConfigError.single("overlay", "the overlay is smaller than the base")
        if self._overlay.capabilities.read_only:
            raise ConfigError.single("overlay", "the overlay must be writable")
        self._size = base.size
        self._cs = cluster_size
        self._nclusters = (self._size + cluster_size - 1) // cluster_size
        self._present = bytearray(self._nclusters)
        self._tmp = bytearray(cluster_size)
        self._close_base = close_base

    @property
    def size(self) -> int:
        return self._size

    @property
    def capabilities(self) -> Capabilities:
        b, o = self._base.capabilities, self._overlay.capabilities
        return Capabilities(
            trim=True,
            zero=True,
            fast_zero=o.fast_zero,
            block_status=True,
            multi_conn=b.multi_conn and o.multi_conn,
            inline=b.inline and o.inline,
            volatile=o.volatile,
        )

    def _runs(self, start: int, end: int) -> Iterator[tuple[int, int, bool]]:
        """Maximal runs (start, end, in_overlay) covering [start, end)."""
        cs = self._cs
        bm = self._present
        c = start // cs
        last = (end - 1) // cs + 1
        pos = start
        while pos < end:
            state = bm[c]
            nxt = bm.find(b"\x00" if state else b"\x01", c, last)
            run_end = end if nxt < 0 else min(end, nxt * cs)
            yield pos, run_end, bool(state)
            pos = run_end
            c = nxt

    def read_into(self, offset: int, buf: memoryview) -> None:
        if not len(buf):
            return
        for start, end, mine in self._runs(offset, offset + len(buf)):
            src = self._overlay if mine else self._base
            src.read_into(start, buf[start - offset : end - offset])

    def file_extents(self, offset: int, length: int) -> Sequence[FileExtent] | None:
        if not length:
            return ()
        out: list[FileExtent] = []
        for start, end, mine in self._runs(offset, offset + length):
            sub = (self._overlay if mine else self._base).file_extents(start, end - start)
            if sub is None:
                return None
            out.extend(sub)
        return out

    def _copy_up(self, c: int) -> None:
        cs = self._cs
        start = c * cs
        n = min(cs, self._size - start)
        view = memoryview(self._tmp)[:n]
        self._base.read_into(start, view)
        self._overlay.write(start, view)
        self._present[c] = 1

    def _prepare(self, offset: int, length: int) -> tuple[int, int]:
        """Copy up partially covered edge clusters; return the cluster range touched."""
        cs = self._cs
        end = offset + length
        c0, c1 = offset // cs, (end - 1) // cs
        for c in (c0, c1) if c1 != c0 else (c0,):
            if not self._present[c]:
                cstart = c * cs
                cend = min(cstart + cs, self._size)
                if offset > cstart or end < cend:
                    self._copy_up(c)
        return c0, c1

    def _mark(self, c0: int, c1: int, value: int) -> None:
        self._present[c0 : c1 + 1] = (b"\x01" if value else b"\x00") * (c1 - c0 + 1)

    def write(self, offset: int, data: BytesLike, *, fua: bool = False) -> None:
        if not len(data):
            return
        c0, c1 = self._prepare(offset, len(data))
        self._overlay.write(offset, data, fua=fua)
        self._mark(c0, c1, 1)

    def zero(self, offset: int, length: int, *, may_trim: bool = True, fast: bool = False, fua: bool = False) -> None:
        if not length:
            return
        c0, c1 = self._prepare(offset, length)
        self._overlay.zero(offset, length, may_trim=may_trim, fast=fast, fua=fua)
        self._mark(c0, c1, 1)

    def trim(self, offset: int, length: int, *, fua: bool = False) -> None:
        """Drop whole clusters from the overlay: the base shows through again (allowed: after a
        trim the contents are unspecified until rewritten)."""
        cs = self._cs
        c0 = (offset + cs - 1) // cs
        end = offset + length
        c1 = end // cs if end < self._size else self._nclusters
        if c1 <= c0:
            return
        self._mark(c0, c1 - 1, 0)
        self._overlay.trim(c0 * cs, min(c1 * cs, self._size) - c0 * cs)

    def flush(self) -> None:
        self._overlay.flush()

    def block_status(self, offset: int, length: int) -> Sequence[Extent]:
        out: list[Extent] = []
        for start, end, mine in self._runs(offset, offset + length):
            src = self._overlay if mine else self._base
            want = end - start
            got = 0
            for ext_len, flags in src.block_status(start, want):
                ext_len = min(ext_len, want - got)
                if ext_len <= 0:
                    break
                out.append((ext_len, flags))
                got += ext_len
            if got < want or len(out) >= MAX_EXTENTS:
                break
        return merge_extents(out)

    def cache(self, offset: int, length: int) -> None:
        self._base.cache(offset, length)

    def stats(self) -> dict[str, int | float]:
        n = self._present.count(1)
        return {"clusters": self._nclusters, "clusters_in_overlay": n, "overlay_bytes": n * self._cs}

    def close(self) -> None:
        self._overlay.close()
        if self._close_base:
            self._base.close()


# --- content-addressed chunk store ---------------------------------------------------------------
@dataclass(frozen=True)
class DedupStats:
    """What the chunk store saves: bytes the exports map versus bytes really stored."""

    chunk_size: int
    referenced_chunks: int  # non-zero chunks mapped by all exports together
    unique_chunks: int  # distinct chunks stored
    referenced_bytes: int
    stored_bytes: int

    @property
    def saved_bytes(self) -> int:
        return self.referenced_bytes - self.stored_bytes

    @property
    def ratio(self) -> float:
        """Referenced / stored (1.0 means no deduplication, 2.0 halves the space)."""
        return self.referenced_bytes / self.stored_bytes if self.stored_bytes else 1.0


@dataclass
class ChunkStore:
    """Chunks of ``chunk_size`` bytes keyed by their BLAKE2b digest, with reference counts.

    All-zero chunks are never stored (an unmapped chunk reads as zeroes). Shared between
    several :class:`DedupBackend` exports, identical blocks across them are stored once.
    """

    chunk_size: int = 4096
    _data: dict[bytes, bytes] = field(default_factory=dict, repr=False)
    _refs: dict[bytes, int] = field(default_factory=dict, repr=False)

    def __post_init__(self) -> None:
        cs = self.chunk_size
        if cs < 512 or cs & (cs - 1):
            raise ConfigError.single("chunk_size", "must be a power of two of at least 512")
        self.zero_digest = self.digest(bytes(cs))

    @staticmethod
    def digest(data: BytesLike) -> bytes:
        return hashlib.blake2b(data, digest_size=20).digest()

    def put(self, data: BytesLike, digest: bytes | None = None) -> bytes:
        """Add one reference to the chunk ``data`` (exactly ``chunk_size`` bytes); return its key."""
        d = digest if digest is not None else self.digest(data)
        refs = self._refs.get(d)
        if refs is None:
            self._data[d] = bytes(data)
            self._refs[d] = 1
        else:
            if self._data[d] != data:  # a 160-bit collision: never seen, but never silently wrong
                raise BackendError(p.EIO, "chunk digest collision")
            self._refs[d] = refs + 1
        return d

    def get(self, digest: bytes) -> bytes:
        return self._data[digest]

    def release(self, digest: bytes) -> None:
        refs = self._refs[digest] - 1
        if refs:
            self._refs[digest] = refs
        else:
            del self._refs[digest]
            del self._data[digest]

    def stats(self) -> DedupStats:
        referenced = sum(self._refs.values())
        unique = len(self._data)
        cs = self.chunk_size
        return DedupStats(cs, referenced, unique, referenced * cs, unique * cs)


class DedupBackend(Backend):
    """An export whose blocks live in a :class:`ChunkStore`: identical blocks are stored once.

    Partial-chunk writes read, modify and re-hash the chunk. Trim and zero unmap whole chunks
    (zeroes cost nothing); block status reports unmapped chunks as holes.
    """

    def __init__(self, size: int, *, store: ChunkStore | None = None, chunk_size: int = 4096) -> None:
        if size < 0:
            raise ConfigError.single("size", "must not be negative")
        self.store = store if store is not None else ChunkStore(chunk_size)
        self._cs = self.store.chunk_size
        self._size = size
        self._map: list[bytes | None] = [None] * ((size + self._cs - 1) // self._cs)
        self._zeroes = memoryview(bytes(self._cs))
        self._scratch = bytearray(self._cs)

    @classmethod
    def from_file(
        cls, path: str | os.PathLike[str], *, store: ChunkStore | None = None, chunk_size: int = 4096
    ) -> DedupBackend:
        """A new export holding a copy of ``path`` (the file itself is not changed)."""
        with FileBackend(path, read_only=True) as src:
            backend = cls(src.size, store=store, chunk_size=chunk_size)
            step = max(backend._cs, 1 << 20)
            buf = bytearray(step)
            for off in range(0, src.size, step):
                n = min(step, src.size - off)
                view = memoryview(buf)[:n]
                src.read_into(off, view)
                backend.write(off, view)
        return backend

    @property
    def size(self) -> int:
        return self._size

    @property
    def capabilities(self) -> Capabilities:
        return Capabilities(volatile=True, trim=True, zero=True, fast_zero=True, block_status=True, multi_conn=True)

    def read_into(self, offset: int, buf: memoryview) -> None:
        cs = self._cs
        end = offset + len(buf)
        pos = offset
        i = 0
        chunks = self._map
        data = self.store._data
        while pos < end:
            c, within = divmod(pos, cs)
            n = min(cs - within, end - pos)
            d = chunks[c]
            if d is None:
                buf[i : i + n] = self._zeroes[:n]
            else:
                buf[i : i + n] = memoryview(data[d])[within : within + n]
            pos += n
            i += n

    def _set(self, c: int, chunk: BytesLike) -> None:
        store = self.store
        d = store.digest(chunk)
        new = None if d == store.zero_digest else store.put(chunk, d)
        old = self._map[c]
        if old is not None:
            store.release(old)
        self._map[c] = new

    def write(self, offset: int, data: BytesLike, *, fua: bool = False) -> None:
        cs = self._cs
        view = data if isinstance(data, memoryview) else memoryview(data)
        end = offset + len(view)
        pos = offset
        i = 0
        while pos < end:
            c, within = divmod(pos, cs)
            n = min(cs - within, end - pos)
            if n == cs:
                self._set(c, view[i : i + n])
            else:
                scratch = self._scratch
                old = self._map[c]
                scratch[:] = self._zeroes if old is None else self.store.get(old)
                scratch[within : within + n] = view[i : i + n]
                self._set(c, scratch)
            pos += n
            i += n

    def zero(self, offset: int, length: int, *, may_trim: bool = True, fast: bool = False, fua: bool = False) -> None:
        cs = self._cs
        end = offset + length
        pos = offset
        while pos < end:
            c, within = divmod(pos, cs)
            n = min(cs - within, end - pos)
            old = self._map[c]
            if old is not None:
                if n == cs or (c * cs + within + n >= self._size and within == 0):
                    self.store.release(old)
                    self._map[c] = None
                else:
                    scratch = self._scratch
                    scratch[:] = self.store.get(old)
                    scratch[within : within + n] = self._zeroes[:n]
                    self._set(c, scratch)
            pos += n

    def trim(self, offset: int, length: int, *, fua: bool = False) -> None:
        self.zero(offset, length)

    def block_status(self, offset: int, length: int) -> Sequence[Extent]:
        cs = self._cs
        end = offset + length
        pos = offset
        out: list[Extent] = []
        chunks = self._map
        while pos < end and len(out) < MAX_EXTENTS:
            c = pos // cs
            mapped = chunks[c] is not None
            c2 = c + 1
            last = (end - 1) // cs
            while c2 <= last and (chunks[c2] is not None) == mapped:
                c2 += 1
            stop = min(end, c2 * cs)
            out.append((stop - pos, 0 if mapped else HOLE_ZERO))
            pos = stop
        return out

    def stats(self) -> dict[str, int | float]:
        s = self.store.stats()
        mapped = sum(1 for d in self._map if d is not None)
        return {
            "chunk_size": s.chunk_size,
            "export_mapped_bytes": mapped * s.chunk_size,
            "store_referenced_bytes": s.referenced_bytes,
            "store_stored_bytes": s.stored_bytes,
            "store_saved_bytes": s.saved_bytes,
            "store_ratio": round(s.ratio, 3),
        }

    def close(self) -> None:
        for c, d in enumerate(self._map):
            if d is not None:
                self.store.release(d)
                self._map[c] = None


# --- registry -------------------------------------------------------------------------------------
BackendFactory = Callable[..., Backend]
_REGISTRY: dict[str, BackendFactory] = {}


def register_backend(name: str, factory: BackendFactory, *, replace: bool = False) -> None:
    """Make ``factory(**options)`` available as backend ``name`` (``vmkit nbd serve --backend``).

    Factories called from the CLI receive the keywords ``path`` (or None), ``size`` (or None)
    and ``read_only``; they should reject what they cannot use with a ConfigError.
    """
    if not name or not name.replace("-", "").replace("_", "").isalnum():
        raise ConfigError.single("backend", f"invalid backend name {name!r}")
    if name in _REGISTRY and not replace:
        raise ConfigError.single("backend", f"a backend named {name!r} is already registered")
    _REGISTRY[name] = factory


def unregister_backend(name: str) -> None:
    _REGISTRY.pop(name, None)


def registered_backends() -> list[str]:
    return sorted(_REGISTRY)


def create_backend(name: str, **options: Any) -> Backend:
    """Build a backend by registered name."""
    try:
        factory = _REGISTRY[name]
    except KeyError:
        raise NotFoundError(
            "NBD backend", name, hint=f"registered backends: {', '.join(registered_backends())}"
        ) from None
    return factory(**options)


def _need_path(name: str, path: str | os.PathLike[str] | None) -> str | os.PathLike[str]:
    if path is None:
        raise ConfigError.single("backend", f"the {name!r} backend needs a file")
    return path


def _file_factory(
    *, path: str | os.PathLike[str] | None = None, read_only: bool = False, size: int | None = None
) -> Backend:
    if size is not None:
        raise ConfigError.single("size", "the 'file' backend takes its size from the file")
    return FileBackend(_need_path("file", path), read_only=read_only)


def _memory_factory(
    *, size: int | None = None, path: str | os.PathLike[str] | None = None, read_only: bool = False
) -> Backend:
    if path is not None:
        raise ConfigError.single("backend", "the 'memory' backend takes a size, not a file")
    if size is None:
        raise ConfigError.single("size", "the 'memory' backend needs a size")
    return MemoryBackend(size)


def _cow_factory(
    *,
    path: str | os.PathLike[str] | None = None,
    read_only: bool = False,
    size: int | None = None,
    cluster_size: int = 64 * 1024,
) -> Backend:
    if size is not None:
        raise ConfigError.single("size", "the 'cow' backend takes its size from the base file")
    return CowBackend(FileBackend(_need_path("cow", path), read_only=True), cluster_size=cluster_size)


def _dedup_factory(
    *,
    path: str | os.PathLike[str] | None = None,
    size: int | None = None,
    read_only: bool = False,
    chunk_size: int = 4096,
    store: ChunkStore | None = None,
) -> Backend:
    if path is not None:
        if size is not None:
            raise ConfigError.single("size", "give a file or a size for 'dedup', not both")
        return DedupBackend.from_file(path, store=store, chunk_size=chunk_size)
    if size is None:
        raise ConfigError.single("size", "the 'dedup' backend needs a file to import or a size")
    return DedupBackend(size, store=store, chunk_size=chunk_size)


register_backend("file", _file_factory)
register_backend("memory", _memory_factory)
register_backend("cow", _cow_factory)
register_backend("dedup", _dedup_factory)
