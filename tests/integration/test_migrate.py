"""Live migration between two hosts of scripts/lab.sh (network namespaces, each with its own sshd and
vmkit home): the micro guest moves under a memory workload and arrives whole (every page compared),
2 TCG vCPUs go live too (the RAM padded: vmkit.runtime.qemu.dirtysync), a guest dirtying faster than
the link still moves or is cancelled, and every failure leaves the machine running on the source with
nothing left on the target."""

from __future__ import annotations

import json
import os
import re
import shutil
import signal
import stat
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import pytest

from conftest import LAB, vmkit, vmkit_process, wait_until
from vmkit.host import doctor as host_doctor
from vmkit.host.images import micro
from vmkit.host.images.store import Image

pytestmark = [pytest.mark.integration,
              pytest.mark.skipif(os.geteuid() != 0, reason="the lab's network namespaces need root")]

DIRTIER = ("mkdir -p /d && mount -t tmpfs -o size=100m tmpfs /d && head -c 16m /dev/urandom > /d/a && "
           "head -c 16m /dev/zero > /d/z && for i in 1 2; do (while :; do cat /d/a > /d/b$i; cat /d/z > /d/b$i; "
           "done) & done; echo DIRTIER-UP")


def target_rows(lab: str) -> dict[str, dict[str, object]]:
    return {r["name"]: r for r in json.loads(vmkit("--host", lab, "list", "--json").stdout)}


def state_of(name: str) -> str:
    return str(next(r for r in json.loads(vmkit("list", "--json").stdout) if r["name"] == name)["state"])


def last_tick(text: str) -> int:
    ticks = micro.parse_ticks(text)
    return max(ticks) if ticks else -1


def ticking_on(name: str, home: Path) -> int:
    """The guest on this host still counts: a tick newer than the last one seen now appears."""
    log = home / "instances" / name / "serial.log"
    before = last_tick(log.read_text(errors="replace"))
    assert wait_until(lambda: last_tick(log.read_text(errors="replace")) > before, 30), f"{name} stopped counting"
    return last_tick(log.read_text(errors="replace"))


def target_qemus(name: str | None = None) -> list[int]:
    """QEMU processes inside the target's namespace (``name``: only that machine's, so a benchmark or
    another test using the lab at the same time does not count)."""
    pids = subprocess.run(["ip", "netns", "pids", "vmklab1"], capture_output=True, text=True).stdout.split()
    out = []
    for p in pids:
        try:
            argv = Path(f"/proc/{p}/cmdline").read_bytes().split(b"\0")
            if b"qemu-system" in argv[0] and (name is None or f"{name},debug-threads=on".encode() in argv):
                out.append(int(p))
        except OSError:
            pass
    return out


def warm_receivers() -> list[int]:
    """The warm receivers (vmkit.migrate.warm) in the target's namespace."""
    pids = subprocess.run(["ip", "netns", "pids", "vmklab1"], capture_output=True, text=True).stdout.split()
    out = []
    for p in pids:
        try:
            if Path(f"/proc/{p}/comm").read_text().strip() == "vmkit-receiver":
                out.append(int(p))
        except OSError:
            pass
    return out


def make(name: str, *, cpus: int = 1, dirty: bool = False, boot: tuple[str, ...] = ("--image", "micro")) -> None:
    cmdline = "vmkit.counter=1" + (" " + micro.run_parameter(DIRTIER) if dirty else "")
    if boot[0] != "--image":  # no image to give the console and the rest
        cmdline = f"{micro.DEFAULT_CMDLINE} {cmdline}"
    vmkit("create", name, *boot, "--memory", "256M", "--cpus", str(cpus), "--cmdline", cmdline)
    vmkit("start", name)
    if dirty:
        vmkit("console", name, "--log", "--until", "DIRTIER-UP", "--timeout", "120")


