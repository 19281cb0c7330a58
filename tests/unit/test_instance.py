"""Unit tests: instance directories (names, creation, modes, the supervisor lock, reconcile after a crash)."""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest

from vmkit.config import MachineConfig, parse_config
from vmkit.errors import AlreadyExistsError, ConfigError, ExitCode, NotFoundError, StateError
from vmkit.host.instance import Instance, Status


def make_config(name: str = "vm1") -> MachineConfig:
    return parse_config({"name": name, "boot": {"kernel": "/boot/vmlinuz"}})


@pytest.fixture
def root(tmp_path: Path) -> Path:
    return tmp_path / "instances"


@pytest.fixture
def inst(root: Path) -> Instance:
    return Instance.create(make_config(), root)


class Children:
    """Processes started by a test; every one is killed and reaped at the end."""

    def __init__(self) -> None:
        self.procs: list[subprocess.Popen[str]] = []

    def spawn(self, code: str, *args: str) -> subprocess.Popen[str]:
        proc = subprocess.Popen([sys.executable, "-c", code, *args], stdout=subprocess.PIPE, text=True)
        self.procs.append(proc)
        return proc

    def sleeper(self, *args: str) -> subprocess.Popen[str]:
        proc = self.spawn("import time; print('up', flush=True); time.sleep(60)", *args)
        assert proc.stdout is not None and proc.stdout.readline() == "up\n"
        return proc

    def lock_holder(self, lock: Path) -> subprocess.Popen[str]:
        proc = self.spawn(
            "import fcntl, sys, time\n"
            "f = open(sys.argv[1], 'a')\n"
            "fcntl.flock(f, fcntl.LOCK_EX)\n"
            "print('locked', flush=True)\n"
            "time.sleep(60)\n",
            str(lock),
        )
        assert proc.stdout is not None and proc.stdout.readline() == "locked\n"
        return proc


@pytest.fixture
def children() -> Iterator[Children]:
    c = Children()
    yield c
    for p in c.procs:
        if p.poll() is None:
            p.kill()
        p.wait(5)
        if p.stdout is not None:
            p.stdout.close()


# --------------------------------------------------------------------------- names


@pytest.mark.parametrize("bad", ["a/b", "..", "../etc", ".hidden", ".", "", "a b", "x" * 64, "-dash", "/abs"])
def test_bad_instance_names_are_refused(bad: str, root: Path) -> None:
    with pytest.raises(ConfigError) as info:
        Instance(bad, root)
    assert info.value.exit_code == ExitCode.BAD_INPUT
    assert info.value.problems[0].field == "name"
    assert "no '/', no '..'" in info.value.problems[0].message


@pytest.mark.parametrize("good", ["vm1", "web-01", "a.b_c", "X", "x" * 63])
def test_good_instance_names(good: str, root: Path) -> None:
    assert Instance(good, root).dir == root / good


# --------------------------------------------------------------------------- create


def test_create_makes_a_private_directory_with_the_config(inst: Instance, root: Path) -> None:
    assert inst.exists()
    assert inst.dir == root / "vm1"
    assert (inst.dir.stat().st_mode & 0o777) == 0o700
    assert (root.stat().st_mode & 0o777) == 0o700
    assert (inst.config_path.stat().st_mode & 0o777) == 0o600
    assert inst.load_config() == make_config()
    assert [p.name for p in root.iterdir()] == ["vm1"]  # no staging directory left behind


def test_create_refuses_an_existing_name(inst: Instance, root: Path) -> None:
    before = inst.config_path.read_bytes()
    other = parse_config({"name": "vm1", "cpus": 4, "boot": {"kernel": "/other"}})
    with pytest.raises(AlreadyExistsError) as info:
        Instance.create(other, root)
    assert info.value.exit_code == ExitCode.CONFLICT
    assert "'vm1' already exists" in info.value.message and "vmkit delete vm1" in str(info.value.hint)
    assert inst.config_path.read_bytes() == before


