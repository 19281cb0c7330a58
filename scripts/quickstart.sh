#!/usr/bin/env bash
# The README's first command: install everything, then the main job on the built-in default:
# build the Debian 12 guest from Debian packages, boot it with vmkit, run a command inside through
# the guest agent and over SSH, show the results, stop it.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/install.sh
export PATH="$PWD/.venv/bin:$PATH"
NAME=${VMKIT_DEMO_NAME:-hello}

echo "==> vmkit doctor"
vmkit doctor
echo "==> vmkit image build debian-12   (mmdebstrap from Debian's archive; about a minute the first time)"
vmkit image build debian-12
vmkit delete --force "$NAME" >/dev/null 2>&1 || true
echo "==> vmkit create $NAME --image debian-12 --cpus 2 --memory 1G --disk 4G"
vmkit create "$NAME" --image debian-12 --cpus 2 --memory 1G --disk 4G
echo "==> vmkit start $NAME   (returns when the guest agent answers)"
vmkit start "$NAME"
vmkit list
echo "==> vmkit exec $NAME -- uname -a          (through qemu-guest-agent)"
vmkit exec "$NAME" -- uname -a
echo "==> vmkit shell $NAME -- 'hostname; df -h /'   (OpenSSH, pinned host key)"
vmkit shell "$NAME" -- 'hostname; df -h / | tail -1'
echo "==> vmkit stop $NAME"
vmkit stop "$NAME"
vmkit list
