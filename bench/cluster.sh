#!/usr/bin/env bash
# A three-node Portcullis cluster (one PostgreSQL, three NATS servers with JetStream, replicas
# 3) beside one Portcullis node and Mosquitto, all on this machine, with the same certificates
# and load generator (crates/bench/src/bin/mqtt_load.rs):
#
#   bench/cluster.sh [SECONDS] [DEVICES]      (defaults: 5 s, 30000)
#
# - delivery latency p50/p99 at a fixed 1,000 messages/s, same node vs across nodes;
# - fan-in throughput (8 publishers on node A, the subscriber on node B) per server
#   core-second — CPU time of every server process (nodes and NATS, or the single node, or
#   Mosquitto), since this machine has 2 cores for everything;
# - takeover: the same client id on node B closes its session on node A (20 times);
# - DEVICES idle mutual-TLS sessions spread over the three nodes, each subscribed to its own
#   topic: resident memory per session and the SUBACKs' waits (and the same on the single node);
# - failover: node A killed under a persistent QoS 1 subscriber that resumes on node C.
#
# Every server process runs one thread of work, as bench/run.sh pins each server to one worker:
# each node one Tokio worker (NODE_WORKERS=N to change), each NATS server GOMAXPROCS=1
# (NATS_PROCS=N), Mosquitto has one. Seven servers and the load generator share 2 cores here;
# with two workers each, the nodes' and NATS's threads mostly woke and waited on each other
# (futex and context switches: 10-28 % of their samples), which a node on its own machine does not.
#
# PARTS="latency fanin takeover idle failover" (the default: all) runs only some parts; QOS="0 1" (the
# default) the fan-in's QoS levels; PERF="a b single" records a CPU profile of those nodes under
# each fan-in (target/perf.cluster.NODE.TARGET.qosQ.data; PERF_CALLGRAPH as in bench/run.sh);
# QOS1_LIVE=1 starts the nodes with nats_qos1_live. SYSCALLS=1 counts each server process's reads and writes under each fan-in; COUNTS=1 prints
# the nodes' message counters and resident memory, and each NATS server's messages in and out
# during the cluster's fan-in (its monitoring port, 3650N).
# FANIN_RATE=N offers N messages a second between the 8 publishers instead of as many as
# they can: the cost per message at a load every server delivers whole. Each fan-in also prints
# what the publishers sent in the same window: more than was delivered means messages dropped
# for the subscriber (as QoS 0 allows; COUNTS=1 shows where). MQTT_LOAD_TOPICS=N spreads each publisher's
# messages over N topics of its own (a fleet, where every device publishes to its own topic)
# instead of one.
#
# Needs: nats-server, mosquitto, PostgreSQL (Debian packages; scripts/test installs them),
# python3. Loopback only, fixed ports 3xxxx.
set -euo pipefail
cd "$(dirname "$0")/.."
secs="${1:-5}"
devices="${2:-30000}"
root="$(pwd)"
nats="$(command -v nats-server || echo /usr/sbin/nats-server)"
mosq="$(command -v mosquitto || echo /usr/sbin/mosquitto)"
[ -x "$nats" ] && [ -x "$mosq" ] || { echo "needs nats-server and mosquitto (apt-get install nats-server mosquitto)" >&2; exit 2; }
cargo build --release -q
cargo build --release -q -p portcullis-bench
pc="${PORTCULLIS_BIN:-$root/target/release/portcullis}"
load="${MQTT_LOAD_BIN:-$root/target/release/mqtt_load}"
ulimit -n "$(ulimit -Hn)"

work="$(mktemp -d)"
pids=()
db="portcullis_bench_$$"
as_postgres() { runuser -u postgres -- "$@"; }
cleanup() {
  for p in "${pids[@]}"; do kill -9 "$p" 2>/dev/null || true; done
  as_postgres psql -qc "DROP DATABASE IF EXISTS $db" >/dev/null 2>&1 || true
  rm -rf "$work"
}
trap cleanup EXIT
pg_ctlcluster 15 main start 2>/dev/null || true
as_postgres psql -qtAc "SELECT 1 FROM pg_roles WHERE rolname = 'portcullis'" | grep -q 1 \
  || as_postgres psql -qc "CREATE ROLE portcullis LOGIN SUPERUSER PASSWORD 'portcullis'" >/dev/null
as_postgres psql -qc "CREATE DATABASE $db OWNER portcullis" >/dev/null
dburl="postgres://portcullis:portcullis@127.0.0.1:5432/$db"
cd "$work"

"$pc" pki ca create --cn "Bench Root" --out ca >/dev/null
"$pc" pki issue --profile server --cn localhost --san dns:localhost --san ip:127.0.0.1 \
  --issuer-cert ca/ca.pem --issuer-key ca/ca.key --out . --name server >/dev/null
