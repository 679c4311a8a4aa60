#!/usr/bin/env bash
# All gateway benchmarks, side by side, in one run and one table:
#
#   bench/run.sh [SECONDS]            (default 8 s per measurement; about 15 minutes in all)
#
# Environment: REGISTERED=N certificates for the registered-mode row (default 1000000; 0 skips it),
# PORTCULLIS_BIN=PATH runs that binary as Portcullis (an older build, for a before/after in one session), PERF=SERVER records a CPU profile of that server under each oha load (target/perf.SERVER.MODE.CLIENT.data
# under target/; PERF_EVENTS="-e EVENT -c 1" records that instead), SYSCALLS="SERVER..." counts their reads, writes and epoll waits (target/syscalls.SERVER.MODE.CLIENT.txt), IDLE=N connections for the idle-memory row (default 10000), SERVERS="portcullis bare" to run
# only some servers, ROWS="tls13 grpc idle tls12 big registered" (the default: all) to run only some
# groups of rows, MODES="h2 grpc" only the rows of those load modes within them.
#
# Servers: nginx, HAProxy and Caddy (Debian packages), Portcullis, and a bare rustls server
# (crates/bench/src/bin/bench_tools.rs: handshake, then a fixed answer, nothing else) as the
# ceiling. Same certificates (one ECDSA P-256 root, an ECDSA P-256 server certificate, ECDSA P-256
# and RSA-2048 client certificates), same upstream (an nginx answering `ok`), same load generator
# (oha). Every proxy verifies the client chain, proxies over pooled keep-alive connections and
# forwards the certificate and its fields as headers; access logs off; session tickets and
# session caches off everywhere; every server prefers AES-128-GCM (its own order), so all do the
# same cryptographic work. The server under test runs on CPU 0 with one worker (nginx
# worker_processes 1, HAProxy nbthread 1, Caddy GOMAXPROCS=1, Portcullis TOKIO_WORKER_THREADS=1);
# oha and the upstream run on CPU 1. CPU 0's busy fraction comes from /proc/stat and rates are
# compared per core-second of the server (requests/s divided by the busy fraction), because the
# load generator, not the server, is often the limit on two cores.
#
# Rows: full mutual-TLS handshakes (a new connection per request) for TLS 1.3 and 1.2 with ECDSA
# and RSA client certificates; keep-alive requests over HTTP/1.1 and HTTP/2; p50/p99 latency at a
# fixed rate; gRPC unary calls over HTTP/2 to an h2c gRPC upstream (bench_tools grpc-echo on
# CPU 1; nginx grpc_pass, HAProxy `proto h2`, Portcullis `upstream_protocol = "h2c"`, each
# forwarding the certificate fields as metadata), gRPC streaming messages (bench_tools grpc-stream:
# 8 connections x 16 bidirectional calls, 8 messages in flight on each) and HTTP/2 GETs to the
# same h2c upstream (nginx can only do that with grpc_pass); handshakes with a 10,000-CA truststore whose
# names are not advertised; Portcullis in
# registered mode with REGISTERED certificates; resident memory per idle mutual-TLS connection.
#
# Needs: nginx, haproxy, caddy (installed if missing), oha (`cargo install oha --locked`),
# python3, openssl. Loopback only; every run is bounded.
set -euo pipefail
cd "$(dirname "$0")/.."
secs="${1:-8}"
registered="${REGISTERED:-1000000}"
idle_n="${IDLE:-10000}"
root="$(pwd)"

