"""Unit tests: the configuration model (structure, meaning, host checks, YAML/JSON round trips)."""

from __future__ import annotations

import os
import socket
from pathlib import Path
from typing import Any

import pytest
from pydantic import ValidationError

from vmkit.config import (
    DiskImage,
    MachineConfig,
    PortForward,
    config_from_yaml,
    format_size,
    json_schema,
    load_config,
    parse_config,
    parse_size,
    port_is_free,
)
from vmkit.errors import ConfigError, ExitCode, Problem
from vmkit.host.provision import free_port


@pytest.fixture
def kernel(tmp_path: Path) -> Path:
    k = tmp_path / "vmlinuz"
    k.write_bytes(b"not really a kernel")
    return k


def base(kernel: Path | str = "/boot/vmlinuz", **overrides: Any) -> dict[str, Any]:
    data: dict[str, Any] = {"name": "vm1", "boot": {"kernel": str(kernel)}}
    data.update(overrides)
    return data


def problems_of(data: object) -> list[Problem]:
    with pytest.raises(ConfigError) as info:
        parse_config(data)
    assert info.value.exit_code == ExitCode.BAD_INPUT
    return list(info.value.problems)


def disk(path: Path | str, **att: Any) -> dict[str, Any]:
    return {"attachment": {"type": "disk-image", "path": str(path), **att}}


# --------------------------------------------------------------------------- structure


@pytest.mark.parametrize(
    ("overrides", "field", "fragments"),
    [
        ({"memory": "lots"}, "memory", ["not a size", "512M"]),
        ({"memory": True}, "memory", ["not a boolean"]),
        ({"memory": "16M"}, "memory", ["too little memory", "at least 32M"]),
        ({"memory": 600_000_001}, "memory", ["not a whole number of MiB", "512M"]),
        ({"memory": "1.1G"}, "memory", ["not a whole number of bytes"]),
        ({"cpus": 0}, "cpus", ["greater than or equal to 1"]),
        ({"cpus": 65}, "cpus", ["less than or equal to 64"]),
        ({"cpus": "many"}, "cpus", ["integer"]),
        ({"bogus": 1}, "bogus", ["unknown setting", "vmkit schema"]),
        ({"boot": {"kernel": "/k", "kernal_args": "x"}}, "boot.kernal_args", ["unknown setting"]),
        ({"boot": {}}, "boot.kernel", ["required"]),
        ({"accel": "hvf"}, "accel", ["auto", "kvm", "tcg"]),
        ({"name": "a/b"}, "name", ["not a valid name", "no '/'"]),
        ({"network": {"mac": "zz:zz"}}, "network.mac", ["not a MAC address", "52:54:00:12:34:56"]),
        ({"network": {"mac": "52:54:00:12:34"}}, "network.mac", ["not a MAC address"]),
        ({"network": {"mac": "01:00:5e:00:00:01"}}, "network.mac", ["multicast", "first byte must be even"]),
        ({"network": {"forwards": [{"host_port": 0, "guest_port": 80}]}},
         "network.forwards[0].host_port", ["greater than or equal to 1"]),
        ({"network": {"forwards": [{"host_port": 8080, "guest_port": 70000}]}},
         "network.forwards[0].guest_port", ["less than or equal to 65535"]),
        ({"network": {"forwards": [{"host_addr": "localhost,x=y", "host_port": 8080, "guest_port": 80}]}},
         "network.forwards[0].host_addr", ["not an IPv4 address", "127.0.0.1"]),
        ({"storage": [disk("/d.img", format="vmdk")]}, "storage[0].attachment.format", ["raw", "qcow2"]),
        ({"storage": [disk("/d.img", cache="sometimes")]}, "storage[0].attachment.cache", ["writeback"]),
        ({"readiness": {"timeout": 0}}, "readiness.timeout", ["greater than 0"]),
        ({"storage": [{"attachment": {"path": "/d.img"}}]}, "storage[0].attachment", ["type: disk-image"]),
        ({"storage": [{"attachment": {"type": "floppy", "path": "/d.img"}}]}, "storage[0].attachment",
         ["'disk-image'"]),
    ],
)
def test_each_bad_input_names_its_field_and_what_to_do(overrides: dict[str, Any], field: str,
                                                         fragments: list[str]) -> None:
    problems = problems_of(base(**overrides))
    assert [p.field for p in problems] == [field]
    for fragment in fragments:
        assert fragment in problems[0].message
    # the error's text (what the CLI prints) carries the field path too
    with pytest.raises(ConfigError, match=r"\b" + field.replace("[", r"\[").replace("]", r"\]")):
        parse_config(base(**overrides))


