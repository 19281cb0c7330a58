"""The public Python client: :class:`Client` and :class:`Instance` (synchronous, :mod:`.sync`) and
their asyncio twins (:mod:`.aio`). ``vmkit.Client`` and ``vmkit.aio.Client`` are these."""

from vmkit.client.sync import Client, Instance

__all__ = ["Client", "Instance"]
