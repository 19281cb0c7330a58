"""A small, deterministic writer (and reader) of cpio "newc" archives, as Linux initramfs images.

The kernel unpacks a (compressed) cpio archive in the "newc" format (magic ``070701``) into its
root file system. :class:`CpioArchive` collects entries in memory -- directories, regular files,
symbolic links and character/block device nodes -- and writes them:

* sorted by path (so every parent directory precedes its children),
* owned by uid/gid 0, with one fixed mtime (0 unless given),
* with inode numbers assigned in that order,
* gzip-compressed with a zero gzip timestamp and no file name,

so the same entries always give the same bytes, whatever order they were added in and whatever
the host's clock or umask.

Example::

    archive = CpioArchive()
    archive.add_file("init", script, mode=0o755)
    archive.add_char_device("dev/console", 5, 1)
    archive.write(Path("initrd.img"))

:func:`read_archive` parses such an archive back (used by tests and for inspecting images).
"""

from __future__ import annotations

import gzip
import io
import stat
from dataclasses import dataclass
from pathlib import Path, PurePosixPath

from vmkit.errors import ImageError
from vmkit.fsutil import atomic_write

NEWC_MAGIC = b"070701"
TRAILER = "TRAILER!!!"
_HEADER_LEN = 110


@dataclass(frozen=True)
class CpioEntry:
    """One member of an archive. ``mode`` includes the file type bits (``stat.S_IFREG`` ...)."""

    path: str  # relative, no leading "/", e.g. "bin/busybox"
    mode: int
    data: bytes = b""  # file contents, or the target of a symlink
    rdev_major: int = 0
    rdev_minor: int = 0
    uid: int = 0
    gid: int = 0
    mtime: int = 0
    nlink: int = 1

    @property
    def kind(self) -> str:
        """"dir", "file", "symlink", "chardev", "blockdev" or "other"."""
        fmt = stat.S_IFMT(self.mode)
        return {
            stat.S_IFDIR: "dir",
            stat.S_IFREG: "file",
            stat.S_IFLNK: "symlink",
            stat.S_IFCHR: "chardev",
            stat.S_IFBLK: "blockdev",
        }.get(fmt, "other")

    @property
    def permissions(self) -> int:
        return stat.S_IMODE(self.mode)


def normalize_path(path: str | PurePosixPath) -> str:
    """``"/usr//bin/"`` -> ``"usr/bin"``; reject ``..`` and empty paths."""
    text = str(path).strip("/")
    parts = [p for p in text.split("/") if p not in ("", ".")]
    if not parts or ".." in parts or any("\0" in p for p in parts):
        raise ImageError(f"invalid path for an initramfs entry: {str(path)!r}")
    return "/".join(parts)


