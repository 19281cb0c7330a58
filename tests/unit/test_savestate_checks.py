"""Save/restore pieces that need no QEMU: the configuration digest, the checks made before QEMU is
launched (each state-file error), snapshot eligibility, the supervisor's start plan and its interim
report lines, and the fallback policy of ``start``."""

from __future__ import annotations

import os
import secrets
from pathlib import Path
from typing import Any

import pytest
from pydantic import ValidationError

from vmkit.backends.local import control, statectl
from vmkit.config import MachineConfig, parse_config
from vmkit.daemon.state_routes import StartPlan
from vmkit.errors import ConfigError, ExitCode, VmkitError
from vmkit.host.instance import Instance, Status
from vmkit.runtime.qemu.accel import AccelChoice
from vmkit.state import file as statefile
from vmkit.state import key as keys
from vmkit.state import savestate
from vmkit.state.file import (
    AuthenticationFailed,
    ConfigMismatch,
    DisksChanged,
    NotAStateFile,
    StateFileWriter,
)

TCG = AccelChoice("tcg", "test")


def config(tmp_path: Path, **over: Any) -> MachineConfig:
    kernel = tmp_path / "vmlinuz"
    kernel.write_bytes(b"k")
    disk = tmp_path / "disk.qcow2"
    if not disk.exists():
        disk.write_bytes(b"QFI\xfb" + os.urandom(4096))
    data: dict[str, Any] = {
        "name": "s", "memory": "256M", "boot": {"kernel": str(kernel), "cmdline": "console=ttyS0"},
        "storage": [{"attachment": {"type": "disk-image", "path": str(disk)}}],
        "network": {"mac": "52:54:00:00:00:01"},
    }
    data.update(over)
    return parse_config(data)


