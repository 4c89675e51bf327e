#!/usr/bin/env bash
# Ingest and query benchmark: the same Influx line-protocol stream (1000-line batches, 400
# series, 2 fields) into Shoal, VictoriaMetrics and InfluxDB 1.x, one after the other on this
# machine, with wrk (1 thread, 4 connections). For each: lines/s over a timed run
# (BENCH_SECONDS), then the load is topped up to exactly BENCH_LINES lines (10M: 10M points per
# field metric), then bytes on disk per point after compaction and the best-of-3 latency of an
# avg-by-region query over those points. Prints Shoal's ratio to each.
#
# Lines/s on this kind of machine drift by 10% or more over minutes, so the Shoal / VM ingest
# ratio also comes from BENCH_ROUNDS (default 3) paired timed runs on fresh data, Shoal and VM
# back to back, in alternating order; the median of the rounds' ratios is printed.
#
#   bash benches/ingest.sh            # run by hand, not in CI; installs what it needs (root)
set -euo pipefail
cd "$(dirname "$0")/.."
SECONDS_TIMED=${BENCH_SECONDS:-20}
LINES=${BENCH_LINES:-10000000}
WORK=$(mktemp -d /tmp/shoal-bench.XXXXXX)
trap 'kill $(jobs -p) 2>/dev/null || true; rm -rf "$WORK"' EXIT

