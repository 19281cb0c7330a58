"""Foreign programs in a guest (``binfmt: [aarch64]`` in vm.yaml): the Rosetta analogue, with QEMU.

Once the guest agent answers, the supervisor copies the host's qemu-user-static interpreter for
each listed architecture into the guest (``/usr/local/lib/vmkit/binfmt/qemu-aarch64-static``,
whether or not the image has qemu-user-static) and registers it with the guest kernel's
binfmt_misc with the ``F`` flag (the kernel opens the interpreter once, at registration, so it
also works inside chroots and containers) and the ``P`` flag (argv[0] preserved), using the
magic and mask qemu-user-static ships in ``/usr/share/binfmts``. From then on the guest runs
``./hello-aarch64`` directly; the kernel starts the interpreter with it.

The registration lives in the guest kernel's memory: a saved and restored guest keeps it, a
guest that reboots by itself loses it until its next ``vmkit start``.

Unlike Rosetta (whose daemon keeps translated code on disk and reuses it across processes), QEMU's
user mode has **no persistent translation cache**: every process translates its code again from
the start, in memory, and throws it away at exit. ``benchmarks/binfmt_bench.py`` measures the
first and repeated runs of the same program.
"""

from __future__ import annotations

import gzip
from collections.abc import AsyncIterator
from dataclasses import dataclass
from pathlib import Path

from vmkit.config import ARCHES
from vmkit.errors import HostError
from vmkit.runtime.guest.agent import GuestAgentError
from vmkit.runtime.guest.channel import AgentCommands
from vmkit.runtime.guest.execute import guest_exec
from vmkit.runtime.guest.files import write_guest_file

GUEST_DIR = "/usr/local/lib/vmkit/binfmt"
"""Where the interpreters go in the guest."""
HOST_BINFMTS = Path("/usr/share/binfmts")
"""qemu-user-static's binfmt-support descriptions on the host (magic, mask, offset)."""
HOST_BIN = Path("/usr/bin")
FLAGS = "FP"
COPY_TIMEOUT = 120.0
"""Seconds one agent command of the copy may take (a loaded TCG guest decodes 1 MiB slowly)."""

# $1: the interpreter, gzipped beside it as $1.gz (a quarter of the bytes through the agent).
UNPACK_SCRIPT = r"""set -e
gzip -dc "$1.gz" > "$1.new"
chmod 0755 "$1.new"
mv -f "$1.new" "$1"
rm -f "$1.gz"
"""

# $1: the entry's name, $2: the registration line. Mounts binfmt_misc where systemd has not,
# replaces an earlier entry of the same name, and prints the entry as the kernel now has it.
REGISTER_SCRIPT = r"""set -e
d=/proc/sys/fs/binfmt_misc
[ -e "$d/register" ] || mount -t binfmt_misc binfmt_misc "$d"
if [ -e "$d/$1" ]; then echo -1 > "$d/$1"; fi
printf '%s' "$2" > "$d/register"
cat "$d/$1"
"""


@dataclass(frozen=True)
class BinfmtEntry:
    """One binfmt_misc registration: ``:name:M:offset:magic:mask:interpreter:flags``."""

    name: str
    magic: str  # as binfmt_misc reads it: \\xNN escapes
    mask: str
    offset: int
    interpreter: str

    def register_line(self) -> str:
        return f":{self.name}:M:{self.offset}:{self.magic}:{self.mask}:{self.interpreter}:{FLAGS}"


def parse_binfmts(text: str) -> dict[str, str]:
    """A binfmt-support description (``key value`` lines) as a mapping."""
    out: dict[str, str] = {}
    for line in text.splitlines():
        key, _, value = line.strip().partition(" ")
        if key:
            out[key] = value.strip()
    return out


def host_interpreter(arch: str, *, bin_dir: Path = HOST_BIN) -> Path:
    """The host's static interpreter for ``arch`` programs (HostError naming the package if absent)."""
    path = bin_dir / ARCHES[arch].qemu_user
    if not path.is_file():
        raise HostError(f"binfmt: {path} is missing: it is the interpreter copied into the guest for {arch} programs",
                        hint="apt-get install qemu-user-static")
    return path


def entry_for(arch: str, *, binfmts: Path = HOST_BINFMTS) -> BinfmtEntry:
    """The registration for ``arch``'s programs, from qemu-user-static's own description."""
    name = ARCHES[arch].qemu_user.removesuffix("-static")  # qemu-aarch64
    try:
        fields = parse_binfmts((binfmts / name).read_text())
    except OSError as exc:
        raise HostError(f"binfmt: cannot read {binfmts / name} ({exc.strerror}): qemu-user-static describes "
                        f"there which {arch} programs its interpreter runs",
                        hint="apt-get install qemu-user-static") from None
    for key in ("magic", "mask"):
        if not fields.get(key) or ":" in fields[key]:
            raise HostError(f"binfmt: {binfmts / name} has no usable {key}", hint="reinstall qemu-user-static")
    return BinfmtEntry(name=name, magic=fields["magic"], mask=fields["mask"],
                       offset=int(fields.get("offset") or 0),
                       interpreter=f"{GUEST_DIR}/{ARCHES[arch].qemu_user}")


async def install(agent: AgentCommands, arches: tuple[str, ...] | list[str]) -> list[str]:
    """Copy each architecture's interpreter into the guest and register it; returns the entries'
    names. GuestAgentError (with the guest's words) if the guest refuses."""
    names = []
    for arch in arches:
        entry = entry_for(arch)
        local = host_interpreter(arch)
        res = await guest_exec(agent, ["/bin/mkdir", "-p", GUEST_DIR], timeout=COPY_TIMEOUT)
        if res.exit_code != 0:
            raise GuestAgentError(f"binfmt: cannot make {GUEST_DIR} in the guest: "
                                  f"{res.stderr.decode(errors='replace')}")
        packed = gzip.compress(local.read_bytes(), compresslevel=6)

        async def pieces(data: bytes = packed) -> AsyncIterator[bytes]:
            yield data

        await write_guest_file(agent, entry.interpreter + ".gz", pieces(), timeout=COPY_TIMEOUT)
        res = await guest_exec(agent, ["/bin/sh", "-c", UNPACK_SCRIPT, "sh", entry.interpreter], timeout=COPY_TIMEOUT)
        if res.exit_code == 0:
            res = await guest_exec(agent, ["/bin/sh", "-c", REGISTER_SCRIPT, "sh", entry.name, entry.register_line()],
                                   timeout=COPY_TIMEOUT)
        if res.exit_code != 0:
            raise GuestAgentError(f"binfmt: the guest did not register {entry.name}: "
                             f"{(res.stderr or res.stdout).decode(errors='replace').strip()}",
                             hint="the guest kernel needs binfmt_misc (CONFIG_BINFMT_MISC)")
        names.append(entry.name)
    return names
