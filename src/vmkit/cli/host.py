"""``vmkit host ...``: settings of the host that all machines share (KSM page merging, automatic ballooning)."""

from __future__ import annotations

from typing import TYPE_CHECKING

import typer

from vmkit.cli.output import client, out, print_json
from vmkit.host import ksm

if TYPE_CHECKING:
    from vmkit.api.models import AutoballoonStatus

app = typer.Typer(no_args_is_help=True)
ksm_app = typer.Typer(no_args_is_help=True, help="Kernel same-page merging: identical guest pages kept once "
                                                  "(host-wide; needs root to change).")
app.add_typer(ksm_app, name="ksm")
auto_app = typer.Typer(no_args_is_help=True, help="Automatic ballooning: a background controller keeps the host "
                                                   "near a target memory use by moving running guests' balloons.")
app.add_typer(auto_app, name="autoballoon")


def _show(st: ksm.KsmStatus, as_json: bool) -> None:
    if as_json:
        print_json(st.to_dict())
        return
    smart = "" if st.smart_scan is None else f", smart_scan={st.smart_scan}"
    out.print(f"KSM is [bold]{st.mode}[/] (run={st.run}), pages_to_scan={st.pages_to_scan}, "
              f"sleep_millisecs={st.sleep_millisecs}{smart}")
    out.print(f"pages_shared={st.pages_shared} pages_sharing={st.pages_sharing}: "
              f"{st.saved_bytes / (1 << 20):.1f} MiB saved on this host")


@ksm_app.command()
def on(
    pages_to_scan: int = typer.Option(ksm.PAGES_TO_SCAN, "--pages-to-scan", help="pages scanned per wake-up"),
    sleep_millisecs: int = typer.Option(ksm.SLEEP_MILLISECS, "--sleep-millisecs",
                                        help="milliseconds between scans"),
    smart_scan: bool = typer.Option(ksm.SMART_SCAN, "--smart-scan/--no-smart-scan",
                                    help="let the kernel (6.7+) skip pages that did not merge before: less ksmd "
                                         "CPU, much slower merging of idle guests"),
    as_json: bool = typer.Option(False, "--json", help="machine-readable output"),
) -> None:
    """Start merging identical pages (run=1)."""
    _show(ksm.enable(pages_to_scan=pages_to_scan, sleep_millisecs=sleep_millisecs, smart_scan=smart_scan), as_json)


@ksm_app.command()
def off(
    unmerge: bool = typer.Option(False, "--unmerge", help="also unmerge every merged page (run=2; memory use "
                                                          "grows by what KSM saved)"),
    as_json: bool = typer.Option(False, "--json", help="machine-readable output"),
) -> None:
    """Stop merging (run=0: pages merged so far stay merged until written)."""
    _show(ksm.disable(unmerge=unmerge), as_json)


@ksm_app.command()
def status(as_json: bool = typer.Option(False, "--json", help="machine-readable output")) -> None:
    """KSM's settings and the memory it saves on this host."""
    _show(ksm.status(), as_json)


def _mib(n: int | None) -> str:
    return "-" if n is None else f"{n / (1 << 20):.0f} MiB"


def _show_auto(st: AutoballoonStatus, as_json: bool) -> None:
    from rich.table import Table

    if as_json:
        print_json(st.model_dump(mode="json"))
        return
    if st.running:
        note = " (it was already running: nothing changed)" if st.already_running else ""
        out.print(f"autoballoon is [bold]on[/] (pid {st.pid}){note}: target {st.target_percent:g} % of the host's "
                  f"memory, steps of {_mib(st.step_bytes)} every {st.interval_seconds:g} s, host figures from "
                  f"{st.meminfo}")
    else:
        out.print("autoballoon is [bold]off[/]" + (" (its last run below)" if st.rounds else ""))
    if st.rounds:
        used = st.host_used_bytes or 0
        total = st.host_total_bytes or 1
        out.print(f"round {st.rounds} at {st.last_round_at}: host uses {_mib(used)} of {_mib(total)} "
                  f"({100 * used / total:.0f} %), goal {_mib(st.goal_bytes)}: {st.action}; "
                  f"{st.changes} balloon targets set so far")
        if st.guests:
            table = Table("machine", "memory", "balloon", "available", "min", "shares", "pressure", "set to")
            for g in st.guests:
                table.add_row(g.name, _mib(g.memory_bytes), _mib(g.balloon_bytes), _mib(g.guest_mem_available_bytes),
                              _mib(g.balloon_min_bytes), str(g.balloon_shares), "yes" if g.pressure else "",
                              _mib(g.target_bytes) if g.target_bytes is not None else "")
            out.print(table)
        for e in st.errors:
            out.print(f"[yellow]{e}[/]")
    if st.log:
        out.print(f"log: {st.log}")


@auto_app.command("on")
def auto_on(
    target: float = typer.Option(80.0, "--target", help="percent of the host's memory the guests may bring it to"),
    step: str = typer.Option("100M", "--step", help="the most one balloon moves per round"),
    interval: float = typer.Option(5.0, "--interval", help="seconds between two rounds"),
    meminfo: str | None = typer.Option(None, "--meminfo", help="read the host's memory figures from this file "
                                                               "(/proc/meminfo's format): a simulated host"),
    as_json: bool = typer.Option(False, "--json", help="machine-readable output"),
) -> None:
    """Start the controller for this vmkit home (in the background; a second `on` changes nothing)."""
    _show_auto(client().autoballoon_start(target_percent=target, step=step, interval=interval, meminfo=meminfo),
               as_json)


@auto_app.command("off")
def auto_off(as_json: bool = typer.Option(False, "--json", help="machine-readable output")) -> None:
    """Stop the controller; the balloons stay where it left them (`vmkit set NAME --balloon` moves one)."""
    _show_auto(client().autoballoon_stop(), as_json)


@auto_app.command("status")
def auto_status(as_json: bool = typer.Option(False, "--json", help="machine-readable output")) -> None:
    """Whether the controller runs, and what it saw and did in its last round."""
    _show_auto(client().autoballoon_status(), as_json)