"$pc" pki issue --profile client --cn bench-client --issuer-cert ca/ca.pem --issuer-key ca/ca.key \
  --out . --name client >/dev/null
"$pc" cluster-key generate --out cluster.key >/dev/null

# Three NATS servers, JetStream, clustered.
routes="nats-route://127.0.0.1:36201,nats-route://127.0.0.1:36202,nats-route://127.0.0.1:36203"
for i in 1 2 3; do
  mkdir -p "js$i"
  cat > "n$i.conf" <<CONF
server_name: n$i
listen: "127.0.0.1:3610$i"
http: "127.0.0.1:3650$i"
jetstream { store_dir: "$work/js$i" }
cluster { name: bench, listen: "127.0.0.1:3620$i", routes: [$routes] }
CONF
  GOMAXPROCS="${NATS_PROCS:-1}" "$nats" -c "n$i.conf" > "nats$i.log" 2>&1 &
  pids+=($!)
  eval "nats_pid$i=$!"
done
for i in 1 2 3; do
  for _ in $(seq 1 100); do grep -q "Server is ready" "nats$i.log" && break; sleep 0.1; done
done

node_conf() { # NAME ADMIN_PORT MQTT_PORT [cluster]
  {
    if [ "${4:-}" = cluster ]; then
      echo "database = \"$dburl\""
      echo "cluster_key_file = \"cluster.key\""
      echo "node_name = \"$1\""
      # Each node on its own NATS server, as in the reference deployment (one beside each
      # node): what crosses nodes crosses a route between two servers. (Given all three, a
      # node picked one at random, and runs differed by whether A and B shared one: that
      # halves NATS's work.)
      echo "nats_url = \"nats://127.0.0.1:$(case $1 in a) echo 36101;; b) echo 36102;; *) echo 36103;; esac)\""
      echo "nats_replicas = 3"
      # QOS1_LIVE=1: QoS 1 messages nobody keeps cross live (off by default, as in the product).
      if [ -n "${QOS1_LIVE:-}" ]; then echo "nats_qos1_live = true"; fi
    fi
    cat <<CONF
[admin]
address = "127.0.0.1:$2"
[[listener]]
address = "127.0.0.1:$3"
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
  } > "$1.toml"
}
start_node() { # NAME
  TOKIO_WORKER_THREADS="${NODE_WORKERS:-1}" PORTCULLIS_LOG=warn "$pc" serve --config "$1.toml" --data-dir "data-$1" > "$1.log" 2>&1 &
  pids+=($!)
  eval "pid_$1=$!"
  for _ in $(seq 1 300); do grep -q "serving on" "$1.log" 2>/dev/null && break; sleep 0.1; done
  grep -q "serving on" "$1.log" || { echo "node $1 did not start:" >&2; cat "$1.log" >&2; exit 1; }
}
node_conf a 36301 36401 cluster; node_conf b 36302 36402 cluster; node_conf c 36303 36403 cluster
node_conf single 36304 36404
start_node a; start_node b; start_node c; start_node single
cat > all.json <<'JSON'
{"Statement": [{"Effect": "Allow",
  "Action": ["mqtt:Connect", "mqtt:Publish", "mqtt:Subscribe", "mqtt:Receive"],
  "Resource": ["client:*", "topic:bench/*", "topicfilter:bench/*"]}]}
JSON
for n in a single; do
  "$pc" policy create all --document all.json --data-dir "data-$n" >/dev/null
  "$pc" policy attach all --domain localhost --data-dir "data-$n" >/dev/null
done
cat > mosquitto.conf <<CONF
user root
persistence false
log_type error
listener 36405 127.0.0.1
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
"$mosq" -c mosquitto.conf > mosquitto.log 2>&1 &
pids+=($!)
mq_pid=$!
L() { "$load" "$@"; }
args() { echo "127.0.0.1:$1 ca/ca.pem client.chain.pem client.key"; }
# Until every node takes CONNECTs with the policy and NATS is set up.
for port in 36401 36402 36403 36404; do
  for _ in $(seq 1 100); do L $(args $port) connect 1 1 >/dev/null 2>&1 && break; sleep 0.2; done
done
# ... and every node is ready (its JetStream streams made: until then a node queues what it
# routes, and drops it once its queue is full).
for n in a b c single; do
  aport=$(case $n in a) echo 36301;; b) echo 36302;; c) echo 36303;; single) echo 36304;; esac)
  for _ in $(seq 1 300); do
    code=$(curl -sk -o /dev/null -w '%{http_code}' --cert "data-$n/admin/admin.pem" --key "data-$n/admin/admin.key" \
      "https://127.0.0.1:$aport/readyz" || true)
    [ "$code" = 200 ] && break
    sleep 0.1
  done
done

