#!/usr/bin/env bash
# Portcullis vs nginx as mutual-TLS reverse proxies in front of the same upstream, with the same
# certificates and the same load generator (oha), measured side by side in one run.
#
#   bench/gateway-vs-nginx.sh [SECONDS]        (default 10 s per scenario)
#
# Scenarios: (a) a new TLS 1.3 mutual-TLS connection per request (full handshake; session tickets
# and caches off on both), (b) keep-alive requests. On this 2-core machine the proxy under test is
# pinned to CPU 0 and the load generator and the upstream to CPU 1; CPU 0's busy fraction is read
# from /proc/stat, and the table compares requests per proxy core-second (requests/s divided by the
# busy fraction), as ../shared/docs/BACKGROUND.md section 6 describes.
#
# Needs: nginx (Debian package), oha (`cargo install oha --locked`), openssl. Installs nginx if
# missing; tells you how to get oha. Only loopback addresses are used; every run is bounded.
set -euo pipefail
cd "$(dirname "$0")/.."
secs="${1:-10}"
root="$(pwd)"

if ! command -v nginx >/dev/null 2>&1; then
  apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq nginx-light
fi
oha_bin="$(command -v oha || echo "$HOME/.cargo/bin/oha")"
[ -x "$oha_bin" ] || { echo "oha is missing: cargo install oha --locked" >&2; exit 2; }
cargo build --release -q
pc="$root/target/release/portcullis"

work="$(mktemp -d)"
pids=()
cleanup() { for p in "${pids[@]}"; do kill "$p" 2>/dev/null || true; done; rm -rf "$work"; }
trap cleanup EXIT
cd "$work"

# Same certificates for both: ECDSA P-256 server and client, one root.
"$pc" pki ca create --cn "Bench Root" --out ca >/dev/null
"$pc" pki issue --profile server --cn localhost --san dns:localhost --san ip:127.0.0.1 \
  --issuer-cert ca/ca.pem --issuer-key ca/ca.key --out . --name server >/dev/null
"$pc" pki issue --profile client --cn bench-client --issuer-cert ca/ca.pem --issuer-key ca/ca.key \
  --out . --name client >/dev/null

up_port=18080 ng_port=18443 pc_port=28443 admin_port=29443
mkdir -p ng-up ng-proxy
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
cat > ng-proxy/nginx.conf <<CONF
worker_processes 1;
daemon off;
pid $work/ng-proxy/nginx.pid;
error_log $work/ng-proxy/error.log warn;
events { worker_connections 4096; }
http {
  access_log off;
  upstream app { server 127.0.0.1:$up_port; keepalive 64; }
  server {
    listen 127.0.0.1:$ng_port ssl http2;
    ssl_certificate $work/server.chain.pem;
    ssl_certificate_key $work/server.key;
    ssl_client_certificate $work/ca/ca.pem;
    ssl_verify_client on;
    ssl_protocols TLSv1.3;
    ssl_session_tickets off;
    ssl_session_cache off;
    keepalive_requests 1000000;
    location / {
      proxy_pass http://app;
      proxy_http_version 1.1;
      proxy_set_header Connection "";
      # The same identity Portcullis forwards: the certificate and its fields.
      proxy_set_header X-Client-Cert \$ssl_client_escaped_cert;
      proxy_set_header X-Client-Cert-Subject \$ssl_client_s_dn;
      proxy_set_header X-Client-Cert-Issuer \$ssl_client_i_dn;
      proxy_set_header X-Client-Cert-Serial \$ssl_client_serial;
      proxy_set_header X-Client-Cert-Fingerprint \$ssl_client_fingerprint;
      proxy_set_header X-Client-Cert-Not-After \$ssl_client_v_end;
      proxy_set_header X-Client-Cert-Verify \$ssl_client_verify;
      proxy_set_header X-Forwarded-For \$proxy_add_x_forwarded_for;
      proxy_set_header X-Forwarded-Proto https;
    }
  }
}
CONF
cat > portcullis.toml <<CONF
[admin]
address = "127.0.0.1:$admin_port"
[[listener]]
address = "127.0.0.1:$pc_port"
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
upstream = "http://127.0.0.1:$up_port"
CONF

taskset -c 1 nginx -c "$work/ng-up/nginx.conf" -p "$work/ng-up" & pids+=($!)
taskset -c 0 nginx -c "$work/ng-proxy/nginx.conf" -p "$work/ng-proxy" & pids+=($!)
# Access logs off on both (nginx: access_log off).
PORTCULLIS_LOG=warn TOKIO_WORKER_THREADS=1 taskset -c 0 "$pc" serve --config portcullis.toml --data-dir data \
  > portcullis.log 2>&1 & pids+=($!)
for port in $up_port $ng_port $pc_port; do
  for _ in $(seq 1 100); do (exec 3<>/dev/tcp/127.0.0.1/$port) 2>/dev/null && break; sleep 0.1; done
done

cpu0() { awk '/^cpu0 /{idle=$5+$6; total=0; for(i=2;i<=NF;i++) total+=$i; print idle, total}' /proc/stat; }

# run NAME PORT MODE -> prints "rps busy per_core_second"
run() {
  local port=$1 mode=$2 extra=()
  [ "$mode" = handshake ] && extra=(--disable-keepalive)
  read -r i0 t0 < <(cpu0)
  local out
  out=$(taskset -c 1 "$oha_bin" --no-tui -z "${secs}s" -c 32 "${extra[@]}" \
        --cert client.pem --key client.key --cacert ca/ca.pem \
        --output-format json "https://localhost:$port/" 2>/dev/null)
  read -r i1 t1 < <(cpu0)
  local rps ok
  rps=$(printf '%s' "$out" | python3 -c 'import json,sys; print(json.load(sys.stdin)["summary"]["requestsPerSec"])')
  ok=$(printf '%s' "$out" | python3 -c 'import json,sys; d=json.load(sys.stdin); print(sum(v for k,v in d.get("statusCodeDistribution",{}).items() if k=="200"))')
  python3 - "$rps" "$i0" "$t0" "$i1" "$t1" "$ok" <<'PY'
import sys
rps, i0, t0, i1, t1, ok = float(sys.argv[1]), *map(float, sys.argv[2:6]), int(sys.argv[6])
busy = 1 - (i1 - i0) / max(t1 - t0, 1)
print(f"{rps:.0f} {busy:.2f} {rps / max(busy, 0.01):.0f} {ok}")
PY
}

printf '%-34s %12s %9s %14s %9s\n' scenario "requests/s" "CPU0" "per core-sec" "200s"
declare -A per
for mode in handshake keepalive; do
  for who in nginx portcullis; do
    port=$ng_port; [ "$who" = portcullis ] && port=$pc_port
    read -r rps busy pcs ok < <(run "$port" "$mode")
    per["$who-$mode"]=$pcs
    printf '%-34s %12s %9s %14s %9s\n' "$who ($mode)" "$rps" "$busy" "$pcs" "$ok"
  done
done
echo
for mode in handshake keepalive; do
  python3 -c "import sys; print(f'ratio portcullis/nginx ({sys.argv[1]}): {float(sys.argv[2])/float(sys.argv[3]):.2f}')" \
    "$mode" "${per[portcullis-$mode]}" "${per[nginx-$mode]}"
done