missing=()
for b in nginx haproxy caddy; do command -v "$b" >/dev/null 2>&1 || missing+=("$b"); done
if [ ${#missing[@]} -gt 0 ]; then
  apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq "${missing[@]}" >/dev/null
fi
. bench/lib.sh
require_oha
cargo build --release -q
cargo build --release -q -p portcullis-bench
pc="${PORTCULLIS_BIN:-$root/target/release/portcullis}"
tools="$root/target/release/bench_tools"
scale="$root/target/release/registry_scale"
ulimit -n "$(ulimit -Hn)" 2>/dev/null || true

work="$(mktemp -d)"
pids=()
stop_all() {
  for p in "${pids[@]}"; do kill "$p" 2>/dev/null || true; done
  for p in "${pids[@]}"; do wait "$p" 2>/dev/null || true; done
  pids=()
}
cleanup() { stop_all; pkill -f "$work" 2>/dev/null || true; [ -n "${KEEP:-}" ] || rm -rf "$work"; }
trap cleanup EXIT
cd "$work"
echo "work directory: $work" >&2

# --- certificates -------------------------------------------------------------------------
"$pc" pki ca create --cn "Bench Root" --out ca >/dev/null
"$pc" pki issue --profile server --cn localhost --san dns:localhost --san ip:127.0.0.1 \
  --issuer-cert ca/ca.pem --issuer-key ca/ca.key --out . --name server >/dev/null
"$pc" pki issue --profile client --cn bench-ecdsa --issuer-cert ca/ca.pem --issuer-key ca/ca.key \
  --out . --name ecdsa >/dev/null
"$pc" pki issue --profile client --cn bench-rsa --key-type rsa-2048 --issuer-cert ca/ca.pem \
  --issuer-key ca/ca.key --out . --name rsa >/dev/null
cat server.chain.pem server.key > server.haproxy.pem
"$tools" cas 10000 many.pem
cat many.pem ca/ca.pem > big-trust.pem

# --- the upstream: nginx on CPU 1 ----------------------------------------------------------
up_port=18080
if (exec 3<>/dev/tcp/127.0.0.1/$up_port) 2>/dev/null; then
  echo "port $up_port is in use (a server left from another run?); stop it and run again" >&2; exit 1
fi
upstream_conf "$work/up" $up_port
taskset -c 1 nginx -c "$work/up/nginx.conf" -p "$work/up" &
up_pid=$!

wait_port() {
  for _ in $(seq 1 300); do (exec 3<>/dev/tcp/127.0.0.1/"$1") 2>/dev/null && return 0; sleep 0.1; done
  echo "nothing listens on port $1; logs in $work" >&2; exit 1
}
wait_port $up_port
# The gRPC upstream (h2c; every call answered with its message and grpc-status 0), on CPU 1.
grpc_port=18090
if (exec 3<>/dev/tcp/127.0.0.1/$grpc_port) 2>/dev/null; then
  echo "port $grpc_port is in use (a server left from another run?); stop it and run again" >&2; exit 1
fi
taskset -c 1 "$tools" grpc-echo "127.0.0.1:$grpc_port" & grpc_pid=$!
wait_port $grpc_port
# One unary call's message: the 5-byte gRPC prefix and 10 bytes.
printf '\x00\x00\x00\x00\x0ahelloworld' > "$work/grpc.bin"

declare -A port=([nginx]=18441 [haproxy]=18442 [caddy]=18443 [portcullis]=18444 [bare]=18445)
servers=(nginx haproxy caddy portcullis bare)
for p in "${port[@]}" 18446 29443 29444; do
  if (exec 3<>/dev/tcp/127.0.0.1/"$p") 2>/dev/null; then
    echo "port $p is in use (a server left from another run?); stop it and run again" >&2; exit 1
  fi
done

# start_all VERSION(tls13|tls12) TRUST(small|big): every server on CPU 0, configured alike.
start_all() {
  local v=$1 trust=$2 d="$work/run-$1-$2"
  mkdir -p "$d"
  local ng_proto=TLSv1.3 hp_ver="ssl-min-ver TLSv1.3 ssl-max-ver TLSv1.3" cd_ver=tls1.3 pc_pol=TLS_1_3
  if [ "$v" = tls12 ]; then
    ng_proto=TLSv1.2 hp_ver="ssl-min-ver TLSv1.2 ssl-max-ver TLSv1.2" cd_ver=tls1.2 pc_pol=TLS_1_2_ONLY
  fi
  # Trust: the small store is the one root; the big one is 10,000 other CAs + the root, with
  # names not advertised (nginx: ssl_trusted_certificate is not advertised, ssl_client_certificate
  # must name at least one CA; HAProxy: ca-verify-file; Portcullis: advertise_ca_names = false).
  local ng_trust="ssl_client_certificate $work/ca/ca.pem;" hp_trust="ca-file $work/ca/ca.pem"
  local pc_trust="truststore = \"$work/ca/ca.pem\"" trust_file="$work/ca/ca.pem"
  if [ "$trust" = big ]; then
    ng_trust="ssl_client_certificate $work/ca/ca.pem; ssl_trusted_certificate $work/big-trust.pem;"
    hp_trust="ca-verify-file $work/big-trust.pem"
    pc_trust="truststore = \"$work/big-trust.pem\"
advertise_ca_names = false"
    trust_file="$work/big-trust.pem"
  fi
  cat > "$d/nginx.conf" <<CONF
worker_processes 1;
worker_rlimit_nofile 20000;
daemon off;
pid $d/nginx.pid;
error_log $d/nginx-error.log warn;
events { worker_connections 15000; }
http {
  access_log off;
  upstream app { server 127.0.0.1:$up_port; keepalive 64; }
  upstream grpcapp { server 127.0.0.1:$grpc_port; keepalive 64; }
  server {
    listen 127.0.0.1:${port[nginx]} ssl http2;
    ssl_certificate $work/server.chain.pem;
    ssl_certificate_key $work/server.key;
    $ng_trust
    ssl_verify_client on;
    ssl_verify_depth 3;
    ssl_protocols $ng_proto;
    ssl_session_tickets off;
    ssl_session_cache off;
    ssl_prefer_server_ciphers on;
    ssl_ciphers ECDHE-ECDSA-AES128-GCM-SHA256:ECDHE-ECDSA-AES256-GCM-SHA384:ECDHE-ECDSA-CHACHA20-POLY1305;
    ssl_conf_command Ciphersuites TLS_AES_128_GCM_SHA256:TLS_AES_256_GCM_SHA384:TLS_CHACHA20_POLY1305_SHA256;
    keepalive_requests 1000000;
    keepalive_timeout 300s;
    location /bench.Echo/ {
      grpc_pass grpc://grpcapp;
      grpc_set_header X-Client-Cert \$ssl_client_escaped_cert;
      grpc_set_header X-Client-Cert-Subject \$ssl_client_s_dn;
      grpc_set_header X-Client-Cert-Issuer \$ssl_client_i_dn;
      grpc_set_header X-Client-Cert-Serial \$ssl_client_serial;
      grpc_set_header X-Client-Cert-Fingerprint \$ssl_client_fingerprint;
      grpc_set_header X-Client-Cert-Not-After \$ssl_client_v_end;
      grpc_set_header X-Client-Cert-Verify \$ssl_client_verify;
      grpc_set_header X-Forwarded-For \$proxy_add_x_forwarded_for;
    }
    location / {
      proxy_pass http://app;
      proxy_http_version 1.1;
      proxy_set_header Connection "";
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
  cat > "$d/haproxy.cfg" <<CONF
global
  nbthread 1
  maxconn 9990
  tune.ssl.cachesize 0
  log stderr format raw local0 emerg
defaults
  mode http
  timeout connect 5s
  timeout client 300s
  timeout server 60s
  timeout http-keep-alive 300s
  http-reuse always
frontend fe
  bind 127.0.0.1:${port[haproxy]} ssl crt $work/server.haproxy.pem $hp_trust verify required $hp_ver no-tls-tickets alpn h2,http/1.1 ciphers ECDHE-ECDSA-AES128-GCM-SHA256:ECDHE-ECDSA-AES256-GCM-SHA384:ECDHE-ECDSA-CHACHA20-POLY1305 ciphersuites TLS_AES_128_GCM_SHA256:TLS_AES_256_GCM_SHA384:TLS_CHACHA20_POLY1305_SHA256
  http-request del-header X-Client-Cert
  http-request set-header X-Client-Cert :%[ssl_c_der,base64]:
  http-request set-header X-Client-Cert-Subject %{+Q}[ssl_c_s_dn]
  http-request set-header X-Client-Cert-Issuer %{+Q}[ssl_c_i_dn]
  http-request set-header X-Client-Cert-Serial %[ssl_c_serial,hex]
  http-request set-header X-Client-Cert-Fingerprint %[ssl_c_sha1,hex]
  http-request set-header X-Client-Cert-Not-After %[ssl_c_notafter]
  http-request set-header X-Client-Cert-Verify %[ssl_c_verify]
  option forwardfor
  http-request set-header X-Forwarded-Proto https
  use_backend grpc if { path_beg /bench.Echo/ }
  default_backend app
backend app
  server up 127.0.0.1:$up_port
backend grpc
  server g 127.0.0.1:$grpc_port proto h2
CONF
  cat > "$d/caddy.json" <<CONF
{
  "admin": {"disabled": true},
  "storage": {"module": "file_system", "root": "$d/caddy-data"},
  "logging": {"logs": {"default": {"level": "ERROR"}}},
  "apps": {
    "tls": {
      "session_tickets": {"disabled": true},
      "certificates": {"load_files": [{"certificate": "$work/server.chain.pem", "key": "$work/server.key", "tags": ["bench"]}]}
    },
    "http": {"servers": {"bench": {
      "listen": ["127.0.0.1:${port[caddy]}"],
      "protocols": ["h1", "h2"],
      "automatic_https": {"disable": true},
      "idle_timeout": "300s",
      "tls_connection_policies": [{
        "certificate_selection": {"any_tag": ["bench"]},
        "protocol_min": "$cd_ver", "protocol_max": "$cd_ver",
        "alpn": ["h2", "http/1.1"],
        "client_authentication": {"trusted_ca_certs_pem_files": ["$trust_file"], "mode": "require_and_verify"}
      }],
      "routes": [{"handle": [{
        "handler": "reverse_proxy",
        "upstreams": [{"dial": "127.0.0.1:$up_port"}],
        "headers": {"request": {"set": {
          "X-Client-Cert": [":{http.request.tls.client.certificate_der_base64}:"],
          "X-Client-Cert-Subject": ["{http.request.tls.client.subject}"],
          "X-Client-Cert-Issuer": ["{http.request.tls.client.issuer}"],
          "X-Client-Cert-Serial": ["{http.request.tls.client.serial}"],
          "X-Client-Cert-Fingerprint": ["{http.request.tls.client.fingerprint}"],
          "X-Client-Cert-Not-After": ["{http.request.tls.client.certificate_not_after}"]
        }}}
      }]}]
    }}}
  }
}
CONF
  cat > "$d/portcullis.toml" <<CONF
[admin]
address = "127.0.0.1:29443"
[limits]
max_connections = 30000
request_header_timeout_secs = 300
[[listener]]
address = "127.0.0.1:${port[portcullis]}"
[[domain]]
hostname = "localhost"
certificate = "$work/server.chain.pem"
key = "$work/server.key"
security_policy = "$pc_pol"
session_resumption = false
[domain.mtls]
mode = "required"
$pc_trust
[[domain.mapping]]
upstream = "http://127.0.0.1:$up_port"
[[domain.mapping]]
base_path = "/bench.Echo"
upstream = "http://127.0.0.1:$grpc_port/bench.Echo"
upstream_protocol = "h2c"
CONF
  taskset -c 0 nginx -c "$d/nginx.conf" -p "$d" & pids+=($!)
  taskset -c 0 haproxy -f "$d/haproxy.cfg" -db >"$d/haproxy.log" 2>&1 & pids+=($!)
  HOME="$d" XDG_DATA_HOME="$d" XDG_CONFIG_HOME="$d" GOMAXPROCS=1 \
    taskset -c 0 caddy run --config "$d/caddy.json" >"$d/caddy.log" 2>&1 & pids+=($!)
  PORTCULLIS_LOG=warn TOKIO_WORKER_THREADS=1 taskset -c 0 "$pc" serve --config "$d/portcullis.toml" \
    --data-dir "$d/pc-data" >"$d/portcullis.log" 2>&1 & pids+=($!)
  taskset -c 0 "$tools" bare "127.0.0.1:${port[bare]}" "$work/server.chain.pem" "$work/server.key" \
    "$trust_file" "$v" >"$d/bare.log" 2>&1 & pids+=($!)
  for s in "${servers[@]}"; do wait_port "${port[$s]}"; done
  declare -gA spid=([nginx]="${pids[0]}" [haproxy]="${pids[1]}" [caddy]="${pids[2]}" [portcullis]="${pids[3]}" [bare]="${pids[4]}")
}

cpu0() { awk '/^cpu0 /{idle=$5+$6; total=0; for(i=2;i<=NF;i++) total+=$i; print idle, total}' /proc/stat; }

# load SERVER MODE CLIENT [PORT] -> "per_core_second rps busy ok total p50_ms p99_ms"
# MODE: handshake | h1 | h2 | rate (HTTP/1.1 at RATE/s) | rate2 (HTTP/2 at RATE/s) | grpc (unary calls: POST application/grpc over HTTP/2) |
# h2up (HTTP/2 GETs proxied to the h2c upstream) | grpcstream (messages on bidirectional calls)
load() {
  local s=$1 mode=$2 client=$3 p=${4:-${port[$1]}} extra=() path=/
  local stat_pid=""
  if [[ " ${SYSCALLS:-} " == *" $s "* ]]; then
    # SYSCALLS="SERVER...": those servers' reads, writes and waits under each load, in
    # syscalls.SERVER.MODE.CLIENT.txt (divide by the row's requests for the count per request).
    perf stat -x, -e 'syscalls:sys_enter_write,syscalls:sys_enter_writev,syscalls:sys_enter_sendto,syscalls:sys_enter_sendmsg,syscalls:sys_enter_read,syscalls:sys_enter_readv,syscalls:sys_enter_recvfrom,syscalls:sys_enter_recvmsg,syscalls:sys_enter_epoll_wait' \
      -p "${spid[$s]}" -o "$root/target/syscalls.$s.$mode.$client.txt" -- sleep "$secs" >/dev/null 2>&1 & stat_pid=$!
  fi
  local perf_pid=""
  if [ "${PERF:-}" = "$s" ]; then
    # PERF=SERVER: a CPU profile of that server under each load, in perf.SERVER.MODE.CLIENT.data.
    perf record ${PERF_EVENTS:--F 999 --call-graph ${PERF_CALLGRAPH:-fp}} -p "${spid[$s]}" -o "$root/target/perf.$s.$mode.$client.data" -- sleep "$secs" \
      >/dev/null 2>&1 & perf_pid=$!
  fi
  if [ "$mode" = grpcstream ]; then
    read -r i0 t0 < <(cpu0)
    taskset -c 1 "$tools" grpc-stream "127.0.0.1:$p" localhost ca/ca.pem "$client.pem" "$client.key" \
      8 16 "$secs" > stream.out 2>&1 || true
    read -r i1 t1 < <(cpu0)
    [ -z "$perf_pid" ] || wait "$perf_pid" || true
    [ -z "$stat_pid" ] || wait "$stat_pid" || true
    python3 - "$i0" "$t0" "$i1" "$t1" <<'PY'
import sys
i0, t0, i1, t1 = map(float, sys.argv[1:5])
busy = max(1 - (i1 - i0) / max(t1 - t0, 1), 0.01)
try:
    f = open("stream.out").read().split()
    rate, n, failed = float(f[f.index("rate") + 1]), int(f[f.index("messages") + 1]), int(f[f.index("failed") + 1])
except Exception:
    print("0 0 0 0 0 0 0"); sys.exit()
print(f"{rate / busy:.0f} {rate:.0f} {busy:.2f} {n} {n + failed} 0 0")
PY
    return
  fi
  case $mode in
    h2up) extra=(-c 8 -p 16 --http2); path=/bench.Echo/Get ;;
    grpc) extra=(-c 8 -p 16 --http2 -m POST -H "content-type: application/grpc" -H "te: trailers"
                 -D "$work/grpc.bin"); path=/bench.Echo/Call ;;
    handshake) extra=(-c 32 --disable-keepalive) ;;
    h1) extra=(-c 32) ;;
    h2) extra=(-c 8 -p 16 --http2) ;;
    rate) extra=(-c 16 -q "${RATE:-5000}" --latency-correction) ;;
    rate2) extra=(-c 4 -p 4 --http2 -q "${RATE:-5000}" --latency-correction) ;;
  esac
  read -r i0 t0 < <(cpu0)
  taskset -c 1 "$oha_bin" --no-tui -z "${secs}s" "${extra[@]}" --cert "$client.pem" --key "$client.key" \
    --cacert ca/ca.pem --output-format json "https://localhost:$p$path" > oha.json 2>/dev/null || true
  read -r i1 t1 < <(cpu0)
  [ -z "$perf_pid" ] || wait "$perf_pid" || true
  [ -z "$stat_pid" ] || wait "$stat_pid" || true
  python3 - "$i0" "$t0" "$i1" "$t1" <<'PY'
