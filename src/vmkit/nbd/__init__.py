"""vmkit's Network Block Device server (and a small client) with pluggable storage backends.

Serve a file to QEMU, qemu-img, nbdinfo or nbdcopy::

    from vmkit.nbd import Export, FileBackend, NbdServer

    server = NbdServer([Export("disk", FileBackend("disk.raw"))])
    address = await server.start(unix_path="/run/vmkit/nbd.sock")
    print(address.uri("disk"))         # nbd+unix:///disk?socket=/run/vmkit/nbd.sock
    await server.close()

or block until SIGINT/SIGTERM with :func:`serve`. Write a backend by subclassing
:class:`Backend` and make it reachable by name with :func:`register_backend`.
"""

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
from vmkit.nbd.client import ExportInfo, NbdClient
from vmkit.nbd.errors import (
    BackendError,
    FastZeroUnsupported,
    NbdAddressInUseError,
    NbdError,
    NbdProtocolError,
    NbdReplyError,
    ReadOnlyError,
)
from vmkit.nbd.server import Export, NbdAddress, NbdServer, ServerStats, serve, serve_async

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
