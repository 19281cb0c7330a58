"""Images between hosts: ``vmkit image export``/``import`` (a tar with the manifest, verified on
import) and ``vmkit image pull`` of a real qcow2 built here from a local HTTP mirror."""

from __future__ import annotations

import functools
import hashlib
import http.server
import json
import subprocess
import tarfile
import threading
from collections.abc import Iterator
from pathlib import Path

import pytest

from conftest import image_cache_dir, vmkit
from vmkit.errors import ExitCode
from vmkit.host.images.catalogue import CATALOGUE
from vmkit.host.images.store import Image, ImageStore


def test_export_import_round_trip(micro_image: Image, tmp_path: Path) -> None:
    archive = tmp_path / "micro.tar"
    vmkit("image", "export", "micro", str(archive), env={"VMKIT_IMAGE_CACHE": str(image_cache_dir())})
    with tarfile.open(archive) as tar:
        names = tar.getnames()
    assert names[0] == "manifest.json" and set(names[1:]) >= {micro_image.manifest.kernel, micro_image.manifest.initrd}
    other = tmp_path / "cache"
    env = {"VMKIT_IMAGE_CACHE": str(other)}
    vmkit("image", "import", str(archive), "--name", "micro-copy", env=env)
    copy = ImageStore(other).get("micro-copy")
    copy.verify()
    assert copy.manifest.kernel == micro_image.manifest.kernel and copy.manifest.cmdline == micro_image.manifest.cmdline
    for rel in (micro_image.manifest.kernel, micro_image.manifest.initrd):
        assert rel is not None
        assert (copy.directory / rel).read_bytes() == (micro_image.directory / rel).read_bytes()
    again = vmkit("image", "import", str(archive), "--name", "micro-copy", env=env, check=False)
    assert again.returncode == ExitCode.CONFLICT and "--force" in again.stdout + again.stderr

    # one flipped byte in a file: refused, nothing imported
    data = bytearray(archive.read_bytes())
    with tarfile.open(archive) as tar:
        member = tar.getmember(str(micro_image.manifest.initrd))
    data[member.offset_data + member.size // 2] ^= 0xFF
    bad = tmp_path / "bad.tar"
    bad.write_bytes(bytes(data))
    res = vmkit("image", "import", str(bad), "--name", "tampered", env=env, check=False)
    assert res.returncode == ExitCode.IMAGE_FAILED and "does not match its manifest" in res.stdout + res.stderr
    assert sorted(p.name for p in other.iterdir() if not p.name.startswith(".")) == ["micro-copy"]
    assert not [p for p in other.iterdir() if ".building." in p.name]


@pytest.fixture
def mirror(micro_image: Image, tmp_path: Path) -> Iterator[tuple[str, Path]]:
    """A directory served over HTTP like cloud.debian.org's: a real qcow2 (made here from the micro
    guest's initrd with qemu-img) and SHA512SUMS; ``bad/`` has the same image and a wrong checksum."""
    root = tmp_path / "www"
    (root / "bad").mkdir(parents=True)
    entry = CATALOGUE["debian-12"]
    qcow2 = root / entry.filename
    assert micro_image.initrd is not None
    subprocess.run(["qemu-img", "convert", "-f", "raw", "-O", "qcow2", str(micro_image.initrd), str(qcow2)],
                   check=True, timeout=120)
    digest = hashlib.sha512(qcow2.read_bytes()).hexdigest()
    (root / entry.sums_filename).write_text(f"{'0' * 128}  other.qcow2\n{digest}  {entry.filename}\n")
    (root / "bad" / entry.filename).write_bytes(qcow2.read_bytes())
    (root / "bad" / entry.sums_filename).write_text(f"{'1' * 128}  {entry.filename}\n")
    handler = functools.partial(http.server.SimpleHTTPRequestHandler, directory=str(root))
    handler.log_message = lambda *_a: None  # type: ignore[assignment,method-assign]
    httpd = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
    thread = threading.Thread(target=httpd.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True)
    thread.start()
    try:
        yield f"http://127.0.0.1:{httpd.server_address[1]}", qcow2
    finally:
        httpd.shutdown()
        httpd.server_close()
        thread.join(5)


def test_pull_a_real_image_from_a_local_mirror(mirror: tuple[str, Path], tmp_path: Path) -> None:
    url, source = mirror
    env = {"VMKIT_IMAGE_CACHE": str(tmp_path / "cache"), "VMKIT_PULL_BASE_URL": None}
    vmkit("image", "pull", "debian-12", "--mirror", url, env=env)
    image = ImageStore(tmp_path / "cache").get("debian-12-cloud")
    assert image.disk is not None and image.manifest.disk_format == "qcow2"
    info = json.loads(subprocess.run(["qemu-img", "info", "--output=json", str(image.disk)], check=True,
                                     capture_output=True, text=True, timeout=60).stdout)
    assert info["format"] == "qcow2"
    assert subprocess.run(["qemu-img", "compare", str(source), str(image.disk)], timeout=60).returncode == 0
    assert image.manifest.extra["source_digest"] == "sha512:" + hashlib.sha512(source.read_bytes()).hexdigest() \
        or image.manifest.extra["source_digest"].endswith(hashlib.sha512(source.read_bytes()).hexdigest())
    # the same digest again: found in the cache
    again = vmkit("image", "pull", "debian-12", "--mirror", url, "--name", "debian-12-again", env=env)
    assert "ready" in again.stdout

    bad = vmkit("image", "pull", "debian-12", "--mirror", f"{url}/bad", "--name", "bad", env=env, check=False)
    assert bad.returncode == ExitCode.IMAGE_FAILED and "checksum mismatch" in bad.stdout + bad.stderr
    cache = tmp_path / "cache"
    assert not (cache / "bad").exists()
    assert not [p for p in cache.rglob("*") if p.is_file() and p.name.endswith(".part")]
    assert image_cache_dir() != cache


def test_the_python_clients_manage_the_image_cache(micro_image: Image, tmp_path: Path,
                                                   monkeypatch: pytest.MonkeyPatch) -> None:
    """What `vmkit image ...` does, through `vmkit.Client` and `vmkit.aio.Client` (the CLI calls these)."""
    import asyncio

    from vmkit import Client, aio
    from vmkit.errors import NotFoundError

    monkeypatch.setenv("VMKIT_IMAGE_CACHE", str(image_cache_dir()))
    client = Client(home=tmp_path / "home")
    assert "micro" in [i.name for i in client.images()]
    assert client.build_image("micro").directory == str(micro_image.directory)  # there already: not built again
    lines: list[str] = []
    exported = client.export_image("micro", tmp_path / "m.tar.gz", progress=lines.append)
    assert exported.path == str(tmp_path / "m.tar.gz") and exported.size == (tmp_path / "m.tar.gz").stat().st_size
    assert lines  # progress reached the caller

    monkeypatch.setenv("VMKIT_IMAGE_CACHE", str(tmp_path / "cache"))
    copy = client.import_image(tmp_path / "m.tar.gz", name="micro-copy")
    assert (copy.name, copy.kind) == ("micro-copy", "initramfs")
    assert copy.kernel_version == micro_image.manifest.kernel_version
    assert copy.size == sum(f.size for f in micro_image.manifest.files.values()) and not copy.outdated
    listed = json.loads(vmkit("image", "list", "--json").stdout)
    assert [(i["name"], i["directory"]) for i in listed] == [("micro-copy", copy.directory)]
    assert asyncio.run(aio.Client(home=tmp_path / "home").image("micro-copy")) == copy
    with pytest.raises(Exception, match="no builder for 'nope'"):
        client.build_image("nope")
    asyncio.run(aio.Client(home=tmp_path / "home").delete_image("micro-copy"))
    assert client.images() == []
    with pytest.raises(NotFoundError):
        client.image("micro-copy")
    assert "removed image" not in vmkit("image", "rm", "micro-copy", check=False).stdout
