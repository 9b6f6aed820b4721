#!/usr/bin/env bash
# Benchmarks of rollback-responder (issue 10). Usage: bash bench/run.sh
#
# Builds the service, the floor (bench/floor) and the open-loop generator (bench/loadgen) in
# release, then runs every scenario on loopback with the server pinned to CPU 1 and the load
# generator (wrk, bench-loadgen, moto) pinned to CPU 0:
#   1. throughput, wrk + Lua: new alerts and repeated notifications, 1/10/100 alerts per
#      notification; floor and service alternate (floor, service, floor, service), the service
#      on a fresh SQLite file (WAL; every 2xx after the fdatasync of its commit) every run;
#      reported as service/floor.
#   2. fixed rate, bench-loadgen (open loop): 2,000 notifications/s of 10 alerts, p50/p99.
#   3. storm and 4. time to rollback: bench/rollback_bench.py against moto through a counting proxy.
# Prints the results table and writes bench/results/latest.md (raw outputs: bench/results/raw/,
# not committed).
#
# Knobs (environment): BENCH_DURATION=10 BENCH_WARMUP=2 BENCH_ROUNDS=2 BENCH_CONNECTIONS=16
#   BENCH_RATE=2000 BENCH_WAIT_QUIET=1 (wait up to 10 min for no cargo/rustc/moto and load < 1)
#   BENCH_POSTGRES=1 (also the 10-alert throughput scenarios on PostgreSQL 127.0.0.1:5432, one round)
#   BENCH_ONLY="throughput fixed storm ttr" (a subset; "postgres" alone runs only the PostgreSQL rows)
#   BENCH_ALERTS="1 10 100" (alerts per notification in the throughput runs)
#   BENCH_BIN=path (measure another build of the service, e.g. an older commit's, instead of this tree's)
set -euo pipefail
cd "$(dirname "$0")/.."
root=$(pwd)
export CARGO_TARGET_DIR=${CARGO_TARGET_DIR:-$root/target}
DURATION=${BENCH_DURATION:-10}
WARMUP=${BENCH_WARMUP:-2}
ROUNDS=${BENCH_ROUNDS:-2}
CONNS=${BENCH_CONNECTIONS:-16}
RATE=${BENCH_RATE:-2000}
ONLY=${BENCH_ONLY:-"throughput fixed storm ttr"}
SERVER_CPU=1
LOAD_CPU=0
export BENCH_TOKEN=bench-webhook-token

