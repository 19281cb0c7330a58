"""Automatic ballooning: the policy that shares the host's memory among running guests.

Pure: :func:`decide` takes the host's memory figures and what each guest reports (its memory, where
its balloon stands, its MemAvailable, its ``balloon_min`` and ``balloon_shares``) and returns new
balloon targets. :mod:`vmkit.backends.local.balloonctl` runs it every few seconds against the real
machines (``vmkit host autoballoon on``).

The policy follows Proxmox VE's auto-ballooning (``PVE/AutoBalloon.pm``, run by ``pvestatd``) and
oVirt MoM's balloon rules:

- The host should use :attr:`Policy.target` (80 %) of its memory. ``goal`` is how far it is from
  that: ``target * total - used``, with ``used = MemTotal - MemAvailable``. Within
  :attr:`Policy.deadband` of the goal nothing changes (no jitter around the target).
- Above it (a negative goal) balloons shrink, guests with room first (MemAvailable at least
  :attr:`Policy.pressure` of their usable memory); below it (a positive goal) balloons grow, guests
  under pressure first. Only when those can take nothing does the round move the others.
- The memory above each guest's floor (``balloon_min``; default half its memory) is shared in
  proportion to ``balloon_shares`` (Proxmox's "shares", default 1000): a guest with twice the shares
  keeps twice as much above its floor when memory is short.
- No guest moves more than :attr:`Policy.step` (100 MiB) per round, never below its floor and never
  above its boot memory; the changes of one round add up to at most the goal, so the host does not
  overshoot and the targets settle instead of swinging back and forth.
"""

from __future__ import annotations

import re
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from vmkit.errors import HostError

MiB = 1 << 20


@dataclass(frozen=True)
class HostMemory:
    """The host's memory: ``total`` (MemTotal) and ``available`` (MemAvailable), in bytes."""

    total: int
    available: int

    @property
    def used(self) -> int:
        return self.total - self.available


def read_meminfo(path: Path = Path("/proc/meminfo")) -> HostMemory:
    """The host's memory from ``/proc/meminfo`` (or a file in its format: a simulated host)."""
    try:
        text = path.read_text()
    except OSError as exc:
        raise HostError(f"cannot read the host's memory figures from {path}: {exc.strerror}") from None
    fields = {m.group(1): int(m.group(2)) << 10 for m in re.finditer(r"^(\w+):\s+(\d+) kB$", text, re.MULTILINE)}
    if "MemTotal" not in fields or "MemAvailable" not in fields:
        raise HostError(f"{path} has no MemTotal and MemAvailable lines (as /proc/meminfo has)")
    return HostMemory(total=fields["MemTotal"], available=min(fields["MemAvailable"], fields["MemTotal"]))


@dataclass(frozen=True)
class Guest:
    """One running machine as the policy sees it (sizes in bytes)."""

    name: str
    memory: int
    """Boot memory: the most the balloon can give the guest."""
    actual: int
    """The guest's usable memory now (the balloon's actual size)."""
    available: int | None
    """MemAvailable as the guest's balloon driver last reported it (None: not reported)."""
    floor: int
    """``balloon_min``: the least usable memory the policy leaves it."""
    shares: int = 1000

    def under_pressure(self, policy: Policy) -> bool:
        """Short of memory: MemAvailable below ``policy.pressure`` of its usable memory, not reported, or
        the balloon already below the floor."""
        if self.available is None or self.actual < self.floor:
            return True
        return self.available < policy.pressure * self.actual


@dataclass(frozen=True)
class Policy:
    target: float = 0.80
    """The share of the host's memory the guests may bring it to."""
    step: int = 100 * MiB
    """The most one guest's balloon moves per round."""
    deadband: int = 32 * MiB
    """No change while the host is within this many bytes of its target."""
    pressure: float = 0.20
    """A guest whose MemAvailable is below this share of its usable memory is under pressure."""

    def __post_init__(self) -> None:
        if not 0.05 <= self.target <= 0.99:
            raise ValueError(f"target {self.target} is out of range: give 0.05 to 0.99")
        if self.step < MiB:
            raise ValueError("step must be at least 1 MiB")
        if self.deadband < 0 or not 0 <= self.pressure < 1:
            raise ValueError("deadband must be >= 0 and pressure in [0, 1)")


@dataclass(frozen=True)
class Change:
    name: str
    actual: int
    target: int
    pressure: bool

    @property
    def delta(self) -> int:
        return self.target - self.actual


@dataclass(frozen=True)
class Decision:
    """One round: how far the host is from its target (``goal``: positive = room to give guests,
    negative = memory to take back), and the balloons to move."""

    host: HostMemory
    goal: int
    action: str
    """``grow``, ``shrink`` or ``none``."""
    changes: tuple[Change, ...] = field(default_factory=tuple)

    @property
    def targets(self) -> dict[str, int]:
        return {c.name: c.target for c in self.changes}

    def to_dict(self) -> dict[str, Any]:
        return {"host_total_bytes": self.host.total, "host_used_bytes": self.host.used, "goal_bytes": self.goal,
                "action": self.action, "changes": [asdict(c) for c in self.changes]}


def _distribute(targets: dict[str, int], guests: list[Guest], amount: int, step: int) -> int:
    """Move the balloons of ``guests`` by ``amount`` bytes in total (positive: grow), each towards its
    share of the memory above the floors and by at most ``step`` from where it stands; records the new
    sizes in ``targets`` and returns what is left of ``amount``."""
    rest = amount
    settled: set[str] = set()
    for _ in range(len(guests) + 2):  # each pass settles at least one guest, or makes no progress
        active = [g for g in guests if g.name not in settled]
        if not active or abs(rest) < MiB:
            break
        now = {g.name: targets.get(g.name, g.actual) for g in active}
        above = sum(now[g.name] - g.floor for g in active) + rest
        shares = sum(g.shares for g in active)
        moved = 0
        for g in active:
            desired = min(g.memory, max(g.floor, g.floor + above * g.shares // shares))
            if amount > 0:  # whole MiB, rounded towards where it stands: never past a limit
                limit = min(desired, g.actual + step, now[g.name] + max(0, rest - moved))
                new = max(now[g.name], limit - limit % MiB)
            else:
                limit = max(desired, g.actual - step, now[g.name] + min(0, rest - moved))
                new = min(now[g.name], limit + (-limit) % MiB)
            if new == now[g.name]:
                settled.add(g.name)
                continue
            targets[g.name] = new
            moved += new - now[g.name]
        if moved == 0:
            break
        rest -= moved
    return rest


def decide(host: HostMemory, guests: list[Guest], policy: Policy = Policy()) -> Decision:
    """The balloon targets that bring the host towards ``policy.target``; see the module's description."""
    goal = int(host.total * policy.target) - host.used
    managed = [g for g in guests if g.shares > 0]
    if abs(goal) <= policy.deadband or not managed:
        return Decision(host, goal, "none")
    targets: dict[str, int] = {}
    if goal > 0:
        action = "grow"
        first = [g for g in managed if g.under_pressure(policy)]
    else:
        action = "shrink"
        first = [g for g in managed if not g.under_pressure(policy)]
    if not first or _distribute(targets, first, goal, policy.step) == goal:
        _distribute(targets, managed, goal, policy.step)  # those first could take nothing: every guest
    by_name = {g.name: g for g in managed}
    changes = tuple(Change(name, by_name[name].actual, target, by_name[name].under_pressure(policy))
                    for name, target in sorted(targets.items()) if target != by_name[name].actual)
    return Decision(host, goal, action if changes else "none", changes)
