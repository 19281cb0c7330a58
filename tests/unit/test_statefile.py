"""The save/restore file format: round trips, tampering, truncation, keys, versions, disks, full disks."""

from __future__ import annotations

import asyncio
import hashlib
import os
import secrets
import stat
import struct
import subprocess
import threading
from collections.abc import Iterator
from pathlib import Path

import pytest

from vmkit.errors import ExitCode, VmkitError
from vmkit.statefile import (
    DEFAULT_CHUNK_SIZE,
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
    StateFileWriter,
    StateHeader,
    UnsupportedFormatVersion,
    check_compatible,
    disk_identity,
    iter_payload,
    read_header,
    read_info,
    restore_to_fd,
    save_from_fd,
)

SMALL_CHUNK = 64 << 10


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


def _save(path: Path, header: StateHeader, key: bytes, data: bytes, *, chunk_size: int = SMALL_CHUNK) -> None:
    with StateFileWriter(path, header, key, chunk_size=chunk_size) as w:
        for i in range(0, len(data), 100_003):  # odd-sized writes, crossing chunk borders
            w.write(data[i : i + 100_003])


def _load(path: Path, key: bytes) -> bytes:
    return b"".join(iter_payload(path, key))


def _data_offset(path: Path) -> int:
    raw = path.read_bytes()
    n: int = struct.unpack(">I", raw[16:20])[0]
    return 20 + n + TAG_SIZE


def _flip(path: Path, offset: int) -> None:
    raw = bytearray(path.read_bytes())
    raw[offset] ^= 0x01
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


def test_payload_is_encrypted_and_file_not_larger_than_needed(tmp_path: Path, header: StateHeader, key: bytes) -> None:
    data = b"guest memory page " * 200_000
    path = tmp_path / "vm.state"
    _save(path, header, key, data)
    raw = path.read_bytes()
    assert b"guest memory page" not in raw
    chunks = len(data) // SMALL_CHUNK + 1
    assert len(raw) == _data_offset(path) + len(data) + chunks * TAG_SIZE


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
    assert err.exit_code == ExitCode.STATE_FILE
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
    start = _data_offset(saved)
    size = saved.stat().st_size
    offset = {
        "first": start,
        "middle": start + SMALL_CHUNK + TAG_SIZE + 5000,
        "last-tag": size - 1,
        "final-chunk": size - TAG_SIZE - 10,
    }[where]
    _flip(saved, offset)
    _assert_rejected(saved, key, "does not authenticate")


def test_chunks_swapped(saved: Path, key: bytes) -> None:
    start, rec = _data_offset(saved), SMALL_CHUNK + TAG_SIZE
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
    _truncate(saved, _data_offset(saved) + SMALL_CHUNK + TAG_SIZE + 1234)
    assert read_info(saved).payload_bytes is not None  # plausible length: only the tag catches it
    _assert_rejected(saved, key, "chunk 1")


@pytest.mark.parametrize("records", [1, 2, 3])
def test_truncated_at_chunk_boundary(saved: Path, key: bytes, records: int) -> None:
    _truncate(saved, _data_offset(saved) + records * (SMALL_CHUNK + TAG_SIZE))
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
    _assert_rejected(saved, key, "chunk 3 does not authenticate")


def test_final_chunk_then_garbage(tmp_path: Path, header: StateHeader, key: bytes) -> None:
    path = tmp_path / "vm.state"
    _save(path, header, key, os.urandom(2 * SMALL_CHUNK))  # final record: the tag alone
    with open(path, "ab") as fh:
        fh.write(os.urandom(SMALL_CHUNK))  # now the reader sees a full record where the final one was
    _assert_rejected(path, key, "chunk 2 does not authenticate")


def test_another_users_key(saved: Path) -> None:
    err = _assert_rejected(saved, secrets.token_bytes(32), "different key")
    assert "another user" in err.reason


def test_restore_stops_at_first_bad_chunk(saved: Path, key: bytes) -> None:
    _flip(saved, _data_offset(saved) + 2 * (SMALL_CHUNK + TAG_SIZE) + 7)
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
    assert info.value.exit_code == ExitCode.STATE_FILE
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
        assert info.value.exit_code == ExitCode.STATE_FILE
    if version > FORMAT_VERSION:
        assert "newer vmkit" in str(info.value)


def test_error_hierarchy() -> None:
    for cls in (NotAStateFile, UnsupportedFormatVersion, IncompatibleQemu, ConfigMismatch,
                AuthenticationFailed, DisksChanged, NoSpace):  # fmt: skip
        assert issubclass(cls, StateFileError) and issubclass(cls, VmkitError)
        assert cls.exit_code == ExitCode.STATE_FILE


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
    assert info.value.exit_code == ExitCode.STATE_FILE


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