def test_live_migration_under_a_memory_workload_arrives_whole(vmkit_home: Path, micro_image: Image, lab: str,
                                                              on_target: list[str]) -> None:
    make("mv", dirty=True)
    on_target.append("mv")
    time.sleep(2)  # the dirtier is rewriting its files
    before = last_tick((vmkit_home / "instances" / "mv" / "serial.log").read_text(errors="replace"))
    res = vmkit("migrate", "mv", lab, "--verify", "--json")  # vmkit's choice, checked page by page
    out = json.loads(res.stdout)
    rep = out["report"]
    assert out["bad_pages"] == 0 and out["pages_checked"] == 256 * 1024 // 4
    assert rep["method"] == "live" and rep["rounds"] >= 2  # live pre-copy: the padded RAM is tracked exactly
    assert rep["query"]["status"] == "completed" and rep["downtime_ms"] is not None
    assert rep["transferred_bytes"] > 16 << 20

    # it runs on the target, counting on from where it was
    assert target_rows(lab)["mv"]["state"] == "running"
    tgt_log = vmkit("--host", lab, "console", "mv", "--log", "--until", r"vmkit-tick \d+\n", "--timeout", "60").stdout
    assert last_tick(tgt_log) > before
    # and here it is `migrated`: no QEMU, start refused, delete removes the old copy
    assert state_of("mv") == "migrated"
    refused = vmkit("start", "mv", check=False)
    assert refused.returncode == 4 and "migrated" in refused.stderr and lab in refused.stderr
    vmkit("delete", "mv")
    assert not (vmkit_home / "instances" / "mv").exists()


def test_two_tcg_vcpus_go_live_with_padded_ram_and_arrive_whole(vmkit_home: Path, micro_image: Image, lab: str,
                                                                on_target: list[str]) -> None:
    """QEMU 7.2 under TCG lost pages of 2 dirtying vCPUs (3 runs of 6 with plain QMP, migrate_bench
    --check); vmkit pads the RAM (vmkit.runtime.qemu.dirtysync) and migrates them live, by default."""
    make("m2", cpus=2, dirty=True)
    on_target.append("m2")
    time.sleep(2)
    res = vmkit("migrate", "m2", lab, "--verify")
    text = " ".join(res.stdout.split())
    assert "0 of 65536 pages differ" in text
    assert "(live: QEMU" in text and "8 KiB over one: live pre-copy is safe" in text, text
    assert target_rows(lab)["m2"]["state"] == "running"
    doctor = " ".join(vmkit("doctor").stdout.split())
    assert "live pre-copy" in doctor and "8 KiB more RAM" in doctor, doctor
    check = host_doctor.migration_check("tcg")  # (the table wraps its cells; the check itself says it whole)
    assert check.ok and "stall" in check.detail and check.hint is not None, check
    assert "QEMU >= 9.0 (on Debian 12: bookworm-backports)" in check.hint, check  # the remedy


def test_a_machine_with_hot_pluggable_memory_is_copied_paused_and_arrives_whole(
        vmkit_home: Path, micro_image: Image, lab: str, on_target: list[str]) -> None:
    """virtio-mem memory (``max_memory``) is a RAM block of its own, a multiple of 128 MiB, which no pad
    can take off QEMU 7.2's fast dirty-sync path under TCG: vmkit copies such a machine with the guest
    paused, by default, says why, and it arrives whole (every page compared) and runs on the target."""
    vmkit("create", "mm", "--image", "micro", "--memory", "256M", "--max-memory", "384M",
          "--cmdline", "vmkit.counter=1 " + micro.run_parameter(DIRTIER))
    vmkit("start", "mm")
    on_target.append("mm")
    vmkit("console", "mm", "--log", "--until", "DIRTIER-UP", "--timeout", "120")
    time.sleep(2)  # the dirtier is rewriting its files
    before = last_tick((vmkit_home / "instances" / "mm" / "serial.log").read_text(errors="replace"))
    out = json.loads(vmkit("migrate", "mm", lab, "--verify", "--json").stdout)
    rep = out["report"]
    assert rep["method"] == "paused", rep
    reason = " ".join(rep["method_reason"].split())
    assert "hot-pluggable memory (virtio-mem)" in reason and "the guest is paused while its memory is copied" in reason
    assert any("copying with the guest paused" in n and "virtio-mem" in n for n in rep["notes"]), rep["notes"]
    # paused from before the copy began to its end: the whole copy is downtime
    assert rep["paused_ms"] >= rep["total_time_ms"] > 0, rep
    assert out["bad_pages"] == 0 and out["pages_checked"] == 256 * 1024 // 4
    assert target_rows(lab)["mm"]["state"] == "running"
    tgt_log = vmkit("--host", lab, "console", "mm", "--log", "--until", r"vmkit-tick \d+\n", "--timeout", "60").stdout
    assert last_tick(tgt_log) > before
    there = json.loads(vmkit("--host", lab, "stats", "mm", "--json").stdout)
    assert there["max_memory_bytes"] == 384 << 20 and there["memory_bytes"] == 256 << 20, there
    assert state_of("mm") == "migrated"


