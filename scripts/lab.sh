#!/usr/bin/env bash
# The main job: installs what it needs, builds, and brings up a simulated
# multi-node cluster (network namespaces, one sinew-agent per node, pods
# plumbed by sinew-cni), then shows it working.
#   scripts/lab.sh [--nodes N] [--pods-per-node M] [--routing vxlan|native]
set -euo pipefail
cd "$(dirname "$0")/.."
source scripts/install-deps.sh
export PATH="$HOME/.cargo/bin:$PATH"

echo "==> build (release)"
cargo build --release --locked -p sinew-agent -p sinew-cni
SINEW=target/release/sinew

"$SINEW" lab down >/dev/null 2>&1 || true
echo "==> sinew lab up $*"
"$SINEW" lab up "${@:---nodes=2}"

pods=$("$SINEW" lab status | awk '/^node[0-9]+-pod/ {print $1" "$3}')
first=$(echo "$pods" | head -1 | cut -d' ' -f1)
echo
echo "==> connectivity from $first"
while read -r name ip; do
  [ "$name" = "$first" ] && continue
  if "$SINEW" lab exec "$first" -- busybox ping -c 1 -W 2 "$ip" >/dev/null 2>&1; then
    echo "  $first -> $name ($ip): ok"
  else
    echo "  $first -> $name ($ip): FAILED"
  fi
done <<< "$pods"
if "$SINEW" lab exec "$first" -- busybox ping -c 1 -W 2 198.18.0.1 >/dev/null 2>&1; then
  echo "  $first -> 198.18.0.1 (outside the cluster, masqueraded): ok"
else
  echo "  $first -> 198.18.0.1 (outside the cluster, masqueraded): FAILED"
fi
echo
"$SINEW" --node node1 status
echo
"$SINEW" --node node1 endpoint list
echo
echo "The lab stays up. Explore it with:"
echo "  $SINEW lab status"
echo "  $SINEW lab exec $first -- ip route"
echo "  $SINEW --node node2 endpoint list -o json"
echo "Remove it with:"
echo "  $SINEW lab down"
