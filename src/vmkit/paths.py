"""Where vmkit keeps things.

``VMKIT_HOME`` overrides everything (instances, image cache, config); otherwise the XDG
directories from :mod:`platformdirs`. ``VMKIT_IMAGE_CACHE`` overrides only the image cache
(the test-suite uses it to share one built image across many throw-away homes).
Values are read on each call, never frozen at import time.
"""

from __future__ import annotations

import os
from pathlib import Path

import platformdirs

APP = "vmkit"


def _home() -> Path | None:
    value = os.environ.get("VMKIT_HOME")
    return Path(value).expanduser().resolve() if value else None


def data_dir() -> Path:
    home = _home()
    return home if home else Path(platformdirs.user_data_dir(APP))


def instances_dir() -> Path:
    return data_dir() / "instances"


def image_cache_dir() -> Path:
    override = os.environ.get("VMKIT_IMAGE_CACHE")
    if override:
        return Path(override).expanduser().resolve()
    home = _home()
    return home / "images" if home else Path(platformdirs.user_cache_dir(APP)) / "images"


def config_dir() -> Path:
    home = _home()
    return home / "config" if home else Path(platformdirs.user_config_dir(APP))


def ensure_private_dir(path: Path) -> Path:
    """Create ``path`` (and parents) with mode 0700 for the leaf; return it."""
    path.mkdir(parents=True, exist_ok=True)
    path.chmod(0o700)
    return path