import json, sys
i0, t0, i1, t1 = map(float, sys.argv[1:5])
try:
    d = json.load(open("oha.json"))
except Exception:
    print("0 0 0 0 0 0 0"); sys.exit()
busy = max(1 - (i1 - i0) / max(t1 - t0, 1), 0.01)
codes = d.get("statusCodeDistribution", {})
ok = codes.get("200", 0)
total = sum(codes.values()) + sum(d.get("errorDistribution", {}).values())
rps = d["summary"]["requestsPerSec"] * (ok / total if total else 0)
lat = d.get("latencyPercentiles", {})
p50 = (lat.get("p50") or 0) * 1000
p99 = (lat.get("p99") or 0) * 1000
print(f"{rps / busy:.0f} {rps:.0f} {busy:.2f} {ok} {total} {p50:.2f} {p99:.2f}")
PY
}

rows=()   # "label|server|value" lines, assembled into the table at the end
record() { rows+=("$1|$2|$3"); }
measure() {  # measure LABEL MODE CLIENT SERVERS...
  local label=$1 mode=$2 client=$3; shift 3
  # MODES="h2 grpc": only the rows of those load modes (see load()).
  [ -z "${MODES:-}" ] || [[ " $MODES " == *" $mode "* ]] || return 0
  for s in "$@"; do
    [[ " ${SERVERS:-$*} " == *" $s "* ]] || continue
    read -r pcs rps busy ok total p50 p99 < <(load "$s" "$mode" "$client")
    echo "  $label / $s: $pcs per core-s ($rps/s at CPU0 $busy; $ok of $total answered 200; p50 $p50 ms p99 $p99 ms)" >&2
    if [ "$mode" = rate ] || [ "$mode" = rate2 ]; then record "$label" "$s" "$p50 / $p99"; else record "$label" "$s" "$pcs"; fi
  done
}

