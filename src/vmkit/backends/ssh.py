"""Another host's vmkit, over SSH: ``ssh://[user@]HOST[:PORT]`` (what ``vmkit --host`` and
``VMKIT_HOST`` name, as ``docker -H ssh://`` does).

The remote host runs its own ``vmkit`` (found on the PATH of a non-interactive SSH session) with its
own vmkit home; this module only builds and runs the ``ssh`` command. ``ssh`` reads the user's
``~/.ssh/config`` as usual; ``VMKIT_SSH_CONFIG`` names another config file (``scripts/lab.sh``
writes one) and ``VMKIT_REMOTE_VMKIT`` another remote command than ``vmkit``. Authentication is
never interactive (``BatchMode``): a key or an agent must do.

Connections are shared, as ssh's ``ControlMaster``/``ControlPersist`` do (what Ansible and Lima
set): the first command to a host leaves a master connection (``ssh: ... [mux]`` in ``ps``) that
the next ones reuse without a new handshake, for ``VMKIT_SSH_PERSIST``
seconds after the last one (default 60; ``0`` turns it off and leaves ``~/.ssh/config`` alone).
Its sockets are in ``$XDG_RUNTIME_DIR/vmkit/ssh`` (else ``~/.cache/vmkit/ssh``), a directory of
this user with mode 0700; where that path is too long for a socket, nothing is shared.
"""

from __future__ import annotations

import os
import re
import shlex
import subprocess
from dataclasses import dataclass
from pathlib import Path
from urllib.parse import unquote, urlsplit

from vmkit.errors import ConfigError, VmkitError
from vmkit.host import paths

SCHEMES = ("ssh", "vmkit+ssh")
PERSIST_ENV = "VMKIT_SSH_PERSIST"
DEFAULT_PERSIST = 60
_SOCKET_MAX = 100
"""Longest control socket path used (Linux allows 107 bytes; ssh adds a suffix while it makes one)."""
RUN_IN = "/"
"""The working directory every ssh to another host runs in: a shared connection's master keeps the directory of
the command that started it (ssh calls ``daemon(1, 1)``), which would pin a machine's directory for its lifetime.
The remote command never uses it."""
_HOST = re.compile(r"^[A-Za-z0-9](?:[A-Za-z0-9.-]{0,252})$|^\[[0-9A-Fa-f:.]+\]$")
_USER = re.compile(r"^[A-Za-z_][A-Za-z0-9_.-]{0,31}$")


@dataclass(frozen=True)
class SshHost:
    """One remote host: where to connect and which vmkit to run there."""

    host: str
    user: str | None = None
    port: int | None = None

    @property
    def uri(self) -> str:
        user = f"{self.user}@" if self.user else ""
        port = f":{self.port}" if self.port else ""
        return f"ssh://{user}{self.host}{port}"

    @property
    def address(self) -> str:
        """The host as an address (IPv6 without brackets)."""
        return self.host.strip("[]")

    def ssh_argv(self, remote: list[str], *, tty: bool = False) -> list[str]:
        """The ``ssh`` command that runs ``remote`` (argv, quoted for the remote shell) on this host."""
        argv = ["ssh"]
        config = os.environ.get("VMKIT_SSH_CONFIG")
        if config:
            argv += ["-F", os.path.abspath(config)]
        argv += ["-o", "BatchMode=yes", "-o", "ServerAliveInterval=5", "-o", "ServerAliveCountMax=3"]
        argv += sharing_options()
        argv += ["-t"] if tty else ["-T"]
        if self.port:
            argv += ["-p", str(self.port)]
        if self.user:
            argv += ["-l", self.user]
        argv += ["--", self.address, shlex.join(remote)]
        return argv

    def vmkit_argv(self, args: list[str], *, tty: bool = False) -> list[str]:
        """``ssh`` running the remote host's ``vmkit ARGS``."""
        remote = shlex.split(os.environ.get("VMKIT_REMOTE_VMKIT") or "vmkit")
        return self.ssh_argv([*remote, *args], tty=tty)

    def run(self, args: list[str], *, input: bytes | None = None,
            timeout: float = 120.0) -> subprocess.CompletedProcess[bytes]:
        """Run the remote ``vmkit ARGS`` and wait for it (its output captured)."""
        try:
            return subprocess.run(self.vmkit_argv(args), input=input, capture_output=True, timeout=timeout,
                                  check=False, cwd=RUN_IN)
        except FileNotFoundError:
            raise VmkitError("ssh is not installed", hint="apt-get install openssh-client") from None
        except subprocess.TimeoutExpired:
            raise unreachable(self, f"no answer within {timeout:.0f} s") from None


