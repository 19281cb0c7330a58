"""What a guest, a slow client or a stuck device can do to its supervisor: memory and disk stay
bounded, slow console readers are told what they missed, a detach that timed out finishes later."""

from __future__ import annotations

import json
import socket
import time
from pathlib import Path

import pytest
import yaml

from conftest import pid_alive, vmkit, wait_until
from vmkit.host.images.store import Image
from vmkit.host.instance import Instance

pytestmark = pytest.mark.integration

WS_HANDSHAKE = (b"GET /v1/console HTTP/1.1\r\nHost: vmkit\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n"
                b"Sec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\nSec-WebSocket-Version: 13\r\n\r\n")
DROPPED = b"bytes of console output dropped"


def set_in_yaml(inst: Instance, **settings: object) -> None:
    path = inst.dir / "vm.yaml"
    data = yaml.safe_load(path.read_text())
    for key, value in settings.items():
        section, _, leaf = key.partition("__")
        if leaf:
            data.setdefault(section, {})[leaf] = value
        else:
            data[section] = value
    path.write_text(yaml.safe_dump(data, sort_keys=False))


def rss_kib(pid: int) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1])
    raise AssertionError(f"no VmRSS for {pid}")


def stalled_ws(api_sock: Path) -> socket.socket:
    """A websocket console client that completes the handshake and then never reads."""
    s = socket.socket(socket.AF_UNIX)
    s.connect(str(api_sock))
    s.sendall(WS_HANDSHAKE)
    head = b""
    while b"\r\n\r\n" not in head:
        chunk = s.recv(1)
        assert chunk, "the supervisor closed the websocket handshake"
        head += chunk
    assert head.startswith(b"HTTP/1.1 101"), head
    return s


def stalled_raw(console_sock: Path) -> socket.socket:
    s = socket.socket(socket.AF_UNIX)
    s.connect(str(console_sock))
    return s


def read_for(s: socket.socket, seconds: float, until: bytes) -> bytes:
    """Read what the supervisor sends for up to ``seconds`` (less once ``until`` was seen)."""
    s.settimeout(1.0)
    seen = b""
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline and until not in seen[-(1 << 20):]:
        try:
            chunk = s.recv(1 << 16)
        except TimeoutError:
            continue
        if not chunk:
            break
        seen += chunk
        seen = seen[-(4 << 20):]
    return seen


def test_console_flood_with_stalled_clients_is_bounded(vmkit_home: Path, micro_image: Image) -> None:
    # the guest prints as fast as its serial port goes, for as long as it runs
    vmkit("create", "flood", "--image", "micro", "--memory", "256M",
          "--run", "yes flood-flood-flood-flood-flood-flood > /dev/ttyS0")
    inst = Instance("flood", vmkit_home / "instances")
    set_in_yaml(inst, serial__log_max="256K")
    vmkit("start", "flood")
    spid = inst.read_status().supervisor_pid
    assert spid is not None
    clients = [stalled_ws(inst.api_socket) for _ in range(3)] + [stalled_raw(inst.console_socket) for _ in range(2)]
    try:
        time.sleep(3)  # the kernel's socket buffers fill up first
        before = rss_kib(spid)
        log = inst.dir / "serial.log"
        sizes = []
        for _ in range(30):
            time.sleep(1)
            sizes.append(log.stat().st_size)
        grown = rss_kib(spid) - before
        assert grown < 8 << 10, f"the supervisor grew by {grown} KiB in 30 s of console flood"
        rotated = inst.dir / "serial.log.1"
        assert rotated.exists(), "the guest did not print enough to fill the log once"
        assert max(sizes) <= 256 << 10 and rotated.stat().st_size <= 256 << 10

        # the slow clients are told, once they read again, how much they missed
        assert DROPPED in read_for(clients[0], 20, DROPPED)  # websocket (the notice is in a binary frame)
        assert DROPPED in read_for(clients[3], 20, DROPPED)  # console.sock
        assert pid_alive(spid) and json.loads(vmkit("list", "--json").stdout)[0]["state"] == "running"

        # the log readers see both parts of the rotated log
        printed = vmkit("console", "flood", "--log").stdout
        assert "flood-flood" in printed and (256 << 10) < len(printed) <= 512 << 10
        out = vmkit("console", "flood", "--log", "--until", r"^flood-flood-flood-flood-flood-flood$",
                    "--timeout", "30").stdout
        assert "flood-flood" in out
    finally:
        for c in clients:
            c.close()
    vmkit("stop", "--force", "flood")


def test_detach_that_times_out_finishes_when_the_guest_releases_the_disk(
        vmkit_home: Path, micro_image: Image, tmp_path: Path) -> None:
    disks = []
    for name in ("a", "b"):
        p = tmp_path / f"{name}.raw"
        with p.open("wb") as f:
            f.truncate(4 << 20)
        disks.append(p)
    vmkit("create", "hp", "--image", "micro", "--memory", "256M")
    inst = Instance("hp", vmkit_home / "instances")
    set_in_yaml(inst, hotplug_slots=1)  # a stuck detach would keep the only slot
    vmkit("start", "hp")

    def disk_states() -> dict[str, str]:
        return {r["id"]: r["state"] for r in json.loads(vmkit("disk", "list", "hp", "--json").stdout)}

    # a paused guest cannot release a disk: the detach times out, and the guest releases the
    # disk only once it runs again
    vmkit("disk", "attach", "hp", str(disks[0]), "--id", "one")
    vmkit("pause", "hp")
    slow = vmkit("disk", "detach", "hp", "one", "--timeout", "1", check=False)
    assert slow.returncode == 8 and "detach again" in slow.stderr, slow.stderr
    assert disk_states()["one"] == "detaching"
    again = vmkit("disk", "detach", "hp", "one", "--timeout", "1", check=False)  # not asked twice
    assert again.returncode == 8, again.stderr
    vmkit("resume", "hp")
    vmkit("disk", "detach", "hp", "one", "--timeout", "60")  # a retry waits for the same release
    assert "one" not in disk_states()

    # released after the caller gave up: the late DEVICE_DELETED finishes the detach by itself
    vmkit("disk", "attach", "hp", str(disks[1]), "--id", "two")  # the only slot is free again
    vmkit("pause", "hp")
    assert vmkit("disk", "detach", "hp", "two", "--timeout", "1", check=False).returncode == 8
    vmkit("resume", "hp")
    assert wait_until(lambda: "two" not in disk_states(), 60), "the late release was not noticed"
    vmkit("disk", "detach", "hp", "two")  # and a retry after that succeeds
    vmkit("disk", "attach", "hp", str(disks[0]), "--id", "three")
    vmkit("disk", "detach", "hp", "three", "--timeout", "60")
    vmkit("save", "hp")  # no hot-plugged disk left behind: the machine can be saved
    assert json.loads(vmkit("list", "--json").stdout)[0]["state"] == "saved"
