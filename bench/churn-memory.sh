#!/usr/bin/env bash
# Memory across state churn, nothing else running: does a reload or a registry change leave
# anything behind?
#
#   bench/churn-memory.sh [RELOADS] [CERTIFICATES]      (defaults 1200 and 150)
#
# Starts `portcullis serve` (embedded SQLite, registry_mode = "revocation"), then prints resident
# memory every 200 reloads (SIGHUP, one mutual-TLS request after each) and every 50 certificates
# registered and revoked through the CLI. Growth that flattens is caches warming; growth that
# keeps its pace is a leak.
#
# Needs: curl, python3. Loopback only.
set -euo pipefail
cd "$(dirname "$0")/.."
reloads="${1:-1200}"
certs="${2:-150}"
cargo build --release -q
pc="$(pwd)/target/release/portcullis"
work="$(mktemp -d)"
gw=""
cleanup() { [ -n "$gw" ] && kill "$gw" 2>/dev/null; rm -rf "$work"; }
trap cleanup EXIT
cd "$work"
port=28555
if (exec 3<>/dev/tcp/127.0.0.1/$port) 2>/dev/null; then
  echo "port $port is in use (a server left from another run?); stop it and run again" >&2; exit 1
fi
"$pc" pki ca create --cn "Churn Root" --out ca >/dev/null
"$pc" pki issue --profile client --cn steady --issuer-cert ca/ca.pem --issuer-key ca/ca.key \
  --out . --name steady >/dev/null
cat > gw.toml <<CONF
[[listener]]
address = "127.0.0.1:$port"
[[domain]]
hostname = "localhost"
certificate = "auto"
registry_mode = "revocation"
[domain.mtls]
mode = "required"
truststore = "ca/ca.pem"
[[domain.mapping]]
upstream = "http://127.0.0.1:9"
CONF
PORTCULLIS_LOG=warn "$pc" serve --config gw.toml --data-dir data > serve.log 2>&1 &
gw=$!
for _ in $(seq 1 300); do (exec 3<>/dev/tcp/127.0.0.1/$port) 2>/dev/null && break; sleep 0.1; done
rss() { awk '/VmRSS/ {print $2}' "/proc/$gw/status"; }
c=(-s -o /dev/null --cacert data/ca/ca.pem --cert steady.pem --key steady.key "https://localhost:$port/")
for _ in $(seq 1 20); do curl "${c[@]}" || true; done
echo "start: $(rss) KiB"
for i in $(seq 1 "$reloads"); do
  kill -HUP "$gw"; sleep 0.03; curl "${c[@]}" || true
  if [ $((i % 200)) -eq 0 ]; then echo "after $i reloads: $(rss) KiB"; fi
done
for i in $(seq 1 "$certs"); do
  "$pc" pki issue --profile client --cn "churn-$i" --issuer-cert ca/ca.pem --issuer-key ca/ca.key \
    --out . --name churn --force >/dev/null
  id=$("$pc" cert register --cert churn.pem --status ACTIVE --json --data-dir data \
    | python3 -c 'import json,sys; print(json.load(sys.stdin)["id"])')
  "$pc" cert update "$id" --status REVOKED --data-dir data >/dev/null
  if [ $((i % 50)) -eq 0 ]; then echo "after $i certificates registered and revoked: $(rss) KiB"; fi
done
