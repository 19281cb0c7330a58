"""The machine's screen and keyboard: screenshots, key presses, typed text and the display's size.

A machine with a ``display:`` has a virtio-vga (or virtio-gpu) device, and QEMU serves its screen
with its VNC server on ``vnc.sock`` in the instance directory (a unix socket, 0600: no TCP port).

* Screenshots are QMP ``screendump`` with ``format: png``.
* Keys are QMP ``send-key`` with QEMU's key codes (``qcode`` names: ``a``, ``ret``, ``ctrl``,
  ``f2``, ...); a combination such as ``ctrl-alt-delete`` is pressed together. :func:`text_keys`
  turns text into such presses on a US keyboard layout (shift for capitals and symbols).
* The display's size follows a VNC client: QEMU forwards an RFB ``SetDesktopSize`` message to the
  display device (virtio-gpu raises a display change with a new EDID preferred mode and the guest's
  DRM driver takes it). QEMU 7.2 has no QMP command for that, so :func:`set_desktop_size` speaks
  just enough RFB (RFC 6143 and the ExtendedDesktopSize extension) on ``vnc.sock`` to ask, and
  reads the size the guest then shows. Linux's fbdev console cannot grow past the framebuffer it
  allocated at boot (the boot-time mode): the guest caps a larger request to the largest mode it
  can show.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import re
import secrets
import struct
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol

from vmkit.errors import ConfigError, QemuError, VmTimeoutError

VNC_SOCKET_NAME = "vnc.sock"

_QCODE_NAMES = (
    "unmapped shift shift_r alt alt_r ctrl ctrl_r menu esc 1 2 3 4 5 6 7 8 9 0 minus equal backspace tab "
    "q w e r t y u i o p bracket_left bracket_right ret a s d f g h j k l semicolon apostrophe "
    "grave_accent backslash z x c v b n m comma dot slash asterisk spc caps_lock f1 f2 f3 f4 f5 f6 f7 f8 "
    "f9 f10 num_lock scroll_lock kp_divide kp_multiply kp_subtract kp_add kp_enter kp_decimal sysrq kp_0 "
    "kp_1 kp_2 kp_3 kp_4 kp_5 kp_6 kp_7 kp_8 kp_9 less f11 f12 print home pgup pgdn end left up down "
    "right insert delete stop again props undo front copy open paste find cut lf help meta_l meta_r "
    "compose pause ro hiragana henkan yen muhenkan katakanahiragana kp_comma kp_equals power sleep wake "
    "audionext audioprev audiostop audioplay audiomute volumeup volumedown mediaselect mail calculator "
    "computer ac_home ac_back ac_forward ac_refresh ac_bookmarks lang1 lang2"
)
QCODES: frozenset[str] = frozenset(_QCODE_NAMES.split())
"""QEMU 7.2's ``QKeyCode`` names (``query-qmp-schema``)."""

ALIASES = {"enter": "ret", "return": "ret", "space": "spc", "escape": "esc", "del": "delete", "control": "ctrl",
           "super": "meta_l", "win": "meta_l", "pageup": "pgup", "pagedown": "pgdn", "bksp": "backspace"}
"""Friendlier names a user may type; each maps to a QEMU key code."""

_UNSHIFTED = {" ": "spc", "\n": "ret", "\t": "tab", "-": "minus", "=": "equal", "[": "bracket_left",
              "]": "bracket_right", ";": "semicolon", "'": "apostrophe", "`": "grave_accent", "\\": "backslash",
              ",": "comma", ".": "dot", "/": "slash"}
_SHIFTED = {"!": "1", "@": "2", "#": "3", "$": "4", "%": "5", "^": "6", "&": "7", "*": "8", "(": "9", ")": "0",
            "_": "minus", "+": "equal", "{": "bracket_left", "}": "bracket_right", ":": "semicolon",
            '"': "apostrophe", "~": "grave_accent", "|": "backslash", "<": "comma", ">": "dot", "?": "slash"}

MAX_KEYS = 4096
"""Most key presses one request may send (a typed text of that many characters, say)."""


def parse_combo(combo: str, *, field: str = "keys") -> tuple[str, ...]:
    """``ctrl-alt-delete`` -> ``("ctrl", "alt", "delete")``; every name checked (``field`` names the
    input in the error). ``-`` joins keys (the minus key itself is ``minus``)."""
    if not combo:
        raise ConfigError.single(field, "an empty key: give a QEMU key name such as ret, a or ctrl-alt-delete")
    names = tuple(ALIASES.get(k.lower(), k.lower()) for k in combo.split("-"))
    bad = [n for n in names if n not in QCODES]
    if bad:
        raise ConfigError.single(field, f"{bad[0]!r} (in {combo!r}) is not a QEMU key name: use names such as "
                                 "a, 1, ret, spc, esc, tab, f2, ctrl, alt, shift, delete, up "
                                 "(join keys pressed together with '-', e.g. ctrl-alt-delete)")
    if len(set(names)) != len(names):
        raise ConfigError.single(field, f"{combo!r} names a key twice")
    return names


