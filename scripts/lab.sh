#!/usr/bin/env bash
# A migration lab on one machine: N "hosts", each a network namespace (vmklab1, vmklab2, ...) with
# its own address, its own sshd and its own vmkit home, joined by a bridge (vmklab0) on which this
# machine is host 0 (10.231.0.1).
#
#   scripts/lab.sh up [N]     make N hosts (default 2); the last line printed is host 1's ssh:// URI
#   scripts/lab.sh down       remove every namespace, link, sshd and file the lab made
#   scripts/lab.sh status     what is up
#   scripts/lab.sh link NETWORK [CIDR]
#                             join the vmkit network NETWORK of every host that has it (this machine
#                             and the lab hosts: created there with the same subnet) into one layer-2
#                             segment, so a machine keeps its address when it moves; with CIDR, the
#                             first lab host without that network gets a leg on it with that address
#                             (an observer). The gateway (the same address and MAC on every host)
#                             and DHCP stay on each host: frames from the gateway's MAC and DHCP do
#                             not cross the segment.
#   scripts/lab.sh unlink NETWORK
#                             take that segment apart again (`down` does too)
#
# Then, e.g.:  export VMKIT_SSH_CONFIG=/tmp/vmklab/ssh_config
#              vmkit migrate web ssh://root@10.231.0.11
#              vmkit --host ssh://root@10.231.0.11 list
#
# Each host's sshd sets VMKIT_HOME (its own instances), VMKIT_IMAGE_CACHE and PYTHONPATH (as they
# were when the lab came up) and puts a `vmkit` on PATH that runs this machine's vmkit. Root only.
# Everything is named vmklab*; nothing else on the machine is touched.
set -euo pipefail

LAB=${VMKIT_LAB_DIR:-/tmp/vmklab}
NET=10.231.0
BR=vmklab0
REPO=$(cd "$(dirname "$0")/.." && pwd)

die() { echo "lab.sh: $*" >&2; exit 1; }
[ "$(id -u)" -eq 0 ] || die "run as root (it makes network namespaces and links)"
command -v sshd >/dev/null || [ -x /usr/sbin/sshd ] || die "sshd is missing: apt-get install openssh-server (scripts/install.sh)"

hosts_up() { ip netns list 2>/dev/null | awk '{print $1}' | grep -E '^vmklab[0-9]+$' || true; }

down() {
  for ns in $(hosts_up); do
    if [ -f "$LAB/$ns/sshd.pid" ]; then
      pid=$(cat "$LAB/$ns/sshd.pid")
      kill "$pid" 2>/dev/null || true
    fi
    # the vmkit machines of that host: their supervisors and QEMUs run inside the namespace
    for pid in $(ip netns pids "$ns" 2>/dev/null); do kill "$pid" 2>/dev/null || true; done
    sleep 0.2
    for pid in $(ip netns pids "$ns" 2>/dev/null); do kill -9 "$pid" 2>/dev/null || true; done
    ip netns delete "$ns" 2>/dev/null || true
  done
  for t in $(nft list tables bridge 2>/dev/null | awk '{print $3}' | grep -E '^vmklab' || true); do
    nft delete table bridge "$t" 2>/dev/null || true
  done
  for link in $(ip -o link show 2>/dev/null | awk -F': ' '{print $2}' | cut -d@ -f1 | grep -E '^vmklab' || true); do
    ip link delete "$link" 2>/dev/null || true
  done
  rm -rf "$LAB"
  echo "lab is down"
}

python_for_vmkit() {
  if [ -n "${VMKIT_LAB_PYTHON:-}" ]; then echo "$VMKIT_LAB_PYTHON"
  elif [ -x "$REPO/.venv/bin/python" ]; then echo "$REPO/.venv/bin/python"
  elif [ -x /work/main/.venv/bin/python ]; then echo /work/main/.venv/bin/python
  else command -v python3; fi
}