# rss_kib PID -> resident KiB of PID and its children (nginx's worker)
rss_kib() {
  local total=0 p
  for p in $1 $(pgrep -P "$1" || true); do
    total=$((total + $(awk '/VmRSS/ {print $2}' "/proc/$p/status" 2>/dev/null || echo 0)))
  done
  echo $total
}

want() { [[ " ${ROWS:-tls13 grpc idle tls12 big registered} " == *" $1 "* ]]; }

if want tls13 || want idle || want grpc; then
start_all tls13 small
fi
if want grpc; then
echo "== gRPC unary calls (HTTP/2 client, h2c upstream) ==" >&2
measure "gRPC unary calls (h2c upstream)" grpc ecdsa nginx haproxy portcullis
measure "gRPC streaming messages (bidirectional, h2c upstream)" grpcstream ecdsa nginx haproxy portcullis
measure "HTTP/2 requests to an h2c upstream" h2up ecdsa nginx haproxy portcullis
fi
if want tls13; then
echo "== TLS 1.3, one-CA truststore ==" >&2
measure "handshakes TLS 1.3 ECDSA client" handshake ecdsa "${servers[@]}"
measure "handshakes TLS 1.3 RSA-2048 client" handshake rsa "${servers[@]}"
measure "keep-alive HTTP/1.1 requests" h1 ecdsa "${servers[@]}"
measure "keep-alive HTTP/2 requests" h2 ecdsa nginx haproxy caddy portcullis
RATE=${RATE:-5000} measure "latency p50 / p99 ms at ${RATE:-5000}/s" rate ecdsa nginx haproxy caddy portcullis bare
RATE=${RATE:-5000} measure "latency p50 / p99 ms at ${RATE:-5000}/s, HTTP/2 (4 connections x 4 streams)" rate2 ecdsa nginx haproxy caddy portcullis
fi