@pytest.mark.timeout(900)
def test_a_guest_dirtying_faster_than_the_link_can_be_cancelled_or_still_moves(
        vmkit_home: Path, micro_image: Image, lab: str, on_target: list[str]) -> None:
    """Default options over a slow link (--bandwidth) while the guest rewrites 32 MiB again and again:
    Ctrl-C leaves it running here; left alone, the migration completes (auto-converge throttles the
    guest, or after --max-rounds it is paused so the copy completes) and says which."""
    make("md", dirty=True)
    on_target.append("md")
    proc = subprocess.Popen([sys.executable, "-m", "vmkit.cli.main", "migrate", "md", lab, "--bandwidth", "4"],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            env={**os.environ, "COLUMNS": "250"})
    assert proc.stderr is not None
    seen = ""
    deadline = time.monotonic() + 180
    while "active: round 2" not in seen and time.monotonic() < deadline:  # it has gone round once already
        seen += proc.stderr.readline()
    assert "active: round 2" in seen, seen
    proc.send_signal(signal.SIGINT)
    _, err = proc.communicate(timeout=120)
    assert proc.returncode == 130, err
    assert state_of("md") == "running"
    ticking_on("md", vmkit_home)
    assert "md" not in target_rows(lab)
    assert wait_until(lambda: not target_qemus("md"), 20), "a QEMU was left on the target"

    t0 = time.monotonic()
    # default options but a bound of 10 rounds instead of 30 (CI's time): auto-converge, else paused
    out = json.loads(vmkit("migrate", "md", lab, "--bandwidth", "8", "--max-rounds", "10", "--json",
                           timeout=800).stdout)
    rep = out["report"]
    assert rep["query"]["status"] == "completed" and target_rows(lab)["md"]["state"] == "running"
    # the cancelled migration's receiver (cold, or itself warm) left a warm one: this one started no Python there
    assert out["receiver"] == "warm", out
    assert warm_receivers(), "no vmkit-receiver runs on the target"
    sock = LAB / "vmklab1" / "home" / "run" / "migrate-receive.sock"
    assert stat.S_IMODE(sock.stat().st_mode) == 0o600 and stat.S_IMODE(sock.parent.stat().st_mode) == 0o700
    notes = " ".join(rep["notes"])
    if rep["method"] == "live":  # auto-converge made it converge
        assert rep["throttle_percent"] and "auto-converge slowed the guest's vCPUs" in notes, rep
    else:  # the backstop: paused after --max-rounds
        assert rep["method"] == "paused" and "not converging after" in notes, rep
    print(f"slow link: {rep['method']}, {rep['rounds']} rounds, throttled {rep['throttle_percent']}%, "
          f"{time.monotonic() - t0:.0f} s")


