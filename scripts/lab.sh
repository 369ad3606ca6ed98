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
cargo build --release --locked -p sinew-agent -p sinew-cni -p sinew-cli -p sinew-proxy
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
  echo "==> L7: examples/lab-l7-policy.yaml (node1 pods may GET /public on node2-pod1:80; anything else there gets 403)"
  web=/run/sinew-lab/sinew-lab/demo/l7
  mkdir -p "$web/public" "$web/admin"
  echo "public page" > "$web/public/index.html"
  echo "admin page" > "$web/admin/index.html"
  "$SINEW" lab exec node2-pod1 -- busybox httpd -p 80 -h "$web"
  # Returns once node2's sinew-proxy has the rules in force.
  "$SINEW" --node node2 policy apply -f examples/lab-l7-policy.yaml
  for path in /public/ /admin/; do
    r=$("$SINEW" lab exec node1-pod1 -- busybox wget -q -O - "http://${target%/*}$path" 2>&1 | tail -1 || true)
    echo "  node1-pod1 GET http://${target%/*}$path: ${r:-FAILED}"
  done
  "$SINEW" --node node2 policy trace --from node1-pod1 --to node2-pod1 --port 80/tcp --http-method GET --http-path /admin/ || true
  echo
  echo "==> requests node2's proxy judged (sinew observe --type l7): the allowed one with its rule, the denied one with its reason"
  sleep 0.2
  "$SINEW" --node node2 observe --type l7 --last 4 || true
  echo
fi
if grep -q '^node2-pod1 ' <<< "$status"; then
  echo "==> services: a ClusterIP (10.96.0.10:80) with a backend on each node, served by busybox httpd"
  ds=/run/sinew-lab/sinew-lab/datastore
  demo=/run/sinew-lab/sinew-lab/demo
  eps=""
  for pod in node1-pod1 node2-pod1; do
    ip=$(awk -v p="$pod" '$1 == p {print $3}' <<< "$status"); ip=${ip%/*}
    mkdir -p "$demo/$pod"
    echo "hello from $pod" > "$demo/$pod/index.html"
    "$SINEW" lab exec "$pod" -- busybox httpd -p 8080 -h "$demo/$pod"
    eps="$eps- {addresses: [$ip], nodeName: ${pod%%-*}}"$'\n'
  done
  mkdir -p "$ds/services"
  # Written to a temporary file and renamed: the agents never read it half
  # written (the .tmp name is not *.yaml, so they skip it).
  cat > "$ds/services/demo.yaml.tmp" <<EOF2
apiVersion: v1
kind: Service
metadata: {name: demo, namespace: default}
spec:
  clusterIP: 10.96.0.10
  ports: [{name: http, port: 80, targetPort: 8080}]
---
apiVersion: discovery.k8s.io/v1
kind: EndpointSlice
metadata: {name: demo-1, namespace: default, labels: {kubernetes.io/service-name: demo}}
addressType: IPv4
ports: [{name: http, port: 8080, protocol: TCP}]
endpoints:
$eps
EOF2
  mv "$ds/services/demo.yaml.tmp" "$ds/services/demo.yaml"
  sleep 0.5
  "$SINEW" --node node1 service list
  # Each connect is sent to a backend by the socket hook; the reply names it.
  for i in 1 2 3 4; do
    r=$(printf 'GET / HTTP/1.0\r\n\r\n' | "$SINEW" lab exec "$first" -- busybox nc -w 2 10.96.0.10 80 2>&1 | tail -1 || true)
    echo "  $first -> 10.96.0.10:80: ${r:-FAILED}"
  done
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
echo "  $SINEW --node node2 observe --type l7 -f  # HTTP requests node2's L7 proxy judges"
echo "  $SINEW --node node1 service list         # services (datastore: /run/sinew-lab/sinew-lab/datastore/services)"
echo "  $SINEW lab apply -f examples/netpol-xyz.yaml   # your own namespaces and pods (README: Your own pods)"
echo "Remove it with:"
echo "  $SINEW lab down"
