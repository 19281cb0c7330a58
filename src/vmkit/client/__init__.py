"""The public Python client: :class:`Client` and :class:`Instance` (synchronous, :mod:`.sync`) and
their asyncio twins (:mod:`.aio`); on a libvirt host (``Client(connect=URI)``) :mod:`.libvirt`.
``vmkit.Client`` and ``vmkit.aio.Client`` are these."""

from vmkit.client import libvirt as _libvirt
from vmkit.client.sync import CONNECTED, Client, Instance

CONNECTED["libvirt"] = _libvirt.LibvirtClient

__all__ = ["Client", "Instance"]
