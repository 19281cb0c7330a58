"""Moving a machine to another host: live migration (:mod:`vmkit.migrate.send`, the source side that
drives both hosts; :mod:`vmkit.migrate.receive`, ``vmkit migrate-receive`` on the target).

Sits above the backends: it drives this host's supervisor (:mod:`vmkit.backends.local`) and the
target's vmkit over SSH (:mod:`vmkit.backends.ssh`). QEMU's side of it (which method is safe, the QMP,
the memory check) is :mod:`vmkit.runtime.migration`; the supervisor's routes are
:mod:`vmkit.daemon.migrate_routes`.

A network membership would travel in :class:`vmkit.migrate.receive.Manifest` as the configuration
does (the machine keeps its MAC; the target would join the same network before QEMU starts).
"""