@pytest.fixture
def home(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    h = tmp_path / "home"
    monkeypatch.setenv("VMKIT_HOME", str(h))
    return h


def write_state(path: Path, cfg: MachineConfig, key: bytes, payload: bytes = b"x" * 100_000) -> None:
    fields = savestate.machine_fields(cfg, TCG)
    header = savestate.VmStateHeader(qemu_version="7.2.0", machine_type="pc-q35-7.2",
                                     config_digest=savestate.config_digest(fields), ram_bytes=cfg.memory,
                                     disks=savestate.disk_identities(cfg), machine=fields)
    with StateFileWriter(path, header, key, chunk_size=16 << 10) as w:
        w.write(payload)


# --------------------------------------------------------------------------- digest


def test_digest_is_stable_and_ignores_what_does_not_matter(tmp_path: Path) -> None:
    a = config(tmp_path)
    digest = savestate.config_digest(savestate.machine_fields(a, TCG))
    assert digest.startswith("sha256:") and len(digest) == 7 + 64
    assert savestate.config_digest(savestate.machine_fields(config(tmp_path), TCG)) == digest
    moved = tmp_path / "elsewhere.qcow2"
    moved.write_bytes(b"QFI\xfb")
    same = [config(tmp_path, name="other"), config(tmp_path, memory_merge=False),
            config(tmp_path, readiness={"serial_marker": "X"}),
            config(tmp_path, network={"mac": "52:54:00:00:00:01", "forwards": [{"host_port": 2222, "guest_port": 22}]}),
            config(tmp_path, storage=[{"attachment": {"type": "disk-image", "path": str(moved)}}])]
    for cfg in same:
        assert savestate.config_digest(savestate.machine_fields(cfg, TCG)) == digest
    different = [config(tmp_path, memory="512M"), config(tmp_path, cpus=2),
                 config(tmp_path, boot={"kernel": str(tmp_path / "vmlinuz"), "cmdline": "quiet"}),
                 config(tmp_path, network={"mac": "52:54:00:00:00:02"}), config(tmp_path, network=None),
                 config(tmp_path, entropy=False), config(tmp_path, balloon=False), config(tmp_path, cpu_model="qemu64"),
                 config(tmp_path, networks=[{"network": "lab", "mac": "52:54:00:00:00:03"}]),
                 config(tmp_path, networks=[{"network": "lab", "mac": "52:54:00:00:00:03", "model": "e1000"}]),
                 config(tmp_path, storage=[{"attachment": {"type": "disk-image", "path": str(moved),
                                                           "read_only": True}}])]
    digests = {savestate.config_digest(savestate.machine_fields(cfg, TCG)) for cfg in different}
    assert digest not in digests and len(digests) == len(different)
    kvm = AccelChoice("kvm", "test")
    assert savestate.config_digest(savestate.machine_fields(a, kvm)) != digest


# --------------------------------------------------------------------------- precheck: each error


def test_precheck_accepts_the_same_machine(tmp_path: Path, home: Path) -> None:
    cfg = config(tmp_path)
    key = keys.load_or_create_key()
    write_state(tmp_path / "s.vmstate", cfg, key)
    header = savestate.precheck(tmp_path / "s.vmstate", cfg, TCG)
    assert header.ram_bytes == 256 << 20


def test_other_configuration_names_the_field(tmp_path: Path, home: Path) -> None:
    key = keys.load_or_create_key()
    write_state(tmp_path / "s.vmstate", config(tmp_path), key)
    with pytest.raises(ConfigMismatch, match="memory was 256M, it is now 512M") as exc:
        savestate.precheck(tmp_path / "s.vmstate", config(tmp_path, memory="512M"), TCG)
    assert exc.value.exit_code == ExitCode.STATE_CONFIG and exc.value.field == "memory"
    with pytest.raises(ConfigMismatch, match=r"cpus=1.*cpus=2"):
        savestate.precheck(tmp_path / "s.vmstate", config(tmp_path, memory="512M", cpus=2), TCG)


def test_changed_disk_is_refused_unless_forced(tmp_path: Path, home: Path) -> None:
    cfg = config(tmp_path)
    key = keys.load_or_create_key()
    write_state(tmp_path / "s.vmstate", cfg, key)
    disk = tmp_path / "disk.qcow2"
    with disk.open("r+b") as fh:
        fh.seek(100)
        fh.write(b"changed")
    with pytest.raises(DisksChanged, match="disk 0"):
        savestate.precheck(tmp_path / "s.vmstate", cfg, TCG)
    savestate.precheck(tmp_path / "s.vmstate", cfg, TCG, force=True)
    disk.unlink()
    with pytest.raises(DisksChanged, match="does not exist"):
        savestate.precheck(tmp_path / "s.vmstate", cfg, TCG, force=True)


def test_other_key_and_missing_key(tmp_path: Path, home: Path) -> None:
    cfg = config(tmp_path)
    write_state(tmp_path / "s.vmstate", cfg, secrets.token_bytes(32))  # someone else's key
    keys.load_or_create_key()
    with pytest.raises(AuthenticationFailed, match="different key"):
        savestate.precheck(tmp_path / "s.vmstate", cfg, TCG)
    keys.key_path().unlink()
    with pytest.raises(AuthenticationFailed, match="key this user does not have"):
        savestate.precheck(tmp_path / "s.vmstate", cfg, TCG)


def test_bogus_and_tampered_header(tmp_path: Path, home: Path) -> None:
    cfg = config(tmp_path)
    bogus = tmp_path / "bogus"
    bogus.write_bytes(b"hello, not a state file" * 10)
    with pytest.raises(NotAStateFile):
        savestate.precheck(bogus, cfg, TCG)
    key = keys.load_or_create_key()
    write_state(tmp_path / "s.vmstate", cfg, key)
    data = bytearray((tmp_path / "s.vmstate").read_bytes())
    i = data.index(b'"ram_bytes":') + len(b'"ram_bytes":')
    data[i] = ord("9") if data[i] != ord("9") else ord("8")
    (tmp_path / "s.vmstate").write_bytes(bytes(data))
    with pytest.raises(AuthenticationFailed):
        savestate.precheck(tmp_path / "s.vmstate", cfg, TCG)


def test_forged_machine_fields_are_not_believed(tmp_path: Path) -> None:
    """The stored fields only name the changed field when they hash to the authenticated digest."""
    cfg = config(tmp_path)
    fields = savestate.machine_fields(cfg, TCG)
    path = tmp_path / "s.vmstate"
    write_state(path, cfg, secrets.token_bytes(32))
    assert savestate._stored_fields(path, savestate.config_digest(fields)) == fields
    assert savestate._stored_fields(path, "sha256:" + "0" * 64) is None


# --------------------------------------------------------------------------- snapshots


def test_snapshot_targets(tmp_path: Path) -> None:
    cfg = config(tmp_path, storage=[
        {"attachment": {"type": "disk-image", "path": str(tmp_path / "disk.qcow2")}},
        {"attachment": {"type": "disk-image", "path": str(tmp_path / "ro.raw"), "read_only": True}},
        {"id": "data", "attachment": {"type": "disk-image", "path": str(tmp_path / "b.qcow2")}},
    ])
    targets = savestate.snapshot_targets(cfg)
    assert targets.nodes == ("disk0", "data") and targets.vmstate == "disk0"
    with pytest.raises(ConfigError, match="has none"):
        savestate.snapshot_targets(config(tmp_path, storage=[]))
    with pytest.raises(ConfigError, match="writable raw disk"):
        savestate.snapshot_targets(config(tmp_path, storage=[
            {"attachment": {"type": "disk-image", "path": str(tmp_path / "w.raw")}}]))


# --------------------------------------------------------------------------- supervisor plumbing


def test_start_plan_is_the_typed_start_request() -> None:
    plan = StartPlan(restore="/x/saved.vmstate", force=True, consume=True, paused=True)
    body = plan.model_dump(mode="json", exclude_defaults=True)
    assert StartPlan.model_validate(body) == plan
    assert StartPlan.model_validate({"snapshot": "t1"}) == StartPlan(snapshot="t1")
    assert not StartPlan().active and plan.active
    with pytest.raises(ValidationError):
        StartPlan.model_validate({"restore": "/x", "paused": "yes"})  # yes/no only as true/false
    with pytest.raises(ValidationError):
        StartPlan.model_validate({"resotre": "/x"})  # a typo is refused, not ignored


# --------------------------------------------------------------------------- fallback policy


@pytest.fixture
def instance(tmp_path: Path, home: Path) -> Instance:
    inst = Instance.create(config(tmp_path))
    keys.load_or_create_key()
    return inst


def fake_start(calls: list[list[str]], fail_restore: VmkitError | None = None) -> Any:
    def start(name: str, *, plan: StartPlan | None = None, on_message: Any = None, **_: Any) -> Status:
        args = [] if plan is None else [f"{k}={v}" for k, v in plan.model_dump(exclude_defaults=True).items()]
        calls.append(args)
        if args and fail_restore is not None:
            raise fail_restore
        if args and on_message is not None:
            on_message({"progress": {"done": 10, "total": 10}})
            on_message({"started": {"restored": {"path": "p"}, "clock": {"corrected": False}}})
        return Status(state="running")

    return start


def test_start_resumes_and_says_so(instance: Instance, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    write_state(instance.saved_state_path, instance.load_config(), keys.load_key())
    calls: list[list[str]] = []
    monkeypatch.setattr(control, "start", fake_start(calls))
    monkeypatch.setattr(statectl.accel_mod, "choose", lambda _v, **_kw: TCG)
    notes: list[statectl.Note] = []
    progress: list[int] = []
    outcome = statectl.start("s", notice=notes.append, state_progress=lambda d, t: progress.append(d))
    assert calls == [[f"restore={instance.saved_state_path}", "consume=True"]]
    assert outcome.restored == {"path": "p"} and outcome.fallback is None and progress == [10]
    assert notes and notes[0].kind == "resuming" and not notes[0].warning
    assert notes[0].message.startswith("resuming s from its saved state")


@pytest.mark.parametrize("problem", ["config", "tampered", "supervisor"])
def test_start_falls_back_to_a_cold_boot(instance: Instance, monkeypatch: pytest.MonkeyPatch, problem: str) -> None:
    cfg = instance.load_config()
    write_state(instance.saved_state_path, cfg, keys.load_key())
    failure = None
    if problem == "config":
        instance.save_config(cfg.model_copy(update={"memory": 512 << 20}))
    elif problem == "tampered":
        with instance.saved_state_path.open("r+b") as fh:
            fh.seek(30)
            fh.write(b"#")
    else:  # the supervisor found the stream unusable (a class this process does not know: its exit code)
        failure = VmkitError("QEMU could not load the state")
        failure.exit_code = ExitCode.STATE_RESTORE
    calls: list[list[str]] = []
    monkeypatch.setattr(control, "start", fake_start(calls, failure))
    monkeypatch.setattr(statectl.accel_mod, "choose", lambda _v, **_kw: TCG)
    notes: list[statectl.Note] = []
    outcome = statectl.start("s", notice=notes.append)
    assert calls[-1] == [] and outcome.restored is None and outcome.fallback
    assert not instance.saved_state_path.exists()
    assert outcome.discarded == instance.saved_state_path.with_name("saved.vmstate.discarded")
    assert outcome.discarded.exists()
    assert (notes[-1].kind, notes[-1].warning) == ("booting", True)  # after "resuming", if it got that far
    assert "cannot be used" in notes[-1].message


def test_unsafe_key_is_not_a_reason_to_discard(instance: Instance, monkeypatch: pytest.MonkeyPatch) -> None:
    write_state(instance.saved_state_path, instance.load_config(), keys.load_key())
    keys.key_path().chmod(0o644)
    monkeypatch.setattr(control, "start", fake_start([]))
    monkeypatch.setattr(statectl.accel_mod, "choose", lambda _v, **_kw: TCG)
    with pytest.raises(keys.KeyFileError):
        statectl.start("s")
    assert instance.saved_state_path.exists()


def test_list_shows_saved(instance: Instance) -> None:
    assert control.view(instance).state == "stopped"
    instance.saved_state_path.write_bytes(b"x")
    assert control.view(instance).state == "saved"


# --------------------------------------------------------------------------- the save target


def test_save_target_check_refuses_backing_images_kernels_and_links(tmp_path: Path, home: Path) -> None:
    import subprocess

    base = tmp_path / "base.qcow2"
    subprocess.run(["qemu-img", "create", "-q", "-f", "qcow2", str(base), "1M"], check=True)
    overlay = tmp_path / "overlay.qcow2"
    subprocess.run(["qemu-img", "create", "-q", "-f", "qcow2", "-b", "base.qcow2", "-F", "qcow2", str(overlay)],
                   check=True)
    cfg = config(tmp_path, storage=[{"attachment": {"type": "disk-image", "path": str(overlay)}}])
    own = Instance.create(cfg)

    def refused(target: Path, message: str, *, force: bool = False) -> None:
        with pytest.raises(ConfigError) as info:
            savestate.check_save_target(target, own, force=force)
        assert info.value.exit_code == ExitCode.BAD_INPUT and "path:" in str(info.value), str(info.value)
        assert message in str(info.value), str(info.value)

    refused(base, "the backing image of storage[0] of machine s", force=True)  # relative backing name
    refused(tmp_path / "vmlinuz", "the kernel of machine s", force=True)
    linked_dir = tmp_path / "via-link"
    linked_dir.symlink_to(own.dir)
    refused(linked_dir / "state.json", "inside the directory of instance s", force=True)
    in_instance = tmp_path / "points-into-instance"
    in_instance.symlink_to(own.config_path)
    refused(in_instance, "inside the directory of instance s", force=True)
    refused(own.saved_state_path.with_name("saved.vmstate.discarded"), "inside the directory of instance s")

    savestate.check_save_target(own.saved_state_path, own)  # its own saved state: fine
    savestate.check_save_target(tmp_path / "new.vmstate", own)
    earlier = tmp_path / "earlier.vmstate"
    write_state(earlier, cfg, keys.load_or_create_key())
    savestate.check_save_target(earlier, own)  # an earlier state file is replaced without --force
    dangling = tmp_path / "dangling"
    dangling.symlink_to(tmp_path / "nowhere")
    empty = tmp_path / "empty"
    empty.touch()
    for target in (dangling, empty):
        with pytest.raises(VmkitError) as err:
            savestate.check_save_target(target, own)
        assert err.value.exit_code == ExitCode.CONFLICT and "--force" in str(err.value)
        savestate.check_save_target(target, own, force=True)


# --------------------------------------------------------------------------- key rotation


def _instances_with_saves(tmp_path: Path) -> tuple[list[Instance], Path]:
    insts = []
    for name in ("a", "b"):
        inst = Instance.create(config(tmp_path, name=name))
        write_state(inst.saved_state_path, inst.load_config(), keys.load_or_create_key())
        insts.append(inst)
    extra = tmp_path / "elsewhere.vmstate"
    write_state(extra, insts[0].load_config(), keys.load_key())
    return insts, extra


def _readable(path: Path) -> bool:
    try:
        savestate.read_verified_header(path)
        return b"".join(statefile.iter_payload(path, keys.key_for(statefile.read_info(path).key_id))) != b""
    except VmkitError:
        return False


def test_rotate_key_reencrypts_every_saved_state(tmp_path: Path, home: Path) -> None:
    (a, b), extra = _instances_with_saves(tmp_path)
    old = keys.load_key()
    foreign = a.saved_state_path.with_name("saved.vmstate.discarded")
    write_state(foreign, a.load_config(), secrets.token_bytes(32))  # discarded: another key
    foreign_bytes = foreign.read_bytes()
    outcome = statectl.rotate_key([extra])
    new = keys.load_key()
    assert new != old and outcome.new_key_id == keys.key_id(new) and outcome.old_key_id == keys.key_id(old)
    assert set(outcome.reencrypted) == {a.saved_state_path, b.saved_state_path, extra}
    assert [p for p, _ in outcome.skipped] == [foreign] and foreign.read_bytes() == foreign_bytes
    for path in outcome.reencrypted:
        savestate.precheck(path, a.load_config() if path != b.saved_state_path else b.load_config(), TCG)
        assert statefile.read_info(path).key_id == keys.key_id(new)
        with pytest.raises(AuthenticationFailed, match="different key"):
            savestate.read_verified_header(path, old)
    assert not keys.retired_path().exists() and keys.load_retired_keys() == []
    assert sorted(p.name for p in a.dir.iterdir()) == ["lock", "saved.vmstate", "saved.vmstate.discarded", "vm.yaml"]


def test_rotate_key_failing_on_a_damaged_file_changes_nothing(tmp_path: Path, home: Path) -> None:
    (a, b), extra = _instances_with_saves(tmp_path)
    old = keys.load_key()
    with b.saved_state_path.open("r+b") as fh:  # damaged in the middle: found only while re-encrypting
        fh.seek(b.saved_state_path.stat().st_size // 2)
        fh.write(b"\0garbage\0")
    before = {p: p.read_bytes() for p in (a.saved_state_path, b.saved_state_path, extra)}
    with pytest.raises(AuthenticationFailed) as info:
        statectl.rotate_key([extra])
    assert info.value.exit_code == ExitCode.STATE_AUTH and str(b.saved_state_path) in str(info.value)
    assert "nothing was changed" in str(info.value)
    assert keys.load_key() == old and not keys.retired_path().exists()
    assert {p: p.read_bytes() for p in before} == before
    assert _readable(a.saved_state_path) and _readable(extra)
    assert not [p for d in (a.dir, b.dir, tmp_path) for p in d.iterdir() if p.name.endswith(".tmp")]


def test_rotate_key_interrupted_while_renaming_keeps_every_file_readable(
        tmp_path: Path, home: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    (a, b), extra = _instances_with_saves(tmp_path)
    old = keys.load_key()
    real_commit = StateFileWriter.commit
    calls = []

    def failing_commit(self: StateFileWriter) -> Any:
        calls.append(self.path)
        if len(calls) == 2:
            self.abort()
            raise statefile.StateFileWriteError(self.path, "simulated crash")
        return real_commit(self)

    monkeypatch.setattr(StateFileWriter, "commit", failing_commit)
    with pytest.raises(statefile.StateFileWriteError) as info:
        statectl.rotate_key([extra])
    assert "run `vmkit key rotate` again" in str(info.value)
    assert keys.load_key() != old and keys.load_retired_keys() == [old]
    assert statefile.read_info(calls[1]).key_id == keys.key_id(old)
    assert all(_readable(p) for p in (a.saved_state_path, b.saved_state_path, extra))
    monkeypatch.setattr(StateFileWriter, "commit", real_commit)
    statectl.rotate_key([extra])  # again: completes it
    current = keys.key_id(keys.load_key())
    assert all(statefile.read_info(p).key_id == current for p in (a.saved_state_path, b.saved_state_path, extra))
    assert not keys.retired_path().exists()


def test_rotate_key_refuses_while_a_machine_is_supervised(tmp_path: Path, home: Path) -> None:
    import fcntl

    (a, _b), _extra = _instances_with_saves(tmp_path)
    old = keys.load_key()
    fd = os.open(a.lock_path, os.O_RDWR | os.O_CREAT, 0o600)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX)  # as its supervisor does
        with pytest.raises(VmkitError) as info:
            statectl.rotate_key()
        assert info.value.exit_code == ExitCode.WRONG_STATE and "vmkit stop --save a" in str(info.value)
    finally:
        os.close(fd)
    assert keys.load_key() == old
