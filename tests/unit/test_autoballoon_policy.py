"""The automatic ballooning policy against a model of a host with N guests.

The model: the host has ``total`` bytes and other programs use ``other``; each guest has its boot
memory, a balloon (its usable memory, which moves to the policy's target by the next round), a
workload that wants ``demand`` bytes and a page cache of ``cache`` bytes that it drops when the
balloon needs the room. Its QEMU's resident memory is ``min(demand + cache, usable)`` (with free
page reporting the rest goes back to the host) plus a fixed overhead; its MemAvailable is what the
workload leaves of its usable memory (the cache counts as available, as in Linux). Workloads
allocate and free over time; the policy runs once per round on what the model reports, as the
controller does every few seconds.
"""

from __future__ import annotations

import itertools
from dataclasses import dataclass
from pathlib import Path

import pytest

from vmkit.errors import HostError
from vmkit.host.autoballoon import Decision, Guest, HostMemory, Policy, decide, read_meminfo

MiB = 1 << 20
GiB = 1 << 30
OVERHEAD = 40 * MiB
POLICY = Policy()


@dataclass
class SimGuest:
    name: str
    memory: int
    demand: int
    floor: int
    shares: int = 1000
    usable: int = 0
    cache: int = 0

    def __post_init__(self) -> None:
        self.usable = self.usable or self.memory

    @property
    def rss(self) -> int:
        return min(self.demand + self.cache, self.usable) + OVERHEAD

    def view(self) -> Guest:
        available = self.usable - min(self.demand, self.usable)
        return Guest(self.name, self.memory, self.usable, available, self.floor, self.shares)


@dataclass
class Host:
    total: int
    other: int
    guests: list[SimGuest]

    @property
    def used(self) -> int:
        return self.other + sum(g.rss for g in self.guests)

    def memory(self) -> HostMemory:
        return HostMemory(self.total, self.total - self.used)

    def round(self, policy: Policy = POLICY) -> Decision:
        decision = decide(self.memory(), [g.view() for g in self.guests], policy)
        by_name = {g.name: g for g in self.guests}
        for change in decision.changes:
            g = by_name[change.name]
            assert abs(change.delta) <= policy.step, f"{g.name} moved {change.delta / MiB:.0f} MiB in one round"
            assert g.floor <= change.target <= g.memory, f"{g.name}: target {change.target / MiB:.0f} MiB"
            g.usable = change.target
        return decision

    def run(self, rounds: int) -> list[Decision]:
        return [self.round() for _ in range(rounds)]


def guests(n: int, memory: int, demand: int, floor: int) -> list[SimGuest]:
    return [SimGuest(f"g{i}", memory, demand, floor) for i in range(n)]


def target(host: Host) -> int:
    return int(host.total * POLICY.target)


def test_shrinks_towards_80_percent_and_settles() -> None:
    """Four 4 GiB guests whose workloads want 3 GiB each on a 12 GiB host: far above 80 %; the
    balloons take memory back until the host is at its target, then stay put."""
    host = Host(12 * GiB, 1 * GiB, guests(4, 4 * GiB, 3 * GiB, 1 * GiB))
    assert host.used > target(host)
    decisions = host.run(60)
    assert abs(host.used - target(host)) <= POLICY.deadband + 4 * MiB, host.used / MiB
    assert all(d.action in ("shrink", "none") for d in decisions)
    assert [d.action for d in decisions[-20:]] == ["none"] * 20, "it goes on moving balloons after it settled"
    sizes = {g.usable for g in host.guests}
    assert max(sizes) - min(sizes) <= 2 * MiB, "identical guests should end with the same usable memory"


def test_grows_back_when_memory_comes_free_and_never_overshoots() -> None:
    host = Host(8 * GiB, 4 * GiB, guests(3, 2 * GiB, 1536 * MiB, 512 * MiB))
    host.run(60)
    squeezed = [g.usable for g in host.guests]
    assert all(u < 2 * GiB for u in squeezed)
    assert abs(host.used - target(host)) <= POLICY.deadband + 4 * MiB
    host.other = 1 * GiB  # another program ended: the guests get their memory back
    decisions = host.run(60)
    assert all(g.usable == 2 * GiB for g in host.guests)
    assert all(d.action in ("grow", "none") for d in decisions)
    assert host.used <= target(host)


def test_never_below_balloon_min() -> None:
    """Whatever the host needs, no balloon goes below its floor (a host that cannot reach its target
    leaves every guest at its floor)."""
    a, b = SimGuest("a", 2 * GiB, 2 * GiB, 1536 * MiB), SimGuest("b", 2 * GiB, 2 * GiB, 300 * MiB)
    host = Host(8 * GiB, 7 * GiB, [a, b])
    host.run(100)
    assert [g.usable for g in host.guests] == [1536 * MiB, 300 * MiB]
    assert host.round().action == "none"


