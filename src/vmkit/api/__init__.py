"""The supervisor's REST API: typed models (:mod:`.models`), the routes and the OpenAPI document
(:mod:`.spec`), and the low-level client of one supervisor (:mod:`.client`)."""

from vmkit.api.transport import SupervisorClient

__all__ = ["SupervisorClient"]
