"""TLS for the migration stream (``vmkit migrate --tls``): certificates made for one migration.

The target makes them while it prepares the machine (:func:`make`): a throw-away CA, a server
certificate for the address its QEMU listens on, and a client certificate, all signed by that CA
(ECDSA P-256, valid for a day). It keeps the CA and server files in ``<instance>/migration-tls/``
and hands the CA and client files to the source in its answer, over the SSH connection that drives
the migration. Each side writes its files there (0600, in a 0700 directory) for QEMU's
``tls-creds-x509`` object (``verify-peer``: each side checks the other's certificate against the
CA), and removes them when the migration has ended. Nobody else ever trusts that CA.

cryptography is imported by :func:`make` only: the source, which only writes and removes files, does
not pay for it.
"""

from __future__ import annotations

import contextlib
import datetime
import ipaddress
import os
import shutil
from pathlib import Path
from typing import TYPE_CHECKING

from vmkit.runtime.migration import TLS_DIR as DIR

if TYPE_CHECKING:
    from cryptography import x509
    from cryptography.hazmat.primitives.asymmetric import ec

SERVER_FILES = ("ca-cert.pem", "server-cert.pem", "server-key.pem")
CLIENT_FILES = ("ca-cert.pem", "client-cert.pem", "client-key.pem")
VALID = datetime.timedelta(days=1)


def _key() -> ec.EllipticCurvePrivateKey:
    from cryptography.hazmat.primitives.asymmetric import ec

    return ec.generate_private_key(ec.SECP256R1())


def _pem_key(key: ec.EllipticCurvePrivateKey) -> bytes:
    from cryptography.hazmat.primitives import serialization

    return key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                             serialization.NoEncryption())


def _cert(subject: str, key: ec.EllipticCurvePrivateKey, issuer: x509.Name, signer: ec.EllipticCurvePrivateKey,
          *, ca: bool = False, usage: x509.ObjectIdentifier | None = None,
          address: str | None = None) -> x509.Certificate:
    from cryptography import x509
    from cryptography.hazmat.primitives import hashes
    from cryptography.x509.oid import NameOID

    now = datetime.datetime.now(datetime.UTC)
    b = (x509.CertificateBuilder()
         .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, subject)]))
         .issuer_name(issuer).public_key(key.public_key()).serial_number(x509.random_serial_number())
         .not_valid_before(now - datetime.timedelta(minutes=5)).not_valid_after(now + VALID)
         .add_extension(x509.BasicConstraints(ca=ca, path_length=None), critical=True))
    if ca:
        b = b.add_extension(x509.KeyUsage(digital_signature=True, key_cert_sign=True, crl_sign=True,
                                          content_commitment=False, key_encipherment=False, data_encipherment=False,
                                          key_agreement=False, encipher_only=False, decipher_only=False), critical=True)
    else:
        # QEMU's certificate check (crypto/tlscredsx509.c) wants digital signature and key encipherment in a
        # critical key usage of a server or client certificate: 10.0 refuses one without, whatever the key type
        b = b.add_extension(x509.KeyUsage(digital_signature=True, key_encipherment=True, key_cert_sign=False,
                                          crl_sign=False, content_commitment=False, data_encipherment=False,
                                          key_agreement=True, encipher_only=False, decipher_only=False), critical=True)
    if usage is not None:
        b = b.add_extension(x509.ExtendedKeyUsage([usage]), critical=False)
    if address is not None:
        try:
            name: x509.GeneralName = x509.IPAddress(ipaddress.ip_address(address))
        except ValueError:
            name = x509.DNSName(address)
        b = b.add_extension(x509.SubjectAlternativeName([name]), critical=False)
    return b.sign(signer, hashes.SHA256())


def make(address: str) -> dict[str, bytes]:
    """Certificates for one migration to a QEMU listening at ``address``: file name -> PEM (the
    server's and the client's files; ``ca-cert.pem`` is shared)."""
    from cryptography import x509
    from cryptography.hazmat.primitives import serialization
    from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

    ca_key, server_key, client_key = _key(), _key(), _key()
    ca_name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "vmkit migration CA")])
    ca = _cert("vmkit migration CA", ca_key, ca_name, ca_key, ca=True)
    server = _cert(address, server_key, ca_name, ca_key, usage=ExtendedKeyUsageOID.SERVER_AUTH, address=address)
    client = _cert("vmkit migration source", client_key, ca_name, ca_key, usage=ExtendedKeyUsageOID.CLIENT_AUTH)
    pem = serialization.Encoding.PEM
    return {"ca-cert.pem": ca.public_bytes(pem), "server-cert.pem": server.public_bytes(pem),
            "server-key.pem": _pem_key(server_key), "client-cert.pem": client.public_bytes(pem),
            "client-key.pem": _pem_key(client_key)}


def write(instance_dir: Path, files: dict[str, bytes], names: tuple[str, ...]) -> Path:
    """Put ``names`` of ``files`` in ``<instance_dir>/migration-tls/`` (0700; files 0600), replacing
    what was there. Returns the directory."""
    d = instance_dir / DIR
    remove(instance_dir)
    d.mkdir(mode=0o700)
    for n in names:
        fd = os.open(d / n, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
        with os.fdopen(fd, "wb") as fh:
            fh.write(files[n])
    return d


def remove(instance_dir: Path) -> None:
    with contextlib.suppress(FileNotFoundError):
        shutil.rmtree(instance_dir / DIR)