want idle && echo "== memory per idle connection ($idle_n) ==" >&2
want idle && for s in "${servers[@]}"; do
  [[ " ${SERVERS:-${servers[*]}} " == *" $s "* ]] || continue
  pid=${spid[$s]}
  before=$(rss_kib "$pid")
  taskset -c 1 "$tools" idle "127.0.0.1:${port[$s]}" localhost ca/ca.pem ecdsa.pem ecdsa.key "$idle_n" 600 > "idle.$s" 2>&1 &
  ipid=$!
  for _ in $(seq 1 1200); do grep -q ready "idle.$s" && break; kill -0 $ipid 2>/dev/null || break; sleep 0.1; done
  if grep -q ready "idle.$s"; then
    sleep 2  # let the servers' idle-buffer release (Portcullis: 1 s) happen before reading RSS
    after=$(rss_kib "$pid")
    per=$(python3 -c "print(f'{($after - $before) / $idle_n:.1f}')")
    echo "  idle / $s: $before KiB -> $after KiB, $per KiB per connection" >&2
  else
    per="failed"; echo "  idle / $s: failed: $(tail -2 "idle.$s")" >&2
  fi
  record "KiB per idle mTLS connection ($idle_n)" "$s" "$per"
  kill $ipid 2>/dev/null || true; wait $ipid 2>/dev/null || true