def test_several_structural_problems_are_reported_together() -> None:
    problems = problems_of(base(memory="lots", cpus=0, bogus=True, network={"mac": "nope"}))
    assert {p.field for p in problems} == {"memory", "cpus", "bogus", "network.mac"}


def test_config_error_message_counts_and_lists_every_problem() -> None:
    err = ConfigError([Problem("memory", "bad"), Problem("cpus", "worse")])
    text = str(err)
    assert "2 problems" in text
    assert "  - memory: bad" in text and "  - cpus: worse" in text
    assert "1 problem)" in str(ConfigError.single("x", "y"))


def test_top_level_must_be_a_mapping() -> None:
    assert [p.field for p in problems_of(["a", "list"])] == ["<root>"]


def test_memory_accepts_human_sizes_and_the_yaml_shows_them() -> None:
    cfg = parse_config(base(memory="2G"))
    assert cfg.memory == 2 << 30
    assert "memory: 2G" in cfg.to_yaml()


def test_disk_format_is_inferred_from_the_file_name() -> None:
    assert DiskImage(path=Path("/d/disk.qcow2")).format == "qcow2"
    assert DiskImage(path=Path("/d/disk.img")).format == "raw"
    assert DiskImage.model_validate({"path": "/d/disk.qcow2", "format": "raw"}).format == "raw"


# --------------------------------------------------------------------------- port forward specs


@pytest.mark.parametrize(
    ("spec", "expected"),
    [
        ("8080:80", ("tcp", "127.0.0.1", 8080, 80)),
        ("0.0.0.0:2222:22", ("tcp", "0.0.0.0", 2222, 22)),
        ("5353:53/udp", ("udp", "127.0.0.1", 5353, 53)),
    ],
)
def test_port_forward_specs_parse(spec: str, expected: tuple[str, str, int, int]) -> None:
    fwd = PortForward.parse(spec)
    assert (fwd.protocol, fwd.host_addr, fwd.host_port, fwd.guest_port) == expected


@pytest.mark.parametrize(
    ("spec", "fragment"),
    [
        ("8080", "HOST:GUEST"),
        ("1:2:3:4", "HOST:GUEST"),
        ("http:80", "HOST:GUEST"),
        ("70000:80", "65535"),
        ("0:80", "greater than or equal to 1"),
        ("8080:80/sctp", "'tcp' or 'udp'"),
        ("example.com:8080:80", "not an IPv4 address"),
    ],
)
def test_bad_port_forward_specs_say_what_to_use(spec: str, fragment: str) -> None:
    with pytest.raises(ValueError) as info:
        PortForward.parse(spec)
    assert repr(spec) in str(info.value)
    assert fragment in str(info.value)


# --------------------------------------------------------------------------- meaning and host checks


def only(problems: list[Problem]) -> Problem:
    assert len(problems) == 1, problems
    return problems[0]


def test_a_valid_config_has_no_problems(kernel: Path, tmp_path: Path) -> None:
    img = tmp_path / "disk.img"
    img.write_bytes(b"\0" * 512)
    cfg = parse_config(base(kernel, storage=[disk(img)],
                            network={"forwards": [{"host_port": free_port(), "guest_port": 22}]}))
    assert cfg.validate() == []
    assert cfg.ensure_valid() is cfg


def test_missing_kernel_file(tmp_path: Path) -> None:
    p = only(parse_config(base(tmp_path / "nope")).validate())
    assert p.field == "boot.kernel"
    assert str(tmp_path / "nope") in p.message and "does not exist" in p.message and "check the path" in p.message


def test_missing_initrd_file(kernel: Path, tmp_path: Path) -> None:
    p = only(parse_config(base(kernel, boot={"kernel": str(kernel), "initrd": str(tmp_path / "no.img")})).validate())
    assert p.field == "boot.initrd" and "does not exist" in p.message


def test_missing_disk_file(kernel: Path, tmp_path: Path) -> None:
    p = only(parse_config(base(kernel, storage=[disk(tmp_path / "gone.img")])).validate())
    assert p.field == "storage[0].attachment.path"
    assert "gone.img does not exist" in p.message


def test_disk_that_is_a_directory(kernel: Path, tmp_path: Path) -> None:
    p = only(parse_config(base(kernel, storage=[disk(tmp_path)])).validate())
    assert p.field == "storage[0].attachment.path" and "not a regular file" in p.message


def test_two_devices_on_one_file(kernel: Path, tmp_path: Path) -> None:
    img = tmp_path / "disk.img"
    img.write_bytes(b"\0" * 512)
    # the same file under two spellings is still the same file
    cfg = parse_config(base(kernel, storage=[disk(img), disk(tmp_path / "." / "disk.img", read_only=True)]))
    p = only(cfg.validate())
    assert p.field == "storage[1].attachment.path"
    assert "already used by storage[0]" in p.message and "one device only" in p.message