def test_every_failure_leaves_the_machine_running_on_the_source(vmkit_home: Path, micro_image: Image, lab: str,
                                                                on_target: list[str], tmp_path: Path) -> None:
    assert micro_image.kernel is not None and micro_image.initrd is not None
    kernel = tmp_path / "vmlinuz"
    shutil.copyfile(micro_image.kernel, kernel)
    make("mf", boot=("--kernel", str(kernel), "--initrd", str(micro_image.initrd)))
    on_target.append("mf")

    def still_here(res: subprocess.CompletedProcess[str], code: int, text: str) -> None:
        assert res.returncode == code, f"exit {res.returncode}:\n{res.stdout}\n{res.stderr}"
        assert text in " ".join(res.stderr.split()), res.stderr
        assert state_of("mf") == "running"
        ticking_on("mf", vmkit_home)
        assert "mf" not in target_rows(lab)
        assert wait_until(lambda: not target_qemus(), 20), "a QEMU was left on the target"
        assert not (LAB / "vmklab1" / "home" / "instances" / "mf").exists()

    # the target cannot be reached
    still_here(vmkit("migrate", "mf", "ssh://root@10.231.0.99", check=False), 1, "cannot run vmkit there")
    # the target lacks the machine's kernel (both "hosts" see one filesystem: take it away from both)
    kernel.unlink()
    still_here(vmkit("migrate", "mf", lab, check=False), 6, "the target lacks")
    shutil.copyfile(micro_image.kernel, kernel)
    # a machine of that name exists there (and stays as it was)
    vmkit("--host", lab, "create", "mf", "--image", "micro", "--memory", "64M")
    res = vmkit("migrate", "mf", lab, check=False)
    assert res.returncode == 4 and "exists on the target" in " ".join(res.stderr.split()), res.stderr
    assert target_rows(lab)["mf"]["state"] == "stopped"
    vmkit("--host", lab, "delete", "mf")

    # Ctrl-C while it runs (1 MiB/s: it would take minutes)
    def start_slow() -> subprocess.Popen[str]:
        proc = subprocess.Popen([sys.executable, "-m", "vmkit.cli.main", "migrate", "mf", lab, "--bandwidth", "1"],
                                stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                                env={**os.environ, "COLUMNS": "250"})
        assert proc.stderr is not None
        seen = ""
        deadline = time.monotonic() + 120
        while "active: round" not in seen and time.monotonic() < deadline:
            seen += proc.stderr.readline()
        assert "active: round" in seen, seen
        return proc

    proc = start_slow()
    proc.send_signal(signal.SIGINT)
    _, err = proc.communicate(timeout=120)
    assert proc.returncode == 130, err
    still_here(subprocess.CompletedProcess([], 130, "", "interrupted"), 130, "interrupted")

    # `vmkit migrate --cancel` from another terminal while it runs
    proc = start_slow()
    cancelled = vmkit("migrate", "--cancel", "mf")
    assert "cancelled the migration of mf: it is running here" in " ".join(cancelled.stdout.split())
    _, err = proc.communicate(timeout=120)
    assert proc.returncode == 18 and "cancelled" in err, err
    still_here(subprocess.CompletedProcess([], 18, "", err), 18, "cancelled")

    # the target dies mid-way
    proc = start_slow()
    qemus = target_qemus()
    assert len(qemus) == 1
    os.kill(qemus[0], signal.SIGKILL)
    _, err = proc.communicate(timeout=180)
    assert proc.returncode != 0 and re.search(r"migration (failed|cancelled)", err), err
    still_here(subprocess.CompletedProcess([], proc.returncode, "", err), proc.returncode, "the migration")
    vmkit("stop", "--force", "mf")