class CpioArchive:
    """An in-memory set of archive entries, written deterministically (see module docstring).

    Adding a path twice replaces the earlier entry. Missing parent directories are created
    (mode 0755) when an entry is added.
    """

    def __init__(self, *, mtime: int = 0) -> None:
        self.mtime = mtime
        self._entries: dict[str, CpioEntry] = {}

    def __contains__(self, path: object) -> bool:
        return isinstance(path, str) and normalize_path(path) in self._entries

    def __len__(self) -> int:
        return len(self._entries)

    def entries(self) -> list[CpioEntry]:
        """Entries in archive order (sorted by path)."""
        return [self._entries[p] for p in sorted(self._entries)]

    def _parents(self, path: str) -> None:
        parts = path.split("/")[:-1]
        for i in range(1, len(parts) + 1):
            parent = "/".join(parts[:i])
            existing = self._entries.get(parent)
            if existing is None:
                self._put(CpioEntry(parent, stat.S_IFDIR | 0o755, nlink=2, mtime=self.mtime))
            elif existing.kind != "dir":
                raise ImageError(f"initramfs: {parent!r} is a {existing.kind}, not a directory")

    def _put(self, entry: CpioEntry) -> None:
        self._entries[entry.path] = entry

    def add_dir(self, path: str, mode: int = 0o755) -> None:
        p = normalize_path(path)
        self._parents(p)
        self._put(CpioEntry(p, stat.S_IFDIR | stat.S_IMODE(mode), nlink=2, mtime=self.mtime))

    def add_file(self, path: str, data: bytes, mode: int = 0o644) -> None:
        p = normalize_path(path)
        self._parents(p)
        self._put(CpioEntry(p, stat.S_IFREG | stat.S_IMODE(mode), data=bytes(data), mtime=self.mtime))

    def add_symlink(self, path: str, target: str) -> None:
        if not target or "\0" in target:
            raise ImageError(f"initramfs: invalid symlink target {target!r} for {path!r}")
        p = normalize_path(path)
        self._parents(p)
        self._put(CpioEntry(p, stat.S_IFLNK | 0o777, data=target.encode(), mtime=self.mtime))

    def add_char_device(self, path: str, major: int, minor: int, mode: int = 0o600) -> None:
        p = normalize_path(path)
        self._parents(p)
        self._put(CpioEntry(p, stat.S_IFCHR | stat.S_IMODE(mode), rdev_major=major, rdev_minor=minor,
                            mtime=self.mtime))

    def add_block_device(self, path: str, major: int, minor: int, mode: int = 0o600) -> None:
        p = normalize_path(path)
        self._parents(p)
        self._put(CpioEntry(p, stat.S_IFBLK | stat.S_IMODE(mode), rdev_major=major, rdev_minor=minor,
                            mtime=self.mtime))

    def add_host_file(self, path: str, source: Path, mode: int | None = None) -> None:
        """Add a host file's contents (its permission bits unless ``mode`` is given)."""
        perms = stat.S_IMODE(source.stat().st_mode) if mode is None else mode
        self.add_file(path, source.read_bytes(), perms)

    def to_cpio(self) -> bytes:
        """The uncompressed newc archive, trailer included."""
        out = io.BytesIO()
        for ino, entry in enumerate(self.entries(), start=1):
            _write_entry(out, entry, ino)
        _write_entry(out, CpioEntry(TRAILER, 0, nlink=1), 0)
        return out.getvalue()

    def to_bytes(self, *, compress: bool = True, level: int = 9) -> bytes:
        """The archive, gzip-compressed unless ``compress`` is false."""
        raw = self.to_cpio()
        if not compress:
            return raw
        buf = io.BytesIO()
        # filename="" and mtime=0 keep the gzip header free of host details.
        with gzip.GzipFile(filename="", mode="wb", compresslevel=level, fileobj=buf, mtime=0) as gz:
            gz.write(raw)
        return buf.getvalue()

    def write(self, path: Path, *, compress: bool = True, mode: int = 0o644) -> None:
        """Write the archive to ``path`` atomically."""
        atomic_write(path, self.to_bytes(compress=compress), mode)


def _pad4(n: int) -> int:
    return (4 - n % 4) % 4


def _write_entry(out: io.BytesIO, entry: CpioEntry, ino: int) -> None:
    name = entry.path.encode() + b"\0"
    fields = (
        ino, entry.mode, entry.uid, entry.gid, entry.nlink, entry.mtime, len(entry.data),
        0, 0, entry.rdev_major, entry.rdev_minor, len(name), 0,
    )
    for value in fields:
        if not 0 <= value <= 0xFFFFFFFF:
            raise ImageError(f"initramfs: entry {entry.path!r} has a field out of range ({value})")
    header = NEWC_MAGIC + b"".join(b"%08X" % v for v in fields)
    out.write(header)
    out.write(name)
    out.write(b"\0" * _pad4(_HEADER_LEN + len(name)))
    out.write(entry.data)
    out.write(b"\0" * _pad4(len(entry.data)))


def read_archive(data: bytes) -> list[CpioEntry]:
    """Parse a newc archive (gzip-compressed or not) into its entries, trailer excluded.

    Several concatenated archives (as the kernel accepts) are read one after the other.
    Raises :class:`ImageError` on malformed input.
    """
    if data[:2] == b"\x1f\x8b":
        try:
            data = gzip.decompress(data)
        except (OSError, EOFError) as exc:
            raise ImageError(f"initramfs: bad gzip data: {exc}") from exc
    entries: list[CpioEntry] = []
    pos = 0
    while pos < len(data):
        if data[pos:pos + 1] == b"\0":  # padding between concatenated archives
            pos += 1
            continue
        if data[pos:pos + 6] != NEWC_MAGIC:
            raise ImageError(f"initramfs: no newc header at offset {pos}")
        try:
            f = [int(data[pos + 6 + 8 * i: pos + 14 + 8 * i], 16) for i in range(13)]
        except ValueError as exc:
            raise ImageError(f"initramfs: malformed header at offset {pos}") from exc
        _ino, mode, uid, gid, nlink, mtime, size, _maj, _min, rmaj, rmin, namesize, _check = f
        name_start = pos + _HEADER_LEN
        name = data[name_start:name_start + namesize - 1].decode()
        body = name_start + namesize + _pad4(_HEADER_LEN + namesize)
        content = data[body:body + size]
        if len(content) != size:
            raise ImageError(f"initramfs: entry {name!r} is truncated")
        pos = body + size + _pad4(size)
        if name == TRAILER:
            continue
        entries.append(CpioEntry(name, mode, content, rmaj, rmin, uid, gid, mtime, nlink))
    return entries
