"""vmkit's storage pool on a libvirt host: files uploaded as volumes, so that host needs nothing
from vmkit.

The pool is ``vmkit`` (a ``dir`` pool at :data:`POOL_PATH`, made on first use). Shared, read-only
files (an image's kernel, initrd, base disk) are named after their content
(``base-<sha256[:16]>-<file name>``) and uploaded once; a machine's own volumes are named
``<machine>-<what>`` (``web-root.qcow2``: a qcow2 overlay whose backing volume is the image's base
disk; ``web-seed.iso``: its NoCloud seed; ``web-serial.log``: its serial console log, written by
libvirt's virtlogd and read back with a volume download).
"""

from __future__ import annotations

import os
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING, Any
from xml.sax.saxutils import escape, quoteattr

from vmkit.backends.libvirt.connection import translated
from vmkit.host.images.store import sha256_file

if TYPE_CHECKING:
    import libvirt

POOL = "vmkit"
POOL_PATH = "/var/lib/libvirt/images/vmkit"
CHUNK = 1 << 20


def pool(conn: libvirt.virConnect) -> libvirt.virStoragePool:
    """The ``vmkit`` pool there (defined, built and started if it is not)."""
    import libvirt

    try:
        p = conn.storagePoolLookupByName(POOL)
    except libvirt.libvirtError:
        with translated("define the storage pool vmkit", name=POOL):
            p = conn.storagePoolDefineXML(f"<pool type='dir'><name>{POOL}</name>"
                                          f"<target><path>{POOL_PATH}</path></target></pool>")
            p.build(0)
            p.setAutostart(1)
    if not p.isActive():
        with translated("start the storage pool vmkit", name=POOL):
            p.create(0)
    return p


def volume(p: libvirt.virStoragePool, name: str) -> libvirt.virStorageVol | None:
    import libvirt

    try:
        return p.storageVolLookupByName(name)
    except libvirt.libvirtError:
        return None


def _create(p: libvirt.virStoragePool, name: str, capacity: int, fmt: str, backing: str | None = None,
            backing_format: str | None = None) -> libvirt.virStorageVol:
    back = ""
    if backing is not None:
        back = (f"<backingStore><path>{escape(backing)}</path>"
                f"<format type={quoteattr(backing_format or 'qcow2')}/></backingStore>")
    xml = (f"<volume><name>{escape(name)}</name><capacity unit='bytes'>{capacity}</capacity>"
           f"<target><format type={quoteattr(fmt)}/><permissions><mode>0600</mode></permissions></target>"
           f"{back}</volume>")
    with translated("create a storage volume", name=name):
        return p.createXML(xml, 0)


def upload(conn: libvirt.virConnect, p: libvirt.virStoragePool, name: str, src: Path, *, fmt: str = "raw",
           progress: Callable[[int, int], None] | None = None) -> libvirt.virStorageVol:
    """Upload file ``src`` as volume ``name`` (replacing one of that name)."""
    old = volume(p, name)
    if old is not None:
        with translated("delete a storage volume", name=name):
            old.delete(0)
    size = src.stat().st_size
    vol = _create(p, name, size, fmt)
    try:
        with translated("upload a storage volume", name=name), src.open("rb") as f:
            stream = conn.newStream(0)
            vol.upload(stream, 0, size, 0)
            done = 0

            def source(_stream: Any, nbytes: int, _opaque: Any) -> bytes:
                nonlocal done
                data = f.read(min(nbytes, CHUNK))
                done += len(data)
                if progress is not None:
                    progress(done, size)
                return data

            stream.sendAll(source, None)
            stream.finish()
    except BaseException:
        vol.delete(0)
        raise
    return vol


def upload_shared(conn: libvirt.virConnect, p: libvirt.virStoragePool, src: Path, *, fmt: str = "raw",
                  sha256: str | None = None) -> libvirt.virStorageVol:
    """A read-only file shared by machines (kernel, initrd, base disk): uploaded once, named by content."""
    digest = sha256 or sha256_file(src)
    name = f"base-{digest[:16]}-{src.name}"
    vol = volume(p, name)
    if vol is not None and vol.info()[1] == src.stat().st_size:
        return vol
    return upload(conn, p, name, src, fmt=fmt)


def overlay(p: libvirt.virStoragePool, name: str, base: libvirt.virStorageVol, *, base_format: str,
            size: int | None) -> libvirt.virStorageVol:
    """A qcow2 volume ``name`` whose backing file is volume ``base`` (``size``: at least the base's)."""
    capacity = max(size or 0, base.info()[1])
    return _create(p, name, capacity, "qcow2", backing=base.path(), backing_format=base_format)


def copy_volume(src_conn: libvirt.virConnect, src: libvirt.virStorageVol, dst_conn: libvirt.virConnect,
                dst_pool: libvirt.virStoragePool, *, fmt: str = "raw") -> libvirt.virStorageVol:
    """The volume ``src`` copied, under its name, into ``dst_pool`` on another host (kept if already there)."""
    name = src.name()
    size = src.info()[1]
    have = volume(dst_pool, name)
    if have is not None and have.info()[1] == size:
        return have
    if have is not None:
        have.delete(0)
    vol = _create(dst_pool, name, size, fmt)
    with translated("copy a storage volume", name=name):
        down = src_conn.newStream(0)
        src.download(down, 0, size, 0)
        up = dst_conn.newStream(0)
        vol.upload(up, 0, size, 0)
        while True:
            data = down.recv(CHUNK)
            if isinstance(data, int) or not data:
                break
            up.send(data)
        down.finish()
        up.finish()
    return vol


def download(conn: libvirt.virConnect, vol: libvirt.virStorageVol, *, offset: int = 0) -> bytes:
    """The volume's bytes from ``offset`` (a serial log, say)."""
    chunks: list[bytes] = []
    with translated("read a storage volume", name=vol.name()):
        stream = conn.newStream(0)
        vol.download(stream, offset, 0, 0)
        while True:
            data = stream.recv(CHUNK)
            if isinstance(data, int) or not data:
                break
            chunks.append(data)
        stream.finish()
    return b"".join(chunks)


def delete_machine_volumes(p: libvirt.virStoragePool, machine: str, paths: list[str] | tuple[str, ...] = ()
                           ) -> list[str]:
    """Delete the machine's own volumes: its root, seed and serial log, and those of ``paths`` (its
    domain's disks) named ``<machine>-...``; the shared base volumes stay."""
    gone = []
    with translated("refresh the storage pool", name=POOL):
        p.refresh(0)
    names = {own_volume(machine, what) for what in _OWN_SUFFIXES}
    names |= {os.path.basename(path) for path in paths if os.path.basename(path).startswith(f"{machine}-")}
    for name in sorted(names):
        vol = volume(p, name)
        if vol is not None:
            with translated("delete a storage volume", name=name):
                vol.delete(0)
            gone.append(name)
    return gone


_OWN_SUFFIXES = ("root.qcow2", "seed.iso", "serial.log")


def own_volume(machine: str, what: str) -> str:
    """The name of a machine's own volume (``what``: ``root.qcow2``, ``seed.iso``, ``serial.log``,
    or ``disk-<id>``)."""
    return f"{machine}-{what}"


def file_size(path: Path) -> int:
    return os.stat(path).st_size
