"""Commands that reach into a running guest: exec (guest agent), shell and ssh-config (OpenSSH)."""

from __future__ import annotations

import os
import sys

import typer

from vmkit.cli.output import machine, out, report_error
from vmkit.errors import CommandCannotRun, ExitCode, VmkitError


def register(app: typer.Typer) -> None:
    app.command("exec", context_settings={"allow_extra_args": True, "ignore_unknown_options": True})(exec_)
    app.command("shell", context_settings={"allow_extra_args": True, "ignore_unknown_options": True})(shell)
    app.command("ssh-config")(ssh_config)
    app.command("cp")(cp)


def exec_(
    ctx: typer.Context,
    name: str,
    timeout: float = typer.Option(60.0, "--timeout", help="seconds the command may run"),
) -> None:
    """Run a command in the guest through qemu-guest-agent: vmkit exec NAME -- CMD ARGS...

    Prints its stdout and stderr and exits with its exit code. Like docker exec, vmkit keeps three
    codes for itself: 125 vmkit failed (the message says why), 126 the guest could not start the
    command, 127 the guest has no such command.
    """
    stdin = None if sys.stdin.isatty() else sys.stdin.buffer.read()
    try:
        result = machine(name).exec(list(ctx.args), timeout=timeout, stdin=stdin or None)
    except VmkitError as exc:  # never mistaken for the command's own exit code
        report_error(exc)
        raise typer.Exit(exc.exit_code if isinstance(exc, CommandCannotRun) else ExitCode.EXEC_FAILED) from None
    sys.stdout.buffer.write(result.stdout)
    sys.stdout.buffer.flush()
    sys.stderr.buffer.write(result.stderr)
    sys.stderr.buffer.flush()
    raise typer.Exit(result.exit_code)


def shell(ctx: typer.Context, name: str) -> None:
    """Log in with OpenSSH (pinned host key), or run a command: vmkit shell NAME [-- CMD...].

    Exits with the remote command's exit code.
    """
    argv = machine(name).ssh_argv(list(ctx.args), tty=sys.stdin.isatty())
    sys.stdout.flush()
    os.execvp(argv[0], argv)  # noqa: S606 - ssh replaces us: its exit code is ours


def ssh_config(name: str) -> None:
    """Print an OpenSSH config for the instance (use with ssh -F FILE NAME)."""
    out.print(machine(name).ssh_config(), markup=False, highlight=False, end="")


def cp(src: str, dst: str) -> None:
    """Copy a file between host and guest through the guest agent: vmkit cp FILE NAME:/path, or NAME:/path FILE."""
    from vmkit.cli.output import client

    n = client().copy(src, dst)
    out.print(f"copied {n} bytes")
