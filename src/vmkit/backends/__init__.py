"""Where machines run, chosen by URI (as libvirt chooses its drivers): no URI is ``local`` (this
host, through supervisors); ``ssh://[user@]HOST[:PORT]`` (or ``vmkit+ssh://``) is ``ssh``, that
host's own vmkit run over SSH (:mod:`vmkit.backends.ssh`)."""

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
