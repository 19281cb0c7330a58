"""SSH keys for an instance, generated in-process with :mod:`cryptography` (no ``ssh-keygen``).

Two kinds of keys:

* the **user key pair** the host logs in with (ed25519, OpenSSH private format, mode 0600);
* the guest's **host keys**, generated on the host and handed to cloud-init in user-data
  (``ssh_keys``), so the host key is known before the first boot and ``known_hosts`` is pinned
  to the forwarded address (``[127.0.0.1]:PORT ssh-ed25519 ...``): no trust on first use and
  never ``StrictHostKeyChecking=no``.

ed25519 is the default and, for host keys, enough: OpenSSH clients since 6.5 speak it and prefer
the algorithm they already have in ``known_hosts``. RSA and ECDSA can be asked for (old clients).
Every file is written atomically with mode 0600.
"""

from __future__ import annotations

import base64
import hashlib
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import Literal, get_args

from vmkit.errors import ConfigError, VmkitError
from vmkit.fsutil import atomic_write

KeyType = Literal["ed25519", "rsa", "ecdsa"]
KEY_TYPES: tuple[KeyType, ...] = get_args(KeyType)
RSA_BITS = 3072

_ALGORITHMS: dict[str, KeyType] = {
    "ssh-ed25519": "ed25519",
    "ssh-rsa": "rsa",
    "ecdsa-sha2-nistp256": "ecdsa",
    "ecdsa-sha2-nistp384": "ecdsa",
    "ecdsa-sha2-nistp521": "ecdsa",
}


class SshKeyError(VmkitError):
    """A key file could not be read or is not a usable SSH key."""


@dataclass(frozen=True)
class KeyPair:
    """One SSH key pair as OpenSSH text."""

    key_type: KeyType
    private_openssh: str  # "-----BEGIN OPENSSH PRIVATE KEY-----\n...\n-----END OPENSSH PRIVATE KEY-----\n"
    public_openssh: str  # "ssh-ed25519 AAAA... comment" (one line, no newline)

    @property
    def algorithm(self) -> str:
        """The SSH algorithm name, e.g. ``ssh-ed25519``."""
        return self.public_openssh.split()[0]

    @property
    def public_key(self) -> str:
        """``ALGORITHM BASE64`` without the comment (what ``known_hosts`` holds)."""
        algorithm, blob = self.public_openssh.split()[:2]
        return f"{algorithm} {blob}"

    @property
    def fingerprint(self) -> str:
        """``SHA256:...`` as ``ssh-keygen -l`` prints it."""
        return fingerprint(self.public_openssh)

    def write(self, private_path: Path) -> None:
        """Write the private key to ``private_path`` and the public key to ``<private_path>.pub``."""
        atomic_write(private_path, self.private_openssh, 0o600)
        atomic_write(_pub_path(private_path), self.public_openssh + "\n", 0o600)


def _pub_path(private_path: Path) -> Path:
    return private_path.with_name(private_path.name + ".pub")


def generate_keypair(key_type: KeyType = "ed25519", *, comment: str = "") -> KeyPair:
    """A fresh key pair of ``key_type`` with ``comment`` on the public line."""
    from cryptography.hazmat.primitives import serialization  # here: reading key files needs no cryptography
    from cryptography.hazmat.primitives.asymmetric import ec, ed25519, rsa

    private: ed25519.Ed25519PrivateKey | rsa.RSAPrivateKey | ec.EllipticCurvePrivateKey
    if key_type == "ed25519":
        private = ed25519.Ed25519PrivateKey.generate()
    elif key_type == "rsa":
        private = rsa.generate_private_key(public_exponent=65537, key_size=RSA_BITS)
    elif key_type == "ecdsa":
        private = ec.generate_private_key(ec.SECP256R1())
    else:
        raise ConfigError.single("key_type", f"{key_type!r} is not a key type: use one of {', '.join(KEY_TYPES)}")
    pem = private.private_bytes(
        serialization.Encoding.PEM, serialization.PrivateFormat.OpenSSH, serialization.NoEncryption()
    ).decode()
    public = private.public_key().public_bytes(
        serialization.Encoding.OpenSSH, serialization.PublicFormat.OpenSSH
    ).decode()
    if comment:
        public = f"{public} {comment}"
    return KeyPair(key_type, pem, public)