results=$root/bench/results
raw=$results/raw
mkdir -p "$raw"
rm -f "$raw"/*
work=$(mktemp -d /tmp/rr-bench.XXXXXX)
server_pid=""
monitor_pid=""
cleanup() {
  if [ -n "$server_pid" ] && kill -0 "$server_pid" 2>/dev/null; then kill -KILL "$server_pid" 2>/dev/null || true; fi
  if [ -n "$monitor_pid" ]; then kill "$monitor_pid" 2>/dev/null || true; fi
  rm -rf "$work"
}
trap cleanup EXIT
log() { printf '[bench %s] %s\n' "$(date +%T)" "$*" >&2; }
started=$(date +%s)

# ------------------------------------------------------------------ tools and builds
if ! command -v wrk >/dev/null; then
  log "installing wrk (Debian)"
  sudo_cmd=""; [ "$(id -u)" = 0 ] || sudo_cmd="sudo"
  $sudo_cmd apt-get update -qq
  DEBIAN_FRONTEND=noninteractive $sudo_cmd apt-get install -y -qq --no-install-recommends wrk >/dev/null
fi
command -v taskset >/dev/null || { echo "taskset (util-linux) is required" >&2; exit 1; }
if [ "$(nproc)" -lt 2 ]; then echo "needs 2 CPUs (server on CPU 1, load on CPU 0)" >&2; exit 1; fi
# moto (and PostgreSQL) the way the tests get them.
eval "$(bash tests/setup.sh)"
venv_python=$(dirname "$MOTO_SERVER")/python

log "building (release): service, floor, loadgen"
[ -n "${BENCH_BIN:-}" ] || cargo build --release --quiet --bin rollback-responder
cargo build --release --quiet --manifest-path bench/floor/Cargo.toml
cargo build --release --quiet --manifest-path bench/loadgen/Cargo.toml
BIN=${BENCH_BIN:-$CARGO_TARGET_DIR/release/rollback-responder}
FLOOR=$CARGO_TARGET_DIR/release/bench-floor
LOADGEN=$CARGO_TARGET_DIR/release/bench-loadgen

# ------------------------------------------------------------------ quiet machine
busy() { pgrep -x cargo >/dev/null || pgrep -x rustc >/dev/null || pgrep -f moto_server >/dev/null; }
load1() { cut -d' ' -f1 /proc/loadavg; }
if [ "${BENCH_WAIT_QUIET:-0}" = 1 ]; then
  for _ in $(seq 1 40); do
    if ! busy && awk -v l="$(load1)" 'BEGIN{exit !(l < 1.0)}'; then break; fi
    log "machine busy (load $(load1); cargo/rustc/moto running: $(busy && echo yes || echo no)); waiting"
    sleep 15
  done
fi
{
  echo "date: $(date -u +%Y-%m-%dT%H:%M:%SZ)"
  echo "commit: $(git rev-parse --short HEAD 2>/dev/null || echo unknown)${BENCH_BIN:+ (service binary: $BENCH_BIN)}"
  echo "cpus: $(nproc) x $(lscpu | sed -n 's/^Model name:[[:space:]]*//p' | head -n1)"
  echo "memory: $(awk '/MemTotal/ {printf "%.1f GiB", $2/1048576}' /proc/meminfo)"
  echo "kernel: $(uname -sr)"
  echo "rustc: $(rustc --version)"
  echo "wrk: $(wrk --version 2>&1 | head -n1 | cut -d' ' -f1-2)"
  echo "disk (SQLite file): $(df -h /tmp | awk 'NR==2 {print $1" "$2}') fs $(stat -f -c %T /tmp)"
  # The bound of one-commit-per-request durability: how many 4 KiB write+fsync pairs per second
  # the disk under the SQLite files does.
  echo "fsync probe ($work): $(python3 - "$work" <<'PY'
import os, sys, time
path = os.path.join(sys.argv[1], "fsync-probe")
fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC)
n, t = 1000, time.perf_counter()
for _ in range(n):
    os.write(fd, b"x" * 4096)
    os.fsync(fd)
dt = time.perf_counter() - t
os.close(fd)
os.unlink(path)
print(f"{n / dt:.0f} write+fsync/s ({dt / n * 1e3:.3f} ms each)")
PY
)"
  echo "load before: $(cut -d' ' -f1-3 /proc/loadavg); other builds/tests running: $(busy && echo yes || echo no)"
  echo "settings: duration ${DURATION}s, warm-up ${WARMUP}s, rounds ${ROUNDS}, wrk -t1 -c${CONNS}, fixed rate ${RATE}/s"
} > "$raw/machine.txt"
cat "$raw/machine.txt" >&2
# Everything this script starts shares its process group; CPU used by any other process during
# a measurement is recorded (bench/monitor.py) and shown next to the figure it may have disturbed.
python3 bench/monitor.py "$raw/monitor.jsonl" "$(ps -o pgid= $$ | tr -d ' ')" &
monitor_pid=$!
now() { date +%s.%N; }

