"""Save/restore and snapshot commands: ``save``, ``restore``, ``snapshot ...``; and the rendering that
``start`` (auto-resume) and ``stop --save`` share with them."""

from __future__ import annotations

import contextlib
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING

import typer

from vmkit.cli import groups
from vmkit.cli.output import err, machine, out, print_json

if TYPE_CHECKING:
    from rich.progress import Progress, TaskID

    from vmkit.api.models import ClockFix, SaveOutcome, StartResult
    from vmkit.backends.local.statectl import Note

snapshot_app = typer.Typer(help=groups.help_of("snapshot"), no_args_is_help=True)


def register(app: typer.Typer) -> None:
    app.command("save")(save)
    app.command("restore")(restore)  # `snapshot` is a group of vmkit.cli.groups


# --------------------------------------------------------------------------- rendering


@dataclass
class _Ui:
    """A transient rich progress display: a byte bar while state moves, a spinner while a guest boots."""

    progress: Progress
    task: TaskID
    label: str
    started: float = field(default_factory=time.monotonic)

    def transfer(self, done: int, total: int | None) -> None:
        self.progress.update(self.task, completed=done, total=total)

    def console_line(self, line: str) -> None:
        from rich.markup import escape

        self.progress.update(self.task, description=f"{self.label} [dim]{escape(line)}[/]" if line else self.label)

    def relabel(self, label: str) -> None:
        self.label = label
        self.progress.reset(self.task, total=None, description=label)

    def notice(self, note: Note) -> None:
        from rich.markup import escape

        text = escape(note.message)
        self.progress.console.print(f"[yellow]{text}[/]" if note.warning else text, highlight=False, soft_wrap=True)


@contextlib.contextmanager
def progress_ui(label: str) -> Iterator[_Ui]:
    from rich.progress import (
        BarColumn,
        DownloadColumn,
        Progress,
        SpinnerColumn,
        TextColumn,
        TimeElapsedColumn,
        TransferSpeedColumn,
    )

    with Progress(SpinnerColumn(), TextColumn("{task.description}"), BarColumn(), DownloadColumn(),
                  TransferSpeedColumn(), TimeElapsedColumn(), console=err, transient=True) as progress:
        task = progress.add_task(label, total=None)
        yield _Ui(progress, task, label)


def _size(n: int) -> str:
    return f"{n / (1 << 20):.1f} MiB"


def describe_start(name: str, outcome: StartResult) -> None:
    """Say how ``name`` came up (restored or booted) and what happened to its clock."""
    from rich.markup import escape

    for note in outcome.notes:
        err.print(f"[yellow]{escape(note)}[/]", highlight=False, soft_wrap=True)
    st = outcome.status
    if outcome.restored and outcome.restored.get("managed_save"):  # a libvirt host (--connect) kept the state
        out.print(f"[bold]{name}[/] is {st.state}: resumed from libvirt's managed save", highlight=False)
    elif outcome.restored:
        r = outcome.restored
        verb = "resumed" if st.state == "running" else "restored"
        out.print(f"[bold]{name}[/] is {st.state}: {verb} from {escape(str(r['path']))} "
                  f"({_size(int(r['payload_bytes']))} in {float(r['seconds']):.1f} s; "
                  f"saved {float(r['suspended_seconds']):.0f} s ago)", highlight=False)
    elif outcome.snapshot:
        out.print(f"[bold]{name}[/] is {st.state}: reverted to snapshot {escape(outcome.snapshot)}", highlight=False)
    elif outcome.template:
        t = outcome.template
        out.print(f"[bold]{name}[/] is {st.state}: cloned from the warm template {escape(str(t['path']))} "
                  f"(restored in {float(t['restore_seconds']):.1f} s, made its own in "
                  f"{float(t['personalize_seconds']):.1f} s; QEMU pid {st.qemu_pid})", highlight=False)
    else:
        out.print(f"[bold]{name}[/] is {st.state} ({st.accel}" + (f"; QEMU pid {st.qemu_pid})" if st.qemu_pid else ")"))
    describe_clock(outcome.clock)


def describe_clock(clock: ClockFix | None) -> None:
    """Say what happened to the guest's clock after it stood still (paused, saved, reverted)."""
    from rich.markup import escape

    if clock is not None:
        style = "green" if clock.corrected else "yellow"
        out.print(f"[{style}]clock:[/] {escape(clock.message)}", highlight=False)


