#!/usr/bin/env bash
# Instruction counts under callgrind: steady on noisy machines, so a regression shows in a number.
#
#   bench/instructions.sh [CONNECTIONS] [REQUESTS]     (defaults 20 and 100; PORTCULLIS_BIN=PATH
#   counts another build, for a before/after)
#
# Runs `portcullis serve` (release build, one Tokio worker) under `valgrind --tool=callgrind`
# with collection off, in front of an out-of-process upstream (python3 http.server), and counts
# only while curl (outside valgrind) does:
#   A: CONNECTIONS new TLS 1.3 mutual-TLS connections with one proxied HTTP/1.1 request each;
#   B: one HTTP/1.1 connection with 1 + REQUESTS keep-alive requests;
#   A2, B2: one HTTP/2 connection with 1, then with 1 + REQUESTS requests;
#   A3, B3: the same with gRPC unary calls (POST application/grpc) to an h2c gRPC upstream
#   (bench_tools grpc-echo) behind an `upstream_protocol = "h2c"` mapping.
# Then per full handshake (with its one request) = A / CONNECTIONS, per proxied keep-alive
# request = (B − A / CONNECTIONS) / REQUESTS, the handshake alone by difference, and per HTTP/2
# request = (B2 − A2) / REQUESTS, per gRPC call = (B3 − A3) / REQUESTS. A and B against the bare rustls server of bench/run.sh
# (handshake, then a fixed answer; same certificates and suite order; a current-thread runtime)
# give the ceiling's counts beside them.
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
cargo build --release -q -p portcullis-bench
pc="${PORTCULLIS_BIN:-$root/target/release/portcullis}"
tools="$root/target/release/bench_tools"
work="$(mktemp -d)"
pids=()
cleanup() {
  for p in "${pids[@]}"; do kill "$p" 2>/dev/null || true; done
  pkill -f "$work" 2>/dev/null || true   # the servers started under valgrind
  [ -n "${KEEP:-}" ] || rm -rf "$work"
}
trap cleanup EXIT
cd "$work"

"$pc" pki ca create --cn "Bench Root" --out ca >/dev/null
"$pc" pki issue --profile client --cn bench-client --issuer-cert ca/ca.pem --issuer-key ca/ca.key \
  --out . --name client >/dev/null
"$pc" pki issue --profile server --cn localhost --san dns:localhost --issuer-cert ca/ca.pem \
  --issuer-key ca/ca.key --out . --name server >/dev/null
mkdir -p www && echo ok > www/index.html
python3 -m http.server 18090 --bind 127.0.0.1 --directory www >/dev/null 2>&1 & pids+=($!)
"$tools" grpc-echo 127.0.0.1:18091 >/dev/null 2>&1 & pids+=($!)
printf '\x00\x00\x00\x00\x0ahelloworld' > grpc.bin
cat > gw.toml <<CONF
[admin]
address = "127.0.0.1:0"
[[listener]]
address = "127.0.0.1:28444"
[[domain]]
hostname = "localhost"
certificate = "server.chain.pem"
key = "server.key"
security_policy = "TLS_1_3"
session_resumption = false
[domain.mtls]
mode = "required"
truststore = "ca/ca.pem"
[[domain.mapping]]
upstream = "http://127.0.0.1:18090"
[[domain.mapping]]
base_path = "/bench.Echo"
upstream = "http://127.0.0.1:18091/bench.Echo"
upstream_protocol = "h2c"
CONF
# measure PORT COMMAND... -> "A B": COMMAND (a server) under callgrind, then runs A and B.
measure() {
  local port=$1; shift
  "$@" >>server.log 2>&1 & pids+=($!)
  vg=$!
  for _ in $(seq 1 600); do (exec 3<>/dev/tcp/127.0.0.1/"$port") 2>/dev/null && break; sleep 0.2; done
  local url=https://localhost:$port/index.html
  c=(-sS -o /dev/null --cacert ca/ca.pem --cert client.pem --key client.key --http1.1)
  h2=(-sS -o /dev/null --cacert ca/ca.pem --cert client.pem --key client.key --http2)
  # Warm up: lazy initialisation, the upstream pool, allocator arenas.
  for _ in 1 2 3; do curl "${c[@]}" "$url" "$url" >/dev/null; curl "${h2[@]}" "$url" "$url" >/dev/null; done
  local a b a2 b2 urls
  a=$(count bash -c "for i in \$(seq 1 $conns); do curl ${c[*]} $url; done")
  urls=$(for _ in $(seq 0 "$reqs"); do printf '%s ' "$url"; done)
  b=$(count bash -c "curl ${c[*]} $urls")
  a2=$(count bash -c "curl ${h2[*]} $url")
  b2=$(count bash -c "curl ${h2[*]} $urls")
  local a3=0 b3=0 call=https://localhost:$port/bench.Echo/Call calls grpc
  if [ "$port" = 28444 ]; then
    grpc=(-sS -o /dev/null --cacert ca/ca.pem --cert client.pem --key client.key --http2
          -H content-type:application/grpc -H te:trailers --data-binary @grpc.bin)
    curl "${grpc[@]}" "$call" >/dev/null
    # Each URL after the first reuses the connection; --next repeats the POST options for it.
    calls=$(for _ in $(seq 1 "$reqs"); do printf -- '--next %s %s ' "${grpc[*]}" "$call"; done)
    a3=$(count bash -c "curl ${grpc[*]} $call")
    b3=$(count bash -c "curl ${grpc[*]} $call $calls")
  fi
  kill "$vg" 2>/dev/null || true; wait "$vg" 2>/dev/null || true
  echo "$a $b $a2 $b2 $a3 $b3"
}

# count COMMAND... -> instructions executed by the server while COMMAND runs
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

read -r pa pb pa2 pb2 pa3 pb3 < <(measure 28444 env PORTCULLIS_LOG=warn TOKIO_WORKER_THREADS=1 valgrind --tool=callgrind \
  --instr-atstart=no --callgrind-out-file="$work/cg.%p" "$pc" serve --config gw.toml --data-dir data)
read -r ba bb _ _ _ _ < <(measure 28445 env TOKIO_WORKER_THREADS=1 valgrind --tool=callgrind --instr-atstart=no \
  --callgrind-out-file="$work/cg.%p" "$tools" bare 127.0.0.1:28445 server.chain.pem server.key \
  ca/ca.pem tls13)
python3 - "$pa" "$pb" "$ba" "$bb" "$pa2" "$pb2" "$conns" "$reqs" "$pa3" "$pb3" <<'PY'
import sys
pa, pb, ba, bb, pa2, pb2, n, r, pa3, pb3 = map(int, sys.argv[1:11])
def split(a, b):
    per_conn = a / n
    per_req = (b - per_conn) / r
    return per_conn, per_conn - per_req, per_req
p, q = split(pa, pb), split(ba, bb)
print("instructions (callgrind Ir), one worker:          portcullis serve   bare rustls   ratio")
rows = ["full TLS 1.3 mutual-TLS connection, one request",
        "  of which the handshake and connection set-up",
        "keep-alive HTTP/1.1 request (proxied / answered)"]
for label, x, y in zip(rows, p, q):
    print(f"  {label:<50} {x:>12,.0f} {y:>13,.0f}   {x / y:5.2f}")
print(f"  {'keep-alive HTTP/2 request (proxied)':<50} {(pb2 - pa2) / r:>12,.0f} {'–':>13}")
print(f"  {'gRPC unary call over HTTP/2 (proxied to h2c)':<50} {(pb3 - pa3) / r:>12,.0f} {'–':>13}")
PY
