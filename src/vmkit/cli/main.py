"""Entry point of the ``vmkit`` command (:func:`main`).

It imports nothing but the standard library before it knows the command: ``vmkit list`` into a
pipe is served by :mod:`vmkit.cli.plain` without typer, rich or pydantic (about what ``virsh list``
costs), and ``migrate-receive`` (the target's half of ``vmkit migrate``) by a warm receiver
(:mod:`vmkit.migrate.warm`) or :mod:`vmkit.migrate.receive` without typer or rich; everything else, and
``list`` on a terminal, goes to the typer app (:mod:`vmkit.cli.app`).
"""

from __future__ import annotations

import gc
import os
import sys
from typing import Any

_QUICK_LIST = (["list"], ["list", "--json"])


def main(argv: list[str] | None = None) -> None:
    """Run the CLI; exit with the code of the error family (see :class:`vmkit.errors.ExitCode`).

    The command loads no pydantic plugins (their discovery scans every installed package's
    metadata, ~30 ms a command) unless ``PYDANTIC_DISABLE_PLUGINS`` says otherwise (set it empty).
    When the command is done, everything it made is frozen out of the garbage collector
    (:func:`gc.freeze`): the interpreter's exit then frees the imported modules without tracing them
    for cycles first, which a command that imported typer, rich, pydantic and aiohttp paid on every
    run (``benchmarks/cli_bench.py``, "exit"). Files are still flushed and closed, atexit handlers and
    ``finally`` blocks still run; only objects kept alive by a reference cycle alone are not
    finalized, as Python never promises at exit anyway.
    """
    try:
        _main(argv)
    finally:
        gc.freeze()


def _main(argv: list[str] | None) -> None:
    os.environ.setdefault("PYDANTIC_DISABLE_PLUGINS", "__all__")
    host, args = _remote_host(list(sys.argv[1:] if argv is None else argv))
    connect, args = _connect(args)
    if host is None and connect is None and args in _QUICK_LIST and not sys.stdout.isatty():
        from vmkit.cli import plain

        if plain.list_machines(as_json=len(args) == 2):
            return
    if host is None and connect is None and args == ["migrate-receive"]:
        # the target's half of `vmkit migrate`, run over ssh: a warm receiver's child if one is up (no Python
        # start here, vmkit.migrate.warm), else this process without typer or rich (the copy waits for it)
        from vmkit.migrate import warm

        seconds = warm.persist_seconds()
        status = warm.run_warm(seconds)
        if status is None:
            from vmkit.migrate import receive

            warm.detach(seconds)  # the next one is warm
            status = receive.serve()
        sys.exit(status)
    target = _migration_target(args) if host is None and connect is None else None
    if target is not None:  # its receiver starts on the target while typer and the migration code load here
        from vmkit.migrate import early

        early.prestart(target)
    from vmkit.cli.app import run

    helping = not args or args[0] in ("--help", "--version")
    try:
        run(args, host=None if helping else host, connect=None if helping else connect)
    finally:
        if target is not None:
            early.drop(target)  # unless the migration adopted it: the command failed before reaching the target


def _migration_target(args: list[str]) -> str | None:
    """The target of ``vmkit migrate NAME ssh://...`` (not with --help or --cancel), so that its receiver can
    start before this process loads the rest (:mod:`vmkit.migrate.early`; the command starts it there otherwise)."""
    if not args or args[0] != "migrate" or any(a in ("--help", "--cancel") for a in args):
        return None
    return next((a for a in args[2:] if a.startswith("ssh://")), None)


def _remote_host(args: list[str]) -> tuple[str | None, list[str]]:
    """``--host URI`` (or ``-H``, or ``VMKIT_HOST``) in front of the command, and the rest."""
    if args and args[0] in ("--host", "-H") and len(args) > 1:
        return args[1], args[2:]
    if args and args[0].startswith("--host="):
        return args[0].split("=", 1)[1], args[1:]
    return os.environ.get("VMKIT_HOST") or None, args


def _connect(args: list[str]) -> tuple[str | None, list[str]]:
    """``--connect URI`` (or ``-c``, or ``VMKIT_CONNECT``) in front of the command: a libvirt host."""
    if args and args[0] in ("--connect", "-c") and len(args) > 1:
        return args[1], args[2:]
    if args and args[0].startswith("--connect="):
        return args[0].split("=", 1)[1], args[1:]
    return os.environ.get("VMKIT_CONNECT") or None, args


def __getattr__(name: str) -> Any:
    if name == "app":  # the typer app, for tests and documentation tools
        from vmkit.cli.app import app

        return app
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


if __name__ == "__main__":
    main()
