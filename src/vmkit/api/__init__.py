"""The supervisor's REST API: typed models (:mod:`.models`), the routes and the OpenAPI document
(:mod:`.spec`), and the low-level client of one supervisor (:mod:`.transport`).

The low-level client is imported on first use (it brings aiohttp), so importing the models is cheap.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

__all__ = ["SupervisorClient"]

if TYPE_CHECKING:
    from vmkit.api.transport import SupervisorClient


def __getattr__(name: str) -> Any:
    if name == "SupervisorClient":
        from vmkit.api.transport import SupervisorClient

        return SupervisorClient
    raise AttributeError(f"module 'vmkit.api' has no attribute {name!r}")
