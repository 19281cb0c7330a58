"""Unit tests of the `vmkit` command (exit codes, messages, JSON output, --dry-run), run in-process as
the entry point runs it (conftest.vmkit); a few run it as a real process (the entry point, exit codes
as a shell sees them, what `--help` imports).

No VM is started. Each test gets its own VMKIT_HOME; the "created" tests share one home with an
instance made by `vmkit create` (created but never started).
"""

from __future__ import annotations

import json
import os
import shlex
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest

import conftest
from vmkit.host.provision import free_port

VMKIT = Path(sys.executable).with_name("vmkit")
ENTRY = [str(VMKIT)] if VMKIT.exists() else [sys.executable, "-m", "vmkit.cli.main"]


@dataclass
class Result:
    code: int
    out: str
    err: str


def vmkit(home: Path, *args: str) -> Result:
    """``vmkit ARGS`` with VMKIT_HOME=home, in this process."""
    r = conftest.vmkit(*args, check=False, env={"VMKIT_HOME": str(home), "VMKIT_IMAGE_CACHE": None})
    return Result(r.returncode, r.stdout, r.stderr)


def vmkit_many(home: Path, *commands: list[str]) -> list[Result]:
    return [vmkit(home, *args) for args in commands]


def processes(home: Path, *commands: list[str]) -> list[Result]:
    """Run independent ``vmkit`` commands as real processes, side by side."""
    env = {**os.environ, "VMKIT_HOME": str(home), "COLUMNS": "250", "NO_COLOR": "1", "TERM": "dumb"}
    env.pop("VMKIT_IMAGE_CACHE", None)
    procs = [subprocess.Popen([*ENTRY, *args], env=env, stdin=subprocess.DEVNULL, stdout=subprocess.PIPE,
                              stderr=subprocess.PIPE, text=True) for args in commands]
    results = []
    try:
        for proc in procs:
            out, err = proc.communicate(timeout=60)
            results.append(Result(proc.returncode, out, err))
    finally:
        for proc in procs:
            if proc.poll() is None:
                proc.kill()
                proc.communicate()
    return results


def one_line(text: str) -> str:
    return " ".join(text.split())


PORT = free_port()