def text_keys(text: str, *, field: str = "text") -> list[tuple[str, ...]]:
    """The key presses that type ``text`` on a US keyboard layout (ASCII printable, newline, tab)."""
    presses: list[tuple[str, ...]] = []
    for i, ch in enumerate(text):
        if "a" <= ch <= "z" or "0" <= ch <= "9":
            presses.append((ch,))
        elif "A" <= ch <= "Z":
            presses.append(("shift", ch.lower()))
        elif ch in _UNSHIFTED:
            presses.append((_UNSHIFTED[ch],))
        elif ch in _SHIFTED:
            presses.append(("shift", _SHIFTED[ch]))
        else:
            raise ConfigError.single(field, f"character {i + 1} ({ch!r}) cannot be typed on a US keyboard: "
                                     "use printable ASCII, newlines and tabs (send other keys with send-keys)")
    if len(presses) > MAX_KEYS:
        raise ConfigError.single(field, f"{len(presses)} characters are too many for one request: "
                                 f"type at most {MAX_KEYS} at a time")
    return presses


def send_key_args(keys: tuple[str, ...], hold_ms: int) -> dict[str, object]:
    """QMP ``send-key`` arguments: the keys pressed together for ``hold_ms``, then released."""
    return {"keys": [{"type": "qcode", "data": k} for k in keys], "hold-time": hold_ms}


_SIZE_RE = re.compile(r"(\d{1,5})[xX](\d{1,5})")
MIN_WIDTH, MIN_HEIGHT, MAX_WIDTH, MAX_HEIGHT = 320, 200, 8192, 8192


def parse_size(text: str, *, field: str = "--size") -> tuple[int, int]:
    """``1024x768`` -> (1024, 768), within what a display can be."""
    m = _SIZE_RE.fullmatch(text.strip())
    if not m:
        raise ConfigError.single(field, f"{text!r} is not a display size: use WIDTHxHEIGHT, e.g. 1024x768")
    w, h = int(m.group(1)), int(m.group(2))
    if not (MIN_WIDTH <= w <= MAX_WIDTH and MIN_HEIGHT <= h <= MAX_HEIGHT):
        raise ConfigError.single(field, f"{w}x{h} is out of range: give {MIN_WIDTH}-{MAX_WIDTH} x "
                                 f"{MIN_HEIGHT}-{MAX_HEIGHT}")
    return w, h


class Qmp(Protocol):
    """What these operations need: QMP (a :class:`vmkit.runtime.machine.VirtualMachine`)."""

    async def execute(self, command: str, arguments: dict[str, Any] | None = None, timeout: float = ...) -> Any: ...


async def screenshot(qmp: Qmp, workdir: Path) -> bytes:
    """The screen now as PNG bytes. QEMU writes the file (``screendump``) in ``workdir`` (the instance
    directory, 0700) under a random name; it is read and removed at once."""
    path = workdir / f".screendump-{secrets.token_hex(8)}.png"
    try:
        await qmp.execute("screendump", {"filename": str(path), "format": "png"}, timeout=30)
        return await asyncio.to_thread(path.read_bytes)
    finally:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(path)


async def send_presses(qmp: Qmp, presses: Sequence[tuple[str, ...]], hold_ms: int) -> int:
    """Queue each press (keys pressed together) in QEMU, in order; QEMU plays them to the guest one
    after the other (``send-key`` returns once they are queued)."""
    for keys in presses:
        await qmp.execute("send-key", send_key_args(keys, hold_ms))
    return len(presses)


# -- RFB (VNC) ---------------------------------------------------------------------------------------
_ENC_DESKTOP_SIZE = -223
_ENC_EXT_DESKTOP_SIZE = -308
_MSG_SET_ENCODINGS = 2
_MSG_SET_DESKTOP_SIZE = 251


@dataclass(frozen=True)
class Resized:
    width: int
    height: int
    by_client: bool
    """A reply to our own request (``x`` = 1 in the ExtendedDesktopSize rectangle), not a new mode."""
    status: int