# ------------------------------------------------------------------ helpers
free_port() { python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1",0)); print(s.getsockname()[1])'; }

wait_up() { # URL METHOD
  for _ in $(seq 1 200); do
    if curl -s -o /dev/null -X "$2" "$1" -H 'content-type: application/json' --data '{}' 2>/dev/null; then return 0; fi
    sleep 0.05
  done
  echo "server at $1 did not come up" >&2; return 1
}

# Ten policies (svc-0 .. svc-9), like the shipped one: HighErrorRate rolls back automatically.
# The service runs in dry run without AWS settings: decisions and incidents are real, the ALB
# write is only recorded.
policies=$work/policies
mkdir -p "$policies"
for i in $(seq 0 9); do
  cat > "$policies/svc-$i.yaml" <<YAML
name: svc-$i
service: svc-$i
matchers: ['service="svc-$i"']
target:
  alb:
    listener_arn: arn:aws:elasticloadbalancing:us-east-1:123456789012:listener/app/svc-$i/1234567890123456/1234567890123456
    stable_target_group_arn: arn:aws:elasticloadbalancing:us-east-1:123456789012:targetgroup/svc-$i-stable/1234567890123456
triggers:
  - name: errors
    matchers: ['alertname="HighErrorRate"']
    for: 0s
    mode: auto
YAML
done
"$BIN" policy check "$policies" >/dev/null

start_floor() {
  port=$(free_port)
  taskset -c $SERVER_CPU "$FLOOR" "127.0.0.1:$port" 2>"$work/floor.log" &
  server_pid=$!
  wait_up "http://127.0.0.1:$port/webhook/alertmanager" POST
}

# start_service STORE_URL: fresh store, the bench policies, dry run, bearer token.
start_service() {
  port=$(free_port)
  ROLLBACK_RESPONDER__STORE__URL="$1" \
  ROLLBACK_RESPONDER__POLICIES_DIR="$policies" \
  ROLLBACK_RESPONDER__WEBHOOK__BEARER_TOKEN="$BENCH_TOKEN" \
  ROLLBACK_RESPONDER__SERVER__SHUTDOWN_GRACE=2s \
  ROLLBACK_RESPONDER__LOG__LEVEL=warn \
    taskset -c $SERVER_CPU "$BIN" serve --listen "127.0.0.1:$port" >>"$work/service.log" 2>&1 &
  server_pid=$!
  wait_up "http://127.0.0.1:$port/readyz" GET
}

# stop_server: SIGTERM, then SIGKILL after 5 s. Sets $stopped to how long the stop took and how.
stop_server() {
  local t0 how="term"
  t0=$(date +%s%N)
  kill -TERM "$server_pid" 2>/dev/null || true
  for _ in $(seq 1 100); do
    if ! kill -0 "$server_pid" 2>/dev/null || grep -q '^State:.*zombie' "/proc/$server_pid/status" 2>/dev/null; then break; fi
    sleep 0.05
  done
  if kill -0 "$server_pid" 2>/dev/null && ! grep -q '^State:.*zombie' "/proc/$server_pid/status" 2>/dev/null; then
    kill -KILL "$server_pid" 2>/dev/null || true
    how="kill"
  fi
  wait "$server_pid" 2>/dev/null || true
  server_pid=""
  stopped=$(printf '{"stop":"%s","stop_ms":%d}' "$how" $(( ($(date +%s%N) - t0) / 1000000 )))
}

vm_hwm_kb() { awk '/VmHWM/ {print $2}' "/proc/$server_pid/status"; }

# store_counts STORE_URL: alerts stored, alerts not yet processed by the background, incidents.
store_counts() {
  case "$1" in
    sqlite://*) python3 - "${1#sqlite://}" <<'PY'
import sqlite3, sys, json
c = sqlite3.connect(f"file:{sys.argv[1]}?mode=ro", uri=True, timeout=30)
q = lambda s: c.execute(s).fetchone()[0] or 0
print(json.dumps({"stored": q("SELECT COUNT(*) FROM alerts"), "pending": q("SELECT SUM(pending) FROM alerts"),
                  "incidents": q("SELECT COUNT(*) FROM incidents"), "events": q("SELECT COUNT(*) FROM incident_events")}))
PY
    ;;
    postgres://*) psql -qtA "$1" -c "SELECT json_build_object('stored', (SELECT COUNT(*) FROM alerts), 'pending', (SELECT COALESCE(SUM(pending),0) FROM alerts), 'incidents', (SELECT COUNT(*) FROM incidents), 'events', (SELECT COUNT(*) FROM incident_events))" ;;
  esac
}

n_store=0
fresh_store() { # BACKEND: sets $store_url to a new, empty store
  n_store=$((n_store + 1))
  case "$1" in
    sqlite) store_url="sqlite://$work/store-$n_store.db" ;;
    # Diagnostic only, NOT durable: fsync on tmpfs returns at once, which shows what the
    # service costs when commits are free.
    sqlite-tmpfs) store_url="sqlite:///dev/shm/rr-bench-$$-$n_store.db" ;;
    postgres)
      psql -qtA "postgres://postgres:postgres@127.0.0.1:5432/postgres" -c "CREATE DATABASE rr_bench_$n_store" >/dev/null
      store_url="postgres://postgres:postgres@127.0.0.1:5432/rr_bench_$n_store" ;;
  esac
}
drop_store() {
  case "$1" in
    postgres://*)
      psql -qtA "postgres://postgres:postgres@127.0.0.1:5432/postgres" -c "DROP DATABASE IF EXISTS ${1##*/} WITH (FORCE)" >/dev/null ;;
    # Deleted right away, so the kernel does not write back hundreds of MB of dirty pages of
    # old stores during the next measurement.
    sqlite://*) rm -f "${1#sqlite://}" "${1#sqlite://}-wal" "${1#sqlite://}-shm" ;;
  esac
}

