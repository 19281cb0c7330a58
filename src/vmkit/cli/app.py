"""The typer app: every command, and errors mapped to messages and exit codes (entry point:
:func:`vmkit.cli.main.main`)."""

from __future__ import annotations

import sys

import typer

from vmkit.cli import _deferred, guest, resources, screen, state, system, vm
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
screen.register(app)


def run(argv: list[str] | None = None) -> None:
    """Run a command; exit with the code of the error family (see :class:`vmkit.errors.ExitCode`).

    Usage errors exit 2 (bad input), like every other bad-input error."""
    try:
        app(args=argv, prog_name="vmkit")
    except VmkitError as exc:
        report_error(exc)
        sys.exit(int(exc.exit_code))
    except KeyboardInterrupt:
        err.print("interrupted")
        sys.exit(ExitCode.INTERRUPTED)