need=()
command -v wrk >/dev/null || need+=(wrk)
command -v victoria-metrics >/dev/null || need+=(victoria-metrics)
command -v influxd >/dev/null || need+=(influxdb)
command -v curl >/dev/null || need+=(curl)
if [ ${#need[@]} -gt 0 ]; then
  apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq "${need[@]}" >/dev/null
fi
cargo build --release --quiet
SHOAL=./target/release/shoal

# Timestamps: 1 s per 400 lines, so 10M lines span 25,000 s; start far enough back that the
# timed run plus the top-up end before now.
BASE_S=$(( $(date +%s) - 2 * LINES / 400 - 3600 ))

wait_http() { for _ in $(seq 1 200); do curl -sf -o /dev/null "$1" && return 0; sleep 0.1; done; echo "no answer from $1" >&2; return 1; }

timed_run() { # url_path host:port -> prints lines/s of a timed run (sets reqs, dur)
  sync   # the previous run's dirty pages are written back before, not during, this one
  BENCH_BASE_S=$BASE_S BENCH_PATH="$1" wrk -t1 -c4 -d"${SECONDS_TIMED}s" --timeout 30s \
    -s benches/lineproto.lua "http://$2" | tee "$WORK/wrk.out" >&2
  local bad
  read -r reqs dur bad < <(awk '/^RESULT/ { split($2,a,"="); split($3,b,"="); split($4,c,"="); print a[2], b[2], c[2] }' "$WORK/wrk.out")
  [ "$bad" = 0 ] || { echo "ERRORS"; return; }
  awk -v r="$reqs" -v d="$dur" 'BEGIN { printf "%.0f\n", r * 1000 / (d / 1e6) }'
}

run_wrk() { # url_path host:port -> prints lines/s of a timed run, then tops up to $LINES lines
  local reqs dur
  timed_run "$1" "$2"
  local rest=$(( LINES / 1000 - reqs ))
  if [ "$rest" -gt 0 ]; then
    # Continue the stream where the timed run stopped; wrk stops sending at exactly $rest.
    local secs=$(( rest * 1000 * 3 / (reqs * 1000 / (dur / 1000000) + 1) + 10 ))
    BENCH_BASE_S=$(( BASE_S + reqs * 1000 / 400 + 1 )) BENCH_REQUESTS=$rest BENCH_PATH="$1" \
      wrk -t1 -c4 -d"${secs}s" --timeout 30s -s benches/lineproto.lua "http://$2" > "$WORK/wrk2.out" 2>&1
    grep RESULT "$WORK/wrk2.out" >&2
  fi
  LOADED_LINES=$(( reqs * 1000 > LINES ? reqs * 1000 : LINES ))
}

du_bytes() { du -sb "$1" | cut -f1; }

time_query() { # command... -> seconds of the best of 3
  local best=999
  for _ in 1 2 3; do
    local s e; s=$(date +%s.%N); "$@" > "$WORK/q.out"; e=$(date +%s.%N)
    best=$(echo "$e - $s" | bc -l | awk -v b="$best" '{ print ($1 < b) ? $1 : b }')
  done
  echo "$best"
}

start_vm() { # data dir
  victoria-metrics -storageDataPath="$1" -httpListenAddr=127.0.0.1:18428 -retentionPeriod=10y \
    -loggerLevel=ERROR > "$1.log" 2>&1 &
  VM_PID=$!
  wait_http "http://127.0.0.1:18428/health"
}

start_shoal() { # data dir; sets SHOAL_PID and SH
  mkdir -p "$1"
  $SHOAL start --set shoal.data-dir="$1" --set shoal.http.port=0 --set shoal.node.id=bench \
    --set shoal.gossip.port=0 --set shoal.log-level=warn > "$1.log" 2>&1 &
  SHOAL_PID=$!
  for _ in $(seq 1 100); do [ -s "$1/http.addr" ] && break; sleep 0.1; done
  SH=$(cat "$1/http.addr")
  wait_http "http://$SH/livez"
}

ROUNDS=${BENCH_ROUNDS:-3}
RATIOS=()
for round in $(seq 1 "$ROUNDS"); do
  order="shoal vm"; [ $((round % 2)) = 0 ] && order="vm shoal"
  for system in $order; do
    echo "== round $round: $system" >&2
    if [ "$system" = shoal ]; then
      start_shoal "$WORK/round-shoal"
      R_SHOAL=$(timed_run "/write?db=bench&namespace=bench" "$SH")
      kill -TERM $SHOAL_PID; wait $SHOAL_PID || true
      rm -rf "$WORK/round-shoal" "$WORK/round-shoal.log"
    else
      start_vm "$WORK/round-vm"
      R_VM=$(timed_run "/write" "127.0.0.1:18428")
      kill -TERM $VM_PID; wait $VM_PID || true
      rm -rf "$WORK/round-vm" "$WORK/round-vm.log"
    fi
  done
  RATIOS+=("$(echo "$R_SHOAL / $R_VM" | bc -l | xargs printf %.2f)")
  echo "round $round: shoal $R_SHOAL, victoria-metrics $R_VM lines/s, ratio ${RATIOS[-1]}" | tee -a "$WORK/rounds" >&2
done
MEDIAN_RATIO=$(printf "%s\n" "${RATIOS[@]}" | sort -n | awk '{ a[NR] = $1 } END { print (NR % 2) ? a[(NR + 1) / 2] : (a[NR / 2] + a[NR / 2 + 1]) / 2 }')

echo "== Shoal (fsync before every acknowledgement)" >&2
start_shoal "$WORK/shoal"
run_wrk "/write?db=bench&namespace=bench" "$SH" > "$WORK/rate"; SHOAL_RATE=$(head -1 "$WORK/rate")
SHOAL_Q=$(time_query curl -sf -XPOST "http://$SH/query" \
  -d '{"db":"bench","namespace":"bench","queryString":"SELECT avg(value) FROM cpu_usage GROUP BY region"}')
head -c 300 "$WORK/q.out" >&2; echo >&2
kill -TERM $SHOAL_PID; wait $SHOAL_PID || true   # a clean stop compacts everything into segments
SHOAL_BPP=$(echo "$(du_bytes "$WORK/shoal/shards") / ($LOADED_LINES * 2)" | bc -l)

echo "== Shoal, 3-node cluster on this machine, replication factor 2" >&2
start_member() { # index, extra --set arguments...
  local i=$1; shift
  mkdir -p "$WORK/c$i"
  $SHOAL start --set shoal.data-dir="$WORK/c$i" --set shoal.node.id="c$i" --set shoal.http.port=0 \
    --set shoal.gossip.port=0 --set shoal.log-level=warn --set shoal.cluster.replication-factor=2 "$@" \
    > "$WORK/c$i.log" 2>&1 &
  for _ in $(seq 1 100); do [ -s "$WORK/c$i/http.addr" ] && break; sleep 0.1; done
}
start_member 1
SEED=$(cat "$WORK/c1/gossip.addr")
start_member 2 --set "shoal.cluster.seeds=[\"$SEED\"]"
start_member 3 --set "shoal.cluster.seeds=[\"$SEED\"]"
C1=$(cat "$WORK/c1/http.addr")
for _ in $(seq 1 300); do
  alive=$(curl -sf "http://$C1/cluster/members" | python3 -c 'import json,sys; print(sum(m["state"]=="alive" for m in json.load(sys.stdin)["members"]))' 2>/dev/null || echo 0)
  [ "$alive" = 3 ] && break; sleep 0.1
done
run_wrk "/write?db=bench&namespace=bench" "$C1" > "$WORK/rate"; CLUSTER_RATE=$(head -1 "$WORK/rate")
CLUSTER_Q=()
for i in 1 2 3; do
  CLUSTER_Q+=("$(time_query curl -sf -XPOST "http://$(cat "$WORK/c$i/http.addr")/query" \
    -d '{"db":"bench","namespace":"bench","queryString":"SELECT avg(value) FROM cpu_usage GROUP BY region"}')")
done
head -c 300 "$WORK/q.out" >&2; echo >&2
kill $(jobs -p) 2>/dev/null || true; wait 2>/dev/null || true

echo "== VictoriaMetrics $(victoria-metrics -version 2>&1 | head -1)" >&2
start_vm "$WORK/vm"
run_wrk "/write" "127.0.0.1:18428" > "$WORK/rate"; VM_RATE=$(head -1 "$WORK/rate")
curl -sf "http://127.0.0.1:18428/internal/force_flush" > /dev/null
END=$(( BASE_S + 2 * LINES / 400 + 10 ))
VM_QUERY="sum by (region) (sum_over_time(cpu_usage[10d])) / sum by (region) (count_over_time(cpu_usage[10d]))"
VM_Q=$(time_query curl -sf "http://127.0.0.1:18428/api/v1/query" --data-urlencode "query=$VM_QUERY" -d "time=$END")
head -c 300 "$WORK/q.out" >&2; echo >&2
curl -sf "http://127.0.0.1:18428/internal/force_merge" > /dev/null || true
sleep 5
kill -TERM $VM_PID; wait $VM_PID || true
VM_BPP=$(echo "$(du_bytes "$WORK/vm") / ($LOADED_LINES * 2)" | bc -l)

echo "== InfluxDB $(influxd version 2>&1 | head -1) (default WAL fsync)" >&2
cat > "$WORK/influx.conf" <<CONF
reporting-disabled = true
bind-address = "127.0.0.1:18088"
[meta]
  dir = "$WORK/influx/meta"
[data]
  dir = "$WORK/influx/data"
  wal-dir = "$WORK/influx/wal"
  cache-snapshot-write-cold-duration = "2s"
  compact-full-write-cold-duration = "5s"
  max-values-per-tag = 0
[http]
  bind-address = "127.0.0.1:18086"
  log-enabled = false
CONF
influxd -config "$WORK/influx.conf" > "$WORK/influx.log" 2>&1 &
INFLUX_PID=$!
wait_http "http://127.0.0.1:18086/ping"
curl -sf -XPOST "http://127.0.0.1:18086/query" --data-urlencode "q=CREATE DATABASE bench" > /dev/null
run_wrk "/write?db=bench" "127.0.0.1:18086" > "$WORK/rate"; INFLUX_RATE=$(head -1 "$WORK/rate")
INFLUX_Q=$(time_query curl -sf -G "http://127.0.0.1:18086/query" --data-urlencode "db=bench" \
  --data-urlencode "q=SELECT mean(usage) FROM cpu GROUP BY region")
head -c 300 "$WORK/q.out" >&2; echo >&2
sleep 15   # let the cache snapshot and full compaction run
kill -TERM $INFLUX_PID; wait $INFLUX_PID || true
INFLUX_BPP=$(echo "$(du_bytes "$WORK/influx/data") / ($LOADED_LINES * 2)" | bc -l)

echo
echo "Ingest: timed ${SECONDS_TIMED}s runs, wrk -t1 -c4, 1000-line bodies, 400 series, 2 fields, $(nproc) cores; queries and bytes/point over $LOADED_LINES lines (x2 fields)"
printf "%-16s %12s %14s %16s\n" system lines/s bytes/point "avg-by-region(s)"
printf "%-16s %12s %14.2f %16.3f\n" shoal "$SHOAL_RATE" "$SHOAL_BPP" "$SHOAL_Q"
printf "%-16s %12s %14.2f %16.3f\n" victoria-metrics "$VM_RATE" "$VM_BPP" "$VM_Q"
printf "%-16s %12s %14.2f %16.3f\n" influxdb "$INFLUX_RATE" "$INFLUX_BPP" "$INFLUX_Q"
echo "shoal 3 nodes RF 2: $CLUSTER_RATE lines/s through one node = $(echo "$CLUSTER_RATE / $SHOAL_RATE" | bc -l | xargs printf %.2f) x the single node; avg-by-region through c1/c2/c3: ${CLUSTER_Q[0]} / ${CLUSTER_Q[1]} / ${CLUSTER_Q[2]} s"
echo "shoal / victoria-metrics ingest: $(echo "$SHOAL_RATE / $VM_RATE" | bc -l | xargs printf %.2f) in the runs above"
cat "$WORK/rounds"
echo "shoal / victoria-metrics ingest, median of $ROUNDS paired rounds: $MEDIAN_RATIO"
echo "shoal / influxdb ingest:         $(echo "$SHOAL_RATE / $INFLUX_RATE" | bc -l | xargs printf %.2f)"
