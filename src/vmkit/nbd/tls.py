"""X.509 credentials for NBD over TLS, in the directory layout QEMU's ``tls-creds-x509`` reads.

A credentials directory holds::

    ca-cert.pem                       the CA that signed the certificates below
    server-cert.pem, server-key.pem   the server's certificate and key
    client-cert.pem, client-key.pem   a client certificate (for servers that verify peers)

so the same directory works for vmkit's server (``vmkit nbd serve --tls-dir DIR``), for QEMU
(``--object tls-creds-x509,id=tls0,dir=DIR,endpoint=client``) and for libnbd
(``nbds://...?tls-certificates=DIR``). :func:`generate_credentials` makes one with a fresh
self-signed CA whose key is not kept (no one can issue more certificates from it).
"""

from __future__ import annotations

import datetime
import ipaddress
import os
import ssl
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from vmkit.errors import ConfigError, NotFoundError
from vmkit.nbd.defaults import DEFAULT_NAMES as DEFAULT_NAMES

CA_CERT = "ca-cert.pem"
SERVER_CERT = "server-cert.pem"
SERVER_KEY = "server-key.pem"
CLIENT_CERT = "client-cert.pem"
CLIENT_KEY = "client-key.pem"


def _need(directory: Path, name: str, field: str) -> Path:
    path = directory / name
    if not path.is_file():
        raise NotFoundError(
            f"TLS credentials file ({field})", str(path), hint=f"create them with `vmkit nbd tls-creds {directory}`"
        )
    return path


def server_context(directory: str | os.PathLike[str], *, verify_peer: bool = False) -> ssl.SSLContext:
    """A server-side context (TLS 1.2+) from ``server-cert.pem``/``server-key.pem`` in ``directory``.

    ``verify_peer``: clients must present a certificate signed by ``ca-cert.pem``.
    """
    d = Path(directory)
    if not d.is_dir():
        raise NotFoundError(
            "TLS credentials directory (--tls-dir)", str(d), hint=f"create it with `vmkit nbd tls-creds {d}`"
        )
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    ctx.minimum_version = ssl.TLSVersion.TLSv1_2
    try:
        ctx.load_cert_chain(_need(d, SERVER_CERT, "--tls-dir"), _need(d, SERVER_KEY, "--tls-dir"))
        if verify_peer:
            ctx.load_verify_locations(_need(d, CA_CERT, "--tls-dir"))
            ctx.verify_mode = ssl.CERT_REQUIRED
    except ssl.SSLError as exc:
        raise ConfigError.single("--tls-dir", f"cannot load the credentials in {d}: {exc}") from exc
    return ctx


def client_context(directory: str | os.PathLike[str], *, check_hostname: bool = True) -> ssl.SSLContext:
    """A client-side context trusting ``ca-cert.pem`` (with the client certificate, if present)."""
    d = Path(directory)
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    ctx.minimum_version = ssl.TLSVersion.TLSv1_2
    ctx.check_hostname = check_hostname
    try:
        ctx.load_verify_locations(_need(d, CA_CERT, "tls_dir"))
        if (d / CLIENT_CERT).is_file() and (d / CLIENT_KEY).is_file():
            ctx.load_cert_chain(d / CLIENT_CERT, d / CLIENT_KEY)
    except ssl.SSLError as exc:
        raise ConfigError.single("tls_dir", f"cannot load the credentials in {d}: {exc}") from exc
    return ctx


def _key_usage(*, digital_signature: bool = False, key_cert_sign: bool = False, crl_sign: bool = False) -> Any:
    from cryptography import x509

    return x509.KeyUsage(
        digital_signature=digital_signature,
        content_commitment=False,
        key_encipherment=False,
        data_encipherment=False,
        key_agreement=False,
        key_cert_sign=key_cert_sign,
        crl_sign=crl_sign,
        encipher_only=False,
        decipher_only=False,
    )


