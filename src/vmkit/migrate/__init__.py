"""Moving a machine to another host: live migration (:mod:`vmkit.migrate.send`, the source side that
drives both hosts; :mod:`vmkit.migrate.receive`, ``vmkit migrate-receive`` on the target).

Sits above the backends: it drives this host's supervisor (:mod:`vmkit.backends.local`) and the
target's vmkit over SSH (:mod:`vmkit.backends.ssh`). QEMU's side of it (which method is safe, the QMP,
the memory check) is :mod:`vmkit.runtime.migration`; the supervisor's routes are
:mod:`vmkit.daemon.migrate_routes`.

A machine on vmkit networks keeps its MAC and address (they are in its configuration): the target
checks it has each network by name and subnet (:func:`vmkit.migrate.receive.check_networks`), its
start registers the static leases there, and the source releases them once the target runs it.
:mod:`vmkit.migrate.tls` makes the certificates of ``--tls``.
"""
