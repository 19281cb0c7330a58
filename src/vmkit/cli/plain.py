"""Rendering without rich, for the commands that must answer at once when no terminal watches
(``vmkit list`` into a pipe or a script: about what ``virsh list`` costs; see benchmarks/cli_bench.py).

Standard library only. On a terminal the same commands render with rich (:mod:`vmkit.cli.vm`).
"""

from __future__ import annotations

import json
import sys
from collections.abc import Sequence
from typing import TYPE_CHECKING, TextIO

if TYPE_CHECKING:
    from vmkit.backends.local.listing import Row

LIST_COLUMNS = ("name", "state", "cpus", "memory", "accelerator", "uptime")


def human_duration(seconds: float | None) -> str:
    if seconds is None:
        return "-"
    s = int(seconds)
    if s < 60:
        return f"{s}s"
    if s < 3600:
        return f"{s // 60}m{s % 60:02d}s"
    return f"{s // 3600}h{(s % 3600) // 60:02d}m"


def list_columns(rows: Sequence[Row]) -> tuple[str, ...]:
    """The columns of ``vmkit list``: an ``addresses`` column once a machine is on a vmkit network."""
    return (*LIST_COLUMNS, "addresses") if any(r["addresses"] for r in rows) else LIST_COLUMNS


def list_cells(row: Row, *, addresses: bool = False) -> list[str]:
    """The cells of one ``vmkit list`` row (the rich table colours the same cells)."""
    state = f"{row['state']} (degraded)" if row["health"] == "degraded" else row["state"]
    cells = [row["name"], state, str(row["cpus"] or "-"), row["memory"] or "-", row["accel"] or "-",
             human_duration(row["uptime"])]
    if addresses:
        cells.append(" ".join(f"{a} ({n})" for n, a in row["addresses"].items()) or "-")
    return cells


def table(header: Sequence[str], rows: Sequence[Sequence[str]], out: TextIO) -> None:
    """Columns separated by two spaces, as ``virsh list`` and ``docker ps`` print them."""
    widths = [max(len(c) for c in col) for col in zip(header, *rows, strict=False)]
    for cells in (header, *rows):
        out.write("  ".join(c.ljust(w) for c, w in zip(cells, widths, strict=True)).rstrip() + "\n")


def list_machines(as_json: bool) -> bool:
    """``vmkit list [--json]`` for a pipe; False (nothing printed) if the full command must answer
    (an error to report, a terminal to colour)."""
    from vmkit.backends.local import listing
    from vmkit.errors import VmkitError

    try:
        rows = listing.rows()
    except VmkitError:
        return False  # the full command reports it, with its hint
    if as_json:
        sys.stdout.write(json.dumps(rows, indent=2) + "\n")
        return True
    columns = list_columns(rows)
    table(columns, [list_cells(r, addresses=len(columns) > len(LIST_COLUMNS)) for r in rows], sys.stdout)
    for r in rows:
        if r["state"] == listing.BROKEN:
            sys.stderr.write(f"{r['name']} is broken: {r['reason']}\n")
    return True
