"""``vmkit host ...``: settings of the host that all machines share (KSM page merging)."""

from __future__ import annotations

import typer

from vmkit.cli.output import out, print_json
from vmkit.host import ksm

app = typer.Typer(no_args_is_help=True)
ksm_app = typer.Typer(no_args_is_help=True, help="Kernel same-page merging: identical guest pages kept once "
                                                  "(host-wide; needs root to change).")
app.add_typer(ksm_app, name="ksm")


def _show(st: ksm.KsmStatus, as_json: bool) -> None:
    if as_json:
        print_json(st.to_dict())
        return
    out.print(f"KSM is [bold]{st.mode}[/] (run={st.run}), pages_to_scan={st.pages_to_scan}, "
              f"sleep_millisecs={st.sleep_millisecs}")
    out.print(f"pages_shared={st.pages_shared} pages_sharing={st.pages_sharing}: "
              f"{st.saved_bytes / (1 << 20):.1f} MiB saved on this host")


@ksm_app.command()
def on(
    pages_to_scan: int = typer.Option(ksm.PAGES_TO_SCAN, "--pages-to-scan", help="pages scanned per wake-up"),
    sleep_millisecs: int = typer.Option(ksm.SLEEP_MILLISECS, "--sleep-millisecs",
                                        help="milliseconds between scans"),
    as_json: bool = typer.Option(False, "--json", help="machine-readable output"),
) -> None:
    """Start merging identical pages (run=1)."""
    _show(ksm.enable(pages_to_scan=pages_to_scan, sleep_millisecs=sleep_millisecs), as_json)


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
