"""Download official cloud images into the image store, verified and cached by digest.

``pull("ubuntu-24.04", store)`` (a catalogue name) or ``pull("https://.../x.qcow2", store)``:

1. the publisher's checksum file (``SHA256SUMS``; Debian publishes ``SHA512SUMS``) is fetched and
   the image's expected digest looked up (``HASH  name`` and ``HASH *name`` lines, and BSD
   ``SHA256 (name) = HASH`` lines);
2. if an image with that digest is already in the store, nothing is downloaded (cache hit);
3. otherwise the image is downloaded to ``<cache>/.downloads/<algo>-<digest>.part`` with a
   progress callback; an interrupted download is resumed with an HTTP ``Range`` request, both by
   the automatic retries of the same call and by the next call;
4. the file is verified; on a mismatch it is deleted (nothing is cached) and ImageError says so;
5. it is moved into the store (kind ``disk``, no kernel: these images boot through firmware).

The download location is overridable for mirrors and tests: ``base_url=`` or ``$VMKIT_PULL_BASE_URL``
replaces the directory part of a catalogue entry's URLs. Only the standard library is used.
"""

from __future__ import annotations

import contextlib
import fcntl
import hashlib
import http.client
import os
import re
import shutil
import time
import urllib.error
import urllib.parse
import urllib.request
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

from vmkit.errors import ConfigError, ImageError
from vmkit.host import paths
from vmkit.host.images.catalogue import CATALOGUE as CATALOGUE  # re-exported: pull is where it is used
from vmkit.host.images.catalogue import CatalogueEntry as CatalogueEntry
from vmkit.host.images.store import Image, ImageFile, ImageManifest, ImageStore, validate_image_name

BASE_URL_ENV = "VMKIT_PULL_BASE_URL"
USER_AGENT = "vmkit/0.1 (+https://github.com/vmkit)"
CHUNK = 1 << 20
DOWNLOADS = ".downloads"


@dataclass(frozen=True)
class PullProgress:
    """One step of a pull, for a progress bar."""

    stage: str  # checksums | cached | download | verify | commit | done
    message: str
    done: int = 0  # bytes downloaded so far (download stage)
    total: int | None = None  # bytes in the whole file, when the server says


ProgressCallback = Callable[[PullProgress], None]

_HEX = {64: "sha256", 128: "sha512"}
_SUM_LINE = re.compile(r"^([0-9a-fA-F]{64}|[0-9a-fA-F]{128})\s+[ *]?(.+?)\s*$")
_BSD_LINE = re.compile(r"^(SHA256|SHA512)\s*\((.+)\)\s*=\s*([0-9a-fA-F]+)\s*$")


def parse_sums(text: str) -> dict[str, tuple[str, str]]:
    """``{file name: (algorithm, hex digest)}`` from a SHA256SUMS/SHA512SUMS file.

    Accepts GNU lines (``HASH  name`` text mode, ``HASH *name`` binary mode) and BSD lines
    (``SHA256 (name) = HASH``); ignores blank lines, comments and PGP armour. A leading ``./`` is
    dropped from names.
    """
    out: dict[str, tuple[str, str]] = {}
    for line in text.splitlines():
        m = _SUM_LINE.match(line)
        if m:
            digest, name = m.group(1).lower(), m.group(2)
            out[name.removeprefix("./")] = (_HEX[len(digest)], digest)
            continue
        b = _BSD_LINE.match(line)
        if b:
            algo, name, digest = b.group(1).lower(), b.group(2), b.group(3).lower()
            if len(digest) == {"sha256": 64, "sha512": 128}[algo]:
                out[name.removeprefix("./")] = (algo, digest)
    return out


@dataclass(frozen=True)
class _Source:
    url: str
    sums_url: str
    filename: str
    image_name: str
    catalogue: str | None


