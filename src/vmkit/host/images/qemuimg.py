"""Thin helpers around ``qemu-img``: info, convert, overlays, resize.

Every helper runs ``qemu-img`` with an argv list (never a shell string) and raises
:class:`~vmkit.errors.ImageError` carrying ``qemu-img``'s own error text when it fails, or
:class:`~vmkit.errors.HostError` when ``qemu-img`` is not installed.
"""

from __future__ import annotations

import json
import re
import shutil
import subprocess
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from vmkit.errors import ConfigError, HostError, ImageError

QEMU_IMG = "qemu-img"
FORMATS = ("qcow2", "raw")

_SIZE_RE = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*([KMGTP]?)(i?B?)?\s*$", re.IGNORECASE)
_UNITS = {"": 1, "K": 1 << 10, "M": 1 << 20, "G": 1 << 30, "T": 1 << 40, "P": 1 << 50}


def parse_size(size: int | str) -> int:
    """Bytes from ``20G``, ``512M``, ``1.5GiB``, ``4096`` (binary units, as qemu-img reads them)."""
    if isinstance(size, int):
        if size < 0:
            raise ConfigError.single("size", f"{size} is negative: use a size such as 20G")
        return size
    m = _SIZE_RE.match(size)
    if not m:
        raise ConfigError.single("size", f"{size!r} is not a size: use a number with K, M, G or T, e.g. 20G")
    return int(float(m.group(1)) * _UNITS[m.group(2).upper()])


@dataclass(frozen=True)
class ImageInfo:
    """What ``qemu-img info --output=json`` says about one image."""

    path: Path
    format: str
    virtual_size: int
    actual_size: int | None
    backing_file: str | None
    backing_format: str | None
    raw: dict[str, Any]


def _qemu_img() -> str:
    exe = shutil.which(QEMU_IMG)
    if exe is None:
        raise HostError("qemu-img is not installed", hint="install it: apt-get install qemu-utils")
    return exe


def run(args: Sequence[str], *, what: str, timeout: float | None = None) -> str:
    """Run ``qemu-img ARGS``; return stdout, or raise ImageError with ``what`` and qemu-img's stderr."""
    argv = [_qemu_img(), *args]
    try:
        proc = subprocess.run(argv, capture_output=True, text=True, timeout=timeout, check=False)
    except subprocess.TimeoutExpired as exc:
        raise ImageError(f"{what}: qemu-img did not finish within {timeout:g} s") from exc
    if proc.returncode != 0:
        detail = proc.stderr.strip() or proc.stdout.strip() or f"exit status {proc.returncode}"
        raise ImageError(f"{what}: {detail}")
    return proc.stdout


def info(path: Path, *, backing_chain: bool = False) -> ImageInfo:
    """``qemu-img info`` as an :class:`ImageInfo` (the top image when ``backing_chain``)."""
    args = ["info", "--output=json", "-U"]
    if backing_chain:
        args.append("--backing-chain")
    out = run([*args, str(path)], what=f"cannot inspect {path}", timeout=60)
    try:
        data = json.loads(out)
    except json.JSONDecodeError as exc:
        raise ImageError(f"cannot inspect {path}: qemu-img printed no JSON: {out[:200]!r}") from exc
    top: dict[str, Any] = data[0] if isinstance(data, list) else data
    return ImageInfo(
        path=path,
        format=str(top["format"]),
        virtual_size=int(top["virtual-size"]),
        actual_size=int(top["actual-size"]) if "actual-size" in top else None,
        backing_file=top.get("full-backing-filename") or top.get("backing-filename"),
        backing_format=top.get("backing-filename-format"),
        raw=top,
    )


def _check_format(fmt: str) -> str:
    if fmt not in FORMATS:
        raise ConfigError.single("format", f"{fmt!r} is not a supported disk format: use {' or '.join(FORMATS)}")
    return fmt


def convert(src: Path, dst: Path, *, src_format: str | None = None, dst_format: str = "qcow2",
            compress: bool = False, options: Sequence[str] = ()) -> None:
    """``qemu-img convert`` ``src`` to ``dst`` (qcow2 by default; ``compress`` for ``-c``)."""
    args = ["convert", "-O", _check_format(dst_format)]
    if src_format:
        args += ["-f", _check_format(src_format)]
    if compress:
        if dst_format != "qcow2":
            raise ConfigError.single("compress", "only qcow2 images can be compressed")
        args.append("-c")
    for opt in options:
        args += ["-o", opt]
    run([*args, str(src), str(dst)], what=f"cannot convert {src} to {dst}")


def create(path: Path, size: int | str, *, fmt: str = "qcow2") -> None:
    """Create an empty image of ``size``."""
    run(["create", "-f", _check_format(fmt), str(path), str(parse_size(size))],
        what=f"cannot create {path}", timeout=60)


def create_overlay(path: Path, backing: Path, *, backing_format: str | None = None,
                   size: int | str | None = None) -> None:
    """A qcow2 overlay at ``path`` on top of ``backing`` (copy-on-write), optionally larger.

    The backing file is recorded by absolute path, with its format (probed if not given:
    QEMU refuses to probe backing formats at run time).
    """
    backing = backing.resolve()
    if not backing.is_file():
        raise ImageError(f"cannot create overlay {path}: backing file {backing} does not exist")
    fmt = backing_format or info(backing).format
    args = ["create", "-f", "qcow2", "-b", str(backing), "-F", _check_format(fmt), str(path)]
    if size is not None:
        want = parse_size(size)
        have = info(backing).virtual_size
        if want < have:
            raise ConfigError.single("disk", f"{size} is smaller than the image ({have} bytes): "
                                             "use at least the image size")
        args.append(str(want))
    run(args, what=f"cannot create overlay {path} on {backing}", timeout=60)


def resize(path: Path, size: int | str, *, fmt: str | None = None) -> None:
    """Grow ``path`` to ``size`` bytes (shrinking is refused: it loses data)."""
    want = parse_size(size)
    current = info(path)
    if want < current.virtual_size:
        raise ConfigError.single("disk", f"{size} is smaller than {path} ({current.virtual_size} bytes): "
                                         "disks can only grow")
    if want == current.virtual_size:
        return
    run(["resize", "-f", _check_format(fmt or current.format), str(path), str(want)],
        what=f"cannot resize {path}", timeout=60)
