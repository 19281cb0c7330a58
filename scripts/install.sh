#!/usr/bin/env bash
# Install everything vmkit needs on Debian 12: host packages (apt) and the Python package
# with its development tools in ./.venv. Idempotent and quick when everything is present.
set -euo pipefail
cd "$(dirname "$0")/.."

APT_PACKAGES=(
  qemu-system-x86 qemu-utils qemu-system-common   # QEMU, qemu-img, qemu-nbd, virtiofsd
  qemu-system-arm qemu-user-static binfmt-support arch-test  # aarch64 guests; binfmt (foreign programs in guests, arm64 image builds)
  dnsmasq-base nftables iproute2 iperf3           # vmkit networks (DHCP+DNS, NAT and isolation, bridges); iperf3 for benchmarks/net_bench.py
  busybox-static                                  # the micro guest's userland; the docker template test's container image
  libnbd-bin nbdkit fio                           # NBD clients (nbdinfo, nbdcopy) for tests; nbdkit and fio for benchmarks
  sysbench                                        # `vmkit bench cpu` (its binary and libraries are copied into guests)
  libvirt-clients libxml2-utils                   # virsh (benchmarks/cli_bench.py), virt-xml-validate (+ xmllint) for the domain XML tests
  libvirt-daemon libvirt-daemon-driver-qemu       # libvirtd + virtlogd: the libvirt backend's tests start private ones (no systemd)
  libvirt-dev pkg-config                          # libvirt-python (a pip dependency) builds against them
  mmdebstrap e2fsprogs openssh-client openssh-sftp-server  # the Debian guest image; ssh into it; sftp-server for sshfs shares
  openssh-server iproute2                         # scripts/lab.sh: migration test hosts, each with its own sshd
  netcat-openbsd                                  # qemu+ssh:// to the tests' private libvirtd (proxy=netcat: nc -U its socket)
  python3 python3-venv python3-pip                # vmkit itself
  chromium                                        # the web console's tests (headless, driven by Playwright)
  ca-certificates
)

as_root() { if [ "$(id -u)" -eq 0 ]; then "$@"; else sudo "$@"; fi; }

# aarch64 guest images are made of Debian's arm64 packages: apt must know that architecture
if ! dpkg --print-foreign-architectures | grep -qx arm64; then
  as_root dpkg --add-architecture arm64
fi

missing=()
for p in "${APT_PACKAGES[@]}"; do
  dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q "install ok installed" || missing+=("$p")
done
# apt-get download (used to build guest images) needs package lists, even when nothing is missing
if [ ${#missing[@]} -gt 0 ] || [ -z "$(ls -A /var/lib/apt/lists 2>/dev/null | grep -v -e lock -e partial)" ] \
   || ! ls /var/lib/apt/lists/ 2>/dev/null | grep -q "binary-arm64_Packages"; then
  echo "==> apt-get update"
  as_root apt-get update -q
fi
if [ ${#missing[@]} -gt 0 ]; then
  echo "==> installing ${missing[*]}"
  as_root env DEBIAN_FRONTEND=noninteractive apt-get install -y -q --no-install-recommends "${missing[@]}"
fi

# The docker CLI (client only: no engine on the host), for the docker template's DOCKER_HOST=ssh://.
# Debian 12 has no client-only package and docker.io would install and start an engine, so its
# /usr/bin/docker is taken from the package file.
if ! command -v docker >/dev/null; then
  echo "==> installing the docker CLI from Debian's docker.io (client only)"
  tmp=$(mktemp -d)
  (cd "$tmp" && apt-get download -q docker.io && dpkg-deb --fsys-tarfile docker.io_*.deb | tar -x ./usr/bin/docker)
  as_root install -m 0755 "$tmp/usr/bin/docker" /usr/local/bin/docker
  rm -rf "$tmp"
fi

# libvirtd's QEMU driver looks up the user Debian built it for (libvirt-qemu) even when qemu.conf names
# another, and fails without it. libvirt-daemon-system creates it, with services this host cannot run
# (no systemd); the tests' private libvirtd needs only the user and the directories it mounts over.
if ! getent passwd libvirt-qemu >/dev/null; then
  echo "==> adding the system user libvirt-qemu (libvirtd's QEMU driver needs it)"
  as_root useradd --system --user-group --no-create-home --home-dir /var/lib/libvirt --shell /usr/sbin/nologin \
    --comment "Libvirt Qemu" libvirt-qemu
fi
as_root mkdir -p /var/lib/libvirt /var/log/libvirt /var/cache/libvirt

# binfmt_misc (no systemd here to mount it): the arm64 image build runs maintainer scripts under qemu-aarch64
if [ -d /proc/sys/fs/binfmt_misc ] && [ ! -e /proc/sys/fs/binfmt_misc/register ]; then
  as_root mount -t binfmt_misc binfmt_misc /proc/sys/fs/binfmt_misc || true
fi
if command -v update-binfmts >/dev/null && [ ! -e /proc/sys/fs/binfmt_misc/qemu-aarch64 ]; then
  as_root update-binfmts --enable qemu-aarch64 || true
fi

if [ ! -x .venv/bin/python ]; then
  echo "==> creating .venv"
  python3 -m venv .venv
fi
stamp=.venv/.vmkit-installed
if [ ! -f "$stamp" ] || [ pyproject.toml -nt "$stamp" ]; then
  echo "==> installing vmkit and its development tools into .venv"
  .venv/bin/python -m pip install -q --upgrade pip
  .venv/bin/python -m pip install -q -e '.[dev]'
  touch "$stamp"
fi
# The web console's noVNC and xterm.js: fetched from the npm registry (pinned, checksums verified)
# into src/vmkit/daemon/web/vendor/ (not in git); a complete copy is kept
python3 scripts/vendor_web.py
echo "==> vmkit installed: $(.venv/bin/vmkit --help >/dev/null && echo ok) (.venv/bin/vmkit)"
