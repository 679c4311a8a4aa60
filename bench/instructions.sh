#!/usr/bin/env bash
# Instruction counts under callgrind: steady on noisy machines, so a regression shows in a number.
#
#   bench/instructions.sh [CONNECTIONS] [REQUESTS]     (defaults 20 and 100)
#
# Runs `portcullis serve` (release build, one Tokio worker) under `valgrind --tool=callgrind`
# with collection off, in front of an out-of-process upstream (python3 http.server), and counts
# only while curl (outside valgrind) does:
#   A: CONNECTIONS new TLS 1.3 mutual-TLS connections with one proxied request each;
#   B: one connection with 1 + REQUESTS keep-alive requests.
# Then per full handshake (with its one request) = A / CONNECTIONS, per proxied keep-alive
# request = (B − A / CONNECTIONS) / REQUESTS, and the handshake alone by difference.
#
# Needs: valgrind (installed if missing), curl, python3. Loopback only.
set -euo pipefail
cd "$(dirname "$0")/.."
conns="${1:-20}"
reqs="${2:-100}"
root="$(pwd)"
for tool in valgrind curl; do
  command -v "$tool" >/dev/null 2>&1 || { apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq "$tool" >/dev/null; }
done
cargo build --release -q
pc="$root/target/release/portcullis"
work="$(mktemp -d)"
pids=()
cleanup() { for p in "${pids[@]}"; do kill "$p" 2>/dev/null || true; done; rm -rf "$work"; }
[ -n "${KEEP:-}" ] || trap cleanup EXIT
cd "$work"

"$pc" pki ca create --cn "Bench Root" --out ca >/dev/null
"$pc" pki issue --profile client --cn bench-client --issuer-cert ca/ca.pem --issuer-key ca/ca.key \
  --out . --name client >/dev/null
mkdir -p www && echo ok > www/index.html
python3 -m http.server 18090 --bind 127.0.0.1 --directory www >/dev/null 2>&1 & pids+=($!)
cat > gw.toml <<CONF
[admin]
address = "127.0.0.1:0"
[[listener]]
address = "127.0.0.1:28444"
[[domain]]
hostname = "localhost"
certificate = "auto"
security_policy = "TLS_1_3"
session_resumption = false
[domain.mtls]
mode = "required"
truststore = "ca/ca.pem"
[[domain.mapping]]
upstream = "http://127.0.0.1:18090"
CONF
PORTCULLIS_LOG=warn TOKIO_WORKER_THREADS=1 valgrind --tool=callgrind --instr-atstart=no \
  --callgrind-out-file="$work/cg.%p" "$pc" serve --config gw.toml --data-dir data >serve.log 2>&1 & pids+=($!)
vg=$!
for _ in $(seq 1 600); do (exec 3<>/dev/tcp/127.0.0.1/28444) 2>/dev/null && break; sleep 0.2; done
url=https://localhost:28444/index.html
c=(-sS -o /dev/null --cacert data/ca/ca.pem --cert client.pem --key client.key)
# Warm up: lazy initialisation, the upstream pool, allocator arenas.
for _ in 1 2 3; do curl "${c[@]}" "$url" "$url"; done

# count LABEL COMMAND... -> instructions executed by the gateway while COMMAND runs
count() {
  callgrind_control -z "$vg" >/dev/null 2>&1
  callgrind_control -i on "$vg" >/dev/null 2>&1
  "$@" >/dev/null
  callgrind_control -i off "$vg" >/dev/null 2>&1
  callgrind_control -d "$vg" >/dev/null 2>&1
  local f
  f=$(ls -t "$work"/cg.* | head -1)
  awk '/^totals:/ {print $2; exit}' "$f"
}
a=$(count bash -c "for i in \$(seq 1 $conns); do curl ${c[*]} $url; done")
urls=$(for _ in $(seq 0 "$reqs"); do printf '%s ' "$url"; done)
b=$(count bash -c "curl ${c[*]} $urls")
python3 - "$a" "$b" "$conns" "$reqs" <<'PY'
import sys
a, b, n, r = int(sys.argv[1]), int(sys.argv[2]), int(sys.argv[3]), int(sys.argv[4])
per_conn = a / n
per_req = (b - per_conn) / r
print(f"instructions (callgrind Ir), portcullis serve, one Tokio worker:")
print(f"  full TLS 1.3 mutual-TLS connection with one proxied request: {per_conn:,.0f}")
print(f"  of which the handshake and connection set-up:                {per_conn - per_req:,.0f}")
print(f"  proxied keep-alive request (HTTP/1.1):                       {per_req:,.0f}")
PY
