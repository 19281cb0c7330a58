#!/usr/bin/env python3
"""Fetch the web console's third-party code (noVNC, xterm.js) from the npm registry into
src/vmkit/daemon/web/vendor/ (not in git): pinned versions, each tarball checked against the
registry's sha512 integrity before anything is unpacked. Idempotent: a complete copy is kept.

    python scripts/vendor_web.py [DEST]

Only the files the page loads are kept (noVNC's ES modules and its pako copy, xterm.js's UMD build
and stylesheet, the fit add-on), with each package's licence files.
"""

from __future__ import annotations

import base64
import hashlib
import io
import json
import shutil
import sys
import tarfile
import tempfile
import urllib.request
from pathlib import Path

REGISTRY = "https://registry.npmjs.org"
PACKAGES = {
    # directory: (package, version, sha512 integrity, kept paths inside the package)
    "novnc": ("@novnc/novnc", "1.7.0",
              "ucEJOx4T2avIRCleodk7YobZj5O2Ga2AeLfQ69A/yjG9HHba2+PDgwSkN3FttrmG+70ZGx21sElNFouK13RzyA==",
              ("core/", "vendor/", "LICENSE.txt", "AUTHORS", "docs/LICENSE")),
    "xterm": ("@xterm/xterm", "6.0.0",
              "TQwDdQGtwwDt+2cgKDLn0IRaSxYu1tSUjgKarSDkUM0ZNiSRXFpjxEsvc/Zgc5kq5omJ+V0a8/kIM2WD3sMOYg==",
              ("lib/xterm.js", "css/xterm.css", "LICENSE")),
    "xterm-addon-fit": ("@xterm/addon-fit", "0.11.0",
                        "jYcgT6xtVYhnhgxh3QgYDnnNMYTcf8ElbxxFzX0IZo+vabQqSPAjC3c1wJrKB5E19VwQei89QCiZZP86DCPF7g==",
                        ("lib/addon-fit.js", "LICENSE")),
}
STAMP = ".vendored.json"


def tarball_url(package: str, version: str) -> str:
    return f"{REGISTRY}/{package}/-/{package.split('/')[-1]}-{version}.tgz"


def fetch(package: str, version: str, integrity: str) -> bytes:
    url = tarball_url(package, version)
    with urllib.request.urlopen(url, timeout=60) as resp:  # noqa: S310 - a fixed https URL
        data: bytes = resp.read()
    digest = base64.b64encode(hashlib.sha512(data).digest()).decode()
    if digest != integrity:
        raise SystemExit(f"{url}: sha512 {digest} is not the pinned {integrity}: refusing to unpack it")
    return data


def unpack(data: bytes, dest: Path, keep: tuple[str, ...]) -> int:
    n = 0
    with tarfile.open(fileobj=io.BytesIO(data), mode="r:gz") as tar:
        for member in tar.getmembers():
            if not member.isfile() or not member.name.startswith("package/"):
                continue
            rel = member.name[len("package/"):]
            if ".." in Path(rel).parts or not rel.startswith(keep):
                continue
            target = dest / rel
            target.parent.mkdir(parents=True, exist_ok=True)
            src = tar.extractfile(member)
            assert src is not None
            target.write_bytes(src.read())
            target.chmod(0o644)
            n += 1
    return n


def main(argv: list[str]) -> int:
    dest = Path(argv[1]) if len(argv) > 1 else Path(__file__).resolve().parent.parent / "src/vmkit/daemon/web/vendor"
    wanted = {name: f"{pkg}@{ver}" for name, (pkg, ver, _, _) in PACKAGES.items()}
    stamp = dest / STAMP
    if stamp.is_file() and json.loads(stamp.read_text()) == wanted:
        print(f"web console assets present in {dest}")
        return 0
    dest.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=".vendor-", dir=dest.parent))
    try:
        for name, (package, version, integrity, keep) in PACKAGES.items():
            n = unpack(fetch(package, version, integrity), tmp / name, keep)
            print(f"{package}@{version}: {n} files")
        (tmp / STAMP).write_text(json.dumps(wanted, indent=1) + "\n")
        if dest.exists():
            shutil.rmtree(dest)
        tmp.rename(dest)  # all or nothing
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    print(f"web console assets in {dest}")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv))
