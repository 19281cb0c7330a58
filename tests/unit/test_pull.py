"""Pulling images from a local HTTP server: verify, cache by digest, resume, bad checksum."""

from __future__ import annotations

import hashlib
import http.server
import os
import re
import threading
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import pytest

from vmkit.errors import ConfigError, ImageError
from vmkit.host.images import pull as pullmod
from vmkit.host.images.store import ImageStore

IMAGE = b"QFI\xfb" + os.urandom(3 * 1024 * 1024 + 123)  # qcow2 magic + ~3 MiB of noise
IMAGE_NAME = "ubuntu-24.04-server-cloudimg-amd64.img"
GOOD_SUMS = (f"{hashlib.sha256(b'other').hexdigest()} *other.img\n"
             f"{hashlib.sha256(IMAGE).hexdigest()} *{IMAGE_NAME}\n")
BAD_SUMS = f"{hashlib.sha256(b'not the image').hexdigest()}  {IMAGE_NAME}\n"


@dataclass
class Server:
    """A tiny HTTP server with Range support and a switch to drop connections midway."""

    files: dict[str, bytes] = field(default_factory=dict)
    drop_after: int | None = None  # next full GET of a big file sends this many bytes, then closes
    drops_left: int = 0
    requests: list[tuple[str, str | None]] = field(default_factory=list)  # (path, Range header)
    port: int = 0

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def image_gets(self) -> list[str | None]:
        return [r for p, r in self.requests if p == f"/{IMAGE_NAME}"]


def _handler(state: Server) -> type[http.server.BaseHTTPRequestHandler]:
    class Handler(http.server.BaseHTTPRequestHandler):
        protocol_version = "HTTP/1.1"

        def log_message(self, format: str, *args: object) -> None:
            pass

        def do_GET(self) -> None:
            rng = self.headers.get("Range")
            state.requests.append((self.path, rng))
            data = state.files.get(self.path)
            if data is None:
                self.send_error(404)
                return
            start, status = 0, 200
            if rng:
                m = re.fullmatch(r"bytes=(\d+)-", rng)
                assert m, rng
                start = int(m.group(1))
                if start >= len(data):
                    self.send_response(416)
                    self.send_header("Content-Range", f"bytes */{len(data)}")
                    self.send_header("Content-Length", "0")
                    self.end_headers()
                    return
                status = 206
            body = data[start:]
            self.send_response(status)
            self.send_header("Content-Length", str(len(body)))
            if status == 206:
                self.send_header("Content-Range", f"bytes {start}-{len(data) - 1}/{len(data)}")
            self.end_headers()
            if state.drops_left > 0 and state.drop_after is not None and len(body) > state.drop_after:
                state.drops_left -= 1
                self.wfile.write(body[: state.drop_after])
                self.wfile.flush()
                self.close_connection = True
                self.connection.shutdown(2)  # the peer sees a short body
                return
            self.wfile.write(body)

    return Handler


@pytest.fixture
def server() -> Iterator[Server]:
    state = Server(files={f"/{IMAGE_NAME}": IMAGE, "/SHA256SUMS": GOOD_SUMS.encode(),
                          "/bad/SHA256SUMS": BAD_SUMS.encode(), f"/bad/{IMAGE_NAME}": IMAGE})
    httpd = http.server.ThreadingHTTPServer(("127.0.0.1", 0), _handler(state))
    state.port = httpd.server_address[1]
    thread = threading.Thread(target=httpd.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True)
    thread.start()
    try:
        yield state
    finally:
        httpd.shutdown()
        httpd.server_close()
        thread.join(5)


@pytest.fixture
def store(tmp_path: Path) -> ImageStore:
    return ImageStore(tmp_path / "images")


def _cache_files(store: ImageStore) -> list[str]:
    return sorted(str(p.relative_to(store.root)) for p in store.root.rglob("*")
                  if p.is_file() and not p.name.endswith(".lock"))


def test_parse_sums_forms() -> None:
    h256, h512 = "a" * 64, "B" * 128
    text = (f"{h256}  text-mode.img\n{h256} *binary-mode.img\n{h512}  ./dotted.qcow2\n"
            f"SHA256 (bsd.img) = {h256}\n# comment\n\n-----BEGIN PGP SIGNATURE-----\n")
    assert pullmod.parse_sums(text) == {
        "text-mode.img": ("sha256", h256),
        "binary-mode.img": ("sha256", h256),
        "dotted.qcow2": ("sha512", h512.lower()),
        "bsd.img": ("sha256", h256),
    }


