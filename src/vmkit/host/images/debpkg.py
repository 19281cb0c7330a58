"""Fetch Debian packages through the host's apt, without root and without installing them.

* :func:`candidate` asks ``apt-cache`` which version apt would pick and what it depends on;
* :func:`resolve_kernel_package` follows a kernel metapackage (``linux-image-cloud-amd64``) to the
  concrete package it pulls in (``linux-image-6.1.0-NN-cloud-amd64``);
* :func:`download` runs ``apt-get download`` in a directory of your choice;
* :func:`extract` unpacks a ``.deb`` with ``dpkg-deb -x``.

Package lists come from the host (``apt-get update``), so what you get is what the host's
configured mirrors offer. Failures raise :class:`~vmkit.errors.HostError` (a tool is missing)
or :class:`~vmkit.errors.ImageError` (apt could not find or fetch a package), with a hint.
"""

from __future__ import annotations

import os
import re
import shlex
import shutil
import subprocess
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

from vmkit.errors import HostError, ImageError

_APT_OPTIONS = (
    # Root downloading into a private temp dir would otherwise warn that the _apt user
    # cannot access it; for a non-root user this setting changes nothing.
    "-o", "APT::Sandbox::User=root",
    "-q",
)
_KERNEL_RE = re.compile(r"^linux-image-\d")
_NAME_RE = re.compile(r"[a-z0-9][a-z0-9+.-]+(:[a-z0-9]+)?")  # fullmatch: ``$`` would accept a trailing newline
# (``:arm64``: another architecture's package, which needs `dpkg --add-architecture arm64` and `apt-get update`)
_UPDATE_HINT = "run `apt-get update` (as root) so apt knows the package, and check /etc/apt/sources.list"


@dataclass(frozen=True)
class PackageInfo:
    """The candidate version of a package, as ``apt-cache show`` reports it."""

    name: str
    version: str
    depends: tuple[str, ...]  # package names of the Depends field (first alternative of each)


@dataclass(frozen=True)
class DebFile:
    """A downloaded ``.deb``."""

    name: str
    version: str
    path: Path


def require_tool(tool: str) -> str:
    """Path of ``tool`` on PATH, or HostError saying which Debian package provides it."""
    found = shutil.which(tool)
    if found is None:
        provider = {"apt-get": "apt", "apt-cache": "apt", "dpkg-deb": "dpkg"}.get(tool, tool)
        raise HostError(
            f"{tool} was not found on PATH: vmkit fetches guest kernels and busybox as Debian packages",
            hint=f"run vmkit on a Debian or Ubuntu host with `{provider}` installed",
        )
    return found


def _check_name(name: str) -> str:
    if not _NAME_RE.fullmatch(name):
        raise ImageError(f"{name!r} is not a valid Debian package name")
    return name


def _run(argv: Sequence[str], *, cwd: Path | None = None, what: str) -> str:
    try:
        proc = subprocess.run(list(argv), cwd=cwd, capture_output=True, text=True, check=False,
                              timeout=600, env={**os.environ, "LC_ALL": "C"})
    except subprocess.TimeoutExpired as exc:
        raise ImageError(f"{what} timed out: {shlex.join(argv)}",
                         hint="check the network and the apt mirror") from exc
    if proc.returncode != 0:
        detail = (proc.stderr or proc.stdout).strip().splitlines()
        tail = "\n".join(detail[-5:])
        raise ImageError(f"{what} failed (exit {proc.returncode}): {shlex.join(argv)}\n{tail}",
                         hint=_UPDATE_HINT)
    return proc.stdout


def parse_control(text: str) -> dict[str, str]:
    """Parse the first stanza of Debian control data (``apt-cache show`` output)."""
    fields: dict[str, str] = {}
    key: str | None = None
    for line in text.splitlines():
        if not line.strip():
            if fields:
                break
            continue
        if line[0] in " \t" and key is not None:
            fields[key] += "\n" + line.strip()
            continue
        k, sep, v = line.partition(":")
        if sep:
            key = k.strip()
            fields[key] = v.strip()
    return fields


