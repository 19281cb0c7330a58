"""Save files: a versioned header, then QEMU's migration stream, compressed, encrypted and authenticated.

File layout (format version 2; all integers big-endian)::

    offset      size  field
    0           12    magic  b"\\x89VMKITSTATE\\n"
    12          4     format version (u32) = 2
    16          4     header length N (u32, at most 1 MiB)
    20          N     header: UTF-8 JSON object (StateHeader fields + "encryption" parameters)
    20+N        16    header tag: AES-256-GCM tag over an empty plaintext,
                      nonce = prefix || 0xFFFFFFFFFFFFFFFF, AAD = H || 0x02
    36+N        ...   records; record i:
                        8    record header R: u32 flags|stored length, u32 plaintext length
                             (bit 31 = final record, bit 30 = compressed, bits 0-29 = stored
                             length S; bits 30-31 of the second word are zero)
                        S    ciphertext of the stored bytes (the chunk, or its zstd frame)
                        16   tag; nonce_i = prefix || i (u64), AAD_i = H || R

``H`` is SHA-256 of bytes ``[0, 20+N)`` (magic, version, length and header JSON), so every
record and the header tag authenticate the whole header, and each record's tag authenticates
its own record header: a flipped "compressed" or "final" bit, or a changed length, fails
authentication like any other changed byte. Every chunk but the last holds exactly
``chunk_size`` plaintext bytes; the last one holds fewer (possibly zero) and is the only one
with the final bit, so a file cut anywhere (even exactly between two records, or right after
the header) fails authentication. Data after the final record is refused too.

Compression: each chunk is stored as a zstd frame (``"compression": "zstd"`` in the header)
when that is smaller, else raw. Whether a chunk is worth compressing is decided from a few
4 KiB samples, so incompressible memory (random or already compressed data) costs only the
samples. QEMU's stream compresses well even when the pages themselves do not (page headers,
zero-page markers, kernel text), so the file is smaller than QEMU's own stream. A save must
not be slower for it, though, so while QEMU streams there are two tiers. Cheap chunks (samples
shrink below a quarter: mostly zero or repetitive pages, which zstd compresses at several GB/s)
are always compressed. Merely compressible ones are compressed when the disk is the slower part
(a full block waits behind the one being written: fewer bytes is then what makes the save
faster), or else when a CPU is spare for it (QEMU's migration thread takes one and the reading
thread another, so at least three) and QEMU is not waiting on that chunk (no full chunk is
queued behind it); otherwise they are stored raw. Compressing
before encrypting lets the size of each record depend on the content (the CRIME/BREACH class
of leaks); that needs an attacker who can make the machine save again and again with content
of their choosing and watch the sizes, which a local save file does not offer.

Format version 1 (still read, no longer written) has no record headers: record i is the
ciphertext of chunk i (``chunk_size`` bytes, fewer for the final one) || tag, with
AAD_i = H || 0x01 for the final record and H || 0x00 otherwise; the final record is the
short one.

The AES key of each file is derived with HKDF-SHA256 from the user's key (:mod:`vmkit.state.key`)
and a random 32-byte salt stored in the header, and the 4-byte nonce prefix is random: nonces
never repeat across files or within one. The header also records a fingerprint of the user's
key so that "written with another key" can be told apart from "modified".

The header can be read without the key for display (:func:`read_header`, unauthenticated);
:class:`StateFileReader` authenticates it before returning it. Files are written 0600 to a
hidden temporary file in the same directory, fsynced and renamed over the final name, so a
crash or a full disk leaves any earlier save file untouched. The fsync costs little: the
records are written with O_DIRECT from a thread of their own while QEMU is still streaming
(where the file system refuses O_DIRECT, buffered writes with ``sync_file_range`` started
every 64 MiB), so the disk works all along instead of only at the end. The file is therefore
not in the page cache afterwards; :func:`prefetch` starts reading it before a restore.

The payload is QEMU's migration stream. :func:`save_from_fd` pumps the pipe QEMU migrates into
and :func:`restore_to_fd` feeds a pipe QEMU reads its incoming migration from, both in a worker
thread so the event loop never blocks.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import contextlib
import ctypes
import errno
import fcntl
import functools
import hashlib
import io
import json
import mmap
import os
import queue
import re
import secrets
import select
import stat
import struct
import tempfile
import threading
import time
from collections.abc import Awaitable, Callable, Iterator, Mapping
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from types import TracebackType
from typing import Any, Generic, Literal, Self, TypeVar

import zstandard
from cryptography.exceptions import InvalidTag
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.ciphers.aead import AESGCM
from cryptography.hazmat.primitives.kdf.hkdf import HKDF
from pydantic import BaseModel, ConfigDict, Field, ValidationError

from vmkit.errors import ExitCode, VmkitError
from vmkit.fsutil import fsync_dir
from vmkit.state.key import KEY_SIZE, key_id
from vmkit.version import __version__

__all__ = [
    "DEFAULT_CHUNK_SIZE",
    "DEFAULT_COMPRESSION_LEVEL",
    "FORMAT_VERSION",
    "MAGIC",
    "AuthenticationFailed",
    "ConfigMismatch",
    "DiskIdentity",
    "DisksChanged",
    "IncompatibleQemu",
    "NoSpace",
    "NotAStateFile",
    "ProgressCallback",
    "RestoreInfo",
    "SaveInfo",
    "StateFileError",
    "StateFileInfo",
    "StateFileReader",
    "StateFileWriteError",
    "StateFileWriter",
    "StateHeader",
    "UnsupportedFormatVersion",
    "check_compatible",
    "disk_identity",
    "iter_payload",
    "prefetch",
    "read_header",
    "read_info",
    "reencrypt",
    "restore_to_fd",
    "save_from_fd",
]

MAGIC = b"\x89VMKITSTATE\n"
FORMAT_VERSION = 2
SUPPORTED_VERSIONS = (1, 2)
DEFAULT_CHUNK_SIZE = 4 << 20
MIN_CHUNK_SIZE = 4 << 10
MAX_CHUNK_SIZE = 64 << 20
MAX_HEADER_LEN = 1 << 20
TAG_SIZE = 16
SALT_SIZE = 32
NONCE_PREFIX_SIZE = 4
DISK_HEAD_BYTES = 64 << 10

_PREAMBLE = struct.Struct(">12sII")
_RECORD = struct.Struct(">II")  # format 2: flags | stored length, plaintext length
_REC_FINAL = 1 << 31
_REC_COMPRESSED = 1 << 30
_REC_LENGTH = (1 << 30) - 1
DEFAULT_COMPRESSION_LEVEL = -1
"""zstd level of a save (negative levels are zstd's fast ones). On the streams of the micro guests
of benchmarks/save_bench.py (RAM mostly random), compressing every 512 KiB chunk took 0.64 s of CPU
per GiB of RAM at level 1 (file 0.899x QEMU's stream) and 0.41 s at -1 (0.906x), most of it
spent on chunks that do not compress; with the probes, level -1 costs ~0.05 s (256 MiB guest,
0.80x) and ~0.08 s (1 GiB guest, 0.91x). QEMU's own migration thread needs one of the two cores
here, so every CPU second shows."""
_PROBES = 4  # samples of _PROBE_BYTES tried before compressing a whole chunk
_PROBE_BYTES = 4096
_PROBE_RATIO = 0.625  # compress a chunk if its samples shrink to this fraction of their size, on average
_CHEAP_RATIO = 0.25  # ... and always if they shrink to this: such chunks compress at several GB/s
_SPARE_CPUS = 3  # CPUs a save needs before compressing more than the cheap chunks (QEMU + reader + sealer)
_HEADER_COUNTER = (1 << 64) - 1
_FLAG_MORE = b"\x00"
_FLAG_FINAL = b"\x01"
_FLAG_HEADER = b"\x02"
_HKDF_INFO = b"vmkit state file v1 AES-256-GCM"
_POLL_SECONDS = 0.2
_PIPE_SIZE = 1 << 20
# Start writeback every 64 MiB. Measured with real QEMU saving a paused guest (~1 GB/s into the pipe,
# benchmarks/save_bench.py): 8-16 MiB windows made saves 2x slower (sync_file_range calls competing
# with QEMU and the pump for two CPUs); 64 MiB matched plain `cat > file`, and a paced 140 MiB/s
# producer (benchmarks/statefile_bench.py --rate-mib 140) was as fast with 64 as with 8.
_WRITEBACK_WINDOW = 64 << 20
_SYNC_FILE_RANGE_WRITE = 2

ProgressCallback = Callable[[int, int | None], None]
"""Called with (payload bytes done, payload bytes in total or None if not known yet)."""

_T = TypeVar("_T")

DISCARD_HINT = "discard the state file and cold-boot the machine"


# --------------------------------------------------------------------------- errors


def _file_label(path: Path | None) -> str:
    return f"state file {path}" if path is not None else "the state file"


class StateFileError(VmkitError):
    """A save file cannot be written, read or used. Base of every state-file error."""

    exit_code = ExitCode.STATE_FILE
    path: Path | None = None

    def __init__(self, message: str, *, path: Path | None = None, hint: str | None = DISCARD_HINT) -> None:
        if hint == DISCARD_HINT and path is not None:
            hint = f"discard the state file ({path}) and cold-boot the machine"
        super().__init__(message, hint=hint)
        self.path = path


class NotAStateFile(StateFileError):
    """The file does not start with the state-file magic (or is too short to)."""

    exit_code = ExitCode.NOT_A_STATE_FILE

    def __init__(self, path: Path | None, reason: str) -> None:
        super().__init__(f"{path if path is not None else 'file'} is not a vmkit state file: {reason}", path=path)
        self.reason = reason


class UnsupportedFormatVersion(StateFileError):
    """The file uses a format version this vmkit cannot read."""

    exit_code = ExitCode.STATE_FORMAT

    def __init__(self, path: Path | None, found: int, supported: tuple[int, ...] = SUPPORTED_VERSIONS) -> None:
        newer = found > max(supported)
        why = "written by a newer vmkit" if newer else "written by an older vmkit"
        super().__init__(
            f"{_file_label(path)} uses format version {found} ({why}); "
            f"this vmkit ({__version__}) reads version {', '.join(map(str, supported))}",
            path=path,
            hint=("restore it with the vmkit that wrote it, or " if newer else "")
            + f"discard it{f' ({path})' if path is not None else ''} and cold-boot the machine",
        )
        self.found = found
        self.supported = supported


class IncompatibleQemu(StateFileError):
    """The QEMU version or machine type differs from the one that wrote the file."""

    exit_code = ExitCode.STATE_QEMU

    def __init__(
        self,
        path: Path | None,
        *,
        saved_version: str,
        saved_machine: str,
        current_version: str,
        current_machine: str,
        reason: str,
    ) -> None:
        super().__init__(
            f"{_file_label(path)} was written by QEMU {saved_version} with machine type "
            f"{saved_machine!r}, this machine runs QEMU {current_version} with {current_machine!r}: {reason}",
            path=path,
        )
        self.saved_version = saved_version
        self.saved_machine = saved_machine
        self.current_version = current_version
        self.current_machine = current_machine
        self.reason = reason


class ConfigMismatch(StateFileError):
    """The machine's configuration (or its RAM size) changed since the save."""

    exit_code = ExitCode.STATE_CONFIG

    def __init__(self, path: Path | None, *, field: str, saved: str, current: str) -> None:
        super().__init__(
            f"{_file_label(path)} was saved from a different configuration: {field} was {saved}, it is now {current}",
            path=path,
            hint=(
                f"discard the state file{f' ({path})' if path is not None else ''} and cold-boot the machine "
                "(or put the configuration back as it was to restore)"
            ),
        )
        self.field = field
        self.saved = saved
        self.current = current


class AuthenticationFailed(StateFileError):
    """The file was modified, damaged or truncated, or was written with another user's key."""

    exit_code = ExitCode.STATE_AUTH

    def __init__(self, path: Path | None, reason: str) -> None:
        super().__init__(f"{_file_label(path)} cannot be trusted: {reason}", path=path)
        self.reason = reason


class DisksChanged(StateFileError):
    """A disk image differs from the one the machine was saved with."""

    exit_code = ExitCode.STATE_DISKS

    def __init__(self, path: Path | None, changes: tuple[str, ...]) -> None:
        lines = "\n".join(f"  - {c}" for c in changes)
        super().__init__(
            f"the disks changed since {_file_label(path)} was written:\n{lines}",
            path=path,
            hint=(
                f"discard the state file{f' ({path})' if path is not None else ''} and cold-boot the machine; "
                "restore anyway (--force) only if the disks are copies taken together with this save"
            ),
        )
        self.changes = changes


class StateFileWriteError(StateFileError):
    """Writing a save file failed; any earlier file under the same name is unchanged."""

    def __init__(self, path: Path, reason: str, *, hint: str | None = None) -> None:
        super().__init__(
            f"cannot write {_file_label(path)}: {reason}",
            path=path,
            hint=hint or "fix the cause and save again; an earlier save file of that name is unchanged",
        )
        self.reason = reason


class NoSpace(StateFileWriteError):
    """The file system filled up (or the quota was reached) while saving."""

    def __init__(self, path: Path, written: int) -> None:
        super().__init__(
            path,
            f"no space left on the file system of {path.parent} after {written} bytes",
            hint=(
                "free space (a save needs about as much as the guest's used RAM) or save to another "
                "directory, then save again; an earlier save file of that name is unchanged"
            ),
        )
        self.written = written


# --------------------------------------------------------------------------- header model


class DiskIdentity(BaseModel):
    """A cheap identity of a disk image: size, mtime and a digest of its first 64 KiB.

    A copy made with ``cp -a`` / ``cp --preserve=timestamps`` (or ``rsync -t``) keeps the
    identity; any write by a guest or by ``qemu-img`` changes the mtime.
    """

    model_config = ConfigDict(frozen=True, extra="ignore")

    path: str
    format: str
    size: int = Field(ge=0)
    mtime_ns: int
    head_sha256: str

    def same_content(self, other: DiskIdentity) -> bool:
        return (self.format, self.size, self.mtime_ns, self.head_sha256) == (
            other.format,
            other.size,
            other.mtime_ns,
            other.head_sha256,
        )


def disk_identity(path: Path) -> DiskIdentity:
    """Identify the disk image at ``path`` (reads at most 64 KiB)."""
    with open(path, "rb", buffering=0) as fh:
        st = os.fstat(fh.fileno())
        head = fh.read(DISK_HEAD_BYTES)
    fmt = "qcow2" if head[:4] == b"QFI\xfb" else "raw"
    return DiskIdentity(
        path=str(Path(path).absolute()),
        format=fmt,
        size=st.st_size,
        mtime_ns=st.st_mtime_ns,
        head_sha256=hashlib.sha256(head).hexdigest(),
    )


def _vmkit_version() -> str:
    return __version__


def _now() -> datetime:
    return datetime.now(UTC)


class StateHeader(BaseModel):
    """What a save file says about the machine it was taken from.

    Build one for the running machine when saving, and one for the machine about to be
    restored as the ``expected`` side of :func:`check_compatible` (its ``vmkit_version`` and
    ``created_at`` are not compared).
    """

    model_config = ConfigDict(frozen=True, extra="ignore")

    qemu_version: str
    machine_type: str
    config_digest: str
    ram_bytes: int = Field(gt=0)
    disks: tuple[DiskIdentity, ...] = ()
    vmkit_version: str = Field(default_factory=_vmkit_version)
    created_at: datetime = Field(default_factory=_now)


class _Encryption(BaseModel):
    model_config = ConfigDict(frozen=True, extra="forbid")

    cipher: Literal["AES-256-GCM"] = "AES-256-GCM"
    kdf: Literal["HKDF-SHA256"] = "HKDF-SHA256"
    key_id: str
    salt: str = Field(pattern=rf"^[0-9a-f]{{{2 * SALT_SIZE}}}$")
    nonce_prefix: str = Field(pattern=rf"^[0-9a-f]{{{2 * NONCE_PREFIX_SIZE}}}$")
    chunk_size: int = Field(ge=MIN_CHUNK_SIZE, le=MAX_CHUNK_SIZE)
    compression: Literal["zstd"] | None = None  # format 2; records say whether they are compressed


@dataclass(frozen=True)
class StateFileInfo:
    """Everything :func:`read_info` can tell about a file without the key (unauthenticated)."""

    path: Path
    format_version: int
    header: StateHeader
    key_id: str
    chunk_size: int
    file_bytes: int
    payload_bytes: int | None
    """Payload size implied by the file size (format 1) or the record headers (format 2), or None if
    they are inconsistent (truncated)."""


@dataclass(frozen=True)
class SaveInfo:
    path: Path
    header: StateHeader
    payload_bytes: int
    file_bytes: int
    chunks: int
    seconds: float


@dataclass(frozen=True)
class RestoreInfo:
    path: Path
    header: StateHeader
    payload_bytes: int
    seconds: float


# --------------------------------------------------------------------------- crypto helpers


def _derive(key: bytes, salt: bytes) -> AESGCM:
    if len(key) != KEY_SIZE:
        raise ValueError(f"a state-file key is {KEY_SIZE} bytes, got {len(key)}")
    hkdf = HKDF(algorithm=hashes.SHA256(), length=32, salt=salt, info=_HKDF_INFO)
    return AESGCM(hkdf.derive(key))


def _nonce(prefix: bytes, counter: int) -> bytes:
    return prefix + counter.to_bytes(8, "big")


def _record_bytes(body: int, chunk_size: int) -> int | None:
    """Format 1: payload bytes implied by ``body`` bytes of records, or None if that is not a valid length."""
    full, rest = divmod(body, chunk_size + TAG_SIZE)
    return full * chunk_size + rest - TAG_SIZE if rest >= TAG_SIZE else None


def _record_header(raw: bytes, chunk_size: int) -> tuple[bool, bool, int, int] | None:
    """Format 2: (final, compressed, stored length, plaintext length), or None if implausible.

    Plausible: only known bits set, at most ``chunk_size`` stored and plain bytes (a compressed
    chunk is kept only if smaller), exactly ``chunk_size`` plain bytes unless final, and as
    many stored as plain bytes unless compressed. Not authenticated: the record's tag is.
    """
    word, plain = _RECORD.unpack(raw)
    final, compressed, stored = bool(word & _REC_FINAL), bool(word & _REC_COMPRESSED), word & _REC_LENGTH
    if stored > chunk_size or plain > chunk_size or (not final and plain != chunk_size):
        return None
    if (stored >= plain) if compressed else (stored != plain):
        return None
    return final, compressed, stored, plain


def _walk_records(fh: io.FileIO, offset: int, size: int, chunk_size: int) -> int | None:
    """Format 2: payload bytes according to the record headers from ``offset``, or None if they do not
    end with a final record exactly at ``size`` (reads 8 bytes per record, nothing is authenticated)."""
    total = 0
    while offset + _RECORD.size <= size:
        rec = _record_header(os.pread(fh.fileno(), _RECORD.size, offset), chunk_size)
        if rec is None:
            return None
        final, _, stored, plain = rec
        offset += _RECORD.size + stored + TAG_SIZE
        total += plain
        if final:
            return total if offset == size else None
    return None


def _payload_bytes(fh: io.FileIO, parsed: _Parsed, size: int) -> int | None:
    chunk_size = parsed.encryption.chunk_size
    if parsed.version == 1:
        return _record_bytes(size - parsed.data_offset, chunk_size)
    return _walk_records(fh, parsed.data_offset, size, chunk_size)


# --------------------------------------------------------------------------- header parsing


@dataclass(frozen=True)
class _Parsed:
    version: int
    header_bytes: bytes  # magic .. end of JSON: what H covers
    document: dict[str, Any]  # the header JSON without "encryption" (may hold more than StateHeader)
    header: StateHeader | None  # None if the JSON is a valid object but not a valid StateHeader
    header_problem: str
    encryption: _Encryption
    header_tag: bytes

    @property
    def data_offset(self) -> int:
        return len(self.header_bytes) + TAG_SIZE


def _read_exact(fh: io.FileIO, n: int) -> bytes:
    data = b""
    while len(data) < n:
        piece = fh.read(n - len(data))
        if not piece:
            break
        data += piece
    return data


def _parse(fh: io.FileIO, path: Path | None) -> _Parsed:
    pre = _read_exact(fh, _PREAMBLE.size)
    if len(pre) < len(MAGIC) or pre[: len(MAGIC)] != MAGIC:
        if len(pre) < len(MAGIC) and MAGIC.startswith(pre) and pre:
            raise AuthenticationFailed(path, "the file is truncated inside its header")
        raise NotAStateFile(path, "it does not start with the state-file signature")
    if len(pre) < _PREAMBLE.size:
        raise AuthenticationFailed(path, "the file is truncated inside its header")
    _, version, header_len = _PREAMBLE.unpack(pre)
    if version not in SUPPORTED_VERSIONS:
        raise UnsupportedFormatVersion(path, version)
    if header_len > MAX_HEADER_LEN:
        raise AuthenticationFailed(path, f"its header length ({header_len} bytes) is implausible: damaged")
    raw = _read_exact(fh, header_len)
    tag = _read_exact(fh, TAG_SIZE)
    if len(raw) < header_len or len(tag) < TAG_SIZE:
        raise AuthenticationFailed(path, "the file is truncated inside its header")
    try:
        obj = json.loads(raw.decode("utf-8"))
        if not isinstance(obj, dict):
            raise TypeError("not an object")
        enc = _Encryption.model_validate(obj.pop("encryption"))
    except (ValueError, TypeError, KeyError, ValidationError):
        raise AuthenticationFailed(path, "its header is damaged (it was modified or corrupted)") from None
    header: StateHeader | None
    try:
        header, problem = StateHeader.model_validate(obj), ""  # extra="ignore": obj stays whole
    except ValidationError as exc:
        header, problem = None, "; ".join(f"{'.'.join(map(str, e['loc']))}: {e['msg']}" for e in exc.errors())
    return _Parsed(version, pre + raw, obj, header, problem, enc, tag)


def _require_header(parsed: _Parsed, path: Path | None, authenticated: bool) -> StateHeader:
    if parsed.header is not None:
        return parsed.header
    if authenticated:
        raise NotAStateFile(path, f"its header does not describe a saved machine ({parsed.header_problem})")
    raise AuthenticationFailed(path, "its header is damaged (it was modified or corrupted)")


def read_info(path: Path) -> StateFileInfo:
    """Read the header without the key, for display. Nothing here is authenticated."""
    path = Path(path)
    with _open_for_reading(path) as fh:
        parsed = _parse(fh, path)
        size = os.fstat(fh.fileno()).st_size
        return StateFileInfo(
            path=path,
            format_version=parsed.version,
            header=_require_header(parsed, path, authenticated=False),
            key_id=parsed.encryption.key_id,
            chunk_size=parsed.encryption.chunk_size,
            file_bytes=size,
            payload_bytes=_payload_bytes(fh, parsed, size),
        )


def read_header(path: Path) -> StateHeader:
    """The file's header, read without the key, for display only: it is NOT authenticated.

    Use :class:`StateFileReader` (or :func:`restore_to_fd`) before trusting it.
    """
    return read_info(path).header


def _open_for_reading(path: Path) -> io.FileIO:
    try:
        # O_NONBLOCK: a FIFO given as the file must not hang the open (it is refused below)
        fh = io.FileIO(path, "r", opener=lambda p, flags: os.open(p, flags | os.O_NONBLOCK))
    except FileNotFoundError:
        raise NotAStateFile(path, "it does not exist") from None
    except IsADirectoryError:
        raise NotAStateFile(path, "it is a directory") from None
    if not stat.S_ISREG(os.fstat(fh.fileno()).st_mode):
        fh.close()
        raise NotAStateFile(path, "it is not a regular file")
    return fh


# --------------------------------------------------------------------------- compatibility


_VERSION_RE = re.compile(r"^\s*v?(\d+(?:\.\d+)*)")


def _version_tuple(text: str) -> tuple[int, ...] | None:
    m = _VERSION_RE.match(text)
    if not m:
        return None
    parts = tuple(int(p) for p in m.group(1).split("."))
    return parts + (0,) * (3 - len(parts))


def check_compatible(
    header: StateHeader,
    expected: StateHeader,
    *,
    check_disks: bool = True,
    path: Path | None = None,
) -> None:
    """Raise the specific error if a machine described by ``expected`` cannot restore ``header``.

    Checked in this order: machine type and QEMU version (:class:`IncompatibleQemu`: the
    machine type must be identical, the QEMU version equal or newer, as QEMU supports
    migration only forwards), configuration digest and RAM size (:class:`ConfigMismatch`),
    then the disks, slot by slot (:class:`DisksChanged`; skipped with ``check_disks=False``,
    the ``--force`` case). A disk that moved but kept its content is not a change.
    """

    def qemu_error(reason: str) -> IncompatibleQemu:
        return IncompatibleQemu(
            path,
            saved_version=header.qemu_version,
            saved_machine=header.machine_type,
            current_version=expected.qemu_version,
            current_machine=expected.machine_type,
            reason=reason,
        )

    if header.machine_type != expected.machine_type:
        raise qemu_error("the machine type must be the same")
    if header.qemu_version != expected.qemu_version:
        saved, current = _version_tuple(header.qemu_version), _version_tuple(expected.qemu_version)
        if saved is None or current is None:
            raise qemu_error("the QEMU versions differ and cannot be compared")
        if current < saved:
            raise qemu_error("an older QEMU cannot load the state of a newer one")
    if header.config_digest != expected.config_digest:
        raise ConfigMismatch(
            path, field="the configuration digest", saved=header.config_digest, current=expected.config_digest
        )
    if header.ram_bytes != expected.ram_bytes:
        raise ConfigMismatch(
            path, field="the RAM size", saved=_size(header.ram_bytes), current=_size(expected.ram_bytes)
        )
    if check_disks:
        changes = _disk_changes(header.disks, expected.disks)
        if changes:
            raise DisksChanged(path, changes)


def _disk_changes(saved: tuple[DiskIdentity, ...], current: tuple[DiskIdentity, ...]) -> tuple[str, ...]:
    changes: list[str] = []
    if len(saved) != len(current):
        changes.append(f"the machine had {len(saved)} disk(s) when saved, it has {len(current)} now")
    for i, (old, new) in enumerate(zip(saved, current, strict=False)):
        if old.same_content(new):
            continue
        what = []
        if old.format != new.format:
            what.append(f"format {old.format} -> {new.format}")
        if old.size != new.size:
            what.append(f"size {old.size} -> {new.size} bytes")
        if old.mtime_ns != new.mtime_ns:
            what.append("modified since (mtime changed)")
        if old.head_sha256 != new.head_sha256:
            what.append("its header/first 64 KiB changed")
        where = old.path if old.path == new.path else f"{old.path} (now {new.path})"
        changes.append(f"disk {i} {where}: {', '.join(what)}")
    return tuple(changes)


def _size(n: int) -> str:
    for unit, shift in (("GiB", 30), ("MiB", 20), ("KiB", 10)):
        if n >= 1 << shift and n % (1 << shift) == 0:
            return f"{n >> shift} {unit}"
    return f"{n} bytes"


# --------------------------------------------------------------------------- writing


def _load_sync_file_range() -> Callable[[int, int, int, int], int] | None:
    try:
        fn = ctypes.CDLL(None, use_errno=True).sync_file_range
    except (OSError, AttributeError):  # not Linux/glibc: the final fsync does all the work
        return None
    fn.argtypes = [ctypes.c_int, ctypes.c_int64, ctypes.c_int64, ctypes.c_uint]
    fn.restype = ctypes.c_int
    return fn


_sync_file_range = _load_sync_file_range()


class _Flusher:
    """Starts writeback of what the writer wrote, from its own thread.

    The disk then works while QEMU is still producing, so the fsync in ``commit`` finds
    little left to do (a plain ``exec:cat > file`` never fsyncs; this keeps the guarantee
    nearly free). ``sync_file_range(SYNC_FILE_RANGE_WRITE)`` does not wait for the I/O but
    may block on a congested device queue, hence the thread: the writer never waits.
    """

    def __init__(self, fd: int, sync_file_range: Callable[[int, int, int, int], int]) -> None:
        self._fd = fd
        self._sync = sync_file_range
        self._queue: queue.SimpleQueue[tuple[int, int] | None] = queue.SimpleQueue()
        self._thread = threading.Thread(target=self._run, name="vmkit-statefile-flush", daemon=True)
        self._thread.start()

    def submit(self, start: int, end: int) -> None:
        self._queue.put((start, end))

    def close(self, *, discard: bool = False) -> None:
        """Stop after the queued ranges, or dropping them (the fd must stay open until this returns)."""
        while discard:
            try:
                self._queue.get_nowait()
            except queue.Empty:
                break
        self._queue.put(None)
        self._thread.join()

    def _run(self) -> None:
        stop = False
        while not stop:
            item = self._queue.get()
            if item is None:
                return
            start, end = item
            while True:  # merge the ranges that queued up meanwhile
                try:
                    nxt = self._queue.get_nowait()
                except queue.Empty:
                    break
                if nxt is None:
                    stop = True
                    break
                end = nxt[1]
            self._sync(self._fd, start, end - start, _SYNC_FILE_RANGE_WRITE)


_READ_AHEAD = 256 << 20  # bytes a reader asks the kernel to read ahead (posix_fadvise WILLNEED)
_DIRECT_ALIGN = 4096  # O_DIRECT offsets and lengths: a multiple of any logical block size in use
_DIRECT_BLOCK = 4 << 20
_DIRECT_BUFFERS = 3
_DIRECT_IO = True  # O_DIRECT where the file system has it (else buffered writes + _Flusher)


class _QueueThread(Generic[_T]):
    """A daemon thread that hands each queued item to ``handle``, in order, then to ``release``.

    The first exception ``handle`` raises is kept: later items go to ``release`` only, and
    :meth:`check` raises it in the producer. :meth:`abandon` drops whatever is still queued.
    """

    def __init__(self, name: str, handle: Callable[[_T], None], release: Callable[[_T], None]) -> None:
        self._todo: queue.SimpleQueue[_T | None] = queue.SimpleQueue()
        self._handle = handle
        self._release = release
        self._failed: BaseException | None = None
        self._thread: threading.Thread | None = threading.Thread(target=self._run, name=name, daemon=True)
        self._thread.start()

    def put(self, item: _T) -> None:
        self._todo.put(item)

    def backlog(self) -> int:
        """How many items are queued and not yet picked up (approximate, as any queue size)."""
        return self._todo.qsize()

    def _run(self) -> None:
        while (item := self._todo.get()) is not None:
            if self._failed is None:
                try:
                    self._handle(item)
                except BaseException as exc:
                    self._failed = exc
            self._release(item)

    def check(self) -> None:
        """Raise what ``handle`` raised, if it did."""
        if self._failed is not None:
            raise self._failed

    def _join(self) -> None:
        if self._thread is not None:
            self._todo.put(None)
            self._thread.join()
            self._thread = None

    def finish(self) -> None:
        """Wait until everything queued is handled, end the thread; raise what ``handle`` raised."""
        self._join()
        self.check()

    def abandon(self) -> None:
        """Drop what is still queued (released, not handled) and end the thread."""
        self._failed = self._failed or OSError(errno.ECANCELED, "abandoned")
        self._join()


class _DirectSink:
    """Writes a file with O_DIRECT from a thread of its own, in aligned blocks of 4 MiB.

    The producer seals records straight into the current block (:meth:`reserve`/:meth:`advance`);
    a full block goes to the thread and the producer continues in the next of three buffers. So
    the disk is busy from the first block on, no page-cache copy is made and no dirty pages pile
    up for the final fsync (which then only has the metadata and the tail left). The producer
    waits only when all buffers are queued (the disk is slower than the stream). A write error
    is raised in the producer at its next block (or in :meth:`finish`).
    """

    def __init__(self, fd: int, max_record: int) -> None:
        self._fd = fd
        self._capacity = -(-(_DIRECT_BLOCK + max_record) // _DIRECT_ALIGN) * _DIRECT_ALIGN
        self._free: queue.SimpleQueue[mmap.mmap] = queue.SimpleQueue()
        for _ in range(_DIRECT_BUFFERS):
            self._free.put(mmap.mmap(-1, self._capacity))  # page-aligned, as O_DIRECT needs
        self._buf = self._free.get()
        self._view = memoryview(self._buf)
        self._fill = 0
        self._offset = 0  # file offset of the current block
        self._worker = _QueueThread[tuple[mmap.mmap, int]]("vmkit-statefile-write", self._write_block,
                                                           lambda item: self._free.put(item[0]))

    @staticmethod
    def open(fd: int, max_record: int) -> _DirectSink | None:
        """A sink for ``fd`` if its file system takes O_DIRECT (not tmpfs before Linux 6.6), else None."""
        o_direct = getattr(os, "O_DIRECT", 0)
        if not o_direct:
            return None
        try:
            fcntl.fcntl(fd, fcntl.F_SETFL, fcntl.fcntl(fd, fcntl.F_GETFL) | o_direct)
        except OSError:
            return None
        return _DirectSink(fd, max_record)

    def keeping_up(self) -> bool:
        """Whether the disk keeps up: no full block is queued behind the one being written."""
        return self._worker.backlog() == 0

    def reserve(self, n: int) -> memoryview:
        """Room for ``n`` more bytes (at most ``max_record``); fill it, then :meth:`advance`."""
        return self._view[self._fill : self._fill + n]

    def advance(self, n: int) -> None:
        self._fill += n
        if self._fill >= _DIRECT_BLOCK:
            self._submit()

    def write(self, data: memoryview) -> None:
        while data:
            k = min(len(data), _DIRECT_BLOCK - self._fill)
            self._view[self._fill : self._fill + k] = data[:k]
            data = data[k:]
            self.advance(k)

    def _submit(self) -> None:
        self._worker.check()
        nxt = self._free.get()  # waits while the disk is behind
        extra = self._fill - _DIRECT_BLOCK
        nxt[:extra] = self._view[_DIRECT_BLOCK : self._fill]
        self._worker.put((self._buf, self._offset))
        self._offset += _DIRECT_BLOCK
        self._buf, self._view, self._fill = nxt, memoryview(nxt), extra

    def _pwrite_all(self, data: memoryview, offset: int) -> None:
        while data:
            try:
                n = os.pwrite(self._fd, data, offset)
            except OSError as exc:
                flags = fcntl.fcntl(self._fd, fcntl.F_GETFL)
                if exc.errno != errno.EINVAL or not flags & os.O_DIRECT:
                    raise
                # the file system wants another alignment after all: go on with buffered writes
                fcntl.fcntl(self._fd, fcntl.F_SETFL, flags & ~os.O_DIRECT)
                continue
            data, offset = data[n:], offset + n

    def _write_block(self, item: tuple[mmap.mmap, int]) -> None:
        buf, offset = item
        with memoryview(buf) as view:
            self._pwrite_all(view[:_DIRECT_BLOCK], offset)

    def finish(self) -> None:
        """Wait for the queued blocks, then write the last, partial one (its tail without O_DIRECT)."""
        self._worker.finish()
        aligned = self._fill // _DIRECT_ALIGN * _DIRECT_ALIGN
        self._pwrite_all(self._view[:aligned], self._offset)
        if aligned < self._fill:  # the tail is not a whole block: write it through the page cache
            fcntl.fcntl(self._fd, fcntl.F_SETFL, fcntl.fcntl(self._fd, fcntl.F_GETFL) & ~os.O_DIRECT)
            self._pwrite_all(self._view[aligned : self._fill], self._offset + aligned)
        self._fill = 0

    def close(self) -> None:
        """Stop the thread (dropping what is queued is fine: the file is being discarded or is complete)."""
        self._worker.abandon()


_PIPELINE = True
_PIPELINE_BUFFERS = 3


class _Sealer:
    """Seals the full chunks :meth:`StateFileWriter.fill_from_fd` reads, in a thread of its own.

    Reading the pipe then never waits for compression, encryption or a write, so QEMU is not
    held up by a slow chunk while it could still be producing the next one.
    """

    def __init__(self, writer: StateFileWriter) -> None:
        self._writer = writer
        self._free: queue.SimpleQueue[bytearray] = queue.SimpleQueue()
        for _ in range(_PIPELINE_BUFFERS - 1):
            self._free.put(bytearray(writer.chunk_size))
        self._worker = _QueueThread[bytearray]("vmkit-statefile-seal", self._seal, self._free.put)

    def swap(self, full: bytearray) -> bytearray:
        """Queue a full chunk; return an empty buffer (waits while all are queued)."""
        self._worker.check()
        self._worker.put(full)
        while True:
            try:
                return self._free.get(timeout=_POLL_SECONDS)
            except queue.Empty:
                self._worker.check()

    def _seal(self, buf: bytearray) -> None:
        # the next chunk is already waiting: compressing this one would hold the stream up
        self._writer._seal(memoryview(buf), final=False, hurry=self._worker.backlog() > 0)

    def finish(self) -> None:
        """Wait until every queued chunk is sealed; raise what sealing raised."""
        self._worker.finish()

    def stop(self) -> None:
        """Drop what is still queued and wait for the thread (before the file is closed)."""
        self._worker.abandon()


class _Cancelled(Exception):
    """The worker thread was asked to stop."""


def _usable_cpus() -> int:
    try:
        return len(os.sched_getaffinity(0))
    except (AttributeError, OSError):  # not Linux
        return os.cpu_count() or 1


def _create_temp(path: Path, *, unnamed: bool = True) -> tuple[int, str | None]:
    """An fd for the new file's content: unnamed (O_TMPFILE) if possible, else a hidden temp file.

    An unnamed file vanishes by itself if the process dies mid-save.
    """
    o_tmpfile = getattr(os, "O_TMPFILE", 0)
    if unnamed and o_tmpfile and Path("/proc/self/fd").is_dir():
        try:
            fd = os.open(path.parent, o_tmpfile | os.O_WRONLY | os.O_CLOEXEC, 0o600)
        except OSError as exc:
            if exc.errno not in (errno.EOPNOTSUPP, errno.EISDIR, errno.EINVAL, errno.ENOENT):
                raise
        else:
            return fd, None
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    return fd, tmp


class StateFileWriter:
    """Write one state file: feed the payload with :meth:`write`, then :meth:`commit`.

    The file only appears under ``path`` (atomically replacing an earlier one) when
    :meth:`commit` succeeds. As a context manager, a normal exit commits and an exception
    aborts (the temporary file is removed, ``path`` is left as it was).
    Write errors raise :class:`NoSpace` or :class:`StateFileWriteError`, after aborting.
    """

    _unnamed_temp = True  # O_TMPFILE where the file system has it (a subclass can turn it off)
    _fd: int | None = None
    _tmp: str | None = None
    _done = False
    _flusher: _Flusher | None = None
    _sink: _DirectSink | None = None
    _final_written = False
    _prepared = False

    def __init__(
        self,
        path: Path,
        header: StateHeader,
        key: bytes,
        *,
        chunk_size: int = DEFAULT_CHUNK_SIZE,
        compression_level: int | None = DEFAULT_COMPRESSION_LEVEL,
        header_document: Mapping[str, Any] | None = None,
    ) -> None:
        """``compression_level``: zstd level for the chunks that compress (None: store every chunk raw).

        ``header_document``: the header JSON to write instead of ``header``'s fields (that of a file
        being re-encrypted, which may hold fields ``StateHeader`` does not know).
        """
        if not MIN_CHUNK_SIZE <= chunk_size <= MAX_CHUNK_SIZE:
            raise ValueError(f"chunk_size must be within {MIN_CHUNK_SIZE}..{MAX_CHUNK_SIZE}")
        self.path = Path(path)
        self.header = header
        self.chunk_size = chunk_size
        salt = secrets.token_bytes(SALT_SIZE)
        self._prefix = secrets.token_bytes(NONCE_PREFIX_SIZE)
        self._aead = _derive(key, salt)
        self._zstd: zstandard.ZstdCompressor | None = None
        self._probe: zstandard.ZstdCompressor | None = None
        if compression_level is not None:
            self._zstd = zstandard.ZstdCompressor(level=compression_level)
            self._probe = zstandard.ZstdCompressor(level=compression_level, write_content_size=False)
        enc = _Encryption(
            key_id=key_id(key),
            salt=salt.hex(),
            nonce_prefix=self._prefix.hex(),
            chunk_size=chunk_size,
            compression="zstd" if self._zstd is not None else None,
        )
        doc = dict(header_document) if header_document is not None else header.model_dump(mode="json")
        doc["encryption"] = enc.model_dump(mode="json")
        body = json.dumps(doc, sort_keys=True, separators=(",", ":"), ensure_ascii=False).encode()
        head = _PREAMBLE.pack(MAGIC, FORMAT_VERSION, len(body)) + body
        self._digest = hashlib.sha256(head).digest()
        self._buf = bytearray(chunk_size)
        self._view = memoryview(self._buf)
        self._out = memoryview(bytearray(_RECORD.size + chunk_size + TAG_SIZE))
        self._filled = 0
        self._counter = 0
        self.payload_bytes = 0
        self.file_bytes = 0
        self._writeback_from = 0
        self._flusher: _Flusher | None = None
        self._sink: _DirectSink | None = None
        self._started = time.monotonic()
        self._spare_cpu = True  # for the merely compressible chunks (see fill_from_fd)
        with self._aborting():
            self.path.parent.mkdir(parents=True, exist_ok=True)
            self._fd, self._tmp = _create_temp(self.path, unnamed=self._unnamed_temp)
            os.fchmod(self._fd, 0o600)
            if _DIRECT_IO and chunk_size <= DEFAULT_CHUNK_SIZE:
                self._sink = _DirectSink.open(self._fd, len(self._out))
        header_tag = self._aead.encrypt(_nonce(self._prefix, _HEADER_COUNTER), b"", self._digest + _FLAG_HEADER)
        self._write_out(memoryview(head + header_tag))

    # -- feeding

    def write(self, data: bytes | bytearray | memoryview) -> int:
        """Append payload bytes; full chunks are encrypted and written as they fill up."""
        self._check_open()
        view = memoryview(data).cast("B")
        size = len(view)
        cs = self.chunk_size
        while view:
            if self._filled == 0 and len(view) >= cs:
                self._seal(view[:cs], final=False)  # straight from the caller's buffer, no copy
                view = view[cs:]
                continue
            n = min(cs - self._filled, len(view))
            self._view[self._filled : self._filled + n] = view[:n]
            self._filled += n
            view = view[n:]
            if self._filled == cs:
                self._seal(self._view, final=False)
                self._filled = 0
        self.payload_bytes += size
        return size

    def fill_from_fd(
        self,
        fd: int,
        *,
        cancel: threading.Event | None = None,
        on_chunk: Callable[[int], None] | None = None,
    ) -> int:
        """Read ``fd`` until EOF straight into the chunk buffer; return the bytes read.

        Works with blocking and non-blocking fds (pipes, sockets, files). With ``cancel`` the fd
        should be non-blocking: waits are then short polls and :class:`_Cancelled` is raised once
        it is set.
        """
        self._check_open()
        total = 0
        cs = self.chunk_size
        poller = select.poll()
        poller.register(fd, select.POLLIN | select.POLLHUP | select.POLLERR)
        sealer = _Sealer(self) if _PIPELINE else None
        # the producer (QEMU) takes a CPU and this thread another: compressing everything that
        # would shrink needs a third, else it slows the stream down
        self._spare_cpu = _usable_cpus() >= _SPARE_CPUS
        try:
            while True:
                if cancel is not None and cancel.is_set():
                    raise _Cancelled
                try:
                    n = os.readv(fd, [self._view[self._filled :]])
                except (BlockingIOError, InterruptedError):  # wait only when there is nothing to read
                    poller.poll(-1 if cancel is None else _POLL_SECONDS * 1000)
                    continue
                if n == 0:
                    break
                self._filled += n
                total += n
                self.payload_bytes += n
                if self._filled == cs:
                    if sealer is not None:
                        self._buf = sealer.swap(self._buf)
                        self._view = memoryview(self._buf)
                    else:
                        self._seal(self._view, final=False)
                    self._filled = 0
                    if on_chunk is not None:
                        on_chunk(self.payload_bytes)
            if sealer is not None:
                sealer.finish()
        finally:
            if sealer is not None:
                sealer.stop()
        return total

    def _sampled_ratio(self, plain: memoryview) -> float:
        """How far a few samples spread over ``plain`` shrink, on average (0 for a chunk too small to sample).

        Chunks whose samples shrink little are mostly incompressible pages: compressing them costs
        nearly as much CPU time as a chunk that shrinks a lot, for little gain.
        """
        assert self._probe is not None
        n = len(plain)
        if n <= _PROBES * _PROBE_BYTES:
            return 0.0
        step = (n - _PROBE_BYTES) // (_PROBES - 1)
        packed = sum(len(self._probe.compress(plain[i * step : i * step + _PROBE_BYTES])) for i in range(_PROBES))
        return packed / (_PROBES * _PROBE_BYTES)

    def _should_compress(self, plain: memoryview, *, hurry: bool) -> bool:
        """Cheap chunks (mostly zero or repetitive pages) always. The merely compressible ones when the
        disk is the slower part (every buffer is waiting for it: fewer bytes is what helps then), or
        when a CPU is spare for it and the stream is not waiting on this chunk."""
        if not len(plain):
            return False
        disk_behind = self._sink is not None and not self._sink.keeping_up()
        optional = disk_behind or (self._spare_cpu and not hurry)
        ratio = self._sampled_ratio(plain)
        return ratio < _CHEAP_RATIO or (optional and ratio < _PROBE_RATIO)

    def _seal(self, plain: memoryview, *, final: bool, hurry: bool = False) -> None:
        """Seal one chunk. ``hurry``: the stream is waiting on this (see :meth:`_should_compress`)."""
        n = len(plain)
        stored: memoryview | bytes = plain
        compressed = False
        if self._zstd is not None and self._should_compress(plain, hurry=hurry):
            packed = self._zstd.compress(plain)
            if len(packed) < n:
                stored, compressed = packed, True
        self._put_record(stored, n, compressed=compressed, final=final)

    def _put_record(self, stored: memoryview | bytes, plain_bytes: int, *, compressed: bool, final: bool) -> None:
        """Encrypt and write one record holding ``stored`` (``plain_bytes`` once decompressed)."""
        if self._final_written:
            raise ValueError("the final record of the state file is already written")
        self._final_written = final
        size = len(stored)
        word = (_REC_FINAL if final else 0) | (_REC_COMPRESSED if compressed else 0)
        rec = _RECORD.pack(word | size, plain_bytes)
        nonce = _nonce(self._prefix, self._counter)
        aad = self._digest + rec
        self._counter += 1
        total = _RECORD.size + size + TAG_SIZE
        out = self._sink.reserve(total) if self._sink is not None else self._out[:total]
        out[: _RECORD.size] = rec
        if hasattr(self._aead, "encrypt_into"):
            self._aead.encrypt_into(nonce, stored, aad, out[_RECORD.size :])
        else:  # cryptography < 46
            out[_RECORD.size :] = self._aead.encrypt(nonce, bytes(stored), aad)
        if self._sink is not None:
            with self._aborting():
                self._sink.advance(total)
            self.file_bytes += total
        else:
            self._write_out(out)

    def _write_out(self, view: memoryview) -> None:
        assert self._fd is not None
        if self._sink is not None:
            with self._aborting():
                self._sink.write(view)
            self.file_bytes += len(view)
            return
        with self._aborting():
            while view:
                n = os.write(self._fd, view)
                self.file_bytes += n
                view = view[n:]
        if self.file_bytes - self._writeback_from >= _WRITEBACK_WINDOW and _sync_file_range is not None:
            if self._flusher is None:
                self._flusher = _Flusher(self._fd, _sync_file_range)
            self._flusher.submit(self._writeback_from, self.file_bytes)
            self._writeback_from = self.file_bytes

    def _stop_flusher(self, *, discard: bool = False) -> None:
        if self._flusher is not None:
            self._flusher.close(discard=discard)
            self._flusher = None

    @contextlib.contextmanager
    def _aborting(self) -> Iterator[None]:
        """An OSError inside drops the temporary file and becomes :class:`NoSpace` or :class:`StateFileWriteError`."""
        try:
            yield
        except OSError as exc:
            self.abort()
            raise self._error(exc) from exc

    def _error(self, exc: OSError) -> StateFileWriteError:
        if exc.errno in (errno.ENOSPC, errno.EDQUOT):
            return NoSpace(self.path, self.file_bytes)
        return StateFileWriteError(self.path, exc.strerror or str(exc))

    def _check_open(self) -> None:
        if self._done or self._fd is None:
            raise ValueError("the state file writer is already committed or aborted")

    # -- finishing

    def prepare(self) -> None:
        """Write the final chunk (unless :meth:`_put_record` did) and fsync: the new content is on disk,
        in a file without a name or under a hidden temporary one. Only :meth:`commit` remains."""
        self._check_open()
        if self._prepared:
            return
        assert self._fd is not None
        if not self._final_written:
            self._seal(self._view[: self._filled], final=True)
        self._filled = 0
        with self._aborting():
            if self._sink is not None:
                self._sink.finish()
                self._sink.close()
                self._sink = None
            self._stop_flusher()
            os.fsync(self._fd)
        self._prepared = True

    def commit(self) -> SaveInfo:
        """:meth:`prepare`, then rename the file into place (and fsync the directory)."""
        self.prepare()
        assert self._fd is not None
        with self._aborting():
            if self._tmp is None:  # unnamed O_TMPFILE: give it a temporary name first
                name = f".{self.path.name}.{secrets.token_hex(6)}.tmp"
                dir_fd = os.open(self.path.parent, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
                try:  # a dir fd makes os.link use linkat(AT_SYMLINK_FOLLOW), which links the open file
                    os.link(f"/proc/self/fd/{self._fd}", name, dst_dir_fd=dir_fd, follow_symlinks=True)
                finally:
                    os.close(dir_fd)
                self._tmp = str(self.path.parent / name)
            os.close(self._fd)
            self._fd = None
            os.replace(self._tmp, self.path)
            self._tmp = None
            fsync_dir(self.path.parent)
        self._done = True
        return SaveInfo(
            path=self.path,
            header=self.header,
            payload_bytes=self.payload_bytes,
            file_bytes=self.file_bytes,
            chunks=self._counter,
            seconds=time.monotonic() - self._started,
        )

    def abort(self) -> None:
        """Drop the temporary file; ``path`` keeps whatever it held before. Idempotent."""
        self._done = True
        if self._sink is not None:
            self._sink.close()
            self._sink = None
        self._stop_flusher(discard=True)
        if self._fd is not None:
            with contextlib.suppress(OSError):
                os.close(self._fd)
            self._fd = None
        if self._tmp is not None:
            with contextlib.suppress(FileNotFoundError):
                os.unlink(self._tmp)
            self._tmp = None

    def __enter__(self) -> Self:
        return self

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        if exc_type is not None:
            self.abort()
        elif not self._done:
            self.commit()

    def __del__(self) -> None:
        if not self._done:  # dropped without commit or abort: never leak the fd or the temp file
            self.abort()


# --------------------------------------------------------------------------- reading


class StateFileReader:
    """Open a state file with the user's key; the header is authenticated on open.

    :meth:`chunks` then yields the payload chunk by chunk, each authenticated before it is
    yielded; a damaged, truncated or extended file raises :class:`AuthenticationFailed` at the
    first bad chunk (so a consumer may have received the authentic chunks before it).
    """

    def __init__(self, path: Path, key: bytes) -> None:
        self.path = Path(path)
        self._fh = _open_for_reading(self.path)
        try:
            with contextlib.suppress(OSError):  # larger readahead
                os.posix_fadvise(self._fh.fileno(), 0, 0, os.POSIX_FADV_SEQUENTIAL)
            self._advised = 0
            self._read_ahead(0)
            parsed = _parse(self._fh, self.path)
            enc = parsed.encryption
            self._aead = _derive(key, bytes.fromhex(enc.salt))
            self._prefix = bytes.fromhex(enc.nonce_prefix)
            self._digest = hashlib.sha256(parsed.header_bytes).digest()
            try:
                self._aead.decrypt(
                    _nonce(self._prefix, _HEADER_COUNTER), parsed.header_tag, self._digest + _FLAG_HEADER
                )
            except InvalidTag:
                if enc.key_id != key_id(key):
                    raise AuthenticationFailed(
                        self.path,
                        "it was written with a different key (another user's, or a key that has since been re-created)",
                    ) from None
                raise AuthenticationFailed(self.path, "its header was modified or damaged") from None
            self.header = _require_header(parsed, self.path, authenticated=True)
            self.header_document = parsed.document
            """The authenticated header JSON without its encryption parameters (all fields, known or not)."""
            self.format_version = parsed.version
            self.chunk_size = enc.chunk_size
            self.compression = enc.compression
            self.file_bytes = os.fstat(self._fh.fileno()).st_size
            self._parsed = parsed
        except BaseException:
            self.close()
            raise

    @functools.cached_property
    def payload_bytes(self) -> int | None:
        """Payload size implied by the file size or record headers (None if inconsistent: truncated).

        Not authenticated (the chunks are); in format 2 this reads the record headers.
        """
        return _payload_bytes(self._fh, self._parsed, self.file_bytes)

    def close(self) -> None:
        self._fh.close()

    def __enter__(self) -> Self:
        return self

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        self.close()

    def chunks(self) -> Iterator[memoryview]:
        """Authenticated payload chunks, in order.

        Each view is only valid until the next one is requested (the buffer is reused);
        copy it (``bytes(view)``) to keep it. Can be iterated once.
        """
        unzstd = zstandard.ZstdDecompressor() if self.compression == "zstd" else None
        for index, (_final, compressed, size, stored) in enumerate(self.records()):
            out = stored
            if compressed:
                assert unzstd is not None
                try:
                    data = unzstd.decompress(stored, max_output_size=size)
                except zstandard.ZstdError:
                    data = b""
                if len(data) != size:  # authentic, yet not what the record header says: a writer bug
                    raise AuthenticationFailed(self.path, f"chunk {index} does not decompress to {size} bytes")
                out = memoryview(data)
            yield out

    def records(self) -> Iterator[tuple[bool, bool, int, memoryview]]:
        """The authenticated records as stored: (final, compressed, payload bytes, stored bytes).

        The stored bytes are the chunk, or its zstd frame if compressed; the view is only valid
        until the next record is requested. Format 1 files give uncompressed records. The whole
        file is checked: the last record yielded is the final one, nothing follows it.
        """
        if self.format_version == 1:
            return self._records_v1()
        return self._records_v2()

    def _decrypt(self, index: int, nonce: bytes, record: memoryview, aad: bytes, out: memoryview) -> memoryview:
        try:
            if hasattr(self._aead, "decrypt_into"):
                self._aead.decrypt_into(nonce, record, aad, out)
                return out
            return memoryview(self._aead.decrypt(nonce, bytes(record), aad))  # cryptography < 46
        except InvalidTag:
            raise AuthenticationFailed(
                self.path,
                f"chunk {index} does not authenticate: the file was modified, damaged or truncated",
            ) from None

    def _records_v2(self) -> Iterator[tuple[bool, bool, int, memoryview]]:
        cs = self.chunk_size
        head = memoryview(bytearray(_RECORD.size))
        record = memoryview(bytearray(cs + TAG_SIZE))
        plain = memoryview(bytearray(cs))
        index = 0
        while True:
            got = self._fill(head)
            if got == 0:
                raise AuthenticationFailed(
                    self.path, f"it is truncated: it ends after chunk {index} without the final chunk"
                )
            if got < _RECORD.size:
                raise AuthenticationFailed(self.path, f"it is truncated inside chunk {index}")
            rec = _record_header(bytes(head), cs)
            if rec is None or (rec[1] and self.compression != "zstd"):
                raise AuthenticationFailed(
                    self.path, f"chunk {index} has a damaged record header: the file was modified or damaged"
                )
            final, compressed, stored, size = rec
            body = record[: stored + TAG_SIZE]
            if self._fill(body) < len(body):
                raise AuthenticationFailed(self.path, f"it is truncated inside chunk {index}")
            out = self._decrypt(index, _nonce(self._prefix, index), body, self._digest + bytes(head), plain[:stored])
            if final and self._fh.read(1):
                raise AuthenticationFailed(self.path, "there is data after the final chunk")
            yield final, compressed, size, out
            if final:
                return
            index += 1

    def _records_v1(self) -> Iterator[tuple[bool, bool, int, memoryview]]:
        cs = self.chunk_size
        record = memoryview(bytearray(cs + TAG_SIZE))
        plain = memoryview(bytearray(cs))
        index = 0
        while True:
            got = self._fill(record)
            if got == 0:
                raise AuthenticationFailed(
                    self.path, f"it is truncated: it ends after chunk {index} without the final chunk"
                )
            if got < TAG_SIZE:
                raise AuthenticationFailed(self.path, f"it is truncated inside chunk {index}")
            final = got < cs + TAG_SIZE
            aad = self._digest + (_FLAG_FINAL if final else _FLAG_MORE)
            out = self._decrypt(index, _nonce(self._prefix, index), record[:got], aad, plain[: got - TAG_SIZE])
            if final and self._fh.read(1):
                raise AuthenticationFailed(self.path, "there is data after the final chunk")
            yield final, False, len(out), out
            if final:
                return
            index += 1

    def _read_ahead(self, position: int) -> None:
        """Keep the kernel reading up to ``_READ_AHEAD`` bytes past ``position`` in the background.

        A save written with O_DIRECT is not in the page cache; sequential readahead alone read a
        cold file at half the disk's speed here, WILLNEED windows at its full speed.
        """
        if position + _READ_AHEAD // 2 >= self._advised:
            with contextlib.suppress(OSError):
                os.posix_fadvise(self._fh.fileno(), self._advised, _READ_AHEAD, os.POSIX_FADV_WILLNEED)
            self._advised += _READ_AHEAD

    def _fill(self, buf: memoryview) -> int:
        got = 0
        while got < len(buf):
            n = self._fh.readinto(buf[got:])
            if not n:
                break
            got += n
        self._read_ahead(self._fh.tell())
        return got

    def pump_to_fd(
        self,
        fd: int,
        *,
        cancel: threading.Event | None = None,
        on_chunk: Callable[[int], None] | None = None,
    ) -> int:
        """Write the authenticated payload to ``fd``; return the bytes written.

        With ``cancel`` the fd should be non-blocking (waits are then short polls).
        """
        poller = select.poll()
        poller.register(fd, select.POLLOUT)
        total = 0
        for chunk in self.chunks():
            view = chunk
            while view:
                if cancel is not None and cancel.is_set():
                    raise _Cancelled
                try:
                    n = os.write(fd, view)
                except (BlockingIOError, InterruptedError):
                    poller.poll(_POLL_SECONDS * 1000)
                    continue
                view = view[n:]
                total += n
            if on_chunk is not None:
                on_chunk(total)
        return total


def prefetch(path: Path) -> None:
    """Ask the kernel to start reading ``path`` into the page cache (returns without waiting for it).

    A save written with O_DIRECT is not in the page cache; call this before launching the QEMU
    that restores it, so the disk reads while QEMU starts. Errors are ignored: it is only a hint.
    """
    with contextlib.suppress(OSError):
        fd = os.open(path, os.O_RDONLY | os.O_NONBLOCK | os.O_CLOEXEC)
        try:
            if stat.S_ISREG(os.fstat(fd).st_mode):
                os.posix_fadvise(fd, 0, _READ_AHEAD, os.POSIX_FADV_WILLNEED)
        finally:
            os.close(fd)


def reencrypt(path: Path, old_key: bytes, new_key: bytes) -> StateFileWriter:
    """Re-encrypt ``path`` with ``new_key``: a new salt, nonce prefix and key fingerprint, the same
    header fields, chunks and compression (records are re-sealed as stored, nothing is decompressed).

    Every record is authenticated with ``old_key`` on the way (any :class:`StateFileError` of
    :class:`StateFileReader` is raised, after dropping the new file). Returns the new file's writer,
    prepared (:meth:`~StateFileWriter.prepare`): its content is on disk, in a file without a name
    where the file system has O_TMPFILE (it vanishes if the process dies; else a hidden temporary
    file); :meth:`~StateFileWriter.commit` renames it over ``path``, ``abort`` drops it.
    Format 1 files are rewritten in format 2.
    """
    with StateFileReader(path, old_key) as reader:
        writer = StateFileWriter(reader.path, reader.header, new_key, chunk_size=reader.chunk_size,
                                 header_document=reader.header_document,
                                 compression_level=DEFAULT_COMPRESSION_LEVEL if reader.compression else None)
        try:
            for final, compressed, size, stored in reader.records():
                writer._put_record(stored, size, compressed=compressed, final=final)
                writer.payload_bytes += size
            writer.prepare()
        except BaseException:
            writer.abort()
            raise
    return writer


def iter_payload(path: Path, key: bytes) -> Iterator[bytes]:
    """The authenticated payload of ``path``, chunk by chunk (raises as :meth:`StateFileReader.chunks`)."""
    with StateFileReader(path, key) as reader:
        for chunk in reader.chunks():
            yield bytes(chunk)


# --------------------------------------------------------------------------- async pumps


async def _in_thread(fn: Callable[[threading.Event], _T], discard: Callable[[_T], None] | None = None) -> _T:
    """Run ``fn(cancel)`` in a worker thread; on cancellation, set ``cancel`` and wait for it to stop.

    If the worker finished anyway, its result is handed to ``discard`` before the cancellation propagates.
    """
    cancel = threading.Event()
    cf: concurrent.futures.Future[_T] = concurrent.futures.Future()

    def target() -> None:
        if not cf.set_running_or_notify_cancel():
            return
        try:
            cf.set_result(fn(cancel))
        except BaseException as exc:
            cf.set_exception(exc)

    threading.Thread(target=target, name="vmkit-statefile", daemon=True).start()
    fut = asyncio.wrap_future(cf)
    try:
        return await asyncio.shield(fut)
    except asyncio.CancelledError:
        cancel.set()
        while not fut.done():  # the worker notices within _POLL_SECONDS and cleans up
            with contextlib.suppress(asyncio.CancelledError):
                await asyncio.wait({fut})
        if not fut.cancelled() and fut.exception() is None and discard is not None:
            discard(fut.result())
        raise


def _threadsafe_progress(progress: ProgressCallback | None, total: int | None) -> Callable[[int], None] | None:
    if progress is None:
        return None
    loop = asyncio.get_running_loop()

    def report(done: int) -> None:
        with contextlib.suppress(RuntimeError):  # loop already closed
            loop.call_soon_threadsafe(progress, done, total)

    return report


@contextlib.contextmanager
def _nonblocking(fd: int, *, grow_pipe: bool) -> Iterator[None]:
    was_blocking = os.get_blocking(fd)
    if grow_pipe and stat.S_ISFIFO(os.fstat(fd).st_mode):
        with contextlib.suppress(OSError):  # a bigger pipe lets QEMU run ahead while a chunk is sealed
            if fcntl.fcntl(fd, fcntl.F_GETPIPE_SZ) < _PIPE_SIZE:
                fcntl.fcntl(fd, fcntl.F_SETPIPE_SZ, _PIPE_SIZE)
    os.set_blocking(fd, False)
    try:
        yield
    finally:
        with contextlib.suppress(OSError):
            os.set_blocking(fd, was_blocking)


async def save_from_fd(
    path: Path,
    header: StateHeader,
    read_fd: int,
    key: bytes,
    progress: ProgressCallback | None = None,
    *,
    before_commit: Callable[[], Awaitable[None]] | None = None,
    chunk_size: int = DEFAULT_CHUNK_SIZE,
) -> SaveInfo:
    """Pump ``read_fd`` (the read end of the pipe QEMU migrates into) into a new state file.

    Reads until EOF, so close every other copy of the pipe's write end once QEMU has its
    own. ``before_commit`` is awaited after EOF and before the file is renamed into place:
    make it raise if QEMU reports the migration as failed, and the file is discarded (a
    failed migration can also end in EOF). ``read_fd`` is not closed; it is switched to
    non-blocking mode while in use (and the pipe enlarged to 1 MiB where allowed).
    Cancelling the task aborts the save and leaves any earlier file in place.
    """
    path = Path(path)
    report = _threadsafe_progress(progress, None)

    def pump(cancel: threading.Event) -> StateFileWriter:
        writer = StateFileWriter(path, header, key, chunk_size=chunk_size)
        try:
            with _nonblocking(read_fd, grow_pipe=True):
                writer.fill_from_fd(read_fd, cancel=cancel, on_chunk=report)
        except BaseException:
            writer.abort()
            raise
        return writer

    try:
        writer = await _in_thread(pump, discard=StateFileWriter.abort)
    except _Cancelled:  # pragma: no cover - only raised after the task was cancelled
        raise asyncio.CancelledError from None
    try:
        if before_commit is not None:
            await before_commit()
        # not abandoned half-way if the task is cancelled: _in_thread waits for it to finish
        info = await _in_thread(lambda _cancel: writer.commit())
    except BaseException:
        writer.abort()
        raise
    if progress is not None:
        progress(info.payload_bytes, info.payload_bytes)
    return info


async def restore_to_fd(
    path: Path,
    key: bytes,
    write_fd: int,
    progress: ProgressCallback | None = None,
    *,
    expected: StateHeader | None = None,
    check_disks: bool = True,
) -> RestoreInfo:
    """Authenticate ``path`` and write its payload to ``write_fd`` (the pipe QEMU restores from).

    With ``expected``, :func:`check_compatible` runs on the authenticated header before a
    single payload byte is written. Chunks are authenticated one by one before they are
    written, so on :class:`AuthenticationFailed` QEMU may have received the authentic part
    of the stream: the caller must then kill that QEMU. ``write_fd`` is not closed (close it
    afterwards so QEMU sees EOF); it is non-blocking while in use.
    """
    path = Path(path)
    started = time.monotonic()
    reader = await asyncio.to_thread(StateFileReader, path, key)
    try:
        if expected is not None:
            check_compatible(reader.header, expected, check_disks=check_disks, path=path)
        report = _threadsafe_progress(progress, reader.payload_bytes if progress is not None else None)

        def pump(cancel: threading.Event) -> int:
            with _nonblocking(write_fd, grow_pipe=True):
                return reader.pump_to_fd(write_fd, cancel=cancel, on_chunk=report)

        try:
            done = await _in_thread(pump)
        except _Cancelled:  # pragma: no cover
            raise asyncio.CancelledError from None
    finally:
        reader.close()
    return RestoreInfo(path=path, header=reader.header, payload_bytes=done, seconds=time.monotonic() - started)