def generate_credentials(
    directory: str | os.PathLike[str],
    *,
    names: Sequence[str] = DEFAULT_NAMES,
    days: int = 365,
    client: bool = True,
) -> list[Path]:
    """Write a new CA, a server certificate for ``names`` (DNS names or IP addresses) and,
    with ``client``, a client certificate into ``directory`` (created 0700; keys 0600).

    Refuses to overwrite existing files. Returns the files written.
    """
    from cryptography import x509
    from cryptography.hazmat.primitives import hashes, serialization
    from cryptography.hazmat.primitives.asymmetric import ec
    from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

    if days < 1:
        raise ConfigError.single("--days", "must be at least 1")
    if not names:
        raise ConfigError.single("--name", "give at least one host name or IP address")
    d = Path(directory)
    files = [CA_CERT, SERVER_CERT, SERVER_KEY] + ([CLIENT_CERT, CLIENT_KEY] if client else [])
    existing = [f for f in files if (d / f).exists()]
    if existing:
        raise ConfigError.single(
            "DIR", f"{d} already has {', '.join(existing)}; remove them or choose another directory"
        )
    sans: list[x509.GeneralName] = []
    for name in names:
        try:
            sans.append(x509.IPAddress(ipaddress.ip_address(name)))
        except ValueError:
            sans.append(x509.DNSName(name))
    now = datetime.datetime.now(datetime.UTC)
    start, end = now - datetime.timedelta(minutes=5), now + datetime.timedelta(days=days)

    def key() -> ec.EllipticCurvePrivateKey:
        return ec.generate_private_key(ec.SECP256R1())

    def subject(cn: str) -> x509.Name:
        return x509.Name(
            [x509.NameAttribute(NameOID.ORGANIZATION_NAME, "vmkit"), x509.NameAttribute(NameOID.COMMON_NAME, cn)]
        )

    ca_key = key()
    ca_name = subject("vmkit NBD CA")
    ca = (
        x509.CertificateBuilder()
        .subject_name(ca_name)
        .issuer_name(ca_name)
        .public_key(ca_key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(start)
        .not_valid_after(end)
        .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
        .add_extension(_key_usage(key_cert_sign=True, crl_sign=True), critical=True)
        .add_extension(x509.SubjectKeyIdentifier.from_public_key(ca_key.public_key()), critical=False)
        .sign(ca_key, hashes.SHA256())
    )

    def leaf(cn: str, usage: x509.ObjectIdentifier, alt: list[x509.GeneralName]) -> tuple[bytes, bytes]:
        k = key()
        builder = (
            x509.CertificateBuilder()
            .subject_name(subject(cn))
            .issuer_name(ca_name)
            .public_key(k.public_key())
            .serial_number(x509.random_serial_number())
            .not_valid_before(start)
            .not_valid_after(end)
            .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
            .add_extension(_key_usage(digital_signature=True), critical=True)
            .add_extension(x509.ExtendedKeyUsage([usage]), critical=False)
            .add_extension(x509.AuthorityKeyIdentifier.from_issuer_public_key(ca_key.public_key()), critical=False)
        )
        if alt:
            builder = builder.add_extension(x509.SubjectAlternativeName(alt), critical=False)
        cert = builder.sign(ca_key, hashes.SHA256())
        pem_key = k.private_bytes(
            serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
        )
        return cert.public_bytes(serialization.Encoding.PEM), pem_key

    contents: dict[str, bytes] = {CA_CERT: ca.public_bytes(serialization.Encoding.PEM)}
    contents[SERVER_CERT], contents[SERVER_KEY] = leaf(names[0], ExtendedKeyUsageOID.SERVER_AUTH, sans)
    if client:
        contents[CLIENT_CERT], contents[CLIENT_KEY] = leaf("vmkit NBD client", ExtendedKeyUsageOID.CLIENT_AUTH, [])
    d.mkdir(parents=True, exist_ok=True)
    d.chmod(0o700)
    written: list[Path] = []
    try:
        for name, data in contents.items():
            path = d / name
            fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600 if name.endswith("key.pem") else 0o644)
            written.append(path)
            with os.fdopen(fd, "wb") as f:
                f.write(data)
    except BaseException:
        for path in written:
            path.unlink(missing_ok=True)
        raise
    return written
