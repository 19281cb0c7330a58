"""Unit tests: the vCPU ceiling and the virtio-mem region in vm.yaml, and the checks `vmkit set --cpus/--memory`
makes before asking QEMU (each refusal names the field and says what to do)."""

from __future__ import annotations

from typing import Any

import pytest

from vmkit.api import models
from vmkit.config import MachineConfig, default_max_cpus, parse_config
from vmkit.errors import ConfigError
from vmkit.runtime.hotmem import check_memory
from vmkit.runtime.qemu.accel import AccelChoice
from vmkit.runtime.vcpus import check_cpus, unplug_refusal
from vmkit.state.savestate import machine_fields

MiB = 1 << 20


def config(**overrides: Any) -> MachineConfig:
    return parse_config({"name": "vm", "boot": {"kernel": "/k"}, **overrides})


def problem(exc: pytest.ExceptionInfo[ConfigError]) -> tuple[str, str]:
    p = exc.value.problems[0]
    return p.field, p.message


@pytest.mark.parametrize(("cpus", "ceiling"), [(1, 4), (2, 4), (3, 6), (8, 16), (32, 64), (64, 64)])
def test_default_ceiling_doubles_within_bounds(cpus: int, ceiling: int) -> None:
    assert default_max_cpus(cpus) == ceiling == config(cpus=cpus).cpu_ceiling


def test_explicit_ceiling_wins_and_cannot_be_below_cpus() -> None:
    assert config(cpus=2, max_cpus=2).cpu_ceiling == 2
    with pytest.raises(ConfigError) as exc:
        config(cpus=4, max_cpus=3)
    assert problem(exc) == ("max_cpus", "3 is less than cpus (4): give at least 4, or leave it out")
    with pytest.raises(ConfigError) as exc:
        config(max_cpus=65)
    assert problem(exc)[0] == "max_cpus"


def test_memory_region_sizes() -> None:
    c = config(memory="1G", max_memory="3G", plugged_memory="512M")
    assert (c.hotplug_memory, c.total_memory) == (2048 * MiB, 1536 * MiB)
    assert config().hotplug_memory == 0 and config().max_memory is None
    for extra, field, words in (
            ({"max_memory": "512M"}, "max_memory", "not more than memory"),
            ({"max_memory": "600M"}, "max_memory", "use e.g. 640M"),
            ({"plugged_memory": "64M"}, "plugged_memory", "set max_memory"),
            ({"max_memory": "1G", "plugged_memory": "3M"}, "plugged_memory", "2M"),
            ({"max_memory": "1G", "plugged_memory": "1G"}, "plugged_memory", "more than max_memory")):
        with pytest.raises(ConfigError) as exc:
            config(**extra)
        assert problem(exc)[0] == field and words in problem(exc)[1], problem(exc)


def test_round_trip_keeps_the_new_fields() -> None:
    c = config(cpus=2, max_cpus=5, memory="1G", max_memory="2G", plugged_memory="256M")
    again = parse_config(c.to_dict())
    assert again == c and c.to_dict()["max_memory"] == "2G" and c.to_dict()["plugged_memory"] == "256M"


def test_check_cpus_refusals_name_the_field() -> None:
    c = config(cpus=2, max_cpus=3)
    assert check_cpus(c, 3) == 3 and check_cpus(c, 1) == 1
    with pytest.raises(ConfigError) as exc:
        check_cpus(c, 4, field="--cpus")
    field, message = problem(exc)
    assert field == "--cpus" and "max_cpus: 3" in message and "raise max_cpus" in message
    with pytest.raises(ConfigError) as exc:
        check_cpus(c, 0, field="--cpus")
    assert problem(exc) == ("--cpus", "0 vCPUs: a machine needs at least 1")
    with pytest.raises(ConfigError) as exc:
        check_cpus(config(cpus=64), 65)
    assert "vmkit's limit" in problem(exc)[1]


def test_check_memory_refusals_name_the_field() -> None:
    c = config(memory="1G", max_memory="2G")
    assert check_memory(c, 1536 * MiB) == 512 * MiB and check_memory(c, 1024 * MiB) == 0
    cases = ((config(), 1024 * MiB, "no memory hot-plug region"), (c, 512 * MiB, "less than the memory"),
             (c, 4096 * MiB, "more than vm's max_memory (2G)"), (c, 1025 * MiB, "2M blocks"))
    for cfg, size, words in cases:
        with pytest.raises(ConfigError) as exc:
            check_memory(cfg, size, field="--memory")
        assert problem(exc)[0] == "--memory" and words in problem(exc)[1], problem(exc)


def test_saved_state_fields_cover_the_ceiling_and_region_not_what_is_plugged() -> None:
    tcg = AccelChoice("tcg", "test")
    a = machine_fields(config(max_memory="1G", plugged_memory="128M"), tcg)
    b = machine_fields(config(max_memory="1G", plugged_memory="256M"), tcg)
    assert a == b and a["max_cpus"] == 4 and a["max_memory"] == "1G"
    assert machine_fields(config(max_cpus=6), tcg)["max_cpus"] == 6


def test_api_requests_take_numbers_only() -> None:
    assert models.CpusRequest.model_validate({"cpus": 2}).timeout == 30.0
    for bad in ({"cpus": "2"}, {"cpus": 0}, {"cpus": True}, {"cpus": 2, "extra": 1}):
        with pytest.raises(ValueError):
            models.CpusRequest.model_validate(bad)
    for bad in ({"memory": "1G"}, {"memory": 0}, {"memory": 1 << 30, "timeout": -1}):
        with pytest.raises(ValueError):
            models.MemoryRequest.model_validate(bad)


def test_memory_changes_respect_the_cgroup_limits() -> None:
    """Shrinking under the reservation and growing past the hard limit are refused, naming the option;
    a limit is checked against the memory the guest has now (boot + plugged), not the boot size alone."""
    c = config(memory="1G", max_memory="3G", limits={"memory_min": "1536M", "memory_max": "2G"})
    assert check_memory(c, 1536 * MiB) == 512 * MiB
    for size, words in ((1024 * MiB + 512 * MiB - 2 * MiB, "below vm's memory reservation"),
                        (2048 * MiB, "does not fit vm's limits")):
        with pytest.raises(ConfigError) as exc:
            check_memory(c, size, field="--memory")
        assert problem(exc)[0] == "--memory" and words in problem(exc)[1], problem(exc)
    big = config(memory="1G", max_memory="3G", plugged_memory="1G", limits={"memory_max": "2G"})
    assert [p.field for p in big.validate(host=False)] == ["limits.memory_max"]  # 1G + 1G plugged + QEMU > 2G


def test_vcpu_removal_is_refused_under_tcg_naming_the_qemu() -> None:
    """QEMU 7.2 under TCG crashes after a vCPU removal (docs/notes/tcg-vcpu-unplug.md); KVM does not.
    The refusal names the QEMU version and what it would do."""
    why = unplug_refusal("tcg", (7, 2, 22))
    assert why is not None and "QEMU 7.2.22" in why and "crashes" in why
    assert unplug_refusal("tcg", None) is not None  # unknown version: refused too
    assert unplug_refusal("kvm", (7, 2, 22)) is None
