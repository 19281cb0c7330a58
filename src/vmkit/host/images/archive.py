"""``vmkit image export NAME FILE`` / ``vmkit image import FILE``: an image and its manifest in one tar.

The archive holds ``manifest.json`` first, then every file of the image directory. The exported
manifest lists every file with its sha256 and size (files a builder did not record, such as a
second kernel, are digested at export). Import reads the manifest, refuses any member that is not
a plain file the manifest lists (no paths, links or devices), checks each file's size and digest
while it is unpacked into a staging directory, and only then moves the image into the store:
a damaged or tampered archive leaves nothing behind.
"""

from __future__ import annotations

import hashlib
import io
import json
import tarfile
from collections.abc import Callable
from pathlib import Path

from vmkit.errors import AlreadyExistsError, ConfigError, ImageError
from vmkit.host.images.store import (
    MANIFEST,
    Image,
    ImageFile,
    ImageManifest,
    ImageStore,
    sha256_file,
    validate_image_name,
)

CHUNK = 1 << 20
FORMAT = "vmkit-image/1"

Progress = Callable[[str], None]


def _full_manifest(image: Image) -> ImageManifest:
    files = dict(image.manifest.files)
    for p in sorted(image.directory.iterdir()):
        if p.name == MANIFEST or p.name in files:
            continue
        if p.is_symlink() or not p.is_file():
            raise ImageError(f"image {image.name!r}: {p.name} is not a regular file; it cannot be exported")
        files[p.name] = ImageFile(path=p.name, sha256=sha256_file(p), size=p.stat().st_size)
    return image.manifest.model_copy(update={"files": files, "extra": {**image.manifest.extra, "format": FORMAT}})


def export_image(store: ImageStore, name: str, dest: Path, *, progress: Progress | None = None) -> Path:
    """Write image ``name`` with its manifest to the tar ``dest`` (``.tar.gz``/``.tgz``: gzip-compressed).

    The image is verified against its manifest first; ``dest`` appears only when complete."""
    image = store.get(name)
    if progress is not None:
        progress(f"verifying image {name}")
    image.verify()
    manifest = _full_manifest(image)
    dest = dest.expanduser().absolute()
    if dest.is_dir():
        raise ConfigError.single("FILE", f"{dest} is a directory: give the archive's file name, e.g. {name}.tar")
    mode = "w:gz" if dest.name.endswith((".tar.gz", ".tgz")) else "w"
    tmp = dest.with_name(f".{dest.name}.partial")
    try:
        with tarfile.open(tmp, mode) as tar:  # type: ignore[call-overload]
            data = json.dumps(manifest.model_dump(mode="json"), indent=2).encode()
            info = tarfile.TarInfo(MANIFEST)
            info.size, info.mode = len(data), 0o644
            tar.addfile(info, io.BytesIO(data))
            for rel in manifest.files:
                if progress is not None:
                    progress(f"adding {rel}")
                info = tar.gettarinfo(str(image.directory / rel), arcname=rel)
                info.uid = info.gid = 0
                info.uname = info.gname = ""
                with (image.directory / rel).open("rb") as fh:
                    tar.addfile(info, fh)
        tmp.replace(dest)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    return dest


def import_image(store: ImageStore, src: Path, *, name: str | None = None, force: bool = False,
                 progress: Progress | None = None) -> Image:
    """Unpack an exported image into ``store`` (as ``name``, default the manifest's), verified."""
    src = src.expanduser()
    if not src.is_file():
        raise ConfigError.single("FILE", f"{src} is not a file")
    try:
        tar = tarfile.open(src, "r:*")  # noqa: SIM115 - closed by the with below
    except (tarfile.TarError, OSError) as exc:
        raise ImageError(f"{src} is not an image archive: {exc}",
                         hint="make one with `vmkit image export NAME FILE`") from None
    try:
        with tar:
            return _unpack(store, tar, src, name=name, force=force, progress=progress)
    except (tarfile.TarError, EOFError, OSError) as exc:
        raise ImageError(f"{src}: the archive is damaged or truncated ({exc}); nothing was imported",
                         hint="export it again") from None


def _unpack(store: ImageStore, tar: tarfile.TarFile, src: Path, *, name: str | None, force: bool,
            progress: Progress | None) -> Image:
    first = tar.next()
    if first is None or first.name != MANIFEST or not first.isfile():
        raise ImageError(f"{src} does not start with {MANIFEST}: not made by `vmkit image export`")
    raw = tar.extractfile(first)
    assert raw is not None
    try:
        manifest = ImageManifest.model_validate_json(raw.read(4 << 20))
    except ValueError as exc:
        raise ImageError(f"{src}: its manifest is not valid: {exc}") from None
    target = validate_image_name(name or manifest.name)
    for rel in manifest.files:
        if "/" in rel or rel in (".", "..", MANIFEST) or rel.startswith("."):
            raise ImageError(f"{src}: the manifest names {rel!r}, which is not a plain file name")
    if store.exists(target) and not force:
        raise AlreadyExistsError("image", target, hint="give --name NEW, or --force to replace it "
                                 "(machines made from it have overlays on its disk)")
    seen: set[str] = set()
    with store.staging(target) as staging:
        while (member := tar.next()) is not None:
            if member.name not in manifest.files or member.name in seen or not member.isfile():
                raise ImageError(f"{src}: unexpected member {member.name!r} (not a file its manifest lists)")
            seen.add(member.name)
            expected = manifest.files[member.name]
            if progress is not None:
                progress(f"unpacking {member.name}")
            fh = tar.extractfile(member)
            assert fh is not None
            h = hashlib.sha256()
            size = 0
            with (staging / member.name).open("wb") as out:
                while chunk := fh.read(CHUNK):
                    h.update(chunk)
                    size += len(chunk)
                    out.write(chunk)
            if size != expected.size or h.hexdigest() != expected.sha256:
                raise ImageError(f"{src}: {member.name} does not match its manifest (size {size}, "
                                 f"expected {expected.size}; sha256 differs: {h.hexdigest() != expected.sha256}); "
                                 "nothing was imported", hint="the archive is damaged: export it again")
        missing = sorted(set(manifest.files) - seen)
        if missing:
            raise ImageError(f"{src}: the archive lacks {', '.join(missing)}; nothing was imported")
        extra = {k: v for k, v in manifest.extra.items() if k != "format"}
        return store.commit(staging, manifest.model_copy(update={"name": target, "extra": extra}))
