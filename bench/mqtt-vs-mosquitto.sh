#!/usr/bin/env bash
# Portcullis vs Mosquitto as mutual-TLS MQTT brokers, side by side: the same certificates, the
# same load generator (crates/bench/src/bin/mqtt_load.rs), the broker pinned to CPU 0 and the load
# to CPU 1.
#
#   bench/mqtt-vs-mosquitto.sh [SECONDS] [IDLE_CONNECTIONS]     (defaults: 5 s, 10000)
#
# Scenarios: connections per second (TLS 1.3 handshake + CONNECT/CONNACK + DISCONNECT, 16 at a
# time); fan-in (8 publishers, one subscriber on bench/#) and fan-out (one publisher, 8
# subscribers) messages per second at QoS 0 and 1; resident memory with IDLE_CONNECTIONS idle
# mutual-TLS sessions. Portcullis authorizes every packet with a policy (allow everything);
# Mosquitto checks nothing beyond the certificate.
#
# Needs: mosquitto (Debian package; installed if missing), python3. Loopback only.
set -euo pipefail
cd "$(dirname "$0")/.."
secs="${1:-5}"
idle="${2:-10000}"
root="$(pwd)"
if ! command -v mosquitto >/dev/null 2>&1; then
  apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq mosquitto
fi
mosq="$(command -v mosquitto || echo /usr/sbin/mosquitto)"
cargo build --release -q
cargo build --release -q -p portcullis-bench
pc="$root/target/release/portcullis"
load="$root/target/release/mqtt_load"
ulimit -n "$(ulimit -Hn)"

work="$(mktemp -d)"
pids=()
cleanup() { for p in "${pids[@]}"; do kill "$p" 2>/dev/null || true; done; rm -rf "$work"; }
trap cleanup EXIT
cd "$work"

"$pc" pki ca create --cn "Bench Root" --out ca >/dev/null
"$pc" pki issue --profile server --cn localhost --san dns:localhost --san ip:127.0.0.1 \
  --issuer-cert ca/ca.pem --issuer-key ca/ca.key --out . --name server >/dev/null
"$pc" pki issue --profile client --cn bench-client --issuer-cert ca/ca.pem --issuer-key ca/ca.key \
  --out . --name client >/dev/null

mq_port=18884 pc_port=28884 admin_port=29884 http_port=28443
cat > mosquitto.conf <<CONF
user root
persistence false
log_type error
listener $mq_port 127.0.0.1
cafile $work/ca/ca.pem
certfile $work/server.chain.pem
keyfile $work/server.key
require_certificate true
allow_anonymous true
max_queued_messages 1000
# QoS 1 messages in flight to a subscriber: 64, as Portcullis (Mosquitto's default of 20 holds
# a QoS 1 fan-in to one subscriber's round trips: about 13,000 messages/s here).
max_inflight_messages 64
CONF
taskset -c 0 "$mosq" -c mosquitto.conf >mosquitto.log 2>&1 &
pids+=($!)
mq_pid=$!

cat > gw.toml <<CONF
[admin]
address = "127.0.0.1:$admin_port"
[[listener]]
address = "127.0.0.1:$http_port"
[[listener]]
address = "127.0.0.1:$pc_port"
protocols = ["mqtt"]
[[domain]]
hostname = "localhost"
certificate = "server.chain.pem"
key = "server.key"
session_resumption = false
[domain.mtls]
mode = "required"
truststore = "ca/ca.pem"
[[domain.mapping]]
upstream = "builtin:echo"
CONF
cat > all.json <<'JSON'
{"Statement": [{"Effect": "Allow",
  "Action": ["mqtt:Connect", "mqtt:Publish", "mqtt:Subscribe", "mqtt:Receive"],
  "Resource": ["client:*", "topic:bench/*", "topicfilter:bench/*"]}]}