def test_a_failure_at_the_switch_over_never_leaves_two_running_copies(vmkit_home: Path, micro_image: Image,
                                                                     lab: str, on_target: list[str]) -> None:
    from vmkit.migrate.send import FAULT_ENV

    make("mt")
    on_target.append("mt")

    def refused_here(hint: str) -> None:
        assert state_of("mt") == "paused"
        for args in (("resume", "mt"), ("save", "mt"), ("snapshot", "create", "mt", "s1")):
            res = vmkit(*args, check=False)
            assert res.returncode == 4 and f"migrated to {lab}" in " ".join(res.stderr.split()), res.stderr
            assert hint in " ".join(res.stderr.split()), res.stderr

    # `vmkit migrate` is killed the moment the copy completed, before the target was told to run the guest:
    # the target removes what it made (its receiver's input closed), the copy here waits paused and refuses to run
    killed = vmkit_process("migrate", "mt", lab, check=False, env={FAULT_ENV: "before-takeover"})
    assert killed.returncode == -signal.SIGKILL, killed.stderr
    assert wait_until(lambda: "mt" not in target_rows(lab), 60), "the target kept the machine"
    assert wait_until(lambda: not target_qemus("mt"), 30), "a QEMU was left on the target"
    refused_here("vmkit migrate --cancel mt")
    back = vmkit("migrate", "--cancel", "mt")  # the target does not have it: taken back
    assert "took back mt: it is running here" in " ".join(back.stdout.split())
    assert state_of("mt") == "running"
    ticking_on("mt", vmkit_home)
    assert vmkit("migrate", "--cancel", "mt", check=False).returncode == 4  # nothing to cancel now

    # ending the copy here fails once the target runs the guest: it runs there, and this copy never runs again
    failed = vmkit_process("migrate", "mt", lab, check=False, env={FAULT_ENV: "after-takeover"})
    assert failed.returncode == 18 and f"mt runs on {lab} now" in " ".join(failed.stderr.split()), failed.stderr
    assert target_rows(lab)["mt"]["state"] == "running"
    ticking_on("mt", LAB / "vmklab1" / "home")  # the guest counts on there
    refused_here("vmkit delete --force mt")
    cancel = vmkit("migrate", "--cancel", "mt", check=False)  # the target has it: not taken back
    assert cancel.returncode == 18 and "must not run again" in " ".join(cancel.stderr.split()), cancel.stderr
    assert state_of("mt") == "paused"
    vmkit("delete", "--force", "mt")
    assert target_rows(lab)["mt"]["state"] == "running"  # the one copy left


@pytest.mark.parametrize("tls", [False, True], ids=["plain", "tls"])
def test_local_disks_are_copied_while_the_guest_writes(vmkit_home: Path, micro_image: Image, lab: str,
                                                       on_target: list[str], tls: bool) -> None:
    """The disk is mirrored over NBD while the guest writes it (with --tls the target's NBD server
    takes TLS clients only, so a copy that arrives came under the migration's certificates), the
    memory goes live (padded RAM: vmkit.runtime.qemu.dirtysync) and is checked page by page."""
    # 8 MiB of random data, then a writer that keeps rewriting MiB 20 with MiB 0 (the same bytes on
    # both hosts, so the disks can be compared after the target ran on)
    writer = ("head -c 8m /dev/urandom > /dev/vda; sync; echo DISK-WRITTEN; (while :; do "
              "dd if=/dev/vda of=/dev/vda bs=1M count=1 seek=20 conv=notrunc 2>/dev/null; sync; done) &")
    vmkit("create", "ms", "--image", "micro", "--memory", "128M", "--cmdline",
          f"vmkit.counter=1 {micro.run_parameter(writer)}")
    on_target.append("ms")
    inst = vmkit_home / "instances" / "ms"
    disk = inst / "data.qcow2"
    subprocess.run(["qemu-img", "create", "-q", "-f", "qcow2", str(disk), "64M"], check=True)
    config = inst / "vm.yaml"  # a disk in the machine's own directory, as a cloud image's overlay is
    text = config.read_text().replace("storage: []", "storage:\n- kind: virtio-blk\n  attachment:\n"
                                      f"    type: disk-image\n    path: {disk}\n    format: qcow2")
    config.write_text(text)
    vmkit("start", "ms")
    vmkit("console", "ms", "--log", "--until", "DISK-WRITTEN", "--timeout", "60")

    refused = vmkit("migrate", "ms", lab, check=False)
    assert refused.returncode == 2 and "--copy-storage" in refused.stderr
    assert state_of("ms") == "running" and "ms" not in target_rows(lab)

    out = json.loads(vmkit("migrate", "ms", lab, "--copy-storage", "--verify", *(["--tls"] if tls else []),
                           "--json").stdout)
    assert out["bad_pages"] == 0 and out["report"]["method"] == "live"
    assert any("the disk copy are TLS" in n for n in out["report"]["notes"]) == tls
    assert not (vmkit_home / "instances" / "ms" / "migration-tls").exists()
    assert out["report"]["disks_copied"] == ["disk0"] and out["report"]["disk_bytes"] >= 8 << 20
    assert target_rows(lab)["ms"]["state"] == "running"
    copy = LAB / "vmklab1" / "home" / "instances" / "ms" / "data.qcow2"
    vmkit("--host", lab, "stop", "--force", "ms")
    cmp = subprocess.run(["qemu-img", "compare", str(disk), str(copy)], capture_output=True, text=True)
    assert cmp.returncode == 0, cmp.stdout + cmp.stderr
    assert "identical" in cmp.stdout


