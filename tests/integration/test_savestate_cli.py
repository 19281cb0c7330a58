"""Save/restore and snapshots through the `vmkit` command, as a user does it (micro guest with its counter)."""

from __future__ import annotations

import json
import os
import secrets
import shutil
import subprocess
from pathlib import Path

import pytest

from conftest import vmkit
from vmkit.host.images import micro
from vmkit.host.images.store import Image

pytestmark = pytest.mark.integration




def state_of(name: str) -> str:
    rows = json.loads(vmkit("list", "--json").stdout)
    return str(next(r for r in rows if r["name"] == name)["state"])


def one_line(text: str) -> str:
    return " ".join(text.split())


def console_ticks(name: str, pattern: str = r"vmkit-tick \d+") -> list[int]:
    """The ticks on the console once a whole line matches ``pattern`` (not a tick still being written)."""
    until = rf"(?:{pattern})\n"
    return micro.parse_ticks(vmkit("console", name, "--log", "--until", until, "--timeout", "60").stdout)


def refused(*args: str, match: str, code: int) -> None:
    res = vmkit(*args, check=False)
    assert res.returncode == code, f"exit {res.returncode}, expected {code}:\n{res.stdout}\n{res.stderr}"
    assert match in one_line(res.stderr), res.stderr
    assert "hint:" in res.stderr and "discard the state file" in one_line(res.stderr)