def test_relative_disk_path(kernel: Path) -> None:
    cfg = parse_config(base(kernel, storage=[disk("relative/disk.img")]))
    problems = cfg.validate(host=False)
    assert only(problems).field == "storage[0].attachment.path"
    assert "relative" in problems[0].message and "absolute path" in problems[0].message


def test_duplicate_host_port(kernel: Path) -> None:
    port = free_port()
    cfg = parse_config(base(kernel, network={"forwards": [{"host_port": port, "guest_port": 22},
                                                          {"host_port": port, "guest_port": 80}]}))
    p = only(cfg.validate())
    assert p.field == "network.forwards[1]"
    assert f"host port {port}/tcp is already forwarded by network.forwards[0]" in p.message
    assert "pick another host port" in p.message


def test_same_port_number_for_tcp_and_udp_is_fine(kernel: Path) -> None:
    port = free_port()
    cfg = parse_config(base(kernel, network={"forwards": [{"host_port": port, "guest_port": 53},
                                                          {"host_port": port, "guest_port": 53,
                                                           "protocol": "udp"}]}))
    assert cfg.validate(host=False) == []


def test_host_port_already_taken(kernel: Path) -> None:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        s.listen()
        port = s.getsockname()[1]
        assert not port_is_free("127.0.0.1", port)
        cfg = parse_config(base(kernel, network={"forwards": [{"host_port": port, "guest_port": 22}]}))
        p = only(cfg.validate())
        assert p.field == "network.forwards[0]"
        assert f"127.0.0.1:{port}/tcp is already taken" in p.message and "pick a free port" in p.message
        assert cfg.validate(host=False) == []  # the host check is what found it
    assert port_is_free("127.0.0.1", port)


def test_udp_port_already_taken() -> None:
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
        assert not port_is_free("127.0.0.1", port, "udp")


def test_read_only_disk_needs_only_read_permission(kernel: Path, tmp_path: Path) -> None:
    if os.geteuid() == 0:
        pytest.skip("root can open any file read-write")
    img = tmp_path / "ro.img"
    img.write_bytes(b"\0")
    img.chmod(0o444)
    assert parse_config(base(kernel, storage=[disk(img, read_only=True)])).validate() == []
    p = only(parse_config(base(kernel, storage=[disk(img)])).validate())
    assert "cannot be opened to read and write" in p.message


def test_host_false_skips_file_and_port_checks(tmp_path: Path) -> None:
    cfg = parse_config(base(tmp_path / "nope", storage=[disk(tmp_path / "gone.img")]))
    assert cfg.validate(host=False) == []
    assert len(cfg.validate(host=True)) == 2


def test_every_problem_is_reported_in_one_error(tmp_path: Path) -> None:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        s.listen()
        taken = s.getsockname()[1]
        img = tmp_path / "disk.img"
        img.write_bytes(b"\0")
        cfg = parse_config(base(
            tmp_path / "no-kernel",
            storage=[disk(img), disk(img), disk("rel.img"), disk(tmp_path / "missing.img")],
            network={"forwards": [{"host_port": taken, "guest_port": 22},
                                  {"host_port": taken, "guest_port": 23}]},
        ))
        with pytest.raises(ConfigError) as info:
            cfg.ensure_valid()
    fields = [p.field for p in info.value.problems]
    assert "boot.kernel" in fields
    assert "storage[1].attachment.path" in fields  # used twice
    assert fields.count("storage[2].attachment.path") == 2  # relative, and not there
    assert "storage[3].attachment.path" in fields
    assert "network.forwards[0]" in fields  # taken on the host
    assert "network.forwards[1]" in fields  # duplicate
    assert f"({len(fields)} problems)" in str(info.value)
    assert info.value.exit_code == ExitCode.BAD_INPUT


# --------------------------------------------------------------------------- sizes


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("512M", 512 << 20),
        ("512m", 512 << 20),
        ("2G", 2 << 30),
        ("1.5G", 3 << 29),
        ("4096", 4096),
        (4096, 4096),
        ("64K", 64 << 10),
        ("1T", 1 << 40),
        ("512MiB", 512 << 20),
        ("2GB", 2 << 30),
        (" 8 M ", 8 << 20),
        ("0", 0),
    ],
)
def test_parse_size(text: object, expected: int) -> None:
    assert parse_size(text) == expected


@pytest.mark.parametrize("bad", ["", "lots", "12X", "-1G", "1,5G", "G", True, -1, None, 1.5])
def test_parse_size_rejects(bad: object) -> None:
    with pytest.raises(ValueError, match="size"):
        parse_size(bad)


