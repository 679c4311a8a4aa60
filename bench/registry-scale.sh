#!/usr/bin/env bash
# The registry at scale, on SQLite:
#
#   bench/registry-scale.sh [CERTIFICATES] [SECONDS]     (defaults: 1000000 certificates, 8 s)
#
# 1. Bulk registration through the admin API: `portcullis cert register --bulk` of 20,000
#    certificate files into a fresh gateway (batches of 250, two in flight).
# 2. crates/bench/src/bin/registry_scale.rs fills a registry with CERTIFICATES certificates and
#    prints the in-process insert rate, the snapshot's load time and memory, a status lookup and
#    an incremental update.
# 3. `portcullis serve` in registered mode on that registry and on one with 10 certificates:
#    start-up time (until it serves), resident memory, and full mutual-TLS handshakes per second
#    (oha, a new TLS 1.3 connection per request, the registered client certificate).
#
# Needs: oha (`cargo install oha --locked`), python3. Loopback only. The 1,000,000 run needs
# about 2 GB of disk and a few minutes.
set -euo pipefail
cd "$(dirname "$0")/.."
n="${1:-1000000}"
secs="${2:-8}"
root="$(pwd)"
. bench/lib.sh
require_oha
cargo build --release -q
cargo build --release -q -p portcullis-bench
pc="$root/target/release/portcullis"
scale="$root/target/release/registry_scale"

work="$(mktemp -d)"
# serve() runs in subshells (process substitution), so gateways leave their pids in files.
cleanup() {
  for f in "$work"/*/gateway.pid; do [ -f "$f" ] && kill "$(cat "$f")" 2>/dev/null || true; done
  rm -rf "$work"
}
trap cleanup EXIT
cd "$work"

# serve DIR DATABASE TRUSTSTORE PORT -> starts a gateway; prints "startup_s rss_mib"
serve() {
  local dir=$1 db=$2 trust=$3 port=$4
  mkdir -p "$dir"
  cat > "$dir/gw.toml" <<CONF
database = "$db"
[admin]
address = "127.0.0.1:$((port + 1000))"
[[listener]]
address = "127.0.0.1:$port"
[[domain]]
hostname = "localhost"
certificate = "auto"
registry_mode = "registered"
[domain.mtls]
mode = "required"
truststore = "$trust"
[[domain.mapping]]
upstream = "builtin:echo"
CONF
  local t0 t1
  t0=$(date +%s.%N)
  (cd "$dir" && PORTCULLIS_LOG=warn exec "$pc" serve --config gw.toml --data-dir data >serve.log 2>&1) &
  echo $! > "$dir/gateway.pid"
  for _ in $(seq 1 3000); do grep -q "serving on" "$dir/serve.log" 2>/dev/null && break; sleep 0.05; done
  t1=$(date +%s.%N)
  grep -q "serving on" "$dir/serve.log" || { echo "the gateway in $dir did not start:" >&2; cat "$dir/serve.log" >&2; exit 1; }
  local pid
  pid=$(cat "$dir/gateway.pid")
  local rss
  rss=$(awk '/VmRSS/ {print $2}' "/proc/$pid/status")
  python3 -c "print(f'{$t1 - $t0:.2f} {$rss / 1024:.0f}')"
}

# handshakes DIR PORT CLIENT_DIR -> handshakes per second (all 200)
handshakes() {
  local dir=$1 port=$2 client=$3
  "$oha_bin" --no-tui -z "${secs}s" -c 16 --disable-keepalive \
    --cert "$client/client.pem" --key "$client/client.key" --cacert "$dir/data/ca/ca.pem" \
    --output-format json "https://localhost:$port/" 2>/dev/null | python3 -c '
import json, sys
d = json.load(sys.stdin)
ok = d.get("statusCodeDistribution", {}).get("200", 0)
print("%.0f %d" % (d["summary"]["requestsPerSec"], ok))'
}

echo "== a registry of $n certificates =="
"$scale" "$n" "$work/big/registry.db" big
"$scale" 10 "$work/small/registry.db" small > /dev/null

echo
echo "== bulk registration through the admin API (SQLite, a fresh gateway) =="
"$scale" files 20000 bulk
serve gw-bulk "$work/gw-bulk/registry.db" "$work/small/ca.pem" 38443 > /dev/null
"$pc" cert register --bulk bulk --status ACTIVE --json --data-dir gw-bulk/data > bulk.json || true
python3 -c 'import json; d = json.load(open("bulk.json")); print("%d certificates in %.2f s: %.0f/s (failed %d)" % (d["registered"], d["seconds"], d["per_second"], d["failed"]))'

echo
echo "== portcullis serve, registered mode =="
read -r big_start big_rss < <(serve gw-big "$work/big/registry.db" "$work/big/ca.pem" 38444)
read -r big_rate big_ok < <(handshakes gw-big 38444 big)
read -r small_start small_rss < <(serve gw-small "$work/small/registry.db" "$work/small/ca.pem" 38445)
read -r small_rate small_ok < <(handshakes gw-small 38445 small)
python3 - "$n" "$big_start" "$big_rss" "$big_rate" "$big_ok" "$small_start" "$small_rss" "$small_rate" "$small_ok" <<'PY'
import sys
n, bs, br, bh, bo, ss, sr, sh, so = sys.argv[1:]
print("| registry | start-up s | RSS MiB | handshakes/s | 200s |")
print("| --- | --- | --- | --- | --- |")
print(f"| {int(n):,} certificates | {bs} | {br} | {bh} | {bo} |")
print(f"| 10 certificates | {ss} | {sr} | {sh} | {so} |")
print(f"handshake rate ratio ({int(n):,} / 10): {float(bh) / float(sh):.2f}")
PY
