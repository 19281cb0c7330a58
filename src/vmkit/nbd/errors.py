"""Errors of the NBD server, its backends and its small client.

All derive from :class:`vmkit.errors.VmkitError`. A :class:`BackendError` carries the NBD error
number the server puts on the wire, so a backend can say "no space" apart from "I/O error".
"""

from __future__ import annotations

import errno as _errno

from vmkit.errors import ExitCode, VmkitError
from vmkit.nbd import protocol as p


class NbdError(VmkitError):
    """Root of the errors raised by :mod:`vmkit.nbd`."""


class BackendError(NbdError):
    """A backend operation failed; ``nbd_errno`` is what the client is told (NBD_EIO, ...)."""

    def __init__(self, nbd_errno: int, message: str, *, hint: str | None = None) -> None:
        super().__init__(message, hint=hint)
        self.nbd_errno = nbd_errno

    @classmethod
    def from_os_error(cls, exc: OSError, what: str) -> BackendError:
        return cls(nbd_errno_for(exc), f"{what}: {exc.strerror or exc}")


class ReadOnlyError(BackendError):
    def __init__(self, what: str = "the export is read-only") -> None:
        super().__init__(p.EPERM, what)


class FastZeroUnsupported(BackendError):
    """NBD_CMD_FLAG_FAST_ZERO asked for, but zeroing here is no faster than writing."""

    def __init__(self) -> None:
        super().__init__(p.ENOTSUP, "fast zero is not supported for this range")


class NbdProtocolError(NbdError):
    """The peer broke the protocol (bad magic, impossible lengths, unexpected replies)."""


class NbdReplyError(NbdError):
    """The server answered a request or an option with an error."""

    def __init__(self, message: str, *, nbd_errno: int = 0, reply: int = 0) -> None:
        super().__init__(message)
        self.nbd_errno = nbd_errno
        self.reply = reply


class NbdAddressInUseError(NbdError):
    exit_code = ExitCode.CONFLICT


_ERRNO_MAP = {
    _errno.ENOSPC: p.ENOSPC,
    _errno.EDQUOT: p.ENOSPC,
    _errno.EFBIG: p.ENOSPC,
    _errno.EPERM: p.EPERM,
    _errno.EACCES: p.EPERM,
    _errno.EROFS: p.EPERM,
    _errno.EBADF: p.EPERM,  # a write on a descriptor opened read-only
    _errno.EINVAL: p.EINVAL,
    _errno.ENOMEM: p.ENOMEM,
    _errno.EOPNOTSUPP: p.ENOTSUP,
    _errno.EOVERFLOW: p.EOVERFLOW,
}


def nbd_errno_for(exc: BaseException) -> int:
    """The NBD error number to report for an exception raised while serving a request."""
    if isinstance(exc, BackendError):
        return exc.nbd_errno
    if isinstance(exc, OSError) and exc.errno is not None:
        return _ERRNO_MAP.get(exc.errno, p.EIO)
    if isinstance(exc, MemoryError):
        return p.ENOMEM
    return p.EIO