def parse_depends(field: str) -> tuple[str, ...]:
    """``"a (>= 1), b | c, d:any"`` -> ``("a", "b", "d")`` (first alternative, no versions)."""
    names = []
    for group in field.split(","):
        first = group.split("|")[0].strip()
        if first:
            names.append(first.split()[0].split(":")[0])
    return tuple(names)


def candidate(name: str) -> PackageInfo:
    """The version of ``name`` apt would install, and its dependencies."""
    _check_name(name)
    apt_cache = require_tool("apt-cache")
    policy = _run([apt_cache, "policy", name], what=f"looking up package {name}")
    match = re.search(r"^\s*Candidate:\s*(\S+)", policy, re.MULTILINE)
    if match is None or match.group(1) == "(none)":
        _, colon, arch = name.partition(":")
        hint = (f"run `dpkg --add-architecture {arch} && apt-get update` (as root; scripts/install.sh does)"
                if colon else _UPDATE_HINT)
        raise ImageError(f"apt knows no installable version of package {name!r}", hint=hint)
    version = match.group(1)
    show = _run([apt_cache, "show", f"{name}={version}"], what=f"reading package {name}")
    fields = parse_control(show)
    _, colon, arch = name.partition(":")
    # a foreign package's dependencies are of its own architecture
    depends = tuple(f"{d}:{arch}" if colon else d for d in parse_depends(fields.get("Depends", "")))
    return PackageInfo(name=name, version=version, depends=depends)


def resolve_kernel_package(name: str) -> PackageInfo:
    """Follow a kernel metapackage to the concrete ``linux-image-<version>-<flavour>`` package.

    A concrete name (``linux-image-6.1.0-26-cloud-amd64``) resolves to itself.
    """
    seen: list[str] = []
    current = name
    for _ in range(5):
        info = candidate(current)
        if _KERNEL_RE.match(current):
            return info
        seen.append(current)
        nexts = [d for d in info.depends if d.startswith("linux-image-")]
        if not nexts:
            raise ImageError(
                f"package {name!r} is not a kernel image and depends on none "
                f"(followed: {' -> '.join(seen)})",
                hint="pass a kernel package such as linux-image-cloud-amd64 or linux-image-amd64",
            )
        concrete = [d for d in nexts if _KERNEL_RE.match(d)]
        current = (concrete or nexts)[0]
    raise ImageError(f"could not resolve kernel package {name!r}: dependency chain too long ({seen})")


def download(names: Sequence[str], dest: Path) -> dict[str, DebFile]:
    """Download the candidate versions of ``names`` into ``dest`` with ``apt-get download``.

    Dependencies are not downloaded. Returns the files by package name.
    """
    apt_get = require_tool("apt-get")
    infos = {n: candidate(n) for n in names}
    dest.mkdir(parents=True, exist_ok=True)
    before = set(dest.glob("*.deb"))
    specs = [f"{i.name}={i.version}" for i in infos.values()]
    _run([apt_get, *_APT_OPTIONS, "download", *specs], cwd=dest,
         what=f"downloading {', '.join(names)}")
    new = set(dest.glob("*.deb")) - before
    out: dict[str, DebFile] = {}
    for info in infos.values():
        prefix = f"{info.name.partition(':')[0]}_"
        hits = sorted(p for p in (new or set(dest.glob("*.deb"))) if p.name.startswith(prefix))
        if not hits:
            raise ImageError(f"apt-get download reported success but left no .deb for {info.name}",
                             hint=_UPDATE_HINT)
        out[info.name] = DebFile(info.name, info.version, hits[-1])
    return out


def extract(deb: Path, dest: Path) -> Path:
    """Unpack the file system contents of ``deb`` into ``dest`` (``dpkg-deb -x``); return ``dest``."""
    dpkg_deb = require_tool("dpkg-deb")
    dest.mkdir(parents=True, exist_ok=True)
    _run([dpkg_deb, "-x", str(deb), str(dest)], what=f"unpacking {deb.name}")
    return dest
