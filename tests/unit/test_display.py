"""Unit tests of the screen and keyboard: key names and text to key presses, display sizes, the
display's command line (golden), vm.yaml's ``display:``, ``create --display``, the login prompt in
the seed, and the RFB client against a protocol-level fake VNC server."""

from __future__ import annotations

import asyncio
import os
import struct
from pathlib import Path
from typing import Any

import pytest

from conftest import serving_unix
from vmkit.api import models
from vmkit.config import Display, MachineConfig, parse_config
from vmkit.errors import ConfigError, QemuError
from vmkit.host import cloudinit
from vmkit.host.builder import CreateOptions, config_from_options, with_screen_console
from vmkit.runtime import display
from vmkit.runtime.qemu import cmdline

GOLDEN = Path(__file__).parent / "golden"
RUNTIME = cmdline.Runtime(qmp_fd=3, serial_fd=4)


def config(**overrides: Any) -> MachineConfig:
    return parse_config({"name": "vm1", "boot": {"kernel": "/images/micro/vmlinuz"}, **overrides})


def check_golden(name: str, argv: list[str]) -> None:
    """As test_cmdline's golden files (VMKIT_UPDATE_GOLDEN=1 there regenerates this one too)."""
    path = GOLDEN / f"{name}.txt"
    if os.environ.get("VMKIT_UPDATE_GOLDEN") == "1":
        path.write_text("".join(f"{a}\n" for a in argv))
    assert argv == path.read_text().splitlines(), f"argv differs from {path}"


def test_combos_and_aliases() -> None:
    assert display.parse_combo("ctrl-alt-delete") == ("ctrl", "alt", "delete")
    assert display.parse_combo("Enter") == ("ret",)
    assert display.parse_combo("shift-minus") == ("shift", "minus")
    with pytest.raises(ConfigError) as exc:
        display.parse_combo("ctrl-alt-dele", field="keys[2]")
    assert exc.value.problems[0].field == "keys[2]" and "'dele'" in exc.value.problems[0].message
    for bad in ("", "ctrl--x", "a-a"):
        with pytest.raises(ConfigError):
            display.parse_combo(bad)


def test_text_to_presses_on_a_us_layout() -> None:
    assert display.text_keys("aZ 9\n") == [("a",), ("shift", "z"), ("spc",), ("9",), ("ret",)]
    assert display.text_keys("$((6*7)) > /x") == [
        ("shift", "4"), ("shift", "9"), ("shift", "9"), ("6",), ("shift", "8"), ("7",), ("shift", "0"),
        ("shift", "0"), ("spc",), ("shift", "dot"), ("spc",), ("slash",), ("x",)]
    every = "".join(chr(c) for c in range(0x20, 0x7F)) + "\t\n"
    assert len(display.text_keys(every)) == len(every)  # every printable ASCII character can be typed
    assert all(k in display.QCODES for press in display.text_keys(every) for k in press)
    with pytest.raises(ConfigError) as exc:
        display.text_keys("caf\u00e9", field="TEXT")
    assert exc.value.problems[0].field == "TEXT" and "character 4" in exc.value.problems[0].message
    with pytest.raises(ConfigError):
        display.text_keys("a" * (display.MAX_KEYS + 1))


def test_display_sizes() -> None:
    assert display.parse_size("1024x768") == (1024, 768)
    assert display.parse_size(" 800X600 ") == (800, 600)
    for bad in ("1024", "x768", "10x10", "99999x10", "1024x768x2", "-1x5"):
        with pytest.raises(ConfigError) as exc:
            display.parse_size(bad)
        assert exc.value.problems[0].field == "--size"


def test_golden_display_args() -> None:
    argv = cmdline.display_args(Display(), RUNTIME) + cmdline.display_args(
        Display(type="virtio-gpu", width=1920, height=1080), cmdline.Runtime(3, 4, share_dir=Path("/vms/a,b")))
    check_golden("display", argv)


def test_display_is_off_by_default_and_checked() -> None:
    assert config().display is None
    assert "-vnc" not in cmdline.build_argv(config(), cmdline.AccelChoice("tcg", "t"), RUNTIME)
    argv = cmdline.build_argv(config(display={"width": 1024, "height": 768}), cmdline.AccelChoice("tcg", "t"),
                              RUNTIME)
    assert "virtio-vga,id=video0,edid=on,xres=1024,yres=768" in argv
    with pytest.raises(ConfigError) as exc:
        config(display={"width": 100, "type": "vga"})
    fields = {p.field for p in exc.value.problems}
    assert fields == {"display.width", "display.type"}


def test_create_display_adds_the_screen_console(tmp_path: Path) -> None:
    kernel = tmp_path / "vmlinuz"
    kernel.write_bytes(b"k")
    cfg = config_from_options(CreateOptions(name="d", kernel=kernel, cmdline="console=ttyS0 quiet",
                                            display="1920x1080"))
    assert cfg.display == Display(width=1920, height=1080)
    assert cfg.boot.cmdline == "console=tty0 console=ttyS0 quiet"  # the serial port stays /dev/console
    assert config_from_options(CreateOptions(name="d", kernel=kernel, display="default")).display == Display()
    assert config_from_options(CreateOptions(name="d", kernel=kernel)).display is None
    with pytest.raises(ConfigError) as exc:
        config_from_options(CreateOptions(name="d", kernel=kernel, display="huge"))
    assert exc.value.problems[0].field == "--display"
    assert with_screen_console("console=tty0 console=ttyS0") == "console=tty0 console=ttyS0"
    assert with_screen_console("quiet") == "quiet console=tty0"