def test_offline_move_resumes_on_the_target_with_its_own_key(vmkit_home: Path, micro_image: Image, lab: str,
                                                             on_target: list[str]) -> None:
    vmkit("create", "mo", "--image", "micro", "--memory", "128M", "--cmdline", "vmkit.counter=1")
    on_target.append("mo")
    inst = vmkit_home / "instances" / "mo"
    disk = inst / "data.raw"
    subprocess.run(["qemu-img", "create", "-q", "-f", "raw", str(disk), "32M"], check=True)
    with disk.open("r+b") as fh:  # some data, and a long hole
        fh.write(os.urandom(1 << 20))
    config = inst / "vm.yaml"
    config.write_text(config.read_text().replace("storage: []", "storage:\n- kind: virtio-blk\n  attachment:\n"
                                                 f"    type: disk-image\n    path: {disk}\n    format: raw"))
    vmkit("start", "mo")
    vmkit("console", "mo", "--log", "--until", r"vmkit-tick [3-9]\n", "--timeout", "60")
    refused = vmkit("migrate", "--offline", "mo", lab, check=False)  # a running machine moves live
    assert refused.returncode == 4 and "stopped or saved" in refused.stderr
    vmkit("stop", "--save", "mo")
    last = last_tick((inst / "serial.log").read_text(errors="replace"))

    res = vmkit("migrate", "--offline", "mo", lab, "--json")
    moved = json.loads(res.stdout)
    assert moved["state"] is True and moved["disks"] == ["disk0"]
    assert state_of("mo") == "migrated" and target_rows(lab)["mo"]["state"] == "saved"
    there = LAB / "vmklab1" / "home"
    assert (there / "config" / "state.key").read_bytes() != (vmkit_home / "config" / "state.key").read_bytes()
    copy = there / "instances" / "mo" / "data.raw"
    assert copy.read_bytes() == disk.read_bytes()
    assert copy.stat().st_blocks * 512 < 8 << 20  # the hole stayed a hole

    started = vmkit("--host", lab, "start", "mo")
    assert "resumed" in started.stdout
    log = vmkit("--host", lab, "console", "mo", "--log", "--until", rf"vmkit-tick {last + 2}\n", "--timeout", "60")
    assert last_tick(log.stdout) >= last + 2
    assert min(t for t in micro.parse_ticks(log.stdout)) > last - 1  # it went on, it did not boot again
    vmkit("delete", "mo")


LAB_SH = Path(__file__).resolve().parents[2] / "scripts" / "lab.sh"
SPAN_SUBNET = "10.119.9.0/24"
OBSERVER = "10.119.9.250"
ECHO = ("ip link set eth0 up; "
        "printf '#!/bin/sh\\n[ \"$1\" = bound ] && ip addr add $ip/$mask dev $interface\\nexit 0\\n' > /tmp/dh; "
        "chmod +x /tmp/dh; udhcpc -i eth0 -q -n -t 20 -T 1 -s /tmp/dh >/dev/null 2>&1; "
        "nc -ll -p 7000 -e cat & echo ECHO-UP $(ip -4 -o addr show eth0 | awk '{print $4}') "
        "$(cat /sys/class/net/eth0/address)")