JSON
PORTCULLIS_LOG=warn TOKIO_WORKER_THREADS=1 taskset -c 0 "$pc" serve --config gw.toml --data-dir data >serve.log 2>&1 &
pids+=($!)
pc_pid=$!
for _ in $(seq 1 100); do grep -q "serving on" serve.log 2>/dev/null && break; sleep 0.1; done
"$pc" policy create all --document all.json --data-dir data >/dev/null
"$pc" policy attach all --domain localhost --data-dir data >/dev/null
# The gateway takes the policy from the registry within 200 ms: wait until a CONNECT passes.
for _ in $(seq 1 20); do
  "$load" "127.0.0.1:$pc_port" ca/ca.pem client.chain.pem client.key connect 1 1 >/dev/null 2>&1 && break
done

# run PORT ARGS... -> the load generator's figure
run() {
  local port=$1; shift
  taskset -c 1 "$load" "127.0.0.1:$port" ca/ca.pem client.chain.pem client.key "$@"
}
rss() { awk '/VmRSS/ {print $2}' "/proc/$1/status"; }

# idle PORT PID -> "resident_KiB baseline_KiB" with $idle idle sessions held open
idle_rss() {
  local port=$1 pid=$2 base now load_pid
  base=$(rss "$pid")
  taskset -c 1 "$load" "127.0.0.1:$port" ca/ca.pem client.chain.pem client.key idle "$idle" 600 \
    > "idle.$port" 2>&1 &
  load_pid=$!
  for _ in $(seq 1 1200); do grep -q ready "idle.$port" && break; sleep 0.1; done
  grep -q ready "idle.$port" || { echo "idle sessions never came up:" >&2; cat "idle.$port" >&2; exit 1; }
  now=$(rss "$pid")
  kill "$load_pid"; wait "$load_pid" 2>/dev/null || true
  echo "$now $base"
}
# Idle memory first, on fresh brokers (memory freed after load is not always returned).
idle_rss $mq_port $mq_pid > idle.mq
idle_rss $pc_port $pc_pid > idle.pc
read -r mq_idle mq_base < idle.mq
read -r pc_idle pc_base < idle.pc

declare -A mq pc
for name in connect fanin0 fanin1 fanout0 fanout1; do
  case $name in
    connect) args=(connect "$secs" 16) ;;
    fanin0) args=(fanin "$secs" 8 0) ;;
    fanin1) args=(fanin "$secs" 8 1) ;;
    fanout0) args=(fanout "$secs" 8 0) ;;
    fanout1) args=(fanout "$secs" 8 1) ;;
  esac
  mq[$name]=$(run $mq_port "${args[@]}")
  pc[$name]=$(run $pc_port "${args[@]}")
done

python3 - "$idle" "${mq[connect]}" "${pc[connect]}" "${mq[fanin0]}" "${pc[fanin0]}" \
  "${mq[fanin1]}" "${pc[fanin1]}" "${mq[fanout0]}" "${pc[fanout0]}" "${mq[fanout1]}" \
  "${pc[fanout1]}" "$mq_idle" "$mq_base" "$pc_idle" "$pc_base" <<'PY'
import sys
a = sys.argv[1:]
idle = int(a[0])
rows = [("connections/s (TLS 1.3 + CONNECT)", a[1], a[2]),
        ("fan-in msgs/s, QoS 0 (8 publishers)", a[3], a[4]),
        ("fan-in msgs/s, QoS 1", a[5], a[6]),
        ("fan-out msgs/s, QoS 0 (8 subscribers)", a[7], a[8]),
        ("fan-out msgs/s, QoS 1", a[9], a[10])]
print("| scenario | Mosquitto | Portcullis | ratio |")
print("| --- | --- | --- | --- |")
for name, m, p in rows:
    print(f"| {name} | {float(m):,.0f} | {float(p):,.0f} | {float(p) / max(float(m), 1):.2f} |")
mq_mib, pc_mib = int(a[11]) / 1024, int(a[13]) / 1024
print(f"| resident MiB with {idle:,} idle sessions | {mq_mib:.0f} | {pc_mib:.0f} | {mq_mib / max(pc_mib, 1):.2f} (memory: higher is better for Portcullis) |")
print(f"per idle session: Mosquitto {(int(a[11]) - int(a[12])) / idle:.1f} KiB, Portcullis {(int(a[13]) - int(a[14])) / idle:.1f} KiB")
PY
