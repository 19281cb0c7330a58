"""The per-user state-file key: creation, permissions, refusal of unsafe files, races."""

from __future__ import annotations

import multiprocessing
import os
import stat
import threading
from pathlib import Path

import pytest

from vmkit.errors import ExitCode
from vmkit.state import key as keys
from vmkit.state.key import KEY_SIZE, KeyFileError, key_id, key_path, load_key, load_or_create_key


@pytest.fixture
def home(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    monkeypatch.setenv("VMKIT_HOME", str(tmp_path / "home"))
    return tmp_path / "home"


def _mode(path: Path) -> int:
    return stat.S_IMODE(path.stat().st_mode)


def test_created_on_first_use_with_private_modes(home: Path) -> None:
    path = key_path()
    assert path == home / "config" / "state.key"
    assert not path.exists()
    key = load_or_create_key()
    assert len(key) == KEY_SIZE
    assert path.read_bytes() == key
    assert _mode(path) == 0o600
    assert _mode(path.parent) == 0o700
    assert load_or_create_key() == key
    assert load_key() == key
    assert [p.name for p in path.parent.iterdir()] == ["state.key"]  # no temp file left behind


def test_mode_is_0600_even_with_a_permissive_umask(home: Path) -> None:
    old = os.umask(0)
    try:
        load_or_create_key()
    finally:
        os.umask(old)
    assert _mode(key_path()) == 0o600


def test_keys_are_random(tmp_path: Path) -> None:
    a = load_or_create_key(tmp_path / "a" / "state.key")
    b = load_or_create_key(tmp_path / "b" / "state.key")
    assert a != b
    assert key_id(a) != key_id(b)
    assert key_id(a) == key_id(a) and len(key_id(a)) == 16


def test_missing_key_is_an_error_for_load_key(home: Path) -> None:
    with pytest.raises(KeyFileError, match="does not exist") as info:
        load_key()
    assert info.value.exit_code == ExitCode.STATE_FILE


@pytest.mark.parametrize("mode", [0o640, 0o604, 0o644, 0o660, 0o606, 0o700 | 0o040])
def test_group_or_world_accessible_key_is_refused(home: Path, mode: int) -> None:
    load_or_create_key()
    key_path().chmod(mode)
    with pytest.raises(KeyFileError, match="other users can access it") as info:
        load_or_create_key()
    assert "chmod 600" in str(info.value)


@pytest.mark.parametrize("size", [0, 16, 31, 33, 64])
def test_wrong_size_is_refused(home: Path, size: int) -> None:
    path = key_path()
    path.parent.mkdir(parents=True)
    path.write_bytes(b"k" * size)
    path.chmod(0o600)
    with pytest.raises(KeyFileError, match=f"holds {size} bytes"):
        load_or_create_key()
    assert path.read_bytes() == b"k" * size  # never silently replaced


def test_symlink_is_refused(home: Path, tmp_path: Path) -> None:
    real = tmp_path / "elsewhere.key"
    real.write_bytes(os.urandom(KEY_SIZE))
    real.chmod(0o600)
    key_path().parent.mkdir(parents=True)
    key_path().symlink_to(real)
    with pytest.raises(KeyFileError, match="symbolic link"):
        load_or_create_key()


def test_directory_is_refused(home: Path) -> None:
    key_path().mkdir(parents=True, mode=0o700)
    with pytest.raises(KeyFileError):
        load_or_create_key()


@pytest.mark.skipif(os.geteuid() != 0, reason="needs root to chown")
def test_key_of_another_user_is_refused(home: Path) -> None:
    load_or_create_key()
    os.chown(key_path(), 12345, 12345)
    with pytest.raises(KeyFileError, match="belongs to uid 12345"):
        load_key()


def test_threads_racing_to_create_agree(tmp_path: Path) -> None:
    path = tmp_path / "cfg" / "state.key"
    n = 8
    barrier = threading.Barrier(n)
    results: list[bytes] = []
    errors: list[BaseException] = []

    def run() -> None:
        barrier.wait()
        try:
            results.append(load_or_create_key(path))
        except BaseException as exc:
            errors.append(exc)

    threads = [threading.Thread(target=run) for _ in range(n)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not errors
    assert len(set(results)) == 1
    assert results[0] == path.read_bytes()
    assert [p.name for p in path.parent.iterdir()] == ["state.key"]


def _create_in_child(path: str, barrier: object, queue: multiprocessing.Queue[bytes]) -> None:
    barrier.wait()  # type: ignore[attr-defined]
    queue.put(keys.load_or_create_key(Path(path)))


def test_processes_racing_to_create_agree(tmp_path: Path) -> None:
    path = tmp_path / "cfg" / "state.key"
    ctx = multiprocessing.get_context("fork")
    n = 6
    barrier = ctx.Barrier(n)
    queue: multiprocessing.Queue[bytes] = ctx.Queue()
    procs = [ctx.Process(target=_create_in_child, args=(str(path), barrier, queue)) for _ in range(n)]
    for p in procs:
        p.start()
    got = [queue.get(timeout=30) for _ in range(n)]
    for p in procs:
        p.join(timeout=30)
        assert p.exitcode == 0
    assert len(set(got)) == 1 and got[0] == path.read_bytes()
    assert _mode(path) == 0o600
    assert [p.name for p in path.parent.iterdir()] == ["state.key"]


def test_fifo_is_refused_without_hanging(home: Path) -> None:
    key_path().parent.mkdir(parents=True)
    os.mkfifo(key_path(), 0o600)
    with pytest.raises(KeyFileError, match="not a regular file"):
        load_or_create_key()