def probe(address: str, port: int) -> subprocess.Popen[str]:
    """vmkit.net.probes.GAPS in the lab's observer host (vmklab2), once its TCP session is open."""
    from vmkit.net.probes import GAPS

    proc = subprocess.Popen(["ip", "netns", "exec", "vmklab2", "python3", "-c", GAPS, address, str(port), "0.01"],
                            stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    assert proc.stdout is not None
    line = proc.stdout.readline()
    assert line.strip() == "PROBING", line + (proc.stderr.read() if proc.stderr else "")
    return proc


def test_a_machine_on_a_spanning_network_keeps_its_address_and_tcp_session_over_tls(
        vmkit_home: Path, micro_image: Image, lab: str, on_target: list[str]) -> None:
    # the same network on both hosts, joined at layer 2 by the lab, and an observer host on it
    vmkit("network", "create", "span", "--mode", "isolated", "--subnet", SPAN_SUBNET)
    try:
        vmkit("create", "mn", "--image", "micro", "--memory", "128M", "--network", "span", "--run", ECHO)
        on_target.append("mn")
        vmkit("start", "mn")
        # the whole MAC (a serial log read mid-write once ended "ECHO-UP 10.119.9.2/24 5")
        whole = r"ECHO-UP (\S+)/24 ((?:[0-9a-f]{2}:){5}[0-9a-f]{2})"
        up = vmkit("console", "mn", "--log", "--until", whole, "--timeout", "120").stdout
        address, mac = re.findall(whole, up)[-1]
        member = json.loads(vmkit("network", "inspect", "span").stdout)["machines"][0]
        assert (member["address"], member["mac"]) == (address, mac)

        # a network the target lacks is refused by name, and nothing moves
        res = vmkit("migrate", "mn", lab, check=False)
        assert res.returncode == 3 and "network 'span' does not exist on the target" in " ".join(res.stderr.split())
        assert state_of("mn") == "running" and "mn" not in target_rows(lab)

        vmkit("--host", lab, "network", "create", "span", "--mode", "isolated", "--subnet", SPAN_SUBNET)
        linked = subprocess.run([str(LAB_SH), "link", "span",
                                 f"{OBSERVER}/24"], capture_output=True, text=True, timeout=60)
        assert linked.returncode == 0 and "vmklab1" in linked.stdout, linked.stdout + linked.stderr

        prober = probe(address, 7000)
        time.sleep(1)
        report = json.loads(vmkit("migrate", "mn", lab, "--tls", "--json").stdout)["report"]
        assert any("TLS" in n for n in report["notes"]), report["notes"]
        assert not (vmkit_home / "instances" / "mn" / "migration-tls").exists()  # the certificates are gone
        assert not (LAB / "vmklab1" / "home" / "instances" / "mn" / "migration-tls").exists()
        assert prober.stdin is not None and prober.stdout is not None
        prober.stdin.write("mark\n")
        prober.stdin.flush()
        time.sleep(3)
        out, err = prober.communicate("stop\n", timeout=30)
        assert out.strip(), err
        seen = json.loads(out.strip().splitlines()[-1])
        # the open TCP session to the guest survived the move and still echoes
        assert seen["tcp"]["error"] is None, seen
        assert seen["tcp"]["echoed_after_mark"] >= 5 and seen["replies_after_mark"] >= 50, seen

        # it keeps its MAC and address there; the static lease moved with it
        there = json.loads(vmkit("--host", lab, "network", "inspect", "span").stdout)["machines"]
        assert [(m["machine"], m["address"], m["mac"]) for m in there] == [("mn", address, mac)]
        assert json.loads(vmkit("network", "inspect", "span").stdout)["machines"] == []
        neigh = subprocess.run(["ip", "-n", "vmklab2", "neigh", "show", address], capture_output=True, text=True)
        assert mac in neigh.stdout
        vmkit("--host", lab, "delete", "--force", "mn")
        vmkit("delete", "mn")
    finally:
        vmkit("--host", lab, "delete", "--force", "mn", check=False)
        vmkit("--host", lab, "network", "delete", "--force", "span", check=False)
        vmkit("network", "delete", "--force", "span", check=False)
        subprocess.run([str(LAB_SH), "unlink", "span"], capture_output=True, timeout=60)


def test_the_python_client_acts_on_another_host(vmkit_home: Path, micro_image: Image, lab: str,
                                                on_target: list[str]) -> None:
    import vmkit
    from vmkit.api import models
    from vmkit.errors import ConfigError, NotFoundError

    there = vmkit.Client(host=lab)
    assert there.host == lab and repr(there) == f"vmkit.Client(host={lab!r})"
    on_target.append("rc")
    inst = there.create("rc", image="micro", memory="128M", cmdline="vmkit.counter=1")
    assert inst.name == "rc" and inst.state == "stopped"
    started = inst.start()
    assert isinstance(started, models.StartResult)
    assert inst.wait_console(r"vmkit-tick [2-9]", timeout=60)
    status = inst.pause()
    assert isinstance(status, models.RuntimeStatus) and status.state == "paused"
    inst.resume()
    assert [r.name for r in there.rows()] == ["rc"] and there.get("rc").state == "running"
    # it is there, not here
    assert (LAB / "vmklab1" / "home" / "instances" / "rc" / "vm.yaml").exists()
    assert vmkit.Client().rows() == []
    assert str(inst.directory).startswith(str(LAB / "vmklab1" / "home"))
    with pytest.raises(NotFoundError) as missing:
        there.get("nope")
    assert missing.value.exit_code == 3 and "nope" in missing.value.message
    with pytest.raises(ConfigError, match="not available for another host"):
        inst.events()
    with pytest.raises(ConfigError, match="callback"):
        inst.migrate(lab, on_event=print)
    inst.stop(force=True)
    inst.delete()
    assert there.rows() == []


def test_commands_to_another_host_share_one_ssh_connection(vmkit_home: Path, lab: str) -> None:
    """As ssh's ControlPersist: the commands to one host reuse one connection (no new handshake: ssh, told to
    say what it does, says it asked the master for a session); with VMKIT_SSH_PERSIST=0 each connects anew."""
    with tempfile.TemporaryDirectory(prefix="vk", dir="/tmp") as short:  # a socket's path is short
        config = Path(short) / "ssh_config"
        config.write_text(f"LogLevel DEBUG1\nInclude {LAB / 'ssh_config'}\n")
        env: dict[str, str | None] = {"XDG_RUNTIME_DIR": short, "VMKIT_SSH_PERSIST": "30",
                                      "VMKIT_SSH_CONFIG": str(config)}
        said = []
        for _ in range(3):
            res = vmkit("--host", lab, "list", "--json", env=env)
            assert isinstance(json.loads(res.stdout), list), res.stderr
            said.append(res.stderr)
        assert "Connecting to" in said[0]  # the first one connects, and its connection stays as the master
        for err in said[1:]:
            assert "mux_client_request_session" in err and "Connecting to" not in err, err
        sockets = [p for p in (Path(short) / "vmkit" / "ssh").iterdir()]
        assert len(sockets) == 1 and stat.S_ISSOCK(sockets[0].stat().st_mode)
        assert stat.S_IMODE(sockets[0].parent.stat().st_mode) == 0o700
        done = subprocess.run(["ssh", "-F", str(config), "-o", f"ControlPath={sockets[0]}", "-O", "exit",
                               "root@10.231.0.11"], capture_output=True, text=True, timeout=30)
        assert done.returncode == 0, done.stderr  # a master was up; it ends now
        off = {**env, "VMKIT_SSH_PERSIST": "0"}
        for _ in range(2):
            err = vmkit("--host", lab, "list", "--json", env=off).stderr
            assert "Connecting to" in err and "mux_client" not in err, err
        assert not list((Path(short) / "vmkit" / "ssh").iterdir())