def _resolve(name_or_url: str, *, base_url: str | None, sums_url: str | None, name: str | None) -> _Source:
    if "://" in name_or_url:
        parsed = urllib.parse.urlsplit(name_or_url)
        if parsed.scheme not in ("http", "https", "file"):
            raise ConfigError.single("image", f"{name_or_url!r}: only http, https and file URLs can be pulled")
        filename = Path(urllib.parse.unquote(parsed.path)).name
        if not filename:
            raise ConfigError.single("image", f"{name_or_url!r} does not name a file")
        directory = name_or_url.rsplit("/", 1)[0]
        stem = filename.split(".")[0] or filename
        return _Source(name_or_url, sums_url or f"{directory}/SHA256SUMS", filename,
                       validate_image_name(name or stem), None)
    entry = CATALOGUE.get(name_or_url)
    if entry is None:
        raise ConfigError.single(
            "image", f"{name_or_url!r} is not in the catalogue: use one of {', '.join(CATALOGUE)} or a URL")
    base = (base_url or os.environ.get(BASE_URL_ENV) or entry.base_url).rstrip("/")
    return _Source(f"{base}/{entry.filename}", sums_url or f"{base}/{entry.sums_filename}", entry.filename,
                   validate_image_name(name or entry.image_name), entry.name)


def _open(url: str, *, timeout: float, headers: dict[str, str] | None = None) -> http.client.HTTPResponse:
    req = urllib.request.Request(url, headers={"User-Agent": USER_AGENT, **(headers or {})})  # noqa: S310
    resp = urllib.request.urlopen(req, timeout=timeout)  # noqa: S310 - scheme checked in _resolve
    return resp  # type: ignore[no-any-return]


def fetch_text(url: str, *, timeout: float = 30.0, limit: int = 4 << 20) -> str:
    """GET a small text file (a checksum list); ImageError on any failure."""
    try:
        with _open(url, timeout=timeout) as resp:
            data = resp.read(limit + 1)
    except urllib.error.HTTPError as exc:
        raise ImageError(f"cannot fetch {url}: HTTP {exc.code} {exc.reason}") from exc
    except (urllib.error.URLError, OSError, http.client.HTTPException) as exc:
        reason = getattr(exc, "reason", exc)
        raise ImageError(f"cannot fetch {url}: {reason}",
                         hint="check the network, or point VMKIT_PULL_BASE_URL at a mirror") from exc
    if len(data) > limit:
        raise ImageError(f"{url} is larger than {limit} bytes: it is not a checksum file")
    return data.decode("utf-8", errors="replace")


def _hash_file(path: Path, algorithm: str) -> tuple[str, str]:
    """(sha256, ``algorithm`` digest) of ``path`` in one pass."""
    h256 = hashlib.sha256()
    other = hashlib.new(algorithm) if algorithm != "sha256" else None
    with path.open("rb") as fh:
        while chunk := fh.read(CHUNK):
            h256.update(chunk)
            if other is not None:
                other.update(chunk)
    return h256.hexdigest(), (other.hexdigest() if other is not None else h256.hexdigest())


def _disk_format(path: Path) -> str:
    with path.open("rb") as fh:
        return "qcow2" if fh.read(4) == b"QFI\xfb" else "raw"


@contextlib.contextmanager
def _locked(path: Path) -> Iterator[None]:
    """An exclusive advisory lock on ``path`` (two pulls of one digest wait for each other)."""
    paths.make_dirs(path.parent)
    fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o600)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX)
        yield
    finally:
        fcntl.flock(fd, fcntl.LOCK_UN)
        os.close(fd)


class _Interrupted(Exception):
    """The transfer stopped early; the .part file keeps what arrived."""


_CONTENT_RANGE = re.compile(r"^bytes\s+(\d+)-(\d+)/(\d+|\*)$")


