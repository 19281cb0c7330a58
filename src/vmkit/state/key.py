"""The per-user secret key that protects save files.

One random 256-bit key per user, kept in ``paths.config_dir()/state.key`` (raw 32 bytes,
mode 0600, directory 0700). It is created on first use, atomically: the bytes are written
and fsynced in a private temp file which is then hard-linked to the final name. ``link``
never replaces an existing file, so when two processes create the key at the same time one
wins and the other discards its own and reads the winner's; nobody ever sees a half-written
key.

A key file that other users could read or write, that belongs to someone else, that is not
a regular file or that does not hold exactly 32 bytes is refused with :class:`KeyFileError`
rather than used (a weak key would silently weaken every save file).

Rotation (``vmkit key rotate``, :func:`vmkit.backends.local.statectl.rotate_key`) replaces the key with
:func:`replace_key`: the old key is first kept in ``state.key.retired`` (with any still retired
from an unfinished rotation), then the new key is renamed over ``state.key``; once every state
file is re-encrypted :func:`forget_retired` deletes the retired keys. Until then a state file is
opened with the key its header names (:func:`key_for`), current or retired, so a rotation
interrupted half-way leaves every file readable; running the rotation again completes it.
"""

from __future__ import annotations

import contextlib
import errno
import fcntl
import hashlib
import os
import secrets
import stat
import tempfile
from collections.abc import Iterator
from pathlib import Path

from vmkit.errors import ExitCode, VmkitError
from vmkit.fsutil import fsync_dir
from vmkit.host import paths

KEY_SIZE = 32
"""Bytes in a key (AES-256)."""

KEY_FILENAME = "state.key"
RETIRED_FILENAME = "state.key.retired"
"""Keys replaced by a rotation that is not finished yet (32 bytes each)."""
LOCK_FILENAME = "state.key.lock"


class KeyFileError(VmkitError):
    """The state-file key cannot be created or is unsafe to use."""

    exit_code = ExitCode.STATE_FILE

    def __init__(self, path: Path, problem: str, *, hint: str | None = None) -> None:
        super().__init__(f"state-file key {path}: {problem}", hint=hint)
        self.path = path
        self.problem = problem


def key_path() -> Path:
    """Where the current user's key lives (read from the environment on each call)."""
    return paths.config_dir() / KEY_FILENAME


def retired_path() -> Path:
    return paths.config_dir() / RETIRED_FILENAME


def key_id(key: bytes) -> str:
    """A short public fingerprint of ``key`` (16 hex digits).

    Save files record it so that "written with another key" can be told apart from
    "damaged". It is a one-way hash: it reveals nothing usable about the key.
    """
    _check_key_bytes(key)
    return hashlib.sha256(b"vmkit state key id v1\0" + key).hexdigest()[:16]


def load_key(path: Path | None = None) -> bytes:
    """Read an existing key; raise :class:`KeyFileError` if it is missing or unsafe."""
    path = key_path() if path is None else path
    key = _read_key(path)
    if key is None:
        raise KeyFileError(
            path,
            "does not exist",
            hint="it is created on first save; save files written with a lost key cannot be read",
        )
    return key


def load_or_create_key(path: Path | None = None) -> bytes:
    """Return the user's key, creating it (mode 0600, directory 0700) if it does not exist yet."""
    path = key_path() if path is None else path
    key = _read_key(path)
    return key if key is not None else _create_key(path)


def load_retired_keys() -> list[bytes]:
    """The keys an unfinished rotation retired (none normally)."""
    path = retired_path()
    data = _read_key(path, multiple=True)
    return [] if data is None else [data[i : i + KEY_SIZE] for i in range(0, len(data), KEY_SIZE)]


def key_for(wanted_id: str) -> bytes:
    """The key whose fingerprint is ``wanted_id``: the current key, or one retired by an unfinished
    rotation; the current key if none matches (it then fails to authenticate, saying so)."""
    current = load_key()
    if key_id(current) != wanted_id:
        for old in load_retired_keys():
            if key_id(old) == wanted_id:
                return old
    return current


def replace_key(new: bytes, old: bytes) -> None:
    """Make ``new`` the key, keeping ``old`` (and the keys already retired) in ``state.key.retired``
    until :func:`forget_retired`. Each step is atomic and durable; the rename of the new key is the
    moment it is in force."""
    _check_key_bytes(new)
    kept = load_retired_keys()
    _write_private(retired_path(), b"".join([*(k for k in kept if k != old), old]))
    _write_private(key_path(), new)


def forget_retired() -> None:
    """Delete the retired keys (every state file uses the current key now)."""
    path = retired_path()
    with contextlib.suppress(FileNotFoundError):
        path.unlink()
        fsync_dir(path.parent)


