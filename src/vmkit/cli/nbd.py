"""``vmkit nbd ...``: serve a file or a RAM disk over the Network Block Device protocol."""

from __future__ import annotations

import sys
from pathlib import Path
from typing import TYPE_CHECKING, Any

import typer

from vmkit.cli import groups
from vmkit.cli.output import err, out
from vmkit.errors import ConfigError, Problem
from vmkit.nbd.defaults import DEFAULT_MAX_BUFFER_MEMORY, DEFAULT_NAMES

if TYPE_CHECKING:
    from vmkit.nbd import NbdAddress

app = typer.Typer(help=groups.help_of("nbd"), no_args_is_help=True)


def parse_size(text: str, field: str = "--memory") -> int:
    """``"512M"``, ``"1G"``, ``"1GiB"``, ``"4096"`` -> bytes (binary units), as in vm.yaml."""
    from vmkit import config

    try:
        return config.parse_size(text)
    except ValueError as exc:
        raise ConfigError.single(field, str(exc)) from None


def _human(n: int) -> str:
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if n < 1024 or unit == "TiB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024  # type: ignore[assignment]
    raise AssertionError  # pragma: no cover


@app.callback()
def main() -> None:
    """Serve disks over the Network Block Device protocol."""


@app.command("serve")
def serve_command(
    file: Path | None = typer.Argument(None, help="file or block device to export", show_default=False),
    memory: str | None = typer.Option(None, "--memory", "-m", help="export a sparse RAM disk of this size (1G)"),
    export: str = typer.Option("", "--export", "-x", help="export name (the empty name is the default)"),
    socket_path: Path | None = typer.Option(None, "--socket", "-k", help="listen on this unix socket"),
    port: int | None = typer.Option(None, "--port", "-p", help="listen on this TCP port (0: any free port)"),
    host: str = typer.Option("127.0.0.1", "--host", help="TCP address to listen on (with --port)"),
    read_only: bool = typer.Option(False, "--read-only", "-r", help="refuse writes"),
    backend: str | None = typer.Option(
        None,
        "--backend",
        "-b",
        help="storage backend: file, memory, cow (writes kept in RAM, the file is untouched), "
        "dedup (content-addressed chunks), or a registered one",
    ),
    description: str = typer.Option("", "--description", help="export description shown to clients"),
    tls_dir: Path | None = typer.Option(
        None,
        "--tls-dir",
        help="require TLS (NBD STARTTLS) with the X.509 credentials in this directory "
        "(server-cert.pem, server-key.pem; ca-cert.pem with --tls-verify-peer); see `vmkit nbd tls-creds`",
    ),
    tls_verify_peer: bool = typer.Option(
        False, "--tls-verify-peer", help="with --tls-dir: clients must present a certificate signed by ca-cert.pem"
    ),
    max_connections: int = typer.Option(512, "--max-connections", help="connections at once, in all"),
    max_per_peer: int = typer.Option(
        64, "--max-connections-per-peer", help="connections at once from one uid (unix socket) or IP (TCP); 0: no limit"
    ),
    max_buffer_memory: str = typer.Option(
        f"{DEFAULT_MAX_BUFFER_MEMORY >> 20}M",
        "--max-buffer-memory",
        help="request/reply buffer memory for all clients together; past it requests get ENOMEM",
    ),
    handshake_timeout: float = typer.Option(
        10.0, "--handshake-timeout", help="seconds a client has to finish negotiating"
    ),
) -> None:
    """Serve FILE (or a RAM disk with --memory) until interrupted.

    Without --socket or --port it listens on a unix socket that only this user (and root) can use,
    $XDG_RUNTIME_DIR/vmkit/nbd.sock (or run/nbd.sock in the vmkit home).

    The first line on stdout is the NBD URI to connect to,
    e.g. ``qemu-img info "$(vmkit nbd serve disk.img | head -1)"``.

    Plain TCP (--port without --tls-dir) is open to every local user and to anyone who can reach it.
    """
    from vmkit.host import paths
    from vmkit.nbd import Export, create_backend, registered_backends, serve
    from vmkit.nbd import tls as nbd_tls
    from vmkit.nbd.server import default_socket_path

    problems: list[Problem] = []
    if (file is None) == (memory is None):
        problems.append(Problem("FILE", "give a FILE or --memory SIZE (exactly one)"))
    if socket_path is not None and port is not None:
        problems.append(Problem("--socket", "give --socket or --port, not both"))
    if port is not None and not 0 <= port <= 65535:
        problems.append(Problem("--port", f"{port} is not a TCP port"))
    if tls_verify_peer and tls_dir is None:
        problems.append(Problem("--tls-verify-peer", "needs --tls-dir"))
    if max_connections < 1:
        problems.append(Problem("--max-connections", "must be at least 1"))
    if max_per_peer < 0:
        problems.append(Problem("--max-connections-per-peer", "must be 0 (no limit) or more"))
    if handshake_timeout <= 0:
        problems.append(Problem("--handshake-timeout", "must be more than 0 seconds"))
    size: int | None = None
    if memory is not None:
        try:
            size = parse_size(memory)
        except ConfigError as exc:
            problems.extend(exc.problems)
    buffer_memory = 0
    try:
        buffer_memory = parse_size(max_buffer_memory, "--max-buffer-memory")
    except ConfigError as exc:
        problems.extend(exc.problems)
    kind = backend or ("file" if file is not None else "memory")
    if kind not in registered_backends():
        problems.append(
            Problem("--backend", f"unknown backend {kind!r}; choose from {', '.join(registered_backends())}")
        )
    if problems:
        raise ConfigError(problems, context="arguments")
    tls = nbd_tls.server_context(tls_dir, verify_peer=tls_verify_peer) if tls_dir is not None else None
    if socket_path is None and port is None:
        socket_path = default_socket_path()
        paths.ensure_private_dir(socket_path.parent)
    options: dict[str, Any] = {
        "tls": tls,
        "max_connections": max_connections,
        "max_connections_per_peer": max_per_peer,
        "max_buffer_memory": buffer_memory,
        "handshake_timeout": handshake_timeout,
    }
    store = create_backend(kind, path=file, size=size, read_only=read_only)
    try:
        exp = Export(export, store, read_only=read_only, description=description)
        mode = "read-only" if not exp.writable else "read-write"

        def ready(address: NbdAddress) -> None:
            out.print(address.uri(export), highlight=False, soft_wrap=True)
            sys.stdout.flush()
            what = str(file) if file is not None else "RAM disk"
            err.print(
                f"serving {what} as export {export!r} ({_human(store.size)}, {mode}, backend {kind}) "
                f"on {address}{' with TLS' if tls else ''}; Ctrl-C to stop",
                highlight=False,
            )
            if address.unix_path is None and tls is None:
                err.print(
                    f"warning: plain TCP on {address} has no authentication: every local user (and anyone "
                    "who can reach this address) can read and write the export; use a unix socket "
                    "(the default) or --tls-dir",
                    highlight=False,
                )

        if socket_path is not None:
            serve(exp, unix_path=socket_path, on_ready=ready, **options)
        else:
            serve(exp, host=host, port=port, on_ready=ready, **options)
        stats = store.stats()
        if stats:
            err.print("backend: " + ", ".join(f"{k}={v}" for k, v in stats.items()), highlight=False)
    finally:
        store.close()


@app.command("tls-creds")
def tls_creds_command(
    directory: Path = typer.Argument(..., help="directory to write the credentials into (created 0700)"),
    names: list[str] = typer.Option(
        list(DEFAULT_NAMES), "--name", "-n", help="host name or IP address the server certificate is for"
    ),
    days: int = typer.Option(365, "--days", help="validity in days"),
    client: bool = typer.Option(True, "--client/--no-client", help="also write a client certificate"),
) -> None:
    """Create a self-signed CA and server (and client) certificates for --tls-dir.

    The layout is QEMU's tls-creds-x509 (ca-cert.pem, server-cert.pem, server-key.pem,
    client-cert.pem, client-key.pem), so QEMU and nbdinfo can use the same directory.
    The CA key is not kept.
    """
    from vmkit.nbd import tls as nbd_tls

    for path in nbd_tls.generate_credentials(directory, names=names, days=days, client=client):
        out.print(str(path), highlight=False)


@app.command("backends")
def backends_command() -> None:
    """List the storage backends --backend accepts (built-in and registered)."""
    from vmkit.nbd import registered_backends

    for name in registered_backends():
        out.print(name, highlight=False)