def test_shares_divide_what_is_above_the_floors() -> None:
    """Two guests that want all their memory, one with twice the shares: when memory is short, the
    memory above their floors is split 1:2."""
    a = SimGuest("a", 4 * GiB, 4 * GiB, 1 * GiB, shares=1000)
    b = SimGuest("b", 4 * GiB, 4 * GiB, 1 * GiB, shares=2000)
    host = Host(10 * GiB, 2 * GiB, [a, b])
    host.run(100)
    above_a, above_b = a.usable - a.floor, b.usable - b.floor
    assert abs(host.used - target(host)) <= POLICY.deadband + 4 * MiB
    assert abs(above_b - 2 * above_a) <= 8 * MiB, (above_a / MiB, above_b / MiB)


def test_shares_zero_leaves_a_machine_alone() -> None:
    mine = SimGuest("mine", 2 * GiB, 2 * GiB, 512 * MiB, shares=0)
    host = Host(4 * GiB, 2 * GiB, [mine, SimGuest("other", 2 * GiB, 2 * GiB, 512 * MiB)])
    host.run(40)
    assert mine.usable == 2 * GiB and host.guests[1].usable == 512 * MiB


def test_guests_under_pressure_grow_first() -> None:
    """Room for 150 MiB more: the guest short of memory gets it, the one with plenty free does not."""
    short = SimGuest("short", 2 * GiB, 4 * GiB, 512 * MiB, usable=1 * GiB)  # wants more than it has
    roomy = SimGuest("roomy", 2 * GiB, 256 * MiB, 512 * MiB, usable=1 * GiB)
    host = Host(4 * GiB, 0, [short, roomy])
    host.other = int(host.total * POLICY.target) - host.used - 150 * MiB
    first = host.round()
    assert first.action == "grow" and [c.name for c in first.changes] == ["short"]
    assert short.usable == 1 * GiB + 100 * MiB and roomy.usable == 1 * GiB  # one step
    host.run(30)
    assert abs(host.used - target(host)) <= POLICY.deadband + 4 * MiB


def test_guests_with_room_shrink_first() -> None:
    busy = SimGuest("busy", 2 * GiB, 2 * GiB, 512 * MiB)
    idle = SimGuest("idle", 2 * GiB, 300 * MiB, 512 * MiB, cache=1536 * MiB)
    host = Host(4 * GiB, 0, [busy, idle])
    host.other = target(host) - host.used + 200 * MiB  # 200 MiB over the target
    shrunk = host.round()
    assert shrunk.action == "shrink" and [c.name for c in shrunk.changes] == ["idle"]
    host.run(30)
    assert busy.usable == 2 * GiB, "the busy guest lost memory the idle one could give"


def test_pressure_rising_and_falling_without_oscillation() -> None:
    """Workloads that allocate, hold and free: the balloons follow without swinging back and forth
    (each guest's target changes direction at most once per phase)."""
    host = Host(16 * GiB, 2 * GiB, guests(5, 4 * GiB, 1 * GiB, 1 * GiB))
    phases = [(1 * GiB, 20), (3 * GiB, 60), (3500 * MiB, 40), (512 * MiB, 60)]
    for demand, rounds in phases:
        for g in host.guests:
            g.demand = demand
        history: dict[str, list[int]] = {g.name: [g.usable] for g in host.guests}
        for _ in range(rounds):
            host.round()
            for g in host.guests:
                history[g.name].append(g.usable)
        for name, sizes in history.items():
            steps = [b - a for a, b in itertools.pairwise(sizes) if b != a]
            flips = sum(1 for x, y in itertools.pairwise(steps) if (x > 0) != (y > 0))
            assert flips <= 1, f"{name} swung {flips} times at demand {demand / MiB:.0f} MiB: {steps}"
        assert host.round().action == "none", f"not settled after {rounds} rounds at {demand / MiB:.0f} MiB"
        assert host.used <= target(host) + POLICY.deadband + 4 * MiB or all(g.usable == g.floor for g in host.guests)


def test_deadband_and_no_guests() -> None:
    host = HostMemory(10 * GiB, 2 * GiB + 20 * MiB)  # 20 MiB below the target
    g = Guest("a", 1 * GiB, 512 * MiB, None, 256 * MiB)
    assert decide(host, [g]).action == "none"
    assert decide(HostMemory(10 * GiB, 1 * GiB), []).action == "none"


def test_policy_limits() -> None:
    with pytest.raises(ValueError, match="target"):
        Policy(target=1.5)
    with pytest.raises(ValueError, match="step"):
        Policy(step=4096)


def test_read_meminfo(tmp_path: Path) -> None:
    f = tmp_path / "meminfo"
    f.write_text("MemTotal:       24576000 kB\nMemFree:         1000 kB\nMemAvailable:   20000000 kB\n")
    m = read_meminfo(f)
    assert m.total == 24576000 << 10 and m.available == 20000000 << 10 and m.used == 4576000 << 10
    f.write_text("nothing\n")
    with pytest.raises(HostError, match="MemAvailable"):
        read_meminfo(f)
    with pytest.raises(HostError, match="cannot read"):
        read_meminfo(tmp_path / "missing")
    real = read_meminfo()
    assert 0 < real.available <= real.total