# wrk_run SCRIPT ALERTS LABEL: warm-up (discarded), then the measured run; prints its JSON.
wrk_run() {
  taskset -c $LOAD_CPU wrk -t1 -c"$CONNS" -d"${WARMUP}s" -s "bench/$1" "http://127.0.0.1:$port" -- "$2" >/dev/null
  taskset -c $LOAD_CPU wrk -t1 -c"$CONNS" -d"${DURATION}s" --latency -s "bench/$1" "http://127.0.0.1:$port" -- "$2" \
    > "$raw/$3.txt"
  sed -n 's/^BENCH_JSON //p' "$raw/$3.txt"
}

# ------------------------------------------------------------------ 1. throughput
throughput() { # BACKEND KIND ALERTS [ROUNDS]
  local backend=$1 kind=$2 alerts=$3 script json url t0 t1
  script=$([ "$kind" = new ] && echo new_alerts.lua || echo repeated.lua)
  for round in $(seq 1 "${4:-$ROUNDS}"); do
    log "throughput $kind, $alerts alerts: floor (round $round)"
    start_floor
    t0=$(now)
    json=$(wrk_run "$script" "$alerts" "tp-$kind-$alerts-floor-$round")
    t1=$(now)
    stop_server
    printf '{"section":"throughput","backend":"%s","kind":"%s","alerts":%s,"server":"floor","round":%s,"wrk":%s,"run":%s,"window":[%s,%s]}\n' \
      "$backend" "$kind" "$alerts" "$round" "$json" "$stopped" "$t0" "$t1" >> "$raw/runs.jsonl"

    log "throughput $kind, $alerts alerts: service on $backend (round $round)"
    fresh_store "$backend"
    url=$store_url
    start_service "$url"
    t0=$(now)
    json=$(wrk_run "$script" "$alerts" "tp-$kind-$alerts-service-$backend-$round")
    t1=$(now)
    local counts hwm
    counts=$(store_counts "$url")
    hwm=$(vm_hwm_kb)
    stop_server
    drop_store "$url"
    printf '{"section":"throughput","backend":"%s","kind":"%s","alerts":%s,"server":"service","round":%s,"wrk":%s,"store":%s,"vm_hwm_kb":%s,"run":%s,"window":[%s,%s]}\n' \
      "$backend" "$kind" "$alerts" "$round" "$json" "$counts" "$hwm" "$stopped" "$t0" "$t1" >> "$raw/runs.jsonl"
  done
}