def test_stop_save_start_resumes_and_every_unusable_file_has_its_error(vmkit_home: Path, micro_image: Image,
                                                                       tmp_path: Path) -> None:
    disk = tmp_path / "data.raw"
    subprocess.run(["qemu-img", "create", "-q", "-f", "raw", str(disk), "4M"], check=True)
    vmkit("create", "sv", "--image", "micro", "--memory", "128M", "--cmdline", "vmkit.counter=1",
          "--disk", str(disk))
    inst = vmkit_home / "instances" / "sv"
    saved = inst / "saved.vmstate"
    vmkit("start", "sv")
    console_ticks("sv", r"vmkit-tick [3-9]")

    res = vmkit("stop", "--save", "sv")
    assert "saved sv to" in res.stdout and "vmkit start sv" in res.stdout
    last = max(micro.parse_ticks((inst / "serial.log").read_text(errors="replace")))
    assert state_of("sv") == "saved"
    assert saved.stat().st_mode & 0o777 == 0o600
    pristine = tmp_path / "pristine.vmstate"
    shutil.copyfile(saved, pristine)

    # each unusable file: its own message, exit code 10, and the file is left alone
    bogus = tmp_path / "bogus.vmstate"
    bogus.write_bytes(os.urandom(4096))
    refused("restore", "sv", str(bogus), match="is not a vmkit state file", code=11)
    truncated = tmp_path / "truncated.vmstate"
    truncated.write_bytes(pristine.read_bytes()[: pristine.stat().st_size // 2])
    refused("restore", "sv", str(truncated), match="cannot be trusted", code=15)
    tampered = tmp_path / "tampered.vmstate"
    data = bytearray(pristine.read_bytes())
    data[len(data) * 2 // 3] ^= 0x40
    tampered.write_bytes(bytes(data))
    refused("restore", "sv", str(tampered), match="does not authenticate", code=15)
    key = vmkit_home / "config" / "state.key"
    own_key = key.read_bytes()
    key.write_bytes(secrets.token_bytes(32))  # another user's key
    refused("restore", "sv", match="written with a different key", code=15)
    key.write_bytes(own_key)
    yaml_text = (inst / "vm.yaml").read_text()
    (inst / "vm.yaml").write_text(yaml_text.replace("memory: 128M", "memory: 256M"))
    refused("restore", "sv", match="memory was 128M, it is now 256M", code=14)
    (inst / "vm.yaml").write_text(yaml_text)
    backup = tmp_path / "data.raw.copy"
    shutil.copy2(disk, backup)  # a copy taken with the save (timestamps preserved) ...
    with disk.open("r+b") as fh:
        fh.write(b"written while the machine was saved")
    refused("restore", "sv", match="the disks changed since", code=16)
    shutil.copy2(backup, disk)  # ... puts the disk back as the save knew it
    assert state_of("sv") == "saved" and saved.read_bytes() == pristine.read_bytes()

    res = vmkit("start", "sv")
    assert "resuming sv from its saved state" in res.stderr
    assert "resumed from" in res.stdout and "no guest agent: clock not corrected" in one_line(res.stdout)
    assert state_of("sv") == "running" and not saved.exists(), "a resumed state must be consumed"
    after = console_ticks("sv")
    assert last < after[0] <= last + 2, f"counter {after[0]} after resuming, {last} when saved"
    assert micro.READY_MARKER not in (inst / "serial.log").read_text(errors="replace")

    # an unusable saved state: `start` says why, keeps the file aside and cold-boots
    vmkit("stop", "--save", "sv")
    with saved.open("r+b") as fh:
        fh.seek(saved.stat().st_size // 2)
        fh.write(b"\0garbage\0")
    res = vmkit("start", "sv")
    err = one_line(res.stderr)
    assert "the saved state of sv cannot be used" in err and "cold-booting sv" in err, res.stderr
    assert (inst / "saved.vmstate.discarded").exists() and not saved.exists()
    assert state_of("sv") == "running"
    assert console_ticks("sv", r"vmkit-tick [1-9]")[0] == 0, "a cold boot counts from 0"
    vmkit("stop", "--force", "sv")
    assert state_of("sv") == "stopped"


def test_snapshots_through_the_cli(vmkit_home: Path, micro_image: Image, tmp_path: Path) -> None:
    disk = tmp_path / "data.qcow2"
    subprocess.run(["qemu-img", "create", "-q", "-f", "qcow2", str(disk), "16M"], check=True)
    vmkit("create", "sn", "--image", "micro", "--memory", "128M", "--cmdline", "vmkit.counter=1",
          "--disk", str(disk))
    inst = vmkit_home / "instances" / "sn"
    res = vmkit("snapshot", "create", "sn", "t1", check=False)
    assert res.returncode == 4, "a stopped machine has no machine state to snapshot"
    vmkit("start", "sn")
    console_ticks("sn", r"vmkit-tick [2-9]")
    before = max(micro.parse_ticks((inst / "serial.log").read_text(errors="replace")))
    assert "created snapshot t1" in one_line(vmkit("snapshot", "create", "sn", "t1").stdout)
    at_snapshot = max(micro.parse_ticks((inst / "serial.log").read_text(errors="replace")))  # >= the snapshot's
    assert vmkit("snapshot", "create", "sn", "t1", check=False).returncode == 9
    rows = json.loads(vmkit("snapshot", "list", "sn", "--json").stdout)
    assert [r["tag"] for r in rows] == ["t1"] and rows[0]["vm_state_bytes"] > 0
    console_ticks("sn", rf"vmkit-tick {at_snapshot + 4}")
    vmkit("stop", "--force", "sn")

    assert "t1" in vmkit("snapshot", "list", "sn").stdout  # read from the disk while stopped
    res = vmkit("snapshot", "revert", "sn", "t1")  # a stopped machine starts from the snapshot
    assert "reverted to snapshot t1" in res.stdout and "clock" in res.stdout
    assert state_of("sn") == "running"
    first = console_ticks("sn")[0]
    assert before < first <= at_snapshot + 1, f"counter {first} after revert, {before}..{at_snapshot} at the snapshot"
    assert vmkit("snapshot", "revert", "sn", "nope", check=False).returncode == 3
    vmkit("snapshot", "delete", "sn", "t1")
    assert json.loads(vmkit("snapshot", "list", "sn", "--json").stdout) == []
    vmkit("stop", "--force", "sn")


def test_save_refuses_targets_it_would_destroy(vmkit_home: Path, micro_image: Image, tmp_path: Path) -> None:
    disk = tmp_path / "own.raw"
    other_disk = tmp_path / "other.qcow2"
    subprocess.run(["qemu-img", "create", "-q", "-f", "raw", str(disk), "4M"], check=True)
    subprocess.run(["qemu-img", "create", "-q", "-f", "qcow2", str(other_disk), "4M"], check=True)
    with disk.open("r+b") as fh:
        fh.write(b"the guest's data")
    vmkit("create", "sg", "--image", "micro", "--memory", "128M", "--cmdline", "vmkit.counter=1", "--disk", str(disk))
    vmkit("create", "other", "--image", "micro", "--memory", "128M", "--disk", str(other_disk))
    inst = vmkit_home / "instances" / "sg"
    vmkit("start", "sg")
    console_ticks("sg", r"vmkit-tick [2-9]")

    unrelated = tmp_path / "notes.txt"
    unrelated.write_text("my notes\n")
    fifo = tmp_path / "fifo"
    os.mkfifo(fifo)
    disk_link = tmp_path / "disk-link.raw"
    disk_link.symlink_to(disk)
    disk_hardlink = tmp_path / "disk-hardlink.raw"
    os.link(disk, disk_hardlink)
    protected = [disk, other_disk, inst / "vm.yaml", vmkit_home / "instances" / "other" / "vm.yaml", unrelated]
    before = {p: p.read_bytes() for p in protected}

    attacks = [
        (disk, 2, "is disk storage[0] of machine sg"),
        (disk_link, 2, "is disk storage[0] of machine sg"),
        (disk_hardlink, 2, "is disk storage[0] of machine sg"),
        (other_disk, 2, "is disk storage[0] of machine other"),
        (inst / "vm.yaml", 2, "is inside the directory of instance sg"),
        (inst / "new.vmstate", 2, "is inside the directory of instance sg"),
        (vmkit_home / "instances" / "other" / "saved.vmstate", 2, "is inside the directory of instance other"),
        (vmkit_home / "config" / "state.key", 2, "is inside vmkit's configuration directory"),
        (Path("/dev/null"), 2, "is a character device"),
        (fifo, 2, "is a FIFO"),
        (tmp_path, 2, "is a directory"),
        (unrelated, 9, "already exists"),
    ]
    for target, code, message in attacks:
        res = vmkit("save", "sg", str(target), check=False)
        assert res.returncode == code, f"{target}: exit {res.returncode}, expected {code}:\n{res.stdout}{res.stderr}"
        err = one_line(res.stderr)
        assert message in err and "path" in err, f"{target}: {res.stderr}"
        assert state_of("sg") == "running", f"{target}: the machine must go on running"
    # with --force, a disk or a vmkit file is still refused
    assert vmkit("save", "sg", str(disk), "--force", check=False).returncode == 2
    assert vmkit("save", "sg", str(inst / "vm.yaml"), "--force", check=False).returncode == 2
    assert "hint:" in vmkit("save", "sg", str(unrelated), check=False).stderr

    assert {p: p.read_bytes() for p in protected} == before, "every refused target must be untouched"
    assert Path("/dev/null").is_char_device() and fifo.is_fifo() and disk_link.is_symlink()
    assert {r["name"] for r in json.loads(vmkit("list", "--json").stdout)} == {"sg", "other"}
    assert not list(tmp_path.glob(".*.tmp")) and not list(Path("/dev").glob(".null.*"))
    last = console_ticks("sg")[-1]
    assert console_ticks("sg", rf"vmkit-tick {last + 1}")[-1] > last, "the guest still runs"

    # an unrelated regular file is replaced with --force; an existing state file without it
    res = vmkit("save", "sg", str(unrelated), "--force", "--keep-running")
    assert "saved sg to" in res.stdout and unrelated.read_bytes().startswith(b"\x89VMKITSTATE\n")
    assert state_of("sg") == "running"
    console_ticks("sg", rf"vmkit-tick {last + 2}")
    vmkit("save", "sg", str(unrelated))
    saved_at = max(micro.parse_ticks((inst / "serial.log").read_text(errors="replace")))
    assert state_of("sg") == "stopped"
    assert disk.read_bytes().startswith(b"the guest's data")
    vmkit("restore", "sg", str(unrelated))
    after = console_ticks("sg")
    assert saved_at < after[0] <= saved_at + 2, f"counter {after[0]} after restoring, {saved_at} when saved"
    vmkit("stop", "--force", "sg")


def test_key_rotation_keeps_saved_machines_resumable(vmkit_home: Path, micro_image: Image, tmp_path: Path) -> None:
    from vmkit.state.file import AuthenticationFailed, StateFileReader

    vmkit("create", "kr", "--image", "micro", "--memory", "128M", "--cmdline", "vmkit.counter=1")
    inst = vmkit_home / "instances" / "kr"
    saved = inst / "saved.vmstate"
    key_file = vmkit_home / "config" / "state.key"
    vmkit("start", "kr")
    console_ticks("kr", r"vmkit-tick [2-9]")
    res = vmkit("key", "rotate", check=False)
    assert res.returncode == 4 and "vmkit stop --save kr" in one_line(res.stderr), res.stderr
    vmkit("save", "kr", str(tmp_path / "copy.vmstate"), "--keep-running")
    vmkit("stop", "--save", "kr")
    last = max(micro.parse_ticks((inst / "serial.log").read_text(errors="replace")))
    old_key = key_file.read_bytes()
    old_id = json.loads(vmkit("key", "show", "--json").stdout)["key_id"]

    # a damaged file among them: a clear error, nothing changed
    damaged = tmp_path / "damaged.vmstate"
    shutil.copyfile(tmp_path / "copy.vmstate", damaged)
    with damaged.open("r+b") as fh:
        fh.seek(damaged.stat().st_size // 2)
        fh.write(b"\0garbage\0")
    pristine = saved.read_bytes()
    res = vmkit("key", "rotate", str(damaged), check=False)
    assert res.returncode == 15 and "does not authenticate" in one_line(res.stderr), res.stderr
    assert "nothing was changed" in one_line(res.stderr) and str(damaged) in one_line(res.stderr)
    assert key_file.read_bytes() == old_key and saved.read_bytes() == pristine

    res = vmkit("key", "rotate", str(tmp_path / "copy.vmstate"))
    assert "re-encrypted 2 state file(s)" in one_line(res.stdout), res.stdout
    assert key_file.read_bytes() != old_key and key_file.stat().st_mode & 0o777 == 0o600
    shown = json.loads(vmkit("key", "show", "--json").stdout)
    assert shown["key_id"] != old_id and shown["retired_key_ids"] == []
    for path in (saved, tmp_path / "copy.vmstate"):
        with pytest.raises(AuthenticationFailed, match="different key"):
            StateFileReader(path, old_key)

    res = vmkit("start", "kr")
    assert "resumed from" in res.stdout, res.stdout + res.stderr
    after = console_ticks("kr")
    assert last < after[0] <= last + 2, f"counter {after[0]} after resuming, {last} when saved"
    vmkit("stop", "--force", "kr")
    vmkit("restore", "kr", str(tmp_path / "copy.vmstate"))  # the other re-encrypted file
    assert state_of("kr") == "running"
    vmkit("stop", "--force", "kr")
