"""The image store: one directory per image under the image cache, with a manifest.

Layout::

    <image_cache_dir>/<name>/manifest.json   # written last, atomically: its presence means complete
    <image_cache_dir>/<name>/<files...>      # vmlinuz, initrd.img, disk.qcow2, ...

An image is built or pulled into a temporary sibling directory and renamed into place
only when complete, so an interrupted build never leaves a half image under its name.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import shutil
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from pydantic import BaseModel, ConfigDict, Field

from vmkit.errors import ConfigError, ImageError, NotFoundError
from vmkit.fsutil import atomic_write, fsync_dir
from vmkit.host import paths

MANIFEST = "manifest.json"


class ImageFile(BaseModel):
    model_config = ConfigDict(frozen=True)

    path: str  # relative to the image directory
    sha256: str
    size: int


class ImageManifest(BaseModel):
    """What an image holds and how to boot it."""

    model_config = ConfigDict(frozen=True)

    name: str
    kind: str  # "initramfs" (kernel + initrd only) or "disk" (kernel + initrd + root disk)
    created: float = Field(default_factory=time.time)
    source: str = ""  # how it was made: "apt: linux-image-..., busybox-static ..." or a URL
    kernel: str | None = None  # role -> relative file path
    initrd: str | None = None
    disk: str | None = None
    disk_format: str | None = None  # raw | qcow2
    cmdline: str = ""  # default kernel command line
    ready_marker: str | None = None  # serial console line that says the guest is up
    kernel_version: str | None = None
    files: dict[str, ImageFile] = Field(default_factory=dict)
    extra: dict[str, Any] = Field(default_factory=dict)
    recipe: str | None = None
    """The version of the vmkit recipe that built it (``debian/3``); None for pulled images and for
    ones built before recipes had versions. A builder whose recipe changed reports older ones."""


class Image:
    """An image in the store: a directory and its manifest."""

    def __init__(self, directory: Path, manifest: ImageManifest) -> None:
        self.directory = directory
        self.manifest = manifest

    @property
    def name(self) -> str:
        return self.manifest.name

    def file(self, rel: str | None) -> Path | None:
        return None if rel is None else self.directory / rel

    @property
    def kernel(self) -> Path | None:
        return self.file(self.manifest.kernel)

    @property
    def initrd(self) -> Path | None:
        return self.file(self.manifest.initrd)

    @property
    def disk(self) -> Path | None:
        return self.file(self.manifest.disk)

    def verify(self) -> None:
        """Check every file against the manifest's sha256; raise ImageError on a mismatch."""
        for rel, entry in self.manifest.files.items():
            p = self.directory / rel
            if not p.is_file():
                raise ImageError(f"image {self.name!r}: file {rel} is missing",
                                 hint=f"rebuild it: vmkit image build {self.name} --force")
            if sha256_file(p) != entry.sha256:
                raise ImageError(f"image {self.name!r}: file {rel} does not match its manifest digest",
                                 hint=f"rebuild it: vmkit image build {self.name} --force")


def sha256_file(path: Path, bufsize: int = 1 << 20) -> str:
    h = hashlib.sha256()
    with path.open("rb") as fh:
        while chunk := fh.read(bufsize):
            h.update(chunk)
    return h.hexdigest()


def validate_image_name(name: str) -> str:
    if (not name or "/" in name or name in (".", "..") or name.startswith(".") or not name.isprintable()
            or any(c.isspace() for c in name)):
        raise ConfigError.single("image", f"{name!r} is not a valid image name: use letters, digits, '-', '.'")
    return name


class ImageStore:
    """The set of images under one cache directory."""

    def __init__(self, root: Path | None = None) -> None:
        self.root = root if root is not None else paths.image_cache_dir()

    def path(self, name: str) -> Path:
        return self.root / validate_image_name(name)

    def exists(self, name: str) -> bool:
        return (self.path(name) / MANIFEST).is_file()

    def get(self, name: str) -> Image:
        d = self.path(name)
        mf = d / MANIFEST
        if not mf.is_file():
            raise NotFoundError("image", name, hint=f"build or pull it first: vmkit image build {name}")
        try:
            manifest = ImageManifest.model_validate_json(mf.read_text())
        except ValueError as exc:
            raise ImageError(f"image {name!r} has an unreadable manifest: {exc}",
                             hint=f"remove it with: vmkit image rm {name}") from exc
        return Image(d, manifest)

    def list(self) -> list[Image]:
        if not self.root.is_dir():
            return []
        out = []
        for d in sorted(self.root.iterdir()):
            if d.is_dir() and not d.name.startswith(".") and (d / MANIFEST).is_file():
                with contextlib.suppress(ImageError):
                    out.append(self.get(d.name))
        return out

    def remove(self, name: str) -> None:
        d = self.path(name)
        if not d.exists():
            raise NotFoundError("image", name)
        shutil.rmtree(d)

    @contextlib.contextmanager
    def staging(self, name: str) -> Iterator[Path]:
        """A temporary directory for building image ``name``; see :meth:`commit`.

        The directory is removed if the block raises (or if it was not committed).
        """
        paths.make_dirs(self.root)
        tmp = Path(tempfile.mkdtemp(dir=self.root, prefix=f".{validate_image_name(name)}.building."))
        try:
            yield tmp
        finally:
            if tmp.exists():
                shutil.rmtree(tmp, ignore_errors=True)

    def commit(self, staging: Path, manifest: ImageManifest) -> Image:
        """Record digests of every manifest role file, write the manifest, move into place."""
        files = dict(manifest.files)
        for rel in (manifest.kernel, manifest.initrd, manifest.disk):
            if rel is not None and rel not in files:
                p = staging / rel
                files[rel] = ImageFile(path=rel, sha256=sha256_file(p), size=p.stat().st_size)
        final_manifest = manifest.model_copy(update={"files": files})
        atomic_write(staging / MANIFEST, json.dumps(final_manifest.model_dump(mode="json"), indent=2), 0o644)
        dest = self.path(manifest.name)
        if dest.exists():
            trash = Path(tempfile.mkdtemp(dir=self.root, prefix=f".{manifest.name}.old."))
            os.replace(dest, trash / "old")
            os.replace(staging, dest)
            shutil.rmtree(trash, ignore_errors=True)
        else:
            os.replace(staging, dest)
        fsync_dir(self.root)
        return Image(dest, final_manifest)
