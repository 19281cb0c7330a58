"""Crash-safe file writes: temp file in the same directory, fsync, rename."""

from __future__ import annotations

import contextlib
import os
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import IO


@contextlib.contextmanager
def atomic_open(path: Path, mode: int = 0o600, *, text: bool = False) -> Iterator[IO[bytes]]:
    """Open a temp file beside ``path``; on success fsync it and rename it over ``path``.

    On any exception the temp file is removed and ``path`` is left as it was.
    """
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        os.fchmod(fd, mode)
        with os.fdopen(fd, "wb") as fh:
            yield fh
            fh.flush()
            os.fsync(fh.fileno())
        os.replace(tmp, path)
        fsync_dir(path.parent)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)
        raise


def atomic_write(path: Path, data: bytes | str, mode: int = 0o600) -> None:
    payload = data.encode() if isinstance(data, str) else data
    with atomic_open(path, mode) as fh:
        fh.write(payload)


def fsync_path(path: Path, *, directory: bool = False) -> None:
    """Flush a file (or with ``directory``, a directory's entries) to disk."""
    fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC | (os.O_DIRECTORY if directory else 0))
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def fsync_dir(path: Path) -> None:
    fsync_path(path, directory=True)
