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
status=$("$SINEW" lab status)
if grep -q '^node2-pod1 ' <<< "$status"; then
  echo "==> policy: examples/lab-policy.yaml (node2-pod1 takes TCP 8080 from node1 pods, never from pod2s)"
  "$SINEW" --node node2 policy apply -f examples/lab-policy.yaml
  "$SINEW" --node node2 policy get
  echo
  "$SINEW" --node node2 policy trace --from node1-pod1 --to node2-pod1 --port 8080/tcp || true
  echo
  "$SINEW" --node node2 policy trace --from node1-pod2 --to node2-pod1 --port 8080/tcp || true
  echo
  "$SINEW" --node node2 policy trace --from 198.18.0.1 --to node2-pod1 --port 8080/tcp || true
  echo
  target=$(awk '$1 == "node2-pod1" {print $3}' <<< "$status")
  for src in node1-pod1 node1-pod2; do
    if "$SINEW" lab exec "$src" -- busybox ping -c 1 -W 1 "$target" >/dev/null 2>&1; then r=allowed; else r=dropped; fi
    echo "  ping $src -> node2-pod1: $r (ICMP is not in the policy: dropped)"
  done
  echo
  echo "==> flows seen by node2's agent (sinew observe), drops with their reason and rule"
  sleep 0.2
  "$SINEW" --node node2 observe --last 12 || true
  echo
fi
echo "The lab stays up. Explore it with:"
echo "  $SINEW lab status"
echo "  $SINEW lab exec $first -- ip route"
echo "  $SINEW --node node2 endpoint list -o json"
echo "  $SINEW --node node2 policy trace --from node1-pod1 --to node2-pod1 --port 8080/tcp"
echo "  $SINEW --node node2 identity list"
echo "  $SINEW --node node2 observe -f            # live flows (Ctrl-C to stop)"
echo "  $SINEW --node node2 observe --verdict DROPPED -o json"
echo "Remove it with:"
echo "  $SINEW lab down"
