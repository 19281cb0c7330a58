"""What ``vmkit list`` and ``vmkit inspect`` show: every instance with its state, size and uptime;
one instance's configuration and runtime status.

The one implementation of listing: :func:`rows` gives plain rows (what ``vmkit list --json``
prints), :func:`list_instances` the same rows as :class:`vmkit.api.models.InstanceRow` (what
``vmkit.Client.rows()`` returns). ``vmkit list`` is typed all day and should answer about as fast
as ``virsh list``, so this module imports only the standard library at first, and per instance
does what a directory listing costs:

- the lock test (:func:`vmkit.host.lock.held_exclusively`) and ``state.json`` read as JSON;
- ``cpus`` and ``memory`` from ``.list-cache.json`` in the instances directory, which remembers
  them per ``vm.yaml`` by its inode, size and modification time (as git's index remembers files);
  a ``vm.yaml`` that changed is parsed and validated again, with the full configuration model.

Anything out of the ordinary (a machine whose supervisor died and needs cleaning up, a
``state.json`` that does not look like one, a changed ``vm.yaml``) takes the full path for that
instance: :class:`vmkit.host.instance.Instance` (pydantic, PyYAML) reconciles, validates and says
what is wrong, and an instance that cannot be used is ``broken`` with the reason.
"""

from __future__ import annotations

import contextlib
import json
import os
import stat
import time
from pathlib import Path
from typing import TYPE_CHECKING, Any, TypedDict

from vmkit.errors import VmkitError
from vmkit.host import paths
from vmkit.host.lock import held_exclusively
from vmkit.runtime.states import LIVE_STATES, VmState

if TYPE_CHECKING:
    from vmkit.api.models import InstanceRow
    from vmkit.host.instance import Instance

BROKEN = "broken"
"""The state ``vmkit list`` shows for an instance whose vm.yaml or state.json cannot be used."""

CACHE_NAME = ".list-cache.json"
"""In the instances directory: ``cpus`` and ``memory`` of each vm.yaml, keyed by its stat."""

_STATES = frozenset(s.value for s in VmState)
_LIVE = frozenset(s.value for s in LIVE_STATES)
_SETTLE_NS = 2_000_000_000
"""A vm.yaml changed less than this ago is not cached: a second change within the file system's
timestamp granularity, same size, would look unchanged."""


class Row(TypedDict):
    """One machine as ``vmkit list`` shows it (the fields of :class:`vmkit.api.models.InstanceRow`)."""

    name: str
    state: str
    health: str
    cpus: int | None
    memory: str | None
    accel: str | None
    uptime: float | None
    reason: str
    addresses: dict[str, str]


class _Cache:
    """``.list-cache.json``: {name: {"stat": [ino, size, mtime_ns], "cpus": int, "memory": str,
    "addresses": {network: address}}}."""

    def __init__(self, base: Path) -> None:
        self.path = base / CACHE_NAME
        self.entries: dict[str, Any] = {}
        self.changed = False
        with contextlib.suppress(OSError, ValueError):
            data = json.loads(self.path.read_bytes())
            if isinstance(data, dict):
                self.entries = data

    def get(self, name: str, key: list[int]) -> tuple[int, str, dict[str, str]] | None:
        entry = self.entries.get(name)
        if not isinstance(entry, dict) or entry.get("stat") != key:
            return None
        cpus, memory, addresses = entry.get("cpus"), entry.get("memory"), entry.get("addresses")
        if type(cpus) is not int or not isinstance(memory, str) or not isinstance(addresses, dict) \
                or not all(isinstance(k, str) and isinstance(v, str) for k, v in addresses.items()):
            return None
        return cpus, memory, addresses

    def put(self, name: str, key: list[int], cpus: int, memory: str, addresses: dict[str, str]) -> None:
        if time.time_ns() - key[2] < _SETTLE_NS:
            return
        self.entries[name] = {"stat": key, "cpus": cpus, "memory": memory, "addresses": addresses}
        self.changed = True

    def save(self, names: set[str]) -> None:
        stale = set(self.entries) - names
        if not self.changed and not stale:
            return
        for name in stale:
            del self.entries[name]
        if not self.entries:
            with contextlib.suppress(OSError):
                self.path.unlink()
            return
        from vmkit.fsutil import atomic_write

        with contextlib.suppress(OSError):  # only a cache: a read-only home lists as well, more slowly
            atomic_write(self.path, json.dumps(self.entries, separators=(",", ":")), 0o600)


def _stat_key(path: Path) -> list[int]:
    """What tells one version of a regular file from another (raises OSError, also if not a file)."""
    st = os.stat(path)
    if not stat.S_ISREG(st.st_mode):
        raise IsADirectoryError(path)
    return [st.st_ino, st.st_size, st.st_mtime_ns]


def _row(name: str, *, state: str, live: bool, saved: bool, degraded: str | None, accel: str | None,
         started_at: float | None, reason: str, cpus: int | None, memory: str | None,
         addresses: dict[str, str]) -> Row:
    return Row(
        name=name,
        state="saved" if saved else state,
        health="degraded" if live and degraded else "ok",
        cpus=cpus, memory=memory,
        accel=accel if live else None,
        uptime=(time.time() - started_at) if live and started_at else None,
        reason=reason,
        addresses=addresses,
    )