up() {
  local n=${1:-2}
  [[ "$n" =~ ^[1-9]$ ]] || die "give the number of hosts, 1 to 9"
  [ -z "$(hosts_up)" ] || die "a lab is already up ($(hosts_up | tr '\n' ' ')): scripts/lab.sh down first"
  trap 'echo "lab.sh: up failed, cleaning up" >&2; down >/dev/null 2>&1' ERR
  mkdir -p "$LAB/bin" /run/sshd
  chmod 0700 "$LAB"
  local py; py=$(python_for_vmkit)
  printf '#!/bin/sh\nexec %q -m vmkit.cli.main "$@"\n' "$py" > "$LAB/bin/vmkit"
  chmod 0755 "$LAB/bin/vmkit"
  ssh-keygen -q -t ed25519 -N '' -C vmklab -f "$LAB/id_ed25519"
  cp "$LAB/id_ed25519.pub" "$LAB/authorized_keys"
  cat > "$LAB/ssh_config" <<EOF
Host $NET.*
  User root
  IdentityFile $LAB/id_ed25519
  IdentitiesOnly yes
  UserKnownHostsFile $LAB/known_hosts
  StrictHostKeyChecking accept-new
  BatchMode yes
  ConnectTimeout 5
  ServerAliveInterval 5
  ServerAliveCountMax 3
EOF
  ip link add "$BR" type bridge
  ip addr add "$NET.1/24" dev "$BR"
  ip link set "$BR" up
  for i in $(seq 1 "$n"); do
    local ns=vmklab$i addr=$NET.$((10 + i))
    mkdir -p "$LAB/$ns/home"
    chmod 0700 "$LAB/$ns" "$LAB/$ns/home"
    ip netns add "$ns"
    ip link add "vmklab$i-h" type veth peer name "vmklab$i-g"
    ip link set "vmklab$i-h" master "$BR" up
    ip link set "vmklab$i-g" netns "$ns"
    ip -n "$ns" link set lo up
    ip -n "$ns" link set "vmklab$i-g" name eth0
    ip -n "$ns" addr add "$addr/24" dev eth0
    ip -n "$ns" link set eth0 up
    ip -n "$ns" route add default via "$NET.1"
    ssh-keygen -q -t ed25519 -N '' -f "$LAB/$ns/ssh_host_ed25519_key"
    cat > "$LAB/$ns/sshd_config" <<EOF
ListenAddress $addr
Port 22
HostKey $LAB/$ns/ssh_host_ed25519_key
PidFile $LAB/$ns/sshd.pid
AuthorizedKeysFile $LAB/authorized_keys
PermitRootLogin prohibit-password
PasswordAuthentication no
KbdInteractiveAuthentication no
UsePAM no
StrictModes no
PrintMotd no
AcceptEnv VMKIT_*
SetEnv VMKIT_HOME=$LAB/$ns/home VMKIT_SSH_CONFIG=$LAB/ssh_config VMKIT_IMAGE_CACHE=${VMKIT_IMAGE_CACHE:-$REPO/.cache/images} PYTHONPATH=${PYTHONPATH:-} PATH=$LAB/bin:/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin VMKIT_LAB_HOST=$ns
Subsystem sftp /usr/lib/openssh/sftp-server
EOF
    ip netns exec "$ns" /usr/sbin/sshd -f "$LAB/$ns/sshd_config" -E "$LAB/$ns/sshd.log"
  done
  for i in $(seq 1 "$n"); do  # each sshd answers before `up` returns
    local addr=$NET.$((10 + i)) ok=
    for _ in $(seq 50); do
      if ssh -F "$LAB/ssh_config" "root@$addr" true 2>/dev/null; then ok=1; break; fi
      sleep 0.1
    done
    [ -n "$ok" ] || die "the sshd of vmklab$i does not answer (see $LAB/vmklab$i/sshd.log)"
  done
  trap - ERR
  echo "lab is up: $n host(s) on bridge $BR ($NET.0/24); this machine is $NET.1"
  for i in $(seq 1 "$n"); do echo "  vmklab$i  ssh://root@$NET.$((10 + i))  VMKIT_HOME=$LAB/vmklab$i/home"; done
  echo "export VMKIT_SSH_CONFIG=$LAB/ssh_config"
  echo "ssh://root@$NET.11"
}