def test_the_seed_brings_the_login_prompt_back_only_with_a_display() -> None:
    base: dict[str, Any] = {"hostname": "h", "user": "u", "authorized_keys": ("ssh-ed25519 AAAA",), "host_keys": None}
    assert "bootcmd" not in cloudinit.base_user_data(**base)
    cfg = cloudinit.base_user_data(**base, login_screen=True)
    assert cfg["bootcmd"] == [cloudinit.LOGIN_SCREEN_CMD]
    assert "getty@tty1" in " ".join(cloudinit.LOGIN_SCREEN_CMD)


def test_api_models_refuse_loose_input() -> None:
    from pydantic import ValidationError

    for bad in ({"keys": []}, {"keys": ["a"], "hold_ms": "5"}, {"keys": ["a"], "x": 1}):
        with pytest.raises(ValidationError):
            models.KeysRequest.model_validate(bad)
    with pytest.raises(ValidationError):
        models.DisplayResize.model_validate({"width": 1024.0, "height": 768})


# -- the RFB client against a fake VNC server -------------------------------------------------------------
class FakeVnc:
    """Just enough of QEMU's VNC server: greeting, security None, ServerInit, then SetDesktopSize answered
    with "request forwarded" and a mode change to ``shows(w, h)``."""

    def __init__(self, width: int, height: int, cap: tuple[int, int] | None = None, refuse: int = 0) -> None:
        self.size = (width, height)
        self.cap = cap
        self.refuse = refuse
        self.requests: list[tuple[int, int]] = []
        self.encodings: list[int] = []

    async def __call__(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        writer.write(b"RFB 003.008\n")
        assert await reader.readexactly(12) == b"RFB 003.008\n"
        writer.write(b"\x01\x01")
        assert await reader.readexactly(1) == b"\x01"
        writer.write(struct.pack(">I", 0))
        assert await reader.readexactly(1) == b"\x01"  # shared
        name = b"fake"
        writer.write(struct.pack(">HH", *self.size) + bytes([32, 24, 0, 1]) + b"\0" * 12
                     + struct.pack(">I", len(name)) + name)
        try:
            while kind := await reader.readexactly(1):
                if kind[0] == 2:
                    n = struct.unpack(">xH", await reader.readexactly(3))[0]
                    self.encodings = list(struct.unpack(f">{n}i", await reader.readexactly(4 * n)))
                elif kind[0] == 251:
                    w, h, screens = struct.unpack(">xHHBx", await reader.readexactly(7))
                    await reader.readexactly(16 * screens)
                    self.requests.append((w, h))
                    writer.write(self._ext(1, self.refuse or 4, *self.size))
                    if not self.refuse:
                        writer.write(b"\x02")  # a bell in between: skipped
                        self.size = (min(w, self.cap[0]), min(h, self.cap[1])) if self.cap else (w, h)
                        writer.write(self._ext(0, 0, *self.size))
                    await writer.drain()
        except asyncio.IncompleteReadError:
            pass
        writer.close()

    @staticmethod
    def _ext(x: int, y: int, w: int, h: int) -> bytes:
        rect = struct.pack(">HHHHi", x, y, w, h, -308) + struct.pack(">B3x", 1) + struct.pack(">IHHHHI", 0, 0, 0, w,
                                                                                              h, 0)
        return struct.pack(">BxH", 0, 1) + rect


@pytest.mark.parametrize(("fake", "ask", "expect"), [
    (FakeVnc(1280, 800), (1024, 768), (1024, 768)),
    (FakeVnc(1280, 800, cap=(1280, 800)), (1600, 1000), (1280, 800)),
    (FakeVnc(800, 600), (800, 600), (800, 600)),
])
async def test_rfb_set_desktop_size(sockdir: Path, fake: FakeVnc, ask: tuple[int, int],
                                    expect: tuple[int, int]) -> None:
    sock = sockdir / "vnc.sock"
    async with serving_unix(fake, sock):
        assert await display.desktop_size(sock) == fake.size
        got = await display.set_desktop_size(sock, *ask, timeout=5, settle=0.2)
    assert got == expect
    assert -308 in fake.encodings
    assert fake.requests == ([] if ask == (800, 600) else [ask])


async def test_rfb_refusal_and_no_server(sockdir: Path) -> None:
    sock = sockdir / "vnc.sock"
    async with serving_unix(FakeVnc(720, 400, refuse=3), sock):
        with pytest.raises(QemuError, match="cannot change its size"):
            await display.set_desktop_size(sock, 1024, 768, timeout=5)
    with pytest.raises(QemuError, match="does not answer"):
        await display.desktop_size(sockdir / "none.sock")


def test_saved_states_know_the_display() -> None:
    from vmkit.runtime.qemu.accel import AccelChoice
    from vmkit.state.savestate import config_digest, machine_fields

    tcg = AccelChoice("tcg", "t")
    headless = machine_fields(config(), tcg)
    assert "display" not in headless  # states saved before displays existed stay valid
    with_screen = machine_fields(config(display={"width": 1024, "height": 768}), tcg)
    assert with_screen["display"] == {"type": "virtio-vga", "width": 1024, "height": 768}
    assert config_digest(with_screen) != config_digest(headless)
