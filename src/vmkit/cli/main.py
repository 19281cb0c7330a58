"""Entry point: builds the typer app and maps errors to messages and exit codes."""

from __future__ import annotations

import os
import sys

import typer

from vmkit.cli import _deferred, guest, migrate, resources, state, system, vm
from vmkit.cli.groups import VmkitGroup
from vmkit.cli.output import err, report_error
from vmkit.errors import ExitCode, VmkitError

# Every module a command does not need is imported inside that command, so that `vmkit --help`
# and `vmkit list` answer at once (benchmarks/cli_bench.py; tests/unit/test_cli.py checks it).
_deferred.defer_unused_help_modules()

app = typer.Typer(
    cls=VmkitGroup,  # the command groups (image, nbd, disk, ...): imported when used, see vmkit.cli.groups
    name="vmkit",
    help="Create, run and manage Linux virtual machines on QEMU.",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
)
vm.register(app)
guest.register(app)
system.register(app)
state.register(app)
resources.register(app)
migrate.register(app)


@app.callback()
def _root(
    host: str | None = typer.Option(None, "--host", "-H", envvar="VMKIT_HOST", metavar="ssh://[user@]HOST[:PORT]",
                                    help="Run the command on another host's vmkit, over SSH (also VMKIT_HOST)."),
) -> None:
    """Create, run and manage Linux virtual machines on QEMU."""


def _remote_host(args: list[str]) -> tuple[str | None, list[str]]:
    """``--host URI`` (or ``-H``, or ``VMKIT_HOST``) in front of the command, and the rest."""
    if args and args[0] in ("--host", "-H") and len(args) > 1:
        return args[1], args[2:]
    if args and args[0].startswith("--host="):
        return args[0].split("=", 1)[1], args[1:]
    return os.environ.get("VMKIT_HOST") or None, args


def _run_remote(uri: str, args: list[str]) -> None:
    """The command runs on that host's vmkit: this process becomes ``ssh`` (its output, its exit code)."""
    from vmkit.backends import resolve

    target = resolve(uri)
    if target is None:
        return
    interactive = sys.stdin.isatty() and sys.stdout.isatty()
    argv = target.vmkit_argv(args, tty=interactive)
    sys.stdout.flush()
    try:
        os.execvp(argv[0], argv)  # noqa: S606 - an argv list, no shell
    except FileNotFoundError:
        raise VmkitError("ssh is not installed", hint="apt-get install openssh-client") from None


def main(argv: list[str] | None = None) -> None:
    """Run the CLI; exit with the code of the error family (see :class:`vmkit.errors.ExitCode`).

    Usage errors exit 2 (bad input), like every other bad-input error.

    The command loads no pydantic plugins (their discovery scans every installed package's
    metadata, ~30 ms a command) unless ``PYDANTIC_DISABLE_PLUGINS`` says otherwise (set it empty).
    """
    os.environ.setdefault("PYDANTIC_DISABLE_PLUGINS", "__all__")
    try:
        host, args = _remote_host(list(sys.argv[1:] if argv is None else argv))
        if host is not None and args and args[0] not in ("--help", "--version"):
            _run_remote(host, args)  # does not return for a remote host
        app(args=args)
    except VmkitError as exc:
        report_error(exc)
        sys.exit(int(exc.exit_code))
    except KeyboardInterrupt:
        err.print("interrupted")
        sys.exit(ExitCode.INTERRUPTED)


if __name__ == "__main__":
    main()
