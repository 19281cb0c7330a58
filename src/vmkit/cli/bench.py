"""``vmkit bench fs NAME``: fio in the guest on each shared folder and on the guest's disk."""

from __future__ import annotations

from pathlib import Path

import typer

from vmkit.cli import groups
from vmkit.cli.output import err, machine, out
from vmkit.errors import ExitCode

app = typer.Typer(help=groups.help_of("bench"), no_args_is_help=True)


@app.command("fs")
def fs(
    name: str = typer.Argument(..., help="a running machine with the guest agent and fio"),
    jobs: str | None = typer.Option(None, "--jobs", help="comma-separated rows, e.g. seqread-psync,randrw-libaio-multi "
                                    "(default: all 30)"),
    quick: bool = typer.Option(False, "--quick", help="5 rows, 4M files, 1 s each: a smoke test"),
    size: str | None = typer.Option(None, "--size", help="size of each fio file, e.g. 64M (default 64M; quick 4M)"),
    runtime: int | None = typer.Option(None, "--runtime", help="seconds each job may run at most (default 3; quick 1)"),
    share: list[str] | None = typer.Option(None, "--share", help="benchmark only the share with this tag (repeatable)"),
    disk: bool = typer.Option(True, "--disk/--no-disk", help="also measure the guest's own disk (the baseline)"),
    buffered: bool = typer.Option(False, "--buffered", help="direct=0: go through the guest page cache"),
    json_path: Path | None = typer.Option(None, "--json", help="write the results as JSON here "
                                          "(default: fsbench-TIME.json in the instance directory)"),
    markdown_path: Path | None = typer.Option(None, "--markdown", help="write the table as Markdown here "
                                              "(default: fsbench-TIME.md in the instance directory)"),
) -> None:
    """Run fio in the guest on every mounted share and on the guest's disk; print the comparison.

    Rows are the virtiofs-tests jobs (seqread, randread, seqwrite, randwrite, randrw with the
    psync, mmap and libaio engines, 1 job and 4 jobs); the fastest share of each row is marked.
    Shares must already be mounted in the guest; read-only shares are skipped.
    """
    from rich.markup import escape
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, SpinnerColumn, TextColumn, TimeElapsedColumn
    from rich.table import Table

    from vmkit.bench import fs as fsbench
    from vmkit.config import format_size

    selected = fsbench.select_jobs(jobs, quick=quick)
    settings = fsbench.settings_for(quick=quick, size=size, runtime=runtime, buffered=buffered)
    handle = machine(name)

    with Progress(SpinnerColumn(), TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(),
                  TimeElapsedColumn(), console=err, transient=True) as bar:
        task = bar.add_task("checking the guest's mounts", total=None)

        def show(step: fsbench.Step) -> None:
            if step.phase == "layout":
                text = f"laying out {fsbench.MULTI_JOBS} x {format_size(settings.size)} on {step.mechanism}"
            elif step.phase == "cleanup":
                text = "removing the scratch files"
            else:
                text = f"{step.job} on {step.mechanism}"
            bar.update(task, description=escape(text), total=step.total, completed=step.index)

        try:
            report = handle.bench_fs(selected, settings, shares=share or None, disk=disk, progress=show)
        except KeyboardInterrupt:
            bar.stop()
            err.print("interrupted: fio in the guest stopped, scratch files removed", highlight=False)
            raise typer.Exit(ExitCode.INTERRUPTED) from None

    table = Table(title=f"vmkit bench fs {escape(name)}  (★ fastest share; disk = baseline)", title_justify="left")
    table.add_column("job")
    for m in report.mechanisms:
        table.add_column(escape(fsbench.column_title(m)), justify="right")
    for row in report.rows:
        win = row.winner(report.mechanisms)
        cells = []
        for m in report.mechanisms:
            meas = row.results[m.name]
            text = escape(fsbench.cell_text(meas, row.job))
            cells.append(f"[bold green]{text} ★[/]" if m.name == win else (text if meas.ok else f"[red]{text}[/]"))
        table.add_row(row.job.name, *cells)
    out.print(table)
    for note in report.notes:
        out.print(f"note: {escape(note)}", highlight=False)
    for line in fsbench.summary_lines(report):
        out.print(escape(line), highlight=False)
    for path in handle.write_bench_report(report, json_path, markdown_path):
        out.print(f"wrote {escape(str(path))}", highlight=False)
