#!/usr/bin/env bash
# Prints which lab pods reach which on TCP ports, one matrix per port:
# rows are clients, columns servers, "." connects and "X" does not (dropped
# or refused within 1 s), as the Kubernetes NetworkPolicy e2e suite prints
# its truth tables. It first starts a server (busybox httpd) on each port
# in every pod; they run until `sinew lab down`.
#   examples/reachability.sh [--lab NAME] [PORT...]     (default port 80)
# SINEW names the sinew binary (default: sinew on PATH).
set -euo pipefail
sinew=${SINEW:-sinew}
lab=()
if [ "${1:-}" = "--lab" ]; then
  lab=(--lab "$2")
  shift 2
fi
ports=("$@")
[ ${#ports[@]} -gt 0 ] || ports=(80)

# Pod rows of `sinew lab status` follow the "POD" header: name, node, IP.
mapfile -t pods < <("$sinew" "${lab[@]}" lab status | awk 'seen && NF {print $1, $3} /^POD / {seen = 1}')
[ ${#pods[@]} -gt 0 ] || { echo "no pods in the lab: create some with sinew lab apply -f FILE" >&2; exit 1; }

www=$(mktemp -d /tmp/sinew-reachability.XXXXXX)
trap 'rmdir "$www"' EXIT
for row in "${pods[@]}"; do
  for port in "${ports[@]}"; do
    # Fails harmlessly when a server already listens there.
    "$sinew" "${lab[@]}" lab exec "${row%% *}" -- busybox httpd -p "$port" -h "$www" 2>/dev/null || true
  done
done

matrix() {
  local port=$1
  printf '%-8s' "TCP/$port"
  for to in "${pods[@]}"; do printf ' %-4s' "${to%% *}"; done
  echo
  for from in "${pods[@]}"; do
    printf '%-8s' "${from%% *}"
    for to in "${pods[@]}"; do
      if "$sinew" "${lab[@]}" lab exec "${from%% *}" -- timeout 1 bash -c ": >/dev/tcp/${to##* }/$port" 2>/dev/null; then
        mark=.
      else
        mark=X
      fi
      printf ' %-4s' "$mark"
    done
    echo
  done
}

for port in "${ports[@]}"; do
  # Cells are padded; the last one needs no padding.
  matrix "$port" | sed 's/ *$//'
done