@pytest.mark.parametrize(
    ("n", "text"),
    [(512 << 20, "512M"), (2 << 30, "2G"), (1536 << 20, "1536M"), (1 << 40, "1T"), (1024, "1K"),
     (1000, "1000"), (0, "0"), (1, "1")],
)
def test_format_size(n: int, text: str) -> None:
    assert format_size(n) == text
    assert parse_size(text) == n


# --------------------------------------------------------------------------- round trips and schema


def full_config(tmp_path: Path) -> MachineConfig:
    return parse_config({
        "name": "full-vm",
        "cpus": 4,
        "memory": "1536M",
        "accel": "tcg",
        "machine": "q35",
        "cpu_model": "max",
        "boot": {"kernel": str(tmp_path / "vmlinuz"), "initrd": str(tmp_path / "initrd.img"),
                 "cmdline": "console=ttyS0 quiet"},
        "storage": [
            {"attachment": {"type": "disk-image", "path": str(tmp_path / "root.qcow2"), "cache": "none"},
             "serial": "root"},
            {"attachment": {"type": "disk-image", "path": str(tmp_path / "data.img"), "read_only": True}},
        ],
        "network": {"mac": "52:54:00:AB:CD:EF",
                    "forwards": [{"host_port": 2222, "guest_port": 22},
                                 {"protocol": "udp", "host_addr": "0.0.0.0", "host_port": 5353, "guest_port": 53}]},
        "serial": {"log": True, "console": False},
        "entropy": False,
        "readiness": {"serial_marker": "READY", "timeout": 30},
        "image": "micro",
    })


def test_yaml_round_trip_is_equal(tmp_path: Path) -> None:
    cfg = full_config(tmp_path)
    text = cfg.to_yaml()
    assert config_from_yaml(text) == cfg
    assert "memory: 1536M" in text
    assert cfg.network is not None and cfg.network.mac == "52:54:00:ab:cd:ef"  # normalised to lower case
    assert cfg.storage[0].attachment.format == "qcow2"


def test_minimal_yaml_round_trip_keeps_defaults(tmp_path: Path) -> None:
    cfg = parse_config(base())
    again = config_from_yaml(cfg.to_yaml())
    assert again == cfg
    assert (again.cpus, again.memory, again.accel.value, again.entropy) == (1, 512 << 20, "auto", True)


def test_save_and_load_config(tmp_path: Path) -> None:
    cfg = full_config(tmp_path)
    path = tmp_path / "vm.yaml"
    cfg.save(path)
    assert load_config(path) == cfg
    assert (path.stat().st_mode & 0o777) == 0o600
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".vm.yaml")]  # no temp file left


def test_load_config_reports_the_file_and_the_field(tmp_path: Path) -> None:
    missing = tmp_path / "absent.yaml"
    with pytest.raises(ConfigError) as info:
        load_config(missing)
    assert info.value.problems[0].field == str(missing) and "not found" in info.value.problems[0].message

    broken = tmp_path / "broken.yaml"
    broken.write_text("name: [unclosed\n")
    with pytest.raises(ConfigError, match="not valid YAML"):
        load_config(broken)

    bad = tmp_path / "bad.yaml"
    bad.write_text("name: vm1\nboot: {kernel: /k}\nmemory: lots\n")
    with pytest.raises(ConfigError) as info:
        load_config(bad)
    assert str(bad) in str(info.value)
    assert [p.field for p in info.value.problems] == ["memory"]


def test_config_from_yaml_rejects_garbage() -> None:
    with pytest.raises(ConfigError, match="not valid YAML"):
        config_from_yaml("a: b: c: [")
    with pytest.raises(ConfigError, match="expected a mapping"):
        config_from_yaml("- just\n- a list\n")


def test_json_schema_has_the_top_level_properties() -> None:
    schema = json_schema()
    assert schema["type"] == "object"
    props = set(schema["properties"])
    assert {"name", "cpus", "memory", "arch", "accel", "machine", "cpu_model", "boot", "storage", "network",
            "serial", "entropy", "readiness", "image"} <= props
    assert set(schema["required"]) == {"name", "boot"}
    assert schema.get("additionalProperties") is False


# --------------------------------------------------------------------------- frozen


def test_configs_are_frozen(tmp_path: Path) -> None:
    cfg = full_config(tmp_path)
    with pytest.raises(ValidationError):
        cfg.cpus = 8  # type: ignore[misc]
    with pytest.raises(ValidationError):
        cfg.boot.cmdline = "init=/bin/sh"  # type: ignore[misc]
    assert cfg.network is not None
    with pytest.raises(ValidationError):
        cfg.network.forwards[0].host_port = 1  # type: ignore[misc]
    assert isinstance(cfg.storage, tuple)
    changed = cfg.model_copy(update={"cpus": 8})
    assert (changed.cpus, cfg.cpus) == (8, 4)