def persist_seconds() -> int:
    """How long a shared connection outlives its last command (0: none is shared)."""
    raw = os.environ.get(PERSIST_ENV, "").strip()
    if not raw:
        return DEFAULT_PERSIST
    if not raw.isdigit():
        raise ConfigError.single(PERSIST_ENV, f"{raw!r} is not a number of seconds: give 0 (no shared "
                                              f"connection) or more, e.g. {DEFAULT_PERSIST}")
    return int(raw)


def control_dir() -> Path:
    runtime = os.environ.get("XDG_RUNTIME_DIR")
    if runtime and Path(runtime).is_dir():
        return Path(runtime) / "vmkit" / "ssh"
    return Path.home() / ".cache" / "vmkit" / "ssh"


def sharing_options() -> list[str]:
    """ssh's options that share one connection per host (none when turned off or impossible here)."""
    seconds = persist_seconds()
    if seconds == 0:
        return []
    try:
        directory = control_dir()
        if len(str(directory)) + 1 + 40 > _SOCKET_MAX:  # %C: 40 hex digits
            return []
        paths.check_owned_tree(directory, "the ssh control directory")
        paths.ensure_private_dir(directory)
    except (OSError, RuntimeError, VmkitError):  # no home, not ours: ssh as before
        return []
    return ["-o", "ControlMaster=auto", "-o", f"ControlPath={directory}/%C", "-o", f"ControlPersist={seconds}"]


def unreachable(host: SshHost, why: str) -> VmkitError:
    err = VmkitError(f"{host.uri}: cannot run vmkit there: {why}",
                     hint="check that `ssh` reaches the host without a password (a key or an agent; "
                          "VMKIT_SSH_CONFIG names an ssh config) and that vmkit is on its PATH")
    return err


def parse(uri: str, *, field: str = "--host") -> SshHost:
    """``ssh://[user@]HOST[:PORT]`` as an :class:`SshHost` (bad input names ``field``)."""
    if not uri or any(c in uri for c in "\0\n\r \t"):
        raise ConfigError.single(field, f"{uri!r} is not a host URI: give ssh://[user@]HOST[:PORT]")
    parts = urlsplit(uri)
    if parts.scheme not in SCHEMES:
        raise ConfigError.single(field, f"{uri!r}: only ssh://[user@]HOST[:PORT] hosts are supported")
    if parts.path not in ("", "/") or parts.query or parts.fragment or parts.password is not None:
        raise ConfigError.single(field, f"{uri!r}: give ssh://[user@]HOST[:PORT] (no path, query or password)")
    host = parts.netloc.rsplit("@", 1)[-1]
    if (":" in host and not host.startswith("[")) or (host.startswith("[") and "]:" in host):
        host = host.rsplit(":", 1)[0]
    try:
        port = parts.port
    except ValueError:
        raise ConfigError.single(field, f"{uri!r}: the port must be a number from 1 to 65535") from None
    user = unquote(parts.username) if parts.username else None
    if user is not None and not _USER.match(user):
        raise ConfigError.single(field, f"{uri!r}: {user!r} is not a user name")
    if not host or not _HOST.match(host) or host.startswith("-"):
        raise ConfigError.single(field, f"{uri!r}: {host!r} is not a host name or address")
    return SshHost(host=host, user=user, port=port or None)