def start_instance(name: str, *, timeout: float | None, cold: bool) -> StartResult:
    """``vmkit start``'s work: resume the saved state if there is one (with a byte bar), else boot."""
    handle = machine(name)
    with progress_ui(f"starting {name}") as ui:

        def notice(note: Note) -> None:
            ui.notice(note)
            if note.kind == "resuming":
                ui.relabel(f"resuming {name}")
            elif note.kind == "booting":
                ui.relabel(f"booting {name}")

        outcome = handle.start(timeout=timeout, cold=cold, progress=ui.console_line, state_progress=ui.transfer,
                               notice=notice)
    describe_start(name, outcome)
    return outcome


def save_instance(name: str, file: Path | None, *, keep_running: bool, force: bool = False) -> SaveOutcome:
    """``vmkit save`` / ``vmkit stop --save``: save with a byte counter, then say where it went."""
    from rich.markup import escape

    handle = machine(name)
    with progress_ui(f"saving {name}") as ui:
        outcome = handle.save(file, keep_running=keep_running, force=force, progress=ui.transfer)
    state = outcome.status.state
    out.print(f"saved [bold]{name}[/] to {escape(outcome.path)} ({_size(outcome.file_bytes)} in "
              f"{outcome.seconds:.1f} s); it is {'saved' if state == 'stopped' and file is None else state}",
              highlight=False)
    describe_clock(outcome.clock)
    if not keep_running:
        how = f"vmkit start {name}" if file is None else f"vmkit restore {name} {outcome.path}"
        out.print(f"`{escape(how)}` resumes it", highlight=False)
    return outcome


# --------------------------------------------------------------------------- commands


def save(
    name: str,
    path: Path | None = typer.Argument(None, help="state file (default: the instance's own, which `start` resumes); "
                                       "never a disk or a file of an instance"),
    keep_running: bool = typer.Option(False, "--keep-running", help="resume the machine after saving"),
    force: bool = typer.Option(False, "--force", help="replace an existing file at PATH that is not a state file"),
) -> None:
    """Save a machine's state (RAM, devices) to an encrypted file; then stop it (or --keep-running)."""
    save_instance(name, path, keep_running=keep_running, force=force)


def restore(
    name: str,
    file: Path | None = typer.Argument(None, help="state file (default: the instance's own saved state)"),
    force: bool = typer.Option(False, "--force", help="restore even though the disks changed since the save"),
    paused: bool = typer.Option(False, "--paused", help="leave the machine paused after restoring"),
    timeout: float | None = typer.Option(None, "--timeout", help="seconds to wait for the restore"),
) -> None:
    """Start a stopped machine from a saved state (it continues where it was saved)."""
    handle = machine(name)
    with progress_ui(f"restoring {name}") as ui:
        outcome = handle.restore(file, force=force, paused=paused, timeout=timeout, progress=ui.console_line,
                                 state_progress=ui.transfer)
    describe_start(name, outcome)


@snapshot_app.command("create")
def snapshot_create(
    name: str,
    tag: str | None = typer.Argument(None, help="snapshot name (default: snap-DATE-TIME)"),
) -> None:
    """Snapshot a running or paused machine: RAM and every writable (qcow2) disk together."""
    from rich.markup import escape

    handle = machine(name)
    with progress_ui(f"snapshotting {name}"):
        info = handle.snapshot(tag)
    out.print(f"created snapshot [bold]{escape(info.tag)}[/] of {name} ({_size(info.vm_state_bytes)} machine state)",
              highlight=False)


@snapshot_app.command("list")
def snapshot_list(name: str, as_json: bool = typer.Option(False, "--json", help="machine-readable output")) -> None:
    """List a machine's snapshots."""
    from rich.markup import escape
    from rich.table import Table

    rows = machine(name).snapshots
    if as_json:
        print_json([r.model_dump(mode="json") for r in rows])
        return
    table = Table("tag", "created", "machine state", "guest clock")
    for r in rows:
        table.add_row(escape(r.tag), time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(r.created)),
                      _size(r.vm_state_bytes) if r.vm_state_bytes else "disk only", f"{r.guest_clock_seconds:.1f} s")
    out.print(table)


@snapshot_app.command("revert")
def snapshot_revert(
    name: str,
    tag: str,
    timeout: float | None = typer.Option(None, "--timeout", help="seconds to wait (stopped machine)"),
) -> None:
    """Go back to a snapshot (RAM and disks). A stopped machine is started from it."""
    handle = machine(name)
    with progress_ui(f"reverting {name} to {tag}") as ui:
        outcome = handle.revert(tag, timeout=timeout, progress=ui.console_line, notice=ui.notice)
    describe_start(name, outcome)


@snapshot_app.command("delete")
def snapshot_delete(name: str, tag: str) -> None:
    """Delete a snapshot (from every disk that holds it)."""
    from rich.markup import escape

    machine(name).delete_snapshot(tag)
    out.print(f"deleted snapshot [bold]{escape(tag)}[/] of {name}", highlight=False)
