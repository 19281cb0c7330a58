"""The libvirt backend: vmkit machines run by libvirt, on this host or another (``vmkit --connect
URI``, ``vmkit.Client(connect=URI)``). :mod:`.connection` (URIs, the connection, libvirt's errors as
vmkit's), :mod:`.storage` (the ``vmkit`` storage pool: uploads, overlays, log volumes),
:mod:`.machines` (every operation: :class:`~.machines.LibvirtHost`)."""
