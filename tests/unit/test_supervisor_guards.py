"""Bounded console buffers, serial.log rotation, strict numbers in settings, the operation gate."""

from __future__ import annotations

import asyncio
import socket
from pathlib import Path

import pytest

from vmkit.config import PortForward, Readiness, Serial, validate_model
from vmkit.daemon.state_routes import OperationGate
from vmkit.errors import ConfigError, StateError
from vmkit.runtime.serial import Backlog, SerialConsole, read_log


async def test_serial_log_rotates_at_log_max_and_read_log_joins_both_parts(tmp_path: Path) -> None:
    log = tmp_path / "serial.log"
    console = SerialConsole(log, log_max=1000)
    ours, qemu = socket.socketpair()
    console.attach(ours)
    sent = b"".join(f"line {i:05d}\n".encode() for i in range(1000))  # 11000 bytes
    for i in range(0, len(sent), 300):  # the guest prints in pieces, read one by one
        qemu.sendall(sent[i:i + 300])
        await asyncio.sleep(0.005)
    qemu.close()
    await console.drain()
    console.close()
    assert log.stat().st_size <= 1000 and (tmp_path / "serial.log.1").stat().st_size <= 1000
    joined = read_log(log)
    assert sent.endswith(joined) and len(joined) >= 1000  # at least the last log_max bytes, in order
    assert read_log(tmp_path / "none.log") == b""


async def test_serial_log_never_goes_missing_while_it_rotates(tmp_path: Path) -> None:
    """A reader (vmkit console --log, a test watching the size) must always find serial.log: it
    used to be renamed away before the new one was created."""
    import threading

    log = tmp_path / "serial.log"
    console = SerialConsole(log, log_max=200)
    ours, qemu = socket.socketpair()
    console.attach(ours)
    missing: list[str] = []
    stop = threading.Event()

    def watch() -> None:
        while not stop.is_set():
            try:
                log.stat()
            except FileNotFoundError:
                missing.append("serial.log")
            if read_log(log) == b"" and log.exists() and (tmp_path / "serial.log.1").exists():
                missing.append("both parts empty")

    watcher = threading.Thread(target=watch)
    watcher.start()
    try:
        for i in range(400):  # about 100 rotations
            qemu.sendall(f"line {i:05d} of the flood\n".encode()[:50])
            await asyncio.sleep(0.001)
        qemu.close()
        await console.drain()
    finally:
        stop.set()
        watcher.join(10)
        console.close()
    assert not missing, missing[:5]
    assert not list(tmp_path.glob(".serial.log*"))  # no temporary names left behind


async def test_backlog_drops_what_a_slow_client_cannot_take_and_tells_it() -> None:
    b = Backlog("test client", limit=100)
    for _ in range(10):
        b.put(b"x" * 30)  # 300 bytes for a client that reads nothing
    assert b.size <= 100 and b.dropped_total == 210
    assert await b.get() == b"x" * 90
    b.put(b"after")
    assert await b.get() == Backlog.notice(210) + b"after"
    b.close()
    assert await b.get() is None


@pytest.mark.parametrize(("body", "field"), [
    ({"host_port": True, "guest_port": 80}, "host_port"),
    ({"host_port": 80, "guest_port": False}, "guest_port"),
])
def test_booleans_are_not_port_numbers(body: dict[str, object], field: str) -> None:
    with pytest.raises(ConfigError) as err:
        validate_model(PortForward, body, context="port forward")
    assert [p.field for p in err.value.problems] == [field]


def test_seconds_are_finite_numbers_and_log_max_has_a_floor() -> None:
    for bad in (True, "10", float("inf"), float("nan")):
        with pytest.raises(ConfigError):
            validate_model(Readiness, {"timeout": bad}, context="readiness")
    assert Serial().log_max == 8 << 20
    assert validate_model(Serial, {"log_max": "256K"}, context="serial").log_max == 256 << 10
    with pytest.raises(ConfigError, match="too small"):
        validate_model(Serial, {"log_max": "1K"}, context="serial")
    with pytest.raises(ConfigError):
        validate_model(Serial, {"log": 1}, context="serial")


def test_operation_gate() -> None:
    gate = OperationGate()
    with gate.shared("pause", "pausing"), gate.shared("stop", "stopping"), \
            pytest.raises(StateError, match="pausing"), gate.exclusive("save the machine state", "saving"):
        pass
    with gate.exclusive("save the machine state", "saving its state to /x"):
        for enter in (lambda: gate.shared("resume", "resuming"), lambda: gate.exclusive("create a snapshot", "s")):
            with pytest.raises(StateError, match="busy saving its state to /x"), enter():
                pass
    assert gate.busy is None