if [[ " $ONLY " == *" throughput "* ]]; then
  for kind in new repeated; do
    for alerts in ${BENCH_ALERTS:-1 10 100}; do throughput sqlite "$kind" "$alerts"; done
  done
  # Diagnostic: the same 10-alert new-alert load with commits made free (tmpfs), one round.
  throughput sqlite-tmpfs new 10 1
fi

# ------------------------------------------------------------------ 2. fixed rate (open loop)
fixed() { # SERVER KIND
  local json counts="null" hwm="null" url="" t0 t1
  if [ "$1" = floor ]; then start_floor; else fresh_store sqlite; url=$store_url; start_service "$url"; fi
  t0=$(now)
  json=$(taskset -c $LOAD_CPU "$LOADGEN" --addr "127.0.0.1:$port" --rate "$RATE" --duration "$DURATION" \
    --warmup "$WARMUP" --alerts 10 --mode "$2" --connections 64 --label "$1-$2" | tee "$raw/fixed-$1-$2.txt" \
    | sed -n 's/^BENCH_JSON //p')
  t1=$(now)
  if [ "$1" = service ]; then counts=$(store_counts "$url"); hwm=$(vm_hwm_kb); fi
  stop_server
  [ -z "$url" ] || drop_store "$url"
  printf '{"section":"fixed","server":"%s","kind":"%s","load":%s,"store":%s,"vm_hwm_kb":%s,"run":%s,"window":[%s,%s]}\n' \
    "$1" "$2" "$json" "$counts" "$hwm" "$stopped" "$t0" "$t1" >> "$raw/runs.jsonl"
}
if [[ " $ONLY " == *" fixed "* ]]; then
  for s in "floor new" "service new" "floor repeated" "service repeated"; do
    log "fixed rate ${RATE}/s, 10 alerts: $s"
    # shellcheck disable=SC2086
    fixed $s
  done
fi

# ------------------------------------------------------------------ 3. storm, 4. time to rollback
if [[ " $ONLY " == *" storm "* ]]; then
  log "storm: 10,000 alerts for one service within about a second (moto through a counting proxy)"
  t0=$(now)
  taskset -c $LOAD_CPU "$venv_python" bench/rollback_bench.py storm --bin "$BIN" --moto "$MOTO_SERVER" --loadgen "$LOADGEN" \
    --out "$raw/storm.json" > "$raw/storm.txt"
  # The same 10,000 alerts released within 0.1 s: the storm above arrives over a second, so
  # "decided within a second of its start" is bounded by its own sending; this one is not.
  log "storm, burst: the same 10,000 alerts released within 0.1 s"
  taskset -c $LOAD_CPU "$venv_python" bench/rollback_bench.py storm --spread 0.1 --bin "$BIN" --moto "$MOTO_SERVER" \
    --loadgen "$LOADGEN" --out "$raw/storm-burst.json" > "$raw/storm-burst.txt"
  printf '{"section":"window","name":"storm","window":[%s,%s]}\n' "$t0" "$(now)" >> "$raw/runs.jsonl"
fi
if [[ " $ONLY " == *" ttr "* ]]; then
  log "time to rollback: 100 incidents (plus one warm-up), one listener each"
  t0=$(now)
  taskset -c $LOAD_CPU "$venv_python" bench/rollback_bench.py ttr --bin "$BIN" --moto "$MOTO_SERVER" --out "$raw/ttr.json" > "$raw/ttr.txt"
  printf '{"section":"window","name":"ttr","window":[%s,%s]}\n' "$t0" "$(now)" >> "$raw/runs.jsonl"
fi

# PostgreSQL last: its server is not pinned, and its background writer and checkpointer go on
# flushing after the run: nothing measured afterwards should share the disk with that.
if [ "${BENCH_POSTGRES:-0}" = 1 ] || [[ " $ONLY " == *" postgres "* ]]; then
  for kind in new repeated; do throughput postgres "$kind" 10 1; done
fi
echo "load after: $(cut -d' ' -f1-3 /proc/loadavg); total $(( $(date +%s) - started )) s" >> "$raw/machine.txt"
python3 bench/report.py "$raw" "$results/latest.md"
