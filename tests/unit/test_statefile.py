"""The save/restore file format: round trips, tampering, truncation, keys, versions, disks, full disks."""

from __future__ import annotations

import asyncio
import fcntl
import hashlib
import json
import os
import random
import secrets
import stat
import struct
import subprocess
import threading
from collections.abc import Iterator
from pathlib import Path

import pytest
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.ciphers.aead import AESGCM
from cryptography.hazmat.primitives.kdf.hkdf import HKDF

from vmkit.errors import STATE_FILE_CODES, ExitCode, VmkitError
from vmkit.state import file as statefile
from vmkit.state.file import (
    DEFAULT_CHUNK_SIZE,
    DEFAULT_COMPRESSION_LEVEL,
    FORMAT_VERSION,
    MAGIC,
    TAG_SIZE,
    AuthenticationFailed,
    ConfigMismatch,
    DiskIdentity,
    DisksChanged,
    IncompatibleQemu,
    NoSpace,
    NotAStateFile,
    StateFileError,
    StateFileReader,
    StateFileWriteError,
    StateFileWriter,
    StateHeader,
    UnsupportedFormatVersion,
    check_compatible,
    disk_identity,
    iter_payload,
    prefetch,
    read_header,
    read_info,
    restore_to_fd,
    save_from_fd,
)
from vmkit.state.key import key_id

SMALL_CHUNK = 64 << 10
REC = 8  # format 2 record header: u32 flags | stored length, u32 plaintext length
RAW_RECORD = REC + SMALL_CHUNK + TAG_SIZE  # a full, uncompressed record


@pytest.fixture
def key() -> bytes:
    return secrets.token_bytes(32)


@pytest.fixture
def disk(tmp_path: Path) -> Path:
    path = tmp_path / "disk.qcow2"
    path.write_bytes(b"QFI\xfb" + os.urandom(200_000))
    return path


@pytest.fixture
def header(disk: Path) -> StateHeader:
    return StateHeader(
        qemu_version="7.2.22",
        machine_type="pc-q35-7.2",
        config_digest="sha256:" + "ab" * 32,
        ram_bytes=256 << 20,
        disks=(disk_identity(disk),),
    )


def _save(
    path: Path,
    header: StateHeader,
    key: bytes,
    data: bytes,
    *,
    chunk_size: int = SMALL_CHUNK,
    compression_level: int | None = DEFAULT_COMPRESSION_LEVEL,
) -> None:
    with StateFileWriter(path, header, key, chunk_size=chunk_size, compression_level=compression_level) as w:
        for i in range(0, len(data), 100_003):  # odd-sized writes, crossing chunk borders
            w.write(data[i : i + 100_003])


def _load(path: Path, key: bytes) -> bytes:
    return b"".join(iter_payload(path, key))


def _data_offset(path: Path) -> int:
    raw = path.read_bytes()
    n: int = struct.unpack(">I", raw[16:20])[0]
    return 20 + n + TAG_SIZE


def _records(path: Path) -> list[tuple[int, bool, bool, int, int]]:
    """Format 2 records as (offset, final, compressed, stored length, plaintext length)."""
    raw = path.read_bytes()
    offset, out = _data_offset(path), []
    while offset < len(raw):
        word, plain = struct.unpack(">II", raw[offset : offset + REC])
        stored = word & ((1 << 30) - 1)
        out.append((offset, bool(word >> 31), bool(word >> 30 & 1), stored, plain))
        offset += REC + stored + TAG_SIZE
    return out


def _flip(path: Path, offset: int, mask: int = 0x01) -> None:
    raw = bytearray(path.read_bytes())
    raw[offset] ^= mask
    path.write_bytes(bytes(raw))


def _truncate(path: Path, size: int) -> None:
    with open(path, "r+b") as fh:
        fh.truncate(size)


def _entries(directory: Path) -> list[str]:
    return sorted(p.name for p in directory.iterdir())


# ---------------------------------------------------------------- round trips


@pytest.mark.parametrize(
    ("size", "chunk_size"),
    [
        (3 * (1 << 20) + 12345, SMALL_CHUNK),
        (4 * SMALL_CHUNK, SMALL_CHUNK),  # exact multiple: an empty final chunk follows
        (5 * (1 << 20) + 1, DEFAULT_CHUNK_SIZE),
        (9 * (1 << 20) + 1, 8 << 20),  # larger chunks: buffered writes instead of O_DIRECT
        (0, SMALL_CHUNK),
        (1, SMALL_CHUNK),
    ],
)
def test_round_trip(tmp_path: Path, header: StateHeader, key: bytes, size: int, chunk_size: int) -> None:
    data = os.urandom(size)
    path = tmp_path / "vm.state"
    _save(path, header, key, data, chunk_size=chunk_size)
    assert _load(path, key) == data
    info = read_info(path)
    assert info.header == header
    assert info.format_version == FORMAT_VERSION
    assert info.payload_bytes == size
    assert info.chunk_size == chunk_size
    assert info.file_bytes == path.stat().st_size
    assert path.read_bytes()[: len(MAGIC)] == MAGIC
    assert _entries(tmp_path) == ["disk.qcow2", "vm.state"]


def test_payload_is_compressed_and_encrypted(tmp_path: Path, header: StateHeader, key: bytes) -> None:
    data = b"guest memory page " * 200_000
    path = tmp_path / "vm.state"
    _save(path, header, key, data)
    raw = path.read_bytes()
    assert b"guest memory page" not in raw
    assert len(raw) < len(data) // 50
    records = _records(path)
    assert all(compressed for _, _, compressed, _, _ in records)
    assert [final for _, final, _, _, _ in records] == [False] * (len(records) - 1) + [True]
    assert read_info(path).payload_bytes == len(data)
    assert _load(path, key) == data


