"""Shared rendering helpers for the CLI (rich consoles, spinners, JSON)."""

from __future__ import annotations

import contextlib
import json
import sys
from collections.abc import Callable, Iterator
from typing import TYPE_CHECKING, Any

from rich.console import Console
from rich.markup import escape

from vmkit.cli.plain import human_duration as human_duration
from vmkit.errors import VmkitError

if TYPE_CHECKING:
    from vmkit.client.sync import Client, Instance

out = Console()
err = Console(stderr=True)


_connect: list[str | None] = [None]
_clients: dict[str, Client] = {}


def use_connect(uri: str | None) -> None:
    """The libvirt host (``--connect URI``) the commands of this run go to; None: this host's vmkit."""
    if uri is not None:
        from vmkit.backends import resolve_connect

        resolve_connect(uri)
    _connect[0] = uri
    _clients.clear()


def client() -> Client:
    """The public client every command goes through (the home: ``VMKIT_HOME``, else the XDG one; or
    the libvirt host of ``--connect``: one client, one connection, for the whole command)."""
    from vmkit.client.sync import Client

    uri = _connect[0]
    if uri is None:
        return Client()
    if uri not in _clients:
        _clients[uri] = Client(connect=uri)
    return _clients[uri]


def machine(name: str) -> Instance:
    """The machine ``name`` (``NotFoundError`` if there is none)."""
    return client().get(name)


def report_error(exc: VmkitError) -> None:
    """An error as the user sees it: what went wrong, then what to do."""
    err.print(f"[bold red]error:[/] {escape(exc.message)}", highlight=False, soft_wrap=True)
    if exc.hint:
        err.print(f"[yellow]hint:[/] {escape(exc.hint)}", highlight=False, soft_wrap=True)


def print_json(data: Any) -> None:
    out.print_json(json.dumps(data, default=str))


def print_json_line(data: Any) -> None:
    """One compact JSON object per line (NDJSON), flushed: for streams that other programs read."""
    sys.stdout.write(json.dumps(data, default=str, separators=(",", ":")) + "\n")
    sys.stdout.flush()


@contextlib.contextmanager
def spinner(message: str) -> Iterator[Callable[[str], None]]:
    """A spinner on stderr; yields a function that updates its detail line."""
    with err.status(message) as status:

        def update(detail: str) -> None:
            status.update(f"{message} [dim]{detail}[/dim]" if detail else message)

        yield update
