#!/usr/bin/env bash
# Policy evaluation cost, in isolation and in the gateway.
#
#   bench/policy.sh [SECONDS]        (default 8 s per gateway run)
#
# 1. The engine (crates/policy/examples/evaluate.rs): parse, bind (once per connection and
#    certificate) and decide (once per request) rates for a realistic set of three policies with
#    variables and conditions, and the wildcard matcher's worst case.
# 2. The gateway: one `portcullis serve` with two mappings to the same upstream (an nginx that
#    answers "ok"), `/open` (authorization "none") and `/guarded` (authorization "policy", the
#    partner policy attached to the domain), loaded one after the other by oha over keep-alive
#    connections with a client certificate. Prints requests/s and p50/p99 latency of both and
#    the difference: what a policy decision adds per request.
#
# Needs: nginx (Debian package), oha (`cargo install oha --locked`), python3. Loopback only.
set -euo pipefail
cd "$(dirname "$0")/.."
secs="${1:-8}"
root="$(pwd)"

if ! command -v nginx >/dev/null 2>&1; then
  apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq nginx-light
fi
. bench/lib.sh
require_oha

echo "== policy engine (release build) =="
cargo run --release -q -p portcullis-policy --example evaluate
cargo build --release -q
pc="$root/target/release/portcullis"

work="$(mktemp -d)"
pids=()
cleanup() { for p in "${pids[@]}"; do kill "$p" 2>/dev/null || true; done; rm -rf "$work"; }
trap cleanup EXIT
cd "$work"

"$pc" pki ca create --cn "Bench Root" --out ca >/dev/null
"$pc" pki issue --profile client --cn acme-1 --org Acme --issuer-cert ca/ca.pem \
  --issuer-key ca/ca.key --out . --name client >/dev/null

up_port=18081 pc_port=28444 admin_port=29444
mkdir -p ng-up
cat > ng-up/nginx.conf <<CONF
worker_processes 1;
daemon off;
pid $work/ng-up/nginx.pid;
error_log $work/ng-up/error.log warn;
events { worker_connections 4096; }
http {
  access_log off;
  server { listen 127.0.0.1:$up_port; keepalive_requests 1000000;
           location / { return 200 "ok\n"; } }
}
CONF
taskset -c 1 nginx -c "$work/ng-up/nginx.conf" -p "$work/ng-up" &
pids+=($!)

cat > gw.toml <<CONF
[admin]
address = "127.0.0.1:$admin_port"
[[listener]]
address = "127.0.0.1:$pc_port"
[[domain]]
hostname = "localhost"
certificate = "auto"
[domain.mtls]
mode = "required"
truststore = "ca/ca.pem"
[[domain.mapping]]
base_path = "/open"
upstream = "http://127.0.0.1:$up_port"
[[domain.mapping]]
base_path = "/guarded"
upstream = "http://127.0.0.1:$up_port"
authorization = "policy"
CONF
cat > partner.json <<'JSON'
{"Statement": [
  {"Sid": "own", "Effect": "Allow", "Action": ["http:GET", "http:HEAD"],
   "Resource": "route:localhost/guarded/partners/${cert:Subject.O}/*",
   "Condition": {"IpAddress": {"conn:SourceIp": ["127.0.0.0/8"]}}},
  {"Sid": "no-deletes", "Effect": "Deny", "Action": "http:DELETE", "Resource": "route:localhost/*"},
  {"Sid": "no-admin", "Effect": "Deny", "Action": "http:*", "Resource": "route:localhost/*/admin/*"}]}
JSON
PORTCULLIS_LOG=warn taskset -c 0 "$pc" serve --config gw.toml --data-dir data >serve.log 2>&1 &
pids+=($!)
for _ in $(seq 1 100); do grep -q "serving on" serve.log 2>/dev/null && break; sleep 0.1; done
"$pc" policy create partner --document partner.json --data-dir data >/dev/null
"$pc" policy attach partner --domain localhost --data-dir data >/dev/null
# The gateway takes the change from the registry within 200 ms; wait until a request passes.
for _ in $(seq 1 100); do
  code=$(curl -s -o /dev/null -w '%{http_code}' --cacert data/ca/ca.pem --cert client.pem \
    --key client.key "https://localhost:$pc_port/guarded/partners/Acme/x" || true)
  [ "$code" = 200 ] && break
  sleep 0.1
done
[ "$code" = 200 ] || { echo "the policy never admitted the request (last status $code)" >&2; exit 1; }

# run PATH -> "rps p50_ms p99_ms ok"
run() {
  local out
  out=$(taskset -c 1 "$oha_bin" --no-tui -z "${secs}s" -c 16 \
        --cert client.pem --key client.key --cacert data/ca/ca.pem \
        --output-format json "https://localhost:$pc_port$1" 2>/dev/null)
  printf '%s' "$out" | python3 -c '
import json, sys
d = json.load(sys.stdin)
p = d["latencyPercentiles"]
ok = d.get("statusCodeDistribution", {}).get("200", 0)
rps = d["summary"]["requestsPerSec"]
print("%.0f %.3f %.3f %d" % (rps, p["p50"] * 1000, p["p99"] * 1000, ok))'
}

echo
echo "== gateway, keep-alive, 16 connections, ${secs} s each (gateway on CPU 0, oha and upstream on CPU 1) =="
read -r o_rps o_p50 o_p99 o_ok < <(run /open/partners/Acme/x)
read -r g_rps g_p50 g_p99 g_ok < <(run /guarded/partners/Acme/x)
python3 - "$o_rps" "$o_p50" "$o_p99" "$o_ok" "$g_rps" "$g_p50" "$g_p99" "$g_ok" <<'PY'
import sys
o_rps, o_p50, o_p99, o_ok, g_rps, g_p50, g_p99, g_ok = map(float, sys.argv[1:])
print(f"| mapping | requests/s | p50 ms | p99 ms | 200s |")
print(f"| --- | --- | --- | --- | --- |")
print(f"| /open (no policy) | {o_rps:.0f} | {o_p50:.3f} | {o_p99:.3f} | {o_ok:.0f} |")
print(f"| /guarded (policy) | {g_rps:.0f} | {g_p50:.3f} | {g_p99:.3f} | {g_ok:.0f} |")
print(f"throughput ratio guarded/open: {g_rps / o_rps:.3f}")
# The gateway runs on one core, so 1/rps is its time per request: the difference is what a
# policy decision (path decoding, cached bound policies, decide) costs per request.
print(f"added gateway time per request: {(1 / g_rps - 1 / o_rps) * 1e6:.2f} us; "
      f"p50 latency {1000 * (g_p50 - o_p50):+.1f} us at 16 connections")
PY