def load_keypair(private_path: Path) -> KeyPair:
    """Read a key pair written by :meth:`KeyPair.write` (the comment comes from the ``.pub`` file)."""
    try:
        data = private_path.read_bytes()
    except OSError as exc:
        raise SshKeyError(f"cannot read SSH key {private_path}: {exc.strerror}",
                        hint="recreate the instance's keys") from exc
    from cryptography.hazmat.primitives import serialization

    try:
        private = serialization.load_ssh_private_key(data, password=None)
    except (ValueError, TypeError) as exc:
        raise SshKeyError(f"{private_path} is not an unencrypted OpenSSH private key: {exc}",
                        hint="recreate the instance's keys") from exc
    public = private.public_key().public_bytes(
        serialization.Encoding.OpenSSH, serialization.PublicFormat.OpenSSH
    ).decode()
    key_type = _ALGORITHMS.get(public.split()[0])
    if key_type is None:
        raise SshKeyError(f"{private_path} holds a {public.split()[0]} key: vmkit uses {', '.join(KEY_TYPES)}")
    pub_path = _pub_path(private_path)
    if pub_path.is_file():
        fields = pub_path.read_text().split(maxsplit=2)
        if len(fields) == 3 and f"{fields[0]} {fields[1]}" == public:
            public = f"{public} {fields[2].strip()}"
    return KeyPair(key_type, data.decode(), public)


def ensure_keypair(private_path: Path, key_type: KeyType = "ed25519", *, comment: str = "") -> KeyPair:
    """Load the key pair at ``private_path``, or generate and write one if there is none."""
    if private_path.exists():
        return load_keypair(private_path)
    pair = generate_keypair(key_type, comment=comment)
    pair.write(private_path)
    return pair


def fingerprint(public_openssh: str) -> str:
    """The SHA256 fingerprint of an OpenSSH public key line, e.g. ``SHA256:3q2+7w...``."""
    try:
        blob = base64.b64decode(public_openssh.split()[1], validate=True)
    except (IndexError, ValueError) as exc:
        raise ConfigError.single("public_key", f"{public_openssh[:40]!r} is not an OpenSSH public key") from exc
    digest = base64.b64encode(hashlib.sha256(blob).digest()).decode().rstrip("=")
    return f"SHA256:{digest}"


def known_hosts_host(port: int, host: str = "127.0.0.1") -> str:
    """The host field of a ``known_hosts`` line: ``[host]:port``, or plain ``host`` for port 22."""
    if not 1 <= port <= 65535:
        raise ConfigError.single("port", f"{port} is not a TCP port: use 1-65535")
    return host if port == 22 else f"[{host}]:{port}"


def known_hosts_line(public_openssh: str, port: int, host: str = "127.0.0.1") -> str:
    """One ``known_hosts`` line pinning ``public_openssh`` to ``host:port``."""
    algorithm, blob = public_openssh.split()[:2]
    return f"{known_hosts_host(port, host)} {algorithm} {blob}"


@dataclass(frozen=True)
class HostKeys:
    """The guest's SSH host keys, generated on the host before the first boot."""

    keys: tuple[KeyPair, ...]

    def __post_init__(self) -> None:
        types = [k.key_type for k in self.keys]
        if not types:
            raise ConfigError.single("host_keys", "at least one host key is needed")
        if len(set(types)) != len(types):
            raise ConfigError.single("host_keys", f"one key per type, got {', '.join(types)}")

    def get(self, key_type: KeyType) -> KeyPair | None:
        return next((k for k in self.keys if k.key_type == key_type), None)

    def cloud_config(self) -> dict[str, str]:
        """The ``ssh_keys`` mapping of cloud-config: ``{"ed25519_private": ..., "ed25519_public": ...}``."""
        out: dict[str, str] = {}
        for k in self.keys:
            out[f"{k.key_type}_private"] = k.private_openssh
            out[f"{k.key_type}_public"] = k.public_openssh
        return out

    def known_hosts(self, port: int, host: str = "127.0.0.1") -> str:
        """``known_hosts`` text (one line per key, newline-terminated) for ``host:port``."""
        return "".join(known_hosts_line(k.public_openssh, port, host) + "\n" for k in self.keys)

    def write(self, directory: Path) -> None:
        """Write ``ssh_host_<type>_key`` and ``.pub`` for each key into ``directory`` (mode 0600)."""
        for k in self.keys:
            k.write(directory / f"ssh_host_{k.key_type}_key")

    @classmethod
    def load(cls, directory: Path) -> HostKeys:
        """Read the keys :meth:`write` wrote; raises :class:`SshKeyError` if there are none."""
        keys = [load_keypair(directory / f"ssh_host_{t}_key") for t in KEY_TYPES
                if (directory / f"ssh_host_{t}_key").is_file()]
        if not keys:
            raise SshKeyError(f"no SSH host keys in {directory}", hint="recreate the instance's keys")
        return cls(tuple(keys))


def generate_host_keys(types: Iterable[KeyType] = ("ed25519",), *,
                       comment: str = "") -> HostKeys:
    """Fresh host keys, one per type (ed25519 by default)."""
    return HostKeys(tuple(generate_keypair(t, comment=comment) for t in types))


def write_known_hosts(path: Path, host_keys: HostKeys, port: int, host: str = "127.0.0.1") -> None:
    """Write a ``known_hosts`` file that pins ``host_keys`` to ``host:port`` (atomic, 0600)."""
    atomic_write(path, host_keys.known_hosts(port, host), 0o600)