def test_create_is_all_or_nothing(root: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    def broken_save(self: MachineConfig, path: Path) -> None:
        path.write_text("half a config")
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(MachineConfig, "save", broken_save)
    with pytest.raises(OSError, match="No space left"):
        Instance.create(make_config("doomed"), root)
    assert not (root / "doomed").exists()
    assert list(root.iterdir()) == []  # the staging directory is gone too
    monkeypatch.undo()
    assert Instance.create(make_config("doomed"), root).exists()  # and the name is still free


def test_missing_instance_is_not_found(root: Path) -> None:
    ghost = Instance("ghost", root)
    assert not ghost.exists()
    with pytest.raises(NotFoundError) as info:
        ghost.require()
    assert info.value.exit_code == ExitCode.NOT_FOUND and "vmkit list" in str(info.value.hint)
    with pytest.raises(NotFoundError):
        ghost.load_config()
    with pytest.raises(NotFoundError):
        ghost.delete()


def test_all_lists_only_complete_instances(root: Path) -> None:
    assert Instance.all(root) == []
    Instance.create(make_config("b"), root)
    Instance.create(make_config("a"), root)
    (root / ".c.creating.xyz").mkdir()
    (root / ".c.creating.xyz" / "vm.yaml").write_text("name: c\n")
    (root / "empty").mkdir()
    assert [i.name for i in Instance.all(root)] == ["a", "b"]


def test_delete_removes_the_directory(inst: Instance) -> None:
    inst.delete()
    assert not inst.dir.exists()


# --------------------------------------------------------------------------- status file


def test_status_round_trip_and_defaults(inst: Instance) -> None:
    assert inst.read_status().state == "stopped"
    inst.write_status(Status(state="paused", supervisor_pid=123, accel="tcg"))
    got = inst.read_status()
    assert (got.state, got.supervisor_pid, got.accel) == ("paused", 123, "tcg")
    assert (inst.state_path.stat().st_mode & 0o777) == 0o600
    inst.state_path.write_text("{not json")  # damaged: an error naming the file, never silently "stopped"
    with pytest.raises(ConfigError, match=re.escape(str(inst.state_path))):
        inst.read_status()
    inst.state_path.write_text(json.dumps({"state": "running", "from_a_newer_vmkit": 1}))
    assert inst.read_status().state == "running"


# --------------------------------------------------------------------------- supervisor lock


def test_is_supervised_follows_the_lock_holder(inst: Instance, children: Children) -> None:
    assert not inst.is_supervised()  # no lock file at all
    inst.lock_path.touch()
    assert not inst.is_supervised()  # a lock file nobody holds
    holder = children.lock_holder(inst.lock_path)
    assert inst.is_supervised()
    assert inst.is_supervised()  # asking does not take the lock away
    holder.kill()
    holder.wait(5)
    assert not inst.is_supervised()


def test_a_supervised_instance_cannot_be_deleted(inst: Instance, children: Children) -> None:
    inst.write_status(Status(state="running"))
    children.lock_holder(inst.lock_path)
    with pytest.raises(StateError) as info:
        inst.delete()
    assert info.value.exit_code == ExitCode.WRONG_STATE and info.value.current == "running"
    assert inst.exists()


# --------------------------------------------------------------------------- reconcile


def test_reconcile_of_a_dead_supervisor(inst: Instance) -> None:
    inst.write_status(Status(state="running", supervisor_pid=999999, qemu_pid=999998))
    inst.api_socket.write_text("stale socket")
    status = inst.reconcile()
    assert status.state == "error"
    assert "supervisor" in status.reason and "died" in status.reason
    assert inst.read_status().state == "error"  # recorded, not just returned
    assert not inst.api_socket.exists()
    # once cleaned up it is stable, and the instance can be deleted
    assert inst.reconcile().state == "error"
    inst.delete()


def test_reconcile_kills_a_leftover_qemu(inst: Instance, children: Children) -> None:
    # a stand-in for QEMU: its command line names this instance's pid file, as QEMU's -pidfile does
    qemu = children.sleeper(str(inst.qemu_pidfile))
    inst.qemu_pidfile.write_text(f"{qemu.pid}\n")
    inst.write_status(Status(state="running", qemu_pid=qemu.pid))
    status = inst.reconcile()
    assert qemu.wait(5) == -9  # SIGKILL
    assert status.state == "error"
    assert "supervisor" in status.reason and f"killed leftover QEMU pid {qemu.pid}" in status.reason
    assert not inst.qemu_pidfile.exists()


def test_reconcile_kills_a_leftover_qemu_even_if_the_state_says_stopped(inst: Instance, children: Children) -> None:
    qemu = children.sleeper(str(inst.qemu_pidfile))
    inst.qemu_pidfile.write_text(str(qemu.pid))
    inst.reconcile()
    assert qemu.wait(5) == -9


def test_reconcile_spares_an_unrelated_process(inst: Instance, children: Children) -> None:
    stranger = children.sleeper()  # the pid was reused by something that is not our QEMU
    inst.qemu_pidfile.write_text(str(stranger.pid))
    inst.write_status(Status(state="running"))
    status = inst.reconcile()
    assert stranger.poll() is None
    assert os.path.exists(f"/proc/{stranger.pid}")
    assert status.state == "error" and "killed" not in status.reason
    assert not inst.qemu_pidfile.exists()  # the stale pid file is cleaned up


def test_reconcile_leaves_a_supervised_instance_alone(inst: Instance, children: Children) -> None:
    qemu = children.sleeper(str(inst.qemu_pidfile))
    inst.qemu_pidfile.write_text(str(qemu.pid))
    inst.write_status(Status(state="running"))
    children.lock_holder(inst.lock_path)
    assert inst.reconcile().state == "running"
    assert qemu.poll() is None and inst.qemu_pidfile.exists()


def test_reconcile_of_a_cleanly_stopped_instance_changes_nothing(inst: Instance) -> None:
    inst.write_status(Status(state="stopped", reason="guest powered off"))
    before = inst.state_path.read_bytes()
    status = inst.reconcile()
    assert (status.state, status.reason) == ("stopped", "guest powered off")
    assert inst.state_path.read_bytes() == before


_CHECK_MANY = """\
import sys
from pathlib import Path
from vmkit.host.instance import Instance
path = Path(sys.argv[1])
inst = Instance(path.name, path.parent)
print(sum(inst.is_supervised() for _ in range(int(sys.argv[2]))))
"""


def _checkers(path: Path, n: int) -> list[subprocess.Popen[str]]:
    """Two processes that each ask ``is_supervised`` ``n`` times and print how often it said yes (plain
    processes: a multiprocessing pool re-imports this test module, which hung once in a long run)."""
    return [subprocess.Popen([sys.executable, "-c", _CHECK_MANY, str(path), str(n)], stdout=subprocess.PIPE,
                             text=True) for _ in range(2)]


def _yes_counts(procs: list[subprocess.Popen[str]]) -> list[int]:
    out = []
    for p in procs:
        stdout, _ = p.communicate(timeout=120)
        assert p.returncode == 0
        out.append(int(stdout))
    return out


def test_concurrent_checks_never_see_each_other_as_a_supervisor(tmp_path: Path) -> None:
    """Checking used to take the lock exclusively: two checking processes saw each other as a supervisor."""
    from vmkit.host.instance import Instance, take_exclusive

    inst = Instance("busy", tmp_path)
    inst.dir.mkdir()
    inst.lock_path.touch()
    pending = _checkers(inst.dir, 8000)
    # meanwhile a supervisor taking the lock is not put off by the checks
    fd = inst.open_lock()
    try:
        assert take_exclusive(fd)
        assert inst.is_supervised()
        other = inst.open_lock()
        try:
            assert not take_exclusive(other, patience=0.2)  # a second supervisor is refused
        finally:
            os.close(other)
    finally:
        os.close(fd)
    _yes_counts(pending)  # (some of these ran while our "supervisor" held the lock: True is right then)
    # with no holder at all, every answer of the two concurrent checkers must be False
    assert _yes_counts(_checkers(inst.dir, 8000)) == [0, 0]
