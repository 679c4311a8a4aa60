#!/usr/bin/env bash
# Soak: steady mixed load for a while, with the gateway's state changing under it, then a report.
#
#   bench/soak.sh [MINUTES]      (default 30; CHANGES=0 runs the load alone, to tell memory the
#                                 changes account for from memory the load does)
#
# One `portcullis serve` (embedded SQLite registry, registry_mode = "revocation") in front of an
# nginx upstream, with two mappings: `/` (any valid certificate) and `/guarded`
# (authorization = "policy"). Load, all the time (oha, a client certificate that stays valid):
#   - keep-alive HTTP/1.1 requests at 400/s on 8 connections;
#   - new mutual-TLS connections at 40/s (one request each);
#   - HTTP/2 requests at 100/s on 2 connections.
# Changes, in a loop:
#   - every 20 s the truststore file is swapped (root A ↔ root A + an unrelated root) and the
#     gateway reloaded (SIGHUP);
#   - every 15 s a new client certificate is issued, must be admitted, is revoked in the registry,
#     and must then be refused (a new connection);
#   - every 30 s the policy on `/guarded` flips between allow and deny, and a probe checks the
#     answer (200 or 403) once the gateway has the change.
# Every 10 s: resident memory, open file descriptors, open connections. The report: the load's
# error count (must be 0: none of the changes concern its certificate), unexpected probe outcomes
# (must be 0), memory over time (flat after warm-up) and file descriptors (no growth).
#
# Needs: nginx, oha (`cargo install oha --locked`), curl, python3. Loopback only.
set -euo pipefail
cd "$(dirname "$0")/.."
minutes="${1:-30}"
secs=$((minutes * 60))
root="$(pwd)"
command -v nginx >/dev/null 2>&1 || { apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq nginx-light >/dev/null; }
. bench/lib.sh
require_oha
cargo build --release -q
pc="$root/target/release/portcullis"
work="$(mktemp -d)"
pids=()
cleanup() { for p in "${pids[@]}"; do kill "$p" 2>/dev/null || true; done; [ -n "${KEEP:-}" ] || rm -rf "$work"; }
trap cleanup EXIT
cd "$work"
echo "work directory: $work" >&2

"$pc" pki ca create --cn "Soak Root A" --out ca-a >/dev/null
"$pc" pki ca create --cn "Soak Root B" --out ca-b >/dev/null
"$pc" pki issue --profile client --cn steady --issuer-cert ca-a/ca.pem --issuer-key ca-a/ca.key \
  --out . --name steady >/dev/null
cp ca-a/ca.pem trust.pem
cat ca-a/ca.pem ca-b/ca.pem > trust-ab.pem

up_port=18085
upstream_conf "$work/up" $up_port
nginx -c "$work/up/nginx.conf" -p "$work/up" & pids+=($!)

cat > gw.toml <<CONF
[admin]
address = "127.0.0.1:0"
[[listener]]
address = "127.0.0.1:28445"
[[domain]]
hostname = "localhost"
certificate = "auto"
registry_mode = "revocation"
[domain.mtls]
mode = "required"
truststore = "trust.pem"
[[domain.mapping]]
base_path = "/guarded"
upstream = "http://127.0.0.1:$up_port"
authorization = "policy"
[[domain.mapping]]
upstream = "http://127.0.0.1:$up_port"
CONF
PORTCULLIS_LOG=warn "$pc" serve --config gw.toml --data-dir data > serve.log 2>&1 & pids+=($!)
gw=$!
for _ in $(seq 1 300); do grep -q "serving on" serve.log 2>/dev/null && break; sleep 0.1; done
grep -q "serving on" serve.log || { cat serve.log >&2; exit 1; }
cli() { "$pc" "$@" --data-dir data; }
url=https://localhost:28445
c=(--cacert data/ca/ca.pem)

allow='{"Statement": [{"Effect": "Allow", "Action": "http:*", "Resource": "route:localhost/*"}]}'
deny='{"Statement": [{"Effect": "Allow", "Action": "http:*", "Resource": "route:localhost/nothing/*"}]}'
echo "$allow" > allow.json; echo "$deny" > deny.json
cli policy create guarded --document allow.json >/dev/null
cli policy attach guarded --domain localhost >/dev/null

# The load, for the whole run.
load() {  # NAME ARGS...
  local name=$1; shift
  "$oha_bin" --no-tui -z "${secs}s" "$@" --cert steady.pem --key steady.key --cacert data/ca/ca.pem \
    --output-format json "$url/" > "load-$name.json" 2>/dev/null &
  pids+=($!)
}
load keepalive -c 8 -q 400
load handshakes -c 4 -q 40 --disable-keepalive
load http2 -c 2 -q 100 --http2