class RfbSession:
    """One RFB client connection on QEMU's VNC unix socket (no authentication: the socket is 0600)."""

    def __init__(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.reader = reader
        self.writer = writer
        self.width = 0
        self.height = 0
        self.bytes_per_pixel = 4

    @classmethod
    async def open(cls, path: Path, timeout: float = 10.0) -> RfbSession:
        try:
            reader, writer = await asyncio.wait_for(asyncio.open_unix_connection(str(path)), timeout)
        except (FileNotFoundError, ConnectionRefusedError) as exc:
            raise QemuError(f"QEMU's VNC server does not answer on {path}: {exc}") from None
        session = cls(reader, writer)
        try:
            await asyncio.wait_for(session._handshake(), timeout)
        except BaseException:
            session.close()
            raise
        return session

    async def _handshake(self) -> None:
        r, w = self.reader, self.writer
        version = await r.readexactly(12)
        if not version.startswith(b"RFB 003."):
            raise QemuError(f"not a VNC server: it greeted with {version!r}")
        w.write(b"RFB 003.008\n")
        count = (await r.readexactly(1))[0]
        if count == 0:
            length = struct.unpack(">I", await r.readexactly(4))[0]
            raise QemuError(f"QEMU's VNC server refused: {(await r.readexactly(length)).decode(errors='replace')}")
        types = await r.readexactly(count)
        if 1 not in types:
            raise QemuError("QEMU's VNC server wants authentication, which vmkit does not configure")
        w.write(b"\x01")
        if struct.unpack(">I", await r.readexactly(4))[0] != 0:
            raise QemuError("QEMU's VNC server refused the connection")
        w.write(b"\x01")  # ClientInit: share the desktop with other clients
        head = await r.readexactly(24)
        self.width, self.height = struct.unpack(">HH", head[:4])
        self.bytes_per_pixel = max(1, head[4] // 8)
        name_len = struct.unpack(">I", head[20:24])[0]
        await r.readexactly(name_len)
        w.write(struct.pack(">BxHii", _MSG_SET_ENCODINGS, 2, _ENC_EXT_DESKTOP_SIZE, _ENC_DESKTOP_SIZE))
        await w.drain()

    async def request_size(self, width: int, height: int) -> None:
        screen = struct.pack(">IHHHHI", 0, 0, 0, width, height, 0)
        self.writer.write(struct.pack(">BxHHBx", _MSG_SET_DESKTOP_SIZE, width, height, 1) + screen)
        await self.writer.drain()

    async def next_resize(self) -> Resized:
        """Read server messages until one says the desktop's size (skipping anything else)."""
        r = self.reader
        while True:
            kind = (await r.readexactly(1))[0]
            if kind == 0:  # FramebufferUpdate
                count = struct.unpack(">xH", await r.readexactly(3))[0]
                found: Resized | None = None
                for _ in range(count):
                    x, y, w, h, enc = struct.unpack(">HHHHi", await r.readexactly(12))
                    if enc == _ENC_EXT_DESKTOP_SIZE:
                        screens = (await r.readexactly(4))[0]
                        await r.readexactly(16 * screens)
                        found = Resized(w, h, by_client=x == 1, status=y)
                    elif enc == _ENC_DESKTOP_SIZE:
                        found = Resized(w, h, by_client=False, status=0)
                    elif enc == 0:  # raw pixels (we never ask for them, but a server may send them)
                        await r.readexactly(w * h * self.bytes_per_pixel)
                    else:
                        raise QemuError(f"QEMU's VNC server sent an encoding vmkit did not ask for ({enc})")
                if found is not None:
                    if not found.by_client:
                        self.width, self.height = found.width, found.height
                    return found
            elif kind == 1:  # SetColourMapEntries
                n = struct.unpack(">xHH", await r.readexactly(5))[1]
                await r.readexactly(6 * n)
            elif kind == 2:  # Bell
                continue
            elif kind == 3:  # ServerCutText
                n = struct.unpack(">xxxI", await r.readexactly(7))[0]
                await r.readexactly(n)
            else:
                raise QemuError(f"QEMU's VNC server sent message type {kind}, which vmkit does not read")

    def close(self) -> None:
        with contextlib.suppress(Exception):
            self.writer.close()


async def desktop_size(path: Path, timeout: float = 10.0) -> tuple[int, int]:
    """The display's size now (from the VNC server's greeting)."""
    session = await RfbSession.open(path, timeout)
    session.close()
    return session.width, session.height


REFUSALS = {1: "resizing is administratively prohibited", 2: "out of resources", 3: "the display device cannot "
            "change its size (use a virtio-vga or virtio-gpu display)", 4: ""}


async def set_desktop_size(path: Path, width: int, height: int, *, timeout: float = 10.0,
                           settle: float = 1.0) -> tuple[int, int]:
    """Ask for ``width`` x ``height`` and wait up to ``timeout`` s for the guest to change its mode,
    then ``settle`` s more for further changes; the size it shows then (it may be smaller than asked:
    the guest picks the largest mode it can show, see the module's notes)."""
    session = await RfbSession.open(path, timeout)
    loop = asyncio.get_running_loop()
    try:
        if (session.width, session.height) == (width, height):
            return width, height
        await session.request_size(width, height)
        deadline = loop.time() + timeout
        while True:
            left = deadline - loop.time()
            if left <= 0:
                break
            try:
                msg = await asyncio.wait_for(session.next_resize(), left)
            except TimeoutError:
                break
            if msg.by_client:
                if msg.status not in (0, 4):  # 4: the request was forwarded to the device
                    raise QemuError(f"QEMU refused to resize the display: {REFUSALS.get(msg.status, msg.status)}")
                continue
            if (msg.width, msg.height) == (width, height):
                break
            deadline = min(deadline, loop.time() + settle)  # the guest may step through modes
        return session.width, session.height
    except (asyncio.IncompleteReadError, ConnectionError) as exc:
        raise QemuError(f"QEMU's VNC server closed the connection: {exc}") from None
    except TimeoutError:
        raise VmTimeoutError("QEMU's VNC server did not answer in time") from None
    finally:
        session.close()