@contextlib.contextmanager
def rotation_lock() -> Iterator[None]:
    """Held while the key is rotated: a second rotation at the same time fails with :class:`KeyFileError`."""
    path = paths.config_dir() / LOCK_FILENAME
    paths.ensure_private_dir(path.parent)
    fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC | os.O_NOFOLLOW, 0o600)
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            raise KeyFileError(key_path(), "is being rotated by another process",
                               hint="wait for it to finish, then try again") from None
        yield
    finally:
        os.close(fd)


def _private_temp(path: Path, data: bytes) -> str:
    """A private (0600) temp file beside ``path`` holding ``data``, fsynced; its name (the caller
    renames or links it into place, and removes it on failure)."""
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        os.fchmod(fd, 0o600)
        _write_all(fd, data)
        os.fsync(fd)
    except BaseException:
        os.close(fd)
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)
        raise
    os.close(fd)
    return tmp


def _write_private(path: Path, data: bytes) -> None:
    """Write ``path`` (0600) atomically: a private temp file, fsynced, renamed over it, directory fsynced."""
    try:
        paths.ensure_private_dir(path.parent)
        tmp = _private_temp(path, data)
    except OSError as exc:
        raise KeyFileError(path, f"cannot be written: {exc.strerror}") from exc
    try:
        os.replace(tmp, path)
        fsync_dir(path.parent)
    except OSError as exc:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)
        raise KeyFileError(path, f"cannot be written: {exc.strerror}") from exc


def _read_key(path: Path, *, multiple: bool = False) -> bytes | None:
    """The key in ``path`` (with ``multiple``: one or more keys), or None if there is no such file."""
    try:
        # O_NONBLOCK: a FIFO planted under the name must not hang us (it is refused below)
        fd = os.open(path, os.O_RDONLY | os.O_NOFOLLOW | os.O_CLOEXEC | os.O_NONBLOCK)
    except FileNotFoundError:
        return None
    except OSError as exc:
        if exc.errno == errno.ELOOP:
            raise KeyFileError(path, "is a symbolic link", hint="replace it with the key file itself") from None
        raise KeyFileError(path, f"cannot be opened: {exc.strerror}") from exc
    try:
        st = os.fstat(fd)
        _check_stat(path, st)
        size = st.st_size
        data = b""
        limit = size if multiple and 0 < size <= 64 * KEY_SIZE and size % KEY_SIZE == 0 else KEY_SIZE
        while len(data) <= limit:
            piece = os.read(fd, limit + 1 - len(data))
            if not piece:
                break
            data += piece
    finally:
        os.close(fd)
    if len(data) != limit or size != limit:
        expected = f"keys are {KEY_SIZE} bytes each" if multiple else f"a key is exactly {KEY_SIZE}"
        raise KeyFileError(
            path,
            f"holds {size} bytes, {expected}",
            hint="the file is damaged; restore it from a backup, or delete it to create a new key "
            "(save files written with the old key can then no longer be read)",
        )
    return data


def _create_key(path: Path) -> bytes:
    try:
        paths.ensure_private_dir(path.parent)
    except OSError as exc:
        raise KeyFileError(path, f"cannot create directory {path.parent}: {exc.strerror}") from exc
    key = secrets.token_bytes(KEY_SIZE)
    try:
        tmp = _private_temp(path, key)
    except OSError as exc:
        raise KeyFileError(path, f"cannot be created: {exc.strerror}") from exc
    try:
        try:
            os.link(tmp, path)  # atomic, and never replaces a key another process just made
        except FileExistsError:
            return load_key(path)  # lost the race: use the winner's key
        fsync_dir(path.parent)
    except OSError as exc:
        raise KeyFileError(path, f"cannot be created: {exc.strerror}") from exc
    finally:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)
    return key


def _write_all(fd: int, data: bytes) -> None:
    view = memoryview(data)
    while view:
        view = view[os.write(fd, view) :]


def _check_stat(path: Path, st: os.stat_result) -> None:
    if not stat.S_ISREG(st.st_mode):
        raise KeyFileError(path, "is not a regular file")
    if st.st_uid != os.geteuid():
        raise KeyFileError(
            path,
            f"belongs to uid {st.st_uid}, not to you (uid {os.geteuid()})",
            hint="each user has their own key; do not share or borrow one",
        )
    mode = stat.S_IMODE(st.st_mode)
    if mode & 0o077:
        raise KeyFileError(
            path,
            f"has mode {mode:04o}: other users can access it",
            hint=f"run `chmod 600 {path}`; if others may have read it, delete it to create a new key "
            "(existing save files then become unreadable)",
        )


def _check_key_bytes(key: bytes) -> None:
    if len(key) != KEY_SIZE:
        raise ValueError(f"a state-file key is {KEY_SIZE} bytes, got {len(key)}")
