"""vmkit: create, run and manage Linux virtual machines on Linux hosts, on top of QEMU.

The public face: :class:`Client` (and its :class:`Instance` handles) drives the same machines as
the ``vmkit`` command; :mod:`vmkit.aio` has the asyncio twin; :mod:`vmkit.errors` the error
classes; :mod:`vmkit.api.models` the typed results. Imported lazily, so ``import vmkit`` is cheap.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from vmkit.version import __version__

__all__ = ["Client", "Instance", "__version__"]

if TYPE_CHECKING:
    from vmkit.client.sync import Client, Instance


def __getattr__(name: str) -> Any:
    if name in ("Client", "Instance"):
        from vmkit.client import sync as client

        return getattr(client, name)
    raise AttributeError(f"module 'vmkit' has no attribute {name!r}")
