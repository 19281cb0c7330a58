"""The layer contract (docs/ARCHITECTURE.md): each layer imports only the ones below it, siblings
marked independent never import each other, and no modules import each other in a circle. Type-only
imports count: they are dependencies of the design too."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]


def test_import_contracts_hold() -> None:
    lint = Path(sys.executable).with_name("lint-imports")
    res = subprocess.run([str(lint), "--config", str(REPO / "pyproject.toml")], capture_output=True, text=True,
                         cwd=REPO, timeout=300)
    assert res.returncode == 0, res.stdout + res.stderr
    assert "Contracts: 3 kept, 0 broken." in res.stdout, res.stdout


def test_no_import_cycles() -> None:
    """Every import between vmkit's modules, also inside functions and under TYPE_CHECKING."""
    import grimp

    graph = grimp.build_graph("vmkit", exclude_type_checking_imports=False)
    modules = sorted(graph.modules)
    cycles = []
    for m in modules:
        for dep in graph.find_modules_directly_imported_by(m):
            if dep != m and graph.chain_exists(importer=dep, imported=m):
                chain = graph.find_shortest_chain(importer=dep, imported=m) or (dep, m)
                cycles.append(" -> ".join(chain) + f" -> {dep}")
    assert not cycles, "import cycles:\n" + "\n".join(sorted(set(cycles))[:20])
