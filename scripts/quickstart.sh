#!/usr/bin/env bash
# The README's first command: install everything, then the main job on the built-in default:
# build the micro guest, boot it with vmkit, run a command inside, show the result, stop it.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/install.sh
export PATH="$PWD/.venv/bin:$PATH"
NAME=${VMKIT_DEMO_NAME:-hello}

echo "==> vmkit doctor"
vmkit doctor
echo "==> vmkit image build micro"
vmkit image build micro
vmkit delete --force "$NAME" >/dev/null 2>&1 || true
echo "==> vmkit create $NAME --image micro --run ..."
vmkit create "$NAME" --image micro --cpus 1 --memory 256M \
  --run 'echo "hello from $(hostname) running $(uname -sr) on $(grep -c ^processor /proc/cpuinfo) vCPU"; free -m | head -2'
echo "==> vmkit start $NAME"
vmkit start "$NAME"
vmkit list
echo "==> output of the command inside the guest:"
vmkit console "$NAME" --log --until '^VMKIT-RUN-END rc=' --timeout 60 | tr -d '\r' \
  | sed -n '/^VMKIT-RUN-BEGIN/,/^VMKIT-RUN-END/p' | grep -v -e '^VMKIT-RUN-BEGIN' -e '^vmkit-tick'
echo "==> vmkit stop $NAME"
vmkit stop "$NAME"
vmkit list
