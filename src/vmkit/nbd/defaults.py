"""Defaults of the NBD server and its credentials, importable without the server (``vmkit nbd --help``
shows them)."""

from __future__ import annotations

DEFAULT_MAX_BUFFER_MEMORY = 512 * 1024 * 1024
"""Request and reply buffer memory of all clients together (``--max-buffer-memory``)."""

DEFAULT_NAMES = ("localhost", "127.0.0.1", "::1")
"""The names a server certificate is for unless told otherwise (``vmkit nbd tls-creds --name``)."""
