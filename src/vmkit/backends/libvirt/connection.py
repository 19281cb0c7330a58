"""One libvirt connection (``vmkit --connect URI``), and libvirt's errors as vmkit's.

A URI is checked before libvirt sees it (:func:`check_uri`): only the QEMU driver's schemes
(``qemu:///system``, ``qemu:///session``, ``qemu+ssh://[user@]HOST/system``, ``qemu+tcp://``,
``qemu+tls://``, ``qemu+unix://``), no whitespace or control characters. Every libvirt call goes
through :func:`translate` when it fails, so callers see :class:`~vmkit.errors.NotFoundError`,
:class:`~vmkit.errors.StateError`, :class:`~vmkit.errors.HostError`,
:class:`~vmkit.errors.UnreachableError`... with vmkit's exit codes.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from typing import TYPE_CHECKING, Any
from urllib.parse import urlsplit

from vmkit.errors import (
    AlreadyExistsError,
    ConfigError,
    HostError,
    MigrationError,
    NotFoundError,
    QemuError,
    StateError,
    UnreachableError,
    VmkitError,
    VmTimeoutError,
)

if TYPE_CHECKING:
    import libvirt

SCHEMES = ("qemu", "qemu+ssh", "qemu+tcp", "qemu+tls", "qemu+unix", "qemu+libssh2", "qemu+libssh")
"""The libvirt URI schemes of the QEMU driver: what ``--connect`` accepts."""


def is_libvirt_uri(uri: str) -> bool:
    """Whether ``uri`` names a libvirt host (its scheme is one of :data:`SCHEMES`)."""
    return uri.split(":", 1)[0] in SCHEMES


def check_uri(uri: str, *, field: str = "--connect") -> str:
    """``uri`` if it is a libvirt QEMU URI vmkit hands to libvirt; a ConfigError naming ``field`` if not."""
    if not uri or any(ord(c) < 32 or c in " \x7f" for c in uri):
        raise ConfigError.single(field, f"{uri!r} is not a libvirt URI (no spaces or control characters): "
                                        "give e.g. qemu:///system or qemu+ssh://HOST/system")
    parts = urlsplit(uri)
    if parts.scheme not in SCHEMES:
        raise ConfigError.single(field, f"{uri!r}: only libvirt's QEMU driver is supported "
                                        f"(schemes {', '.join(SCHEMES)}), e.g. qemu:///system")
    if parts.path not in ("/system", "/session"):
        raise ConfigError.single(field, f"{uri!r}: the path must be /system or /session "
                                        "(e.g. qemu+ssh://HOST/system)")
    if parts.password is not None:
        raise ConfigError.single(field, f"{uri!r}: no password in the URI (use a key or libvirt's auth config)")
    return uri


def _module() -> Any:
    try:
        import libvirt
    except ImportError:
        raise HostError("the libvirt Python bindings are not installed",
                        hint="pip install 'libvirt-python>=9,<12' (needs libvirt-dev and pkg-config) "
                             "or apt-get install python3-libvirt") from None
    libvirt.registerErrorHandler(lambda _ctx, _err: None, None)  # errors are raised, not printed too
    return libvirt


def open_connection(uri: str) -> libvirt.virConnect:
    """A read-write connection to ``uri`` (UnreachableError when libvirt cannot reach it)."""
    lv = _module()
    check_uri(uri)
    try:
        return lv.open(uri)
    except lv.libvirtError as exc:
        raise UnreachableError(f"cannot connect to {uri}: {exc.get_error_message() or exc}",
                               hint="check that libvirtd runs there and that you may use its socket "
                                    "(qemu+ssh:// needs ssh to reach the host without a password)") from None


_NOT_FOUND = {42: "machine", 49: "storage pool", 50: "storage volume", 72: "snapshot", 80: "metadata"}
_UNSUPPORTED = (3, 67, 74, 84)  # NO_SUPPORT, CONFIG_UNSUPPORTED, ARGUMENT_UNSUPPORTED, OPERATION_UNSUPPORTED
_UNREACHABLE = (5, 6, 38, 39, 45, 79, 94)  # NO_CONNECT, INVALID_CONN, SYSTEM_ERROR, RPC, AUTH_*
_AGENT = (86, 97)  # AGENT_UNRESPONSIVE, AGENT_UNSYNCED


def translate(exc: Exception, *, operation: str, name: str | None = None, state: str | None = None,
              uri: str | None = None) -> VmkitError:
    """The vmkit error for libvirt's ``exc`` raised while doing ``operation`` on machine ``name``
    (``state``: the machine's state then, for a wrong-state error)."""
    code = exc.get_error_code() if hasattr(exc, "get_error_code") else None
    message = (exc.get_error_message() if hasattr(exc, "get_error_message") else None) or str(exc)
    if code in _NOT_FOUND:
        kind = _NOT_FOUND[code]
        return NotFoundError(kind, name or "?", hint="vmkit --connect URI list shows the machines there"
                             if kind == "machine" else message)
    if code == 55:  # OPERATION_INVALID: the domain is not in a state that allows it
        err = StateError(operation, state or "unknown", ["another state"])
        err.message = f"cannot {operation} {name or ''}: {message}".replace("  ", " ")
        return err
    if code in (28, 90):  # DOM_EXIST, STORAGE_VOL_EXIST
        return AlreadyExistsError("machine" if code == 28 else "storage volume", name or "?",
                                  hint=f"{message}; delete it first")
    if code in _UNSUPPORTED:
        return HostError(f"{uri or 'the host'} cannot {operation}: {message}",
                         hint="the libvirt or QEMU there lacks this capability")
    if code == 68:  # OPERATION_TIMEOUT
        return VmTimeoutError(f"{operation}: {message}")
    if code in _AGENT:
        from vmkit.runtime.guest.agent import GuestAgentError

        return GuestAgentError(f"the guest agent of {name} does not answer: {message}",
                               hint="wait until the guest has booted (qemu-guest-agent runs in it)",
                               timed_out=True)
    if code in _UNREACHABLE:
        return UnreachableError(f"{uri or 'libvirt'}: {message}",
                                hint="check that libvirtd runs there and the connection works (virsh -c URI list)")
    if operation.startswith("migrate"):
        return MigrationError(f"cannot migrate {name}: {message}")
    return QemuError(f"cannot {operation} {name or ''}: {message}".replace("  ", " "))


@contextlib.contextmanager
def translated(operation: str, *, name: str | None = None, state: str | None = None,
               uri: str | None = None) -> Iterator[None]:
    """Run a block of libvirt calls; a libvirt error leaves it as the vmkit error (see :func:`translate`)."""
    lv = _module()
    try:
        yield
    except lv.libvirtError as exc:
        raise translate(exc, operation=operation, name=name, state=state, uri=uri) from None
