"""``vmkit.aio.Client``: the asynchronous public client (see :mod:`vmkit.api.aio`)."""

from vmkit.api.aio import Client, Instance

__all__ = ["Client", "Instance"]
