#!/usr/bin/env bash
# OCSP answers per core: Portcullis's responder (`[revocation]`) beside `openssl ocsp` as the
# peer responder, the same CA, certificate and request, each server alone on CPU 0 and oha on
# CPU 1 (16 connections, POST), with and without a nonce (a nonce means a signature per answer).
#
#   bench/ocsp.sh [SECONDS]        (default 5 s per run)
#
# Needs: openssl, oha (`cargo install oha --locked`), taskset. Loopback only.
set -euo pipefail
cd "$(dirname "$0")/.."
secs="${1:-5}"
root="$(pwd)"
. bench/lib.sh
require_oha
cargo build --release -q
pc="$root/target/release/portcullis"

work="$(mktemp -d)"
pids=()
cleanup() { for p in "${pids[@]}"; do kill "$p" 2>/dev/null || true; done; rm -rf "$work"; }
trap cleanup EXIT
cd "$work"

port_of() { python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1",0)); print(s.getsockname()[1])'; }
rev_port=$(port_of); ossl_port=$(port_of)
cat > portcullis.toml <<CONF
[admin]
address = "127.0.0.1:0"
[revocation]
listen = "127.0.0.1:$rev_port"
[[listener]]
address = "127.0.0.1:0"
protocols = ["http"]
[[domain]]
hostname = "localhost"
certificate = "auto"
[domain.mtls]
mode = "required"
truststore = "data/ca/ca.pem"
[[domain.mapping]]
upstream = "builtin:echo"
CONF
taskset -c 0 "$pc" serve --config portcullis.toml --data-dir data > serve.log 2>&1 &
pids+=($!)
for _ in $(seq 1 100); do [ -f data/admin/endpoint ] && break; sleep 0.1; done
"$pc" cert create --common-name device-1 --status ACTIVE --out device --data-dir data >/dev/null
openssl ocsp -issuer data/ca/ca.pem -cert device/cert.pem -no_nonce -reqout plain.der >/dev/null 2>&1
openssl ocsp -issuer data/ca/ca.pem -cert device/cert.pem -reqout nonce.der >/dev/null 2>&1
# Portcullis publishes within 250 ms; wait until it answers "good".
for _ in $(seq 1 50); do
  openssl ocsp -issuer data/ca/ca.pem -cert device/cert.pem -url "http://127.0.0.1:$rev_port/ocsp" \
    -CAfile data/ca/ca.pem 2>/dev/null | grep -q ': good' && break
  sleep 0.1
done

# The peer: openssl's responder with an index holding the same certificate.
serial=$(openssl x509 -in device/cert.pem -noout -serial | cut -d= -f2)
printf "V\t%s\t\t%s\tunknown\t/CN=device-1\n" "$(date -u -d '+300 days' +%y%m%d%H%M%SZ)" "$serial" > index.txt
taskset -c 0 openssl ocsp -index index.txt -port "$ossl_port" -rsigner data/ca/ca.pem \
  -rkey data/ca/ca.key -CA data/ca/ca.pem -nmin 10 > openssl-ocsp.log 2>&1 &
pids+=($!)
for _ in $(seq 1 50); do
  openssl ocsp -issuer data/ca/ca.pem -cert device/cert.pem -url "http://127.0.0.1:$ossl_port" \
    -CAfile data/ca/ca.pem 2>/dev/null | grep -q ': good' && break
  sleep 0.1
done

rate() {
  taskset -c 1 "$oha_bin" -z "${secs}s" -c 16 --no-tui -m POST -D "$1" \
    -T application/ocsp-request "$2" | awk '/Requests\/sec/ {printf "%.0f", $2}'
}
echo "OCSP answers/s, server on one core ($secs s, 16 connections, POST):"
printf "  %-34s %10s %10s\n" "" "no nonce" "nonce"
printf "  %-34s %10s %10s\n" "Portcullis ([revocation] /ocsp)" \
  "$(rate plain.der "http://127.0.0.1:$rev_port/ocsp")" "$(rate nonce.der "http://127.0.0.1:$rev_port/ocsp")"
printf "  %-34s %10s %10s\n" "openssl ocsp (-index, -port)" \
  "$(rate plain.der "http://127.0.0.1:$ossl_port/")" "$(rate nonce.der "http://127.0.0.1:$ossl_port/")"
