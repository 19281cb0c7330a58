"""Network probes: what the network tests and benchmarks/net_bench.py run in a guest with
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

GAPS = (  # from outside a machine (a lab host's namespace, root): ARGS are its address, a TCP echo port (0: none)
    # and the ICMP interval in seconds. Prints PROBING once the TCP session is open; reads stdin lines:
    # "mark" notes the moment, anything else (or EOF) stops it; then prints one JSON line.
    "import json, os, select, socket, struct, sys, time\n"
    "def csum(b):\n"
    "    s = sum(struct.unpack('!%dH' % (len(b) // 2), b)); s = (s >> 16) + (s & 0xffff); s += s >> 16\n"
    "    return ~s & 0xffff\n"
    "host, port, every = sys.argv[1], int(sys.argv[2]), float(sys.argv[3]); ident = os.getpid() & 0xffff\n"
    "icmp = socket.socket(socket.AF_INET, socket.SOCK_RAW, socket.IPPROTO_ICMP); icmp.setblocking(False)\n"
    "tcp = socket.create_connection((host, port), timeout=20) if port else None; err = None\n"
    "if tcp: tcp.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1); tcp.setblocking(False)\n"
    "print('PROBING', flush=True)\n"
    "t0 = time.monotonic(); replies = []; echoes = []; seq = sent = tsent = 0; buf = b''; mark = None\n"
    "nxt = t0\n"
    "while True:\n"
    "    now = time.monotonic()\n"
    "    if now >= nxt:\n"
    "        p = struct.pack('!BBHHH', 8, 0, 0, ident, seq & 0xffff) + b'vmkit-gap-probe!'\n"
    "        icmp.sendto(p[:2] + struct.pack('!H', csum(p)) + p[4:], (host, 0)); sent += 1\n"
    "        if tcp and err is None and seq % 10 == 0:\n"
    "            try: tcp.send(b'%d\\n' % seq); tsent += 1\n"
    "            except BlockingIOError: pass\n"
    "            except OSError as e: err = str(e)\n"
    "        seq += 1; nxt = max(nxt + every, now)\n"
    "    rd = [icmp, sys.stdin] + ([tcp] if tcp and err is None else [])\n"
    "    r = select.select(rd, [], [], max(0.0, nxt - time.monotonic()))[0]\n"
    "    if sys.stdin in r:\n"
    "        line = sys.stdin.readline().strip()\n"
    "        if line == 'mark': mark = time.monotonic(); continue\n"
    "        break\n"
    "    if icmp in r:\n"
    "        d, a = icmp.recvfrom(2048); h = (d[0] & 15) * 4\n"
    "        if a[0] == host and d[h] == 0 and struct.unpack('!H', d[h + 4:h + 6])[0] == ident:\n"
    "            replies.append(time.monotonic())\n"
    "    if tcp is not None and tcp in r:\n"
    "        try: data = tcp.recv(65536)\n"
    "        except OSError as e: data = b''; err = str(e)\n"
    "        if not data: err = err or 'the connection was closed'\n"
    "        buf += data\n"
    "        while b'\\n' in buf: _, buf = buf.split(b'\\n', 1); echoes.append(time.monotonic())\n"
    "end = time.monotonic()\n"
    "def gaps(ts): return sorted(((b - a) * 1000 for a, b in zip([t0] + ts, ts + [end])), reverse=True)\n"
    "def after(ts): return sum(1 for t in ts if mark is not None and t > mark)\n"
    "print(json.dumps({'seconds': round(end - t0, 3), 'sent': sent, 'replies': len(replies),\n"
    "    'max_gap_ms': round(gaps(replies)[0], 1), 'gaps_ms': [round(g, 1) for g in gaps(replies)[:5]],\n"
    "    'replies_after_mark': after(replies), 'tcp': None if tcp is None else {'sent': tsent,\n"
    "    'echoed': len(echoes), 'echoed_after_mark': after(echoes), 'error': err,\n"
    "    'max_gap_ms': round(gaps(echoes)[0], 1)}}), flush=True)\n"
)
"""An ICMP echo every ``interval`` seconds and a TCP session to an echo server (a line every tenth
interval): the longest gap between ICMP replies is the downtime seen from outside, and the TCP
session says whether an open connection survived. Used by the migration test and benchmark."""


def iperf3_client_argv(address: str, port: int, seconds: int, *, reverse: bool = False) -> list[str]:
    """iperf3's TCP client (one stream, JSON report): the guest sends, or with ``reverse`` receives."""
    return ["iperf3", "-c", address, "-p", str(port), "-t", str(seconds), "-J", *(["-R"] if reverse else [])]


def parse_iperf3(stdout: str) -> float:
    """An iperf3 client's ``-J`` report -> bits per second as received; ValueError naming what is wrong."""
    import json

    try:
        data = json.loads(stdout)
    except ValueError:
        raise ValueError(f"iperf3 printed no JSON report ({(stdout.strip().splitlines() or ['no output'])[-1]})") \
            from None
    if not isinstance(data, dict):
        raise ValueError("iperf3's report is not a JSON object")
    if data.get("error"):
        raise ValueError(f"iperf3: {data['error']}")
    try:
        return float(data["end"]["sum_received"]["bits_per_second"])
    except (KeyError, TypeError, ValueError):
        raise ValueError("iperf3's report has no end.sum_received.bits_per_second") from None
