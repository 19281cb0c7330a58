"""What ``vmkit list`` and ``vmkit inspect`` show: every instance with its state, size and uptime;
one instance's configuration and runtime status.

Kept apart from :mod:`vmkit.backends.local.control` (which re-exports it) so that these read-only views import only
what they need (the instance records, the configuration model and the result model): they are
typed all day and must answer at once. Per instance, listing reads ``state.json`` and ``vm.yaml``
(with libyaml) and tests the supervisor's lock; nothing else.
"""

from __future__ import annotations

import time
from typing import Any

from vmkit.api.models import InstanceRow
from vmkit.config import format_size
from vmkit.errors import VmkitError
from vmkit.host.instance import LIVE, Instance

BROKEN = "broken"
"""The state ``vmkit list`` shows for an instance whose vm.yaml or state.json cannot be used."""


def view(inst: Instance) -> InstanceRow:
    """One instance as ``vmkit list`` shows it (raises if its files cannot be used)."""
    status = inst.reconcile()
    config = inst.load_config()
    live = status.state in LIVE and inst.is_supervised()
    saved = not live and inst.saved_state_path.exists()  # `vmkit start` resumes it
    migrated = not live and inst.migrated_to is not None  # it runs on another host now
    return InstanceRow(
        name=inst.name,
        state="migrated" if migrated else "saved" if saved else status.state,
        health="degraded" if live and status.degraded else "ok",
        cpus=config.cpus, memory=format_size(config.memory),
        accel=status.accel if live else None,
        uptime=(time.time() - status.started_at) if live and status.started_at else None,
        reason=f"runs on {inst.migrated_to} (vmkit delete {inst.name} removes this copy)" if migrated
        else status.reason,
    )


def list_instances() -> list[InstanceRow]:
    """Every instance; one whose files cannot be used is ``broken`` (the reason names the file),
    never an error that hides the others."""
    rows = []
    for inst in Instance.all():
        try:
            rows.append(view(inst))
        except (VmkitError, OSError) as exc:
            reason = exc.message if isinstance(exc, VmkitError) else str(exc)
            rows.append(InstanceRow(name=inst.name, state=BROKEN, cpus=None, memory=None, accel=None,
                                    uptime=None, reason=" ".join(reason.split())))
    return rows


def inspect(name: str) -> dict[str, Any]:
    """``vmkit inspect``: the configuration and the runtime status of ``name``."""
    inst = Instance(name).require()
    status = inst.reconcile()
    config = inst.load_config()
    return {
        "name": name,
        "directory": str(inst.dir),
        "config": config.to_dict(),
        "runtime": {**status.to_dict(), "supervised": inst.is_supervised()},
    }