bridge_of() {  # vmkit's bridge name for a network (vmkit.net.definition.bridge_name)
  if [ ${#1} -le 8 ]; then echo "vmkbr-$1"; else echo "vmkbr-$(printf %s "$1" | sha256sum | cut -c1-9)"; fi
}

unlink_segment() {
  for l in $(ip -o link show 2>/dev/null | awk -F': ' '{print $2}' | cut -d@ -f1 | grep -E "^$1(h|$)" || true); do
    ip link delete "$l" 2>/dev/null || true
  done
  nft delete table bridge "$1" 2>/dev/null || true
}

link() {
  local net=${1:-} cidr=${2:-}
  [[ "$net" =~ ^[a-z][a-z0-9-]{0,31}$ ]] || die "give the network's name: scripts/lab.sh link NETWORK [CIDR]"
  [ -z "$cidr" ] || [[ "$cidr" =~ ^[0-9.]+/[0-9]+$ ]] || die "$cidr is not an IPv4 CIDR (e.g. 10.119.9.250/24)"
  [ -n "$(hosts_up)" ] || die "the lab is down: scripts/lab.sh up first"
  command -v nft >/dev/null || die "nft is missing: apt-get install nftables"
  local br k=1 seg gwmac="" hosts="" observer=""
  br=$(bridge_of "$net")
  while [ -e "/sys/class/net/vmklab-s$k" ]; do k=$((k + 1)); done
  seg=vmklab-s$k
  trap 'echo "lab.sh: link failed, cleaning up" >&2; unlink_segment "$seg"' ERR
  ip link add "$seg" type bridge
  ip link set "$seg" up
  if [ -e "/sys/class/net/$br" ]; then  # this machine (host 0)
    ip link add "${seg}h0" type veth peer name "${seg}g0"
    ip link set "${seg}h0" master "$seg" up
    ip link set "${seg}g0" master "$br" up
    gwmac=$(cat "/sys/class/net/$br/address"); hosts=" this-machine"
  fi
  for ns in $(hosts_up); do
    local i=${ns#vmklab}
    if ip -n "$ns" link show "$br" >/dev/null 2>&1; then
      ip link add "${seg}h$i" type veth peer name "${seg}g$i"
      ip link set "${seg}h$i" master "$seg" up
      ip link set "${seg}g$i" netns "$ns"
      ip -n "$ns" link set "${seg}g$i" master "$br" up
      [ -n "$gwmac" ] || gwmac=$(ip -n "$ns" -o link show "$br" | grep -o 'link/ether [0-9a-f:]*' | cut -d' ' -f2)
      hosts="$hosts $ns"
    elif [ -n "$cidr" ] && [ -z "$observer" ]; then
      ip link add "${seg}h$i" type veth peer name "${seg}g$i"
      ip link set "${seg}h$i" master "$seg" up
      ip link set "${seg}g$i" netns "$ns"
      ip -n "$ns" addr add "$cidr" dev "${seg}g$i"
      ip -n "$ns" link set "${seg}g$i" up
      observer="$ns ($cidr on ${seg}g$i)"
    fi
  done
  [ -n "$gwmac" ] || die "no host has network $net (bridge $br): create it on each host first"
  nft -f - <<NFT
table bridge $seg {
	chain forward {
		type filter hook forward priority filter; policy accept;
		iifname "${seg}h*" ether saddr $gwmac counter drop
		iifname "${seg}h*" udp dport { 67, 68 } counter drop
	}
}
NFT
  trap - ERR
  mkdir -p "$LAB/segments"
  echo "$seg" > "$LAB/segments/$net"
  echo "network $net joined on segment $seg:$hosts"
  [ -z "$observer" ] || echo "observer: $observer"
}

unlink() {
  local net=${1:-}
  [[ "$net" =~ ^[a-z][a-z0-9-]{0,31}$ ]] || die "give the network's name: scripts/lab.sh unlink NETWORK"
  [ -f "$LAB/segments/$net" ] || { echo "network $net is not linked"; return 0; }
  unlink_segment "$(cat "$LAB/segments/$net")"
  rm -f "$LAB/segments/$net"
  echo "network $net unlinked"
}

status() {
  local up; up=$(hosts_up)
  if [ -z "$up" ]; then echo "lab is down"; return; fi
  for ns in $up; do echo "$ns: $(ip -n "$ns" -br addr show eth0 | awk '{print $3}') sshd pid $(cat "$LAB/$ns/sshd.pid" 2>/dev/null || echo '?')"; done
}

case "${1:-}" in
  up) up "${2:-2}" ;;
  down) down ;;
  status) status ;;
  link) link "${2:-}" "${3:-}" ;;
  unlink) unlink "${2:-}" ;;
  *) echo "usage: scripts/lab.sh up [N] | down | status | link NETWORK [CIDR] | unlink NETWORK" >&2; exit 2 ;;
esac
