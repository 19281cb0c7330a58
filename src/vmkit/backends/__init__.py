"""Where machines run, chosen by URI (as libvirt chooses its drivers): no URI is ``local`` (this
host, through supervisors); ``ssh://[user@]HOST[:PORT]`` (or ``vmkit+ssh://``) is ``ssh``, that
host's own vmkit run over SSH (:mod:`vmkit.backends.ssh`, what ``--host`` means); a libvirt URI
(``qemu:///system``, ``qemu+ssh://HOST/system``, ...) is ``libvirt``: libvirt runs the machines
there (:mod:`vmkit.backends.libvirt`, what ``--connect`` means)."""

from __future__ import annotations

from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from vmkit.backends.ssh import SshHost


def resolve(uri: str | None, *, field: str = "--host") -> SshHost | None:
    """The remote host ``uri`` names, or None for this host (no URI, ``local://``)."""
    if not uri or uri in ("local", "local://"):
        return None
    from vmkit.backends import ssh

    return ssh.parse(uri, field=field)


def resolve_connect(uri: str, *, field: str = "--connect") -> str:
    """The libvirt URI ``uri`` (checked: a ConfigError naming ``field`` if it is not one). An ``ssh://``
    URI is refused with the hint to use ``--host``: that is another host's vmkit, not its libvirt."""
    from vmkit.backends.libvirt.connection import check_uri
    from vmkit.errors import ConfigError

    if uri.split(":", 1)[0] in ("ssh", "vmkit+ssh"):
        raise ConfigError.single(field, f"{uri!r} is another host's vmkit: use --host {uri} "
                                        "(--connect takes a libvirt URI such as qemu+ssh://HOST/system)")
    return check_uri(uri, field=field)
