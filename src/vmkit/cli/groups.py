"""The command groups (``vmkit image ...``, ``vmkit nbd ...``): where each lives and what it is for.

``vmkit`` registers them by name only; a group's module is imported when one of its commands runs
or its help is shown, so ``vmkit --help`` and ``vmkit list`` neither import nor build them.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

from typer.core import TyperGroup

if TYPE_CHECKING:
    from collections.abc import MutableMapping

    from typer import _click as click

GROUPS: dict[str, tuple[str, str, str]] = {
    # name: (module, its typer.Typer, help), in the order `vmkit --help` lists them
    "image": ("vmkit.cli.image", "app", "Build, list and remove guest images."),
    "nbd": ("vmkit.cli.nbd", "app",
            "Serve disks over NBD with vmkit's own server (QEMU, qemu-img, nbdinfo, nbdcopy connect to it)."),
    "disk": ("vmkit.cli.disk", "app", "Attach, detach and list the disks of a running machine."),
    "mount": ("vmkit.cli.mount", "app", "Host folders shared into a machine (set with `vmkit create --mount`)."),
    "port": ("vmkit.cli.port", "app", "Forward host ports into a machine."),
    "network": ("vmkit.cli.network", "app",
                "Virtual networks: machines on one reach each other by name (NAT, isolated, routed, rootless)."),
    "bench": ("vmkit.cli.bench", "app", "Benchmarks run inside a machine."),
    "key": ("vmkit.cli.key", "app", "The state-file key (it encrypts and authenticates saved machine states)."),
    "host": ("vmkit.cli.host", "app",
             "Settings of the host that all machines share (KSM page merging, automatic ballooning)."),
    "template": ("vmkit.cli.template", "app",
                 "Templates: ready machines described in YAML (vmkit create NAME --template NAME|FILE|URL)."),
    "snapshot": ("vmkit.cli.state", "snapshot_app",
                 "Snapshots: machine state and disks together (rewind and go forward again)."),
}


def help_of(name: str) -> str:
    return GROUPS[name][2]


class LazyGroup(TyperGroup):
    """Stands for a command group in its parent's list (name and help); anything more (parsing its
    arguments, its own help, its commands) builds the real group from its module first."""

    def __init__(self, name: str) -> None:
        super().__init__(name=name, help=help_of(name), no_args_is_help=True)
        self._real: TyperGroup | None = None

    def real(self) -> TyperGroup:
        if self._real is None:
            import typer.main

            module, attr, _ = GROUPS[str(self.name)]
            group = typer.main.get_group(getattr(importlib.import_module(module), attr))
            group.name = self.name
            self._real = group
        return self._real

    @property
    def commands(self) -> MutableMapping[str, click.Command]:
        if "_real" not in self.__dict__:  # still in __init__
            return {}
        return self.real().commands

    @commands.setter
    def commands(self, value: MutableMapping[str, click.Command]) -> None:
        pass  # the real group's, built when needed

    def make_context(self, info_name: str | None, args: list[str], parent: click.Context | None = None,
                     **extra: Any) -> click.Context:
        return self.real().make_context(info_name, args, parent=parent, **extra)


class VmkitGroup(TyperGroup):
    """The top-level ``vmkit`` group: its own commands, then the groups of :data:`GROUPS` (lazily)."""

    def __init__(self, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        for name in GROUPS:
            self.commands[name] = LazyGroup(name)
