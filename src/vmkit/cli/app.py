"""The typer app: every command, and errors mapped to messages and exit codes (entry point:
:func:`vmkit.cli.main.main`)."""

from __future__ import annotations

import os
import sys

import typer

from vmkit.cli import _deferred, guest, migrate, output, resources, screen, state, system, vm
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
migrate.register(app)


@app.callback()
def _root(
    host: str | None = typer.Option(None, "--host", "-H", envvar="VMKIT_HOST", metavar="ssh://[user@]HOST[:PORT]",
                                    help="Run the command on another host's vmkit, over SSH (also VMKIT_HOST)."),
    connect: str | None = typer.Option(None, "--connect", "-c", envvar="VMKIT_CONNECT", metavar="URI",
                                       help="Run the machines on a libvirt host: qemu:///system, "
                                            "qemu+ssh://HOST/system (also VMKIT_CONNECT)."),
) -> None:
    """Create, run and manage Linux virtual machines on QEMU."""
    if connect is not None:
        output.use_connect(connect)


def _run_remote(uri: str, args: list[str]) -> None:
    """The command runs on that host's vmkit: this process becomes ``ssh`` (its output, its exit code).
    Returns only when ``uri`` names this host (no remote backend)."""
    from vmkit.backends import resolve, ssh

    target = resolve(uri)
    if target is None:
        return
    interactive = sys.stdin.isatty() and sys.stdout.isatty()
    argv = target.vmkit_argv(args, tty=interactive)
    sys.stdout.flush()
    try:
        os.chdir(ssh.RUN_IN)  # a shared connection's master keeps the directory it started in
        os.execvp(argv[0], argv)  # noqa: S606 - an argv list, no shell
    except FileNotFoundError:
        raise VmkitError("ssh is not installed", hint="apt-get install openssh-client") from None


def run(argv: list[str] | None = None, *, host: str | None = None, connect: str | None = None) -> None:
    """Run a command (on ``host``'s vmkit over SSH when given; on libvirt host ``connect`` when given);
    exit with the code of the error family (see :class:`vmkit.errors.ExitCode`).

    Usage errors exit 2 (bad input), like every other bad-input error."""
    try:
        if host is not None and connect is not None:
            from vmkit.errors import ConfigError

            raise ConfigError.single("--connect", "give either --host (another host's vmkit) or --connect "
                                     "(a libvirt host), not both")
        if host is not None:
            _run_remote(host, list(argv or []))  # does not return for a remote host
        output.use_connect(connect)
        app(args=argv, prog_name="vmkit")
    except VmkitError as exc:
        report_error(exc)
        sys.exit(int(exc.exit_code))
    except KeyboardInterrupt:
        err.print("interrupted")
        sys.exit(ExitCode.INTERRUPTED)
    finally:
        output.use_connect(None)