def test_good_pull(server: Server, store: ImageStore) -> None:
    events: list[pullmod.PullProgress] = []
    image = pullmod.pull("ubuntu-24.04", store, base_url=server.url, progress=events.append)
    assert image.name == "ubuntu-24.04"
    assert image.disk is not None and image.disk.read_bytes() == IMAGE
    assert image.manifest.kind == "disk" and image.manifest.disk_format == "qcow2"
    assert image.manifest.kernel is None
    assert image.manifest.extra["source_digest"] == f"sha256:{hashlib.sha256(IMAGE).hexdigest()}"
    image.verify()
    assert store.get("ubuntu-24.04").disk == image.disk
    # progress: checksums, download (with byte counts reaching the total), verify, commit, done
    stages = [e.stage for e in events]
    assert stages[0] == "checksums" and stages[-1] == "done"
    downloads = [e for e in events if e.stage == "download"]
    assert downloads[-1].done == downloads[-1].total == len(IMAGE)
    assert "verify" in stages and "commit" in stages
    # nothing left over in the download area
    assert _cache_files(store) == ["ubuntu-24.04/disk.qcow2", "ubuntu-24.04/manifest.json"]


def test_base_url_from_environment(server: Server, store: ImageStore, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv(pullmod.BASE_URL_ENV, server.url)
    assert pullmod.pull("ubuntu-24.04", store).name == "ubuntu-24.04"


def test_cache_hit_does_no_download(server: Server, store: ImageStore) -> None:
    pullmod.pull("ubuntu-24.04", store, base_url=server.url)
    assert len(server.image_gets()) == 1
    events: list[pullmod.PullProgress] = []
    again = pullmod.pull("ubuntu-24.04", store, base_url=server.url, progress=events.append)
    assert len(server.image_gets()) == 1  # only the checksum file was fetched again
    assert [e.stage for e in events] == ["checksums", "cached"]
    assert again.disk is not None and again.disk.read_bytes() == IMAGE
    # the same digest under another name is copied, not downloaded
    other = pullmod.pull("ubuntu-24.04", store, base_url=server.url, name="copy")
    assert len(server.image_gets()) == 1
    assert other.name == "copy" and other.disk is not None and other.disk.read_bytes() == IMAGE
    # force downloads again
    pullmod.pull("ubuntu-24.04", store, base_url=server.url, force=True)
    assert len(server.image_gets()) == 2


def test_bad_checksum_leaves_nothing(server: Server, store: ImageStore) -> None:
    with pytest.raises(ImageError, match="checksum mismatch") as info:
        pullmod.pull("ubuntu-24.04", store, base_url=f"{server.url}/bad")
    assert "nothing was cached" in str(info.value)
    assert not store.exists("ubuntu-24.04")
    assert _cache_files(store) == []  # no image, no .part, no staging directory
    assert [p.name for p in store.root.iterdir() if not p.name.startswith(".downloads")] == []


def test_resume_on_the_next_pull(server: Server, store: ImageStore) -> None:
    half = len(IMAGE) // 2
    server.drop_after, server.drops_left = half, 1
    with pytest.raises(ImageError, match="interrupted") as info:
        pullmod.pull("ubuntu-24.04", store, base_url=server.url, retries=0)
    assert "resumes" in str(info.value.hint)
    parts = list((store.root / pullmod.DOWNLOADS).glob("*.part"))
    assert len(parts) == 1 and parts[0].stat().st_size == half
    assert not store.exists("ubuntu-24.04")

    events: list[pullmod.PullProgress] = []
    image = pullmod.pull("ubuntu-24.04", store, base_url=server.url, retries=0, progress=events.append)
    assert server.image_gets() == [None, f"bytes={half}-"]  # the second GET asked only for the rest
    assert image.disk is not None and image.disk.read_bytes() == IMAGE
    assert any("resuming" in e.message for e in events)
    assert not list((store.root / pullmod.DOWNLOADS).glob("*.part"))


def test_resume_within_one_pull(server: Server, store: ImageStore) -> None:
    third = len(IMAGE) // 3
    server.drop_after, server.drops_left = third, 2  # the first and the second attempt are cut
    image = pullmod.pull("ubuntu-24.04", store, base_url=server.url, retries=3)
    gets = server.image_gets()
    assert gets[0] is None and len(gets) == 3
    assert gets[1] == f"bytes={third}-"
    assert image.disk is not None and image.disk.read_bytes() == IMAGE


def test_complete_part_file_is_not_downloaded_again(server: Server, store: ImageStore) -> None:
    digest = hashlib.sha256(IMAGE).hexdigest()
    part = store.root / pullmod.DOWNLOADS / f"sha256-{digest}.part"
    part.parent.mkdir(parents=True)
    part.write_bytes(IMAGE)
    image = pullmod.pull("ubuntu-24.04", store, base_url=server.url)
    assert server.image_gets() == [f"bytes={len(IMAGE)}-"]  # answered 416: already complete
    assert image.disk is not None and image.disk.read_bytes() == IMAGE


def test_stale_part_file_is_replaced(server: Server, store: ImageStore) -> None:
    digest = hashlib.sha256(IMAGE).hexdigest()
    part = store.root / pullmod.DOWNLOADS / f"sha256-{digest}.part"
    part.parent.mkdir(parents=True)
    part.write_bytes(b"garbage" * 1000)  # wrong bytes: resuming gives a bad checksum, then a fresh try
    image = pullmod.pull("ubuntu-24.04", store, base_url=server.url)
    assert server.image_gets() == ["bytes=7000-", None]
    assert image.disk is not None and image.disk.read_bytes() == IMAGE


def test_newer_upstream_image_does_not_replace_silently(server: Server, store: ImageStore) -> None:
    pullmod.pull("ubuntu-24.04", store, base_url=server.url)
    newer = IMAGE + b"v2"
    server.files[f"/{IMAGE_NAME}"] = newer
    server.files["/SHA256SUMS"] = f"{hashlib.sha256(newer).hexdigest()} *{IMAGE_NAME}\n".encode()
    with pytest.raises(ImageError, match="another digest"):
        pullmod.pull("ubuntu-24.04", store, base_url=server.url)
    old = store.get("ubuntu-24.04")
    assert old.disk is not None and old.disk.read_bytes() == IMAGE
    side = pullmod.pull("ubuntu-24.04", store, base_url=server.url, name="ubuntu-24.04-new")
    assert side.disk is not None and side.disk.read_bytes() == newer
    replaced = pullmod.pull("ubuntu-24.04", store, base_url=server.url, force=True)
    assert replaced.disk is not None and replaced.disk.read_bytes() == newer


def test_pull_by_url(server: Server, store: ImageStore) -> None:
    image = pullmod.pull(f"{server.url}/{IMAGE_NAME}", store, name="mine")
    assert image.name == "mine" and image.manifest.source == f"{server.url}/{IMAGE_NAME}"
    assert image.manifest.extra["sums_url"] == f"{server.url}/SHA256SUMS"


def test_errors(server: Server, store: ImageStore) -> None:
    with pytest.raises(ConfigError, match="not in the catalogue"):
        pullmod.pull("windows-95", store)
    with pytest.raises(ConfigError, match="only http"):
        pullmod.pull("ftp://example.org/x.img", store)
    with pytest.raises(ImageError, match="HTTP 404"):
        pullmod.pull("ubuntu-24.04", store, base_url=f"{server.url}/missing")
    with pytest.raises(ImageError, match=r"has no checksum for nothere\.img"):
        pullmod.pull(f"{server.url}/nothere.img", store)
    with pytest.raises(ImageError, match="cannot fetch"):
        pullmod.pull("ubuntu-24.04", store, base_url="http://127.0.0.1:9", timeout=2)


def test_catalogue() -> None:
    assert set(pullmod.CATALOGUE) == {"ubuntu-24.04", "debian-12"}
    ubuntu = pullmod.CATALOGUE["ubuntu-24.04"]
    assert ubuntu.url.startswith("https://cloud-images.ubuntu.com/") and ubuntu.sums_url.endswith("/SHA256SUMS")
    debian = pullmod.CATALOGUE["debian-12"]
    assert debian.url.endswith("debian-12-genericcloud-amd64.qcow2")
    assert debian.image_name != "debian-12"  # the built image owns that name


def test_cli_pull_good_then_bad_checksum(server: Server, tmp_path: Path) -> None:
    import os
    import subprocess
    import sys

    env = {**os.environ, "VMKIT_HOME": str(tmp_path / "home"), pullmod.BASE_URL_ENV: server.url}
    env.pop("VMKIT_IMAGE_CACHE", None)
    good = subprocess.run([sys.executable, "-m", "vmkit.cli.main", "image", "pull", "ubuntu-24.04"],
                          capture_output=True, text=True, env=env, timeout=60)
    assert good.returncode == 0, good.stderr
    assert (tmp_path / "home" / "images" / "ubuntu-24.04" / "disk.qcow2").read_bytes() == IMAGE
    env[pullmod.BASE_URL_ENV] = f"{server.url}/bad"
    bad = subprocess.run([sys.executable, "-m", "vmkit.cli.main", "image", "pull", "ubuntu-24.04", "--name", "u2"],
                         capture_output=True, text=True, env=env, timeout=60)
    assert bad.returncode == 7 and "checksum mismatch" in bad.stderr
    assert not (tmp_path / "home" / "images" / "u2").exists()
