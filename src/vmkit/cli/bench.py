"""``vmkit bench fs NAME`` (fio on each shared folder), ``vmkit bench cpu`` (sysbench on the host, in a
container and in guests), ``vmkit bench devices`` (fio on virtio-blk, NVMe, SATA and IDE disks)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import typer

from vmkit.cli import groups
from vmkit.cli.output import client, err, machine, out
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


def _progress_bar() -> Any:
    from rich.progress import Progress, SpinnerColumn, TextColumn, TimeElapsedColumn

    return Progress(SpinnerColumn(), TextColumn("{task.description}"), TimeElapsedColumn(), console=err,
                    transient=True)


def _draw(title: str, header: list[str], rows: list[list[str]], footer: list[str]) -> None:
    from rich.markup import escape
    from rich.table import Table

    table = Table(title=escape(title), title_justify="left")
    for i, h in enumerate(header):
        table.add_column(escape(h), justify="left" if i == 0 else "right")
    for row in rows:
        table.add_row(*[(f"[red]{escape(c)}[/]" if c.startswith("failed") else escape(c)) for c in row])
    out.print(table)
    for line in footer:
        out.print(escape(line), highlight=False, soft_wrap=True)


@app.command("cpu")
def cpu(
    quick: bool = typer.Option(False, "--quick", help="prime limit 10000, 2 s per run, once: a smoke test"),
    threads: int | None = typer.Option(None, "--threads", help="the N of the N-thread runs "
                                       "(default: the host's CPUs; the guests get as many vCPUs)"),
    prime: int | None = typer.Option(None, "--prime", help="sysbench --cpu-max-prime (default 20000; quick 10000)"),
    seconds: int | None = typer.Option(None, "--time", help="seconds per run (default 10; quick 2)"),
    repeat: int | None = typer.Option(None, "--repeat", help="runs per cell, the best counts (default 3; quick 1)"),
    target: list[str] | None = typer.Option(None, "--target", help="measure only these rows (repeatable): "
                                            "host, container, x86_64-tcg, x86_64-kvm, aarch64-tcg"),
    machine_name: str | None = typer.Option(None, "--machine", help="a running x86-64 machine to measure instead "
                                            "of booting a throw-away one"),
    json_path: Path | None = typer.Option(None, "--json", help="also write the results as JSON here"),
    plot_path: Path | None = typer.Option(None, "--plot", help="also draw the table as a PNG bar chart here"),
) -> None:
    """sysbench's CPU test on the host, in a container (unshare + chroot into the debian-12 root file
    system), in an x86-64 guest under TCG and under KVM, and in an aarch64 guest; events per second
    with 1 and N threads and the ratio to the host. Rows that cannot run here say why."""
    from rich.markup import escape

    from vmkit.bench import cpu as cpubench

    settings = cpubench.settings_for(quick=quick, threads=threads, prime=prime, seconds=seconds, repeat=repeat)
    with _progress_bar() as bar:
        task = bar.add_task("sysbench", total=None)
        try:
            report = client().bench_cpu(settings, machine=machine_name, targets=target or cpubench.TARGETS,
                                      progress=lambda m: bar.update(task, description=escape(m)))
        except KeyboardInterrupt:
            bar.stop()
            err.print("interrupted: throw-away guests and temporary files removed", highlight=False)
            raise typer.Exit(ExitCode.INTERRUPTED) from None
    header, rows = cpubench.table_rows(report)
    _draw("vmkit bench cpu (sysbench events per second; ratio to the host)", header, rows,
          cpubench.footer_lines(report))
    if json_path is not None:
        out.print(f"wrote {escape(str(cpubench.write_json(report, json_path)))}", highlight=False)
    if plot_path is not None:
        out.print(f"wrote {escape(str(cpubench.plot(report, plot_path)))}", highlight=False)


@app.command("devices")
def devices(
    quick: bool = typer.Option(False, "--quick", help="64M disks, 1 s per cell: a smoke test"),
    size: str | None = typer.Option(None, "--size", help="size of each scratch disk (default 512M; quick 64M)"),
    runtime: int | None = typer.Option(None, "--runtime", help="seconds per cell (default 10; quick 1)"),
    kind: list[str] | None = typer.Option(None, "--kind", help="device models to compare (repeatable; virtio-blk "
                                          "always runs): virtio-blk, nvme, sata, ide"),
    nic: list[str] | None = typer.Option(None, "--nic", help="NIC models to compare (repeatable; virtio always "
                                         "runs): virtio, e1000, rtl8139 (default: virtio and e1000)"),
    no_network: bool = typer.Option(False, "--no-network", help="disks only: no NICs, no iperf3"),
    machine_name: str | None = typer.Option(None, "--machine", help="a running machine with scratch disks whose "
                                            "serial is vmkit-bench-<kind> (overwritten!) instead of a throw-away one; "
                                            "its NICs on vmkit networks are measured too"),
    json_path: Path | None = typer.Option(None, "--json", help="also write the results as JSON here"),
    plot_path: Path | None = typer.Option(None, "--plot", help="also draw the ratios as a PNG bar chart here"),
) -> None:
    """fio inside a guest on a virtio-blk, an NVMe, an emulated SATA (AHCI) and an emulated IDE disk:
    sequential and random reads and writes, and each model's throughput relative to virtio-blk; and
    iperf3 between the guest and the host through a virtio-net and an emulated e1000 NIC (RTL8139 with
    --nic), each on a vmkit nat network of its own (needs root), relative to virtio-net."""
    from rich.markup import escape

    from vmkit.bench import devices as devbench

    settings = devbench.settings_for(quick=quick, size=size, runtime=runtime)
    kinds = [devbench.BASELINE, *[k for k in (kind or devbench.KINDS) if k != devbench.BASELINE]]
    with _progress_bar() as bar:
        task = bar.add_task("fio", total=None)
        try:
            report = client().bench_devices(settings, machine=machine_name, kinds=kinds,
                                            nics=[] if no_network else (nic or devbench.DEFAULT_NICS),
                                            progress=lambda m: bar.update(task, description=escape(m)))
        except KeyboardInterrupt:
            bar.stop()
            err.print("interrupted: the throw-away guest, its scratch disks and networks removed", highlight=False)
            raise typer.Exit(ExitCode.INTERRUPTED) from None
    header, rows = devbench.table_rows(report)
    footer = devbench.footer_lines(report)
    _draw("vmkit bench devices (fio in the guest; ratio to virtio-blk)", header, rows,
          [] if report.net_rows else footer)
    if report.net_rows:
        nheader, nrows = devbench.net_table_rows(report)
        _draw("network devices (iperf3 between the guest and the host; ratio to virtio-net)", nheader, nrows, footer)
    if json_path is not None:
        out.print(f"wrote {escape(str(devbench.write_json(report, json_path)))}", highlight=False)
    if plot_path is not None:
        out.print(f"wrote {escape(str(devbench.plot(report, plot_path)))}", highlight=False)