@pytest.mark.parametrize("level", [DEFAULT_COMPRESSION_LEVEL, None])
def test_incompressible_payload_is_stored_raw(
    tmp_path: Path, header: StateHeader, key: bytes, level: int | None
) -> None:
    data = os.urandom(3 * SMALL_CHUNK + 1000)
    path = tmp_path / "vm.state"
    _save(path, header, key, data, compression_level=level)
    raw = path.read_bytes()
    chunks = len(data) // SMALL_CHUNK + 1
    assert len(raw) == _data_offset(path) + len(data) + chunks * (REC + TAG_SIZE)  # 24 bytes per chunk
    assert not any(compressed for _, _, compressed, _, _ in _records(path))
    assert (b'"compression":"zstd"' in raw) == (level is not None)
    assert _load(path, key) == data


def test_compressed_and_raw_records_in_one_file(tmp_path: Path, header: StateHeader, key: bytes) -> None:
    # like a QEMU stream: runs of random pages, runs of compressible ones, one chunk half and half
    zeros, text, noise = bytes(SMALL_CHUNK), (b"kernel text " * SMALL_CHUNK)[:SMALL_CHUNK], os.urandom(SMALL_CHUNK)
    data = noise + zeros + noise + text + noise[: SMALL_CHUNK // 2] + zeros[: SMALL_CHUNK // 2] + text[:999]
    path = tmp_path / "vm.state"
    _save(path, header, key, data)
    kinds = [compressed for _, _, compressed, _, _ in _records(path)]
    assert kinds == [False, True, False, True, True, True]
    assert _load(path, key) == data
    assert read_info(path).payload_bytes == len(data)
    assert len(path.read_bytes()) < len(data) * 0.55  # 2.5 of the 5 chunks are random


def _half_compressible(seed: int) -> bytes:
    """Pages alternately random and repetitive: shrinks to about half, neither cheap nor hopeless."""
    noise = random.Random(seed).randbytes(SMALL_CHUNK)
    text = (b"kernel text " * SMALL_CHUNK)[:SMALL_CHUNK]
    return b"".join((noise if i % 2 == 0 else text)[i * 4096 : (i + 1) * 4096] for i in range(SMALL_CHUNK // 4096))


def test_compression_tiers_while_streaming(
    tmp_path: Path, header: StateHeader, key: bytes, monkeypatch: pytest.MonkeyPatch
) -> None:
    cheap, half = (b"kernel text " * SMALL_CHUNK)[:SMALL_CHUNK], _half_compressible(1)
    path = tmp_path / "vm.state"
    w = StateFileWriter(path, header, key, chunk_size=SMALL_CHUNK)
    if w._sink is None:
        w.abort()
        pytest.skip("the file system refuses O_DIRECT: no disk backlog to consult")
    w._spare_cpu = True  # a third CPU beside QEMU and the reader
    w._seal(memoryview(half), final=False)  # nobody waits: compressed
    w._seal(memoryview(half), final=False, hurry=True)  # the next chunk waits and the disk keeps up: raw
    w._seal(memoryview(cheap), final=False, hurry=True)  # cheap chunks are compressed even then
    behind = [True]
    monkeypatch.setattr(statefile._DirectSink, "keeping_up", lambda self: not behind[0])
    w._seal(memoryview(half), final=False, hurry=True)  # the disk is behind: compressing saves time
    w._spare_cpu = False  # two CPUs: QEMU and the reader take them
    w._seal(memoryview(half), final=False)  # ... but while the disk is behind, compressing still pays
    behind[0] = False
    w._seal(memoryview(half), final=False)  # the disk keeps up: only cheap chunks are compressed
    w._seal(memoryview(cheap), final=False)
    w.payload_bytes = 7 * SMALL_CHUNK
    w.commit()
    kinds = [c for _, _, c, _, _ in _records(path)]
    assert kinds == [True, False, True, True, True, False, True, False]  # the final record is empty
    assert _load(path, key) == half + half + cheap + half + half + half + cheap


def test_streaming_save_compresses_by_the_cpus_it_has(
    tmp_path: Path, header: StateHeader, key: bytes, monkeypatch: pytest.MonkeyPatch
) -> None:
    data = _half_compressible(2) * 4 + (b"kernel text " * SMALL_CHUNK)[:SMALL_CHUNK]
    sizes = {}
    monkeypatch.setattr(statefile, "_PIPELINE", False)  # sealed inline: never hurried, only the CPUs count
    for cpus in (2, 4):
        monkeypatch.setattr(statefile, "_usable_cpus", lambda cpus=cpus: cpus)
        path = tmp_path / f"{cpus}.state"
        r, w = os.pipe()
        fcntl.fcntl(w, fcntl.F_SETPIPE_SZ, 1 << 20)
        os.write(w, data)
        os.close(w)
        with StateFileWriter(path, header, key, chunk_size=SMALL_CHUNK) as writer:
            writer.fill_from_fd(r)
        os.close(r)
        assert _load(path, key) == data
        sizes[cpus] = [c for _, _, c, _, _ in _records(path)]
    assert sizes[2] == [False, False, False, False, True, False]  # only the cheap chunk
    assert sizes[4] == [True, True, True, True, True, False]


def test_reader_header_is_authenticated_and_chunks_are_views(tmp_path: Path, header: StateHeader, key: bytes) -> None:
    data = os.urandom(300_000)
    path = tmp_path / "vm.state"
    _save(path, header, key, data)
    with StateFileReader(path, key) as reader:
        assert reader.header == header
        assert reader.payload_bytes == len(data)
        got = b"".join(bytes(c) for c in reader.chunks())
    assert got == data


def test_write_accepts_large_buffers_without_copy_path(tmp_path: Path, header: StateHeader, key: bytes) -> None:
    data = os.urandom(5 * SMALL_CHUNK + 7)
    path = tmp_path / "vm.state"
    with StateFileWriter(path, header, key, chunk_size=SMALL_CHUNK) as w:
        w.write(data[:3])
        w.write(memoryview(data)[3:])  # unaligned, then a big aligned run
        assert w.payload_bytes == len(data)
    assert _load(path, key) == data


def test_file_mode_is_0600_even_with_permissive_umask(tmp_path: Path, header: StateHeader, key: bytes) -> None:
    old = os.umask(0)
    try:
        _save(tmp_path / "vm.state", header, key, b"x" * 1000)
    finally:
        os.umask(old)
    assert stat.S_IMODE((tmp_path / "vm.state").stat().st_mode) == 0o600


def test_replaces_earlier_save(tmp_path: Path, header: StateHeader, key: bytes) -> None:
    path = tmp_path / "vm.state"
    _save(path, header, key, b"old" * 1000)
    _save(path, header, key, b"new" * 1000)
    assert _load(path, key) == b"new" * 1000
    assert _entries(tmp_path) == ["disk.qcow2", "vm.state"]


def test_exception_in_writer_leaves_no_file(tmp_path: Path, header: StateHeader, key: bytes) -> None:
    path = tmp_path / "vm.state"
    _save(path, header, key, b"earlier")
    with pytest.raises(RuntimeError), StateFileWriter(path, header, key) as w:
        w.write(os.urandom(DEFAULT_CHUNK_SIZE + 5))
        raise RuntimeError("QEMU died")
    assert _load(path, key) == b"earlier"
    assert _entries(tmp_path) == ["disk.qcow2", "vm.state"]


def test_two_saves_of_the_same_data_differ(tmp_path: Path, header: StateHeader, key: bytes) -> None:
    _save(tmp_path / "a", header, key, b"same" * 1000)
    _save(tmp_path / "b", header, key, b"same" * 1000)
    a, b = (tmp_path / "a").read_bytes(), (tmp_path / "b").read_bytes()
    assert a[_data_offset(tmp_path / "a") :] != b[_data_offset(tmp_path / "b") :]  # fresh salt and nonces


# ---------------------------------------------------------------- tampering and truncation


@pytest.fixture
def saved(tmp_path: Path, header: StateHeader, key: bytes) -> Path:
    path = tmp_path / "vm.state"
    _save(path, header, key, os.urandom(3 * SMALL_CHUNK + 1000))
    return path


def _assert_rejected(path: Path, key: bytes, match: str | None = None) -> AuthenticationFailed:
    with pytest.raises(AuthenticationFailed, match=match) as info:
        _load(path, key)
    err = info.value
    assert err.exit_code == ExitCode.STATE_AUTH == 15
    assert "cold-boot" in str(err) and str(path) in str(err)
    return err


def test_flipped_byte_in_header_json(saved: Path, key: bytes) -> None:
    raw = saved.read_bytes()
    offset = raw.index(b'"ram_bytes":') + len('"ram_bytes":')  # a digit: still valid JSON
    _flip(saved, offset)
    _assert_rejected(saved, key, "header was modified")


def test_flipped_byte_making_header_unparseable(saved: Path, key: bytes) -> None:
    _flip(saved, 20)  # the opening brace
    _assert_rejected(saved, key, "header is damaged")
    with pytest.raises(AuthenticationFailed):
        read_header(saved)


def test_flipped_byte_in_header_tag(saved: Path, key: bytes) -> None:
    _flip(saved, _data_offset(saved) - 3)
    _assert_rejected(saved, key)


def test_flipped_byte_in_header_length(saved: Path, key: bytes) -> None:
    _flip(saved, 19)
    with pytest.raises(AuthenticationFailed):
        _load(saved, key)


@pytest.mark.parametrize("where", ["first", "middle", "last-tag", "final-chunk"])
def test_flipped_byte_in_payload(saved: Path, key: bytes, where: str) -> None:
    start = _data_offset(saved) + REC
    size = saved.stat().st_size
    offset = {
        "first": start,
        "middle": start + RAW_RECORD + 5000,
        "last-tag": size - 1,
        "final-chunk": size - TAG_SIZE - 10,
    }[where]
    _flip(saved, offset)
    _assert_rejected(saved, key, "does not authenticate")


def test_chunks_swapped(saved: Path, key: bytes) -> None:
    start, rec = _data_offset(saved), RAW_RECORD
    raw = saved.read_bytes()
    a, b = raw[start : start + rec], raw[start + rec : start + 2 * rec]
    saved.write_bytes(raw[:start] + b + a + raw[start + 2 * rec :])
    _assert_rejected(saved, key, "chunk 0")


def test_header_swapped_between_files(tmp_path: Path, header: StateHeader, key: bytes) -> None:
    a, b = tmp_path / "a", tmp_path / "b"
    _save(a, header, key, os.urandom(1000))
    _save(b, header.model_copy(update={"ram_bytes": 1 << 30}), key, os.urandom(1000))
    ra, rb = a.read_bytes(), b.read_bytes()
    (tmp_path / "mix").write_bytes(rb[: _data_offset(b)] + ra[_data_offset(a) :])
    _assert_rejected(tmp_path / "mix", key, "chunk 0")


def test_truncated_mid_chunk(saved: Path, key: bytes) -> None:
    _truncate(saved, _data_offset(saved) + RAW_RECORD + 1234)
    assert read_info(saved).payload_bytes is None
    _assert_rejected(saved, key, "truncated inside chunk 1")


@pytest.mark.parametrize("cut", [1, REC - 1, REC, REC + 10])
def test_truncated_inside_record_header_or_compressed_record(
    tmp_path: Path, header: StateHeader, key: bytes, cut: int
) -> None:
    path = tmp_path / "vm.state"
    _save(path, header, key, bytes(3 * SMALL_CHUNK))
    offset, _, compressed, stored, _ = _records(path)[1]
    assert compressed and stored > 10
    _truncate(path, offset + cut)
    _assert_rejected(path, key, "truncated inside chunk 1")


@pytest.mark.parametrize("records", [1, 2, 3])
def test_truncated_at_chunk_boundary(saved: Path, key: bytes, records: int) -> None:
    _truncate(saved, _data_offset(saved) + records * RAW_RECORD)
    assert read_info(saved).payload_bytes is None
    _assert_rejected(saved, key, "without the final chunk")


def test_truncated_right_after_header(saved: Path, key: bytes) -> None:
    _truncate(saved, _data_offset(saved))
    _assert_rejected(saved, key, "truncated")


@pytest.mark.parametrize("cut", [5, 12, 18, 40])
def test_truncated_inside_header(saved: Path, key: bytes, cut: int) -> None:
    _truncate(saved, cut)
    _assert_rejected(saved, key, "truncated inside its header")


def test_truncated_inside_final_tag(saved: Path, key: bytes) -> None:
    _truncate(saved, saved.stat().st_size - 1)
    _assert_rejected(saved, key)


@pytest.mark.parametrize("extra", [1, 4, SMALL_CHUNK, 3 * SMALL_CHUNK])
def test_data_appended(saved: Path, key: bytes, extra: int) -> None:
    with open(saved, "ab") as fh:
        fh.write(os.urandom(extra))
    assert read_info(saved).payload_bytes is None
    _assert_rejected(saved, key, "data after the final chunk")


def test_final_chunk_then_garbage(tmp_path: Path, header: StateHeader, key: bytes) -> None:
    path = tmp_path / "vm.state"
    _save(path, header, key, os.urandom(2 * SMALL_CHUNK))  # final record: header and tag only
    assert _records(path)[-1][1:] == (True, False, 0, 0)
    with open(path, "ab") as fh:
        fh.write(os.urandom(SMALL_CHUNK))
    _assert_rejected(path, key, "data after the final chunk")


def _compressible_file(tmp_path: Path, header: StateHeader, key: bytes) -> Path:
    path = tmp_path / "vm.state"
    _save(path, header, key, os.urandom(SMALL_CHUNK) + bytes(2 * SMALL_CHUNK) + os.urandom(100))
    assert [r[2] for r in _records(path)] == [False, True, True, False]
    return path


@pytest.mark.parametrize(("record", "why"), [(0, "raw -> compressed"), (1, "compressed -> raw")])
def test_flipped_compressed_flag(tmp_path: Path, header: StateHeader, key: bytes, record: int, why: str) -> None:
    path = _compressible_file(tmp_path, header, key)
    _flip(path, _records(path)[record][0], 0x40)  # bit 30 of the first word
    _assert_rejected(path, key, f"chunk {record}")


def test_flipped_final_flag(tmp_path: Path, header: StateHeader, key: bytes) -> None:
    path = _compressible_file(tmp_path, header, key)
    _flip(path, _records(path)[0][0], 0x80)  # chunk 0 claims to be the last one
    _assert_rejected(path, key, "chunk 0")
    path = _compressible_file(tmp_path, header, key)
    _flip(path, _records(path)[-1][0], 0x80)  # the last one claims not to be
    _assert_rejected(path, key, "chunk 3")


@pytest.mark.parametrize("field", ["stored", "plain"])
def test_changed_record_lengths(tmp_path: Path, header: StateHeader, key: bytes, field: str) -> None:
    path = _compressible_file(tmp_path, header, key)
    offset = _records(path)[1][0] + (3 if field == "stored" else 7)
    _flip(path, offset, 0x01)  # one byte more or less, still plausible
    _assert_rejected(path, key, "chunk 1")


def test_compressed_file_with_another_key(tmp_path: Path, header: StateHeader, key: bytes) -> None:
    path = _compressible_file(tmp_path, header, key)
    _assert_rejected(path, secrets.token_bytes(32), "different key")


def test_another_users_key(saved: Path) -> None:
    err = _assert_rejected(saved, secrets.token_bytes(32), "different key")
    assert "another user" in err.reason


def test_restore_stops_at_first_bad_chunk(saved: Path, key: bytes) -> None:
    _flip(saved, _data_offset(saved) + 2 * RAW_RECORD + REC + 7)
    got = []
    with pytest.raises(AuthenticationFailed, match="chunk 2"), StateFileReader(saved, key) as reader:
        for chunk in reader.chunks():
            got.append(bytes(chunk))
    assert len(got) == 2  # only authentic chunks came out


# ---------------------------------------------------------------- not a state file / versions


@pytest.mark.parametrize(
    "content",
    [b"", b"hello world\n" * 10, os.urandom(5000), b"QFI\xfb" + bytes(1000), MAGIC[:-1] + b"X" + bytes(64)],
)
def test_bogus_file(tmp_path: Path, key: bytes, content: bytes) -> None:
    path = tmp_path / "bogus"
    path.write_bytes(content)
    with pytest.raises(NotAStateFile) as info:
        read_header(path)
    assert info.value.exit_code == ExitCode.NOT_A_STATE_FILE == 11
    assert "cold-boot" in str(info.value)
    with pytest.raises(NotAStateFile):
        _load(path, key)


def test_missing_file_and_directory(tmp_path: Path, key: bytes) -> None:
    with pytest.raises(NotAStateFile, match="does not exist"):
        read_header(tmp_path / "nope")
    with pytest.raises(NotAStateFile):
        _load(tmp_path, key)


def test_fifo_is_refused_without_hanging(tmp_path: Path, key: bytes) -> None:
    fifo = tmp_path / "fifo"
    os.mkfifo(fifo)
    with pytest.raises(NotAStateFile, match="not a regular file"):
        read_header(fifo)
    with pytest.raises(NotAStateFile, match="not a regular file"):
        _load(fifo, key)


def test_prefetch_is_only_a_hint(saved: Path, tmp_path: Path, key: bytes) -> None:
    fifo = tmp_path / "fifo"
    os.mkfifo(fifo)
    for path in (saved, fifo, tmp_path / "missing", tmp_path):  # never raises, never hangs
        prefetch(path)
    assert len(_load(saved, key)) == 3 * SMALL_CHUNK + 1000


def test_flipped_magic(saved: Path, key: bytes) -> None:
    _flip(saved, 3)
    with pytest.raises(NotAStateFile):
        _load(saved, key)


@pytest.mark.parametrize("version", [FORMAT_VERSION + 1, 99, 0])
def test_unsupported_format_version(saved: Path, key: bytes, version: int) -> None:
    raw = bytearray(saved.read_bytes())
    raw[12:16] = struct.pack(">I", version)
    saved.write_bytes(bytes(raw))
    for read in (lambda: read_header(saved), lambda: _load(saved, key)):
        with pytest.raises(UnsupportedFormatVersion) as info:
            read()
        assert info.value.found == version
        assert info.value.exit_code == ExitCode.STATE_FORMAT == 12
    if version > FORMAT_VERSION:
        assert "newer vmkit" in str(info.value)


def _write_v1(path: Path, header: StateHeader, key: bytes, data: bytes, chunk_size: int = SMALL_CHUNK) -> None:
    """A format-1 file, written from the layout in statefile's docstring (vmkit no longer writes them)."""
    salt, prefix = os.urandom(32), os.urandom(4)
    hkdf = HKDF(algorithm=hashes.SHA256(), length=32, salt=salt, info=b"vmkit state file v1 AES-256-GCM")
    aead = AESGCM(hkdf.derive(key))
    doc = header.model_dump(mode="json")
    doc["encryption"] = {"cipher": "AES-256-GCM", "kdf": "HKDF-SHA256", "key_id": key_id(key),
                         "salt": salt.hex(), "nonce_prefix": prefix.hex(), "chunk_size": chunk_size}  # fmt: skip
    body = json.dumps(doc).encode()
    head = MAGIC + struct.pack(">II", 1, len(body)) + body
    digest = hashlib.sha256(head).digest()
    parts = [head, aead.encrypt(prefix + b"\xff" * 8, b"", digest + b"\x02")]
    full = len(data) // chunk_size * chunk_size  # every chunk full but the last, which may be empty
    chunks = [data[i : i + chunk_size] for i in range(0, full, chunk_size)] + [data[full:]]
    for i, chunk in enumerate(chunks):
        flag = b"\x01" if i == len(chunks) - 1 else b"\x00"
        parts.append(aead.encrypt(prefix + i.to_bytes(8, "big"), chunk, digest + flag))
    path.write_bytes(b"".join(parts))


@pytest.mark.parametrize("size", [0, 2 * SMALL_CHUNK, 3 * SMALL_CHUNK + 1000])
def test_version_1_files_are_still_read(tmp_path: Path, header: StateHeader, key: bytes, size: int) -> None:
    data = os.urandom(size)
    path = tmp_path / "old.state"
    _write_v1(path, header, key, data)
    info = read_info(path)
    assert info.format_version == 1 and info.payload_bytes == size and info.header == header
    assert _load(path, key) == data
    with StateFileReader(path, key) as reader:
        assert reader.format_version == 1 and reader.payload_bytes == size


async def test_version_1_file_restores_through_a_pipe(tmp_path: Path, header: StateHeader, key: bytes) -> None:
    data = os.urandom(3 * SMALL_CHUNK + 5)
    path = tmp_path / "old.state"
    _write_v1(path, header, key, data)
    r, w = os.pipe()
    got = bytearray()
    reader = threading.Thread(target=lambda: got.extend(_drain(r)))
    reader.start()
    try:
        info = await restore_to_fd(path, key, w, expected=header)
    finally:
        os.close(w)
        reader.join()
        os.close(r)
    assert bytes(got) == data and info.payload_bytes == len(data)


def _drain(fd: int) -> bytes:
    out = bytearray()
    while piece := os.read(fd, 1 << 16):
        out += piece
    return bytes(out)


@pytest.mark.parametrize("damage", ["flip", "cut-at-boundary", "cut-inside", "other-key"])
def test_version_1_damage_is_detected(tmp_path: Path, header: StateHeader, key: bytes, damage: str) -> None:
    path = tmp_path / "old.state"
    _write_v1(path, header, key, os.urandom(3 * SMALL_CHUNK + 1000))
    start, record = _data_offset(path), SMALL_CHUNK + TAG_SIZE
    if damage == "flip":
        _flip(path, start + record + 77)
        _assert_rejected(path, key, "chunk 1 does not authenticate")
    elif damage == "cut-at-boundary":
        _truncate(path, start + 2 * record)
        assert read_info(path).payload_bytes is None
        _assert_rejected(path, key, "without the final chunk")
    elif damage == "cut-inside":
        _truncate(path, start + 2 * record + 500)
        _assert_rejected(path, key, "chunk 2 does not authenticate")
    else:
        _assert_rejected(path, secrets.token_bytes(32), "different key")


def test_error_hierarchy() -> None:
    codes = {NotAStateFile: 11, UnsupportedFormatVersion: 12, IncompatibleQemu: 13, ConfigMismatch: 14,
             AuthenticationFailed: 15, DisksChanged: 16, StateFileWriteError: 10, NoSpace: 10}
    for cls, code in codes.items():
        assert issubclass(cls, StateFileError) and issubclass(cls, VmkitError)
        assert cls.exit_code == code and code in STATE_FILE_CODES  # each kind of unusable file: its own code


# ---------------------------------------------------------------- compatibility


def test_compatible_with_itself(header: StateHeader) -> None:
    check_compatible(header, header)
    later = header.model_copy(update={"created_at": header.created_at.replace(year=2030), "vmkit_version": "9"})
    check_compatible(header, later)


def test_newer_qemu_is_accepted_older_refused(header: StateHeader) -> None:
    check_compatible(header, header.model_copy(update={"qemu_version": "8.0.0"}))
    check_compatible(header, header.model_copy(update={"qemu_version": "7.2.23"}))
    with pytest.raises(IncompatibleQemu, match="older QEMU") as info:
        check_compatible(header, header.model_copy(update={"qemu_version": "7.1.0"}), path=Path("/x/vm.state"))
    assert info.value.saved_version == "7.2.22" and info.value.current_version == "7.1.0"
    assert "/x/vm.state" in str(info.value) and "cold-boot" in str(info.value)
    with pytest.raises(IncompatibleQemu, match="cannot be compared"):
        check_compatible(header, header.model_copy(update={"qemu_version": "git-master"}))


def test_machine_type_mismatch(header: StateHeader) -> None:
    with pytest.raises(IncompatibleQemu, match="machine type must be the same"):
        check_compatible(header, header.model_copy(update={"machine_type": "pc-i440fx-7.2"}))


def test_config_digest_mismatch(header: StateHeader) -> None:
    with pytest.raises(ConfigMismatch, match="configuration digest") as info:
        check_compatible(header, header.model_copy(update={"config_digest": "sha256:" + "cd" * 32}))
    assert info.value.exit_code == ExitCode.STATE_CONFIG


def test_ram_mismatch(header: StateHeader) -> None:
    with pytest.raises(ConfigMismatch, match="RAM size was 256 MiB, it is now 1 GiB"):
        check_compatible(header, header.model_copy(update={"ram_bytes": 1 << 30}))


def _current(header: StateHeader, disk: Path) -> StateHeader:
    return header.model_copy(update={"disks": (disk_identity(disk),)})


def test_disk_modified(header: StateHeader, disk: Path) -> None:
    with open(disk, "r+b") as fh:  # same size, same head: only the mtime tells
        fh.seek(150_000)
        fh.write(b"guest wrote here")
    os.utime(disk, ns=(disk.stat().st_atime_ns, header.disks[0].mtime_ns + 1_000_000))
    with pytest.raises(DisksChanged, match="mtime changed") as info:
        check_compatible(header, _current(header, disk))
    assert "--force" in str(info.value) and "cold-boot" in str(info.value)
    check_compatible(header, _current(header, disk), check_disks=False)


def test_disk_resized_and_head_changed(header: StateHeader, disk: Path) -> None:
    mtime = disk.stat().st_mtime_ns
    with open(disk, "r+b") as fh:
        fh.seek(100)
        fh.write(b"new L1 table")
        fh.truncate(300_000)
    os.utime(disk, ns=(mtime, mtime))
    with pytest.raises(DisksChanged) as info:
        check_compatible(header, _current(header, disk))
    (change,) = info.value.changes
    assert "size 200004 -> 300000" in change and "first 64 KiB changed" in change and "mtime" not in change


def test_disk_added_or_removed(header: StateHeader, disk: Path, tmp_path: Path) -> None:
    other = tmp_path / "data.raw"
    other.write_bytes(bytes(4096))
    with pytest.raises(DisksChanged, match="had 1 disk"):
        check_compatible(header, header.model_copy(update={"disks": (*header.disks, disk_identity(other))}))
    with pytest.raises(DisksChanged, match="had 1 disk"):
        check_compatible(header, header.model_copy(update={"disks": ()}))


def test_disk_copied_with_timestamps_is_the_same_disk(header: StateHeader, disk: Path, tmp_path: Path) -> None:
    copy = tmp_path / "moved" / "disk.qcow2"
    copy.parent.mkdir()
    subprocess.run(["cp", "--preserve=timestamps", str(disk), str(copy)], check=True)
    check_compatible(header, _current(header, copy))


def test_disk_identity(disk: Path, tmp_path: Path) -> None:
    ident = disk_identity(disk)
    assert ident.format == "qcow2" and ident.size == 200_004 and ident.path == str(disk)
    assert ident.head_sha256 == hashlib.sha256(disk.read_bytes()[: 64 << 10]).hexdigest()
    raw = tmp_path / "r.img"
    raw.write_bytes(bytes(10))
    assert disk_identity(raw).format == "raw"
    assert DiskIdentity.model_validate_json(ident.model_dump_json()) == ident


# ---------------------------------------------------------------- full disk


@pytest.fixture
def small_fs(tmp_path: Path) -> Iterator[Path]:
    mnt = tmp_path / "small"
    mnt.mkdir()
    try:
        subprocess.run(["mount", "-t", "tmpfs", "-o", "size=1M,mode=0700", "tmpfs", str(mnt)],
                       check=True, capture_output=True)  # fmt: skip
    except (OSError, subprocess.CalledProcessError) as exc:
        pytest.skip(f"cannot mount a tmpfs here: {exc}")
    try:
        yield mnt
    finally:
        subprocess.run(["umount", str(mnt)], check=False)


def test_disk_full_keeps_earlier_save(small_fs: Path, header: StateHeader, key: bytes) -> None:
    path = small_fs / "vm.state"
    earlier = os.urandom(300_000)
    _save(path, header, key, earlier)
    with pytest.raises(NoSpace) as info:
        _save(path, header, key, os.urandom(2 << 20))
    err = info.value
    assert err.exit_code == ExitCode.STATE_FILE
    assert "no space left" in str(err) and "earlier save file" in str(err)
    assert err.written > 0
    assert _entries(small_fs) == ["vm.state"]  # no temp file
    assert _load(path, key) == earlier
    assert os.statvfs(small_fs).f_bfree * os.statvfs(small_fs).f_frsize > 600_000  # space given back


async def test_disk_full_during_async_save(small_fs: Path, header: StateHeader, key: bytes) -> None:
    path = small_fs / "vm.state"
    earlier = os.urandom(100_000)
    _save(path, header, key, earlier)
    r, w = os.pipe()
    producer = _produce(w, os.urandom(3 << 20))
    try:
        with pytest.raises(NoSpace):
            await save_from_fd(path, header, r, key)
    finally:
        os.close(r)  # unblocks the producer (EPIPE)
        producer.join()
    assert _entries(small_fs) == ["vm.state"]
    assert _load(path, key) == earlier


# ---------------------------------------------------------------- async pumps over pipes


def _produce(fd: int, data: bytes, *, close: bool = True) -> threading.Thread:
    def run() -> None:
        view = memoryview(data)
        try:
            while view:
                view = view[os.write(fd, view[: 1 << 16]) :]
        except BrokenPipeError:
            pass
        finally:
            if close:
                os.close(fd)

    t = threading.Thread(target=run)
    t.start()
    return t


def _consume(fd: int, into: bytearray) -> threading.Thread:
    def run() -> None:
        with os.fdopen(fd, "rb", buffering=0) as fh:
            while chunk := fh.read(1 << 20):
                into.extend(chunk)

    t = threading.Thread(target=run)
    t.start()
    return t


async def test_save_and_restore_through_pipes(tmp_path: Path, header: StateHeader, key: bytes) -> None:
    data = os.urandom(9 * (1 << 20) + 777)
    path = tmp_path / "vm.state"
    r, w = os.pipe()
    producer = _produce(w, data)
    seen: list[tuple[int, int | None]] = []
    info = await save_from_fd(path, header, r, key, lambda d, t: seen.append((d, t)))
    producer.join()
    os.close(r)
    assert info.payload_bytes == len(data) and info.file_bytes == path.stat().st_size
    assert info.chunks == len(data) // DEFAULT_CHUNK_SIZE + 1
    assert seen[-1] == (len(data), len(data)) and len(seen) >= 2
    assert stat.S_IMODE(path.stat().st_mode) == 0o600

    r, w = os.pipe()
    out = bytearray()
    consumer = _consume(r, out)
    progress: list[tuple[int, int | None]] = []
    rinfo = await restore_to_fd(path, key, w, lambda d, t: progress.append((d, t)), expected=header)
    os.close(w)
    consumer.join()
    assert bytes(out) == data
    assert rinfo.payload_bytes == len(data) and rinfo.header == header
    assert progress[-1] == (len(data), len(data))


async def test_event_loop_keeps_running_during_save(tmp_path: Path, header: StateHeader, key: bytes) -> None:
    r, w = os.pipe()
    ticks = 0

    async def ticker() -> None:
        nonlocal ticks
        while True:
            await asyncio.sleep(0.01)
            ticks += 1

    task = asyncio.create_task(ticker())

    def slow_producer() -> None:
        with os.fdopen(w, "wb", buffering=0) as fh:
            for _ in range(20):
                fh.write(os.urandom(100_000))
                threading.Event().wait(0.01)

    t = threading.Thread(target=slow_producer)
    t.start()
    await save_from_fd(tmp_path / "vm.state", header, r, key)
    t.join()
    os.close(r)
    task.cancel()
    assert ticks >= 10


async def test_before_commit_failure_discards(tmp_path: Path, header: StateHeader, key: bytes) -> None:
    path = tmp_path / "vm.state"
    _save(path, header, key, b"earlier")
    r, w = os.pipe()
    producer = _produce(w, os.urandom(1 << 20))

    async def migration_failed() -> None:
        raise RuntimeError("QEMU reported migration status 'failed'")

    with pytest.raises(RuntimeError, match="failed"):
        await save_from_fd(path, header, r, key, before_commit=migration_failed)
    producer.join()
    os.close(r)
    assert _load(path, key) == b"earlier"
    assert _entries(tmp_path) == ["disk.qcow2", "vm.state"]


async def test_cancelled_save_leaves_earlier_file(tmp_path: Path, header: StateHeader, key: bytes) -> None:
    path = tmp_path / "vm.state"
    _save(path, header, key, b"earlier")
    r, w = os.pipe()
    os.write(w, os.urandom(50_000))  # ...and then QEMU hangs without closing
    task = asyncio.create_task(save_from_fd(path, header, r, key))
    await asyncio.sleep(0.3)
    task.cancel()
    with pytest.raises(asyncio.CancelledError):
        await task
    assert os.get_blocking(r)  # the fd's mode is given back
    os.close(r)
    os.close(w)
    assert _load(path, key) == b"earlier"
    assert _entries(tmp_path) == ["disk.qcow2", "vm.state"]


async def test_cancelled_restore_when_reader_stalls(tmp_path: Path, header: StateHeader, key: bytes) -> None:
    path = tmp_path / "vm.state"
    _save(path, header, key, os.urandom(3 << 20))  # more than a (grown) pipe holds
    r, w = os.pipe()  # nobody reads r: the pipe fills up
    task = asyncio.create_task(restore_to_fd(path, key, w))
    await asyncio.sleep(0.3)
    task.cancel()
    with pytest.raises(asyncio.CancelledError):
        await task
    assert os.get_blocking(w)
    os.close(r)
    os.close(w)


async def test_restore_checks_before_writing(saved: Path, key: bytes, header: StateHeader) -> None:
    r, w = os.pipe()
    try:
        with pytest.raises(ConfigMismatch):
            await restore_to_fd(saved, key, w, expected=header.model_copy(update={"ram_bytes": 1 << 30}))
        os.set_blocking(r, False)
        with pytest.raises(BlockingIOError):
            os.read(r, 1)  # nothing reached "QEMU"
    finally:
        os.close(r)
        os.close(w)


async def test_restore_of_tampered_file_fails(saved: Path, key: bytes) -> None:
    _flip(saved, saved.stat().st_size - 100)
    r, w = os.pipe()
    out = bytearray()
    consumer = _consume(r, out)
    with pytest.raises(AuthenticationFailed):
        await restore_to_fd(saved, key, w)
    os.close(w)
    consumer.join()
    assert len(out) == 3 * SMALL_CHUNK  # the authentic chunks only


async def test_restore_with_other_key_writes_nothing(saved: Path) -> None:
    r, w = os.pipe()
    try:
        with pytest.raises(AuthenticationFailed, match="different key"):
            await restore_to_fd(saved, secrets.token_bytes(32), w)
        os.set_blocking(r, False)
        with pytest.raises(BlockingIOError):
            os.read(r, 1)  # nothing reached "QEMU"
    finally:
        os.close(r)
        os.close(w)


class _NamedTempWriter(StateFileWriter):
    """The fallback for file systems without O_TMPFILE: a hidden, named temp file."""

    _unnamed_temp = False


def test_named_temp_fallback_round_trip(tmp_path: Path, header: StateHeader, key: bytes) -> None:
    data = os.urandom(200_000)
    path = tmp_path / "vm.state"
    with _NamedTempWriter(path, header, key, chunk_size=SMALL_CHUNK) as w:
        w.write(data)
        assert any(n.startswith(".vm.state.") and n.endswith(".tmp") for n in _entries(tmp_path))
    assert _entries(tmp_path) == ["disk.qcow2", "vm.state"]
    assert stat.S_IMODE(path.stat().st_mode) == 0o600
    assert _load(path, key) == data


def test_named_temp_fallback_disk_full(small_fs: Path, header: StateHeader, key: bytes) -> None:
    path = small_fs / "vm.state"
    _save(path, header, key, b"earlier")
    with pytest.raises(NoSpace), _NamedTempWriter(path, header, key) as w:
        w.write(os.urandom(2 << 20))
    assert _entries(small_fs) == ["vm.state"]
    assert _load(path, key) == b"earlier"


def test_abandoned_writer_cleans_up(tmp_path: Path, header: StateHeader, key: bytes) -> None:
    w = _NamedTempWriter(tmp_path / "vm.state", header, key)
    w.write(b"x" * 100)
    assert len(_entries(tmp_path)) == 2
    del w
    assert _entries(tmp_path) == ["disk.qcow2"]


# ---------------------------------------------------------------- re-encryption (key rotation)


def test_reencrypt_keeps_header_and_records_under_a_new_key(tmp_path: Path, header: StateHeader, key: bytes) -> None:
    path = _compressible_file(tmp_path, header, key)
    payload = _load(path, key)
    records = [r[1:] for r in _records(path)]  # (final, compressed, stored, plain)
    doc = json.loads(path.read_bytes()[20 : _data_offset(path) - TAG_SIZE])
    new = secrets.token_bytes(32)
    writer = statefile.reencrypt(path, key, new)
    assert _load(path, key) == payload, "nothing changes before commit"
    assert _entries(tmp_path) == ["disk.qcow2", "vm.state"], "the new content has no name yet"
    writer.commit()
    assert _load(path, new) == payload
    assert [r[1:] for r in _records(path)] == records, "records re-sealed as they were stored"
    new_doc = json.loads(path.read_bytes()[20 : _data_offset(path) - TAG_SIZE])
    assert new_doc.pop("encryption")["key_id"] == key_id(new)
    assert doc.pop("encryption")["key_id"] == key_id(key)
    assert new_doc == doc
    _assert_rejected(path, key, "written with a different key")
    assert stat.S_IMODE(path.stat().st_mode) == 0o600


def test_reencrypt_keeps_fields_the_header_model_does_not_know(tmp_path: Path, key: bytes, disk: Path) -> None:
    class Extended(StateHeader):
        machine: dict[str, int]

    path = tmp_path / "vm.state"
    ext = Extended(qemu_version="7.2.0", machine_type="pc-q35-7.2", config_digest="sha256:" + "00" * 32,
                   ram_bytes=1 << 20, machine={"cpus": 2})
    _save(path, ext, key, os.urandom(10_000))
    new = secrets.token_bytes(32)
    statefile.reencrypt(path, key, new).commit()
    with StateFileReader(path, new) as reader:
        assert reader.header_document["machine"] == {"cpus": 2}


def test_reencrypt_rewrites_version_1_files(tmp_path: Path, header: StateHeader, key: bytes) -> None:
    path = tmp_path / "v1.state"
    data = os.urandom(3 * SMALL_CHUNK + 5)
    _write_v1(path, header, key, data)
    new = secrets.token_bytes(32)
    statefile.reencrypt(path, key, new).commit()
    assert read_info(path).format_version == FORMAT_VERSION and _load(path, new) == data


def test_reencrypt_of_a_damaged_file_changes_nothing(tmp_path: Path, header: StateHeader, key: bytes) -> None:
    path = _compressible_file(tmp_path, header, key)
    _flip(path, _records(path)[2][0] + REC + 5)
    before = path.read_bytes()
    with pytest.raises(AuthenticationFailed, match="chunk 2 does not authenticate"):
        statefile.reencrypt(path, key, secrets.token_bytes(32))
    assert path.read_bytes() == before and _entries(tmp_path) == ["disk.qcow2", "vm.state"]