calc() { awk "BEGIN { printf \"%.1f\", $1 }"; }
cpu() { # PIDS... -> CPU seconds used so far
  local t=0
  for p in "$@"; do t=$((t + $(awk '{print $14 + $15}' "/proc/$p/stat"))); done
  calc "$t / $(getconf CLK_TCK)"
}
rss() { awk '/VmRSS/ {print $2}' "/proc/$1/status"; }
# Each NATS server's messages in/out and bytes in so far (its monitoring port): "in/out/bytes" x3.
nats_msgs() {
  for i in 1 2 3; do
    curl -s "http://127.0.0.1:3650$i/varz" | python3 -c 'import json,sys; v=json.load(sys.stdin); print("%d/%d/%d" % (v["in_msgs"], v["out_msgs"], v["in_bytes"]), end=" ")'
  done
}
cluster_pids="$pid_a $pid_b $pid_c $nats_pid1 $nats_pid2 $nats_pid3"

want() { [[ " ${PARTS:-latency fanin takeover idle failover} " == *" $1 "* ]]; }
# recording NAME PID TAG: starts the profiles and counts asked for; `recorded` waits for them.
recorders=()
recording() {
  if [[ " ${PERF:-} " == *" $1 "* ]]; then
    perf record -F 999 --call-graph "${PERF_CALLGRAPH:-dwarf,16384}" -p "$2" \
      -o "$root/target/perf.cluster.$1.$3.data" -- sleep "$secs" >/dev/null 2>&1 & recorders+=($!)
  fi
  if [ -n "${SYSCALLS:-}" ]; then
    perf stat -x, -e 'syscalls:sys_enter_write,syscalls:sys_enter_writev,syscalls:sys_enter_sendto,syscalls:sys_enter_read,syscalls:sys_enter_recvfrom,syscalls:sys_enter_epoll_wait,syscalls:sys_enter_futex' \
      -p "$2" -o "syscalls.$1.$3" -- sleep "$secs" >/dev/null 2>&1 & recorders+=($!)
  fi
}
recorded() { # TAG
  for p in "${recorders[@]}"; do wait "$p" || true; done
  recorders=()
  if [ -n "${SYSCALLS:-}" ]; then
    for f in syscalls.*."$1"; do
      echo "  syscalls ${f#syscalls.}: $(grep -v '^#' "$f" | awk -F, 'NF > 2 && $1 > 0 { sub("syscalls:sys_enter_", "", $3); printf "%s %s  ", $3, $1 }')"
    done
  fi
}

want latency && echo "## latency at 1,000 messages/s (p50 / p99 ms)"
want latency && for q in 0 1; do
  same=$(L $(args 36401) latency "$secs" 1000 $q)
  cross=$(MQTT_LOAD_SUBSCRIBE_AT=127.0.0.1:36402 L $(args 36401) latency "$secs" 1000 $q)
  single=$(L $(args 36404) latency "$secs" 1000 $q)
  mosq_l=$(L $(args 36405) latency "$secs" 1000 $q)
  echo "QoS $q: single node $single | cluster same node $same | cluster across nodes $cross | Mosquitto $mosq_l  (p50 p99 samples)"
done

want fanin && echo "## fan-in, 8 publishers (messages/s; per server core-second)"
want fanin && for q in ${QOS:-0 1}; do
  for target in single cluster mosquitto; do
    case $target in
      single) port=36404 sub="" ps="$pid_single" ;;
      cluster) port=36401 sub=127.0.0.1:36402 ps="$cluster_pids" ;;
      mosquitto) port=36405 sub="" ps="$mq_pid" ;;
    esac
    case $target in
      single) recording single "$pid_single" "single.qos$q" ;;
      cluster) for n in a b c; do recording $n "$(eval echo \$pid_$n)" "cluster.qos$q"; done
               for i in 1 2 3; do recording nats$i "$(eval echo \$nats_pid$i)" "cluster.qos$q"; done ;;
      mosquitto) recording mosquitto "$mq_pid" "mosquitto.qos$q" ;;
    esac
    [ -n "${COUNTS:-}" ] && [ "$target" = cluster ] && nats_before=$(nats_msgs)
    before=$(cpu $ps)
    declare -A each=()
    for p in $ps; do each[$p]=$(cpu $p); done
    rate=$(MQTT_LOAD_SUBSCRIBE_AT=${sub:-127.0.0.1:$port} L $(args $port) fanin "$secs" 8 $q ${FANIN_RATE:-} 2>fanin.err)
    used=$(calc "$(cpu $ps) - $before")
    split=""
    for p in $ps; do split+="$(cpu $p | awk -v b="${each[$p]}" '{printf "%.1f", $1 - b}') "; done
    recorded "$target.qos$q"
    per=$(calc "$rate * ($secs + 1) / $used")
    echo "QoS $q $target: $rate msgs/s, $used CPU s ($split), $per msgs per server core-second"
    # What the publishers wrote meanwhile (more than delivered: dropped for the subscriber).
    echo "  $(tail -1 fanin.err)"
    if [ -n "${COUNTS:-}" ] && [ "$target" = cluster ]; then
      echo "  NATS messages in/out (bytes in) per server during the run: $(paste -d' ' <(echo "$nats_before" | tr ' ' '\n') <(nats_msgs | tr ' ' '\n') \
        | awk -F'[ /]' '{ printf "%d/%d (%d) ", $4 - $1, $5 - $2, $6 - $3 }')"
    fi
    if [ -n "${COUNTS:-}" ] && [ "$target" != mosquitto ]; then
      # COUNTS=1: the nodes' own message counters so far (accepted from publishers, sent to and
      # dropped for subscribers: a subscriber slower than its publishers has messages dropped).
      for n in $( [ "$target" = cluster ] && echo a b || echo single ); do
        aport=$(case $n in a) echo 36301;; b) echo 36302;; single) echo 36304;; esac)
        echo "  node $n: resident $(( $(rss "$(eval echo \$pid_$n)") / 1024 )) MiB; $(curl -sk --cert "data-$n/admin/admin.pem" --key "data-$n/admin/admin.key" "https://127.0.0.1:$aport/metrics" \
          | grep -E "^portcullis_(mqtt|cluster)_[a-z_]*(messages|drop|queue|slow)[a-z_]*" | tr "\\n" " ")"
        grep -v '"INFO"\| INFO ' "$n.log" | tail -3 | cut -c1-300 | sed 's/^/    /' || true
      done
    fi
  done
