"""Network probes run inside a guest: what the network tests and benchmarks/net_bench.py send with
``vmkit exec ... python3 -c SCRIPT ARGS`` (the debian-12 image has Python, and no ping)."""

from __future__ import annotations

PING = (  # ICMP echo from Python (root, a raw socket): ARGS are a name or address and a count
    "import socket, struct, sys, time\n"
    "def csum(b):\n"
    "    s = sum(struct.unpack('!%dH' % (len(b) // 2), b)); s = (s >> 16) + (s & 0xffff); s += s >> 16\n"
    "    return ~s & 0xffff\n"
    "host = socket.gethostbyname(sys.argv[1]); n = int(sys.argv[2]); rtts = []\n"
    "s = socket.socket(socket.AF_INET, socket.SOCK_RAW, socket.IPPROTO_ICMP); s.settimeout(5)\n"
    "for i in range(n):\n"
    "    p = struct.pack('!BBHHH', 8, 0, 0, 0x4242, i) + b'vmkit-ping-16byt'\n"
    "    p = p[:2] + struct.pack('!H', csum(p)) + p[4:]\n"
    "    t = time.perf_counter(); s.sendto(p, (host, 0))\n"
    "    while True:\n"
    "        d, a = s.recvfrom(2048); h = (d[0] & 15) * 4\n"
    "        if a[0] == host and d[h] == 0 and d[h + 4:h + 8] == struct.pack('!HH', 0x4242, i): break\n"
    "    rtts.append((time.perf_counter() - t) * 1000); time.sleep(0.2)\n"
    "print(host, 'avg_ms=%.3f' % (sum(rtts) / n))\n"
)
"""Prints the address the name resolved to and ``avg_ms=`` the mean round trip."""