def _download_once(url: str, part: Path, *, timeout: float, progress: ProgressCallback | None) -> int:
    """Fetch ``url`` into ``part``, resuming from its current size; return the total size.

    Raises :class:`_Interrupted` when the connection fails midway (``part`` keeps the bytes).
    """
    have = part.stat().st_size if part.exists() else 0
    headers = {"Range": f"bytes={have}-"} if have else {}
    try:
        resp = _open(url, timeout=timeout, headers=headers)
    except urllib.error.HTTPError as exc:
        if exc.code == 416 and have:
            m = re.match(r"^bytes\s+\*/(\d+)$", exc.headers.get("Content-Range", ""))
            if m and int(m.group(1)) == have:
                return have  # the .part file is already complete
            part.unlink()  # the server's file is smaller than ours: start again
            raise _Interrupted("the partial download does not fit the file on the server") from exc
        raise ImageError(f"cannot download {url}: HTTP {exc.code} {exc.reason}") from exc
    except (urllib.error.URLError, OSError, http.client.HTTPException) as exc:
        raise _Interrupted(str(getattr(exc, "reason", exc))) from exc
    with resp:
        if resp.status == 206:
            m = _CONTENT_RANGE.match(resp.headers.get("Content-Range", ""))
            if not m or int(m.group(1)) != have:
                raise ImageError(f"cannot resume {url}: the server answered the range request with "
                                 f"{resp.headers.get('Content-Range')!r}")
            total = int(m.group(3)) if m.group(3) != "*" else None
            mode = "ab"
        else:  # 200: the server ignores Range; start over
            have = 0
            length = resp.headers.get("Content-Length")
            total = int(length) if length is not None else None
            mode = "wb"
        done = have
        last = 0.0
        try:
            with part.open(mode) as fh:
                while True:
                    chunk = resp.read(CHUNK)
                    if not chunk:
                        break
                    fh.write(chunk)
                    done += len(chunk)
                    now = time.monotonic()
                    if progress is not None and (now - last >= 0.1 or done == total):
                        last = now
                        progress(PullProgress("download", f"downloading {url}", done, total))
        except (OSError, http.client.HTTPException) as exc:
            raise _Interrupted(f"{type(exc).__name__}: {exc}") from exc
    if total is not None and done < total:
        raise _Interrupted(f"the connection closed after {done} of {total} bytes")
    if progress is not None:
        progress(PullProgress("download", f"downloaded {url}", done, total if total is not None else done))
    return done


def download(url: str, part: Path, *, retries: int = 3, timeout: float = 30.0,
             progress: ProgressCallback | None = None) -> int:
    """Download ``url`` into ``part`` with up to ``retries`` resumed retries; return its size.

    If every attempt fails, ``part`` keeps the bytes that arrived (a later call resumes) and
    ImageError says how far it got.
    """
    attempt = 0
    while True:
        try:
            return _download_once(url, part, timeout=timeout, progress=progress)
        except _Interrupted as exc:
            have = part.stat().st_size if part.exists() else 0
            if attempt >= retries:
                raise ImageError(
                    f"download of {url} was interrupted after {have} bytes: {exc}",
                    hint="run the pull again: it resumes where it stopped") from exc
            attempt += 1
            if progress is not None:
                progress(PullProgress("download", f"interrupted ({exc}); resuming at byte {have} "
                                                  f"(retry {attempt} of {retries})", have, None))
            time.sleep(min(0.5 * attempt, 5.0))


def _find_cached(store: ImageStore, digest: str) -> Image | None:
    for image in store.list():
        if image.manifest.extra.get("source_digest") == digest and image.disk and image.disk.is_file():
            return image
    return None