@pytest.fixture(scope="module")
def created(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A home with instance 'web' (created, never started)."""
    home = tmp_path_factory.mktemp("home")
    kernel = home / "vmlinuz"
    kernel.write_bytes(b"fake kernel")
    disk = home / "data.img"
    disk.write_bytes(b"\0" * 4096)
    r = vmkit(home, "create", "web", "--kernel", str(kernel), "--cmdline", "console=ttyS0 x=[a,b]",
              "--memory", "256M", "--cpus", "2", "--disk", f"{disk}:ro", "--port", f"{PORT}:22")
    assert r.code == 0, r.err
    assert "created" in r.out and "web" in r.out
    return home


# --------------------------------------------------------------------------- bad input: exit 2


def test_bad_memory_is_bad_input(tmp_path: Path) -> None:
    kernel = tmp_path / "k"
    kernel.write_bytes(b"k")
    r = vmkit(tmp_path, "create", "vm1", "--kernel", str(kernel), "--memory", "lots", "--port", "99999:22")
    assert r.code == 2
    err = one_line(r.err)
    assert "--memory" in err and "'lots' is not a size" in err
    assert "--port" in err and "99999" in err  # both problems, in one run
    assert r.out == ""
    assert not (tmp_path / "instances" / "vm1").exists()


def test_unknown_option_is_bad_input(tmp_path: Path) -> None:
    r = vmkit(tmp_path, "create", "vm1", "--colour", "blue")
    assert r.code == 2
    assert "--colour" in r.err and "No such option" in r.err
    assert r.out == ""


def test_create_with_a_bad_name_is_bad_input(tmp_path: Path) -> None:
    kernel = tmp_path / "k"
    kernel.write_bytes(b"k")
    r = vmkit(tmp_path, "create", "../evil", "--kernel", str(kernel))
    assert r.code == 2
    assert "name" in r.err and "not a valid name" in one_line(r.err)
    assert not (tmp_path / "evil").exists()


def test_missing_kernel_file_names_the_field(tmp_path: Path) -> None:
    r = vmkit(tmp_path, "create", "vm1", "--kernel", str(tmp_path / "[odd] name"))
    assert r.code == 2
    assert "boot.kernel" in r.err and "[odd] name" in r.err and "does not exist" in r.err


# --------------------------------------------------------------------------- not found: exit 3


def test_missing_instance_is_not_found(tmp_path: Path) -> None:
    commands = ["start", "inspect", "delete"]
    for command, r in zip(commands, vmkit_many(tmp_path, *[[c, "ghost"] for c in commands]), strict=True):
        assert r.code == 3, (command, r)
        assert "'ghost' not found" in r.err, command
        assert r.out == "", command


def test_the_entry_point_exits_with_the_error_family_code(tmp_path: Path) -> None:
    """The installed `vmkit` command as a shell runs it: exit codes, stdout and stderr apart."""
    missing, usage, bad, helped, listed = processes(
        tmp_path, ["inspect", "ghost"], ["create", "vm1", "--colour", "blue"],
        ["create", "vm1", "--kernel", "/nonexistent"], ["--help"], ["list", "--json"])
    assert (missing.code, missing.out) == (3, "") and "'ghost' not found" in missing.err
    assert (usage.code, usage.out) == (2, "") and "No such option" in usage.err and "Usage: vmkit" in usage.err
    assert bad.code == 2 and "boot.kernel" in bad.err and "Traceback" not in bad.err
    assert helped.code == 0 and "Usage: vmkit" in helped.out and helped.err == ""
    assert (listed.code, json.loads(listed.out), listed.err) == (0, [], "")


# --------------------------------------------------------------------------- a created instance


def test_create_twice_is_a_conflict(created: Path) -> None:
    kernel = created / "vmlinuz"
    r = vmkit(created, "create", "web", "--kernel", str(kernel))
    assert r.code == 9
    assert "'web' already exists" in r.err and "vmkit delete web" in r.err


def test_stop_or_pause_of_a_stopped_instance_is_wrong_state(created: Path) -> None:
    commands = ["stop", "pause"]
    for command, r in zip(commands, vmkit_many(created, *[[c, "web"] for c in commands]), strict=True):
        assert r.code == 4, (command, r)
        err = one_line(r.err)
        assert "the machine is stopped" in err, command
        assert "running" in err.split("must be", 1)[1], command
        assert r.out == "", command


def test_list_json_shows_the_instance(created: Path, tmp_path: Path) -> None:
    empty = vmkit(tmp_path, "list", "--json")
    assert empty.code == 0 and json.loads(empty.out) == []
    r = vmkit(created, "list", "--json")
    assert r.code == 0
    rows = json.loads(r.out)
    assert [(row["name"], row["state"], row["cpus"], row["memory"]) for row in rows] == [("web", "stopped", 2, "256M")]


def test_inspect_prints_config_and_runtime(created: Path) -> None:
    r = vmkit(created, "inspect", "web")
    assert r.code == 0, r.err
    data = json.loads(r.out)
    assert data["name"] == "web"
    assert data["config"]["memory"] == "256M" and data["config"]["cpus"] == 2
    assert data["config"]["boot"]["cmdline"] == "console=ttyS0 x=[a,b]"
    assert data["config"]["storage"][0]["attachment"]["read_only"] is True
    assert data["runtime"]["state"] == "stopped" and data["runtime"]["supervised"] is False


def test_start_dry_run_prints_the_qemu_argv(created: Path) -> None:
    r = vmkit(created, "start", "--dry-run", "web")
    assert r.code == 0, r.err
    lines = r.out.strip().splitlines()
    assert len(lines) == 1  # one shell line, never wrapped
    argv = shlex.split(lines[0])
    assert argv[0].startswith("qemu-system-")
    assert argv[argv.index("-kernel") + 1] == str(created / "vmlinuz")
    assert argv[argv.index("-append") + 1] == "console=ttyS0 x=[a,b]"  # printed exactly, brackets and all
    assert "socket,id=serial0,fd=4" in argv and "chardev:serial0" in argv
    # on TCG with QEMU < 9.0 the guest gets 8 KiB more (vmkit.runtime.qemu.dirtysync: safe live migration)
    assert argv[argv.index("-m") + 1] in ("256M", f"{(256 << 10) + 8}K")
    assert argv[argv.index("-smp") + 1] == "2,maxcpus=4"
    assert argv[argv.index("-accel") + 1] in ("kvm", "tcg,thread=multi")
    blockdev = json.loads(argv[argv.index("-blockdev") + 1])
    assert blockdev["read-only"] is True and blockdev["file"]["filename"] == str(created / "data.img")
    assert any(f"hostfwd=tcp:127.0.0.1:{PORT}-:22" in a for a in argv)
    # a dry run starts nothing
    assert not (created / "instances" / "web" / "qemu.pid").exists()


def test_delete_then_gone(tmp_path: Path) -> None:
    kernel = tmp_path / "k"
    kernel.write_bytes(b"k")
    assert vmkit(tmp_path, "create", "tmp1", "--kernel", str(kernel)).code == 0
    r = vmkit(tmp_path, "delete", "tmp1")
    assert r.code == 0 and "deleted" in r.out
    assert not (tmp_path / "instances" / "tmp1").exists()
    assert json.loads(vmkit(tmp_path, "list", "--json").out) == []


def test_clone_mount_list_and_key_show_through_the_cli(tmp_path: Path) -> None:
    kernel = tmp_path / "k"
    kernel.write_bytes(b"k")
    share = tmp_path / "src"
    share.mkdir()
    port = free_port()
    r = vmkit(tmp_path, "create", "a", "--kernel", str(kernel), "--port", f"{port}:80",
              "--mount", f"{share}:/mnt/src:ro,type=9p")
    assert r.code == 0, r.err
    clone, key, mounts, mount_table = vmkit_many(tmp_path, ["clone", "a", "b"], ["key", "show", "--json"],
                                                 ["mount", "list", "a", "--json"], ["mount", "list", "a"])
    assert clone.code == 0, clone.err
    assert f"note: port forward 127.0.0.1:{port}->80/tcp not copied (the host port belongs to a)" in one_line(clone.err)
    assert one_line(clone.out) == f"cloned a to b in {tmp_path / 'instances' / 'b'}"
    assert key.code == 0 and json.loads(key.out) == {"path": str(tmp_path / "config" / "state.key"),
                                                     "key_id": None, "retired_key_ids": []}
    assert json.loads(mounts.out) == [{"tag": "share0", "type": "9p", "host_path": str(share),
                                       "guest_path": "/mnt/src", "read_only": True, "state": "stopped"}]
    assert "share0" in mount_table.out and "stopped" in mount_table.out and "ro" in mount_table.out
    rows = json.loads(vmkit(tmp_path, "list", "--json").out)
    assert [(row["name"], row["state"]) for row in rows] == [("a", "stopped"), ("b", "stopped")]


# --------------------------------------------------------------------------- answering at once

HEAVY = ("aiohttp", "cryptography", "pydantic", "yaml", "markdown_it", "pygments", "vmkit.backends.local.control",
         "vmkit.backends.local.statectl", "vmkit.bench.fs", "vmkit.config", "vmkit.api", "vmkit.host.instance",
         "vmkit.host.builder", "vmkit.host.provision", "vmkit.nbd.server", "vmkit.host.images.micro",
         "vmkit.host.images.store")
"""What `vmkit --help` must not import (typer builds the command tree from the commands' signatures)."""


def _imported_by(home: Path, code: str) -> list[str]:
    script = (f"import sys, contextlib, io\n{code}\n"
              "print(' '.join(sorted(sys.modules)))")
    env = {**os.environ, "VMKIT_HOME": str(home)}
    r = subprocess.run([sys.executable, "-c", script], env=env, capture_output=True, text=True, timeout=60, check=True)
    return r.stdout.split("\n")[-2].split()


def test_help_imports_no_heavy_module(tmp_path: Path) -> None:
    """The command tree and `vmkit --help` import neither the operations nor pydantic, aiohttp,
    cryptography, yaml: every command imports what it needs when it runs (a functional check; the
    timings are benchmarks/cli_bench.py's)."""
    loaded = _imported_by(tmp_path, "import vmkit.cli.main")
    assert [m for m in loaded if m.startswith(HEAVY)] == []
    helped = _imported_by(tmp_path, "from vmkit.cli.main import main\n"
                                    "with contextlib.redirect_stdout(io.StringIO()), contextlib.suppress(SystemExit):\n"
                                    "    main(['--help'])")
    assert [m for m in helped if m.startswith(HEAVY)] == []
    assert "vmkit.cli.vm" in helped and "typer.rich_utils" in helped  # it did render the help
    # the command groups (vmkit.cli.groups) are listed by name and help only
    assert [m for m in helped if m in ("vmkit.cli.nbd", "vmkit.cli.image", "vmkit.cli.bench", "vmkit.cli.disk")] == []


def test_list_imports_no_operations(tmp_path: Path) -> None:
    """`vmkit list` reads the instance records only: no supervisor client, no operations."""
    kernel = tmp_path / "k"
    kernel.write_bytes(b"k")
    assert vmkit(tmp_path, "create", "a", "--kernel", str(kernel)).code == 0
    listed = _imported_by(tmp_path, "from vmkit.cli.main import main\n"
                                    "with contextlib.redirect_stdout(io.StringIO()), contextlib.suppress(SystemExit):\n"
                                    "    main(['list'])")
    assert "vmkit.backends.local.listing" in listed
    operations = ("aiohttp", "cryptography", "vmkit.backends.local.control", "vmkit.backends.local.statectl",
                  "vmkit.bench.fs", "vmkit.host.builder", "vmkit.host.provision", "vmkit.api.transport",
                  "vmkit.daemon.supervisor")
    assert [m for m in listed if m.startswith(operations)] == []


def test_a_command_for_a_machines_supervisor_imports_no_aiohttp_or_builder(tmp_path: Path) -> None:
    """`vmkit stop`, `pause`, `stats`, `migrate`... go through the client and the local backend, whose
    calls to the supervisor use http.client (vmkit.api.transport): no aiohttp, no event loop, and none
    of what only creating machines, templates, keys or seeds need (cli_bench.py has the timings)."""
    kernel = tmp_path / "k"
    kernel.write_bytes(b"k")
    assert vmkit(tmp_path, "create", "a", "--kernel", str(kernel)).code == 0
    for argv in (["stop", "a"], ["pause", "a"], ["stats", "a"]):
        loaded = _imported_by(tmp_path, "from vmkit.cli.main import main\n"
                                        "with contextlib.redirect_stderr(io.StringIO()) as err, "
                                        "contextlib.suppress(SystemExit):\n"
                                        f"    main({argv!r})\n"
                                        "assert 'stopped' in err.getvalue(), err.getvalue()")
        assert "vmkit.backends.local.control" in loaded and "vmkit.api.transport" in loaded, argv
        unneeded = ("aiohttp", "asyncio", "pycdlib", "cryptography", "vmkit.host.builder", "vmkit.host.cloudinit",
                    "vmkit.state", "vmkit.runtime.machine", "vmkit.backends.local.statectl")
        assert [m for m in loaded if m.startswith(unneeded)] == [], argv


def test_the_migrate_command_loads_no_event_loop_seed_or_state_code(tmp_path: Path) -> None:
    """What `vmkit migrate` imports on the source (the command, the client, vmkit.migrate.send): no asyncio or
    aiohttp (its supervisor calls are blocking, vmkit.api.transport), no seed-making (cloud-init, pycdlib) and no
    state-file code (cryptography), which only other commands need (cli_bench.py times these imports)."""
    loaded = _imported_by(tmp_path, "import vmkit.cli.app, vmkit.cli.migrate, vmkit.client.sync, vmkit.migrate.send")
    assert "vmkit.migrate.receive" in loaded and "vmkit.backends.local.control" in loaded
    assert [m for m in loaded if m.startswith(("aiohttp", "asyncio", "pycdlib", "cryptography", "vmkit.host.cloudinit",
                                               "vmkit.state", "vmkit.runtime.machine"))] == []


def test_migrate_starts_the_targets_receiver_before_parsing_and_ends_it_when_the_command_fails(tmp_path: Path) -> None:
    """`vmkit migrate NAME ssh://...` spawns the target's receiver (over ssh) before typer and the migration code
    load (vmkit.cli.main, vmkit.migrate.early); a command that then fails, here on a bad option, ends it: no ssh
    process is left behind. --help and --cancel spawn none."""
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    spawned = tmp_path / "spawned"
    fake = bin_dir / "ssh"  # records its pid and its arguments, then waits as a receiver would
    fake.write_text(f"#!/bin/sh\necho $$ \"$*\" >> {spawned}\nexec sleep 30\n")
    fake.chmod(0o755)
    env = {**os.environ, "VMKIT_HOME": str(tmp_path / "home"), "PATH": f"{bin_dir}:{os.environ['PATH']}"}
    bad = subprocess.run([*ENTRY, "migrate", "m", "ssh://root@192.0.2.7", "--bandwidth", "0"], env=env,
                         capture_output=True, text=True, timeout=60)
    assert bad.returncode == 2 and "--bandwidth" in bad.stderr
    lines = spawned.read_text().splitlines()
    assert len(lines) == 1 and "192.0.2.7" in lines[0] and "migrate-receive" in lines[0]
    pid = int(lines[0].split()[0])
    assert not Path(f"/proc/{pid}").exists() or "Z" in Path(f"/proc/{pid}/stat").read_text().split()[2]
    spawned.unlink()
    helped = subprocess.run([*ENTRY, "migrate", "m", "ssh://root@192.0.2.7", "--help"], env=env,
                            capture_output=True, text=True, timeout=60)
    assert helped.returncode == 0 and "Usage: vmkit migrate" in helped.stdout, helped.stderr
    assert not spawned.exists()
    cancel = subprocess.run([*ENTRY, "migrate", "m", "ssh://root@192.0.2.7", "--cancel"], env=env,
                            capture_output=True, text=True, timeout=60)
    assert cancel.returncode == 2 and "--cancel: give no target" in cancel.stderr, cancel.stderr
    assert not spawned.exists()


def test_list_into_a_pipe_imports_only_the_standard_library(tmp_path: Path) -> None:
    """`vmkit list` not on a terminal, once it knows the machines' sizes: no typer, rich, pydantic or
    yaml (what makes it as quick as `virsh list`; the timings are benchmarks/cli_bench.py's)."""
    kernel = tmp_path / "k"
    kernel.write_bytes(b"k")
    assert vmkit(tmp_path, "create", "a", "--kernel", str(kernel)).code == 0
    os.utime(tmp_path / "instances" / "a" / "vm.yaml", (1e9, 1e9))  # made a while ago
    assert "a" in vmkit(tmp_path, "list").out  # the first listing reads vm.yaml (and remembers its size)
    for argv in (["list"], ["list", "--json"]):
        loaded = _imported_by(tmp_path, "from vmkit.cli.main import main\n"
                                        "with contextlib.redirect_stdout(io.StringIO()) as out:\n"
                                        f"    main({argv!r})\n"
                                        "assert 'a' in out.getvalue()")
        assert [m for m in loaded if m.startswith(("typer", "click", "rich", "pydantic", "yaml", "vmkit.config",
                                                   "vmkit.host.instance", "vmkit.api"))] == [], argv


def test_deferred_help_modules_still_work_when_used() -> None:
    """rich.markdown and rich.traceback stand in until used (vmkit.cli._deferred); used, they are real."""
    script = """
import io, sys
import vmkit.cli.app
from rich.console import Console
from rich.markdown import Markdown
from rich.traceback import Traceback
assert type(sys.modules["rich.markdown"]).__name__ == "_StandInModule"
console = Console(file=io.StringIO(), width=60, color_system=None)
console.print(Markdown("# Title\\n\\n* item"))
try:
    1 / 0
except ZeroDivisionError as exc:
    console.print(Traceback.from_exception(type(exc), exc, exc.__traceback__))
from rich.markdown import Heading
print(type(sys.modules["rich.markdown"]).__name__, Heading.__module__)
print(console.file.getvalue())
"""
    r = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=60)
    assert r.returncode == 0, r.stderr
    assert r.stdout.startswith("module rich.markdown")
    assert "Title" in r.stdout and "item" in r.stdout and "ZeroDivisionError" in r.stdout


# --------------------------------------------------------------------------- schema and doctor


def test_schema_prints_valid_json(tmp_path: Path) -> None:
    r = vmkit(tmp_path, "schema")
    assert r.code == 0
    schema = json.loads(r.out)
    assert {"name", "cpus", "memory", "boot", "storage", "network"} <= set(schema["properties"])


@pytest.mark.skipif(not Path("/sys/module/kvm_pvm").exists(), reason="checks this nested-PVM host")
def test_doctor_on_this_host(tmp_path: Path) -> None:
    r = vmkit(tmp_path, "doctor")
    assert r.code == 0, r.out + r.err
    out = one_line(r.out)
    assert "accelerator" in out and "tcg" in out and "kvm_pvm" in out
    assert "qemu-system-x86_64" in out and "qemu-img" in out


def _command_paths() -> list[list[str]]:
    import typer.main

    from vmkit.cli.main import app

    paths: list[list[str]] = []

    def walk(cmd: Any, path: list[str]) -> None:
        paths.append(path)
        for name, sub in getattr(cmd, "commands", {}).items():
            walk(sub, [*path, name])

    walk(typer.main.get_command(app), [])
    return paths


@pytest.mark.parametrize("path", _command_paths(), ids=lambda p: " ".join(p) or "vmkit")
def test_every_command_has_working_help(path: list[str]) -> None:
    """`--help` renders for every command (rich markup in help texts must be escaped)."""
    from typer.testing import CliRunner

    from vmkit.cli.main import app

    result = CliRunner().invoke(app, [*path, "--help"])
    assert result.exit_code == 0, result.output + repr(result.exception)
    assert "Usage" in result.output