done

want takeover && echo "## takeover across nodes (20 times; median / worst ms)"
want takeover && L $(args 36401) takeover 127.0.0.1:36402 20
if want idle; then
# Each device subscribes to its own command topic once connected (IDLE_SUBSCRIBE=0: not), as a
# fleet's do: 30,000 filters in the route table, every SUBACK waiting for its entry.
subscribing="${IDLE_SUBSCRIBE:-1}"
echo "## $devices idle sessions over three nodes$( [ "$subscribing" != 0 ] && echo ", each subscribed to its own topic")"
per=$((devices / 3))
declare -A base
for n in a b c; do base[$n]=$(rss "$(eval echo \$pid_$n)"); done
nats_base=$(( $(rss $nats_pid1) + $(rss $nats_pid2) + $(rss $nats_pid3) ))
loads=()
for n in a b c; do
  port=$(case $n in a) echo 36401;; b) echo 36402;; c) echo 36403;; esac)
  MQTT_LOAD_SUBSCRIBE="$subscribing" MQTT_LOAD_ID_PREFIX="$n-" "$load" $(args $port) idle "$per" 600 > "idle.$n" 2>&1 &
  loads+=($!)
done
for n in a b c; do
  for _ in $(seq 1 3000); do grep -q ready "idle.$n" && break; sleep 0.1; done
done
for n in a b c; do echo "node $n: $(grep "sessions up" "idle.$n" | tail -1)"; done
total=0
for n in a b c; do
  now=$(rss "$(eval echo \$pid_$n)")
  total=$((total + now - ${base[$n]}))
  echo "node $n: $(( (now - ${base[$n]}) / 1024 )) MiB more for $per sessions"
done
nats_now=$(( $(rss $nats_pid1) + $(rss $nats_pid2) + $(rss $nats_pid3) ))
echo "per session: $(calc "$total / ($per * 3)") KiB in the nodes, $(calc "($nats_now - $nats_base) / ($per * 3)") KiB in NATS"
for p in "${loads[@]}"; do kill "$p" 2>/dev/null || true; done
# The same on the single node, for its SUBACKs' waits and memory.
base_single=$(rss "$pid_single")
MQTT_LOAD_SUBSCRIBE="$subscribing" "$load" $(args 36404) idle "$per" 600 > idle.single 2>&1 &
single_load=$!
for _ in $(seq 1 3000); do grep -q ready idle.single && break; sleep 0.1; done
echo "single node: $(grep "sessions up" idle.single | tail -1); $(calc "($(rss "$pid_single") - $base_single) / $per") KiB per session"
kill "$single_load" 2>/dev/null || true
fi

# Last: it kills node A.
if want failover; then
  echo "## failover: node A killed (SIGKILL) under a persistent QoS 1 subscriber, which resumes on node C (ms from the lost connection)"
  read -r resumed first caught acked dups missing state <<< "$(L $(args 36401) failover 127.0.0.1:36403 127.0.0.1:36402 "$pid_a")"
  echo "session resumed (CONNACK) $resumed ms, first message $first ms, every message acknowledged before the loss $caught ms; $acked acknowledged in all, $dups duplicates, $missing missing ($state)"
fi
