"""Stand-ins for two modules that typer's help renderer imports but the ``vmkit`` command never uses.

``typer.rich_utils`` (imported for every ``--help`` and usage error) imports ``rich.markdown``
(markdown-it, about 30 ms) for ``rich_markup_mode="markdown"`` and ``rich.traceback`` (pygments,
about 15 ms) for pretty exceptions. vmkit uses neither (markup mode ``rich``, pretty exceptions
off), and ``vmkit --help`` should answer in 150 ms. :func:`defer` puts a stand-in module in
``sys.modules``: ``from rich.markdown import Markdown`` then gets a stand-in class, and the first
real use of it (a call, a class attribute) or of any other name of the module imports the real
module, which replaces the stand-in. Nothing changes for code that uses them; it just pays later.
"""

from __future__ import annotations

import importlib
import sys
import types
from typing import Any


def _load(module: str) -> types.ModuleType:
    if isinstance(sys.modules.get(module), _StandInModule):
        del sys.modules[module]
    return importlib.import_module(module)


class _StandInClass(type):
    """The metaclass of a stand-in class: calls and attributes go to the real class."""

    _module: str
    _name: str

    def _real(cls) -> Any:
        return getattr(_load(cls._module), cls._name)

    def __call__(cls, *args: Any, **kwargs: Any) -> Any:
        return cls._real()(*args, **kwargs)

    def __getattr__(cls, attr: str) -> Any:
        return getattr(cls._real(), attr)


class _StandInModule(types.ModuleType):
    def __init__(self, name: str, names: tuple[str, ...]) -> None:
        super().__init__(name, f"stand-in for {name} (vmkit.cli._deferred): loaded on first use")
        for n in names:
            setattr(self, n, _StandInClass(n, (), {"_module": name, "_name": n}))

    def __getattr__(self, attr: str) -> Any:
        if attr.startswith("__"):  # import machinery probing (__path__, __spec__...): not the real module's
            raise AttributeError(attr)
        return getattr(_load(self.__name__), attr)


def defer(module: str, *names: str) -> None:
    """Stand in for ``module`` (whose classes ``names`` may be imported by name) until it is used;
    nothing happens if it is already imported."""
    if module not in sys.modules:
        sys.modules[module] = _StandInModule(module, names)


def defer_unused_help_modules() -> None:
    """The modules ``typer.rich_utils`` imports and vmkit does not use (see the module docstring)."""
    if "typer.rich_utils" not in sys.modules:
        defer("rich.markdown", "Markdown")
        defer("rich.traceback", "Traceback")
