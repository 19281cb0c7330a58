"""``vmkit.aio.Client``: the asynchronous public client (see :mod:`vmkit.client.aio`)."""

from vmkit.client.aio import Client, Instance

__all__ = ["Client", "Instance"]
