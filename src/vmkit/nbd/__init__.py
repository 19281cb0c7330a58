"""vmkit's Network Block Device server (and a small client) with pluggable storage backends.

Serve a file to QEMU, qemu-img, nbdinfo or nbdcopy::

    from vmkit.nbd import Export, FileBackend, NbdServer

    server = NbdServer([Export("disk", FileBackend("disk.raw"))])
    address = await server.start(unix_path="/run/vmkit/nbd.sock")
    print(address.uri("disk"))         # nbd+unix:///disk?socket=/run/vmkit/nbd.sock
    await server.close()

or block until SIGINT/SIGTERM with :func:`serve`. Write a backend by subclassing
:class:`Backend` and make it reachable by name with :func:`register_backend`.

The names are imported on first use (PEP 562), so ``vmkit.nbd.defaults`` and ``vmkit.nbd.protocol``
come without the server.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from vmkit.nbd.backends import (
        Backend,
        Capabilities,
        ChunkStore,
        CowBackend,
        DedupBackend,
        DedupStats,
        FileBackend,
        MemoryBackend,
        create_backend,
        register_backend,
        registered_backends,
        unregister_backend,
    )
    from vmkit.nbd.client import (
        ExportInfo,
        NbdClient,
    )
    from vmkit.nbd.errors import (
        BackendError,
        FastZeroUnsupported,
        NbdAddressInUseError,
        NbdError,
        NbdProtocolError,
        NbdReplyError,
        ReadOnlyError,
    )
    from vmkit.nbd.server import (
        Export,
        NbdAddress,
        NbdServer,
        ServerStats,
        serve,
        serve_async,
    )

_WHERE = {
    "Backend": "backends",
    "Capabilities": "backends",
    "ChunkStore": "backends",
    "CowBackend": "backends",
    "DedupBackend": "backends",
    "DedupStats": "backends",
    "FileBackend": "backends",
    "MemoryBackend": "backends",
    "create_backend": "backends",
    "register_backend": "backends",
    "registered_backends": "backends",
    "unregister_backend": "backends",
    "ExportInfo": "client",
    "NbdClient": "client",
    "BackendError": "errors",
    "FastZeroUnsupported": "errors",
    "NbdAddressInUseError": "errors",
    "NbdError": "errors",
    "NbdProtocolError": "errors",
    "NbdReplyError": "errors",
    "ReadOnlyError": "errors",
    "Export": "server",
    "NbdAddress": "server",
    "NbdServer": "server",
    "ServerStats": "server",
    "serve": "server",
    "serve_async": "server",
}

__all__ = [
    "Backend",
    "BackendError",
    "Capabilities",
    "ChunkStore",
    "CowBackend",
    "DedupBackend",
    "DedupStats",
    "Export",
    "ExportInfo",
    "FastZeroUnsupported",
    "FileBackend",
    "MemoryBackend",
    "NbdAddress",
    "NbdAddressInUseError",
    "NbdClient",
    "NbdError",
    "NbdProtocolError",
    "NbdReplyError",
    "NbdServer",
    "ReadOnlyError",
    "ServerStats",
    "create_backend",
    "register_backend",
    "registered_backends",
    "serve",
    "serve_async",
    "unregister_backend",
]


def __getattr__(name: str) -> Any:
    module = _WHERE.get(name)
    if module is None:
        raise AttributeError(f"module 'vmkit.nbd' has no attribute {name!r}")
    return getattr(importlib.import_module(f"vmkit.nbd.{module}"), name)
