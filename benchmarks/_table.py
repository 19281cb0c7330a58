"""What the benchmark scripts share: timing statistics, the table printer, settling the page cache, vmkit run
as installed."""

from __future__ import annotations

import os
import statistics
from collections.abc import Sequence
from pathlib import Path


def med_best(samples: Sequence[float]) -> tuple[float, float]:
    """Median and best (smallest) of ``samples``."""
    return statistics.median(samples), min(samples)


def ratio(samples: Sequence[float], base: Sequence[float]) -> str:
    """``samples`` against ``base``: median ratio, and best against best in parentheses."""
    (m, b), (bm, bb) = med_best(samples), med_best(base)
    return f"{m / bm:.2f}x ({b / bb:.2f}x)"


def print_table(headers: Sequence[str], rows: Sequence[Sequence[object]], *, left: int = 1) -> None:
    """Print ``rows`` under ``headers``: the first ``left`` columns left-aligned, the others right-aligned."""
    cells = [[str(h) for h in headers], *[[str(c) for c in row] for row in rows]]
    widths = [max(len(r[i]) for r in cells if i < len(r)) for i in range(len(headers))]
    for r in cells:
        line = [c.ljust(widths[i]) if i < left else c.rjust(widths[i]) for i, c in enumerate(r)]
        print("  ".join(line).rstrip())


def settle(*files: Path) -> None:
    """Write back what a case left dirty (untimed), so it does not slow down the next case."""
    for f in files:
        if f.exists():
            fd = os.open(f, os.O_RDONLY)
            try:
                os.fsync(fd)
            finally:
                os.close(fd)


def as_installed(src: Path) -> None:
    """Run vmkit the way an installed vmkit runs: its modules byte-compiled (``pip install`` compiles them),
    in this process and every process it starts. A shell with ``PYTHONDONTWRITEBYTECODE`` set would
    otherwise leave every module changed since its last ``.pyc`` to be compiled again by every command a
    benchmark times (about 2 to 7 ms a module)."""
    import compileall

    compileall.compile_dir(str(src), quiet=1)
    os.environ.pop("PYTHONDONTWRITEBYTECODE", None)