def _optional(value: object, kind: type | tuple[type, ...]) -> bool:
    return value is None or (isinstance(value, kind) and not isinstance(value, bool))


def _quick(d: Path, config_key: list[int], cache: _Cache) -> Row | None:
    """The row of the instance in ``d`` (its vm.yaml's stat: ``config_key``) from its files as they
    are, or None if it needs the full path."""
    supervised = held_exclusively(d / "lock")
    try:
        status = json.loads((d / "state.json").read_bytes())
    except FileNotFoundError:
        status = {}
    except (OSError, ValueError, RecursionError):
        return None
    if not isinstance(status, dict):
        return None
    state = status.get("state", "stopped")
    if state not in _STATES:
        return None
    live = state in _LIVE
    if not supervised and (live or (d / "qemu.pid").exists()):
        return None  # the supervisor died: Instance.reconcile cleans up after it
    if not supervised and (d / "migrated.json").exists():
        return None  # it runs on another host now: the full path says where
    reason = status.get("reason", "")
    degraded, accel, started_at = status.get("degraded"), status.get("accel"), status.get("started_at")
    if not (isinstance(reason, str) and _optional(degraded, str) and _optional(accel, str)
            and _optional(started_at, (int, float))):
        return None
    known = cache.get(d.name, config_key)
    if known is None:
        return None
    return _row(d.name, state=state, live=live, saved=not live and (d / "saved.vmstate").exists(),
                degraded=degraded, accel=accel, started_at=started_at, reason=reason,
                cpus=known[0], memory=known[1], addresses=known[2])


def _full(inst: Instance, cache: _Cache | None = None) -> Row:
    """The row of ``inst`` through the instance record: reconciled, vm.yaml parsed and validated
    (raises if its files cannot be used)."""
    from vmkit.config import format_size

    status = inst.reconcile()
    key = _stat_key(inst.config_path)  # before reading: a change after it shows as a different key
    config = inst.load_config()
    memory = format_size(config.memory)
    addresses = {n.network: n.address for n in config.networks if n.address}
    if cache is not None:
        cache.put(inst.name, key, config.cpus, memory, addresses)
    live = status.state in _LIVE and inst.is_supervised()
    migrated_to = None if live else inst.migrated_to
    state: str = status.state
    reason = status.reason
    if migrated_to is not None:  # it runs on another host now
        state, reason = "migrated", f"runs on {migrated_to} (vmkit delete {inst.name} removes this copy)"
    return _row(inst.name, state=state, live=live, saved=not live and migrated_to is None
                and inst.saved_state_path.exists(),
                degraded=status.degraded, accel=status.accel, started_at=status.started_at, reason=reason,
                cpus=config.cpus, memory=memory, addresses=addresses)


def _broken(name: str, exc: Exception) -> Row:
    reason = exc.message if isinstance(exc, VmkitError) else str(exc)
    return Row(name=name, state=BROKEN, health="ok", cpus=None, memory=None, accel=None, uptime=None,
               reason=" ".join(reason.split()), addresses={})


def rows() -> list[Row]:
    """Every instance of the current home, by name; one whose files cannot be used is ``broken``
    (the reason names the file), never an error that hides the others."""
    base = paths.instances_dir()
    try:
        entries = sorted(os.scandir(base), key=lambda e: e.name)
    except FileNotFoundError:
        return []
    cache = _Cache(base)
    out: list[Row] = []
    names: set[str] = set()
    for entry in entries:
        if entry.name.startswith(".") or not entry.is_dir():
            continue
        d = Path(entry.path)
        try:
            config_key = _stat_key(d / "vm.yaml")
        except OSError:
            continue  # no vm.yaml: not an instance (a directory being made or removed)
        names.add(entry.name)
        row = _quick(d, config_key, cache)
        if row is None:
            row = _slow(entry.name, base, cache)
        if row is not None:
            out.append(row)
    cache.save(names)
    return out


def _slow(name: str, base: Path, cache: _Cache) -> Row | None:
    from vmkit.host.instance import Instance

    try:
        inst = Instance(name, base)
    except VmkitError:
        return None  # not a name vmkit would make: not an instance (as Instance.all skips it)
    try:
        return _full(inst, cache)
    except (VmkitError, OSError) as exc:
        return _broken(name, exc)


def list_instances() -> list[InstanceRow]:
    """:func:`rows` as the typed models of the API."""
    from vmkit.api.models import InstanceRow

    return [InstanceRow.model_validate(r) for r in rows()]


def view(inst: Instance) -> InstanceRow:
    """One instance as ``vmkit list`` shows it (raises if its files cannot be used)."""
    from vmkit.api.models import InstanceRow

    return InstanceRow.model_validate(_full(inst))


def inspect(name: str) -> dict[str, Any]:
    """``vmkit inspect``: the configuration and the runtime status of ``name``."""
    from vmkit.host.instance import Instance

    inst = Instance(name).require()
    status = inst.reconcile()
    config = inst.load_config()
    return {
        "name": name,
        "directory": str(inst.dir),
        "config": config.to_dict(),
        "addresses": {n.network: n.address for n in config.networks if n.address},
        "runtime": {**status.to_dict(), "supervised": inst.is_supervised()},
    }