def pull(name_or_url: str, store: ImageStore, *, progress: ProgressCallback | None = None,
         base_url: str | None = None, sums_url: str | None = None, name: str | None = None,
         force: bool = False, retries: int = 3, timeout: float = 30.0) -> Image:
    """Download, verify and store a cloud image; return it (from the cache when the digest is known).

    ``name_or_url`` is a :data:`CATALOGUE` name or an http(s)/file URL (its checksums are then read
    from ``sums_url``, by default ``SHA256SUMS`` beside it). ``name`` overrides the store name.
    ``force`` downloads again even if the digest is cached, and replaces an image of the same name
    with a different digest (without ``force`` that is refused: instance disks are overlays on it).
    """
    src = _resolve(name_or_url, base_url=base_url, sums_url=sums_url, name=name)

    def emit(stage: str, message: str, done: int = 0, total: int | None = None) -> None:
        if progress is not None:
            progress(PullProgress(stage, message, done, total))

    emit("checksums", f"fetching {src.sums_url}")
    sums = parse_sums(fetch_text(src.sums_url, timeout=timeout))
    if src.filename not in sums:
        raise ImageError(f"{src.sums_url} has no checksum for {src.filename}",
                         hint="the publisher may have renamed the image; check the URL")
    algorithm, expected = sums[src.filename]
    digest = f"{algorithm}:{expected}"

    downloads = store.root / DOWNLOADS
    part = downloads / f"{algorithm}-{expected}.part"
    with _locked(downloads / f"{algorithm}-{expected}.lock"):
        cached = None if force else _find_cached(store, digest)
        if cached is not None and cached.name == src.image_name:
            emit("cached", f"{src.image_name} is cached ({digest[:19]}...): nothing to download")
            return cached
        if store.exists(src.image_name) and not force:
            # Instance disks are overlays that name their base by path: silently replacing the
            # base under them would corrupt them.
            old = store.get(src.image_name).manifest.extra.get("source_digest", "unknown")
            raise ImageError(
                f"image {src.image_name!r} is already in the store with another digest ({old[:23]}...); "
                f"the publisher now has {digest[:23]}...",
                hint="pull it under another name (name=...), or replace it with force=True "
                     "(instances created from the old image stop working)")

        with store.staging(src.image_name) as staging:
            if cached is not None:
                # Same bytes under another name: copy (hard link when possible), no download.
                emit("cached", f"same digest as image {cached.name}: copying, nothing to download")
                assert cached.disk is not None
                dest = staging / cached.disk.name
                try:
                    os.link(cached.disk, dest)
                except OSError:
                    shutil.copyfile(cached.disk, dest)
                sha256 = cached.manifest.files[cached.manifest.disk or ""].sha256
            else:
                resumed = part.exists() and part.stat().st_size > 0
                if resumed:
                    emit("download", f"resuming {src.url} at byte {part.stat().st_size}",
                         part.stat().st_size)
                download(src.url, part, retries=retries, timeout=timeout, progress=progress)
                emit("verify", f"verifying {algorithm} of {src.filename}")
                sha256, got = _hash_file(part, algorithm)
                if got != expected and resumed:
                    # The bytes kept from an earlier attempt may be stale: try once from scratch.
                    part.unlink()
                    emit("download", "checksum mismatch after resuming: downloading again from the start")
                    download(src.url, part, retries=retries, timeout=timeout, progress=progress)
                    sha256, got = _hash_file(part, algorithm)
                if got != expected:
                    part.unlink()
                    raise ImageError(
                        f"checksum mismatch for {src.filename}: {src.sums_url} says {algorithm} {expected}, "
                        f"the download has {got}; the download was discarded and nothing was cached",
                        hint="try again later; if it persists the mirror or the checksum file is wrong")
                dest = staging / ("disk.qcow2" if _disk_format(part) == "qcow2" else "disk.raw")
                os.replace(part, dest)
            fmt = _disk_format(dest)
            emit("commit", f"storing image {src.image_name}")
            manifest = ImageManifest(
                name=src.image_name,
                kind="disk",
                source=src.url,
                disk=dest.name,
                disk_format=fmt,
                files={dest.name: ImageFile(path=dest.name, sha256=sha256, size=dest.stat().st_size)},
                extra={
                    "source_digest": digest,
                    "url": src.url,
                    "sums_url": src.sums_url,
                    "catalogue": src.catalogue,
                    "boot": "firmware",
                },
            )
            image = store.commit(staging, manifest)
    emit("done", f"pulled {image.name}")
    return image
