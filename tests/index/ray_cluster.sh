#!/usr/bin/env bash
# Run a command against a real two-node Ray cluster (head + worker) that lives
# entirely on loopback: the caller starts this script in a fresh network
# namespace (`unshare -n`) where 127.0.0.1 is the only address, so Ray cannot
# pick another interface. The cluster is stopped whatever happens.
# usage: ray_cluster.sh RAY_BIN CMD...   (CMD sees RAY_ADDRESS_FOR_TEST)
set -u
RAY="$1"; shift
ip link set lo up
export RAY_AUTH_MODE=token
RAY_AUTH_TOKEN=$(python3 -c "import secrets; print(secrets.token_hex(16))")
export RAY_AUTH_TOKEN RAY_USAGE_STATS_ENABLED=0
export RAY_ADDRESS_FOR_TEST=127.0.0.1:6379
trap '"$RAY" stop --force >/dev/null 2>&1' EXIT
common=(--node-ip-address 127.0.0.1 --num-cpus 1 --disable-usage-stats)
"$RAY" start --head --port 6379 --include-dashboard false "${common[@]}" >/dev/null 2>&1 || { echo "ray head failed to start" >&2; exit 97; }
"$RAY" start --address "$RAY_ADDRESS_FOR_TEST" "${common[@]}" >/dev/null 2>&1 || { echo "ray worker failed to start" >&2; exit 97; }
"$@"