done
stop_all

if want tls12; then
echo "== TLS 1.2 ==" >&2
start_all tls12 small
measure "handshakes TLS 1.2 ECDSA client" handshake ecdsa "${servers[@]}"
measure "handshakes TLS 1.2 RSA-2048 client" handshake rsa "${servers[@]}"
stop_all
fi

if want big; then
echo "== TLS 1.3, 10,000-CA truststore, names not advertised ==" >&2
start_all tls13 big
# Caddy (Go crypto/tls) always advertises every CA name (~0.6 MB here); measured anyway.
measure "handshakes TLS 1.3, 10,000-CA truststore" handshake ecdsa "${servers[@]}"
stop_all
fi

if [ "$registered" -gt 0 ] && want registered; then
  echo "== Portcullis, registered mode with $registered certificates ==" >&2
  "$scale" "$registered" "$work/reg/registry.db" reg >&2
  cat > reg/gw.toml <<CONF
database = "$work/reg/registry.db"
[admin]
address = "127.0.0.1:29444"
[[listener]]
address = "127.0.0.1:18446"
[[domain]]
hostname = "localhost"
certificate = "$work/server.chain.pem"
key = "$work/server.key"
security_policy = "TLS_1_3"
session_resumption = false
registry_mode = "registered"
[domain.mtls]
mode = "required"
truststore = "$work/reg/ca.pem"
[[domain.mapping]]
upstream = "http://127.0.0.1:$up_port"
CONF
  PORTCULLIS_LOG=warn TOKIO_WORKER_THREADS=1 taskset -c 0 "$pc" serve --config reg/gw.toml \
    --data-dir reg/data >reg/serve.log 2>&1 & pids+=($!)
  for _ in $(seq 1 600); do grep -q "serving on" reg/serve.log && break; sleep 0.1; done
  read -r pcs rps busy ok total _ _ < <(load portcullis handshake reg/client 18446)
  echo "  registered: $pcs per core-s ($rps/s at CPU0 $busy; $ok of $total answered 200)" >&2
  record "handshakes TLS 1.3, registered mode, $registered certificates" portcullis "$pcs"
  stop_all
