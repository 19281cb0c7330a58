"""The rootless network's switch: ``python -m vmkit.net.switch NETDIR``.

Each machine's NIC on a rootless network is QEMU's ``-netdev dgram`` with a unix datagram socket of
its own (``vnetN.sock`` in the instance directory) that sends every Ethernet frame to the switch's
socket (``NETDIR/switch.sock``). The switch learns which socket each source MAC comes from and
passes unicast frames to that socket alone, broadcast, multicast and unknown destinations to every
socket it has heard from. No root, no host interface: the host itself is not on this network (no
gateway, no DHCP, no DNS, no way out); the guests set their addresses themselves.
"""

from __future__ import annotations

import contextlib
import errno
import os
import signal
import socket
import sys
import time
from pathlib import Path

MAX_FRAME = 65536
FORGET_AFTER = 300.0
"""A port (a NIC's socket) not heard from for this long is forgotten (the machine stopped)."""


class Switch:
    def __init__(self, netdir: Path) -> None:
        self.netdir = netdir
        self.path = netdir / "switch.sock"
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
        with contextlib.suppress(FileNotFoundError):
            self.path.unlink()
        old = os.umask(0o077)
        try:
            self.sock.bind(str(self.path))
        finally:
            os.umask(old)
        self.macs: dict[bytes, str] = {}
        self.ports: dict[str, float] = {}
        self.frames = 0

    def handle(self, frame: bytes, sender: str) -> None:
        if not sender or len(frame) < 14:
            return
        now = time.monotonic()
        self.ports[sender] = now
        dst, src = frame[:6], frame[6:12]
        if not src[0] & 1:
            self.macs[src] = sender
        target = self.macs.get(dst) if not dst[0] & 1 else None
        for port in ([target] if target else [p for p in self.ports if p != sender]):
            self._send(frame, port)
        self.frames += 1

    def _send(self, frame: bytes, port: str) -> None:
        try:
            self.sock.sendto(frame, port)
        except OSError as exc:
            if exc.errno in (errno.ECONNREFUSED, errno.ENOENT):  # that NIC's QEMU is gone
                self.forget(port)
            elif exc.errno not in (errno.EAGAIN, errno.ENOBUFS):
                raise

    def forget(self, port: str) -> None:
        self.ports.pop(port, None)
        for mac in [m for m, p in self.macs.items() if p == port]:
            del self.macs[mac]

    def serve(self) -> None:
        while True:
            frame, sender = self.sock.recvfrom(MAX_FRAME)
            self.handle(frame, sender if isinstance(sender, str) else "")
            if self.frames % 1024 == 0:
                cutoff = time.monotonic() - FORGET_AFTER
                for port in [p for p, t in self.ports.items() if t < cutoff]:
                    self.forget(port)


def main(argv: list[str] | None = None) -> int:
    args = sys.argv[1:] if argv is None else argv
    if len(args) != 1:
        print("usage: python -m vmkit.net.switch NETDIR", file=sys.stderr)
        return 2
    netdir = Path(args[0])
    switch = Switch(netdir)
    pidfile = netdir / "switch.pid"
    pidfile.write_text(f"{os.getpid()}\n")

    def bye(*_: object) -> None:
        with contextlib.suppress(FileNotFoundError):
            switch.path.unlink()
        with contextlib.suppress(FileNotFoundError):
            pidfile.unlink()
        os._exit(0)

    signal.signal(signal.SIGTERM, bye)
    signal.signal(signal.SIGINT, bye)
    switch.serve()
    return 0


if __name__ == "__main__":
    sys.exit(main())