status_of() { curl -s -o /dev/null -w '%{http_code}' "${c[@]}" --cert "$1.pem" --key "$1.key" "$url$2" 2>/dev/null || true; }
unexpected=0; changes=0
note() { echo "$(date +%T) $*" >> changes.log; }
start=$(date +%s)
echo "t_s rss_kib fds open_connections" > samples.txt
next_sample=0 next_swap=20 next_victim=15 next_policy=30 victim=0 policy=allow trust=a
if [ "${CHANGES:-1}" = 0 ]; then next_swap=$((secs + 1)) next_victim=$((secs + 1)) next_policy=$((secs + 1)); fi
while :; do
  now=$(( $(date +%s) - start ))
  [ "$now" -ge "$secs" ] && break
  if [ "$now" -ge "$next_sample" ]; then
    rss=$(awk '/VmRSS/ {print $2}' "/proc/$gw/status")
    fds=$(ls "/proc/$gw/fd" | wc -l)
    open=$(curl -s "${c[@]}" --cert data/admin/admin.pem --key data/admin/admin.key \
      "$(cat data/admin/endpoint)/metrics" | awk '/^portcullis_active_connections / {print $2}')
    echo "$now $rss $fds ${open:-?}" >> samples.txt
    next_sample=$((next_sample + 10))
  fi
  if [ "$now" -ge "$next_swap" ]; then
    if [ "$trust" = a ]; then cp trust-ab.pem trust.pem.new; trust=ab; else cp ca-a/ca.pem trust.pem.new; trust=a; fi
    mv trust.pem.new trust.pem
    kill -HUP "$gw"; changes=$((changes + 1)); note "truststore -> $trust"
    next_swap=$((next_swap + 20))
  fi
  if [ "$now" -ge "$next_victim" ]; then
    victim=$((victim + 1))
    "$pc" pki issue --profile client --cn "victim-$victim" --issuer-cert ca-a/ca.pem \
      --issuer-key ca-a/ca.key --out . --name "victim-$victim" >/dev/null
    before=$(status_of "victim-$victim" /)
    id=$(cli cert register --cert "victim-$victim.pem" --status ACTIVE --json | python3 -c 'import json,sys; print(json.load(sys.stdin)["id"])')
    cli cert update "$id" --status REVOKED >/dev/null
    after=""
    for _ in $(seq 1 50); do after=$(status_of "victim-$victim" /); [ "$after" != 200 ] && break; sleep 0.1; done
    [ "$before" = 200 ] || { unexpected=$((unexpected + 1)); note "victim-$victim before revocation: $before"; }
    [ "$after" != 200 ] || { unexpected=$((unexpected + 1)); note "victim-$victim still admitted 5 s after revocation"; }
    changes=$((changes + 1)); note "revoked victim-$victim ($before then $after)"
    next_victim=$((next_victim + 15))
  fi
  if [ "$now" -ge "$next_policy" ]; then
    if [ "$policy" = allow ]; then policy=deny; want=403; else policy=allow; want=200; fi
    cli policy create-version guarded --document "$policy.json" --set-default >/dev/null 2>&1 \
      || { cli policy delete-version guarded --version "$(cli policy get guarded --json | python3 -c 'import json,sys; d=json.load(sys.stdin); print(min(v["version"] for v in d["versions"] if not v["is_default"]))')" >/dev/null; \
           cli policy create-version guarded --document "$policy.json" --set-default >/dev/null; }
    got=""
    for _ in $(seq 1 50); do got=$(status_of steady /guarded/x); [ "$got" = "$want" ] && break; sleep 0.1; done
    [ "$got" = "$want" ] || { unexpected=$((unexpected + 1)); note "policy $policy: /guarded answered $got, wanted $want"; }
    changes=$((changes + 1)); note "policy -> $policy ($got)"
    next_policy=$((next_policy + 30))
  fi
  sleep 1
done
for p in "${pids[@]:2}"; do wait "$p" 2>/dev/null || true; done

python3 - "$minutes" "$unexpected" "$changes" <<'PY'
import json, sys
minutes, unexpected, changes = sys.argv[1], int(sys.argv[2]), int(sys.argv[3])
print(f"# Soak report: {minutes} minutes, {changes} changes (truststore swaps, revocations, policy flips)")
errors = 0
print("\n| load | requests | 200 | other statuses | connection errors |")
print("| --- | ---: | ---: | ---: | ---: |")
for name in ["keepalive", "handshakes", "http2"]:
    try:
        d = json.load(open(f"load-{name}.json"))
    except Exception as e:
        print(f"| {name} | no report ({e}) | | | |"); errors += 1; continue
    codes = d.get("statusCodeDistribution", {})
    errs = d.get("errorDistribution", {})
    ok = codes.get("200", 0)
    other = sum(v for k, v in codes.items() if k != "200")
    bad = sum(errs.values())
    # oha cancels requests in flight at the deadline; those are not errors of the gateway.
    bad_real = sum(v for k, v in errs.items() if "aborted due to deadline" not in k)
    errors += other + bad_real
    print(f"| {name} | {ok + other + bad:,} | {ok:,} | {other} | {bad_real}" + (f" (+{bad - bad_real} cut by the deadline)" if bad != bad_real else "") + " |")
    for k, v in errs.items():
        if "aborted due to deadline" not in k:
            print(f"|  error | {k} | {v} | | |")
rows = [l.split() for l in open("samples.txt").read().splitlines()[1:]]
print("\n| t (s) | RSS MiB | fds | open connections |")
print("| ---: | ---: | ---: | ---: |")
step = max(1, len(rows) // 12)
for r in rows[::step] + ([rows[-1]] if rows and (len(rows) - 1) % step else []):
    print(f"| {r[0]} | {int(r[1]) / 1024:.1f} | {r[2]} | {r[3]} |")
if len(rows) >= 4:
    warm = rows[len(rows) // 4]
    last = rows[-1]
    print(f"\nmemory after warm-up (t={warm[0]} s) {int(warm[1]) / 1024:.1f} MiB → end {int(last[1]) / 1024:.1f} MiB; "
          f"peak {max(int(r[1]) for r in rows) / 1024:.1f} MiB")
    print(f"file descriptors after warm-up {warm[2]} → end {last[2]}")
print(f"\nload errors: {errors}; unexpected probe outcomes: {unexpected} (see changes.log)")
sys.exit(1 if errors or unexpected else 0)
PY