fi
kill $up_pid $grpc_pid 2>/dev/null || true

# --- the table -----------------------------------------------------------------------------
printf '%s\n' "${rows[@]}" > rows.txt
python3 - "$secs" <<'PY'
import sys
rows = [l.rstrip("\n").split("|") for l in open("rows.txt")]
labels, table = [], {}
for label, server, value in rows:
    if label not in table:
        labels.append(label); table[label] = {}
    table[label][server] = value
servers = ["nginx", "haproxy", "caddy", "portcullis", "bare"]
def num(v):
    try: return float(v)
    except (TypeError, ValueError): return None
print(f"Per core-second of the server under test ({sys.argv[1]} s per run); latency in ms; memory in KiB.")
print("| scenario | nginx | HAProxy | Caddy | Portcullis | bare rustls | P/nginx | P/HAProxy | P/Caddy | P/bare |")
print("| --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: |")
base = table.get("handshakes TLS 1.3 ECDSA client", {})
for label in labels:
    row = table[label]
    cells = [row.get(s, "–") for s in servers]
    p = num(row.get("portcullis"))
    ratios = []
    for s in ["nginx", "haproxy", "caddy", "bare"]:
        o = num(row.get(s))
        if p is None or not o:
            ratios.append("–")
        elif label.startswith("KiB"):
            ratios.append(f"{p / o:.2f}")   # memory: lower is better
        else:
            ratios.append(f"{p / o:.2f}")
    if label.startswith("handshakes TLS 1.3, registered") or label.startswith("handshakes TLS 1.3, 10,000"):
        b = num(base.get("portcullis"))
        if p and b:
            ratios[-1] += f" (vs 1 CA: {p / b:.2f})" if "10,000" in label else ""
            if "registered" in label:
                ratios = ["–", "–", "–", f"vs file truststore: {p / b:.2f}"]
    print("| " + " | ".join([label] + cells + ratios) + " |")
PY
