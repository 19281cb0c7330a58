"""Where vmkit keeps things.

``VMKIT_HOME`` overrides everything (instances, image cache, config); otherwise the XDG
directories from :mod:`platformdirs`. ``VMKIT_IMAGE_CACHE`` overrides only the image cache
(the test-suite uses it to share one built image across many throw-away homes).
Values are read on each call, never frozen at import time.

Every directory returned here is checked as OpenSSH checks the directories above ``~/.ssh``
(:func:`check_owned_tree`): it and each parent up to ``/`` must belong to the caller or root and
must not be writable by group or others, except a root-owned sticky directory such as ``/tmp``.
Another user who could write in one of them could swap a machine's vm.yaml, its disks or a
cached kernel, so such a directory is refused with a :class:`~vmkit.errors.HostError` instead.
"""

from __future__ import annotations

import contextlib
import os
import stat
from collections.abc import Iterator
from contextvars import ContextVar
from pathlib import Path

from vmkit.errors import HostError

APP = "vmkit"


_home_override: ContextVar[Path | None] = ContextVar("vmkit_home", default=None)


def _home() -> Path | None:
    override = _home_override.get()
    if override is not None:
        return override
    value = os.environ.get("VMKIT_HOME")
    return Path(value).expanduser().resolve() if value else None


@contextlib.contextmanager
def using_home(home: str | Path | None) -> Iterator[None]:
    """Within the block (and the threads and tasks it starts), ``home`` is the vmkit home, as
    ``VMKIT_HOME`` would make it (``vmkit.Client(home=...)``); None changes nothing."""
    if home is None:
        yield
        return
    token = _home_override.set(Path(home).expanduser().resolve())
    try:
        yield
    finally:
        _home_override.reset(token)


def child_env() -> dict[str, str]:
    """The environment for vmkit's own child processes (the supervisor): the home in force included."""
    env = dict(os.environ)
    override = _home_override.get()
    if override is not None:
        env["VMKIT_HOME"] = str(override)
    return env


def _checked(path: Path, home: Path | None, default: str) -> Path:
    """``path`` after :func:`check_owned_tree`, blamed on ``VMKIT_HOME`` if it comes from there."""
    return check_owned_tree(path, f"VMKIT_HOME ({home})" if home else f"{default} {path}")


def _xdg(kind: str) -> Path:
    """The XDG directory ``kind`` (data, cache, config) of vmkit; platformdirs is imported only when
    ``VMKIT_HOME`` does not say where everything is."""
    import platformdirs

    where = {"data": platformdirs.user_data_dir, "cache": platformdirs.user_cache_dir,
             "config": platformdirs.user_config_dir}[kind]
    return Path(where(APP))


def data_dir() -> Path:
    home = _home()
    return _checked(home if home else _xdg("data"), home, "the vmkit data directory")


def instances_dir() -> Path:
    home = _home()
    base = home if home else _xdg("data")
    return _checked(base / "instances", home, "the vmkit instances directory")


def networks_dir() -> Path:
    """Where vmkit network definitions live (``networks/NAME/``), beside the instances."""
    home = _home()
    base = home if home else _xdg("data")
    return _checked(base / "networks", home, "the vmkit networks directory")


def image_cache_dir() -> Path:
    override = os.environ.get("VMKIT_IMAGE_CACHE")
    if override:
        path = Path(override).expanduser().resolve()
        return check_owned_tree(path, f"VMKIT_IMAGE_CACHE ({path})")
    home = _home()
    base = home if home else _xdg("cache")
    return _checked(base / "images", home, "the vmkit image cache")


def config_dir() -> Path:
    home = _home()
    return _checked(home / "config" if home else _xdg("config"), home,
                    "the vmkit config directory")


def check_owned_tree(path: Path, source: str) -> Path:
    """Return ``path`` if no other user can change what is in it; else raise :class:`HostError`.

    ``path`` (resolved: symbolic links are followed) and every existing parent up to ``/`` must
    belong to the caller or root and must not be writable by group or others; a root-owned
    directory with the sticky bit (``/tmp``) may be writable by all, as nobody can rename or
    remove what others made in it. Parts that do not exist yet are skipped: vmkit creates them
    (the leaf with mode 0700). ``source`` names where the path came from (``VMKIT_HOME (/x)``).
    """
    real = Path(os.path.abspath(path)).resolve()
    uid = os.geteuid()
    for d in (real, *real.parents):
        try:
            st = os.stat(d)
        except FileNotFoundError:
            continue
        except OSError as exc:
            raise HostError(f"{source}: cannot check {d}: {exc.strerror}") from None
        mode = stat.S_IMODE(st.st_mode)
        what = "the directory itself" if d == real else f"a parent of {real}"
        if st.st_uid not in (0, uid):
            raise HostError(
                f"{source} is unsafe: {d} ({what}) belongs to uid {st.st_uid}, not to you "
                f"(uid {uid}) or root, so that user could change your machines and images",
                hint=f"use a directory that only you own (e.g. under your home), or `chown {uid} {d}`",
            )
        sticky_root = st.st_uid == 0 and mode & stat.S_ISVTX
        if mode & 0o022 and not sticky_root:
            raise HostError(
                f"{source} is unsafe: {d} ({what}) has mode {mode:04o}, writable by "
                f"{'group and others' if mode & 0o022 == 0o022 else 'group' if mode & 0o020 else 'others'}, "
                "so other users could change your machines and images",
                hint=f"run `chmod go-w {d}`, or use a directory that only you can write",
            )
    return path


def make_dirs(path: Path) -> Path:
    """Create ``path`` and its missing parents, each with mode 0700 (existing ones are left as
    they are); return it. Not ``mkdir(parents=True)``: that gives parents the umask's mode, which
    may be group-writable (umask 002), and :func:`check_owned_tree` would then refuse them."""
    missing = []
    for d in (path, *path.parents):
        if d.is_dir():
            break
        missing.append(d)
    for d in reversed(missing):
        try:
            d.mkdir(mode=0o700)
        except FileExistsError:
            if not d.is_dir():
                raise
    return path


def ensure_private_dir(path: Path) -> Path:
    """Create ``path`` (and parents, see :func:`make_dirs`) with mode 0700 for the leaf; return it."""
    make_dirs(path)
    path.chmod(0o700)
    return path
